"""Softplus surrogates (module and functional ReLU) and erf scales."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from flipfrag.models import MLP, SmallCNN
from flipfrag.smooth import Erf, erf_layers, erf_sigmas, has_relu, set_erf_sigmas, softplus, softplus_surrogate


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = torch.relu(self.b(h)).relu()
        return self.c(F.relu(h, inplace=True))


def test_surrogate_equals_hand_written_softplus_net():
    torch.manual_seed(0)
    net = FunctionalNet().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    sp = lambda u: F.softplus(u, beta=2.0)  # noqa: E731
    ref = net.c(sp(sp(sp(net.b(sp(net.a(x)))))))
    sur = softplus_surrogate(net, beta=2.0)
    assert torch.allclose(sur(x), ref)
    assert sur.replaced_calls == 4
    # the original model is untouched (weights shared, ReLU still ReLU)
    assert torch.allclose(net(x), net.c(F.relu(torch.relu(net.b(F.relu(net.a(x)))))))


def test_surrogate_gives_nonzero_second_derivatives_on_relu_nets():
    torch.manual_seed(0)
    for net in (nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)), SmallCNN(1, 3, width=2)):
        x = torch.rand(2, 4) if isinstance(net, nn.Sequential) else torch.rand(2, 1, 8, 8)
        for model, nonzero in ((net, False), (softplus_surrogate(net), True)):
            xx = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(model(xx)[:, 0].sum(), xx, create_graph=True)
            if not g.requires_grad:
                assert not nonzero
                continue
            (h,) = torch.autograd.grad(g.square().sum(), xx)
            assert (h.abs().sum() > 0) == nonzero


def test_large_beta_approaches_relu_and_errors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(10, 3)
    assert (softplus_surrogate(net, beta=1e4)(x) - net(x)).abs().max() < 1e-3
    assert has_relu(net, x) and not has_relu(MLP(3, [4], 2, activation="tanh"), x)
    with pytest.raises(ValueError, match="no ReLU"):
        softplus_surrogate(MLP(3, [4], 2, activation="tanh"))(x)
    with pytest.raises(ValueError, match="beta"):
        softplus_surrogate(net, beta=0)


def test_erf_sigmas_set_and_restored():
    m = MLP(3, [4, 4], 2, activation="erf", sigma=1.5)
    assert len(erf_layers(m)) == 2 and erf_sigmas(m).tolist() == [1.5, 1.5]
    x = torch.randn(5, 3)
    before = m(x)
    with set_erf_sigmas(m, [1e6, 1e6]):
        # huge sigma: erf(u/s) ~ 2u/(sqrt(pi) s) -> the net is nearly linear (and nearly constant)
        assert erf_sigmas(m).tolist() == [1e6, 1e6]
        flat = m(x)
        assert (flat - flat[0]).abs().max() < 1e-4
    assert torch.equal(m(x), before)
    with pytest.raises(ValueError, match="sigmas"):
        with set_erf_sigmas(m, [1.0]):
            pass
    with pytest.raises(ValueError, match="sigma"):
        Erf(0.0)


@pytest.mark.parametrize("beta", [1.0, 3.0, 0.25])
def test_softplus_values_and_derivatives_against_torch_and_closed_form(beta):
    # float64 oracle: F.softplus with an unreachable threshold is log1p(exp(beta u)) / beta
    u64 = torch.cat([torch.linspace(-120, 120, 2001, dtype=torch.float64), torch.tensor([0.0, 1e-9, -1e-9, 35.0])])
    ref = F.softplus(u64, beta=beta, threshold=1e9)
    ours = softplus(u64, beta)
    torch.testing.assert_close(ours, ref, rtol=1e-14, atol=1e-300)  # exact for tiny outputs too (u << 0)
    u32 = u64.float()  # float32: within a few ulp of torch's kernel (same rounding of beta * u)
    torch.testing.assert_close(softplus(u32, beta), F.softplus(u32, beta=beta), rtol=3e-7, atol=1e-38)
    # first and second derivatives: sigmoid(beta u) and beta sigmoid' (beta u), also through create_graph
    u = u64.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(softplus(u, beta).sum(), u, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), u)
    s = torch.sigmoid(beta * u64)
    torch.testing.assert_close(d1.detach(), s, rtol=1e-14, atol=1e-300)
    torch.testing.assert_close(d2, beta * s * (1 - s), rtol=1e-12, atol=1e-300)
    x = (torch.randn(7, dtype=torch.float64) * 3).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: softplus(t, beta), (x,))


def test_softplus_is_visible_to_function_modes():
    class Seen(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(func)
            return func(*args, **(kwargs or {}))

    u = torch.ones(3)
    with Seen() as mode:
        softplus(u, 2.0)
    assert mode.funcs[0] is softplus


def test_maxpool_as_logsumexp_limits_and_exact_cases():
    from flipfrag.smooth import maxpool_as_logsumexp

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    pool = nn.MaxPool2d(2)
    with maxpool_as_logsumexp(1e-6):  # beta -> 0: the window mean
        torch.testing.assert_close(pool(x), F.avg_pool2d(x, 2), rtol=1e-5, atol=1e-5)
    with maxpool_as_logsumexp(1e4):  # beta -> inf: the max, within log(4) / beta
        assert (pool(x) - F.max_pool2d(x, 2)).abs().max() < math.log(4) / 1e4 + 1e-12
    with maxpool_as_logsumexp(2.0):  # closed form for one window, and smooth (non-zero second derivative)
        w = x[0, 0, :2, :2]
        want = (torch.logsumexp(2 * w.flatten(), 0) - math.log(4)) / 2
        assert pool(x)[0, 0, 0, 0].item() == pytest.approx(want.item())
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(pool(xr).pow(2).sum(), xr, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), xr)
        assert h.abs().sum() > 0
        # pools with padding or returned indices stay exact
        padded = F.max_pool2d(x, 3, padding=1)
        with_indices, _ = F.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(padded, F.max_pool2d(x, 3, padding=1), rtol=0, atol=0)
    torch.testing.assert_close(with_indices, F.max_pool2d(x, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="beta"):
        with maxpool_as_logsumexp(0.0):
            pass


def test_surrogate_with_maxpool_equals_a_hand_written_softplus_logsumexp_cnn():
    """maxpool=True: ReLU -> softplus(beta) and 2x2 max-pooling -> (logsumexp(beta * window) - log 4) / beta, same
    weights; smooth (not piecewise linear: has_relu is False through the wrapper); the default leaves pooling exact."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    beta = 3.0

    def lse_pool(u):  # by hand: the four entries of every 2x2 window
        w = torch.stack([u[..., i::2, j::2] for i in (0, 1) for j in (0, 1)], 0)
        return (torch.logsumexp(beta * w, 0) - math.log(4)) / beta

    h = F.softplus(net[0](x), beta=beta)
    want = net[4](lse_pool(h).flatten(1))
    sur = softplus_surrogate(net, beta=beta, maxpool=True)
    torch.testing.assert_close(sur(x), want)
    torch.testing.assert_close(softplus_surrogate(net, beta=beta)(x), net[4](F.max_pool2d(h, 2).flatten(1)))
    assert not has_relu(sur, x[:1]) and has_relu(net, x[:1])
    with pytest.raises(TypeError, match="maxpool"):
        softplus_surrogate(net, maxpool="yes")
