"""Loaders: shapes, known facts of the real data, checksums, corrupted files, and the download path (offline)."""

import gzip
import io
import shutil
import tarfile

import numpy as np
import pytest
import torch

from flipfrag import _io, datasets
from flipfrag.datasets import ChecksumError


def test_shipped_files_all_listed_and_verified():
    files = {p.relative_to(datasets.DATA_DIR).as_posix() for p in datasets.DATA_DIR.rglob("*")
             if p.is_file() and p.parent != datasets.DATA_DIR}  # fmt: skip
    assert files == set(datasets.SHIPPED), "data/SHA256SUMS must list exactly the shipped files"
    for name in datasets.SHIPPED:
        datasets.shipped_path(name)  # raises on mismatch


def test_adult_matches_the_uci_description():
    d = datasets.load_adult()
    # UCI: 32,561 / 16,281 rows; 2,399 / 1,221 of them have a missing value -> 30,162 / 15,060 complete rows
    assert d.X_train.shape == (30162, 103) and d.X_test.shape == (15060, 103)
    assert int(d.y_train.sum()) == 7508  # 7,508 complete rows earn > 50K
    assert d.X_train.min() >= 0 and d.X_train.max() <= 1 and d.X_test.min() >= 0 and d.X_test.max() <= 1
    assert set(d.groups) == {"workclass", "education", "marital-status", "occupation", "relationship", "race", "sex",
                             "native-country"}  # fmt: skip
    assert len(d.groups["education"]) == 16 and len(d.groups["race"]) == 5 and len(d.groups["sex"]) == 1
    for name, cols in d.groups.items():
        if len(cols) > 1:  # each one-hot block has exactly one 1 per row
            assert torch.all(d.X_train[:, cols].sum(1) == 1), name
    # first row of adult.data: 39, State-gov, 77516, Bachelors, 13, Never-married, ..., Male, 2174, 0, 40
    raw = datasets._read_adult("adult.data").dropna().reset_index(drop=True)
    full = datasets.load_adult(n_train=None)
    orig = full.to_original_units(full.X_train)
    row = int(np.flatnonzero((raw["fnlwgt"] == 77516).to_numpy())[0])
    names = full.feature_names
    i = torch.nonzero((orig[:, names.index("fnlwgt")] - 77516).abs() < 0.5).flatten()
    assert len(i) == 1, "the row with fnlwgt 77516 is present once after shuffling"
    x = orig[i[0]]
    assert round(float(x[names.index("age")])) == raw.loc[row, "age"] == 39
    assert round(float(x[names.index("capital-gain")])) == 2174
    assert float(x[names.index("education=Bachelors")]) == 1.0 and float(x[names.index("sex=Male")]) == 1.0


def test_adult_subsets_are_stratified_and_seeded():
    a = datasets.load_adult(2000, 500, seed=3)
    b = datasets.load_adult(2000, 500, seed=3)
    c = datasets.load_adult(2000, 500, seed=4)
    assert a.X_train.shape == (2000, 103) and a.X_test.shape == (500, 103)
    assert torch.equal(a.X_train, b.X_train) and not torch.equal(a.X_train, c.X_train)
    assert abs(float(a.y_train.float().mean()) - 7508 / 30162) < 1e-3


def test_stratified_subset_properties():
    y = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    idx = datasets.stratified_subset(y, 30, seed=0)
    assert len(idx) == 30 and len(set(idx.tolist())) == 30
    assert torch.bincount(y[idx]).tolist() == [21, 6, 3]
    assert sorted(datasets.stratified_subset(y, None).tolist()) == list(range(100))
    with pytest.raises(ValueError, match="n must be"):
        datasets.stratified_subset(y, 0)


def test_mnist_offline_subset():
    d = datasets.load_mnist()
    assert d.X_train.shape == (4000, 1, 28, 28) and d.X_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(d.y_train).tolist() == [400] * 10
    assert 0 <= float(d.X_train.min()) and float(d.X_train.max()) == 1.0
    assert d.substitute and "5,000" in d.substitute
    small = datasets.load_mnist(600)
    assert small.X_train.shape[0] + small.X_test.shape[0] == 600
    two = datasets.load_two_class_mnist((3, 8), 300, 100)
    assert two.X_train.shape[0] == 300 and two.X_test.shape[0] == 100 and set(two.y_train.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="n_train"):
        datasets.load_two_class_mnist((3, 8), 900, 200)


def test_image_samples_and_sklearn_sets():
    im = datasets.load_imagenet_samples(227)
    assert im.X_test.shape == (20, 3, 227, 227) and len(im.class_names) == 1000
    assert im.class_names[int(im.y_test[0])] == "bull mastiff"  # imagenet_00_243.jpg: class 243
    c = datasets.load_cifar10()
    assert c.X_test.shape == (20, 3, 32, 32) and c.X_train.shape[0] == 0
    b = datasets.load_breast_cancer()
    assert b.X_train.shape == (455, 30) and b.X_test.shape == (114, 30) and b.X_train.min() == 0
    g = datasets.load_digits()
    assert g.X_train.shape[1:] == (1, 8, 8)


