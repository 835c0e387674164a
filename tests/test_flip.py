"""Tests of flipfrag.flip against oracles: closed forms (projections onto hyperplanes, a triple point, a bisection
for the bounded projection), SciPy SLSQP with several starts, a ray scan of a 2-D ReLU net, and certificates
recomputed per point with plain autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from torch import nn

from flipfrag.datasets import load_mnist
from flipfrag.flip import FlipResult, closest_flip_point, erf_homotopy_sigmas
from flipfrag.models import MLP, SmallCNN, train
from flipfrag.smooth import erf_sigmas

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------- helpers


def _toy(n: int = 300, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes split by curved boundaries in the first two coordinates (the rest is noise)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen)
    angle = torch.atan2(X[:, 1], X[:, 0]) + 0.6 * torch.sin(2 * X[:, 0])
    y = ((angle + math.pi) / (2 * math.pi / 3)).long().clamp(0, 2)
    return X, y


def _trained_mlp(activation: str, d: int = 4, hidden=(16, 16), seed: int = 0, dtype=F64) -> nn.Module:
    X, y = _toy(d=d, seed=seed)
    torch.manual_seed(seed)
    model = MLP(d, list(hidden), 3, activation=activation)
    train(model, X, y, epochs=25, lr=1e-2, batch_size=64, seed=seed, progress=False)
    return model.to(dtype).eval()


def _slsqp_flip(model: nn.Module, xh: torch.Tensor, s: int, t: int, *, lower=None, upper=None, starts=()) -> float:
    """Smallest certified distance found by SciPy SLSQP from x_hat and the given starts (slow reference)."""
    xh_np = xh.detach().double().reshape(-1).numpy()
    shape = xh.shape

    memo: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def scores(v):  # scores and their Jacobian, memoised (SLSQP asks for them several times per point)
        key = np.asarray(v, dtype=np.float64).tobytes()
        if key not in memo:
            memo.clear()
            xt = torch.tensor(v, dtype=F64).reshape(1, *shape).requires_grad_(True)
            z = model(xt)[0]
            J = torch.stack([torch.autograd.grad(z[k], xt, retain_graph=True)[0].reshape(-1) for k in range(len(z))])
            memo[key] = (z.detach().numpy(), J.numpy())
        return memo[key]

    C = model(xh.reshape(1, *shape).double()).shape[1]
    others = [k for k in range(C) if k not in (s, t)]
    cons = [{"type": "eq", "fun": lambda v: np.array([scores(v)[0][s] - scores(v)[0][t]]),
             "jac": lambda v: (scores(v)[1][s] - scores(v)[1][t])[None]}]
    if others:
        cons.append({"type": "ineq", "fun": lambda v: scores(v)[0][t] - scores(v)[0][others],
                     "jac": lambda v: scores(v)[1][t][None] - scores(v)[1][others]})
    bounds = None
    if lower is not None:
        bounds = [(lower, upper)] * len(xh_np)
    best = math.inf
    for x0 in [xh_np, *starts]:
        res = minimize(lambda v: 0.5 * np.sum((v - xh_np) ** 2), np.asarray(x0, dtype=np.float64),
                       jac=lambda v: v - xh_np, method="SLSQP", constraints=cons, bounds=bounds,
                       options={"maxiter": 300, "ftol": 1e-12})
        z, _ = scores(res.x)
        tol = 1e-6 * max(1.0, abs(z[s]), abs(z[t]))
        feasible = abs(z[s] - z[t]) <= tol and (not others or np.min(z[t] - z[others]) >= -tol)
        if lower is not None:
            feasible &= bool(np.all(res.x >= lower - 1e-9) and np.all(res.x <= upper + 1e-9))
        if feasible:
            best = min(best, float(np.linalg.norm(res.x - xh_np)))
    return best


def _recompute_certificate(model, x, res: FlipResult, lower=None, upper=None, mask=None, scale=None, tol=1e-6):
    """Residual, margin and distance of the converged points, recomputed from x_flip with a plain forward pass (no
    flipfrag code), and asserted: boundary residual |z_s - z_t| and margin within tol (relative), bounds and mask
    respected, res.distance equal to the recomputed distance, failed points NaN. Returns (residual, scale, margin,
    distance) of the converged points."""
    ok = res.converged
    assert torch.isfinite(res.x_flip[ok]).all() and torch.isfinite(res.distance[ok]).all()
    assert torch.isnan(res.x_flip[~ok]).all() and torch.isnan(res.distance[~ok]).all()
    xf = res.x_flip[ok]
    with torch.no_grad():
        z = model(xf)
    s, t = res.source[ok], res.target[ok]
    assert (s != t).all()
    zs, zt = z.gather(1, s[:, None])[:, 0], z.gather(1, t[:, None])[:, 0]
    other = torch.ones_like(z, dtype=torch.bool)
    other[torch.arange(len(s)), s] = False
    other[torch.arange(len(s)), t] = False
    margin = torch.where(other, zt[:, None] - z, torch.full_like(z, math.inf)).amin(1)
    dist = ((xf - x[ok]) * (1.0 if scale is None else scale)).flatten(1).norm(dim=1)
    scale = torch.maximum(torch.ones_like(zs), torch.maximum(zs.abs(), zt.abs()))
    assert ((zs - zt).abs() <= tol * scale).all(), (zs - zt).abs() / scale
    assert (margin >= -tol * scale).all(), margin
    if lower is not None:
        assert (xf >= lower).all() and (xf <= upper).all()
    if mask is not None:
        assert torch.equal(xf[:, ~mask], x[ok][:, ~mask])
    torch.testing.assert_close(dist.double(), res.distance[ok], rtol=1e-6, atol=1e-12)
    return (zs - zt).abs(), scale, margin, dist


# ----------------------------------------------------------------------------------------------------- linear models


def test_linear_binary_matches_weighted_projection():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 6, generator=gen, dtype=F64))
        lin.bias.copy_(torch.randn(2, generator=gen, dtype=F64))
    x = torch.randn(12, 6, generator=gen, dtype=F64)
    scale = 0.5 + torch.rand(6, generator=gen, dtype=F64)
    res = closest_flip_point(lin, x, scale=scale)
    W, b = lin.weight.detach(), lin.bias.detach()
    z = x @ W.T + b
    s = z.argmax(1)
    t = 1 - s
    w = W[s] - W[t]
    g = (z.gather(1, s[:, None]) - z.gather(1, t[:, None]))[:, 0]
    dinv2 = 1 / scale**2
    wdw = (w * dinv2 * w).sum(1)
    x_star = x - (g / wdw)[:, None] * dinv2 * w  # the closest point of the hyperplane in the scaled norm
    assert res.converged.all()
    assert torch.equal(res.target, t) and torch.equal(res.source, s)
    torch.testing.assert_close(res.x_flip, x_star, atol=1e-9, rtol=0)
    torch.testing.assert_close(res.distance, g.abs() / wdw.sqrt(), atol=1e-9, rtol=0)
    assert res.distances is not None and torch.isinf(res.distances.gather(1, s[:, None])).all()


def _bounded_projection(xh, w, b, lo, hi, free):
    """argmin ||x - xh|| s.t. w.x + b = 0, lo <= x <= hi, x = xh off `free`: x(lam) = clip(xh - lam w) with the
    root of the decreasing function lam -> w.x(lam) + b found by bisection (the KKT conditions of this convex
    problem). Returns None if the equation has no root in the box."""
    direction = np.where(free, w, 0.0)  # fixed features do not move but still count in w.x

    def x_of(lam):
        return np.clip(xh - lam * direction, lo, hi)

    def phi(lam):
        return w @ x_of(lam) + b

    lo_l, hi_l = -1e6, 1e6
    if phi(lo_l) < 0 or phi(hi_l) > 0:
        return None
    for _ in range(300):
        mid = 0.5 * (lo_l + hi_l)
        lo_l, hi_l = (mid, hi_l) if phi(mid) > 0 else (lo_l, mid)
    return x_of(0.5 * (lo_l + hi_l))


def test_linear_binary_with_bounds_and_mask_matches_bisection():
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(8, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, 8, generator=gen, dtype=F64))
        lin.bias.zero_()
    x = torch.rand(10, 8, generator=gen, dtype=F64)
    lower, upper = 0.0, 1.0
    mask = torch.ones(8, dtype=torch.bool)
    mask[[1, 5]] = False  # these features stay fixed
    res = closest_flip_point(lin, x, lower=lower, upper=upper, mask=mask)
    W = lin.weight.detach().numpy()
    n_feasible = 0
    for i in range(len(x)):
        s = int(res.source[i])
        ref = _bounded_projection(x[i].numpy(), W[s] - W[1 - s], 0.0, lower, upper, mask.numpy())
        if ref is None:  # the boundary does not cross the box on the free features: must be reported failed
            assert not res.converged[i] and torch.isnan(res.x_flip[i]).all()
            continue
        n_feasible += 1
        assert res.converged[i], res.status[i]
        np.testing.assert_allclose(res.x_flip[i].numpy(), ref, atol=1e-7)
        assert torch.equal(res.x_flip[i, ~mask], x[i, ~mask])  # masked features exactly unchanged
    assert n_feasible >= 5
    assert (res.bound_violation[res.converged] == 0).all()


def test_linear_three_classes_two_constraints_active():
    # z0 = 0, z1 = x1, z2 = 2 x1 + x2. From x_hat = (-1, 0.5): toward class 1 the projection onto x1 = 0 is
    # (0, 0.5), where z2 = 0.5 > z1 — infeasible; the closest flip point is the triple point (0, 0) where all
    # three scores meet (two constraints active). Toward class 2 the plain projection onto 2 x1 + x2 = 0 is valid.
    lin = nn.Linear(2, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 1.0]]))
        lin.bias.zero_()
    x = torch.tensor([[-1.0, 0.5]], dtype=F64)
    res1 = closest_flip_point(lin, x, target=torch.tensor([1]))
    assert res1.converged.all(), res1.status
    torch.testing.assert_close(res1.x_flip, torch.zeros(1, 2, dtype=F64), atol=1e-8, rtol=0)
    assert abs(float(res1.margin[0])) < 1e-8  # the third class is tied: the inequality is active
    proj = x - ((2 * x[:, 0] + x[:, 1]) / 5)[:, None] * torch.tensor([2.0, 1.0], dtype=F64)
    res = closest_flip_point(lin, x)
    assert res.converged.all() and int(res.target[0]) == 2
    torch.testing.assert_close(res.x_flip, proj, atol=1e-9, rtol=0)
    expected = torch.tensor([[math.inf, math.hypot(1.0, 0.5), 1.5 / math.sqrt(5)]], dtype=F64)
    torch.testing.assert_close(res.distances, expected, atol=1e-8, rtol=0)


def test_linear_multiclass_margin_parameter():
    gen = torch.Generator().manual_seed(2)
    lin = nn.Linear(5, 4).double()
    x = torch.randn(8, 5, generator=gen, dtype=F64)
    margin = 0.2 / 4  # the authors' code
    res = closest_flip_point(lin, x, margin=margin)
    assert res.converged.all()
    resid, scale, marg, _ = _recompute_certificate(lin, x, res)
    assert (resid <= 1e-6 * scale).all()
    assert (marg >= margin - 1e-6 * scale).all()


# ----------------------------------------------------------------------------------------------------- smooth MLPs


@pytest.fixture(scope="module")
def smooth_models():
    return {act: _trained_mlp(act) for act in ("erf", "tanh", "softplus")}


@pytest.mark.parametrize("act", ["erf", "tanh", "softplus"])
def test_trained_smooth_mlp_within_one_percent_of_slsqp(smooth_models, act):
    model = smooth_models[act]
    X, _ = _toy(d=4, seed=7)
    x = X[:6].double()
    res = closest_flip_point(model, x, restarts=2, seed=0)
    assert res.converged.all(), res.status
    _recompute_certificate(model, x, res)
    rng = np.random.default_rng(0)
    for i in range(len(x)):
        s, t = int(res.source[i]), int(res.target[i])
        starts = [x[i].numpy() + rng.normal(size=4) * r for r in (0.5, 1.0, 2.0)]
        ref = _slsqp_flip(model, x[i], s, t, starts=starts)
        assert math.isfinite(ref)
        assert float(res.distance[i]) <= 1.01 * ref, (i, float(res.distance[i]), ref)


def test_trained_smooth_mlp_with_bounds_vs_slsqp(smooth_models):
    model = smooth_models["tanh"]
    X, _ = _toy(d=4, seed=8)
    x = X[:5].double().clamp(-1.5, 1.5)
    res = closest_flip_point(model, x, target=None, lower=-1.5, upper=1.5, restarts=2)
    resid, scale, _, _ = _recompute_certificate(model, x, res, lower=-1.5, upper=1.5)
    assert (resid <= 1e-6 * scale).all()
    rng = np.random.default_rng(1)
    for i in torch.nonzero(res.converged)[:, 0].tolist():
        s, t = int(res.source[i]), int(res.target[i])
        starts = [np.clip(x[i].numpy() + rng.normal(size=4), -1.5, 1.5) for _ in range(3)]
        ref = _slsqp_flip(model, x[i], s, t, lower=-1.5, upper=1.5, starts=starts)
        assert math.isfinite(ref), i  # a reference without a feasible result would make the comparison vacuous
        assert float(res.distance[i]) <= 1.01 * ref
    assert res.success_rate >= 0.8


def test_certificates_are_true(smooth_models):
    model = smooth_models["erf"]
    X, _ = _toy(d=4, seed=9)
    x = X[:10].double()
    res = closest_flip_point(model, x)
    assert res.converged.any()
    resid, scale, marg, dist = _recompute_certificate(model, x, res)
    ok = res.converged
    torch.testing.assert_close(resid, res.residual[ok], atol=1e-12, rtol=0)
    assert (resid <= 1e-6 * scale).all() and (marg >= -1e-6 * scale).all()
    torch.testing.assert_close(dist, res.distance[ok], atol=1e-12, rtol=0)
    # first-order optimality, per point with its own autograd: x_flip - x_hat must be parallel to grad(z_s - z_t)
    # (or, where a third class is tied, lie in the span of the two constraint gradients)
    for i in torch.nonzero(ok)[:, 0].tolist():
        xf = res.x_flip[i].clone().requires_grad_(True)
        z = model(xf[None])[0]
        s, t = int(res.source[i]), int(res.target[i])
        grads = [torch.autograd.grad(z[s] - z[t], xf, retain_graph=True)[0]]
        for k in range(3):
            if k not in (s, t) and abs(float((z[t] - z[k]).detach())) < 1e-6:
                grads.append(torch.autograd.grad(z[k] - z[t], xf, retain_graph=True)[0])
        G = torch.stack(grads, 1).detach()
        delta = (res.x_flip[i] - x[i])[:, None]
        coef = torch.linalg.lstsq(G, delta).solution
        rel = float((G @ coef - delta).norm() / delta.norm())
        assert rel <= 2e-4, (i, rel, float(res.kkt[i]))
    # a point that failed is never returned as a flip point
    assert torch.isnan(res.x_flip[~ok]).all() and torch.isnan(res.distance[~ok]).all()


def test_explicit_source_for_misclassified_points(smooth_models):
    model = smooth_models["softplus"]
    X, y = _toy(n=300, d=4, seed=0)
    with torch.no_grad():
        pred = model(X.double()).argmax(1)
    wrong = torch.nonzero(pred != y)[:4, 0]
    assert len(wrong) > 0
    x = X[wrong].double()
    res = closest_flip_point(model, x, source=y[wrong], target=pred[wrong])
    assert torch.equal(res.source, y[wrong])
    assert res.converged.all(), res.status
    resid, scale, marg, _ = _recompute_certificate(model, x, res)
    assert (resid <= 1e-6 * scale).all() and (marg >= -1e-6 * scale).all()


def test_float32_model_and_inputs():
    model = _trained_mlp("tanh", dtype=torch.float32)
    X, _ = _toy(d=4, seed=10)
    x = X[:8]
    res = closest_flip_point(model, x)
    assert res.x_flip.dtype == torch.float32 and res.converged.all(), res.status
    with torch.no_grad():  # the certificate holds for the float32 model at the float32 point
        z = model(res.x_flip)
    zs, zt = z.gather(1, res.source[:, None])[:, 0], z.gather(1, res.target[:, None])[:, 0]
    assert ((zs - zt).abs() <= 1e-6 * torch.clamp(torch.maximum(zs.abs(), zt.abs()), min=1)).all()
    res64 = closest_flip_point(model.double(), x.double(), target=res.target)
    torch.testing.assert_close(res.distance, res64.distance, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------- ReLU models


def _ray_scan_distance(model, xh, s: int, t: int, n_rays: int = 720, r_max: float = 6.0) -> float:
    """Global reference for a 2-D input: along each ray, the first radius where s and t are the top two classes
    with z_s = z_t (a sign change of z_s - z_t on a radial grid while both lead, refined by bisection)."""
    ang = torch.linspace(0, 2 * math.pi, n_rays + 1, dtype=F64)[:-1]
    dirs = torch.stack([ang.cos(), ang.sin()], 1)
    radii = torch.linspace(0, r_max, 1201, dtype=F64)
    with torch.no_grad():
        z = model((xh[None, None, :] + radii[None, :, None] * dirs[:, None, :]).reshape(-1, 2))
    z = z.reshape(n_rays, len(radii), -1)
    g = z[..., s] - z[..., t]
    lead = torch.ones_like(g, dtype=torch.bool)
    for k in range(z.shape[-1]):
        if k not in (s, t):
            lead &= torch.minimum(z[..., s], z[..., t]) >= z[..., k]
    cross = (g[:, :-1] * g[:, 1:] <= 0) & lead[:, :-1] & lead[:, 1:]
    rays = torch.nonzero(cross.any(1))[:, 0]
    if rays.numel() == 0:
        return math.inf
    j = cross[rays].float().argmax(1)  # the first crossing on each ray
    lo, hi = radii[j], radii[j + 1]
    sign_lo = torch.sign(g[rays, j])
    for _ in range(50):  # bisection, all rays at once
        mid = 0.5 * (lo + hi)
        with torch.no_grad():
            zm = model(xh[None, :] + mid[:, None] * dirs[rays])
        same = torch.sign(zm[:, s] - zm[:, t]) == sign_lo
        lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
    return float(hi.min())


def test_relu_mlp_2d_vs_ray_scan():
    model = _trained_mlp("relu", d=2, hidden=(12, 12), seed=3)
    X, _ = _toy(d=2, seed=11)
    x = X[:6].double()
    res = closest_flip_point(model, x, homotopy=True, restarts=2, seed=0)
    assert res.success_rate >= 5 / 6, res.status
    resid, scale, marg, _ = _recompute_certificate(model, x, res)
    assert (resid <= 1e-6 * scale).all() and (marg >= -1e-6 * scale).all()
    close = 0
    for i in torch.nonzero(res.converged)[:, 0].tolist():
        ref = _ray_scan_distance(model, x[i], int(res.source[i]), int(res.target[i]))
        d = float(res.distance[i])
        assert d >= ref * (1 - 2e-3)  # the scan is global over rays: nothing can be closer (up to resolution)
        close += d <= ref * 1.01
    assert close >= int(res.converged.sum()) - 1


def test_relu_cnn_feasible_flip_points():
    # a ReLU + max-pool CNN on 8x8 "bar" images. Its boundary is finely faceted: the homotopy (softplus and
    # log-sum-exp pooling) plus an exact feasibility restoration give exact flip points; first-order optimality
    # is not certifiable to 1e-4 at such kinks, so this checks the feasibility certificate (kkt_tol=inf)
    gen = torch.Generator().manual_seed(4)
    y = torch.randint(0, 3, (150,), generator=gen)
    X = 0.3 * torch.rand(150, 1, 8, 8, generator=gen, dtype=F64)
    X[torch.arange(150), 0, :, torch.tensor([1, 4, 6])[y]] += 0.6
    X = X.clamp(0, 1)
    torch.manual_seed(4)
    cnn = SmallCNN(in_channels=1, n_classes=3, width=4).double()
    train(cnn, X, y, epochs=8, lr=1e-2, batch_size=32, seed=4, progress=False)
    x = X[:3]
    with torch.no_grad():
        z = cnn(x)
    runner_up = z.scatter(1, z.argmax(1, keepdim=True), -math.inf).argmax(1)
    res = closest_flip_point(cnn, x, target=runner_up, lower=0.0, upper=1.0, homotopy=True, homotopy_steps=6,
                             kkt_tol=math.inf)
    assert res.x_flip.shape == x.shape
    assert res.success_rate >= 2 / 3, res.status
    resid, scale, marg, _ = _recompute_certificate(cnn, x, res, lower=0.0, upper=1.0)
    assert (resid <= 1e-6 * scale).all() and (marg >= -1e-6 * scale).all()
    strict = closest_flip_point(cnn, x, target=runner_up, lower=0.0, upper=1.0)
    assert all("kkt" in s or s == "converged" for s in strict.status)  # failures name the optimality test
    i = int(torch.nonzero(res.converged)[0, 0])
    ref = _slsqp_flip(cnn, x[i], int(res.source[i]), int(res.target[i]), lower=0.0, upper=1.0)
    assert math.isfinite(ref)
    assert float(res.distance[i]) <= 1.1 * ref


# ------------------------------------------------------------------ piecewise-linear certificate (activation regions)


class _Corner(nn.Module):
    """2 classes on R^2 with z_0 - z_1 = a relu(x_1) - x_2: the boundary x_2 = a relu(x_1) bends at x_1 = 0 (a corner
    toward x_hat below it when a > 0, away from it when a < 0)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, x):
        return torch.stack([self.a * torch.relu(x[:, 0]) - x[:, 1], torch.zeros_like(x[:, 0])], 1)


