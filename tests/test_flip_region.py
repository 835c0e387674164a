"""The region polish of piecewise-linear models (flipfrag.flip, step 6): the frozen activation pattern against the
model and torch.func, the polish's QP against an exact face enumeration of the explicit affine region problem of a
small ReLU MLP, a certificate that refuses a point the polish did not certify, and the shipped ReLU CNNs certified."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from flipfrag.flip import FlipOptions, closest_flip_point
from flipfrag.flip import polish as F
from flipfrag.flip.options import _Setup
from flipfrag.flip.pool import _START_WALK
from flipfrag.models import SmallCNN

F64 = torch.float64


def _relu_mlp(seed: int = 0, n: int = 4, hidden: int = 12, C: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, C)).double().eval()


def _crossing(model, xh: torch.Tensor, seed: int) -> torch.Tensor:
    """A flip point of each row of xh by plain bisection on the segment toward a random point of the box [0, 1] of
    another predicted class (test-side code, no flipfrag)."""
    return _crossing_free(model, xh, torch.zeros(xh.shape[1], dtype=torch.bool), seed)


def _problems(model, xh: torch.Tensor, x0: torch.Tensor) -> F._Problems:
    with torch.no_grad():
        src, z0 = model(xh).argmax(1), model(x0)
    tgt = z0.scatter(1, src[:, None], -math.inf).argmax(1)  # the class tied with the source at x0
    P, n = xh.shape
    return F._Problems(xh, torch.zeros(P, n, dtype=F64), torch.ones(P, n, dtype=F64), torch.ones(P, n, dtype=F64),
                       src, tgt)


def test_frozen_pattern_is_the_model_on_its_region_and_affine(monkeypatch):
    torch.manual_seed(1)
    cnn = SmallCNN(in_channels=1, n_classes=3, width=4).double().eval()
    fn = F._model_fn(cnn, (1, 8, 8))
    x0 = torch.rand(3, 64, dtype=F64)
    rec = F._FrozenPattern()
    with torch.no_grad(), rec:
        z0 = fn(x0)
    kinds = [k for k, _ in rec.pattern]
    assert kinds.count("relu") == 3 and kinds.count("pool") == 2
    zf, _ = F._frozen_forward(fn, rec.pattern, x0)
    assert torch.equal(zf, z0)
    # affine: the frozen map's midpoint is the mean of its ends, although the model itself bends between them
    v = 0.3 * torch.randn(3, 64, dtype=F64, generator=torch.Generator().manual_seed(2))
    zp, _ = F._frozen_forward(fn, rec.pattern, x0 + v)
    zm, _ = F._frozen_forward(fn, rec.pattern, x0 - v)
    torch.testing.assert_close(0.5 * (zp + zm), z0, rtol=0, atol=1e-12)
    with torch.no_grad():
        assert (0.5 * (fn(x0 + v) + fn(x0 - v)) - z0).abs().max() > 1e-3
    # at x0 every region constraint holds, and the sign rows are the Jacobian rows of the region constraints
    _, vals, _, sizes = F._sign_state(fn, rec.pattern, x0)
    assert (vals <= 0).all()
    gen = torch.Generator().manual_seed(3)
    finite = torch.isfinite(vals[0])
    picks = torch.nonzero(finite)[:, 0][torch.randperm(int(finite.sum()), generator=gen)[:40]]
    rows = F._sign_rows(fn, rec.pattern, x0, picks[None].expand(3, -1).clone(), sizes, chunk=7)

    def all_values(x):
        _, inputs = F._frozen_forward(fn, rec.pattern, x[None].expand(3, -1))
        return torch.cat(F._sign_values(rec.pattern, inputs), 1)

    for p in range(3):
        J = torch.func.jacrev(lambda x, p=p: all_values(x)[p])(x0[p])
        torch.testing.assert_close(rows[p], J[picks], rtol=1e-12, atol=1e-12)
    # a memory bound below one row's copies of the network: one row per pass, the same rows
    monkeypatch.setattr(F, "_ROW_MEMORY", 1)
    one = F._sign_rows(fn, rec.pattern, x0, picks[None].expand(3, -1).clone(), sizes, chunk=7)
    torch.testing.assert_close(one, rows, rtol=1e-12, atol=1e-12)


def _explicit_region_optimum(model, xh, x0, src, tgt, w=None, fixed=None):
    """The region problem written out from the weights — u = W1 x + b1 with the pattern of x0, z = W2 (m u) + b2;
    minimise ||x - x_hat|| subject to z_s = z_t, z_k <= z_t, sign(u) fixed, 0 <= x <= 1 — solved exactly by
    enumerating faces: the optimum of a convex QP is the projection of x_hat onto the affine hull of some face, and
    every feasible such projection is at least as far, so the closest feasible projection is the optimum. ``w``:
    weights of the squared distance (scale**2); ``fixed``: coordinates held at x_hat (equality rows)."""
    from itertools import combinations

    W1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    W2, b2 = model[2].weight.detach().numpy(), model[2].bias.detach().numpy()
    xh, x0 = xh.numpy(), x0.numpy()
    n = len(xh)
    w = np.ones(n) if w is None else w.numpy()
    E = np.eye(n)[fixed.numpy()] if fixed is not None else np.zeros((0, n))
    m = (W1 @ x0 + b1 > 0).astype(float)
    Weff, beff = W2 @ (m[:, None] * W1), W2 @ (m * b1) + b2
    sign = np.where(m > 0, -1.0, 1.0)  # rows G x <= h
    G = [sign[:, None] * W1, np.eye(n), -np.eye(n)]
    h = [-sign * b1, np.ones(n), np.zeros(n)]
    for k in range(Weff.shape[0]):
        if k not in (src, tgt):
            G.append((Weff[k] - Weff[tgt])[None])
            h.append(np.array([beff[tgt] - beff[k]]))
    G, h = np.concatenate(G), np.concatenate(h)
    a, c = Weff[src] - Weff[tgt], beff[tgt] - beff[src]  # a x = c
    best = math.inf
    for size in range(n - len(E)):
        for S in combinations(range(len(G)), size):
            M = np.vstack([a[None], E, G[list(S)]])
            r = np.concatenate([[c], E @ xh, h[list(S)]])
            if np.linalg.matrix_rank(M) < len(M):
                continue
            x = xh - (M.T / w[:, None]) @ np.linalg.solve((M / w) @ M.T, M @ xh - r)  # the projection, weighted
            if (G @ x <= h + 1e-10).all():
                best = min(best, float(np.sqrt(np.sum(w * (x - xh) ** 2))))
    return best


def _setup(model_seed: int, x_seed: int, cross_seed: int):
    """A small ReLU MLP, 6 inputs, starts on segment crossings, and their problems."""
    model = _relu_mlp(seed=model_seed)
    xh = torch.rand(6, 4, dtype=F64, generator=torch.Generator().manual_seed(x_seed))
    x0 = _crossing(model, xh, seed=cross_seed)
    return model, F._model_fn(model, (4,)), xh, x0, _problems(model, xh, x0)


def _oracles(model, xh, x0, pr, *extra) -> torch.Tensor:
    return torch.tensor([_explicit_region_optimum(model, xh[i], x0[i], int(pr.src[i]), int(pr.tgt[i]), *extra)
                         for i in range(len(xh))], dtype=F64)


def test_region_polish_is_the_exact_region_optimum():
    model, fn, xh, x0, pr = _setup(0, 0, 1)
    pol = F._region_polish(fn, pr, x0, 0.0, rounds=60, add=4, target_gap=0.0)
    d = torch.sqrt(((pol.x - xh) ** 2).sum(1))
    d0 = torch.sqrt(((x0 - xh) ** 2).sum(1))
    oracle = _oracles(model, xh, x0, pr)
    assert (d <= d0 * (1 + 1e-12)).all()  # never farther than its start
    assert (oracle < 0.99 * d0).any()  # (the starts are not already optimal)
    torch.testing.assert_close(d, oracle, rtol=1e-6, atol=1e-9)
    # weak duality: the lower bound never exceeds the true region optimum, and is tight at the end
    assert (pol.lb <= oracle * (1 + 1e-9)).all()
    assert (pol.gap <= 1e-6).all()
    # the polished point is a flip point of the model in the region of x0
    with torch.no_grad():
        z = model(pol.x)
    zs, zt = z.gather(1, pr.src[:, None])[:, 0], z.gather(1, pr.tgt[:, None])[:, 0]
    assert ((zs - zt).abs() <= 1e-9 * zs.abs().clamp(min=1)).all()
    _, vals, tol, _ = F._sign_state(fn, pol.pattern, pol.x)
    assert (vals <= tol).all()


def test_region_bound_is_a_lower_bound_after_every_round():
    model, fn, xh, x0, pr = _setup(5, 4, 5)
    oracle = _oracles(model, xh, x0, pr)
    for rounds in (1, 2, 3):
        pol = F._region_polish(fn, pr, x0, 0.0, rounds=rounds, add=1, target_gap=0.0)
        d = torch.sqrt(((pol.x - xh) ** 2).sum(1))
        assert (pol.lb <= oracle * (1 + 1e-9)).all() and (d >= oracle * (1 - 1e-9)).all()


def test_region_polish_with_scale_and_mask():
    model, fn, xh, x0, pr = _setup(0, 0, 1)
    w = torch.tensor([1.0, 4.0, 0.25, 2.0], dtype=F64)
    fixed = torch.tensor([False, False, False, True])
    x0 = _crossing_free(model, xh, fixed, seed=2)  # starts that keep the fixed coordinate
    lo, hi = pr.lo.clone(), pr.hi.clone()
    lo[:, fixed], hi[:, fixed] = xh[:, fixed], xh[:, fixed]
    prw = F._Problems(xh, lo, hi, w.expand(6, 4).clone(), pr.src, _problems(model, xh, x0).tgt)
    pol = F._region_polish(fn, prw, x0, 0.0, rounds=60, add=4, target_gap=0.0)
    d = torch.sqrt((w * (pol.x - xh) ** 2).sum(1))
    oracle = _oracles(model, xh, x0, prw, w, fixed)
    torch.testing.assert_close(d, oracle, rtol=1e-6, atol=1e-9)
    assert torch.equal(pol.x[:, fixed], xh[:, fixed])


def _crossing_free(model, xh, fixed, seed):
    """:func:`_crossing` with the ``fixed`` coordinates of the random end points at x_hat."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for x in xh:
            s = int(model(x[None]).argmax())
            for _ in range(1000):
                end = torch.where(fixed, x, torch.rand(x.shape, generator=gen, dtype=F64))
                if int(model(end[None]).argmax()) != s:
                    break
            else:
                raise AssertionError("no other class in the box")
            lo, hi = 0.0, 1.0
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                if int(model((x + mid * (end - x))[None]).argmax()) != s:
                    hi = mid
                else:
                    lo = mid
            out.append(x + hi * (end - x))
    return torch.stack(out)


