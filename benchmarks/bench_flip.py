"""Closest flip points: flipfrag vs the minimum-norm attacks FAB, DeepFool (torchattacks), FMN, DDN (foolbox) and SLSQP.

The problem (per input x_hat, all target classes): minimise ||x - x_hat||_2 subject to z_s(x) = z_t(x) for some
t != s with every other class below, inside the data's box (images: [0, 1]).

* **flipfrag** ``closest_flip_point(model, x, lower, upper)`` — all points and targets in one batched call, every
  result certified (residual, margin, bounds, KKT or region gap, and within 1 % of its own segment-crossing bound).
* **FAB** ``torchattacks.FAB(model, norm="L2", eps=10, steps=100, n_restarts=1)`` (Croce & Hein 2020),
  **DeepFool** ``torchattacks.DeepFool(model, steps=50, overshoot=0.02)``, **FMN** ``foolbox.attacks.L2FMNAttack()``
  (Pintor et al. 2021) and **DDN** ``foolbox.attacks.DDNAttack()`` (Rony et al. 2019), the latter two at their
  documented defaults (100 steps) and at flipfrag's budget (``@budget``: as many steps as flipfrag's forward /
  backward passes per point on that model): label-changing points, not flip points. Their distance
  ``||x_adv - x||`` bounds the closest flip point's from above (the segment to x_adv crosses the boundary); so does
  the first crossing on that segment (``crossing``), found here by a fine scan and bisection. flipfrag is given none.
* **SLSQP** (``scipy.optimize.minimize(method="SLSQP")``, float64, exact score Jacobians by autograd, one call per
  (point, target)); it is slow (dense n x n quasi-Newton matrices), so it runs on a few points only — all targets of
  one point ("measured"), or in ``--quick`` mode the runner-up target of one point times (C - 1) ("estimated").

**Passes** (AttackBench's cost measure): every method runs on the model wrapped in :class:`PassCounter` — forward
calls x batch rows, backward passes reaching the output x their rows — reported per point, so that speed is compared
per pass as well as per second.

**Goals** per model (issue 25): >= 2x the fastest peer that gets within 1 % of flipfrag's distance (a peer
*qualifies* when it changes >= 99 % of the labels and its median crossing is within 1 % of flipfrag's distance);
never farther than 1.01 x any peer's crossing; >= 99 % certified.

Models: a 784-100-100-10 tanh MLP trained 15 epochs on the 4,000 training digits of the shipped MNIST-5k, the same
MLP untrained (random), an Adult MLP (104 features, one-hot blocks relaxed to [0, 1]), the pretrained CIFAR-10 CNN
on the shipped CIFAR-10 photos and the shipped MNIST SmallCNN (ReLU, max-pooling) on MNIST-5k test digits (no SLSQP
on the CNNs: hours per point). All models float32 (as users run them); flipfrag solves in float64 and certifies in
float32.

Reported per model: ms and passes per point for every method (same batch, after a warm-up, the methods taking
turns), certified share (flipfrag) or label-changed share (attacks), per point the distance ratio flipfrag / peer
(median, max, count > 1.01) against the peer's distance and against its crossing, and the goal columns. The JSON
also has ``rows``: one flat record per (model, method) — ``ms_per_point``, ``passes_fwd``, ``passes_bwd``,
``certified_share``, ``label_changed_share``, ratios, ``qualifies`` and the ``goal_*`` fields.

Usage::

    python benchmarks/bench_flip.py            # 64 points per MLP, 10 photos, 64 digits, 3 rounds (long)
    python benchmarks/bench_flip.py --quick    # 16 / 2 / 8 points, one round, SLSQP estimated (~12 min loaded)
    python benchmarks/bench_flip.py --only cifar --cifar-points 10   # the CIFAR-10 CNN row alone, 10 photos
    python benchmarks/bench_flip.py --only mnist-cnn --cnn-points 64 # the MNIST SmallCNN row alone
    python benchmarks/bench_flip.py --only imagenet  # EfficientNet-Lite0, 2 shipped photos, runner-up target
    python benchmarks/bench_flip.py --smoke    # 2 random-MLP points, 1 digit: prints only

Writes ``benchmarks/results/flip.{json,md}`` (``flip_quick.*``, git-ignored, with ``--quick``; ``flip_<only>.*``
with ``--only``; ``--stem`` / ``--out`` choose others, ``--note`` adds a sentence on the run, e.g. the load).
(The loaded ``--quick`` run ``flip_peers.*`` of issue 25 was removed once ``flip.*`` had every peer on every model.)
"""

from __future__ import annotations

import argparse
import copy
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
from flipfrag._proc import peak_rss_gb, reset_peak_rss
from flipfrag.flip import closest_flip_point

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------- models
# Each loader returns a spec: the model (float32, eval mode), its test inputs, the box, a label and a short key.