class _PoolCorner(nn.Module):
    """z_1 - z_0 = max-pool(x_1, x_2) - 1: the boundary {max(x_1, x_2) = 1} has its corner at (1, 1)."""

    def forward(self, x):
        m = nn.functional.max_pool2d(x.reshape(-1, 1, 1, 2), (1, 2)).reshape(-1)
        return torch.stack([1 - m, torch.zeros_like(m)], 1)


def _region_certificate(model, xh, x, kkt_tol=1e-4):
    """The library's certificate (original model, activation-region KKT) of the candidate point x for x_hat."""
    from flipfrag.flip.sqp import _certified, _check, _Problems

    P, n = x.shape
    with torch.no_grad():
        src = model(xh).argmax(1)
    pr = _Problems(xh, torch.full((P, n), -math.inf, dtype=F64), torch.full((P, n), math.inf, dtype=F64),
                   torch.ones(P, n, dtype=F64), src, 1 - src)
    chk = _check(model, pr, x, 0.0, 1e-6, 0, kkt_tol, region=True)
    return _certified(chk, 0.0, kkt_tol), vars(chk)  # the certificate's fields by name


def test_relu_corner_is_certified_on_its_region_and_found():
    # closed form: from (0.3, -1) the closest point of x_2 = relu(x_1) is the corner (0, 0) (the right piece's own
    # projection, t = (0.3 - 1) / 2 < 0, falls outside it); the plain KKT test fails there (one-sided gradient)
    model = _Corner(1.0)
    xh = torch.tensor([[0.3, -1.0]], dtype=F64)
    res = closest_flip_point(model, xh)
    assert bool(res.converged[0]), res.status
    assert torch.allclose(res.x_flip, torch.zeros(1, 2, dtype=F64), atol=1e-6)
    assert abs(float(res.distance[0]) - math.sqrt(1.09)) < 1e-6
    ok, chk = _region_certificate(model, xh, torch.zeros(1, 2, dtype=F64))
    assert bool(ok[0]) and int(chk["kinks"][0]) == 1
    # sabotaged: moved along the boundary off the corner (no kink there): fails the certificate
    ok, chk = _region_certificate(model, xh, torch.tensor([[-0.1, 0.0]], dtype=F64))
    assert not bool(ok[0]) and float(chk["kkt"][0]) > 0.1 and int(chk["kinks"][0]) == 0
    # a point just beside the kink (beyond the 1e-6 tolerance) is not treated as one
    ok, chk = _region_certificate(model, xh, torch.tensor([[-1e-3, 0.0]], dtype=F64))
    assert not bool(ok[0])


