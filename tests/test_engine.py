"""flipfrag.engine: keys, the checksummed task cache, resuming, and identical results in process and on a
LocalCluster of 2 worker processes (attack cells and a sharded flip-point solve), a worker killed mid-run, and a
scheduler that cannot be reached; and the dataset-wide flip-point solve on the engine
(:func:`flipfrag.flippoints.cached_flip_points`): identical serially and on 2 workers, a killed process or worker
leaves no partial shard, a rerun calls no solver, a corrupt shard is recomputed, bad arguments are named."""

import copy
import dataclasses
import math
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from flipfrag import engine
from flipfrag.attacks import TopKAttack
from flipfrag.engine import EngineCacheError, SchedulerError, Task, TaskCache, TaskError, run_tasks, task_key
from flipfrag.flip import closest_flip_point
from flipfrag.flippoints import cache as fs
from flipfrag.models import MLP, SmallCNN

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ task functions (module level: workers import them


def double(x):
    return {"y": 2 * x, "pid": os.getpid()}


def fail(x):
    raise ValueError("deliberate task failure 17")


def die_once(marker, x, delay=0.0):
    """Kill the process running this task the first time (no marker yet), as an OOM kill would; then compute."""
    marker = Path(marker)
    if not marker.exists():
        marker.touch()
        time.sleep(delay)
        os._exit(13)
    return {"y": x**2}


def die_always(x, delay=0.0):
    time.sleep(delay)
    os._exit(13)


def square(x, delay=0.0):
    return {"y": x**2}


def attack_cell(model, x, y, eps, *, k, iters):
    """A stand-in attack-grid cell: the top-k attack with the simple gradient on one image shard at one eps."""
    out = TopKAttack(model, "gradient", k=k, eps=eps, step=eps / 4, iters=iters, progress=False)(x, y)
    return {"x_adv": out.x_adv, "topk": out.metrics["topk"], "label_kept": out.label_kept, "crit": out.criterion}


def flip_shard(model, x):
    return closest_flip_point(model, x, max_iter=60)


class DyingMLP(MLP):
    """An MLP whose forward kills its process (os._exit, as an OOM kill would) the first time it sees an input
    whose first feature is ``die_on`` — unless the file ``marker`` exists (it is created just before dying). The
    attributes are not in the state dict, so its flip-point cache key is that of the plain MLP with its weights."""

    marker = ""
    die_on = math.nan
    delay = 0.0

    def forward(self, x):
        if self.marker and not Path(self.marker).exists() and bool((x[:, 0] == self.die_on).any()):
            Path(self.marker).touch()
            time.sleep(self.delay)
            os._exit(13)
        return super().forward(x)


# ------------------------------------------------------------------ fixtures


def _cnn_setting():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, n_classes=3, width=4).eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _attack_tasks():
    model, x, y = _cnn_setting()
    tasks = []
    for eps in (2 / 255, 8 / 255):
        for i in range(2):
            xi, yi = x[i : i + 1], y[i : i + 1]
            key = task_key("test-attack-cell", model, xi, yi, eps, 20, 3)
            tasks.append(Task(key, attack_cell, (model, xi, yi, eps), {"k": 20, "iters": 3}, name=f"eps{eps}-{i}"))
    return tasks


def _flip_tasks():
    torch.manual_seed(1)
    model = MLP(6, [12], 3, activation="erf").double().eval()
    x = torch.randn(8, 6, dtype=torch.float64)
    return [Task(task_key("test-flip-shard", model, x[s]), flip_shard, (model, x[s])) for s in engine.shards(8, 3)]


def _flip_setting():
    """A random float64 erf MLP on 6 features, 8 inputs, and solver settings with a shared tensor (``scale``)."""
    torch.manual_seed(1)
    model = MLP(6, [12], 3, activation="erf").double().eval()
    x = torch.randn(8, 6, dtype=torch.float64)
    return model, x, {"max_iter": 60, "lower": -4.0, "upper": 4.0, "scale": torch.linspace(0.5, 1.5, 6).double()}


def _dying(model, marker, die_on, delay=0.0):
    dying = copy.deepcopy(model)
    dying.__class__ = DyingMLP
    dying.marker, dying.die_on, dying.delay = str(marker), float(die_on), float(delay)
    return dying


class _CountingSolver:
    """Stands in for flippoints.cache.closest_flip_point (serial runs): counts the calls and the points solved."""

    def __init__(self):
        self.calls, self.points = 0, 0

    def __call__(self, model, x, **kw):
        self.calls += 1
        self.points += x.shape[0]
        return closest_flip_point(model, x, **kw)


