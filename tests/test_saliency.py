"""Attributions against Captum, closed forms, a layer-by-layer LRP written from the paper, completeness, and
finite-difference checks of the second-order (create_graph) path."""

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flipfrag.models import MLP, SmallCNN, train
from flipfrag.saliency import (
    attribute,
    canonical_method,
    completeness_gap,
    deeplift,
    dtd,
    gradient,
    integrated_gradients,
    lrp,
    saliency_fn,
    saliency_map,
)
from flipfrag.smooth import softplus_surrogate

captum_attr = pytest.importorskip("captum.attr")
from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule, EpsilonRule  # noqa: E402

DT = torch.float64


class NoPoolCNN(nn.Module):
    """conv-ReLU-conv-ReLU-GAP(2x2)-linear with nn.ReLU modules and no max-pool (Captum's DeepLift rule = ours)."""

    def __init__(self, c=1, width=4, n_classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(c, width, 3, padding=1)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.r2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(8 * width, n_classes)

    def forward(self, x):
        return self.fc(self.pool(self.r2(self.c2(self.r1(self.c1(x))))).flatten(1))


class FunctionalCNN(NoPoolCNN):
    """The same network with the ReLUs written as functional calls of different forms."""

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = F.relu(self.c2(h), inplace=True).relu()  # relu twice = relu; exercises Tensor.relu too
        return self.fc(self.pool(h).flatten(1))


def _digits(n=400):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32)[:, None]
    return x, torch.tensor(d.target[:n])


@pytest.fixture(scope="module")
def trained():
    """A NoPoolCNN trained on 8x8 digits for a second, then cast to float64, and a few test images."""
    x, y = _digits(500)
    torch.manual_seed(0)
    model = NoPoolCNN(width=4)
    train(model, x[:400], y[:400], epochs=6, lr=1e-2, batch_size=50, progress=False)
    model = model.double().eval()
    xt = x[400:406].double()
    pred = model(xt).argmax(1)
    return model, xt, pred


@pytest.fixture(scope="module")
def random_cnn():
    torch.manual_seed(1)
    return NoPoolCNN(c=3, width=3, n_classes=5).double().eval()


def _captum(cls, model, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model).attribute(*args, **kwargs).detach()


# ------------------------------------------------------------------------------------------ Captum oracles


def test_gradient_matches_captum_saliency(trained):
    model, x, y = trained
    want = _captum(captum_attr.Saliency, model, x, target=y, abs=False)
    torch.testing.assert_close(gradient(model, x, y), want, rtol=1e-12, atol=1e-14)
    torch.manual_seed(2)
    cnn = SmallCNN(3, 4, width=4).double().eval()  # with max-pooling: the gradient rule is unaffected
    xr = torch.rand(3, 3, 12, 12, dtype=DT)
    torch.testing.assert_close(gradient(cnn, xr, 1), _captum(captum_attr.Saliency, cnn, xr, target=1, abs=False))


@pytest.mark.parametrize("baseline", ["zero", "mean"])
@pytest.mark.parametrize("internal_batch_size", [None, 7])
def test_integrated_gradients_matches_captum_riemann_right(trained, baseline, internal_batch_size):
    model, x, y = trained
    b = torch.zeros_like(x) if baseline == "zero" else x.mean(0, keepdim=True).expand_as(x)  # the mean image
    got = integrated_gradients(
        model,
        x,
        y,
        baseline=None if baseline == "zero" else x.mean(0),
        steps=20,
        internal_batch_size=internal_batch_size,
    )
    want = _captum(captum_attr.IntegratedGradients, model, x, baselines=b, target=y, n_steps=20, method="riemann_right")
    # Captum rounds the alphas and step sizes to float32: agreement to ~1e-6 of the largest attribution
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_integrated_gradients_probability_score_matches_captum(trained):
    model, x, y = trained
    prob_model = nn.Sequential(model, nn.Softmax(dim=1))
    got = integrated_gradients(model, x, y, steps=10, score="probability")
    want = _captum(captum_attr.IntegratedGradients, prob_model, x, target=y, n_steps=10, method="riemann_right")
    # Captum's float32 alphas: agreement to ~1e-6 of the largest attribution
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("baseline", ["zero", "random"])
def test_deeplift_matches_captum(trained, random_cnn, baseline):
    model, x, y = trained
    b = torch.zeros_like(x) if baseline == "zero" else 0.3 * torch.rand(x.shape[1:], dtype=DT).expand_as(x)
    got = deeplift(model, x, y, baseline=b)
    torch.testing.assert_close(
        got, _captum(captum_attr.DeepLift, model, x, baselines=b, target=y), rtol=1e-9, atol=1e-12
    )
    xr = torch.rand(4, 3, 9, 9, dtype=DT)
    br = torch.rand(4, 3, 9, 9, dtype=DT) if baseline == "random" else torch.zeros_like(xr)
    torch.testing.assert_close(
        deeplift(random_cnn, xr, 2, baseline=br),
        _captum(captum_attr.DeepLift, random_cnn, xr, baselines=br, target=2),
        rtol=1e-9,
        atol=1e-12,
    )