def test_relu_concave_corner_is_left_for_the_closer_piece():
    # x_2 = -relu(x_1): the corner (0, 0) is the closest point of the left region's closure (the certificate's
    # guarantee, a region at a time), but the right piece x_2 = -x_1 has (0.65, -0.65) at distance 0.495 < 1.044
    model = _Corner(-1.0)
    xh = torch.tensor([[0.3, -1.0]], dtype=F64)
    ok, _ = _region_certificate(model, xh, torch.zeros(1, 2, dtype=F64))
    assert bool(ok[0])
    res = closest_flip_point(model, xh)
    assert bool(res.converged[0]), res.status
    assert torch.allclose(res.x_flip, torch.tensor([[0.65, -0.65]], dtype=F64), atol=1e-6)


def test_max_pool_tie_is_a_region_constraint():
    # from (2, 2) the closest point of {max(x_1, x_2) = 1} is the corner (1, 1), a tie of the pooling window
    model = _PoolCorner()
    xh = torch.tensor([[2.0, 2.0]], dtype=F64)
    ok, chk = _region_certificate(model, xh, torch.ones(1, 2, dtype=F64))
    assert bool(ok[0]) and int(chk["kinks"][0]) == 1
    ok, _ = _region_certificate(model, xh, torch.tensor([[1.0, 0.9]], dtype=F64))  # sabotaged: not optimal
    assert not bool(ok[0])
    res = closest_flip_point(model, xh, nonsmooth=True)
    assert bool(res.converged[0]), res.status
    assert abs(float(res.distance[0]) - math.sqrt(2)) < 1e-6