def _shard_files(folder: Path, name: str) -> list[str]:
    """The cache folder's files; asserts there is nothing partial and every shard verifies under its own key."""
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")], names
    shards_ = [n for n in names if n.endswith(".npz")]
    assert sorted(names) == sorted(shards_ + [f"{n}.sha256" for n in shards_]), names
    for n in shards_:
        fs.load_flip_result(folder / n, key=n.removeprefix(f"{name}-").removesuffix(".npz"))
    return shards_


def _assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # identical bits (NaN where unsolved)
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            _assert_same(getattr(a, name), getattr(b, name))
    else:
        assert a == b


def _no_partial_entries(folder: Path, keys):
    names = sorted(p.name for p in folder.iterdir())
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")], names
    assert names == sorted([f"{k}.pkl" for k in keys] + [f"{k}.pkl.sha256" for k in keys])
    for k in keys:
        TaskCache(folder).load(k)  # every entry verifies


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes (FLIPFRAG_SCHEDULER=local:2), reused by the tests of this module. A
    task may lose its worker once and be retried; a second death fails it (allowed-failures = 1). One task per
    worker at a time (worker-saturation 1), so no innocent task waits in the queue of a worker that is killed."""
    pytest.importorskip("distributed")
    import dask

    config = {"distributed.scheduler.allowed-failures": 1, "distributed.scheduler.worker-saturation": 1.0}
    with dask.config.set(config):
        client = engine.get_client("local:2")
    client.wait_for_workers(2, timeout=60)
    yield "local:2"
    engine.close_clusters()


# ------------------------------------------------------------------ scheduler setting


def test_parse_scheduler_forms_and_errors(monkeypatch):
    monkeypatch.delenv(engine.SCHEDULER_ENV, raising=False)
    assert engine.parse_scheduler() == "serial"
    assert engine.parse_scheduler("") == "serial" and engine.parse_scheduler(" serial ") == "serial"
    assert engine.parse_scheduler("local:03") == "local:3"
    assert engine.parse_scheduler("tcp://10.1.2.3:8786/") == "tcp://10.1.2.3:8786"
    monkeypatch.setenv(engine.SCHEDULER_ENV, "local:2")
    assert engine.parse_scheduler() == "local:2"
    assert engine.parse_scheduler("serial") == "serial"  # the argument wins over the environment
    monkeypatch.setenv(engine.SCHEDULER_ENV, "locl:2")
    with pytest.raises(ValueError, match=r"\$FLIPFRAG_SCHEDULER='locl:2'.*serial.*local:N.*tcp://host:port"):
        engine.parse_scheduler()
    for bad in ("local:0", "tcp://host", "tcp://h:70000", "http://h:1", "local:-1"):
        with pytest.raises(ValueError, match="scheduler="):
            engine.parse_scheduler(bad)


def _assert_no_dask_imported(code: str, timeout: float) -> None:
    """Run ``code`` in a fresh interpreter (no scheduler set); its last printed line lists the Dask modules loaded."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(engine.SCHEDULER_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=timeout)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_serial_path_never_imports_dask(tmp_path):
    code = textwrap.dedent(f"""
        import sys, torch
        from flipfrag.engine import Task, run_tasks, task_key
        from tests.test_engine import double
        x = torch.arange(3.0)
        r = run_tasks([Task(task_key("t", x), double, (x,))], {str(tmp_path)!r}, progress=False)
        assert torch.equal(r[0].value["y"], 2 * x)
        print(sorted(m for m in sys.modules if m == "dask" or m.startswith(("dask.", "distributed"))))
    """)
    _assert_no_dask_imported(code, timeout=120)


def test_unreachable_scheduler_fails_fast_naming_the_address(monkeypatch, tmp_path):
    monkeypatch.setenv(engine.SCHEDULER_ENV, "tcp://127.0.0.1:1")
    x = torch.arange(3.0)
    start = time.perf_counter()
    with pytest.raises(SchedulerError, match=r"tcp://127\.0\.0\.1:1"):
        run_tasks([Task(task_key("t", x), double, (x,))], tmp_path, progress=False)
    assert time.perf_counter() - start < 10
    assert not list(tmp_path.iterdir())


def test_unroutable_scheduler_times_out_after_the_stated_timeout(monkeypatch):
    monkeypatch.setenv(engine._TIMEOUT_ENV, "1")
    start = time.perf_counter()
    with pytest.raises(SchedulerError, match=r"tcp://192\.0\.2\.1:8786"):  # TEST-NET-1: never answers
        engine.get_client("tcp://192.0.2.1:8786")
    assert time.perf_counter() - start < 5


