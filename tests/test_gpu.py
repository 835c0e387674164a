"""The CUDA path: solver, saliency, attacks and the engine on a GPU, compared with the same computation on the CPU.

Every test here but the last is marked ``gpu``: ``tests/conftest.py`` skips them, with a stated reason, where torch
sees no CUDA device, so the default ``pytest`` (``make test``) deselects nothing and passes on a CPU-only machine;
``make gpu-check`` (``benchmarks/gpu_check.py``) runs ``pytest -m gpu`` plus one benchmark row per model on a GPU.

Tolerances (CUDA vs CPU), stated per test:

* float64 computations (saliency maps, the solver's float64 solve) agree to ``rtol 1e-6`` — both devices compute the
  same formulas and differ only in the order of their reductions;
* float32 saliency maps to ``1e-4`` of the largest |attribution| (TF32 off, see ``_ieee_fp32``: with cuDNN's
  default TF32 convolutions the inputs of every convolution are rounded to 10 mantissa bits, ~1e-3 relative);
* closest flip points: both devices certify every point, the distances agree to ``1e-4`` relative on a smooth MLP
  (the same problem solved to the same tolerance) and within 1 % on the ReLU CNN (each certified within 1 % of
  the closest flip point of its activation region, and the two runs may polish in neighbouring regions);
* top-k attacks (sign steps): a component whose gradient is ~0 may take the other sign on the other device, so the
  iterates are compared by the share of pixels that differ (<= 2 %) and the attack's metrics (top-k intersection
  within 0.1); the label check must agree exactly.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flipfrag import engine, saliency
from flipfrag.attacks import TopKAttack
from flipfrag.engine import Task, run_tasks, task_key
from flipfrag.flip import closest_flip_point
from flipfrag.models import MLP, SmallCNN

REPO = Path(__file__).resolve().parent.parent
CUDA = torch.device("cuda")
gpu = pytest.mark.gpu


@contextlib.contextmanager
def _ieee_fp32():
    """Full-precision float32 matmuls and convolutions on CUDA for the comparison (restored on exit)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture
def ieee():
    with _ieee_fp32():
        yield


def _cuda(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).to(CUDA)


