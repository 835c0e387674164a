"""Model-agnostic flip points (E8): a linear classifier as a two-class score model, and its closed-form closest flip
point in a box."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ._util import _as_numpy


class LinearScores(nn.Module):
    """A linear classifier as a flipfrag model: scores ``x W^T + b`` (N, C), inputs flattened.

    For a binary classifier given as one weight vector ``w`` (n,) and bias ``b`` (scalar) — e.g. scikit-learn's
    ``LogisticRegression`` — the scores are ``[0, w.x + b]``, so class 1 wins iff ``w.x + b > 0`` and the softmax
    equals the logistic model's probabilities.
    """

    def __init__(self, weight: Any, bias: Any, dtype: torch.dtype = torch.float64):
        super().__init__()
        W = torch.as_tensor(_as_numpy(weight, "weight"), dtype=dtype)
        b = torch.as_tensor(_as_numpy(bias, "bias"), dtype=dtype).reshape(-1)
        if W.dim() == 1 or W.shape[0] == 1:  # binary: one decision function
            W = torch.cat([torch.zeros(1, W.numel(), dtype=dtype), W.reshape(1, -1)])
            if b.numel() != 1:
                raise ValueError(f"bias must be a scalar for a binary weight vector, got {b.numel()} values")
            b = torch.cat([torch.zeros(1, dtype=dtype), b])
        if W.dim() != 2 or b.shape != (W.shape[0],):
            raise ValueError(f"weight (C, n) and bias (C,) do not match: {tuple(W.shape)} and {tuple(b.shape)}")
        # frozen parameters (not buffers), so that code asking ``next(model.parameters()).dtype`` works
        self.weight = nn.Parameter(W, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False)
        self.config = {"arch": "LinearScores", "in_features": int(W.shape[1]), "n_classes": int(W.shape[0])}

    @classmethod
    def from_sklearn(cls, clf: Any, dtype: torch.dtype = torch.float64) -> LinearScores:
        """From a fitted linear scikit-learn classifier with ``coef_`` and ``intercept_`` (e.g. LogisticRegression)."""
        if not hasattr(clf, "coef_") or not hasattr(clf, "intercept_"):
            raise TypeError(f"clf must be a fitted linear classifier with coef_/intercept_, got {type(clf).__name__}")
        return cls(clf.coef_, clf.intercept_, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).to(self.weight.dtype) @ self.weight.T + self.bias


def linear_flip_point(w: Any, b: float, x: Any, *, lower: Any = None, upper: Any = None,
                      iters: int = 200) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Closed-form closest flip point of a binary linear classifier ``sign(w.x + b)``: the Euclidean projection of
    each input onto the hyperplane ``w.x + b = 0`` intersected with the box ``[lower, upper]``.

    Without bounds: ``x - (w.x + b) w / ||w||^2`` at distance ``|w.x + b| / ||w||``. With bounds the KKT conditions
    of this convex problem give ``x(lam) = clip(x - lam w, lower, upper)`` with the scalar ``lam`` solving
    ``w.x(lam) + b = 0``; ``w.x(lam)`` is monotone and piecewise linear in ``lam``, so ``lam`` is bracketed by
    bisection and then found exactly by linear interpolation on its final piece.

    Parameters
    ----------
    w : (n,); b : scalar; x : (N, n) inputs.
    lower, upper : scalar or (n,), optional.

    Returns
    -------
    (x_flip (N, n), distance (N,)) as float64; NaN where the hyperplane does not meet the box.
    """
    w = _as_numpy(w, "w").ravel()
    X = _as_numpy(x, "x")
    X = X.reshape(X.shape[0], -1) if X.ndim > 1 else X.reshape(1, -1)
    if X.shape[1] != w.size:
        raise ValueError(f"x has {X.shape[1]} features, w has {w.size}")
    if not np.any(w):
        raise ValueError("w is zero: the classifier is constant and has no flip point")
    b = float(b)
    if lower is None and upper is None:
        f = X @ w + b
        xf = X - np.outer(f / (w @ w), w)
        return xf, np.abs(f) / np.linalg.norm(w)
    lo = np.broadcast_to(-np.inf if lower is None else _as_numpy(lower, "lower"), w.shape)
    hi = np.broadcast_to(np.inf if upper is None else _as_numpy(upper, "upper"), w.shape)
    if (lo > hi).any():
        raise ValueError("lower > upper for some features")

    def phi(lam: np.ndarray) -> np.ndarray:  # w . clip(x - lam w) + b, non-increasing in lam
        return (np.clip(X - lam[:, None] * w, lo, hi) @ w) + b

    # phi at lam -> +-inf: every coordinate at the bound its sign pushes it to
    phi_plus = np.where(w > 0, lo, hi) @ w + b  # lam -> +inf
    phi_minus = np.where(w > 0, hi, lo) @ w + b  # lam -> -inf
    feasible = (phi_plus <= 0) & (phi_minus >= 0)
    # a bracket: every breakpoint (a coordinate reaching a bound) lies within |lam| <= max_i |x_i - bound_i| / |w_i|
    with np.errstate(divide="ignore", invalid="ignore"):
        reach = np.abs(np.concatenate([X - lo, X - hi], axis=1)) / np.abs(np.concatenate([w, w]))
    span = np.where(np.isfinite(reach), reach, 0.0).max(axis=1)
    f0 = X @ w + b
    span = np.maximum(span, np.abs(f0) / (w @ w)) * 2 + 1.0
    a, c = -span, span.copy()  # phi(a) >= 0 >= phi(c) where feasible
    for _ in range(iters):
        m = 0.5 * (a + c)
        pm = phi(m)
        a = np.where(pm >= 0, m, a)
        c = np.where(pm >= 0, c, m)
    pa, pc = phi(a), phi(c)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.where(pa - pc > 0, a + pa * (c - a) / (pa - pc), 0.5 * (a + c))
    xf = np.clip(X - lam[:, None] * w, lo, hi)
    dist = np.linalg.norm(xf - X, axis=1)
    xf[~feasible] = np.nan
    dist[~feasible] = np.nan
    return xf, dist