def test_fully_cached_run_needs_no_scheduler(monkeypatch, tmp_path):
    x = torch.arange(3.0)
    tasks = [Task(task_key("t", x), double, (x,))]
    first = run_tasks(tasks, tmp_path, scheduler="serial", progress=False)
    monkeypatch.setenv(engine.SCHEDULER_ENV, "tcp://127.0.0.1:1")  # would fail if contacted
    again = run_tasks(tasks, tmp_path, progress=False)
    assert again[0].cached and not first[0].cached
    _assert_same(again[0].value, first[0].value)


# ------------------------------------------------------------------ keys and the cache


def test_task_key_changes_with_content_not_with_identity():
    torch.manual_seed(0)
    m = MLP(4, [5], 2)
    x = torch.randn(3, 4)
    base = task_key("cell", m, x, {"eps": 8 / 255, "k": 3})
    twin = MLP(4, [5], 2)
    twin.load_state_dict(m.state_dict())
    assert base == task_key("cell", twin, x.clone(), {"k": 3, "eps": 8 / 255})  # same content, other objects
    x2 = x.clone()
    x2[1, 2] += 1e-7
    m2 = MLP(4, [5], 2)
    variants = [task_key("cell", m, x2, {"eps": 8 / 255, "k": 3}), task_key("cell", m2, x, {"eps": 8 / 255, "k": 3}),
                task_key("cell", m, x, {"eps": 0.0313725, "k": 3}), task_key("cell", m, x.double(), {"eps": 8 / 255,
                "k": 3}), task_key("other", m, x, {"eps": 8 / 255, "k": 3})]  # fmt: skip
    assert len({base, *variants}) == 1 + len(variants)
    assert len(base) == 24 and int(base, 16) >= 0
    with pytest.raises(TypeError, match="cannot fingerprint a object"):
        task_key(object())
    # a settings dataclass is keyed by its class and field values
    from flipfrag.flip import FlipResult

    res = closest_flip_point(m.double(), x.double()[:1], max_iter=5)
    assert task_key(res) == task_key(copy.deepcopy(res))
    assert task_key(res) != task_key(dataclasses.replace(res, tol=res.tol * 2))
    assert isinstance(res, FlipResult)


def test_task_validates_its_fields():
    with pytest.raises(ValueError, match="Task.key"):
        Task("../evil", double)
    with pytest.raises(TypeError, match="Task.args"):
        Task("k1", double, [1])
    with pytest.raises(TypeError, match="Task.fn"):
        Task("k1", 3)
    with pytest.raises(TypeError, match="tasks must be a sequence"):
        run_tasks(Task("k1", double, (1,)), False)


def test_cache_detects_corruption_and_recomputes(tmp_path):
    x = torch.arange(4.0)
    key = task_key("t", x)
    (res,) = run_tasks([Task(key, double, (x,))], tmp_path, scheduler="serial", progress=False)
    store = TaskCache(tmp_path)
    loaded = store.load(key)
    assert loaded.cached and loaded.worker == res.worker and loaded.device == "cpu"
    _assert_same(loaded.value, res.value)
    path = store.path(key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineCacheError, match="sha256 does not match"):
        store.load(key)
    with pytest.warns(UserWarning, match="recomputing"):
        (again,) = run_tasks([Task(key, double, (x,))], tmp_path, scheduler="serial", progress=False)
    assert not again.cached and store.load(key).cached
    # an entry copied under another key is refused even though its checksum is fine
    other = task_key("t", x + 1)
    store.path(other).write_bytes(path.read_bytes())
    Path(str(store.path(other)) + ".sha256").write_bytes(Path(str(path) + ".sha256").read_bytes())
    with pytest.raises(EngineCacheError, match="key"):
        store.load(other)
    Path(str(path) + ".sha256").unlink()
    with pytest.raises(EngineCacheError, match="checksum file"):
        store.load(key)


def test_results_carry_device_and_dtype_and_come_back_on_the_cpu(tmp_path):
    model, x, y = _cnn_setting()
    (r,) = run_tasks(_attack_tasks()[:1], False, scheduler="serial", progress=False)
    assert r.device == "cpu" and r.dtype == "torch.float32" and r.seconds > 0
    assert all(v.device.type == "cpu" for v in r.value.values())
    flip = _flip_tasks()[0]
    (f,) = run_tasks([flip], False, scheduler="serial", progress=False)
    assert f.dtype == "torch.float64" and f.value.x_attempt.device.type == "cpu"
    stated = Task(flip.key, flip.fn, flip.args, dtype=torch.float32)
    assert run_tasks([stated], False, scheduler="serial", progress=False)[0].dtype == "torch.float32"
    assert engine.task_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        run_tasks([flip], False, device="gpu", progress=False)


