"""Propagation rules: DeepLIFT (Rescale), LRP-epsilon and Deep Taylor Decomposition as modified gradients, with the
operation tables they act on (activations, LRP layers, DTD layers) and the two-pass scheme that keeps their second
derivatives exact. Each method is a public function over a private core that also returns the model's scores."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .._checks import check_batch
from ..ops import depthwise_conv2d
from ..smooth import RELU_FUNCS, softplus
from .common import (
    baseline_tensor,
    box_bounds,
    check_model,
    grad_or_zeros,
    input_for_grad,
    select_score,
    target_tensor,
)

__all__ = ["deeplift", "lrp", "dtd", "CORES"]

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
        s = select_score(logits[:n], target)
        g = grad_or_zeros(s.sum(), v, create_graph)
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
    check_model(model)
    check_batch(x)
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    n = x.shape[0]
    t = target_tensor(target, n, x.device)
    b = baseline_tensor(baseline, x)
    with torch.enable_grad():
        xin = input_for_grad(x) if create_graph else x.detach()
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
    check_model(model)
    check_batch(x)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    t = target_tensor(target, x.shape[0], x.device)
    with torch.enable_grad():
        xin = input_for_grad(x) if create_graph else x.detach()
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
    check_model(model)
    check_batch(x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    n = x.shape[0]
    t = target_tensor(target, n, x.device)
    lo, hi = box_bounds(x, lower, upper, "DTD's box rule needs lower <= x <= upper: pass the model's input range")
    eps = float(eps)
    with torch.enable_grad():
        xin = input_for_grad(x) if create_graph else x.detach()
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
        s = select_score(logits, t)
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



#: The private cores by canonical method name: ``core(model, x, target, **kwargs) -> (attr, scores)``.
CORES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"deeplift": _deeplift, "lrp": _lrp, "dtd": _dtd}
