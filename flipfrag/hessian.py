"""Input-Hessian analysis of smooth networks: the geometry section of Ghorbani et al. (notes §6).

"Notes §N" refers to the paper notes ``docs/papers/fragility.md``.

For a smooth (softplus) network with class score ``S(x)``, the simple-gradient saliency ``I(x) = grad S(x)`` moves as
``I(x + delta) ~ I(x) + H delta`` with ``H = grad^2_x S(x)`` the input Hessian, while the score moves as
``S(x + delta) ~ S(x) + grad S^T delta``. A perturbation nearly orthogonal to ``grad S`` (label kept) but aligned
with large-|eigenvalue| directions of ``H`` changes the saliency a lot. This module measures exactly that.

* :func:`hvp` / :func:`hessian_operator`: Hessian-vector products by double back-propagation, batched: ``fn`` maps
  ``(N, *shape) -> (N,)`` with independent samples, so one backward pass gives every sample's own ``H_n v_n``.
* :func:`input_hessian`: the full per-sample Hessian (small inputs only), :func:`top_eigenpairs`: the ``k``
  eigenpairs of largest ``|lambda|`` by batched Lanczos or block power (subspace) iteration. Input Hessians of
  networks are indefinite, so eigenvalues are ordered by magnitude and keep their signs.
* :func:`score_fn`: ``x -> model(x)[n, target_n]``; refuses ReLU networks (their Hessian is 0 almost everywhere)
  unless wrapped with :func:`flipfrag.smooth.softplus_surrogate`, and models in train mode.
* :func:`perturbation_geometry` (:func:`score_geometry` for a score function): ``cos(delta, grad S)``,
  ``||H delta|| / ||delta||``, first-order and actual score change, and the actual saliency change, for attack vs
  random perturbations (:func:`random_sign_like`).
* :func:`gradient_rotation`: the angle between ``grad S(x)`` and ``grad S(x + delta)``.

The section's experiments built on these — the 2-D toy (``toy_geometry_data``, ``fit_toy_models``,
``decision_grid``) and the input-dimension sweep (``TwoLayerSoftplus``, ``dimension_sweep``) — live in
:mod:`flipfrag.fragility.geometry`, next to the rest of the paper-2 geometry code; ``flipfrag.hessian.<name>`` still
finds them (loaded on first access).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_batch, stochastic_layers_training
from .smooth import has_relu

__all__ = [
    "hvp",
    "hessian_operator",
    "HessianOperator",
    "input_hessian",
    "EigenResult",
    "top_eigenpairs",
    "score_fn",
    "PerturbationGeometry",
    "perturbation_geometry",
    "random_sign_like",
    "score_geometry",
    "gradient_rotation",
]

#: Names that moved to :mod:`flipfrag.fragility.geometry` (the paper-2 geometry experiments) and are still found
#: here, loaded on first access (``hessian.fit_toy_models`` works; the algorithms never import the experiments).
_MOVED = ("toy_geometry_data", "ToyModels", "fit_toy_models", "decision_grid", "TwoLayerSoftplus", "dimension_sweep")


def __getattr__(name: str):
    if name in _MOVED:
        from .fragility import geometry

        return getattr(geometry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_MOVED])

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------------------------- validation


def _check_like(name: str, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.shape != x.shape:
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or inf")
    return v.to(x.dtype)


def _scores(fn: ScoreFn, x: torch.Tensor) -> torch.Tensor:
    s = fn(x)
    if not isinstance(s, torch.Tensor) or s.shape != (x.shape[0],):
        shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"fn must map (N, *shape) to one score per sample, shape ({x.shape[0]},); got {shape}")
    return s


# ----------------------------------------------------------------------------------------------- HVPs


class HessianOperator:
    """``v -> H v`` for every sample of a batch, reusing one gradient graph (double back-propagation).

    Built by :func:`hessian_operator`. ``grad`` holds ``grad_x fn(x)`` (N, *shape) and ``score`` ``fn(x)`` (N,),
    both detached. Calling with ``v`` (N, *shape) returns ``H_n v_n`` stacked (N, *shape).
    """

    def __init__(self, fn: ScoreFn, x: torch.Tensor):
        x = check_batch(x)
        if not callable(fn):
            raise TypeError("fn must be callable, (N, *shape) -> (N,)")
        self._x = x.detach().clone().requires_grad_(True)
        score = _scores(fn, self._x)
        if not score.requires_grad:
            raise ValueError("fn: its output does not depend on x (no autograd graph)")
        # Samples are independent, so d(sum_n S_n)/dx_n = grad S_n(x_n): one backward pass for the batch.
        (self._grad,) = torch.autograd.grad(score.sum(), self._x, create_graph=True, allow_unused=True)
        if self._grad is None:
            raise ValueError("fn: its output does not depend on x")
        self.score = score.detach()
        self.grad = self._grad.detach()
        self.shape = tuple(x.shape)
        # A gradient with no graph back to x (e.g. a linear model) means H = 0 exactly.
        self.is_zero = not self._grad.requires_grad
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        v = _check_like("v", v, self._x)
        self.calls += 1
        if self.is_zero:
            return torch.zeros_like(v)
        (hv,) = torch.autograd.grad(self._grad, self._x, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()


def hessian_operator(fn: ScoreFn, x: torch.Tensor) -> HessianOperator:
    """The batched Hessian-vector-product operator of ``fn`` at ``x`` (see :class:`HessianOperator`).

    Parameters
    ----------
    fn : callable
        ``(N, *shape) -> (N,)``, one scalar per sample, each depending only on its own sample (a model in eval mode).
        It is only ever called with inputs of the batch size of ``x``.
    x : Tensor (N, *shape)
        Not mutated.
    """
    return HessianOperator(fn, x)


def hvp(fn: ScoreFn, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hessian-vector products ``H_n v_n`` with ``H_n = grad^2_x fn(x)[n]``, shape (N, *shape).

    Double back-propagation: ``grad_x <grad_x fn(x), v>``. ``fn`` maps (N, *shape) -> (N,) with independent samples.
    """
    return hessian_operator(fn, x)(v)


