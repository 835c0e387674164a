"""The solver's settings: :class:`FlipOptions` (what the caller chose, checked once) and :class:`_Setup` (what one
call of :func:`~flipfrag.flip.closest_flip_point` resolved from them and the model: dtypes, chunking, defaults)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_NONSMOOTH_MAX_ITER = 20  # default SQP iterations of a piecewise-linear model (the region polish finishes)
_SMOOTH_MAX_ITER = 200
_NONSMOOTH_WALK_STEPS = 100  # default steps of the first-order start on piecewise-linear models (DDN's default)


def _tau_argument(tau: float) -> float:
    """p with erf'(p) = tau: the largest |u / sigma| at which an erf unit still has slope >= tau."""
    if not 0 < tau < 2 / math.sqrt(math.pi):
        raise ValueError(f"homotopy_tau must be in (0, 2/sqrt(pi)), got {tau}")
    return math.sqrt(-math.log(math.sqrt(math.pi) * tau / 2))


@dataclass(frozen=True)
class FlipOptions:
    """Settings of :func:`~flipfrag.flip.closest_flip_point`, validated when made (errors name the field).

    ``closest_flip_point(model, x, options=FlipOptions(tol=1e-5))`` and ``closest_flip_point(model, x, tol=1e-5)``
    are the same call: keywords are overrides of ``options`` (default ``FlipOptions()``).

    Attributes
    ----------
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
        the region polish then solves exactly.
    max_ineq : int
        How many of the other classes (the most nearly active) are linearised per iteration; the rest are still
        checked by the line search and the certificate. :meth:`for_images` sets 2.
    homotopy : bool
        Add the homotopy candidate: the network is deformed to a smooth, nearly linear one — erf scales widened
        (:func:`~flipfrag.flip.erf_homotopy_sigmas`) for nets with :class:`flipfrag.smooth.Erf` layers, ReLU
        replaced by softplus(beta) with beta growing geometrically from ``1/s`` to ``1e4/s`` (s = median
        pre-activation scale) for ReLU nets — and the scores shifted so that ``x`` itself is a flip point; the
        deformation and shift are undone linearly over ``homotopy_steps`` steps, each solve warm-started from the
        previous one. The erf scales are shared by the batch (max over the batch). Nets with neither: only the
        shift is continued.
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
        call (:func:`flipfrag.smooth.has_relu`). For nonsmooth models a feasible point failing the plain KKT test
        is re-measured on its activation region, and each point's closest feasible candidate is polished to the
        exact closest flip point of its activation region (``docs/flip_solver.md``). Also sets the defaults of
        ``max_iter`` and ``screen``.
    screen : int, "auto" or None
        With ``target=None``: solve only the ``screen`` targets of smallest linearised distance
        ``|z_s - z_t| / ||D^-1 grad(z_s - z_t)||`` at ``x`` (one Jacobian of all classes), plus the classes that
        the segment crossings reach. ``None``: every class (``distances`` is then filled for all of them; with
        screening it is ``inf`` for the targets not solved). ``"auto"`` (default): 3, or 1 for piecewise-linear
        models (``nonsmooth``: their crossings and region polish cost more per target; a class that a segment
        crossing reaches first is still added).
    walk_steps : int or "auto"
        Steps of the first-order starts (:func:`~flipfrag.flip.starts._norm_walk`, DDN-style walks of decoupled
        direction and norm from the closest flip point's norm so far and from 16 times it; two forward and two
        backward passes per step and point) whose segment crossings become more starts. ``"auto"`` (default): 100
        for piecewise-linear models (``nonsmooth``), whose SQP and region polish certify the closest flip point of
        the activation region they reach — a walk is not held by the region it starts in (measured on the MNIST
        SmallCNN and the CIFAR-10 CNN: ``benchmarks/results/flip.md``) —, 0 for smooth ones.
        0 turns it off.
    upper_bounds : bool
        Also start from the segment crossings toward a DeepFool-style label-changing point (``target=None``) and
        toward the solver's own last iterates (default True); see ``FlipResult.upper_bound``.
    progress : bool
        Show tqdm bars.
    differentiable : bool
        Return an ``x_flip`` that carries gradients with respect to ``x`` and the model's parameters that require
        grad, by the implicit function theorem at the certified KKT point (:mod:`flipfrag.flip.gradient`); points
        without a derivative (degenerate active set, not certified) get NaN gradients and say why in
        ``grad_status``.
    """

    margin: float = 0.0
    tol: float = 1e-6
    kkt_tol: float = 1e-4
    max_iter: int | None = None
    max_ineq: int = 8
    homotopy: bool = False
    homotopy_steps: int = 10
    homotopy_tau: float = 0.1
    restarts: int = 0
    seed: int = 0
    batch_size: int | None = None
    solve_dtype: torch.dtype = torch.float64
    nonsmooth: bool | None = None
    screen: int | str | None = "auto"
    walk_steps: int | str = "auto"
    upper_bounds: bool = True
    progress: bool = False
    differentiable: bool = False

    def __post_init__(self) -> None:
        for name in ("tol", "kkt_tol"):
            val = getattr(self, name)
            if not (isinstance(val, (int, float)) and val > 0):
                raise ValueError(f"{name} must be a number > 0, got {val!r}")
        m = self.margin
        if not (isinstance(m, (int, float)) and math.isfinite(m) and m >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {m!r}")
        iters_given = 1 if self.max_iter is None else self.max_iter
        for name, val, least in (("max_iter", iters_given, 1), ("homotopy_steps", self.homotopy_steps, 1),
                                 ("restarts", self.restarts, 0), ("max_ineq", self.max_ineq, 0)):  # fmt: skip
            if not isinstance(val, int) or isinstance(val, bool) or val < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {val!r}")
        if self.homotopy:
            _tau_argument(self.homotopy_tau)  # raises naming homotopy_tau
        b = self.batch_size
        if b is not None and (not isinstance(b, int) or b < 1):
            raise ValueError(f"batch_size must be None or an integer >= 1, got {b!r}")
        if self.solve_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"solve_dtype must be torch.float32 or torch.float64, got {self.solve_dtype}")
        s = self.screen
        if s is not None and s != "auto" and (not isinstance(s, int) or isinstance(s, bool) or s < 1):
            raise ValueError(f"screen must be None, 'auto' or an integer >= 1, got {s!r}")
        ws = self.walk_steps
        if ws != "auto" and (not isinstance(ws, int) or isinstance(ws, bool) or ws < 0):
            raise ValueError(f"walk_steps must be 'auto' or an integer >= 0, got {ws!r}")
        if not isinstance(self.differentiable, bool):
            raise TypeError(f"differentiable must be a bool, got {type(self.differentiable).__name__}")

    @classmethod
    def for_images(cls, **overrides: Any) -> FlipOptions:
        """Options for image inputs: ``max_ineq=2`` — linearise only the 2 most nearly active other classes per SQP
        step (every class is still certified): measured on MNIST-5k, the same flip points at half the cost of the
        default 8. The one place this rule lives (flip-point notebooks and ``beyond`` use it)."""
        return cls(**{"max_ineq": 2, **overrides})

    def replace(self, **overrides: Any) -> FlipOptions:
        """A copy with ``overrides`` (validated again); an unknown name is a TypeError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown flip-point option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **overrides) if overrides else self

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults (the keyword arguments that make this object)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default}  # fmt: skip

    def resolved(self, nonsmooth: bool) -> FlipOptions:
        """The options with the model-dependent defaults filled: ``nonsmooth``, ``max_iter``, ``screen``,
        ``walk_steps``."""
        max_iter = self.max_iter
        if max_iter is None:
            max_iter = _NONSMOOTH_MAX_ITER if nonsmooth else _SMOOTH_MAX_ITER
        screen = (1 if nonsmooth else 3) if self.screen == "auto" else self.screen
        walk = (_NONSMOOTH_WALK_STEPS if nonsmooth else 0) if self.walk_steps == "auto" else self.walk_steps
        return dataclasses.replace(self, nonsmooth=bool(nonsmooth), max_iter=max_iter, screen=screen, walk_steps=walk,
                                   margin=float(self.margin), tol=float(self.tol), kkt_tol=float(self.kkt_tol))


@dataclass(frozen=True)
class _Setup:
    """What one call resolved: the models and dtypes it solves and certifies with, its chunking, and the options
    with every default filled (:meth:`FlipOptions.resolved`)."""

    opts: FlipOptions
    work: nn.Module  # the model used for solving (maybe a float64 copy)
    orig: nn.Module  # the user's model, for certification
    shape: tuple
    dtype: torch.dtype  # solve dtype
    cert_dtype: torch.dtype  # model dtype
    out_dtype: torch.dtype  # x dtype
    n_ineq: int  # other-class constraints linearised per SQP step: min(C - 2, max_ineq)
    chunk: int  # problems per SQP chunk