def _ctx(model, shape) -> _Setup:
    return _Setup(FlipOptions().resolved(nonsmooth=True), model, model, shape, F64, F64, F64, 1, 64)


def test_polish_certificate_refuses_a_point_it_did_not_solve():
    model = _relu_mlp(seed=0)
    fn = F._model_fn(model, (4,))
    xh = torch.rand(6, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    x0 = _crossing(model, xh, seed=1)
    pr = _problems(model, xh, x0)
    pol = F._region_polish(fn, pr, x0, 0.0, rounds=60, add=4, target_gap=0.0)
    ctx = _ctx(model, (4,))
    _, chk = F._polish_certificate(ctx, fn, pr, pol)
    assert chk.ok.all() and (chk.gap <= 1e-6).all()
    # the start: a flip point of the same region, but more than 1 % farther than its optimum (the bound LB) -> refused
    far = torch.sqrt(((x0 - xh) ** 2).sum(1)) > 1.02 * pol.lb
    assert far.sum() >= 2
    _, chk = F._polish_certificate(ctx, fn, pr, replace(pol, x=x0))
    assert not chk.ok[far].any()
    assert (chk.gap[far] > 0.01).all()
    # the optimum with the pattern of another region (x_hat's, which does not contain it): its bound does not count
    rec = F._FrozenPattern()
    with torch.no_grad(), rec:
        fn(xh)
    other = replace(pol, pattern=rec.pattern)
    _, v, tl, _ = F._sign_state(fn, other.pattern, pol.x)
    outside = ~(v <= tl).all(1)
    assert outside.any()
    _, chk2 = F._polish_certificate(ctx, fn, pr, other)
    base = F._certify(ctx, pr, pol.x)
    torch.testing.assert_close(chk2.gap[outside], base.gap[outside], equal_nan=True)


def test_shipped_mnist_cnn_all_certified_by_the_polish():
    from flipfrag.models import trained_model

    net, ds, _ = trained_model("mnist-cnn", "quick", seed=0)
    x = ds.X_test[:8]
    res = closest_flip_point(net.eval(), x, lower=0.0, upper=1.0)
    assert res.success_rate == 1.0, res.status
    assert (res.distance <= 1.01 * res.upper_bound).all()
    assert ((res.region_gap <= 0.01) | torch.isnan(res.region_gap)).all()
    with torch.no_grad():
        z = net(res.x_flip)
    zs = z.gather(1, res.source[:, None])[:, 0]
    zt = z.gather(1, res.target[:, None])[:, 0]
    assert ((zs - zt).abs() <= 1e-6 * torch.maximum(zs.abs(), zt.abs()).clamp(min=1)).all()
    assert (res.x_flip >= 0).all() and (res.x_flip <= 1).all()


def test_shipped_mnist_cnn_digit_54_certified():
    """Test digit 54 of the shipped MNIST CNN, the one of the first 64 the polish used to leave at a 3.6 % gap: its
    start lies on (within rounding of) many facets that the QP's solution leaves through, so a strict ratio test
    never moved it, and past ~250 sign rows the undamped dual Newton steps on dependent rows stalled. With the
    tolerant ratio test, blocking-order cuts and the damped dual it is certified by the polish within 1 %."""
    from flipfrag.models import trained_model

    net, ds, _ = trained_model("mnist-cnn", "quick", seed=0)
    x = ds.X_test[54:55].float()
    res = closest_flip_point(net.float().eval(), x, lower=0.0, upper=1.0)
    assert bool(res.converged[0]), res.status
    assert int(res.start[0]) == F._START_REGION and float(res.region_gap[0]) <= 0.01
    assert float(res.distance[0]) <= 1.01 * float(res.upper_bound[0])
    assert (res.x_flip >= 0).all() and (res.x_flip <= 1).all()


@pytest.mark.parametrize("photo", [1])
def test_cifar10_cnn_photo_certified(photo):
    from flipfrag import datasets, models

    net = models.cifar10_cnn(pretrained=True)
    x = datasets.load_cifar10().X_test[photo : photo + 1].float()
    res = closest_flip_point(net, x, lower=0.0, upper=1.0)
    assert bool(res.converged[0]), res.status
    # photo 1: the solve from the far walk's crossing wins (the region polish of the others' is 22 % farther)
    assert int(res.start[0]) in (F._START_REGION, _START_WALK)
    if int(res.start[0]) == F._START_REGION:
        assert float(res.region_gap[0]) <= 0.01
    assert float(res.distance[0]) <= 1.01 * float(res.upper_bound[0])
    d = float((res.x_flip - x).flatten(1).norm(dim=1)[0])
    assert math.isclose(d, float(res.distance[0]), rel_tol=1e-5)
    fb = pytest.importorskip("foolbox")  # a peer as the oracle: never farther than 1.01 x DDN's crossing
    with torch.no_grad():
        y = net(x).argmax(1)
    _, x_ddn, _ = fb.attacks.DDNAttack()(fb.PyTorchModel(net, bounds=(0, 1)), x, fb.criteria.Misclassification(y),
                                         epsilons=None)  # fmt: skip
    assert float(res.distance[0]) <= 1.01 * _first_label_change(net, x, x_ddn, y)


def test_norm_walk_reaches_the_closed_form_boundary_of_a_linear_model():
    """On a linear two-class model the closest label change in the scaled norm is closed-form: |z_s - z_t| /
    ||D^-1 grad(z_s - z_t)|| over the free coordinates. The walk's point changes the label, stays in the box, keeps
    the masked coordinates, and is within 1 % of that distance; its segment crossing is within 0.1 % above it."""
    from flipfrag.flip.problems import _Problems
    from flipfrag.flip.starts import _norm_walk, _segment_crossing

    torch.manual_seed(0)
    n, P = 40, 6
    lin = nn.Linear(n, 2).double()
    xh = torch.rand(P, n, dtype=torch.float64) * 0.6 + 0.2
    src = lin(xh).argmax(1)
    w = torch.rand(n, dtype=torch.float64) + 0.5  # scale**2
    fixed = torch.zeros(n, dtype=torch.bool)
    fixed[:10] = True
    lo, hi = torch.full((P, n), -5.0, dtype=torch.float64), torch.full((P, n), 5.0, dtype=torch.float64)
    lo[:, fixed], hi[:, fixed] = xh[:, fixed], xh[:, fixed]
    pr = _Problems(xh, lo, hi, w.expand(P, n).clone(), src, 1 - src)
    a = (lin.weight[0] - lin.weight[1]).detach()
    with torch.no_grad():
        gap = (lin(xh)[:, 0] - lin(xh)[:, 1]).abs()
    exact = gap / torch.sqrt((a[~fixed] ** 2 / w[~fixed]).sum())
    radius = 3 * exact  # a loose start: the walk must shrink it
    x, found = _norm_walk(lin, pr, radius, None, steps=100)
    assert found.all()
    assert (lin(x).argmax(1) != src).all()
    assert torch.equal(x[:, fixed], xh[:, fixed]) and (x >= lo).all() and (x <= hi).all()
    dist = torch.sqrt((w * (x - xh) ** 2).sum(1))
    assert (dist >= exact * (1 - 1e-9)).all() and (dist <= 1.01 * exact).all(), (dist / exact)
    xc, cls, ok = _segment_crossing(lin, pr, x)
    dc = torch.sqrt((w * (xc - xh) ** 2).sum(1))
    assert ok.all() and (cls == 1 - src).all() and (dc <= 1.001 * dist).all() and (dc >= exact * (1 - 1e-9)).all()


@pytest.mark.parametrize("digit", [21, 44])
def test_shipped_mnist_cnn_walk_start_reaches_closer_regions(digit):
    """The first-order walks' starts (``walk_steps``, default 100 on ReLU nets) on test digits of the shipped MNIST
    CNN where the SQP and region polish alone certify a farther region's optimum (issue 25's "never farther"): the
    oracle is foolbox's DDN, a peer. Digit 21: the solve without the walk is > 10 % farther than DDN's crossing and
    the default is within 1.01 x it; digit 44: the one of the first 64 still 1.4 % farther (recorded, not hidden)."""
    fb = pytest.importorskip("foolbox")
    from flipfrag.models import trained_model

    net, ds, _ = trained_model("mnist-cnn", "quick", seed=0)
    net = net.float().eval()
    x = ds.X_test[digit : digit + 1].float()
    with torch.no_grad():
        y = net(x).argmax(1)
    _, x_ddn, _ = fb.attacks.DDNAttack()(fb.PyTorchModel(net, bounds=(0, 1)), x, fb.criteria.Misclassification(y),
                                         epsilons=None)  # fmt: skip
    ddn = _first_label_change(net, x, x_ddn, y)
    old = closest_flip_point(net, x, lower=0.0, upper=1.0, walk_steps=0)
    new = closest_flip_point(net, x, lower=0.0, upper=1.0)
    assert bool(old.converged[0]) and bool(new.converged[0]), (old.status, new.status)
    assert float(new.distance[0]) < float(old.distance[0])
    if digit == 21:
        assert float(old.distance[0]) > 1.1 * ddn and float(new.distance[0]) <= 1.01 * ddn
    else:
        assert 1.0 < float(new.distance[0]) / ddn < 1.02


@torch.no_grad()
def _first_label_change(net, x, x_end, y, samples: int = 2000) -> float:
    """Distance from x (1, ...) to the first point of a fine scan of the segment x -> x_end whose label is not y
    (a peer's crossing, from above within 1 / samples of the segment)."""
    ts = torch.linspace(0, 1, samples + 1)[1:]
    labels = torch.cat([net(x + t[:, None, None, None] * (x_end - x)).argmax(1) for t in ts.split(250)])
    return float(ts[torch.nonzero(labels != y)[0, 0]]) * float((x_end - x).norm())