def test_lrp_matches_captum_epsilon_rule(trained):
    model, x, y = trained
    for eps in (1e-6, 1e-2):
        for layer in (model.c1, model.c2, model.pool, model.fc):
            layer.rule = EpsilonRule(epsilon=eps)
        try:
            want = _captum(captum_attr.LRP, model, x, target=y)
        finally:
            for layer in (model.c1, model.c2, model.pool, model.fc):
                if hasattr(layer, "rule"):  # Captum removes the rules itself after a successful call
                    del layer.rule
        torch.testing.assert_close(lrp(model, x, y, eps=eps), want, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------ LRP from the paper's formula


def _dense(layer: nn.Module, in_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight matrix (out, in) and bias (out,) of a linear/conv layer, found by pushing the basis through it."""
    n_in = int(np.prod(in_shape))
    basis = torch.eye(n_in, dtype=DT).view(n_in, *in_shape)
    with torch.no_grad():
        zero = layer(torch.zeros(1, *in_shape, dtype=DT)).flatten(1)
        cols = layer(basis).flatten(1) - zero
    return cols.T.contiguous(), zero[0]


def _lrp_epsilon_reference(mats, x, target, eps):
    """LRP-eps from Bach et al. 2015 / Montavon et al. 2019, one explicit relevance message per connection:
    R_j = sum_k (a_j w_kj / (z_k + eps sign z_k)) R_k, starting from R = z_target at the output unit."""
    a = [x.flatten()]
    zs = []
    for i, (w, b) in enumerate(mats):
        z = w @ a[-1] + b
        zs.append(z)
        a.append(z.clamp_min(0) if i < len(mats) - 1 else z)
    relevance = torch.zeros_like(zs[-1])
    relevance[target] = zs[-1][target]
    for (w, _), z, a_in in zip(reversed(mats), reversed(zs), reversed(a[:-1])):
        stab = z + eps * torch.where(z >= 0, 1.0, -1.0).to(DT)
        messages = a_in[None, :] * w / stab[:, None] * relevance[:, None]  # (out, in): message k -> j
        relevance = messages.sum(0)
    return relevance


def test_lrp_matches_layerwise_reference_mlp_and_cnn():
    torch.manual_seed(3)
    mlp = MLP(12, [7, 5], 3, activation="relu").double().eval()
    x = torch.randn(4, 12, dtype=DT)
    lin = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    mats = [(m.weight.detach(), m.bias.detach()) for m in lin]
    for eps in (1e-9, 0.1):
        got = lrp(mlp, x, 2, eps=eps)
        want = torch.stack([_lrp_epsilon_reference(mats, x[i], 2, eps) for i in range(4)])
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)
    )
    cnn = cnn.double().eval()
    shapes = [(1, 6, 6), (3, 6, 6), (64,)]
    mats = [_dense(cnn[0], shapes[0]), _dense(cnn[2], shapes[1]), _dense(cnn[5], shapes[2])]
    xc = torch.rand(3, 1, 6, 6, dtype=DT)
    got = lrp(cnn, xc, 4, eps=0.05)
    want = torch.stack([_lrp_epsilon_reference(mats, xc[i], 4, 0.05) for i in range(3)]).view_as(xc)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_lrp_conserves_relevance_without_biases(trained):
    model, x, y = trained
    nobias = NoPoolCNN(width=4).double().eval()
    nobias.load_state_dict(model.state_dict())
    for m in (nobias.c1, nobias.c2, nobias.fc):
        m.bias.data.zero_()
    attr = lrp(nobias, x, y, eps=1e-12)
    score = nobias(x).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(attr.flatten(1).sum(1), score.detach(), rtol=1e-8, atol=1e-10)
    # and with eps -> 0 LRP on a ReLU net is gradient x input (Ancona et al. 2018), biases or not
    torch.testing.assert_close(lrp(model, x, y, eps=1e-12), x * gradient(model, x, y), rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------------------------------ closed forms, completeness


class Quadratic(nn.Module):
    """S_0(x) = sum x_i^2, S_1(x) = -S_0(x): IG's right Riemann sum has the closed form x_i^2 (M + 1) / M."""

    def forward(self, x):
        s = (x**2).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def test_integrated_gradients_right_riemann_closed_form():
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    for m in (1, 7, 100):
        # sum_{k=1..M} 2 (k/M) x / M = x (M+1)/M; a left sum would give (M-1)/M instead
        torch.testing.assert_close(integrated_gradients(Quadratic(), x, 0, steps=m), x**2 * (m + 1) / m)


def test_linear_model_closed_forms():
    torch.manual_seed(4)
    lin = nn.Linear(6, 3).double()
    x, b = torch.randn(5, 6, dtype=DT), torch.randn(6, dtype=DT)
    w = lin.weight.detach()[1]
    torch.testing.assert_close(gradient(lin, x, 1), w.expand_as(x))
    torch.testing.assert_close(integrated_gradients(lin, x, 1, baseline=b, steps=3), (x - b) * w)
    torch.testing.assert_close(deeplift(lin, x, 1, baseline=b), (x - b) * w)
    z = lin(x)[:, 1:2].detach()
    torch.testing.assert_close(lrp(lin, x, 1, eps=0.1), x * w * z / (z + 0.1 * torch.sign(z)))


def test_single_relu_unit_deeplift_closed_form():
    """S(x) = relu(w.x + c): DeepLIFT = w_i (x_i - b_i) (relu(z) - relu(z_b)) / (z - z_b)."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(4, 1), nn.ReLU()).double()
    x, b = torch.randn(50, 4, dtype=DT), torch.randn(50, 4, dtype=DT)
    z, zb = net[0](x).detach(), net[0](b).detach()
    want = net[0].weight.detach() * (x - b) * (z.clamp_min(0) - zb.clamp_min(0)) / (z - zb)
    torch.testing.assert_close(deeplift(net, x, 0, baseline=b), want)
    # the gradient would instead be w * 1[z > 0]: different wherever z and z_b have opposite signs
    assert ((z > 0) != (zb > 0)).any()


def test_integrated_gradients_completeness_converges(trained):
    model, x, y = trained
    smooth = softplus_surrogate(model, beta=3.0)
    base = x.mean(0)
    gaps = [
        completeness_gap(smooth, x, y, integrated_gradients(smooth, x, y, baseline=base, steps=m), base).abs().max()
        for m in (4, 32, 256)
    ]
    assert gaps[2] < gaps[1] < gaps[0]
    assert gaps[2] < 2 * gaps[0] * 4 / 256  # the right Riemann sum's O(1/M) error


@pytest.mark.parametrize("net", ["module", "functional", "sigmoid", "tanh_erf_softplus"])
def test_deeplift_completeness_exact(trained, net):
    model, x, y = trained
    if net == "functional":
        m = FunctionalCNN(width=4).double().eval()
        m.load_state_dict(model.state_dict())
    elif net == "module":
        m = model
    elif net == "sigmoid":
        m = nn.Sequential(nn.Flatten(), nn.Linear(64, 9), nn.Sigmoid(), nn.Linear(9, 10)).double()
    else:
        m = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 9), nn.Tanh(), nn.Linear(9, 7), nn.Softplus(beta=2.0), nn.Linear(7, 8)
        ).double()
        m = nn.Sequential(*m[:5], _ErfLayer(), m[5])
    b = 0.2 * torch.rand(x.shape[1:], dtype=DT)
    attr = deeplift(m, x, y % 7, baseline=b)
    torch.testing.assert_close(
        completeness_gap(m, x, y % 7, attr, b), torch.zeros(len(x), dtype=DT), atol=1e-12, rtol=0
    )


class _ErfLayer(nn.Module):
    def forward(self, u):
        return torch.erf(u / 2)


def test_functional_relu_equals_module_relu(trained):
    model, x, y = trained
    fmodel = FunctionalCNN(width=4).double().eval()
    fmodel.load_state_dict(model.state_dict())
    for method in ("gradient", "ig", "deeplift", "lrp", "dtd"):
        kw = {"steps": 5} if method == "ig" else {}
        kw |= {"baseline": 0.1} if method in ("ig", "deeplift") else {}
        torch.testing.assert_close(attribute(fmodel, x, y, method, **kw), attribute(model, x, y, method, **kw))


def test_batched_equals_one_at_a_time(trained):
    model, x, y = trained
    for method in ("gradient", "ig", "deeplift", "lrp", "dtd"):
        kw = {"steps": 6} if method == "ig" else {}
        batch = attribute(model, x, y, method, **kw)
        single = torch.cat([attribute(model, x[i : i + 1], y[i : i + 1], method, **kw) for i in range(len(x))])
        torch.testing.assert_close(batch, single, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------- create_graph / second order


def _map_fn(method, model, target, **kw):
    def fn(x):
        return saliency_map(attribute(model, x, target, method, create_graph=True, **kw))

    return fn


@pytest.mark.parametrize("method", ["gradient", "ig", "lrp", "deeplift", "dtd"])
def test_second_order_matches_finite_differences(method):
    """The input-Jacobian of the saliency map (double backprop) equals finite differences: on the softplus
    surrogate for gradient / IG / LRP, on the ReLU net itself for DeepLIFT and DTD."""
    torch.manual_seed(6)
    relu_net = NoPoolCNN(c=2, width=2, n_classes=3).double().eval()
    model = relu_net if method in ("deeplift", "dtd") else softplus_surrogate(relu_net, beta=2.0)
    kw = {"steps": 4} if method == "ig" else {}
    kw |= {"baseline": 0.2 * torch.rand(2, 5, 5, dtype=DT)} if method == "deeplift" else {}
    kw |= {"eps": 0.05} if method == "lrp" else {}  # a large eps: its factors' x-dependence must be exact too
    x = torch.rand(2, 2, 5, 5, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(_map_fn(method, model, torch.tensor([0, 2]), **kw), (x,), eps=1e-6, atol=1e-5)


def test_surrogate_map_tends_to_the_relu_map_and_has_curvature(trained):
    """Our surrogate, not PyTorch's ReLU: softplus(β) maps approach the ReLU net's map as β grows (a surrogate that
    smooths with the wrong β, or replaces nothing, fails one of the two checks), and the surrogate's map has a
    non-zero input-Jacobian where the ReLU net's has none."""
    model, x, y = trained
    xg = x.clone().requires_grad_(True)
    m_relu = saliency_map(gradient(model, x, y)).detach()
    gaps = {}
    for beta in (1.0, 10.0, 1000.0):
        m_b = saliency_map(gradient(softplus_surrogate(model, beta=beta), x, y)).detach()
        gaps[beta] = float((m_b - m_relu).abs().flatten(1).sum(1).max())  # L1 between maps that each sum to 1
    assert gaps[1.0] > gaps[10.0] > gaps[1000.0] and gaps[1000.0] < 0.05 < gaps[1.0], gaps
    smooth = softplus_surrogate(model, beta=1.0)
    m2 = saliency_map(gradient(smooth, xg, y, create_graph=True))
    (g_soft,) = torch.autograd.grad((m2 * torch.rand_like(m2)).sum(), xg)
    assert torch.isfinite(g_soft).all() and (g_soft.flatten(1).abs().sum(1) > 0).all()


def test_create_graph_gives_the_same_values(trained):
    model, x, y = trained
    smooth = softplus_surrogate(model, beta=2.0)
    for method, net in (("deeplift", model), ("lrp", model), ("lrp", smooth), ("ig", smooth), ("dtd", model)):
        kw = {"steps": 4} if method == "ig" else {}
        xg = x.clone().requires_grad_(True)
        torch.testing.assert_close(
            attribute(net, xg, y, method, create_graph=True, **kw).detach(), attribute(net, x, y, method, **kw)
        )


def test_create_graph_keeps_result_attached():
    torch.manual_seed(7)
    model = MLP(5, [4], 2, activation="softplus").double()
    x = torch.rand(3, 5, dtype=DT, requires_grad=True)
    for method in ("gradient", "ig", "deeplift", "lrp", "dtd"):
        kw = {"steps": 3} if method == "ig" else {}
        assert attribute(model, x, 0, method, create_graph=True, **kw).requires_grad
        assert not attribute(model, x.detach(), 0, method, **kw).requires_grad


# --------------------------------------------------------------------------------------------- saliency_map


def test_saliency_map_post_processing():
    attr = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 0.0], [2.0, 1.0]]]])  # (1, 2, 2, 2)
    want = torch.tensor([[[2.0, 2.0], [2.0, 4.0]]]) / 10.0  # |.| summed over channels, then /10
    torch.testing.assert_close(saliency_map(attr), want)
    m = saliency_map(torch.randn(4, 3, 5, 6))
    assert m.shape == (4, 5, 6) and (m >= 0).all()
    torch.testing.assert_close(m.flatten(1).sum(1), torch.ones(4))
    assert saliency_map(torch.randn(2, 7)).shape == (2, 7)
    assert torch.equal(saliency_map(torch.zeros(1, 1, 2, 2)), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="attr"):
        saliency_map(torch.randn(1, 1, 1, 2, 2))


