"""What the ``paper`` profile costs: per-task cost of each kind of cell measured on this CPU, projected to the whole
profile (machine-hours here; GPU-hours from the measured FLOP count, an estimate).

Cells measured (the units :mod:`flipfrag.engine` shards the work into):

* **Attack-grid cell, per image-iteration** — one step of the top-k attack (surrogate direction + evaluation on the
  original model with every metric recorded, as the grid does) for the simple gradient, DeepLIFT, integrated
  gradients with M = 100 interpolants and DTD, on
  - the CIFAR-10 role: the pretrained CIFAR-10 CNN (``flipfrag.models.cifar10_cnn``, BatchNorm folded) at 32x32,
    the model the paper profile's CIFAR-10 grid uses (``fragility.cifar_paper_setting``), k = 100;
  - the ImageNet role: torchvision SqueezeNet 1.0 at 227x227 with random weights inside the [0, 1]-input
    normalisation wrapper (``flipfrag.fragility.Normalized``), k = 1000.
  Each is timed at two iteration counts and the difference divided out, so the one-off part of a cell (the original
  map, the final metrics) is separated from the per-iteration cost: ``setup`` is the one-off part per image.
  **IG is not run at M = 100**: its FLOPs are counted at two small M and extrapolated linearly (exact: one double
  backward per interpolant), its time measured at the larger small M and scaled by the FLOP ratio, to keep this
  script within about three minutes.
* **Flip point, per point** — ``closest_flip_point`` with the paper profile's MNIST settings (tol 1e-6, 500 SQP
  iterations at most, every target class, box [0, 1], 2 linearised inequality slots) on an ``MLP(784, [200, 200],
  10, erf)`` trained for 8 epochs on 4,000 of the shipped MNIST digits (paper profile: 50 epochs on the full 60,000; a
  better-trained net may need more iterations per point). ``flippoints.cached_flip_points`` runs such solves as engine
  tasks of at most ``SHARD_DEFAULTS["mlp"]`` = 1024 points (a shard of the dataset), so the projection counts tasks.

Projection (grid size from ``flipfrag.profiles`` 'paper' and the spec: 512 images x 4 methods x 4 epsilons x 3
attacks, 300 iterations, both image roles; paper 1: one flip point for each of the 60,000 MNIST training inputs):

    grid seconds = images x methods-cost, where per method and image:
        eps = 0 cell: setup;  per eps > 0: 2 iterative attacks x (300 x per_iteration + setup) + random-sign (setup)

(flipfrag's random-sign baseline is one-shot; the authors' code ran it through the 300-step loop too, which would
add a third 300-iteration attack: given as "authors' count".)

FLOPs are counted with a ``TorchDispatchMode`` over ``torch.utils.flop_counter``'s formulas (matmul and convolution
kernels, forward and backward; elementwise work is not counted), on the same runs. **GPU-hours are an estimate**:
FLOPs divided by an assumed sustained throughput (``--gpu-tflops``, default 5 TFLOP/s: about a quarter of an A100's
19.5 TFLOP/s FP32 peak, for these small-batch double-backward workloads); memory traffic, kernel launches and the
Python loop are ignored, so the real figure can be several times higher.

Usage::

    python benchmarks/bench_paper_cost.py            # about 3 minutes on 2 shared cores -> results/paper_cost.*
    python benchmarks/bench_paper_cost.py --smoke    # seconds: tiny models, prints only (what the tests run)
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from flipfrag._io import atomic_write, atomic_write_json
from flipfrag.attacks import TopKAttack
from flipfrag.engine import SHARD_DEFAULTS
from flipfrag.flip import closest_flip_point
from flipfrag.fragility import IMAGENET_MEAN, IMAGENET_STD, Normalized
from flipfrag.models import MLP, SmallCNN, cifar10_cnn, efficientnet_lite0, squeezenet1_0, train
from flipfrag.profiles import get_profile

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("gradient", "deeplift", "integrated_gradients", "dtd")
#: The models the paper profile runs in each role (the ImageNet role: SqueezeNet's cost does not depend on its
#: weights, so random ones stand in for the downloaded ones).
MODEL_NAMES = {"cifar": "pretrained CIFAR-10 CNN (cifar-10-model 7.4.0)", "imagenet": "SqueezeNet 1.0 (random weights)",
               "imagenet-offline": "EfficientNet-Lite0 (pretrained, BatchNorm folded)"}
#: Roles whose cost adds up to the paper profile's total; "imagenet-offline" is the ImageNet CNN the offline profiles
#: run (fragility.efficientnet_setting): what the paper's grid would cost on it instead of SqueezeNet, shown apart.
TOTAL_ROLES = ("cifar", "imagenet")
LABELS = {"gradient": "SG", "deeplift": "DeepLIFT", "integrated_gradients": "IG (M = 100)", "dtd": "DTD"}
# iters: the two iteration counts timed; ig_m: the two IG interpolant counts; repeats: the fastest of that many runs
FULL = {"cifar": {"side": 32, "n": 4, "iters": (1, 3), "ig_m": (2, 8), "repeats": 3},
        "imagenet": {"side": 227, "n": 1, "iters": (1, 3), "ig_m": (2, 4), "repeats": 2},
        "imagenet-offline": {"side": 224, "n": 1, "iters": (1, 3), "ig_m": (2, 4), "repeats": 2},
        "flip": {"n_train": 4000, "n_points": 48, "epochs": 8}}  # fmt: skip
SMOKE = {"cifar": {"side": 16, "n": 2, "iters": (1, 4), "ig_m": (2, 8), "repeats": 2},
         "imagenet": {"side": 64, "n": 1, "iters": (1, 3), "ig_m": (2, 4), "repeats": 1},
         "imagenet-offline": {"side": 16, "n": 1, "iters": (1, 3), "ig_m": (2, 4), "repeats": 1},
         "flip": {"n_train": 300, "n_points": 4, "epochs": 1}}  # fmt: skip


class FlopCount(TorchDispatchMode):
    """Sum of ``torch.utils.flop_counter`` FLOPs of every matmul / convolution (forward and backward) dispatched."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def _attack_run(model, x, method, iters, k, method_kwargs, count_flops: bool) -> tuple[float, int]:
    atk = TopKAttack(model, method, k=k, eps=8 / 255, step=0.5 / 255, iters=iters, method_kwargs=method_kwargs,
                     record_metrics=True, progress=False)  # fmt: skip
    if count_flops:
        with FlopCount() as fc:
            atk(x, None)
        return 0.0, fc.total
    start = time.perf_counter()
    atk(x, None)
    return time.perf_counter() - start, 0


