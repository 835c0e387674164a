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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._checks import check_batch as _check_x
from .ops import depthwise_conv2d
from .smooth import RELU_FUNCS, softplus

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
]

#: Canonical method names; aliases are listed in ``_ALIASES``.
METHODS = ("gradient", "integrated_gradients", "deeplift", "lrp", "dtd")
_ALIASES = {
    "ig": "integrated_gradients",
    "sg": "gradient",
    "simple_gradient": "gradient",
    "saliency": "gradient",
    "lrp_epsilon": "lrp",
    "lrp-eps": "lrp",
    "deep_taylor": "dtd",
    "deep-taylor": "dtd",
    "deep_taylor_decomposition": "dtd",
}
_SCORES = ("logit", "probability")


def canonical_method(method: str) -> str:
    """Return the canonical name of a saliency method (resolving aliases such as ``"ig"``).

    Raises
    ------
    ValueError
        Naming ``method`` if it is not one of :data:`METHODS` or an alias.
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, got {type(method).__name__}")
    name = method.lower()
    name = _ALIASES.get(name, name)
    if name not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)} (or aliases {sorted(_ALIASES)}), got {method!r}")
    return name


# --------------------------------------------------------------------------------------------- input checks

# Modules whose train mode makes one sample's output depend on the rest of the batch or on randomness.
_MODE_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.AlphaDropout)


def _check_model(model: nn.Module) -> None:
    if not callable(model):
        raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Module):
        bad = [type(m).__name__ for m in model.modules() if m.training and isinstance(m, _MODE_SENSITIVE)]
        if bad:
            raise ValueError(
                f"model has {sorted(set(bad))} layers in training mode (attributions would depend on the batch or "
                "on dropout noise); call model.eval() first"
            )


def _target_tensor(target: Any, n: int, device: torch.device) -> torch.Tensor:
    """``target`` (int, sequence or tensor) as a LongTensor (n,) on ``device``."""
    if isinstance(target, bool) or target is None:
        raise TypeError(f"target must be an int or a LongTensor (N,) of class indices, got {target!r}")
    if isinstance(target, int):
        t = torch.full((n,), target, dtype=torch.long, device=device)
    else:
        t = torch.as_tensor(target, device=device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {t.dtype}")
        t = t.long()
        if t.dim() == 0:
            t = t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"target must be an int or have shape ({n},), got shape {tuple(t.shape)}")
    return t


def _select(logits: torch.Tensor, target: torch.Tensor, score: str = "logit") -> torch.Tensor:
    """Per-sample score S_target (N,) from the model output (N, C)."""
    if logits.dim() != 2 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"model must map a batch of {target.shape[0]} inputs to scores of shape (N, classes), "
            f"got output shape {tuple(logits.shape)}"
        )
    n_classes = logits.shape[1]
    if (target < 0).any() or (target >= n_classes).any():
        raise ValueError(f"target: class indices must lie in [0, {n_classes}), got {target.tolist()}")
    if score == "probability":
        logits = torch.softmax(logits, dim=1)
    return logits.gather(1, target[:, None])[:, 0]


def _check_score(score: str) -> None:
    if score not in _SCORES:
        raise ValueError(f"score must be one of {list(_SCORES)}, got {score!r}")


def _input_for_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself if it already requires grad (so results stay attached to the caller's graph), else a leaf copy."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _grad(output: torch.Tensor, inp: torch.Tensor, create_graph: bool) -> torch.Tensor:
    (g,) = torch.autograd.grad(output, inp, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def _baseline_tensor(baseline: Any, x: torch.Tensor, name: str = "baseline") -> torch.Tensor:
    """The reference input as a detached tensor of x's shape (None -> zeros; scalars and broadcastables allowed)."""
    if baseline is None:
        return torch.zeros_like(x, requires_grad=False).detach()
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline)).detach()
    if not isinstance(baseline, torch.Tensor):
        raise TypeError(f"{name} must be None, a number or a tensor broadcastable to x, got {type(baseline).__name__}")
    b = baseline.detach().to(device=x.device, dtype=x.dtype)
    try:
        b = torch.broadcast_to(b, x.shape)
    except RuntimeError as err:
        raise ValueError(
            f"{name} of shape {tuple(baseline.shape)} does not broadcast to x of shape {tuple(x.shape)}"
        ) from err
    if not torch.isfinite(b).all():
        raise ValueError(f"{name} contains NaN or inf")
    return b.contiguous()


# ----------------------------------------------------------------------------------------- simple gradient


