"""Tests for flipfrag.influence: oracles are re-training (leave-one-out and infinitesimal up-weighting), autograd,
finite differences, SciPy's Spearman, and an independent loop re-implementation of the authors' attack."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from flipfrag.influence import (
    LogisticInfluence,
    fit_logistic,
    influence_attack,
    influence_rank_correlation,
    influence_scores,
    logistic_loss,
    param_hessian,
    per_example_grads,
    random_sign_influence,
    top_influential,
    topk_overlap,
)
from flipfrag.models import MLP, train

DT = torch.float64
L2 = 0.1


@pytest.fixture(scope="module")
def toy():
    """2-class logistic data: 40 training points in 4 dims, 5 test points (float64)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 40, 4
    X = torch.randn(n, d, generator=gen, dtype=DT)
    w_true = torch.tensor([1.5, -1.0, 0.5, 0.0], dtype=DT)
    y = (torch.rand(n, generator=gen, dtype=DT) < torch.sigmoid(2 * X @ w_true + 0.3)).long()
    Xt = torch.randn(5, d, generator=gen, dtype=DT)
    return X, y, Xt


def _objective(theta, X, y, loss, l2, weights=None):
    z = X @ theta[:-1] + theta[-1]
    per = logistic_loss(z, y, loss)
    if weights is not None:
        per = per * weights
    return per.mean() + 0.5 * l2 * (theta[:-1] ** 2).sum()


# ------------------------------------------------------------------------------------------------ fitting


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_newton_reaches_a_stationary_point_that_lbfgs_agrees_with(toy, loss):
    X, y, _ = toy
    head = fit_logistic(X, y, loss=loss, l2=L2)
    assert head.fit_info["converged"]
    theta = head.theta.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_objective(theta, X, y, loss, L2), theta)  # independent of the closed form
    assert grad.abs().max() < 1e-9
    other = fit_logistic(X, y, loss=loss, l2=L2, method="lbfgs", max_iter=500, tol=1e-9)
    torch.testing.assert_close(other.theta, head.theta, atol=1e-6, rtol=0)


def test_adam_recipe_is_seeded_and_inputs_are_not_mutated(toy):
    X, y, _ = toy
    X0, y0 = X.clone(), y.clone()
    a = fit_logistic(X, y, loss="mse", method="adam", epochs=3, batch_size=10, seed=3)
    b = fit_logistic(X, y, loss="mse", method="adam", epochs=3, batch_size=10, seed=3)
    c = fit_logistic(X, y, loss="mse", method="adam", epochs=3, batch_size=10, seed=4)
    torch.testing.assert_close(a.theta, b.theta, rtol=0, atol=0)
    assert not torch.equal(a.theta, c.theta)
    assert a.fit_info["method"] == "adam" and not a.fit_info["converged"]
    assert torch.equal(X, X0) and torch.equal(y, y0)


