"""Explanation defenses (flipfrag.defenses), deletion / insertion faithfulness (flipfrag.faithfulness), the attacks
differentiating through a defense, and agreement with Quantus where the definitions coincide.

Oracles: a Python loop over the same noise draws; a softplus network built by hand; central finite differences in
float64; the certificate against an enumeration of every corner of the per-feature ranges; a linear model's closed
form for the deletion curve; Quantus's own TopKIntersection and Spearman correlation."""

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from flipfrag import defenses
from flipfrag.attacks import TopKAttack
from flipfrag.faithfulness import auc, perturbation_curves
from flipfrag.metrics import spearman, topk_intersection
from flipfrag.saliency import deeplift, gradient, integrated_gradients, saliency_map


def _cnn(act=nn.ReLU, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), act(), nn.Conv2d(4, 4, 3, padding=1), act(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3))  # fmt: skip
    return net.to(dtype).eval()


def _images(n=2, seed=1, dtype=torch.float64):
    return torch.rand(n, 2, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------- SmoothGrad


@pytest.mark.parametrize("method", ["gradient", "deeplift"])
def test_smoothgrad_equals_a_loop_over_the_same_draws(method):
    net, x, y = _cnn(), _images(), torch.tensor([0, 2])
    sg = defenses.SmoothGrad(method, n=5, sigma=0.2, seed=3, batch_size=3)
    z = defenses.noise_draws(tuple(x.shape), 5, 0.2, 3, dtype=x.dtype)
    base = gradient if method == "gradient" else deeplift
    slow = sum(base(net, x + z[i], y) for i in range(5)) / 5
    torch.testing.assert_close(sg(net, x, y), slow)
    torch.testing.assert_close(defenses.smoothgrad(net, x, y, method=method, n=5, sigma=0.2, seed=3), slow)
    # each draw is sigma * N(0, 1), per image and feature: the empirical std of many draws is sigma
    many = defenses.noise_draws((4, 50), 200, 0.2, 0)
    assert abs(float(many.std()) - 0.2) < 0.005 and not torch.equal(many[0, 0], many[0, 1])


def test_smoothgrad_is_deterministic_in_its_seed_and_leaves_x_alone():
    net, x = _cnn(), _images()
    x0 = x.clone()
    a = defenses.smoothgrad(net, x, 1, n=3, seed=0)
    torch.testing.assert_close(a, defenses.smoothgrad(net, x, 1, n=3, seed=0), rtol=0, atol=0)
    assert not torch.allclose(a, defenses.smoothgrad(net, x, 1, n=3, seed=1))
    assert torch.equal(x, x0)


def test_smoothgrad_of_ig_repeats_a_per_image_baseline():
    net, x, y = _cnn(), _images(), torch.tensor([0, 1])
    b = _images(seed=5) * 0.5
    sg = defenses.SmoothGrad("ig", n=3, sigma=0.1, seed=0, baseline=b, steps=4)
    z = sg.draws(x)
    slow = sum(integrated_gradients(net, x + z[i], y, baseline=b, steps=4) for i in range(3)) / 3
    torch.testing.assert_close(sg(net, x, y), slow)


# ------------------------------------------------------------------------------------ sparsified SmoothGrad


def _sparsify_slow(row: np.ndarray, keep: float, clip: float) -> np.ndarray:
    d = row.size
    k_keep, k_clip = max(1, round(keep * d)), max(1, round(clip * d))
    order = np.argsort(-row, kind="stable")
    t = row[order[k_clip - 1]]
    out = np.zeros(d)
    for j in order[:k_keep]:
        out[j] = min(row[j] / t, 1.0)
    return out


def test_sparsified_smoothgrad_equals_a_loop_over_the_same_draws():
    net, x, y = _cnn(), _images(), torch.tensor([2, 0])
    ssg = defenses.SparsifiedSmoothGrad("gradient", n=4, sigma=0.1, seed=2, keep=0.25, clip=0.05)
    z = ssg.draws(x)
    slow = np.zeros((2, 36))
    for i in range(4):
        pix = gradient(net, x + z[i], y).abs().sum(1).flatten(1).numpy()
        slow += np.stack([_sparsify_slow(r, 0.25, 0.05) for r in pix]) / 4
    out = ssg(net, x, y)
    assert out.shape == (2, 1, 6, 6) and float(out.min()) >= 0 and float(out.max()) <= 1
    np.testing.assert_allclose(out.flatten(1).numpy(), slow, rtol=1e-12, atol=1e-12)
    # clip = keep is the binary map: top-K -> 1, the rest 0, per draw
    binary = defenses.sparsify(torch.rand(3, 40, dtype=torch.float64), 0.25, 0.25)
    assert set(binary.unique().tolist()) == {0.0, 1.0} and (binary.sum(1) == 10).all()


# ------------------------------------------------------------------------------------------- beta-smoothed


class _HandSoftplus(nn.Module):
    """The same weights as a ReLU CNN, written by hand with log(1 + exp(beta u)) / beta."""

    def __init__(self, relu_net: nn.Sequential, beta: float):
        super().__init__()
        self.layers, self.beta = relu_net, beta

    def forward(self, x):
        for layer in self.layers:
            x = torch.log1p(torch.exp(self.beta * x)) / self.beta if isinstance(layer, nn.ReLU) else layer(x)
        return x


@pytest.mark.parametrize("method", ["gradient", "integrated_gradients"])
def test_beta_smoothed_equals_a_softplus_network_built_by_hand(method):
    net, x, y = _cnn(), _images(), torch.tensor([1, 2])
    hand = _HandSoftplus(net, 2.5)
    ours = defenses.beta_smoothed(net, x, y, method=method, beta=2.5)
    if method == "gradient":
        ref = torch.autograd.functional.jacobian(lambda v: hand(v)[torch.arange(2), y].sum(), x)
    else:
        ref = integrated_gradients(hand, x, y, steps=8)
        ours = defenses.beta_smoothed(net, x, y, method=method, beta=2.5, steps=8)
    torch.testing.assert_close(ours, ref)
    assert not torch.allclose(ours, defenses.beta_smoothed(net, x, y, method=method, beta=50.0))


def test_beta_smoothed_deeplift_is_complete_on_the_smoothed_network():
    # DeepLIFT's attributions sum to S(x) - S(baseline) of the network they explain: here the softplus one
    net, x, y = _cnn(), _images(), torch.tensor([0, 1])
    attr = defenses.beta_smoothed(net, x, y, method="deeplift", beta=2.0)
    hand = _HandSoftplus(net, 2.0)
    with torch.no_grad():
        diff = hand(x)[torch.arange(2), y] - hand(torch.zeros_like(x))[torch.arange(2), y]
    torch.testing.assert_close(attr.flatten(1).sum(1), diff)


# --------------------------------------------------------------------------------- finite differences


def _fd_check(fn, x, seed=0):
    """Directional derivative of ``<w, saliency_map(fn(x))>`` by autograd vs central differences (float64)."""
    w = torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    xg = x.clone().requires_grad_(True)
    loss = (saliency_map(fn(xg, True)) * w).sum()
    (g,) = torch.autograd.grad(loss, xg)
    assert float(g.abs().max()) > 0, "zero gradient: nothing to check"
    h = 1e-6
    with torch.no_grad():
        up = (saliency_map(fn(x + h * v, False)) * w).sum()
        down = (saliency_map(fn(x - h * v, False)) * w).sum()
    fd = (up - down) / (2 * h)
    assert abs(float((g * v).sum()) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("kind", ["smoothgrad", "sparsified", "beta_gradient", "beta_deeplift", "smoothgrad_deeplift"])
def test_gradients_through_each_defense_match_finite_differences(kind):
    x, y = _images(), torch.tensor([0, 2])
    smooth_net = _cnn(act=nn.Softplus)  # SmoothGrad's draws do not smooth a ReLU net's gradient: use a smooth net
    relu_net = _cnn()
    fn = {
        "smoothgrad": (smooth_net, defenses.SmoothGrad("gradient", n=3, sigma=0.1, seed=0)),
        "sparsified": (smooth_net, defenses.SparsifiedSmoothGrad("gradient", n=3, sigma=0.1, keep=0.5, clip=0.1)),
        "beta_gradient": (relu_net, defenses.BetaSmoothed("gradient", beta=3.0)),
        "beta_deeplift": (relu_net, defenses.BetaSmoothed("deeplift", beta=3.0)),
        "smoothgrad_deeplift": (relu_net, defenses.SmoothGrad("deeplift", n=2, sigma=0.1, seed=0)),
    }[kind]
    net, defense = fn
    _fd_check(lambda v, cg: defense(net, v, y, create_graph=cg), x)


# --------------------------------------------------------------------------------------------- certificate


def test_smoothed_bounds_are_attained_by_a_half_space_indicator():
    # h(u) = 1[u_1 > 0] smoothed: H(x) = Phi(x_1 / sigma); moving x_1 by -r / +r attains the bounds exactly
    phi = torch.distributions.Normal(0.0, 1.0)
    sigma, r = 0.3, 0.2
    for x1 in (-0.4, 0.0, 0.25):
        v = phi.cdf(torch.tensor(x1 / sigma)).double()
        lo, hi = defenses.smoothed_bounds(v, r, sigma)
        assert math.isclose(float(lo), float(phi.cdf(torch.tensor((x1 - r) / sigma))), abs_tol=1e-6)
        assert math.isclose(float(hi), float(phi.cdf(torch.tensor((x1 + r) / sigma))), abs_tol=1e-6)


def _worst_overlap(v: np.ndarray, lo: np.ndarray, hi: np.ndarray, k: int) -> int:
    """Enumerate every corner of the box prod [lo_i, hi_i]; ties go against the original top-k (outsiders win)."""
    d = v.size
    inside = np.zeros(d, bool)
    inside[np.argsort(-v, kind="stable")[:k]] = True
    worst = k
    for corner in itertools.product((0, 1), repeat=d):
        vals = np.where(np.array(corner) == 1, hi, lo)
        order = sorted(range(d), key=lambda i: (-vals[i], inside[i]))  # among equal values, outsiders first
        worst = min(worst, int(inside[order[:k]].sum()))
    return worst


@pytest.mark.parametrize("seed", range(6))
def test_certificate_equals_the_enumerated_worst_case(seed):
    rng = np.random.default_rng(seed)
    d, k = 7, (2, 3)[seed % 2]
    v = np.sort(rng.uniform(0, 1, d))[::-1].copy()
    sigma = 0.5
    for r in (0.0, 0.02, 0.1, 0.3):
        lo, hi = (t.numpy() for t in defenses.smoothed_bounds(torch.tensor(v), r, sigma))
        cert = int(defenses.certified_topk_overlap(torch.tensor(v)[None], k, r, sigma)[0])
        assert cert == _worst_overlap(v, lo, hi, k), (r, cert)
    assert int(defenses.certified_topk_overlap(torch.tensor(v)[None], k, 0.0, sigma)[0]) == k


def test_certificate_shrinks_with_radius_and_sampling_error_and_gives_a_radius():
    v = torch.linspace(1, 0, 50, dtype=torch.float64)[None] ** 3
    certs = [int(defenses.certified_topk_overlap(v, 10, r, 0.25)[0]) for r in (0, 0.01, 0.05, 0.2, 1.0)]
    assert certs == sorted(certs, reverse=True) and certs[0] == 10 and certs[-1] < 10
    assert int(defenses.certified_topk_overlap(v, 10, 0.01, 0.25, n_samples=100)[0]) <= certs[1]
    r50 = float(defenses.certified_radius(v, 10, 0.25, 0.5)[0])
    assert int(defenses.certified_topk_overlap(v, 10, r50, 0.25)[0]) >= 5
    assert int(defenses.certified_topk_overlap(v, 10, r50 + 1e-3, 0.25)[0]) < 5


# --------------------------------------------------------------------------------------- adaptive attacks


def test_attacks_differentiate_through_a_defense_and_lower_their_objective():
    net, x = _cnn(dtype=torch.float32), _images(3, dtype=torch.float32)
    y = net(x).argmax(1)
    for defense in (defenses.SmoothGrad("gradient", n=3, sigma=0.1), defenses.BetaSmoothed("gradient", beta=2.0)):
        out = TopKAttack(net, defense, k=4, eps=16 / 255, step=4 / 255, iters=8, progress=False)(x, y)
        assert float((out.x_adv - x).abs().max()) <= 16 / 255 + 1e-6
        top0 = out.saliency.flatten(1).topk(4, dim=1).indices
        before = out.saliency.flatten(1).gather(1, top0).sum(1)
        after = out.saliency_adv.flatten(1).gather(1, top0).sum(1)
        # the objective (the original top-k's share of the defended map) went down on the images the attack moved
        assert out.success.sum() >= 2 and (after < before)[out.success].all(), defense
        torch.testing.assert_close(out.saliency, saliency_map(defense(net, x, y)))
    with pytest.raises(ValueError, match="method_kwargs"):
        TopKAttack(net, defenses.SmoothGrad(), method_kwargs={"steps": 3})
    with pytest.raises(TypeError, match="method"):
        TopKAttack(net, 3)


def test_defense_examples_attack_one_image_per_case_and_lower_its_overlap():
    """The example figure's cells (flipfrag.beyond.defenses.defense_examples): one image, each case's map before and
    after its own adaptive top-k attack, in the budget; the "before" map is the case's own map (SmoothGrad with the
    example's number of draws); the reported ∩ is the one between the returned maps; the attack moved the SG map."""
    from types import SimpleNamespace

    from flipfrag.beyond import defenses as study
    from flipfrag.profiles import get_profile

    net, x = _cnn(dtype=torch.float32), _images(3, dtype=torch.float32)
    setting = SimpleNamespace(model=net, x=x, y=net(x).argmax(1).detach(), k=4, baseline=x.mean(0))
    eps = 16 / 255
    prof = get_profile("smoke", defense_eps=eps, defense_example_iters=6, defense_example_step=4 / 255,
                       defense_example_sg_n=3)  # fmt: skip
    rows, extra = study.defense_examples(setting, prof, image=1, seed=2, cache=False, scheduler="serial")
    assert list(rows.case) == list(study.EXAMPLE_CASES) == list(extra["examples"])
    torch.testing.assert_close(extra["x"], x[1:2])
    y1 = setting.y[1:2]
    own = {"gradient": gradient(net, x[1:2], y1),
           "SmoothGrad (gradient)": defenses.SmoothGrad("gradient", n=3, sigma=0.15, seed=2)(net, x[1:2], y1),
           "β-smoothed gradient": defenses.BetaSmoothed("gradient", beta=3.0)(net, x[1:2], y1)}  # fmt: skip
    for label, (before, after) in extra["examples"].items():
        assert before.shape == after.shape == (1, 6, 6)
        torch.testing.assert_close(before, saliency_map(own[label]))
        x_adv = extra["x_adv"][label]
        assert x_adv.shape == (1, 2, 6, 6) and float((x_adv - x[1:2]).abs().max()) <= eps + 1e-6
        row = rows[rows.case == label].iloc[0]
        assert row.photo == 1 and row.image == 0
        assert row.topk_attack == pytest.approx(float(topk_intersection(before, after, 4)[0]))
    sg = rows[rows.case == "gradient"].iloc[0]
    assert sg.topk_attack < 1 and sg.topk_mass_after < sg.topk_mass_before
    with pytest.raises(ValueError, match="image"):
        study.defense_examples(setting, prof, image=3, cache=False)
    with pytest.raises(ValueError, match="labels"):
        study.defense_examples(setting, prof, labels=("no such case",), cache=False)
    with pytest.raises(ValueError, match="defense_example_iters"):
        study.defense_examples(setting, {k: v for k, v in prof.items() if k != "defense_example_iters"}, cache=False)


# ------------------------------------------------------------------------------------------ faithfulness


def test_deletion_curve_of_a_linear_model_has_its_closed_form():
    torch.manual_seed(0)
    w = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2, bias=False)).double().eval()
    with torch.no_grad():
        net[1].weight.copy_(w.flatten(1))
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    contrib = (w[0] * x[0]).flatten()
    maps = contrib.abs().view(1, 4, 4)
    res = perturbation_curves(net, x, 0, maps, steps=16, score="logit")
    order = contrib.abs().argsort(descending=True)
    expected = torch.cat([contrib.sum()[None], contrib.sum() - contrib[order].cumsum(0)])
    torch.testing.assert_close(res["deletion"][0], expected)
    torch.testing.assert_close(res["insertion"][0], torch.cat([torch.zeros(1, dtype=torch.float64),
                                                               contrib[order].cumsum(0)]))  # fmt: skip
    torch.testing.assert_close(res["deletion_auc"], auc(expected[None]))


