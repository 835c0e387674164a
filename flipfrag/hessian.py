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
* :func:`perturbation_geometry`: ``cos(delta, grad S)``, ``||H delta|| / ||delta||``, first-order and actual score
  change, and the actual saliency change, for attack vs random perturbations (:func:`random_sign_like`).
* The 2-D toy of the section: :func:`toy_geometry_data`, :func:`fit_toy_models`, :func:`gradient_rotation`,
  :func:`decision_grid` (arrays for contour plots; plotting lives in the notebooks).
* :class:`TwoLayerSoftplus` and :func:`dimension_sweep`: ``S(x) = w^T softplus(W x)`` with the closed-form Hessian
  ``W^T diag(w * softplus''(W x)) W``, ``softplus'' = sigmoid * (1 - sigmoid)``, and how fragile its gradient is
  as the input dimension grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
    "gradient_rotation",
    "toy_geometry_data",
    "ToyModels",
    "fit_toy_models",
    "decision_grid",
    "TwoLayerSoftplus",
    "dimension_sweep",
]

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


def _geometry(fn: ScoreFn, x: torch.Tensor, deltas: torch.Tensor) -> PerturbationGeometry:
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
    return _geometry(score_fn(model, _target_or_pred(model, x, target)), x, deltas)


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


# ----------------------------------------------------------------------------------------------- the 2-D toy


