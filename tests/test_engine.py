"""flipfrag.engine: keys, the checksummed task cache, resuming, and identical results in process and on a
LocalCluster of 2 worker processes (attack cells and a sharded flip-point solve), a worker killed mid-run, and a
scheduler that cannot be reached."""

import copy
import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from flipfrag import engine
from flipfrag.attacks import TopKAttack
from flipfrag.engine import EngineCacheError, SchedulerError, Task, TaskCache, TaskError, run_tasks, task_key
from flipfrag.flip import closest_flip_point
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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(engine.SCHEDULER_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


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
