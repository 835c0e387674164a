"""Argument checks shared by the algorithms and the studies; each raises a TypeError / ValueError naming the
argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["check_batch", "check_int", "check_names", "stochastic_layers_training"]


def check_int(value: Any, name: str, low: int) -> int:
    """``value`` if it is an integer (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_names(name: str, values: Sequence[str], allowed: Sequence[str]) -> list[str]:
    """``values`` as a list if it is a non-empty sequence of names from ``allowed``."""
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of names from {list(allowed)}, got {values!r}")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name}: unknown {bad}; choose from {list(allowed)}")
    return list(values)


def check_batch(x: Any, name: str = "x") -> torch.Tensor:
    """``x`` if it is a finite floating-point batch (N >= 1, *features)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (N, *features) with a batch dimension, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def stochastic_layers_training(model: nn.Module) -> bool:
    """True if a layer whose output depends on train/eval mode (batch norm, dropout) is in train mode.

    Checked per layer, not ``model.training``: wrappers such as ``SoftplusSurrogate`` are fresh modules in train mode
    around an eval-mode network, and that is harmless.
    """
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.modules.instancenorm._InstanceNorm)
    return any(m.training for m in model.modules() if isinstance(m, kinds))