def _gradient(
    model: nn.Module, x: torch.Tensor, target: Any, *, create_graph: bool = False, score: str = "logit"
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_model(model)
    _check_x(x)
    _check_score(score)
    t = _target_tensor(target, x.shape[0], x.device)
    with torch.enable_grad():
        xin = _input_for_grad(x)
        logits = model(xin)
        s = _select(logits, t, score)
        g = _grad(s.sum(), xin, create_graph)
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
    _check_model(model)
    _check_x(x)
    _check_score(score)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool) or not isinstance(internal_batch_size, int) or internal_batch_size < 1
    ):
        raise ValueError(f"internal_batch_size must be None or an integer >= 1, got {internal_batch_size!r}")
    n, m = x.shape[0], steps
    t = _target_tensor(target, n, x.device)
    b = _baseline_tensor(baseline, x)
    total = n * m
    chunk = total if internal_batch_size is None else internal_batch_size
    # alpha_k = k/M, k = 1..M: the right Riemann sum of the authors' code (the baseline itself is not evaluated).
    alphas = torch.arange(1, m + 1, device=x.device, dtype=x.dtype) / m
    feat = (1,) * (x.dim() - 1)
    vjp_mode = weights is not None
    with torch.enable_grad():
        xin = _input_for_grad(x) if (create_graph or vjp_mode) else x.detach()
        delta = xin - b
        gsum = torch.zeros_like(x)
        for start in range(0, total, chunk):
            rows = torch.arange(start, min(start + chunk, total), device=x.device)
            img, k = rows // m, rows % m
            pts = b[img] + alphas[k].view(-1, *feat) * delta[img]
            if not (create_graph or vjp_mode):
                pts = pts.detach().requires_grad_(True)
            s = _select(model(pts), t[img], score)
            g = _grad(s.sum(), pts, create_graph or vjp_mode)
            if vjp_mode:
                # <w, (x - b) * sum_k g_k / M>: this chunk's share, differentiated now and its graph freed.
                part = (weights[img] * delta[img] * g).sum() / m
                gsum = gsum + _grad(part, xin, False)
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


# ------------------------------------------------------------------------------- rule-based backward passes
#
# DeepLIFT, LRP and DTD are "modified gradients": the backward pass is the ordinary one except that selected operations
# multiply the incoming gradient by their own factor instead of their local derivative. With create_graph=True the
# result must also be differentiable *correctly* in x: the factors depend on x through the true forward values,
# while the modified chain must not be mistaken for the derivative of those values (one autograd graph cannot hold
# both: the derivative autograd uses for a value path is the same one it uses in the first backward). Hence two passes:
#
#   pass 1 ("record", only when create_graph): run the model on x normally (true graph) and record the tensors
#          the factors depend on;
#   pass 2 ("apply"): run it on a detached copy v of x; each selected op returns
#          ``value.detach() + c * (t - t.detach())`` (value unchanged, gradient w.r.t. t multiplied by c), with c
#          computed from the recorded pass-1 tensor (so it carries the graph to x) or, without create_graph, from
#          the current values.
#
# The modified gradient is d S / d v from pass 2; its dependence on x is exactly through the factors. Operations that
# are not selected are differentiated normally in pass 2 (linear/conv/pooling: constant or piecewise-constant
# derivatives, so nothing is lost; other smooth nonlinearities would lose their second-order terms, hence every
# supported activation is selected).


def _relu_fn(u: torch.Tensor, params: tuple, kwargs: dict) -> torch.Tensor:
    return u.clamp_min(0)


def _relu_d(u: torch.Tensor, params: tuple, kwargs: dict) -> torch.Tensor:
    return (u > 0).to(u.dtype)


def _softplus_params(params: tuple, kwargs: dict) -> tuple[float, float]:
    # params are the call's positional arguments after the input: F.softplus(input, beta=1.0, threshold=20.0)
    beta = params[0] if len(params) > 0 else kwargs.get("beta", 1.0)
    threshold = params[1] if len(params) > 1 else kwargs.get("threshold", 20.0)
    return float(beta), float(threshold)


def _softplus_fn(u: torch.Tensor, params: tuple, kwargs: dict) -> torch.Tensor:
    beta, threshold = _softplus_params(params, kwargs)
    return F.softplus(u, beta=beta, threshold=threshold)


def _softplus_d(u: torch.Tensor, params: tuple, kwargs: dict) -> torch.Tensor:
    beta, threshold = _softplus_params(params, kwargs)
    return torch.where(u * beta > threshold, torch.ones_like(u), torch.sigmoid(beta * u))


def _surrogate_softplus_fn(u: torch.Tensor, params: tuple, kwargs: dict) -> torch.Tensor:
    return softplus(u, *params, **kwargs)


def _surrogate_softplus_d(u: torch.Tensor, params: tuple, kwargs: dict) -> torch.Tensor:
    beta = params[0] if params else kwargs.get("beta", 1.0)
    return torch.sigmoid(beta * u)


def _sigmoid_d(u: torch.Tensor, params: tuple, kwargs: dict) -> torch.Tensor:
    s = torch.sigmoid(u)
    return s * (1 - s)


