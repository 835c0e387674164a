"""Analyses built on closest flip points (Yousefzadeh & O'Leary 2019): confidence, influential features, bias,
adversarial changes, influential training points, and PCA / rank-revealing QR of flip directions.

The flip points themselves come from :func:`flipfrag.flip.closest_flip_point`; this module never solves for them
by other means. It adds what the paper does *with* them:

==============================  =======================================================================================
concept                         functions
==============================  =======================================================================================
cache (solve once, reuse)       :func:`cached_flip_points` (sharded engine tasks), :func:`concat_flip_results`,
                                :func:`standard_flips`, :func:`flip_settings`,
                                :func:`save_flip_result`, :func:`load_flip_result`, :func:`flip_cache_key`,
                                :func:`trained_variant` (zoo models with tanh / softplus activations)
confidence (E1)                 :func:`confidence_scores`, :func:`misclassification_detection`, :func:`auroc`,
                                :func:`average_precision`, :func:`bootstrap_ci`, :func:`auroc_difference`,
                                :func:`linearized_distance`
individual features (E2)        :func:`flip_directions`, :func:`rank_features`, :func:`columns_of`,
                                :func:`restricted_flip_points`, :func:`unit_flips`
bias (E3)                       :func:`attribute_shares`, :func:`attribute_order`, :func:`toggle_test`
adversarial changes (E4)        :func:`topk_mask`, :func:`flips_vs_k`
influential training pts (E5)   :func:`select_training_subset`, :func:`retraining_experiment`, :func:`mlp_trainer`
dataset level (E6, E7)          :func:`direction_matrix`, :func:`pca_directions`, :func:`rrqr_directions`
model-agnostic (E8)             :class:`LinearScores`, :func:`linear_flip_point`
==============================  =======================================================================================

Conventions
-----------
* A *flip direction* is ``x_flip - x`` for one input, flattened to the model's feature space (the scaled space
  the network sees, e.g. [0, 1] per feature). Distances are Euclidean in that space. Changes in original units are
  obtained with :meth:`flipfrag.datasets.Dataset.delta_to_original_units` (tabular data only).
* Points whose flip point was not certified (``FlipResult.converged`` False) are never used silently: the functions
  either drop them and say how many (``n_excluded``), or keep NaN.
* "Misclassified" detection: a *low* distance (or a low softmax) should mean "probably wrong", so the detectors
  score a point by ``-distance`` / ``-softmax``; AUROC = 0.5 is chance, 1.0 perfect.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import engine as _engine
from . import flip as _flip
from . import smooth as _smooth
from ._io import cache_dir, sha256_files, verify_checksummed, write_checksummed
from .engine import EngineCacheError, Task, TaskCache, TaskError, TaskResult, run_tasks
from .flip import FlipResult, closest_flip_point
from .models import config_key, tensor_hash

__all__ = [
    # cache
    "FlipCacheError",
    "flip_cache_key",
    "save_flip_result",
    "load_flip_result",
    "cached_flip_points",
    "concat_flip_results",
    "flip_settings",
    "trained_variant",
    "FlipSet",
    "standard_flips",
    # confidence
    "auroc",
    "average_precision",
    "bootstrap_ci",
    "auroc_difference",
    "linearized_distance",
    "confidence_scores",
    "misclassification_detection",
    # directions and features
    "flip_directions",
    "rank_features",
    "columns_of",
    "attribute_units",
    "restricted_flip_points",
    "unit_flips",
    # bias
    "attribute_shares",
    "attribute_order",
    "toggle_test",
    # adversarial
    "topk_mask",
    "flips_vs_k",
    # influential training points
    "select_training_subset",
    "retraining_experiment",
    "mlp_trainer",
    "TrainedPredictor",
    # PCA / RR-QR
    "direction_matrix",
    "PCAResult",
    "pca_directions",
    "RRQRResult",
    "rrqr_directions",
    # model-agnostic
    "LinearScores",
    "linear_flip_point",
]


def _as_numpy(a: Any, name: str, *, ndim: int | None = None, dtype=np.float64) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    elif not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as err:  # pragma: no cover - numpy's own conversion errors
            raise TypeError(f"{name} must be array-like, got {type(a).__name__}") from err
    if a.dtype == object:
        raise TypeError(f"{name} must be numeric, got an object array")
    a = a.astype(dtype, copy=True)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    return a


# ============================================================================================== cache


class FlipCacheError(RuntimeError):
    """A cached flip-point file is corrupt, truncated, or belongs to another key."""


_FORMAT = 1


def _solver_fingerprint() -> str:
    """sha256 of the solver's source (``flip.py`` and the smoothing it uses, ``smooth.py``): cached flip points are
    invalidated whenever either changes."""
    return sha256_files([_flip.__file__, _smooth.__file__])[:16]


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_hash(value.detach().cpu())}
    if isinstance(value, np.ndarray):
        return {"array": tensor_hash(torch.from_numpy(np.ascontiguousarray(value)))}
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def flip_cache_key(model: nn.Module, x: torch.Tensor, **solver_kwargs: Any) -> str:
    """A 16-hex key for (model weights + config, inputs, solver settings, solver source).

    Tensors among ``solver_kwargs`` (bounds, masks, targets) are hashed by content; ``progress`` is ignored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    state = model.state_dict()
    kw = {k: v for k, v in solver_kwargs.items() if k != "progress"}
    return config_key(
        {
            "model": tensor_hash(*[state[k] for k in sorted(state)]) if state else type(model).__name__,
            "config": getattr(model, "config", type(model).__name__),
            "x": tensor_hash(x),
            "solver": _jsonable(dict(sorted(kw.items()))),
            "solver_source": _solver_fingerprint(),
        }
    )


