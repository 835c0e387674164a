"""Where the heavy work runs: independent tasks, a content-addressed cache, and one scheduler setting.

The attack grid's cells (:func:`flipfrag.fragility.run_attack_grid`) and the flip-point solves over a dataset
(:func:`flipfrag.flippoints.cached_flip_points`, one task per shard) are many independent pieces of work. This module
runs such pieces — :class:`Task` ``(key, fn, args, kwargs)`` — in process or on a Dask cluster, and stores every
result in a checksummed cache entry named by its key, written atomically as soon as the task finishes. A run that
is interrupted (or loses a worker) resumes from what is cached; a second run recomputes nothing::

    from flipfrag.engine import Task, run_tasks, task_key

    tasks = [Task(task_key("my-cell", model, x[s], settings), my_cell, (model, x[s]), {"eps": 8 / 255})
             for s in shards]
    results = run_tasks(tasks, scheduler="local:2")        # list of TaskResult, in task order
    values = [r.value for r in results]                    # what my_cell returned (tensors moved to the CPU)

Where it runs: one setting
--------------------------
``scheduler=`` (argument) or else the environment variable ``FLIPFRAG_SCHEDULER`` (papermill parameter
``scheduler``, ``make figures SCHEDULER=...``):

* unset, ``""`` or ``"serial"`` — in this process, one task after another. Dask is not even imported (CI and the
  quick profile need nothing new).
* ``"local:N"`` — a ``distributed.LocalCluster`` of N worker processes on this machine (one thread each; torch in
  each worker uses ``FLIPFRAG_THREADS`` of the parent, or ``cpu_count // N`` threads). Started on first use and
  reused by later calls in the same process; :func:`close_clusters` stops it (it also stops at exit).
* ``"tcp://host:port"`` — an existing Dask scheduler. If nothing answers at that address within
  ``FLIPFRAG_SCHEDULER_TIMEOUT`` seconds (default 5) a :class:`SchedulerError` names the address; it never hangs.
* a ``distributed.Client`` object (Python only) — used as is.

Workers must import the same flipfrag source as the client: every task checks a fingerprint of the package's
source and fails with a clear error on a worker that runs other code (cache keys are computed on the client, so
results of other code would be stored under the wrong key).

Cluster recipes (run these in a shell on the cluster; then point flipfrag at the printed address):

*SLURM with dask-jobqueue* (``pip install dask-jobqueue``; one job = one worker with one GPU)::

    # start_cluster.py — run it on the login node and keep it running (e.g. in tmux)
    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(queue="gpu", cores=4, processes=1, memory="32GB", walltime="12:00:00",
                           job_extra_directives=["--gres=gpu:1"], scheduler_options={"port": 8786},
                           job_script_prologue=["source /path/to/flipfrag/.venv/bin/activate"])
    cluster.scale(jobs=8)              # 8 GPUs; cluster.adapt(minimum_jobs=1, maximum_jobs=8) also works
    print(cluster.scheduler_address)   # e.g. tcp://10.1.2.3:8786
    input("cluster running; press Enter to stop")

    make figures PROFILE=paper SCHEDULER=tcp://10.1.2.3:8786

*One machine with several GPUs, with dask-cuda* (``pip install dask-cuda``; one worker per GPU, each worker sees
only its own GPU through ``CUDA_VISIBLE_DEVICES``, so tasks use ``cuda``)::

    dask scheduler --port 8786 &                # or in Python: LocalCUDACluster(scheduler_port=8786)
    dask cuda worker tcp://127.0.0.1:8786 &     # starts one worker per visible GPU
    make figures PROFILE=paper SCHEDULER=tcp://127.0.0.1:8786

The cache folder (``FLIPFRAG_CACHE``) lives on the client's machine: workers send results back, the client writes
them, so workers need no shared file system (they need the data and the same flipfrag install).

Devices and dtypes
------------------
``device="auto"`` (default): each task runs on ``cuda`` when the process running it sees a GPU, else on the CPU.
The engine moves the tensors and ``nn.Module`` objects among the task's arguments to that device before the call
(modules are copied, never moved in place) and every tensor of the result back to the CPU afterwards, so task
functions just compute on the device of their inputs. Each :class:`TaskResult` records ``device`` and ``dtype`` (the
task's stated compute dtype, or by default that of the first module's parameters / first floating tensor among the
arguments). ``device="cpu"`` forces the CPU (bit-for-bit the in-process behaviour on any machine).

The experiment drivers (the attack grid, the flip-point shards) default to :func:`default_device`: the environment
variable ``FLIPFRAG_DEVICE`` (``make figures DEVICE=auto``, ``--device`` of the runner) or else ``"cpu"``, so that
the quick profile's cached numbers never depend on whether the machine has a GPU, while a cluster of GPU workers is
one setting away (``DEVICE=auto``: each task on the GPU its worker sees).

Shard sizes
-----------
:func:`shard_size` gives the default number of items (images, points) per task for a model kind, bounded by half
of the free memory of the device (see :data:`SHARD_DEFAULTS`); :func:`shards` cuts ``range(n)`` into such pieces.
A task should take seconds to minutes: small enough to lose little when a worker dies, large enough that batching
pays.

The cache
---------
``<cache>/<key>.pkl`` plus ``<key>.pkl.sha256`` (:func:`flipfrag._io.write_checksummed`): a pickle of the result
and its provenance, verified before it is read; a corrupt, truncated or foreign entry is reported with a warning
and recomputed. The cache folder holds pickles: treat it like any local cache you wrote yourself (do not load
cache folders from untrusted sources).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._io import cache_dir, sha256_files, tensor_hash, verify_checksummed, write_checksummed

__all__ = [
    "DEVICE_ENV",
    "SCHEDULER_ENV",
    "SHARD_DEFAULTS",
    "SchedulerError",
    "TaskError",
    "EngineCacheError",
    "Task",
    "TaskResult",
    "TaskCache",
    "parse_scheduler",
    "check_scheduler",
    "get_client",
    "close_clusters",
    "task_key",
    "default_device",
    "task_device",
    "shard_size",
    "shards",
    "run_tasks",
]

SCHEDULER_ENV = "FLIPFRAG_SCHEDULER"
_TIMEOUT_ENV = "FLIPFRAG_SCHEDULER_TIMEOUT"
_FORMAT = 1
_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class SchedulerError(RuntimeError):
    """The scheduler setting is invalid, or the cluster cannot be reached / runs other code."""


class TaskError(RuntimeError):
    """A task raised (or its worker died too often); the message names the task. Finished tasks stay cached."""


class EngineCacheError(RuntimeError):
    """A cache entry is missing its checksum, corrupt, truncated, or stored under another key."""


# ------------------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class Task:
    """One independent piece of work: ``fn(*args, **kwargs)``, cached under ``key``.

    ``fn`` must be importable by name on a worker (a module-level function, not a lambda or a notebook-local
    function, when a cluster is used) and return a picklable value. ``key`` must determine the result: build it
    with :func:`task_key` from everything the result depends on (weights, inputs, settings, code version).
    ``name`` labels the task in errors and on the dashboard; ``dtype`` states the compute dtype to record when it
    is not the arguments' own (e.g. a float64 solve on a float32 model).
    """

    key: str
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    dtype: torch.dtype | None = None

    def __post_init__(self):
        if not isinstance(self.key, str) or not _KEY_RE.fullmatch(self.key):
            raise ValueError(f"Task.key must be 1-200 characters of [A-Za-z0-9._-] not starting with '.', '_' or "
                             f"'-' (a file name), got {self.key!r}")  # fmt: skip
        if not callable(self.fn):
            raise TypeError(f"Task.fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.args, tuple):
            raise TypeError(f"Task.args must be a tuple, got {type(self.args).__name__}")
        if not isinstance(self.kwargs, Mapping):
            raise TypeError(f"Task.kwargs must be a mapping, got {type(self.kwargs).__name__}")
        if self.dtype is not None and not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"Task.dtype must be a torch.dtype or None, got {self.dtype!r}")

    @property
    def label(self) -> str:
        return self.name or f"{getattr(self.fn, '__qualname__', 'task')}[{self.key}]"


@dataclass
class TaskResult:
    """A task's value and where it came from.

    ``value`` is what ``fn`` returned (tensors on the CPU); ``device`` ("cpu", "cuda:0") and ``dtype``
    ("torch.float32") are those it was computed with; ``seconds`` its run time; ``worker`` "host:pid" of the
    process that ran it; ``cached`` True when this call read it from the cache instead of computing it.
    """

    key: str
    value: Any
    device: str
    dtype: str
    seconds: float
    worker: str
    cached: bool = False
    name: str = ""


# ------------------------------------------------------------------------------------------------ keys


def _canonical(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return {"float": repr(obj)}  # exact: 8/255 and its rounded print never collide
    if isinstance(obj, torch.Tensor):
        return {"tensor": tensor_hash(obj)}
    if isinstance(obj, np.ndarray):
        return {"tensor": tensor_hash(torch.from_numpy(np.ascontiguousarray(obj)))}
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
        return {"module": f"{type(obj).__module__}.{type(obj).__qualname__}",
                "config": _canonical(getattr(obj, "config", None)),
                "state": [[k, tensor_hash(v)] for k, v in sorted(state.items())]}  # fmt: skip
    if isinstance(obj, (torch.dtype, torch.device)):
        return {type(obj).__name__: str(obj)}
    if isinstance(obj, Mapping):
        return {"dict": [[str(k), _canonical(v)] for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))]}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, range):
        return {"range": [obj.start, obj.stop, obj.step]}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # e.g. a grid specification
        return {"dataclass": f"{type(obj).__module__}.{type(obj).__qualname__}",
                "fields": [[f.name, _canonical(getattr(obj, f.name))] for f in dataclasses.fields(obj)]}  # fmt: skip
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj):
        return {"callable": f"{obj.__module__}.{obj.__qualname__}"}
    raise TypeError(f"task_key: cannot fingerprint a {type(obj).__name__}; pass tensors, modules, numbers, "
                    "strings, lists or dicts of them")  # fmt: skip


def task_key(*parts: Any, length: int = 24) -> str:
    """A hex key (``length`` digits of a sha256) for everything a result depends on.

    Tensors and arrays are hashed by dtype, shape and bytes, modules by class, ``config`` and every state-dict
    entry, floats exactly (``repr``), dicts independently of their order, dataclass instances (a settings object)
    by class and fields, functions by qualified name. An
    unsupported object is a ``TypeError`` (never a silent ``str()``). Put a literal tag first (``"grid-cell"``)
    so that different kinds of task never share a key.
    """
    if not isinstance(length, int) or not 8 <= length <= 64:
        raise ValueError(f"length must be an integer in [8, 64], got {length!r}")
    text = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# ------------------------------------------------------------------------------------------------ cache


class TaskCache:
    """A folder of checksummed task results, ``<folder>/<key>.pkl`` (default ``cache_dir("tasks")``)."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else cache_dir("tasks")

    def __repr__(self) -> str:
        return f"TaskCache({str(self.folder)!r})"

    def path(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"key must be a file-name-safe task key, got {key!r}")
        return self.folder / f"{key}.pkl"

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def save(self, result: TaskResult) -> Path:
        """Write ``result`` atomically (temporary file + rename) with its ``.sha256`` sidecar."""
        entry = {"format": _FORMAT, **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)}}
        entry.pop("cached")
        data = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
        return write_checksummed(self.path(result.key), lambda tmp: tmp.write_bytes(data))

    def load(self, key: str) -> TaskResult:
        """Read and verify the entry of ``key``; raise :class:`EngineCacheError` naming the file otherwise."""
        path = verify_checksummed(self.path(key), EngineCacheError, "task cache")
        try:
            entry = pickle.loads(path.read_bytes())
        except Exception as err:  # a checksummed file that does not unpickle: another flipfrag's classes
            raise EngineCacheError(f"task cache {path} could not be read: {err}") from err
        if not isinstance(entry, dict) or entry.get("format") != _FORMAT:
            raise EngineCacheError(f"task cache {path}: unknown format")
        if entry.get("key") != key:
            raise EngineCacheError(f"task cache {path}: key {entry.get('key')!r} != requested {key!r}")
        entry.pop("format")
        try:
            return TaskResult(**entry, cached=True)
        except TypeError as err:
            raise EngineCacheError(f"task cache {path}: inconsistent content ({err})") from err