def _tanh_d(u: torch.Tensor, params: tuple, kwargs: dict) -> torch.Tensor:
    return 1 - torch.tanh(u) ** 2


def _erf_d(u: torch.Tensor, params: tuple, kwargs: dict) -> torch.Tensor:
    return (2 / math.sqrt(math.pi)) * torch.exp(-(u**2))


# Elementwise activations the rules know: func -> (f(u), f'(u)), given the call's extra arguments.
_ACTIVATIONS: dict[Callable, tuple[Callable, Callable]] = {f: (_relu_fn, _relu_d) for f in RELU_FUNCS}
_ACTIVATIONS.update(
    {
        F.softplus: (_softplus_fn, _softplus_d),
        softplus: (_surrogate_softplus_fn, _surrogate_softplus_d),  # what the attacks' surrogate calls
        torch.sigmoid: (lambda u, p, k: torch.sigmoid(u), _sigmoid_d),
        torch.Tensor.sigmoid: (lambda u, p, k: torch.sigmoid(u), _sigmoid_d),
        torch.tanh: (lambda u, p, k: torch.tanh(u), _tanh_d),
        torch.Tensor.tanh: (lambda u, p, k: torch.tanh(u), _tanh_d),
        torch.erf: (lambda u, p, k: torch.erf(u), _erf_d),
        torch.Tensor.erf: (lambda u, p, k: torch.erf(u), _erf_d),
    }
)


def _funcs(*names: str) -> set:
    return {getattr(F, n) for n in names if hasattr(F, n)} | {getattr(torch, n) for n in names if hasattr(torch, n)}


# Layers the LRP epsilon rule applies to (Captum's LRP defaults: Linear, Conv, Avg/AdaptiveAvg/MaxPool, BatchNorm).
_LRP_LAYERS = _funcs(
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool1d_with_indices",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "batch_norm",
) | {depthwise_conv2d}