def test_certified_relu_points_never_farther_than_their_crossings():
    model = _trained_mlp("relu", d=2, hidden=(12, 12), seed=3)
    X, _ = _toy(d=2, seed=11)
    res = closest_flip_point(model, X[:12].double())
    ok = res.converged
    assert ok.float().mean() >= 0.9, res.status
    assert (res.distance[ok] <= 1.01 * res.upper_bound[ok]).all()
    assert torch.isnan(res.x_flip[~ok]).all()


# ------------------------------------------------------------------------- upper bounds from label-changing points


@pytest.fixture(scope="module")
def mnist_mlp():
    """A float32 784-32-10 tanh MLP trained for a few seconds on 1,200 real MNIST digits (seeded)."""
    ds = load_mnist(n=1500, seed=0)
    torch.manual_seed(0)
    net = MLP(784, [32], 10, activation="tanh")
    train(net, ds.X_train, ds.y_train, epochs=4, lr=3e-3, seed=0, progress=False)
    return net.eval(), ds.X_test


def _per_target_deepfool(model, x, lower=0.0, upper=1.0, steps=30, overshoot=0.02):
    """Label-changing points by linearised steps toward each class separately (a slow, independent DeepFool
    variant: plain autograd, one class at a time). Returns (C, N, *shape) points; a point whose label never
    changed is x itself."""
    with torch.no_grad():
        z0 = model(x)
    src = z0.argmax(1)
    C = z0.shape[1]
    out = []
    for t in range(C):
        xa = x.clone()
        for _ in range(steps):
            xr = xa.clone().requires_grad_(True)
            z = model(xr)
            moved = z.argmax(1) != src
            g = z.gather(1, src[:, None])[:, 0] - z[:, t]
            (a,) = torch.autograd.grad(g.sum(), xr)
            nrm2 = a.flatten(1).pow(2).sum(1).clamp(min=1e-30)
            step = ((1 + overshoot) * g / nrm2).reshape(-1, *[1] * (x.dim() - 1)) * a
            keep = (moved | (src == t)).reshape(-1, *[1] * (x.dim() - 1))
            xa = torch.where(keep, xa, (xa - step).clamp(lower, upper)).detach()
        out.append(xa)
    return torch.stack(out)


