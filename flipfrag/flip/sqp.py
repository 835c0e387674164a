"""The SQP core: the constraint Jacobian, the QP step solved through its dual (projected semismooth Newton), the
certificate (residual, margin, bounds, KKT measure; for piecewise-linear models the activation region's KKT test
and gap) and the batched SQP loop with its merit line search. Kept in one file: the certificate and the iteration
share the linearisation, and splitting them made the data's path longer (``docs/flip_solver.md``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from flipfrag.smooth import (
    RELU_FUNCS,
)

from .options import _Setup
from .problems import (
    _CONVERGED,
    _MAX_ITER,
    _NO_PROGRESS,
    _RUNNING,
    _STALLED,
    _TINY,
    ScoreFn,
    _chunks,
    _constraint_values,
    _offset_fn,
    _pad_slots,
    _Problems,
    _Rows,
    _tol_abs,
    _violation,
)

_DUAL_EPS = 1e-14  # quadratic elastic penalty of the QP subproblem (normalised units; 1e-6 in float32)


_KINK_TOL = 1e-6  # a ReLU input / max-pool gap within 1e-6 x its layer's largest |value| is a kink at x


_REGION_GAP = 0.01  # piecewise-linear models: within 1 % of the closest flip point of the activation region


_MAX_KINKS = 64  # region constraints the certificate represents per point (more: not certified)


_PROGRESS_WINDOW = 25  # iterations over which an infeasible point must reduce its constraint violation by 10 %


def _scores_and_jacobian(fn: ScoreFn, x: torch.Tensor, src, tgt, margin: float, n_ineq: int,
                         relevant_only: bool = False):
    """Scores z (P, C) and the constraint rows A (P, m, n), values c (P, m), slot mask (P, m) at x.

    Slot 0 is the equality g = z_s - z_t; slots 1..n_ineq are the n_ineq largest h_k (most nearly active or most
    violated other classes). One backward pass per slot, for the whole batch. ``relevant_only``: fewer slots when
    no problem of the batch has that many classes within reach, h_k >= -(|g| + 0.1 (1 + |z_t|)) — the others
    cannot become binding in one step of a converging iteration (and the line search still sees them all).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = fn(x)
        g, h, zs, zt = _constraint_values(z.detach(), src, tgt, margin)
        P, C = z.shape
        if relevant_only and n_ineq:
            near = h >= -(g.abs() + 0.1 * (1 + zt.abs()))[:, None]
            n_ineq = min(n_ineq, int(near.sum(1).max()))
        m = 1 + n_ineq
        rows = torch.zeros(P, m, C, dtype=z.dtype, device=z.device)
        rows.scatter_(2, src[:, None, None].expand(P, 1, 1), 1.0)
        rows[:, :, :].scatter_add_(2, tgt[:, None, None].expand(P, m, 1),
                                   -torch.ones(P, m, 1, dtype=z.dtype, device=z.device))
        c = torch.zeros(P, m, dtype=z.dtype, device=z.device)
        c[:, 0] = g
        valid = torch.ones(P, m, dtype=torch.bool, device=z.device)
        cls = torch.full((P, m), -1, dtype=torch.long, device=z.device)  # class of each slot; -1 = the equality
        if n_ineq:
            hv, kk = h.topk(n_ineq, dim=1)
            rows[:, 1:, :].scatter_add_(2, kk[:, :, None], torch.ones(P, n_ineq, 1, dtype=z.dtype, device=z.device))
            valid[:, 1:] = torch.isfinite(hv)
            c[:, 1:] = torch.where(valid[:, 1:], hv, torch.zeros_like(hv))
            cls[:, 1:] = kk
        A = torch.empty(P, m, x.shape[1], dtype=z.dtype, device=z.device)
        for j in range(m):
            (A[:, j],) = torch.autograd.grad(z, x, rows[:, j], retain_graph=j < m - 1)
    A = A * valid[:, :, None]
    return z.detach(), g, h, zs, zt, A, c, valid, cls


def _dual_eps(dtype: torch.dtype) -> float:
    return _DUAL_EPS if dtype == torch.float64 else 1e-6