def _as_cache(cache: bool | str | os.PathLike | TaskCache | None) -> TaskCache | None:
    if isinstance(cache, TaskCache):
        return cache
    if cache is True:
        return TaskCache()
    if cache is False or cache is None:
        return None
    if isinstance(cache, (str, os.PathLike)):
        return TaskCache(cache)
    raise TypeError(f"cache must be True, False, a folder or a TaskCache, got {type(cache).__name__}")


# ------------------------------------------------------------------------------------------------ scheduler


def parse_scheduler(scheduler: str | None = None) -> str:
    """The normalised scheduler setting: ``"serial"``, ``"local:N"`` or ``"tcp://host:port"``.

    ``scheduler=None`` reads ``$FLIPFRAG_SCHEDULER`` (unset or empty: ``"serial"``). Anything else is a
    ``ValueError`` naming where the value came from and the accepted forms.
    """
    source = "scheduler"
    if scheduler is None:
        scheduler, source = os.environ.get(SCHEDULER_ENV, ""), f"${SCHEDULER_ENV}"
    if not isinstance(scheduler, str):
        raise TypeError(f"{source} must be a string, got {type(scheduler).__name__}")
    s = scheduler.strip()
    if s in ("", "serial"):
        return "serial"
    if m := re.fullmatch(r"local:(\d+)", s):
        if int(m.group(1)) < 1:
            raise ValueError(f"{source}={scheduler!r}: local:N needs N >= 1 workers")
        return f"local:{int(m.group(1))}"
    if m := re.fullmatch(r"tcp://([^:/\s]+|\[[0-9a-fA-F:]+\]):(\d{1,5})/?", s):
        if not 0 < int(m.group(2)) < 65536:
            raise ValueError(f"{source}={scheduler!r}: port must be in 1..65535")
        return f"tcp://{m.group(1)}:{int(m.group(2))}"
    raise ValueError(f"{source}={scheduler!r} is not a scheduler: use 'serial' (or unset), 'local:N' (N worker "
                     "processes on this machine) or 'tcp://host:port' (an existing Dask scheduler)")  # fmt: skip


