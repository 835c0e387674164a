"""Post-processing of attributions: :func:`saliency_map` (the papers' maps) and :func:`completeness_gap`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._checks import check_batch
from .common import baseline_tensor, select_score, target_tensor

__all__ = ["saliency_map", "completeness_gap"]

# ------------------------------------------------------------------------------------------ post-processing


def saliency_map(attr: torch.Tensor) -> torch.Tensor:
    """The papers' post-processing: absolute value, summed over channels, normalised to sum 1 per sample.

    Parameters
    ----------
    attr : Tensor (N, C, H, W), (N, H, W) or (N, D)
        Attributions. 4-D input is summed over the channel dimension 1; 3-D and 2-D inputs are taken as
        already single-channel.

    Returns
    -------
    Tensor (N, H, W) (or (N, D) for 2-D input)
        Non-negative, each sample summing to 1 (an all-zero attribution gives an all-zero map). Differentiable.
    """
    if not isinstance(attr, torch.Tensor):
        raise TypeError(f"attr must be a torch.Tensor, got {type(attr).__name__}")
    if attr.dim() not in (2, 3, 4):
        raise ValueError(f"attr must have shape (N, C, H, W), (N, H, W) or (N, D), got {tuple(attr.shape)}")
    s = attr.abs()
    if s.dim() == 4:
        s = s.sum(1)
    total = s.flatten(1).sum(1).clamp_min(torch.finfo(s.dtype).tiny)
    return s / total.view(-1, *([1] * (s.dim() - 1)))


def completeness_gap(
    model: nn.Module, x: torch.Tensor, target: Any, attr: torch.Tensor, baseline: Any = None
) -> torch.Tensor:
    """``attr.sum() - (S(x) - S(baseline))`` per sample (N,): the completeness error of IG / DeepLIFT.

    Zero up to rounding for DeepLIFT on ReLU nets without max-pooling; shrinks as ``steps`` grows for IG. For LRP
    with zero biases, pass ``baseline=None`` and compare against ``S(x) - S(0)``.
    """
    check_batch(x)
    t = target_tensor(target, x.shape[0], x.device)
    b = baseline_tensor(baseline, x)
    with torch.no_grad():
        diff = select_score(model(x), t) - select_score(model(b), t)
    return attr.detach().flatten(1).sum(1) - diff