def input_hessian(fn: ScoreFn, x: torch.Tensor) -> torch.Tensor:
    """Full per-sample input Hessian, shape (N, D, D) with ``D = prod(shape)`` (D HVPs; small inputs only)."""
    op = hessian_operator(fn, x)
    n, dim = x.shape[0], math.prod(x.shape[1:])
    cols = []
    for j in range(dim):
        e = torch.zeros(n, dim, dtype=x.dtype, device=x.device)
        e[:, j] = 1
        cols.append(op(e.view(x.shape)).reshape(n, dim))
    hess = torch.stack(cols, dim=2)
    return (hess + hess.transpose(1, 2)) / 2  # exact in exact arithmetic; removes rounding asymmetry


# ----------------------------------------------------------------------------------------------- eigenpairs


@dataclass
class EigenResult:
    """Top eigenpairs of per-sample input Hessians (ordered by decreasing ``|lambda|``).

    Attributes
    ----------
    eigenvalues : Tensor (N, k)
        Signed eigenvalues; ``|eigenvalues|`` is non-increasing along dim 1.
    eigenvectors : Tensor (N, k, *shape)
        Unit L2 norm, mutually orthogonal per sample, arbitrary sign.
    residuals : Tensor (N, k)
        ``||H v - lambda v||``: how well each pair is converged (0 for an exact pair).
    hvp_calls : int
        Batched Hessian-vector products used (the cost).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    hvp_calls: int


def _orthonormal_random(n: int, dim: int, k: int, gen: torch.Generator, dtype, against: torch.Tensor | None = None):
    v = torch.randn(n, dim, k, generator=gen, dtype=torch.float64).to(dtype)
    if against is not None:  # project out the columns of `against` (n, dim, m), twice for stability
        for _ in range(2):
            v = v - against @ (against.transpose(1, 2) @ v)
    return torch.linalg.qr(v).Q


def top_eigenpairs(
    fn: ScoreFn,
    x: torch.Tensor,
    k: int = 1,
    *,
    method: str = "lanczos",
    iters: int | None = None,
    tol: float = 1e-8,
    seed: int = 0,
    progress: bool = False,
) -> EigenResult:
    """The ``k`` eigenpairs of largest magnitude of each sample's input Hessian ``grad^2_x fn(x)[n]``.

    Parameters
    ----------
    fn : callable
        ``(N, *shape) -> (N,)`` with independent samples, e.g. :func:`score_fn` of a smooth model.
    x : Tensor (N, *shape)
        Not mutated. All samples are processed together (one batched HVP per step).
    k : int
        Number of eigenpairs, ``1 <= k <= D`` with ``D = prod(shape)``.
    method : {"lanczos", "power"}
        ``"lanczos"`` (default): Lanczos with full re-orthogonalisation for ``iters`` steps (default
        ``min(D, max(4k, 30))``; with ``iters = D`` it is exact to rounding), Ritz pairs of largest ``|theta|``.
        ``"power"``: block power (subspace) iteration on ``p = min(D, 2k + 2)`` vectors with Rayleigh-Ritz, until
        the top-``k`` Ritz magnitudes change by less than ``tol`` (relative) or ``iters`` steps (default 300);
        converges at rate ``|lambda_{p+1} / lambda_k|`` per step, so it needs a gap in the magnitudes.
    tol : float
        Lanczos breakdown threshold / power-iteration stopping tolerance (relative).
    seed : int
        Seed of the random start vectors (a local ``torch.Generator``).
    progress : bool
        tqdm over iterations.

    Returns
    -------
    EigenResult
        Eigenvalues (N, k) sorted by decreasing magnitude (signs kept: network Hessians are indefinite),
        eigenvectors (N, k, *shape), residual norms (N, k).
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    op = hessian_operator(fn, x)
    n, dim = x.shape[0], math.prod(x.shape[1:])
    if not 1 <= int(k) <= dim:
        raise ValueError(f"k must be in [1, {dim}] (the input dimension), got {k}")
    k = int(k)
    if iters is not None and int(iters) < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    gen = torch.Generator().manual_seed(int(seed))

    def apply(v: torch.Tensor) -> torch.Tensor:  # (n, dim) -> (n, dim)
        return op(v.reshape(x.shape)).reshape(n, dim)

    if method == "lanczos":
        m = min(dim, int(iters) if iters is not None else max(4 * k, 30))
        m = max(m, k)
        vals, vecs = _lanczos(apply, n, dim, m, k, tol, gen, x.dtype, progress)
    else:
        vals, vecs = _block_power(
            apply, n, dim, k, int(iters) if iters is not None else 300, tol, gen, x.dtype, progress
        )
    # residuals ||H v - lambda v|| (k more batched HVPs)
    res = torch.stack([(apply(vecs[:, j]) - vals[:, j, None] * vecs[:, j]).norm(dim=1) for j in range(k)], dim=1)
    return EigenResult(vals, vecs.reshape(n, k, *x.shape[1:]), res, op.calls)


