"""The public call, :func:`closest_flip_point`: its argument checks, the problem data, then the pipeline
(:mod:`flipfrag.flip.steps`)."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flipfrag.smooth import has_relu

from .gradient import attach_gradients
from .options import FlipOptions, _Setup
from .problems import _model_dtype, _model_fn, _Problems
from .result import FlipResult
from .steps import _choose, _solve

__all__ = ["closest_flip_point"]


def _as_feature_tensor(name: str, v, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor | None:
    """A scalar or tensor broadcastable to x -> a tensor of x's shape (float64, or bool for masks)."""
    if v is None:
        return None
    if isinstance(v, (int, float, bool)):
        v = torch.tensor(v, device=x.device)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or a number, got {type(v).__name__}")
    try:
        return torch.broadcast_to(v.detach().to(device=x.device, dtype=dtype), x.shape).clone()
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(v.shape)} does not broadcast to x of shape {tuple(x.shape)}") from err


def _check_classes(name: str, v, N: int, C: int, device: torch.device) -> torch.Tensor | None:
    if v is None:
        return None
    if isinstance(v, int):
        v = torch.full((N,), v, dtype=torch.long, device=device)
    if not isinstance(v, torch.Tensor) or v.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8,
                                                          torch.uint8):
        raise TypeError(f"{name} must be None or an integer tensor of shape ({N},)")
    if v.shape != (N,):
        raise ValueError(f"{name} must have shape ({N},), got {tuple(v.shape)}")
    v = v.to(device=device, dtype=torch.long)
    if ((v < 0) | (v >= C)).any():
        raise ValueError(f"{name} has classes out of range [0, {C}): {v[(v < 0) | (v >= C)][:5].tolist()}")
    return v


def _train_mode_modules(model: nn.Module) -> list[str]:
    kinds = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)
    return [type(m).__name__ for m in model.modules() if isinstance(m, kinds) and m.training]


def _check_groups(groups, n: int, device: torch.device) -> list[torch.Tensor]:
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
        out.append(torch.tensor(idx, dtype=torch.long, device=device))
    return out


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
    candidates: torch.Tensor | None = None,
    options: FlipOptions | None = None,
    **overrides: Any,
) -> FlipResult:
    """Closest flip point of every input of a batch, certified per point (method: ``docs/flip_solver.md``).

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
    candidates : Tensor of x's shape, optional
        Label-changing points from elsewhere (e.g. FAB's or DeepFool's adversarial points). The first boundary
        crossing on the segment from ``x`` to each is a flip point, used as a start, and it bounds the distance
        (``upper_bound``). Entries whose segment never leaves the source class are ignored.
    options : FlipOptions, optional
        The solver's settings (tolerances, iterations, starts, dtype, ...; :class:`FlipOptions`, default
        ``FlipOptions()``).
    **overrides
        Any field of :class:`FlipOptions` by name (``tol=1e-5``, ``homotopy=True``, ``differentiable=True``, ...),
        replacing that field of ``options``.

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
      and certified there (``docs/flip_solver.md``, The region polish) — the shipped MNIST CNN (8 of 8 test digits)
      and the pretrained CIFAR-10 CNN (20 of 20 shipped photos, about 4 s per photo on one thread) are certified with
      the defaults. ``kkt_tol=math.inf`` accepts any flip point as certified (not a certified *closest* one).
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
    _check_model_and_x(model, x)
    opts = (FlipOptions() if options is None else _check_options(options)).replace(**overrides)
    x_in = x.detach()
    cert_dtype = _model_dtype(model, x.dtype)
    z = _scores_at(model, x_in, cert_dtype)
    N, C = z.shape
    src = _check_classes("source", source, N, C, x.device)
    src = z.argmax(1) if src is None else src
    tgt = _check_classes("target", target, N, C, x.device)
    if tgt is not None and (tgt == src).any():
        bad = torch.nonzero(tgt == src)[:5, 0].tolist()
        raise ValueError(f"target equals the source (predicted) class at points {bad}")
    lo, hi, w, xh, grp = _feature_data(x_in, lower, upper, scale, mask, groups)
    run = _setup(model, x_in, C, cert_dtype, opts)
    sd = run.dtype
    points = _Problems(xh.to(sd), lo.to(sd), hi.to(sd), w.to(sd), src, src if tgt is None else tgt)
    cand = _check_candidates(candidates, x_in, run)
    # cpu-ok: the restarts' draws are made on the CPU (the same on any device), then moved
    gen = torch.Generator().manual_seed(opts.seed)
    pool = _solve(run, _model_fn(run.work, run.shape), points, C, z, tgt=tgt, candidates=cand, groups=grp, gen=gen)
    res = _choose(run, pool, z, N, C, given_target=tgt is not None)
    if opts.differentiable:
        res = attach_gradients(res, model, x, lower=lower, upper=upper, scale=scale, mask=mask, groups=groups)
    return res


def _check_options(options) -> FlipOptions:
    if not isinstance(options, FlipOptions):
        raise TypeError(f"options must be a FlipOptions or None, got {type(options).__name__}")
    return options


def _check_model_and_x(model, x) -> None:
    """The argument checks that need neither the scores nor the options."""
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
    dev = next((t.device for t in list(model.parameters()) + list(model.buffers())), None)
    if dev is not None and dev != x.device:
        raise ValueError(f"x is on {x.device} but the model's parameters are on {dev}: move x (or the model) so that "
                         "both are on the same device")
    busy = _train_mode_modules(model)
    if busy:
        raise ValueError(f"model has {sorted(set(busy))} layers in train mode; call model.eval() first")


def _scores_at(model: nn.Module, x: torch.Tensor, cert_dtype: torch.dtype) -> torch.Tensor:
    """The model's scores (N, C) at x, checked: the right shape, C >= 2, finite."""
    N = x.shape[0]
    with torch.no_grad():
        try:
            z = model(x.to(cert_dtype))
        except Exception as err:  # the model's own error, re-raised naming the argument
            raise ValueError(f"x of shape {tuple(x.shape)} does not fit the model: {err}") from err
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != N or z.shape[1] < 2:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"model must map x of shape {tuple(x.shape)} to scores (N={N}, C>=2), got {got}")
    if not torch.isfinite(z).all():
        raise ValueError("model returns NaN/inf scores at x")
    return z