def test_perturbation_curves_equal_a_loop_and_reject_bad_maps():
    net, x, y = _cnn(), _images(), torch.tensor([0, 1])
    maps = saliency_map(gradient(net, x, y))
    b = torch.full_like(x, 0.5)
    res = perturbation_curves(net, x, y, maps, steps=4, baseline=b, batch_size=5)
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)
    for i in range(2):
        for j, c in enumerate((0, 9, 18, 27, 36)):
            keep = torch.ones(36, dtype=torch.float64)
            keep[order[i, :c]] = 0
            xd = x[i] * keep.view(1, 6, 6) + b[i] * (1 - keep.view(1, 6, 6))
            with torch.no_grad():
                p = torch.softmax(net(xd[None]), 1)[0, y[i]]
            assert math.isclose(float(res["deletion"][i, j]), float(p), rel_tol=1e-10)
    with pytest.raises(ValueError, match="maps"):
        perturbation_curves(net, x, y, maps[:1])
    with pytest.raises(ValueError, match="steps"):
        perturbation_curves(net, x, y, maps, steps=0)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_arguments_are_named():
    net, x = _cnn(), _images()
    for kwargs, name in (({"n": 0}, "n"), ({"sigma": -1.0}, "sigma"), ({"seed": 1.5}, "seed")):
        with pytest.raises(ValueError, match=name):
            defenses.SmoothGrad(**kwargs)
    with pytest.raises(ValueError, match="clip"):
        defenses.SparsifiedSmoothGrad(keep=0.1, clip=0.2)
    with pytest.raises(ValueError, match="keep"):
        defenses.SparsifiedSmoothGrad(keep=1.5)
    with pytest.raises(ValueError, match="beta"):
        defenses.BetaSmoothed(beta=0)
    with pytest.raises(ValueError, match="create_graph"):
        defenses.SmoothGrad(create_graph=True)
    with pytest.raises(ValueError, match="method"):
        defenses.SmoothGrad("nonsense")
    with pytest.raises(ValueError, match="x contains NaN"):
        defenses.smoothgrad(net, x * float("nan"), 0)
    v = torch.rand(1, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match="radius"):
        defenses.certified_topk_overlap(v, 2, -0.1, 0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        defenses.certified_topk_overlap(v + 1, 2, 0.1, 0.1)
    with pytest.raises(ValueError, match="k must be"):
        defenses.certified_topk_overlap(v, 11, 0.1, 0.1)


# ------------------------------------------------------------------------------------------------ Quantus


def test_topk_intersection_and_spearman_agree_with_quantus():
    quantus = pytest.importorskip("quantus")
    net = _cnn(dtype=torch.float32)
    x = _images(3, dtype=torch.float32)
    y = net(x).argmax(1)
    a = saliency_map(gradient(net, x, y))
    b = saliency_map(gradient(net, x + 0.05 * torch.randn_like(x), y))
    k = 7
    # Quantus's TopKIntersection: the share of the explanation's k largest features inside a mask; with the mask =
    # the other map's top-k set it is our top-k intersection
    mask = torch.zeros(3, 36).scatter_(1, a.flatten(1).topk(k, dim=1).indices, 1.0).view(3, 1, 6, 6)
    q = quantus.TopKIntersection(k=k, disable_warnings=True)(
        model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=b.unsqueeze(1).numpy(), s_batch=mask.numpy(),
        channel_first=True, device="cpu")  # fmt: skip
    np.testing.assert_allclose(np.asarray(q), topk_intersection(a, b, k).numpy(), atol=1e-12)
    rho = quantus.similarity_func.correlation_spearman(a.flatten(1).numpy(), b.flatten(1).numpy(), batched=True)
    np.testing.assert_allclose(rho, spearman(a, b).numpy(), atol=1e-6)
