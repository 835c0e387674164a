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
    gradient,
    integrated_gradients,
    lrp,
    saliency_fn,
    saliency_map,
)
from flipfrag.smooth import softplus_surrogate

captum_attr = pytest.importorskip("captum.attr")
from captum.attr._utils.lrp_rules import EpsilonRule  # noqa: E402

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
    for method in ("gradient", "ig", "deeplift", "lrp"):
        kw = {"steps": 5} if method == "ig" else {}
        kw |= {"baseline": 0.1} if method in ("ig", "deeplift") else {}
        torch.testing.assert_close(attribute(fmodel, x, y, method, **kw), attribute(model, x, y, method, **kw))


def test_batched_equals_one_at_a_time(trained):
    model, x, y = trained
    for method in ("gradient", "ig", "deeplift", "lrp"):
        kw = {"steps": 6} if method == "ig" else {}
        batch = attribute(model, x, y, method, **kw)
        single = torch.cat([attribute(model, x[i : i + 1], y[i : i + 1], method, **kw) for i in range(len(x))])
        torch.testing.assert_close(batch, single, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------- create_graph / second order


def _map_fn(method, model, target, **kw):
    def fn(x):
        return saliency_map(attribute(model, x, target, method, create_graph=True, **kw))

    return fn


@pytest.mark.parametrize("method", ["gradient", "ig", "lrp", "deeplift"])
def test_second_order_matches_finite_differences(method):
    """The input-Jacobian of the saliency map (double backprop) equals finite differences: on the softplus
    surrogate for gradient / IG / LRP, on the ReLU net itself for DeepLIFT."""
    torch.manual_seed(6)
    relu_net = NoPoolCNN(c=2, width=2, n_classes=3).double().eval()
    model = relu_net if method == "deeplift" else softplus_surrogate(relu_net, beta=2.0)
    kw = {"steps": 4} if method == "ig" else {}
    kw |= {"baseline": 0.2 * torch.rand(2, 5, 5, dtype=DT)} if method == "deeplift" else {}
    kw |= {"eps": 0.05} if method == "lrp" else {}  # a large eps: its factors' x-dependence must be exact too
    x = torch.rand(2, 2, 5, 5, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(_map_fn(method, model, torch.tensor([0, 2]), **kw), (x,), eps=1e-6, atol=1e-5)


def test_relu_second_order_is_zero_and_surrogate_is_not(trained):
    model, x, y = trained
    xg = x.clone().requires_grad_(True)
    m = saliency_map(gradient(model, xg, y, create_graph=True))
    loss = (m * torch.rand_like(m)).sum()
    (g_relu,) = torch.autograd.grad(loss, xg, allow_unused=True)
    assert g_relu is None or torch.count_nonzero(g_relu) == 0  # ReLU: zero almost everywhere
    smooth = softplus_surrogate(model, beta=1.0)
    m2 = saliency_map(gradient(smooth, xg, y, create_graph=True))
    (g_soft,) = torch.autograd.grad((m2 * torch.rand_like(m2)).sum(), xg)
    assert torch.isfinite(g_soft).all() and (g_soft.flatten(1).abs().sum(1) > 0).all()


def test_create_graph_gives_the_same_values(trained):
    model, x, y = trained
    smooth = softplus_surrogate(model, beta=2.0)
    for method, net in (("deeplift", model), ("lrp", model), ("lrp", smooth), ("ig", smooth)):
        kw = {"steps": 4} if method == "ig" else {}
        xg = x.clone().requires_grad_(True)
        torch.testing.assert_close(
            attribute(net, xg, y, method, create_graph=True, **kw).detach(), attribute(net, x, y, method, **kw)
        )


def test_create_graph_keeps_result_attached():
    torch.manual_seed(7)
    model = MLP(5, [4], 2, activation="softplus").double()
    x = torch.rand(3, 5, dtype=DT, requires_grad=True)
    for method in ("gradient", "ig", "deeplift", "lrp"):
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
    for method in ("gradient", "ig", "deeplift", "lrp"):
        attribute(model, x, y, method, **({"steps": 3} if method == "ig" else {}))
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert all(p.grad is None for p in model.parameters())


def test_method_names():
    assert canonical_method("IG") == "integrated_gradients"
    assert canonical_method("sg") == "gradient"
    assert saliency_fn("deeplift") is deeplift
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