@torch.no_grad()
def _first_crossing(model, x, x_end, samples=128, bisections=40):
    """Distance from x to the first point of the segment x -> x_end where the predicted class changes (a fine scan,
    then bisection); inf where it never does. Every such point is a flip point (both top scores equal)."""
    src = model(x).argmax(1)
    out = torch.full((len(x),), math.inf, dtype=F64)
    ts = torch.linspace(0, 1, samples + 1, dtype=F64)[1:]
    for i in range(len(x)):
        d = (x_end[i] - x[i]).double()
        pts = (x[i].double() + ts.reshape(-1, *[1] * d.dim()) * d).to(x.dtype)
        hit = torch.nonzero(model(pts).argmax(1) != src[i])
        if len(hit) == 0:
            continue
        j = int(hit[0])
        lo, hi = (float(ts[j - 1]) if j else 0.0), float(ts[j])
        for _ in range(bisections):
            mid = 0.5 * (lo + hi)
            moved = int(model((x[i].double() + mid * d).to(x.dtype)[None]).argmax(1)) != int(src[i])
            lo, hi = (lo, mid) if moved else (mid, hi)
        out[i] = hi * float(d.norm())
    return out


def test_trained_net_never_farther_than_any_deepfool_crossing(mnist_mlp):
    net, X = mnist_mlp
    x = X[:32]
    res = closest_flip_point(net, x, lower=0.0, upper=1.0)
    assert res.converged.all(), [s for s in res.status if s != "converged"]
    _recompute_certificate(net, x, res, lower=0.0, upper=1.0)
    # the bound from every label-changing point of an independent per-target DeepFool (9 per digit)
    pts = _per_target_deepfool(net, x)
    bound = torch.stack([_first_crossing(net, x, p) for p in pts]).amin(0)
    assert torch.isfinite(bound).all()
    ratio = res.distance / bound
    assert (ratio <= 1.01).all(), (ratio.max(), torch.nonzero(ratio > 1.01)[:, 0].tolist())
    # the solver's own bound is a real boundary point's distance: never below the distance it certified / 1.01
    assert (res.distance <= 1.01 * res.upper_bound).all()


def test_trained_net_never_farther_than_fab(mnist_mlp):
    torchattacks = pytest.importorskip("torchattacks")
    net, X = mnist_mlp
    x = X[32:56]
    with torch.no_grad():
        y = net(x).argmax(1)
    x_fab = torchattacks.FAB(net, norm="L2", eps=10, steps=100, n_restarts=1)(x, y)
    cross = _first_crossing(net, x, x_fab)
    assert torch.isfinite(cross).sum() >= 20  # FAB changed (nearly) every label
    res = closest_flip_point(net, x, lower=0.0, upper=1.0)  # not told about FAB's points
    assert res.converged.all(), [s for s in res.status if s != "converged"]
    _recompute_certificate(net, x, res, lower=0.0, upper=1.0)
    ratio = res.distance / cross
    assert (ratio[torch.isfinite(cross)] <= 1.01).all(), ratio.max()
    # told about them ("a FAB run where asked"): the bound is built in
    told = closest_flip_point(net, x, lower=0.0, upper=1.0, candidates=x_fab)
    assert told.converged.all()
    _recompute_certificate(net, x, told, lower=0.0, upper=1.0)
    fin = torch.isfinite(cross)
    assert (told.distance[fin] <= 1.01 * cross[fin]).all()
    assert (told.distance <= 1.01 * told.upper_bound).all() and torch.isfinite(told.upper_bound[fin]).all()


def test_a_closer_boundary_point_than_the_local_minimum_is_found():
    # two targets: class 1 behind a far boundary that the linearisation at x points to, class 2 behind a near one
    # that the local gradient ignores (a narrow bump). The screened, direct solve toward class 1 lands far; the
    # segment toward a label-changing point crosses the near boundary first, and the solve restarted there wins.
    class Bump(nn.Module):
        def forward(self, x):
            near = 4 * torch.exp(-(((x[:, 0] + 0.6) / 0.15) ** 2) - x[:, 1] ** 2)
            return torch.stack([torch.ones_like(x[:, 0]), x[:, 0], near - 2], 1)

    model = Bump().double()
    x = torch.tensor([[0.0, 0.0]], dtype=F64)
    plain = closest_flip_point(model, x, screen=1, upper_bounds=False)
    assert plain.converged.all() and int(plain.target[0]) == 1
    np.testing.assert_allclose(float(plain.distance[0]), 1.0, atol=1e-6)  # the far boundary x0 = 1
    # a label-changing point behind the near boundary (here: given, as an attack would return it)
    res = closest_flip_point(model, x, screen=1, candidates=torch.tensor([[-0.7, 0.0]], dtype=F64))
    assert res.converged.all() and int(res.target[0]) == 2, res.status
    _recompute_certificate(model, x, res)
    ref = _slsqp_flip(model, x[0], 0, 2, starts=[np.array([-0.5, 0.0])])
    assert math.isfinite(ref) and float(res.distance[0]) <= ref * (1 + 1e-6)
    np.testing.assert_allclose(float(res.distance[0]), 0.6 - 0.15 * math.sqrt(math.log(4 / 3)), atol=1e-6)
    assert float(res.upper_bound[0]) < 0.6 and int(res.start[0]) == 101


# ------------------------------------------------------------------------------------------- homotopy, restarts


