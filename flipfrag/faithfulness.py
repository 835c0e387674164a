"""Faithfulness of a saliency map: deletion and insertion curves (Petsiuk et al. 2018; Samek et al. 2017's MoRF).

A map is faithful if the pixels it ranks first are the ones the model needs. **Deletion**: replace the pixels, most
salient first, by a reference image, and follow the model's score of the explained class; a faithful map makes it
fall fast (low area under the curve). **Insertion**: start from the reference and put the pixels back, most salient
first; a faithful map makes the score rise fast (high area). ``insertion - deletion`` summarises both (higher = more
faithful; a random ranking gives about 0).

Pixels are ranked by the map (N, H, W) (ties: lower flat index first) and moved with all their channels. The curve
has ``steps + 1`` points at the fractions ``0, 1/steps, ..., 1`` of the pixels; the area is the trapezoid rule on
[0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._checks import check_batch, check_int
from .saliency import check_model
from .saliency.common import baseline_tensor, select_score, target_tensor

__all__ = ["perturbation_curves", "auc"]


def auc(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area (N,) of curves (N, S + 1) sampled at equally spaced points of [0, 1]."""
    if curve.dim() != 2 or curve.shape[1] < 2:
        raise ValueError(f"curve must have shape (N, S + 1) with S >= 1, got {tuple(curve.shape)}")
    return ((curve[:, 1:] + curve[:, :-1]) / 2).mean(1)


def _pixel_order(maps: torch.Tensor) -> torch.Tensor:
    """(N, H*W) flat pixel indices, most salient first (stable: ties in index order)."""
    return maps.flatten(1).argsort(dim=1, descending=True, stable=True)


@torch.no_grad()
def perturbation_curves(
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    maps: torch.Tensor,
    *,
    steps: int = 16,
    baseline: Any = None,
    score: str = "probability",
    batch_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Deletion and insertion curves of the maps ``maps`` (N, H, W) of images ``x`` (N, C, H, W).

    Parameters
    ----------
    model : nn.Module
        Maps images to pre-softmax scores (N, classes), eval mode.
    target : int or LongTensor (N,)
        The explained class.
    maps : Tensor (N, H, W)
        Saliency maps (any non-negative scale; only their ranking is used).
    steps : int
        Number of pixel blocks (default 16): ``ceil(j H W / steps)`` pixels are moved at step ``j``.
    baseline : None, float or Tensor broadcastable to x
        Reference image the pixels are replaced by (deletion) or taken from (insertion); None = zeros. Use the IG /
        DeepLIFT reference (the mean image) so that "deleted" means "uninformative".
    score : {"probability", "logit"}
        Softmax probability of ``target`` (default; Petsiuk et al.) or its logit.
    batch_size : int or None
        Images per forward pass (None: all ``2 N (steps + 1)`` at once).

    Returns
    -------
    dict with ``deletion`` / ``insertion`` (N, steps + 1) curves, ``deletion_auc`` / ``insertion_auc`` (N,) and
    ``fractions`` (steps + 1,) of pixels moved.
    """
    check_model(model)
    check_batch(x)
    if x.dim() != 4:
        raise ValueError(f"x must be images (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    if not isinstance(maps, torch.Tensor) or tuple(maps.shape) != (n, h, w):
        got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps must have shape {(n, h, w)} (one map per image), got {got}")
    steps = check_int(steps, "steps", 1)
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit', got {score!r}")
    if batch_size is not None:
        check_int(batch_size, "batch_size", 1)
    t = target_tensor(target, n, x.device)
    b = baseline_tensor(baseline, x)
    d = h * w
    counts = [-(-j * d // steps) for j in range(steps + 1)]  # ceil(j d / steps)
    rank = torch.empty((n, d), dtype=torch.long, device=x.device)
    rank.scatter_(1, _pixel_order(maps.detach()), torch.arange(d, device=x.device).expand(n, d).contiguous())
    # moved[j, i, p]: pixel p of image i is among its counts[j] most salient
    moved = torch.stack([rank < c for c in counts]).view(steps + 1, n, 1, h, w).to(x.dtype)
    deleted = x * (1 - moved) + b * moved
    inserted = b * (1 - moved) + x * moved
    batch = torch.cat([deleted, inserted]).flatten(0, 1)  # (2 (S+1) N, C, H, W)
    tt = t.repeat(2 * (steps + 1))
    size = batch.shape[0] if batch_size is None else batch_size
    scores = torch.cat([select_score(model(batch[i : i + size]), tt[i : i + size], score)
                        for i in range(0, batch.shape[0], size)])  # fmt: skip
    scores = scores.view(2, steps + 1, n).transpose(1, 2)
    fractions = torch.tensor(counts, dtype=torch.float64) / d
    return {"deletion": scores[0], "insertion": scores[1], "deletion_auc": auc(scores[0]),
            "insertion_auc": auc(scores[1]), "fractions": fractions}  # fmt: skip