def mnist_mlp(trained: bool, seed: int = 0) -> dict:
    ds = datasets.load_mnist(seed=seed)
    torch.manual_seed(seed)
    net = models.MLP(784, [100, 100], 10, activation="tanh")
    if trained:
        models.train(net, ds.X_train, ds.y_train, epochs=15, lr=1e-3, seed=seed, progress=False)
    return {"net": net.eval(), "X": ds.X_test, "lo": 0.0, "hi": 1.0,
            "label": f"MNIST MLP 784-100-100-10 tanh ({'trained' if trained else 'random'})",
            "key": "mnist-mlp" if trained else "mnist-mlp-random"}


def adult_mlp(seed: int = 0) -> dict:
    ds = datasets.load_adult(n_train=6000, n_test=1000, seed=seed)
    torch.manual_seed(seed)
    n = ds.X_train.shape[1]
    net = models.MLP(n, [64, 64], 2, activation="tanh")
    models.train(net, ds.X_train.float(), ds.y_train, epochs=10, lr=1e-3, seed=seed, progress=False)
    return {"net": net.eval(), "X": ds.X_test.float(), "lo": 0.0, "hi": 1.0,
            "label": f"Adult MLP {n}-64-64-2 tanh (trained)", "key": "adult-mlp"}


def cifar_cnn() -> dict | None:
    if not hasattr(models, "cifar10_cnn"):
        return None
    net = models.cifar10_cnn(pretrained=True).eval()
    ds = datasets.load_cifar10()
    return {"net": net, "X": ds.X_test.float(), "lo": 0.0, "hi": 1.0,
            "label": "CIFAR-10 CNN (pretrained, shipped photos)", "key": "cifar"}


def mnist_cnn(seed: int = 0) -> dict:
    """The shipped MNIST SmallCNN (ReLU, max-pooling; ``trained_model("mnist-cnn", "quick")``, weights in
    data/models) on the first test digits of MNIST-5k."""
    net, ds, _ = models.trained_model("mnist-cnn", "quick", seed=seed)
    return {"net": net.float().eval(), "X": ds.X_test.float(), "lo": 0.0, "hi": 1.0,
            "label": "MNIST SmallCNN (ReLU, shipped weights)", "key": "mnist-cnn"}


def imagenet_cnn() -> dict:
    """The ImageNet CNN (EfficientNet-Lite0, ImageNet weights, ReLU6) on the shipped photos (224 x 224, in [0, 1]):
    150,528 inputs, 1000 classes. Flip points toward the runner-up class at x (``target``): screening all 1000
    classes would cost a 1000-row Jacobian per point. FAB runs targeted at the runner-up (``multi_targeted``, one
    target class); FMN and DDN untargeted (one gradient per step whatever C); torchattacks' DeepFool is left out (it
    differentiates all 1000 classes in every step).

    Measured (issue 25, 2026-12-08, ``results/flip_imagenet.*``: 2 torch threads on the 2-core CPU, other jobs
    beside it part of the time): 778 s per photo (736 / 391 passes per point), peak resident memory 17.3 GB during
    flipfrag's solve (the peers: 4.5 GB). Photo 0 certified at 0.0586 (DDN's crossing 1.0015 x it, FAB's
    1.0085 x; alone in a 1-photo run: 477 s, the same point); photo 1 not certified (its SQP stopped at max_iter at
    0.136 and the closest crossing found, 0.129, was not polished to a certificate). The peers take 13-20 s per
    photo in a batch of 2. Per photo the float64 solve runs the SQP's iterations with up to 9 backward passes each,
    the walks, the segment crossings, the polish's 64 class rows and up to 512 sign rows, and the certificate's kink
    rows, each a pass of EfficientNet-Lite0 at 224 x 224; a GPU run: ``make gpu-check`` runs this row last."""
    net = models.efficientnet_lite0(pretrained=True).eval()
    photos = datasets.load_imagenet_photos()
    return {"net": net, "X": photos.X.float(), "lo": 0.0, "hi": 1.0, "runner_up": True,
            "label": "ImageNet CNN EfficientNet-Lite0 (ReLU6, pretrained, shipped photos, runner-up target)",
            "key": "imagenet", "peers": ("FMN", "DDN", "FAB")}


LOADERS = {"mnist-mlp": lambda: mnist_mlp(True), "mnist-mlp-random": lambda: mnist_mlp(False),
           "adult-mlp": adult_mlp, "cifar": cifar_cnn, "mnist-cnn": mnist_cnn, "imagenet": imagenet_cnn}
