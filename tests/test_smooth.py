"""Softplus surrogates (module and functional ReLU) and erf scales."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flipfrag.models import MLP, SmallCNN
from flipfrag.smooth import Erf, erf_layers, erf_sigmas, has_relu, set_erf_sigmas, softplus_surrogate


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
