"""The flip-point cache: :func:`cached_flip_points` solves :func:`flipfrag.flip.closest_flip_point` in shards, as
:mod:`flipfrag.engine` tasks whose results are stored content-addressed on disk (key: :func:`flip_cache_key`).
Every flip-point solve of the notebooks, the engine and :mod:`flipfrag.beyond` goes through it."""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import engine as _engine
from .. import flip as _flip
from .. import smooth as _smooth
from .._io import cache_dir, sha256_files, verify_checksummed, write_checksummed
from ..engine import EngineCacheError, Task, TaskCache, TaskError, TaskResult, run_tasks, task_key
from ..flip import FlipOptions, FlipResult, closest_flip_point


class FlipCacheError(RuntimeError):
    """A cached flip-point file is corrupt, truncated, or belongs to another key."""


_FORMAT = 1


def _solver_fingerprint() -> str:
    """sha256 of the solver's source (the files of the ``flip`` package and the smoothing it uses, ``smooth.py``):
    cached flip points are invalidated whenever one of them changes."""
    solver = sorted(Path(_flip.__file__).parent.glob("*.py"))
    return sha256_files([*solver, _smooth.__file__])[:16]


_PROBLEM_ARGS = ("target", "source", "lower", "upper", "scale", "mask", "groups", "candidates")


def solver_arguments(options: FlipOptions | None = None, **solver_kwargs: Any) -> dict[str, Any]:
    """The keyword arguments of one :func:`~flipfrag.flip.closest_flip_point` call in one flat form: the problem's
    (``target``, bounds, ``scale``, ``mask``, ``groups``, ``candidates``) as given, and the solver's settings — the
    fields of ``options`` with the other keywords as overrides, validated (:class:`~flipfrag.flip.FlipOptions`) — as
    the fields that differ from the defaults. Equal settings give equal dicts however they were written."""
    if options is not None and not isinstance(options, FlipOptions):
        raise TypeError(f"options must be a FlipOptions or None, got {type(options).__name__}")
    problem = {k: v for k, v in solver_kwargs.items() if k in _PROBLEM_ARGS}
    opts = (options or FlipOptions()).replace(**{k: v for k, v in solver_kwargs.items() if k not in _PROBLEM_ARGS})
    return {**problem, **opts.changed()}


def flip_cache_key(model: nn.Module, x: torch.Tensor, options: FlipOptions | None = None,
                   **solver_kwargs: Any) -> str:  # fmt: skip
    """A 16-hex key (:func:`flipfrag.engine.task_key`, the engine's canonical form) for (model weights + config,
    inputs, solver arguments, solver source).

    The solver arguments are those of :func:`solver_arguments` (``options`` and keywords, so that equal settings
    share a key however they were passed); tensors among them (bounds, masks, targets) are hashed by content;
    ``progress`` is ignored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    kw = {k: v for k, v in solver_arguments(options, **solver_kwargs).items() if k != "progress"}
    # the model by its weights and config, not its class: a wrapper or subclass computing the same scores with the
    # same weights shares the solves (an interrupted run resumes with it)
    state = dict(model.state_dict())
    config = getattr(model, "config", type(model).__name__)
    return task_key("flip points", state or type(model).__name__, config, x, kw, _solver_fingerprint(), length=16)


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


_PER_POINT_ARGS = ("target", "source", "candidates")


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
    solver_kwargs = solver_arguments(**solver_kwargs)
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
    options: FlipOptions | None = None,
    **solver_kwargs: Any,
) -> FlipResult:
    """:func:`flipfrag.flip.closest_flip_point` ``(model, x, options=options, **solver_kwargs)``, solved in shards and
    cached on disk (the one place flip-point solves are cached: notebooks, :mod:`flipfrag.beyond` and the engine's
    shards all come through here).

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
    tasks = _flip_tasks(model, x.detach(), name, shard_size, solver_arguments(options, **solver_kwargs))
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