def _feature_data(x: torch.Tensor, lower, upper, scale, mask, groups):
    """Bounds, squared scale and x_hat as flat float64 (N, n) tensors (fixed features: lo = hi = x_hat; one-hot
    blocks relaxed to [0, 1]) and the checked groups."""
    N, n = x.shape[0], math.prod(x.shape[1:])
    lo = _as_feature_tensor("lower", lower, x)
    hi = _as_feature_tensor("upper", upper, x)
    lo = torch.full(x.shape, -math.inf, dtype=torch.float64, device=x.device) if lo is None else lo
    hi = torch.full(x.shape, math.inf, dtype=torch.float64, device=x.device) if hi is None else hi
    if torch.isnan(lo).any() or torch.isnan(hi).any():
        raise ValueError("lower/upper contain NaN")
    if (lo > hi).any():
        raise ValueError("lower > upper for some features")
    w = _as_feature_tensor("scale", scale, x)
    if w is not None and not (torch.isfinite(w).all() and (w > 0).all()):
        raise ValueError("scale must be finite and > 0 everywhere")
    w = torch.ones(x.shape, dtype=torch.float64, device=x.device) if w is None else w**2
    free = _as_feature_tensor("mask", mask, x, dtype=torch.bool)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    xh = x.to(torch.float64)
    if free is not None:
        fixed = ~free
        if ((xh < lo) | (xh > hi))[fixed].any():
            raise ValueError("mask: features fixed by the mask lie outside [lower, upper] in x")
        lo = torch.where(fixed, xh, lo)
        hi = torch.where(fixed, xh, hi)
    lo, hi, w, xh = (t.reshape(N, n) for t in (lo, hi, w, xh))
    grp = _check_groups(groups, n, x.device)
    for gidx in grp:  # the relaxation: a one-hot entry lives in [0, 1]
        movable = lo[:, gidx] < hi[:, gidx]
        lo[:, gidx] = torch.where(movable, lo[:, gidx].clamp(min=0.0), lo[:, gidx])
        hi[:, gidx] = torch.where(movable, hi[:, gidx].clamp(max=1.0), hi[:, gidx])
        if (lo[:, gidx] > hi[:, gidx]).any():
            raise ValueError("groups: the bounds of a one-hot feature exclude [0, 1]")
    return lo, hi, w, xh, grp


def _setup(model: nn.Module, x: torch.Tensor, C: int, cert_dtype: torch.dtype, opts: FlipOptions) -> _Setup:
    """The working model (the user's if it already has the solve dtype, else a private copy), the chunking and the
    options with the model-dependent defaults filled."""
    solve_dtype = opts.solve_dtype
    work = model
    if cert_dtype != solve_dtype:
        try:
            work = copy.deepcopy(model).to(solve_dtype)
            for prm in work.parameters():
                prm.requires_grad_(False)
            with torch.no_grad():
                work(x[:1].to(solve_dtype))
        except Exception as err:  # a model that cannot run in solve_dtype: solve in its own
            warnings.warn(f"model cannot run in {solve_dtype} ({err}); solving in {cert_dtype}", stacklevel=3)
            work, solve_dtype = model, cert_dtype
    n = math.prod(x.shape[1:])
    n_ineq = min(C - 2, opts.max_ineq)
    chunk = opts.batch_size or max(1, int(2**24 // ((1 + n_ineq) * n)))
    nonsmooth = opts.nonsmooth
    if nonsmooth is None:
        nonsmooth = has_relu(model, x[:1].to(cert_dtype))
    return _Setup(opts.resolved(nonsmooth), work, model, tuple(x.shape[1:]), solve_dtype, cert_dtype, x.dtype,
                  n_ineq, chunk)


def _check_candidates(candidates, x: torch.Tensor, run: _Setup) -> torch.Tensor | None:
    """Label-changing points given by the caller (e.g. an attack's output) -> flat (N, n) in the solve dtype."""
    if candidates is None:
        return None
    if not isinstance(candidates, torch.Tensor) or candidates.shape != x.shape:
        got = tuple(candidates.shape) if isinstance(candidates, torch.Tensor) else type(candidates).__name__
        raise ValueError(f"candidates must be a tensor of x's shape {tuple(x.shape)}, got {got}")
    if not torch.isfinite(candidates).all():
        raise ValueError("candidates contain NaN or inf")
    return candidates.detach().reshape(x.shape[0], -1).to(device=x.device, dtype=run.dtype)
