"""Differentiable feature-importance maps: simple gradient, integrated gradients, DeepLIFT (Rescale) and LRP-epsilon.

Every method takes a batch ``x`` of shape (N, *shape), a ``target`` (an int or a LongTensor (N,) of classes) and a
model mapping (N, *shape) to pre-softmax scores (N, classes); it returns attributions of ``x``'s shape. With
``create_graph=True`` the attribution stays in the autograd graph, so a loss on the saliency map can be
differentiated with respect to the input (pass an ``x`` that requires grad) — what Captum's attributions do not
offer, and what Ghorbani et al.'s attacks need.

Methods (names accepted by :func:`attribute` / :func:`saliency_fn` in brackets)

* :func:`gradient` ["gradient", "sg"] — ``dS_y/dx`` (Simonyan et al.), the paper's "simple gradient".
* :func:`integrated_gradients` ["integrated_gradients", "ig"] — the right Riemann sum of Ghorbani et al.'s code:
  ``(x - b) * mean_{k=1..M} dS_y/dx (b + k/M (x - b))``, ``M = 100``; zero baseline by default (the authors used
  the mean image: pass it as ``baseline``). Equals Captum's ``IntegratedGradients(method="riemann_right")``.
* :func:`deeplift` ["deeplift"] — DeepLIFT with the Rescale rule, zero reference by default. Equals Captum's
  ``DeepLift`` on nets without max-pooling (see the function's notes for max-pooling).
* :func:`lrp` ["lrp"] — layer-wise relevance propagation with the epsilon rule (LRP-eps) on linear, convolution,
  pooling and batch-norm layers, relevance passed unchanged through ReLUs: the "relevance propagation" named by the
  paper's first arXiv version. Equals Captum's ``LRP`` with ``EpsilonRule(eps)`` on those layers.
* :func:`dtd` ["dtd", "deep_taylor"] — Deep Taylor Decomposition (Montavon et al. 2017) as in Ghorbani et al.'s code:
  the z+ rule on every linear / convolution layer except the first, the z^B (box) rule with the input pixel range
  ``[lower, upper]`` at the first one; relevance passed unchanged through ReLUs, max-pooling winner-take-all.

:func:`saliency_map` applies the paper's post-processing: absolute value, sum over channels, normalise to sum 1.

Second derivatives. ReLU nets have zero second derivative almost everywhere, so ``create_graph=True`` on a ReLU
net gives a correct but useless (zero almost everywhere) input-gradient of a simple-gradient, IG or LRP map. The
attacks therefore differentiate these maps on :func:`flipfrag.smooth.softplus_surrogate` (same weights), as the
authors did; DeepLIFT's Rescale multipliers and DTD's ratios ``z / z+``, ``z / z^B`` depend smoothly on the input,
so these two are differentiated on the ReLU net itself.

Rule-based methods (DeepLIFT, LRP, DTD) intercept operations with a :class:`torch.overrides.TorchFunctionMode` while
the model runs, so they work for ``nn.ReLU`` modules and functional ReLU calls alike (the set of ReLU forms is
``flipfrag.smooth.RELU_FUNCS``), with no module hooks and no restriction on module reuse. With ``create_graph=True``
they run the model twice (once for the true forward values the rules depend on, once for the modified backward), so
their second derivatives are exact rather than derivatives of the modified chain. Unsupported: ReLUs
written as ``clamp``/``hardtanh``/``threshold``/``relu6``/``leaky_relu`` (treated as ordinary differentiable ops,
i.e. by the gradient rule), in-place ReLU calls whose return value is ignored, and models that mix samples of a
batch (train-mode batch norm; rejected) or do not keep the batch as dimension 0 (DeepLIFT checks this).

The package: :mod:`~flipfrag.saliency.common` (method names, shared argument checks),
:mod:`~flipfrag.saliency.gradients` (simple gradient, integrated gradients), :mod:`~flipfrag.saliency.rules`
(DeepLIFT, LRP, DTD and their operation tables), :mod:`~flipfrag.saliency.maps` (post-processing); every public name
is re-exported here (``from flipfrag import saliency; saliency.gradient(...)``), with the dispatch by method name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import gradients as _gradients
from . import rules as _rules
from .common import METHODS, box_bounds, canonical_method, check_model
from .gradients import gradient, integrated_gradients, integrated_gradients_vjp
from .maps import completeness_gap, saliency_map
from .rules import deeplift, dtd, lrp

__all__ = [
    "METHODS",
    "canonical_method",
    "gradient",
    "integrated_gradients",
    "deeplift",
    "lrp",
    "dtd",
    "saliency_map",
    "attribute",
    "saliency_fn",
    "completeness_gap",
    "attribute_with_logits",
    "integrated_gradients_vjp",
    "check_model",
    "box_bounds",
]

# ------------------------------------------------------------------------------------------------ dispatch

_CORE = {**_gradients.CORES, **_rules.CORES}
_PUBLIC = {
    "gradient": gradient,
    "integrated_gradients": integrated_gradients,
    "deeplift": deeplift,
    "lrp": lrp,
    "dtd": dtd,
}


def saliency_fn(method: str) -> Callable[..., torch.Tensor]:
    """The attribution function for a method name (aliases allowed), e.g. ``saliency_fn("ig")``."""
    return _PUBLIC[canonical_method(method)]


def attribute(model: nn.Module, x: torch.Tensor, target: Any, method: str = "gradient", **kwargs: Any) -> torch.Tensor:
    """Dispatch to a method by name: ``attribute(model, x, y, method="ig", steps=50)``.

    ``kwargs`` are the chosen method's keyword arguments (``create_graph``, ``baseline``, ``steps``, ``eps``, ...).
    """
    return saliency_fn(method)(model, x, target, **kwargs)


def attribute_with_logits(
    model: nn.Module, x: torch.Tensor, target: Any, method: str, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attributions and, when the method evaluates the model at ``x`` itself, its detached scores (what the attacks
    use to avoid a second forward pass); ``kwargs`` as :func:`attribute`'s."""
    return _CORE[canonical_method(method)](model, x, target, **kwargs)