def _trap_model() -> nn.Module:
    """A 1-D erf net (embedded in 2-D) with two boundary points: t = 3.3648 where the local slope at x_hat = 0
    points, and the closer t = -1.1706 behind a steep erf step that is saturated at x_hat. A direct solve follows
    the local slope to the worse local minimum; the homotopy (erf widened until the step unit is visible at x_hat)
    finds the closer one."""
    m = MLP(2, [2], 2, activation="erf").double()
    L = 20.0
    A = 0.3 * L * math.sqrt(math.pi) / 2  # the second unit is nearly linear: about -0.3 t over |t| < 5
    with torch.no_grad():
        m.net[0].weight.copy_(torch.tensor([[3.0, 0.0], [1.0 / L, 0.0]]))
        m.net[0].bias.copy_(torch.tensor([3.6, 0.0]))
        m.net[2].weight.copy_(torch.tensor([[1.5, -A], [0.0, 0.0]]))
        m.net[2].bias.copy_(torch.tensor([-0.5, 0.0]))
    return m.eval()


def test_homotopy_escapes_the_worse_local_minimum():
    model = _trap_model()
    x = torch.zeros(1, 2, dtype=F64)
    direct = closest_flip_point(model, x)
    homo = closest_flip_point(model, x, homotopy=True)
    ref = _slsqp_flip(model, x[0], 0, 1, starts=[np.array([r, 0.3]) for r in np.linspace(-4, 4, 9)])
    assert math.isfinite(ref)
    assert direct.converged.all() and homo.converged.all()
    _recompute_certificate(model, x, direct)
    _recompute_certificate(model, x, homo)
    assert float(direct.distance[0]) > 2 * ref  # the trap works: the direct solve lands in the worse minimum
    assert int(homo.start[0]) == 1  # ... and it is the homotopy candidate that finds the global one
    assert float(homo.distance[0]) <= ref * (1 + 1e-6)
    np.testing.assert_allclose(float(homo.distance[0]), 1.1706, atol=2e-4)


def test_erf_homotopy_sigmas_unsaturate_every_unit():
    model = _trained_mlp("erf")
    X, _ = _toy(d=4, seed=12)
    x = X[:16].double()
    tau = 0.1
    sig = erf_homotopy_sigmas(model, x, tau)
    p = math.sqrt(-math.log(math.sqrt(math.pi) * tau / 2))
    assert (sig >= erf_sigmas(model) - 1e-12).all()
    # recompute the pre-activations with the widened sigmas: every |u| / sigma <= p, equality for the largest
    lin1, act1, lin2 = model.net[0], model.net[1], model.net[2]
    with torch.no_grad():
        u1 = lin1(x)
        u2 = lin2(torch.erf(u1 / sig[0]))
    assert float(u1.abs().max() / sig[0]) <= p + 1e-9 and float(u2.abs().max() / sig[1]) <= p + 1e-9
    assert float(u1.abs().max() / sig[0]) == pytest.approx(p) or float(sig[0]) == float(act1.sigma)
    assert float(act1.sigma) == 1.0  # the model itself is untouched


class _TwoBlobs(nn.Module):
    """Class 1 lives in two Gaussian blobs: a wide one far along +x1 (the score gradient at the origin points to
    it; boundary at distance 4 - 2 sqrt(ln 2) = 2.33) and a narrower one along -x2 whose pull is invisible at the
    origin (boundary at about 2.8 - sqrt(ln 2) = 1.97, closer). Only starts near the narrow blob find it."""

    def forward(self, x):
        wide = 2 * torch.exp(-((x[:, 0] - 4) ** 2 + x[:, 1] ** 2) / 4)
        narrow = 2 * torch.exp(-(x[:, 0] ** 2 + (x[:, 1] + 2.8) ** 2))
        return torch.stack([1 - wide - narrow, torch.zeros_like(wide)], 1)


def test_restarts_keep_the_closest_certified():
    model = _TwoBlobs()
    x = torch.zeros(1, 2, dtype=F64)
    direct = closest_flip_point(model, x)
    multi = closest_flip_point(model, x, restarts=8, seed=0)
    ref = _slsqp_flip(model, x[0], 0, 1, starts=[np.array([0.0, -2.0]), np.array([2.0, 0.0])])
    assert math.isfinite(ref)
    assert direct.converged.all() and multi.converged.all()
    _recompute_certificate(model, x, direct)
    _recompute_certificate(model, x, multi)
    assert float(direct.distance[0]) == pytest.approx(4 - 2 * math.sqrt(math.log(2)), abs=1e-2)
    assert int(multi.start[0]) >= 2  # a random start won ...
    assert float(multi.distance[0]) <= ref * (1 + 1e-6)  # ... and it is the global minimum
    assert float(multi.distance[0]) == pytest.approx(2.8 - math.sqrt(math.log(2)), abs=2e-2)
    # on a trained net extra starts never make the answer worse
    model2 = _trained_mlp("tanh", seed=1)
    X, _ = _toy(d=4, seed=13)
    x2 = X[:6].double()
    base = closest_flip_point(model2, x2)
    more = closest_flip_point(model2, x2, restarts=2, seed=1)
    _recompute_certificate(model2, x2, base)
    _recompute_certificate(model2, x2, more)
    assert (more.converged | ~base.converged).all()
    both = base.converged & more.converged
    assert (more.distance[both] <= base.distance[both] * (1 + 1e-9)).all()


# ----------------------------------------------------------------------------------------------------- failures


def test_failures_are_reported_not_returned():
    # z0 = x1, z1 = -x1, z2 = -1: z0 = z2 needs x1 = -1, where z1 = 1 beats both -> class 2 can never be top-2-tied
    lin = nn.Linear(2, 3).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.0, 0.0, -1.0]))
    x = torch.tensor([[2.0, 0.0]], dtype=F64)
    res = closest_flip_point(lin, x, target=torch.tensor([2]), max_iter=60)
    assert not res.converged.any()
    assert torch.isnan(res.x_flip).all() and torch.isnan(res.distance).all() and int(res.start[0]) == -1
    assert res.status[0] != "converged" and ("residual" in res.status[0] or "margin" in res.status[0])
    assert torch.isfinite(res.x_attempt).all()
    # all targets: the impossible one is inf in the matrix, the point itself is certified through class 1
    res_all = closest_flip_point(lin, x)
    assert res_all.converged.all() and int(res_all.target[0]) == 1
    assert math.isinf(float(res_all.distances[0, 2]))
    # bounds that exclude the boundary (x1 = 0) -> failed
    lin2 = nn.Linear(2, 2).double()
    with torch.no_grad():
        lin2.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        lin2.bias.zero_()
    res_b = closest_flip_point(lin2, torch.tensor([[1.0, 0.0]], dtype=F64), lower=0.5, upper=2.0, max_iter=40)
    assert not res_b.converged.any() and torch.isnan(res_b.x_flip).all()
    assert float(res_b.bound_violation[0]) == 0  # the attempt stays in the box; it is the residual that fails