#: The models of a run without ``--only`` (the ImageNet CNN runs alone: ``--only imagenet``).
DEFAULT_KEYS = ("mnist-mlp", "mnist-mlp-random", "adult-mlp", "cifar", "mnist-cnn")
#: Models without SLSQP (hours per point at n = 784 .. 150,528 with max-pooling / ReLU6).
NO_SLSQP = {"cifar", "mnist-cnn", "imagenet"}


# ----------------------------------------------------------------------------------------------------- passes


class _Tally:
    """Shared pass counts of a :class:`PassCounter` and its copies (``copy.deepcopy`` keeps the same tally:
    flipfrag solves on a float64 copy of the model, SLSQP on another)."""

    def __init__(self):
        self.fwd = 0
        self.bwd = 0

    def __deepcopy__(self, memo):
        return self

    def reset(self) -> None:
        self.fwd = self.bwd = 0


class PassCounter(torch.nn.Module):
    """The model, counting passes as AttackBench does: every forward call adds its batch rows; every backward pass
    that reaches the output (``autograd.grad`` or ``.backward``, one per vector-Jacobian product) adds the rows of
    its output gradient. A Jacobian of C classes by C backward passes of a batch of N counts C x N backward passes;
    flipfrag's batched Jacobian (each point repeated C times, one backward pass) counts the same."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net
        self.tally = _Tally()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        rows = int(out.shape[0]) if out.dim() else 1
        self.tally.fwd += rows
        if out.requires_grad:
            tally = self.tally

            def count(grad, tally=tally, rows=rows):
                tally.bwd += rows

            out.register_hook(count)
        return out


# ----------------------------------------------------------------------------------------------------- peers

#: The label-changing peers: name -> (library, settings). ``@budget``: the steps set to flipfrag's passes per point
#: on the same model (min of its forward and backward passes per point, so the peer uses no more of either).
PEERS = {
    "FAB": "torchattacks 3.3.0 FAB(norm='L2', eps=10, steps=100, n_restarts=1) (the bench's setting since issue 13)",
    "DeepFool": "torchattacks 3.3.0 DeepFool(steps=50, overshoot=0.02) (its defaults)",
    "FMN": "foolbox 3.3.4 L2FMNAttack() (defaults: steps=100, max_stepsize=1, gamma=0.05), epsilons=None",
    "FMN@budget": "foolbox 3.3.4 L2FMNAttack(steps=flipfrag's passes per point), epsilons=None",
    "DDN": "foolbox 3.3.4 DDNAttack() (defaults: steps=100, init_epsilon=1, gamma=0.05), epsilons=None",
    "DDN@budget": "foolbox 3.3.4 DDNAttack(steps=flipfrag's passes per point), epsilons=None",
}


def attack(name: str, net, x, y, n_classes: int, steps: int | None = None, bounds=(0.0, 1.0),
           runner_up: bool = False):
    """The peer's label-changing points x_adv (N, ...) for inputs x with labels y (its own prediction);
    ``runner_up``: FAB targeted at the runner-up class (``multi_targeted`` with one target class)."""
    base = name.split("@")[0]
    if base in ("FAB", "DeepFool"):
        import torchattacks

        if base == "FAB" and runner_up:
            atk = torchattacks.FAB(net, norm="L2", eps=10, steps=100, n_restarts=1, multi_targeted=True, n_classes=2)
        elif base == "FAB":
            atk = torchattacks.FAB(net, norm="L2", eps=10, steps=100, n_restarts=1, n_classes=n_classes)
        else:
            atk = torchattacks.DeepFool(net, steps=50, overshoot=0.02)
        out = atk(x, y)
        return out[0] if isinstance(out, tuple) else out
    import foolbox as fb

    kw = {} if steps is None else {"steps": int(steps)}
    atk = fb.attacks.L2FMNAttack(**kw) if base == "FMN" else fb.attacks.DDNAttack(**kw)
    fmodel = fb.PyTorchModel(net, bounds=bounds, device=x.device)
    _, clipped, _ = atk(fmodel, x, fb.criteria.Misclassification(y), epsilons=None)
    return clipped


@torch.no_grad()
def first_crossing(net, x, x_end, y, samples: int = 256, bisections: int = 40) -> torch.Tensor:
    """Distance to the first point on the segment x -> x_end where the label leaves y (inf if never): a scan with
    ``samples`` points, then bisection. An independent check of the bound a label-changing point gives."""
    out = torch.full((len(x),), math.inf, dtype=torch.float64)
    ts = torch.linspace(0, 1, samples + 1, dtype=torch.float64, device=x.device)[1:]
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


def within_1pct(ours: torch.Tensor, cross: torch.Tensor) -> dict:
    """How close a peer gets to flipfrag's distance: median crossing / flipfrag distance over the points where both
    are finite, and the share of all points whose crossing is within 1 % of flipfrag's distance."""
    ok = torch.isfinite(ours) & torch.isfinite(cross) & (ours > 0)
    r = (cross[ok] / ours[ok]).tolist()
    return {"median_crossing_over_ours": statistics.median(r) if r else None,
            "within_1pct_share": sum(v <= 1.01 for v in r) / len(ours) if len(ours) else None}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_model(spec: dict, cfg: dict, n_points: int, repeats: int | None = None, slsqp: bool = True,
              device: str = "cpu", peers: tuple = tuple(PEERS)) -> dict:
    """One model's row: flipfrag and every peer on the same N points (all targets), timed in alternating rounds
    after a warm-up, passes counted by :class:`PassCounter`, and each peer's points compared with flipfrag's."""
    raw = spec["net"].to(device).eval()
    net = PassCounter(raw).eval()
    lo, hi, label = spec["lo"], spec["hi"], spec["label"]
    repeats = cfg["repeats"] if repeats is None else repeats
    x = spec["X"][:n_points].float().to(device)
    with torch.no_grad():
        y = raw(x).argmax(1)
        C = int(raw(x[:1]).shape[1])
    N = len(x)
    runner_up = bool(spec.get("runner_up"))
    peers = tuple(p for p in spec.get("peers", peers) if p in peers)
    tgt = None
    if runner_up:  # flip toward the runner-up class at x (the ImageNet CNN: no 1000-class screening)
        with torch.no_grad():
            tgt = raw(x).topk(2, dim=1).indices[:, 1]
    # warm-up of every method (first-call costs of autograd / BLAS are not the method's); a cheap 1-point solve
    closest_flip_point(net, x[:1], lower=lo, upper=hi, max_iter=3, upper_bounds=False, screen=1,
                       target=None if tgt is None else tgt[:1])
    if not runner_up:  # (the ImageNet peers' warm-up would cost as much as a run)
        for name in peers:
            if not name.endswith("@budget"):
                attack(name, net, x[:1], y[:1], C, bounds=(lo, hi))
    budget: dict = {}
    fns = {"flipfrag": lambda: closest_flip_point(net, x, lower=lo, upper=hi, target=tgt)}
    for name in peers:
        fns[name] = (lambda name=name: attack(name, net, x, y, C, bounds=(lo, hi), runner_up=runner_up,
                                              steps=budget["steps"] if name.endswith("@budget") else None))
    # the methods take turns in every round, so that load from other jobs on the shared machine falls on all alike
    times: dict = {k: [] for k in fns}
    outs: dict = {}
    passes: dict = {}
    peak: dict = {k: None for k in fns}  # GB: the process's high-water mark during the method (CPU runs, Linux)
    for r in range(repeats):
        for k, fn in fns.items():
            net.tally.reset()
            _sync(device)
            outs.pop(k, None)  # (the previous round's output would count in this round's peak)
            reset = reset_peak_rss()
            t0 = time.perf_counter()
            outs[k] = fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
            passes[k] = (net.tally.fwd / N, net.tally.bwd / N)
            if reset:
                peak[k] = max(peak[k] or 0.0, peak_rss_gb())
            if spec.get("runner_up"):  # (the ImageNet row runs for many minutes: its progress as it goes)
                extra = ""
                if k == "flipfrag":
                    extra = (f", certified {outs[k].converged.tolist()}, distance {outs[k].distance.tolist()}, "
                             f"upper bound {outs[k].upper_bound.tolist()}, status {outs[k].status}")
                print(f"  {label}: {k} {times[k][-1]:.1f} s, passes {passes[k][0]:.0f} / {passes[k][1]:.0f} per "
                      f"point, peak memory {_f(peak[k], '.2f')} GB{extra}", flush=True)
            if k == "flipfrag" and r == 0:  # the matched budget: no more forward nor backward passes than flipfrag
                budget["steps"] = max(1, int(min(passes[k])))
    res = outs["flipfrag"]
    t_ours = statistics.median(times["flipfrag"])
    out = {"model": label, "key": spec["key"], "device": str(torch.device(device)), "points": N, "classes": C,
           "features": int(x[0].numel()), "repeats": repeats,
           "target": "runner-up" if runner_up else "all", "ours_ms": 1000 * t_ours / N,
           "certified": res.success_rate, "ours_peak_rss_gb": peak["flipfrag"],
           "ours_passes_fwd": passes["flipfrag"][0], "ours_passes_bwd": passes["flipfrag"][1],
           "budget_steps": budget["steps"], "peers": list(peers),
           "ours_status_failed": [s for s in res.status if s != "converged"][:5]}
    ours = res.distance.to(torch.float64).cpu()
    for name in peers:
        xa = outs[name]
        with torch.no_grad():
            changed = (raw(xa).argmax(1) != y).cpu()
        dist = torch.where(changed, (xa - x).flatten(1).norm(dim=1).double().cpu(),
                           torch.full((N,), math.inf, dtype=torch.float64))
        cross = first_crossing(raw, x, xa, y)
        ms = 1000 * statistics.median(times[name]) / N
        close = within_1pct(ours, cross)
        own = within_1pct(ours, dist)
        label_changed = float(changed.float().mean())
        out[name] = {"ms": ms, "settings": PEERS[name].replace("flipfrag's passes per point",
                                                               f"{budget['steps']}"),
                     "steps": budget["steps"] if name.endswith("@budget") else None,
                     "passes_fwd": passes[name][0], "passes_bwd": passes[name][1], "peak_rss_gb": peak[name],
                     "label_changed": label_changed,
                     "ratio_to_distance": ratios(ours, dist), "ratio_to_crossing": ratios(ours, cross), **close,
                     # a peer "gets within 1 % of flipfrag's distance": it changes the label of >= 99 % of the
                     # points and its median crossing is within 1 % of flipfrag's distance
                     "qualifies": bool(label_changed >= 0.99 and close["median_crossing_over_ours"] is not None
                                       and close["median_crossing_over_ours"] <= 1.01),
                     # the same test on the peer's own point (no crossing search, which costs the bench 256 + 40
                     # forward passes per point that no peer pays for)
                     "median_distance_over_ours": own["median_crossing_over_ours"],
                     "distance_within_1pct_share": own["within_1pct_share"],
                     "qualifies_own_distance": bool(label_changed >= 0.99 and own["median_crossing_over_ours"]
                                                    is not None and own["median_crossing_over_ours"] <= 1.01)}
        out[f"speedup_vs_{name}"] = ms / out["ours_ms"]
    if not slsqp:
        out["SLSQP"] = {"ms": math.nan, "basis": "not run (hours per point at this size)", "pairs": [],
                        "ratio_point0": None, "ratio_pairs": {}, "passes_fwd": None, "passes_bwd": None}
        out["speedup_vs_SLSQP"] = math.nan
    else:
        # SLSQP on one point (float64 copy of the model; the copy shares the pass counts)
        net64 = copy.deepcopy(net).double().cpu()
        x0 = x[0].cpu()
        s = int(y[0])
        net.tally.reset()
        if cfg["slsqp"] == "measured":
            sol = [(t, slsqp_flip(net64, x0, s, t, lo, hi)) for t in range(C) if t != s]
            ms = 1000 * sum(r["seconds"] for _, r in sol)
            scale = 1
            basis = f"measured: point 0, all {C - 1} targets"
        else:
            with torch.no_grad():
                z = raw(x[:1])[0].cpu()
            t_ru = int(z.scatter(0, torch.tensor([s]), -math.inf).argmax())
            sol = [(t_ru, slsqp_flip(net64, x0, s, t_ru, lo, hi))]
            ms = 1000 * sol[0][1]["seconds"] * (C - 1)
            scale = C - 1
            basis = f"estimated: point 0, runner-up target x {C - 1}"
        d_slsqp = min(r["distance"] for _, r in sol)
        out["SLSQP"] = {"ms": ms, "basis": basis, "pairs": [(t, r["distance"], r["nit"]) for t, r in sol],
                        "passes_fwd": net.tally.fwd * scale, "passes_bwd": net.tally.bwd * scale,
                        "ratio_point0": (float(ours[0]) / d_slsqp) if math.isfinite(d_slsqp) else None,
                        "ratio_pairs": ratios(torch.tensor([float(res.distances[0, t]) for t, _ in sol]),
                                              torch.tensor([r["distance"] for _, r in sol]))}
        out["speedup_vs_SLSQP"] = ms / out["ours_ms"]
    out["goals"] = goals(out)
    return out