def _per_iteration(model, x, method, k, method_kwargs, iters, repeats) -> dict[str, float]:
    """Seconds and FLOPs per image-iteration and per image one-off (setup), from runs at two iteration counts (the
    fastest of ``repeats`` runs each: the least disturbed by other jobs on a shared machine; ``repeats=0``: FLOPs
    only)."""
    lo, hi = iters
    n = x.shape[0]
    t_lo = min((_attack_run(model, x, method, lo, k, method_kwargs, False)[0] for _ in range(repeats)), default=0.0)
    t_hi = min((_attack_run(model, x, method, hi, k, method_kwargs, False)[0] for _ in range(repeats)), default=0.0)
    _, f_lo = _attack_run(model, x[:1], method, lo, k, method_kwargs, True)
    _, f_hi = _attack_run(model, x[:1], method, hi, k, method_kwargs, True)
    per_s = max(t_hi - t_lo, 0.0) / (hi - lo) / n
    per_f = (f_hi - f_lo) / (hi - lo)
    return {"iter_s": per_s, "setup_s": max(t_lo / n - lo * per_s, 0.0), "iter_flops": per_f,
            "setup_flops": max(f_lo - lo * per_f, 0)}  # fmt: skip


def _ig_at(model, x, k, baseline, iters, repeats, ig_m: tuple[int, int], m: int) -> dict[str, float]:
    """IG's cost at ``m`` interpolants without running it: FLOPs are exactly linear in M (one (double) backward per
    interpolant), so they are counted at ``ig_m[0]`` and ``ig_m[1]`` and extrapolated; the time is measured at
    ``ig_m[1]`` and scaled by the FLOP ratio (time proportional to FLOPs; a difference of two noisy timings would be
    amplified 50-fold by the extrapolation)."""
    m_a, m_b = ig_m
    a = _per_iteration(model, x, "integrated_gradients", k, {"baseline": baseline, "steps": m_a}, iters, 0)
    b = _per_iteration(model, x, "integrated_gradients", k, {"baseline": baseline, "steps": m_b}, iters, repeats)
    out = {}
    for part in ("iter", "setup"):
        fa, fb = a[f"{part}_flops"], b[f"{part}_flops"]
        out[f"{part}_flops"] = fm = max(fb + (fb - fa) / (m_b - m_a) * (m - m_b), 0.0)
        out[f"{part}_s"] = b[f"{part}_s"] * fm / fb if fb > 0 else b[f"{part}_s"] * m / m_b
    return out