# ------------------------------------------------------------------------------------------- categorical groups


def test_one_hot_group_gives_valid_category_and_matches_closed_form():
    # binary linear model on [c0, c1, one-hot(3)]; with the block fixed to category c the closest point moves only
    # c0, c1: d_c^2 = ||e_c - x_blk||^2 + g_c^2 / ||w_cont||^2 (closed form)
    lin = nn.Linear(5, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.4, -0.3, 0.0, 1.5, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.2, 0.0]))
    x = torch.tensor([[0.5, 0.2, 1.0, 0.0, 0.0], [2.0, -1.0, 0.0, 1.0, 0.0]], dtype=F64)
    groups = [[2, 3, 4]]
    res = closest_flip_point(lin, x, groups=groups)
    w = (lin.weight[0] - lin.weight[1]).detach()
    b = float((lin.bias[0] - lin.bias[1]).detach())
    w_cont = w[:2].detach()

    def d_fixed(i, c):
        e = torch.zeros(3, dtype=F64)
        e[c] = 1
        gc = float(w_cont @ x[i, :2] + w[2:].detach() @ e + b)
        return math.sqrt(float(((e - x[i, 2:]) ** 2).sum()) + gc**2 / float(w_cont @ w_cont))

    assert res.converged.all(), res.status
    blk = res.x_flip[:, 2:]
    assert ((blk == 0) | (blk == 1)).all() and (blk.sum(1) == 1).all()  # a valid category
    for i in range(len(x)):
        c_own = int(x[i, 2:].argmax())
        c_new = int(blk[i].argmax())
        np.testing.assert_allclose(float(res.distance[i]), d_fixed(i, c_new), atol=1e-8)
        assert float(res.distance[i]) <= d_fixed(i, c_own) + 1e-8  # never worse than keeping the category
    # rounding_changed: did rounding move the relaxed solution's block (relaxed to [0, 1])? Both rows must lower
    # g = w.x + b > 0. Row 0's block (1, 0, 0) cannot help: the entries with w > 0 already sit at their lower bound 0
    # and w = 0 on its own entry, so the relaxed point keeps (1, 0, 0) and rounding moves nothing. Row 1's block
    # (0, 1, 0) lowers g by shrinking entry 3 (w = 1.5) to a fraction, which rounding then moves.
    assert ((x @ w + b) > 0).all() and w[2] == 0 and (w[3:] > 0).all()
    assert res.rounding_changed is not None and res.rounding_changed.tolist() == [False, True]


def test_one_hot_group_point_is_within_one_percent_of_the_best_category_combination():
    """Binary linear models on [c0, c1, one-hot(4)] with large category weights, so that the best category is often
    neither x's own nor the rounded relaxed one, and changing it alone often flips the label (the closest valid point
    then moves the numeric features back). Oracle: enumerate the 4 categories, each with its closed-form projection of
    the numeric part, d_c^2 = ||e_c - x_blk||^2 + g_c^2 / ||w_cont||^2. The returned point must be certified and
    within 1 % of the best combination — the valid-category crossings bound it (and start a solve where closer)."""
    worst, n_changed = 0.0, 0
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        lin = nn.Linear(6, 2).double()
        with torch.no_grad():
            lin.weight.copy_(torch.randn(2, 6, generator=g, dtype=F64) * torch.tensor([0.3, 0.3, 2, 2, 2, 2]))
            lin.bias.zero_()
        x = torch.rand(4, 6, generator=g, dtype=F64)
        x[:, 2:] = torch.nn.functional.one_hot(torch.randint(0, 4, (4,), generator=g), 4).double()
        res = closest_flip_point(lin, x, groups=[[2, 3, 4, 5]])
        w = (lin.weight[0] - lin.weight[1]).detach()
        for i in range(len(x)):
            d = []
            for c in range(4):
                e = torch.zeros(4, dtype=F64)
                e[c] = 1
                gc = float(w[:2] @ x[i, :2] + w[2:] @ e)
                d.append(math.sqrt(float(((e - x[i, 2:]) ** 2).sum()) + gc**2 / float(w[:2] @ w[:2])))
            assert bool(res.converged[i]), (seed, i, res.status[i])
            worst = max(worst, float(res.distance[i]) / min(d))
            n_changed += int(np.argmin(d)) != int(x[i, 2:].argmax())
            assert float(res.upper_bound[i]) >= min(d) * (1 - 1e-9)  # from valid points: never below the optimum
    assert worst <= 1.01, worst
    assert n_changed >= 10  # the case the test is about: the best valid point has another category


# ----------------------------------------------------------------------------------------------------- input handling