def save_flip_result(path: str | Path, res: FlipResult, *, key: str = "", seconds: float | None = None,
                     provenance: Mapping[str, str] | None = None) -> Path:  # fmt: skip
    """Write ``res`` atomically as a ``.npz`` (no pickles) plus a ``.sha256`` sidecar; returns the path.

    Every field of :class:`~flipfrag.flip.FlipResult` is stored: tensors as arrays, lists of strings (``status``)
    as string arrays, numbers and ``None`` in a JSON header; a free-form dict field (``extra``, if the class has
    one) and the :func:`cached_flip_points` attribute ``cache_info`` are not stored. ``provenance`` (strings such
    as the ``device``, ``dtype`` and ``worker`` an engine task ran with) is kept in the header, ``meta["provenance"]``.
    """
    if not isinstance(res, FlipResult):
        raise TypeError(f"res must be a FlipResult, got {type(res).__name__}")
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {"format": _FORMAT, "key": key, "seconds": seconds, "n": len(res), "scalars": {},
                            "none": [], "strings": []}  # fmt: skip
    if provenance is not None:
        meta["provenance"] = {str(k): str(v) for k, v in provenance.items()}
    for f in fields(FlipResult):
        value = getattr(res, f.name)
        if isinstance(value, dict):  # free-form diagnostics: not part of the cached result
            continue
        if isinstance(value, torch.Tensor):
            arrays[f.name] = value.detach().cpu().numpy()
        elif value is None:
            meta["none"].append(f.name)
        elif isinstance(value, (list, tuple)):
            arrays[f.name] = np.asarray([str(v) for v in value], dtype=np.str_)
            meta["strings"].append(f.name)
        elif isinstance(value, (int, float, bool, str)):
            meta["scalars"][f.name] = value
        else:
            raise TypeError(f"res.{f.name} of type {type(value).__name__} cannot be cached")
    arrays["meta"] = np.asarray(json.dumps(meta))

    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        tmp.write_bytes(buf.getvalue())

    return write_checksummed(path, write)


def load_flip_result(path: str | Path, *, key: str | None = None) -> tuple[FlipResult, dict[str, Any]]:
    """Read a file written by :func:`save_flip_result`; returns ``(result, meta)``.

    Raises :class:`FlipCacheError` naming the file if the checksum sidecar is missing or does not match, the
    archive does not load without pickles, its key differs from ``key``, or its arrays are inconsistent.
    """
    path = verify_checksummed(path, FlipCacheError, "flip cache")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as err:
        raise FlipCacheError(f"flip cache {path} could not be read: {err}") from err
    if meta.get("format") != _FORMAT:
        raise FlipCacheError(f"flip cache {path}: unknown format {meta.get('format')!r}")
    if key is not None and meta.get("key") != key:
        raise FlipCacheError(f"flip cache {path}: key {meta.get('key')} != requested {key}")
    n = meta.get("n")
    kwargs: dict[str, Any] = {}
    try:
        for f in fields(FlipResult):
            if f.name in meta["none"]:
                kwargs[f.name] = None
            elif f.name in meta["strings"]:
                kwargs[f.name] = [str(v) for v in arrays[f.name]]
            elif f.name in meta["scalars"]:
                kwargs[f.name] = meta["scalars"][f.name]
            elif f.name in arrays:
                if arrays[f.name].shape[:1] != (n,):
                    raise ValueError(f"field {f.name} has {arrays[f.name].shape[:1]} rows, expected {n}")
                kwargs[f.name] = torch.from_numpy(arrays[f.name])
            elif f.default is MISSING and f.default_factory is MISSING:
                raise ValueError(f"field {f.name} is missing")
        res = FlipResult(**kwargs)
    except Exception as err:  # a file of another FlipResult layout, or damaged arrays
        raise FlipCacheError(f"flip cache {path}: inconsistent content ({err})") from err
    return res, meta