def _tiny_cnn(dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(in_channels=1, n_classes=3, width=4).to(dtype).eval()
    x = torch.rand(3, 1, 16, 16, dtype=dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


# ------------------------------------------------------------------------------------------------------ solver


@gpu
def test_solver_smooth_mlp_cuda_matches_cpu(ieee):
    """A float32 tanh MLP (the solver solves in float64, certifies in float32): every point certified on both
    devices, the result on the input's device, distances within 1e-4 relative."""
    torch.manual_seed(0)
    net = MLP(20, [16, 16], 4, activation="tanh").eval()
    x = torch.rand(8, 20)
    cpu = closest_flip_point(net, x, lower=0.0, upper=1.0)
    gpu_res = closest_flip_point(_cuda(net), x.to(CUDA), lower=0.0, upper=1.0)
    assert gpu_res.x_flip.device.type == "cuda", "results should stay on the input's device"
    assert cpu.success_rate == 1.0, cpu.status
    assert gpu_res.success_rate == 1.0, gpu_res.status
    torch.testing.assert_close(gpu_res.distance.cpu().double(), cpu.distance.double(), rtol=1e-4, atol=1e-7)
    # the CUDA flip point is a flip point of the CPU model too (same weights), up to float32 rounding
    with torch.no_grad():
        z = net(gpu_res.x_flip.cpu())
    zs, zt = z.gather(1, gpu_res.source.cpu()[:, None])[:, 0], z.gather(1, gpu_res.target.cpu()[:, None])[:, 0]
    assert ((zs - zt).abs() <= 1e-4 * torch.maximum(zs.abs(), zt.abs()).clamp(min=1)).all()


@gpu
def test_solver_every_result_tensor_on_cuda_float64_matches_cpu(ieee):
    """A float64 tanh MLP with restarts, a one-hot group and ``differentiable=True`` on CUDA: every tensor of the
    result on the input's device, the points in its dtype, every point certified on both devices, distances within
    1e-6 relative (the same float64 problem; only the order of reductions differs) and the gradient d x_flip / d x
    within 1e-5 of the CPU's."""
    torch.manual_seed(0)
    net = MLP(6, [10], 3, activation="tanh").double().eval()
    x = torch.rand(4, 6, dtype=torch.float64)
    x[:, 3:] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    kw = dict(lower=0.0, upper=1.0, restarts=1, groups=[[3, 4, 5]], differentiable=True)
    xc = x.clone().requires_grad_(True)
    xg = x.to(CUDA).requires_grad_(True)
    cpu = closest_flip_point(net, xc, **kw)
    gpu_res = closest_flip_point(_cuda(net), xg, **kw)
    for name, t in vars(gpu_res).items():
        if isinstance(t, torch.Tensor):
            assert t.device.type == "cuda", name
    assert gpu_res.x_flip.dtype == torch.float64
    assert cpu.success_rate == gpu_res.success_rate == 1.0, (cpu.status, gpu_res.status)
    torch.testing.assert_close(gpu_res.distance.cpu(), cpu.distance, rtol=1e-6, atol=1e-9)
    (gc,) = torch.autograd.grad(cpu.x_flip.sum(), xc)
    (gg,) = torch.autograd.grad(gpu_res.x_flip.sum(), xg)
    torch.testing.assert_close(gg.cpu(), gc, rtol=1e-5, atol=1e-7)


@gpu
@pytest.mark.slow
def test_solver_mnist_smallcnn_digits_cuda_match_cpu(ieee):
    """The shipped MNIST SmallCNN (ReLU, max-pooling), 4 test digits: certified on both devices (region polish),
    distances within 1 % (each run is certified within 1 % of its region's closest flip point)."""
    from flipfrag import models

    net, ds, _ = models.trained_model("mnist-cnn", "quick", seed=0)
    net = net.float().eval()
    x = ds.X_test[:4].float()
    cpu = closest_flip_point(net, x, lower=0.0, upper=1.0)
    gpu_res = closest_flip_point(_cuda(net), x.to(CUDA), lower=0.0, upper=1.0)
    assert cpu.success_rate == 1.0 and gpu_res.success_rate == 1.0, (cpu.status, gpu_res.status)
    rel = (gpu_res.distance.cpu().double() - cpu.distance.double()).abs() / cpu.distance.double()
    assert (rel <= 0.01).all(), rel
    assert gpu_res.x_flip.device.type == "cuda"


@gpu
@pytest.mark.slow
def test_solver_cifar10_cnn_photo_cuda_matches_cpu(ieee):
    """The pretrained CIFAR-10 ReLU CNN, one shipped photo (the CPU test's photo 1): certified by the region polish
    on both devices, distances within 1 % of each other."""
    from flipfrag import datasets, models

    net = models.cifar10_cnn(pretrained=True).eval()
    x = datasets.load_cifar10().X_test[1:2].float()
    cpu = closest_flip_point(net, x, lower=0.0, upper=1.0)
    gpu_res = closest_flip_point(_cuda(net), x.to(CUDA), lower=0.0, upper=1.0)
    assert bool(cpu.converged[0]) and bool(gpu_res.converged[0]), (cpu.status, gpu_res.status)
    dc, dg = float(cpu.distance[0]), float(gpu_res.distance[0])
    assert abs(dg - dc) <= 0.01 * dc, (dg, dc)
    assert float(gpu_res.distance[0]) <= 1.01 * float(gpu_res.upper_bound[0])
    assert gpu_res.x_flip.device.type == "cuda"
    assert (gpu_res.x_flip >= 0).all() and (gpu_res.x_flip <= 1).all()


# ------------------------------------------------------------------------------------------------------ saliency


@gpu
@pytest.mark.parametrize("method", saliency.METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_saliency_method_cuda_matches_cpu(method, dtype, ieee):
    model, x, y = _tiny_cnn(dtype)
    a_cpu = saliency.attribute(model, x, y, method)
    a_gpu = saliency.attribute(_cuda(model), x.to(CUDA), y.to(CUDA), method)
    assert a_gpu.device.type == "cuda"
    scale = float(a_cpu.abs().max())
    assert scale > 0
    if dtype == torch.float64:
        torch.testing.assert_close(a_gpu.cpu(), a_cpu, rtol=1e-6, atol=1e-9 * scale)
    else:
        torch.testing.assert_close(a_gpu.cpu(), a_cpu, rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(saliency.saliency_map(a_gpu).cpu(), saliency.saliency_map(a_cpu),
                               rtol=0, atol=1e-4 * float(saliency.saliency_map(a_cpu).max()))


# ------------------------------------------------------------------------------------------------------ attacks


def _pixels_differing(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> float:
    return float(((a - b).abs() > tol).float().mean())


@gpu
@pytest.mark.parametrize("method", ["gradient", "deeplift"])
def test_topk_attack_cuda_matches_cpu(method, ieee):
    model, x, y = _tiny_cnn(torch.float64)
    kw = dict(k=20, eps=8 / 255, step=2 / 255, iters=4, progress=False)
    r_cpu = TopKAttack(model, method, **kw)(x, y)
    r_gpu = TopKAttack(_cuda(model), method, **kw)(x.to(CUDA), y.to(CUDA))
    assert r_gpu.x_adv.device.type == "cuda"
    assert torch.equal(r_gpu.label_kept.cpu(), r_cpu.label_kept)
    assert _pixels_differing(r_gpu.x_adv.cpu(), r_cpu.x_adv) <= 0.02
    assert (r_gpu.x_adv.cpu() - x).abs().max() <= 8 / 255 + 1e-9
    torch.testing.assert_close(r_gpu.metrics["topk"].cpu().double(), r_cpu.metrics["topk"].double(), rtol=0,
                               atol=0.1)


# ------------------------------------------------------------------------------------------------------ engine


def attack_cell(model, x, y, eps, *, k, iters):
    """An attack-grid cell stand-in (module level: the engine may pickle it)."""
    out = TopKAttack(model, "gradient", k=k, eps=eps, step=eps / 4, iters=iters, progress=False)(x, y)
    return {"x_adv": out.x_adv, "topk": out.metrics["topk"], "label_kept": out.label_kept}


def flip_shard(model, x):
    return closest_flip_point(model, x, max_iter=60)


@gpu
def test_engine_run_tasks_on_cuda_match_cpu(ieee):
    """run_tasks(device="cuda"): each result records its CUDA device, comes back on the CPU, and matches the
    device="cpu" run (attack cell: label check exact, <= 2 % of pixels differ; flip shard: 1e-6 relative)."""
    model, x, y = _tiny_cnn(torch.float64)
    torch.manual_seed(1)
    mlp = MLP(6, [12], 3, activation="erf").double().eval()
    xf = torch.randn(8, 6, dtype=torch.float64)
    tasks = [Task(task_key("gpu-attack-cell", model, x, y), attack_cell, (model, x, y, 8 / 255),
                  {"k": 20, "iters": 3}, name="attack"),
             Task(task_key("gpu-flip-shard", mlp, xf), flip_shard, (mlp, xf), name="flip")]
    on_cpu = run_tasks(tasks, False, scheduler="serial", device="cpu", progress=False)
    on_gpu = run_tasks(tasks, False, scheduler="serial", device="cuda", progress=False)
    for r in on_gpu:
        assert r.device.startswith("cuda"), r.device
    a_cpu, a_gpu = on_cpu[0].value, on_gpu[0].value
    assert all(v.device.type == "cpu" for v in a_gpu.values())
    assert torch.equal(a_gpu["label_kept"], a_cpu["label_kept"])
    assert _pixels_differing(a_gpu["x_adv"], a_cpu["x_adv"]) <= 0.02
    f_cpu, f_gpu = on_cpu[1].value, on_gpu[1].value
    assert f_gpu.x_flip.device.type == "cpu"
    assert f_gpu.success_rate == f_cpu.success_rate == 1.0
    torch.testing.assert_close(f_gpu.distance, f_cpu.distance, rtol=1e-6, atol=1e-9)


@gpu
def test_engine_attack_grid_and_flip_shards_on_cuda(tmp_path, ieee):
    """The two engine drivers with device="cuda": run_attack_grid's cells (label check exact, mean top-k within
    0.1 per cell) and cached_flip_points' shards (same certified points, distances within 1e-6)."""
    from flipfrag import flippoints as fs
    from flipfrag import fragility as fr
    from flipfrag.datasets import load_digits
    from flipfrag.models import train

    data = load_digits(seed=0)
    torch.manual_seed(0)
    model = SmallCNN(1, 10, width=4)
    train(model, data.X_train, data.y_train, epochs=6, lr=1e-2, batch_size=64, seed=0, progress=False)
    model.eval()
    x, y, _ = fr.select_correct(model, data.X_test, data.y_test, 3, seed=0)
    kw = dict(k=6, methods=["gradient", "deeplift"], epsilons=[0, 8 / 255], iters=3)
    g_cpu = fr.run_attack_grid(model, x, y, cache=False, device="cpu", **kw)
    g_gpu = fr.run_attack_grid(model, x, y, cache=False, device="cuda", **kw)
    keys = ["method", "attack", "eps"]
    assert len(g_gpu) == len(g_cpu)
    assert (g_gpu["label_kept"].to_numpy() == g_cpu["label_kept"].to_numpy()).all()
    m_cpu, m_gpu = g_cpu.groupby(keys)["topk"].mean(), g_gpu.groupby(keys)["topk"].mean()
    assert ((m_gpu - m_cpu).abs() <= 0.1).all(), (m_cpu, m_gpu)

    torch.manual_seed(1)
    mlp = MLP(6, [12], 3, activation="erf").double().eval()
    xf = torch.randn(8, 6, dtype=torch.float64)
    f_cpu = fs.cached_flip_points(mlp, xf, cache=tmp_path / "cpu", shard_size=4, device="cpu", max_iter=60)
    f_gpu = fs.cached_flip_points(mlp, xf, cache=tmp_path / "gpu", shard_size=4, device="cuda", max_iter=60)
    assert all(d.startswith("cuda") for d in f_gpu.cache_info["devices"]), f_gpu.cache_info
    assert torch.equal(f_gpu.converged, f_cpu.converged)
    torch.testing.assert_close(f_gpu.distance, f_cpu.distance, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------------------ no CUDA


@pytest.mark.slow
def test_gpu_tests_skip_with_a_clear_reason_without_cuda():
    """With no CUDA device visible, ``pytest -m gpu`` passes with every test of this file skipped, each for the
    stated reason (the default run therefore passes on a CPU-only machine)."""
    from conftest import NO_CUDA_REASON

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "400", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider",
                          str(Path(__file__))], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", text)}
    assert counts.get("skipped", 0) >= 10 and not counts.get("passed") and not counts.get("failed"), text
    assert not counts.get("error"), text
    assert NO_CUDA_REASON in " ".join(text.split()), text


def test_gpu_marker_is_registered_and_applied():
    """The marker is declared (``--strict-markers`` would refuse it otherwise) and every CUDA test carries it."""
    text = (REPO / "pyproject.toml").read_text()
    assert '"gpu: ' in text
    this = sys.modules[__name__]
    names = [n for n in dir(this) if n.startswith("test_") and "cuda" in n and "without_cuda" not in n]
    cuda_tests = [getattr(this, n) for n in names]
    assert cuda_tests and all(any(m.name == "gpu" for m in getattr(t, "pytestmark", [])) for t in cuda_tests)
    assert engine.task_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
