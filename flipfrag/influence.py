"""Influence functions for a logistic layer on frozen features, and Ghorbani et al.'s attack on them.

The model (``docs/papers/fragility.md`` §5):
a frozen feature extractor ``phi`` (Inception v3 pool features in the paper, 2048-d) and on
top a single logistic unit with parameters ``theta = (w, b)``, ``w`` in R^d, stored flat as ``theta[:d] = w``,
``theta[d] = b`` (the authors' ``W_flat``). For a feature vector ``f`` the logit is ``z = w . f + b`` and
``p = sigmoid(z)`` is the probability of class 1. Two per-example losses are offered:

* ``"bce"``: log loss ``-y log p - (1 - y) log(1 - p)`` (the principled choice; convex).
* ``"mse"``: ``(y - p)^2``, the squared error on the sigmoid output the authors' code trains with
  (``tf.squared_difference``; "yes, I know this isn't cross entropy"). Not convex: its parameter Hessian can be
  indefinite away from a minimum.

The training objective of :func:`fit_logistic` is ``R(theta) = (1/n) sum_i s_i L(z_i; theta) + (l2 / 2) ||w||^2``
(sample weights ``s_i`` default to 1; the bias is not penalised).

Conventions (read these before comparing numbers)
-------------------------------------------------
* Hessian: ``H = (1/n) sum_i grad^2_theta L(z_i) + l2 * diag(1, ..., 1, 0) + damping * I``, the exact
  ``(d+1) x (d+1)`` Hessian of the mean training objective at ``theta`` (the authors: Hessian of the summed loss
  divided by ``n``, damping 0, ``np.linalg.inv``). We solve with a Cholesky factorisation (LU if ``H`` is not
  positive definite), never an explicit inverse; the result equals ``g_t^T inv(H) g_i`` to rounding.
* Koh & Liang's influence of up-weighting training point ``z_i`` on the loss at a test point ``z_t`` is
  ``I_up,loss(z_i, z_t) = -grad L(z_t)^T H^-1 grad L(z_i)``: the derivative of the test loss with respect to an extra
  weight ``eps`` on ``z_i`` in the training objective. Removing ``z_i`` (``eps = -1/n``) changes the test loss by about
  ``-(1/n) I_up,loss``. ``sign="koh_liang"`` returns ``I_up,loss``.
* ``sign="paper"`` (the default) returns ``+grad L(z_t)^T H^-1 grad L(z_i) = -I_up,loss``, the authors' code (which
  omits the minus sign). Positive means *helpful*: removing ``z_i`` would increase the test loss. "The most influential
  training points" are the ones with the largest paper-convention score.
* ``normalize=True`` (the default, as in the authors' code) divides each test point's vector of influences over all
  training points by its L2 norm. Rank correlation and top-k overlap do not depend on it.
* The label of a test point is the head's predicted label unless ``test_y`` is given (the authors use the prediction).
* Damping: with more parameters than training points (the paper: 2049 vs 1000) and no penalty, ``H`` has rank at most
  ``n`` and is singular; the authors' ``damping=0`` inverse is then rounding noise. :class:`LogisticInfluence` raises
  in that case: pass ``damping > 0`` or fit with ``l2 > 0`` (and report the value).

The attack (§5 "Attack"): :func:`influence_attack`. Metrics: :func:`influence_rank_correlation` (Spearman, SciPy's
average-rank tie handling) and :func:`topk_overlap`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._checks import stochastic_layers_training
from ._options import Options

__all__ = [
    "LOSSES",
    "LogisticHead",
    "fit_logistic",
    "FitOptions",
    "logistic_loss",
    "per_example_grads",
    "param_hessian",
    "LogisticInfluence",
    "influence_scores",
    "top_influential",
    "influence_rank_correlation",
    "topk_overlap",
    "InfluenceAttackResult",
    "influence_attack",
    "InfluenceAttackOptions",
    "random_sign_influence",
    "evaluate_influence_change",
]

LOSSES = ("bce", "mse")
_SIGNS = ("paper", "koh_liang")


# ----------------------------------------------------------------------------------------------- validation


def _check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def _check_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _as_features(name: str, feats: torch.Tensor, d: int | None = None) -> torch.Tensor:
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(feats).__name__}")
    if feats.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(feats.shape)}")
    if d is not None and feats.shape[1] != d:
        raise ValueError(f"{name} must have {d} features per row (the head's dimension), got {feats.shape[1]}")
    if not feats.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {feats.dtype}")
    if not torch.isfinite(feats).all():
        raise ValueError(f"{name} contains NaN or inf")
    return feats


def _as_labels(name: str, y: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    y = y.reshape(-1) if y.dim() == 2 and y.shape[1] == 1 else y  # accept the authors' (n, 1) column
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the features, got {tuple(y.shape)}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{name} must contain only the labels 0 and 1")
    return y


# ----------------------------------------------------------------------------------------------- the model


def _augment(feats: torch.Tensor) -> torch.Tensor:
    """Append the constant 1 that multiplies the bias: (n, d) -> (n, d + 1)."""
    return torch.cat([feats, feats.new_ones(feats.shape[0], 1)], dim=1)


def logistic_loss(z: torch.Tensor, y: torch.Tensor, loss: str = "bce") -> torch.Tensor:
    """Per-example loss of a logistic unit from its logits ``z`` (n,) and labels ``y`` (n,) in {0, 1}. Shape (n,)."""
    _check_loss(loss)
    y = y.to(z.dtype)
    if loss == "bce":
        # softplus(z) - y z == -y log p - (1-y) log(1-p), stable for large |z|
        return nn.functional.softplus(z) - y * z
    return (y - torch.sigmoid(z)) ** 2


def _dloss_dz(z: torch.Tensor, y: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivative of the per-example loss with respect to the logit (closed forms), each (n,)."""
    y = y.to(z.dtype)
    p, q = torch.sigmoid(z), torch.sigmoid(-z)  # q = 1 - p without cancellation
    if loss == "bce":
        return p - y, p * q
    # L = (p - y)^2, dp/dz = p q, d(pq)/dz = p q (1 - 2p)
    g = 2 * (p - y) * p * q
    h = 2 * p * q * (p * q + (p - y) * (q - p))
    return g, h