_CLIENTS: dict[str, Any] = {}
_CLUSTERS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _timeout() -> float:
    raw = os.environ.get(_TIMEOUT_ENV, "5")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"${_TIMEOUT_ENV} must be > 0, got {raw!r}")
    return value


def _probe(address: str, timeout: float) -> None:
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise SchedulerError(
            f"cannot reach the Dask scheduler at {address} ({err}); start it first (see the flipfrag.engine "
            f"docstring and the README), fix the address, or unset {SCHEDULER_ENV} to run in process"
        ) from None


def check_scheduler(scheduler: str | None = None) -> str:
    """:func:`parse_scheduler`, and for a ``tcp://`` address a connection attempt (at most
    ``FLIPFRAG_SCHEDULER_TIMEOUT`` seconds): a :class:`SchedulerError` naming the address now rather than hours into
    a run. Imports nothing from Dask."""
    setting = parse_scheduler(scheduler)
    if setting.startswith("tcp://"):
        _probe(setting, _timeout())
    return setting


def get_client(scheduler: str | Any | None = None):
    """The ``distributed.Client`` for a setting (None for ``serial``). Clusters and clients are created once per
    process and reused; a ``tcp://`` address that does not answer within ``FLIPFRAG_SCHEDULER_TIMEOUT`` seconds
    (default 5) is a :class:`SchedulerError` naming it."""
    if scheduler is not None and not isinstance(scheduler, str):
        from distributed import Client

        if isinstance(scheduler, Client):
            return scheduler
        raise TypeError(f"scheduler must be a string, a distributed.Client or None, got {type(scheduler).__name__}")
    setting = parse_scheduler(scheduler)
    if setting == "serial":
        return None
    with _LOCK:
        client = _CLIENTS.get(setting)
        if client is not None and client.status == "running":
            return client
        from distributed import Client

        timeout = _timeout()
        if setting.startswith("local:"):
            from distributed import LocalCluster

            n = int(setting.split(":")[1])
            threads = os.environ.get("FLIPFRAG_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
            env = {"FLIPFRAG_THREADS": threads, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   env=env, silence_logs=40)  # fmt: skip
            _CLUSTERS[setting] = cluster
            client = Client(cluster, timeout=f"{timeout}s")
        else:
            _probe(setting, timeout)  # a refused or unroutable address fails here, in at most `timeout` seconds
            try:
                client = Client(setting, timeout=f"{timeout}s")
            except (OSError, TimeoutError) as err:
                raise SchedulerError(f"cannot connect to the Dask scheduler at {setting}: {err}") from None
        _CLIENTS[setting] = client
        return client


def close_clusters() -> None:
    """Close the clients and the ``local:N`` clusters this process started (also done at exit)."""
    with _LOCK:
        for client in _CLIENTS.values():
            with contextlib.suppress(Exception):
                client.close()
        for cluster in _CLUSTERS.values():
            with contextlib.suppress(Exception):
                cluster.close()
        _CLIENTS.clear()
        _CLUSTERS.clear()


atexit.register(close_clusters)


# ------------------------------------------------------------------------------------------------ devices


DEVICE_ENV = "FLIPFRAG_DEVICE"


def default_device(device: str | torch.device | None = None) -> str | torch.device:
    """``device`` if given, else ``$FLIPFRAG_DEVICE`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``), else ``"cpu"``;
    checked by :func:`task_device` (an unknown value, or a GPU asked for where there is none, is an error naming it)."""
    if device is None:
        device = os.environ.get(DEVICE_ENV, "").strip() or "cpu"
        try:
            task_device(device)
        except (ValueError, RuntimeError) as err:
            raise type(err)(f"${DEVICE_ENV}: {err}") from None
        return device
    task_device(device)
    return device


def task_device(device: str | torch.device = "auto") -> torch.device:
    """The device a task runs on: ``"auto"`` = ``cuda`` when this process sees a GPU, else ``cpu``."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device == "cpu" or (isinstance(device, str) and device.startswith("cuda")):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} but this process sees no GPU")
        return torch.device(device)
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch.device, got {device!r}")


#: Shard-size defaults per model kind: (items per task at most, estimated bytes per item on the device). Items are
#: points for the flip-point solver and images for the attack grid. The byte estimates are the activations kept for
#: second-order gradients (double backward through the saliency map) with a safety factor: a task takes at most
#: half of the free memory. They bound memory; the maxima keep a task short enough to lose little to a dead worker.
SHARD_DEFAULTS: dict[str, tuple[int, float]] = {
    "mlp": (1024, 4e6),  # flip points of an MNIST/Adult MLP: a few MB per point (Jacobian rows, SQP state)
    "cnn": (64, 64e6),  # attack grid on a CIFAR-sized (32x32) CNN
    "squeezenet": (16, 1.5e9),  # attack grid on SqueezeNet 1.0 at 227x227 (IG: 256 interpolants per pass)
}


def _free_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    import psutil

    return float(psutil.virtual_memory().available)


def shard_size(model_kind: str, device: str | torch.device = "auto", free_memory: float | None = None) -> int:
    """Items per task for ``model_kind`` (a key of :data:`SHARD_DEFAULTS`): the kind's maximum, reduced so that a
    shard needs at most half of ``free_memory`` bytes (default: what the device has free now); at least 1."""
    if model_kind not in SHARD_DEFAULTS:
        raise ValueError(f"model_kind must be one of {sorted(SHARD_DEFAULTS)}, got {model_kind!r}")
    if free_memory is None:
        free_memory = _free_memory(task_device(device))
    if not (isinstance(free_memory, (int, float)) and free_memory >= 0 and math.isfinite(free_memory)):
        raise ValueError(f"free_memory must be a finite number of bytes >= 0, got {free_memory!r}")
    most, per_item = SHARD_DEFAULTS[model_kind]
    return int(max(1, min(most, 0.5 * free_memory // per_item)))


def shards(n: int, size: int) -> list[range]:
    """``range(n)`` cut into consecutive pieces of ``size`` (the last may be shorter)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _on_device(m: nn.Module, device: torch.device) -> bool:
    tensors = [*m.parameters(), *m.buffers()]
    return all(t.device == device for t in tensors)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, nn.Module):
        return obj if _on_device(obj, device) else copy.deepcopy(obj).to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, nn.Module):
        return obj if _on_device(obj, torch.device("cpu")) else copy.deepcopy(obj).cpu()
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_to_cpu(v) for v in obj)
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, _to_cpu(getattr(obj, f.name)))
        return new
    return obj


