"""The solver runs wherever the model and x live: checks that catch a device or dtype bug without a GPU.

A CUDA run (``tests/test_gpu.py``, ``make gpu-check``) is the real test; these run on any machine:

* statically, every tensor factory call in ``flipfrag/flip/`` (``torch.zeros``, ``arange``, ``full``, ``tensor``, ...)
  names its ``device=`` — or is moved at once (``torch.randn(...).to(device=...)``), or its line says ``cpu-ok``
  (a CPU generator, CPU indices, Python floats);
* dynamically, while solving (smooth MLP with restarts, one-hot groups and ``differentiable=True``; a ReLU CNN through
  the region polish; the homotopy), no factory call made from ``flipfrag/flip/`` lacks a ``device`` argument, unless
  its line says ``cpu-ok``;
* every tensor of the result lives on x's device, ``x_flip`` / ``x_attempt`` have x's dtype (float32 and float64);
* a model on another device than x is refused with an error naming x (the ``meta`` device stands in for CUDA).
"""

from __future__ import annotations

import ast
import linecache
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from flipfrag.flip import closest_flip_point
from flipfrag.models import MLP, SmallCNN

FLIP = Path(__file__).resolve().parent.parent / "flipfrag" / "flip"
FACTORIES = {"zeros", "ones", "full", "empty", "eye", "arange", "tensor", "linspace", "logspace", "randn", "rand",
             "randint", "randperm", "as_tensor", "zeros_like_cpu", "scalar_tensor", "tril_indices", "triu_indices"}


def _is_torch_factory(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch")


def _has_device(call: ast.Call) -> bool:
    return any(k.arg == "device" for k in call.keywords)


def test_every_tensor_factory_in_the_solver_names_its_device():
    bad = []
    for path in sorted(FLIP.glob("*.py")):
        src = path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        moved = set()  # factories whose result is moved at once: torch.randn(...).to(device=...)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "to"
                    and _has_device(node) and _is_torch_factory(node.func.value)):
                moved.add(id(node.func.value))
        for node in ast.walk(tree):
            if not _is_torch_factory(node) or _has_device(node) or id(node) in moved:
                continue
            near = " ".join(lines[max(0, node.lineno - 2): node.end_lineno])
            if "cpu-ok" not in near:
                bad.append(f"{path.name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "tensor factories without device= (a CPU tensor meets a CUDA one):\n" + "\n".join(bad)


class _FactoryWatch(TorchFunctionMode):
    """Records factory calls made directly from flipfrag/flip/ without a device argument (and no ``cpu-ok``)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            file = frame.f_code.co_filename
            if str(FLIP) in file:
                text = linecache.getline(file, frame.f_lineno) + linecache.getline(file, frame.f_lineno - 1)
                if "cpu-ok" not in text:
                    self.calls.append(f"{Path(file).name}:{frame.f_lineno} torch.{name}")
        return func(*args, **kwargs)


def _tensors(res) -> dict:
    return {k: v for k, v in vars(res).items() if isinstance(v, torch.Tensor)}


def _mlp(dtype):
    torch.manual_seed(0)
    return MLP(6, [10], 3, activation="tanh").to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_results_live_on_x_device_with_x_dtype(dtype):
    """Smooth MLP with restarts, one-hot groups and the implicit-function gradient: every tensor of the result on
    x's device, the points in x's dtype; and no factory call of the solver without a device."""
    net = _mlp(dtype)
    x = torch.rand(2, 6, dtype=dtype)
    x[:, 3:] = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    with _FactoryWatch() as watch:
        res = closest_flip_point(net, x.clone().requires_grad_(True), lower=0.0, upper=1.0, restarts=1,
                                 groups=[[3, 4, 5]], differentiable=True)
    assert not watch.calls, watch.calls
    assert res.x_flip.dtype == dtype and res.x_attempt.dtype == dtype
    for name, t in _tensors(res).items():
        assert t.device == x.device, name
    assert res.success_rate > 0


def test_relu_cnn_polish_and_homotopy_make_no_tensor_without_a_device():
    """The region polish (frozen pattern, sign rows, cutting planes) and the softplus homotopy of a ReLU CNN (a tiny
    random one, few iterations: the code paths, not the answer, are checked)."""
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, n_classes=3, width=2).eval()
    x = torch.rand(1, 1, 8, 8)
    with _FactoryWatch() as watch:
        res = closest_flip_point(net, x, lower=0.0, upper=1.0, homotopy=True, homotopy_steps=2, max_iter=5)
    assert not watch.calls, watch.calls
    assert res.x_flip.dtype == torch.float32
    for name, t in _tensors(res).items():
        assert t.device == x.device, name


def test_model_and_x_on_different_devices_is_refused_naming_x():
    net = _mlp(torch.float32).to("meta")
    with pytest.raises(ValueError, match="x is on cpu but the model's parameters are on meta"):
        closest_flip_point(net, torch.rand(2, 6))
