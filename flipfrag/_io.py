"""File helpers shared by datasets, models, the caches and plotting: hashing (files, tensors, configuration keys),
atomic writes, verified downloads, the cache dir."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ChecksumError",
    "cache_dir",
    "sha256_file",
    "sha256_bytes",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "download",
    "verify_sha256",
    "write_checksummed",
    "verify_checksummed",
    "tensor_hash",
    "config_key",
]


_UMASK = os.umask(0)
os.umask(_UMASK)


class ChecksumError(RuntimeError):
    """A file's sha256 does not match the expected value (corrupt or tampered download/cache)."""


def cache_dir(sub: str = "") -> Path:
    """The cache folder: ``$FLIPFRAG_CACHE`` or ``~/.cache/flipfrag`` (created), optionally a subfolder."""
    root = Path(os.environ.get("FLIPFRAG_CACHE", Path.home() / ".cache" / "flipfrag")).expanduser()
    path = root / sub if sub else root
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 of the files' contents read one after another (a fingerprint of several source files)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str, *, what: str = "file") -> None:
    """Raise :class:`ChecksumError` naming the file if its sha256 does not start with ``expected``.

    ``expected`` is a full 64-hex digest, or a prefix (torchvision weight URLs carry the first 8 hex digits).
    """
    if not expected or len(expected) < 8:
        raise ValueError(f"expected sha256 must have at least 8 hex digits, got {expected!r}")
    actual = sha256_file(path)
    if not actual.startswith(expected.lower()):
        raise ChecksumError(
            f"{what} {path}: sha256 {actual} does not match expected {expected}; the file is corrupt or not the "
            "one this package was written for (delete it to re-download, or restore it from a clean checkout)"
        )


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in the target folder, then rename it onto ``path``.

    Readers never see a half-written file; on error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(path, lambda p: p.write_text(text))


def _sidecar(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".sha256")


def write_checksummed(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """:func:`atomic_write` plus a ``<name>.sha256`` sidecar holding the file's sha256 (for caches and checkpoints)."""
    path = atomic_write(path, write)
    atomic_write_bytes(_sidecar(path), (sha256_file(path) + "\n").encode())
    return path


def verify_checksummed(path: str | os.PathLike, error: type[Exception], what: str) -> Path:
    """Check a file written by :func:`write_checksummed`; raise ``error`` naming the file if it is missing, its
    sidecar is missing, or the sha256 does not match (corrupt or truncated)."""
    path = Path(path)
    sidecar = _sidecar(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if not sidecar.exists():
        raise error(f"{what} {path}: checksum file {sidecar.name} is missing")
    if sha256_file(path) != sidecar.read_text().strip():
        raise error(f"{what} {path}: sha256 does not match {sidecar.name} (corrupt or truncated)")
    return path


def download(url: str, dest: str | os.PathLike, *, sha256: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its sha256 (full digest or >= 8-digit prefix).

    An existing ``dest`` with the right checksum is reused; one with a wrong checksum is replaced. ``file://`` URLs
    work (that is how the tests exercise this path offline). Network errors are re-raised with the URL and a hint.
    """
    dest = Path(dest)
    if dest.exists():
        try:
            verify_sha256(dest, sha256, what="cached download")
            return dest
        except ChecksumError:
            dest.unlink()

    def fetch(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out)
        except OSError as err:  # URLError is an OSError
            raise OSError(
                f"could not download {url} ({err}); the 'paper' profile needs a network connection, or place the "
                f"file at {dest} yourself"
            ) from err
        verify_sha256(tmp, sha256, what=f"download of {url}")

    return atomic_write(dest, fetch)


def tensor_hash(*tensors: Any) -> str:
    """sha256 over the dtype, shape and bytes of torch tensors (keys the data a model was trained on, the inputs of
    a cached flip-point solve or grid cell)."""
    h = hashlib.sha256()
    for t in tensors:
        a = t.detach().cpu().contiguous().numpy()
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def config_key(config: dict[str, Any]) -> str:
    """A stable 16-hex key for a JSON-serialisable configuration dict (non-JSON values by ``str``)."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