def _select_by_magnitude(theta: torch.Tensor, vecs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """theta (n, m), vecs (n, dim, m) -> the k of largest |theta|: (n, k), (n, k, dim)."""
    order = torch.argsort(theta.abs(), dim=1, descending=True, stable=True)[:, :k]
    vals = theta.gather(1, order)
    sel = vecs.gather(2, order[:, None, :].expand(-1, vecs.shape[1], -1))
    return vals, sel.transpose(1, 2)


def _lanczos(apply, n, dim, m, k, tol, gen, dtype, progress):
    Q = torch.zeros(n, m, dim, dtype=dtype)
    alpha = torch.zeros(n, m, dtype=dtype)
    beta = torch.zeros(n, max(m - 1, 0), dtype=dtype)
    q = _orthonormal_random(n, dim, 1, gen, dtype)[:, :, 0]
    scale = torch.zeros(n, dtype=dtype)  # running estimate of ||H||, for the relative breakdown test
    for j in tqdm(range(m), desc="lanczos", disable=not progress, leave=False):
        Q[:, j] = q
        w = apply(q)
        alpha[:, j] = (w * q).sum(1)
        basis = Q[:, : j + 1]
        for _ in range(2):  # full re-orthogonalisation, twice ("twice is enough")
            w = w - torch.einsum("njd,nj->nd", basis, torch.einsum("njd,nd->nj", basis, w))
        b = w.norm(dim=1)
        scale = torch.maximum(scale, alpha[:, j].abs() + b)
        if j == m - 1:
            break
        broke = b <= tol * torch.clamp(scale, min=torch.finfo(dtype).tiny)
        if broke.any():
            # Invariant subspace found: restart with a random vector orthogonal to the basis. The tridiagonal
            # matrix gets a zero off-diagonal there, which is exact because H q_j lies in span(Q).
            fresh = _orthonormal_random(n, dim, 1, gen, dtype, against=basis.transpose(1, 2))[:, :, 0]
            w = torch.where(broke[:, None], fresh, w)
            b = torch.where(broke, torch.zeros_like(b), b)
            q = w / torch.where(broke, torch.ones_like(b), b)[:, None]
        else:
            q = w / b[:, None]
        beta[:, j] = b
    T = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    theta, S = torch.linalg.eigh(T)
    ritz = torch.einsum("nmd,nmr->ndr", Q, S)  # (n, dim, m)
    return _select_by_magnitude(theta, ritz, k)


def _block_power(apply, n, dim, k, iters, tol, gen, dtype, progress):
    # Oversampling (p > k vectors) speeds convergence from |lambda_{k+1}/lambda_k| to |lambda_{p+1}/lambda_k| per step.
    p = min(dim, 2 * k + 2)
    V = _orthonormal_random(n, dim, p, gen, dtype)  # (n, dim, p)
    prev = None
    for _ in tqdm(range(iters), desc="power", disable=not progress, leave=False):
        HV = torch.stack([apply(V[:, :, j]) for j in range(p)], dim=2)
        T = V.transpose(1, 2) @ HV
        mags = torch.linalg.eigvalsh((T + T.transpose(1, 2)) / 2).abs().sort(dim=1, descending=True).values[:, :k]
        if prev is not None and bool(((mags - prev).abs() <= tol * mags[:, :1].clamp(min=1e-300)).all()):
            break
        prev = mags
        V = torch.linalg.qr(HV).Q
    HV = torch.stack([apply(V[:, :, j]) for j in range(p)], dim=2)
    T = V.transpose(1, 2) @ HV
    theta, S = torch.linalg.eigh((T + T.transpose(1, 2)) / 2)
    return _select_by_magnitude(theta, V @ S, k)


# ----------------------------------------------------------------------------------------------- scores


def score_fn(model: nn.Module, target: int | torch.Tensor, *, require_smooth: bool = True) -> ScoreFn:
    """``fn(x) = model(x)[n, target_n]``, the class score per sample, for :func:`hvp` and friends.

    Parameters
    ----------
    model : nn.Module
        ``(N, *shape) -> (N, C)`` pre-softmax scores, in eval mode (train-mode batch norm couples samples).
    target : int or LongTensor (N,)
        Class per sample (an int is used for every sample).
    require_smooth : bool
        If True (default), the first call raises ``ValueError`` when ``model`` still makes ReLU calls: its input
        Hessian is zero almost everywhere. Wrap it with :func:`flipfrag.smooth.softplus_surrogate` first.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if stochastic_layers_training(model):
        raise ValueError("model is in train mode (batch norm / dropout couple or randomise samples); call .eval()")
    if isinstance(target, torch.Tensor):
        if target.dim() != 1 or target.dtype not in (torch.int64, torch.int32):
            raise ValueError("target must be an int or a LongTensor of shape (N,)")
    elif not isinstance(target, (int, np.integer)):
        raise TypeError(f"target must be an int or a LongTensor, got {type(target).__name__}")
    checked = not require_smooth

    def fn(x: torch.Tensor) -> torch.Tensor:
        nonlocal checked
        if not checked:
            if has_relu(model, x[:1].detach()):
                raise ValueError(
                    "model: has ReLU activations, so its input Hessian is 0 almost everywhere; "
                    "use flipfrag.smooth.softplus_surrogate(model, beta) for second-order analysis"
                )
            checked = True
        out = model(x)
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ValueError(f"model must return (N, C) scores, got {tuple(out.shape)}")
        t = target if isinstance(target, torch.Tensor) else torch.full((x.shape[0],), int(target))
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"target has {t.shape[0]} entries for a batch of {x.shape[0]}")
        if bool((t < 0).any() or (t >= out.shape[1]).any()):
            raise ValueError(f"target must be in [0, {out.shape[1]})")
        return out[torch.arange(x.shape[0]), t.to(out.device)]

    return fn


def _grad(fn: ScoreFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.detach().clone().requires_grad_(True)
    s = _scores(fn, xr)
    (g,) = torch.autograd.grad(s.sum(), xr, allow_unused=True)
    return s.detach(), (torch.zeros_like(xr) if g is None else g.detach())


def _target_or_pred(model: nn.Module, x: torch.Tensor, target) -> int | torch.Tensor:
    if target is not None:
        return target
    with torch.no_grad():
        return model(x).argmax(1)


# ----------------------------------------------------------------------------------------------- geometry


@dataclass
class PerturbationGeometry:
    """First- and second-order view of perturbations ``delta`` at ``x``; every field has shape (N,).

    Attributes
    ----------
    cos_grad : cos(delta, grad S(x)) — near 0 for attacks that keep the label (notes §6).
    hess_gain : ||H delta|| / ||delta|| — the curvature seen along delta.
    hess_delta_norm : ||H delta||, the predicted (linearised) saliency change.
    first_order : grad S(x)^T delta, the predicted score change.
    score_change : S(x + delta) - S(x), the actual score change.
    saliency_change : ||grad S(x + delta) - grad S(x)||, the actual change of the simple-gradient map.
    relative_saliency_change : saliency_change / ||grad S(x)||.
    delta_l2, delta_linf : the size of delta.
    """

    cos_grad: torch.Tensor
    hess_gain: torch.Tensor
    hess_delta_norm: torch.Tensor
    first_order: torch.Tensor
    score_change: torch.Tensor
    saliency_change: torch.Tensor
    relative_saliency_change: torch.Tensor
    delta_l2: torch.Tensor
    delta_linf: torch.Tensor


def score_geometry(fn: ScoreFn, x: torch.Tensor, deltas: torch.Tensor) -> PerturbationGeometry:
    """:class:`PerturbationGeometry` of ``deltas`` at ``x`` for a score function ``fn`` ((N, *shape) -> (N,), e.g.
    :func:`score_fn` or a :class:`~flipfrag.fragility.TwoLayerSoftplus`); unchecked: :func:`perturbation_geometry`
    checks its arguments and then calls this."""
    n = x.shape[0]
    op = hessian_operator(fn, x)
    g = op.grad.reshape(n, -1)
    d = deltas.reshape(n, -1)
    hd = op(deltas).reshape(n, -1)
    s1, g1 = _grad(fn, x + deltas)
    dl2 = d.norm(dim=1)
    gn = g.norm(dim=1)
    safe = lambda t: torch.where(t > 0, t, torch.ones_like(t))  # noqa: E731 - 0/0 -> 0 for zero deltas/grads
    sal = (g1.reshape(n, -1) - g).norm(dim=1)
    return PerturbationGeometry(
        cos_grad=(d * g).sum(1) / safe(dl2 * gn),
        hess_gain=hd.norm(dim=1) / safe(dl2),
        hess_delta_norm=hd.norm(dim=1),
        first_order=(d * g).sum(1),
        score_change=s1 - op.score,
        saliency_change=sal,
        relative_saliency_change=sal / safe(gn),
        delta_l2=dl2,
        delta_linf=d.abs().amax(dim=1),
    )


def perturbation_geometry(
    model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None, deltas: torch.Tensor
) -> PerturbationGeometry:
    """How perturbations ``deltas`` relate to the score gradient and the input Hessian at ``x`` (notes §6).

    Parameters
    ----------
    model : nn.Module
        A smooth model (e.g. ``softplus_surrogate(relu_model)``) in eval mode, (N, *shape) -> (N, C).
    x : Tensor (N, *shape)
    target : int, LongTensor (N,) or None
        Class whose score ``S`` is analysed; None = the predicted class at ``x``.
    deltas : Tensor (N, *shape)
        One perturbation per sample (attack ``x_adv - x``, or :func:`random_sign_like` of the same size).

    Returns
    -------
    PerturbationGeometry
        Expected (notes §6): attack perturbations have ``cos_grad ~ 0`` and a much larger ``hess_gain`` than random
        ones of the same size.
    """
    x = check_batch(x)
    deltas = _check_like("deltas", deltas, x)
    return score_geometry(score_fn(model, _target_or_pred(model, x, target)), x, deltas)


def random_sign_like(
    x: torch.Tensor, eps: float, seed: int = 0, *, lower: float | None = None, upper: float | None = None
) -> torch.Tensor:
    """Random sign perturbation ``eps * sign(N(0, 1))`` of the shape of ``x`` (seeded, local generator).

    With ``lower`` / ``upper`` the perturbation is shrunk so that ``x + delta`` stays in bounds
    (i.e. ``clip(x + delta) - x``). Returns ``delta`` (N, *shape), not ``x + delta``.
    """
    x = check_batch(x)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    gen = torch.Generator().manual_seed(int(seed))
    delta = eps * torch.sign(torch.randn(x.shape, generator=gen, dtype=torch.float64)).to(x.dtype)
    if lower is not None or upper is not None:
        delta = (x + delta).clamp(lower, upper) - x
    return delta


def gradient_rotation(
    model: nn.Module, x: torch.Tensor, delta: torch.Tensor, target: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Angle in degrees between ``grad S(x)`` and ``grad S(x + delta)`` per sample, shape (N,).

    ``S`` is the score of ``target`` (default: the class predicted at ``x``). Works for any differentiable model
    (no smoothness needed). A linear model gives exactly 0. Uses the stable ``2 atan2(|a - b|, |a + b|)`` of unit
    vectors ``a``, ``b``; 0 if either gradient is 0.
    """
    x = check_batch(x)
    delta = _check_like("delta", delta, x)
    fn = score_fn(model, _target_or_pred(model, x, target), require_smooth=False)
    n = x.shape[0]
    _, g0 = _grad(fn, x)
    _, g1 = _grad(fn, x + delta)
    a, b = g0.reshape(n, -1), g1.reshape(n, -1)
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    ok = (na[:, 0] > 0) & (nb[:, 0] > 0)
    a = a / torch.where(na > 0, na, torch.ones_like(na))
    b = b / torch.where(nb > 0, nb, torch.ones_like(nb))
    ang = 2 * torch.atan2((a - b).norm(dim=1), (a + b).norm(dim=1))
    return torch.where(ok, torch.rad2deg(ang), torch.zeros_like(ang))
