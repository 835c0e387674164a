"""Smooth copies of a network, shared by the flip-point homotopy and the second-order attacks.

The deformations live here, and nowhere else:

* **ReLU -> softplus(beta)**. ReLU nets have zero second derivative almost everywhere, so the gradient of a
  gradient-based saliency map with respect to the input is degenerate. :func:`softplus_surrogate` returns a module
  that evaluates the *same weights* with every ReLU replaced by ``softplus(beta * u) / beta`` (beta = 1 is what
  Ghorbani et al.'s code used; large beta approaches ReLU, small beta is nearly linear).
  Replacement works for ``nn.ReLU`` modules *and* functional calls (``F.relu``, ``torch.relu``, ``Tensor.relu``,
  and their in-place forms) because it intercepts the call with a :class:`torch.overrides.TorchFunctionMode`
  while the wrapped model runs. Not replaced (and therefore unsupported for second-order use): ``clamp``/``clip``
  used as a ReLU, ``hardtanh``, ``relu6``, ``leaky_relu``, ``prelu`` and ``threshold``; :func:`has_relu` lets
  callers check that something was replaced.

* **max-pooling -> log-sum-exp pooling(beta)** (:func:`maxpool_as_logsumexp`), smooth in the input, for the
  flip-point homotopy on ReLU CNNs and, with the softplus, for surrogates whose own flip points are differentiated
  (``softplus_surrogate(model, beta, maxpool=True)``).

* **erf(u / sigma) scale**. The flip-point networks of Yousefzadeh & O'Leary use erf activations with one scale
  sigma per hidden layer (:class:`Erf`). The homotopy of their later code widens sigma so that no unit is saturated;
  :func:`erf_layers` and :func:`erf_sigmas` find and set those scales.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode, handle_torch_function, has_torch_function_unary

__all__ = [
    "Erf",
    "softplus",
    "RELU_FUNCS",
    "SoftplusSurrogate",
    "softplus_surrogate",
    "relu_as_softplus",
    "maxpool_as_logsumexp",
    "has_relu",
    "erf_layers",
    "erf_sigmas",
    "set_erf_sigmas",
]


class Erf(nn.Module):
    """Gauss error function activation ``erf(u / sigma)`` with a scalar scale ``sigma`` (a buffer, not trained).

    Parameters
    ----------
    sigma : float
        Positive scale. ``sigma = 1`` is plain erf; larger sigma flattens the unit (less saturation).
    """

    def __init__(self, sigma: float = 1.0):
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.erf(u / self.sigma.to(u.dtype))

    def extra_repr(self) -> str:
        return f"sigma={float(self.sigma):.4g}"


#: The ReLU calls that :func:`relu_as_softplus` replaces (module ``nn.ReLU`` calls ``F.relu``).
RELU_FUNCS = frozenset(
    {
        F.relu,
        torch.relu,
        torch.relu_,
        torch.Tensor.relu,
        torch.Tensor.relu_,
        torch._C._nn.relu if hasattr(torch._C._nn, "relu") else torch.relu,
    }
)


class _Softplus(torch.autograd.Function):
    """softplus(beta) with a vectorised forward and a backward that is itself differentiable (any order)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, beta: float) -> torch.Tensor:
        z = u * beta
        t = torch.exp(-z.abs())  # in (0, 1]: never overflows
        v = 1 + t
        # log1p(t) as log(v) corrected for the rounding of 1 + t (Goldberg/Kahan), within a few ulp of log1p;
        # torch's log1p kernel is not vectorised on CPU and costs ~4x this whole expression.
        log1p_t = torch.log(v) - ((v - 1) - t) / v
        ctx.save_for_backward(u)
        ctx.beta = beta
        return (z.clamp_min(0) + log1p_t) / beta

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (u,) = ctx.saved_tensors
        return grad * torch.sigmoid(u * ctx.beta), None