def _compute_dtype(stated: torch.dtype | None, args: tuple, kwargs: Mapping) -> str:
    if stated is not None:
        return str(stated)
    values = [*args, *kwargs.values()]
    for v in values:
        if isinstance(v, nn.Module):
            for p in (*v.parameters(), *v.buffers()):
                if p.is_floating_point():
                    return str(p.dtype)
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return str(v.dtype)
    return "none"


# ------------------------------------------------------------------------------------------------ running

_FINGERPRINT: str | None = None


def _source_fingerprint() -> str:
    """sha256 (16 hex) of flipfrag's source files: workers must run the client's code."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        package = Path(__file__).resolve().parent
        files = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)  # subpackages too
        _FINGERPRINT = sha256_files(files)[:16]
    return _FINGERPRINT


def _execute(fn: Callable, args: tuple, kwargs: Mapping, key: str, name: str, device: str,
             stated_dtype: torch.dtype | None, fingerprint: str | None) -> TaskResult:  # fmt: skip
    """Run one task in this process (the client or a worker) and return its :class:`TaskResult`."""
    if fingerprint is not None and fingerprint != _source_fingerprint():
        raise SchedulerError(f"worker {socket.gethostname()}:{os.getpid()} runs flipfrag source "
                             f"{_source_fingerprint()} from {Path(__file__).parent}, the client {fingerprint}: "
                             "install the same flipfrag on every worker")  # fmt: skip
    dev = task_device(device)
    dtype = _compute_dtype(stated_dtype, args, kwargs)
    args, kwargs = _to_device(args, dev), _to_device(dict(kwargs), dev)
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        where = f"cuda:{dev.index if dev.index is not None else torch.cuda.current_device()}"
    else:
        where = str(dev)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    return TaskResult(key, _to_cpu(value), where, dtype, seconds, worker, cached=False, name=name)


def _check_tasks(tasks: Sequence[Task]) -> list[Task]:
    if isinstance(tasks, Task) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a sequence of Task, got {type(tasks).__name__}")
    bad = [i for i, t in enumerate(tasks) if not isinstance(t, Task)]
    if bad:
        raise TypeError(f"tasks[{bad[0]}] is a {type(tasks[bad[0]]).__name__}, not a Task")
    return list(tasks)


def _load_cached(store: TaskCache | None, key: str) -> TaskResult | None:
    if store is None or key not in store:
        return None
    try:
        return store.load(key)
    except EngineCacheError as err:
        warnings.warn(f"{err}; recomputing", stacklevel=3)
        return None


def run_tasks(
    tasks: Sequence[Task],
    cache: bool | str | os.PathLike | TaskCache = True,
    *,
    scheduler: str | Any | None = None,
    device: str = "auto",
    progress: bool = True,
    desc: str = "tasks",
    retries: int = 0,
    code: str = "",
) -> list[TaskResult]:
    """Run ``tasks`` where ``scheduler`` says and return one :class:`TaskResult` per task, in task order.

    Parameters
    ----------
    tasks : sequence of Task
        Tasks with the same key are computed once (their results are the same object).
    cache : True, False, folder or TaskCache
        True (default): ``cache_dir("tasks")``; False: no cache. Cached results are loaded (verified), the missing
        ones computed, and each result is written atomically as soon as it arrives, so an interrupted run resumes.
    scheduler : str, distributed.Client or None
        ``None`` reads ``$FLIPFRAG_SCHEDULER``; see :func:`parse_scheduler` and the module docstring.
    device : "auto", "cpu" or "cuda"
        Where each task computes (on the process that runs it); see the module docstring.
    progress : bool
        One tqdm bar over the tasks (cached ones count as done); with a cluster, its dashboard link is printed.
    code : str
        The source hash of the code the tasks depend on (part of their keys), recorded with the cache counts in the
        MANIFEST of the notebook run that is recording, if any (:func:`flipfrag.plotting.note_cache_use`).
    retries : int
        How often a task that *raised* is resubmitted on a cluster (a worker that dies is handled by Dask's
        ``distributed.scheduler.allowed-failures``, default 3, before the task fails).

    Raises
    ------
    TaskError
        naming the first task that failed (its exception chained); the other tasks are cancelled, and everything
        finished before is cached.
    """
    tasks = _check_tasks(tasks)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    task_device(device)  # validate here, not on a worker
    store = _as_cache(cache)
    unique: dict[str, Task] = {}
    for t in tasks:
        unique.setdefault(t.key, t)
    results: dict[str, TaskResult] = {}
    for key in unique:
        if (hit := _load_cached(store, key)) is not None:
            results[key] = hit
    todo = [t for k, t in unique.items() if k not in results]
    client = get_client(scheduler) if todo else None

    bar = tqdm(total=len(unique), initial=len(results), desc=desc, disable=not progress, leave=False)
    try:
        if client is None:
            for t in todo:
                try:
                    res = _execute(t.fn, t.args, t.kwargs, t.key, t.name, device, t.dtype, None)
                except Exception as err:
                    raise TaskError(f"task {t.label} failed: {type(err).__name__}: {err}") from err
                if store is not None:
                    store.save(res)
                results[t.key] = res
                bar.update()
        else:
            _run_on_cluster(client, todo, store, results, bar, device=device, retries=retries, progress=progress)
    finally:
        bar.close()
    _note_cache_use(desc, len(unique) - len(todo), len(todo), code)
    return [results[t.key] for t in tasks]


def _note_cache_use(kind: str, cached: int, computed: int, code: str) -> None:
    """Tell the notebook's run (if one is recording: :mod:`flipfrag.plotting` imported) what came from the cache."""
    plotting = sys.modules.get("flipfrag.plotting")
    if plotting is not None:
        plotting.note_cache_use(kind, cached=cached, computed=computed, code=code)