def _values_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if not a.is_floating_point():
            return torch.equal(a, b)
        nan = a.isnan()  # equal with NaN where NaN (an unsolved point), infinities compared as they are
        return torch.equal(nan, b.isnan()) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _merge_field(name: str, values: list[Any], lengths: list[int]) -> Any:
    """One field of :func:`concat_flip_results`: per-point values concatenated, shared ones checked equal."""
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ValueError(f"parts disagree on {name}: None in some parts, set in others")
    first = values[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(v, torch.Tensor) for v in values):
            raise ValueError(f"parts disagree on {name}: a tensor in some parts only")
        if all(v.dim() >= 1 and v.shape[0] == n for v, n in zip(values, lengths)):  # one row per point
            if len({(v.dtype, tuple(v.shape[1:])) for v in values}) > 1:
                raise ValueError(f"parts disagree on {name}: dtypes / trailing shapes "
                                 f"{sorted({(str(v.dtype), tuple(v.shape[1:])) for v in values})}")  # fmt: skip
            return torch.cat(values, 0)
    elif isinstance(first, (list, tuple)):
        if all(isinstance(v, (list, tuple)) and len(v) == n for v, n in zip(values, lengths)):
            return type(first)(item for v in values for item in v)
    elif isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise ValueError(f"parts disagree on the keys of {name}")
        return {k: _merge_field(f"{name}[{k!r}]", [v[k] for v in values], lengths) for k in first}
    if not all(_values_equal(first, v) for v in values[1:]):  # shared by every point: must agree
        raise ValueError(f"parts disagree on {name} (a setting shared by all points), e.g. {first!r} and "
                         f"{next(v for v in values[1:] if not _values_equal(first, v))!r}")  # fmt: skip
    return first


def concat_flip_results(parts: Sequence[FlipResult]) -> FlipResult:
    """One :class:`~flipfrag.flip.FlipResult` of the points of ``parts``, in order (e.g. the shards of one solve).

    Every dataclass field is merged by what it holds, so fields added to ``FlipResult`` later merge too: tensors
    with one row per point (``x_flip``, ``distance``, ``distances``, ...) and per-point lists (``status``) are
    concatenated; ``None`` must be ``None`` in every part; settings shared by all points (``tol``, ``kkt_tol``,
    ``margin_param``, a tensor without one row per point) must be equal in every part and are kept; dicts are
    merged key by key with the same rules. A disagreement is a ``ValueError`` naming the field.
    """
    if isinstance(parts, FlipResult) or not isinstance(parts, Sequence) or len(parts) == 0:
        raise ValueError(f"parts must be a non-empty sequence of FlipResult, got {type(parts).__name__}")
    bad = [i for i, p in enumerate(parts) if not isinstance(p, FlipResult)]
    if bad:
        raise TypeError(f"parts[{bad[0]}] is a {type(parts[bad[0]]).__name__}, not a FlipResult")
    cls = type(parts[0])
    if any(type(p) is not cls for p in parts):
        raise TypeError(f"parts must all be of one class, got {sorted({type(p).__name__ for p in parts})}")
    lengths = [len(p) for p in parts]
    merged = {f.name: _merge_field(f.name, [getattr(p, f.name) for p in parts], lengths) for f in fields(cls)}
    out = cls(**{f.name: merged[f.name] for f in fields(cls) if f.init})
    for f in fields(cls):
        if not f.init:
            object.__setattr__(out, f.name, merged[f.name])
    return out


class FlipShardCache(TaskCache):
    """Flip-point shards as an engine cache: ``<folder>/<name>-<key>.npz`` (+ ``.sha256``) written by
    :func:`save_flip_result` (atomic, no pickles) and verified by :func:`load_flip_result` (checksum, key, layout).
    With ``refresh=True`` no entry counts as present (every shard is solved again and overwritten)."""

    def __init__(self, folder: str | Path, name: str, *, refresh: bool = False):
        super().__init__(folder)
        self.name = name
        self.refresh = bool(refresh)

    def path(self, key: str) -> Path:
        return self.folder / f"{self.name}-{key}.npz"

    def __contains__(self, key: str) -> bool:
        return not self.refresh and self.path(key).exists()

    def save(self, result: TaskResult) -> Path:
        prov = {"device": result.device, "dtype": result.dtype, "worker": result.worker}
        return save_flip_result(self.path(result.key), result.value, key=result.key, seconds=result.seconds,
                                provenance=prov)  # fmt: skip

    def load(self, key: str) -> TaskResult:
        try:
            res, meta = load_flip_result(self.path(key), key=key)
        except FlipCacheError as err:
            raise EngineCacheError(str(err)) from err
        prov = meta.get("provenance") or {}
        seconds = float(meta.get("seconds") or 0.0)
        return TaskResult(key=key, value=res, device=prov.get("device", "cpu"), dtype=prov.get("dtype", ""),
                          seconds=seconds, worker=prov.get("worker", ""), cached=True)  # fmt: skip


