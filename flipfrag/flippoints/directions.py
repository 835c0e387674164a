"""Dataset-level analysis of flip directions (E6, E7): the direction matrix, its PCA and rank-revealing QR."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..flip import FlipResult
from ._util import _as_numpy


def flip_directions(res: FlipResult, x: torch.Tensor) -> np.ndarray:
    """Flip directions ``x_flip - x`` flattened, shape (N, n_features), float64; NaN rows where uncertified."""
    if len(res) != x.shape[0]:
        raise ValueError(f"res and x must have the same length, got {len(res)} and {x.shape[0]}")
    if tuple(res.x_flip.shape) != tuple(x.shape):
        raise ValueError(f"res.x_flip has shape {tuple(res.x_flip.shape)} but x has {tuple(x.shape)}")
    return (res.x_flip.double() - x.double()).flatten(1).numpy()


def direction_matrix(directions: Any, *, rows: Any = None, normalize: bool = False) -> np.ndarray:
    """The matrix D of flip directions (one row per input): certified rows only, optionally selected / normalised.

    Parameters
    ----------
    directions : array-like (N, n_features)
        From :func:`flip_directions` (NaN rows = uncertified, dropped).
    rows : bool array-like (N,), optional
        Which inputs to use (e.g. ``res.source == c`` for "flips out of class c").
    normalize : bool
        Scale each row to unit length, so that every input's direction counts equally whatever its distance.
        Zero rows (an input already on the boundary) are dropped.
    """
    D = _as_numpy(directions, "directions", ndim=2)
    keep = np.isfinite(D).all(1)
    if rows is not None:
        r = _as_numpy(rows, "rows", ndim=1, dtype=bool)
        if r.shape[0] != D.shape[0]:
            raise ValueError(f"rows has {r.shape[0]} entries for {D.shape[0]} directions")
        keep &= r
    D = D[keep]
    if normalize:
        norm = np.linalg.norm(D, axis=1)
        D = D[norm > 0] / norm[norm > 0, None]
    return D


@dataclass
class PCAResult:
    """Principal directions of a matrix of flip directions.

    Attributes
    ----------
    singular_values : ndarray (r,)
        Of the (centred) matrix, descending; r = min(m, n).
    explained : ndarray (r,)
        ``s_k^2 / sum s^2`` — fraction of the total (centred: variance; uncentred: second moment) per component.
    components : ndarray (r, n)
        Right singular vectors (rows, unit length), sign fixed so each one's largest-magnitude entry is positive.
    mean : ndarray (n,)
        The subtracted row mean (zeros if ``center`` was False).
    center, normalize : bool
    n_rows : int
    """

    singular_values: np.ndarray
    explained: np.ndarray
    components: np.ndarray
    mean: np.ndarray
    center: bool
    normalize: bool
    n_rows: int

    def n_components(self, level: float = 0.9) -> int:
        """Smallest number of components whose cumulative ``explained`` reaches ``level``."""
        if not 0 < level <= 1:
            raise ValueError(f"level must be in (0, 1], got {level}")
        if not self.explained.any():  # no variance at all (e.g. identical rows, centred)
            return 0
        return int(min(np.searchsorted(np.cumsum(self.explained), level - 1e-12) + 1, len(self.explained)))


def _checked_direction_matrix(D: Any, normalize: bool) -> np.ndarray:
    """D as a finite (m, n) float array with m, n >= 1 (rows scaled to unit length if ``normalize``)."""
    A = _as_numpy(D, "D", ndim=2)
    if A.shape[0] < 1 or A.shape[1] < 1:
        raise ValueError(f"D must have at least one row and column, got shape {A.shape}")
    if not np.isfinite(A).all():
        raise ValueError("D contains NaN or inf (use direction_matrix to drop uncertified rows)")
    return direction_matrix(A, normalize=True) if normalize else A


def pca_directions(D: Any, *, center: bool = True, normalize: bool = False) -> PCAResult:
    """PCA (``center=True``) or plain SVD (``center=False``) of a direction matrix D (m, n) with m >= 1 rows.

    ``normalize`` scales rows to unit length first (see :func:`direction_matrix`). NaN rows are an error: build D
    with :func:`direction_matrix`.
    """
    A = _checked_direction_matrix(D, normalize)
    mean = A.mean(0) if center else np.zeros(A.shape[1])
    _, s, vt = np.linalg.svd(A - mean, full_matrices=False)
    idx = np.argmax(np.abs(vt), axis=1)
    signs = np.sign(vt[np.arange(vt.shape[0]), idx])
    vt = vt * np.where(signs == 0, 1.0, signs)[:, None]
    total = float((s**2).sum())
    # variance at rounding level (e.g. identical rows, centred) counts as none
    tiny = (1e-12 * max(np.linalg.norm(A), 1e-300)) ** 2
    explained = s**2 / total if total > tiny else np.zeros_like(s)
    return PCAResult(s, explained, vt, mean, bool(center), bool(normalize), int(A.shape[0]))


@dataclass
class RRQRResult:
    """Rank-revealing (column-pivoted) QR of a direction matrix: ``D[:, order] = Q R``.

    Attributes
    ----------
    order : ndarray (n,) int
        Column pivot order: ``order[0]`` is the feature with the largest column norm, each next one the feature
        most independent of those already chosen. The first entries are the features that dominate the flips.
    r_diag : ndarray (min(m, n),)
        ``|R_kk|`` (non-increasing up to rounding); their decay shows the numerical rank.
    rank : int
        Number of ``|R_kk| > rank_tol * |R_00|``.
    rank_tol : float
    normalize : bool
    n_rows : int
    """

    order: np.ndarray
    r_diag: np.ndarray
    rank: int
    rank_tol: float
    normalize: bool
    n_rows: int

    def top(self, k: int, names: Sequence[str] | None = None) -> list:
        """The first ``k`` pivots, as column indices or as ``names[index]``."""
        idx = self.order[:k]
        return [names[i] for i in idx] if names is not None else [int(i) for i in idx]


def rrqr_directions(D: Any, *, normalize: bool = False, rank_tol: float | None = None) -> RRQRResult:
    """Column-pivoted QR of D (m, n) — ``scipy.linalg.qr(D, pivoting=True, mode="economic")``.

    ``rank_tol`` defaults to ``max(m, n) * machine epsilon`` (the exact numerical rank); pass e.g. 1e-2 for the
    number of features that carry 99 % of the pivot scale.
    """
    from scipy.linalg import qr

    A = _checked_direction_matrix(D, normalize)
    _, R, piv = qr(A, mode="economic", pivoting=True)
    r = np.abs(np.diag(R))
    tol = float(rank_tol) if rank_tol is not None else max(A.shape) * np.finfo(float).eps
    rank = int((r > tol * r[0]).sum()) if r.size and r[0] > 0 else 0
    return RRQRResult(piv.astype(np.int64), r, rank, tol, bool(normalize), int(A.shape[0]))