def _bad_calls():
    lin = nn.Linear(3, 3).double()
    x = torch.zeros(2, 3, dtype=F64)
    src = lin(x).argmax(1)
    drop = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).double().train()
    return [
        (lambda: closest_flip_point(lin, torch.full((2, 3), math.nan, dtype=F64)), ValueError, "x"),
        (lambda: closest_flip_point(lin, torch.zeros(2, 4, dtype=F64)), ValueError, "x of shape"),
        (lambda: closest_flip_point(lin, torch.zeros(0, 3, dtype=F64)), ValueError, "empty"),
        (lambda: closest_flip_point(lin, x.long()), TypeError, "x must be float"),
        (lambda: closest_flip_point(lin, x, lower=1.0, upper=0.0), ValueError, "lower > upper"),
        (lambda: closest_flip_point(lin, x, lower=torch.zeros(5)), ValueError, "lower"),
        (lambda: closest_flip_point(lin, x, target=torch.tensor([0, 7])), ValueError, "target"),
        (lambda: closest_flip_point(lin, x, target=src), ValueError, "target equals the source"),
        (lambda: closest_flip_point(lin, x, target=torch.tensor([0.0, 1.0])), TypeError, "target"),
        (lambda: closest_flip_point(lin, x, source=torch.tensor([0])), ValueError, "source"),
        (lambda: closest_flip_point(lin, x, scale=torch.tensor([1.0, 0.0, 1.0])), ValueError, "scale"),
        (lambda: closest_flip_point(lin, x, mask=torch.ones(3)), TypeError, "mask"),
        (lambda: closest_flip_point(lin, x, groups=[[0]]), ValueError, "groups"),
        (lambda: closest_flip_point(lin, x, groups=[[0, 1], [1, 2]]), ValueError, "groups"),
        (lambda: closest_flip_point(lin, x, tol=0.0), ValueError, "tol"),
        (lambda: closest_flip_point(lin, x, max_iter=0), ValueError, "max_iter"),
        (lambda: closest_flip_point(lin, x, margin=-1.0), ValueError, "margin"),
        (lambda: closest_flip_point(lin, x, homotopy_tau=5.0, homotopy=True), ValueError, "homotopy_tau"),
        (lambda: closest_flip_point(lin, x, screen=0), ValueError, "screen"),
        (lambda: closest_flip_point(lin, x, candidates=torch.zeros(2, 4, dtype=F64)), ValueError, "candidates"),
        (lambda: closest_flip_point(lin, x, candidates=torch.full((2, 3), math.nan, dtype=F64)), ValueError,
         "candidates"),
        (lambda: closest_flip_point("not a model", x), TypeError, "model"),
        (lambda: closest_flip_point(drop, x), ValueError, "model"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_naming_the_argument(case):
    call, err, match = _bad_calls()[case]
    with pytest.raises(err, match=match):
        call()


def test_inputs_not_mutated_and_deterministic():
    model = _trained_mlp("erf", seed=2)
    X, _ = _toy(d=4, seed=14)
    x = X[:5].double()
    lower, upper = torch.full((4,), -2.0, dtype=F64), torch.full((4,), 2.0, dtype=F64)
    scale = torch.tensor([1.0, 2.0, 1.0, 0.5], dtype=F64)
    mask = torch.tensor([True, True, False, True])
    saved = [t.clone() for t in (x, lower, upper, scale, mask)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    kw = dict(lower=lower, upper=upper, scale=scale, mask=mask, restarts=2, seed=5, homotopy=True, homotopy_steps=3)
    r1 = closest_flip_point(model, x, **kw)
    r2 = closest_flip_point(model, x, **kw)
    for a, b in zip(saved, (x, lower, upper, scale, mask)):
        assert torch.equal(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # erf sigmas restored after the homotopy
    assert grads == [p.requires_grad for p in model.parameters()]
    assert torch.equal(r1.x_attempt, r2.x_attempt) and torch.equal(r1.converged, r2.converged)
    assert r1.status == r2.status
    assert r1.converged.any()
    assert torch.equal(r1.x_flip[r1.converged][:, 2], x[r1.converged][:, 2])  # masked feature fixed
    _recompute_certificate(model, x, r1, lower=lower, upper=upper, mask=mask, scale=scale)  # bounds, mask, homotopy


class _ThreadSpy(nn.Module):
    """A linear 2-class model that records torch's intra-op thread count at every forward call."""

    def __init__(self, conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1) if conv else None
        self.lin = nn.Linear(4, 2).double()
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        return self.lin(x.reshape(len(x), 4))


@pytest.mark.parametrize("conv", [False, True])
def test_dense_models_are_solved_on_one_thread_and_the_setting_restored(conv):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        spy = _ThreadSpy(conv).double()
        res = closest_flip_point(spy, torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0)))
        assert res.converged.all()
        assert torch.get_num_threads() == 2
        assert set(spy.seen[2:]) == ({2} if conv else {1})  # (the argument checks run before the solve)
    finally:
        torch.set_num_threads(before)


def test_region_gap_is_the_weak_duality_bound():
    # (-0.1, 0) on the flat piece of x_2 = relu(x_1), no kink within tolerance: its region's linearised problem is
    # {x_2 = 0, x_1 <= 0 not represented}, whose closest point to (0.3, -1) is (0.3, 0) at distance exactly 1
    model = _Corner(1.0)
    xh = torch.tensor([[0.3, -1.0]], dtype=F64)
    ok, chk = _region_certificate(model, xh, torch.tensor([[-0.1, 0.0]], dtype=F64))
    assert not bool(ok[0])
    assert abs(float(chk["gap"][0]) - (math.sqrt(0.16 + 1.0) - 1.0)) < 1e-9
    # from (-0.5, -1) the flat piece's closest point is (-0.5, 0): (-0.52, 0) is 0.02 % farther, within the 1 % the
    # gap allows, although its KKT measure (tan of the angle, 0.02) fails
    xh = torch.tensor([[-0.5, -1.0]], dtype=F64)
    ok, chk = _region_certificate(model, xh, torch.tensor([[-0.52, 0.0]], dtype=F64))
    assert abs(float(chk["gap"][0]) - (math.sqrt(1.0004) - 1.0)) < 1e-9
    assert float(chk["kkt"][0]) > 1e-4 and float(chk["gap"][0]) < 1e-3 and bool(ok[0])


def test_shipped_mnist_cnn_certified_by_region_gap():
    from flipfrag.models import trained_model

    net, ds, _ = trained_model("mnist-cnn", "quick", seed=0)
    x = ds.X_test[:4]
    res = closest_flip_point(net.eval(), x, lower=0.0, upper=1.0)
    # measured: all 4 certified by the region gap (0.4-0.5 %), none by the plain KKT test (0.10-0.18 on a kink)
    assert res.converged.all(), res.status
    assert (res.distance <= 1.01 * res.upper_bound).all()  # where a boundary crossing was found (else inf)
    assert ((res.region_gap >= 0) & (res.region_gap <= 0.01)).all(), res.region_gap  # NaN fails: no certificate
    dist = (res.x_flip - x).flatten(1).norm(dim=1).to(res.distance.dtype)
    torch.testing.assert_close(res.distance, dist, atol=1e-6, rtol=1e-6)
    resid, scale, marg, _ = _recompute_certificate(net, x, res, lower=0.0, upper=1.0)
    assert (resid <= 1e-6 * scale).all() and (marg >= -1e-6 * scale).all()  # (over the certified points)


def test_rounded_group_points_are_not_judged_by_relaxed_crossings():
    """A crossing of the relaxed problem has fractional categories, so it is closer than any point with a valid
    category: judged against it, every rounded point would fail. Rounded points are certified on their own problem:
    with and without the crossing rounds the same points are certified, and never closer than the relaxed bound."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    x = torch.rand(8, 6, dtype=F64)
    x[:, 3:] = torch.nn.functional.one_hot(torch.randint(0, 3, (8,)), 3).double()
    groups = [[3, 4, 5]]
    with_bounds = closest_flip_point(net, x, groups=groups, lower=0.0, upper=1.0)
    without = closest_flip_point(net, x, groups=groups, lower=0.0, upper=1.0, upper_bounds=False)
    assert with_bounds.converged.sum() >= without.converged.sum() >= 6, (with_bounds.status, without.status)
    ok = with_bounds.converged
    blk = with_bounds.x_flip[ok][:, 3:]
    assert ((blk == 0) | (blk == 1)).all() and (blk.sum(1) == 1).all()
    # the relaxed bound is a bound on the relaxed problem only: the rounded distance is never below the relaxed optimum
    relaxed = closest_flip_point(net, x, lower=0.0, upper=1.0)
    both = ok & relaxed.converged
    assert (with_bounds.distance[both] >= relaxed.distance[both] * (1 - 1e-6)).all()
