"""Closest flip points: flipfrag vs the minimal-perturbation attacks FAB and DeepFool (torchattacks) and SciPy SLSQP.

The problem (per input x_hat, all target classes): minimise ||x - x_hat||_2 subject to z_s(x) = z_t(x) for some
t != s with every other class below, inside the data's box (images: [0, 1]).

* **flipfrag** ``closest_flip_point(model, x, lower, upper)`` — all points and targets in one batched call, every
  result certified (residual, margin, bounds, KKT, and within 1 % of its own segment-crossing upper bound).
* **FAB** ``torchattacks.FAB(model, norm="L2", eps=10, steps=100, n_restarts=1)`` (Croce & Hein 2020) and
  **DeepFool** ``torchattacks.DeepFool(model, steps=50, overshoot=0.02)``: label-changing points, not flip points.
  Their distance ``||x_adv - x||`` bounds the closest flip point's from above (the segment to x_adv crosses the
  boundary); so does the first crossing on that segment (``crossing``), found here by a fine scan and bisection.
  flipfrag is given neither.
* **SLSQP** (``scipy.optimize.minimize(method="SLSQP")``, float64, exact score Jacobians by autograd, one call per
  (point, target)); it is slow (dense n x n quasi-Newton matrices), so it runs on a few points only — all targets of
  one point ("measured"), or in ``--quick`` mode the runner-up target of one point times (C - 1) ("estimated").

Models: a 784-100-100-10 tanh MLP trained 15 epochs on the 4,000 training digits of the shipped MNIST-5k, the same
MLP untrained (random), an Adult MLP (104 features, one-hot blocks relaxed to [0, 1]), and — when
``flipfrag.models.cifar10_cnn`` is available and not ``--quick`` — the pretrained CIFAR-10 CNN on 10 of the 20 shipped
CIFAR-10 photos (no SLSQP there: hours per point at n = 3072).
All models float32 (as users run them); flipfrag solves in float64 and certifies in float32.

Reported per model: ms per point for every method (same batch, after a warm-up), certified share (flipfrag) or
label-changed share (attacks), and per point the distance ratio flipfrag / peer (median, max, count > 1.01),
against the peer's distance and against the crossing on the segment to the peer's point.

Usage::

    python benchmarks/bench_flip.py            # ~15 minutes on shared cores (1 torch thread)
    python benchmarks/bench_flip.py --quick    # ~3 minutes: fewer points, no CNN, SLSQP estimated from one solve
    python benchmarks/bench_flip.py --only cifar --cifar-points 10   # the CIFAR-10 CNN row alone, 10 photos

Writes ``benchmarks/results/flip.{json,md}`` (``flip_quick.*`` with ``--quick``, ``flip_cifar.*`` with
``--only cifar``).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from flipfrag import datasets, models
from flipfrag._io import atomic_write, atomic_write_json
from flipfrag.flip import closest_flip_point

RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"points": 64, "cifar_points": 10, "slsqp": "measured", "repeats": 3}
QUICK = {"points": 16, "cifar_points": 0, "slsqp": "estimated", "repeats": 1}


# ----------------------------------------------------------------------------------------------------- models


def mnist_mlp(trained: bool, seed: int = 0):
    ds = datasets.load_mnist(seed=seed)
    torch.manual_seed(seed)
    net = models.MLP(784, [100, 100], 10, activation="tanh")
    if trained:
        models.train(net, ds.X_train, ds.y_train, epochs=15, lr=1e-3, seed=seed, progress=False)
    return net.eval(), ds.X_test, 0.0, 1.0, f"MNIST MLP 784-100-100-10 tanh ({'trained' if trained else 'random'})"


def adult_mlp(seed: int = 0):
    ds = datasets.load_adult(n_train=6000, n_test=1000, seed=seed)
    torch.manual_seed(seed)
    n = ds.X_train.shape[1]
    net = models.MLP(n, [64, 64], 2, activation="tanh")
    models.train(net, ds.X_train.float(), ds.y_train, epochs=10, lr=1e-3, seed=seed, progress=False)
    return net.eval(), ds.X_test.float(), 0.0, 1.0, f"Adult MLP {n}-64-64-2 tanh (trained)"


def cifar_cnn():
    if not hasattr(models, "cifar10_cnn"):
        return None
    net = models.cifar10_cnn(pretrained=True).eval()
    ds = datasets.load_cifar10()
    return net, ds.X_test.float(), 0.0, 1.0, "CIFAR-10 CNN (pretrained, shipped photos)"


# ----------------------------------------------------------------------------------------------------- peers


def attack(name: str, net, x, y, n_classes: int):
    import torchattacks

    if name == "FAB":
        atk = torchattacks.FAB(net, norm="L2", eps=10, steps=100, n_restarts=1, n_classes=n_classes)
    else:
        atk = torchattacks.DeepFool(net, steps=50, overshoot=0.02)
    out = atk(x, y)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def first_crossing(net, x, x_end, y, samples: int = 256, bisections: int = 40) -> torch.Tensor:
    """Distance to the first point on the segment x -> x_end where the label leaves y (inf if never): a scan with
    ``samples`` points, then bisection. An independent check of the bound a label-changing point gives."""
    out = torch.full((len(x),), math.inf, dtype=torch.float64)
    ts = torch.linspace(0, 1, samples + 1, dtype=torch.float64)[1:]
    for i in range(len(x)):
        d = (x_end[i] - x[i]).double()
        pts = (x[i].double() + ts.reshape(-1, *[1] * d.dim()) * d).to(x.dtype)
        lab = net(pts).argmax(1)
        hit = torch.nonzero(lab != y[i])
        if len(hit) == 0:
            continue
        j = int(hit[0])
        lo, hi = (float(ts[j - 1]) if j else 0.0), float(ts[j])
        for _ in range(bisections):
            mid = 0.5 * (lo + hi)
            if int(net((x[i].double() + mid * d).to(x.dtype)[None]).argmax(1)) != int(y[i]):
                hi = mid
            else:
                lo = mid
        out[i] = hi * float(d.norm())
    return out


def slsqp_flip(net, xh: torch.Tensor, s: int, t: int, lower: float, upper: float, maxiter: int = 200) -> dict:
    """One SciPy SLSQP solve from x_hat (float64 copy of the model); distance inf if its result is infeasible."""
    model = net
    shape = xh.shape
    xh_np = xh.detach().double().reshape(-1).numpy()
    memo: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def scores(v):
        key = v.tobytes()
        if key not in memo:
            memo.clear()
            xt = torch.tensor(v, dtype=torch.float64).reshape(1, *shape).requires_grad_(True)
            z = model(xt)[0]
            J = torch.stack([torch.autograd.grad(z[k], xt, retain_graph=True)[0].reshape(-1) for k in range(len(z))])
            memo[key] = (z.detach().numpy(), J.numpy())
        return memo[key]

    C = len(scores(xh_np)[0])
    others = [k for k in range(C) if k not in (s, t)]
    cons = [{"type": "eq", "fun": lambda v: np.array([scores(v)[0][s] - scores(v)[0][t]]),
             "jac": lambda v: (scores(v)[1][s] - scores(v)[1][t])[None]}]
    if others:
        cons.append({"type": "ineq", "fun": lambda v: scores(v)[0][t] - scores(v)[0][others],
                     "jac": lambda v: scores(v)[1][t][None] - scores(v)[1][others]})
    t0 = time.perf_counter()
    res = minimize(lambda v: 0.5 * np.sum((v - xh_np) ** 2), xh_np.copy(), jac=lambda v: v - xh_np, method="SLSQP",
                   constraints=cons, bounds=[(lower, upper)] * len(xh_np),
                   options={"maxiter": maxiter, "ftol": 1e-10})
    seconds = time.perf_counter() - t0
    z, _ = scores(res.x)
    tol = 1e-6 * max(1.0, abs(z[s]), abs(z[t]))
    feasible = abs(z[s] - z[t]) <= tol and (not others or np.min(z[t] - z[others]) >= -tol)
    return {"distance": float(np.linalg.norm(res.x - xh_np)) if feasible else math.inf, "seconds": seconds,
            "nit": int(res.nit)}


# ----------------------------------------------------------------------------------------------------- one model


def ratios(ours: torch.Tensor, peer: torch.Tensor) -> dict:
    ok = torch.isfinite(ours) & torch.isfinite(peer) & (peer > 0)
    r = (ours[ok] / peer[ok]).tolist()
    return {"compared": len(r), "median": statistics.median(r) if r else None, "max": max(r) if r else None,
            "farther_1pct": sum(v > 1.01 for v in r)}


def timed(fns: dict, repeats: int) -> dict:
    """{name: (median seconds over `repeats` runs, last output)}; the methods take turns in every round, so that
    load from other jobs on the shared machine falls on all of them alike."""
    times: dict = {k: [] for k in fns}
    outs: dict = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            outs[k] = fn()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(times[k]), outs[k]) for k in fns}


def run_model(spec, cfg: dict, n_points: int, repeats: int | None = None, slsqp: bool = True) -> dict:
    net, X, lo, hi, label = spec
    repeats = cfg["repeats"] if repeats is None else repeats
    x = X[:n_points].float()
    with torch.no_grad():
        y = net(x).argmax(1)
    C = int(net(x[:1]).shape[1])
    N = len(x)
    # warm-up of every method (first-call costs of autograd / BLAS are not the method's); a cheap 1-point solve
    closest_flip_point(net, x[:1], lower=lo, upper=hi, max_iter=3, upper_bounds=False, screen=1)
    attack("FAB", net, x[:1], y[:1], C)
    attack("DeepFool", net, x[:1], y[:1], C)
    runs = timed({"ours": lambda: closest_flip_point(net, x, lower=lo, upper=hi),
                  "FAB": lambda: attack("FAB", net, x, y, C),
                  "DeepFool": lambda: attack("DeepFool", net, x, y, C)}, repeats)
    (t_ours, res), (t_fab, x_fab), (t_df, x_df) = runs["ours"], runs["FAB"], runs["DeepFool"]
    out = {"model": label, "points": N, "classes": C, "features": int(x[0].numel()), "repeats": repeats,
           "ours_ms": 1000 * t_ours / N, "certified": res.success_rate,
           "ours_status_failed": [s for s in res.status if s != "converged"][:5]}
    ours = res.distance.to(torch.float64)
    for name, xa, t in (("FAB", x_fab, t_fab), ("DeepFool", x_df, t_df)):
        with torch.no_grad():
            changed = net(xa).argmax(1) != y
        dist = torch.where(changed, (xa - x).flatten(1).norm(dim=1).double(), torch.full((N,), math.inf,
                                                                                         dtype=torch.float64))
        cross = first_crossing(net, x, xa, y)
        out[name] = {"ms": 1000 * t / N, "label_changed": float(changed.float().mean()),
                     "ratio_to_distance": ratios(ours, dist), "ratio_to_crossing": ratios(ours, cross)}
    out["speedup_vs_FAB"] = out["FAB"]["ms"] / out["ours_ms"]
    out["speedup_vs_DeepFool"] = out["DeepFool"]["ms"] / out["ours_ms"]
    if not slsqp:
        out["SLSQP"] = {"ms": math.nan, "basis": "not run (hours per point at this size)", "pairs": [],
                        "ratio_point0": None, "ratio_pairs": {}}
        out["speedup_vs_SLSQP"] = math.nan
        return out
    # SLSQP on one point (float64 copy of the model)
    net64 = __import__("copy").deepcopy(net).double()
    s = int(y[0])
    if cfg["slsqp"] == "measured":
        sol = [(t, slsqp_flip(net64, x[0], s, t, lo, hi)) for t in range(C) if t != s]
        ms = 1000 * sum(r["seconds"] for _, r in sol)
        basis = f"measured: point 0, all {C - 1} targets"
    else:
        with torch.no_grad():
            z = net(x[:1])[0]
        t_ru = int(z.scatter(0, torch.tensor([s]), -math.inf).argmax())
        sol = [(t_ru, slsqp_flip(net64, x[0], s, t_ru, lo, hi))]
        ms = 1000 * sol[0][1]["seconds"] * (C - 1)
        basis = f"estimated: point 0, runner-up target x {C - 1}"
    d_slsqp = min(r["distance"] for _, r in sol)
    out["SLSQP"] = {"ms": ms, "basis": basis, "pairs": [(t, r["distance"], r["nit"]) for t, r in sol],
                    "ratio_point0": (float(ours[0]) / d_slsqp) if math.isfinite(d_slsqp) else None,
                    "ratio_pairs": ratios(torch.tensor([float(res.distances[0, t]) for t, _ in sol]),
                                          torch.tensor([r["distance"] for _, r in sol]))}
    out["speedup_vs_SLSQP"] = ms / out["ours_ms"]
    return out


# ----------------------------------------------------------------------------------------------------- report


def _fmt_ratio(d: dict) -> str:
    if not d or d.get("median") is None:
        return "-"
    return f"{d['median']:.3f} / {d['max']:.3f} / {d['farther_1pct']} of {d['compared']}"


def to_markdown(result: dict) -> str:
    single = [r["model"] for r in result["models"] if r.get("repeats", result["repeats"]) != result["repeats"]]
    runs = f"{result['repeats']} run(s)" + (f" (one run for {', '.join(single)})" if single else "")
    lines = ["# flip: flipfrag vs FAB, DeepFool (torchattacks) and SciPy SLSQP", "",
             f"Machine: {result['machine']}; mode: {result['mode']}; times are medians of {runs} "
             "on the same batch after a warm-up, the methods taking turns; 2 cores shared with other jobs "
             "(absolute times carry up to 2x noise, ratios come from the same rounds).", "",
             "## Time per point (all targets) and certified share", "",
             "| model | points | flipfrag ms | certified | FAB ms | DeepFool ms | SLSQP ms (basis) | "
             "vs FAB | vs DeepFool | vs SLSQP |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        lines.append(
            f"| {r['model']} | {r['points']} | {r['ours_ms']:.1f} | {100 * r['certified']:.1f} % | "
            f"{r['FAB']['ms']:.1f} | {r['DeepFool']['ms']:.1f} | {r['SLSQP']['ms']:.0f} ({r['SLSQP']['basis']}) | "
            f"{r['speedup_vs_FAB']:.1f}x | {r['speedup_vs_DeepFool']:.1f}x | {r['speedup_vs_SLSQP']:.0f}x |")
    lines += ["", "## Distance ratio flipfrag / peer per point: median / max / count farther than 1 %", "",
              "| model | FAB distance | FAB crossing | DeepFool distance | DeepFool crossing | SLSQP (point 0) | "
              "FAB / DeepFool label changed |", "|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        sl = r["SLSQP"]["ratio_point0"]
        lines.append(
            f"| {r['model']} | {_fmt_ratio(r['FAB']['ratio_to_distance'])} | "
            f"{_fmt_ratio(r['FAB']['ratio_to_crossing'])} | {_fmt_ratio(r['DeepFool']['ratio_to_distance'])} | "
            f"{_fmt_ratio(r['DeepFool']['ratio_to_crossing'])} | {'-' if sl is None else f'{sl:.4f}'} | "
            f"{100 * r['FAB']['label_changed']:.0f} % / {100 * r['DeepFool']['label_changed']:.0f} % |")
    lines += ["", "Goals (issue 13): >= 2x faster than FAB, >= 1000x SLSQP, certified share >= 99 %, no point "
              "farther than 1.01 x any peer's crossing.", "", "## Notes", ""]
    lines += [f"- {n}" for n in result["notes"]]
    for r in result["models"]:
        if r["ours_status_failed"]:
            lines.append(f"- {r['model']}: failed points (first 5): {r['ours_status_failed']}")
    return "\n".join(lines) + "\n"


NOTES = [
    "flipfrag is not given the peers' points; its upper bounds come from its own DeepFool-style steps and its own "
    "iterates. The crossing on the segment to a peer's point is found by a 256-point scan plus bisection (an "
    "independent check): a ratio <= 1.01 there means no peer found a boundary point more than 1 % closer.",
    "Distances are L2 in input units; FAB and DeepFool distances include their overshoot past the boundary.",
    "SLSQP runs one (point, target) at a time in float64; it is timed on one point only (see basis).",
    "Adult: the one-hot blocks are relaxed to [0, 1] (no `groups`), so all methods solve the same continuous problem.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points, SLSQP estimated from one solve")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    parser.add_argument("--only", choices=["cifar"], help="run only this model's row (written to flip_<only>.*)")
    parser.add_argument("--cifar-points", type=int, help="CIFAR-10 photos (default: 2 in full mode, 0 in quick)")
    args = parser.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.cifar_points is not None:
        if args.cifar_points < 1:
            parser.error("--cifar-points must be >= 1")
        cfg["cifar_points"] = args.cifar_points
    if args.only == "cifar" and not cfg["cifar_points"]:
        parser.error("--only cifar needs CIFAR-10 photos (not --quick, or give --cifar-points)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    mode = ("quick" if args.quick else "full") + (f", only {args.only}" if args.only else "")
    result = {"mode": mode, "repeats": 1 if args.only == "cifar" else cfg["repeats"],
              "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
              "models": [], "notes": NOTES}
    specs = [] if args.only else [(mnist_mlp(True), cfg["points"]), (mnist_mlp(False), cfg["points"]),
                                  (adult_mlp(), cfg["points"])]
    cnn = cifar_cnn() if cfg["cifar_points"] else None
    if cnn is not None:
        specs.append((cnn, cfg["cifar_points"]))
    else:
        result["notes"].append("No CIFAR-10 CNN row (--quick, or flipfrag.models.cifar10_cnn not available).")
    for spec, n_points in specs:
        is_cnn = spec is cnn
        r = run_model(spec, cfg, n_points, repeats=1 if is_cnn else None, slsqp=not is_cnn)
        result["models"].append(r)
        print(f"{r['model']}: flipfrag {r['ours_ms']:.1f} ms ({100 * r['certified']:.0f} % certified), FAB "
              f"{r['FAB']['ms']:.1f}, DeepFool {r['DeepFool']['ms']:.1f}, SLSQP {r['SLSQP']['ms']:.0f} ms/point",
              flush=True)
    result["runtime_s"] = time.perf_counter() - t0
    # a quick check or a single row never overwrites the full results
    stem = f"flip_{args.only}" if args.only else ("flip_quick" if args.quick else "flip")
    atomic_write_json(RESULTS / f"{stem}.json", result)
    md = to_markdown(result)
    atomic_write(RESULTS / f"{stem}.md", lambda p: p.write_text(md))
    for name in (f"{stem}.json", f"{stem}.md"):  # readable like the other results (the temporary file was 0600)
        (RESULTS / name).chmod(0o644)
    print(md)


if __name__ == "__main__":
    main()
