"""Geometry (F6, F2): the 2-D toy's gradient rotation and attack-vs-random perturbation geometry."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

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
    """Spec §6 (ii): top-k attack on the simple gradient vs random sign noise of the same L-inf size, seen through
    the input Hessian of the softplus(``beta``) surrogate's class score.

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
