"""One-hot ``groups``: the relaxed solutions rounded to valid categories and re-solved, and the upper bound from
segment crossings with valid categories."""

from __future__ import annotations

import math

import torch

from .options import _Setup
from .pool import _BOUND_SLACK, _START_ITERATES, _Candidates, _certify, _polish, _Pool, _to_output
from .problems import ScoreFn, _model_fn, _Problems
from .sqp import _run_sqp
from .starts import _deepfool, _segment_crossing


def _one_hot_blocks(x: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Round every one-hot block of x (P, n) to its argmax category (a copy)."""
    x = x.clone()
    for gidx in groups:
        blk = x[:, gidx]
        x[:, gidx] = torch.zeros_like(blk).scatter_(1, blk.argmax(1, keepdim=True), 1.0)
    return x


def _round_groups(run: _Setup, pr: _Problems, relaxed: _Candidates, groups: list[torch.Tensor]):
    """Round the one-hot blocks of the relaxed solutions, fix them, re-solve the rest and re-certify.

    Two candidates per problem: the relaxed solution's argmax categories, and x's own categories. Returns the
    per-problem best (certified first, then closest) and whether rounding moved the relaxed point (P,).
    """
    gidx = torch.cat(groups)
    xr = relaxed.x.to(run.dtype)
    # a failed relaxed solve still gives a rounding guess: its last iterate
    cands = []
    for start_x in (xr, pr.xh):
        xround = _one_hot_blocks(start_x, groups)
        lo, hi = pr.lo.clone(), pr.hi.clone()
        lo[:, gidx] = xround[:, gidx]
        hi[:, gidx] = xround[:, gidx]
        sub = _Problems(pr.xh, lo, hi, pr.w, pr.src, pr.tgt, None)
        x0 = torch.where(torch.isfinite(xr), xr, pr.xh)
        x0[:, gidx] = xround[:, gidx]
        out = _run_sqp(run, _model_fn(run.work, run.shape), sub, x0, run.opts.max_iter, "categorical re-solve")
        xo = _to_output(run, sub, out.x)
        chk = _certify(run, sub, xo)  # a KKT point of the problem with the categories fixed
        cands.append(_Candidates.of(xo, chk, out.iterations + relaxed.iterations, out.status, relaxed.start))
    a, b = cands
    better = b.ok & (~a.ok | (b.distance < a.distance * (1 - 1e-6)))
    best = a.where(better, b)
    changed = (best.x[:, gidx].to(torch.float64) - relaxed.x[:, gidx].to(torch.float64)).abs().amax(1) > 1e-9
    return best, changed


def _category_choices(pr: _Problems, relaxed_x: torch.Tensor, groups: list[torch.Tensor]) -> list[torch.Tensor]:
    """Valid category assignments to try per problem (each (P, n), only the group columns matter): x's own
    categories, the rounded relaxed solution's, and x's own with one movable block set to each of its other
    categories (a block with a fixed column keeps x's category)."""
    own = _one_hot_blocks(pr.xh, groups)
    rel = torch.where(torch.isfinite(relaxed_x), relaxed_x, pr.xh)
    choices = [own, _one_hot_blocks(rel, groups)]
    for gidx in groups:
        movable = ~pr.fixed[:, gidx].any(1)
        if not movable.any():
            continue
        for j in range(len(gidx)):
            alt = own.clone()
            alt[:, gidx] = torch.where(movable[:, None], torch.zeros_like(alt[:, gidx]), own[:, gidx])
            alt[movable, gidx[j]] = 1.0
            choices.append(alt)
    return choices


def _start_from_valid_crossings(run: _Setup, fn: ScoreFn, pool: _Pool, points: _Problems, C: int,
                                relaxed_x: torch.Tensor, groups: list[torch.Tensor], tgt) -> None:
    """The upper bound of points with one-hot ``groups``, from flip points with *valid* categories.

    For every category assignment of :func:`_category_choices` and every problem of the pool: the first crossing
    on the segment that keeps those categories fixed and moves the other features from x_hat's values toward
    twice the relaxed solution's step, and toward a DeepFool point with those categories fixed — or, where the
    categories alone already change the label, from there toward the mirrored point and toward a DeepFool point
    that leaves that label, to the first point where the source wins again. Such a
    crossing is a flip point with valid categories (the source ties with the class that wins beside it), so its
    distance from x_hat bounds the closest one's (``pool.bound``). Where the closest
    crossing is more than 1 % closer than every certified candidate of its point, it starts one more solve with its
    categories fixed; ``_choose`` then applies the 1.01 test to every point as without groups.
    """
    gidx = torch.cat(groups)
    pr, pid, N = pool.pr, pool.pid, len(points)
    rel = torch.where(torch.isfinite(relaxed_x), relaxed_x.to(run.dtype), pr.xh)
    plain = _model_fn(run.work, run.shape)
    rows = torch.arange(len(pid), device=pid.device)
    # per point: the pool row, crossing, class and categories of its closest valid crossing
    best_row = torch.full((N,), -1, dtype=torch.long, device=pid.device)
    best_x = torch.zeros_like(points.xh)
    best_cls = torch.zeros(N, dtype=torch.long, device=pid.device)
    best_cats = torch.zeros_like(points.xh)
    for cats in _category_choices(pr, rel, groups):
        lo, hi = pr.lo.clone(), pr.hi.clone()
        lo[:, gidx] = cats[:, gidx]
        hi[:, gidx] = cats[:, gidx]
        start = pr.xh.clone()
        start[:, gidx] = cats[:, gidx]
        sub = _Problems(start, lo, hi, pr.w, pr.src, pr.tgt, None)
        with torch.no_grad():
            lab0 = plain(start).argmax(1)
        fwd = lab0 == pr.src
        # where the categories alone change the label, walk back: the first point where the source wins again
        back = _Problems(start, lo, hi, pr.w, lab0, pr.src, None)
        far = pr.xh + 2.0 * (rel - pr.xh)
        ends = [(far, 2 * start - far), (_deepfool(fn, sub, C, run.chunk)[0], _deepfool(fn, back, C, run.chunk)[0])]
        for end, end_back in ends:
            xc, cls, found = _segment_crossing(plain, sub, end)  # clips end into [lo, hi]: categories fixed
            xb, cb, fb = _segment_crossing(plain, back, end_back)
            xc = torch.where(fwd[:, None], xc, xb)
            found = torch.where(fwd, found, fb & (cb == pr.src))
            cls = torch.where(fwd, cls, lab0)  # the class the source ties with at the crossing
            if tgt is not None:
                found &= cls == pr.tgt
            dist = torch.sqrt((pr.w * (xc - pr.xh) ** 2).sum(1)).to(torch.float64)
            dist = torch.where(found, dist, torch.full_like(dist, math.inf))
            near = torch.full((N,), math.inf, dtype=torch.float64, device=pid.device).scatter_reduce(
                0, pid, dist, "amin")
            closer = near < pool.bound
            if not closer.any():
                continue
            first = torch.full((N,), len(pid), dtype=torch.long, device=pid.device).scatter_reduce(
                0, pid, torch.where(found & (dist == near[pid]), rows, len(pid)), "amin")
            pool.bound = torch.where(closer, near, pool.bound)
            i = torch.nonzero(closer)[:, 0]
            j = first[i]
            best_row[i], best_x[i], best_cls[i], best_cats[i] = j, xc[j], cls[j], cats[j]
    need = torch.nonzero((best_row >= 0) & (pool.bound < (1 - _BOUND_SLACK) * pool.closest_certified(N)))[:, 0]
    if need.numel() == 0:
        return
    sub = pr.take(best_row[need])  # x_hat, bounds and source of the pool row; its categories fixed, its new target
    sub.lo[:, gidx] = best_cats[need][:, gidx]
    sub.hi[:, gidx] = best_cats[need][:, gidx]
    sub.tgt = best_cls[need]
    pool.add(need, sub, _polish(run, fn, sub, best_x[need], _START_ITERATES))
    moved = (best_x[need][:, gidx].to(torch.float64) - relaxed_x[best_row[need]][:, gidx].to(torch.float64))
    pool.rounding_changed = torch.cat([pool.rounding_changed, moved.abs().amax(1) > 1e-9])
