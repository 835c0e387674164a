"""What every saliency method shares: the method names (:data:`METHODS`, :func:`canonical_method`) and the argument
checks and small autograd helpers of the methods' private cores (each raises naming the argument)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "METHODS",
    "canonical_method",
    "check_model",
    "target_tensor",
    "select_score",
    "check_score",
    "input_for_grad",
    "grad_or_zeros",
    "baseline_tensor",
    "box_bounds",
]

#: Canonical method names; aliases are listed in ``_ALIASES``.
METHODS = ("gradient", "integrated_gradients", "deeplift", "lrp", "dtd")
_ALIASES = {
    "ig": "integrated_gradients",
    "sg": "gradient",
    "simple_gradient": "gradient",
    "saliency": "gradient",
    "lrp_epsilon": "lrp",
    "lrp-eps": "lrp",
    "deep_taylor": "dtd",
    "deep-taylor": "dtd",
    "deep_taylor_decomposition": "dtd",
}
_SCORES = ("logit", "probability")


def canonical_method(method: str) -> str:
    """Return the canonical name of a saliency method (resolving aliases such as ``"ig"``).

    Raises
    ------
    ValueError
        Naming ``method`` if it is not one of :data:`METHODS` or an alias.
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    name = method.lower()
    name = _ALIASES.get(name, name)
    if name not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)} (or aliases {sorted(_ALIASES)}), got {method!r}")
    return name


# --------------------------------------------------------------------------------------------- input checks

# Modules whose train mode makes one sample's output depend on the rest of the batch or on randomness.
_MODE_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.AlphaDropout)


def check_model(model: nn.Module) -> None:
    if not callable(model):
        raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Module):
        bad = [type(m).__name__ for m in model.modules() if m.training and isinstance(m, _MODE_SENSITIVE)]
        if bad:
            raise ValueError(
                f"model has {sorted(set(bad))} layers in training mode (attributions would depend on the batch or "
                "on dropout noise); call model.eval() first"
            )


def target_tensor(target: Any, n: int, device: torch.device) -> torch.Tensor:
    """``target`` (int, sequence or tensor) as a LongTensor (n,) on ``device``."""
    if isinstance(target, bool) or target is None:
        raise TypeError(f"target must be an int or a LongTensor (N,) of class indices, got {target!r}")
    if isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long, device=device)
    else:
        t = torch.as_tensor(target, device=device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {t.dtype}")
        t = t.long()
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"target must be an int or have shape ({n},), got shape {tuple(t.shape)}")
    return t


def select_score(logits: torch.Tensor, target: torch.Tensor, score: str = "logit") -> torch.Tensor:
    """Per-sample score S_target (N,) from the model output (N, C)."""
    if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"model must map a batch of {target.shape[0]} inputs to scores of shape (N, classes), "
            f"got output shape {tuple(logits.shape)}"
        )
    n_classes = logits.shape[1]
    if (target < 0).any() or (target >= n_classes).any():
        raise ValueError(f"target: class indices must lie in [0, {n_classes}), got {target.tolist()}")
    if score == "probability":
        logits = torch.softmax(logits, dim=1)
    return logits.gather(1, target[:, None])[:, 0]


def check_score(score: str) -> None:
    if score not in _SCORES:
        raise ValueError(f"score must be one of {list(_SCORES)}, got {score!r}")


def input_for_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it already requires grad (so results stay attached to the caller's graph), else a leaf copy."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def grad_or_zeros(output: torch.Tensor, inp: torch.Tensor, create_graph: bool) -> torch.Tensor:
    (g,) = torch.autograd.grad(output, inp, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def baseline_tensor(baseline: Any, x: torch.Tensor, name: str = "baseline") -> torch.Tensor:
    """The reference input as a detached tensor of x's shape (None -> zeros; scalars and broadcastables allowed)."""
    if baseline is None:
        return torch.zeros_like(x, requires_grad=False).detach()
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline)).detach()
    if not isinstance(baseline, torch.Tensor):
        raise TypeError(f"{name} must be None, a number or a tensor broadcastable to x, got {type(baseline).__name__}")
    b = baseline.detach().to(device=x.device, dtype=x.dtype)
    try:
        b = torch.broadcast_to(b, x.shape)
    except RuntimeError as err:
        raise ValueError(
            f"{name} of shape {tuple(baseline.shape)} does not broadcast to x of shape {tuple(x.shape)}"
        ) from err
    if not torch.isfinite(b).all():
        raise ValueError(f"{name} contains NaN or inf")
    return b.contiguous()


def box_bounds(x: torch.Tensor, lower: Any, upper: Any, why: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``lower`` / ``upper`` (numbers or tensors broadcastable to x) as tensors of x's shape, checked: finite,
    ``lower < upper`` everywhere and ``lower <= x <= upper``. ``why`` ends the out-of-range message."""
    bounds = []
    for value, name in ((lower, "lower"), (upper, "upper")):
        if value is None:
            raise TypeError(f"{name} must be a number or a tensor broadcastable to x, got None")
        if isinstance(value, (list, tuple, np.ndarray)):
            value = torch.as_tensor(np.asarray(value, dtype=np.float64))
        bound = baseline_tensor(value, x, name)
        if not torch.isfinite(bound).all():
            raise ValueError(f"{name} contains NaN or inf")
        bounds.append(bound)
    lo, hi = bounds
    if not (lo < hi).all():
        raise ValueError("lower must be < upper everywhere")
    if (x < lo).any() or (x > hi).any():
        span = f"[{float(x.min()):.4g}, {float(x.max()):.4g}]"
        raise ValueError(f"x has values outside [lower, upper] (x in {span}); {why}")
    return lo, hi