def test_duplicate_keys_are_computed_once(tmp_path):
    x = torch.arange(3.0)
    t = Task(task_key("t", x), double, (x,))
    a, b = run_tasks([t, t], tmp_path, scheduler="serial", progress=False)
    assert a is b and len(list(tmp_path.glob("*.pkl"))) == 1


def test_a_failing_task_is_named_and_finished_tasks_stay_cached(tmp_path):
    xs = [torch.tensor([float(i)]) for i in range(3)]
    tasks = [Task(task_key("ok", xs[0]), double, (xs[0],)), Task(task_key("bad", xs[1]), fail, (xs[1],), name="bad1"),
             Task(task_key("ok", xs[2]), double, (xs[2],))]  # fmt: skip
    with pytest.raises(TaskError, match="bad1 failed: ValueError: deliberate task failure 17"):
        run_tasks(tasks, tmp_path, scheduler="serial", progress=False)
    assert [p.name for p in tmp_path.glob("*.pkl")] == [f"{tasks[0].key}.pkl"]


def test_wrong_source_on_a_worker_is_refused():
    with pytest.raises(SchedulerError, match="install the same flipfrag on every worker"):
        engine._execute(double, (torch.ones(1),), {}, "k1", "", "cpu", None, "0" * 16)


def test_an_interrupted_serial_run_resumes(tmp_path):
    """The process dies (os._exit) inside the third of four tasks: two complete entries, nothing partial; the rerun
    computes only the last two, and every value equals an uninterrupted run's."""
    cache = tmp_path / "cache"
    code = textwrap.dedent(f"""
        import torch
        from flipfrag.engine import Task, run_tasks, task_key
        from tests.test_engine import die_once, square
        xs = [torch.tensor([i + 0.5]) for i in range(4)]
        tasks = [Task(task_key("sq", x), die_once if i == 2 else square,
                      ({str(tmp_path / "marker")!r}, x) if i == 2 else (x,)) for i, x in enumerate(xs)]
        run_tasks(tasks, {str(cache)!r}, scheduler="serial", progress=False)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 13, out.stderr
    xs = [torch.tensor([i + 0.5]) for i in range(4)]
    keys = [task_key("sq", x) for x in xs]
    _no_partial_entries(cache, keys[:2])
    tasks = [Task(k, square, (x,)) for k, x in zip(keys, xs)]
    resumed = run_tasks(tasks, cache, scheduler="serial", progress=False)
    assert [r.cached for r in resumed] == [True, True, False, False]
    clean = run_tasks(tasks, False, scheduler="serial", progress=False)
    for a, b in zip(resumed, clean):
        _assert_same(a.value, b.value)
    _no_partial_entries(cache, keys)


# ------------------------------------------------------------------ shards


def test_shards_cover_the_range_and_shard_size_follows_memory():
    for n, size in [(0, 3), (1, 3), (10, 3), (9, 3), (5, 100)]:
        pieces = engine.shards(n, size)
        assert [i for p in pieces for i in p] == list(range(n))
        assert all(1 <= len(p) <= size for p in pieces)
    with pytest.raises(ValueError, match="size"):
        engine.shards(4, 0)
    for kind, (most, per_item) in engine.SHARD_DEFAULTS.items():
        assert engine.shard_size(kind, "cpu", free_memory=1e15) == most
        assert engine.shard_size(kind, "cpu", free_memory=0) == 1
        assert engine.shard_size(kind, "cpu", free_memory=2 * 5 * per_item) == min(most, 5)
        sizes = [engine.shard_size(kind, "cpu", free_memory=m) for m in (1e8, 1e9, 1e10, 1e11)]
        assert sizes == sorted(sizes)
    assert 1 <= engine.shard_size("cnn", "cpu") <= 64  # queries the free memory
    with pytest.raises(ValueError, match="model_kind"):
        engine.shard_size("resnet", "cpu", 1e9)


# ------------------------------------------------------------------ on a LocalCluster of 2 worker processes


@pytest.mark.slow
def test_attack_cells_identical_serially_and_on_two_workers(cluster, tmp_path):
    tasks = _attack_tasks()
    serial = run_tasks(tasks, tmp_path / "serial", scheduler="serial", progress=False)
    dist = run_tasks(tasks, tmp_path / "dist", scheduler=cluster, progress=False)
    assert {r.worker for r in dist}.isdisjoint({f"{os.uname().nodename}:{os.getpid()}"})  # ran on the workers
    for a, b in zip(serial, dist):
        assert not b.cached and b.device == "cpu" and b.dtype == "torch.float32"
        _assert_same(a.value, b.value)
    assert any((r.value["x_adv"] != t.args[1]).any() for r, t in zip(dist, tasks))  # the attack did something
    again = run_tasks(tasks, tmp_path / "dist", scheduler=cluster, progress=False)
    assert all(r.cached for r in again)


@pytest.mark.slow
def test_sharded_flip_solve_identical_serially_and_on_two_workers(cluster, tmp_path):
    tasks = _flip_tasks()
    serial = run_tasks(tasks, tmp_path / "serial", scheduler="serial", progress=False)
    dist = run_tasks(tasks, tmp_path / "dist", scheduler=cluster, progress=False)
    assert [len(r.value) for r in dist] == [3, 3, 2]
    for a, b in zip(serial, dist):
        _assert_same(a.value, b.value)
    assert sum(int(r.value.converged.sum()) for r in dist) >= 6  # real flip points, certified by the solver


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_replaced_and_leaves_no_partial_entry(cluster, tmp_path):
    xs = [torch.tensor([i + 0.25], dtype=torch.float64) for i in range(4)]
    keys = [task_key("kill", x) for x in xs]
    marker = tmp_path / "died"
    tasks = [Task(k, die_once, (str(marker), x, 0.5)) if i == 1 else Task(k, square, (x,))
             for i, (k, x) in enumerate(zip(keys, xs))]  # fmt: skip
    dist = run_tasks(tasks, tmp_path / "cache", scheduler=cluster, progress=False)
    assert marker.exists()  # a worker process really died (os._exit) in the middle of the run
    _no_partial_entries(tmp_path / "cache", keys)
    clean = run_tasks([Task(k, square, (x,)) for k, x in zip(keys, xs)], False, scheduler="serial", progress=False)
    for a, b in zip(dist, clean):
        _assert_same(a.value, b.value)


@pytest.mark.slow
def test_a_run_stopped_by_dying_workers_resumes_with_unchanged_results(cluster, tmp_path):
    xs = [torch.tensor([i + 0.75], dtype=torch.float64) for i in range(4)]
    keys = [task_key("stop", x) for x in xs]
    tasks = [Task(k, die_always, (x, 1.0), name="killer") if i == 3 else Task(k, square, (x,))
             for i, (k, x) in enumerate(zip(keys, xs))]  # fmt: skip
    with pytest.raises(TaskError, match="killer failed on the cluster .*worker died"):
        run_tasks(tasks, tmp_path / "cache", scheduler=cluster, progress=False)
    done = sorted(p.stem for p in (tmp_path / "cache").glob("*.pkl"))
    assert keys[3] not in done
    _no_partial_entries(tmp_path / "cache", done)
    fixed = [Task(k, square, (x,)) for k, x in zip(keys, xs)]
    resumed = run_tasks(fixed, tmp_path / "cache", scheduler=cluster, progress=False)
    assert [r.cached for r in resumed] == [k in done for k in keys] and not resumed[3].cached
    clean = run_tasks(fixed, False, scheduler="serial", progress=False)
    for a, b in zip(resumed, clean):
        _assert_same(a.value, b.value)


# ------------------------------------------------------------------ dataset-wide flip-point solves on the engine


def test_flip_solve_in_shards_equals_the_shards_solved_one_by_one(monkeypatch, tmp_path):
    """cached_flip_points cuts x (and per-point arguments) into shards in order: every field equals the hand-made
    concatenation of closest_flip_point on each shard; a rerun calls no solver; the shards match one batch."""
    model, x, kw = _flip_setting()
    target = (model(x).argmax(1) + 1) % 3  # a per-point argument, cut with x
    counter = _CountingSolver()
    monkeypatch.setattr(fs, "closest_flip_point", counter)
    res = fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, target=target, **kw)
    assert (counter.calls, counter.points) == (3, 8)
    assert res.cache_info["n_shards"] == 3 and res.cache_info["cached"] is False and res.cache_info["path"] is None
    assert len(_shard_files(tmp_path, "t")) == 3 and sorted(res.cache_info["paths"]) == sorted(
        str(tmp_path / n) for n in _shard_files(tmp_path, "t"))  # fmt: skip
    by_hand = [closest_flip_point(model, x[s.start : s.stop], target=target[s.start : s.stop], **kw)
               for s in engine.shards(8, 3)]  # fmt: skip
    for f in dataclasses.fields(res):
        got, parts = getattr(res, f.name), [getattr(p, f.name) for p in by_hand]
        if isinstance(got, torch.Tensor):
            _assert_same(got, torch.cat(parts))
        elif isinstance(got, list):
            assert got == [s for p in parts for s in p], f.name
        elif got is None:
            assert all(p is None for p in parts), f.name
        else:
            assert all(got == p for p in parts), f.name
    assert torch.equal(res.target, target) and int(res.converged.sum()) >= 6  # real, certified flip points
    one = closest_flip_point(model, x, target=target, **kw)  # one batch: the same points up to rounding
    torch.testing.assert_close(res.x_flip, one.x_flip, rtol=0, atol=1e-9, equal_nan=True)
    assert torch.equal(res.converged, one.converged) and torch.equal(res.source, one.source)
    again = fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, target=target, **kw)
    assert counter.calls == 3 and again.cache_info["cached"] is True and again.cache_info["n_cached"] == 3
    assert again.cache_info["seconds"] == pytest.approx(res.cache_info["seconds"])
    _assert_same(again, res)
    fresh = fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, target=target, refresh=True, **kw)
    assert counter.calls == 6 and fresh.cache_info["n_cached"] == 0  # refresh: every shard solved again
    _assert_same(fresh, res)


def test_flip_solve_an_interrupted_serial_run_resumes_and_a_corrupt_shard_is_recomputed(monkeypatch, tmp_path):
    """The process dies (os._exit) in the second of three shards: one complete shard on disk, nothing partial. The
    rerun solves only the two missing shards and equals an uninterrupted run; then a corrupted shard file is
    reported, solved again (one solver call) and rewritten; a third run solves nothing."""
    cache, marker = tmp_path / "cache", tmp_path / "died"
    code = textwrap.dedent(f"""
        from flipfrag.flippoints import cache as fs
        from tests.test_engine import _dying, _flip_setting
        model, x, kw = _flip_setting()
        fs.cached_flip_points(_dying(model, {str(marker)!r}, x[3, 0]), x, name="t", cache={str(cache)!r},
                              shard_size=3, scheduler="serial", **kw)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 13 and marker.exists(), out.stderr
    assert len(_shard_files(cache, "t")) == 1  # shard 0 complete, shard 1 died mid-solve, shard 2 never started
    model, x, kw = _flip_setting()
    counter = _CountingSolver()
    monkeypatch.setattr(fs, "closest_flip_point", counter)
    resumed = fs.cached_flip_points(model, x, name="t", cache=cache, shard_size=3, scheduler="serial", **kw)
    assert (counter.calls, counter.points) == (2, 5) and resumed.cache_info["n_cached"] == 1
    clean = fs.cached_flip_points(model, x, name="t", cache=tmp_path / "clean", shard_size=3, **kw)
    _assert_same(resumed, clean)
    victim = Path(resumed.cache_info["paths"][1])
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match=rf"{victim.name}.*sha256.*recomputing"):
        fixed = fs.cached_flip_points(model, x, name="t", cache=cache, shard_size=3, **kw)
    assert (counter.calls, counter.points) == (6, 5 + 8 + 3)  # + clean (3 shards) + the corrupt one again
    assert fixed.cache_info["n_cached"] == 2 and not fixed.cache_info["cached"]
    _assert_same(fixed, clean)
    assert len(_shard_files(cache, "t")) == 3  # the rewritten shard verifies
    final = fs.cached_flip_points(model, x, name="t", cache=cache, shard_size=3, **kw)
    assert counter.calls == 6 and final.cache_info["cached"] is True


