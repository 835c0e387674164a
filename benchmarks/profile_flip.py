"""Where flipfrag's time and passes go on one benchmark model (issue 25: the speed goal against DDN / FMN).

Wraps the pipeline's steps (screening, the direct SQP with its evaluations and line searches, DeepFool steps,
segment crossings, the solves from crossings, certification) and reports per point: milliseconds (inclusive) and
forward / backward passes counted as ``bench_flip.PassCounter`` does. Prints only (a diagnosis, not a result file).

Usage::

    python benchmarks/profile_flip.py                  # trained MNIST MLP, 16 points, 1 thread
    python benchmarks/profile_flip.py --model mnist-mlp-random --points 64
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_flip as bf  # noqa: E402

import flipfrag.flip.pool as PO  # noqa: E402
import flipfrag.flip.sqp as SQ  # noqa: E402
import flipfrag.flip.steps as S  # noqa: E402
from flipfrag.flip import closest_flip_point  # noqa: E402

STEPS = [(S, "_screen_targets", "screen"), (S, "_deepfool", "DeepFool steps"),
         (S, "_segment_crossing", "segment crossings"), (S, "_run_sqp", "SQP from x_hat"),
         (PO, "_run_sqp", "SQP from crossings"), (S, "_certify", "certify"), (PO, "_certify", "certify"),
         (SQ, "_evaluate", "  SQP: scores + rows"), (SQ, "_line_search_step", "  SQP: line search"),
         (SQ, "_qp_step", "  SQP: QP (dual Newton)")]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mnist-mlp", choices=sorted(bf.LOADERS))
    ap.add_argument("--points", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = bf.LOADERS[args.model]()
    net = bf.PassCounter(spec["net"]).eval()
    x = spec["X"][: args.points].float()
    stats: dict = collections.defaultdict(lambda: [0.0, 0, 0, 0])
    stack: list = []
    originals = []

    def wrap(mod, name, label):
        f = getattr(mod, name)
        originals.append((mod, name, f))

        def w(*a, **k):
            t0, f0, b0 = time.perf_counter(), net.tally.fwd, net.tally.bwd
            stack.append(label)
            try:
                return f(*a, **k)
            finally:
                stack.pop()
                if label not in stack:
                    s = stats[label]
                    s[0] += time.perf_counter() - t0
                    s[1] += net.tally.fwd - f0
                    s[2] += net.tally.bwd - b0
                    s[3] += 1

        setattr(mod, name, w)

    for mod, name, label in STEPS:
        wrap(mod, name, label)
    try:
        closest_flip_point(net, x[:1], lower=spec["lo"], upper=spec["hi"], max_iter=3)  # warm-up
        stats.clear()
        net.tally.reset()
        t0 = time.perf_counter()
        res = closest_flip_point(net, x, lower=spec["lo"], upper=spec["hi"])
        total = time.perf_counter() - t0
    finally:
        for mod, name, f in originals:
            setattr(mod, name, f)
    N = len(x)
    print(f"{spec['label']}, {N} points, {args.threads} thread(s): {1000 * total / N:.1f} ms/point, passes "
          f"{net.tally.fwd / N:.0f} fwd / {net.tally.bwd / N:.0f} bwd per point, certified {res.success_rate:.0%}")
    print(f"{'step':26s} {'ms/point':>9s} {'share':>6s} {'fwd':>6s} {'bwd':>6s} calls")
    for k, (t, f, b, n) in sorted(stats.items(), key=lambda kv: -kv[1][0]):
        print(f"{k:26s} {1000 * t / N:9.1f} {t / total:6.0%} {f / N:6.0f} {b / N:6.0f} {n}")
    return {"total_s": total, "steps": dict(stats)}


if __name__ == "__main__":
    main()