def goals(r: dict) -> dict:
    """The issue's three goals for one model row."""
    qual = [p for p in r["peers"] if r[p]["qualifies"]]
    fastest = min(qual, key=lambda p: r[p]["ms"]) if qual else None
    speed = r[fastest]["ms"] / r["ours_ms"] if fastest else None
    qual_own = [p for p in r["peers"] if r[p].get("qualifies_own_distance")]
    fastest_own = min(qual_own, key=lambda p: r[p]["ms"]) if qual_own else None
    speed_own = r[fastest_own]["ms"] / r["ours_ms"] if fastest_own else None
    farther = sum(r[p]["ratio_to_crossing"]["farther_1pct"] for p in r["peers"])
    farther += (r["SLSQP"]["ratio_pairs"] or {}).get("farther_1pct", 0)
    return {"fastest_qualifying_peer": fastest, "speedup_vs_fastest_qualifying": speed,
            "speed_2x": None if speed is None else bool(speed >= 2.0),
            "fastest_qualifying_peer_own_distance": fastest_own,
            "speedup_vs_fastest_qualifying_own_distance": speed_own,
            "speed_2x_own_distance": None if speed_own is None else bool(speed_own >= 2.0),
            "farther_than_1pct_of_a_crossing": farther, "never_farther": farther == 0,
            "certified_99": bool(r["certified"] >= 0.99)}