def _with_factor(value: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass; the gradient reaching ``t`` is the incoming gradient times ``c``."""
    return value.detach() + c * (t - t.detach())


class _RuleMode(TorchFunctionMode):
    """Runs a model with modified backward factors at selected operations (see the comment above).

    ``activation_factor(u, f, df, params, kwargs)`` gives the factor at an activation's input u (None: activations
    are not selected); ``layer_factor(z)`` the factor at a rule layer's output z (None: no layer rules).
    ``phase`` is "record" (store what factors depend on, run normally) or "apply" (use ``saved`` if given).
    """

    def __init__(self, activation_factor=None, layer_factor=None, phase="apply", saved=None, batch=None):
        super().__init__()
        self.activation_factor = activation_factor
        self.layer_factor = layer_factor
        self.phase = phase
        self.saved: list[torch.Tensor] = [] if saved is None else saved
        self.replay = saved is not None
        self.batch = batch
        self.count = 0

    def _base(self, t: torch.Tensor) -> torch.Tensor:
        if self.phase == "record":
            self.saved.append(t)
            return t
        if not self.replay:
            return t.detach()
        if self.count >= len(self.saved) or self.saved[self.count].shape != t.shape:
            raise RuntimeError("model: the sequence of operations differed between two forward passes on equal inputs")
        return self.saved[self.count]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.activation_factor is not None and func in _ACTIVATIONS:
            u = args[0]
            if self.batch is not None and (not isinstance(u, torch.Tensor) or u.dim() == 0 or u.shape[0] != self.batch):
                raise ValueError(
                    "model: deeplift runs the inputs and references as one batch and needs every nonlinearity's input "
                    f"to keep that batch as dimension 0 (expected {self.batch}, got "
                    f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__})"
                )
            fn, dfn = _ACTIVATIONS[func]
            # Non-tensor parameters only (softplus beta/threshold); "inplace" dropped: a new tensor is returned even
            # for in-place forms (nn.ReLU(inplace=True) uses the returned value), so the recorded input survives.
            params = tuple(a for a in args[1:] if not isinstance(a, (torch.Tensor, bool)))
            extra = {k: v for k, v in kwargs.items() if k != "inplace"}
            base = self._base(u)
            self.count += 1
            if self.phase == "record":
                return fn(u, params, extra)
            c = self.activation_factor(base, fn, dfn, params, extra)
            return _with_factor(fn(u, params, extra), u, c)
        out = func(*args, **kwargs)
        if self.layer_factor is not None and func in _LRP_LAYERS:
            z = out[0] if isinstance(out, tuple) else out  # max-pooling with return_indices=True gives (z, idx)
            base = self._base(z)
            self.count += 1
            if self.phase == "record":
                return out
            z = _with_factor(z, z, self.layer_factor(base))
            return (z, *out[1:]) if isinstance(out, tuple) else z
        return out


def _modified_gradient(
    model: nn.Module,
    xin: torch.Tensor,
    target: torch.Tensor,
    make_input: Callable[[torch.Tensor], torch.Tensor],
    create_graph: bool,
    **mode_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """d S_target / d x with the rule factors, from the two-pass scheme; also the scores at x and the rule count."""
    n = xin.shape[0]
    saved = None
    with torch.enable_grad():
        if create_graph:
            with _RuleMode(phase="record", **mode_kwargs) as rec:
                model(make_input(xin))
            saved = rec.saved
        v = xin.detach().requires_grad_(True)
        with _RuleMode(phase="apply", saved=saved, **mode_kwargs) as mode:
            logits = model(make_input(v))
        s = _select(logits[:n], target)
        g = _grad(s.sum(), v, create_graph)
    return g, logits[:n].detach(), mode.count


# ---------------------------------------------------------------------------------------------- DeepLIFT


def _rescale_factor(eps: float) -> Callable:
    def factor(u: torch.Tensor, fn: Callable, dfn: Callable, params: tuple, kwargs: dict) -> torch.Tensor:
        """Rescale multiplier (f(u) - f(u_ref)) / (u - u_ref) for both halves of a [input; reference] batch.

        Where |u - u_ref| < eps the ratio is numerically meaningless and f'(u) is used, as Captum does. Written
        with differentiable ops and a safe denominator, so that second derivatives are finite.
        """
        u_x, u_r = u.chunk(2)
        du = u_x - u_r
        small = du.abs() < eps
        ratio = (fn(u_x, params, kwargs) - fn(u_r, params, kwargs)) / torch.where(small, torch.ones_like(du), du)
        m = torch.where(small, dfn(u_x, params, kwargs), ratio)
        return torch.cat([m, m])

    return factor


def _deeplift(
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    *,
    baseline: Any = None,
    create_graph: bool = False,
    eps: float = 1e-10,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_model(model)
    _check_x(x)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    n = x.shape[0]
    t = _target_tensor(target, n, x.device)
    b = _baseline_tensor(baseline, x)
    with torch.enable_grad():
        xin = _input_for_grad(x) if create_graph else x.detach()
        g, logits, _ = _modified_gradient(
            model,
            xin,
            t,
            lambda v: torch.cat([v, b]),
            create_graph,
            activation_factor=_rescale_factor(float(eps)),
            batch=2 * n,
        )
        attr = (xin - b) * g
    return (attr if create_graph else attr.detach()), logits


def deeplift(
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    *,
    baseline: Any = None,
    create_graph: bool = False,
    eps: float = 1e-10,
) -> torch.Tensor:
    """DeepLIFT with the Rescale rule (Shrikumar et al. 2017), differentiable with respect to ``x``.

    ``attr = m ⊙ (x - x_ref)``, where the multipliers ``m`` are back-propagated with the linear rule (ordinary
    gradients) through linear and convolution layers and the Rescale rule ``(f(u) - f(u_ref)) / (u - u_ref)`` through
    nonlinearities: every ReLU form (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``Tensor.relu``, in-place forms), and also
    sigmoid, tanh, softplus and erf. Where ``|u - u_ref| < eps`` the derivative ``f'(u)`` is used (as Captum does).
    Completeness holds exactly for nets built from these and linear layers: ``attr.sum() = S(x) - S(x_ref)``.

    Max-pooling and every other operation are differentiated normally (the gradient rule). For max-pooling this
    routes multipliers to the argmax of the *actual* input, which is what Ghorbani et al.'s DeepLIFT code does;
    it is not Captum's max-pool rule and breaks exact completeness. Values equal Captum's ``DeepLift`` on nets
    without max-pooling.

    With ``create_graph=True`` the result is the exact function of ``x`` (second derivatives through the multipliers
    and the true forward values; the model runs twice). Second-order terms through nonlinearities other than those
    listed above are not tracked.

    Parameters
    ----------
    model, x, target, create_graph
        As in :func:`gradient`. The model runs on the (2N, *shape) batch ``[x; x_ref]``.
    baseline : None, float or Tensor broadcastable to x
        Reference ``x_ref``; default zeros. Ghorbani et al. used the mean image.
    eps : float
        Threshold on ``|u - u_ref|`` below which the gradient is used instead of the ratio (Captum's default 1e-10).

    Returns
    -------
    Tensor (N, *shape)
    """
    return _deeplift(model, x, target, baseline=baseline, create_graph=create_graph, eps=eps)[0]


# ---------------------------------------------------------------------------------------------- LRP-epsilon


def _stabilised_ratio(z: torch.Tensor, d: torch.Tensor, eps: float) -> torch.Tensor:
    """z / (d + eps sign(d)) with sign(0) := +1, and 0 where that denominator is exactly 0 (only possible for
    eps = 0); written with differentiable ops and a safe denominator, so that second derivatives are finite."""
    d = d + eps * torch.where(d >= 0, torch.ones_like(d), -torch.ones_like(d))
    zero = d == 0
    return torch.where(zero, torch.zeros_like(z), z / torch.where(zero, torch.ones_like(d), d))


def _epsilon_factor(eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def factor(z: torch.Tensor) -> torch.Tensor:
        """z / (z + eps * sign(z)), with sign(0) := +1 (Captum's and zennit's convention); eps > 0."""
        return _stabilised_ratio(z, z, eps)

    return factor


def _derivative_factor(u: torch.Tensor, fn: Callable, dfn: Callable, params: tuple, kwargs: dict) -> torch.Tensor:
    return dfn(u, params, kwargs)


def _lrp(
    model: nn.Module, x: torch.Tensor, target: Any, *, eps: float = 1e-6, create_graph: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_model(model)
    _check_x(x)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    t = _target_tensor(target, x.shape[0], x.device)
    with torch.enable_grad():
        xin = _input_for_grad(x) if create_graph else x.detach()
        g, logits, count = _modified_gradient(
            model,
            xin,
            t,
            lambda v: v,
            create_graph,
            activation_factor=_derivative_factor,
            layer_factor=_epsilon_factor(float(eps)),
        )
        attr = xin * g
    if count == 0:
        raise ValueError("model: lrp found no linear, convolution, pooling or batch-norm layer to apply rules to")
    return (attr if create_graph else attr.detach()), logits


def lrp(
    model: nn.Module, x: torch.Tensor, target: Any, *, eps: float = 1e-6, create_graph: bool = False
) -> torch.Tensor:
    """Layer-wise relevance propagation with the epsilon rule (LRP-eps; Bach et al. 2015), differentiable.

    Relevance starts as ``S_target(x)`` at the output and flows down by
    ``R_j = sum_k a_j w_jk R_k / (z_k + eps sign(z_k))`` through every linear, convolution, pooling (average and max)
    and batch-norm layer, and unchanged through ReLUs; the input relevance is returned. Implemented as
    ``x ⊙ (modified gradient)``: the backward pass is multiplied by ``z / (z + eps sign z)`` at each such layer's
    output, which for ReLU nets is exactly the rule above (``eps -> 0`` gives gradient x input). For the other
    activations listed in :func:`deeplift` (e.g. the softplus of the attacks' surrogate) the activation's derivative
    is applied, which makes the surrogate's map a smooth approximation of the ReLU net's.

    Conservation: ``attr.sum() ≈ S_target(x)`` when biases are zero (bias terms and eps absorb the rest).

    Parameters
    ----------
    model, x, target, create_graph
        As in :func:`gradient`. With ``create_graph`` the model runs twice (exact second derivatives, as DeepLIFT).
    eps : float
        Stabiliser (default 1e-6; Captum's ``EpsilonRule`` defaults to 1e-9). ``sign(0)`` counts as +1.

    Returns
    -------
    Tensor (N, *shape)
    """
    return _lrp(model, x, target, eps=eps, create_graph=create_graph)[0]


# ------------------------------------------------------------------------------------ Deep Taylor Decomposition
#
# DTD in gradient form. With relevance R_t = t ⊙ g_t at every tensor t (g the modified gradient), ReLUs pass
# relevance unchanged when differentiated normally (relu(z) 1[z>0] = relu(z)), max-pooling routes it to the argmax, and
# a layer z = f(a; W, b) applies
#   z+  rule: R_a = a ⊙ W+ᵀ (R_z / z+),   z+ = f(a; W+, 0),                       i.e. g_a = W+ᵀ ((z / z+) ⊙ g_z);
#   z^B rule: R_a = a ⊙ Wᵀs - l ⊙ W+ᵀs - h ⊙ W-ᵀs,  s = R_z / z^B,  z^B = f(a; W, 0) - f(l; W+, 0) - f(h; W-, 0).
# Both are ``_with_factor(z, t, c)`` with t = z+ (resp. z^B as a function of a, l and h) and c = z / t: the backward
# pass then gives g_a = W+ᵀ(c g_z) (resp. g_a = Wᵀs, g_l = -W+ᵀs, g_h = -W-ᵀs), so R_x = a g_a + l g_l + h g_h.
# The first layer's bounds (l, h) are the model's prefix applied to the bound images, found by a probe pass on
# [L; H] that stops at the first linear / convolution call; since g_a + g_l + g_h = 0 (W = W+ + W-), the input-space
# sum x ⊙ g_x + L ⊙ g_L + H ⊙ g_H equals R at the first layer's input whenever the prefix is elementwise affine.

# Layers with a DTD rule; normalisation layers have none and are rejected.
_DTD_LAYERS = _funcs("linear", "conv1d", "conv2d", "conv3d") | {depthwise_conv2d}
_NORM_LAYERS = _funcs("batch_norm", "instance_norm", "group_norm", "layer_norm")


def _layer_arg(args: tuple, kwargs: dict, pos: int, name: str) -> Any:
    return args[pos] if len(args) > pos else kwargs.get(name)


def _layer_call(func: Callable, args: tuple, kwargs: dict, inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The linear / convolution call ``func(*args, **kwargs)`` with its input and weight replaced and no bias."""
    args, kwargs = list(args), dict(kwargs)
    for pos, name, value in ((0, "input", inp), (1, "weight", weight), (2, "bias", None)):
        if len(args) > pos:
            args[pos] = value
        else:
            kwargs[name] = value
    return func(*args, **kwargs)


class _FirstLayerReached(Exception):
    def __init__(self, inp: Any):
        super().__init__("first linear / convolution layer reached")
        self.inp = inp


class _FirstLayerProbe(TorchFunctionMode):
    """Runs a model until its first linear / convolution call and raises :class:`_FirstLayerReached` with its input."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DTD_LAYERS:
            raise _FirstLayerReached(_layer_arg(args, kwargs, 0, "input"))
        return func(*args, **kwargs)


def _first_layer_bounds(model: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bound images (N, *shape) mapped to the first rule layer's input space: elementwise (min, max) of the
    model's prefix applied to them (so that a decreasing prefix, e.g. a negative scale, still gives l <= h)."""
    n = lo.shape[0]
    try:
        with _FirstLayerProbe():
            model(torch.cat([lo, hi]))
    except _FirstLayerReached as reached:
        a = reached.inp
    else:
        raise ValueError("model: dtd found no linear or convolution layer (DTD's rules apply to these)")
    if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != 2 * n:
        raise ValueError(
            "model: dtd runs the lower and upper bound images as one batch and needs the first linear / convolution "
            f"layer's input to keep that batch as dimension 0 (expected {2 * n}, got "
            f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__})"
        )
    a_l, a_h = a.chunk(2)
    return torch.minimum(a_l, a_h), torch.maximum(a_l, a_h)


class _DTDMode(_RuleMode):
    """:class:`_RuleMode` with the DTD layer rules: z^B at the first linear / convolution call (bounds ``box``, the
    first layer's input-space (l, h) with the graph to the bound images), z+ at every later one. Activations get
    their derivative (ReLUs pass relevance unchanged), everything else is differentiated normally."""

    def __init__(self, box: tuple[torch.Tensor, torch.Tensor], eps: float, phase: str = "apply", saved=None):
        super().__init__(activation_factor=_derivative_factor, phase=phase, saved=saved)
        self.box = box
        self.eps = eps
        self.layers = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _NORM_LAYERS:
            raise ValueError(
                f"model: dtd has no rule for normalisation layers ({getattr(func, '__name__', func)}); fold eval-mode "
                "batch norm into a neighbouring linear layer first (flipfrag.models.fold_batchnorm)"
            )
        if func not in _DTD_LAYERS:
            return super().__torch_function__(func, types, args, kwargs)
        kwargs = kwargs or {}
        a = _layer_arg(args, kwargs, 0, "input")
        w = _layer_arg(args, kwargs, 1, "weight")
        z = func(*args, **kwargs)
        first = self.layers == 0
        self.layers += 1
        if first:
            lo, hi = self.box
            if not isinstance(a, torch.Tensor) or a.shape != lo.shape:
                raise ValueError(
                    "model: the first linear / convolution layer's input changed shape between the bound images and x "
                    f"({tuple(lo.shape)} vs {tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__})"
                )
            w_pos, w_neg = w.clamp_min(0), w.clamp_max(0)

            def rule(inp: torch.Tensor, detach_box: bool) -> torch.Tensor:
                low, high = (lo.detach(), hi.detach()) if detach_box else (lo, hi)
                return (
                    _layer_call(func, args, kwargs, inp, w)
                    - _layer_call(func, args, kwargs, low, w_pos)
                    - _layer_call(func, args, kwargs, high, w_neg)
                )

        else:
            w_pos = w.clamp_min(0)

            def rule(inp: torch.Tensor, detach_box: bool) -> torch.Tensor:
                return _layer_call(func, args, kwargs, inp, w_pos)

        if self.phase == "record":  # c = z / t as a function of x (through a and z), for the apply pass
            self._base(_stabilised_ratio(z, rule(a, True), self.eps))
            self.count += 1
            return z
        t = rule(a, False)
        c = self._base(z) if self.replay else _stabilised_ratio(z.detach(), t.detach(), self.eps)
        self.count += 1
        return _with_factor(z, t, c)


def _box(x: torch.Tensor, lower: Any, upper: Any, why: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``lower`` / ``upper`` (numbers or tensors broadcastable to x) as tensors of x's shape, checked: finite,
    ``lower < upper`` everywhere and ``lower <= x <= upper``. ``why`` ends the out-of-range message."""
    bounds = []
    for value, name in ((lower, "lower"), (upper, "upper")):
        if value is None:
            raise TypeError(f"{name} must be a number or a tensor broadcastable to x, got None")
        if isinstance(value, (list, tuple, np.ndarray)):
            value = torch.as_tensor(np.asarray(value, dtype=np.float64))
        bound = _baseline_tensor(value, x, name)
        if not torch.isfinite(bound).all():
            raise ValueError(f"{name} contains NaN or inf")
        bounds.append(bound)
    lo, hi = bounds
    if not (lo < hi).all():
        raise ValueError("lower must be < upper everywhere")
    if (x < lo).any() or (x > hi).any():
        span = f"[{float(x.min()):.4g}, {float(x.max()):.4g}]"
        raise ValueError(f"x has values outside [lower, upper] (x in {span}); {why}")
    return lo, hi


def _dtd(
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    *,
    lower: Any = 0.0,
    upper: Any = 1.0,
    create_graph: bool = False,
    eps: float = 1e-9,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_model(model)
    _check_x(x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    n = x.shape[0]
    t = _target_tensor(target, n, x.device)
    lo, hi = _box(x, lower, upper, "DTD's box rule needs lower <= x <= upper: pass the model's input range")
    eps = float(eps)
    with torch.enable_grad():
        xin = _input_for_grad(x) if create_graph else x.detach()
        lo_v, hi_v = lo.clone().requires_grad_(True), hi.clone().requires_grad_(True)
        box = _first_layer_bounds(model, lo_v, hi_v)
        saved = None
        if create_graph:
            with _DTDMode(box, eps, phase="record") as rec:
                model(xin)
            saved = rec.saved
        v = xin.detach().requires_grad_(True)
        with _DTDMode(box, eps, phase="apply", saved=saved):
            logits = model(v)
        s = _select(logits, t)
        grads = torch.autograd.grad(s.sum(), (v, lo_v, hi_v), create_graph=create_graph, allow_unused=True)
        g_x, g_l, g_h = (torch.zeros_like(x) if g is None else g for g in grads)
        attr = xin * g_x + lo * g_l + hi * g_h
    return (attr if create_graph else attr.detach()), logits.detach()


def dtd(
    model: nn.Module,
    x: torch.Tensor,
    target: Any,
    *,
    lower: Any = 0.0,
    upper: Any = 1.0,
    create_graph: bool = False,
    eps: float = 1e-9,
) -> torch.Tensor:
    """Deep Taylor Decomposition (Montavon et al. 2017) as in Ghorbani et al.'s code, differentiable w.r.t. ``x``.

    Relevance starts as ``S_target(x)`` at the output and flows to the input by

    * the z+ rule at every linear / convolution layer except the first one the input reaches:
      ``R_a = a ⊙ W+ᵀ (R_z / z+)``, ``z+ = W+ a`` (``W+ = max(W, 0)``, no bias). The rule assumes ``a >= 0``, i.e. that
      these layers follow ReLUs (or pooling of ReLU outputs); other inputs are not rejected, but the rule then has no
      Deep-Taylor justification;
    * the z^B (box) rule at the first linear / convolution layer, for inputs bounded by ``l <= a <= h``:
      ``R_a = a ⊙ Wᵀs - l ⊙ W+ᵀs - h ⊙ W-ᵀs``, ``s = R_z / z^B``, ``z^B = W a - W+ l - W- h`` (``W- = min(W, 0)``);
    * ReLUs: relevance passed unchanged; max-pooling: differentiated normally (winner-take-all to the argmax, as the
      authors' code); average / adaptive-average pooling: differentiated normally, which *is* the z+ rule for their
      non-negative weights and non-negative inputs; other elementwise activations known to :func:`deeplift` (e.g. the
      softplus surrogate): their derivative, as :func:`lrp`. Flatten / reshape / concatenation: differentiated
      normally (they only move relevance). Batch / instance / group / layer norm: rejected (``ValueError`` naming
      ``model``): fold eval-mode batch norm into the preceding convolution first. Matrix products written without
      ``F.linear`` / ``F.conv*`` (``@``, ``torch.matmul``, ``conv_transpose``) are differentiated normally.

    The denominators are stabilised as ``d + eps sign(d)`` (``sign(0) = +1``), and a message is 0 where that is 0.
    Conservation: ``attr.sum() = S_target(x)`` (up to ``eps``) unless a unit that carries relevance has ``z+ = 0`` or
    ``z^B = 0`` (its relevance is then dropped); zero biases and ``S_target(x) > 0`` exclude that (``z > 0`` implies
    ``z+ > 0``). Sign: with ``lower <= x <= upper`` every message has the sign of ``S_target(x)`` (``z / z+ >= 0`` on
    active units, ``z^B >= 0`` in the box), biases or not; so ``attr >= 0`` for a positive target score.

    Bounds. ``lower`` / ``upper`` are the model's *input* range (pixels in [0, 1] by default). When the model
    normalises inside (e.g. ``(x - mean) / std`` before conv1), the bounds of the first layer's input are found by
    running that prefix on the bound images (elementwise min / max of the two results, so a decreasing prefix is
    handled too). The returned relevance is ``x ⊙ g_x + L ⊙ g_L + H ⊙ g_H`` (gradients of the modified pass w.r.t.
    ``x`` and the bound images): this equals the z^B relevance at the first layer's input, position by position,
    whenever the prefix is an elementwise affine map possibly composed with reshapes / flatten / concatenation
    (identity, per-channel normalisation, flatten) — because ``g_a + g_l + g_h = 0`` the prefix's shift cancels.
    For any affine prefix the sum ``attr.sum()`` is still the first layer's total relevance; for nonlinear prefixes
    the result is not DTD. ``x`` outside ``[lower, upper]`` is rejected.

    Second derivatives. ``d map / d x`` is *not* degenerate on the ReLU net itself: the factors ``z / z+`` and
    ``z / z^B`` are ratios of piecewise-linear functions of ``x`` (rational within each linear region), so the input-
    gradient of a loss on ``saliency_map(dtd(...))`` is finite and non-zero almost everywhere (like DeepLIFT; unlike the
    simple gradient, whose ReLU-net map is piecewise constant); ReLU masks and max-pool routing are piecewise
    constant and contribute nothing. Attacks can therefore differentiate DTD on the model itself. With
    ``create_graph=True`` the model runs twice (exact second derivatives, as :func:`deeplift`).

    Parameters
    ----------
    model, x, target, create_graph
        As in :func:`gradient`. First the model runs on ``[L; H]`` (the 2N bound images) only up to its first linear /
        convolution call (cheap), then on ``x`` (twice with ``create_graph``).
    lower, upper : float or Tensor broadcastable to x
        Input range of the box rule, ``lower < upper`` everywhere and ``lower <= x <= upper`` (default [0, 1]).
    eps : float
        Stabiliser of the denominators ``z+`` and ``z^B`` (default 1e-9; 0 allowed).

    Returns
    -------
    Tensor (N, *shape)
        The input relevance ``R_x`` (not gradient x input).
    """
    return _dtd(model, x, target, lower=lower, upper=upper, create_graph=create_graph, eps=eps)[0]


# ------------------------------------------------------------------------------------------ post-processing


def saliency_map(attr: torch.Tensor) -> torch.Tensor:
    """The papers' post-processing: absolute value, summed over channels, normalised to sum 1 per sample.

    Parameters
    ----------
    attr : Tensor (N, C, H, W), (N, H, W) or (N, D)
        Attributions. 4-D input is summed over the channel dimension 1; 3-D and 2-D inputs are taken as
        already single-channel.

    Returns
    -------
    Tensor (N, H, W) (or (N, D) for 2-D input)
        Non-negative, each sample summing to 1 (an all-zero attribution gives an all-zero map). Differentiable.
    """
    if not isinstance(attr, torch.Tensor):
        raise TypeError(f"attr must be a torch.Tensor, got {type(attr).__name__}")
    if attr.dim() not in (2, 3, 4):
        raise ValueError(f"attr must have shape (N, C, H, W), (N, H, W) or (N, D), got {tuple(attr.shape)}")
    s = attr.abs()
    if s.dim() == 4:
        s = s.sum(1)
    total = s.flatten(1).sum(1).clamp_min(torch.finfo(s.dtype).tiny)
    return s / total.view(-1, *([1] * (s.dim() - 1)))


def completeness_gap(
    model: nn.Module, x: torch.Tensor, target: Any, attr: torch.Tensor, baseline: Any = None
) -> torch.Tensor:
    """``attr.sum() - (S(x) - S(baseline))`` per sample (N,): the completeness error of IG / DeepLIFT.

    Zero up to rounding for DeepLIFT on ReLU nets without max-pooling; shrinks as ``steps`` grows for IG. For LRP
    with zero biases, pass ``baseline=None`` and compare against ``S(x) - S(0)``.
    """
    _check_x(x)
    t = _target_tensor(target, x.shape[0], x.device)
    b = _baseline_tensor(baseline, x)
    with torch.no_grad():
        diff = _select(model(x), t) - _select(model(b), t)
    return attr.detach().flatten(1).sum(1) - diff


# ------------------------------------------------------------------------------------------------ dispatch

_CORE = {
    "gradient": _gradient,
    "integrated_gradients": _integrated_gradients,
    "deeplift": _deeplift,
    "lrp": _lrp,
    "dtd": _dtd,
}
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


def _attribute_with_logits(
    model: nn.Module, x: torch.Tensor, target: Any, method: str, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Internal: attributions and, when the method evaluates the model at ``x`` itself, its detached scores."""
    return _CORE[canonical_method(method)](model, x, target, **kwargs)