def _identity(obj: Any) -> Any:
    return obj


def _share_arguments(client, tasks: list[Task]) -> dict[int, Any]:
    """Send each distinct module / tensor argument to the cluster once (not once per task), as the result of a
    small task rather than with ``scatter``: if the worker holding it dies, the scheduler recomputes it."""
    seen: dict[int, Any] = {}
    for t in tasks:
        for v in (*t.args, *t.kwargs.values()):
            if isinstance(v, (nn.Module, torch.Tensor)) and id(v) not in seen:
                seen[id(v)] = v
    stamp = time.time_ns()
    return {i: client.submit(_identity, v, key=f"flipfrag-arg-{j}-{stamp}", pure=False)
            for j, (i, v) in enumerate(seen.items())}  # fmt: skip


def _run_on_cluster(client, todo: list[Task], store: TaskCache | None, results: dict[str, TaskResult], bar, *,
                    device: str, retries: int, progress: bool) -> None:  # fmt: skip
    from distributed import as_completed

    if progress:
        tqdm.write(f"flipfrag.engine: {len(todo)} task(s) on {client.scheduler.address}; "
                   f"dashboard: {client.dashboard_link}")  # fmt: skip
    fingerprint = _source_fingerprint()
    scattered = _share_arguments(client, todo)

    def sub(v):
        return scattered.get(id(v), v)

    futures = {}
    for t in todo:
        fut = client.submit(_execute, t.fn, tuple(sub(a) for a in t.args), {k: sub(v) for k, v in t.kwargs.items()},
                            t.key, t.name, device, t.dtype, fingerprint, key=f"flipfrag-{t.key}-{time.time_ns()}",
                            pure=False, retries=retries)  # fmt: skip
        futures[fut] = t
    try:
        for fut in as_completed(futures):
            t = futures[fut]
            if fut.status != "finished":
                err = fut.exception() if fut.status == "error" else None
                name = type(err).__name__ if err is not None else f"status {fut.status!r}"
                hint = " (its worker died: out of memory? lower the shard size)" if name == "KilledWorker" else ""
                raise TaskError(f"task {t.label} failed on the cluster{hint}: {name}: {err or ''}") from err
            res = fut.result()
            if store is not None:
                store.save(res)
            results[t.key] = res
            fut.release()
            bar.update()
    finally:
        for fut in futures:
            if fut.status == "pending":
                fut.cancel()
        for f in scattered.values():
            f.release()