# ----------------------------------------------------------------------------------------- hygiene and errors


def test_inputs_not_mutated_and_no_parameter_grads(trained):
    model, x, y = trained
    model = copy.deepcopy(model)  # fresh .grad fields (Captum's LRP may have touched the shared one)
    x0, y0 = x.clone(), y.clone()
    for method in ("gradient", "ig", "deeplift", "lrp", "dtd"):
        attribute(model, x, y, method, **({"steps": 3} if method == "ig" else {}))
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert all(p.grad is None for p in model.parameters())


def test_method_names():
    assert canonical_method("IG") == "integrated_gradients"
    assert canonical_method("sg") == "gradient"
    assert saliency_fn("deeplift") is deeplift
    assert canonical_method("deep_taylor") == "dtd" and saliency_fn("DTD") is dtd
    with pytest.raises(ValueError, match="method"):
        canonical_method("smoothgrad")


def test_errors_name_the_argument(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="steps"):
        integrated_gradients(model, x, y, steps=0)
    with pytest.raises(ValueError, match="target"):
        gradient(model, x, 10)
    with pytest.raises(ValueError, match="target"):
        gradient(model, x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="target"):
        gradient(model, x, 1.5)
    with pytest.raises(ValueError, match="baseline"):
        deeplift(model, x, y, baseline=torch.zeros(3, 8, 8, dtype=DT))
    with pytest.raises(ValueError, match="x"):
        gradient(model, x[0, 0, 0], 0)
    with pytest.raises(ValueError, match="NaN"):
        gradient(model, torch.full_like(x, float("nan")), y)
    with pytest.raises(TypeError, match="x"):
        gradient(model, x.numpy(), y)
    with pytest.raises(ValueError, match="eps"):
        lrp(model, x, y, eps=0)
    with pytest.raises(ValueError, match="score"):
        gradient(model, x, y, score="softmax")
    with pytest.raises(ValueError, match="internal_batch_size"):
        integrated_gradients(model, x, y, internal_batch_size=0)
    dropout_net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 3)).double().train()
    with pytest.raises(ValueError, match="model"):
        gradient(dropout_net, x, 0)