# ------------------------------------------------------------------------------------------------ derivatives


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_per_example_grads_match_autograd(toy, loss):
    X, y, _ = toy
    head = fit_logistic(X, y, loss=loss, l2=L2)
    G = per_example_grads(head, X, y, loss=loss)
    for i in [0, 7, 39]:
        theta = head.theta.detach().clone().requires_grad_(True)
        z = X[i] @ theta[:-1] + theta[-1]
        (g,) = torch.autograd.grad(logistic_loss(z[None], y[i : i + 1], loss).sum(), theta)
        torch.testing.assert_close(G[i], g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_param_hessian_matches_autograd_and_finite_differences(toy, loss):
    X, y, _ = toy
    head = fit_logistic(X, y, loss=loss, l2=L2)
    H = param_hessian(head, X, y, loss=loss, l2=L2, damping=0.25)
    th = head.theta.detach()
    H_auto = torch.autograd.functional.hessian(lambda t: _objective(t, X, y, loss, L2), th)
    torch.testing.assert_close(H, H_auto + 0.25 * torch.eye(5, dtype=DT), rtol=1e-10, atol=1e-12)

    def grad_at(t):
        t = t.clone().requires_grad_(True)
        return torch.autograd.grad(_objective(t, X, y, loss, L2), t)[0]

    h = 1e-5
    fd = torch.stack([(grad_at(th + h * e) - grad_at(th - h * e)) / (2 * h) for e in torch.eye(5, dtype=DT)], 1)
    torch.testing.assert_close(H - 0.25 * torch.eye(5, dtype=DT), fd, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------ re-training oracles


def _refit(X, y, loss, weights, init):
    return fit_logistic(X, y, loss=loss, l2=L2, sample_weight=weights, init=init, tol=1e-12)


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_influence_is_the_derivative_of_the_test_loss_under_upweighting(toy, loss):
    """Koh & Liang: I_up,loss(z_i, z_t) = d/d eps L(z_t, theta_eps) with eps extra weight on z_i (exact, not LOO)."""
    X, y, Xt = toy
    n = X.shape[0]
    head = fit_logistic(X, y, loss=loss, l2=L2, tol=1e-12)
    infl = LogisticInfluence(head, X, y)
    yt = head.predict(Xt)
    kl = infl.scores(Xt, yt, normalize=False, sign="koh_liang")
    eps = 1e-5
    deriv = torch.zeros_like(kl)
    for i in range(n):
        w = torch.ones(n, dtype=DT)
        w[i] = 1 + n * eps  # objective (1/n) sum s_j L_j: weight 1 + n eps is an extra eps * L_i
        up = _refit(X, y, loss, w, head)
        w[i] = 1 - n * eps
        down = _refit(X, y, loss, w, head)
        deriv[:, i] = (logistic_loss(up(Xt).detach(), yt, loss) - logistic_loss(down(Xt).detach(), yt, loss)) / (
            2 * eps
        )
    torch.testing.assert_close(kl, deriv, rtol=1e-4, atol=1e-6 * float(kl.abs().max()))


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_influence_predicts_leave_one_out_retraining(toy, loss):
    """Removing z_i changes the test loss by about -(1/n) I_up,loss = +(1/n) * (paper-convention score)."""
    X, y, Xt = toy
    n = X.shape[0]
    head = fit_logistic(X, y, loss=loss, l2=L2, tol=1e-12)
    yt = head.predict(Xt)
    paper = influence_scores(head, X, y, Xt, normalize=False)
    base = logistic_loss(head(Xt).detach(), yt, loss)
    loo = torch.zeros_like(paper)
    for i in range(n):
        w = torch.ones(n, dtype=DT)
        w[i] = 0
        loo[:, i] = logistic_loss(_refit(X, y, loss, w, head)(Xt).detach(), yt, loss) - base
    predicted = paper / n
    for r in range(Xt.shape[0]):
        corr = np.corrcoef(predicted[r].numpy(), loo[r].numpy())[0, 1]
        assert corr > 0.99, (r, corr)
        rel = float((predicted[r] - loo[r]).norm() / loo[r].norm())
        assert rel < 0.2, (r, rel)  # the first-order approximation of a 1/40 perturbation


# ------------------------------------------------------------------------------------------------ conventions


def test_sign_normalization_and_solve_conventions(toy):
    X, y, Xt = toy
    head = fit_logistic(X, y, loss="bce", l2=L2)
    infl = LogisticInfluence(head, X, y, damping=0.3)
    assert infl.l2 == L2 and infl.loss == "bce"  # taken from the head
    yt = head.predict(Xt)
    raw = infl.scores(Xt, yt, normalize=False)
    # explicit inverse oracle, written from the formula: g_t^T (H + damping I)^-1 g_i
    H = param_hessian(head, X, y, loss="bce", l2=L2) + 0.3 * torch.eye(5, dtype=DT)
    fa = torch.cat([X, torch.ones(40, 1, dtype=DT)], 1)
    fta = torch.cat([Xt, torch.ones(5, 1, dtype=DT)], 1)
    p, pt = torch.sigmoid(fa @ head.theta.detach()), torch.sigmoid(fta @ head.theta.detach())
    g_train = (p - y)[:, None] * fa
    g_test = (pt - yt)[:, None] * fta
    torch.testing.assert_close(raw, g_test @ torch.linalg.inv(H) @ g_train.T, rtol=1e-10, atol=1e-14)

    torch.testing.assert_close(infl.scores(Xt, yt, normalize=False, sign="koh_liang"), -raw)
    norm = infl.scores(Xt, yt)  # default: normalised, paper sign
    torch.testing.assert_close(norm.norm(dim=1), torch.ones(5, dtype=DT))
    torch.testing.assert_close(norm, raw / raw.norm(dim=1, keepdim=True))
    # default label = prediction; the other label gives a different vector
    torch.testing.assert_close(infl.scores(Xt), norm)
    assert not torch.allclose(infl.scores(Xt, 1 - yt), norm)
    # the functional form, one test vector
    one = influence_scores(head, X, y, Xt[2], damping=0.3)
    assert one.shape == (1, 40)
    torch.testing.assert_close(one[0], norm[2])
    # damping is really used: without it the result differs
    assert not torch.allclose(LogisticInfluence(head, X, y).scores(Xt, yt), norm)


def test_most_influential_under_paper_sign_are_helpful(toy):
    """Positive paper-convention score = removing the point raises the test loss (it supported the prediction)."""
    X, y, Xt = toy
    head = fit_logistic(X, y, l2=L2, tol=1e-12)
    scores = influence_scores(head, X, y, Xt[:1], normalize=False)[0]
    yt = head.predict(Xt[:1])
    best, worst = int(top_influential(scores, 1)[0]), int(top_influential(scores, 1, largest=False)[0])
    base = float(logistic_loss(head(Xt[:1]).detach(), yt))
    for idx, direction in ((best, 1), (worst, -1)):
        w = torch.ones(40, dtype=DT)
        w[idx] = 0
        change = float(logistic_loss(_refit(X, y, "bce", w, head)(Xt[:1]).detach(), yt)) - base
        assert direction * change > 0


@pytest.mark.parametrize("loss", ["bce", "mse"])
def test_influence_feature_gradient_matches_finite_differences_and_closed_form(toy, loss):
    X, y, Xt = toy
    head = fit_logistic(X, y, loss=loss, l2=L2)
    infl = LogisticInfluence(head, X, y)
    yt = head.predict(Xt)
    idx = torch.tensor([3, 10, 0, 25, 39])
    grad = infl.influence_feature_grad(idx, Xt, yt)
    h = 1e-6
    fd = torch.zeros_like(Xt)
    for j in range(Xt.shape[1]):
        e = torch.zeros_like(Xt)
        e[:, j] = h
        fd[:, j] = (infl.influence_of(idx, Xt + e, yt) - infl.influence_of(idx, Xt - e, yt)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)
    # the value of influence_of equals the (unnormalised, paper-sign) score matrix entries
    torch.testing.assert_close(infl.influence_of(idx, Xt, yt), infl.scores(Xt, yt, normalize=False)[range(5), idx])
    if loss == "bce":  # closed form: I = (p - y)(v_w . f + v_b), dI/df = p(1-p)(v_w . f + v_b) w + (p - y) v_w
        v = infl.train_ihvp[idx]
        th = head.theta.detach()
        p = torch.sigmoid(Xt @ th[:-1] + th[-1])
        u = (Xt * v[:, :-1]).sum(1) + v[:, -1]
        closed = (p * (1 - p) * u)[:, None] * th[:-1] + (p - yt)[:, None] * v[:, :-1]
        torch.testing.assert_close(grad, closed, rtol=1e-10, atol=1e-14)


def test_singular_hessian_needs_damping():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(20, 3, generator=gen, dtype=DT)
    X[:, 1] = 0  # a dead feature: its row/column of the unpenalised Hessian is exactly 0
    y = (X[:, 0] > 0).long()
    head = fit_logistic(X, y, loss="bce", l2=0.0, method="adam", epochs=5)
    with pytest.raises(ValueError, match="damping: the influence Hessian is singular"):
        LogisticInfluence(head, X, y, l2=0.0)
    infl = LogisticInfluence(head, X, y, l2=0.0, damping=1e-3)
    assert infl.hessian_info["positive_definite"] and torch.isfinite(infl.scores(X[:2])).all()
    # more parameters than training points (the authors' 2049 vs 1000 without damping): rank-deficient as well
    Xw = torch.randn(6, 10, generator=gen, dtype=DT)
    yw = torch.tensor([0, 1, 0, 1, 1, 0])
    wide = fit_logistic(Xw, yw, l2=1e-2)
    with pytest.raises(ValueError, match="damping"):
        LogisticInfluence(wide, Xw, yw, l2=0.0)


def test_indefinite_hessian_warns_and_still_solves_exactly(toy):
    """An MSE head far from a minimum (here: the fitted weights negated, so most points are misclassified and
    saturated) has negative curvature; the influence is still g_t^T H^-1 g_i, with a warning."""
    X, y, Xt = toy
    fitted = fit_logistic(X, y, loss="mse", l2=L2)
    theta = -3 * fitted.theta.detach()
    H = param_hessian(theta, X, y, loss="mse", l2=L2)
    n_neg = int((torch.linalg.eigvalsh(H) < 0).sum())
    assert n_neg > 0
    with pytest.warns(UserWarning, match="not positive definite"):
        infl = LogisticInfluence(theta, X, y, loss="mse", l2=L2)
    assert infl.hessian_info["n_negative"] == n_neg and not infl.hessian_info["positive_definite"]
    yt = infl.predict(Xt)
    G, Gt = per_example_grads(theta, X, y, loss="mse"), per_example_grads(theta, Xt, yt, loss="mse")
    torch.testing.assert_close(infl.scores(Xt, normalize=False), Gt @ torch.linalg.inv(H) @ G.T)


# ------------------------------------------------------------------------------------------------ metrics


def test_rank_correlation_matches_scipy_with_ties():
    gen = torch.Generator().manual_seed(2)
    a = torch.round(torch.randn(6, 50, generator=gen, dtype=DT) * 2) / 2  # many ties
    b = a + torch.round(torch.randn(6, 50, generator=gen, dtype=DT)) / 2
    ours = influence_rank_correlation(a, b)
    ref = [stats.spearmanr(a[i].numpy(), b[i].numpy())[0] for i in range(6)]
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-12)
    assert float(influence_rank_correlation(a[0], a[0])) == pytest.approx(1.0)
    assert float(influence_rank_correlation(a[0], -a[0])) == pytest.approx(-1.0)
    assert torch.isnan(influence_rank_correlation(torch.ones(5), torch.arange(5.0)))
    np.testing.assert_allclose(float(influence_rank_correlation(a[1].numpy(), b[1].numpy())), ref[1])


def test_topk_overlap_and_top_influential_against_sets():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(8, 30, generator=gen)
    b = a + 0.7 * torch.randn(8, 30, generator=gen)
    ov = topk_overlap(a, b, k=5)
    for i in range(8):
        sa = set(np.argsort(a[i].numpy())[-5:])
        sb = set(np.argsort(b[i].numpy())[-5:])
        assert int(ov[i]) == len(sa & sb)
    top = top_influential(a, 4)
    np.testing.assert_array_equal(top.numpy(), np.argsort(-a.numpy(), axis=1)[:, :4])
    assert int(topk_overlap(a[0], a[0], k=5)) == 5
    assert int(topk_overlap(a[0], -a[0], k=5)) == 0


# ------------------------------------------------------------------------------------------------ the attack


def _blob_images(n, gen):
    """8x8 one-channel images in [0, 1]: a Gaussian blob top-left (class 0) or bottom-right (class 1) on noise."""
    y = torch.randint(0, 2, (n,), generator=gen)
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")).to(DT)
    centres = torch.randint(1, 4, (n, 2), generator=gen).to(DT) + 3 * y[:, None].to(DT)
    blob = torch.exp(-((grid[None] - centres[:, :, None, None]) ** 2).sum(1) / 3)
    x = 0.3 * torch.rand(n, 8, 8, generator=gen, dtype=DT) + 0.7 * blob
    return x.clamp(0, 1)[:, None], y


@pytest.fixture(scope="module")
def trained_features():
    """A trained tanh MLP's hidden layer as the frozen feature extractor, and a BCE head on its features."""
    gen = torch.Generator().manual_seed(0)
    Xtr, ytr = _blob_images(80, gen)
    Xte, _ = _blob_images(10, gen)
    torch.manual_seed(0)
    net = MLP(64, [16], 2, activation="tanh").to(DT)
    train(net, Xtr, ytr, epochs=30, lr=1e-2, batch_size=16, seed=0, progress=False)
    phi = nn.Sequential(nn.Flatten(), *net.net[:-1]).eval()
    with torch.no_grad():
        Ftr = phi(Xtr)
    head = fit_logistic(Ftr, ytr, loss="bce", l2=1e-2)
    return phi, LogisticInfluence(head, Ftr, ytr), Xte


def test_attack_lowers_top_influences_more_than_random_noise(trained_features):
    phi, infl, x = trained_features
    x0 = x.clone()
    eps = 8 / 255
    att = influence_attack(phi, infl, x, eps=eps, normalize=False)
    rnd = random_sign_influence(phi, infl, x, eps=eps, seed=1, normalize=False)
    assert torch.equal(x, x0)  # not mutated
    for res in (att, rnd):
        assert (res.x_adv - x).abs().max() <= eps + 1e-12
        assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
        assert res.spearman.shape == (10,) and res.topk_overlap.shape == (10,) and res.label_kept.dtype == torch.bool
    # targets are the top-3 training points by influence at x
    torch.testing.assert_close(att.targets, top_influential(att.scores, 3))
    before = att.scores.gather(1, att.targets)
    drop_attack = (before - att.scores_adv.gather(1, att.targets)) / before
    drop_random = (before - rnd.scores_adv.gather(1, att.targets)) / before
    assert drop_attack.mean() > 0.2  # the targets lose a good part of their influence
    assert drop_attack.mean() > 5 * drop_random.abs().mean()
    assert att.spearman.mean() < rnd.spearman.mean()
    assert bool(att.label_kept.all())  # a small step on a confidently classified toy keeps the labels


def test_attack_batched_equals_per_image_loop(trained_features):
    phi, infl, x = trained_features
    full = influence_attack(phi, infl, x, eps=4 / 255)
    chunked = influence_attack(phi, infl, x, eps=4 / 255, batch_size=3)
    torch.testing.assert_close(chunked.x_adv, full.x_adv)
    for i in [0, 5, 9]:
        one = influence_attack(phi, infl, x[i : i + 1], eps=4 / 255)
        torch.testing.assert_close(one.x_adv[0], full.x_adv[i])
        torch.testing.assert_close(one.spearman[0], full.spearman[i])
        assert int(one.topk_overlap[0]) == int(full.topk_overlap[i])


def test_attack_matches_a_loop_reimplementation_on_a_linear_extractor():
    """With phi(x) = A x the input gradient of <delta_f, phi(x)> is A^T delta_f; replay the authors' loop in numpy."""
    gen = torch.Generator().manual_seed(5)
    d, pixels, n = 5, 12, 30
    A = torch.randn(d, pixels, generator=gen, dtype=DT) / 3
    phi = nn.Linear(pixels, d, bias=False).to(DT)
    with torch.no_grad():
        phi.weight.copy_(A)
    Xtr = torch.rand(n, pixels, generator=gen, dtype=DT)
    Ftr = Xtr @ A.T
    ytr = (Ftr[:, 0] > Ftr[:, 0].median()).long()
    head = fit_logistic(Ftr, ytr, l2=0.05)
    infl = LogisticInfluence(head, Ftr, ytr)
    x = torch.rand(3, pixels, generator=gen, dtype=DT)
    step = 0.5  # large, so that the order of the sequential feature updates matters
    res = influence_attack(phi, infl, x, eps=0.05, feature_step=step)

    th = head.theta.detach().numpy()
    w, b = th[:-1], th[-1]
    Hinv = np.linalg.inv(infl.hessian.numpy())
    Fa = np.hstack([Ftr.numpy(), np.ones((n, 1))])
    p_tr = 1 / (1 + np.exp(-(Fa @ th)))
    G = (p_tr - ytr.numpy())[:, None] * Fa
    for r in range(3):
        f0 = (A @ x[r]).numpy()
        yt = float(f0 @ w + b >= 0)
        pt = 1 / (1 + np.exp(-(f0 @ w + b)))
        gt = (pt - yt) * np.append(f0, 1.0)
        infl0 = np.array([gt @ Hinv @ G[j] for j in range(n)])
        top3 = np.argsort(infl0)[-3:]
        f = f0.copy()
        for j in top3:  # the authors' order: third-largest first
            v = Hinv @ G[j]
            z = f @ w + b
            p = 1 / (1 + np.exp(-z))
            grad = p * (1 - p) * (v[:-1] @ f + v[-1]) * w + (p - yt) * v[:-1]
            f = f - step * np.sign(grad)
        g = A.numpy().T @ (f - f0)
        expected = np.clip(x[r].numpy() + 0.05 * np.sign(g), 0, 1)
        np.testing.assert_allclose(res.x_adv[r].numpy(), expected, rtol=0, atol=1e-15)
        assert set(res.targets[r].tolist()) == set(top3.tolist())


def test_random_sign_baseline_is_seeded_and_full_size():
    gen = torch.Generator().manual_seed(6)
    phi = nn.Linear(12, 3).to(DT).eval()
    F = torch.randn(20, 3, generator=gen, dtype=DT)
    y = (F[:, 0] > 0).long()
    infl = LogisticInfluence(fit_logistic(F, y, l2=0.1), F, y)
    x = 0.2 + 0.6 * torch.rand(4, 12, generator=gen, dtype=DT)  # away from the bounds: no clipping
    a = random_sign_influence(phi, infl, x, eps=0.1, seed=7)
    b = random_sign_influence(phi, infl, x, eps=0.1, seed=7)
    c = random_sign_influence(phi, infl, x, eps=0.1, seed=8)
    torch.testing.assert_close(a.x_adv, b.x_adv, rtol=0, atol=0)
    assert not torch.equal(a.x_adv, c.x_adv)
    torch.testing.assert_close((a.x_adv - x).abs(), torch.full_like(x, 0.1))
    assert a.targets.shape == (4, 0)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_naming_the_argument(toy, trained_features):
    X, y, Xt = toy
    head = fit_logistic(X, y, l2=L2)
    with pytest.raises(ValueError, match="damping"):
        influence_scores(head, X, y, Xt, damping=-1.0)
    with pytest.raises(ValueError, match="train_feats"):
        influence_scores(head, X[:, :3], y, Xt)
    with pytest.raises(ValueError, match="train_y"):
        influence_scores(head, X, y[:-1], Xt)
    with pytest.raises(ValueError, match="train_y"):
        influence_scores(head, X, y + 1, Xt)
    with pytest.raises(ValueError, match="test_feats"):
        influence_scores(head, X, y, Xt[:, :2])
    with pytest.raises(ValueError, match="sign"):
        influence_scores(head, X, y, Xt, sign="minus")
    with pytest.raises(ValueError, match="loss"):
        fit_logistic(X, y, loss="hinge")
    with pytest.raises(ValueError, match="l2"):
        fit_logistic(X, y, l2=-0.1)
    with pytest.raises(ValueError, match="features"):
        fit_logistic(X.clone().fill_(float("nan")), y)
    with pytest.raises(ValueError, match="k must be"):
        top_influential(torch.randn(10), 11)
    with pytest.raises(ValueError, match="k must be"):
        topk_overlap(torch.randn(10), torch.randn(10), k=0)
    with pytest.raises(ValueError, match="scores_a and scores_b"):
        influence_rank_correlation(torch.randn(10), torch.randn(9))

    phi, infl, x = trained_features
    with pytest.raises(ValueError, match="eps"):
        influence_attack(phi, infl, x, eps=-0.1)
    with pytest.raises(ValueError, match="k must be"):
        influence_attack(phi, infl, x, k=1000)
    with pytest.raises(ValueError, match="n_targets"):
        influence_attack(phi, infl, x, n_targets=0)
    with pytest.raises(ValueError, match="feature_extractor"):
        influence_attack(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).to(DT), infl, x)
    dropout_phi = nn.Sequential(nn.Dropout(0.5), phi)  # a fresh module: train mode
    with pytest.raises(ValueError, match="feature_extractor is in train mode"):
        influence_attack(dropout_phi, infl, x)
    with pytest.raises(ValueError, match="x contains NaN"):
        influence_attack(phi, infl, torch.full_like(x, float("nan")))
