"""Differentiable closest flip points: implicit differentiation at the certified KKT point.

What is differentiated
----------------------
For an input ``x_hat`` the closest flip point ``x*`` (source ``s``, target ``t``; :mod:`flipfrag.flip`) solves::

    minimise 1/2 ||D (x - x_hat)||^2   s.t.   g = z_s - z_t = 0,   h_k = z_k - z_t + margin <= 0,   box, mask.

At a certified ``x*`` the *active set* is fixed: the equality ``g``, the other-class inequalities with
``h_k >= -tol_abs`` (the certificate's tolerance ``tol * max(1, |z_s|, |z_t|)``), the box bounds with ``x*`` exactly
at ``lower`` or ``upper`` and the fixed features (``mask`` False, and one-hot ``groups`` blocks, which are rounded and
then fixed by the solver). On the free coordinates ``F`` the KKT conditions::

    R(x, lam; x_hat, theta) = [ (D^2 (x - x_hat) + A(x)^T lam)_F ;  c(x) ] = 0,     x_j = fixed value (j not in F)

(``c`` the active constraints, ``A`` their Jacobian, ``lam`` the multipliers fitted by least squares on the free
coordinates in the scaled norm, as the certificate does) define ``x*`` and ``lam`` implicitly as functions of
``x_hat`` and of the model's parameters ``theta``. By the implicit function theorem::

    K [dx_F; dlam] = -dR,     K = [[H_FF, A_F^T], [A_F, 0]],     H = D^2 + sum_i lam_i Hess_x c_i(x*)

(the Hessian of the Lagrangian). A masked feature follows ``x_hat`` (``dx_j / dx_hat_j = 1``); a feature at a bound
or in a rounded one-hot block does not move (derivative 0). The backward pass is the adjoint of this: for a
cotangent ``v`` it solves ``K [u; w] = [v_F; 0]`` and returns::

    dl/dx_hat_F   = D^2 u                           (free features)
    dl/dx_hat_j   = v_j - (Hess(lam^T c) u + A^T w)_j   (masked features)
    dl/dtheta     = -d/dtheta [ grad_x(lam^T c) . u + w^T c ]   at fixed x*, lam, u, w.

The reduced system is solved in the scaled coordinates ``y = D x`` (where the objective's Hessian is the identity):
with ``P`` the orthogonal projector onto the null space of the scaled active Jacobian on the free coordinates,
``u~ = (P H~ P + (I - P))^-1 P v~``. Up to ``dense_max`` features the matrix is formed from ``n`` Hessian-vector
products (double backward, batched over the points) and its eigendecomposition is computed when the result is made;
beyond that the projected conjugate-gradient method runs in the backward pass, one batched Hessian-vector product
per iteration. For ReLU networks ``Hess_x c = 0`` almost everywhere, so ``H = D^2``, the projected system is the
identity on the null space and CG stops after one iteration: the derivative is the projection
``I - D^-2 A^T (A D^-2 A^T)^-1 A`` on the free coordinates (exactly the closed form of a linear model). But the
closest flip point of a ReLU net often lies on a kink of its boundary (certified only by the gradient bundle), where
``x*`` is not differentiable: such points are reported degenerate (see below); differentiate a smooth surrogate
(:func:`flipfrag.smooth.softplus_surrogate`) instead, as paper 2 does for its attacks.

Assumptions, and what happens otherwise
---------------------------------------
The derivative exists and is the one computed only if, at ``x*``:

* **LICQ** — the active constraint gradients (on the free coordinates) are linearly independent;
* **strict complementarity** — every active inequality and every active bound has a multiplier bounded away from
  0 (contribution to the stationarity balance above ``kkt_tol * ||D (x* - x_hat)||``, the certificate's own
  resolution), so the active set does not change under small perturbations;
* **smooth first-order conditions** — the plain (not gradient-bundle) KKT measure is within ``kkt_tol``: a point
  certified only by the gradient bundle of a piecewise-linear network (a kink of the boundary) has no derivative.
  Here ``kkt_tol`` is the solver's, capped at 1e-3 (``kkt_tol=math.inf`` certifies flip points that need not be
  KKT points at all);
* **second-order sufficiency** — the reduced Hessian of the Lagrangian (scaled) has all eigenvalues above
  ``hess_tol`` (it is then nonsingular and ``x*`` a strict local minimiser).

A point that violates one of them (or had no certified flip point) gets a NaN gradient and its reason in
``FlipResult.grad_status`` (``"ok"`` otherwise). The dense path checks all four when the result is made; the Krylov
path finds a failure of second-order sufficiency (non-positive curvature met by CG) or of convergence only in the
backward pass, and then rewrites that point's ``grad_status`` entry and warns. A point whose cotangent is exactly
zero contributes exactly zero (not NaN), so ``loss = f(x_flip[ok])`` gives finite gradients for the other points;
the model parameters' gradients (a sum over points) are NaN if any point without a derivative has a nonzero
cotangent.
``attach_gradients(..., weak="active")`` instead keeps weakly active inequalities and bounds in the active set and
returns the one-sided derivative of that branch (status ``"ok (one-sided: ...)"``): images with many pixels at a
bound (MNIST background) often have one or two pixels whose bound multiplier is ~0.

The returned ``x_flip`` is once differentiable (a second derivative through it raises).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from .problems import _model_dtype
from .result import FlipResult

__all__ = ["GRAD_OK", "GradientOptions", "attach_gradients"]

GRAD_OK = "ok"
_F64 = torch.float64
_KKT_CAP = 1e-3  # the stationarity / multiplier resolution used is min(kkt_tol, this)


@dataclass
class _Analysis:
    """Everything the backward pass needs, per point (P = N points, n flat features), float64 unless noted."""

    model: nn.Module
    shape: tuple
    params: list[torch.Tensor]
    xf: torch.Tensor  # (P, n) x_flip (x_hat where failed), the model's dtype
    rows: torch.Tensor  # (P, m, C) score combinations of the active constraints (0 rows = padding)
    lam: torch.Tensor  # (P, m)
    sw: torch.Tensor  # (P, n) 1 / scale
    free: torch.Tensor  # (P, n) bool
    masked: torch.Tensor  # (P, n) bool: fixed at x_hat (derivative 1)
    At: torch.Tensor  # (P, m, n) scaled active Jacobian on the free coordinates
    G_chol: torch.Tensor  # (P, m, m) Cholesky factor of At At^T (+ identity on padding)
    bad: torch.Tensor  # (P,) bool: no derivative
    status: list[str]
    Minv: torch.Tensor | None  # (P, n, n) dense inverse of the projected system, or None (Krylov)
    krylov_iter: int
    krylov_rtol: float
    hess_tol: float


def _flat_feature(v, x: torch.Tensor, default: float, dtype=_F64) -> torch.Tensor:
    """A number / tensor broadcastable to x (N, *shape) -> (N, n) (closest_flip_point has validated it)."""
    N = x.shape[0]
    if v is None:
        return torch.full((N, x[0].numel()), default, dtype=dtype, device=x.device)
    t = v.detach() if isinstance(v, torch.Tensor) else torch.tensor(v, device=x.device)
    return torch.broadcast_to(t.to(device=x.device, dtype=dtype), x.shape).reshape(N, -1).clone()


def _scores(an_model: nn.Module, shape: tuple, x: torch.Tensor) -> torch.Tensor:
    return an_model(x.reshape(x.shape[0], *shape))


def _active_rows(z: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, margin: float, tol: float):
    """Rows (P, m, C) of the active constraints (slot 0: z_s - z_t; then z_k - z_t for h_k >= -tol_abs, the
    certificate's tolerance), the slot validity (P, m) and the class of each slot (P, m; -1 for the equality)."""
    P, C = z.shape
    ar = torch.arange(P, device=z.device)
    zs, zt = z[ar, src], z[ar, tgt]
    tol_abs = tol * torch.maximum(torch.ones_like(zs), torch.maximum(zs.abs(), zt.abs()))
    h = z - zt[:, None] + margin
    other = torch.ones_like(z, dtype=torch.bool)
    other[ar, src] = False
    other[ar, tgt] = False
    act = other & (h >= -tol_abs[:, None])
    m = 1 + int(act.sum(1).max()) if P else 1
    rows = torch.zeros(P, m, C, dtype=z.dtype, device=z.device)
    rows[ar, 0, src] = 1.0
    rows[ar, 0, tgt] = -1.0
    valid = torch.zeros(P, m, dtype=torch.bool, device=z.device)
    valid[:, 0] = True
    cls = torch.full((P, m), -1, dtype=torch.long, device=z.device)
    order = torch.argsort((~act).to(torch.int8), dim=1, stable=True)  # active classes first
    for j in range(1, m):
        k = order[:, j - 1]
        ok = act[ar, k]
        rows[ar, j, k] = ok.to(z.dtype)
        rows[ar, j, tgt] -= ok.to(z.dtype)
        valid[:, j] = ok
        cls[:, j] = torch.where(ok, k, torch.full_like(k, -1))
    return rows, valid, cls


def _jacobian_rows(model, shape, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A (P, m, n): gradient of rows[:, j] . z(x) for every slot j (one batched backward per slot)."""
    xr = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = _scores(model, shape, xr)
        A = torch.empty(*rows.shape[:2], x.shape[1], dtype=_F64, device=x.device)
        for j in range(rows.shape[1]):
            (gj,) = torch.autograd.grad(z, xr, rows[:, j].to(z.dtype), retain_graph=j < rows.shape[1] - 1)
            A[:, j] = gj.to(_F64)
    return A


def _lagrangian_gradient_graph(an: _Analysis):
    """x (P, n) requiring grad, the active constraint values c (P, m), and grad_x(lam^T c) (P, n) with its graph."""
    xr = an.xf.detach().requires_grad_(True)
    z = _scores(an.model, an.shape, xr)
    c = (an.rows.to(z.dtype) * z[:, None, :]).sum(2)
    s = (an.lam.to(z.dtype) * c).sum()
    (gs,) = torch.autograd.grad(s, xr, create_graph=True)
    return xr, c, gs


def _hvp(xr: torch.Tensor, gs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Hess_x(lam^T c) u (P, n) in float64; zero where the constraints are linear in x (no graph)."""
    if not gs.requires_grad:
        return torch.zeros_like(u)
    (hv,) = torch.autograd.grad(gs, xr, u.to(gs.dtype), retain_graph=True, allow_unused=True)
    return torch.zeros_like(u) if hv is None else hv.to(_F64)


def _project(an: _Analysis, y: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection (scaled coordinates) onto {free features, At y = 0}. y (P, n)."""
    y = y * an.free
    r = torch.einsum("pmn,pn->pm", an.At, y)
    q = torch.cholesky_solve(r[:, :, None], an.G_chol)[:, :, 0]
    return y - torch.einsum("pmn,pm->pn", an.At, q)


def _analyse(
    res: FlipResult,
    model: nn.Module,
    x: torch.Tensor,
    *,
    lower,
    upper,
    scale,
    mask,
    groups,
    dense_max: int,
    krylov_iter: int,
    hess_tol: float,
    rank_tol: float,
    keep_weak: bool,
) -> _Analysis:
    N, shape = x.shape[0], tuple(x.shape[1:])
    n = math.prod(shape)
    md = _model_dtype(model, x.dtype)
    xh = x.detach().reshape(N, n).to(_F64)
    xflip = res.x_flip.detach().reshape(N, n).to(_F64)
    ok = res.converged.clone() & torch.isfinite(xflip).all(1)
    status = [GRAD_OK if bool(ok[i]) else f"no flip point ({res.status[i]})" for i in range(N)]
    xs = torch.where(ok[:, None], xflip, xh)  # finite stand-in where failed
    lo = _flat_feature(lower, x, -math.inf)
    hi = _flat_feature(upper, x, math.inf)
    w = _flat_feature(scale, x, 1.0) ** 2
    masked = (~_flat_feature(mask, x, 1.0, dtype=torch.bool) if mask is not None
              else torch.zeros(N, n, dtype=torch.bool, device=x.device))
    in_group = torch.zeros(N, n, dtype=torch.bool, device=x.device)
    for grp in groups or []:
        in_group[:, [int(i) for i in grp]] = True
    at_lo = (xs <= lo) & ~masked & ~in_group
    at_hi = (xs >= hi) & ~masked & ~in_group & ~at_lo
    free = ~(masked | in_group | at_lo | at_hi)
    sw = 1.0 / torch.sqrt(w)

    with torch.no_grad():
        z = _scores(model, shape, xs.to(md)).to(_F64)
    rows, valid, cls = _active_rows(z, res.source, res.target, float(res.margin_param), float(res.tol))
    m = rows.shape[1]
    A = _jacobian_rows(model, shape, xs.to(md), rows) * valid[:, :, None]
    At = A * (sw * free)[:, None, :]
    G = At @ At.transpose(1, 2) + torch.diag_embed((~valid).to(_F64))
    # LICQ: the smallest singular value of the row-normalised scaled Jacobian
    rn = torch.sqrt(G.diagonal(dim1=1, dim2=2)).clamp(min=1e-300)
    Gn = G / (rn[:, :, None] * rn[:, None, :])
    sig = torch.sqrt(torch.linalg.eigvalsh(Gn)[:, 0].clamp(min=0))
    licq = (sig > rank_tol) & (G.diagonal(dim1=1, dim2=2) > 0).all(1)
    Gs = torch.where(licq[:, None, None], G, torch.eye(m, dtype=_F64, device=G.device).expand(N, m, m))
    G_chol = torch.linalg.cholesky(Gs)
    # multipliers: least squares on the free coordinates, scaled norm (as the certificate)
    grad_f = w * (xs - xh)
    rhs = -torch.einsum("pmn,pn->pm", At, grad_f * sw)
    lam = torch.cholesky_solve(rhs[:, :, None], G_chol)[:, :, 0] * valid
    r = (grad_f + torch.einsum("pm,pmn->pn", lam, A)) * sw  # scaled Lagrangian gradient
    d = torch.sqrt((w * (xs - xh) ** 2).sum(1))
    kkt_tol = min(float(res.kkt_tol), _KKT_CAP)  # kkt_tol=inf certifies feasibility only: no KKT point
    eps = max(torch.finfo(md).eps, torch.finfo(x.dtype).eps)  # the certificate's rounding floor
    floor = eps * torch.sqrt((w * xs**2).sum(1))
    kkt_plain = torch.sqrt((r**2 * free).sum(1))
    contrib = lam * torch.sqrt(At.pow(2).sum(2))  # signed share of each active row in the balance
    thr = kkt_tol * d
    for i in torch.nonzero(ok)[:, 0].tolist():
        if not bool(licq[i]):
            status[i] = f"degenerate: active constraint gradients linearly dependent (LICQ fails, {sig[i]:.1e})"
        elif kkt_plain[i] > kkt_tol * d[i] + floor[i]:
            status[i] = (
                f"degenerate: not a smooth KKT point (kkt {kkt_plain[i] / max(d[i], 1e-300):.1e} > {kkt_tol:.0e}; "
                "a kink of a piecewise-smooth model, or certified with a looser kkt_tol)"
            )
        else:
            weak = [int(cls[i, j]) for j in range(1, m) if valid[i, j] and contrib[i, j] <= thr[i]]
            wlo = torch.nonzero(at_lo[i] & (r[i] <= thr[i]))[:, 0].tolist()
            whi = torch.nonzero(at_hi[i] & (r[i] >= -thr[i]))[:, 0].tolist()
            if (weak or wlo or whi) and keep_weak:
                status[i] = (
                    f"ok (one-sided: {len(weak)} weakly active class constraint(s), {len(wlo) + len(whi)} weakly "
                    "active bound(s) kept active)"
                )
            elif weak:
                status[i] = (
                    f"degenerate: active constraint of class {weak[0]} has multiplier ~0 (strict complementarity fails)"
                )
            elif wlo or whi:
                j, side = (wlo[0], "lower") if wlo else (whi[0], "upper")
                status[i] = (
                    f"degenerate: feature {j} at its {side} bound has multiplier ~0 (strict complementarity fails)"
                )
    bad = torch.tensor([not s.startswith(GRAD_OK) for s in status], dtype=torch.bool, device=x.device)
    params = [p for p in model.parameters() if p.requires_grad]
    an = _Analysis(
        model=model, shape=shape, params=params, xf=xs.to(md), rows=rows, lam=lam, sw=sw, free=free, masked=masked,
        At=At, G_chol=G_chol, bad=bad, status=status, Minv=None, krylov_iter=int(krylov_iter),
        krylov_rtol=1e-10 if md == _F64 else 1e-5, hess_tol=float(hess_tol),
    )  # fmt: skip
    if n <= dense_max:
        _dense_system(an)
    return an


def _dense_system(an: _Analysis) -> None:
    """Form the projected reduced Hessian (scaled), check second-order sufficiency, store its inverse."""
    P, n = an.xf.shape
    with torch.enable_grad():
        xr, _, gs = _lagrangian_gradient_graph(an)
        curv = torch.zeros(P, n, n, dtype=_F64, device=an.xf.device)
        for j in range(n):
            e = torch.zeros(P, n, dtype=_F64, device=an.xf.device)
            e[:, j] = 1.0
            curv[:, :, j] = _hvp(xr, gs, e)
    Ht = torch.eye(n, dtype=_F64, device=an.xf.device) + an.sw[:, :, None] * curv * an.sw[:, None, :]
    I = torch.eye(n, dtype=_F64, device=an.xf.device).expand(P, n, n)
    # projector columns: project each basis vector (batched over points)
    Pz = torch.stack([_project(an, I[:, :, j]) for j in range(n)], 2)
    M = Pz @ Ht @ Pz + (I - Pz)
    M = 0.5 * (M + M.transpose(1, 2))
    evals, evecs = torch.linalg.eigh(M)
    low = evals[:, 0] <= an.hess_tol
    for i in torch.nonzero(low & ~an.bad)[:, 0].tolist():
        an.status[i] = (
            f"degenerate: reduced Hessian eigenvalue {evals[i, 0]:.2e} <= {an.hess_tol:.0e} "
            "(second-order sufficiency fails)"
        )
    an.bad |= low
    inv = torch.where(low[:, None], torch.ones_like(evals), 1.0 / evals)
    an.Minv = (evecs * inv[:, None, :]) @ evecs.transpose(1, 2)


def _projected_cg(an: _Analysis, xr, gs, b: torch.Tensor, todo: torch.Tensor) -> torch.Tensor:
    """Solve P H~ P u = b on the null space (scaled coordinates) by CG, batched; rewrites the status of points
    where CG meets non-positive curvature or does not converge. b (P, n) already projected."""
    u = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    stop = (an.krylov_rtol**2) * rr
    live = todo & (rr > 0)
    for _ in range(an.krylov_iter):
        if not live.any():
            break
        q = _project(an, p + an.sw * _hvp(xr, gs, an.sw * p))
        pq = (p * q).sum(1)
        neg = live & (pq <= an.hess_tol * (p * p).sum(1))
        for i in torch.nonzero(neg)[:, 0].tolist():
            an.status[i] = (
                f"degenerate: reduced Hessian has curvature {pq[i] / (p[i] * p[i]).sum():.2e} <= "
                f"{an.hess_tol:.0e} (second-order sufficiency fails; found by CG in the backward pass)"
            )
        an.bad |= neg
        live &= ~neg
        alpha = torch.where(live, rr / torch.where(live, pq, torch.ones_like(pq)), torch.zeros_like(rr))
        u = u + alpha[:, None] * p
        r = _project(an, r - alpha[:, None] * q)
        rr_new = (r * r).sum(1)
        beta = torch.where(live, rr_new / rr.clamp(min=1e-300), torch.zeros_like(rr))
        p = r + beta[:, None] * p
        rr = torch.where(live, rr_new, rr)
        live &= rr > stop
    if live.any():
        for i in torch.nonzero(live)[:, 0].tolist():
            an.status[i] = (
                f"Krylov solve did not converge in {an.krylov_iter} iterations "
                f"(relative residual {math.sqrt(rr[i] / (stop[i] / an.krylov_rtol**2)):.1e})"
            )
        an.bad |= live
    if bool((todo & an.bad).any()):
        warnings.warn(
            "flipfrag.flip.gradient: some points have no derivative (NaN gradient); see FlipResult.grad_status",
            stacklevel=3,
        )
    return u


def _backward(an: _Analysis, v: torch.Tensor):
    """Adjoint of the implicit differentiation for the cotangent v (P, n): gradients for x_hat (P, n, float64)
    and for an.params (their dtypes)."""
    v = v.to(_F64)
    nonzero = (v != 0).any(1)
    todo = nonzero & ~an.bad
    vt = torch.where(todo[:, None], v * an.sw * an.free, torch.zeros_like(v))
    with torch.enable_grad():
        xr, c, gs = _lagrangian_gradient_graph(an)
        b = _project(an, vt)
        if an.Minv is not None:
            ut = torch.einsum("pij,pj->pi", an.Minv, b)
        else:
            ut = _projected_cg(an, xr, gs, b, todo)
        todo &= ~an.bad
        ut = ut * todo[:, None]
        u = ut * an.sw
        Htu = (ut + an.sw * _hvp(xr, gs, u)) * an.free
        rhs = torch.einsum("pmn,pn->pm", an.At, vt - Htu)
        w = torch.cholesky_solve(rhs[:, :, None], an.G_chol)[:, :, 0] * todo[:, None]
        phi = (gs * u.to(gs.dtype)).sum() + (c * w.to(c.dtype)).sum()
        grads = torch.autograd.grad(phi, [xr, *an.params], allow_unused=True)
    gx = torch.zeros_like(v) if grads[0] is None else grads[0].to(_F64)
    grad_x = torch.where(an.free, u / an.sw**2, torch.where(an.masked, v - gx, torch.zeros_like(v)))
    grad_x = torch.where((nonzero & an.bad)[:, None], torch.full_like(grad_x, math.nan), grad_x)
    poison = bool((nonzero & an.bad).any())
    gp = []
    for prm, gr in zip(an.params, grads[1:], strict=True):
        gr = torch.zeros_like(prm) if gr is None else -gr
        gp.append(torch.full_like(gr, math.nan) if poison else gr)
    return grad_x, gp


class _ImplicitFlip(torch.autograd.Function):
    """x_flip as a function of (x_hat, *params) whose backward is the implicit-function-theorem adjoint."""

    @staticmethod
    def forward(ctx, an: _Analysis, x_flip: torch.Tensor, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.an = an
        ctx.x_dtype = x.dtype
        return x_flip.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        an = ctx.an
        grad_x, gp = _backward(an, grad_out.reshape(grad_out.shape[0], -1))
        return (None, None, grad_x.reshape(grad_out.shape).to(ctx.x_dtype), *gp)


@dataclass(frozen=True)
class GradientOptions:
    """Settings of the implicit derivative's linear algebra (:func:`attach_gradients`), validated when made.

    ``dense_max``: up to this many flat features the projected reduced Hessian is formed densely (n Hessian-vector
    products per batch, an (N, n, n) eigendecomposition) and second-order sufficiency is checked at once; beyond it
    the backward pass runs projected CG (``krylov_iter`` iterations at most, relative residual 1e-10 in float64 /
    1e-5 in float32). ``hess_tol``: smallest admissible eigenvalue / CG curvature of the scaled reduced Hessian (the
    objective's is 1). ``rank_tol``: smallest admissible singular value of the row-normalised scaled active
    Jacobian (LICQ).
    """

    dense_max: int = 64
    krylov_iter: int = 200
    hess_tol: float = 1e-6
    rank_tol: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("dense_max", "krylov_iter"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {val!r}")
        for name in ("hess_tol", "rank_tol"):
            val = getattr(self, name)
            if not (isinstance(val, (int, float)) and val > 0):
                raise ValueError(f"{name} must be a number > 0, got {val!r}")


def attach_gradients(
    res: FlipResult,
    model: nn.Module,
    x: torch.Tensor,
    *,
    lower=None,
    upper=None,
    scale=None,
    mask=None,
    groups: Sequence[Sequence[int]] | None = None,
    weak: str = "nan",
    options: GradientOptions | None = None,
    **overrides: Any,
) -> FlipResult:
    """A copy of ``res`` whose ``x_flip`` carries the implicit derivative d x_flip / d (x, model parameters).

    ``closest_flip_point(..., differentiable=True)`` calls this with its own arguments; see the module docstring
    for what is differentiated and when a point has no derivative.

    Parameters
    ----------
    res : FlipResult
        A finished result of :func:`flipfrag.flip.closest_flip_point` for ``model`` and ``x``.
    model : nn.Module
        The model solved for. Gradients flow to its parameters that have ``requires_grad`` (in their dtype).
    x : Tensor (N, *shape)
        The inputs ``x_hat``, as given to the solver (gradients flow to it if it requires grad).
    lower, upper, scale, mask, groups
        The solver's arguments of the same names (already validated by it).
    weak : {"nan", "active"}
        Weakly active inequalities and bounds (multiplier ~0, strict complementarity fails): ``"nan"`` (default) —
        no derivative; ``"active"`` — keep them in the active set and return the derivative of that branch (the
        one-sided derivative for perturbations under which they stay active, an element of the generalised
        Jacobian; like ReLU's gradient at 0). Such points get ``"ok (one-sided: ...)"``. Images with many pixels
        at a bound of ``[0, 1]`` (MNIST background) often have a few pixels whose multiplier is ~0.
    options : GradientOptions, optional
        The linear algebra's settings (``dense_max``, ``krylov_iter``, ``hess_tol``, ``rank_tol``); keywords of
        the same names override its fields.

    Returns
    -------
    FlipResult
        ``x_flip`` differentiable (a new tensor, same values), ``grad_status`` (list of N str): ``"ok"`` (or, with
        ``weak="active"``, ``"ok (one-sided: ...)"``; a point has a derivative iff its entry starts with ``"ok"``),
        or why the point has no derivative (its gradient is NaN).
    """
    if weak not in ("nan", "active"):
        raise ValueError(f"weak must be 'nan' or 'active', got {weak!r}")
    if options is not None and not isinstance(options, GradientOptions):
        raise TypeError(f"options must be a GradientOptions or None, got {type(options).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in fields(GradientOptions)})
    if unknown:
        raise TypeError(f"attach_gradients: unknown option(s) {unknown}")
    opts = replace(options or GradientOptions(), **overrides)
    an = _analyse(
        res,
        model,
        x,
        lower=lower,
        upper=upper,
        scale=scale,
        mask=mask,
        groups=groups,
        dense_max=opts.dense_max,
        krylov_iter=opts.krylov_iter,
        hess_tol=opts.hess_tol,
        rank_tol=opts.rank_tol,
        keep_weak=weak == "active",
    )
    x_flip = _ImplicitFlip.apply(an, res.x_flip, x, *an.params)
    return replace(res, x_flip=x_flip, grad_status=an.status)
