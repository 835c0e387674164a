"""Shared test settings: offline, 2 threads at most, a non-GUI backend, and a cache folder inside build/."""

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("FLIPFRAG_CACHE", str(Path(__file__).resolve().parent.parent / "build" / "test-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

import flipfrag  # noqa: E402

# `import flipfrag` sets nothing; the test process uses $FLIPFRAG_THREADS (make: 2), else 2
flipfrag.set_threads(int(os.environ.get(flipfrag.THREADS_ENV) or 2))

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
