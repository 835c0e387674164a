"""The gradient family: the simple gradient and integrated gradients, each a public function over a private core
that also returns the model's scores at ``x`` (the attacks reach the cores by name through
:func:`flipfrag.saliency.attribute_with_logits`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._checks import check_batch
from .common import (
    baseline_tensor,
    check_model,
    check_score,
    grad_or_zeros,
    input_for_grad,
    select_score,
    target_tensor,
)

__all__ = ["gradient", "integrated_gradients", "integrated_gradients_vjp", "CORES"]


# ----------------------------------------------------------------------------------------- simple gradient


def _gradient(
    model: nn.Module, x: torch.Tensor, target: Any, *, create_graph: bool = False, score: str = "logit"
) -> tuple[torch.Tensor, torch.Tensor]:
    check_model(model)
    check_batch(x)
    check_score(score)
    t = target_tensor(target, x.shape[0], x.device)
    with torch.enable_grad():
        xin = input_for_grad(x)
        logits = model(xin)
        s = select_score(logits, t, score)
        g = grad_or_zeros(s.sum(), xin, create_graph)
    return g, logits.detach()


def gradient(
    model: nn.Module, x: torch.Tensor, target: Any, *, create_graph: bool = False, score: str = "logit"
) -> torch.Tensor:
    """Simple gradient ``dS_target / dx`` (Simonyan et al. 2014; Ghorbani et al.'s "simple gradient").

    Parameters
    ----------
    model : nn.Module
        Maps (N, *shape) to pre-softmax scores (N, classes); samples must not interact (eval mode).
    x : Tensor (N, *shape)
        Inputs (e.g. images in [0, 1], (N, C, H, W)). Not modified. If ``x.requires_grad``, the result stays attached
        to the caller's graph (needed to differentiate it w.r.t. ``x`` with ``create_graph=True``).
    target : int or LongTensor (N,)
        Class whose score is explained (the predicted label in the paper).
    create_graph : bool
        Keep the graph of the gradient computation so that the result can be differentiated again.
    score : {"logit", "probability"}
        Differentiate the pre-softmax score (default; the paper) or the softmax probability.

    Returns
    -------
    Tensor (N, *shape)
        The gradient, same dtype and shape as ``x``.
    """
    return _gradient(model, x, target, create_graph=create_graph, score=score)[0]


# ----------------------------------------------------------------------------------- integrated gradients


def _integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    *,
    baseline: Any = None,
    steps: int = 100,
    create_graph: bool = False,
    internal_batch_size: int | None = None,
    score: str = "logit",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """IG core. With ``weights`` (N, *shape) it returns instead ``d/dx <weights, IG(x)>`` (a vector-Jacobian
    product with ``weights`` held fixed), accumulated chunk by chunk so that memory stays bounded by
    ``internal_batch_size`` interpolants even though each chunk is differentiated twice."""
    check_model(model)
    check_batch(x)
    check_score(score)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1
    ):
        raise ValueError(f"internal_batch_size must be None or an integer >= 1, got {internal_batch_size!r}")
    n, m = x.shape[0], steps
    t = target_tensor(target, n, x.device)
    b = baseline_tensor(baseline, x)
    total = n * m
    chunk = total if internal_batch_size is None else internal_batch_size
    # alpha_k = k/M, k = 1..M: the right Riemann sum of the authors' code (the baseline itself is not evaluated).
    alphas = torch.arange(1, m + 1, device=x.device, dtype=x.dtype) / m
    feat = (1,) * (x.dim() - 1)
    vjp_mode = weights is not None
    with torch.enable_grad():
        xin = input_for_grad(x) if (create_graph or vjp_mode) else x.detach()
        delta = xin - b
        gsum = torch.zeros_like(x)
        for start in range(0, total, chunk):
            rows = torch.arange(start, min(start + chunk, total), device=x.device)
            img, k = rows // m, rows % m
            pts = b[img] + alphas[k].view(-1, *feat) * delta[img]
            if not (create_graph or vjp_mode):
                pts = pts.detach().requires_grad_(True)
            s = select_score(model(pts), t[img], score)
            g = grad_or_zeros(s.sum(), pts, create_graph or vjp_mode)
            if vjp_mode:
                # <w, (x - b) * sum_k g_k / M>: this chunk's share, differentiated now and its graph freed.
                part = (weights[img] * delta[img] * g).sum() / m
                gsum = gsum + grad_or_zeros(part, xin, False)
            elif create_graph:
                gsum = gsum.index_add(0, img, g)
            else:
                gsum.index_add_(0, img, g.detach())
        if vjp_mode:
            return gsum, None
        attr = delta * gsum / m
    if not create_graph:
        attr = attr.detach()
    return attr, None


def integrated_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    *,
    baseline: Any = None,
    steps: int = 100,
    create_graph: bool = False,
    internal_batch_size: int | None = None,
    score: str = "logit",
) -> torch.Tensor:
    """Integrated gradients by the right Riemann sum (Sundararajan et al. 2017; Ghorbani et al.'s code).

    ``IG(x) = (x - b) * (1/M) sum_{k=1..M} dS_target/dx evaluated at b + (k/M)(x - b)``. Completeness:
    ``IG(x).sum() -> S(x) - S(b)`` as ``M`` grows (see :func:`completeness_gap`).

    Parameters
    ----------
    model, x, target, create_graph, score
        As in :func:`gradient`.
    baseline : None, float or Tensor broadcastable to x
        Reference input ``b``. Default None = zeros (black image). Ghorbani et al. used the mean image: for
        ImageNet the per-channel mean (shape (C, 1, 1)), for CIFAR-10 the per-pixel mean (shape (C, H, W)).
    steps : int
        Number of Riemann steps ``M`` (default 100, the paper's value).
    internal_batch_size : int or None
        Evaluate at most this many interpolants per forward/backward pass (bounds memory for large ``N * M``);
        None evaluates all ``N * M`` at once. Does not change the values.

    Returns
    -------
    Tensor (N, *shape)
        Equal (to rounding) to Captum's ``IntegratedGradients(model).attribute(x, baselines=b, target=target,
        n_steps=M, method="riemann_right")``.
    """
    return _integrated_gradients(
        model,
        x,
        target,
        baseline=baseline,
        steps=steps,
        create_graph=create_graph,
        internal_batch_size=internal_batch_size,
        score=score,
    )[0]



def integrated_gradients_vjp(model: nn.Module, x: torch.Tensor, target: Any, weights: torch.Tensor,
                             **kwargs: Any) -> torch.Tensor:  # fmt: skip
    """``d/dx <weights, IG(x)>`` with ``weights`` (N, *shape) held fixed (a vector-Jacobian product), accumulated
    chunk by chunk so that memory stays bounded by ``internal_batch_size`` interpolants even though each chunk is
    differentiated twice; ``kwargs`` are :func:`integrated_gradients`' (``baseline``, ``steps``, ...)."""
    return _integrated_gradients(model, x, target, weights=weights, **kwargs)[0]


#: The private cores by canonical method name: ``core(model, x, target, **kwargs) -> (attr, scores or None)``.
CORES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor | None]]] = {
    "gradient": _gradient,
    "integrated_gradients": _integrated_gradients,
}