def measure_role(role: str, model, side: int, n: int, iters: tuple[int, int], ig_m: tuple[int, int], repeats: int,
                 ig_steps: int) -> list[dict]:  # fmt: skip
    torch.manual_seed(0)
    x = torch.rand(n, 3, side, side)
    k = max(1, round((1000 / 227**2 if role.startswith("imagenet") else 100 / 1024) * side * side))
    baseline = torch.full_like(x[:1], 0.5)
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        if method == "integrated_gradients":
            cost = _ig_at(model, x, k, baseline, iters, repeats, ig_m, ig_steps)
            how = (f"FLOPs counted at M = {ig_m[0]} and {ig_m[1]}, extrapolated linearly to M = {ig_steps}; time "
                   f"measured at M = {ig_m[1]}, scaled by the FLOP ratio")  # fmt: skip
        else:
            kw = {"baseline": baseline} if method == "deeplift" else {}
            cost = _per_iteration(model, x, method, k, kw, iters, repeats)
            how = f"measured ({iters[1]} vs {iters[0]} iterations, {n} image(s))"
        rows.append({"role": role, "side": side, "k": k, "method": method, **cost, "how": how,
                     "bench_s": time.perf_counter() - start})  # fmt: skip
        print(f"  {role:8s} {LABELS[method]:14s} {cost['iter_s'] * 1e3:10.1f} ms/iter  setup {cost['setup_s']:.2f} s"
              f"  {cost['iter_flops'] / 1e9:8.2f} GFLOP/iter", flush=True)  # fmt: skip
    return rows