def test_flip_solve_tasks_share_the_model_and_ship_only_their_rows():
    """What a cluster receives: one model object and one shared tensor for all tasks (sent once each), and per-point
    pieces (x, target) that own just their rows — a slice would pickle the whole base tensor into every task."""
    import pickle

    model, x, kw = _flip_setting()
    target = torch.zeros(8, dtype=torch.long)
    tasks = fs._flip_tasks(model, x, "t", 3, {**kw, "target": target})
    assert [t.args[1].shape[0] for t in tasks] == [3, 3, 2]
    assert all(t.args[0] is model and t.kwargs["scale"] is kw["scale"] for t in tasks)
    for t, rows in zip(tasks, engine.shards(8, 3)):
        xs, ts = t.args[1], t.kwargs["target"]
        assert torch.equal(xs, x[rows.start : rows.stop]) and torch.equal(ts, target[rows.start : rows.stop])
        assert xs.untyped_storage().nbytes() == xs.numel() * 8 and ts.untyped_storage().nbytes() == ts.numel() * 8
        assert len(pickle.dumps(xs)) < len(pickle.dumps(x[rows.start : rows.stop]))  # the view would carry all of x
    assert len({t.key for t in tasks}) == 3
    (whole,) = fs._flip_tasks(model, x, "t", 8, kw)  # one shard: x itself, the unsharded key
    assert whole.args[1] is x and whole.key == fs.flip_cache_key(model, x, **kw)


