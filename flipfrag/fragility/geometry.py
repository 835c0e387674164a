"""Geometry (F6, F2, notes §6 of ``docs/papers/fragility.md``): the 2-D toy (its data, models, decision grid and
gradient rotation), attack-vs-random perturbation geometry, and the input-dimension sweep of a two-layer softplus
net. The input-Hessian algorithms they use (HVPs, Lanczos, :func:`~flipfrag.hessian.score_geometry`) are in
:mod:`flipfrag.hessian`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ..hessian import score_geometry, top_eigenpairs

# ------------------------------------------------------------------------------------------------- geometry


def toy_rotation(model: nn.Module, X: torch.Tensor, radius: float, *, margin: float | None = None) -> pd.DataFrame:
    """Gradient rotation in the 2-D toy under a move of length ``radius`` *along* the level set (orthogonal to the
    score gradient, so the prediction barely changes): one row per point with ``angle`` (degrees), ``margin``
    (score difference at x), and the move ``dx``, ``dy``. ``margin`` keeps only points with
    ``|S_1 - S_0| <= margin`` (near the boundary)."""
    from ..hessian import gradient_rotation

    if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.shape[1] != 2:
        raise ValueError("X must be a tensor of 2-D points, shape (N, 2)")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    Xg = X.detach().clone().requires_grad_(True)
    out = model(Xg)
    pred = out.argmax(1)
    score = out.gather(1, pred[:, None])[:, 0]
    (g,) = torch.autograd.grad(score.sum(), Xg)
    tangent = torch.stack([-g[:, 1], g[:, 0]], 1)
    tangent = tangent / tangent.norm(dim=1, keepdim=True).clamp_min(1e-12)
    delta = radius * tangent
    angle = gradient_rotation(model, X.detach(), delta, pred)
    marg = (out[:, 1] - out[:, 0]).detach()
    df = pd.DataFrame({"x": X[:, 0].detach().numpy(), "y": X[:, 1].detach().numpy(), "angle": angle.numpy(),
                       "margin": marg.numpy(), "dx": delta[:, 0].numpy(), "dy": delta[:, 1].numpy()})  # fmt: skip
    if margin is not None:
        df = df[df.margin.abs() <= margin].reset_index(drop=True)
    return df


def geometry_comparison(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    iters: int,
    step: float = 0.5 / 255,
    k: int,
    beta: float = 1.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, torch.Tensor]:
    """Notes §6 (ii) (``docs/papers/fragility.md``): top-k attack on the simple gradient vs random sign noise of the
    same L-inf size, seen through the input Hessian of the softplus(``beta``) surrogate's class score.

    Returns ``(df, x_adv)``; ``df`` has one row per (kind, image) with ``cos_grad`` = cos(δ, ∇S),
    ``hess_gain`` = ‖Hδ‖/‖δ‖, ``first_order`` = ∇Sᵀδ, ``score_change`` (actual), ``relative_saliency_change`` =
    ‖∇S(x+δ) − ∇S(x)‖/‖∇S(x)‖ on the surrogate, and ``topk`` (intersection of the ReLU model's gradient maps).
    """
    from ..attacks import RandomSignAttack, TopKAttack
    from ..hessian import perturbation_geometry
    from ..smooth import softplus_surrogate

    common = dict(k=k, progress=False, record_metrics=False)
    att = TopKAttack(model, "gradient", eps=eps, step=step, iters=iters, beta=beta, **common)(x, y)
    rnd = RandomSignAttack(model, "gradient", eps=eps, seed=seed, **common)(x, y)
    smooth = softplus_surrogate(model, beta)
    rows = []
    for kind, res in (("attack", att), ("random", rnd)):
        geo = perturbation_geometry(smooth, x, y, res.x_adv - x)
        for i in range(x.shape[0]):
            rows.append({"kind": kind, "image": i, "cos_grad": float(geo.cos_grad[i]),
                         "hess_gain": float(geo.hess_gain[i]), "first_order": float(geo.first_order[i]),
                         "score_change": float(geo.score_change[i]),
                         "relative_saliency_change": float(geo.relative_saliency_change[i]),
                         "topk": float(res.metrics["topk"][i]), "label_kept": bool(res.label_kept[i])})  # fmt: skip
    return pd.DataFrame(rows), att.x_adv


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
    from ..models import MLP, evaluate, train

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
            geo = score_geometry(net, x, delta)
            out[f"{name}_mean"].append(float(geo.relative_saliency_change.mean()))
            out[f"{name}_std"].append(float(geo.relative_saliency_change.std(correction=0)))
            out[f"{name}_cos"].append(float(geo.cos_grad.abs().mean()))
    return {"dims": np.array(dims), **{k: np.array(v) for k, v in out.items()}}
