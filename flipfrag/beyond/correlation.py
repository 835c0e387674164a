"""Spearman rank correlation across images with a seeded percentile-bootstrap interval.

The beyond studies correlate per-image quantities (distance to the closest flip point, fragility of the saliency
map, input-Hessian curvature). Images where a quantity is missing (NaN: e.g. no certified flip point) are excluded
and counted, never filled in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = ["Correlation", "bootstrap_indices", "spearman_rows", "spearman_ci"]


@dataclass(frozen=True)
class Correlation:
    """Spearman ρ of two per-image quantities with its bootstrap interval.

    ``rho`` (NaN if fewer than 3 complete pairs or a constant quantity), ``low`` / ``high`` the percentile interval
    at ``level`` (NaN if not computable), ``n`` complete pairs used, ``n_excluded`` pairs dropped for a NaN,
    ``n_boot`` resamples drawn, ``n_boot_degenerate`` resamples where ρ is undefined (a constant resample; left out
    of the interval).
    """

    rho: float
    low: float
    high: float
    n: int
    n_excluded: int
    level: float
    n_boot: int
    n_boot_degenerate: int

    @property
    def excludes_zero(self) -> bool:
        """True if the interval lies entirely on one side of 0 (a relation; False for "no relation found")."""
        return bool(np.isfinite(self.low) and np.isfinite(self.high) and (self.low > 0 or self.high < 0))

    def text(self) -> str:
        """``"ρ = 0.41 [0.12, 0.66], n = 40"`` (plus the number excluded, if any)."""
        if not np.isfinite(self.rho):
            return f"ρ not defined (n = {self.n})"
        out = f"ρ = {self.rho:.2f} [{self.low:.2f}, {self.high:.2f}], n = {self.n}"
        return out + (f" ({self.n_excluded} excluded)" if self.n_excluded else "")


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices of resampling n pairs with replacement (``numpy.random.default_rng(seed)``)."""
    if n < 1 or n_boot < 1:
        raise ValueError(f"n and n_boot must be >= 1, got n={n}, n_boot={n_boot}")
    return np.random.default_rng(seed).integers(0, n, (n_boot, n))


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman ρ of every row pair of ``a`` and ``b`` (R, n): Pearson correlation of average-tie ranks; NaN for a
    row where either side is constant."""
    ra, rb = rankdata(a, axis=-1), rankdata(b, axis=-1)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    den = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def _vector(name: str, v: Any) -> np.ndarray:
    arr = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per image (1-D), got shape {arr.shape}")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contains inf")
    return arr


def spearman_ci(a: Any, b: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Correlation:
    """Spearman ρ between ``a`` and ``b`` (one value per image) and its percentile bootstrap interval.

    Pairs with a NaN on either side are excluded (counted in ``n_excluded``). The bootstrap resamples the complete
    pairs with replacement (:func:`bootstrap_indices` with ``seed``); resamples where ρ is undefined are left out.
    """
    x, y = _vector("a", a), _vector("b", b)
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same length, got {x.shape[0]} and {y.shape[0]}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n, excluded = int(ok.sum()), int((~ok).sum())
    nan = float("nan")
    if n < 3:
        return Correlation(nan, nan, nan, n, excluded, level, int(n_boot), 0)
    rho = float(spearman_rows(x[None], y[None])[0])
    idx = bootstrap_indices(n, int(n_boot), seed)
    boot = spearman_rows(x[idx], y[idx])
    good = boot[np.isfinite(boot)]
    low, high = np.quantile(good, [(1 - level) / 2, (1 + level) / 2]) if len(good) else (nan, nan)
    return Correlation(rho, float(low), float(high), n, excluded, level, int(n_boot), int(len(boot) - len(good)))