def toy_geometry_data(
    n: int = 400, seed: int = 0, *, kind: str = "moons", noise: float = 0.1, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D two-class data set with a curved decision boundary.

    ``kind="moons"``: two interleaved half circles (as scikit-learn's ``make_moons``); ``"circles"``: a disc of
    radius 0.5 inside a ring of radius 1. Gaussian noise of std ``noise`` is added. Returns ``X`` (n, 2) and
    ``y`` (n,) LongTensor with ``n // 2`` points of class 0 first, then class 1 (shuffle before minibatching).
    """
    if kind not in ("moons", "circles"):
        raise ValueError(f"kind must be 'moons' or 'circles', got {kind!r}")
    if int(n) < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    gen = torch.Generator().manual_seed(int(seed))
    n0 = int(n) // 2
    n1 = int(n) - n0
    t0 = torch.rand(n0, generator=gen, dtype=torch.float64) * math.pi
    t1 = torch.rand(n1, generator=gen, dtype=torch.float64) * math.pi
    if kind == "moons":
        a = torch.stack([torch.cos(t0), torch.sin(t0)], 1)
        b = torch.stack([1 - torch.cos(t1), 0.5 - torch.sin(t1)], 1)
    else:
        a = torch.stack([torch.cos(2 * t0), torch.sin(2 * t0)], 1)
        b = 0.5 * torch.stack([torch.cos(2 * t1), torch.sin(2 * t1)], 1)
    X = torch.cat([a, b]) + noise * torch.randn(int(n), 2, generator=gen, dtype=torch.float64)
    y = torch.cat([torch.zeros(n0, dtype=torch.long), torch.ones(n1, dtype=torch.long)])
    return X.to(dtype), y


@dataclass
class ToyModels:
    """The 2-D toy: a softplus MLP and a logistic regression (a linear 2-class model) trained on ``X``, ``y``."""

    mlp: nn.Module
    linear: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    mlp_accuracy: float
    linear_accuracy: float


def fit_toy_models(
    seed: int = 0,
    *,
    n: int = 400,
    kind: str = "moons",
    noise: float = 0.1,
    hidden: Sequence[int] = (32, 32),
    epochs: int = 150,
    lr: float = 1e-2,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> ToyModels:
    """Train the geometry section's toy models (seconds on a CPU).

    A :class:`flipfrag.models.MLP` with softplus activations (curved boundary, smooth, so its input Hessian is
    meaningful) and a logistic regression (``MLP`` with no hidden layer: two logits of a linear map, i.e. softmax
    regression with 2 classes) on :func:`toy_geometry_data` ``(n, seed, kind=kind, noise=noise)``; both with
    :func:`flipfrag.models.train` (Adam, batches of 64, ``epochs``, ``lr``, ``seed``). Models are in eval mode.
    """
    from .models import MLP, evaluate, train

    X, y = toy_geometry_data(n, seed, kind=kind, noise=noise, dtype=dtype)
    # MLP initialisation and train() draw from the global RNG: seed it inside a fork so the caller's state is kept
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = MLP(2, list(hidden), 2, activation="softplus").to(dtype)
        linear = MLP(2, [], 2, activation="softplus").to(dtype)
        for model in (mlp, linear):
            train(model, X, y, epochs=epochs, lr=lr, batch_size=64, seed=seed, progress=progress)
    return ToyModels(mlp.eval(), linear.eval(), X, y, evaluate(mlp, X, y), evaluate(linear, X, y))


def decision_grid(
    model: nn.Module,
    xlim: tuple[float, float],
    ylim: tuple[float, float],
    n: int = 200,
    *,
    target: int = 1,
    value: str = "prob",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Values of a 2-D model on an ``n x n`` grid, for contour plots.

    Returns ``(xx, yy, z)``, each (n, n) numpy arrays (``xx[i, j]`` varies along ``j``, as ``np.meshgrid``);
    ``z`` is ``value="prob"``: the softmax probability of ``target``; ``"score"``: its logit ``S_target``;
    ``"margin"``: ``S_target - max_{c != target} S_c`` (0 on the decision boundary).
    """
    if value not in ("prob", "score", "margin"):
        raise ValueError(f"value must be 'prob', 'score' or 'margin', got {value!r}")
    if int(n) < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    for name, lim in (("xlim", xlim), ("ylim", ylim)):
        if len(lim) != 2 or not lim[0] < lim[1]:
            raise ValueError(f"{name} must be (low, high) with low < high, got {lim}")
    xs = np.linspace(xlim[0], xlim[1], int(n))
    ys = np.linspace(ylim[0], ylim[1], int(n))
    xx, yy = np.meshgrid(xs, ys)
    dtype = next(model.parameters()).dtype
    pts = torch.as_tensor(np.stack([xx.ravel(), yy.ravel()], 1), dtype=dtype)
    with torch.no_grad():
        out = model.eval()(pts)
    if out.dim() != 2 or out.shape[1] < 2 or not 0 <= target < out.shape[1]:
        raise ValueError(f"target must index the model's {out.shape[-1]} outputs, got {target}")
    if value == "prob":
        z = torch.softmax(out, 1)[:, target]
    elif value == "score":
        z = out[:, target]
    else:
        others = torch.cat([out[:, :target], out[:, target + 1 :]], 1)
        z = out[:, target] - others.max(1).values
    return xx, yy, z.reshape(int(n), int(n)).double().numpy()


# ----------------------------------------------------------------------------------------------- dimension


class TwoLayerSoftplus(nn.Module):
    """``S(x) = w^T softplus(W x)``: the section's worked model, one score per sample.

    ``forward`` maps (N, d) to (N,) (use it directly as ``fn`` in :func:`hvp` / :func:`top_eigenpairs`). Its
    gradient is ``W^T (w * sigmoid(W x))`` and its Hessian ``W^T diag(w * sigmoid(W x) * (1 - sigmoid(W x))) W``
    (rank <= width).

    Parameters
    ----------
    W : Tensor (width, d)
    w : Tensor (width,)
    """

    def __init__(self, W: torch.Tensor, w: torch.Tensor):
        super().__init__()
        if W.dim() != 2 or w.shape != (W.shape[0],):
            raise ValueError(f"W must be (width, d) and w (width,), got {tuple(W.shape)} and {tuple(w.shape)}")
        self.W = nn.Parameter(W.detach().clone())
        self.w = nn.Parameter(w.detach().clone())

    @classmethod
    def random(cls, d: int, width: int = 64, seed: int = 0, dtype: torch.dtype = torch.float64) -> TwoLayerSoftplus:
        """Gaussian weights with fan-in scaling: ``W ~ N(0, 1/d)``, ``w ~ N(0, 1/width)``."""
        gen = torch.Generator().manual_seed(int(seed))
        W = torch.randn(width, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        w = torch.randn(width, generator=gen, dtype=torch.float64) / math.sqrt(width)
        return cls(W.to(dtype), w.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(x.flatten(1) @ self.W.T) @ self.w


def dimension_sweep(
    dims: Sequence[int] = (4, 16, 64, 256, 1024),
    *,
    width: int = 64,
    eps: float = 0.05,
    n_points: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Fragility of the simple gradient of a random :class:`TwoLayerSoftplus` net versus input dimension ``d``.

    For each ``d``: a random net (``TwoLayerSoftplus.random(d, width, seed)``), ``n_points`` inputs
    ``x ~ N(0, I_d)``, and two L-inf perturbations of size ``eps`` per coordinate: ``"random"`` =
    ``eps * sign(N(0, 1))`` and ``"aligned"`` = ``eps * sign(v_1)`` with ``v_1`` the top-|eigenvalue| eigenvector of
    the input Hessian at ``x`` (Lanczos). Reports the relative saliency change
    ``||grad S(x + delta) - grad S(x)|| / ||grad S(x)||`` (exact, not linearised) and ``|cos(delta, grad S)|``.

    With fan-in scaling a random sign vector's projections ``W delta`` stay O(eps) as d grows, while the aligned one's
    grow like ``eps sqrt(d)`` (its L1-norm argument): the aligned change grows with d, the random one does not.

    Returns
    -------
    dict of numpy arrays, each of length ``len(dims)``
        ``dims``, ``random_mean``, ``random_std``, ``aligned_mean``, ``aligned_std``, ``random_cos``, ``aligned_cos``.
    """
    dims = [int(d) for d in dims]
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"dims must be a non-empty sequence of ints >= 1, got {dims}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    if int(n_points) < 1 or int(width) < 1:
        raise ValueError(f"n_points and width must be >= 1, got {n_points} and {width}")
    out: dict[str, list[float]] = {
        k: [] for k in ("random_mean", "random_std", "aligned_mean", "aligned_std", "random_cos", "aligned_cos")
    }
    for i, d in enumerate(tqdm(dims, desc="dimension sweep", disable=not progress, leave=False)):
        net = TwoLayerSoftplus.random(d, width, seed=seed + i)
        gen = torch.Generator().manual_seed(seed + 1000 + i)
        x = torch.randn(int(n_points), d, generator=gen, dtype=torch.float64)
        rand = eps * torch.sign(torch.randn(x.shape, generator=gen, dtype=torch.float64))
        top = top_eigenpairs(net, x, 1, method="lanczos", iters=min(d, max(2 * width, 30)), seed=seed + i)
        aligned = eps * torch.sign(top.eigenvectors[:, 0])
        for name, delta in (("random", rand), ("aligned", aligned)):
            geo = _geometry(net, x, delta)
            out[f"{name}_mean"].append(float(geo.relative_saliency_change.mean()))
            out[f"{name}_std"].append(float(geo.relative_saliency_change.std(correction=0)))
            out[f"{name}_cos"].append(float(geo.cos_grad.abs().mean()))
    return {"dims": np.array(dims), **{k: np.array(v) for k, v in out.items()}}