def test_flip_solve_serially_never_imports_dask(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from flipfrag.flippoints import cache as fs
        from tests.test_engine import _flip_setting
        model, x, kw = _flip_setting()
        res = fs.cached_flip_points(model, x, name="t", cache={str(tmp_path)!r}, shard_size=3, **kw)
        assert res.cache_info["n_shards"] == 3 and len(res) == 8
        print(sorted(m for m in sys.modules if m == "dask" or m.startswith(("dask.", "distributed"))))
    """)
    _assert_no_dask_imported(code, timeout=300)


def test_flip_solve_bad_arguments_are_named(tmp_path):
    model, x, kw = _flip_setting()
    for bad in (0, -2, 2.5, True, "3"):
        with pytest.raises(ValueError, match="shard_size"):
            fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=bad, **kw)
    for bad in ("bogus", "local:0", "tcp://host"):
        with pytest.raises(ValueError, match="scheduler="):
            fs.cached_flip_points(model, x, name="t", cache=tmp_path, scheduler=bad, **kw)
    with pytest.raises(ValueError, match="target must have one entry per point"):
        fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, target=torch.zeros(7).long(), **kw)
    with pytest.raises(ValueError, match="lower must broadcast"):
        fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, **{**kw, "lower": -torch.ones(2, 6)})
    with pytest.raises(ValueError, match="max_iter must be an integer"):  # the solver's own error, same type
        fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, **{**kw, "max_iter": 0})
    assert not list(tmp_path.iterdir())  # nothing cached by failed calls


def test_flip_solve_shard_size_defaults_to_the_engines(tmp_path):
    model, x, kw = _flip_setting()
    assert fs._model_kind(model) == "mlp" and fs._model_kind(SmallCNN(in_channels=1, n_classes=3, width=4)) == "cnn"
    res = fs.cached_flip_points(model, x, name="t", cache=tmp_path, **kw)
    assert res.cache_info["shard_size"] == engine.shard_size("mlp", "cpu") and res.cache_info["n_shards"] == 1
    assert res.cache_info["path"] == res.cache_info["paths"][0]
    # one shard is the whole batch: the key (and file) of the unsharded solve
    assert Path(res.cache_info["path"]).name == f"t-{fs.flip_cache_key(model, x, **kw)}.npz"


def test_flip_solve_shard_size_limited_by_memory_warns(monkeypatch, tmp_path):
    model, x, kw = _flip_setting()
    monkeypatch.setattr(engine, "_free_memory", lambda device: 2 * 3 * engine.SHARD_DEFAULTS["mlp"][1])
    with pytest.warns(UserWarning, match="free memory limits shards to 3 points.*pass shard_size="):
        res = fs.cached_flip_points(model, x, name="t", cache=tmp_path, **kw)
    assert res.cache_info["shard_size"] == 3 and res.cache_info["n_shards"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit shard size: no warning
        fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, **kw)


def test_flip_solve_is_the_same_whether_shards_are_fresh_or_cached_with_a_dict_field(monkeypatch, tmp_path):
    """A FlipResult with a free-form dict field (not stored in the cache): a run that mixes cached and fresh shards
    assembles, and equals an all-fresh and an all-cached run (the dict is dropped from fresh shards too)."""
    from flipfrag.flip import FlipResult

    @dataclasses.dataclass
    class FlipResultExtra(FlipResult):
        extra: dict = dataclasses.field(default_factory=dict)

    def solver(model, x, **kw):
        res = closest_flip_point(model, x, **kw)
        return FlipResultExtra(**{f.name: getattr(res, f.name) for f in dataclasses.fields(res)},
                               extra={"rows": torch.arange(len(res))})  # fmt: skip

    monkeypatch.setattr(fs, "FlipResult", FlipResultExtra)  # what flip.py would return with such a field
    monkeypatch.setattr(fs, "closest_flip_point", solver)
    model, x, kw = _flip_setting()
    fresh = fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, **kw)
    Path(fresh.cache_info["paths"][1]).unlink()
    mixed = fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, **kw)
    cached = fs.cached_flip_points(model, x, name="t", cache=tmp_path, shard_size=3, **kw)
    assert mixed.cache_info["n_cached"] == 2 and cached.cache_info["cached"]
    assert isinstance(mixed, FlipResultExtra) and fresh.extra == mixed.extra == cached.extra == {}
    _assert_same(fresh, mixed)
    _assert_same(fresh, cached)


@pytest.mark.slow
def test_flip_solve_identical_serially_and_on_two_workers(cluster, tmp_path, monkeypatch):
    model, x, kw = _flip_setting()
    serial = fs.cached_flip_points(model, x, name="t", cache=tmp_path / "serial", shard_size=3, scheduler="serial",
                                   **kw)  # fmt: skip
    dist = fs.cached_flip_points(model, x, name="t", cache=tmp_path / "dist", shard_size=3, scheduler=cluster, **kw)
    _assert_same(serial, dist)
    assert int(dist.converged.sum()) >= 6 and dist.cache_info["n_shards"] == 3
    here = f"{os.uname().nodename}:{os.getpid()}"
    workers = {fs.load_flip_result(p)[1]["provenance"]["worker"] for p in dist.cache_info["paths"]}
    assert here not in workers  # solved on the workers
    # a cached rerun never contacts a scheduler (this address would fail) and calls no solver
    counter = _CountingSolver()
    monkeypatch.setattr(fs, "closest_flip_point", counter)
    again = fs.cached_flip_points(model, x, name="t", cache=tmp_path / "dist", shard_size=3,
                                  scheduler="tcp://127.0.0.1:1", **kw)  # fmt: skip
    assert again.cache_info["cached"] and counter.calls == 0
    _assert_same(again, serial)


@pytest.mark.slow
def test_flip_solve_a_worker_killed_mid_run_leaves_no_partial_shard(cluster, tmp_path):
    """The worker solving the middle shard dies (os._exit) half a second in; Dask reruns that shard on another
    worker. Every shard on disk is complete and verifies, and the result equals a serial run with a plain model."""
    model, x, kw = _flip_setting()
    marker = tmp_path / "died"
    dying = _dying(model, marker, x[3, 0], delay=0.5)
    dist = fs.cached_flip_points(dying, x, name="t", cache=tmp_path / "dist", shard_size=3, scheduler=cluster, **kw)
    assert marker.exists()  # a worker process really died in the middle of the run
    assert len(_shard_files(tmp_path / "dist", "t")) == 3
    clean = fs.cached_flip_points(model, x, name="t", cache=tmp_path / "clean", shard_size=3, scheduler="serial",
                                  **kw)  # fmt: skip
    _assert_same(dist, clean)
    rerun = fs.cached_flip_points(model, x, name="t", cache=tmp_path / "dist", shard_size=3, scheduler=cluster, **kw)
    assert rerun.cache_info["cached"]
    _assert_same(rerun, clean)


def test_default_device_reads_the_environment_and_names_a_bad_value(monkeypatch, tmp_path):
    monkeypatch.delenv(engine.DEVICE_ENV, raising=False)
    assert engine.default_device() == "cpu"  # the quick profile's numbers never depend on a GPU
    assert engine.default_device("auto") == "auto"
    monkeypatch.setenv(engine.DEVICE_ENV, "auto")
    assert engine.default_device() == "auto"
    assert engine.default_device("cpu") == "cpu"  # an explicit argument wins
    monkeypatch.setenv(engine.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match=r"\$FLIPFRAG_DEVICE.*tpu"):
        engine.default_device()
    with pytest.raises(ValueError, match="tpu"):
        engine.default_device("tpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv(engine.DEVICE_ENV, "cuda")
        with pytest.raises(RuntimeError, match=r"\$FLIPFRAG_DEVICE.*no GPU"):
            engine.default_device()
        # the drivers read it: a flip-point solve asked to run on a missing GPU stops before solving anything
        net = MLP(4, [5], 3, activation="erf").double().eval()
        with pytest.raises(RuntimeError, match="no GPU"):
            fs.cached_flip_points(net, torch.randn(3, 4, dtype=torch.float64), cache=tmp_path)
        assert not list(tmp_path.iterdir())


def test_device_auto_from_the_environment_is_recorded_per_shard(monkeypatch, tmp_path):
    net = MLP(4, [5], 3, activation="erf").double().eval()
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv(engine.DEVICE_ENV, "auto")
    res = fs.cached_flip_points(net, x, cache=tmp_path / "a", shard_size=2)
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert res.cache_info["devices"] == [expected]
    monkeypatch.delenv(engine.DEVICE_ENV)
    ref = fs.cached_flip_points(net, x, cache=tmp_path / "b", shard_size=2)
    assert ref.cache_info["devices"] == ["cpu"]
    if expected == "cpu":  # same device: the same numbers
        torch.testing.assert_close(res.x_flip, ref.x_flip, rtol=0, atol=0, equal_nan=True)
