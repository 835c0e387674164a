"""Operations whose second derivatives are cheap: what the attacks' double backward needs on depthwise networks.

:func:`depthwise_conv2d` is ``F.conv2d(x, w, b, stride, padding, groups=C)`` for a depthwise weight (C, 1, kh, kw),
with the same forward call and a backward written as one differentiable transposed grouped convolution. PyTorch's own
double backward of a grouped convolution loops over the groups (one convolution call per channel: 8,960 calls for
EfficientNet-Lite0, most of the time of a simple-gradient attack step); the transposed convolution's backward is one
grouped convolution call.

The function dispatches through ``__torch_function__`` (like :func:`flipfrag.smooth.softplus`), so function modes see
it as one call, ``flipfrag.ops.depthwise_conv2d``, with ``F.conv2d``'s signature: the rule-based saliency methods
(:mod:`flipfrag.saliency`) treat it as a convolution layer and re-call it with modified weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

__all__ = ["depthwise_conv2d"]


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Depthwise(torch.autograd.Function):
    """Depthwise convolution whose backward is itself differentiable by single grouped-convolution calls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]):
        ctx.save_for_backward(x, w)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, w, None, stride, padding, 1, w.shape[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            # the transposed convolution, with the output padding that restores x's size (stride 2)
            (kh, kw), (sh, sw), (ph, pw) = w.shape[-2:], ctx.stride, ctx.padding
            extra = (x.shape[-2] - ((g.shape[-2] - 1) * sh - 2 * ph + kh),
                     x.shape[-1] - ((g.shape[-1] - 1) * sw - 2 * pw + kw))  # fmt: skip
            gx = F.conv_transpose2d(g, w, None, ctx.stride, ctx.padding, extra, w.shape[0])
        if ctx.needs_input_grad[1]:
            gw = torch.nn.grad.conv2d_weight(x, w.shape, g, ctx.stride, ctx.padding, groups=w.shape[0])
        return gx, gw, None, None


def depthwise_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                     padding=0, dilation=1, groups: int | None = None) -> torch.Tensor:  # fmt: skip
    """``F.conv2d(input, weight, bias, stride, padding, dilation, groups=C)`` for ``weight`` of shape (C, 1, kh, kw)
    and ``input`` (N, C, H, W), with a backward made of differentiable transposed-convolution calls (cheap double
    backward; module docstring). ``groups`` must be C (or None), ``dilation`` 1, ``padding`` symmetric (int or pair)."""
    if has_torch_function((input, weight)):
        return handle_torch_function(depthwise_conv2d, (input, weight), input, weight, bias, stride, padding,
                                     dilation, groups)  # fmt: skip
    if input.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != input.shape[1]:
        raise ValueError(f"depthwise_conv2d needs input (N, C, H, W) and weight (C, 1, kh, kw), got "
                         f"{tuple(input.shape)} and {tuple(weight.shape)}")  # fmt: skip
    if groups not in (None, input.shape[1]) or _pair(dilation) != (1, 1):
        raise ValueError(f"depthwise_conv2d: groups must equal the channels ({input.shape[1]}) and dilation 1, got "
                         f"groups={groups}, dilation={dilation}")  # fmt: skip
    out = _Depthwise.apply(input, weight, _pair(stride), _pair(padding))
    return out if bias is None else out + bias.reshape(1, -1, 1, 1)