#: Solver arguments with one entry per point (sliced per shard when they are tensors of length N).
_PER_POINT_ARGS = ("target", "source", "candidates")
#: Solver arguments broadcastable to x (sliced per shard when they have x's rank and N rows, shared otherwise).
_PER_FEATURE_ARGS = ("lower", "upper", "scale", "mask")


def _shard_solver_kwargs(kw: Mapping[str, Any], x: torch.Tensor) -> Callable[[range], dict[str, Any]]:
    """Check the tensor arguments of ``kw`` against x (N rows) and return ``rows -> kwargs of that shard``."""
    N = x.shape[0]
    per_point = []
    for k, v in kw.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            continue
        if k in _PER_POINT_ARGS:
            if v.shape[0] != N:
                raise ValueError(f"{k} must have one entry per point of x ({N}), got shape {tuple(v.shape)}")
            per_point.append(k)
        elif k in _PER_FEATURE_ARGS:
            if v.dim() == x.dim() and v.shape[0] == N and N > 1:
                per_point.append(k)
            elif v.dim() == x.dim() and v.shape[0] != 1:
                raise ValueError(f"{k} must broadcast to x of shape {tuple(x.shape)}, got {tuple(v.shape)}")
        elif v.shape[0] == N and N > 1:
            raise ValueError(f"solver argument {k} is a tensor with one row per point, which cached_flip_points "
                             "does not know how to shard; pass shard_size >= len(x)")  # fmt: skip

    def of(rows: range) -> dict[str, Any]:
        if len(rows) == N:
            return dict(kw)
        # clone: a slice would pickle (to a worker) the whole storage of its base tensor
        return {k: (v[rows.start : rows.stop].clone() if k in per_point else v) for k, v in kw.items()}

    return of


def _model_kind(model: nn.Module) -> str:
    """The :data:`flipfrag.engine.SHARD_DEFAULTS` kind of a model: "cnn" with convolutions, else "mlp"."""
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "cnn" if convolutional else "mlp"


def _solve_flip_shard(model: nn.Module, x: torch.Tensor, **solver_kwargs: Any) -> FlipResult:
    """The engine task of one shard (module level, so that Dask workers import it by name)."""
    return closest_flip_point(model, x, **solver_kwargs)


def _without_dict_fields(res: FlipResult) -> FlipResult:
    empty = {f.name: {} for f in fields(res) if f.init and isinstance(getattr(res, f.name), dict)}
    return replace(res, **empty) if empty else res


def _flip_tasks(model: nn.Module, x: torch.Tensor, name: str, shard_size: int,
                solver_kwargs: Mapping[str, Any]) -> list[Task]:  # fmt: skip
    """One engine task per shard of x. Every task gets the same model object and the same shared arguments (a
    cluster receives each once); the per-point pieces are copies holding only their rows."""
    kwargs_of = _shard_solver_kwargs(solver_kwargs, x)
    pieces = _engine.shards(x.shape[0], shard_size)
    dtype = solver_kwargs.get("solve_dtype", torch.float64)
    tasks = []
    for rows in pieces:
        # clone: a slice would pickle (to a worker) the whole storage of its base tensor
        xs = x if len(pieces) == 1 else x[rows.start : rows.stop].clone()
        kw = kwargs_of(rows)
        tasks.append(Task(flip_cache_key(model, xs, **kw), _solve_flip_shard, (model, xs), kw,
                          name=f"{name}[{rows.start}:{rows.stop}]",
                          dtype=dtype if isinstance(dtype, torch.dtype) else None))  # fmt: skip
    return tasks


