"""Starting points and cheap bounds: the homotopy (erf widening / softplus, an output shift undone step by step),
DeepFool-style steps, segment crossings toward label-changing points, and exact feasibility restoration."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from flipfrag.smooth import (
    RELU_FUNCS,
    erf_layers,
    erf_sigmas,
    maxpool_as_logsumexp,
    relu_as_softplus,
    set_erf_sigmas,
)

from .options import _Setup, _tau_argument
from .problems import (
    _CONVERGED,
    _TINY,
    ScoreFn,
    _chunks,
    _constraint_values,
    _model_fn,
    _pair_rows,
    _Problems,
    _tol_abs,
)
from .sqp import _equality_gradient, _Iterates, _run_sqp


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
                eye = torch.eye(C, dtype=z.dtype, device=z.device)
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
    changed = torch.zeros(len(pr), dtype=torch.bool, device=x.device)
    active = torch.ones(len(pr), dtype=torch.bool, device=x.device)
    prev_lead = torch.full((len(pr),), math.inf, dtype=x.dtype, device=x.device)
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


def _norm_walk(fn: ScoreFn, pr: _Problems, radius: torch.Tensor, targets: torch.Tensor | None, steps: int,
               gamma: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """A label-changing point per problem by a DDN-style walk (decoupled direction and norm, Rony et al. 2019), in
    the scaled norm and inside the box — a first-order start that, unlike the SQP's, is not held by the activation
    region it starts in.

    From x_hat: ``steps`` steps of the scaled steepest ascent of the source's cross-entropy (``targets`` given: the
    target's log-probability), as DDN, of length alpha (cosine-annealed from ``radius`` to ``radius / 100``); after
    each step the perturbation is rescaled to the norm eps, which shrinks by ``gamma`` where the point is past the
    boundary and grows by ``gamma`` where it is not (starting at ``radius`` (P,), a distance the caller already
    reached). One forward and one backward pass per step. Returns (x (P, n) — the closest label-changing iterate,
    x_hat where none was —, found (P,))."""
    x0 = torch.minimum(torch.maximum(pr.xh, pr.lo), pr.hi)
    free = (~pr.fixed).to(x0.dtype)
    P = len(pr)
    delta = torch.zeros_like(x0)
    eps = radius.to(x0.dtype).clone()
    best = torch.full((P,), math.inf, dtype=x0.dtype, device=x0.device)
    x_best = x0.clone()
    for k in range(steps):
        alpha = radius * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * k / steps)))
        x = (x0 + delta).requires_grad_(True)
        with torch.enable_grad():
            z = fn(x)
            # the log-odds against the source (for the target): the cross-entropy's (log-probability's) direction,
            # without its rounding to a zero gradient where the source's (target's) probability rounds to 1 (0)
            cls = pr.src if targets is None else targets
            rest = torch.logsumexp(z.scatter(1, cls[:, None], -math.inf), 1)
            loss = z.gather(1, cls[:, None])[:, 0] - rest
            loss = -loss if targets is None else loss
            (g,) = torch.autograd.grad(loss.sum(), x)
        z = z.detach()
        past = z.argmax(1) != pr.src if targets is None else z.argmax(1) == targets
        nrm = torch.sqrt((pr.w * delta**2).sum(1))
        closer = past & (nrm < best)
        best = torch.where(closer, nrm, best)
        x_best = torch.where(closer[:, None], x.detach(), x_best)
        eps = torch.where(past, eps * (1 - gamma), eps * (1 + gamma))
        g = g * free
        u = (g / pr.w) / torch.sqrt((g * g / pr.w).sum(1, keepdim=True)).clamp(min=_TINY)
        delta = delta + alpha[:, None] * u
        delta = delta * (eps / torch.sqrt((pr.w * delta**2).sum(1)).clamp(min=_TINY))[:, None]
        delta = torch.minimum(torch.maximum(x0 + delta, pr.lo), pr.hi) - x0
    return x_best, torch.isfinite(best)


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
    ts = torch.linspace(0, 1, samples + 1, dtype=x0.dtype, device=x0.device)[1:]
    first = torch.full((P,), samples, dtype=torch.long, device=x0.device)
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


def _homotopy(run: _Setup, pr: _Problems, steps: int, tau: float) -> _Iterates:
    """Continuation from a smooth, nearly linear deformation of the network (with an output shift that makes
    x_hat itself a flip point) to the trained network, warm-starting every step. Returns like _run_sqp."""
    model, shape = run.work, run.shape
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
            s = float(torch.tensor(rec.scales).median().clamp(min=1e-12))  # cpu-ok: Python floats
            betas = [(1.0 / s) * (1e4 ** (i / max(steps - 1, 1))) for i in range(steps)]

            def deform(i):  # softplus beta from 1/s (smooth) to 1e4/s, then the ReLU net itself
                return _Smoothed(betas[i]) if i < steps else _nullcontext()
        else:  # smooth net without erf: only the output shift is continued

            def deform(i):
                return _nullcontext()

    fn = _model_fn(model, shape)
    with torch.no_grad(), deform(0):
        z0 = fn(pr.xh)
    off0 = _feasible_offset(z0, pr.src, pr.tgt, run.opts.margin)
    x = pr.xh.clone()
    iters = torch.zeros(len(pr), dtype=torch.long, device=x.device)
    inner = max(10, run.opts.max_iter // 4)
    out = None
    x_smooth = x
    for i in tqdm(range(1, steps + 1), desc="homotopy", disable=not run.opts.progress, leave=False):
        sub = pr.with_offset(off0 * (1 - i / steps) if i < steps else None)
        x_smooth = x
        with deform(i):
            # the deformed nets are smooth; only the last step is on the model itself
            out = _run_sqp(run, fn, sub, x, run.opts.max_iter if i == steps else inner, f"homotopy {i}/{steps}",
                           nonsmooth=None if i == steps else False)
        x = out.x
        iters += out.iterations
    out.iterations = iters
    if run.opts.nonsmooth:
        # the last smooth stage is usually closer to the kinked optimum than the SQP on the kinks themselves gets:
        # project it (and the final attempt) onto the boundary exactly, keep the closest feasible
        failed = out.status != _CONVERGED
        if failed.any():
            i = torch.nonzero(failed)[:, 0]
            sub = pr.take(i)
            cands = [x[i], _restore_feasibility(fn, sub, x_smooth[i]), _restore_feasibility(fn, sub, x[i])]
            out.x[i] = _closest_feasible(fn, sub, cands, run.opts.margin, run.opts.tol)
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


def _closest_feasible(fn: ScoreFn, pr: _Problems, cands: list[torch.Tensor], margin: float, tol: float) -> torch.Tensor:
    """Per problem, the closest of the candidate points that is feasible (residual and margin within tolerance);
    the first candidate where none is."""
    best = cands[0].clone()
    best_f = torch.full((len(pr),), math.inf, dtype=best.dtype, device=best.device)
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