def flat_rows(result: dict) -> list[dict]:
    """One machine-readable row per (model, method): what the README generator reads."""
    rows = []
    for r in result["models"]:
        common = {"model": r["model"], "model_key": r["key"], "device": r["device"], "points": r["points"],
                  "mode": result["mode"]}
        rows.append({**common, "method": "flipfrag", "settings": "closest_flip_point(net, x, lower, upper) (default)",
                     "ms_per_point": r["ours_ms"], "passes_fwd": r["ours_passes_fwd"],
                     "passes_bwd": r["ours_passes_bwd"], "peak_rss_gb": r.get("ours_peak_rss_gb"),
                     "certified_share": r["certified"], "label_changed_share": None,
                     "speedup_ours": 1.0, **{f"goal_{k}": v for k, v in r["goals"].items()}})
        ours_passes = r["ours_passes_fwd"] + r["ours_passes_bwd"]
        for p in r["peers"] + ["SLSQP"]:
            d = r[p]
            if p == "SLSQP" and not math.isfinite(d["ms"]):
                continue
            passes = (d["passes_fwd"] or 0) + (d["passes_bwd"] or 0)
            rows.append({**common, "method": p, "settings": d.get("settings", d.get("basis")),
                         "ms_per_point": d["ms"], "passes_fwd": d["passes_fwd"], "passes_bwd": d["passes_bwd"],
                         "peak_rss_gb": d.get("peak_rss_gb"), "certified_share": None,
                         "label_changed_share": d.get("label_changed"),
                         "speedup_ours": r[f"speedup_vs_{p}"],
                         "pass_ratio_ours": passes / ours_passes if ours_passes and p != "SLSQP" else None,
                         "ratio_ours_to_distance": d.get("ratio_to_distance") or d.get("ratio_pairs"),
                         "ratio_ours_to_crossing": d.get("ratio_to_crossing"),
                         "median_crossing_over_ours": d.get("median_crossing_over_ours"),
                         "within_1pct_share": d.get("within_1pct_share"), "qualifies": d.get("qualifies"),
                         "median_distance_over_ours": d.get("median_distance_over_ours"),
                         "qualifies_own_distance": d.get("qualifies_own_distance")})
    return rows