def measure_flip(n_train: int, n_points: int, epochs: int, prof: dict) -> dict:
    from flipfrag.datasets import load_mnist

    data = load_mnist(offline=True)
    model = MLP(784, list(prof["mnist_hidden"]), 10, activation="erf")
    train(model, data.X_train[:n_train], data.y_train[:n_train], epochs=epochs, seed=0, progress=False)
    x = data.X_test[:n_points]
    settings = {"tol": float(prof["flip_tol"]), "max_iter": int(prof["flip_max_iter"]), "lower": 0.0, "upper": 1.0,
                "max_ineq": 2}  # fmt: skip
    start = time.perf_counter()
    res = closest_flip_point(model, x, **settings)
    seconds = time.perf_counter() - start
    with FlopCount() as fc:
        closest_flip_point(model, x[: max(1, n_points // 6)], **settings)
    per_flops = fc.total / max(1, n_points // 6)
    row = {"kind": "flip point", "n_points": n_points, "point_s": seconds / n_points, "point_flops": per_flops,
           "converged": float(res.converged.float().mean()), "iterations_mean": float(res.iterations.float().mean()),
           "hidden": list(prof["mnist_hidden"]), "max_iter": settings["max_iter"]}  # fmt: skip
    print(f"  flip     per point {row['point_s'] * 1e3:8.1f} ms  {per_flops / 1e9:.2f} GFLOP  "
          f"certified {row['converged']:.0%}", flush=True)  # fmt: skip
    return row


def project(rows: list[dict], flip: dict, prof: dict, gpu_tflops: float) -> dict:
    """The whole paper profile from the per-cell costs (formula in the module docstring)."""
    images, iters = int(prof["grid_n_images"]), int(prof["grid_iters"])
    n_eps = sum(1 for e in prof["epsilons"] if e > 0)
    out: dict = {"images": images, "iterations": iters, "n_eps": n_eps, "methods": len(METHODS), "cells": []}
    for r in rows:
        per_image = {}
        for unit in ("s", "flops"):
            it, setup = r[f"iter_{unit}"], r[f"setup_{unit}"]
            ours = setup + n_eps * (2 * (iters * it + setup) + setup)
            authors = setup + n_eps * 3 * (iters * it + setup)
            per_image[unit] = (ours, authors)
        cell = {"role": r["role"], "method": r["method"], "in_total": r["role"] in TOTAL_ROLES,
                "cpu_hours": images * per_image["s"][0] / 3600, "cpu_hours_authors": images * per_image["s"][1] / 3600,
                "flops": images * per_image["flops"][0], "flops_authors": images * per_image["flops"][1]}  # fmt: skip
        cell["gpu_hours"] = cell["flops"] / (gpu_tflops * 1e12) / 3600
        cell["gpu_hours_authors"] = cell["flops_authors"] / (gpu_tflops * 1e12) / 3600
        out["cells"].append(cell)
    n_flip = 60_000
    flops = n_flip * flip["point_flops"]
    out["flip"] = {"points": n_flip, "cpu_hours": n_flip * flip["point_s"] / 3600, "flops": flops,
                   "gpu_hours": flops / (gpu_tflops * 1e12) / 3600}  # fmt: skip
    for key in ("cpu_hours", "gpu_hours", "cpu_hours_authors", "gpu_hours_authors"):
        out[f"grid_{key}"] = sum(c[key] for c in out["cells"] if c["in_total"])
    out["total_cpu_hours"] = out["grid_cpu_hours"] + out["flip"]["cpu_hours"]
    out["total_gpu_hours"] = out["grid_gpu_hours"] + out["flip"]["gpu_hours"]
    return out


def _fmt_h(h: float) -> str:
    return f"{h:,.0f}" if h >= 10 else f"{h:.2g}"


def markdown(rows: list[dict], flip: dict, proj: dict, meta: dict) -> str:
    lines = [
        "# Cost of the paper profile (benchmarks/bench_paper_cost.py)",
        "",
        f"Measured on {meta['machine']} with {meta['threads']} torch thread(s), torch {meta['torch']}, shared with "
        "other jobs (wall times: they vary by up to 2x between runs). CPU-hours = hours of this machine at that "
        f"thread count. **GPU-hours are an estimate**: counted matmul/conv FLOPs / {meta['gpu_tflops']:g} TFLOP/s "
        "assumed sustained (about a quarter of an A100's FP32 peak); memory traffic and launch overheads are ignored.",
        "",
        f"Grid: {proj['images']} images x {proj['methods']} methods x {proj['n_eps']} ε > 0 x 3 attacks (top-k and "
        f"center: {proj['iterations']} iterations; random sign: one shot) plus the ε = 0 cell, for each of the two "
        "image roles. The *authors' count* runs random sign through the 300-step loop as well.",
        "",
        "## Per-task cost (this CPU)",
        "",
        "| role | model | method | ms / image-iteration | one-off s / image | GFLOP / image-iteration | how |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['role']} {r['side']}x{r['side']} | {r['model']} | {LABELS[r['method']]} | "
                     f"{r['iter_s'] * 1e3:,.1f} | {r['setup_s']:.2f} | {r['iter_flops'] / 1e9:.3g} | "
                     f"{r['how']} |")  # fmt: skip
    lines += [
        "",
        f"Flip point (paper 1, MNIST MLP 784-{'-'.join(map(str, flip['hidden']))}-10 erf, trained for a few "
        f"epochs on the shipped digits; all target classes, max_iter {flip['max_iter']}): "
        f"**{flip['point_s'] * 1e3:.0f} ms and "
        f"{flip['point_flops'] / 1e9:.2f} GFLOP per point** ({flip['n_points']} points, {flip['converged']:.0%} "
        f"certified, {flip['iterations_mean']:.0f} SQP iterations on average).",
        "",
        "## Projected cost of the whole paper profile",
        "",
        "| work | size | CPU-hours here | GPU-hours (estimate) | authors' count: CPU-h / GPU-h |",
        "|---|---|---:|---:|---:|",
    ]
    for c in (c for c in proj["cells"] if c["in_total"]):
        lines.append(f"| grid {c['role']}, {LABELS[c['method']]} | {proj['images']} images x {proj['n_eps']} ε x 3 "
                     f"attacks | {_fmt_h(c['cpu_hours'])} | {_fmt_h(c['gpu_hours'])} | "
                     f"{_fmt_h(c['cpu_hours_authors'])} / {_fmt_h(c['gpu_hours_authors'])} |")  # fmt: skip
    f = proj["flip"]
    shard = SHARD_DEFAULTS["mlp"][0]  # the default flip-point shard (flippoints.cached_flip_points)
    lines += [
        f"| **attack grids, total** | 2 roles | **{_fmt_h(proj['grid_cpu_hours'])}** | "
        f"**{_fmt_h(proj['grid_gpu_hours'])}** | {_fmt_h(proj['grid_cpu_hours_authors'])} / "
        f"{_fmt_h(proj['grid_gpu_hours_authors'])} |",
        f"| flip points, MNIST training set | {f['points']:,} points in {math.ceil(f['points'] / shard):,} tasks "
        f"of ≤ {shard:,} | {_fmt_h(f['cpu_hours'])} | "
        f"{_fmt_h(f['gpu_hours'])} | |",
        f"| **total** | | **{_fmt_h(proj['total_cpu_hours'])}** | **{_fmt_h(proj['total_gpu_hours'])}** | |",
        "",
    ]
    alt = [c for c in proj["cells"] if not c["in_total"]]
    if alt:
        lines += [
            f"The same ImageNet grid on the offline profiles' ImageNet CNN ({MODEL_NAMES['imagenet-offline']}, "
            "224x224, k = 1000) instead of SqueezeNet — not in the total above:",
            "",
            "| work | size | CPU-hours here | GPU-hours (estimate) | authors' count: CPU-h / GPU-h |",
            "|---|---|---:|---:|---:|",
        ]
        for c in alt:
            lines.append(f"| grid {c['role']}, {LABELS[c['method']]} | {proj['images']} images x {proj['n_eps']} ε "
                         f"x 3 attacks | {_fmt_h(c['cpu_hours'])} | {_fmt_h(c['gpu_hours'])} | "
                         f"{_fmt_h(c['cpu_hours_authors'])} / {_fmt_h(c['gpu_hours_authors'])} |")  # fmt: skip
        lines.append(f"| **total on it** | | **{_fmt_h(sum(c['cpu_hours'] for c in alt))}** | "
                     f"**{_fmt_h(sum(c['gpu_hours'] for c in alt))}** | |")
    lines += [
        "",
        "The heavy work shards over Dask workers (`make figures PROFILE=paper SCHEDULER=tcp://host:port`, see the "
        "README): with G GPUs the GPU-hours divide by about G (the grid cells and the flip-point shards are "
        "independent tasks).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; print, do not write results")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--gpu-tflops", type=float, default=5.0, help="assumed sustained GPU throughput")
    args = parser.parse_args(argv)
    if not args.gpu_tflops > 0:
        raise SystemExit("--gpu-tflops must be > 0")
    sizes = SMOKE if args.smoke else FULL
    prof = get_profile("paper")
    start = time.perf_counter()
    torch.manual_seed(0)
    # the models the paper profile runs (the CIFAR-10 role: fragility.cifar_paper_setting's pretrained CNN)
    # (--smoke checks the projection's arithmetic on a tiny stand-in: the pretrained CNN takes minutes there)
    cifar = SmallCNN(3, 10, width=8).eval() if args.smoke else cifar10_cnn(pretrained=True, folded=True).eval()
    cifar_name = "SmallCNN stand-in (--smoke)" if args.smoke else MODEL_NAMES["cifar"]
    imagenet = Normalized(squeezenet1_0(pretrained=False), IMAGENET_MEAN, IMAGENET_STD).eval()
    ig_steps = int(prof["grid_ig_steps"])
    rows = [{**r, "model": cifar_name} for r in measure_role("cifar", cifar, ig_steps=ig_steps,
                                                             **sizes["cifar"])]  # fmt: skip
    rows += [{**r, "model": MODEL_NAMES["imagenet"]} for r in measure_role("imagenet", imagenet, ig_steps=ig_steps,
                                                                           **sizes["imagenet"])]  # fmt: skip
    # the ImageNet CNN the offline profiles run (--smoke: a tiny stand-in again, for the projection's arithmetic; the
    # 4.7 M-parameter network's FLOP-counted double backwards take minutes even at 32x32)
    offline = SmallCNN(3, 10, width=4).eval() if args.smoke else efficientnet_lite0(pretrained=True, folded=True).eval()
    offline_name = "SmallCNN stand-in (--smoke)" if args.smoke else MODEL_NAMES["imagenet-offline"]
    rows += [{**r, "model": offline_name}
             for r in measure_role("imagenet-offline", offline, ig_steps=ig_steps, **sizes["imagenet-offline"])]
    flip = measure_flip(prof=prof, **sizes["flip"])
    proj = project(rows, flip, prof, args.gpu_tflops)
    meta = {"machine": f"{platform.machine()} {platform.processor() or platform.system()}",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "gpu_tflops": args.gpu_tflops,
            "bench_seconds": time.perf_counter() - start, "smoke": args.smoke}  # fmt: skip
    result = {"meta": meta, "cells": rows, "flip": flip, "projection": proj}
    text = markdown(rows, flip, proj, meta)
    print(text)
    print(f"(benchmark ran {meta['bench_seconds']:.0f} s)")
    if not args.smoke:
        out = Path(args.out)
        atomic_write_json(out / "paper_cost.json", result)
        atomic_write(out / "paper_cost.md", lambda p: p.write_text(text))
    return result


if __name__ == "__main__":
    main()
