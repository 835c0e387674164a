"""Architectures, seeded training, and the checkpoint cache (atomic writes, corruption detected)."""

import warnings

import pytest
import torch

from flipfrag import _io, models
from flipfrag.models import MLP, CheckpointError, SmallCNN, load_checkpoint, save_checkpoint, train, train_cached
from flipfrag.smooth import Erf


def _toy(n=256, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 > 0.3).long()
    return X, y


def test_mlp_is_erf_net_of_the_authors_code():
    torch.manual_seed(0)
    m = MLP(4, [5, 3], 2, activation="erf", sigma=2.0).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    W1, b1 = m.net[0].weight, m.net[0].bias
    W2, b2 = m.net[2].weight, m.net[2].bias
    W3, b3 = m.net[4].weight, m.net[4].bias
    # pointEval.m: y1 = erf((x W1 + b1)/s1); y2 = erf((y1 W2 + b2)/s2); z = y2 W3 + b3
    y1 = torch.erf((x @ W1.T + b1) / 2.0)
    y2 = torch.erf((y1 @ W2.T + b2) / 2.0)
    assert torch.allclose(m(x), y2 @ W3.T + b3)
    assert sum(isinstance(a, Erf) for a in m.modules()) == 2
    assert m(torch.randn(3, 2, 2, dtype=torch.float64)).shape == (3, 2)  # flattens images
    with pytest.raises(ValueError, match="activation"):
        MLP(4, [5], 2, activation="gelu")


def test_small_cnn_shapes_and_head():
    assert SmallCNN(1, 10)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    net = SmallCNN(3, 10, width=4, head_relu=True)
    assert (net(torch.rand(2, 3, 32, 32)) >= 0).all()  # ReLU before the GAP, as in SqueezeNet


def test_train_learns_and_is_deterministic():
    X, y = _toy()
    a, b = MLP(6, [16], 2), MLP(6, [16], 2)
    b.load_state_dict(a.state_dict())
    ha = train(a, X, y, epochs=30, lr=1e-2, batch_size=32, seed=1, progress=False)
    hb = train(b, X, y, epochs=30, lr=1e-2, batch_size=32, seed=1, progress=False)
    assert ha["loss"] == hb["loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert models.evaluate(a, X, y) > 0.9 and ha["loss"][-1] < ha["loss"][0] / 2
    assert not a.training
    with pytest.raises(ValueError, match="same non-zero length"):
        train(a, X, y[:-1], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        train(a, X.clone().fill_(float("nan")), y, progress=False)


def test_checkpoint_roundtrip_keeps_dtype(tmp_path):
    m = MLP(6, [8], 3, activation="tanh").double()
    path = save_checkpoint(tmp_path / "m.pt", m, key="abc", meta={"note": 1})
    loaded, meta = load_checkpoint(path, key="abc")
    assert meta == {"note": 1} and next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(loaded(x), m(x))
    with pytest.raises(CheckpointError, match="key"):
        load_checkpoint(path, key="other")


def test_corrupt_checkpoint_detected_and_retrained(tmp_path):
    X, y = _toy()
    kw = dict(epochs=2, lr=1e-2, batch_size=64, seed=0, cache=tmp_path, progress=False)
    m1, meta1 = train_cached(lambda: MLP(6, [8], 2), X, y, **kw)
    m2, meta2 = train_cached(lambda: MLP(6, [8], 2), X, y, **kw)
    assert not meta1["cached"] and meta2["cached"] and meta1["key"] == meta2["key"]
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    path = tmp_path / f"model-{meta1['key']}.pt"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="retraining"):
        m3, meta3 = train_cached(lambda: MLP(6, [8], 2), X, y, **kw)
    assert not meta3["cached"] and all(torch.equal(p, q) for p, q in zip(m1.parameters(), m3.parameters()))
    load_checkpoint(path)  # rewritten and valid again
    # truncated file with a matching sidecar (e.g. written by hand) still fails to load, with the file named
    path.write_bytes(b"not a checkpoint")
    (tmp_path / (path.name + ".sha256")).write_text(_io.sha256_file(path))
    with pytest.raises(CheckpointError, match=path.name):
        load_checkpoint(path)


def test_key_changes_with_data_config_and_seed(tmp_path):
    X, y = _toy()
    kw = dict(epochs=1, batch_size=64, cache=tmp_path, progress=False)
    keys = {
        train_cached(lambda: MLP(6, [8], 2), X, y, seed=0, **kw)[1]["key"],
        train_cached(lambda: MLP(6, [8], 2), X, y, seed=1, **kw)[1]["key"],
        train_cached(lambda: MLP(6, [9], 2), X, y, seed=0, **kw)[1]["key"],
        train_cached(lambda: MLP(6, [8], 2), X * 2, y, seed=0, **kw)[1]["key"],
    }
    assert len(keys) == 4


def test_sha256_files_is_the_digest_of_the_concatenated_contents(tmp_path):
    import hashlib

    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_bytes(b"x = 1\n")
    b.write_bytes(b"y = 2\n")
    assert _io.sha256_files([a, b]) == hashlib.sha256(b"x = 1\ny = 2\n").hexdigest()
    assert _io.sha256_files([b, a]) != _io.sha256_files([a, b])
    assert _io.sha256_files([a]) == _io.sha256_file(a)


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    m = MLP(6, [8], 2)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m.pt", m, key="k")
    assert list(tmp_path.iterdir()) == []


def test_pretrained_weights_path_offline(tmp_path, monkeypatch):
    """The paper profile's download + checksum + load path, against a local state_dict file."""
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path / "cache"))
    ref = models.squeezenet1_0(pretrained=False)
    src = tmp_path / "squeezenet1_0-local.pth"
    torch.save(ref.state_dict(), src)
    with pytest.raises(_io.ChecksumError):  # torchvision's real hash prefix does not match our local file
        models.squeezenet1_0(pretrained=True, url=src.as_uri())
    monkeypatch.setitem(models.PRETRAINED, "squeezenet1_0",
                        {**models.PRETRAINED["squeezenet1_0"], "sha256": _io.sha256_file(src)})  # fmt: skip
    net = models.squeezenet1_0(pretrained=True, url=src.as_uri())
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(net(x), ref.eval()(x)) and not net.training


def test_zoo_model_is_cached_per_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m, d, meta = models.trained_model("breast_cancer-erf", "smoke", progress=False)
        m2, _, meta2 = models.trained_model("breast_cancer-erf", "smoke", data=d, progress=False)
    assert not meta["cached"] and meta2["cached"]
    assert meta["test_acc"] == meta2["test_acc"] > 0.85  # WDBC is easy: even 15 epochs give > 85 %
    with pytest.raises(ValueError, match="key"):
        models.trained_model("nope")
