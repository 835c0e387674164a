"""Architectures, seeded training, and the checkpoint cache (atomic writes, corruption detected)."""

import warnings
from pathlib import Path

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


# ------------------------------------------------------------------------------------ the pretrained CIFAR-10 CNN


def test_cifar10_cnn_classifies_the_shipped_cifar10_photos():
    from flipfrag.datasets import load_cifar10

    data = load_cifar10()
    net = models.cifar10_cnn(pretrained=True)
    assert not net.training
    with torch.no_grad():
        logits = net(data.X_test)
    assert logits.shape == (20, 10)
    assert (logits.argmax(1) == data.y_test).all()  # 20 / 20, as the Keras original


def test_cifar10_cnn_takes_unit_scale_images_and_scales_by_255_inside():
    net = models.cifar10_cnn(pretrained=True)
    assert isinstance(net[0], models.InputScale) and net[0].factor == 255.0
    x = torch.rand(2, 3, 32, 32)
    rest = torch.nn.Sequential(*list(net)[1:])
    with torch.no_grad():
        assert torch.allclose(net(x), rest(255 * x), atol=1e-5)


def test_cifar10_cnn_random_weights_have_the_same_architecture():
    torch.manual_seed(1)
    rand = models.cifar10_cnn(pretrained=False)
    real = models.cifar10_cnn(pretrained=True)
    assert [(k, v.shape) for k, v in rand.state_dict().items()] == [(k, v.shape) for k, v in real.state_dict().items()]
    assert not torch.equal(rand[1].weight, real[1].weight)
    assert isinstance(models.build_model({"arch": "cifar10_cnn"}), models.CIFAR10CNN)


def test_fold_batchnorm_is_the_same_function_to_float_precision():
    data_x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    net = models.cifar10_cnn(pretrained=True).double()
    folded = models.fold_batchnorm(net)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, models.InputScale)) for m in folded.modules())
    with torch.no_grad():
        ref, out = net(data_x), folded(data_x)
    assert (out - ref).abs().max() <= 1e-10 * ref.abs().max()
    # float32, as shipped: agreement to float32 rounding of ~1e6 parameters
    net32, folded32 = models.cifar10_cnn(), models.cifar10_cnn(folded=True)
    with torch.no_grad():
        ref32, out32 = net32(data_x.float()), folded32(data_x.float())
    assert (out32 - ref32).abs().max() <= 1e-5 * ref32.abs().max() + 1e-5


def test_fold_batchnorm_matches_an_explicit_affine_on_a_random_bn_net():
    # a net with random BN statistics, including a BN before max-pooling and before flatten + linear
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        models.InputScale(2.0), torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(3),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(3, 4, 2), torch.nn.ReLU(), torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 5),
    ).double()  # fmt: skip
    for bn in (net[3], net[7]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)  # positive: max-pooling commutes with the affine map
        bn.bias.data.uniform_(-1, 1)
    net.eval()
    x = torch.randn(4, 2, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(models.fold_batchnorm(net)(x), net(x), rtol=0, atol=1e-12)


def test_fold_batchnorm_refuses_what_it_cannot_fold():
    neg = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(2),
                              torch.nn.MaxPool2d(2), torch.nn.Conv2d(2, 2, 1)).eval()  # fmt: skip
    neg[2].weight.data = torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="non-positive scale before max-pooling"):
        models.fold_batchnorm(neg)
    padded = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(2),
                                 torch.nn.Conv2d(2, 2, 3, padding=1)).eval()  # fmt: skip
    padded[2].bias.data = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="zero-padded"):
        models.fold_batchnorm(padded)
    with pytest.raises(ValueError, match="not followed by"):
        models.fold_batchnorm(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).eval())
    with pytest.raises(TypeError, match="nn.Sequential"):
        models.fold_batchnorm(SmallCNN())


def test_all_four_saliency_methods_run_on_the_cifar10_cnn():
    from flipfrag import saliency
    from flipfrag.datasets import load_cifar10

    data = load_cifar10()
    x, y = data.X_test[:3].double(), data.y_test[:3]
    net = models.cifar10_cnn().double()
    folded = models.fold_batchnorm(net)
    for method in ("gradient", "integrated_gradients", "deeplift"):
        a, b = saliency.attribute(net, x, y, method), saliency.attribute(folded, x, y, method)
        assert a.shape == x.shape and torch.isfinite(a).all()
        assert (a - b).abs().max() <= 1e-8 * a.abs().max(), method  # the same function, so the same attribution
    with pytest.raises(ValueError, match="fold_batchnorm"):
        saliency.dtd(net, x, y, lower=0, upper=1)
    rel = saliency.dtd(folded, x, y, lower=0, upper=1)
    assert rel.shape == x.shape and torch.isfinite(rel).all() and (rel >= 0).all()  # z+ / z^B relevances


def test_cifar10_cnn_refuses_a_corrupted_state_dict(tmp_path, monkeypatch):
    import shutil

    from flipfrag import datasets

    (tmp_path / "models").mkdir()
    shutil.copy(datasets.DATA_DIR / models.CIFAR10_CNN_FILE, tmp_path / models.CIFAR10_CNN_FILE)
    monkeypatch.setattr(datasets, "DATA_DIR", tmp_path)
    models.cifar10_cnn()  # the untouched copy verifies
    raw = bytearray((tmp_path / models.CIFAR10_CNN_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / models.CIFAR10_CNN_FILE).write_bytes(bytes(raw))
    with pytest.raises(datasets.ChecksumError, match="cifar10_cnn.pt"):
        models.cifar10_cnn()


def test_keras_conversion_inverts_the_keras_layout(tmp_path):
    """fetch_offline_data.py reads Keras kernels (h, w, in, out) / (in, out): write a net in that layout, read back."""
    import importlib.util

    h5py = pytest.importorskip("h5py", reason="h5py is in the dev and data extras")
    script = Path(__file__).resolve().parent.parent / "data" / "fetch_offline_data.py"
    spec = importlib.util.spec_from_file_location("fetch", script)
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    torch.manual_seed(2)
    net = models.cifar10_cnn(pretrained=False)
    convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in net if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    dense = [m for m in net if isinstance(m, torch.nn.Linear)]
    names = []
    path = tmp_path / "cnn.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("model_weights")

        def put(name, **arrays):
            names.append(name)
            for k, v in arrays.items():
                g.create_dataset(f"{name}/{name}/{k}:0", data=v.detach().numpy())

        for i in range(6):
            put(f"conv2d{'_' + str(i) if i else ''}", kernel=convs[i].weight.permute(2, 3, 1, 0), bias=convs[i].bias)
            bn = bns[i]
            put(f"batch_normalization{'_' + str(i) if i else ''}", gamma=bn.weight, beta=bn.bias,
                moving_mean=bn.running_mean, moving_variance=bn.running_var)  # fmt: skip
            if i in (1, 3, 5):
                names.append(f"max_pooling2d{'_' + str(i // 2) if i > 1 else ''}")
        names.append("flatten")
        for j, lin in enumerate(dense):
            put(f"dense{'_' + str(j) if j else ''}", kernel=lin.weight.T, bias=lin.bias)
            if j < 2:
                names.append(f"dropout{'_' + str(j) if j else ''}")
        g.attrs["layer_names"] = [n.encode() for n in names]
    state = fetch.keras_to_state_dict(path)
    ref = net.state_dict()
    assert set(state) == set(ref)
    for k in ref:
        assert torch.equal(state[k], ref[k]), k
