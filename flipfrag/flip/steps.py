"""The pipeline of :func:`~flipfrag.flip.closest_flip_point` (``docs/flip_solver.md``, The steps): screen the
targets, solve them from x_hat (plus restarts / homotopy), start again from segment crossings, continue and polish
piecewise-linear models, handle one-hot groups, and choose one certified candidate per point."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .categories import _round_groups, _start_from_valid_crossings
from .options import _Setup
from .polish import _polish_regions
from .pool import (
    _BOUND_SLACK,
    _START_CANDIDATES,
    _START_DEEPFOOL,
    _START_ITERATES,
    _START_WALK,
    _Candidates,
    _certify,
    _finish_feasibility,
    _polish,
    _Pool,
    _to_output,
)
from .problems import _SOLVER_STATUS, _TINY, ScoreFn, _chunks, _model_fn, _Problems
from .result import FlipResult
from .sqp import _region_gap_tol, _run_sqp
from .starts import _deepfool, _homotopy, _norm_walk, _screen_targets, _segment_crossing


def _solve_candidates(run: _Setup, pr: _Problems, gen: torch.Generator) -> _Candidates:
    """Solve every problem from every start (direct, homotopy, restarts); keep per problem the closest certified
    candidate."""
    fn = _model_fn(run.work, run.shape)
    P = len(pr)
    cands = []  # (start id, solver output)
    x0 = torch.minimum(torch.maximum(pr.xh, pr.lo), pr.hi)
    direct = _run_sqp(run, fn, pr, x0, run.opts.max_iter, "flip points")
    if run.opts.nonsmooth:
        _finish_feasibility(run, fn, pr, direct)
    cands.append((0, direct))
    opts = run.opts
    if opts.homotopy:
        cands.append((1, _homotopy(run, pr, opts.homotopy_steps, opts.homotopy_tau)))
    restarts = opts.restarts
    if restarts:
        # random starts around x_hat at the distance scale of the direct solution
        xd = _to_output(run, pr, cands[0][1].x)
        chk0 = _certify(run, pr, xd)
        d = torch.where(chk0.ok, chk0.distance, torch.full_like(chk0.distance, math.nan))
        fallback = d.nanmedian() if torch.isfinite(d).any() else torch.tensor(1.0, dtype=torch.float64, device=d.device)
        d = torch.where(torch.isfinite(d) & (d > 0), d, fallback.clamp(min=1e-6)).to(run.dtype)
        free = (~pr.fixed).to(run.dtype)
        xs = []
        for _ in range(restarts):
            # cpu-ok: drawn on the CPU from the seeded generator (the same restarts on any device), then moved
            xi = torch.randn(pr.xh.shape, generator=gen, dtype=torch.float64).to(device=pr.xh.device,
                                                                                 dtype=run.dtype) * free
            xi = xi / torch.sqrt(pr.w) / torch.sqrt((xi**2).sum(1, keepdim=True)).clamp(min=_TINY)
            u = torch.rand(P, generator=gen, dtype=torch.float64).to(device=pr.xh.device, dtype=run.dtype)  # cpu-ok
            rad = d * (0.5 + u)
            xs.append(torch.minimum(torch.maximum(pr.xh + rad[:, None] * xi, pr.lo), pr.hi))
        prr = pr.repeat(restarts)
        outr = _run_sqp(run, fn, prr, torch.cat(xs), run.opts.max_iter, "restarts")
        for r in range(restarts):
            sl = slice(r * P, (r + 1) * P)
            cands.append((2 + r, outr.take(sl)))
    best = None
    for start, out in cands:
        xo = _to_output(run, pr, out.x)
        chk = _certify(run, pr, xo)
        cur = _Candidates.of(xo, chk, out.iterations, out.status, start)
        if best is None:
            best = cur
            continue
        # strictly closer (beyond rounding) wins; ties keep the earlier start
        better = cur.ok & (~best.ok | (cur.distance < best.distance * (1 - 1e-6)))
        best = best.where(better, cur)
    return best


def _solve(run: _Setup, fn: ScoreFn, points: _Problems, C: int, z: torch.Tensor, *, tgt, candidates, groups,
           gen: torch.Generator) -> _Pool:
    """The algorithm: screen the targets, solve them from x_hat (and restarts / homotopy), start again from the
    boundary crossings of cheap label-changing points (DeepFool steps, given candidates) and of the solver's own
    iterates, certify everything. Returns the pool of certified candidates."""
    with _solver_threads(run.orig):
        return _solve_steps(run, fn, points, C, z, tgt=tgt, candidates=candidates, groups=groups, gen=gen)


@contextlib.contextmanager
def _solver_threads(model: nn.Module):
    """One intra-op torch thread while solving on a model without convolutions (restored afterwards).

    The solver's operations on dense models are small ((points x features) tensors, thousands of them): a second
    thread saves little on a quiet machine and, when the cores are shared, every parallel region waits for a
    descheduled thread — measured on the quick MNIST MLP solve of 400 points with the machine loaded: 3.5 s on one
    thread, 5.3-17.5 s on two. Convolutional models keep the caller's setting (their convolutions do scale).
    """
    before = torch.get_num_threads()
    dense = not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    if dense and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _solve_steps(run: _Setup, fn: ScoreFn, points: _Problems, C: int, z: torch.Tensor, *, tgt, candidates, groups,
                 gen: torch.Generator) -> _Pool:
    """The steps of :func:`_solve` (see there)."""
    N = len(points)
    screen, upper_bounds = run.opts.screen, run.opts.upper_bounds
    pid, ptgt = _screen(run, fn, points, C, tgt, screen)
    pr = points.take(pid)
    pr.tgt = ptgt
    no_bound = torch.full((N,), math.inf, dtype=torch.float64, device=points.xh.device)
    pool = _Pool(pid, pr, _solve_candidates(run, pr, gen), no_bound)
    starts = []
    if upper_bounds and tgt is None:
        x_df, changed = _deepfool(fn, points, C, run.chunk)
        starts.append((x_df, changed, _START_DEEPFOOL))
    if candidates is not None:
        starts.append((candidates, torch.ones(N, dtype=torch.bool, device=points.xh.device), _START_CANDIDATES))
    for x_end, usable, start_id in starts:
        _start_from_crossings(run, fn, pool, torch.nonzero(usable)[:, 0], points, x_end[usable], tgt, start_id)
    if run.opts.walk_steps:
        x_w, found = _walk(run, pool, points, tgt)
        pid = torch.arange(N, device=points.xh.device).repeat(2, 1)
        _start_from_crossings(run, fn, pool, pid[found], points, x_w[found], tgt, _START_WALK)
    if upper_bounds:  # the solver's own last iterates: the segment to each may cross another class first
        for _ in range(2):
            if not _start_from_crossings(run, fn, pool, pool.pid, points, pool.best.x.to(run.dtype), tgt,
                                         _START_ITERATES, only_closer=True):
                break
    if run.opts.nonsmooth:
        _continue_infeasible(run, fn, pool, points, C, screened=tgt is None and screen is not None)
        _polish_regions(run, fn, pool, points)
    if groups:
        relaxed_x = pool.best.x
        pool.best, pool.rounding_changed = _round_groups(run, pool.pr, pool.best, groups)
        # the relaxed crossings have fractional categories: only crossings with valid categories bound a rounded point
        pool.bound = torch.full((N,), math.inf, dtype=torch.float64, device=points.xh.device)
        if upper_bounds:
            _start_from_valid_crossings(run, fn, pool, points, C, relaxed_x, groups, tgt)
    return pool


_WALK_FAR = 16.0  # the second walk's start norm, in units of the closest flip point found so far


def _walk(run: _Setup, pool: _Pool, points: _Problems, tgt) -> tuple[torch.Tensor, torch.Tensor]:
    """The first-order walks' label-changing points (:func:`~.starts._norm_walk`), on the caller's model and dtype
    (a start needs no float64), chunk by chunk: two walks per point, their norms starting at the closest flip point
    found so far (the median of those found where a point has none) and at ``_WALK_FAR`` times it. Measured on the
    CIFAR-10 CNN's first 4 photos: the near walk alone left photo 1 at 1.22 x DDN's crossing (DDN starts at norm 1,
    ~16 x that photo's distance); the far walk finds a flip point 0.82 x it. Returns (x (2, N, n) in the working
    dtype, found (2, N))."""
    N = len(points)
    radius = torch.minimum(pool.closest_feasible(N, run.opts.margin), pool.bound)
    fin = torch.isfinite(radius) & (radius > 0)
    fallback = radius[fin].median() if fin.any() else torch.ones((), dtype=radius.dtype, device=radius.device)
    radius = torch.where(fin, radius, fallback)
    cd = run.cert_dtype
    fn = _model_fn(run.orig, run.shape)
    xs, found = [], []
    for idx in _chunks(N, run.chunk, points.xh.device):
        sub = points.take(idx)
        sub = _Problems(sub.xh.to(cd), sub.lo.to(cd), sub.hi.to(cd), sub.w.to(cd), sub.src,
                        sub.src if tgt is None else tgt[idx])  # fmt: skip
        # two walks per point, together: from the distance reached and from 16 times it (a far start explores
        # beyond the basin of the solves so far, as DDN's fixed start norm does on small-distance inputs)
        two = sub.repeat(2)
        r = radius[idx].to(cd)
        t = None if tgt is None else tgt[idx].repeat(2)
        x, ok = _norm_walk(fn, two, torch.cat([r, _WALK_FAR * r]), t, run.opts.walk_steps)
        xs.append(x.to(run.dtype).reshape(2, len(idx), -1))
        found.append(ok.reshape(2, len(idx)))
    return torch.cat(xs, 1), torch.cat(found, 1)


def _continue_infeasible(run: _Setup, fn: ScoreFn, pool: _Pool, points: _Problems, C: int, screened: bool) -> None:
    """Piecewise-linear models: points with no feasible candidate and no segment crossing (nothing to polish) continue
    their direct SQP solves from the last iterate, up to 200 iterations in all (the smooth models' default), and —
    when the targets were screened — also solve the next two screened targets from x_hat."""
    N = len(points)
    missing = torch.isinf(pool.closest_feasible(N, run.opts.margin)) & torch.isinf(pool.bound)
    if not missing.any():
        return
    more = 200 - run.opts.max_iter
    j = torch.nonzero(missing[pool.pid] & (pool.best.start == 0))[:, 0]
    if j.numel() and more >= 1:
        pr = pool.pr.take(j)
        pool.add(pool.pid[j], pr, _polish(run, fn, pr, pool.best.x[j].to(run.dtype), 0, max_iter=more))
    i = torch.nonzero(missing)[:, 0]
    if not screened or C < 3:
        return
    sub = points.take(i)
    tg = _screen_targets(fn, sub, C, min(3, C - 1), run.chunk)
    tried = torch.zeros(len(i), C, dtype=torch.bool, device=i.device)
    mine = torch.isin(pool.pid, i)
    rank = torch.full((N,), -1, dtype=torch.long, device=i.device)
    rank[i] = torch.arange(len(i), device=i.device)
    tried[rank[pool.pid[mine]], pool.pr.tgt[mine]] = True
    new = ~tried.gather(1, tg)
    pid = i[:, None].expand_as(tg)[new]
    if pid.numel() == 0:
        return
    pr = points.take(pid)
    pr.tgt = tg[new]
    x0 = torch.minimum(torch.maximum(pr.xh, pr.lo), pr.hi)
    out = _polish(run, fn, pr, x0, 0, max_iter=200)
    pool.add(pid, pr, out)


def _screen(run: _Setup, fn: ScoreFn, points: _Problems, C: int, tgt, screen) -> tuple[torch.Tensor, torch.Tensor]:
    """The (point, target) problems to solve: the given target; else the ``screen`` classes of smallest linearised
    distance (all other classes when ``screen`` is None). Returns (point index (P,), target (P,))."""
    N = len(points)
    if tgt is not None:
        return torch.arange(N, device=points.xh.device), tgt
    if screen is None or screen >= C - 1:
        tg = torch.arange(C, device=points.xh.device).repeat(N, 1)
        tg = tg[tg != points.src[:, None]].reshape(N, C - 1)
    else:
        tg = _screen_targets(fn, points, C, screen, run.chunk)
    return torch.arange(N, device=points.xh.device)[:, None].expand_as(tg).reshape(-1), tg.reshape(-1)


def _start_from_crossings(run: _Setup, fn: ScoreFn, pool: _Pool, pid: torch.Tensor, points: _Problems,
                          x_end: torch.Tensor, tgt, start_id: int, only_closer: bool = False) -> bool:
    """Segment crossings from x_hat toward x_end (one per entry of pid): each is a flip point, so it lowers the
    point's upper bound; the closest per point becomes a start of a new solve (with ``only_closer``: only where it
    is more than 1 % closer than the closest certified candidate so far). Returns whether any solve was added."""
    if pid.numel() == 0:
        return False
    sub = points.take(pid)
    xc, cls, found = _segment_crossing(_model_fn(run.work, run.shape), sub, x_end)
    if tgt is not None:
        found &= cls == tgt[pid]
    dist = torch.sqrt((sub.w * (xc - sub.xh) ** 2).sum(1)).to(torch.float64)
    dist = torch.where(found, dist, torch.full_like(dist, math.inf))
    N = len(points)
    near = torch.full((N,), math.inf, dtype=torch.float64, device=pid.device).scatter_reduce(0, pid, dist, "amin")
    # the first entry achieving each point's closest crossing
    first = torch.full((N,), len(pid), dtype=torch.long, device=pid.device).scatter_reduce(
        0, pid, torch.where(found & (dist == near[pid]), torch.arange(len(pid), device=pid.device), len(pid)), "amin")
    use = first < len(pid)
    if run.opts.nonsmooth:  # remembered as a start of the region polish
        if pool.bound_x is None:
            pool.bound_x = torch.full((N, xc.shape[1]), math.nan, dtype=xc.dtype, device=xc.device)
            pool.bound_cls = torch.full((N,), -1, dtype=torch.long, device=xc.device)
        closer = use & (near < pool.bound)
        pool.bound_x[closer] = xc[first[closer]]
        pool.bound_cls[closer] = cls[first[closer]]
    pool.bound = torch.minimum(pool.bound, near)
    if run.opts.nonsmooth:  # the region polish finishes the closest feasible point: a new solve only where it is beaten
        use &= near < (1 - _BOUND_SLACK) * pool.closest_feasible(N, run.opts.margin)
    elif only_closer:
        use &= near < (1 - _BOUND_SLACK) * pool.closest_certified(N)
    if not use.any():
        return False
    j = first[use]
    pr = sub.take(j)
    pr.tgt = cls[j]
    pool.add(pid[j], pr, _polish(run, fn, pr, xc[j], start_id))
    return True


def _choose(run: _Setup, pool: _Pool, z: torch.Tensor, N: int, C: int, given_target: bool) -> FlipResult:
    """Per point the closest certified candidate (for a point with none: the attempt toward the class scoring
    highest at x among those tried); it stays certified only if it is within 1 % of the point's upper bound."""
    best, pid, ptgt = pool.best, pool.pid, pool.pr.tgt
    P = len(pid)
    dist_ok = torch.where(best.ok, best.distance, torch.full_like(best.distance, math.inf))
    has = torch.zeros(N, dtype=torch.long, device=pid.device).scatter_reduce(0, pid, best.ok.long(), "amax").bool()
    zt = z.to(torch.float64)[pid, ptgt]
    key = torch.where(has[pid], dist_ok, -zt)  # smaller is better
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(pid[order], stable=True)]
    firsts = torch.ones(P, dtype=torch.bool, device=pid.device)
    firsts[1:] = pid[order][1:] != pid[order][:-1]
    sel = order[firsts]  # one problem per point, in point order
    distances = None
    if not given_target:
        distances = torch.full((N * C,), math.inf, dtype=torch.float64, device=pid.device)
        distances = distances.scatter_reduce(0, pid * C + ptgt, dist_ok.to(torch.float64), "amin").reshape(N, C)
    b = best.take(sel)
    bound = pool.bound
    within = ~(b.distance > (1 + _BOUND_SLACK) * bound)
    ok = b.ok & within
    shape = run.shape
    x_att = b.x.reshape(N, *shape)
    x_flip = torch.where(ok.reshape(N, *([1] * len(shape))), x_att, torch.full_like(x_att, math.nan))
    status = [_status_text(b, i, run, float(bound[i]), bool(within[i])) for i in range(N)]
    return FlipResult(
        x_flip=x_flip,
        x_attempt=x_att,
        distance=torch.where(ok, b.distance, torch.full_like(b.distance, math.nan)),
        source=pool.pr.src[sel].clone(),
        target=ptgt[sel].clone(),
        residual=b.residual.to(torch.float64),
        margin=b.margin.to(torch.float64),
        bound_violation=b.bound_violation,
        kkt=b.kkt.to(torch.float64),
        iterations=b.iterations,
        converged=ok,
        status=status,
        start=torch.where(ok, b.start, torch.full_like(b.start, -1)),
        scores=b.z,
        distances=distances,
        rounding_changed=None if pool.rounding_changed is None else pool.rounding_changed[sel],
        tol=run.opts.tol,
        kkt_tol=run.opts.kkt_tol,
        margin_param=run.opts.margin,
        upper_bound=bound.clone(),
        region_gap=b.gap.to(torch.float64) if run.opts.nonsmooth else None,
    )