# ----------------------------------------------------------------------------------------------------- report


def _fmt_ratio(d: dict) -> str:
    if not d or d.get("median") is None:
        return "-"
    return f"{d['median']:.3f} / {d['max']:.3f} / {d['farther_1pct']} of {d['compared']}"


def _f(v, fmt: str = ".1f", none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _yes(v) -> str:
    return "-" if v is None else ("**yes**" if v else "no")


def to_markdown(result: dict) -> str:
    single = [r["model"] for r in result["models"] if r.get("repeats", result["repeats"]) != result["repeats"]]
    runs = f"{result['repeats']} run(s)" + (f" (one run for {', '.join(single)})" if single else "")
    lines = ["# flip: flipfrag vs FAB, DeepFool (torchattacks), FMN, DDN (foolbox) and SciPy SLSQP", "",
             f"Machine: {result['machine']}; mode: {result['mode']}; times are medians of {runs} "
             "on the same batch after a warm-up, the methods taking turns.", ""]
    if result.get("run_note"):
        lines += [f"**This run:** {result['run_note']}", ""]
    lines += ["## Goals per model", "",
              "A peer *qualifies* when it changes the label of >= 99 % of the points and its median crossing is within "
              "1 % of flipfrag's distance. Goals: >= 2x the fastest qualifying peer; no point farther than 1.01 x any "
              "peer's crossing (or SLSQP's flip point); >= 99 % certified.", "",
              "| model | points | flipfrag ms | passes fwd / bwd | certified | fastest qualifying peer (ms) | speedup "
              "| >= 2x | same, by the peer's own point | farther than 1.01 x a crossing | never farther "
              "| >= 99 % certified |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        g = r["goals"]
        fq = g["fastest_qualifying_peer"]
        fq_text = "none" if fq is None else f"{fq} ({r[fq]['ms']:.1f})"
        fo = g.get("fastest_qualifying_peer_own_distance")
        fo_text = "none" if fo is None else (f"{fo} ({r[fo]['ms']:.1f} ms): "
                                             f"{_f(g['speedup_vs_fastest_qualifying_own_distance'], '.2f')}x")
        lines.append(
            f"| {r['model']} | {r['points']} | {r['ours_ms']:.1f} | {r['ours_passes_fwd']:.0f} / "
            f"{r['ours_passes_bwd']:.0f} | {100 * r['certified']:.1f} % | "
            f"{fq_text} | "
            f"{_f(g['speedup_vs_fastest_qualifying'], '.2f')}x | {_yes(g['speed_2x'])} | {fo_text} | "
            f"{g['farther_than_1pct_of_a_crossing']} | {_yes(g['never_farther'])} | {_yes(g['certified_99'])} |")
    lines += ["", "## Every method: time and passes per point, distance ratios", "",
              "Passes are counted as AttackBench does (forward calls x batch rows; backward passes reaching the output "
              "x rows), divided by the points. Ratios flipfrag / peer per point: median / max / count farther than "
              "1 %. *crossing within 1 %*: share of points whose crossing is within 1 % of flipfrag's distance. "
              "*Peak GB*: the process's resident high-water mark while the method ran (reset before it; the model, "
              "data and the other methods' results included; host memory on CUDA runs).", "",
              "| model | method | ms | passes fwd / bwd | peak GB | label changed | vs flipfrag: time / passes "
              "| ours / distance | ours / crossing | crossing / ours (median) | crossing within 1 % | qualifies |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["models"]:
        lines.append(f"| {r['model']} | flipfrag | {r['ours_ms']:.1f} | {r['ours_passes_fwd']:.0f} / "
                     f"{r['ours_passes_bwd']:.0f} | {_f(r.get('ours_peak_rss_gb'), '.2f')} | certified "
                     f"{100 * r['certified']:.0f} % | 1 / 1 | - | - | - | - | - |")
        ours_p = r["ours_passes_fwd"] + r["ours_passes_bwd"]
        for p in r["peers"]:
            d = r[p]
            name = p if d["steps"] is None else f"{p.split('@')[0]} ({d['steps']} steps)"
            lines.append(
                f"| {r['model']} | {name} | {d['ms']:.1f} | {d['passes_fwd']:.0f} / {d['passes_bwd']:.0f} | "
                f"{_f(d.get('peak_rss_gb'), '.2f')} | {100 * d['label_changed']:.0f} % | {r[f'speedup_vs_{p}']:.2f}x / "
                f"{(d['passes_fwd'] + d['passes_bwd']) / ours_p:.2f}x | {_fmt_ratio(d['ratio_to_distance'])} | "
                f"{_fmt_ratio(d['ratio_to_crossing'])} | {_f(d['median_crossing_over_ours'], '.4f')} | "
                f"{_f(None if d['within_1pct_share'] is None else 100 * d['within_1pct_share'], '.0f')} % | "
                f"{_yes(d['qualifies'])} |")
        sl = r["SLSQP"]
        if math.isfinite(sl["ms"]):
            lines.append(
                f"| {r['model']} | SLSQP ({sl['basis']}) | {sl['ms']:.0f} | {sl['passes_fwd']:.0f} / "
                f"{sl['passes_bwd']:.0f} (point 0) | - | - | {r['speedup_vs_SLSQP']:.0f}x / - | "
                f"{_fmt_ratio(sl['ratio_pairs'])} (pairs) | - | - | - | - |")
    lines += ["", "## Peers' settings", ""] + [f"- **{k}**: {v}" for k, v in PEERS.items()]
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in result["notes"]]
    for r in result["models"]:
        if r["ours_status_failed"]:
            lines.append(f"- {r['model']}: failed points (first 5): {r['ours_status_failed']}")
    return "\n".join(lines) + "\n"


NOTES = [
    "flipfrag is not given the peers' points; its upper bounds come from its own DeepFool-style steps and its own "
    "iterates. The crossing on the segment to a peer's point is found by a 256-point scan plus bisection (an "
    "independent check): a ratio <= 1.01 there means no peer found a boundary point more than 1 % closer.",
    "Distances are L2 in input units; the attacks' distances include their overshoot past the boundary.",
    "The crossing search (256 + 40 forward passes per point) is the bench's, counted in no peer's time or passes: "
    "qualifying by the crossing credits a peer with it. The goal table also gives the test on the peer's own "
    "point (median distance within 1 % of flipfrag's).",
    "Passes per point are totals over the batch divided by the points (the methods run batched; flipfrag's solves "
    "all targets of a point, so its rows include the targets). FMN / DDN @budget run as many steps as "
    "min(flipfrag's forward, backward passes per point) on the same model: one forward and one backward pass per "
    "step, plus foolbox's checks.",
    "SLSQP runs one (point, target) at a time in float64; it is timed on one point only (see basis); its passes are "
    "those of that point (times C - 1 when estimated).",
    "Adult: the one-hot blocks are relaxed to [0, 1] (no `groups`), so all methods solve the same continuous problem.",
]
FULL = {"points": 64, "cifar_points": 10, "cnn_points": 64, "imagenet_points": 2, "slsqp": "measured", "repeats": 3}
QUICK = {"points": 16, "cifar_points": 2, "cnn_points": 8, "imagenet_points": 2, "slsqp": "estimated", "repeats": 1}
SMOKE = {"points": 2, "cifar_points": 0, "cnn_points": 1, "imagenet_points": 0, "slsqp": "none", "repeats": 1}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer points, SLSQP estimated from one solve")
    parser.add_argument("--smoke", action="store_true", help="2 points of the random MLP, 1 MNIST CNN digit; "
                        "prints, writes only with --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the cores are shared)")
    parser.add_argument("--only", choices=sorted(LOADERS), help="run only this model's row (written to flip_<only>.*)")
    parser.add_argument("--points", type=int, help="points per MLP model (default 64, quick 16)")
    parser.add_argument("--cifar-points", type=int, help="CIFAR-10 photos (default 10, quick 2)")
    parser.add_argument("--cnn-points", type=int, help="MNIST SmallCNN digits (default 64, quick 8)")
    parser.add_argument("--imagenet-points", type=int, help="ImageNet photos (default 2; only with --only imagenet)")
    parser.add_argument("--repeats", type=int, help="timed rounds per MLP / SmallCNN row (default 3, quick 1; the "
                        "CIFAR-10 and ImageNet rows run one)")
    parser.add_argument("--peers", help=f"comma-separated subset of {','.join(PEERS)}")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--out", help="results folder (default benchmarks/results)")
    parser.add_argument("--stem", help="file name stem (default flip, flip_quick, flip_<only>)")
    parser.add_argument("--note", help="a sentence on this run (machine load, ...) written at the top of the table")
    args = parser.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else QUICK if args.quick else FULL)
    for key in ("points", "cifar_points", "cnn_points", "imagenet_points", "repeats"):
        v = getattr(args, key)
        if v is not None:
            if v < 1:
                parser.error(f"--{key.replace('_', '-')} must be >= 1")
            cfg[key] = v
    peers = tuple(PEERS) if not args.peers else tuple(args.peers.split(","))
    if unknown := [p for p in peers if p not in PEERS]:
        parser.error(f"unknown peers {unknown}; choose from {list(PEERS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    mode = ("smoke" if args.smoke else "quick" if args.quick else "full") + (f", only {args.only}" if args.only else "")
    result = {"mode": mode, "repeats": cfg["repeats"],
              "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
                         + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
              "run_note": args.note, "models": [], "notes": list(NOTES)}
    n_of = {"cifar": cfg["cifar_points"], "mnist-cnn": cfg["cnn_points"], "imagenet": cfg["imagenet_points"]}
    keys = [args.only] if args.only else (["mnist-mlp-random", "mnist-cnn"] if args.smoke else list(DEFAULT_KEYS))
    for key in keys:
        n_points = n_of.get(key, cfg["points"])
        if not n_points:
            result["notes"].append(f"No {key} row in this mode.")
            continue
        spec = LOADERS[key]()
        if spec is None:
            result["notes"].append(f"No {key} row (its model is not available).")
            continue
        slsqp = key not in NO_SLSQP and cfg["slsqp"] != "none" and not args.device.startswith("cuda")
        r = run_model(spec, cfg, n_points, repeats=1 if key in ("cifar", "imagenet") else None, slsqp=slsqp,
                      device=args.device,
                      peers=peers)
        result["models"].append(r)
        print(f"{r['model']}: flipfrag {r['ours_ms']:.1f} ms ({100 * r['certified']:.0f} % certified, "
              f"{r['ours_passes_fwd']:.0f}/{r['ours_passes_bwd']:.0f} passes); "
              + ", ".join(f"{p} {r[p]['ms']:.1f}" for p in r["peers"]) + f"; SLSQP {r['SLSQP']['ms']:.0f} ms/point",
              flush=True)
    result["runtime_s"] = time.perf_counter() - t0
    result["rows"] = flat_rows(result)
    md = to_markdown(result)
    print(md)
    if args.smoke and not args.out:
        return result
    # a quick check or a single row never overwrites the full results
    stem = args.stem or (f"flip_{args.only}" if args.only else ("flip_quick" if args.quick or args.smoke else "flip"))
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{stem}.json", result)
    atomic_write(out / f"{stem}.md", lambda p: p.write_text(md))
    for name in (f"{stem}.json", f"{stem}.md"):  # readable like the other results (the temporary file was 0600)
        (out / name).chmod(0o644)
    return result


if __name__ == "__main__":
    main()