def softplus(u: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """``log(1 + exp(beta * u)) / beta``, exact for all u (no threshold), differentiable to any order.

    Equals ``F.softplus(u, beta)`` to float rounding (a few ulp) and is about twice as fast on the CPU; its
    derivative is ``sigmoid(beta * u)``. A function-mode override sees the call as ``flipfrag.smooth.softplus``.
    """
    if has_torch_function_unary(u):
        return handle_torch_function(softplus, (u,), u, beta=beta)
    return _Softplus.apply(u, float(beta))


class _ReluToSoftplus(TorchFunctionMode):
    """Replace every ReLU call made while active by softplus(beta); counts the replacements."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RELU_FUNCS:
            self.count += 1
            # In-place forms return a new tensor: callers use the returned value (nn.ReLU does).
            return softplus(args[0], beta=self.beta)
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_as_softplus(beta: float = 1.0) -> Iterator[_ReluToSoftplus]:
    """Context manager: inside it, every ReLU (module or functional) computes ``softplus(beta)`` instead.

    Yields the mode object; its ``count`` attribute says how many ReLU calls were replaced.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    mode = _ReluToSoftplus(beta)
    with mode:
        yield mode


class _MaxPoolToLogSumExp(TorchFunctionMode):
    """Replaces ``F.max_pool2d`` by log-sum-exp pooling ``(logsumexp(beta * window) - log(k^2)) / beta`` — the window
    mean for small beta, the max for large — so that the homotopy's deformed ReLU nets are smooth everywhere.
    Pools with padding, dilation, ceil_mode or returned indices are left exact."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.max_pool2d:
            return self._pool(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _pool(
        self, func, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
    ):
        pair = (lambda v: (v, v) if isinstance(v, int) else tuple(v))  # noqa: E731
        k, s = pair(kernel_size), pair(stride if stride not in (None, []) else kernel_size)
        if pair(padding) != (0, 0) or pair(dilation) != (1, 1) or ceil_mode or return_indices or x.dim() != 4:
            return func(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
        N, C, H, W = x.shape
        Ho, Wo = (H - k[0]) // s[0] + 1, (W - k[1]) // s[1] + 1
        cols = F.unfold(x, k, stride=s).reshape(N, C, k[0] * k[1], Ho * Wo)
        out = (torch.logsumexp(self.beta * cols, dim=2) - math.log(k[0] * k[1])) / self.beta
        return out.reshape(N, C, Ho, Wo)


@contextlib.contextmanager
def maxpool_as_logsumexp(beta: float = 1.0) -> Iterator[_MaxPoolToLogSumExp]:
    """Context manager: inside it, ``F.max_pool2d`` (and ``nn.MaxPool2d``) computes log-sum-exp pooling(beta).

    ``(logsumexp(beta * window) - log(window size)) / beta`` is the window mean as beta -> 0 and the window max as
    beta -> inf, and smooth in between. Pools with padding, dilation, ``ceil_mode`` or ``return_indices`` are left
    exact. Used with :func:`relu_as_softplus` by the flip-point homotopy on ReLU CNNs.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    with _MaxPoolToLogSumExp(beta) as mode:
        yield mode


class SoftplusSurrogate(nn.Module):
    """The same network (shared weights, not a copy) with every ReLU evaluated as ``softplus(beta)``.

    Parameters
    ----------
    model : nn.Module
        A network built from ``nn.ReLU`` modules and/or functional ReLU calls.
    beta : float
        Softplus sharpness; ``softplus(u; beta) = log(1 + exp(beta u)) / beta``. Default 1 (Ghorbani et al.).
    maxpool : bool
        Also evaluate max-pooling as log-sum-exp pooling with the same beta (:func:`maxpool_as_logsumexp`), so
        that a ReLU CNN with max-pooling becomes smooth everywhere (default False: pooling stays exact, as in the
        attacks' surrogate). Needed where the surrogate's *own* stationary points are differentiated, e.g. the
        flip points of :mod:`flipfrag.beyond.flipmap`'s surrogate direction.

    Raises
    ------
    ValueError
        On the first forward pass if the model made no ReLU call at all (nothing to smooth: the caller is
        probably handing a non-ReLU net or one using an unsupported form such as ``clamp``).
    """

    def __init__(self, model: nn.Module, beta: float = 1.0, *, maxpool: bool = False):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not isinstance(maxpool, bool):
            raise TypeError(f"maxpool must be a bool, got {type(maxpool).__name__}")
        self.model = model
        self.beta = float(beta)
        self.maxpool = maxpool
        self.replaced_calls: int | None = None
        self.training = model.training  # follow the wrapped model's mode (without changing it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with relu_as_softplus(self.beta) as mode:
            if self.maxpool:
                with maxpool_as_logsumexp(self.beta):
                    out = self.model(x)
            else:
                out = self.model(x)
        if self.replaced_calls is None and mode.count == 0:
            raise ValueError(
                "model: softplus surrogate found no ReLU call to replace (supported: nn.ReLU, F.relu, torch.relu, "
                "Tensor.relu and in-place forms; unsupported: clamp, hardtanh, relu6, leaky_relu, prelu, threshold)"
            )
        self.replaced_calls = mode.count
        return out


def softplus_surrogate(model: nn.Module, beta: float = 1.0, *, copy_weights: bool = False,
                       maxpool: bool = False) -> SoftplusSurrogate:  # fmt: skip
    """Return the softplus(beta) surrogate of ``model`` (weights shared unless ``copy_weights``; ``maxpool=True``:
    max-pooling as log-sum-exp pooling(beta) too, see :class:`SoftplusSurrogate`)."""
    return SoftplusSurrogate(copy.deepcopy(model) if copy_weights else model, beta, maxpool=maxpool)


def has_relu(model: nn.Module, example: torch.Tensor) -> bool:
    """True if evaluating ``model`` on ``example`` makes at least one (replaceable) ReLU call."""
    with torch.no_grad(), relu_as_softplus(1.0) as mode:
        model(example)
    return mode.count > 0


def erf_layers(model: nn.Module) -> list[Erf]:
    """The :class:`Erf` activation modules of ``model`` in registration (= forward, for MLPs) order."""
    return [m for m in model.modules() if isinstance(m, Erf)]


def erf_sigmas(model: nn.Module) -> torch.Tensor:
    """Current sigma of every :class:`Erf` layer, as a 1-D float64 tensor."""
    return torch.tensor([float(m.sigma) for m in erf_layers(model)], dtype=torch.float64)


@contextlib.contextmanager
def set_erf_sigmas(model: nn.Module, sigmas: Sequence[float] | torch.Tensor) -> Iterator[nn.Module]:
    """Temporarily set the sigma of every :class:`Erf` layer; restores the original values on exit."""
    layers = erf_layers(model)
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) != len(layers):
        raise ValueError(f"sigmas: model has {len(layers)} Erf layers, got {len(sigmas)} values")
    if any(not s > 0 for s in sigmas):
        raise ValueError(f"sigmas must all be > 0, got {sigmas}")
    old = [m.sigma.clone() for m in layers]
    try:
        for m, s in zip(layers, sigmas):
            m.sigma.fill_(s)
        yield model
    finally:
        for m, s in zip(layers, old):
            m.sigma.copy_(s)
