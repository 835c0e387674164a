"""The region polish of piecewise-linear (ReLU / max-pooling) models: the activation pattern frozen, the exact convex
QP of that region solved by cutting planes, and its weak-duality certificate (``docs/flip_solver.md``, The region
polish)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from flipfrag.smooth import (
    RELU_FUNCS,
)

from .options import _Setup
from .pool import _START_REGION, _Candidates, _certify, _Pool, _to_output
from .problems import _CONVERGED, _TINY, ScoreFn, _chunks, _constraint_values, _model_fn, _Problems
from .sqp import (
    _KINK_TOL,
    _Certificate,
    _certified,
    _dual_qp,
    _equality_gradient,
    _kink_tolerance,
    _scores_and_jacobian,
)

_POLISH_ROUNDS, _POLISH_ADD, _POLISH_GAP = 8, 64, 0.008  # region polish: cutting-plane rounds, rows per round, stop gap
_POLISH_CLASSES = 63  # other-class rows of the polish's QP at most (the most nearly active)
_POLISH_DAMPING = 1e-7  # relative damping of the polish's dual Newton systems (dependent rows)
#: Bytes the sign rows' copies of the network may hold per pass: each row's forward pass keeps ~3 values per region
#: constraint for its backward pass (measured on EfficientNet-Lite0 at 224 x 224, 12.3 M constraints: 0.13-0.17 GB
#: per float32 row; 64 float64 rows per pass took the ImageNet solve's peak to 17.6 GB). Small nets keep 64 rows.
_ROW_MEMORY = 2**30


def _polish_starts(run: _Setup, pool: _Pool, points: _Problems):
    """Per point the closest feasible flip point found so far (certified or not; the closest segment crossing is
    one too). Returns (point index (Q,), problems (Q,) with their target, starts (Q, n) in the solve dtype, the
    starts' SQP iterations (Q,), 0 for a crossing)."""
    N = len(points)
    b = pool.best
    feas = pool.feasible(run.opts.margin)
    d = torch.where(feas, b.distance, torch.full_like(b.distance, math.inf))
    near = torch.full((N,), math.inf, dtype=d.dtype, device=d.device).scatter_reduce(0, pool.pid, d, "amin")
    first = torch.full((N,), len(d), dtype=torch.long, device=d.device).scatter_reduce(
        0, pool.pid, torch.where(feas & (d == near[pool.pid]), torch.arange(len(d), device=d.device), len(d)), "amin")
    x0 = torch.full_like(points.xh, math.nan)
    tgt = torch.full((N,), -1, dtype=torch.long, device=d.device)
    iters = torch.zeros(N, dtype=torch.long, device=d.device)
    has = first < len(d)
    x0[has] = b.x[first[has]].to(run.dtype)
    tgt[has] = pool.pr.tgt[first[has]]
    iters[has] = b.iterations[first[has]]
    if pool.bound_x is not None:
        cross = (pool.bound < near) & torch.isfinite(pool.bound)
        x0[cross] = pool.bound_x[cross]
        tgt[cross] = pool.bound_cls[cross]
        iters[cross] = 0
    i = torch.nonzero(tgt >= 0)[:, 0]
    pr = points.take(i)
    pr.tgt = tgt[i]
    return i, pr, x0[i], iters[i]


def _polish_certificate(run: _Setup, fn: ScoreFn, pr: _Problems,
                        pol: _RegionOptimum) -> tuple[torch.Tensor, _Certificate]:  # fmt: skip
    """The certificate of a region polish's points (:func:`_region_polish`): the usual one (:func:`_certify`, original
    model, output dtype), whose region gap becomes the polished region's ``distance / LB - 1`` where that is smaller
    and the point returned (rounded to the output dtype) lies in the polished region's closure — every sign
    constraint of its frozen pattern within the kink tolerance. Returns (x in the output dtype, certificate)."""
    xo = _to_output(run, pr, pol.x)
    chk = _certify(run, pr, xo)
    if _round_onto_boundary(run, pr, pol.x, xo, chk):
        chk = _certify(run, pr, xo)
    _, v, tl, _ = _sign_state(fn, pol.pattern, xo.to(run.dtype))
    inside = (v <= tl).all(1)
    gap = chk.distance / pol.lb.to(torch.float64).clamp(min=_TINY) - 1
    gap = torch.where(chk.distance > 0, gap.clamp(min=0), torch.zeros_like(gap)).to(chk.gap.dtype)
    chk.gap = torch.where(inside, torch.fmin(chk.gap, gap), chk.gap)
    chk.ok = _certified(chk, run.opts.margin, run.opts.kkt_tol)
    return xo, chk


def _round_onto_boundary(run: _Setup, pr: _Problems, x: torch.Tensor, xo: torch.Tensor, chk: _Certificate,
                         tries: int = 16) -> bool:
    """A polished point x (solve dtype) exactly on z_s = z_t can fail the residual test once rounded to a float32
    output and evaluated by the float32 model (digit 54 of the shipped MNIST CNN: 1.17 x tol). Where the residual is
    above tol but below 100 x tol, try ``tries`` corrections along the equality's normal (fractions 0.25 .. 2.1 of
    the Newton step for the rounded point's residual; each rounds differently) and keep the one with the smallest
    float32 residual, in place in ``xo``. Moves are of the order of the rounding (~1e-7 relative); the certificate
    is recomputed by the caller. Returns whether any point changed."""
    bad = (chk.residual > chk.tol_abs) & (chk.residual <= 100 * chk.tol_abs)
    if not bad.any() or (run.out_dtype == run.dtype and run.cert_dtype == run.dtype):
        return False
    i = torch.nonzero(bad)[:, 0]
    sub = pr.take(i)
    cd = run.cert_dtype
    fn = _model_fn(run.orig, run.shape)
    g, a = _equality_gradient(fn, xo[i].to(cd), sub.src, sub.tgt)
    a = a.to(run.dtype) * (~sub.fixed)
    step = (g.to(run.dtype) / (a * a / sub.w).sum(1).clamp(min=_TINY))[:, None] * a / sub.w
    best, best_r = xo[i].clone(), chk.residual[i].to(torch.float64)
    for k in range(tries):
        xc = _to_output(run, sub, x[i] - (0.25 + 0.125 * k) * step)
        with torch.no_grad():
            z = fn(xc.to(cd))
        r = (z.gather(1, sub.src[:, None]) - z.gather(1, sub.tgt[:, None]))[:, 0].abs().to(torch.float64)
        better = r < best_r
        best = torch.where(better[:, None], xc, best)
        best_r = torch.where(better, r, best_r)
    changed = (best != xo[i]).any(1)
    xo[i] = best
    return bool(changed.any())


def _polish_regions(run: _Setup, fn: ScoreFn, pool: _Pool, points: _Problems) -> None:
    """Piecewise-linear models: the region polish (:func:`_region_polish`) of every point's closest feasible
    candidate, certified and added to the pool. Its region gap counts for the certificate only where the returned
    point (in the output dtype) lies in the polished region's closure (kink tolerance)."""
    pid, pr, x0, iters = _polish_starts(run, pool, points)
    if pid.numel() == 0:
        return
    outs = []
    # the sign rows with the user's model when it is float32 (~3x cheaper backward passes than the float64 copy)
    row_fn = _model_fn(run.orig, run.shape) if run.cert_dtype == torch.float32 else fn
    C = len(pool.best.z[0])
    per = max(1, min(4, 2**24 // ((C + _POLISH_ROUNDS * _POLISH_ADD) * x0.shape[1])))  # rows held: bounded memory
    for idx in _chunks(len(pid), per):
        sub = pr.take(idx)
        try:
            pol = _region_polish(fn, sub, x0[idx], run.opts.margin, row_fn=row_fn, row_dtype=run.cert_dtype)
        except _Unrepresentable:  # a nonlinearity the frozen pattern cannot represent: no polish
            return
        xo, chk = _polish_certificate(run, fn, sub, pol)
        solver = torch.full((len(idx),), _CONVERGED, dtype=torch.long, device=x0.device)
        outs.append(_Candidates.of(xo, chk, iters[idx], solver, _START_REGION))
    pool.add(pid, pr, _Candidates.cat(outs))


@dataclass
class _RegionOptimum:
    """What the region polish returns for P points: x (P, n), the gap ``distance / LB - 1`` (P,), the lower bound
    LB (P,), the sign constraints used (P,) and the frozen pattern (for the caller's check that the returned point
    lies in the region)."""

    x: torch.Tensor
    gap: torch.Tensor
    lb: torch.Tensor
    rows: torch.Tensor
    pattern: list


@dataclass
class _ReluPattern:
    """A ReLU call's recorded pattern: ``mask`` = u > 0, one row per point."""

    mask: torch.Tensor

    def rows(self, sel: torch.Tensor) -> _ReluPattern:
        return _ReluPattern(self.mask[sel])


@dataclass
class _PoolPattern:
    """A 2-D max-pooling call's recorded pattern: the winner ``idx`` of every window (one row per point), the
    kernel ``k`` and stride ``st``, and ``pos`` (kk, L), the input index of every window entry."""

    idx: torch.Tensor
    k: tuple
    st: tuple
    pos: torch.Tensor

    def rows(self, sel: torch.Tensor) -> _PoolPattern:
        return _PoolPattern(self.idx[sel], self.k, self.st, self.pos)


class _StopForward(Exception):
    """Raised inside a frozen forward pass once the last pre-activation needed has been recorded."""


class _Unrepresentable(ValueError):
    """The model has a ReLU / pooling call that a frozen pattern cannot represent (no polish then)."""


class _FrozenPattern(TorchFunctionMode):
    """A forward pass of a ReLU / max-pooling model with its activation pattern frozen: the network is then affine.

    Recording (``pattern=None``): at x, every ReLU call stores its pattern ``u > 0`` (torch's relu'(0) = 0) and
    every 2-D max-pooling call the index of each window's first maximum (where the pooling routes its gradient),
    and both compute as usual. Replaying (``pattern`` given): ``relu(u) -> u * mask`` and ``max_pool2d(u) -> u at
    the recorded index`` — the affine map that equals the network on the closure of x's activation region. ``sel``
    (B,) maps each row of the batch to its pattern row (copies of one point); the pre-activations of every call are
    kept in ``inputs`` (graph attached); with ``stop_after`` the pass stops after that call (:class:`_StopForward`).
    Pooling with padding, dilation, ceil_mode or returned indices, and calls on tensors without one row per batch
    entry, are refused (:class:`_Unrepresentable`).
    """

    def __init__(self, pattern: list | None = None, sel: torch.Tensor | None = None, stop_after: int | None = None):
        super().__init__()
        self.record = pattern is None
        self.pattern = [] if pattern is None else pattern
        self.sel = sel
        self.stop_after = stop_after
        self.batch = None  # rows of the first call's input: every call must have them
        self.inputs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RELU_FUNCS:
            out = self._relu(args[0])
        elif func is torch.nn.functional.max_pool2d or func is torch.max_pool2d:
            out = self._pool(*args, **kwargs)
        else:
            return func(*args, **kwargs)
        if self.stop_after is not None and len(self.inputs) > self.stop_after:
            raise _StopForward
        return out

    def _entry(self, kind: str, make):
        i = len(self.inputs)
        if self.record:
            self.pattern.append((kind, make()))
        elif i >= len(self.pattern) or self.pattern[i][0] != kind:
            raise _Unrepresentable("the model's ReLU / max-pooling calls differ between two forward passes")
        pat = self.pattern[i][1]
        return pat if self.sel is None else pat.rows(self.sel)

    def _rows_ok(self, u):
        if self.batch is None:
            self.batch = u.shape[0] if u.dim() else -1
        if u.dim() == 0 or u.shape[0] != self.batch:
            raise _Unrepresentable("a ReLU / max-pooling input without one row per batch entry")

    def _relu(self, u):
        self._rows_ok(u)
        pat = self._entry("relu", lambda: _ReluPattern(u.detach() > 0))
        self.inputs.append(u)
        return u * pat.mask

    def _pool(self, u, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))  # noqa: E731
        k, st = pair(kernel_size), pair(stride if stride not in (None, []) else kernel_size)
        if pair(padding) != (0, 0) or pair(dilation) != (1, 1) or ceil_mode or return_indices or u.dim() != 4:
            raise _Unrepresentable("max-pooling with padding, dilation, ceil_mode or indices")

        def make():
            _, idx = torch.nn.functional.max_pool2d(u.detach(), k, st, return_indices=True)
            H, W = u.shape[2:]
            pos = torch.arange(H * W, dtype=u.dtype, device=u.device).reshape(1, 1, H, W)
            pos = torch.nn.functional.unfold(pos, k, stride=st)[0].round().long()  # (kk, L) input index per entry
            return _PoolPattern(idx, k, st, pos)

        self._rows_ok(u)
        pat = self._entry("pool", make)
        self.inputs.append(u)
        idx = pat.idx
        return u.flatten(2).gather(2, idx.flatten(2)).reshape(idx.shape)


def _frozen_forward(fn: ScoreFn, pattern: list, x: torch.Tensor, sel=None, stop_after=None):
    """Scores of the frozen (affine) model at x (None if stopped early) and the pre-activations of every call."""
    mode = _FrozenPattern(pattern, sel, stop_after)
    z = None
    try:
        with mode:
            z = fn(x)
    except _StopForward:
        pass
    return z, mode.inputs


def _sign_values(pattern: list, inputs: list, sel=None) -> list[torch.Tensor]:
    """The region's constraints c(x) <= 0 per recorded call, (B, m_l) each: ``-u`` for an active ReLU unit, ``u`` for
    an inactive one, ``u_b - u_a`` for every other input b of a pooling window with recorded winner a (``-inf`` at
    the winner itself: no constraint)."""
    vals = []
    for (kind, pat), u in zip(pattern, inputs):
        B = u.shape[0]
        if kind == "relu":
            mask = pat.mask if sel is None else pat.mask[sel]
            uf = u.reshape(B, -1)
            vals.append(torch.where(mask.reshape(B, -1), -uf, uf))
            continue
        idx = (pat.idx if sel is None else pat.idx[sel]).flatten(2)  # (B, C, L)
        k, st, pos = pat.k, pat.st, pat.pos
        C = u.shape[1]
        cols = torch.nn.functional.unfold(u, k, stride=st).reshape(B, C, k[0] * k[1], -1)
        win = u.flatten(2).gather(2, idx)
        c = cols - win[:, :, None, :]
        same = pos[None, None] == idx[:, :, None, :]
        vals.append(torch.where(same, torch.full_like(c, -math.inf), c).reshape(B, -1))
    return vals


def _sign_state(fn: ScoreFn, pattern: list, x: torch.Tensor):
    """Frozen scores z (P, C), all region constraint values (P, M) and their kink tolerances (P, M) at x."""
    with torch.no_grad():
        z, inputs = _frozen_forward(fn, pattern, x)
        vals = _sign_values(pattern, inputs)
    tols = [_kink_tolerance(u, _KINK_TOL)[:, None].expand_as(v) for u, v in zip(inputs, vals)]
    return z, torch.cat(vals, 1), torch.cat(tols, 1), [v.shape[1] for v in vals]


def _sign_rows(fn: ScoreFn, pattern: list, x: torch.Tensor, picks: torch.Tensor, sizes: list[int],
               chunk: int = 64) -> torch.Tensor:
    """Gradients (P, K, n) of the region constraints picks (P, K) (indices into the concatenated values of
    :func:`_sign_state`; -1 = none, a zero row): the frozen model is affine, so these are exact on the region's
    closure. Each point is copied once per row, ``chunk`` rows per forward pass (stopped after the deepest call
    needed) and one backward pass; fewer rows per pass where ``chunk`` copies would hold more than ``_ROW_MEMORY``."""
    P, K = picks.shape
    n = x.shape[1]
    chunk = max(1, min(chunk, _ROW_MEMORY // (3 * max(1, sum(sizes)) * x.element_size())))
    rows = torch.zeros(P * K, n, dtype=x.dtype, device=x.device)
    ends = torch.tensor(sizes, device=x.device).cumsum(0)
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), ends[:-1]])
    flat_p = torch.arange(P, device=x.device).repeat_interleave(K)
    flat_k = picks.reshape(-1)
    use = torch.nonzero(flat_k >= 0)[:, 0]
    use = use[torch.argsort(flat_k[use], stable=True)]  # by layer: a chunk's forward pass stops early
    for j in _chunks(len(use), chunk):
        r = use[j]
        sel, ids = flat_p[r], flat_k[r]
        layer = torch.searchsorted(ends, ids, right=True)
        local = ids - starts[layer]
        xr = x[sel].detach().requires_grad_(True)
        with torch.enable_grad():
            _, inputs = _frozen_forward(fn, pattern, xr, sel=sel, stop_after=int(layer.max()))
            vals = _sign_values(pattern[: len(inputs)], inputs, sel)
            outs, grads = [], []
            for li in torch.unique(layer).tolist():
                here = torch.nonzero(layer == li)[:, 0]
                go = torch.zeros_like(vals[li])
                go[here, local[here]] = 1.0
                outs.append(vals[li])
                grads.append(go)
            (rows[r],) = torch.autograd.grad(outs, xr, grads)
    return rows.reshape(P, K, n)


def _normalised_rows(pr: _Problems, A: torch.Tensor, c: torch.Tensor, x: torch.Tensor, valid: torch.Tensor,
                     is_eq: torch.Tensor):
    """Rows A (P, m, n) of constraints with values c at x -> the linear constraints An y (=, <=) b with rows of unit
    scaled norm on the free coordinates (rows without gradient or not valid: 0 y <= 1)."""
    free = ~pr.fixed
    nrm = torch.sqrt(torch.einsum("pmn,pn->pm", A**2, free / pr.w))
    ok = valid & (nrm > 0)
    An = torch.where(ok[:, :, None], A / nrm.clamp(min=_TINY)[:, :, None], torch.zeros_like(A)) * free[:, None, :]
    b = torch.einsum("pmn,pn->pm", An, x) - torch.where(ok, c / nrm.clamp(min=_TINY), torch.zeros_like(c))
    return An, torch.where(ok, b, torch.where(is_eq, torch.zeros_like(b), torch.ones_like(b))), torch.where(
        ok, nrm, torch.full_like(nrm, math.inf))


def _exact_region_bound(fn: ScoreFn, pattern: list, pr: _Problems, x0: torch.Tensor, lam_flip: torch.Tensor,
                        cls: torch.Tensor, lam_sign: torch.Tensor, picks: torch.Tensor, sizes: list[int],
                        margin: float) -> torch.Tensor:
    """Weak-duality lower bound (P,) on the distance of every flip point in the closure of the frozen pattern's
    region, evaluated with the frozen model itself (no explicit rows): for multipliers lam (lam_flip (P, m0) on
    the equality and the other classes cls (P, m0), slot 0 the equality; lam_sign (P, K) on the sign constraints
    picks; inequality multipliers clamped to >= 0) the Lagrangian L(y) = 1/2 ||D (y - x_hat)||^2 + lam . c(y) has
    affine c, so its minimiser over the box is ``y = clip(x_hat - D^-2 grad(lam . c))`` — one backward pass of the
    frozen model, exact in the solve dtype whatever rows the multipliers came from — and LB = sqrt(2 L(y)), with
    c(y) from one forward pass."""
    P = x0.shape[0]
    first_slot = torch.arange(lam_flip.shape[1], device=x0.device)[None] == 0
    lam_flip = torch.where(first_slot, lam_flip, lam_flip.clamp(min=0))
    lam_sign = torch.where(picks >= 0, lam_sign.clamp(min=0), torch.zeros_like(lam_sign))
    ends = torch.tensor(sizes, device=x0.device).cumsum(0)
    starts = ends - torch.tensor(sizes, device=x0.device)
    layer = torch.searchsorted(ends, picks.clamp(min=0), right=True)

    def lagrangian(x, grad: bool):
        with torch.enable_grad() if grad else torch.no_grad():
            xg = x.detach().requires_grad_(grad)
            z, inputs = _frozen_forward(fn, pattern, xg)
            vals = _sign_values(pattern, inputs)
            C = z.shape[1]
            gz = torch.zeros(P, C, dtype=z.dtype, device=z.device)
            gz.scatter_add_(1, pr.src[:, None], lam_flip[:, :1])
            gz.scatter_add_(1, pr.tgt[:, None], -lam_flip.sum(1, keepdim=True))
            k_lam = torch.where(cls[:, 1:] >= 0, lam_flip[:, 1:], torch.zeros_like(lam_flip[:, 1:]))
            gz.scatter_add_(1, cls[:, 1:].clamp(min=0), k_lam)
            value = (gz * z).sum(1) + margin * lam_flip[:, 1:].sum(1)
            outs, gouts = [z], [gz]
            for li in torch.unique(layer[picks >= 0]).tolist():
                here = (picks >= 0) & (layer == li)
                pi, ki = torch.nonzero(here, as_tuple=True)
                gv = torch.zeros_like(vals[li])
                gv.index_put_((pi, picks[pi, ki] - starts[li]), lam_sign[pi, ki], accumulate=True)
                value = value + (gv * torch.where(gv != 0, vals[li], torch.zeros_like(vals[li]))).sum(1)
                outs.append(vals[li])
                gouts.append(gv)
            if not grad:
                return value
            (gr,) = torch.autograd.grad(outs, xg, gouts)
            return gr

    gr = lagrangian(x0, True)
    y = torch.minimum(torch.maximum(pr.xh - gr / pr.w, pr.lo), pr.hi)
    q = 0.5 * (pr.w * (y - pr.xh) ** 2).sum(1) + lagrangian(y, False)
    return torch.sqrt(2 * q.clamp(min=0))


def _region_polish(fn: ScoreFn, pr: _Problems, x0: torch.Tensor, margin: float, rounds: int = _POLISH_ROUNDS,
                   add: int = _POLISH_ADD, target_gap: float = _POLISH_GAP, row_fn: ScoreFn | None = None,
                   row_dtype: torch.dtype | None = None) -> _RegionOptimum:
    """The closest flip point on the closure of the activation region of x0 (P, n; feasible flip points of a
    piecewise-linear model), by cutting planes on the exact convex QP of the frozen (affine) model.

    The frozen model (:class:`_FrozenPattern`) gives the equality, the other classes and the region's sign
    constraints as exact linear rows. Start: no sign constraint. Each round:
    solve the QP on the rows so far (a relaxation of the region's problem: its dual multipliers give a lower bound
    LB on the distance of every flip point of the region's closure, :func:`_exact_region_bound`); evaluate all sign
    constraints at the QP's solution y with one frozen forward pass; step from the current point x toward y as far
    as the region allows (an exact ratio test — everything is affine — so the new point stays a flip point of the
    region and, by convexity, no farther than x); add the ``add`` most violated constraints at y (and the one that
    blocked the step). Stops when y lies in the region (x = y is then the region's optimum) or the gap
    ``||D(x - x_hat)|| / LB - 1`` is at most ``target_gap``. Returns a :class:`_RegionOptimum`.
    ``row_fn`` / ``row_dtype``: the model (and its dtype) whose frozen backward passes compute the sign rows, e.g.
    the user's float32 model — the rows only steer the QP; feasibility, the ratio test and LB use ``fn``.
    """
    P, n = x0.shape
    rec = _FrozenPattern()
    with torch.no_grad(), rec:
        C = fn(x0).shape[1]
    pattern = rec.pattern

    def frozen(xf):
        return _frozen_forward(fn, pattern, xf)[0]

    # rows for the most nearly active other classes only (all of them up to 65 classes): with C = 1000 (ImageNet)
    # all C - 1 rows would cost C backward passes and a (C, n) matrix per point. Fewer class rows make the QP a
    # relaxation (LB stays a lower bound); the classes left out are kept by the ratio test below
    n_cls = min(C - 2, _POLISH_CLASSES)
    _, _, _, _, _, A, c, valid, cls = _scores_and_jacobian(frozen, x0, pr.src, pr.tgt, margin, n_cls)
    m0 = A.shape[1]
    zx, v0, _, sizes = _sign_state(fn, pattern, x0)
    picks = torch.full((P, 0), -1, dtype=torch.long, device=x0.device)
    rows = torch.zeros(P, 0, n, dtype=x0.dtype, device=x0.device)
    cvals = torch.zeros(P, 0, dtype=x0.dtype, device=x0.device)
    x = x0.clone()
    vx = v0
    lb_best = torch.zeros(P, dtype=x0.dtype, device=x0.device)
    lam = None
    active = torch.ones(P, dtype=torch.bool, device=x0.device)
    dist = torch.sqrt((pr.w * (x - pr.xh) ** 2).sum(1))
    for _ in range(rounds):
        K = picks.shape[1]
        A_all = torch.cat([A, rows], 1)
        c_all = torch.cat([c, cvals], 1)
        valid_all = torch.cat([valid, picks >= 0], 1)
        is_eq = torch.zeros_like(valid_all)
        is_eq[:, 0] = True
        An, b, nrm = _normalised_rows(pr, A_all, c_all, x0, valid_all, is_eq)
        if lam is not None:
            lam = torch.cat([lam, torch.zeros(P, m0 + K - lam.shape[1], dtype=lam.dtype, device=x0.device)], 1)
        no_box = torch.full((P,), math.inf, dtype=x0.dtype, device=x0.device)
        y, lam = _dual_qp(pr, An, b, is_eq, no_box, lam0=lam, iters=100, rel_damping=_POLISH_DAMPING)
        raw = lam / nrm  # the multipliers of the unnormalised constraints (0 on rows without gradient)
        lb = _exact_region_bound(fn, pattern, pr, x0, raw[:, :m0], cls, raw[:, m0:], picks, sizes, margin)
        lb_best = torch.maximum(lb_best, lb)
        zy, vy, toly, _ = _sign_state(fn, pattern, y)
        # the ratio test allows half the kink tolerance: x often lies exactly on facets that the QP's y leaves by a
        # rounding amount (the QP holds its rows to ~1e-10 relative), and a strict test then never moves x. The
        # point stays within the kink tolerance of the region's closure, where its certificate counts it as inside
        slack = 0.5 * toly
        viol = vy > slack
        vxc = torch.minimum(vx, slack)
        ratio = torch.where(viol, (slack - vxc) / (vy - vxc).clamp(min=_TINY), torch.full_like(vy, math.inf))
        t, block = ratio.min(1)
        if n_cls < C - 2:  # the classes without a row: z is affine on the region, so a ratio test keeps them below
            _, hx, _, _ = _constraint_values(zx, pr.src, pr.tgt, margin)
            _, hy, _, _ = _constraint_values(zy, pr.src, pr.tgt, margin)
            hxc = hx.clamp(max=0)
            rc = torch.where(hy > 0, -hxc / (hy - hxc).clamp(min=_TINY), torch.full_like(hy, math.inf))
            t = torch.minimum(t, rc.amin(1))
        t = t.clamp(max=1.0) * active
        xn = x + t[:, None] * (y - x)
        dn = torch.sqrt((pr.w * (xn - pr.xh) ** 2).sum(1))
        better = dn < dist
        x = torch.where(better[:, None], xn, x)
        dist = torch.where(better, dn, dist)
        zx, vx, _, _ = _sign_state(fn, pattern, x)
        gap = dist / lb_best.clamp(min=_TINY) - 1
        active &= viol.any(1) & (gap > target_gap)
        if not active.any():
            break
        # the most violated constraints at y (relative to their layer's scale) and the blocking one, not yet rows
        score = vy / toly
        score = score.scatter(1, picks.clamp(min=0), torch.where(picks >= 0, -math.inf, score.gather(
            1, picks.clamp(min=0))))
        hit = torch.where(viol.any(1, keepdim=True), math.inf, -math.inf).to(score.dtype)
        score = score.scatter(1, block[:, None], hit)
        # and half of the new rows in blocking order: the constraints the segment x -> y crosses first. x often lies
        # on (or within rounding of) many facets that y leaves through, so the step stays ~0 until every facet
        # crossed early on the segment is a row; the most violated ones at y lie farther along it
        held = torch.zeros_like(viol).scatter(1, picks.clamp(min=0), picks >= 0)
        first = torch.where(viol & ~held, ratio, torch.full_like(ratio, math.inf))
        early = (-first).topk(min(add // 2, first.shape[1]), dim=1)
        score = score.scatter(1, early.indices, torch.where(torch.isfinite(early.values), math.inf,
                                                            score.gather(1, early.indices)))
        score = torch.where(viol, score, torch.full_like(score, -math.inf))
        new = score.topk(min(add, score.shape[1]), dim=1)
        npick = torch.where(torch.isfinite(new.values) | (new.values == math.inf), new.indices,
                            torch.full_like(new.indices, -1))
        npick = torch.where((new.values > -math.inf) & active[:, None], npick, torch.full_like(npick, -1))
        new_rows = _sign_rows(row_fn or fn, pattern, x0.to(row_dtype or x0.dtype), npick, sizes)
        rows = torch.cat([rows, new_rows.to(x0.dtype)], 1)
        cvals = torch.cat([cvals, torch.where(npick >= 0, v0.gather(1, npick.clamp(min=0)),
                                              torch.zeros_like(npick, dtype=v0.dtype))], 1)
        picks = torch.cat([picks, npick], 1)
    gap = dist / lb_best.clamp(min=_TINY) - 1
    return _RegionOptimum(x, torch.where(dist > 0, gap.clamp(min=0), torch.zeros_like(gap)), lb_best,
                          (picks >= 0).sum(1), pattern)
