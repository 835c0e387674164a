"""Tests of flipfrag.flipgrad (differentiable closest flip points) against oracles: the closed-form Jacobian of the
projection onto a hyperplane, central finite differences of the solver itself (re-solved at perturbed inputs and
parameters), and hand-built degenerate active sets."""

from __future__ import annotations

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
