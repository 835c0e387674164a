"""Closest flip points of a classifier: batched, certified, model-agnostic.

A *flip point* of a classifier with pre-softmax scores ``z(x)`` between its source class ``s`` and a target class
``t`` is an input where the two scores are equal and every other class scores lower. For an input ``x_hat`` the
closest flip point (Yousefzadeh & O'Leary 2019) solves::

    minimise    1/2 || D (x - x_hat) ||^2                       D = diag(scale), default identity
    subject to  g(x)   = z_s(x) - z_t(x)            = 0         (the two top scores are equal)
                h_k(x) = z_k(x) - z_t(x) + margin  <= 0         for every other class k
                lower <= x <= upper,   x_i = x_hat_i where mask_i is False.

``margin = 0`` is the definition; the authors' MATLAB code used ``margin = 0.2 / C``.

The steps (``closest_flip_point`` -> ``_solve`` -> ``_choose``; all points advanced together)
---------------------------------------------------------------------------------------------
1. **screen** (``_screen``): with ``target=None``, only the ``screen`` (default 3; 1 for piecewise-linear models)
   classes of smallest linearised distance ``|z_s - z_t| / ||D^-1 grad(z_s - z_t)||`` are solved for — one Jacobian
   of all classes at ``x_hat``.
2. **start** (``_solve_candidates``): one SQP solve per (point, screened target) from ``x_hat``; plus random
   ``restarts`` and the ``homotopy`` path when asked.
3. **bound** (``_start_from_crossings``): on the segment from ``x_hat`` to any label-changing point — a
   DeepFool-style point (``_deepfool``), the caller's ``candidates`` (e.g. FAB's output), the solver's own last
   iterates (two rounds) — the first point where the predicted class leaves the source is a flip point (scan and
   bisection, ``_segment_crossing``). Its distance is an upper bound on the closest flip point's (``upper_bound``);
   the closest such point of each point starts one more SQP solve (a feasible start, from which the merit line
   search only descends) — for piecewise-linear models only where it is more than 1 % closer than the closest
   feasible candidate so far (the polish finishes the others).
4. **iterate** (``_sqp``): the SQP method below.
5. **certify** (``_certify``): every candidate, with the original model (section Certification).
6. **polish** (piecewise-linear models only, ``_polish_regions``; section The region polish): the closest feasible
   candidate of each point — certified or not, or the closest segment crossing — is moved to the exact closest flip
   point of its activation region, and certified by that region's weak-duality bound.
7. **categories** (``_round_groups``, ``_start_from_valid_crossings``): with one-hot ``groups`` the blocks are
   relaxed to [0, 1] for steps 1-6, then rounded, fixed and re-solved; the upper bound of step 3 then comes only
   from crossings with valid categories (segments with a category assignment fixed), the closest of which starts
   one more solve.
8. **choose** (``_choose``): per point the closest certified candidate. It is reported converged only if its distance
   is at most 1.01 x the point's upper bound; otherwise the point is reported failed (the crossing itself is not
   a certified closest point and is never returned in its place).

The SQP iteration
-----------------
A batched SQP (sequential quadratic programming) method with a scalar-secant Hessian model, globalised by an l1
merit line search:

1. **evaluate** (``_evaluate``): at the iterate ``x_k`` the scores and, by autograd, the gradients of the equality
   constraint and of the ``max_ineq`` most nearly active other-class constraints (one backward pass per constraint
   *slot*, for the whole batch at once; loops run over slots and iterations, never over points).
2. **QP step** (``_secant_scale``, ``_linearise``, ``_qp_step``, ``_dual_qp``) with Hessian ``gamma * D^2``: the
   point closest (scaled norm) to the anchor ``x_k + (x_hat - x_k) / gamma`` that satisfies the linearised
   constraints inside the box. ``gamma`` is a per-point Barzilai-Borwein secant estimate of the Lagrangian's
   curvature along the last step (``gamma = 1`` is the plain "project onto the linearised boundary" iteration, which
   converges only linearly on curved boundaries), with Powell-style damping. The QP's dual is a concave,
   piecewise-quadratic problem in ``m <= 1 + max_ineq`` multipliers per point, because for fixed multipliers ``lam``
   the primal minimiser is explicit, ``x(lam) = clip(anchor - D^-2 A^T lam, lower, upper)``; it is maximised by
   projected semismooth Newton on batched ``(P, m, m)`` systems. A tiny quadratic elastic term keeps it well posed
   when the linearisation is infeasible (the step then minimises the violation).
3. **line search** (``_merit_penalty``, ``_line_search_step``) on ``phi = 1/2 ||D(x - x_hat)||^2 + mu * (|g| + sum_k
   max(0, h_k))`` with a per-point penalty ``mu`` (kept above twice the multipliers, allowed to halve per step):
   full step, then a second-order correction (one more QP with the constraints re-evaluated at the trial point — no
   new gradients), then backtracking.
4. **freeze** (``_converged_now``, ``_drop_hopeless``): points freeze as soon as they pass the convergence test;
   points whose constraint violation does not fall by 10 % in 25 iterations (e.g. a target class that can never win)
   stop as "no progress".

Nonsmooth (ReLU) models are detected (:func:`flipfrag.smooth.has_relu`): the secant is off (each linear piece has no
curvature) and a *kink row* (``_probe_kinks``, ``_with_kink_row``) — the linearisation of ``g`` from just beyond a
kink of the boundary — lets the QP move along the ridge where two linear pieces meet, where closest points of
piecewise-linear boundaries often lie.

Certification
-------------
After solving, every point is re-evaluated with the *original* model in its own dtype at the returned ``x_flip``:

* ``residual = |z_s - z_t|`` must be ``<= tol * max(1, |z_s|, |z_t|)`` (a relative tolerance, spec section 3.3);
* ``margin = min_k (z_t - z_k)`` over the other classes must be ``>= margin_param - tol * max(1, |z_s|, |z_t|)``
  (the same tolerance: at a point where three scores meet, ``margin = 0`` holds only up to rounding);
* ``bound_violation = max(lower - x, x - upper, 0)`` (and masked features moved) must be exactly 0;
* ``kkt`` — the first-order optimality measure — must be ``<= kkt_tol + eps * ||D x|| / ||D (x - x_hat)||``. It is
  the norm of the projected gradient of the Lagrangian ``D^2 (x - x_hat) + A^T lam`` (multipliers fitted by least
  squares on the free coordinates, with ``lam_k >= 0`` for the active inequalities; at a bound only the component
  pushing out of the box counts), measured in the scaled norm and divided by ``||D (x - x_hat)||``. ``eps`` is the
  machine epsilon of the coarser of x's and the model's dtype: the change of ``D^2 (x - x_hat)`` that rounding
  ``x_flip`` to that dtype alone causes (it matters only for float32 points very close to ``x_hat``). For a single
  active constraint and no active bounds ``kkt`` is ``tan`` of the angle between ``x - x_hat`` and the constraint
  normal.
* **piecewise-linear models** (ReLU, max-pooling; ``nonsmooth``): a feasible point that fails the plain test is
  re-measured on its *activation region* (``_region_kkt``). Every ReLU input within ``1e-6`` x its layer's largest
  |value| of 0, and every 2-D max-pooling window whose two largest inputs are that close, is a *kink* at x; its sign
  condition (``u_j >= 0`` for an active unit, ``u_j <= 0`` for an inactive one — torch's relu'(0) = 0 —, ``u_a >= u_b``
  for the pooling winner a) is one more inequality constraint, with a multiplier ``>= 0``, at most 64 per point.
  On the closure of that region the scores are affine, so the restricted problem is a convex QP and its KKT
  conditions are sufficient: **a certified point of a piecewise-linear model is the closest flip point within the
  closure of the linear region autograd differentiates at x_flip** (up to ``kkt_tol``; kinks farther than the
  tolerance from 0 are treated as strict). It is a local minimiser when the point lies inside that region's interior
  (no kinks), and otherwise optimal on one of the regions meeting at x_flip — not a proof for the others. This
  holds for nets whose only nonlinearities are ReLU and 2-D max-pooling; with other nonlinearities as well (e.g. a
  smooth activation beside the ReLUs) it is a KKT point of the problem on that region, not its minimiser. Kinks of
  other operations are not represented, which can only make the test stricter (fewer multipliers to balance).
  Where that KKT test still fails (a CNN's region optimum typically lies on hundreds of facets, few of them within
  the tolerance), the **region gap** decides (``_region_gap``, ``FlipResult.region_gap``): the linearisations at
  x of the equality, the other classes and the kinks are exact on the region's closure, so by weak duality any of
  the QP's multipliers (``lam >= 0`` on the inequalities) give a lower bound LB on the distance of every flip point
  of that closure; the point is certified when ``distance <= (1 + 100 kkt_tol) LB`` (at most 1 %; 1 % at the
  default ``kkt_tol``): **within 1 % of the closest flip point of its activation region**.
* **polished points** (step 6) carry the bound of the region the polish solved in: their ``region_gap`` is
  ``distance / LB - 1`` with LB from that region's QP multipliers, counted only if the returned point (in the output
  dtype) lies in that region's closure (every sign constraint of the frozen pattern within the kink tolerance
  above). **What a certified point of a ReLU / max-pooling CNN guarantees**: it is a flip point of the original
  model (residual, margin, bounds as above) and its distance is within 1 % (``100 kkt_tol``, at most 1 %) of the
  closest flip point over the closure of one linear region containing it — the one reported, in which the network
  is affine and the problem convex. The bound is computed in the solve dtype (float64) with the rows of the frozen
  model; the feasibility tests use the original model in its dtype. Other regions (and so the global optimum of the
  non-convex problem) are not covered; the segment-crossing test (step 7) still applies.

The region polish
-----------------
For a piecewise-linear model (``_region_polish``), the activation pattern at the start x0 — every ReLU on or off
(torch's relu'(0) = 0), every max-pooling window's winner — is frozen (``_FrozenPattern``): the network is then an
affine map that equals the model on the closure of x0's region, and the problem restricted to that closure is the
convex QP ``min 1/2 ||D(x - x_hat)||^2`` s.t. ``z_s = z_t``, ``z_k <= z_t - margin``, the box and the region's sign
constraints (``u_j >= 0`` on, ``u_j <= 0`` off, ``u_a >= u_b`` for a window's winner a) — about 2 x 10^5 of them
for the CIFAR-10 CNN. It is solved by cutting planes: solve the QP (``_dual_qp``) on the rows so far; evaluate all
sign constraints at its solution y with one frozen forward pass; step from x toward y as far as the region allows
(an exact ratio test: every constraint is affine, so the step keeps a flip point of the region and, by convexity,
never increases the distance — never above the start, hence never above the upper bound); add the 64 most violated
constraints (rows by batched backward passes through the frozen net, ``_sign_rows``) and repeat, at most 8 rounds,
until y lies in the region (x = y is the region's optimum) or the gap is below 0.8 %. The QP on fewer rows is a
relaxation, so its multipliers give the lower bound LB on every flip point of the region's closure
(``_exact_region_bound``: the Lagrangian of the frozen model itself, one backward and one forward pass in the solve
dtype — exact to its rounding although the rows are computed in the model's dtype when that is float32, ~3x
cheaper, and only steer the QP). Points left without any feasible candidate first continue their SQP to 200
iterations and solve the next two screened targets (``_continue_infeasible``). Models with a ReLU or pooling call
the pattern cannot represent (pooling with padding or dilation, tensors without one row per point) are not
polished. Known limits: beyond about 250 sign rows the dual QP's semismooth Newton loses accuracy (its solution
violates rows it holds by ~1e-3); and on some points the ratio test stays blocked at the start (each QP solution
leaves the region through a facet the point lies on), so x does not move while LB converges — the point stays
uncertified: 1 of the first 64 test digits of the shipped MNIST CNN (gap 3.6 %; an exact dual, by L-BFGS-B, and 16
rounds did not change it), none of the 20 CIFAR-10 photos.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from flipfrag.smooth import (
    RELU_FUNCS,
    erf_layers,
    erf_sigmas,
    has_relu,
    maxpool_as_logsumexp,
    relu_as_softplus,
    set_erf_sigmas,
)

__all__ = ["FlipResult", "closest_flip_point", "erf_homotopy_sigmas"]

# status codes of the iterative solver (before certification)
_RUNNING, _CONVERGED, _MAX_ITER, _STALLED, _NO_PROGRESS = 0, 1, 2, 3, 4
_SOLVER_STATUS = {_RUNNING: "running", _CONVERGED: "converged", _MAX_ITER: "max_iter", _STALLED: "line search failed",
                  _NO_PROGRESS: "no progress toward feasibility"}
_TINY = 1e-30  # a floor for norms before dividing (representable in float32)
_DUAL_EPS = 1e-14  # quadratic elastic penalty of the QP subproblem (normalised units; 1e-6 in float32)
_KINK_TOL = 1e-6  # a ReLU input / max-pool gap within 1e-6 x its layer's largest |value| is a kink at x
_REGION_GAP = 0.01  # piecewise-linear models: within 1 % of the closest flip point of the activation region
_MAX_KINKS = 64  # region constraints the certificate represents per point (more: not certified)
_PROGRESS_WINDOW = 25  # iterations over which an infeasible point must reduce its constraint violation by 10 %
# start ids of the solves seeded by segment crossings (FlipResult.start); 0, 1, 2.. are direct, homotopy, restarts
_START_DEEPFOOL, _START_CANDIDATES, _START_ITERATES = 100, 101, 102
_START_REGION = 103  # the region polish of a piecewise-linear model's closest feasible candidate
_NONSMOOTH_MAX_ITER = 20  # default SQP iterations of a piecewise-linear model (the region polish finishes)
_POLISH_ROUNDS, _POLISH_ADD, _POLISH_GAP = 8, 64, 0.008  # region polish: cutting-plane rounds, rows per round, stop gap
_BOUND_SLACK = 0.01  # a certified point may be at most 1 % farther than the closest boundary crossing found


@dataclass
class FlipResult:
    """Closest flip points of a batch of N inputs, with a per-point certificate.

    Attributes
    ----------
    x_flip : Tensor (N, *shape)
        The certified flip point; NaN where ``converged`` is False (never a silently wrong point).
    x_attempt : Tensor (N, *shape)
        The solver's last iterate for every point (equal to ``x_flip`` where converged) — for diagnosis.
    distance : Tensor (N,)
        ``||scale * (x_flip - x)||_2`` (input units times scale); NaN where not converged.
    source, target : LongTensor (N,)
        The classes whose scores are equal at ``x_flip``. With ``target=None``, ``target`` is the class of the
        closest certified flip point (for a point with none: the runner-up class at ``x``, whose attempt is shown).
    residual : Tensor (N,)
        ``|z_source - z_target|`` at ``x_attempt``, recomputed with the original model in its dtype.
    margin : Tensor (N,)
        ``min_k (z_target - z_k)`` over the other classes at ``x_attempt`` (``+inf`` for two classes).
    bound_violation : Tensor (N,)
        ``max(lower - x, x - upper, |x - x_hat| on masked features, 0)`` at ``x_attempt``.
    kkt : Tensor (N,)
        First-order optimality measure (module docstring); 0 when ``x`` itself is a flip point. For piecewise-linear
        models, the measure on the point's activation region (kinks as constraints) where the plain one fails.
    iterations : LongTensor (N,)
        SQP iterations used by the returned candidate (summed over homotopy steps for the homotopy candidate).
    converged : BoolTensor (N,)
        True only if residual, margin, bounds and KKT all meet their tolerances.
    status : list of str (N,)
        ``"converged"`` or why not, e.g. ``"residual 3.1e-02 > 1.0e-06 (solver: max_iter)"``.
    start : LongTensor (N,)
        Which candidate won: 0 = direct solve from ``x``, 1 = homotopy path, 2.. = random restarts, 100 / 101 / 102 =
        solves from the segment crossings toward the DeepFool-style point / ``candidates`` / the solver's iterates,
        103 = the region polish (piecewise-linear models); -1 if none was certified.
    distances : Tensor (N, C) or None
        With ``target=None``: the certified distance toward every class, ``inf`` where that solve failed and in
        the source column. None when ``target`` was given.
    scores : Tensor (N, C)
        Model scores at ``x_attempt`` (original model and dtype).
    rounding_changed : BoolTensor (N,) or None
        With ``groups``: True where rounding the relaxed one-hot blocks to valid categories moved the point.
    tol, kkt_tol, margin_param : float
        The tolerances and the margin used.
    upper_bound : Tensor (N,) or None
        The distance of the closest boundary point found by segment crossings toward label-changing points (the
        DeepFool-style steps, ``candidates``, the solver's own iterates): an upper bound on the closest flip
        point's distance; ``inf`` where none was found. ``converged`` requires ``distance <= 1.01 * upper_bound``.
        With ``groups`` only crossings with valid categories count (the relaxed problem's have fractional ones):
        segments that keep a category assignment fixed — x's own, the rounded relaxed solution's, and x's with
        one block changed to each of its other categories — and move the other features.
    region_gap : Tensor (N,) or None
        Piecewise-linear models: ``distance / LB - 1`` with LB a lower bound (weak duality) on the distance of every
        flip point in the closure of the activation region at ``x_attempt`` — for a polished point (``start`` 103)
        the region the polish solved in (module docstring); NaN where it was not needed (the plain or region KKT
        test passed) or not measured (infeasible attempts). None for smooth models.
    grad_status : list of str (N,) or None
        With ``differentiable=True``: ``"ok"`` where ``x_flip`` has a derivative, else why not (NaN gradient there;
        :mod:`flipfrag.flipgrad`). None otherwise.
    """

    x_flip: torch.Tensor
    x_attempt: torch.Tensor
    distance: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    residual: torch.Tensor
    margin: torch.Tensor
    bound_violation: torch.Tensor
    kkt: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    status: list[str]
    start: torch.Tensor
    scores: torch.Tensor
    distances: torch.Tensor | None = None
    rounding_changed: torch.Tensor | None = None
    tol: float = 1e-6
    kkt_tol: float = 1e-4
    margin_param: float = 0.0
    upper_bound: torch.Tensor | None = None
    region_gap: torch.Tensor | None = None
    grad_status: list[str] | None = None

    def __len__(self) -> int:
        return int(self.distance.shape[0])

    @property
    def success_rate(self) -> float:
        """Fraction of points with a certified flip point."""
        return float(self.converged.float().mean())


# ------------------------------------------------------------------------------------------------- problem data


@dataclass
class _Problems:
    """P flattened single-target problems, all tensors in the working dtype, shape (P, n) or (P,)."""

    xh: torch.Tensor  # the input x_hat
    lo: torch.Tensor  # lower bounds; == hi on fixed (masked) coordinates
    hi: torch.Tensor
    w: torch.Tensor  # scale**2, the diagonal of the objective's Hessian
    src: torch.Tensor
    tgt: torch.Tensor
    offset: torch.Tensor | None = None  # (P, C) added to the scores (homotopy's output-bias shift)

    def __len__(self) -> int:
        return self.xh.shape[0]

    def take(self, idx: torch.Tensor) -> _Problems:
        return _Problems(
            self.xh[idx], self.lo[idx], self.hi[idx], self.w[idx], self.src[idx], self.tgt[idx],
            None if self.offset is None else self.offset[idx],
        )

    def repeat(self, r: int) -> _Problems:
        def rep(t):
            return None if t is None else t.repeat(r, *([1] * (t.dim() - 1)))

        return _Problems(*(rep(t) for t in (self.xh, self.lo, self.hi, self.w, self.src, self.tgt, self.offset)))

    def with_offset(self, offset: torch.Tensor | None) -> _Problems:
        return _Problems(self.xh, self.lo, self.hi, self.w, self.src, self.tgt, offset)

    @property
    def fixed(self) -> torch.Tensor:
        return self.lo == self.hi


ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # (P, n) flat inputs -> (P, C) scores


def _constraint_values(z: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, margin: float):
    """g = z_s - z_t (P,), h = z_k - z_t + margin for the other classes (P, C) with -inf at s and t."""
    zs = z.gather(1, src[:, None])[:, 0]
    zt = z.gather(1, tgt[:, None])[:, 0]
    h = z - zt[:, None] + margin
    other = torch.ones_like(z, dtype=torch.bool)
    other.scatter_(1, src[:, None], False)
    other.scatter_(1, tgt[:, None], False)
    h = torch.where(other, h, torch.full_like(h, -math.inf))
    return zs - zt, h, zs, zt


def _violation(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """l1 constraint violation |g| + sum_k max(0, h_k) (P,)."""
    return g.abs() + h.clamp(min=0).nan_to_num(posinf=math.inf).sum(1)


def _tol_abs(zs: torch.Tensor, zt: torch.Tensor, tol: float) -> torch.Tensor:
    return tol * torch.maximum(torch.ones_like(zs), torch.maximum(zs.abs(), zt.abs()))


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
        rows = torch.zeros(P, m, C, dtype=z.dtype)
        rows.scatter_(2, src[:, None, None].expand(P, 1, 1), 1.0)
        rows[:, :, :].scatter_add_(2, tgt[:, None, None].expand(P, m, 1), -torch.ones(P, m, 1, dtype=z.dtype))
        c = torch.zeros(P, m, dtype=z.dtype)
        c[:, 0] = g
        valid = torch.ones(P, m, dtype=torch.bool)
        cls = torch.full((P, m), -1, dtype=torch.long)  # class of each slot; -1 = the equality
        if n_ineq:
            hv, kk = h.topk(n_ineq, dim=1)
            rows[:, 1:, :].scatter_add_(2, kk[:, :, None], torch.ones(P, n_ineq, 1, dtype=z.dtype))
            valid[:, 1:] = torch.isfinite(hv)
            c[:, 1:] = torch.where(valid[:, 1:], hv, torch.zeros_like(hv))
            cls[:, 1:] = kk
        A = torch.empty(P, m, x.shape[1], dtype=z.dtype)
        for j in range(m):
            (A[:, j],) = torch.autograd.grad(z, x, rows[:, j], retain_graph=j < m - 1)
    A = A * valid[:, :, None]
    return z.detach(), g, h, zs, zt, A, c, valid, cls


# ------------------------------------------------------------------------------------------------- the QP step


def _dual_eps(dtype: torch.dtype) -> float:
    return _DUAL_EPS if dtype == torch.float64 else 1e-6


def _dual_qp(pr: _Problems, A: torch.Tensor, b: torch.Tensor, is_eq: torch.Tensor, rho: torch.Tensor,
             lam0: torch.Tensor | None = None, iters: int = 15,
             anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    computed on. Returns (x, lam) of shapes (P, n), (P, m).
    """
    P, m, n = A.shape
    xh = pr.xh if anchor is None else anchor
    rho = rho[:, None].expand(P, m) if rho.dim() == 1 else rho
    L = torch.where(is_eq, -rho, torch.zeros_like(b))
    U = rho
    lam = torch.zeros(P, m, dtype=A.dtype) if lam0 is None else lam0.clamp(L, U)
    # A x - b is computed with cancellation: ask for a small multiple of its rounding level, no more
    rel = 1e-12 if A.dtype == torch.float64 else 1e-5
    tol = rel * (1.0 + b.abs().amax(1) + torch.sqrt((pr.w * xh**2).sum(1)))
    eps_final = _dual_eps(A.dtype)
    eps1 = max(eps_final, 1e-8)
    qp = _DualQP(A, b, xh, pr.w, pr.lo, pr.hi, L, U)
    lam, x = qp.solve(lam, torch.ones(P, dtype=torch.bool), eps1, tol, iters)
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

    def __init__(self, A, b, xh, w, lo, hi, L, U):
        self.A, self.b, self.xh, self.w, self.lo, self.hi, self.L, self.U = A, b, xh, w, lo, hi, L, U

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
            state = self.evaluate(torch.arange(P), lam, eps)
        else:  # only the problems to re-solve are evaluated; the others keep their previous primal point
            w_idx = torch.nonzero(which)[:, 0]
            sub = self.evaluate(w_idx, lam[w_idx], eps)
            state = [torch.zeros((P, *t.shape[1:]), dtype=t.dtype) for t in sub]
            state[1] = x_prev.clone()
            for t, v in zip(state, sub):
                t[w_idx] = v
        active = which & (state[6] > tol)
        eye = torch.eye(m, dtype=lam.dtype)
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
            d = _batched_solve(H, pg)
            step = torch.ones(len(idx), dtype=lam.dtype)
            todo = torch.ones(len(idx), dtype=torch.bool)
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


# ------------------------------------------------------------------------------------------------- certificate


def _kkt_measure(pr: _Problems, x, A, c, valid, is_eq, tol_abs, bundle: torch.Tensor | None = None) -> torch.Tensor:
    """Relative projected-gradient norm of the Lagrangian at x (see the module docstring). Shape (P,).

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
            G = G + torch.diag_embed((~use).to(A.dtype)) + reg[:, None, None] * torch.eye(M, dtype=A.dtype)
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
        rn = torch.full((P,), math.inf, dtype=A.dtype)
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
            gen = torch.Generator().manual_seed(0)
            step = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype)
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
        count = sum((m.sum(1) for m in sel), torch.zeros(P, dtype=torch.long))
        K = int(min(count.max(), max_kinks)) if len(sel) else 0
        rows = torch.zeros(P, K, n, dtype=x.dtype)
        if K == 0:
            return rows, torch.zeros(P, 0, dtype=torch.bool), count, not rec.unsupported
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
    used = torch.arange(K)[None, :] < count[:, None]
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
    c2 = torch.cat([c, torch.zeros(P, K, dtype=c.dtype)], 1)
    v2 = torch.cat([valid, used], 1)
    e2 = torch.cat([is_eq, torch.zeros(P, K, dtype=torch.bool)], 1)
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
    _, lam = _dual_qp(pr, An, b, is_eq, torch.full((P,), math.inf, dtype=x.dtype), iters=50)
    lam = torch.where(is_eq, lam, lam.clamp(min=0)) * ok
    y = torch.minimum(torch.maximum(pr.xh - torch.bmm(lam[:, None, :], An)[:, 0] / pr.w, pr.lo), pr.hi)
    q = 0.5 * (pr.w * (y - pr.xh) ** 2).sum(1) + (lam * (torch.einsum("pmn,pn->pm", An, y) - b)).sum(1)
    lb = torch.sqrt(2 * q.clamp(min=0))
    d = torch.sqrt((pr.w * (x - pr.xh) ** 2).sum(1))
    gap = d / lb.clamp(min=_TINY) - 1
    return torch.where(d > 0, gap.clamp(min=0), torch.zeros_like(gap))


def _check(fn: ScoreFn, pr: _Problems, x: torch.Tensor, margin: float, tol: float, n_ineq: int,
           kkt_tol: float = 0.0, region: bool = False):
    """Recompute scores, residual, margin, bound violation and KKT at x. Returns a dict of (P,) tensors.

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
    kinks = torch.zeros(len(x), dtype=torch.long)
    gap = torch.full_like(kkt, math.nan)
    if region:
        near = (g.abs() <= tol_abs) & (marg >= margin - tol_abs) & (kkt > kkt_tol)
        if near.any():
            i = torch.nonzero(near)[:, 0]
            kr, kinks[i], gap[i] = _region_kkt(fn, pr.take(i), x[i], A[i], c[i], valid[i], is_eq[i], tol_abs[i],
                                               _KINK_TOL)
            kkt[i] = torch.minimum(kkt[i], kr)
    bv = torch.maximum(pr.lo - x, x - pr.hi).clamp(min=0).amax(1)
    return {"z": z, "residual": g.abs(), "margin": marg, "bound_violation": bv, "kkt": kkt, "tol_abs": tol_abs,
            "kinks": kinks, "gap": gap}


def _region_gap_tol(kkt_tol: float) -> float:
    """The activation-region optimality gap a piecewise-linear point may have: 100 x kkt_tol, at most 1 %."""
    return min(_REGION_GAP, 100 * kkt_tol)


def _certified(chk: dict, margin: float, kkt_tol: float) -> torch.Tensor:
    finite = torch.isfinite(chk["z"]).all(1)
    return (
        finite
        & (chk["residual"] <= chk["tol_abs"])
        & (chk["margin"] >= margin - chk["tol_abs"])
        & (chk["bound_violation"] == 0)
        & ((chk["kkt"] <= kkt_tol + chk.get("kkt_floor", 0.0)) | (chk["gap"] <= _region_gap_tol(kkt_tol)))
    )


# ------------------------------------------------------------------------------------------------- the SQP loop


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
    idx = torch.arange(P)
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
    alpha = torch.full((P,), 0.5, dtype=x.dtype)
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
    return {"x": st.x, "iterations": st.iters, "status": st.status}


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
        dt = x0.dtype
        kink = ([torch.zeros(P, n, dtype=dt), torch.zeros(P, n, dtype=dt), torch.zeros(P, dtype=dt),
                 torch.zeros(P, dtype=torch.bool)] if nonsmooth else [None] * 4)
        return cls(
            x=torch.minimum(torch.maximum(x0, pr.lo), pr.hi).clone(),
            iters=torch.zeros(P, dtype=torch.long),
            status=torch.full((P,), _RUNNING, dtype=torch.long),
            mu=torch.zeros(P, dtype=dt),
            lam_prev=torch.zeros(P, m, dtype=dt),
            stalls=torch.zeros(P, dtype=torch.long),
            dist_scale=1.0 + torch.sqrt((pr.w * pr.xh**2).sum(1)),
            # no box on the multipliers: the QP's quadratic elastic term (_DUAL_EPS) already bounds them
            rho=torch.full((P,), math.inf, dtype=dt),
            s_prev=torch.zeros(P, n, dtype=dt),
            lamu_prev=torch.zeros(P, m, dtype=dt),
            cls_prev=torch.full((P, m), -1, dtype=torch.long),
            as_prev=torch.zeros(P, m, dtype=dt),
            have_s=torch.zeros(P, dtype=torch.bool),
            gamma=torch.ones(P, dtype=dt),
            v_ref=torch.full((P,), math.inf, dtype=dt),
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
    b = torch.where(valid | ~is_eq | (torch.arange(b.shape[1]) == 0), b, torch.zeros_like(b))  # unused kink row
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
    k = side * len(o) + torch.arange(len(o))
    new_kink = diff.amax(0) > 1e-6
    tgt_idx = act[o[new_kink]]
    st.kink_x[tgt_idx], st.kink_a[tgt_idx], st.kink_g[tgt_idx] = probe[k][new_kink], pa[k][new_kink], pg[k][new_kink]
    st.has_kink[tgt_idx] = True


def _pad_slots(t: torch.Tensor, m: int, value: float = 0) -> torch.Tensor:
    """(P, k) slot values -> (P, m), padded with ``value``."""
    if t.shape[1] == m:
        return t
    return torch.cat([t, torch.full((t.shape[0], m - t.shape[1]), value, dtype=t.dtype)], 1)


def _offset_fn(fn: ScoreFn, offset: torch.Tensor | None) -> ScoreFn:
    if offset is None:
        return fn
    return lambda x: fn(x) + offset


# ------------------------------------------------------------------------------------------------- homotopy


def _tau_argument(tau: float) -> float:
    """p with erf'(p) = tau: the largest |u / sigma| at which an erf unit still has slope >= tau."""
    if not 0 < tau < 2 / math.sqrt(math.pi):
        raise ValueError(f"homotopy_tau must be in (0, 2/sqrt(pi)), got {tau}")
    return math.sqrt(-math.log(math.sqrt(math.pi) * tau / 2))


@torch.no_grad()
def erf_homotopy_sigmas(model: nn.Module, x: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """The starting erf scales of the homotopy: no unit of any ``Erf`` layer is flatter than ``tau`` at ``x``.

    Layer by layer (later layers see the already widened earlier ones), ``sigma_l = max(sigma_trained_l,
    max |u_l| / p)`` with ``u_l`` the layer's pre-activation over the whole batch ``x`` and ``p =
    sqrt(-ln(sqrt(pi) tau / 2))`` the argument where ``d/dv erf(v) = tau`` — the authors' ``sigma_point.m``
    ("all" variant), except that biases are included in ``u`` (the authors' code ignores them) and sigma never
    shrinks below the trained value. One sigma per layer is shared by the batch, hence the max over the batch.

    Returns a float64 tensor (L,) for the L ``Erf`` layers of ``model``.
    """
    layers = erf_layers(model)
    sig = erf_sigmas(model).clone()
    p = _tau_argument(tau)
    for i, layer in enumerate(layers):
        seen: list[float] = []

        def record(mod, args, seen=seen):
            seen.append(float(args[0].abs().max()))

        handle = layer.register_forward_pre_hook(record)
        try:
            with set_erf_sigmas(model, sig):
                model(x)
        finally:
            handle.remove()
        sig[i] = max(float(sig[i]), max(seen) / p)
    return sig


class _ReluScale(TorchFunctionMode):
    """Records max |u| of the inputs of every ReLU call (to choose the softplus beta path)."""

    def __init__(self):
        super().__init__()
        self.scales: list[float] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in RELU_FUNCS:
            self.scales.append(float(args[0].detach().abs().max()))
        return func(*args, **(kwargs or {}))


def _feasible_offset(z: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, margin: float) -> torch.Tensor:
    """Output shift (P, C) that makes the current scores a flip point: z_s, z_t -> their mean; others pushed below.

    The authors' ``trans_b`` (a minimal change of the output bias); here per problem, added to the scores.
    """
    zs = z.gather(1, src[:, None])
    zt = z.gather(1, tgt[:, None])
    mid = 0.5 * (zs + zt)
    off = (mid - margin - 1e-9 * (1 + mid.abs()) - z).clamp(max=0)
    off.scatter_(1, src[:, None], mid - zs)
    off.scatter_(1, tgt[:, None], mid - zt)
    return off


# ------------------------------------------------------------------------------------------------- cheap bounds


def _class_jacobian(fn: ScoreFn, x: torch.Tensor, C: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores z (P, C) and the Jacobian of all C scores J (P, C, n) at x (P, n): one backward pass per chunk of
    points, with every point repeated C times (row c of the copies is differentiated for class c)."""
    P, n = x.shape
    zs, Js = [], []
    eye = None
    for idx in _chunks(P, max(1, chunk // C)):
        xr = x[idx].detach().repeat_interleave(C, 0).requires_grad_(True)
        with torch.enable_grad():
            z = fn(xr)
            if eye is None or eye.dtype != z.dtype:
                eye = torch.eye(C, dtype=z.dtype)
            (J,) = torch.autograd.grad(z, xr, eye.repeat(len(idx), 1))
        zs.append(z.detach()[::C])
        Js.append(J.reshape(len(idx), C, n))
    return torch.cat(zs), torch.cat(Js)


def _linearised_distances(pr: _Problems, z: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """|z_s - z_k| / ||D^-1 grad(z_s - z_k)|| on the free coordinates for every class k (P, C); inf at k = s and
    where the gradient vanishes. The distance to the boundary toward k of the scores linearised at x."""
    zs = z.gather(1, pr.src[:, None])
    Js = J.gather(1, pr.src[:, None, None].expand(-1, 1, J.shape[2]))
    nrm = torch.sqrt((((Js - J) ** 2) * ((~pr.fixed) / pr.w)[:, None, :]).sum(2))
    d = (zs - z).abs() / nrm.clamp(min=_TINY)
    d = torch.where(nrm > 0, d, torch.full_like(d, math.inf))
    return d.scatter(1, pr.src[:, None], math.inf)


def _screen_targets(fn: ScoreFn, pr: _Problems, C: int, keep: int, chunk: int) -> torch.Tensor:
    """The ``keep`` classes with the smallest linearised distance at x_hat (one Jacobian of all classes). (P, keep)"""
    x0 = torch.minimum(torch.maximum(pr.xh, pr.lo), pr.hi)
    z, J = _class_jacobian(fn, x0, C, chunk)
    return _linearised_distances(pr, z, J).topk(keep, dim=1, largest=False).indices


def _deepfool(fn: ScoreFn, pr: _Problems, C: int, chunk: int, max_iter: int = 8,
              overshoot: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """A DeepFool-style label-changing point per problem (Moosavi-Dezfooli et al. 2016), in the scaled norm and
    inside the box: from x_hat, repeatedly step onto the linearised boundary of the class that is closest after
    linearisation, overshooting by ``overshoot``, until the predicted class is no longer the source (points
    whose lead over the runner-up shrinks by less than 10 % in a step are stopped).
    Returns (x (P, n), label_changed (P,))."""
    x = torch.minimum(torch.maximum(pr.xh, pr.lo), pr.hi).clone()
    changed = torch.zeros(len(pr), dtype=torch.bool)
    active = torch.ones(len(pr), dtype=torch.bool)
    prev_lead = torch.full((len(pr),), math.inf, dtype=x.dtype)
    free = ~pr.fixed
    for _ in range(max_iter):
        idx = torch.nonzero(active)[:, 0]
        if idx.numel() == 0:
            break
        sub = pr.take(idx)
        z, J = _class_jacobian(fn, x[idx], C, chunk)
        now = z.argmax(1) != sub.src
        changed[idx[now]] = True
        # a point whose source lead did not shrink by 10 % is stuck (at the box, or no gradient): stop it
        lead = z.gather(1, sub.src[:, None])[:, 0] - z.scatter(1, sub.src[:, None], -math.inf).amax(1)
        stuck = lead > 0.9 * prev_lead[idx]
        prev_lead[idx] = lead
        active[idx[stuck | now]] = False
        keep = ~now & ~stuck
        if not keep.any():
            break
        idx, sub, z, J = idx[keep], sub.take(keep), z[keep], J[keep]
        k = _linearised_distances(sub, z, J).argmin(1)  # (no gradient toward any class: a zero step)
        gk = z.gather(1, sub.src[:, None])[:, 0] - z.gather(1, k[:, None])[:, 0]
        a = (J.gather(1, sub.src[:, None, None].expand(-1, 1, J.shape[2]))
             - J.gather(1, k[:, None, None].expand(-1, 1, J.shape[2])))[:, 0]
        a = a * free[idx]
        nrm2 = (a * a / sub.w).sum(1).clamp(min=_TINY)
        step = ((1 + overshoot) * gk / nrm2)[:, None] * a / sub.w
        x[idx] = torch.minimum(torch.maximum(x[idx] - step, sub.lo), sub.hi)
    return x, changed


@torch.no_grad()
def _segment_crossing(fn: ScoreFn, pr: _Problems, x_end: torch.Tensor, samples: int = 8,
                      bisections: int = 30) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first point on the segment from clip(x_hat) to x_end (P, n) where the predicted class stops being the
    source: ``samples`` evenly spaced points locate the first sample with another class, bisection the crossing.

    Any such point is a flip point between the source and the class that wins just beyond it (both are the top
    scores there, to rounding), so its distance bounds the closest flip point's from above. Returns (x (P, n) — the
    side of the crossing where the other class already wins —, its class (P,), found (P,)); points whose segment
    never leaves the source class, or whose source is not the predicted class at clip(x_hat), have found False.
    """
    P, n = x_end.shape
    x0 = torch.minimum(torch.maximum(pr.xh, pr.lo), pr.hi)
    x_end = torch.minimum(torch.maximum(x_end, pr.lo), pr.hi)
    d = x_end - x0
    ts = torch.linspace(0, 1, samples + 1, dtype=x0.dtype)[1:]
    first = torch.full((P,), samples, dtype=torch.long)
    for j in range(samples):  # evaluated sample by sample: the memory of one batch
        lab = fn(x0 + ts[j] * d).argmax(1)
        first = torch.where((first == samples) & (lab != pr.src), torch.full_like(first, j), first)
    found = (first < samples) & (fn(x0).argmax(1) == pr.src)  # (a source that is not predicted at x: no bound)
    j = first.clamp(max=samples - 1)
    hi_t = ts[j]
    lo_t = torch.where(j > 0, ts[(j - 1).clamp(min=0)], torch.zeros_like(hi_t))
    for _ in range(bisections):
        mid = 0.5 * (lo_t + hi_t)
        other = fn(x0 + mid[:, None] * d).argmax(1) != pr.src
        hi_t = torch.where(other, mid, hi_t)
        lo_t = torch.where(other, lo_t, mid)
    xc = torch.minimum(torch.maximum(x0 + hi_t[:, None] * d, pr.lo), pr.hi)
    cls = fn(xc).argmax(1)
    found &= cls != pr.src
    return xc, cls, found


# ------------------------------------------------------------------------------------------------- driver


@dataclass
class _Ctx:
    work: nn.Module  # the model used for solving (maybe a float64 copy)
    orig: nn.Module  # the user's model, for certification
    shape: tuple
    dtype: torch.dtype  # solve dtype
    cert_dtype: torch.dtype  # model dtype
    out_dtype: torch.dtype  # x dtype
    margin: float
    tol: float
    kkt_tol: float
    max_iter: int
    n_ineq: int
    chunk: int
    progress: bool
    nonsmooth: bool
    seed: int


def _model_fn(model: nn.Module, shape: tuple) -> ScoreFn:
    return lambda xf: model(xf.reshape(xf.shape[0], *shape))


def _chunks(P: int, size: int):
    return [torch.arange(i, min(P, i + size)) for i in range(0, P, size)]


def _run_sqp(ctx: _Ctx, fn: ScoreFn, pr: _Problems, x0: torch.Tensor, max_iter: int, desc: str,
             nonsmooth: bool | None = None) -> dict:
    """_sqp over chunks of problems (bounded memory). Returns x (P, n), iterations (P,), status (P,)."""
    outs = []
    for idx in _chunks(len(pr), ctx.chunk):
        outs.append(_sqp(fn, pr.take(idx), x0[idx], margin=ctx.margin, tol=ctx.tol, kkt_tol=ctx.kkt_tol,
                         max_iter=max_iter, n_ineq=ctx.n_ineq, progress=ctx.progress, desc=desc,
                         nonsmooth=nonsmooth if nonsmooth is not None else ctx.nonsmooth))
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


def _homotopy(ctx: _Ctx, pr: _Problems, steps: int, tau: float) -> dict:
    """Continuation from a smooth, nearly linear deformation of the network (with an output shift that makes
    x_hat itself a flip point) to the trained network, warm-starting every step. Returns like _run_sqp."""
    model, shape = ctx.work, ctx.shape
    xh_in = pr.xh.reshape(len(pr), *shape)
    layers = erf_layers(model)
    if layers:
        sig_nn = erf_sigmas(model)
        sig_h = erf_homotopy_sigmas(model, xh_in, tau)

        def deform(i):  # i = 0 .. steps: sigma from sig_h to sig_nn, linear in i as in CFP_homo.m
            return set_erf_sigmas(model, sig_nn + (sig_h - sig_nn) * (1 - i / steps))
    else:
        with torch.no_grad(), _ReluScale() as rec:
            model(xh_in)
        if rec.scales:
            s = float(torch.tensor(rec.scales).median().clamp(min=1e-12))
            betas = [(1.0 / s) * (1e4 ** (i / max(steps - 1, 1))) for i in range(steps)]

            def deform(i):  # softplus beta from 1/s (smooth) to 1e4/s, then the ReLU net itself
                return _Smoothed(betas[i]) if i < steps else _nullcontext()
        else:  # smooth net without erf: only the output shift is continued

            def deform(i):
                return _nullcontext()

    fn = _model_fn(model, shape)
    with torch.no_grad(), deform(0):
        z0 = fn(pr.xh)
    off0 = _feasible_offset(z0, pr.src, pr.tgt, ctx.margin)
    x = pr.xh.clone()
    iters = torch.zeros(len(pr), dtype=torch.long)
    inner = max(10, ctx.max_iter // 4)
    out = None
    x_smooth = x
    for i in tqdm(range(1, steps + 1), desc="homotopy", disable=not ctx.progress, leave=False):
        sub = pr.with_offset(off0 * (1 - i / steps) if i < steps else None)
        x_smooth = x
        with deform(i):
            # the deformed nets are smooth; only the last step is on the model itself
            out = _run_sqp(ctx, fn, sub, x, ctx.max_iter if i == steps else inner, f"homotopy {i}/{steps}",
                           nonsmooth=None if i == steps else False)
        x = out["x"]
        iters += out["iterations"]
    out["iterations"] = iters
    if ctx.nonsmooth:
        # the last smooth stage is usually closer to the kinked optimum than the SQP on the kinks themselves gets:
        # project it (and the final attempt) onto the boundary exactly, keep the closest feasible
        failed = out["status"] != _CONVERGED
        if failed.any():
            i = torch.nonzero(failed)[:, 0]
            sub = pr.take(i)
            cands = [x[i], _restore_feasibility(fn, sub, x_smooth[i]), _restore_feasibility(fn, sub, x[i])]
            out["x"][i] = _closest_feasible(fn, sub, cands, ctx.margin, ctx.tol)
    return out


@torch.no_grad()
def _restore_feasibility(fn: ScoreFn, pr: _Problems, x: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Move x onto z_s = z_t exactly along the scaled steepest-descent direction of |g| (clipped to the box): a
    bracket by doubling, then bisection — robust on any continuous model, however many kinks it has. Points
    without a sign change within reach are returned unchanged. Shape (P, n)."""
    g, a = _equality_gradient(fn, x, pr.src, pr.tgt)
    u = -torch.sign(g)[:, None] * a / pr.w * (~pr.fixed)
    t0 = g.abs() / (a * u).abs().sum(1).clamp(min=_TINY)  # the Newton estimate of the root

    rows = _pair_rows(pr.src, pr.tgt, fn(x[:1]).shape[1] if len(x) else 2, x.dtype)

    def g_at(t):
        return (fn(torch.minimum(torch.maximum(x + t[:, None] * u, pr.lo), pr.hi)) * rows).sum(1)

    lo_t = torch.zeros_like(g)
    hi_t = torch.full_like(g, math.nan)
    t = 0.5 * t0
    for _ in range(40):  # bracket
        open_ = torch.isnan(hi_t)
        if not open_.any():
            break
        crossed = open_ & (torch.sign(g_at(t)) != torch.sign(g))
        hi_t = torch.where(crossed, t, hi_t)
        lo_t = torch.where(open_ & ~crossed, t, lo_t)
        t = torch.where(open_ & ~crossed, 2 * t, t)
    ok = torch.isfinite(hi_t)
    hi_t = torch.where(ok, hi_t, lo_t)
    for _ in range(iters):  # bisection on [lo_t, hi_t]
        mid = 0.5 * (lo_t + hi_t)
        same = torch.sign(g_at(mid)) == torch.sign(g)
        lo_t = torch.where(ok & same, mid, lo_t)
        hi_t = torch.where(ok & ~same, mid, hi_t)
    xr = torch.minimum(torch.maximum(x + hi_t[:, None] * u, pr.lo), pr.hi)
    return torch.where(ok[:, None], xr, x)


def _pair_rows(src: torch.Tensor, tgt: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """(P, C) rows e_s - e_t: (z * rows).sum(1) = z_s - z_t."""
    rows = torch.zeros(len(src), C, dtype=dtype)
    rows.scatter_(1, src[:, None], 1.0)
    rows.scatter_add_(1, tgt[:, None], -torch.ones_like(rows[:, :1]))
    return rows


def _closest_feasible(fn: ScoreFn, pr: _Problems, cands: list[torch.Tensor], margin: float, tol: float) -> torch.Tensor:
    """Per problem, the closest of the candidate points that is feasible (residual and margin within tolerance);
    the first candidate where none is."""
    best = cands[0].clone()
    best_f = torch.full((len(pr),), math.inf, dtype=best.dtype)
    for xc in cands:
        with torch.no_grad():
            z = fn(xc)
        g, h, zs, zt = _constraint_values(z, pr.src, pr.tgt, margin)
        ta = _tol_abs(zs, zt, tol)
        marg = (-(h - margin)).amin(1) if z.shape[1] > 2 else torch.full_like(g, math.inf)
        feas = (g.abs() <= ta) & (marg >= margin - ta) & torch.isfinite(z).all(1)
        f = torch.where(feas, ((pr.w * (xc - pr.xh) ** 2).sum(1)), torch.full_like(g, math.inf))
        better = f < best_f
        best = torch.where(better[:, None], xc, best)
        best_f = torch.minimum(best_f, f)
    return best


class _Smoothed(contextlib.ExitStack):
    """ReLU -> softplus(beta) and max-pooling -> log-sum-exp pooling(beta), together."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def __enter__(self):
        super().__enter__()
        self.enter_context(relu_as_softplus(self.beta))
        self.enter_context(maxpool_as_logsumexp(self.beta))
        return self


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _certify(ctx: _Ctx, pr: _Problems, x: torch.Tensor) -> dict:
    """Exact check with the original model in its dtype at the point returned to the user (x in out dtype)."""
    cd = ctx.cert_dtype
    prc = _Problems(pr.xh.to(cd), pr.lo.to(cd), pr.hi.to(cd), pr.w.to(cd), pr.src, pr.tgt, None)
    fn = _model_fn(ctx.orig, ctx.shape)
    outs = []
    for idx in _chunks(len(pr), ctx.chunk):
        outs.append(_check(fn, prc.take(idx), x[idx].to(cd), ctx.margin, ctx.tol, ctx.n_ineq, ctx.kkt_tol,
                           region=ctx.nonsmooth))
    chk = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    # bounds and distance in the output dtype, against the bounds as given
    xo = x.to(torch.float64)
    chk["bound_violation"] = torch.maximum(pr.lo - xo, xo - pr.hi).clamp(min=0).amax(1).to(torch.float64)
    chk["distance"] = torch.sqrt((pr.w * (xo - pr.xh) ** 2).sum(1))
    # rounding x_flip to the output (or model) dtype alone moves D^2 (x - x_hat) by up to eps * |D^2 x|: the KKT
    # measure cannot be certified below that, relative to the distance (matters in float32 at small distances)
    eps = max(torch.finfo(ctx.out_dtype).eps, torch.finfo(cd).eps)
    floor = eps * torch.sqrt((pr.w * xo**2).sum(1)) / chk["distance"].clamp(min=torch.finfo(torch.float64).tiny)
    chk["kkt_floor"] = torch.where(chk["distance"] > 0, floor, torch.zeros_like(floor))
    chk["ok"] = _certified(chk, ctx.margin, ctx.kkt_tol)
    return chk


def _to_output(ctx: _Ctx, pr: _Problems, x: torch.Tensor) -> torch.Tensor:
    """Working-dtype solution -> the user's dtype, inside the box and exact on fixed features."""
    xo = x.to(ctx.out_dtype)
    lo, hi = pr.lo.to(ctx.out_dtype), pr.hi.to(ctx.out_dtype)
    return torch.minimum(torch.maximum(xo, lo), hi)


def _finish_feasibility(ctx: _Ctx, fn: ScoreFn, pr: _Problems, out: dict) -> None:
    """An SQP stuck among kinks near the boundary (nonsmooth models): finish the feasibility exactly, in place."""
    failed = out["status"] != _CONVERGED
    if failed.any():
        i = torch.nonzero(failed)[:, 0]
        sub = pr.take(i)
        xi = out["x"][i]
        out["x"][i] = _closest_feasible(fn, sub, [xi, _restore_feasibility(fn, sub, xi)], ctx.margin, ctx.tol)


def _solve_candidates(ctx: _Ctx, pr: _Problems, *, homotopy: bool, homotopy_steps: int, homotopy_tau: float,
                      restarts: int, gen: torch.Generator) -> dict:
    """Solve every problem from every start; keep per problem the closest certified candidate.

    Returns a dict of per-problem tensors: x (out dtype), certificate fields, iterations, solver status, start.
    """
    fn = _model_fn(ctx.work, ctx.shape)
    P = len(pr)
    cands = []  # (start id, solver output)
    x0 = torch.minimum(torch.maximum(pr.xh, pr.lo), pr.hi)
    direct = _run_sqp(ctx, fn, pr, x0, ctx.max_iter, "flip points")
    if ctx.nonsmooth:
        _finish_feasibility(ctx, fn, pr, direct)
    cands.append((0, direct))
    if homotopy:
        cands.append((1, _homotopy(ctx, pr, homotopy_steps, homotopy_tau)))
    if restarts:
        # random starts around x_hat at the distance scale of the direct solution
        xd = _to_output(ctx, pr, cands[0][1]["x"])
        chk0 = _certify(ctx, pr, xd)
        d = torch.where(chk0["ok"], chk0["distance"], torch.full_like(chk0["distance"], math.nan))
        fallback = d.nanmedian() if torch.isfinite(d).any() else torch.tensor(1.0, dtype=torch.float64)
        d = torch.where(torch.isfinite(d) & (d > 0), d, fallback.clamp(min=1e-6)).to(ctx.dtype)
        free = (~pr.fixed).to(ctx.dtype)
        xs = []
        for _ in range(restarts):
            xi = torch.randn(pr.xh.shape, generator=gen, dtype=torch.float64).to(ctx.dtype) * free
            xi = xi / torch.sqrt(pr.w) / torch.sqrt((xi**2).sum(1, keepdim=True)).clamp(min=_TINY)
            rad = d * (0.5 + torch.rand(P, generator=gen, dtype=torch.float64).to(ctx.dtype))
            xs.append(torch.minimum(torch.maximum(pr.xh + rad[:, None] * xi, pr.lo), pr.hi))
        prr = pr.repeat(restarts)
        outr = _run_sqp(ctx, fn, prr, torch.cat(xs), ctx.max_iter, "restarts")
        for r in range(restarts):
            sl = slice(r * P, (r + 1) * P)
            cands.append((2 + r, {k: v[sl] for k, v in outr.items()}))
    best = None
    for start, out in cands:
        xo = _to_output(ctx, pr, out["x"])
        chk = _certify(ctx, pr, xo)
        cur = {"x": xo, **chk, "iterations": out["iterations"], "solver": out["status"],
               "start": torch.full((P,), start, dtype=torch.long)}
        if best is None:
            best = cur
            continue
        # strictly closer (beyond rounding) wins; ties keep the earlier start
        better = cur["ok"] & (~best["ok"] | (cur["distance"] < best["distance"] * (1 - 1e-6)))
        for k in best:
            v = best[k]
            best[k] = torch.where(better.reshape(-1, *([1] * (v.dim() - 1))), cur[k], v)
    return best


# ------------------------------------------------------------------------------------------------- validation


def _as_feature_tensor(name: str, v, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor | None:
    """A scalar or tensor broadcastable to x -> a tensor of x's shape (float64, or bool for masks)."""
    if v is None:
        return None
    if isinstance(v, (int, float, bool)):
        v = torch.tensor(v)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a number, got {type(v).__name__}")
    try:
        return torch.broadcast_to(v.detach().to(dtype), x.shape).clone()
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(v.shape)} does not broadcast to x of shape {tuple(x.shape)}") from err


def _check_classes(name: str, v, N: int, C: int) -> torch.Tensor | None:
    if v is None:
        return None
    if isinstance(v, int):
        v = torch.full((N,), v, dtype=torch.long)
    if not isinstance(v, torch.Tensor) or v.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                          torch.uint8):
        raise TypeError(f"{name} must be None or an integer tensor of shape ({N},)")
    if v.shape != (N,):
        raise ValueError(f"{name} must have shape ({N},), got {tuple(v.shape)}")
    v = v.long()
    if ((v < 0) | (v >= C)).any():
        raise ValueError(f"{name} has classes out of range [0, {C}): {v[(v < 0) | (v >= C)][:5].tolist()}")
    return v


def _train_mode_modules(model: nn.Module) -> list[str]:
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    return [type(m).__name__ for m in model.modules() if isinstance(m, kinds) and m.training]


def _model_dtype(model: nn.Module, fallback: torch.dtype) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return fallback


def _check_groups(groups, n: int) -> list[torch.Tensor]:
    if groups is None:
        return []
    if isinstance(groups, torch.Tensor) or not isinstance(groups, Sequence):
        raise TypeError("groups must be a list of lists of flat feature indices")
    out, seen = [], set()
    for gi, grp in enumerate(groups):
        idx = [int(i) for i in grp]
        if len(idx) < 2:
            raise ValueError(f"groups[{gi}] must list at least 2 features (a one-hot block), got {idx}")
        if any(i < 0 or i >= n for i in idx):
            raise ValueError(f"groups[{gi}] has feature indices outside [0, {n})")
        if seen & set(idx) or len(set(idx)) != len(idx):
            raise ValueError(f"groups[{gi}] overlaps another group or repeats an index")
        seen |= set(idx)
        out.append(torch.tensor(idx, dtype=torch.long))
    return out


def _one_hot_blocks(x: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Round every one-hot block of x (P, n) to its argmax category (a copy)."""
    x = x.clone()
    for gidx in groups:
        blk = x[:, gidx]
        x[:, gidx] = torch.zeros_like(blk).scatter_(1, blk.argmax(1, keepdim=True), 1.0)
    return x


# ------------------------------------------------------------------------------------------------- public API


def closest_flip_point(
    model: nn.Module,
    x: torch.Tensor,
    *,
    target: torch.Tensor | int | None = None,
    source: torch.Tensor | int | None = None,
    lower: torch.Tensor | float | None = None,
    upper: torch.Tensor | float | None = None,
    scale: torch.Tensor | float | None = None,
    mask: torch.Tensor | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    margin: float = 0.0,
    tol: float = 1e-6,
    kkt_tol: float = 1e-4,
    max_iter: int | None = None,
    max_ineq: int = 8,
    homotopy: bool = False,
    homotopy_steps: int = 10,
    homotopy_tau: float = 0.1,
    restarts: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    solve_dtype: torch.dtype = torch.float64,
    nonsmooth: bool | None = None,
    screen: int | str | None = "auto",
    candidates: torch.Tensor | None = None,
    upper_bounds: bool = True,
    progress: bool = False,
    differentiable: bool = False,
) -> FlipResult:
    """Closest flip point of every input of a batch, certified per point (see the module docstring).

    Parameters
    ----------
    model : nn.Module
        Maps (N, *shape) to (N, C) pre-softmax scores, C >= 2; any architecture (MLP, CNN, smooth or ReLU). Used
        read-only: it is never modified (a float64 copy is solved on when ``solve_dtype`` differs from its dtype).
        Dropout / BatchNorm layers must be in eval mode.
    x : Tensor (N, *shape), float32 or float64
        The inputs ``x_hat``; not modified.
    target : LongTensor (N,) or int, optional
        Class to flip to. None (default): every class other than the source; the closest certified flip point is
        returned and ``distances`` holds all of them.
    source : LongTensor (N,) or int, optional
        The class whose score is equalled. Default: the predicted class at ``x`` (argmax of the scores). Pass the
        true label to flip misclassified points from their true class, as the authors' code does.
    lower, upper : Tensor broadcastable to x, or float, optional
        Box bounds on the features (default unbounded). Inputs outside the box are allowed (the flip point is
        inside it).
    scale : Tensor broadcastable to x, or float, optional
        Positive per-feature weights D: the distance is ``||scale * (x_flip - x)||_2``. Default 1.
    mask : BoolTensor broadcastable to x, optional
        True where a feature may change; the others stay exactly at their value in ``x`` (which must lie inside
        ``[lower, upper]``).
    groups : list of lists of int, optional
        One-hot blocks of categorical features, as indices into the flattened feature vector. They are relaxed to
        continuous values in ``[0, 1]`` for the solve; afterwards each block is rounded to its argmax category,
        fixed, and the rest of the point re-solved and re-certified. A second candidate keeps the categories of
        ``x`` (rounded to one-hot) fixed; the closer certified one is returned. ``rounding_changed`` says where
        rounding moved the relaxed solution. The upper bound (``upper_bound``) then comes from flip points with
        valid categories: crossings with x's own categories, the rounded ones, and x's with any one block set to
        any of its categories fixed (the closest of them starts one more solve where it is closer), so the result
        is within 1 % of every such combination's crossing. This is a heuristic for the mixed-integer problem:
        the result is a certified flip point with valid categories, not a proven closest one over all
        combinations (two blocks changed at once are not tried).
    margin : float
        Other classes must satisfy ``z_k <= z_target - margin``. 0 (default) is the definition of a flip point;
        ``0.2 / C`` reproduces the authors' code.
    tol : float
        Relative residual tolerance: converged needs ``|z_s - z_t| <= tol * max(1, |z_s|, |z_t|)`` and
        ``margin >= margin_param - tol * max(1, |z_s|, |z_t|)``. For a float32 model the scores themselves carry
        rounding errors of about ``1e-7 * |z|`` times the depth, so a deep float32 model may need ``tol = 1e-5``.
    kkt_tol : float
        Tolerance on the relative first-order optimality measure ``kkt``. ``math.inf`` certifies feasibility only.
    max_iter : int, optional
        SQP iterations per start (the homotopy's intermediate steps use ``max(10, max_iter // 4)`` each). Default
        200; 20 for piecewise-linear models (``nonsmooth``), whose SQP only has to reach the activation region that
        the region polish then solves exactly (module docstring, step 7).
    max_ineq : int
        How many of the other classes (the most nearly active) are linearised per iteration; the rest are still
        checked by the line search and the certificate.
    homotopy : bool
        Add the homotopy candidate: the network is deformed to a smooth, nearly linear one — erf scales widened
        (:func:`erf_homotopy_sigmas`) for nets with :class:`flipfrag.smooth.Erf` layers, ReLU replaced by
        softplus(beta) with beta growing geometrically from ``1/s`` to ``1e4/s`` (s = median pre-activation scale)
        for ReLU nets — and the scores shifted so that ``x`` itself is a flip point; the deformation and shift are
        undone linearly over ``homotopy_steps`` steps, each solve warm-started from the previous one. The erf
        scales are shared by the batch (max over the batch). Nets with neither: only the shift is continued.
    homotopy_steps : int
        Number of continuation steps (default 10, as recommended in the spec; the authors' code has no default).
    homotopy_tau : float
        Minimum erf slope at ``x`` that fixes the widest sigma (default 0.1, spec section 3.2).
    restarts : int
        Extra random starts around ``x`` (at 0.5-1.5 times the direct solution's distance, random directions in
        the scaled norm, seeded by ``seed``); the closest certified candidate wins.
    seed : int
        Seed of the restarts' ``torch.Generator`` (no global RNG is touched).
    batch_size : int, optional
        Problems solved together per chunk (memory bound). Default: about 2**24 / (constraints * features).
    solve_dtype : torch.dtype
        Working precision of the solver (default float64). Certification always uses the model's own dtype.
    nonsmooth : bool, optional
        Whether the scores are only piecewise smooth (ReLU, max-pooling). Default: True if the model makes a ReLU
        call (:func:`flipfrag.smooth.has_relu`). At a kink of the decision boundary — where the closest point of a
        ReLU net often lies — the autograd gradient is one-sided and the plain KKT measure fails; for nonsmooth
        models a feasible point failing it is re-measured on its activation region, the kinks within tolerance
        being sign-constrained constraints, and each point's closest feasible candidate is polished to the exact
        closest flip point of its activation region (module docstring: The region polish; Certification: what a
        certified point then guarantees). Also sets the defaults of ``max_iter`` and ``screen``.
    screen : int, "auto" or None
        With ``target=None``: solve only the ``screen`` targets of smallest linearised distance
        ``|z_s - z_t| / ||D^-1 grad(z_s - z_t)||`` at ``x`` (one Jacobian of all classes), plus the classes that
        the segment crossings reach. ``None``: every class (``distances`` is then filled for all of them; with
        screening it is ``inf`` for the targets not solved).
        ``"auto"`` (default): 3, or 1 for piecewise-linear models (``nonsmooth``: their crossings and region
        polish cost more per target; a class that a segment crossing reaches first is still added).
    candidates : Tensor of x's shape, optional
        Label-changing points from elsewhere (e.g. FAB's or DeepFool's adversarial points). The first boundary
        crossing on the segment from ``x`` to each is a flip point, used as a start, and it bounds the distance
        (``upper_bound``). Entries whose segment never leaves the source class are ignored.
    upper_bounds : bool
        Also start from the segment crossings toward a DeepFool-style label-changing point (``target=None``) and
        toward the solver's own last iterates (default True); see ``upper_bound``.
    progress : bool
        Show tqdm bars.
    differentiable : bool
        Return an ``x_flip`` that carries gradients with respect to ``x`` and the model's parameters that require
        grad, by the implicit function theorem at the certified KKT point (:mod:`flipfrag.flipgrad`); points
        without a derivative (degenerate active set, not certified) get NaN gradients and say why in
        ``grad_status``.

    Returns
    -------
    FlipResult
        See :class:`FlipResult`. ``x_flip`` has x's dtype and shape.

    Notes
    -----
    * Failed points keep their diagnostics (``residual``, ``margin``, ``kkt``, ``status``, ``x_attempt``); raising
      ``max_iter``, adding ``restarts`` or ``homotopy=True`` are the remedies to try.
    * ReLU networks with many small linear pieces (e.g. CNNs with max-pooling) have their closest flip point at a kink,
      where the plain KKT test fails: for them the closest feasible candidate is polished on its activation region
      and certified there (module docstring, The region polish) — the shipped MNIST CNN (8 of 8 test digits) and the
      pretrained CIFAR-10 CNN (20 of 20 shipped photos, about 4 s per photo on one thread) are certified with the
      defaults. ``kkt_tol=math.inf`` accepts any flip point as certified (not a certified *closest* one).
    * On models without convolutions the solve runs on one intra-op torch thread (restored afterwards): its many
      small operations gain nothing from more, and lose much when the cores are shared.
    * Screening (``screen``) and the segment-crossing bounds are heuristics for the non-convex global problem: the
      result is certified locally optimal and no farther than 1.01 x every crossing found, not globally closest.

    Raises
    ------
    TypeError, ValueError
        On bad input, naming the argument (NaN/inf in x, shape not matching the model, lower > upper, target out
        of range or equal to the source class, empty batch, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must be a batch of shape (N, *shape), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (N = 0)")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    busy = _train_mode_modules(model)
    if busy:
        raise ValueError(f"model has {sorted(set(busy))} layers in train mode; call model.eval() first")
    for name, val, lo_ok in (("tol", tol, 0), ("kkt_tol", kkt_tol, 0)):
        if not (isinstance(val, (int, float)) and val > lo_ok):
            raise ValueError(f"{name} must be a number > 0, got {val!r}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    iters_given = 1 if max_iter is None else max_iter
    for name, val, least in (("max_iter", iters_given, 1), ("homotopy_steps", homotopy_steps, 1),
                             ("restarts", restarts, 0), ("max_ineq", max_ineq, 0)):
        if not isinstance(val, int) or isinstance(val, bool) or val < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {val!r}")
    if homotopy:
        _tau_argument(homotopy_tau)  # raises naming homotopy_tau
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    if solve_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"solve_dtype must be torch.float32 or torch.float64, got {solve_dtype}")
    if screen is not None and screen != "auto" and (not isinstance(screen, int) or isinstance(screen, bool)
                                                    or screen < 1):
        raise ValueError(f"screen must be None, 'auto' or an integer >= 1, got {screen!r}")

    N, shape = x.shape[0], tuple(x.shape[1:])
    n = math.prod(shape)
    cert_dtype = _model_dtype(model, x.dtype)
    x_in = x.detach()
    with torch.no_grad():
        try:
            z = model(x_in.to(cert_dtype))
        except Exception as err:  # the model's own error, re-raised naming the argument
            raise ValueError(f"x of shape {tuple(x.shape)} does not fit the model: {err}") from err
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != N or z.shape[1] < 2:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"model must map x of shape {tuple(x.shape)} to scores (N={N}, C>=2), got {got}")
    if not torch.isfinite(z).all():
        raise ValueError("model returns NaN/inf scores at x")
    C = z.shape[1]
    src = _check_classes("source", source, N, C)
    src = z.argmax(1) if src is None else src
    tgt = _check_classes("target", target, N, C)
    if tgt is not None and (tgt == src).any():
        bad = torch.nonzero(tgt == src)[:5, 0].tolist()
        raise ValueError(f"target equals the source (predicted) class at points {bad}")

    if not isinstance(differentiable, bool):  # before any solving
        raise TypeError(f"differentiable must be a bool, got {type(differentiable).__name__}")
    lo = _as_feature_tensor("lower", lower, x_in)
    hi = _as_feature_tensor("upper", upper, x_in)
    lo = torch.full(x.shape, -math.inf, dtype=torch.float64) if lo is None else lo
    hi = torch.full(x.shape, math.inf, dtype=torch.float64) if hi is None else hi
    if torch.isnan(lo).any() or torch.isnan(hi).any():
        raise ValueError("lower/upper contain NaN")
    if (lo > hi).any():
        raise ValueError("lower > upper for some features")
    w = _as_feature_tensor("scale", scale, x_in)
    if w is not None and not (torch.isfinite(w).all() and (w > 0).all()):
        raise ValueError("scale must be finite and > 0 everywhere")
    w = torch.ones(x.shape, dtype=torch.float64) if w is None else w**2
    free = _as_feature_tensor("mask", mask, x_in, dtype=torch.bool)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    xh = x_in.to(torch.float64)
    if free is not None:
        fixed = ~free
        if ((xh < lo) | (xh > hi))[fixed].any():
            raise ValueError("mask: features fixed by the mask lie outside [lower, upper] in x")
        lo = torch.where(fixed, xh, lo)
        hi = torch.where(fixed, xh, hi)
    lo, hi, w, xh = (t.reshape(N, n) for t in (lo, hi, w, xh))
    grp = _check_groups(groups, n)
    for gidx in grp:  # the relaxation: a one-hot entry lives in [0, 1]
        movable = lo[:, gidx] < hi[:, gidx]
        lo[:, gidx] = torch.where(movable, lo[:, gidx].clamp(min=0.0), lo[:, gidx])
        hi[:, gidx] = torch.where(movable, hi[:, gidx].clamp(max=1.0), hi[:, gidx])
        if (lo[:, gidx] > hi[:, gidx]).any():
            raise ValueError("groups: the bounds of a one-hot feature exclude [0, 1]")

    # the working model: the user's if it already has the solve dtype, else a private copy
    work = model
    if cert_dtype != solve_dtype:
        try:
            work = copy.deepcopy(model).to(solve_dtype)
            for prm in work.parameters():
                prm.requires_grad_(False)
            with torch.no_grad():
                work(x_in[:1].to(solve_dtype))
        except Exception as err:  # a model that cannot run in solve_dtype: solve in its own
            warnings.warn(f"model cannot run in {solve_dtype} ({err}); solving in {cert_dtype}", stacklevel=2)
            work, solve_dtype = model, cert_dtype
    n_ineq = min(C - 2, max_ineq)
    chunk = batch_size or max(1, int(2**24 // ((1 + n_ineq) * n)))
    if nonsmooth is None:
        nonsmooth = has_relu(model, x_in[:1].to(cert_dtype))
    if max_iter is None:
        max_iter = _NONSMOOTH_MAX_ITER if nonsmooth else 200
    if screen == "auto":
        screen = 1 if nonsmooth else 3
    ctx = _Ctx(work, model, shape, solve_dtype, cert_dtype, x.dtype, float(margin), float(tol), float(kkt_tol),
               max_iter, n_ineq, chunk, progress, bool(nonsmooth), int(seed))
    gen = torch.Generator().manual_seed(seed)

    fn = _model_fn(ctx.work, shape)
    sd = solve_dtype
    points = _Problems(xh.to(sd), lo.to(sd), hi.to(sd), w.to(sd), src, src if tgt is None else tgt)
    cand = _check_candidates(candidates, x_in, ctx)
    pool = _solve(ctx, fn, points, C, z, tgt=tgt, screen=screen, candidates=cand, upper_bounds=upper_bounds,
                  groups=grp, solve_kw=dict(homotopy=homotopy, homotopy_steps=homotopy_steps,
                                            homotopy_tau=homotopy_tau, restarts=restarts, gen=gen))
    res = _choose(ctx, pool, z, N, C, given_target=tgt is not None)
    if differentiable:
        from flipfrag.flipgrad import attach_gradients  # lazy: flipgrad is only needed here

        res = attach_gradients(res, model, x, lower=lower, upper=upper, scale=scale, mask=mask, groups=groups)
    return res


# ------------------------------------------------------------------------------------------------- the steps


@dataclass
class _Pool:
    """Every candidate solve: problem p belongs to point pid[p], flips to tgt[p]; ``best`` holds its certified
    result (dict of per-problem tensors, see :func:`_solve_candidates`); ``bound`` (N,) is the distance of the
    closest boundary point found by segment crossings (an upper bound on the closest flip point's distance)."""

    pid: torch.Tensor
    pr: _Problems
    best: dict
    bound: torch.Tensor
    rounding_changed: torch.Tensor | None = None
    bound_x: torch.Tensor | None = None  # (N, n) the closest crossing found (solve dtype), NaN where none
    bound_cls: torch.Tensor | None = None  # (N,) the class winning beyond it

    def add(self, pid: torch.Tensor, pr: _Problems, best: dict) -> None:
        self.pid = torch.cat([self.pid, pid])
        self.pr = _cat_problems([self.pr, pr])
        self.best = {k: torch.cat([self.best[k], best[k]]) for k in self.best}

    def feasible(self, margin: float) -> torch.Tensor:
        """Which candidates are flip points (residual, margin, bounds within tolerance), certified or not. (P,)"""
        b = self.best
        return (torch.isfinite(b["z"]).all(1) & (b["residual"] <= b["tol_abs"]) & (b["margin"] >= margin - b["tol_abs"])
                & (b["bound_violation"] == 0))

    def closest_feasible(self, N: int, margin: float) -> torch.Tensor:
        """Per point, the smallest distance of a feasible candidate so far (inf where none). (N,)"""
        d = torch.where(self.feasible(margin), self.best["distance"], torch.full_like(self.best["distance"], math.inf))
        return torch.full((N,), math.inf, dtype=d.dtype).scatter_reduce(0, self.pid, d, "amin")

    def closest_certified(self, N: int) -> torch.Tensor:
        """Per point, the smallest certified distance so far (inf where none). (N,)"""
        d = torch.where(self.best["ok"], self.best["distance"], torch.full_like(self.best["distance"], math.inf))
        return torch.full((N,), math.inf, dtype=d.dtype).scatter_reduce(0, self.pid, d, "amin")


def _cat_problems(prs: list[_Problems]) -> _Problems:
    off = [p.offset for p in prs]
    return _Problems(*(torch.cat([getattr(p, f) for p in prs]) for f in ("xh", "lo", "hi", "w", "src", "tgt")),
                     None if all(o is None for o in off) else torch.cat(off))


def _solve(ctx: _Ctx, fn: ScoreFn, points: _Problems, C: int, z: torch.Tensor, *, tgt, screen, candidates,
           upper_bounds: bool, groups, solve_kw: dict) -> _Pool:
    """The algorithm: screen the targets, solve them from x_hat (and restarts / homotopy), start again from the
    boundary crossings of cheap label-changing points (DeepFool steps, given candidates) and of the solver's own
    iterates, certify everything. Returns the pool of certified candidates."""
    with _solver_threads(ctx.orig):
        return _solve_steps(ctx, fn, points, C, z, tgt=tgt, screen=screen, candidates=candidates,
                            upper_bounds=upper_bounds, groups=groups, solve_kw=solve_kw)


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


def _solve_steps(ctx: _Ctx, fn: ScoreFn, points: _Problems, C: int, z: torch.Tensor, *, tgt, screen, candidates,
                 upper_bounds: bool, groups, solve_kw: dict) -> _Pool:
    """The steps of :func:`_solve` (see there)."""
    N = len(points)
    pid, ptgt = _screen(ctx, fn, points, C, tgt, screen)
    pr = points.take(pid)
    pr.tgt = ptgt
    pool = _Pool(pid, pr, _solve_candidates(ctx, pr, **solve_kw), torch.full((N,), math.inf, dtype=torch.float64))
    starts = []
    if upper_bounds and tgt is None:
        x_df, changed = _deepfool(fn, points, C, ctx.chunk)
        starts.append((x_df, changed, _START_DEEPFOOL))
    if candidates is not None:
        starts.append((candidates, torch.ones(N, dtype=torch.bool), _START_CANDIDATES))
    for x_end, usable, start_id in starts:
        _start_from_crossings(ctx, fn, pool, torch.nonzero(usable)[:, 0], points, x_end[usable], tgt, start_id)
    if upper_bounds:  # the solver's own last iterates: the segment to each may cross another class first
        for _ in range(2):
            if not _start_from_crossings(ctx, fn, pool, pool.pid, points, pool.best["x"].to(ctx.dtype), tgt,
                                         _START_ITERATES, only_closer=True):
                break
    if ctx.nonsmooth:
        _continue_infeasible(ctx, fn, pool, points, C, screened=tgt is None and screen is not None)
        _polish_regions(ctx, fn, pool, points)
    if groups:
        relaxed_x = pool.best["x"]
        pool.best, pool.rounding_changed = _round_groups(ctx, pool.pr, pool.best, groups)
        # the relaxed crossings have fractional categories: only crossings with valid categories bound a rounded point
        pool.bound = torch.full((N,), math.inf, dtype=torch.float64)
        if upper_bounds:
            _start_from_valid_crossings(ctx, fn, pool, points, C, relaxed_x, groups, tgt)
    return pool


def _continue_infeasible(ctx: _Ctx, fn: ScoreFn, pool: _Pool, points: _Problems, C: int, screened: bool) -> None:
    """Piecewise-linear models: points with no feasible candidate and no segment crossing (nothing to polish) continue
    their direct SQP solves from the last iterate, up to 200 iterations in all (the smooth models' default), and —
    when the targets were screened — also solve the next two screened targets from x_hat."""
    N = len(points)
    missing = torch.isinf(pool.closest_feasible(N, ctx.margin)) & torch.isinf(pool.bound)
    if not missing.any():
        return
    more = 200 - ctx.max_iter
    j = torch.nonzero(missing[pool.pid] & (pool.best["start"] == 0))[:, 0]
    if j.numel() and more >= 1:
        pr = pool.pr.take(j)
        pool.add(pool.pid[j], pr, _polish(ctx, fn, pr, pool.best["x"][j].to(ctx.dtype), 0, max_iter=more))
    i = torch.nonzero(missing)[:, 0]
    if not screened or C < 3:
        return
    sub = points.take(i)
    tg = _screen_targets(fn, sub, C, min(3, C - 1), ctx.chunk)
    tried = torch.zeros(len(i), C, dtype=torch.bool)
    mine = torch.isin(pool.pid, i)
    rank = torch.full((N,), -1, dtype=torch.long)
    rank[i] = torch.arange(len(i))
    tried[rank[pool.pid[mine]], pool.pr.tgt[mine]] = True
    new = ~tried.gather(1, tg)
    pid = i[:, None].expand_as(tg)[new]
    if pid.numel() == 0:
        return
    pr = points.take(pid)
    pr.tgt = tg[new]
    x0 = torch.minimum(torch.maximum(pr.xh, pr.lo), pr.hi)
    out = _polish(ctx, fn, pr, x0, 0, max_iter=200)
    pool.add(pid, pr, out)


def _polish_starts(ctx: _Ctx, pool: _Pool, points: _Problems):
    """Per point the closest feasible flip point found so far (certified or not; the closest segment crossing is
    one too). Returns (point index (Q,), problems (Q,) with their target, starts (Q, n) in the solve dtype, the
    starts' SQP iterations (Q,), 0 for a crossing)."""
    N = len(points)
    b = pool.best
    feas = pool.feasible(ctx.margin)
    d = torch.where(feas, b["distance"], torch.full_like(b["distance"], math.inf))
    near = torch.full((N,), math.inf, dtype=d.dtype).scatter_reduce(0, pool.pid, d, "amin")
    first = torch.full((N,), len(d), dtype=torch.long).scatter_reduce(
        0, pool.pid, torch.where(feas & (d == near[pool.pid]), torch.arange(len(d)), len(d)), "amin")
    x0 = torch.full_like(points.xh, math.nan)
    tgt = torch.full((N,), -1, dtype=torch.long)
    iters = torch.zeros(N, dtype=torch.long)
    has = first < len(d)
    x0[has] = b["x"][first[has]].to(ctx.dtype)
    tgt[has] = pool.pr.tgt[first[has]]
    iters[has] = b["iterations"][first[has]]
    if pool.bound_x is not None:
        cross = (pool.bound < near) & torch.isfinite(pool.bound)
        x0[cross] = pool.bound_x[cross]
        tgt[cross] = pool.bound_cls[cross]
        iters[cross] = 0
    i = torch.nonzero(tgt >= 0)[:, 0]
    pr = points.take(i)
    pr.tgt = tgt[i]
    return i, pr, x0[i], iters[i]


def _polish_certificate(ctx: _Ctx, fn: ScoreFn, pr: _Problems, pol: dict) -> tuple[torch.Tensor, dict]:
    """The certificate of a region polish's points (:func:`_region_polish`): the usual one (:func:`_certify`, original
    model, output dtype), whose region gap becomes the polished region's ``distance / LB - 1`` where that is smaller
    and the point returned (rounded to the output dtype) lies in the polished region's closure — every sign
    constraint of its frozen pattern within the kink tolerance. Returns (x in the output dtype, certificate)."""
    xo = _to_output(ctx, pr, pol["x"])
    chk = _certify(ctx, pr, xo)
    _, v, tl, _ = _sign_state(fn, pol["pattern"], xo.to(ctx.dtype))
    inside = (v <= tl).all(1)
    gap = chk["distance"] / pol["lb"].to(torch.float64).clamp(min=_TINY) - 1
    gap = torch.where(chk["distance"] > 0, gap.clamp(min=0), torch.zeros_like(gap)).to(chk["gap"].dtype)
    chk["gap"] = torch.where(inside, torch.fmin(chk["gap"], gap), chk["gap"])
    chk["ok"] = _certified(chk, ctx.margin, ctx.kkt_tol)
    return xo, chk


def _polish_regions(ctx: _Ctx, fn: ScoreFn, pool: _Pool, points: _Problems) -> None:
    """Piecewise-linear models: the region polish (:func:`_region_polish`) of every point's closest feasible
    candidate, certified and added to the pool. Its region gap counts for the certificate only where the returned
    point (in the output dtype) lies in the polished region's closure (kink tolerance)."""
    pid, pr, x0, iters = _polish_starts(ctx, pool, points)
    if pid.numel() == 0:
        return
    outs = []
    # the sign rows with the user's model when it is float32 (~3x cheaper backward passes than the float64 copy)
    row_fn = _model_fn(ctx.orig, ctx.shape) if ctx.cert_dtype == torch.float32 else fn
    C = len(pool.best["z"][0])
    per = max(1, min(4, 2**24 // ((C + _POLISH_ROUNDS * _POLISH_ADD) * x0.shape[1])))  # rows held: bounded memory
    for idx in _chunks(len(pid), per):
        sub = pr.take(idx)
        try:
            pol = _region_polish(fn, sub, x0[idx], ctx.margin, row_fn=row_fn, row_dtype=ctx.cert_dtype)
        except _Unrepresentable:  # a nonlinearity the frozen pattern cannot represent: no polish
            return
        xo, chk = _polish_certificate(ctx, fn, sub, pol)
        outs.append({"x": xo, **chk, "iterations": iters[idx],
                     "solver": torch.full((len(idx),), _CONVERGED, dtype=torch.long),
                     "start": torch.full((len(idx),), _START_REGION, dtype=torch.long)})
    pool.add(pid, pr, {k: torch.cat([o[k] for o in outs]) for k in outs[0]})


def _screen(ctx: _Ctx, fn: ScoreFn, points: _Problems, C: int, tgt, screen) -> tuple[torch.Tensor, torch.Tensor]:
    """The (point, target) problems to solve: the given target; else the ``screen`` classes of smallest linearised
    distance (all other classes when ``screen`` is None). Returns (point index (P,), target (P,))."""
    N = len(points)
    if tgt is not None:
        return torch.arange(N), tgt
    if screen is None or screen >= C - 1:
        tg = torch.arange(C).repeat(N, 1)
        tg = tg[tg != points.src[:, None]].reshape(N, C - 1)
    else:
        tg = _screen_targets(fn, points, C, screen, ctx.chunk)
    return torch.arange(N)[:, None].expand_as(tg).reshape(-1), tg.reshape(-1)


def _start_from_crossings(ctx: _Ctx, fn: ScoreFn, pool: _Pool, pid: torch.Tensor, points: _Problems,
                          x_end: torch.Tensor, tgt, start_id: int, only_closer: bool = False) -> bool:
    """Segment crossings from x_hat toward x_end (one per entry of pid): each is a flip point, so it lowers the
    point's upper bound; the closest per point becomes a start of a new solve (with ``only_closer``: only where it
    is more than 1 % closer than the closest certified candidate so far). Returns whether any solve was added."""
    if pid.numel() == 0:
        return False
    sub = points.take(pid)
    xc, cls, found = _segment_crossing(_model_fn(ctx.work, ctx.shape), sub, x_end)
    if tgt is not None:
        found &= cls == tgt[pid]
    dist = torch.sqrt((sub.w * (xc - sub.xh) ** 2).sum(1)).to(torch.float64)
    dist = torch.where(found, dist, torch.full_like(dist, math.inf))
    N = len(points)
    near = torch.full((N,), math.inf, dtype=torch.float64).scatter_reduce(0, pid, dist, "amin")
    # the first entry achieving each point's closest crossing
    first = torch.full((N,), len(pid), dtype=torch.long).scatter_reduce(
        0, pid, torch.where(found & (dist == near[pid]), torch.arange(len(pid)), len(pid)), "amin")
    use = first < len(pid)
    if ctx.nonsmooth:  # remembered as a start of the region polish
        if pool.bound_x is None:
            pool.bound_x = torch.full((N, xc.shape[1]), math.nan, dtype=xc.dtype)
            pool.bound_cls = torch.full((N,), -1, dtype=torch.long)
        closer = use & (near < pool.bound)
        pool.bound_x[closer] = xc[first[closer]]
        pool.bound_cls[closer] = cls[first[closer]]
    pool.bound = torch.minimum(pool.bound, near)
    if ctx.nonsmooth:  # the region polish finishes the closest feasible point: a new solve only where it is beaten
        use &= near < (1 - _BOUND_SLACK) * pool.closest_feasible(N, ctx.margin)
    elif only_closer:
        use &= near < (1 - _BOUND_SLACK) * pool.closest_certified(N)
    if not use.any():
        return False
    j = first[use]
    pr = sub.take(j)
    pr.tgt = cls[j]
    pool.add(pid[j], pr, _polish(ctx, fn, pr, xc[j], start_id))
    return True


def _polish(ctx: _Ctx, fn: ScoreFn, pr: _Problems, x0: torch.Tensor, start_id: int,
            max_iter: int | None = None) -> dict:
    """Solve from the given (feasible) starts and certify; a result like :func:`_solve_candidates`'s."""
    out = _run_sqp(ctx, fn, pr, x0, ctx.max_iter if max_iter is None else max_iter, "from crossings")
    if ctx.nonsmooth:
        _finish_feasibility(ctx, fn, pr, out)
    xo = _to_output(ctx, pr, out["x"])
    return {"x": xo, **_certify(ctx, pr, xo), "iterations": out["iterations"], "solver": out["status"],
            "start": torch.full((len(pr),), start_id, dtype=torch.long)}


def _choose(ctx: _Ctx, pool: _Pool, z: torch.Tensor, N: int, C: int, given_target: bool) -> FlipResult:
    """Per point the closest certified candidate (for a point with none: the attempt toward the class scoring
    highest at x among those tried); it stays certified only if it is within 1 % of the point's upper bound."""
    best, pid, ptgt = pool.best, pool.pid, pool.pr.tgt
    P = len(pid)
    dist_ok = torch.where(best["ok"], best["distance"], torch.full_like(best["distance"], math.inf))
    has = torch.zeros(N, dtype=torch.long).scatter_reduce(0, pid, best["ok"].long(), "amax").bool()
    zt = z.to(torch.float64)[pid, ptgt]
    key = torch.where(has[pid], dist_ok, -zt)  # smaller is better
    order = torch.argsort(key, stable=True)
    order = order[torch.argsort(pid[order], stable=True)]
    firsts = torch.ones(P, dtype=torch.bool)
    firsts[1:] = pid[order][1:] != pid[order][:-1]
    sel = order[firsts]  # one problem per point, in point order
    distances = None
    if not given_target:
        distances = torch.full((N * C,), math.inf, dtype=torch.float64)
        distances = distances.scatter_reduce(0, pid * C + ptgt, dist_ok.to(torch.float64), "amin").reshape(N, C)
    b = {k: v[sel] for k, v in best.items()}
    bound = pool.bound
    within = ~(b["distance"] > (1 + _BOUND_SLACK) * bound)
    ok = b["ok"] & within
    shape = ctx.shape
    x_att = b["x"].reshape(N, *shape)
    x_flip = torch.where(ok.reshape(N, *([1] * len(shape))), x_att, torch.full_like(x_att, math.nan))
    status = [_status_text(b, i, ctx, float(bound[i]), bool(within[i])) for i in range(N)]
    return FlipResult(
        x_flip=x_flip,
        x_attempt=x_att,
        distance=torch.where(ok, b["distance"], torch.full_like(b["distance"], math.nan)),
        source=pool.pr.src[sel].clone(),
        target=ptgt[sel].clone(),
        residual=b["residual"].to(torch.float64),
        margin=b["margin"].to(torch.float64),
        bound_violation=b["bound_violation"],
        kkt=b["kkt"].to(torch.float64),
        iterations=b["iterations"],
        converged=ok,
        status=status,
        start=torch.where(ok, b["start"], torch.full_like(b["start"], -1)),
        scores=b["z"],
        distances=distances,
        rounding_changed=None if pool.rounding_changed is None else pool.rounding_changed[sel],
        tol=ctx.tol,
        kkt_tol=ctx.kkt_tol,
        margin_param=ctx.margin,
        upper_bound=bound.clone(),
        region_gap=b["gap"].to(torch.float64) if ctx.nonsmooth else None,
    )


def _status_text(b: dict, i: int, ctx: _Ctx, bound: float, within: bool) -> str:
    """"converged", or every test point i failed, with the solver's own status."""
    if b["ok"][i] and within:
        return "converged"
    why = []
    if not torch.isfinite(b["z"][i]).all():
        why.append("non-finite scores")
    if b["residual"][i] > b["tol_abs"][i]:
        why.append(f"residual {float(b['residual'][i]):.1e} > {float(b['tol_abs'][i]):.1e}")
    if b["margin"][i] < ctx.margin - b["tol_abs"][i]:
        why.append(f"margin {float(b['margin'][i]):.1e} < {ctx.margin:.1e}")
    if b["bound_violation"][i] > 0:
        why.append(f"bound violation {float(b['bound_violation'][i]):.1e}")
    gap_ok = b["gap"][i] <= _region_gap_tol(ctx.kkt_tol)
    if not b["kkt"][i] <= ctx.kkt_tol + b["kkt_floor"][i] and not gap_ok:
        why.append(f"kkt {float(b['kkt'][i]):.1e} > {ctx.kkt_tol + float(b['kkt_floor'][i]):.1e}")
        if math.isfinite(float(b["gap"][i])):
            why.append(f"region gap {float(b['gap'][i]):.1e} > {_region_gap_tol(ctx.kkt_tol):.0e}")
    if not within:
        why.append(f"distance {float(b['distance'][i]):.3g} > 1.01 x a boundary point found at {bound:.3g}")
    return "; ".join(why) + f" (solver: {_SOLVER_STATUS[int(b['solver'][i])]})"


def _check_candidates(candidates, x: torch.Tensor, ctx: _Ctx) -> torch.Tensor | None:
    """Label-changing points given by the caller (e.g. an attack's output) -> flat (N, n) in the solve dtype."""
    if candidates is None:
        return None
    if not isinstance(candidates, torch.Tensor) or candidates.shape != x.shape:
        got = tuple(candidates.shape) if isinstance(candidates, torch.Tensor) else type(candidates).__name__
        raise ValueError(f"candidates must be a tensor of x's shape {tuple(x.shape)}, got {got}")
    if not torch.isfinite(candidates).all():
        raise ValueError("candidates contain NaN or inf")
    return candidates.detach().reshape(x.shape[0], -1).to(ctx.dtype)


def _round_groups(ctx: _Ctx, pr: _Problems, relaxed: dict, groups: list[torch.Tensor]):
    """Round the one-hot blocks of the relaxed solutions, fix them, re-solve the rest and re-certify.

    Two candidates per problem: the relaxed solution's argmax categories, and x's own categories. Returns the
    per-problem best (certified first, then closest) and whether rounding moved the relaxed point (P,).
    """
    gidx = torch.cat(groups)
    xr = relaxed["x"].to(ctx.dtype)
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
        out = _run_sqp(ctx, _model_fn(ctx.work, ctx.shape), sub, x0, ctx.max_iter, "categorical re-solve")
        xo = _to_output(ctx, sub, out["x"])
        chk = _certify(ctx, sub, xo)  # a KKT point of the problem with the categories fixed
        cands.append({"x": xo, **chk, "iterations": out["iterations"] + relaxed["iterations"],
                      "solver": out["status"], "start": relaxed["start"]})
    a, b = cands
    better = b["ok"] & (~a["ok"] | (b["distance"] < a["distance"] * (1 - 1e-6)))
    best = {k: torch.where(better.reshape(-1, *([1] * (v.dim() - 1))), b[k], v) for k, v in a.items()}
    changed = (best["x"][:, gidx].to(torch.float64) - relaxed["x"][:, gidx].to(torch.float64)).abs().amax(1) > 1e-9
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


def _start_from_valid_crossings(ctx: _Ctx, fn: ScoreFn, pool: _Pool, points: _Problems, C: int,
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
    rel = torch.where(torch.isfinite(relaxed_x), relaxed_x.to(ctx.dtype), pr.xh)
    plain = _model_fn(ctx.work, ctx.shape)
    rows = torch.arange(len(pid))
    # per point: the pool row, crossing, class and categories of its closest valid crossing
    best_row = torch.full((N,), -1, dtype=torch.long)
    best_x = torch.zeros_like(points.xh)
    best_cls = torch.zeros(N, dtype=torch.long)
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
        ends = [(far, 2 * start - far), (_deepfool(fn, sub, C, ctx.chunk)[0], _deepfool(fn, back, C, ctx.chunk)[0])]
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
            near = torch.full((N,), math.inf, dtype=torch.float64).scatter_reduce(0, pid, dist, "amin")
            closer = near < pool.bound
            if not closer.any():
                continue
            first = torch.full((N,), len(pid), dtype=torch.long).scatter_reduce(
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
    pool.add(need, sub, _polish(ctx, fn, sub, best_x[need], _START_ITERATES))
    moved = (best_x[need][:, gidx].to(torch.float64) - relaxed_x[best_row[need]][:, gidx].to(torch.float64))
    pool.rounding_changed = torch.cat([pool.rounding_changed, moved.abs().amax(1) > 1e-9])


# ------------------------------------------------------------------------------------------------- region polish


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
        return pat if self.sel is None else {k: (v[self.sel] if k in ("mask", "idx") else v) for k, v in pat.items()}

    def _rows_ok(self, u):
        if self.batch is None:
            self.batch = u.shape[0] if u.dim() else -1
        if u.dim() == 0 or u.shape[0] != self.batch:
            raise _Unrepresentable("a ReLU / max-pooling input without one row per batch entry")

    def _relu(self, u):
        self._rows_ok(u)
        pat = self._entry("relu", lambda: {"mask": u.detach() > 0})
        self.inputs.append(u)
        return u * pat["mask"]

    def _pool(self, u, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
        pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))  # noqa: E731
        k, st = pair(kernel_size), pair(stride if stride not in (None, []) else kernel_size)
        if pair(padding) != (0, 0) or pair(dilation) != (1, 1) or ceil_mode or return_indices or u.dim() != 4:
            raise _Unrepresentable("max-pooling with padding, dilation, ceil_mode or indices")

        def make():
            _, idx = torch.nn.functional.max_pool2d(u.detach(), k, st, return_indices=True)
            H, W = u.shape[2:]
            pos = torch.arange(H * W, dtype=u.dtype).reshape(1, 1, H, W)
            pos = torch.nn.functional.unfold(pos, k, stride=st)[0].round().long()  # (kk, L) input index per entry
            return {"idx": idx, "k": k, "st": st, "pos": pos}

        self._rows_ok(u)
        pat = self._entry("pool", make)
        self.inputs.append(u)
        idx = pat["idx"]
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
            mask = pat["mask"] if sel is None else pat["mask"][sel]
            uf = u.reshape(B, -1)
            vals.append(torch.where(mask.reshape(B, -1), -uf, uf))
            continue
        idx = (pat["idx"] if sel is None else pat["idx"][sel]).flatten(2)  # (B, C, L)
        k, st, pos = pat["k"], pat["st"], pat["pos"]
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
    needed) and one backward pass."""
    P, K = picks.shape
    n = x.shape[1]
    rows = torch.zeros(P * K, n, dtype=x.dtype)
    ends = torch.tensor(sizes).cumsum(0)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), ends[:-1]])
    flat_p = torch.arange(P).repeat_interleave(K)
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
    lam_flip = torch.where(torch.arange(lam_flip.shape[1])[None] == 0, lam_flip, lam_flip.clamp(min=0))
    lam_sign = torch.where(picks >= 0, lam_sign.clamp(min=0), torch.zeros_like(lam_sign))
    ends = torch.tensor(sizes).cumsum(0)
    starts = ends - torch.tensor(sizes)
    layer = torch.searchsorted(ends, picks.clamp(min=0), right=True)

    def lagrangian(x, grad: bool):
        with torch.enable_grad() if grad else torch.no_grad():
            xg = x.detach().requires_grad_(grad)
            z, inputs = _frozen_forward(fn, pattern, xg)
            vals = _sign_values(pattern, inputs)
            C = z.shape[1]
            gz = torch.zeros(P, C, dtype=z.dtype)
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
                   row_dtype: torch.dtype | None = None) -> dict:
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
    ``||D(x - x_hat)|| / LB - 1`` is at most ``target_gap``. Returns x (P, n), gap (P,), rows (P,) — the sign
    constraints used — and the pattern (for the caller's check that the returned point is in the region).
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

    _, _, _, _, _, A, c, valid, cls = _scores_and_jacobian(frozen, x0, pr.src, pr.tgt, margin, C - 2)
    m0 = A.shape[1]
    _, v0, _, sizes = _sign_state(fn, pattern, x0)
    picks = torch.full((P, 0), -1, dtype=torch.long)
    rows = torch.zeros(P, 0, n, dtype=x0.dtype)
    cvals = torch.zeros(P, 0, dtype=x0.dtype)
    x = x0.clone()
    vx = v0
    lb_best = torch.zeros(P, dtype=x0.dtype)
    lam = None
    active = torch.ones(P, dtype=torch.bool)
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
            lam = torch.cat([lam, torch.zeros(P, m0 + K - lam.shape[1], dtype=lam.dtype)], 1)
        y, lam = _dual_qp(pr, An, b, is_eq, torch.full((P,), math.inf, dtype=x0.dtype), lam0=lam, iters=100)
        raw = lam / nrm  # the multipliers of the unnormalised constraints (0 on rows without gradient)
        lb = _exact_region_bound(fn, pattern, pr, x0, raw[:, :m0], cls, raw[:, m0:], picks, sizes, margin)
        lb_best = torch.maximum(lb_best, lb)
        _, vy, toly, _ = _sign_state(fn, pattern, y)
        viol = vy > 0
        vxc = vx.clamp(max=0)
        ratio = torch.where(viol, -vxc / (vy - vxc).clamp(min=_TINY), torch.full_like(vy, math.inf))
        t, block = ratio.min(1)
        t = t.clamp(max=1.0) * active
        xn = x + t[:, None] * (y - x)
        dn = torch.sqrt((pr.w * (xn - pr.xh) ** 2).sum(1))
        better = dn < dist
        x = torch.where(better[:, None], xn, x)
        dist = torch.where(better, dn, dist)
        _, vx, _, _ = _sign_state(fn, pattern, x)
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
    return {"x": x, "gap": torch.where(dist > 0, gap.clamp(min=0), torch.zeros_like(gap)), "lb": lb_best,
            "rows": (picks >= 0).sum(1), "pattern": pattern}