def _status_text(b: _Candidates, i: int, run: _Setup, bound: float, within: bool) -> str:
    """"converged", or every test point i failed, with the solver's own status."""
    if b.ok[i] and within:
        return "converged"
    why = []
    if not torch.isfinite(b.z[i]).all():
        why.append("non-finite scores")
    if b.residual[i] > b.tol_abs[i]:
        why.append(f"residual {float(b.residual[i]):.1e} > {float(b.tol_abs[i]):.1e}")
    if b.margin[i] < run.opts.margin - b.tol_abs[i]:
        why.append(f"margin {float(b.margin[i]):.1e} < {run.opts.margin:.1e}")
    if b.bound_violation[i] > 0:
        why.append(f"bound violation {float(b.bound_violation[i]):.1e}")
    gap_ok = b.gap[i] <= _region_gap_tol(run.opts.kkt_tol)
    if not b.kkt[i] <= run.opts.kkt_tol + b.kkt_floor[i] and not gap_ok:
        why.append(f"kkt {float(b.kkt[i]):.1e} > {run.opts.kkt_tol + float(b.kkt_floor[i]):.1e}")
        if math.isfinite(float(b.gap[i])):
            why.append(f"region gap {float(b.gap[i]):.1e} > {_region_gap_tol(run.opts.kkt_tol):.0e}")
    if not within:
        why.append(f"distance {float(b.distance[i]):.3g} > 1.01 x a boundary point found at {bound:.3g}")
    return "; ".join(why) + f" (solver: {_SOLVER_STATUS[int(b.solver[i])]})"
