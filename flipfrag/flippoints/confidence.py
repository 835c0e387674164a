"""Flip-point distance as a confidence score (E1): AUROC / average precision of misclassification detection, with
bootstrap intervals, against the softmax and the linearised distance."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..flip import FlipResult
from ._util import _as_numpy


def _scores_and_labels(scores: Any, positive: Any) -> tuple[np.ndarray, np.ndarray]:
    """Finite 1-D scores and a same-length boolean label array (the detectors' shared argument checks)."""
    s = _as_numpy(scores, "scores", ndim=1)
    p = _as_numpy(positive, "positive", ndim=1, dtype=bool)
    if s.shape != p.shape:
        raise ValueError(f"scores and positive must have the same length, got {s.shape} and {p.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf (drop uncertified points first)")
    return s, p


def auroc(scores: Any, positive: Any) -> float:
    """Area under the ROC curve of ``scores`` as a detector of ``positive`` (higher score = more likely positive).

    Computed as the Mann-Whitney statistic with mid-ranks for ties (equal to ``sklearn.metrics.roc_auc_score``):
    the probability that a random positive scores higher than a random negative, ties counting 1/2.

    Parameters
    ----------
    scores : array-like (N,)
        Finite real scores.
    positive : array-like (N,) of bool / {0, 1}
        The label to detect; both classes must occur.
    """
    from scipy.stats import rankdata

    s, p = _scores_and_labels(scores, positive)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"positive must contain both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: Any, positive: Any) -> float:
    """Area under the precision-recall curve as average precision, ``sum_n (R_n - R_{n-1}) P_n``.

    Thresholds are the distinct score values (the definition of ``sklearn.metrics.average_precision_score``).
    Chance level is the fraction of positives. Arguments as in :func:`auroc`.
    """
    s, p = _scores_and_labels(scores, positive)
    n_pos = int(p.sum())
    if n_pos == 0:
        raise ValueError("positive must contain at least one positive")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, p_sorted = s[order], p[order]
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], len(s) - 1]  # last index of each distinct threshold
    tp = np.cumsum(p_sorted)[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _auroc_rows(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """:func:`auroc` of every row of (B, N) arrays at once (each row must hold both classes)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=1)
    n_pos = positive.sum(1)
    n_neg = positive.shape[1] - n_pos
    return ((ranks * positive).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _bootstrap_indices(positive: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) resampling indices, each resample containing both classes (others are redrawn)."""
    rng = np.random.default_rng(seed)
    N = len(positive)
    kept: list[np.ndarray] = []
    while sum(len(k) for k in kept) < n_boot:
        idx = rng.integers(0, N, (n_boot, N))
        pos = positive[idx]
        kept.append(idx[pos.any(1) & ~pos.all(1)])
    return np.concatenate(kept)[:n_boot]


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], scores: Any, positive: Any, *,
                 n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of ``metric(scores, positive)`` (resampling points with replacement).

    ``scores`` is (N,) or (N, k) (rows are resampled together, e.g. two detectors for a paired comparison).
    Resamples that contain only one class are redrawn. Returns ``(low, high)``. ``metric=auroc`` takes a
    vectorised path (all resamples ranked at once).
    """
    s = _as_numpy(scores, "scores")
    if s.ndim not in (1, 2):
        raise ValueError(f"scores must be (N,) or (N, k), got shape {s.shape}")
    p = _as_numpy(positive, "positive", ndim=1, dtype=bool)
    if not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if p.shape[0] != s.shape[0]:
        raise ValueError(f"scores and positive must have the same length, got {s.shape[0]} and {p.shape[0]}")
    if p.all() or not p.any():
        raise ValueError("positive must contain both classes")
    idx = _bootstrap_indices(p, n_boot, seed)
    if metric is auroc and s.ndim == 1:
        values = _auroc_rows(s[idx], p[idx])
    else:
        values = np.array([metric(s[i], p[i]) for i in idx])
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def auroc_difference(scores_a: Any, scores_b: Any, positive: Any, *, n_boot: int = 1000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:  # fmt: skip
    """``AUROC(scores_a) - AUROC(scores_b)`` on the same points, with a paired percentile-bootstrap interval.

    Both detectors are evaluated on the same resampled points, so the interval reflects the difference, not the
    (much wider) spread of each AUROC. Returns ``(difference, low, high)``; an interval excluding 0 means one
    detector is better beyond resampling noise.
    """
    a = _as_numpy(scores_a, "scores_a", ndim=1)
    b = _as_numpy(scores_b, "scores_b", ndim=1)
    p = _as_numpy(positive, "positive", ndim=1, dtype=bool)
    if not (a.shape == b.shape == p.shape):
        raise ValueError(f"scores_a, scores_b and positive must have one length, got {a.shape}, {b.shape}, {p.shape}")
    diff = auroc(a, p) - auroc(b, p)  # also validates (finite scores, both classes)
    if not (0 < level < 1) or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level} and {n_boot}")
    idx = _bootstrap_indices(p, n_boot, seed)
    values = _auroc_rows(a[idx], p[idx]) - _auroc_rows(b[idx], p[idx])
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return diff, float(lo), float(hi)


def linearized_distance(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """First-order estimate of the distance to the flip point, ``|z_s - z_t| / ||grad_x (z_s - z_t)||`` (N,).

    ``s`` is the predicted class, ``t`` = ``target`` (default: the runner-up class). The exact distance for a
    linear model without bounds; a cheap baseline the flip-point distance should beat on curved networks.
    """
    dtype = next(model.parameters()).dtype
    xx = x.detach().to(dtype).requires_grad_(True)
    with torch.enable_grad():
        z = model(xx)
        top2 = z.topk(2, dim=1).indices
        src = top2[:, 0]
        tgt = top2[:, 1] if target is None else torch.as_tensor(target, dtype=torch.long)
        gap = z.gather(1, src[:, None])[:, 0] - z.gather(1, tgt[:, None])[:, 0]
        (grad,) = torch.autograd.grad(gap.sum(), xx)
    norm = grad.flatten(1).norm(dim=1)
    return (gap.detach().abs() / norm).double()


def confidence_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, res: FlipResult) -> pd.DataFrame:
    """One row per input: its label, prediction and the confidence scores E1 compares.

    Columns: ``true``, ``pred``, ``correct`` (bool), ``softmax`` (max softmax probability), ``logit_gap``
    (top score minus runner-up score), ``linearized`` (:func:`linearized_distance` toward the runner-up),
    ``distance`` (distance to the closest certified flip point over all other classes, NaN if uncertified) and
    ``certified``. ``res`` must be the flip points of ``x`` (same order) with ``source`` = predicted class.
    """
    if len(res) != x.shape[0] or y.shape[0] != x.shape[0]:
        raise ValueError(f"x, y and res must have the same length, got {x.shape[0]}, {y.shape[0]}, {len(res)}")
    from ..models import predict

    z = predict(model, x).double()
    soft = torch.softmax(z, 1)
    top2 = z.topk(2, dim=1)
    pred = top2.indices[:, 0]
    if not torch.equal(res.source.long(), pred):
        raise ValueError("res.source differs from the model's predicted class: res must be the flip points of x")
    return pd.DataFrame(
        {
            "true": y.numpy(),
            "pred": pred.numpy(),
            "correct": (pred == y).numpy(),
            "softmax": soft.max(1).values.numpy(),
            "logit_gap": (top2.values[:, 0] - top2.values[:, 1]).numpy(),
            "linearized": linearized_distance(model, x).numpy(),
            "distance": res.distance.double().numpy(),
            "certified": res.converged.numpy(),
        }
    )


def misclassification_detection(
    table: pd.DataFrame,
    scores: Sequence[str] = ("distance", "softmax", "logit_gap", "linearized"),
    *,
    n_boot: int = 0,
    seed: int = 0,
) -> pd.DataFrame:
    """AUROC and AUPR of each confidence score as a detector of misclassified inputs.

    A *low* confidence should flag a mistake, so each detector scores a point by ``-score``. All scores are
    evaluated on the same rows: those with a certified flip point (``n_excluded`` counts the others).

    Parameters
    ----------
    table : DataFrame
        Output of :func:`confidence_scores` (columns ``correct``, ``certified`` and the score columns).
    scores : sequence of str
        Column names to evaluate.
    n_boot : int
        If > 0, add percentile-bootstrap 95 % intervals ``auroc_lo`` / ``auroc_hi``.

    Returns
    -------
    DataFrame with one row per score: ``score``, ``auroc``, ``aupr``, ``aupr_chance`` (fraction misclassified),
    ``n``, ``n_misclassified``, ``n_excluded`` (and the interval columns).
    """
    for col in ("correct", "certified", *scores):
        if col not in table:
            raise ValueError(f"table has no column {col!r}")
    ok = table["certified"].to_numpy(bool)
    sub = table[ok]
    wrong = ~sub["correct"].to_numpy(bool)
    rows = []
    for col in scores:
        s = -sub[col].to_numpy(float)
        row: dict[str, Any] = {"score": col}
        if wrong.any() and (~wrong).any():
            row["auroc"] = auroc(s, wrong)
            row["aupr"] = average_precision(s, wrong)
            if n_boot:
                row["auroc_lo"], row["auroc_hi"] = bootstrap_ci(auroc, s, wrong, n_boot=n_boot, seed=seed)
        else:  # a perfect (or hopeless) model: nothing to detect
            row["auroc"] = row["aupr"] = math.nan
            if n_boot:
                row["auroc_lo"] = row["auroc_hi"] = math.nan
        row.update(aupr_chance=float(wrong.mean()) if len(wrong) else math.nan, n=int(len(sub)),
                   n_misclassified=int(wrong.sum()), n_excluded=int((~ok).sum()))  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)