# ---------------------------------------------------------------------------- DTD from the paper's formulas


def _stab(d, eps):
    """Denominator d + eps sign(d), sign(0) = +1 (the documented stabiliser)."""
    return d + eps * (1.0 if d >= 0 else -1.0)


def _dtd_reference(ops, x, target, lower, upper, eps):
    """Deep Taylor Decomposition written from Montavon et al. 2017 with explicit loops over connections (numpy, no
    autograd). ``ops`` is the network as a list of ("dense", W (out, in), b), ("relu",) and ("maxpool", (C, H, W), k)
    acting on flat vectors. Relevance starts as z_target at the output; the first "dense" op gets the z^B rule with
    bounds (lower, upper), the other dense ops the z+ rule, ReLUs pass relevance unchanged, max-pooling gives each
    window's relevance to its argmax."""
    x = np.asarray(x, dtype=np.float64).ravel()
    lower, upper = (np.broadcast_to(np.asarray(v, dtype=np.float64), x.shape) for v in (lower, upper))
    ins, a, argmax = [], x, {}
    for i, op in enumerate(ops):
        ins.append(a)
        if op[0] == "dense":
            a = op[1] @ a + op[2]
        elif op[0] == "relu":
            a = np.maximum(a, 0.0)
        else:
            (c, h, w), k = op[1], op[2]
            out, idx = [], []
            for ch in range(c):
                for r in range(0, h - k + 1, k):
                    for col in range(0, w - k + 1, k):
                        flat = [(ch * h + rr) * w + cc for rr in range(r, r + k) for cc in range(col, col + k)]
                        j = int(np.argmax(a[flat]))
                        out.append(a[flat[j]])
                        idx.append(flat[j])
            argmax[i] = idx
            a = np.array(out)
    relevance = np.zeros_like(a)
    relevance[target] = a[target]
    first = next(i for i, op in enumerate(ops) if op[0] == "dense")
    for i in reversed(range(len(ops))):
        op, a_in = ops[i], ins[i]
        if op[0] == "relu":
            continue
        new = np.zeros_like(a_in)
        if op[0] == "maxpool":
            for o, j in enumerate(argmax[i]):
                new[j] += relevance[o]
        elif i != first:  # z+ rule
            w = op[1]
            for k in range(w.shape[0]):
                zp = sum(a_in[j] * max(w[k, j], 0.0) for j in range(w.shape[1]))
                den = _stab(zp, eps)
                for j in range(w.shape[1]):
                    if den != 0:
                        new[j] += a_in[j] * max(w[k, j], 0.0) / den * relevance[k]
        else:  # z^B rule
            w = op[1]
            for k in range(w.shape[0]):
                terms = [
                    a_in[j] * w[k, j] - lower[j] * max(w[k, j], 0.0) - upper[j] * min(w[k, j], 0.0)
                    for j in range(w.shape[1])
                ]
                den = _stab(sum(terms), eps)
                for j in range(w.shape[1]):
                    if den != 0:
                        new[j] += terms[j] / den * relevance[k]
        relevance = new
    return relevance