def cached_flip_points(
    model: nn.Module,
    x: torch.Tensor,
    *,
    name: str = "flips",
    cache: str | Path | None = None,
    refresh: bool = False,
    shard_size: int | None = None,
    scheduler: str | Any | None = None,
    device: str | None = None,
    progress: bool = False,
    **solver_kwargs: Any,
) -> FlipResult:
    """:func:`flipfrag.flip.closest_flip_point` ``(model, x, **solver_kwargs)``, solved in shards and cached on disk.

    ``x`` is cut into consecutive shards of ``shard_size`` points (default :func:`flipfrag.engine.shard_size` of
    the model's kind, "mlp" — at most 1024 points — or "cnn" — at most 64 — bounded by the free memory); each shard
    is one :mod:`flipfrag.engine` task, solved in this process by default, or where ``scheduler`` (else
    ``$FLIPFRAG_SCHEDULER``: ``"local:N"``, ``"tcp://host:port"``) says. Per-point solver arguments (``target``,
    ``source``, ``candidates``, and ``lower`` / ``upper`` / ``scale`` / ``mask`` with one row per point) are cut
    with ``x``; the others are shared. The serial path shards exactly like the distributed one, so both give
    identical results. One batch instead of shards would not: the solver's chunking changes the last bits (about
    1 ulp of ``x_flip`` on MNIST), and restarts (drawn per shard from ``seed``) and the homotopy's erf scales
    (shared by a batch) differ per shard, so a winning candidate may change (measured on the quick profile's 2,000
    Adult points in 2 shards: the same certified points and distance ranking, distances within 1.3e-5 relative).

    Each shard is stored, atomically and as soon as it is solved, in ``<cache>/<name>-<key>.npz`` (default cache
    folder: ``flipfrag._io.cache_dir("flips")``; format of :func:`save_flip_result`, checksummed). The key is
    :func:`flip_cache_key` of the shard — model weights, the shard's inputs, every solver setting and the solver's
    source — so notebooks asking for the same flip points share the solves, a changed model, input or solver never
    reads a stale file, and an interrupted run resumes from the shards it has. A corrupt shard is reported with a
    warning and solved again; ``refresh=True`` solves every shard again. ``device`` (default None:
    ``$FLIPFRAG_DEVICE``, else "cpu", so that cached numbers do not depend on the machine's GPU; "auto" = the GPU a
    worker sees) is where each shard computes.

    When the free memory makes the default shard smaller than the kind's maximum, a warning says so (the shards'
    keys and the last bits depend on the shard size; pass ``shard_size=`` to pin it).

    The result (:func:`concat_flip_results` of the shards, in the order of ``x``; free-form dict fields, which the
    cache does not store, are left empty so that fresh and cached shards agree) gets an attribute ``cache_info``:
    ``cached`` (True when every shard came from the cache), ``seconds`` (total solve time of the shards when they
    were computed), ``path`` (the file when there is one shard, else None), ``paths`` (one per shard), ``n_shards``,
    ``n_cached``, ``shard_size``, ``devices`` and ``dtypes`` (the distinct ones the shards were computed with).
    """
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise ValueError(f"name must be a non-empty string without '/', '\\\\' or spaces, got {name!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch of shape (N, *shape), got {getattr(x, 'shape', type(x))}")
    device = _engine.default_device(device)
    if shard_size is None:
        kind = _model_kind(model)
        shard_size = _engine.shard_size(kind, device)
        if shard_size < min(x.shape[0], _engine.SHARD_DEFAULTS[kind][0]):
            warnings.warn(f"cached_flip_points({name!r}): the free memory limits shards to {shard_size} points "
                          f"(default {_engine.SHARD_DEFAULTS[kind][0]}); the shards' cache keys and the flip points' "
                          "last bits depend on the shard size: pass shard_size= to fix it", stacklevel=2)  # fmt: skip
    elif isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be None or an integer >= 1, got {shard_size!r}")
    if scheduler is None or isinstance(scheduler, str):
        _engine.parse_scheduler(scheduler)  # a bad setting fails now, even when every shard is cached
    tasks = _flip_tasks(model, x.detach(), name, shard_size, solver_kwargs)
    store = FlipShardCache(Path(cache) if cache is not None else cache_dir("flips"), name, refresh=refresh)
    try:
        results = run_tasks(tasks, store, scheduler=scheduler, device=device, progress=progress,
                            desc=f"flip points {name}", code=_solver_fingerprint())  # fmt: skip
    except TaskError as err:  # bad solver arguments keep their type (ValueError / TypeError naming the argument)
        cause = err.__cause__
        if type(cause) in (ValueError, TypeError):
            raise type(cause)(str(err)) from err
        raise
    # free-form dict fields are not stored in the cache: drop them from fresh shards too, so that a result is the
    # same whether its shards were solved now, earlier, or some of each
    values = [_without_dict_fields(r.value) for r in results]
    res = concat_flip_results(values)
    paths = [str(store.path(t.key)) for t in tasks]
    res.cache_info = {
        "cached": all(r.cached for r in results),
        "seconds": float(sum(r.seconds for r in results)),
        "path": paths[0] if len(paths) == 1 else None,
        "paths": paths,
        "n_shards": len(tasks),
        "n_cached": sum(r.cached for r in results),
        "shard_size": shard_size,
        "devices": sorted({r.device for r in results}),
        "dtypes": sorted({r.dtype for r in results}),
    }
    return res


