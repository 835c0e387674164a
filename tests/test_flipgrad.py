"""Tests of flipfrag.flip.gradient (differentiable closest flip points) against oracles: the closed-form Jacobian of the
projection onto a hyperplane, central finite differences of the solver itself (re-solved at perturbed inputs and
parameters), and hand-built degenerate active sets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flipfrag.flip import closest_flip_point
from flipfrag.models import MLP

F64 = torch.float64
TIGHT = dict(tol=1e-12, kkt_tol=1e-9, max_iter=100, upper_bounds=False)  # accurate solves for finite differences


# ----------------------------------------------------------------------------------------------------- helpers


def _erf_mlp(n: int = 4, seed: int = 1, classes: int = 3, activation: str = "erf") -> nn.Module:
    """A random smooth MLP; its decision boundaries are curved on the scale of the distances (see the tests)."""
    torch.manual_seed(seed)
    return MLP(n, [16, 16], classes, activation=activation).to(F64).eval()


def _frozen(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _ift_jacobian(x_flip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, n, n) d x_flip_i / d x_i by one backward per output coordinate (the points are independent)."""
    N, n = x.shape[0], x[0].numel()
    J = torch.empty(N, n, n, dtype=F64)
    for k in range(n):
        v = torch.zeros(N, n, dtype=F64)
        v[:, k] = 1.0
        (g,) = torch.autograd.grad(x_flip, x, v.reshape(x_flip.shape), retain_graph=True)
        J[:, k] = g.reshape(N, n)
    return J


def _fd_jacobian(model, x: torch.Tensor, target, h: float = 1e-3, **kw):
    """(N, n, n) central differences of the solver's x_flip, and whether every perturbed solve was certified."""
    N, n = x.shape[0], x[0].numel()
    J = torch.empty(N, n, n, dtype=F64)
    ok = torch.ones(N, dtype=torch.bool)
    for j in range(n):
        e = torch.zeros(n, dtype=F64)
        e[j] = h
        e = e.reshape(x.shape[1:])
        rp = closest_flip_point(model, x + e, target=target, **kw)
        rm = closest_flip_point(model, x - e, target=target, **kw)
        ok &= rp.converged & rm.converged
        J[:, :, j] = ((rp.x_flip - rm.x_flip) / (2 * h)).reshape(N, n)
    return J, ok


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------------- linear models


@pytest.mark.parametrize("classes", [2, 3])
def test_linear_model_jacobian_matches_the_closed_form(classes):
    """x* = x_hat - D^-2 a (a^T x_hat + b) / (a^T D^-2 a), so d x*/d x_hat = I - D^-2 a a^T / (a^T D^-2 a)."""
    torch.manual_seed(0)
    n = 5
    lin = _frozen(nn.Linear(n, classes).to(F64))
    if classes == 3:  # the third class far below the others: its constraint stays inactive
        with torch.no_grad():
            lin.bias[2] = -50.0
    x = torch.randn(4, n, dtype=F64, requires_grad=True)
    scale = torch.rand(n, dtype=F64) + 0.5
    res = closest_flip_point(lin, x, target=1 - lin(x).argmax(1), scale=scale, differentiable=True)
    assert res.converged.all() and res.grad_status == ["ok"] * 4
    J = _ift_jacobian(res.x_flip, x)
    for i in range(4):
        s, t = int(res.source[i]), int(res.target[i])
        a = (lin.weight[s] - lin.weight[t]).detach()
        Da = a / scale**2
        J_true = torch.eye(n, dtype=F64) - torch.outer(Da, a) / (a @ Da)
        assert _rel(J[i], J_true) <= 1e-10


def test_linear_model_parameter_gradient_matches_the_closed_form():
    """For two classes and D = I: x* = x_hat - a (a^T x_hat + b) / |a|^2, a = w_0 - w_1, b = b_0 - b_1."""
    torch.manual_seed(3)
    n = 4
    lin = nn.Linear(n, 2).to(F64)
    x = torch.randn(3, n, dtype=F64)
    v = torch.randn(3, n, dtype=F64)
    res = closest_flip_point(lin, x, differentiable=True)
    (res.x_flip * v).sum().backward()

    w = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    a, beta = w[0] - w[1], b[0] - b[1]
    xs = x - a[None, :] * ((x @ a + beta) / (a @ a))[:, None]
    (xs * v).sum().backward()
    assert _rel(lin.weight.grad, w.grad) <= 1e-10
    assert _rel(lin.bias.grad, b.grad) <= 1e-10


