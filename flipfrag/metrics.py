"""Dissimilarity of two saliency maps, batched: top-k intersection, Spearman rank correlation, center-of-mass shift.

Ghorbani et al. compare the map of an image with the map of its perturbed copy by
* the fraction of the k most salient features they share (k = 1000 of 227x227 for ImageNet, 100 of 32x32 for
  CIFAR-10; :func:`default_k` picks by map size),
* Spearman's rank-order correlation over all features,
* the Euclidean distance in pixels between their centers of mass (the authors' code floors both centers to
  integers first: ``floor=True``).

Conventions. Maps are batches: (N, H, W) (or (N, D) where no spatial layout is needed), dimension 0 indexes
samples; a single map needs a leading axis (``m[None]``). Every function accepts torch tensors or numpy arrays:
if every map argument is a numpy array the result is a numpy array (float64), otherwise it is a torch tensor on
the inputs' device (floating dtype of the input). Results have one value per sample, shape (N,) (``(N, 2)`` for
:func:`center_of_mass`). The torch paths of :func:`center_of_mass` and :func:`mass_in_region` are differentiable
(the attacks' objectives use them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "default_k",
    "topk_intersection",
    "spearman",
    "rankdata",
    "center_of_mass",
    "center_of_mass_shift",
    "mass_centers",
    "mass_in_region",
    "ReferenceMaps",
]

ArrayLike = Any  # torch.Tensor | np.ndarray


def default_k(n_features: int) -> int:
    """The paper's k for a map with ``n_features`` pixels.

    1000 for ImageNet-size maps (>= 50,000 pixels: 224x224 or 227x227), 100 for CIFAR-size maps (>= 1,000 pixels,
    32x32 = 1,024), and for smaller maps the CIFAR fraction 100/1024 of the pixels (at least 1): 77 for 28x28,
    6 for 8x8.
    """
    if n_features < 1:
        raise ValueError(f"n_features must be >= 1, got {n_features}")
    if n_features >= 50_000:
        return 1000
    if n_features >= 1000:
        return 100
    return max(1, round(n_features * 100 / 1024))


def _to_torch(a: ArrayLike, name: str) -> tuple[torch.Tensor, bool]:
    """(tensor, was_numpy). numpy input is converted to float64."""
    if isinstance(a, torch.Tensor):
        if not (a.is_floating_point() or a.dtype in (torch.int32, torch.int64, torch.bool)):
            raise TypeError(f"{name} must be a real-valued tensor, got {a.dtype}")
        return (a if a.is_floating_point() else a.double()), False
    if isinstance(a, np.ndarray):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise TypeError(f"{name} must be a numeric array, got dtype {a.dtype}")
        return torch.from_numpy(np.asarray(a, dtype=np.float64)), True
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(a).__name__}")


def _out(t: torch.Tensor, numpy_out: bool) -> ArrayLike:
    return t.detach().cpu().numpy() if numpy_out else t


def _pair(map_a: ArrayLike, map_b: ArrayLike, min_dim: int = 2) -> tuple[torch.Tensor, torch.Tensor, bool]:
    a, na = _to_torch(map_a, "map_a")
    b, nb = _to_torch(map_b, "map_b")
    if a.dim() < min_dim:
        raise ValueError(f"map_a must have a batch dimension and at least {min_dim} dims, got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"map_a and map_b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not na and not nb:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(device=a.device, dtype=dtype)
    else:
        dev = a.device if not na else b.device
        a, b = a.to(dev, torch.float64), b.to(dev, torch.float64)
    return a, b, na and nb


def topk_intersection(map_a: ArrayLike, map_b: ArrayLike, k: int) -> ArrayLike:
    """Fraction of the ``k`` largest features of ``map_a`` that are also among the ``k`` largest of ``map_b``.

    Parameters
    ----------
    map_a, map_b : (N, H, W) or (N, D)
        Saliency maps (compared per sample over all features).
    k : int
        1 <= k <= number of features. Ties are broken by ``torch.topk`` (unspecified order, as ``tf.nn.top_k``
        in the authors' code).

    Returns
    -------
    (N,) values in [0, 1]; 1 = identical top-k sets.
    """
    a, b, numpy_out = _pair(map_a, map_b)
    a, b = a.flatten(1), b.flatten(1)
    k = _check_k(k, a.shape[1])
    return _out(_shared_topk(_topk_mask(a, k), b, k), numpy_out)


def _check_k(k: Any, d: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d:
        raise ValueError(f"k must be an integer in [1, {d}] (the number of features), got {k!r}")
    return int(k)


def _topk_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """(N, D) bool: the k largest features of each row of ``a`` (N, D)."""
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)


def _shared_topk(top_a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of the k largest features of each row of ``b`` (N, D) that lie in the mask ``top_a``."""
    return top_a.gather(1, b.topk(k, dim=1).indices).sum(1).to(b.dtype) / k


def rankdata(values: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based, float64) along the last dimension with ties given their average rank, like
    ``scipy.stats.rankdata(method="average")``, batched over leading dimensions.

    One sort per row: tied entries are adjacent in sorted order and share the mean of their first and last
    (1-based) sorted positions.
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    s, order = values.sort(dim=-1)
    d = s.shape[-1]
    pos = torch.arange(d, device=s.device).expand_as(s)
    starts = torch.ones_like(s, dtype=torch.bool)  # first entry of a group of equal values
    starts[..., 1:] = s[..., 1:] != s[..., :-1]
    ends = torch.ones_like(starts)  # last entry of a group
    ends[..., :-1] = starts[..., 1:]
    first = torch.where(starts, pos, 0).cummax(-1).values
    last = torch.where(ends, pos, d).flip(-1).cummin(-1).values.flip(-1)
    avg = (first + last + 2).to(torch.float64) / 2
    return torch.empty_like(avg).scatter_(-1, order, avg)


def spearman(map_a: ArrayLike, map_b: ArrayLike) -> ArrayLike:
    """Spearman's rank correlation between each pair of maps over all features (average ranks for ties).

    Equals ``scipy.stats.spearmanr(map_a[i].ravel(), map_b[i].ravel()).statistic`` for every i; NaN where a map
    is constant (as SciPy). Computed in float64.

    Returns
    -------
    (N,) values in [-1, 1].
    """
    a, b, numpy_out = _pair(map_a, map_b)
    rho = _rank_correlation(_centered_ranks(a.flatten(1)), _centered_ranks(b.flatten(1)))
    return _out(rho if numpy_out else rho.to(a.dtype), numpy_out)


def _centered_ranks(a: torch.Tensor) -> torch.Tensor:
    """Average ranks (float64) of each row of ``a`` (N, D) minus their mean."""
    r = rankdata(a)
    return r - r.mean(1, keepdim=True)


def _rank_correlation(ra: torch.Tensor, rb: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of centered rank rows (float64): Spearman's rho."""
    return (ra * rb).sum(1) / torch.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))


