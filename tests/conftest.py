"""Shared test settings: offline, 2 threads at most, a non-GUI backend, and a cache folder inside build/."""

import datetime
import json
import os
import platform
import subprocess
import time
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


# ------------------------------------------------------------------------------ the test-run summary (README)
#: ``make test`` sets this to benchmarks/results/test_run.json: the README's test counts are generated from it
#: (flipfrag/readme.py), never typed in.
SUMMARY_ENV = "FLIPFRAG_TEST_SUMMARY"
_OUTCOMES = ("passed", "failed", "skipped", "error", "xfailed", "xpassed", "deselected")


def pytest_sessionstart(session):
    session.config._flipfrag_t0 = time.perf_counter()
    # Taken out of the environment so that a pytest started by a test (tests/test_gpu.py runs one) writes no summary
    # of its own over this run's.
    session.config._flipfrag_summary = os.environ.pop(SUMMARY_ENV, None)


def pytest_sessionfinish(session, exitstatus):
    path = getattr(session.config, "_flipfrag_summary", None)
    if not path or hasattr(session.config, "workerinput"):  # not asked for, or an xdist worker
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter is not None else {}
    outcomes = {k: len([r for r in stats.get(k, []) if getattr(r, "when", "call") in ("call", "setup", None)])
                for k in _OUTCOMES}  # fmt: skip

    def git(*args):
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    target = Path(path).resolve()
    changed = [ln for ln in git("status", "--porcelain").splitlines() if target.name not in ln]
    args = session.config.invocation_params.args
    summary = {
        "collected": session.testscollected,
        "outcomes": outcomes,
        "exit_status": int(exitstatus),
        "selection": " ".join(args) + (f" -m '{session.config.option.markexpr}'" if session.config.option.markexpr
                                       else ""),  # fmt: skip
        "duration_s": round(time.perf_counter() - session.config._flipfrag_t0, 1),
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(changed),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(summary, indent=1) + "\n")