# ----------------------------------------------------------------------------------------------------- smooth MLPs


def _tangent_projection(model, x_flip, source, target) -> torch.Tensor:
    """(N, n, n) I - a a^T / |a|^2, a = grad(z_s - z_t) at x_flip: the derivative if the boundary were flat."""
    xs = x_flip.detach().clone().requires_grad_(True)
    z = model(xs)
    (a,) = torch.autograd.grad((z.gather(1, source[:, None]) - z.gather(1, target[:, None])).sum(), xs)
    a = a.reshape(len(a), -1)
    return torch.eye(a.shape[1], dtype=F64) - a[:, :, None] * a[:, None, :] / (a * a).sum(1)[:, None, None]


@pytest.fixture(scope="module")
def erf_problem():
    model = _frozen(_erf_mlp())
    x = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    return model, x, closest_flip_point(model, x).target


def test_smooth_mlp_jacobian_matches_finite_differences(erf_problem):
    model, x0, tgt = erf_problem
    x = x0.clone().requires_grad_(True)
    res = closest_flip_point(model, x, target=tgt, differentiable=True, **TIGHT)
    J = _ift_jacobian(res.x_flip, x)
    good = torch.tensor([st == "ok" for st in res.grad_status])
    assert (good == res.converged).all()  # nothing degenerate here
    assert torch.isnan(J[~good]).all() and torch.isfinite(J[good]).all()
    J_fd = torch.full_like(J, float("nan"))
    J_fd[good], ok = _fd_jacobian(model, x0[good], tgt[good], **TIGHT)  # re-solves of the certified points only
    good[good.clone()] = ok  # and whose perturbed re-solves were certified too
    assert good.sum() >= 4, (res.grad_status, ok)
    errs = [_rel(J[i], J_fd[i]) for i in torch.nonzero(good)[:, 0].tolist()]
    assert max(errs) <= 1e-4, errs
    # the boundary is curved: the derivative is not the tangent projection of the linearisation
    P = _tangent_projection(model, res.x_flip[good], res.source[good], tgt[good])
    assert min(_rel(P[i], J_fd[good][i]) for i in range(len(P))) > 1e-2
    # vector-Jacobian products against random cotangents
    v = torch.randn(len(x0), 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    (g,) = torch.autograd.grad(res.x_flip, x, v * good[:, None])
    g_fd = torch.einsum("pk,pkj->pj", v, J_fd)
    assert _rel(g[good], g_fd[good]) <= 1e-4
    assert (g[~good] == 0).all()  # a zero cotangent contributes exactly zero, also at failed points


def _halfway_box(x: torch.Tensor, x_flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point bounds (loose, +-10 around x) that cut the largest move of the unbounded solution in half."""
    lower, upper = x - 10.0, x + 10.0
    step = x_flip - x
    j = step.abs().argmax(1)
    ar = torch.arange(len(x))
    cut = x[ar, j] + 0.5 * step[ar, j]
    up = step[ar, j] > 0
    upper[ar[up], j[up]] = cut[up]
    lower[ar[~up], j[~up]] = cut[~up]
    return lower, upper


def test_smooth_mlp_with_active_bounds_and_a_mask_matches_finite_differences(erf_problem):
    model, x0, tgt = erf_problem
    free0 = closest_flip_point(model, x0, target=tgt, **TIGHT)
    keep = free0.converged
    x0, tgt = x0[keep], tgt[keep]
    lower, upper = _halfway_box(x0, free0.x_flip[keep])
    mask = torch.tensor([True, True, True, False]).expand_as(x0)  # feature 3 stays at x_hat
    lower[:, 3], upper[:, 3] = x0[:, 3] - 10.0, x0[:, 3] + 10.0  # the mask, not a bound, fixes feature 3
    kw = dict(lower=lower, upper=upper, mask=mask, **TIGHT)
    x = x0.clone().requires_grad_(True)
    res = closest_flip_point(model, x, target=tgt, differentiable=True, **kw)
    xf = res.x_flip.detach()
    at_bound = (xf == lower) | (xf == upper)
    good = torch.tensor([st == "ok" for st in res.grad_status])
    assert (at_bound[:, :3].sum(1)[good] >= 1).all() and good.sum() >= 3, res.grad_status
    J = _ift_jacobian(res.x_flip, x)
    J_fd = torch.full_like(J, float("nan"))
    J_fd[good], ok = _fd_jacobian(
        model, x0[good], tgt[good], **{**kw, "lower": lower[good], "upper": upper[good], "mask": mask[good]}
    )
    good[good.clone()] = ok
    assert good.sum() >= 3
    errs = [_rel(J[i], J_fd[i]) for i in torch.nonzero(good)[:, 0].tolist()]
    assert max(errs) <= 1e-4, errs
    # structure: a feature at a bound does not move; the masked feature follows x_hat one to one
    for i in torch.nonzero(good)[:, 0].tolist():
        assert (J[i][at_bound[i]] == 0).all()
        assert J[i, 3, 3] == 1.0 and (J[i, 3, :3] == 0).all()
        assert J[i, :3, 3].abs().max() > 1e-3  # ... and moves the free features through the curvature


def test_parameter_gradient_matches_finite_differences(erf_problem):
    _, x0, tgt = erf_problem
    model = _erf_mlp()  # parameters require grad
    params = list(model.parameters())
    v = torch.randn(len(x0), 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    first = closest_flip_point(model, x0, target=tgt, **TIGHT).converged
    x0, tgt, v = x0[first], tgt[first], v[first]  # re-solve only the points the solver certifies (faster)
    res = closest_flip_point(model, x0, target=tgt, differentiable=True, **TIGHT)
    ok = torch.tensor([st == "ok" for st in res.grad_status])

    def loss(shift: float, direction: list[torch.Tensor]) -> torch.Tensor:
        """Per point v . x_flip at the shifted parameters (N,); clears ok where the solve was not certified."""
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(shift * d)
            r = closest_flip_point(model, x0, target=tgt, **TIGHT)
            for p, d in zip(params, direction, strict=True):
                p.sub_(shift * d)
        ok.mul_(r.converged)
        return (r.x_flip * v).sum(1)

    gen = torch.Generator().manual_seed(3)
    h = 1e-4
    directions = [[torch.randn(p.shape, dtype=F64, generator=gen) for p in params] for _ in range(2)]
    directions = [[di / math.sqrt(sum(float((dj**2).sum()) for dj in d)) for di in d] for d in directions]  # unit
    for k in (0, 5):  # single entries: a first-layer weight, an output bias
        directions.append([torch.zeros_like(p) for p in params])
        directions[-1][k].view(-1)[1] = 1.0
    fds = [(loss(h, d) - loss(-h, d)) / (2 * h) for d in directions]
    assert ok.sum() >= 3
    grads = torch.autograd.grad((res.x_flip * v * ok[:, None]).sum(), params)
    assert all(torch.isfinite(g).all() for g in grads)
    errs = []
    for d, fd in zip(directions, fds, strict=True):
        ift = sum(float((g * di).sum()) for g, di in zip(grads, d, strict=True))
        fd = float(fd[ok].sum())
        errs.append(abs(ift - fd) / max(abs(fd), 1e-3))
    assert max(errs) <= 1e-4, errs


# ----------------------------------------------------------------------------------------------- curved closed form


class _Ball(nn.Module):
    """Two classes split by the sphere |x| = rho: z = (rho^2 - |x|^2, 0). Closest flip point x* = rho x / |x|."""

    def __init__(self, rho: float = 1.0):
        super().__init__()
        self.rho = nn.Parameter(torch.tensor(rho, dtype=F64))

    def forward(self, x):
        r2 = (x.flatten(1) ** 2).sum(1)
        return torch.stack([self.rho**2 - r2, torch.zeros_like(r2)], 1)


@pytest.mark.parametrize("dense_max", [64, 0])  # the dense reduced Hessian and the projected CG
def test_sphere_jacobian_and_radius_gradient_match_the_closed_form(dense_max):
    """x* = rho x/|x|: d x*/d x = rho (I - x x^T/|x|^2) / |x| (the curvature term makes it differ from the
    tangent projection by the factor rho/|x|), and d x*/d rho = x/|x|."""
    from flipfrag.flip import attach_gradients

    model = _Ball(1.3)
    x0 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    x0 = x0 / x0.norm(dim=1, keepdim=True) * torch.tensor([0.3, 0.8, 1.1, 1.9, 2.5], dtype=F64)[:, None]
    x = x0.clone().requires_grad_(True)
    res = attach_gradients(closest_flip_point(model, x0), model, x, dense_max=dense_max)
    assert res.converged.all() and res.grad_status == ["ok"] * 5
    J = _ift_jacobian(res.x_flip, x)
    r = x0.norm(dim=1)
    u = x0 / r[:, None]
    J_true = 1.3 * (torch.eye(3, dtype=F64) - u[:, :, None] * u[:, None, :]) / r[:, None, None]
    for i in range(5):
        assert _rel(J[i], J_true[i]) <= 1e-6
    v = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    (g_rho,) = torch.autograd.grad((res.x_flip * v).sum(), model.rho)
    assert abs(float(g_rho) - float((u * v).sum())) <= 1e-6 * float((u * v).abs().sum())


def test_gradcheck_through_the_solver():
    """torch.autograd.gradcheck: the analytic Jacobian against its own finite differences, which re-solve."""
    model = _Ball(1.0)
    model.rho.requires_grad_(False)
    x = torch.tensor([[0.4, -0.3, 0.2]], dtype=F64, requires_grad=True)
    fn = lambda t: closest_flip_point(model, t, differentiable=True, tol=1e-12, kkt_tol=1e-10).x_flip  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------- degenerate


def _linear(weight, bias=None) -> nn.Module:
    w = torch.tensor(weight, dtype=F64)
    lin = nn.Linear(w.shape[1], w.shape[0]).to(F64)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.zeros(w.shape[0]) if bias is None else torch.tensor(bias, dtype=F64))
    return _frozen(lin)


@pytest.mark.parametrize(
    "case, weight, bias, lower, needle",
    [
        # z = (0, x1, x1 + x2): at x* = 0 the class-2 constraint is active with multiplier 0
        ("weak inequality", [[0, 0], [1, 0], [1, 1]], None, None, "class 2 has multiplier ~0"),
        # z = (0, x1): x* = 0 lies on the bound x2 >= 0 with multiplier 0
        ("weak bound", [[0, 0], [1, 0]], None, [-10.0, 0.0], "feature 1 at its lower bound"),
        # z = (0, x1, 2 x1): three scores meet at x* = 0 with parallel constraint gradients
        ("dependent gradients", [[0, 0], [1, 0], [2, 0]], None, None, "LICQ fails"),
        # class 2 can never win: no flip point toward it
        ("no flip point", [[0, 0], [1, 0], [1, 0]], [0, 0, -1], None, "no flip point"),
    ],
)
def test_degenerate_active_sets_give_nan_and_a_status(case, weight, bias, lower, needle):
    model = _linear(weight, bias)
    C = len(weight)
    x = torch.tensor([[-1.0, 0.0], [-2.0, 3.0]], dtype=F64, requires_grad=True)  # point 1: a regular control
    tgt = torch.tensor([C - 1 if case == "no flip point" else 1, 1])
    lo = None if lower is None else torch.tensor([lower, [-10.0, -10.0]], dtype=F64)
    res = closest_flip_point(model, x, target=tgt, lower=lo, differentiable=True)
    assert needle in res.grad_status[0], res.grad_status
    if case != "no flip point":
        assert res.converged[0]  # a certified flip point, but without a derivative
    (g,) = torch.autograd.grad(res.x_flip[:, 0].sum(), x, retain_graph=True)
    assert torch.isnan(g[0]).all()
    if case == "dependent gradients":  # every flip point of this model is the triple line x1 = 0
        assert "LICQ fails" in res.grad_status[1]
        return
    assert res.grad_status[1] == "ok", res.grad_status
    assert torch.isfinite(g[1]).all()
    (g1,) = torch.autograd.grad(res.x_flip[1, 0], x)  # the degenerate point does not poison the others
    assert torch.isfinite(g1).all() and (g1[0] == 0).all()


@pytest.mark.parametrize("dense_max", [64, 0])
def test_second_order_sufficiency_failure_gives_nan_and_a_status(dense_max):
    """From the centre of the sphere every boundary point is closest: the reduced Hessian is singular."""
    from flipfrag.flip import FlipResult, attach_gradients

    model = _Ball(1.0)
    x = torch.zeros(2, 3, dtype=F64)
    x[1, 0] = 0.5  # a regular control point
    x.requires_grad_(True)
    xf = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    z = model(xf).detach()
    one = torch.ones(2, dtype=F64)
    res = FlipResult(
        x_flip=xf,
        x_attempt=xf,
        distance=one,
        source=torch.zeros(2, dtype=torch.long),
        target=torch.ones(2, dtype=torch.long),
        residual=0 * one,
        margin=torch.full((2,), float("inf"), dtype=F64),
        bound_violation=0 * one,
        kkt=0 * one,
        iterations=torch.ones(2, dtype=torch.long),
        converged=torch.ones(2, dtype=torch.bool),
        status=["converged"] * 2,
        start=torch.zeros(2, dtype=torch.long),
        scores=z,
    )
    res = attach_gradients(res, model, x, dense_max=dense_max)
    v = torch.zeros(2, 3, dtype=F64)
    v[:, 1] = 1.0
    if dense_max:  # found when the result is made
        assert "second-order sufficiency fails" in res.grad_status[0] and res.grad_status[1] == "ok"
        (g,) = torch.autograd.grad(res.x_flip, x, v)
    else:  # found by CG in the backward pass, which rewrites the status and warns
        assert res.grad_status == ["ok", "ok"]
        with pytest.warns(UserWarning, match="grad_status"):
            (g,) = torch.autograd.grad(res.x_flip, x, v)
        assert "second-order sufficiency fails" in res.grad_status[0] and res.grad_status[1] == "ok"
    assert torch.isnan(g[0]).all()
    assert torch.allclose(g[1], torch.tensor([0.0, 2.0, 0.0], dtype=F64))  # d x*/d x = (I - e1 e1^T) / 0.5


# ------------------------------------------------------------------------------------------ ReLU, Krylov, downstream


def test_relu_net_derivative_is_the_scaled_projection():
    """ReLU nets have no curvature a.e., so H = D^2 and d x*/d x_hat = I - D^-2 a a^T / (a^T D^-2 a) with
    a = grad(z_s - z_t) at x* (one active constraint); the CG path stops after one iteration."""
    from flipfrag.flip import attach_gradients

    model = _frozen(_erf_mlp(activation="relu", seed=2))
    x0 = torch.randn(6, 4, dtype=F64, generator=torch.Generator().manual_seed(4))
    scale = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=F64)
    res0 = closest_flip_point(model, x0, scale=scale)
    for dense_max in (64, 0):
        x = x0.clone().requires_grad_(True)
        res = attach_gradients(res0, model, x, scale=scale, dense_max=dense_max)
        ok = torch.tensor([st == "ok" for st in res.grad_status])
        assert ok.sum() >= 3, res.grad_status
        J = _ift_jacobian(res.x_flip, x)
        xs = res.x_flip.detach().clone().requires_grad_(True)
        z = model(xs)
        (a,) = torch.autograd.grad((z.gather(1, res.source[:, None]) - z.gather(1, res.target[:, None])).sum(), xs)
        for i in torch.nonzero(ok & (res.margin > 1e-3))[:, 0].tolist():  # the other classes inactive
            Da = a[i] / scale**2
            assert _rel(J[i], torch.eye(4, dtype=F64) - torch.outer(Da, a[i]) / (a[i] @ Da)) <= 1e-10


def test_krylov_path_matches_the_dense_path(erf_problem):
    from flipfrag.flip import attach_gradients

    model, x0, tgt = erf_problem
    model = _erf_mlp()  # with parameter gradients too
    res0 = closest_flip_point(model, x0, target=tgt)
    v = torch.randn(len(x0), 4, dtype=F64, generator=torch.Generator().manual_seed(9))
    out = []
    for dense_max in (64, 0):
        x = x0.clone().requires_grad_(True)
        res = attach_gradients(res0, model, x, dense_max=dense_max)
        ok = torch.tensor([st == "ok" for st in res.grad_status])
        out.append(torch.autograd.grad((res.x_flip * v * ok[:, None]).sum(), [x, *model.parameters()]))
    assert ok.sum() >= 4
    for a, b in zip(*out, strict=True):
        assert _rel(b, a) <= 1e-8


def _flip_map(x_flip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Paper 1's explanation as a saliency map: |x_flip - x| summed over channels, normalised to sum 1."""
    m = (x_flip - x).abs().sum(1)
    return m / m.flatten(1).sum(1)[:, None, None]


def test_gradient_flows_through_the_flip_explanation_map():
    """A downstream function of x_flip(x) and x (the normalised flip map, weighted like a top-k objective):
    its autograd gradient against central differences of the whole pipeline along random directions."""
    torch.manual_seed(1)
    model = _frozen(MLP(2 * 3 * 3, [12], 3, activation="erf").to(F64).eval())  # images (N, 2, 3, 3)
    x0 = torch.randn(8, 2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    tgt = closest_flip_point(model, x0).target
    weights = torch.rand(3, 3, dtype=F64, generator=torch.Generator().manual_seed(2))

    def objective(x, **kw):
        res = closest_flip_point(model, x, target=tgt, **TIGHT, **kw)
        return (_flip_map(res.x_flip, x) * weights).flatten(1).sum(1), res

    x = x0.clone().requires_grad_(True)
    val, res = objective(x, differentiable=True)
    ok = torch.tensor([st == "ok" for st in res.grad_status])
    gen = torch.Generator().manual_seed(3)
    h = 1e-3
    for _ in range(2):
        d = torch.randn(x0.shape, dtype=F64, generator=gen)
        vp, rp = objective(x0 + h * d)
        vm, rm = objective(x0 - h * d)
        ok &= rp.converged & rm.converged
        fd = (vp - vm) / (2 * h)
        (g,) = torch.autograd.grad((val * ok).sum(), x, retain_graph=True)
        ift = (g * d).flatten(1).sum(1)
        assert ok.sum() >= 4
        assert _rel(ift[ok], fd[ok]) <= 1e-4, (ift, fd)


def test_points_certified_with_a_loose_kkt_tol_are_not_differentiated(erf_problem):
    """kkt_tol=inf certifies flip points that need not be KKT points: only those within 1e-3 get a derivative."""
    model, x0, _ = erf_problem
    x = x0.clone().requires_grad_(True)
    res = closest_flip_point(model, x, kkt_tol=math.inf, differentiable=True)
    ok = torch.tensor([st == "ok" for st in res.grad_status])
    assert res.converged.all() and (res.kkt[ok] <= 1e-3).all()
    assert all("not a smooth KKT point" in st for st, k in zip(res.grad_status, res.kkt, strict=True) if k > 1.01e-3)
    assert not ok.all()
    (g,) = torch.autograd.grad(res.x_flip.sum(), x)
    assert torch.isnan(g[~ok]).all() and torch.isfinite(g[ok]).all()


def test_bad_arguments_are_named():
    from flipfrag.flip import attach_gradients

    model = _linear([[0, 0], [1, 0]])
    x = torch.tensor([[-1.0, 0.5]], dtype=F64)
    with pytest.raises(TypeError, match="differentiable"):
        closest_flip_point(model, x, differentiable="yes")
    import flipfrag.flip.api as flip_module

    def no_solve(*args, **kwargs):
        raise AssertionError("solved before checking the arguments")

    with pytest.MonkeyPatch.context() as mp:  # a bad value is refused before any solving
        mp.setattr(flip_module, "_solve", no_solve)
        with pytest.raises(TypeError, match="differentiable"):
            closest_flip_point(model, x, differentiable=1)
    res = closest_flip_point(model, x)
    for kw, name in (
        (dict(dense_max=-1), "dense_max"),
        (dict(hess_tol=0), "hess_tol"),
        (dict(krylov_iter=1.5), "krylov"),
    ):
        with pytest.raises(ValueError, match=name):
            attach_gradients(res, model, x, **kw)
    assert res.grad_status is None  # only differentiable=True fills it


def test_float32_model_and_input(erf_problem):
    """A float32 model and input: the derivative (float32 model evaluations, float64 linear algebra) agrees with
    the float64 one to float32 accuracy, in x's dtype, on the dense and the CG path."""
    import copy

    from flipfrag.flip import attach_gradients

    model, x0, tgt = erf_problem
    x = x0.clone().requires_grad_(True)
    res = closest_flip_point(model, x, target=tgt, differentiable=True)
    J64 = _ift_jacobian(res.x_flip, x)
    model32 = copy.deepcopy(model).float()
    x32 = x0.float()
    res32 = closest_flip_point(model32, x32, target=tgt, tol=1e-5)
    ok = torch.tensor([st == "ok" for st in res.grad_status]) & res32.converged
    assert ok.sum() >= 4
    for dense_max in (64, 0):
        xr = x32.clone().requires_grad_(True)
        r = attach_gradients(res32, model32, xr, dense_max=dense_max)
        assert r.x_flip.dtype == torch.float32
        J = torch.stack([torch.autograd.grad(r.x_flip[:, k].sum(), xr, retain_graph=True)[0] for k in range(4)], 1)
        assert J.dtype == torch.float32
        assert _rel(J[ok].double(), J64[ok]) <= 1e-3


@pytest.mark.parametrize(
    "weight, lower, side",
    [([[0, 0], [1, 0], [1, 1]], None, 1.0), ([[0, 0], [1, 0]], [-10.0, 0.0], -1.0)],  # weak inequality, bound
)
def test_weak_constraints_kept_active_give_the_one_sided_derivative(weight, lower, side):
    """weak="active": at x_hat = (-1, 0), x* = (0, 0) with a weakly active constraint (x_2 <= 0 via class 2, or
    the bound x_2 >= 0). On the branch where it stays active (x_hat_2 moving by `side`) the derivative is 0, which
    one-sided re-solves confirm; on the other branch x_2 would follow x_hat_2."""
    from flipfrag.flip import attach_gradients

    model = _linear(weight)
    x0 = torch.tensor([[-1.0, 0.0]], dtype=F64)
    lo = None if lower is None else torch.tensor([lower], dtype=F64)
    res0 = closest_flip_point(model, x0, target=torch.tensor([1]), lower=lo)
    x = x0.clone().requires_grad_(True)
    res = attach_gradients(res0, model, x, lower=lo, weak="active")
    assert res.grad_status[0].startswith("ok (one-sided"), res.grad_status
    J = _ift_jacobian(res.x_flip, x)[0]
    h = 1e-3
    cols = []
    for e in (torch.tensor([[h, 0.0]]), torch.tensor([[0.0, side * h]])):  # x_hat_2 moves into the branch
        r = closest_flip_point(model, x0 + e, target=torch.tensor([1]), lower=lo)
        cols.append(((r.x_flip - res0.x_flip) / e.sum())[0])
    J_fd = torch.stack(cols, 1)
    assert torch.allclose(J, J_fd, atol=1e-9) and (J == 0).all()
    other = closest_flip_point(model, x0 - torch.tensor([[0.0, side * h]]), target=torch.tensor([1]), lower=lo)
    assert torch.allclose((other.x_flip - res0.x_flip)[0] / (-side * h), torch.tensor([0.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="weak"):
        attach_gradients(res0, model, x0, lower=lo, weak="yes")


def test_one_hot_groups_are_fixed_and_the_rest_is_the_projection():
    """With a one-hot block (groups), the rounded categories are fixed: their rows and columns of the Jacobian
    vanish and the free features get the projection I - a_F a_F^T / |a_F|^2 of the linear model."""
    torch.manual_seed(5)
    lin = _frozen(nn.Linear(5, 2).to(F64))
    x0 = torch.randn(3, 5, dtype=F64)
    x0[:, 3:] = torch.tensor([1.0, 0.0], dtype=F64)
    x = x0.clone().requires_grad_(True)
    res = closest_flip_point(lin, x, groups=[[3, 4]], upper_bounds=False, differentiable=True)
    assert res.converged.all() and res.grad_status == ["ok"] * 3
    J = _ift_jacobian(res.x_flip, x)
    a = (lin.weight[0] - lin.weight[1]).detach()[:3]
    for i in range(3):
        s = 1 if int(res.source[i]) == 0 else -1  # the sign of a does not matter
        P = torch.eye(3, dtype=F64) - torch.outer(s * a, s * a) / (a @ a)
        assert _rel(J[i, :3, :3], P) <= 1e-10
        assert (J[i, 3:] == 0).all() and (J[i, :, 3:] == 0).all()