def mass_centers(m: torch.Tensor) -> torch.Tensor:
    """Centers of mass (..., 2) of maps (..., H, W), in pixels (row, column): the unchecked, differentiable core of
    :func:`center_of_mass` (the attacks' objective calls it every step)."""
    h, w = m.shape[-2:]
    rows = torch.arange(h, device=m.device, dtype=m.dtype)
    cols = torch.arange(w, device=m.device, dtype=m.dtype)
    total = m.sum((-2, -1))
    return torch.stack([(m.sum(-1) * rows).sum(-1) / total, (m.sum(-2) * cols).sum(-1) / total], dim=-1)


def center_of_mass(maps: ArrayLike) -> ArrayLike:
    """Center of mass of each map, ``sum_{h,w} m[h,w] (h, w) / sum m``, in pixels (row, column), 0-based.

    Parameters
    ----------
    maps : (N, H, W)
        Non-negative saliency maps (need not be normalised). A map summing to 0 gives NaN.

    Returns
    -------
    (N, 2): row and column of each center. Differentiable on the torch path.
    """
    m, was_numpy = _to_torch(maps, "maps")
    if m.dim() != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {tuple(m.shape)}")
    return _out(mass_centers(m), was_numpy)


def center_of_mass_shift(map_a: ArrayLike, map_b: ArrayLike, *, floor: bool = False) -> ArrayLike:
    """Euclidean distance in pixels between the centers of mass of ``map_a`` and ``map_b`` (each (N, H, W)).

    ``floor=True`` floors both centers to integers first, as Ghorbani et al.'s code does (the reported "center
    dislocation"; it differs from the float distance by at most sqrt(2) pixels).

    Returns
    -------
    (N,) distances in pixels.
    """
    a, b, numpy_out = _pair(map_a, map_b, min_dim=3)
    if a.dim() != 3:
        raise ValueError(f"map_a and map_b must have shape (N, H, W), got {tuple(a.shape)}")
    ca, cb = mass_centers(a), mass_centers(b)
    if floor:
        ca, cb = ca.floor(), cb.floor()
    return _out((ca - cb).norm(dim=-1), numpy_out)


