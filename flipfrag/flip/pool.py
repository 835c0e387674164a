"""The candidates of every solve and their certificates: :class:`_Candidates`, the certification with the
original model (:func:`_certify`) and :class:`_Pool`, every candidate of a call with the points' upper bounds."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .options import _Setup
from .problems import _CONVERGED, ScoreFn, _chunks, _model_fn, _Problems
from .sqp import _Certificate, _certified, _check, _Iterates, _run_sqp
from .starts import _closest_feasible, _restore_feasibility

# start ids of the solves seeded by segment crossings (FlipResult.start); 0, 1, 2.. are direct, homotopy, restarts
_START_DEEPFOOL, _START_CANDIDATES, _START_ITERATES = 100, 101, 102


_START_REGION = 103  # the region polish of a piecewise-linear model's closest feasible candidate
_START_WALK = 104  # the segment crossing toward the first-order walk's point (starts._norm_walk)


_BOUND_SLACK = 0.01  # a certified point may be at most 1 % farther than the closest boundary crossing found


@dataclass
class _Candidates(_Certificate):
    """Certified candidates, one per problem: the point x (output dtype), its certificate, the SQP iterations, the
    solver's status code and the start id (``FlipResult.start``)."""

    x: torch.Tensor
    iterations: torch.Tensor
    solver: torch.Tensor
    start: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, chk: _Certificate, iterations: torch.Tensor, solver: torch.Tensor,
           start: torch.Tensor | int) -> _Candidates:  # fmt: skip
        if isinstance(start, int):
            start = torch.full((len(x),), start, dtype=torch.long, device=x.device)
        cert = {f.name: getattr(chk, f.name) for f in fields(_Certificate)}
        return cls(**cert, x=x, iterations=iterations, solver=solver, start=start)


def _certify(run: _Setup, pr: _Problems, x: torch.Tensor) -> _Certificate:
    """Exact check with the original model in its dtype at the point returned to the user (x in out dtype)."""
    cd = run.cert_dtype
    prc = _Problems(pr.xh.to(cd), pr.lo.to(cd), pr.hi.to(cd), pr.w.to(cd), pr.src, pr.tgt, None)
    fn = _model_fn(run.orig, run.shape)
    outs = []
    o = run.opts
    for idx in _chunks(len(pr), run.chunk):
        outs.append(_check(fn, prc.take(idx), x[idx].to(cd), o.margin, o.tol, run.n_ineq, o.kkt_tol,
                           region=o.nonsmooth))
    chk = _Certificate.cat(outs)
    # bounds and distance in the output dtype, against the bounds as given
    xo = x.to(torch.float64)
    chk.bound_violation = torch.maximum(pr.lo - xo, xo - pr.hi).clamp(min=0).amax(1).to(torch.float64)
    chk.distance = torch.sqrt((pr.w * (xo - pr.xh) ** 2).sum(1))
    # rounding x_flip to the output (or model) dtype alone moves D^2 (x - x_hat) by up to eps * |D^2 x|: the KKT
    # measure cannot be certified below that, relative to the distance (matters in float32 at small distances)
    eps = max(torch.finfo(run.out_dtype).eps, torch.finfo(cd).eps)
    floor = eps * torch.sqrt((pr.w * xo**2).sum(1)) / chk.distance.clamp(min=torch.finfo(torch.float64).tiny)
    chk.kkt_floor = torch.where(chk.distance > 0, floor, torch.zeros_like(floor))
    chk.ok = _certified(chk, run.opts.margin, run.opts.kkt_tol)
    return chk


def _to_output(run: _Setup, pr: _Problems, x: torch.Tensor) -> torch.Tensor:
    """Working-dtype solution -> the user's dtype, inside the box and exact on fixed features."""
    xo = x.to(run.out_dtype)
    lo, hi = pr.lo.to(run.out_dtype), pr.hi.to(run.out_dtype)
    return torch.minimum(torch.maximum(xo, lo), hi)


def _finish_feasibility(run: _Setup, fn: ScoreFn, pr: _Problems, out: _Iterates) -> None:
    """An SQP stuck among kinks near the boundary (nonsmooth models): finish the feasibility exactly, in place."""
    failed = out.status != _CONVERGED
    if failed.any():
        i = torch.nonzero(failed)[:, 0]
        sub = pr.take(i)
        xi = out.x[i]
        out.x[i] = _closest_feasible(fn, sub, [xi, _restore_feasibility(fn, sub, xi)], run.opts.margin, run.opts.tol)


@dataclass
class _Pool:
    """Every candidate solve: problem p belongs to point pid[p], flips to tgt[p]; ``best`` holds its certified
    result (:class:`_Candidates`); ``bound`` (N,) is the distance of the
    closest boundary point found by segment crossings (an upper bound on the closest flip point's distance)."""

    pid: torch.Tensor
    pr: _Problems
    best: _Candidates
    bound: torch.Tensor
    rounding_changed: torch.Tensor | None = None
    bound_x: torch.Tensor | None = None  # (N, n) the closest crossing found (solve dtype), NaN where none
    bound_cls: torch.Tensor | None = None  # (N,) the class winning beyond it

    def add(self, pid: torch.Tensor, pr: _Problems, best: _Candidates) -> None:
        self.pid = torch.cat([self.pid, pid])
        self.pr = _cat_problems([self.pr, pr])
        self.best = _Candidates.cat([self.best, best])

    def feasible(self, margin: float) -> torch.Tensor:
        """Which candidates are flip points (residual, margin, bounds within tolerance), certified or not. (P,)"""
        b = self.best
        return (torch.isfinite(b.z).all(1) & (b.residual <= b.tol_abs) & (b.margin >= margin - b.tol_abs)
                & (b.bound_violation == 0))

    def closest_feasible(self, N: int, margin: float) -> torch.Tensor:
        """Per point, the smallest distance of a feasible candidate so far (inf where none). (N,)"""
        d = torch.where(self.feasible(margin), self.best.distance, torch.full_like(self.best.distance, math.inf))
        return torch.full((N,), math.inf, dtype=d.dtype, device=d.device).scatter_reduce(0, self.pid, d, "amin")

    def closest_certified(self, N: int) -> torch.Tensor:
        """Per point, the smallest certified distance so far (inf where none). (N,)"""
        d = torch.where(self.best.ok, self.best.distance, torch.full_like(self.best.distance, math.inf))
        return torch.full((N,), math.inf, dtype=d.dtype, device=d.device).scatter_reduce(0, self.pid, d, "amin")


def _cat_problems(prs: list[_Problems]) -> _Problems:
    off = [p.offset for p in prs]
    return _Problems(*(torch.cat([getattr(p, f) for p in prs]) for f in ("xh", "lo", "hi", "w", "src", "tgt")),
                     None if all(o is None for o in off) else torch.cat(off))


def _polish(run: _Setup, fn: ScoreFn, pr: _Problems, x0: torch.Tensor, start_id: int,
            max_iter: int | None = None) -> _Candidates:
    """Solve from the given (feasible) starts and certify."""
    out = _run_sqp(run, fn, pr, x0, run.opts.max_iter if max_iter is None else max_iter, "from crossings")
    if run.opts.nonsmooth:
        _finish_feasibility(run, fn, pr, out)
    xo = _to_output(run, pr, out.x)
    return _Candidates.of(xo, _certify(run, pr, xo), out.iterations, out.status, start_id)