def _np(t):
    return t.detach().numpy().astype(np.float64)


def _mlp_5432(seed):
    """A 5-4-3-2 ReLU MLP with N(0.5, 1) weights and biases in [-0.1, 0.4), so that on inputs in [0, 1] most hidden
    units are active (PyTorch's default init often leaves such a narrow net dead: all-zero relevance)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.4)
    ops = []
    for m in net:
        ops.append(("dense", _np(m.weight), _np(m.bias)) if isinstance(m, nn.Linear) else ("relu",))
    return net, ops


@pytest.mark.parametrize("eps", [0.0, 1e-9, 0.05])
def test_dtd_matches_explicit_loops_mlp(eps):
    net, ops = _mlp_5432(11)
    x = torch.rand(6, 5, dtype=DT)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    got = dtd(net, x, y, eps=eps)
    want = np.stack([_dtd_reference(ops, _np(x[i]), int(y[i]), 0.0, 1.0, eps) for i in range(6)])
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)
    assert (np.abs(want).sum(1) > 1e-2).sum() >= 4  # a live net, not an all-zero comparison
    # per-feature tensor bounds, x strictly between them
    lower = -0.5 * torch.rand(5, dtype=DT)
    upper = 1 + torch.rand(5, dtype=DT)
    xb = lower + (upper - lower) * torch.rand(6, 5, dtype=DT)
    got = dtd(net, xb, y, lower=lower, upper=upper, eps=eps)
    want = np.stack([_dtd_reference(ops, _np(xb[i]), int(y[i]), _np(lower), _np(upper), eps) for i in range(6)])
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-10)


def _tiny_pool_cnn(seed):
    torch.manual_seed(seed)
    cnn = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    cnn = cnn.double().eval()
    gap = np.zeros((4, 36))
    for c in range(4):
        gap[c, 9 * c : 9 * c + 9] = 1 / 9  # global average pooling as a (positive) dense layer: the z+ rule applies
    ops = [
        ("dense", *(_np(t) for t in _dense(cnn[0], (1, 6, 6)))),
        ("relu",),
        ("maxpool", (3, 6, 6), 2),
        ("dense", *(_np(t) for t in _dense(cnn[3], (3, 3, 3)))),
        ("relu",),
        ("dense", gap, np.zeros(4)),
        ("dense", _np(cnn[7].weight), _np(cnn[7].bias)),
    ]
    return cnn, ops


def test_dtd_matches_explicit_loops_cnn():
    """conv → ReLU → max-pool → conv → ReLU → global average pool → linear against the loop oracle, where the convs
    are explicit dense matrices, max-pooling is winner-take-all and the average pool takes the z+ rule."""
    cnn, ops = _tiny_pool_cnn(12)
    x = torch.rand(4, 1, 6, 6, dtype=DT)
    y = torch.tensor([2, 0, 1, 2])
    for lower, upper in ((0.0, 1.0), (-0.2 * torch.rand(1, 6, 6, dtype=DT), 1.0 + torch.rand(1, 6, 6, dtype=DT))):
        got = dtd(cnn, x, y, lower=lower, upper=upper)
        lo, hi = (_np(b).ravel() if torch.is_tensor(b) else b for b in (lower, upper))
        want = np.stack([_dtd_reference(ops, _np(x[i]), int(y[i]), lo, hi, 1e-9) for i in range(4)])
        np.testing.assert_allclose(got.flatten(1).numpy(), want, rtol=0, atol=1e-8)
        assert np.abs(want).max() > 1e-3  # not a trivially zero comparison


def test_dtd_hidden_layers_match_captum_alpha1_beta0(trained):
    """Independent check of the z+ part: Captum's LayerLRP with Alpha1_Beta0 (= z+ for zero biases) on the hidden
    layers gives the relevance at conv1's output; the z^B rule at conv1 is then applied by hand with conv_transpose2d
    (the adjoint of the convolution, i.e. Wᵀ)."""
    model, x, y = trained
    net = NoPoolCNN(width=4).double().eval()
    net.load_state_dict(model.state_dict())
    for m in (net.c1, net.c2, net.fc):
        m.bias.data.zero_()
    y = net(x).argmax(1)  # positive scores
    for m in (net.c2, net.pool, net.fc):
        m.rule = Alpha1_Beta0_Rule()
    net.c1.rule = EpsilonRule(epsilon=1e-12)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = captum_attr.LayerLRP(net, net.c2).attribute(x, target=y, attribute_to_layer_input=True)
    finally:
        for m in (net.c1, net.c2, net.pool, net.fc):
            if hasattr(m, "rule"):  # Captum removes the rules itself after a successful call
                del m.rule
    r = (r[0] if isinstance(r, (list, tuple)) else r).detach()  # relevance at c2's input = at conv1's output
    w = net.c1.weight.detach()
    z_b = F.conv2d(x, w, padding=1) - F.conv2d(torch.ones_like(x), w.clamp_max(0), padding=1)  # lower 0, upper 1
    s = torch.where(z_b == 0, 0.0, r / torch.where(z_b == 0, 1.0, z_b))  # a message is 0 where z^B = 0
    want = x * F.conv_transpose2d(s, w, padding=1) - F.conv_transpose2d(s, w.clamp_max(0), padding=1)
    torch.testing.assert_close(dtd(net, x, y, eps=0), want, rtol=1e-7, atol=1e-9)


def test_dtd_conserves_relevance_without_biases(trained):
    net, _ = _mlp_5432(13)
    for m in net:
        if isinstance(m, nn.Linear):
            m.bias.data.zero_()
    x = torch.rand(40, 5, dtype=DT)
    scores = net(x).detach()
    y = scores.argmax(1)
    pos = scores.gather(1, y[:, None])[:, 0] > 0
    assert pos.sum() >= 20
    x, y, score = x[pos], y[pos], scores.gather(1, y[:, None])[:, 0][pos]
    torch.testing.assert_close(dtd(net, x, y, eps=0).sum(1), score, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dtd(net, x, y).sum(1), score, rtol=1e-5, atol=1e-12)  # eps = 1e-9 absorbs a little
    # and on a CNN (zero biases; the trained model's weights)
    model, xc, _ = trained
    cnn = NoPoolCNN(width=4).double().eval()
    cnn.load_state_dict(model.state_dict())
    for m in (cnn.c1, cnn.c2, cnn.fc):
        m.bias.data.zero_()
    yc = cnn(xc).argmax(1)
    sc = cnn(xc).gather(1, yc[:, None])[:, 0].detach()
    assert (sc > 0).all()
    torch.testing.assert_close(dtd(cnn, xc, yc, eps=0).flatten(1).sum(1), sc, rtol=1e-10, atol=1e-12)


def test_dtd_non_negative_for_positive_scores():
    """Theory: with a positive target score, non-negative hidden inputs (post-ReLU) and lower < x < upper, every z+
    and z^B message is non-negative (ratios z / z+ >= 0 on active units, z^B >= 0 in the box) — biases or not."""
    torch.manual_seed(14)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double().eval()
    cnn, _ = _tiny_pool_cnn(15)
    torch.manual_seed(16)
    for model, x in ((net, torch.rand(64, 5, dtype=DT)), (cnn, torch.rand(32, 1, 6, 6, dtype=DT))):
        scores = model(x).detach()
        for y in range(scores.shape[1]):
            attr = dtd(model, x, y).flatten(1)
            sign = torch.sign(scores[:, y])[:, None]
            assert (attr * sign >= 0).all()  # negative scores give non-positive relevance
            assert (attr.abs().sum(1) > 0).float().mean() > 0.9  # (all-zero only where a whole layer is inactive)


def test_dtd_prefix_normalisation_equals_fused_first_layer():
    """A model that normalises inside ((x - m) / s per channel, some s < 0) before conv1 gives the same DTD
    relevance as the equivalent model with the normalisation folded into conv1 (z^B is invariant under that)."""
    torch.manual_seed(17)
    mean = torch.tensor([0.4, 0.5, 0.6], dtype=DT).view(3, 1, 1)
    std = torch.tensor([0.5, -0.25, 2.0], dtype=DT).view(3, 1, 1)
    conv = nn.Conv2d(3, 4, 3).double()  # no padding: padding zeros would not commute with the normalisation
    rest = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3)).double()

    class Normalised(nn.Module):
        def forward(self, x):
            return rest(conv((x - mean) / std))

    fused = nn.Conv2d(3, 4, 3).double()
    with torch.no_grad():
        fused.weight.copy_(conv.weight / std.view(1, 3, 1, 1))
        fused.bias.copy_(conv.bias - (conv.weight * (mean / std).view(1, 3, 1, 1)).sum((1, 2, 3)))
    x = torch.rand(3, 3, 10, 10, dtype=DT)
    torch.testing.assert_close(Normalised()(x), rest(fused(x)))
    for lower, upper in ((0.0, 1.0), (-0.1, torch.tensor([1.0, 1.2, 1.5], dtype=DT).view(3, 1, 1))):
        got = dtd(Normalised(), x, 1, lower=lower, upper=upper)
        want = dtd(nn.Sequential(fused, rest), x, 1, lower=lower, upper=upper)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert want.abs().max() > 1e-3


def test_dtd_create_graph_gradcheck_mlp():
    net, _ = _mlp_5432(18)
    x = (0.2 + 0.6 * torch.rand(3, 5, dtype=DT)).requires_grad_(True)
    y = torch.tensor([0, 1, 1])
    assert (dtd(net, x, y).abs().sum(1) > 1e-2).all()  # a live net
    assert torch.autograd.gradcheck(lambda v: dtd(net, v, y, create_graph=True), (x,), eps=1e-6, atol=1e-6)
    lower, upper = torch.full((5,), -0.3, dtype=DT), torch.full((5,), 1.4, dtype=DT)
    assert torch.autograd.gradcheck(
        lambda v: dtd(net, v, y, lower=lower, upper=upper, create_graph=True, eps=0.01), (x,), eps=1e-6, atol=1e-6
    )


def test_dtd_second_order_on_relu_cnn_with_max_pool_is_finite_nonzero_and_exact():
    """On the ReLU net itself (SmallCNN: max-pooling, global average pool) the input-gradient of a loss on the DTD
    saliency map is finite and non-zero, and matches central finite differences along random directions."""
    torch.manual_seed(19)
    model = SmallCNN(3, 4, width=3).double().eval()
    x = (0.05 + 0.9 * torch.rand(2, 3, 8, 8, dtype=DT)).requires_grad_(True)
    y = model(x).argmax(1).detach()
    weights = torch.rand(2, 8, 8, dtype=DT)

    def loss(v):
        return (saliency_map(dtd(model, v, y, create_graph=True)) * weights).sum()

    (g,) = torch.autograd.grad(loss(x), x)
    assert torch.isfinite(g).all() and (g.flatten(1).abs().sum(1) > 0).all()
    assert (g != 0).float().mean() > 0.5
    h = 1e-6
    for _ in range(3):
        d = torch.randn_like(x)
        with torch.no_grad():
            fd = (loss(x + h * d) - loss(x - h * d)) / (2 * h)
        torch.testing.assert_close((g * d).sum(), fd, rtol=1e-5, atol=1e-9)


def test_dtd_batch_equals_per_sample():
    cnn, _ = _tiny_pool_cnn(20)
    x = torch.rand(5, 1, 6, 6, dtype=DT)
    y = torch.tensor([0, 2, 1, 1, 0])
    lower = -0.1 * torch.rand(5, 1, 1, 1, dtype=DT)  # per-sample bounds
    upper = 1 + 0.1 * torch.rand(5, 1, 1, 1, dtype=DT)
    batch = dtd(cnn, x, y, lower=lower, upper=upper)
    single = torch.cat([dtd(cnn, x[i : i + 1], y[i : i + 1], lower=lower[i], upper=upper[i]) for i in range(5)])
    torch.testing.assert_close(batch, single, rtol=1e-12, atol=1e-14)


def test_dtd_errors_name_the_argument(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="lower"):
        dtd(model, x, y, lower=1.0, upper=1.0)
    with pytest.raises(ValueError, match="lower"):
        dtd(model, x, y, lower=torch.zeros(3, 8, 8, dtype=DT))
    with pytest.raises(TypeError, match="upper"):
        dtd(model, x, y, upper=None)
    with pytest.raises(ValueError, match="upper"):
        dtd(model, x, y, upper=float("nan"))
    with pytest.raises(ValueError, match="x has values outside"):  # x outside [lower, upper] is rejected
        dtd(model, x + 0.5, y)
    with pytest.raises(ValueError, match="x has values outside"):
        dtd(model, x, y, lower=0.1)
    dtd(model, x + 0.5, y, upper=1.5)  # fine with matching bounds
    with pytest.raises(ValueError, match="eps"):
        dtd(model, x, y, eps=-1e-3)
    with pytest.raises(ValueError, match="target"):
        dtd(model, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        dtd(model, x, 10)
    with pytest.raises(TypeError, match="target"):
        dtd(model, x, 1.5)
    with pytest.raises(ValueError, match="x"):
        dtd(model, x[0, 0, 0], 0)
    with pytest.raises(ValueError, match="model"):  # no linear / convolution layer
        dtd(nn.Flatten(), x, 0)
    bn_net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
    with pytest.raises(ValueError, match="model"):  # eval-mode batch norm: no DTD rule, rejected
        dtd(bn_net.double().eval(), x, 0)