def mass_in_region(maps: ArrayLike, mask: ArrayLike) -> ArrayLike:
    """Fraction of each map's total mass inside ``mask`` (the targeted attack's criterion).

    Parameters
    ----------
    maps : (N, H, W)
        Non-negative saliency maps.
    mask : (H, W) or (N, H, W)
        Region indicator (bool or 0/1; real weights are allowed and weight the mass).

    Returns
    -------
    (N,) values in [0, 1] for a 0/1 mask. Differentiable on the torch path.
    """
    m, nm = _to_torch(maps, "maps")
    r, nr = _to_torch(mask, "mask")
    if m.dim() != 3:
        raise ValueError(f"maps must have shape (N, H, W), got {tuple(m.shape)}")
    if r.shape not in (m.shape, m.shape[1:]):
        raise ValueError(f"mask must have shape {tuple(m.shape[1:])} or {tuple(m.shape)}, got {tuple(r.shape)}")
    if nm != nr:
        m, r = m.double(), r.double().to(m.device)
    r = r.to(device=m.device, dtype=m.dtype)
    value = (m * r).sum((-2, -1)) / m.sum((-2, -1))
    return _out(value, nm and nr)


class ReferenceMaps:
    """Reference maps compared with many other batches of maps: their top-k sets, ranks and centers computed once.

    An attack compares the original maps with the maps of every iterate; this class does the reference's share of
    :func:`topk_intersection`, :func:`spearman` and :func:`center_of_mass_shift` once, and each call then equals the
    corresponding function on ``(reference, maps)``.

    Parameters
    ----------
    maps : Tensor (N, H, W)
        The reference maps (torch only).
    k : int
        Top-k size, 1 <= k <= H * W.
    floor_center : bool
        Floor centers to integers (as ``center_of_mass_shift(..., floor=True)``).
    """

    def __init__(self, maps: torch.Tensor, k: int, *, floor_center: bool = False):
        if not isinstance(maps, torch.Tensor) or not maps.is_floating_point() or maps.dim() != 3:
            got = f"{maps.dtype} {tuple(maps.shape)}" if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ValueError(f"maps must be a floating-point torch.Tensor of shape (N, H, W), got {got}")
        self.maps = maps.detach()
        self.k = _check_k(k, maps.shape[-2] * maps.shape[-1])
        self.floor_center = bool(floor_center)
        flat = self.maps.flatten(1)
        self._top = _topk_mask(flat, self.k)
        self._ranks = _centered_ranks(flat)
        center = mass_centers(self.maps)
        self._center = center.floor() if self.floor_center else center

    def _check(self, maps: torch.Tensor) -> torch.Tensor:
        if not isinstance(maps, torch.Tensor) or maps.shape != self.maps.shape:
            got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            want = tuple(self.maps.shape)
            raise ValueError(f"maps must be a torch.Tensor of the reference's shape {want}, got {got}")
        return maps.detach().to(self.maps.dtype)

    def topk_intersection(self, maps: torch.Tensor) -> torch.Tensor:
        """``topk_intersection(reference, maps, k)``."""
        return _shared_topk(self._top, self._check(maps).flatten(1), self.k)

    def spearman(self, maps: torch.Tensor) -> torch.Tensor:
        """``spearman(reference, maps)``."""
        return _rank_correlation(self._ranks, _centered_ranks(self._check(maps).flatten(1))).to(self.maps.dtype)

    def center_shift(self, maps: torch.Tensor) -> torch.Tensor:
        """``center_of_mass_shift(reference, maps, floor=floor_center)``."""
        center = mass_centers(self._check(maps))
        return ((center.floor() if self.floor_center else center) - self._center).norm(dim=-1)
