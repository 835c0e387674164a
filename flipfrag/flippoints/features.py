"""Individual features (E2), bias (E3) and adversarial changes (E4): feature rankings of flip directions, flip points
with only some features free, the toggle test, and flips with the top-k features free."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..flip import FlipResult, closest_flip_point
from ._util import _as_numpy


def columns_of(data: Any, attribute: str) -> list[int]:
    """Column indices of an attribute of a tabular dataset: its one-hot block, or the single column of that name."""
    groups = getattr(data, "groups", {}) or {}
    if attribute in groups:
        return list(groups[attribute])
    names = list(getattr(data, "feature_names", []) or [])
    if attribute in names:
        return [names.index(attribute)]
    raise ValueError(f"attribute {attribute!r} is neither a group ({sorted(groups)}) nor a feature name")


def attribute_units(data: Any) -> dict[str, list[int]]:
    """Every attribute of a tabular dataset as a *unit*: a numeric column, or a whole one-hot block.

    Returns ``{attribute: [column indices]}`` in column order (e.g. Adult: 14 attributes over 103 columns).
    """
    names = list(getattr(data, "feature_names", []) or [])
    if not names:
        raise ValueError("data has no feature_names (units are defined for tabular data only)")
    col_to_group = {c: g for g, cols in (getattr(data, "groups", {}) or {}).items() for c in cols}
    units: dict[str, list[int]] = {}
    for c, name in enumerate(names):
        units.setdefault(col_to_group.get(c, name), []).append(c)
    return units


def rank_features(direction: Any, feature_names: Sequence[str], *, original: Any = None,
                  top: int | None = None) -> pd.DataFrame:  # fmt: skip
    """Features of one flip direction ranked by the size of their change in model units.

    The ranking uses the model's (scaled) units, where changes are comparable across features and the distance is
    measured; ``original`` (the same direction in original units, e.g. ``data.delta_to_original_units(v)``) is
    reported alongside for reading (years, hours, dollars; one-hot columns stay 0–1).

    Returns a DataFrame with ``rank`` (1 = largest), ``feature``, ``change`` (model units), ``share`` (of the squared
    norm) and ``change_original`` when given; ``top`` keeps the first rows.
    """
    v = _as_numpy(direction, "direction").ravel()
    if len(feature_names) != v.size:
        raise ValueError(f"feature_names has {len(feature_names)} names for a direction of {v.size} features")
    if not np.isfinite(v).all():
        raise ValueError("direction contains NaN (an uncertified flip point?)")
    order = np.argsort(-np.abs(v), kind="mergesort")
    total = float((v**2).sum())
    df = pd.DataFrame({
        "rank": np.arange(1, v.size + 1),
        "feature": [feature_names[i] for i in order],
        "change": v[order],
        "share": (v[order] ** 2) / total if total > 0 else np.zeros(v.size),
    })  # fmt: skip
    if original is not None:
        o = _as_numpy(original, "original").ravel()
        if o.size != v.size:
            raise ValueError(f"original has {o.size} entries, direction {v.size}")
        df["change_original"] = o[order]
    return df.head(top) if top is not None else df


def _flat_bound(b: Any, n: int, N: int, default: float) -> torch.Tensor:
    if b is None:
        return torch.full((N, n), default, dtype=torch.float64)
    t = torch.as_tensor(b, dtype=torch.float64)
    if t.dim() == 0:
        return t.expand(N, n).clone()
    t = t.reshape(-1, n) if t.numel() % n == 0 else t
    if t.shape[-1] != n:
        raise ValueError(f"bounds must broadcast to {n} features, got shape {tuple(t.shape)}")
    return t.expand(N, n).clone()


def restricted_flip_points(model: nn.Module, x: torch.Tensor, free: Any, **solver_kwargs: Any) -> FlipResult:
    """Closest flip points when only the features where ``free`` is True may change (the rest stay fixed).

    ``free``: bool array-like broadcastable to ``x`` (N, *shape) — e.g. (n_features,) for one set shared by all
    inputs, or (N, n_features) per input. A thin wrapper around ``closest_flip_point(mask=...)``; ``lower``/``upper``
    in ``solver_kwargs`` apply to the free features, and inputs outside the box on fixed features are allowed
    (the box is widened there, since a fixed feature is not moved).
    """
    N, shape = x.shape[0], tuple(x.shape[1:])
    n = int(np.prod(shape))
    m = torch.as_tensor(np.asarray(free), dtype=torch.bool) if not isinstance(free, torch.Tensor) else free.bool()
    if m.numel() == n:
        m = m.reshape(1, n).expand(N, n)
    elif m.numel() == N * n:
        m = m.reshape(N, n)
    else:
        raise ValueError(f"free must have {n} or {N}x{n} entries for x of shape {tuple(x.shape)}, got {tuple(m.shape)}")
    kw = dict(solver_kwargs)
    xf = x.detach().double().reshape(N, n)
    lo = _flat_bound(kw.pop("lower", None), n, N, -math.inf)
    hi = _flat_bound(kw.pop("upper", None), n, N, math.inf)
    # a fixed feature sits at its own value; only the free ones must respect the box
    lo = torch.where(m, lo, torch.minimum(lo, xf))
    hi = torch.where(m, hi, torch.maximum(hi, xf))
    return closest_flip_point(model, x, mask=m.reshape(N, *shape).clone(), lower=lo.reshape(N, *shape),
                              upper=hi.reshape(N, *shape), **kw)  # fmt: skip


def unit_flips(model: nn.Module, x: torch.Tensor, units: Mapping[str, Sequence[int]], *,
               target: int | None = None, **solver_kwargs: Any) -> tuple[pd.DataFrame, FlipResult]:  # fmt: skip
    """For ONE input, the closest flip point when only one unit (a feature or a one-hot block) may change.

    Parameters
    ----------
    x : Tensor (1, n) or (n,)
        The input.
    units : mapping name -> column indices
        E.g. :func:`attribute_units` (every attribute alone) or ``{"sex": [58]}``.
    target : int, optional
        Class to flip to (default: the closest other class).

    Returns
    -------
    (table, result): one row per unit with ``unit``, ``n_columns``, ``flips`` (a certified flip point exists with
    only this unit free, within the bounds), ``distance`` (NaN if not), ``column`` (the column that moved most) and
    its ``change`` (model units); the :class:`FlipResult` of the batch (one problem per unit, in ``units`` order).
    One-hot blocks are relaxed to [0, 1] (not rounded: with everything else fixed a rounded block can rarely sit
    exactly on the boundary).
    """
    x1 = x.detach().reshape(1, -1) if x.dim() == 1 else x.detach()
    if x1.shape[0] != 1:
        raise ValueError(f"x must be a single input (1, n) or (n,), got shape {tuple(x.shape)}")
    if not units:
        raise ValueError("units is empty")
    n = x1[0].numel()
    names = list(units)
    free = torch.zeros(len(names), n, dtype=torch.bool)
    for i, u in enumerate(names):
        cols = list(units[u])
        if not cols or min(cols) < 0 or max(cols) >= n:
            raise ValueError(f"units[{u!r}] must list column indices in [0, {n}), got {cols}")
        free[i, cols] = True
    xb = x1.expand(len(names), *x1.shape[1:]).clone()
    if target is not None:
        solver_kwargs["target"] = torch.full((len(names),), int(target), dtype=torch.long)
    res = restricted_flip_points(model, xb, free.reshape(len(names), *x1.shape[1:]), **solver_kwargs)
    d = res.x_attempt.double().reshape(len(names), n) - xb.double().reshape(len(names), n)
    rows = []
    for i, u in enumerate(names):
        j = int(d[i].abs().argmax())
        ok = bool(res.converged[i])
        rows.append({"unit": u, "n_columns": len(units[u]), "flips": ok,
                     "distance": float(res.distance[i]) if ok else math.nan,
                     "column": j, "change": float(d[i, j]) if ok else math.nan})  # fmt: skip
    return pd.DataFrame(rows), res


def attribute_shares(directions: Any, units: Mapping[str, Sequence[int]]) -> pd.DataFrame:
    """Share of each flip direction's squared length that falls on each unit (attribute), rows summing to 1.

    ``directions`` (N, n_features): rows with NaN (uncertified) or zero length give NaN rows.
    Returns a DataFrame (N, n_units) with the unit names as columns.
    """
    D = _as_numpy(directions, "directions", ndim=2)
    total = (D**2).sum(1)
    out = {}
    for u, cols in units.items():
        cols = list(cols)
        if not cols or min(cols) < 0 or max(cols) >= D.shape[1]:
            raise ValueError(f"units[{u!r}] must list column indices in [0, {D.shape[1]}), got {cols}")
        with np.errstate(invalid="ignore", divide="ignore"):
            out[u] = np.where(total > 0, (D[:, cols] ** 2).sum(1) / total, np.nan)
    return pd.DataFrame(out)


def attribute_order(order: Any, units: Mapping[str, Sequence[int]]) -> pd.DataFrame:
    """Map a column pivot order (e.g. RR-QR's) to attributes: each attribute's rank = its first column's position.

    Returns a DataFrame sorted by rank with ``rank`` (1-based, among attributes), ``attribute``, ``first_pivot``
    (0-based position of its first column in ``order``) and ``column`` (that column's index).
    """
    o = _as_numpy(order, "order", ndim=1, dtype=np.int64)
    pos = np.empty(o.size, dtype=np.int64)
    pos[o] = np.arange(o.size)
    rows = []
    for u, cols in units.items():
        cols = list(cols)
        if max(cols) >= o.size:
            raise ValueError(f"units[{u!r}] has column {max(cols)} outside the order of {o.size} columns")
        k = min(cols, key=lambda c: pos[c])
        rows.append({"attribute": u, "first_pivot": int(pos[k]), "column": int(k)})
    df = pd.DataFrame(rows).sort_values("first_pivot", kind="mergesort").reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


@torch.no_grad()
def toggle_test(model: nn.Module, x: torch.Tensor, columns: Sequence[int]) -> pd.DataFrame:
    """The plain counterfactual test for a protected attribute: change it, keep everything else, re-predict.

    A single binary column is toggled (``v -> 1 - v``); a one-hot block is set to every other category in turn.
    Returns one row per (input, alternative): ``point``, ``from`` / ``to`` (column index of the category, or the
    old / new value of a binary column), ``pred_before``, ``pred_after``, ``flipped``. An input "depends on the
    attribute" if any of its rows flipped (``table.groupby("point").flipped.any()``).
    """
    cols = list(columns)
    N = x.shape[0]
    X = x.detach().reshape(N, -1)
    n = X.shape[1]
    if not cols or min(cols) < 0 or max(cols) >= n:
        raise ValueError(f"columns must list column indices in [0, {n}), got {cols}")
    from ..models import predict

    before = predict(model, X.reshape(x.shape)).argmax(1)
    rows = []
    if len(cols) == 1:
        c = cols[0]
        Xt = X.clone()
        Xt[:, c] = 1 - Xt[:, c]
        after = predict(model, Xt.reshape(x.shape)).argmax(1)
        for i in range(N):
            rows.append((i, float(X[i, c]), float(Xt[i, c]), int(before[i]), int(after[i])))
    else:
        current = torch.tensor(cols)[X[:, cols].argmax(1)]
        for c in cols:
            Xt = X.clone()
            Xt[:, cols] = 0
            Xt[:, c] = 1
            after = predict(model, Xt.reshape(x.shape)).argmax(1)
            for i in torch.nonzero(current != c).flatten().tolist():
                rows.append((i, int(current[i]), c, int(before[i]), int(after[i])))
    df = pd.DataFrame(rows, columns=["point", "from", "to", "pred_before", "pred_after"])
    df["flipped"] = df["pred_before"] != df["pred_after"]
    return df.sort_values(["point", "to"], kind="mergesort").reset_index(drop=True)


def topk_mask(order: Any, k: int, n_features: int | None = None) -> torch.Tensor:
    """Boolean mask of the first ``k`` features of ``order``: (n,) for one order, (N, n) for per-input orders."""
    o = torch.as_tensor(_as_numpy(order, "order", dtype=np.int64))
    if o.dim() not in (1, 2):
        raise ValueError(f"order must be (n,) or (N, n), got shape {tuple(o.shape)}")
    n = n_features if n_features is not None else o.shape[-1]
    if not isinstance(k, (int, np.integer)) or not 0 <= k <= n:
        raise ValueError(f"k must be an integer in [0, {n}], got {k!r}")
    mask = torch.zeros(*o.shape[:-1], n, dtype=torch.bool)
    mask.scatter_(-1, o[..., :k], True)
    return mask


def flips_vs_k(
    model: nn.Module, x: torch.Tensor, order: Any, ks: Sequence[int], *, target: torch.Tensor | None = None,
    **solver_kwargs: Any,
) -> tuple[pd.DataFrame, FlipResult]:
    """Closest flip points when only the ``k`` first features of ``order`` may change, for each ``k`` in ``ks``.

    Parameters
    ----------
    x : Tensor (N, *shape)
    order : array-like (n,) or (N, n)
        Feature ranking (e.g. RR-QR pivots of a flip-direction matrix, or each input's own ``|x_flip - x|``).
    ks : sequence of int
        Numbers of free features.
    target : LongTensor (N,), optional
        Class to flip to for every k (default: the closest other class, solved per k).

    Returns
    -------
    (table, result): ``table`` has one row per (point, k): ``point``, ``k``, ``flips`` (certified), ``distance``
    (L2, model units; NaN if none), ``l0`` (features changed by more than 1e-6), ``linf``; ``result`` is the
    :class:`FlipResult` of all ``len(ks) * N`` problems, k-major (problem ``j * N + i`` is point i with ``ks[j]``).
    """
    N, shape = x.shape[0], tuple(x.shape[1:])
    n = int(np.prod(shape))
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("ks is empty")
    masks = torch.cat([topk_mask(order, k, n).reshape(-1, n).expand(N, n) for k in ks])
    xb = x.detach().repeat(len(ks), *([1] * len(shape)))
    kw = dict(solver_kwargs)
    if target is not None:
        kw["target"] = torch.as_tensor(target, dtype=torch.long).repeat(len(ks))
    res = restricted_flip_points(model, xb, masks.reshape(len(ks) * N, *shape), **kw)
    d = (res.x_flip.double() - xb.double()).reshape(len(ks) * N, n)
    rows = []
    for j, k in enumerate(ks):
        for i in range(N):
            p = j * N + i
            ok = bool(res.converged[p])
            rows.append({"point": i, "k": k, "flips": ok, "distance": float(res.distance[p]) if ok else math.nan,
                         "l0": int((d[p].abs() > 1e-6).sum()) if ok else -1,
                         "linf": float(d[p].abs().max()) if ok else math.nan})  # fmt: skip
    return pd.DataFrame(rows), res
