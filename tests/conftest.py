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


#: Why a test marked ``gpu`` did not run: printed by ``pytest -rs`` (tests/test_gpu.py checks this text).
NO_CUDA_REASON = ("gpu: no CUDA device visible to torch (torch.cuda.is_available() is False) — these tests compare "
                  "CUDA results with the CPU's; run them on a GPU machine with `make gpu-check` or `pytest -m gpu`")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with :data:`NO_CUDA_REASON`, where torch sees no CUDA device; the default run
    deselects nothing (on a GPU machine the same ``pytest`` runs them)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA_REASON)
    for item in gpu_items:
        item.add_marker(skip)