def test_imagenet_folder(tmp_path, monkeypatch):
    from PIL import Image

    for i, cls in enumerate([5, 7, 5]):
        Image.fromarray(np.full((40, 60, 3), 30 * i, np.uint8)).save(tmp_path / f"val_{i}_{cls}.png")
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path))
    d = datasets.load_imagenet_samples(32)
    assert d.X_test.shape == (3, 3, 32, 32) and sorted(d.y_test.tolist()) == [5, 5, 7]


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    dst = tmp_path / "data"
    shutil.copytree(datasets.DATA_DIR, dst)
    monkeypatch.setattr(datasets, "DATA_DIR", dst)
    return dst


def test_corrupted_shipped_file_is_rejected(data_copy):
    path = data_copy / "mnist" / "mnist_5k.csv.gz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ChecksumError, match="mnist_5k.csv.gz"):
        datasets.load_mnist()


def test_missing_shipped_file_is_named(data_copy):
    (data_copy / "adult" / "adult.test.gz").unlink()
    with pytest.raises(FileNotFoundError, match="adult.test.gz"):
        datasets.load_adult()


def test_download_verifies_sha256_against_a_local_file(tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(b"flipfrag" * 1000)
    good = _io.sha256_file(src)
    dest = tmp_path / "cache" / "payload.bin"
    assert _io.download(src.as_uri(), dest, sha256=good).read_bytes() == src.read_bytes()
    # prefix form (torchvision weight names carry 8 hex digits)
    dest.unlink()
    _io.download(src.as_uri(), dest, sha256=good[:8])
    # wrong checksum: error names the URL, and nothing is left at dest
    bad_dest = tmp_path / "cache" / "bad.bin"
    with pytest.raises(ChecksumError, match="payload.bin"):
        _io.download(src.as_uri(), bad_dest, sha256="0" * 64)
    assert not bad_dest.exists() and not list(bad_dest.parent.glob(".bad.bin.*"))
    # a corrupted cached copy is replaced by a fresh download
    dest.write_bytes(b"garbage")
    _io.download(src.as_uri(), dest, sha256=good)
    assert _io.sha256_file(dest) == good
    with pytest.raises(OSError, match="could not download"):
        _io.download((tmp_path / "nope.bin").as_uri(), tmp_path / "x.bin", sha256=good)


def _tiny_flowers_archive(path):
    from PIL import Image

    with tarfile.open(path, "w:gz") as tar:
        for cls, color in (("roses", (200, 20, 40)), ("sunflowers", (230, 200, 20)), ("tulips", (0, 0, 0))):
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(np.full((50, 70, 3), color, np.uint8)).save(buf, format="JPEG")
                info = tarfile.TarInfo(f"flower_photos/{cls}/{i}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)


def test_flowers_download_path_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "flower_photos.tgz"
    _tiny_flowers_archive(archive)
    sha = _io.sha256_file(archive)
    d = datasets.load_flowers(6, 4, size=32, url=archive.as_uri(), sha256=sha)
    assert d.X_train.shape == (6, 3, 32, 32) and d.X_test.shape == (4, 3, 32, 32)
    assert torch.bincount(d.y_test).tolist() == [2, 2]
    red = d.X_train[d.y_train == 0].mean((0, 2, 3))
    assert red[0] > 0.6 and red[2] < 0.3  # roses are the red ones: labels follow the folder names
    with pytest.raises(ChecksumError):
        (tmp_path / "cache" / "downloads" / "flower_photos.tgz").unlink()
        datasets.load_flowers(6, 4, size=32, url=archive.as_uri(), sha256="f" * 64)


def test_adult_gz_is_the_uci_text():
    text = gzip.decompress(datasets.shipped_path("adult/adult.test.gz").read_bytes()).decode()
    assert text.startswith("|1x3 Cross validator") and text.count("\n") >= 16281


def test_natural_images_are_the_shipped_32px_photos_with_cifar10_labels_only_where_true():
    nat = datasets.load_natural_images()
    assert nat.X.shape == (66, 3, 32, 32) and nat.X.min() >= 0 and nat.X.max() <= 1
    assert [nat.source.count(k) for k in datasets.NATURAL_SOURCES] == [20, 20, 20, 4, 2]
    cifar = datasets.load_cifar10()
    assert torch.equal(nat.X[:20], cifar.X_test) and torch.equal(nat.label[:20], cifar.y_test)
    assert (nat.label[20:] == -1).all() and int(nat.has_label.sum()) == 20
    only = datasets.load_natural_images(["skimage"])
    assert len(only) == 4 and only.name[1] == "skimage_chelsea.png"
    with pytest.raises(ValueError, match="sources"):
        datasets.load_natural_images(["cifar10", "svhn"])
