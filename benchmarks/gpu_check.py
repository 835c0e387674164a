"""``make gpu-check``: the CUDA path in one prepared run — ``pytest -m gpu`` plus one benchmark row per model on CUDA.

1. ``pytest -m gpu tests/test_gpu.py``: solver, saliency, attacks and the engine on CUDA against the CPU (tolerances in
   that file's docstring); per-test outcome, time and the first lines of any failure.
2. One ``benchmarks/bench_flip.py`` row per model (trained / random MNIST MLP, Adult MLP, CIFAR-10 CNN, MNIST
   SmallCNN) with the model and the points on CUDA: flipfrag and every peer whose library is installed, passes per
   point, goal columns; a row that raises is recorded with its error and the next one runs.

Everything it needs is in the repository (shipped data and weights under data/) and the Python environment; it
never touches the network. The whole run is held to ``--budget-s`` (default 540 s, under the 10 minutes the issue
allows): the tests get at most ``--tests-s`` of it, and a benchmark row starts only while time is left.

Without a CUDA device it prints why, writes nothing and exits 0. With one, it writes
``benchmarks/results/gpu_check.{json,md}`` (device name, torch / CUDA / cuDNN versions, timings) and exits 1 when a test
failed or a row raised, else 0.

Usage::

    make gpu-check                                   # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --budget-s 300 --out /tmp/gpu   # a shorter run elsewhere
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: points per model for the benchmark rows (MLPs 16, CIFAR-10 photos 2, MNIST SmallCNN digits 4, ImageNet
#: photos 2: the ImageNet CNN row runs last, while the budget lasts)
POINTS = {"mnist-mlp": 16, "mnist-mlp-random": 16, "adult-mlp": 16, "cifar": 2, "mnist-cnn": 4, "imagenet": 2}


def no_cuda_message(out: Path) -> str:
    return (f"gpu-check: skipped — torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no CUDA "
            f"device (torch.cuda.is_available() is False). Nothing was run and nothing written to {out}. "
            "Run `make gpu-check` on a machine with an NVIDIA GPU (it needs only this repository and its Python "
            "environment, no network).")


def device_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
            "python": platform.python_version(), "host_cpu_threads": os.cpu_count()}


def run_tests(limit_s: float) -> dict:
    """``pytest -m gpu`` in a subprocess (killed after ``limit_s``); outcomes from its JUnit XML."""
    junit = Path(os.environ.get("TMPDIR", "/tmp")) / f"flipfrag-gpu-check-{os.getpid()}.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "tests/test_gpu.py"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-4000:]
    except subprocess.TimeoutExpired as err:
        rc = "timeout"
        tail = ((err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or ""))[-4000:]
    seconds = time.perf_counter() - t0
    tests = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = case.find(tag)
                if el is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (el.get("message") or el.text or "").strip()[:600]
                    break
            tests.append({"test": f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}",
                          "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
        junit.unlink()
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"command": " ".join(cmd[1:]), "returncode": rc, "seconds": seconds, "counts": counts, "tests": tests,
            "output_tail": tail}


def run_rows(deadline: float) -> dict:
    """One bench_flip row per model on CUDA, while time is left; errors recorded per row."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_flip as bf

    peers = tuple(p for p in bf.PEERS
                  if importlib.util.find_spec("torchattacks" if p.split("@")[0] in ("FAB", "DeepFool") else "foolbox"))
    cfg = {**bf.QUICK, "repeats": 1}
    models, errors, skipped = [], {}, []
    for key, loader in bf.LOADERS.items():
        if time.perf_counter() > deadline:
            skipped.append(key)
            continue
        t0 = time.perf_counter()
        try:
            spec = loader()
            if spec is None:
                errors[key] = "model not available"
                continue
            r = bf.run_model(spec, cfg, POINTS[key], repeats=1, slsqp=False, device="cuda", peers=peers)
            r["row_seconds"] = time.perf_counter() - t0
            models.append(r)
            print(f"  {r['model']}: flipfrag {r['ours_ms']:.1f} ms/point, {100 * r['certified']:.0f} % certified; "
                  + ", ".join(f"{p} {r[p]['ms']:.1f}" for p in r["peers"]), flush=True)
        except Exception as err:  # recorded, the next model still runs
            errors[key] = f"{type(err).__name__}: {err}"[:600] + " | " + traceback.format_exc(limit=-3)[-1200:]
            print(f"  {key}: {type(err).__name__}: {str(err)[:200]}", flush=True)
        finally:
            torch.cuda.empty_cache()
    result = {"mode": "gpu-check", "repeats": 1, "models": models, "notes": list(bf.NOTES)}
    result["rows"] = bf.flat_rows(result)
    return {"peers": list(peers), "points": POINTS, "models": models, "rows": result["rows"], "errors": errors,
            "skipped_for_time": skipped, "markdown": bf.to_markdown({**result, "machine": "CUDA"}) if models else ""}


def to_markdown(res: dict) -> str:
    d, t, b = res["device"], res["tests"], res["bench"]
    lines = ["# gpu-check: the CUDA path (`make gpu-check`)", "",
             f"Device: **{d['name']}** (compute capability {d['capability']}, {d['memory_gib']} GiB, "
             f"{d['count']} visible); torch {d['torch']}, CUDA {d['cuda']}, cuDNN {d['cudnn']}; TF32 matmul "
             f"{d['tf32_matmul']}, cuDNN {d['tf32_cudnn']} (the tests turn TF32 off for their comparisons). "
             f"Run at {res['started']}, {res['runtime_s']:.0f} s in all.", "",
             f"## pytest -m gpu ({t['seconds']:.0f} s, return code {t['returncode']})", "",
             ", ".join(f"{v} {k}" for k, v in t["counts"].items()), "", "| test | outcome | s | message |",
             "|---|---|---|---|"]
    for x in t["tests"]:
        msg = " ".join(x["message"].split())[:200].replace("|", "\\|")
        lines.append(f"| {x['test']} | {x['outcome']} | {x['seconds']:.1f} | {msg} |")
    lines += ["", "## One benchmark row per model on CUDA", ""]
    for key, err in b["errors"].items():
        lines.append(f"- **{key}**: raised `{' '.join(err.split())[:300]}`")
    if b["skipped_for_time"]:
        lines.append(f"- not run (time budget spent): {', '.join(b['skipped_for_time'])}")
    if b["markdown"]:
        body = b["markdown"].split("\n", 2)[2]  # the bench's tables, without its title line
        lines += ["", body]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    parser.add_argument("--budget-s", type=float, default=540.0, help="whole run (default 540 s)")
    parser.add_argument("--tests-s", type=float, default=300.0, help="at most this much for pytest -m gpu")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not torch.cuda.is_available():
        print(no_cuda_message(out))
        return 0
    t0 = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    info = device_info()
    print(f"gpu-check on {info['name']} (torch {info['torch']}, CUDA {info['cuda']})", flush=True)
    tests = run_tests(min(args.tests_s, args.budget_s))
    print(f"pytest -m gpu: {tests['counts']} in {tests['seconds']:.0f} s", flush=True)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    bench = run_rows(t0 + args.budget_s - 60)  # a row started in the last minute could overrun the budget
    res = {"device": info, "started": started, "runtime_s": time.perf_counter() - t0, "tests": tests, "bench": bench}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(to_markdown(res))
    ok = tests["returncode"] == 0 and not bench["errors"]
    print(f"gpu-check: {'all passed' if ok else 'FAILURES'} — wrote {out / 'gpu_check.json'} and .md "
          f"({res['runtime_s']:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