class LogisticHead(nn.Module):
    """A single logistic unit ``p(y=1 | f) = sigmoid(w . f + b)`` on frozen features.

    Parameters
    ----------
    d : int
        Feature dimension.
    loss : {"bce", "mse"}
        The loss the head is (to be) trained with; used as the default by the influence functions.
    l2 : float
        The L2 penalty on ``w`` of the training objective (default 0); also the influence Hessian's default.
    dtype : torch.dtype
        Parameter dtype (default float64: influence needs an accurate Hessian solve).

    Attributes
    ----------
    theta : nn.Parameter, shape (d + 1,)
        ``theta[:d] = w``, ``theta[d] = b`` (the authors' ``W_flat``).
    fit_info : dict
        Filled by :func:`fit_logistic`: ``method``, ``iterations``, ``grad_norm`` (inf-norm of the objective's gradient
        at the end), ``converged``.
    """

    def __init__(self, d: int, *, loss: str = "bce", l2: float = 0.0, dtype: torch.dtype = torch.float64):
        super().__init__()
        if int(d) < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        self.loss = _check_loss(loss)
        self.l2 = _check_nonneg("l2", l2)
        self.theta = nn.Parameter(torch.zeros(int(d) + 1, dtype=dtype))
        self.fit_info: dict = {}

    @property
    def d(self) -> int:
        return self.theta.shape[0] - 1

    @property
    def weight(self) -> torch.Tensor:
        return self.theta[:-1]

    @property
    def bias(self) -> torch.Tensor:
        return self.theta[-1]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits ``z = w . f + b``: (n, d) -> (n,)."""
        return feats.to(self.theta.dtype) @ self.theta[:-1] + self.theta[-1]

    @torch.no_grad()
    def predict_proba(self, feats: torch.Tensor) -> torch.Tensor:
        """``p(y = 1 | f)``, shape (n,)."""
        return torch.sigmoid(self(feats))

    @torch.no_grad()
    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        """Predicted labels in {0, 1} (``p >= 0.5``, as the authors' ``make_prediction``), LongTensor (n,)."""
        return (self(feats) >= 0).long()


def _objective(theta, fa, y, s, loss, l2):
    z = fa @ theta
    return (s * logistic_loss(z, y, loss)).mean() + 0.5 * l2 * (theta[:-1] ** 2).sum()


def _grad_and_hessian(theta, fa, y, s, loss, l2):
    z = fa @ theta
    g1, h1 = _dloss_dz(z, y, loss)
    n = fa.shape[0]
    grad = fa.T @ (s * g1) / n
    grad[:-1] += l2 * theta[:-1]
    hess = (fa.T * (s * h1)) @ fa / n
    idx = torch.arange(theta.shape[0] - 1)
    hess[idx, idx] += l2
    return grad, hess


@dataclass(frozen=True)
class FitOptions(Options):
    """The optimiser of :func:`fit_logistic` (validated when made; keywords of the call override the fields).

    ``method="newton"`` (default): full-batch damped Newton with a backtracking line search, run until the objective's
    gradient inf-norm is below ``tol`` or ``max_iter`` steps; exact to rounding for BCE, the method to use for
    leave-one-out oracles. ``"lbfgs"``: ``torch.optim.LBFGS`` with a strong-Wolfe line search (``max_iter`` steps).
    ``"adam"``: the authors' recipe (Adam, ``epochs`` passes over minibatches of ``batch_size``, learning rate ``lr``,
    shuffled with ``seed``; defaults: their 10 epochs of batches of 100, Adam's 1e-3); stops early, so
    ``fit_info["converged"]`` is usually False. ``dtype``: computation and parameter dtype (float64); ``progress``:
    a tqdm bar over iterations / epochs.
    """

    method: str = "newton"
    max_iter: int = 100
    tol: float = 1e-10
    epochs: int = 10
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    dtype: torch.dtype = torch.float64
    progress: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("newton", "lbfgs", "adam"):
            raise ValueError(f"method must be 'newton', 'lbfgs' or 'adam', got {self.method!r}")
        if int(self.max_iter) < 1 or int(self.epochs) < 0 or int(self.batch_size) < 1:
            raise ValueError(f"need max_iter >= 1, epochs >= 0, batch_size >= 1; got {self.max_iter}, {self.epochs}, "
                             f"{self.batch_size}")  # fmt: skip


def fit_logistic(
    features: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str = "bce",
    l2: float = 0.0,
    sample_weight: torch.Tensor | None = None,
    init: torch.Tensor | LogisticHead | None = None,
    options: FitOptions | None = None,
    **overrides: Any,
) -> LogisticHead:
    """Fit a logistic unit to frozen features by minimising ``(1/n) sum_i s_i L_i + (l2/2) ||w||^2``.

    Parameters
    ----------
    features : Tensor, shape (n, d)
        Frozen features ``phi(x_i)``.
    y : Tensor, shape (n,)
        Labels in {0, 1} (int or float).
    loss : {"bce", "mse"}
        Per-example loss (see the module docstring). Default ``"bce"``.
    l2 : float
        L2 penalty on ``w`` (not on ``b``). ``l2 > 0`` makes the BCE minimiser unique and the Hessian well conditioned.
    sample_weight : Tensor, shape (n,), optional
        Per-example weights ``s_i`` (default 1). A zero weight removes the example but keeps the ``1/n`` scaling, i.e.
        exactly Koh & Liang's ``eps = -1/n`` up-weighting.
    init : Tensor (d + 1,) or LogisticHead, optional
        Starting parameters (default zeros for Newton/L-BFGS, seeded Glorot-uniform for Adam, as TensorFlow's default).
    options : FitOptions, optional
        The optimiser: ``method`` (``"newton"``, ``"lbfgs"`` or ``"adam"``), ``max_iter``, ``tol``, ``epochs``,
        ``batch_size``, ``lr``, ``seed``, ``dtype``, ``progress`` (see :class:`FitOptions`); ``**overrides`` replace
        its fields, so ``fit_logistic(f, y, method="adam", epochs=5)`` works.

    Returns
    -------
    LogisticHead
        In eval mode, with ``loss``, ``l2`` and ``fit_info`` set. A Newton/L-BFGS run that does not reach ``tol``
        warns and records ``converged=False``.
    """
    opts = FitOptions.resolve(options, overrides)
    method, max_iter, tol, epochs, batch_size = opts.method, opts.max_iter, opts.tol, opts.epochs, opts.batch_size
    lr, seed, dtype, progress = opts.lr, opts.seed, opts.dtype, opts.progress
    _check_loss(loss)
    l2 = _check_nonneg("l2", l2)
    features = _as_features("features", features)
    n, d = features.shape
    y = _as_labels("y", y, n)
    fa = _augment(features.detach().to(dtype))
    yy = y.detach().to(dtype)
    if sample_weight is None:
        s = torch.ones(n, dtype=dtype)
    else:
        if not isinstance(sample_weight, torch.Tensor) or sample_weight.shape != (n,):
            raise ValueError(f"sample_weight must be a tensor of shape ({n},)")
        if not bool((sample_weight >= 0).all()):
            raise ValueError("sample_weight must be >= 0")
        s = sample_weight.detach().to(dtype)

    if init is None:
        if method == "adam":
            gen = torch.Generator().manual_seed(seed)
            limit = math.sqrt(6.0 / (2 * (d + 1)))  # TF glorot_uniform on the 1-D (d+1,) variable the authors use
            theta = (torch.rand(d + 1, generator=gen, dtype=dtype) * 2 - 1) * limit
        else:
            theta = torch.zeros(d + 1, dtype=dtype)
    else:
        theta = (init.theta if isinstance(init, LogisticHead) else init).detach().to(dtype).clone()
        if theta.shape != (d + 1,):
            raise ValueError(f"init must have shape ({d + 1},), got {tuple(theta.shape)}")

    info: dict = {"method": method}
    if method == "newton":
        theta, info = _fit_newton(theta, fa, yy, s, loss, l2, int(max_iter), float(tol), progress)
    elif method == "lbfgs":
        theta, info = _fit_lbfgs(theta, fa, yy, s, loss, l2, int(max_iter), float(tol))
    else:
        theta, info = _fit_adam(theta, fa, yy, s, loss, l2, int(epochs), int(batch_size), float(lr), seed, progress)
    if method != "adam" and not info["converged"]:
        warnings.warn(
            f"fit_logistic({method}): gradient inf-norm {info['grad_norm']:.3g} > tol {tol:.1e} after "
            f"{info['iterations']} iterations",
            stacklevel=2,
        )
    head = LogisticHead(d, loss=loss, l2=l2, dtype=dtype)
    with torch.no_grad():
        head.theta.copy_(theta)
    head.fit_info = info
    return head.eval()


def _fit_newton(theta, fa, y, s, loss, l2, max_iter, tol, progress):
    obj = _objective(theta, fa, y, s, loss, l2)
    grad, hess = _grad_and_hessian(theta, fa, y, s, loss, l2)
    eye = torch.eye(theta.shape[0], dtype=theta.dtype)
    steps = 0
    bar = tqdm(range(max_iter), desc="newton", disable=not progress, leave=False)
    for _ in bar:
        gnorm = float(grad.abs().max())
        if gnorm <= tol:
            break
        # Levenberg damping until the (possibly indefinite, for "mse") Hessian is positive definite
        mu = 0.0
        while True:
            chol, info = torch.linalg.cholesky_ex(hess + mu * eye)
            if int(info) == 0:
                break
            mu = max(2 * mu, 1e-8 * float(hess.diagonal().abs().max()) + 1e-12)
        step = torch.cholesky_solve(-grad[:, None], chol)[:, 0]
        cand = theta + step
        cand_obj = _objective(cand, fa, y, s, loss, l2)
        cand_grad, cand_hess = _grad_and_hessian(cand, fa, y, s, loss, l2)
        # Near the optimum objective differences drown in rounding, so a full step that shrinks the gradient is taken
        # as it is (quadratic convergence); otherwise Armijo backtracking on the objective.
        if not (float(cand_grad.abs().max()) < 0.5 * gnorm and cand_obj <= obj + 1e-12 * abs(float(obj))):
            t, decrease = 1.0, float(grad @ step)
            while cand_obj > obj + 1e-4 * t * decrease and t > 1e-10:
                t *= 0.5
                cand = theta + t * step
                cand_obj = _objective(cand, fa, y, s, loss, l2)
            if cand_obj > obj:  # no progress possible at this precision
                break
            cand_grad, cand_hess = _grad_and_hessian(cand, fa, y, s, loss, l2)
        theta, obj, grad, hess = cand, cand_obj, cand_grad, cand_hess
        steps += 1
        bar.set_postfix(grad=f"{gnorm:.2e}")
    gnorm = float(grad.abs().max())
    return theta, {"method": "newton", "iterations": steps, "grad_norm": gnorm, "converged": gnorm <= tol}


def _fit_lbfgs(theta, fa, y, s, loss, l2, max_iter, tol):
    param = theta.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [param],
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=0.0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        value = _objective(param, fa, y, s, loss, l2)
        value.backward()
        return value

    opt.step(closure)
    theta = param.detach()
    grad, _ = _grad_and_hessian(theta, fa, y, s, loss, l2)
    gnorm = float(grad.abs().max())
    iters = opt.state[opt.param_groups[0]["params"][0]].get("n_iter", max_iter)
    return theta, {"method": "lbfgs", "iterations": int(iters), "grad_norm": gnorm, "converged": gnorm <= tol}


def _fit_adam(theta, fa, y, s, loss, l2, epochs, batch_size, lr, seed, progress):
    param = theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = fa.shape[0]
    for _ in tqdm(range(epochs), desc="adam", disable=not progress, leave=False):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            _objective(param, fa[idx], y[idx], s[idx], loss, l2).backward()
            opt.step()
    theta = param.detach()
    grad, _ = _grad_and_hessian(theta, fa, y, s, loss, l2)
    gnorm = float(grad.abs().max())
    return theta, {"method": "adam", "iterations": epochs, "grad_norm": gnorm, "converged": False}


# ----------------------------------------------------------------------------------------------- influence


def _theta_of(theta: torch.Tensor | LogisticHead) -> torch.Tensor:
    if isinstance(theta, LogisticHead):
        return theta.theta.detach()
    if isinstance(theta, torch.Tensor):
        if theta.dim() != 1 or theta.shape[0] < 2:
            raise ValueError(f"theta must have shape (d + 1,), got {tuple(theta.shape)}")
        return theta.detach()
    raise TypeError(f"theta must be a LogisticHead or a tensor, got {type(theta).__name__}")


def per_example_grads(
    theta: torch.Tensor | LogisticHead, feats: torch.Tensor, y: torch.Tensor, *, loss: str = "bce"
) -> torch.Tensor:
    """Gradients ``grad_theta L(z_i)`` of the per-example loss (no penalty), closed form. Shape (n, d + 1)."""
    th = _theta_of(theta)
    feats = _as_features("feats", feats, th.shape[0] - 1)
    y = _as_labels("y", y, feats.shape[0])
    fa = _augment(feats.to(th.dtype))
    g1, _ = _dloss_dz(fa @ th, y, _check_loss(loss))
    return g1[:, None] * fa


def param_hessian(
    theta: torch.Tensor | LogisticHead,
    feats: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str = "bce",
    l2: float = 0.0,
    damping: float = 0.0,
) -> torch.Tensor:
    """Exact Hessian of the mean training objective w.r.t. ``theta``, plus ``damping * I``. Shape (d + 1, d + 1).

    ``(1/n) sum_i L''(z_i) f~_i f~_i^T + l2 * diag(1, ..., 1, 0) + damping * I`` with ``f~ = (f, 1)`` (closed form).
    """
    th = _theta_of(theta)
    feats = _as_features("feats", feats, th.shape[0] - 1)
    y = _as_labels("y", y, feats.shape[0])
    l2, damping = _check_nonneg("l2", l2), _check_nonneg("damping", damping)
    fa = _augment(feats.to(th.dtype))
    _, hess = _grad_and_hessian(th, fa, y.to(th.dtype), torch.ones(fa.shape[0], dtype=th.dtype), _check_loss(loss), l2)
    return hess + damping * torch.eye(th.shape[0], dtype=th.dtype)


def _solve_spd_or_general(hess: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``H^-1 rhs`` by Cholesky, or by LU with a warning if ``H`` is not positive definite; plus diagnostics.

    Raises ``ValueError`` (naming ``damping``) if ``H`` is singular to working precision, where any "inverse" is
    rounding noise (e.g. the authors' setting: 2049 parameters, 1000 training points, no damping: rank <= 1000).
    """
    singular_cond = 0.01 / torch.finfo(hess.dtype).eps
    chol, info = torch.linalg.cholesky_ex(hess)
    if int(info) == 0:
        diag = chol.diagonal()
        cond_lb = float((diag.max() / diag.min()) ** 2)  # a lower bound on cond(H)
        if cond_lb > singular_cond:
            raise ValueError(
                f"damping: the influence Hessian is singular to working precision (cond >= {cond_lb:.2g}); "
                "pass damping > 0 (or fit with l2 > 0)"
            )
        diag_info = {"positive_definite": True, "cond_lower_bound": cond_lb, "n_negative": 0}
        return torch.cholesky_solve(rhs, chol), diag_info
    # Not positive definite: look at the spectrum to tell "indefinite" from "singular".
    evals = torch.linalg.eigvalsh(hess)
    cond = float(evals.abs().max() / evals.abs().min().clamp(min=torch.finfo(hess.dtype).tiny))
    n_neg = int((evals < 0).sum())
    if cond > singular_cond:
        raise ValueError(
            f"damping: the influence Hessian is singular to working precision (cond = {cond:.2g}, "
            f"{n_neg} negative eigenvalues); pass damping > 0 (or fit with l2 > 0)"
        )
    warnings.warn(
        f"influence Hessian is not positive definite ({n_neg} negative eigenvalues, smallest {float(evals[0]):.3g}): "
        "theta is not a strict local minimum of the training objective (e.g. an MSE head stopped early). Solving "
        "with LU anyway; Koh & Liang's approximation assumes a positive-definite Hessian (damping > |smallest| "
        "restores it)",
        stacklevel=3,
    )
    sol, info = torch.linalg.solve_ex(hess, rhs)
    if int(info) != 0 or not torch.isfinite(sol).all():
        raise ValueError("damping: the influence Hessian is singular; pass damping > 0 (or fit with l2 > 0)")
    return sol, {"positive_definite": False, "cond": cond, "n_negative": n_neg, "min_eigenvalue": float(evals[0])}


class LogisticInfluence:
    """Influence of each training point of a fitted :class:`LogisticHead` on test predictions.

    Builds the exact parameter Hessian once and solves ``H v_i = grad L(z_i)`` for every training point, so that
    scores for any number of test points are a matrix product.

    Parameters
    ----------
    head : LogisticHead or Tensor (d + 1,)
        Fitted parameters.
    train_feats : Tensor, shape (n, d)
    train_y : Tensor, shape (n,)
        Training labels in {0, 1}.
    loss : {"bce", "mse"}, optional
        Default: ``head.loss`` (``"bce"`` for a bare tensor).
    l2 : float, optional
        Penalty included in the Hessian. Default: ``head.l2`` (0 for a bare tensor).
    damping : float
        Added to the Hessian's diagonal (default 0, as the authors).
    dtype : torch.dtype
        Computation dtype (default float64).

    Attributes
    ----------
    hessian : Tensor (d + 1, d + 1)
    train_grads : Tensor (n, d + 1)
        ``grad_theta L(z_i)``.
    train_ihvp : Tensor (n, d + 1)
        ``H^-1 grad_theta L(z_i)``.
    hessian_info : dict
        ``positive_definite``; ``cond_lower_bound`` (from the Cholesky factor) if it is, else ``cond``,
        ``n_negative`` and ``min_eigenvalue`` (from its spectrum).

    Raises
    ------
    ValueError
        If the Hessian is singular to working precision (pass ``damping > 0``). A Hessian that is invertible but not
        positive definite gives a warning.
    """

    def __init__(
        self,
        head: torch.Tensor | LogisticHead,
        train_feats: torch.Tensor,
        train_y: torch.Tensor,
        *,
        loss: str | None = None,
        l2: float | None = None,
        damping: float = 0.0,
        dtype: torch.dtype = torch.float64,
    ):
        theta = _theta_of(head).to(dtype)
        self.loss = _check_loss(loss if loss is not None else getattr(head, "loss", "bce"))
        self.l2 = _check_nonneg("l2", l2 if l2 is not None else getattr(head, "l2", 0.0))
        self.damping = _check_nonneg("damping", damping)
        self.theta = theta
        self.d = theta.shape[0] - 1
        train_feats = _as_features("train_feats", train_feats, self.d)
        self.train_y = _as_labels("train_y", train_y, train_feats.shape[0]).detach()
        self.train_feats = train_feats.detach().to(dtype)
        self.n_train = train_feats.shape[0]
        self.hessian = param_hessian(
            theta, self.train_feats, self.train_y, loss=self.loss, l2=self.l2, damping=self.damping
        )
        self.train_grads = per_example_grads(theta, self.train_feats, self.train_y, loss=self.loss)
        ihvp, self.hessian_info = _solve_spd_or_general(self.hessian, self.train_grads.T)
        self.train_ihvp = ihvp.T.contiguous()

    # -- test-side quantities
    def _test(self, test_feats: torch.Tensor, test_y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        test_feats = _as_features("test_feats", test_feats, self.d).to(self.theta.dtype)
        if test_y is None:
            test_y = self.predict(test_feats)
        test_y = _as_labels("test_y", test_y, test_feats.shape[0])
        return test_feats, test_y

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        """Predicted labels (``z >= 0``), LongTensor (m,)."""
        return ((feats.to(self.theta.dtype) @ self.theta[:-1] + self.theta[-1]) >= 0).long()

    def test_grads(self, test_feats: torch.Tensor, test_y: torch.Tensor | None = None) -> torch.Tensor:
        """``grad_theta L(z_t)`` for each test point (label: ``test_y`` or the prediction). Shape (m, d + 1)."""
        test_feats, test_y = self._test(test_feats, test_y)
        return per_example_grads(self.theta, test_feats, test_y, loss=self.loss)

    def scores(
        self,
        test_feats: torch.Tensor,
        test_y: torch.Tensor | None = None,
        *,
        normalize: bool = True,
        sign: str = "paper",
    ) -> torch.Tensor:
        """Influence of every training point on every test point. Shape (m, n_train).

        ``sign="paper"``: ``grad L(z_t)^T H^-1 grad L(z_i)`` (positive = helpful); ``sign="koh_liang"``: its negative,
        ``I_up,loss``. ``normalize``: divide each row by its L2 norm (rows of zeros stay zero).
        """
        if sign not in _SIGNS:
            raise ValueError(f"sign must be one of {_SIGNS}, got {sign!r}")
        out = self.test_grads(test_feats, test_y) @ self.train_ihvp.T
        if sign == "koh_liang":
            out = -out
        if normalize:
            norm = out.norm(dim=1, keepdim=True)
            out = out / torch.where(norm > 0, norm, torch.ones_like(norm))
        return out

    def influence_of(self, train_idx: torch.Tensor, test_feats: torch.Tensor, test_y: torch.Tensor) -> torch.Tensor:
        """Differentiable (in ``test_feats``) paper-convention, unnormalised influence of one training point per row.

        ``I_j(f) = grad_theta L(f, y_j)^T H^-1 grad_theta L(z_{train_idx[j]})`` for row ``j``; the authors'
        ``gradient_ascent_on_influence`` objective. ``train_idx`` (m,), ``test_feats`` (m, d), ``test_y`` (m,) -> (m,).
        """
        fa = _augment(test_feats.to(self.theta.dtype))
        g1, _ = _dloss_dz(fa @ self.theta, test_y, self.loss)
        return g1 * (fa * self.train_ihvp[train_idx]).sum(1)

    def influence_feature_grad(
        self, train_idx: torch.Tensor, test_feats: torch.Tensor, test_y: torch.Tensor
    ) -> torch.Tensor:
        """``grad_f I_j(f)`` of :meth:`influence_of`, shape (m, d) (autograd through the closed form)."""
        f = test_feats.detach().to(self.theta.dtype).requires_grad_(True)
        (grad,) = torch.autograd.grad(self.influence_of(train_idx, f, test_y).sum(), f)
        return grad


def influence_scores(
    theta: torch.Tensor | LogisticHead,
    train_feats: torch.Tensor,
    train_y: torch.Tensor,
    test_feats: torch.Tensor,
    test_y: torch.Tensor | None = None,
    *,
    loss: str | None = None,
    damping: float = 0.0,
    l2: float | None = None,
    normalize: bool = True,
    sign: str = "paper",
) -> torch.Tensor:
    """Influence of each training point on each test point's loss, shape (n_test, n_train).

    See the module docstring for the conventions; this is :class:`LogisticInfluence` ``(...).scores(...)``.
    ``test_feats`` may be one vector (d,), giving shape (1, n_train). ``test_y`` defaults to the predicted labels.
    """
    if isinstance(test_feats, torch.Tensor) and test_feats.dim() == 1:
        test_feats = test_feats[None]
        test_y = None if test_y is None else test_y.reshape(1)
    infl = LogisticInfluence(theta, train_feats, train_y, loss=loss, l2=l2, damping=damping)
    return infl.scores(test_feats, test_y, normalize=normalize, sign=sign)


# ----------------------------------------------------------------------------------------------- metrics


def top_influential(scores: torch.Tensor, k: int, *, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` training points with the largest (``largest=False``: smallest) scores, best first.

    ``scores`` (n_train,) or (n_test, n_train) -> LongTensor (k,) or (n_test, k).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2):
        raise ValueError("scores must be a tensor of shape (n_train,) or (n_test, n_train)")
    n = scores.shape[-1]
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must be in [1, {n}] (the number of training points), got {k}")
    return torch.topk(scores, int(k), dim=-1, largest=largest, sorted=True).indices


def _rank_average(row: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    _, inverse, counts = torch.unique(row, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    return (ends - (counts.to(torch.float64) - 1) / 2)[inverse]


def _pair_rows(name_a: str, a, name_b: str, b) -> tuple[torch.Tensor, torch.Tensor, bool]:
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() not in (1, 2) or a.shape[-1] < 1:
        raise ValueError(f"{name_a} must have shape (n_train,) or (n_test, n_train)")
    single = a.dim() == 1
    return (a[None] if single else a), (b[None] if single else b), single


def influence_rank_correlation(scores_a, scores_b) -> torch.Tensor:
    """Spearman rank correlation between two influence vectors over all training points (ties: average ranks).

    ``scores_a``, ``scores_b``: (n_train,) or (n_test, n_train) tensors or arrays. Returns a 0-d tensor or (n_test,)
    float64 tensor; NaN for a constant row (as :func:`scipy.stats.spearmanr`).
    """
    a, b, single = _pair_rows("scores_a", scores_a, "scores_b", scores_b)
    out = []
    for ra, rb in zip(a.detach().cpu(), b.detach().cpu()):
        xa, xb = _rank_average(ra), _rank_average(rb)
        xa, xb = xa - xa.mean(), xb - xb.mean()
        denom = xa.norm() * xb.norm()
        out.append((xa @ xb) / denom if denom > 0 else torch.tensor(float("nan"), dtype=torch.float64))
    res = torch.stack(out)
    return res[0] if single else res


def topk_overlap(scores_a, scores_b, k: int = 5) -> torch.Tensor:
    """Number of training points in both top-``k`` sets (largest scores), out of ``k``; the authors' ``top5``.

    ``scores_a``, ``scores_b``: (n_train,) or (n_test, n_train). Returns a LongTensor, 0-d or (n_test,).
    """
    a, b, single = _pair_rows("scores_a", scores_a, "scores_b", scores_b)
    ta, tb = top_influential(a, k), top_influential(b, k)
    res = (ta[:, :, None] == tb[:, None, :]).any(2).sum(1)
    return res[0] if single else res


# ----------------------------------------------------------------------------------------------- the attack


@dataclass
class InfluenceAttackResult:
    """Outcome of :func:`influence_attack` / :func:`random_sign_influence` / :func:`evaluate_influence_change`.

    Attributes
    ----------
    x_adv : Tensor (N, *shape)
        Perturbed inputs, ``|x_adv - x|_inf <= eps`` and within ``[lower, upper]``.
    features, features_adv : Tensor (N, d)
        ``phi(x)``, ``phi(x_adv)``.
    label, label_adv : LongTensor (N,)
        Predicted labels before / after; ``label_kept = label == label_adv``.
    scores, scores_adv : Tensor (N, n_train)
        Paper-convention influence vectors before / after (normalised as asked), each with its own predicted label.
    spearman : Tensor (N,)
        Rank correlation of ``scores`` and ``scores_adv`` over all training points.
    topk_overlap : LongTensor (N,)
        Shared training points among the top-``k`` before and after (out of ``k``).
    targets : LongTensor (N, n_targets)
        The training points the attack aimed at (largest influence first); empty for random noise.
    k : int
    """

    x_adv: torch.Tensor
    features: torch.Tensor
    features_adv: torch.Tensor
    label: torch.Tensor
    label_adv: torch.Tensor
    label_kept: torch.Tensor
    scores: torch.Tensor
    scores_adv: torch.Tensor
    spearman: torch.Tensor
    topk_overlap: torch.Tensor
    targets: torch.Tensor
    k: int


def _check_extractor(feature_extractor: Callable) -> None:
    if not callable(feature_extractor):
        raise TypeError("feature_extractor must be callable, (N, *shape) -> (N, d)")
    if isinstance(feature_extractor, nn.Module) and stochastic_layers_training(feature_extractor):
        raise ValueError(
            "feature_extractor is in train mode (batch norm / dropout would couple or randomise "
            "the features); call .eval() first"
        )


def _check_images(x: torch.Tensor, eps: float, lower: float, upper: float) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape (N, *shape)")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf")
    _check_nonneg("eps", eps)
    if not lower < upper:
        raise ValueError(f"lower must be < upper, got {lower} and {upper}")


def _features(feature_extractor: Callable, x: torch.Tensor, d: int) -> torch.Tensor:
    with torch.no_grad():
        f = feature_extractor(x)
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape != (x.shape[0], d):
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"feature_extractor must map (N, *shape) to (N, {d}) features (the head's d), got {shape}")
    return f


def evaluate_influence_change(
    feature_extractor: Callable,
    influence: LogisticInfluence,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    *,
    k: int = 5,
    test_y: torch.Tensor | None = None,
    normalize: bool = True,
    targets: torch.Tensor | None = None,
) -> InfluenceAttackResult:
    """Recompute influences at ``x_adv`` and compare with ``x`` (Spearman over all training points, top-``k`` overlap).

    Each side uses its own predicted label, as the authors' code does, unless ``test_y`` fixes the label of ``x``
    (the label at ``x_adv`` is then still its prediction).
    """
    _check_extractor(feature_extractor)
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have the shape of x {tuple(x.shape)}")
    if not 1 <= int(k) <= influence.n_train:
        raise ValueError(f"k must be in [1, {influence.n_train}] (the number of training points), got {k}")
    f0 = _features(feature_extractor, x, influence.d)
    f1 = _features(feature_extractor, x_adv, influence.d)
    y0 = influence.predict(f0) if test_y is None else test_y
    y1 = influence.predict(f1)
    s0 = influence.scores(f0, y0, normalize=normalize)
    s1 = influence.scores(f1, y1, normalize=normalize)
    targets = torch.zeros(x.shape[0], 0, dtype=torch.long) if targets is None else targets
    return InfluenceAttackResult(
        x_adv=x_adv,
        features=f0,
        features_adv=f1,
        label=influence.predict(f0),
        label_adv=y1,
        label_kept=influence.predict(f0) == y1,
        scores=s0,
        scores_adv=s1,
        spearman=influence_rank_correlation(s0, s1).reshape(-1),
        topk_overlap=topk_overlap(s0, s1, k).reshape(-1),
        targets=targets,
        k=int(k),
    )


def _attack_direction(
    feature_extractor: Callable,
    influence: LogisticInfluence,
    x: torch.Tensor,
    test_y: torch.Tensor | None,
    feature_step: float,
    n_targets: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input-space gradient ``g`` of the feature-space step and the targeted training points (one batch)."""
    f0 = _features(feature_extractor, x, influence.d).detach()
    y0 = influence.predict(f0) if test_y is None else test_y
    scores = influence.scores(f0, y0, normalize=False)
    # the authors: top3 = argsort(influences)[-3:], then update for each in that (ascending) order
    targets = top_influential(scores, n_targets)  # (N, n_targets), largest first
    f = f0.to(influence.theta.dtype)
    for j in reversed(range(n_targets)):
        grad = influence.influence_feature_grad(targets[:, j], f, y0)
        f = f - feature_step * torch.sign(grad)  # lowers the (linearised) influence of that training point
    delta_f = (f - f0.to(f.dtype)).to(f0.dtype)
    xr = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad((feature_extractor(xr) * delta_f).sum(), xr)
    return g, targets


@dataclass(frozen=True)
class InfluenceAttackOptions(Options):
    """Settings of :func:`influence_attack` (validated when made; keywords of the call override them):
    ``feature_step`` per target in feature space (0.01, the authors' ``factor``), ``n_targets`` attacked training
    points (3), ``k`` of the top-k overlap metric (5), the input range ``[lower, upper]``, ``normalize`` the reported
    influence vectors (metrics do not depend on it), ``batch_size`` images per chunk (None: all), tqdm ``progress``."""

    feature_step: float = 0.01
    n_targets: int = 3
    k: int = 5
    lower: float = 0.0
    upper: float = 1.0
    normalize: bool = True
    batch_size: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        _check_nonneg("feature_step", self.feature_step)
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def influence_attack(
    feature_extractor: Callable,
    influence: LogisticInfluence,
    x: torch.Tensor,
    *,
    eps: float = 8 / 255,
    test_y: torch.Tensor | None = None,
    options: InfluenceAttackOptions | None = None,
    **overrides: Any,
) -> InfluenceAttackResult:
    """Ghorbani et al.'s single-step gradient-sign attack on the influence of the top training points (§5).

    For each test image ``x`` (a batch is attacked independently, in chunks of ``batch_size``):

    1. ``f0 = phi(x)``; the label is the head's prediction (or ``test_y``); the ``n_targets`` (3) training points
       with the largest paper-convention influence are the targets.
    2. For each target in turn (third-largest first, as the authors' loop), in feature space
       ``f <- f - feature_step * sign(grad_f I_j(f))``, with ``I_j`` the unnormalised influence of that target
       (:meth:`LogisticInfluence.influence_of`); this lowers the targets' influence.
    3. ``delta_f = f - f0`` is back-propagated through ``phi``: ``g = grad_x <delta_f, phi(x)>``.
    4. ``x_adv = clip(x + eps * sign(g), lower, upper)``.

    The influence vectors are then recomputed at ``x_adv`` with its own predicted label (as the authors' code).
    One deviation: the authors' feature-step helper reads a global ``label_idx`` left over from an earlier notebook
    cell (a training image's prediction); we use each test point's own predicted label (or ``test_y``).

    Parameters
    ----------
    feature_extractor : callable, (N, *shape) -> (N, d)
        Differentiable ``phi`` (an ``nn.Module`` must be in eval mode). Not modified.
    influence : LogisticInfluence
        The fitted head's influence on its training set.
    x : Tensor (N, *shape)
        Images in ``[lower, upper]`` (default [0, 1]); not mutated.
    eps : float
        L-inf budget in input units (default 8/255, the authors' ``noises = [8]/255``).
    test_y : LongTensor (N,), optional
        Fix the labels of the test points instead of using the predictions.
    options : InfluenceAttackOptions, optional
        ``feature_step``, ``n_targets``, ``k``, ``lower``, ``upper``, ``normalize``, ``batch_size``, ``progress`` (see
        :class:`InfluenceAttackOptions`); ``**overrides`` replace its fields, so ``k=5`` works as a keyword.

    Returns
    -------
    InfluenceAttackResult
    """
    opts = InfluenceAttackOptions.resolve(options, overrides)
    feature_step, n_targets, k, lower, upper = opts.feature_step, opts.n_targets, opts.k, opts.lower, opts.upper
    normalize, batch_size, progress = opts.normalize, opts.batch_size, opts.progress
    _check_extractor(feature_extractor)
    _check_images(x, eps, lower, upper)
    feature_step = _check_nonneg("feature_step", feature_step)
    if not 1 <= int(n_targets) <= influence.n_train:
        raise ValueError(f"n_targets must be in [1, {influence.n_train}], got {n_targets}")
    if not 1 <= int(k) <= influence.n_train:
        raise ValueError(f"k must be in [1, {influence.n_train}] (the number of training points), got {k}")
    if test_y is not None:
        test_y = _as_labels("test_y", test_y, x.shape[0])
    bs = x.shape[0] if batch_size is None else int(batch_size)
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x_adv, targets = [], []
    for start in tqdm(range(0, x.shape[0], bs), desc="influence attack", disable=not progress, leave=False):
        xb = x[start : start + bs]
        yb = None if test_y is None else test_y[start : start + bs]
        g, t = _attack_direction(feature_extractor, influence, xb, yb, feature_step, int(n_targets))
        x_adv.append((xb.detach() + eps * torch.sign(g)).clamp(lower, upper))
        targets.append(t)
    return evaluate_influence_change(
        feature_extractor,
        influence,
        x,
        torch.cat(x_adv),
        k=k,
        test_y=test_y,
        normalize=normalize,
        targets=torch.cat(targets),
    )


def random_sign_influence(
    feature_extractor: Callable,
    influence: LogisticInfluence,
    x: torch.Tensor,
    *,
    eps: float = 8 / 255,
    seed: int = 0,
    k: int = 5,
    lower: float = 0.0,
    upper: float = 1.0,
    test_y: torch.Tensor | None = None,
    normalize: bool = True,
) -> InfluenceAttackResult:
    """The random baseline: ``x_adv = clip(x + eps * sign(N(0, 1)), lower, upper)`` (seeded), then the same metrics."""
    _check_extractor(feature_extractor)
    _check_images(x, eps, lower, upper)
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x_adv = (x.detach() + eps * torch.sign(noise).to(x.device)).clamp(lower, upper)
    return evaluate_influence_change(feature_extractor, influence, x, x_adv, k=k, test_y=test_y, normalize=normalize)