def _dual_qp(pr: _Problems, A: torch.Tensor, b: torch.Tensor, is_eq: torch.Tensor, rho: torch.Tensor,
             lam0: torch.Tensor | None = None, iters: int = 15,
             anchor: torch.Tensor | None = None, rel_damping: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Closest point to ``anchor`` (default x_hat; scaled norm) with A[:, 0] x = b[:, 0], A[:, j] x <= b[:, j] and
    lo <= x <= hi, for P problems at once.

    Solved through its dual: maximise the concave piecewise quadratic q(lam) - eps/2 |lam|^2 over lam_0 in
    [-rho, rho], lam_j in [0, rho] (rho (P,) or (P, m)), where the primal minimiser is explicit,
    x(lam) = clip(anchor - A^T lam / w, lo, hi). The eps term is a quadratic elastic penalty (the constraints hold
    up to eps * lam): it keeps the dual strictly concave, so that an infeasible linearisation (all coordinates
    clipped, q linear) still has a finite maximiser — the least-squares-violation step. Two phases: eps = 1e-8
    first (an infeasible linearisation is settled there; its multipliers grow like violation / eps, so a smaller
    eps only costs more doublings), then eps = 1e-14 (1e-6 in float32) for the problems found feasible,
    warm-started. Projected semismooth Newton with an Armijo line search; only the problems still active are
    computed on. ``rel_damping``: Levenberg-Marquardt damping of the Newton systems relative to their largest
    diagonal entry (the region polish: hundreds of rows, many linearly dependent — facets the point lies on —
    make the systems singular, and the undamped steps fail their line search long before the optimum).
    Returns (x, lam) of shapes (P, n), (P, m).
    """
    P, m, n = A.shape
    xh = pr.xh if anchor is None else anchor
    rho = rho[:, None].expand(P, m) if rho.dim() == 1 else rho
    L = torch.where(is_eq, -rho, torch.zeros_like(b))
    U = rho
    lam = torch.zeros(P, m, dtype=A.dtype, device=A.device) if lam0 is None else lam0.clamp(L, U)
    # A x - b is computed with cancellation: ask for a small multiple of its rounding level, no more
    rel = 1e-12 if A.dtype == torch.float64 else 1e-5
    tol = rel * (1.0 + b.abs().amax(1) + torch.sqrt((pr.w * xh**2).sum(1)))
    eps_final = _dual_eps(A.dtype)
    eps1 = max(eps_final, 1e-8)
    qp = _DualQP(A, b, xh, pr.w, pr.lo, pr.hi, L, U, rel_damping)
    lam, x = qp.solve(lam, torch.ones(P, dtype=torch.bool, device=A.device), eps1, tol, iters)
    if eps_final < eps1:
        slack = torch.einsum("pmn,pn->pm", A, x) - b
        viol = torch.where(is_eq, slack.abs(), slack.clamp(min=0)).amax(1)
        # (normalised units are distances: an infeasible linearisation leaves a slack of the order of its
        # violation, a feasible one only eps1 * lam)
        feasible = viol <= 1e-4 * (1 + b.abs().amax(1))
        if feasible.any():
            lam, x = qp.solve(lam, feasible, eps_final, tol, iters, x)
    return x, lam


def _batched_solve(H: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``H^-1 g`` for batched (P, m, m) systems. The batched LAPACK call with several threads was seen to fail
    (``lu_solve`` pivot error) on the region polish's larger systems (m ~ 100-500) of the CIFAR-10 CNN, with finite,
    damped H: it is then repeated on one thread, which solved them."""
    try:
        return torch.linalg.solve(H, g[:, :, None])[:, :, 0]
    except RuntimeError:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return torch.linalg.solve(H, g[:, :, None])[:, :, 0]
        finally:
            torch.set_num_threads(before)


class _DualQP:
    """The dual of one batch of QP subproblems (see :func:`_dual_qp`), maximised by projected Newton."""

    def __init__(self, A, b, xh, w, lo, hi, L, U, rel_damping: float = 0.0):
        self.A, self.b, self.xh, self.w, self.lo, self.hi, self.L, self.U = A, b, xh, w, lo, hi, L, U
        self.rel_damping = rel_damping

    def data(self, idx):
        """(A, b, xh, w, lo, hi, L, U) of the problems idx — without copying when idx is all of them."""
        fields = (self.A, self.b, self.xh, self.w, self.lo, self.hi, self.L, self.U)
        if len(idx) == self.A.shape[0]:
            return fields
        return tuple(t[idx] for t in fields)

    def evaluate(self, idx, lam, eps, data=None):
        """State at lam for the problems idx: y (unclipped primal), x, q, r (= dq/dlam), pg, at_bound, |pg|."""
        A, b, xh, w, lo, hi, L, U = self.data(idx) if data is None else data
        y = xh - torch.bmm(lam[:, None, :], A)[:, 0] / w
        x = torch.minimum(torch.maximum(y, lo), hi)
        r = torch.bmm(A, x[:, :, None])[:, :, 0] - b - eps * lam
        q = 0.5 * (w * (x - xh) ** 2).sum(1) + (lam * r).sum(1) + 0.5 * eps * (lam * lam).sum(1)
        at_bound = ((lam <= L) & (r < 0)) | ((lam >= U) & (r > 0))
        pg = torch.where(at_bound, torch.zeros_like(r), r)
        return [y, x, q, r, pg, at_bound, pg.abs().amax(1)]

    def solve(self, lam, which, eps, tol, iters, x_prev=None):
        lam = lam.clone()
        P, m = lam.shape
        if x_prev is None:
            state = self.evaluate(torch.arange(P, device=lam.device), lam, eps)
        else:  # only the problems to re-solve are evaluated; the others keep their previous primal point
            w_idx = torch.nonzero(which)[:, 0]
            sub = self.evaluate(w_idx, lam[w_idx], eps)
            state = [torch.zeros((P, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in sub]
            state[1] = x_prev.clone()
            for t, v in zip(state, sub):
                t[w_idx] = v
        active = which & (state[6] > tol)
        eye = torch.eye(m, dtype=lam.dtype, device=lam.device)
        for _ in range(iters):
            idx = torch.nonzero(active)[:, 0]
            if idx.numel() == 0:
                break
            dat = self.data(idx)
            A, w, lo, hi, L, U = dat[0], dat[3], dat[4], dat[5], dat[6], dat[7]
            li, y, _x, q, r, pg, at_bound, pgn = (t[idx] for t in [lam, *state])
            free = (y > lo) & (y < hi)
            H = torch.bmm(A * (free / w)[:, None, :], A.transpose(1, 2))
            keep = ~at_bound
            H = H * keep[:, :, None] * keep[:, None, :] + torch.diag_embed((~keep).to(A.dtype))
            # the eps term's own curvature, plus 1 % damping (it changes the path, not the solution): in the null
            # space of H (parallel rows, all coordinates clipped) the step is then within 1 % of exact
            H = H + eye * (1.01 * eps)
            if self.rel_damping:
                H = H + eye * (self.rel_damping * H.diagonal(dim1=1, dim2=2).amax(1))[:, None, None]
            d = _batched_solve(H, pg)
            step = torch.ones(len(idx), dtype=lam.dtype, device=lam.device)
            todo = torch.ones(len(idx), dtype=torch.bool, device=lam.device)
            for _ls in range(30):
                j = torch.nonzero(todo)[:, 0]
                if j.numel() == 0:
                    break
                cand = (li[j] + step[j, None] * d[j]).clamp(L[j], U[j])
                out = self.evaluate(idx[j], cand, eps, dat if len(j) == len(idx) else None)
                cq, cpgn = out[2], out[6]
                # Armijo ascent; or, once q no longer resolves the change (near the optimum), a smaller gradient
                flat = (cq - q[j]).abs() <= 1e-13 * torch.maximum(q[j].abs(), cq.abs()).clamp(min=_TINY)
                ascent = (cq > q[j]) & (cq >= q[j] + 1e-4 * (r[j] * (cand - li[j])).sum(1))
                ok = ascent | (flat & (cpgn < 0.5 * pgn[j]))
                acc = idx[j[ok]]
                lam[acc] = cand[ok]
                for t, v in zip(state, out):
                    t[acc] = v[ok]
                todo[j[ok]] = False
                step[j[~ok]] *= 0.5
            active[idx[todo]] = False  # no acceptable step: solved as far as rounding allows
            # where q is still linear along d after the step (the gradient did not turn: an infeasible QP whose
            # multipliers run off), extend the step geometrically instead of crawling
            rd = (r * d).sum(1)
            grow = ~todo & ((state[3][idx] * d).sum(1) > 0.5 * rd) & (rd > 0)
            for _ex in range(20):
                j = torch.nonzero(grow)[:, 0]
                if j.numel() == 0:
                    break
                step[j] *= 4
                cand = (li[j] + step[j, None] * d[j]).clamp(L[j], U[j])
                out = self.evaluate(idx[j], cand, eps)
                ok = out[2] > state[2][idx[j]]
                acc = idx[j[ok]]
                lam[acc] = cand[ok]
                for t, v in zip(state, out):
                    t[acc] = v[ok]
                grow[j[~ok]] = False
                grow[j[ok & (cand >= U[j]).all(1)]] = False
            active &= state[6] > tol
        return lam, state[1]


def _kkt_measure(pr: _Problems, x, A, c, valid, is_eq, tol_abs, bundle: torch.Tensor | None = None) -> torch.Tensor:
    """Relative projected-gradient norm of the Lagrangian at x (``docs/flip_solver.md``, Certification). Shape (P,).

    The multipliers are fitted by least squares on the free coordinates (scaled norm), inequality multipliers
    (of nearly active rows) kept >= 0 by dropping negative ones and refitting. With ``bundle`` (P, K, n) — gradients
    of the equality constraint sampled near x, for nonsmooth models — the equality gradient is replaced by the cone
    of same-sign combinations of all K + 1 gradients (Goldstein epsilon-stationarity), both signs tried.
    """
    P, m, n = A.shape
    grad_f = pr.w * (x - pr.xh)
    dnorm = torch.sqrt((pr.w * (x - pr.xh) ** 2).sum(1))
    fixed = pr.fixed
    at_lo = (x <= pr.lo) & ~fixed
    at_hi = (x >= pr.hi) & ~fixed
    free = ~fixed & ~at_lo & ~at_hi
    sw = 1.0 / torch.sqrt(pr.w)  # measure in the scaled norm: components divided by scale
    use0 = valid & (is_eq | (c >= -tol_abs[:, None]))  # inequality rows take part only when (nearly) active

    def fit(cols, use, signed):
        """Least-squares multipliers for the columns (P, M, n); `signed` columns must get coefficients >= 0."""
        M = cols.shape[1]
        for _ in range(M + 1):
            Af = cols * (use[:, :, None] * free[:, None, :] * sw[:, None, :])
            rhs = -torch.einsum("pmn,pn->pm", Af, grad_f * sw)
            G = Af @ Af.transpose(1, 2)
            reg = (1e-12 if A.dtype == torch.float64 else 1e-6) * G.diagonal(dim1=1, dim2=2).amax(1)
            reg = reg.clamp(min=torch.finfo(A.dtype).tiny)
            eye = torch.eye(M, dtype=A.dtype, device=A.device)
            G = G + torch.diag_embed((~use).to(A.dtype)) + reg[:, None, None] * eye
            lam = torch.linalg.solve(G, rhs[:, :, None])[:, :, 0] * use
            neg = use & signed & (lam < 0)
            if not neg.any():
                break
            use = use & ~neg  # drop multipliers of the wrong sign and refit
        r = grad_f + torch.einsum("pm,pmn->pn", lam, cols)
        r = torch.where(free, r, torch.where(at_lo, r.clamp(max=0), torch.where(at_hi, r.clamp(min=0), 0 * r)))
        return torch.sqrt(((r * sw) ** 2).sum(1))

    if bundle is None:
        rn = fit(A, use0, ~is_eq)
    else:
        rn = torch.full((P,), math.inf, dtype=A.dtype, device=A.device)
        for sign in (1.0, -1.0):
            cols = torch.cat([sign * A[:, :1], sign * bundle, A[:, 1:]], 1)
            K = bundle.shape[1]
            use = torch.cat([use0[:, :1], use0[:, :1].expand(P, K), use0[:, 1:]], 1)
            rn = torch.minimum(rn, fit(cols, use, torch.ones_like(use)))
    kkt = rn / dnorm.clamp(min=torch.finfo(x.dtype).tiny)
    return torch.where(dnorm > 0, kkt, torch.zeros_like(kkt))


def _equality_gradient(fn: ScoreFn, x: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor):
    """g = z_s - z_t (P,) and its gradient (P, n) at x, one backward pass."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = fn(x)
        rows = torch.zeros_like(z)
        rows.scatter_(1, src[:, None], 1.0)
        rows.scatter_add_(1, tgt[:, None], -torch.ones_like(rows[:, :1]))
        (grad,) = torch.autograd.grad(z, x, rows)
    return (z.detach() * rows).sum(1), grad


class _KinkRecorder(TorchFunctionMode):
    """Records, during one forward pass, the inputs of every ReLU and 2-D max-pooling call (graph attached), so that
    the kinks of a piecewise-linear model at x — pre-activations near 0, pooling windows with a near tie — can be
    turned into the constraints of x's activation region (:func:`_region_rows`). Other pooling forms (padding,
    dilation, ceil_mode, returned indices) set ``unsupported``."""

    def __init__(self):
        super().__init__()
        self.relus: list[torch.Tensor] = []
        self.pools: list[tuple[torch.Tensor, tuple, tuple]] = []
        self.unsupported = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RELU_FUNCS:
            self.relus.append(args[0].clone())  # a copy: in-place ReLUs overwrite their input
        elif func is torch.nn.functional.max_pool2d or func is torch.max_pool2d:
            self._pool(*args, **kwargs)
        return func(*args, **kwargs)

    def _pool(self, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))  # noqa: E731
        k, st = pair(kernel_size), pair(stride if stride not in (None, []) else kernel_size)
        if pair(padding) != (0, 0) or pair(dilation) != (1, 1) or ceil_mode or return_indices or x.dim() != 4:
            self.unsupported = True
            return
        if k[0] * k[1] > 1:  # (a 1 x 1 window has no ties)
            self.pools.append((x.clone(), k, st))


def _kink_tolerance(u: torch.Tensor, tol: float) -> torch.Tensor:
    """The kink tolerance of one recorded layer (P,): ``tol`` times the largest |value| of the point's layer."""
    return tol * u.detach().reshape(u.shape[0], -1).abs().amax(1).clamp(min=1.0)


def _region_rows(fn: ScoreFn, x: torch.Tensor, kink_tol: float, max_kinks: int):
    """The kinks of a piecewise-linear model at x (P, n) and the gradients of the constraints that bound x's
    activation region there. Returns (rows (P, K, n), used (P, K), count (P,), supported).

    A ReLU pre-activation u_j with |u_j| <= kink_tol * max(1, max |u| of its layer) is a kink; the region autograd
    differentiates (torch's relu'(0) = 0) is {u_j >= 0} where u_j > 0 and {u_j <= 0} where u_j <= 0. A max-pooling
    window whose two largest inputs a (the first maximum, which max-pooling routes the gradient to) and b differ by
    at most the same tolerance gives {u_b - u_a <= 0}. Each row is the gradient of ``c(x) <= 0`` (one backward pass
    per kink slot for the whole batch). Rows of gradient zero (e.g. a window of inactive units) bound nothing.
    Points with more than ``max_kinks`` kinks get count > max_kinks (the caller then cannot certify them).
    """
    P, n = x.shape
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        rec = _KinkRecorder()
        with rec:
            fn(xg)
        outs, sel = [], []  # per recorded tensor: the constrained quantity (P, m) and which entries are kinks
        if any(u.dim() == 0 or u.shape[0] != P for u in rec.relus):  # not one row per point: cannot attribute
            rec.unsupported = True
            rec.relus = [u for u in rec.relus if u.dim() and u.shape[0] == P]
        for u in rec.relus:
            uf = u.reshape(P, -1)
            orient = torch.where(uf > 0, -torch.ones_like(uf), torch.ones_like(uf))
            outs.append(orient * uf)
            sel.append(uf.detach().abs() <= _kink_tolerance(u, kink_tol)[:, None])
        moved = None
        if rec.pools:  # the pooling inputs after a tiny random move of x: which entries depend on x at all
            gen = torch.Generator().manual_seed(0)  # cpu-ok: drawn on the CPU, moved below
            step = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(device=x.device, dtype=x.dtype)
            with torch.no_grad(), _KinkRecorder() as rec2:
                fn(x.detach() + 1e-7 * (1 + x.detach().abs()) * step)
            moved = [p[0] for p in rec2.pools]
        for (v, k, st), v2 in zip(rec.pools, moved or []):
            N_, C_, H, W = v.shape
            cols = torch.nn.functional.unfold(v, k, stride=st).reshape(N_, C_, k[0] * k[1], -1)
            top = cols.detach().topk(2, dim=2).values
            first = cols.detach().argmax(2, keepdim=True)  # the first maximum (where the pooling routes)
            other = cols.detach().scatter(2, first, -math.inf).argmax(2, keepdim=True)
            diff = (cols.gather(2, other) - cols.gather(2, first))[:, :, 0].reshape(P, -1)
            outs.append(diff)
            gap = (top[:, :, 0] - top[:, :, 1]).reshape(P, -1)
            # an exact tie of two inputs that do not depend on x (a window of inactive units, constant while they
            # stay inactive) bounds nothing: left out (leaving a constraint out can only make the test stricter)
            cols2 = torch.nn.functional.unfold(v2, k, stride=st).reshape(N_, C_, k[0] * k[1], -1)
            live = ((cols2.gather(2, first) != cols.detach().gather(2, first))
                    | (cols2.gather(2, other) != cols.detach().gather(2, other)))[:, :, 0].reshape(P, -1)
            sel.append((gap <= _kink_tolerance(v, kink_tol)[:, None]) & ((gap > 0) | live))
        count = sum((m.sum(1) for m in sel), torch.zeros(P, dtype=torch.long, device=x.device))
        K = int(min(count.max(), max_kinks)) if len(sel) else 0
        rows = torch.zeros(P, K, n, dtype=x.dtype, device=x.device)
        if K == 0:
            return rows, torch.zeros(P, 0, dtype=torch.bool, device=x.device), count, not rec.unsupported
        # slot k of point p: its k-th kink in the order (tensor, entry)
        flat = torch.cat(sel, 1)
        rank = flat.long().cumsum(1) - 1
        slot = torch.where(flat, rank, torch.full_like(rank, -1))
        sizes = [m.shape[1] for m in sel]
        slots = torch.split(slot, sizes, 1)
        for k in range(K):
            grads = [(sl == k).to(o.dtype) for sl, o in zip(slots, outs)]
            pairs = [(o, gk) for o, gk in zip(outs, grads) if gk.any()]
            if not pairs:
                continue
            (rows[:, k],) = torch.autograd.grad([o for o, _ in pairs], xg, [gk for _, gk in pairs],
                                                retain_graph=k < K - 1, allow_unused=False)
    used = torch.arange(K, device=x.device)[None, :] < count[:, None]
    used &= rows.abs().amax(2) > 0
    return rows, used, count, not rec.unsupported


def _region_kkt(fn: ScoreFn, pr: _Problems, x, A, c, valid, is_eq, tol_abs, kink_tol: float,
                max_kinks: int = _MAX_KINKS):
    """KKT measure of the problem restricted to the closure of x's activation region (piecewise-linear models):
    the constraints c_j(x) <= 0 of the kinks at x (:func:`_region_rows`) join the active rows, with multipliers
    >= 0. Returns (kkt (P,), kinks (P,)); inf where the model has kinks this cannot represent or more than
    ``max_kinks`` of them."""
    rows, used, count, supported = _region_rows(fn, x, kink_tol, max_kinks)
    P, K = used.shape
    A2 = torch.cat([A, rows], 1)
    c2 = torch.cat([c, torch.zeros(P, K, dtype=c.dtype, device=c.device)], 1)
    v2 = torch.cat([valid, used], 1)
    e2 = torch.cat([is_eq, torch.zeros(P, K, dtype=torch.bool, device=c.device)], 1)
    kkt = _kkt_measure(pr, x, A2, c2, v2, e2, tol_abs)
    gap = _region_gap(pr, x, A2, c2, v2, e2)
    bad = (count > max_kinks) | (not supported)
    inf = torch.full_like(kkt, math.inf)
    return torch.where(bad, inf, kkt), count, torch.where(bad, inf, gap)


def _region_gap(pr: _Problems, x, A, c, valid, is_eq) -> torch.Tensor:
    """Relative optimality gap of x on its activation region, by weak duality: ``||D (x - x_hat)|| / LB - 1`` (P,).

    On the closure of the region the rows A (the equality, the other classes, the kink constraints) are exact
    linearisations, so {A_0 y = A_0 x - c_0, A_j y <= A_j x - c_j, box} contains every flip point of the region
    and its minimum distance bounds theirs from below. Any multipliers with lam_j >= 0 for the inequalities give
    LB^2 / 2 = q(lam) = min over the box of 1/2 ||D (y - x_hat)||^2 + lam . (A y - b) (explicit, evaluated here
    without the QP's elastic term); the multipliers are those of :func:`_dual_qp`.
    """
    P = x.shape[0]
    free = ~pr.fixed
    nrm = torch.sqrt(torch.einsum("pmn,pn->pm", A**2, free / pr.w))
    ok = valid & (nrm > 0)
    An = torch.where(ok[:, :, None], A / nrm.clamp(min=_TINY)[:, :, None], torch.zeros_like(A)) * free[:, None, :]
    b = torch.einsum("pmn,pn->pm", An, x) - torch.where(ok, c / nrm.clamp(min=_TINY), torch.zeros_like(c))
    b = torch.where(ok, b, torch.where(is_eq, torch.zeros_like(b), torch.ones_like(b)))
    _, lam = _dual_qp(pr, An, b, is_eq, torch.full((P,), math.inf, dtype=x.dtype, device=x.device), iters=50)
    lam = torch.where(is_eq, lam, lam.clamp(min=0)) * ok
    y = torch.minimum(torch.maximum(pr.xh - torch.bmm(lam[:, None, :], An)[:, 0] / pr.w, pr.lo), pr.hi)
    q = 0.5 * (pr.w * (y - pr.xh) ** 2).sum(1) + (lam * (torch.einsum("pmn,pn->pm", An, y) - b)).sum(1)
    lb = torch.sqrt(2 * q.clamp(min=0))
    d = torch.sqrt((pr.w * (x - pr.xh) ** 2).sum(1))
    gap = d / lb.clamp(min=_TINY) - 1
    return torch.where(d > 0, gap.clamp(min=0), torch.zeros_like(gap))


@dataclass
class _Certificate(_Rows):
    """The certificate of P candidate points (:func:`_check`; :func:`flipfrag.flip.pool._certify` fills the last
    three): scores z (P, C), residual |z_s - z_t|, margin min_k (z_t - z_k), bound violation, KKT measure, the
    absolute tolerance tol * max(1, |z_s|, |z_t|), kinks counted, region gap (NaN where not measured), distance,
    the KKT floor of the output dtype's rounding, and ``ok`` (certified)."""

    z: torch.Tensor
    residual: torch.Tensor
    margin: torch.Tensor
    bound_violation: torch.Tensor
    kkt: torch.Tensor
    tol_abs: torch.Tensor
    kinks: torch.Tensor
    gap: torch.Tensor
    distance: torch.Tensor | None
    kkt_floor: torch.Tensor | None
    ok: torch.Tensor | None


@dataclass
class _Iterates(_Rows):
    """The SQP's result for P problems: last iterate x (P, n), iterations (P,) and solver status codes (P,)."""

    x: torch.Tensor
    iterations: torch.Tensor
    status: torch.Tensor


def _check(fn: ScoreFn, pr: _Problems, x: torch.Tensor, margin: float, tol: float, n_ineq: int,
           kkt_tol: float = 0.0, region: bool = False) -> _Certificate:
    """Recompute scores, residual, margin, bound violation and KKT at x (P,) tensors (``distance``, ``kkt_floor``
    and ``ok`` are left None).

    With ``region`` (piecewise-linear models), feasible points whose plain KKT measure exceeds ``kkt_tol`` get the
    KKT measure of the problem restricted to the closure of their activation region (:func:`_region_kkt`);
    ``kinks`` counts the kinks at x (0 for points not re-measured).
    """
    z, g, h, zs, zt, A, c, valid, _ = _scores_and_jacobian(fn, x, pr.src, pr.tgt, margin, n_ineq)
    tol_abs = _tol_abs(zs, zt, tol)
    is_eq = torch.zeros_like(valid)
    is_eq[:, 0] = True
    kkt = _kkt_measure(pr, x, A, c, valid, is_eq, tol_abs)
    marg = (-(h - margin)).amin(1) if z.shape[1] > 2 else torch.full_like(g, math.inf)
    kinks = torch.zeros(len(x), dtype=torch.long, device=x.device)
    gap = torch.full_like(kkt, math.nan)
    if region:
        near = (g.abs() <= tol_abs) & (marg >= margin - tol_abs) & (kkt > kkt_tol)
        if near.any():
            i = torch.nonzero(near)[:, 0]
            kr, kinks[i], gap[i] = _region_kkt(fn, pr.take(i), x[i], A[i], c[i], valid[i], is_eq[i], tol_abs[i],
                                               _KINK_TOL)
            kkt[i] = torch.minimum(kkt[i], kr)
    bv = torch.maximum(pr.lo - x, x - pr.hi).clamp(min=0).amax(1)
    return _Certificate(z, g.abs(), marg, bv, kkt, tol_abs, kinks, gap, distance=None, kkt_floor=None, ok=None)


def _region_gap_tol(kkt_tol: float) -> float:
    """The activation-region optimality gap a piecewise-linear point may have: 100 x kkt_tol, at most 1 %."""
    return min(_REGION_GAP, 100 * kkt_tol)


def _certified(chk: _Certificate, margin: float, kkt_tol: float) -> torch.Tensor:
    finite = torch.isfinite(chk.z).all(1)
    floor = 0.0 if chk.kkt_floor is None else chk.kkt_floor
    return (
        finite
        & (chk.residual <= chk.tol_abs)
        & (chk.margin >= margin - chk.tol_abs)
        & (chk.bound_violation == 0)
        & ((chk.kkt <= kkt_tol + floor) | (chk.gap <= _region_gap_tol(kkt_tol)))
    )


@dataclass
class _Linearised:
    """The constraints linearised at x for P problems: normalised rows An (P, m, n) and right-hand sides b,
    raw values c (P, m), their normalised values cn, row norms nrm, masks, slot classes, the secant scale gamma
    (P,) and the QP anchor x + (x_hat - x) / gamma."""

    An: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    cn: torch.Tensor
    nrm: torch.Tensor
    ok_row: torch.Tensor
    valid: torch.Tensor
    is_eq: torch.Tensor
    cls: torch.Tensor
    gamma: torch.Tensor
    anchor: torch.Tensor
    in_merit: torch.Tensor  # rows that are constraints of the problem (not the kink row of a nonsmooth model)

    def take(self, idx: torch.Tensor) -> _Linearised:
        return _Linearised(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    def violation(self, p: torch.Tensor, V0: torch.Tensor) -> torch.Tensor:
        """l1 violation of the linearised constraints after the step p (P, n) -> (P,). Classes outside the
        working set keep their current (non-positive) violation."""
        lin = self.cn + torch.einsum("pmn,pn->pm", self.An, p)
        lin = torch.where(self.is_eq, lin.abs(), lin.clamp(min=0)) * self.nrm * self.ok_row
        now = torch.where(self.is_eq, self.c.abs(), self.c.clamp(min=0)) * self.valid
        # a row without gradient keeps its value (the step cannot change it to first order)
        lin = torch.where(self.ok_row, lin, now) * self.in_merit
        return lin.sum(1) + (V0 - (now * self.in_merit).sum(1))


def _line_search_step(fn: ScoreFn, pr: _Problems, x: torch.Tensor, g, h, lp: _Linearised, mu: torch.Tensor,
                      y: torch.Tensor, lam: torch.Tensor, rho: torch.Tensor, margin: float, elastic: torch.Tensor,
                      max_halvings: int = 30):
    """Step to the QP solution y, globalised on the l1 merit phi = f + mu * V.

    Tries the full step, then a second-order correction (re-linearise at the trial point with the old gradients —
    one more QP, no gradients — which pulls a step bent by the constraints' curvature back onto them; skipped where
    the linearisation was infeasible, ``elastic``), then backtracking (Armijo, halving). Returns (x_new (P, n),
    accepted (P,)).
    """
    P = x.shape[0]
    p = y - x
    f0 = 0.5 * (pr.w * (x - pr.xh) ** 2).sum(1)
    V0 = _violation(g, h)
    phi0 = f0 + mu * V0
    # directional derivative of phi along p (upper bound): grad f . p + mu (V_lin(p) - V)
    dphi = ((pr.w * (x - pr.xh) * p).sum(1) + mu * (lp.violation(p, V0) - V0)).clamp(max=0)

    def merit(idx, xc):
        with torch.no_grad():
            z = _offset_fn(fn, None if pr.offset is None else pr.offset[idx])(xc)
        gc, hc, _, _ = _constraint_values(z, pr.src[idx], pr.tgt[idx], margin)
        phi = 0.5 * (pr.w[idx] * (xc - pr.xh[idx]) ** 2).sum(1) + mu[idx] * _violation(gc, hc)
        return torch.where(torch.isfinite(phi), phi, torch.full_like(phi, math.inf)), gc, hc

    def sufficient(idx, phi, alpha):
        return phi <= phi0[idx] + 1e-4 * alpha * dphi[idx]

    xnew = x.clone()
    idx = torch.arange(P, device=x.device)
    xc = torch.minimum(torch.maximum(y, pr.lo), pr.hi)
    phi, gc, hc = merit(idx, xc)
    ok = sufficient(idx, phi, 1.0)
    xnew[ok] = xc[ok]
    todo = ~ok
    if (todo & ~elastic).any():
        bad = torch.nonzero(todo & ~elastic)[:, 0]
        lq = lp.take(bad)
        cy = torch.where(lq.cls < 0, gc[bad][:, None], hc[bad].gather(1, lq.cls.clamp(min=0)))
        cy = torch.where(lq.valid, cy, torch.zeros_like(cy))
        b2 = torch.einsum("pmn,pn->pm", lq.An, xc[bad]) - cy / lq.nrm.clamp(min=_TINY)
        b2 = torch.where(lq.ok_row | lq.is_eq, b2, torch.full_like(b2, 1.0))
        y2, _ = _dual_qp(pr.take(bad), lq.An, b2, lq.is_eq, rho[bad], lam[bad], anchor=lq.anchor)
        phi2, _, _ = merit(bad, y2)
        ok2 = sufficient(bad, phi2, 1.0)
        xnew[bad[ok2]] = y2[ok2]
        todo[bad[ok2]] = False
    full = ~todo
    alpha = torch.full((P,), 0.5, dtype=x.dtype, device=x.device)
    for _ in range(max_halvings):
        if not todo.any():
            break
        idx = torch.nonzero(todo)[:, 0]
        xc = torch.minimum(torch.maximum(x[idx] + alpha[idx, None] * p[idx], pr.lo[idx]), pr.hi[idx])
        phi, _, _ = merit(idx, xc)
        ok = sufficient(idx, phi, alpha[idx])
        xnew[idx[ok]] = xc[ok]
        todo[idx[ok]] = False
        alpha[idx[~ok]] *= 0.5
    return xnew, ~todo, full


def _sqp(fn: ScoreFn, pr: _Problems, x0: torch.Tensor, *, margin: float, tol: float, kkt_tol: float,
         max_iter: int, n_ineq: int, progress: bool = False, desc: str = "flip points",
         nonsmooth: bool = False) -> dict:
    """Batched SQP from x0 (P, n). Returns dict(x, iterations, status) — status codes _CONVERGED, ...

    Points leave the active set when they pass the (working-precision) certificate; the final certificate with
    the original model is done by the caller. One iteration, for the points still running: evaluate the
    constraints (:func:`_evaluate`), freeze the converged (:func:`_converged_now`) and the hopeless
    (:func:`_drop_hopeless`), update the secant curvature (:func:`_secant_scale`), linearise (:func:`_linearise`,
    with the kink row of :func:`_with_kink_row`), solve the QP (:func:`_qp_step`), set the merit penalty
    (:func:`_merit_penalty`), take the globalised step (:func:`_line_search_step`), probe for kinks
    (:func:`_probe_kinks`) and remember the step (:func:`_SqpState.remember`).

    ``nonsmooth`` (ReLU nets): the scores are piecewise linear, so the secant curvature is switched off (each
    piece has none), and a *kink row* is added: when a full step is rejected, the gradient of g just beyond x
    along the step is sampled; if it differs (x sits on a kink of the boundary), its linearisation becomes a
    second equality, so that the next QP moves along the ridge where both pieces vanish — where the closest point
    of a piecewise-linear boundary often lies. The row is dropped when its multiplier takes the opposite sign to
    the equality's (a concave kink: the minimiser is on one face).
    """
    st = _SqpState.start(pr, x0, 1 + n_ineq + int(nonsmooth), nonsmooth)
    bar = tqdm(range(max_iter + 1), desc=desc, disable=not progress, leave=False)
    for it in bar:
        act = torch.nonzero(st.status == _RUNNING)[:, 0]
        if act.numel() == 0:
            break
        sub = pr.take(act)
        ev = _evaluate(fn, sub, st.x[act], margin, tol, n_ineq, relevant_only=True)
        done = _converged_now(st, act, sub, ev, kkt_tol, margin)
        st.status[act[done]] = _CONVERGED
        if it == max_iter:
            st.status[act[~done]] = _MAX_ITER
            break
        bar.set_postfix(active=int((~done).sum()))
        if done.all():
            break
        act, sub, ev = act[~done], sub.take(~done), ev.take(~done)
        st.iters[act] += 1
        act, sub, ev = _drop_hopeless(st, act, sub, ev)
        if act.numel() == 0:
            continue
        if not nonsmooth:
            _secant_scale(st, act, sub, ev)
        if nonsmooth:
            ev = _with_kink_row(st, act, ev)
        lp = _linearise(sub, ev, st.gamma[act])
        y0, lam, lp = _qp_step(st, act, sub, lp, nonsmooth)
        mu_new, elastic, lam_true = _merit_penalty(st, act, sub, ev, lp, y0, lam)
        xnew, accepted, full = _line_search_step(fn, sub, ev.x, ev.g, ev.h, lp, mu_new, y0, lam, st.rho[act],
                                                 margin, elastic)
        st.stalls[act] = torch.where(accepted, torch.zeros_like(st.stalls[act]), st.stalls[act] + 1)
        if nonsmooth and (~full).any():
            _probe_kinks(fn, st, act, sub, ev, y0, ~full)
        st.remember(act, ev, lp, xnew, accepted, lam_true)
    bar.close()
    st.status[st.status == _RUNNING] = _MAX_ITER
    return _Iterates(st.x, st.iters, st.status)


@dataclass
class _SqpState:
    """Per-problem memory of the SQP (P rows): iterate, counters, penalty, multipliers, the secant memory (last step
    s, multipliers in true scale and slot classes used, a_j . s at the old point) and, for nonsmooth models, the
    kink memory (a point beyond the kink, the gradient of g there and g there)."""

    x: torch.Tensor
    iters: torch.Tensor
    status: torch.Tensor
    mu: torch.Tensor
    lam_prev: torch.Tensor
    stalls: torch.Tensor
    dist_scale: torch.Tensor
    rho: torch.Tensor
    s_prev: torch.Tensor
    lamu_prev: torch.Tensor
    cls_prev: torch.Tensor
    as_prev: torch.Tensor
    have_s: torch.Tensor
    gamma: torch.Tensor
    v_ref: torch.Tensor  # violation at the start of the current progress window
    m: int
    kink_x: torch.Tensor | None = None
    kink_a: torch.Tensor | None = None
    kink_g: torch.Tensor | None = None
    has_kink: torch.Tensor | None = None

    @classmethod
    def start(cls, pr: _Problems, x0: torch.Tensor, m: int, nonsmooth: bool) -> _SqpState:
        P, n = x0.shape
        dt, dev = x0.dtype, x0.device
        kink = ([torch.zeros(P, n, dtype=dt, device=dev), torch.zeros(P, n, dtype=dt, device=dev),
                 torch.zeros(P, dtype=dt, device=dev), torch.zeros(P, dtype=torch.bool, device=dev)]
                if nonsmooth else [None] * 4)
        return cls(
            x=torch.minimum(torch.maximum(x0, pr.lo), pr.hi).clone(),
            iters=torch.zeros(P, dtype=torch.long, device=dev),
            status=torch.full((P,), _RUNNING, dtype=torch.long, device=dev),
            mu=torch.zeros(P, dtype=dt, device=dev),
            lam_prev=torch.zeros(P, m, dtype=dt, device=dev),
            stalls=torch.zeros(P, dtype=torch.long, device=dev),
            dist_scale=1.0 + torch.sqrt((pr.w * pr.xh**2).sum(1)),
            # no box on the multipliers: the QP's quadratic elastic term (_DUAL_EPS) already bounds them
            rho=torch.full((P,), math.inf, dtype=dt, device=dev),
            s_prev=torch.zeros(P, n, dtype=dt, device=dev),
            lamu_prev=torch.zeros(P, m, dtype=dt, device=dev),
            cls_prev=torch.full((P, m), -1, dtype=torch.long, device=dev),
            as_prev=torch.zeros(P, m, dtype=dt, device=dev),
            have_s=torch.zeros(P, dtype=torch.bool, device=dev),
            gamma=torch.ones(P, dtype=dt, device=dev),
            v_ref=torch.full((P,), math.inf, dtype=dt, device=dev),
            m=m,
            kink_x=kink[0], kink_a=kink[1], kink_g=kink[2], has_kink=kink[3],
        )  # fmt: skip

    def remember(self, act, ev: _Evaluation, lp: _Linearised, xnew, accepted, lam_true) -> None:
        """Store the step just taken (and what the next secant needs), move the iterate, flag stalled points."""
        m = self.m
        s = xnew - ev.x
        self.s_prev[act] = s
        self.have_s[act] = accepted
        self.lamu_prev[act] = _pad_slots(lam_true, m)
        self.cls_prev[act] = _pad_slots(torch.where(lp.ok_row, lp.cls, torch.full_like(lp.cls, -2)), m, -2)
        self.as_prev[act] = _pad_slots(torch.bmm(ev.A, s[:, :, None])[:, :, 0], m)
        self.x[act] = xnew
        self.status[act[self.stalls[act] >= 3]] = _STALLED


@dataclass
class _Evaluation:
    """The running points' iterate x (P, n), scores z, constraint values g, h, rows A (P, m, n) with values c,
    slot masks, slot classes, which slot is the equality, and the feasibility tolerance."""

    x: torch.Tensor
    z: torch.Tensor
    g: torch.Tensor
    h: torch.Tensor
    A: torch.Tensor
    c: torch.Tensor
    valid: torch.Tensor
    cls: torch.Tensor
    is_eq: torch.Tensor
    tol_abs: torch.Tensor
    in_merit: torch.Tensor | None = None  # rows that are constraints of the problem (not the kink row)

    def take(self, idx: torch.Tensor) -> _Evaluation:
        return _Evaluation(*(None if getattr(self, f) is None else getattr(self, f)[idx]
                             for f in self.__dataclass_fields__))


def _evaluate(fn: ScoreFn, sub: _Problems, x: torch.Tensor, margin: float, tol: float, n_ineq: int,
              relevant_only: bool) -> _Evaluation:
    """Scores and constraint rows at the running points (the one autograd pass of the iteration)."""
    z, g, h, zs, zt, A, c, valid, cls = _scores_and_jacobian(_offset_fn(fn, sub.offset), x, sub.src, sub.tgt, margin,
                                                             n_ineq, relevant_only=relevant_only)
    is_eq = torch.zeros_like(valid)
    is_eq[:, 0] = True
    return _Evaluation(x, z, g, h, A, c, valid, cls, is_eq, _tol_abs(zs, zt, tol))


def _converged_now(st: _SqpState, act, sub: _Problems, ev: _Evaluation, kkt_tol: float, margin: float):
    """Feasible points whose KKT measure passes (nonsmooth: also against the kink row's gradient). (P,) bool"""
    g, h, z, tol_abs = ev.g, ev.h, ev.z, ev.tol_abs
    marg = (-(h - margin)).amin(1) if z.shape[1] > 2 else torch.full_like(g, math.inf)
    feas = (g.abs() <= tol_abs) & (marg >= margin - tol_abs) & torch.isfinite(z).all(1)
    done = feas.clone()
    if feas.any():  # the optimality measure only where it can decide
        f = torch.nonzero(feas)[:, 0]
        args = (sub.take(f), ev.x[f], ev.A[f], ev.c[f], ev.valid[f], ev.is_eq[f], tol_abs[f])
        kkt = _kkt_measure(*args)
        if st.kink_a is not None:  # stationarity against the combination of both sides' gradients
            bundle = (st.kink_a[act[f]] * st.has_kink[act[f], None])[:, None, :]
            kkt = torch.minimum(kkt, _kkt_measure(*args, bundle=bundle))
        done[f] = kkt <= kkt_tol
    return done


def _drop_hopeless(st: _SqpState, act, sub: _Problems, ev: _Evaluation):
    """Stop points whose violation did not fall by 10 % over the last progress window (e.g. a target class that
    can never win): status no progress. Returns the remaining (act, sub, ev)."""
    V = _violation(ev.g, ev.h)
    window = st.iters[act] % _PROGRESS_WINDOW == 1
    hopeless = window & (V > 0.9 * st.v_ref[act]) & (V > 10 * ev.tol_abs)
    st.v_ref[act] = torch.where(window, V, st.v_ref[act])
    if not hopeless.any():
        return act, sub, ev
    st.status[act[hopeless]] = _NO_PROGRESS
    go = ~hopeless
    return act[go], sub.take(go), ev.take(go)


def _secant_scale(st: _SqpState, act, sub: _Problems, ev: _Evaluation) -> None:
    """Scalar secant (Barzilai-Borwein) model of the Lagrangian Hessian, gamma * D^2: s.y / s.D^2.s with y the
    change of the Lagrangian gradient over the last step, for constraint slots present both times (in place)."""
    hs = st.have_s[act]
    s = st.s_prev[act]
    sWs = (sub.w * s * s).sum(1)
    a_new = torch.bmm(ev.A, s[:, :, None])[:, :, 0]  # a_j(x_k) . s for the current slots
    match = ev.cls[:, None, :] == st.cls_prev[act][:, :, None]  # (P, m_old, m_new)
    curv = (st.lamu_prev[act][:, :, None] * (a_new[:, None, :] - st.as_prev[act][:, :, None]) * match).sum((1, 2))
    gnew = (sWs + curv) / sWs.clamp(min=_TINY)
    # Powell damping: the model curvature falls at most 5x per step (a secant along a step dominated by the normal
    # component says little about the tangent space)
    gnew = torch.maximum(gnew, 0.2 * st.gamma[act])
    st.gamma[act] = torch.where(hs & (sWs > 0), gnew.clamp(0.05, 20.0), torch.ones_like(gnew))


def _with_kink_row(st: _SqpState, act, ev: _Evaluation) -> _Evaluation:
    """Append the kink row g_k + a_k . (y - x_k) = 0, i.e. c = g_k + a_k . (x - x_k): a model of g from beyond the
    kink, an equality of the QP but not a constraint of its own (out of the merit)."""
    hk = st.has_kink[act]
    ck = st.kink_g[act] + (st.kink_a[act] * (ev.x - st.kink_x[act])).sum(1)
    A = torch.cat([ev.A, (st.kink_a[act] * hk[:, None])[:, None, :]], 1)
    c = torch.cat([ev.c, torch.where(hk, ck, torch.zeros_like(ck))[:, None]], 1)
    valid = torch.cat([ev.valid, hk[:, None]], 1)
    is_eq = torch.cat([ev.is_eq, torch.ones_like(hk)[:, None]], 1)
    cls = torch.cat([ev.cls, torch.full_like(ev.cls[:, :1], -3)], 1)
    in_merit = torch.ones_like(valid)
    in_merit[:, -1] = False
    return _Evaluation(ev.x, ev.z, ev.g, ev.h, A, c, valid, cls, is_eq, ev.tol_abs, in_merit)


def _linearise(sub: _Problems, ev: _Evaluation, ga: torch.Tensor) -> _Linearised:
    """The QP data: every row normalised to unit length in the scaled norm (multipliers then have distance
    units), right-hand sides of c + a.(y - x) (=, <=) 0, and the anchor x + (x_hat - x) / gamma."""
    A, c, valid, is_eq, xa = ev.A, ev.c, ev.valid, ev.is_eq, ev.x
    in_merit = torch.ones_like(valid) if ev.in_merit is None else ev.in_merit
    free = ~sub.fixed
    nrm = torch.sqrt(torch.einsum("pmn,pn->pm", A**2, free / sub.w))
    ok_row = valid & (nrm > 0)
    An = torch.where(ok_row[:, :, None], A / nrm.clamp(min=_TINY)[:, :, None], torch.zeros_like(A))
    An = An * free[:, None, :]
    cn = torch.where(ok_row, c / nrm.clamp(min=_TINY), torch.zeros_like(c))
    # a.y (=, <=) a.x - c ; a row with no gradient is dropped (an equality with zero gradient cannot be
    # linearised: the elastic dual then leaves x unchanged)
    b = torch.einsum("pmn,pn->pm", An, xa) - cn
    b = torch.where(ok_row | is_eq, b, torch.full_like(b, 1.0))
    slot0 = torch.arange(b.shape[1], device=b.device) == 0
    b = torch.where(valid | ~is_eq | slot0, b, torch.zeros_like(b))  # unused kink row
    return _Linearised(An, b, c, cn, nrm, ok_row, valid.clone(), is_eq, ev.cls, ga, xa + (sub.xh - xa) / ga[:, None],
                       in_merit)


def _qp_step(st: _SqpState, act, sub: _Problems, lp: _Linearised, nonsmooth: bool):
    """The QP step y0 and its multipliers (warm-started); a kink row whose multiplier opposes the equality's (a
    concave kink) is dropped and the QP re-solved without it. Returns (y0, lam, lp)."""
    mc = lp.An.shape[1]  # slots this iteration (fewer than m when few classes are within reach)
    y0, lam = _dual_qp(sub, lp.An, lp.b, lp.is_eq, st.rho[act], st.lam_prev[act][:, :mc], anchor=lp.anchor)
    if nonsmooth:
        opp = lp.valid[:, -1] & (lam[:, -1] * lam[:, 0] < 0)
        if opp.any():
            o = torch.nonzero(opp)[:, 0]
            lp.An[o, -1] = 0.0
            lp.b[o, -1] = 0.0
            lp.ok_row[o, -1] = False
            lp.valid[o, -1] = False
            y0[o], lam[o] = _dual_qp(sub.take(o), lp.An[o], lp.b[o], lp.is_eq[o], st.rho[act][o], None,
                                     anchor=lp.anchor[o])
    st.lam_prev[act] = _pad_slots(lam, st.m)
    return y0, lam, lp


def _merit_penalty(st: _SqpState, act, sub: _Problems, ev: _Evaluation, lp: _Linearised, y0, lam):
    """The l1 merit penalty mu (kept above twice the multipliers, allowed to halve per step, steered so that an
    infeasible point's predicted decrease comes at least half from the violation; high where the linearisation
    was infeasible). Returns (mu (P,), elastic (P,), true-scale multipliers for the secant (P, m))."""
    ga, nrm, ok_row, An, b, is_eq = lp.gamma, lp.nrm, lp.ok_row, lp.An, lp.b, lp.is_eq
    lam_true = ga[:, None] * lam / nrm.clamp(min=_TINY) * ok_row
    # an infeasible linearisation (the QP returned its least-violation point): keep the penalty high
    res_qp = torch.einsum("pmn,pn->pm", An, y0) - b
    res_qp = torch.where(is_eq, res_qp.abs(), res_qp.clamp(min=0)) * ok_row
    elastic = res_qp.amax(1) > 1e-6 * (1 + b.abs().amax(1))
    st.lam_prev[act[elastic]] = 0.0  # do not warm-start the next QP from the huge least-violation multipliers
    mu_new = torch.maximum(0.5 * st.mu[act], 2.0 * lam_true.abs().amax(1) + 1e-12)
    p0 = y0 - ev.x
    quad = (sub.w * (ev.x - sub.xh) * p0).sum(1) + 0.5 * ga * (sub.w * p0 * p0).sum(1)
    V0 = _violation(ev.g, ev.h)
    steer = torch.where((V0 > 0) & (quad > 0), 2 * quad / V0.clamp(min=_TINY), torch.zeros_like(quad))
    mu_new = torch.maximum(mu_new, steer)
    mu_new = torch.where(elastic, torch.maximum(st.mu[act], 1e3 * st.dist_scale[act]), mu_new)
    st.mu[act] = mu_new
    lam_true = torch.where(elastic[:, None], torch.zeros_like(lam_true), lam_true)  # no secant from those
    return mu_new, elastic, lam_true


def _probe_kinks(fn: ScoreFn, st: _SqpState, act, sub: _Problems, ev: _Evaluation, y0, rejected) -> None:
    """Where the full step was rejected, sample the gradient of g just beyond x on both sides along the step; a
    gradient that differs from x's marks a kink and becomes the kink memory (in place)."""
    o = torch.nonzero(rejected)[:, 0]
    xa = ev.x
    po = y0[o] - xa[o]
    pn = torch.sqrt((sub.w[o] * po**2).sum(1)).clamp(min=_TINY)
    dn = torch.sqrt((sub.w[o] * (xa[o] - sub.xh[o]) ** 2).sum(1))
    eps = 1e-4 * torch.maximum(dn, pn)
    step = po * (eps / pn)[:, None]
    probe = torch.cat([xa[o] + step, xa[o] - step])
    probe = torch.minimum(torch.maximum(probe, sub.lo[o].repeat(2, 1)), sub.hi[o].repeat(2, 1))
    pg, pa = _equality_gradient(_offset_fn(fn, None if sub.offset is None else sub.offset[o].repeat(2, 1)),
                                probe, sub.src[o].repeat(2), sub.tgt[o].repeat(2))
    a0 = ev.A[o, 0]
    unit = lambda v: v / v.norm(dim=-1, keepdim=True).clamp(min=_TINY)  # noqa: E731
    diff = (unit(pa) - unit(a0).repeat(2, 1)).norm(dim=1).reshape(2, -1)
    side = diff.argmax(0)
    k = side * len(o) + torch.arange(len(o), device=o.device)
    new_kink = diff.amax(0) > 1e-6
    tgt_idx = act[o[new_kink]]
    st.kink_x[tgt_idx], st.kink_a[tgt_idx], st.kink_g[tgt_idx] = probe[k][new_kink], pa[k][new_kink], pg[k][new_kink]
    st.has_kink[tgt_idx] = True


def _run_sqp(run: _Setup, fn: ScoreFn, pr: _Problems, x0: torch.Tensor, max_iter: int, desc: str,
             nonsmooth: bool | None = None) -> _Iterates:
    """_sqp over chunks of problems (bounded memory). Returns x (P, n), iterations (P,), status (P,)."""
    outs = []
    for idx in _chunks(len(pr), run.chunk):
        outs.append(_sqp(fn, pr.take(idx), x0[idx], margin=run.opts.margin, tol=run.opts.tol, kkt_tol=run.opts.kkt_tol,
                         max_iter=max_iter, n_ineq=run.n_ineq, progress=run.opts.progress, desc=desc,
                         nonsmooth=nonsmooth if nonsmooth is not None else run.opts.nonsmooth))
    return _Iterates.cat(outs)