def flip_settings(profile: Mapping[str, Any], data: Any = None, *, images: bool | None = None,
                  restricted: bool = False, **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """The solver settings every flip-point notebook uses for a dataset (so that they share cached solves).

    ``lower``/``upper`` from the dataset (feature box, model units), ``tol = profile["flip_tol"]``,
    ``max_iter = profile["flip_max_iter"]``, and for tabular data the homotopy candidate plus
    ``profile["flip_restarts"]`` random restarts; for images (``images`` True, default: ``data`` has no
    ``feature_names``) only the direct solve, since each extra candidate costs a full 784-dimensional solve per
    target class (``09_homotopy`` measures what the extra candidates change), and ``max_ineq=2``.
    ``restricted=True`` (problems where most features are fixed by a mask: one attribute free, top-k pixels)
    drops the homotopy candidate: measured on Adult it found no additional flip point there at 5-10x the cost.
    ``overrides`` replace any entry.
    """
    s: dict[str, Any] = {"tol": float(profile["flip_tol"]), "max_iter": int(profile["flip_max_iter"])}
    if data is not None:
        if getattr(data, "lower", None) is not None:
            s["lower"] = data.lower.double()
        if getattr(data, "upper", None) is not None:
            s["upper"] = data.upper.double()
        if images is None:
            images = not getattr(data, "feature_names", None)
    if images:
        # linearise only the 2 most nearly active other classes per SQP step (every class is still certified):
        # measured on MNIST-5k, the same flip points at half the cost of the default 8
        s["max_ineq"] = 2
    else:
        s.update(homotopy=not restricted, restarts=int(profile["flip_restarts"]))
    s.update(overrides)
    return s


def trained_variant(key: str, activation: str, profile: Mapping[str, Any] | str = "quick", *, seed: int = 0,
                    data: Any = None, progress: bool = False) -> tuple[nn.Module, Any, dict[str, Any]]:  # fmt: skip
    """A model of the zoo (:data:`flipfrag.models.ZOO`, e.g. ``"adult-erf"``) with another hidden activation.

    Same data, widths, epochs, optimiser and seed as the zoo entry, only ``activation`` ("erf", "tanh",
    "softplus", "relu") differs; trained once and cached like the zoo models. ``"erf"`` returns the zoo model
    itself. Returns ``(model, dataset, meta)`` as :func:`flipfrag.models.trained_model`.
    """
    from .datasets import load_dataset
    from .models import MLP, ZOO, evaluate, train_cached, trained_model
    from .profiles import get_profile

    if key not in ZOO or ZOO[key]["arch"] != "mlp":
        raise ValueError(f"key must be an MLP entry of the zoo, got {key!r}")
    prof = get_profile(profile) if isinstance(profile, str) else profile
    spec = ZOO[key]
    if activation == spec["activation"]:
        return trained_model(key, prof, seed=seed, data=data, progress=progress)
    data = data if data is not None else load_dataset(spec["dataset"], prof, seed=seed)
    dtype = getattr(torch, spec["dtype"])
    d = int(np.prod(data.input_shape))
    epochs = int(prof[spec["epochs"]] * spec.get("epoch_scale", 1))
    model, meta = train_cached(
        lambda: MLP(d, prof[spec["hidden"]], data.n_classes, activation=activation), data.X_train.to(dtype),
        data.y_train, name=f"{spec['dataset']}-{activation}", seed=seed, dtype=dtype, progress=progress,
        epochs=epochs, lr=spec["lr"], batch_size=spec["batch_size"],
    )  # fmt: skip
    meta.update(train_acc=evaluate(model, data.X_train.to(dtype), data.y_train),
                test_acc=evaluate(model, data.X_test.to(dtype), data.y_test), epochs=epochs)  # fmt: skip
    return model, data, meta


@dataclass
class FlipSet:
    """The flip points of a subset of a dataset under one model, as the notebooks share them.

    Attributes: ``model``, ``data`` (:class:`flipfrag.datasets.Dataset`), ``meta`` (training metadata),
    ``split`` ("train" or "test"), ``index`` (LongTensor, rows of that split), ``x`` (float64 inputs), ``y``
    (labels), ``res`` (:class:`~flipfrag.flip.FlipResult`, source = predicted class, target = closest other class),
    ``settings`` (the solver settings).
    """

    model: nn.Module
    data: Any
    meta: dict[str, Any]
    split: str
    index: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    res: FlipResult
    settings: dict[str, Any]

    @property
    def directions(self) -> np.ndarray:
        """``x_flip - x`` flattened (N, n_features); NaN rows where uncertified."""
        return flip_directions(self.res, self.x)


def standard_flips(key: str, profile: Mapping[str, Any] | str = "quick", *, split: str = "test", seed: int = 0,
                   n: int | None = None, activation: str | None = None, data: Any = None,
                   progress: bool = False, **overrides: Any) -> FlipSet:  # fmt: skip
    """Closest flip points of a stratified subset of a zoo model's data — computed once, cached, shared.

    The subset is ``flipfrag.datasets.stratified_subset(y, n, seed)`` of the split (``n`` defaults to the profile's
    ``flip_n_points``; all points if the split is smaller); the solver settings are :func:`flip_settings`
    (plus ``overrides``); the solve goes through :func:`cached_flip_points`, so every notebook asking for the same
    (model, subset, settings) reads the same file.
    """
    from .datasets import stratified_subset
    from .profiles import get_profile

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prof = get_profile(profile) if isinstance(profile, str) else profile
    act = activation or key.split("-")[-1]
    model, data, meta = trained_variant(key, act, prof, seed=seed, data=data, progress=progress)
    X, y = (data.X_train, data.y_train) if split == "train" else (data.X_test, data.y_test)
    n = prof["flip_n_points"] if n is None else n
    index = stratified_subset(y, n, seed + (11 if split == "train" else 0))
    x = X[index].double()
    settings = flip_settings(prof, data, **overrides)
    name = f"{key.split('-')[0]}-{act}-{split}"
    res = cached_flip_points(model, x, name=name, progress=progress, **settings)
    return FlipSet(model, data, meta, split, index, x, y[index], res, settings)


# ============================================================================================== confidence


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
    from .models import predict

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


# ============================================================================================== directions


def flip_directions(res: FlipResult, x: torch.Tensor) -> np.ndarray:
    """Flip directions ``x_flip - x`` flattened, shape (N, n_features), float64; NaN rows where uncertified."""
    if len(res) != x.shape[0]:
        raise ValueError(f"res and x must have the same length, got {len(res)} and {x.shape[0]}")
    if tuple(res.x_flip.shape) != tuple(x.shape):
        raise ValueError(f"res.x_flip has shape {tuple(res.x_flip.shape)} but x has {tuple(x.shape)}")
    return (res.x_flip.double() - x.double()).flatten(1).numpy()


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


# ============================================================================================== bias


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
    from .models import predict

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


# ============================================================================================== adversarial


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


# ============================================================================================== training points


_SELECTIONS = ("closest", "random", "farthest")


def select_training_subset(distance: Any, y: Any, fraction: float, how: str, *, seed: int = 0,
                           stratify: bool = True) -> np.ndarray:  # fmt: skip
    """Indices of ``fraction`` of the training points chosen by their distance to their closest flip point.

    Parameters
    ----------
    distance : array-like (N,)
        Distance of each training point to its closest flip point; NaN (uncertified) points are never selected.
    y : array-like (N,)
        Labels.
    fraction : float in (0, 1]
        Fraction of the *certified* points to keep (per class when ``stratify``).
    how : {"closest", "random", "farthest"}
        Smallest distances, a uniform random subset (seeded), or largest distances.
    stratify : bool
        Select within each class, keeping the class balance of the certified pool (default True, so the
        comparison is about closeness, not class balance). Each class keeps at least one point.

    Returns
    -------
    Sorted int64 array of indices into the training set.
    """
    d = _as_numpy(distance, "distance", ndim=1)
    yy = _as_numpy(y, "y", ndim=1, dtype=np.int64)
    if d.shape != yy.shape:
        raise ValueError(f"distance and y must have the same length, got {d.shape} and {yy.shape}")
    if how not in _SELECTIONS:
        raise ValueError(f"how must be one of {_SELECTIONS}, got {how!r}")
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    pool = np.nonzero(np.isfinite(d))[0]
    if pool.size == 0:
        raise ValueError("distance has no finite entry (no certified flip point)")
    rng = np.random.default_rng(seed)
    strata = [pool[yy[pool] == c] for c in np.unique(yy[pool])] if stratify else [pool]
    picked = []
    for idx in strata:
        k = max(1, int(round(fraction * idx.size)))
        if how == "random":
            picked.append(rng.choice(idx, size=k, replace=False))
        else:
            srt = idx[np.argsort(d[idx], kind="mergesort")]  # stable: ties keep index order
            picked.append(srt[:k] if how == "closest" else srt[::-1][:k])
    return np.sort(np.concatenate(picked))


def retraining_experiment(
    fit: Callable[[torch.Tensor, torch.Tensor, int], Callable[[torch.Tensor], torch.Tensor]],
    X: torch.Tensor,
    y: torch.Tensor,
    distance: Any,
    X_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    fractions: Sequence[float],
    repeats: int = 1,
    reference: torch.Tensor | None = None,
    selections: Sequence[str] = _SELECTIONS,
    stratify: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """E5: retrain on the closest / random / farthest fraction of the training set; compare with the full model.

    Our operationalisation of "the distance to the closest flip point identifies the most influential training
    points": if the points nearest the decision boundary are the influential ones, a model trained only on them
    should reproduce the full model (test accuracy, and agreement of its test predictions with the full model's)
    better than one trained on as many random points, and much better than one trained on the farthest points.

    Parameters
    ----------
    fit : callable ``fit(X_sub, y_sub, seed) -> predict``
        Trains a model and returns a function mapping inputs (M, ...) to predicted labels (M,). Use the same
        trainer for the reference model (e.g. :func:`mlp_trainer`).
    X, y : training set (N, ...), (N,); distance : (N,) distances of the training points to their flip points.
    X_test, y_test : test set.
    fractions : fractions of the certified training points to keep, each in (0, 1].
    repeats : training seeds per (selection, fraction); random subsets are also redrawn per repeat.
    reference : LongTensor (M,), optional
        The full model's test predictions; default: ``fit(X, y, seed)`` on the whole training set.
    stratify : passed to :func:`select_training_subset`.

    Returns
    -------
    DataFrame with one row per (selection, fraction, repeat): ``selection``, ``fraction``, ``repeat``, ``n_train``,
    ``test_acc``, ``agreement`` (fraction of test inputs predicted as the reference predicts), ``mean_distance``
    of the selected points. At fraction 1 all selections are the same set and are trained once per repeat.
    """
    if not callable(fit):
        raise TypeError("fit must be callable: fit(X_sub, y_sub, seed) -> predict function")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for s in selections:
        if s not in _SELECTIONS:
            raise ValueError(f"selections must be among {_SELECTIONS}, got {s!r}")
    d = _as_numpy(distance, "distance", ndim=1)
    if d.shape[0] != X.shape[0] or y.shape[0] != X.shape[0]:
        raise ValueError(f"X, y and distance must have the same length, got {X.shape[0]}, {y.shape[0]}, {d.shape[0]}")
    if reference is None:
        reference = fit(X, y, seed)(X_test)
    reference = torch.as_tensor(reference).long()
    jobs = []
    for frac in fractions:
        for r in range(repeats):
            for s in selections if frac < 1 else ("all",):
                jobs.append((s, float(frac), r))
    done: dict[tuple, dict] = {}
    rows = []
    for s, frac, r in tqdm(jobs, desc="retraining", disable=not progress, leave=False):
        if (s, frac, r) not in done:
            idx = select_training_subset(d, y, frac, "random" if s == "all" else s, seed=seed + 1000 * r,
                                         stratify=stratify)  # fmt: skip
            pred = torch.as_tensor(fit(X[idx], y[idx], seed + r)(X_test)).long()
            done[(s, frac, r)] = {"n_train": int(idx.size), "test_acc": float((pred == y_test).float().mean()),
                                  "agreement": float((pred == reference).float().mean()),
                                  "mean_distance": float(np.mean(d[idx]))}  # fmt: skip
        for sel in selections if s == "all" else (s,):
            rows.append({"selection": sel, "fraction": frac, "repeat": r, **done[(s, frac, r)]})
    return pd.DataFrame(rows)


class TrainedPredictor:
    """What :func:`mlp_trainer`'s ``fit`` returns: call it on inputs (M, ...) for labels (M,); ``.model`` is the net."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        from .models import predict

        return predict(self.model, X.to(self.dtype)).argmax(1)


def mlp_trainer(in_features: int, n_classes: int, hidden: Sequence[int], *, activation: str = "erf",
                steps: int = 500, lr: float = 1e-3, batch_size: int = 64,
                dtype: torch.dtype = torch.float64) -> Callable[[torch.Tensor, torch.Tensor, int], TrainedPredictor]:
    """A ``fit(X, y, seed) -> predictor`` function for :func:`retraining_experiment`: an :class:`~flipfrag.models.MLP`
    trained with Adam for about ``steps`` gradient steps whatever the subset size.

    A fixed step budget (not a fixed number of epochs) keeps small subsets from being under-trained: epochs =
    ``ceil(steps * batch_size / n)``, with the batch capped at ``n``. The predictor's ``.model`` is the trained net
    (e.g. to compute the reference model's flip points).
    """
    from .models import MLP, train

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")

    def fit(X: torch.Tensor, y: torch.Tensor, seed: int) -> TrainedPredictor:
        torch.manual_seed(seed)  # the initial weights (train() seeds the batch order itself)
        model = MLP(in_features, hidden, n_classes, activation=activation).to(dtype)
        n = X.shape[0]
        bs = min(batch_size, n)
        epochs = max(1, math.ceil(steps * bs / n))
        train(model, X.to(dtype), y, epochs=epochs, lr=lr, batch_size=bs, seed=seed, progress=False)
        return TrainedPredictor(model, dtype)

    return fit


# ============================================================================================== PCA / RR-QR


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


# ============================================================================================== model-agnostic


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
