"""Tests for flipfrag.hessian: oracles are closed-form Hessians (quadratics, the two-layer softplus net),
``torch.autograd.functional.hessian`` + ``torch.linalg.eigh``, finite differences, and per-sample loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from flipfrag.fragility.geometry import (
    TwoLayerSoftplus,
    decision_grid,
    dimension_sweep,
    fit_toy_models,
    toy_geometry_data,
)
from flipfrag.hessian import (
    gradient_rotation,
    hessian_operator,
    hvp,
    input_hessian,
    perturbation_geometry,
    random_sign_like,
    score_fn,
    top_eigenpairs,
)
from flipfrag.models import MLP, SmallCNN, train
from flipfrag.smooth import softplus_surrogate

DT = torch.float64


def _autograd_hessians(model_or_fn, x, target=None):
    """Per-sample oracle: torch.autograd.functional.hessian of the single-sample score, flattened (N, D, D)."""
    out = []
    for i in range(x.shape[0]):
        if target is None:
            f = lambda z: model_or_fn(z[None])[0]  # noqa: E731
        else:
            f = lambda z, t=int(target[i]): model_or_fn(z[None])[0, t]  # noqa: E731
        h = torch.autograd.functional.hessian(f, x[i])
        out.append(h.reshape(x[0].numel(), x[0].numel()))
    return torch.stack(out)


def _by_magnitude(H, k):
    vals, vecs = torch.linalg.eigh(H)
    order = vals.abs().argsort(dim=1, descending=True)[:, :k]
    return vals.gather(1, order), vecs.gather(2, order[:, None, :].expand(-1, H.shape[1], -1)).transpose(1, 2)


def _assert_pairs_match(res, H, k, atol):
    vals, vecs = _by_magnitude(H, k)
    torch.testing.assert_close(res.eigenvalues, vals, rtol=0, atol=atol)
    n = H.shape[0]
    got = res.eigenvectors.reshape(n, k, -1)
    overlap = (got * vecs).sum(-1).abs()  # eigenvectors up to sign
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-6)
    assert res.residuals.max() < 1e-6 * max(1.0, float(vals.abs().max()))


# ------------------------------------------------------------------------------------------------ quadratics


def test_quadratic_hvp_and_hessian_are_A_plus_A_transpose():
    gen = torch.Generator().manual_seed(0)
    N, D = 3, 7
    A = torch.randn(N, D, D, generator=gen, dtype=DT)  # a different (non-symmetric) A per sample
    fn = lambda x: torch.einsum("ni,nij,nj->n", x, A, x)  # noqa: E731
    x = torch.randn(N, D, generator=gen, dtype=DT)
    v = torch.randn(N, D, generator=gen, dtype=DT)
    x0, v0 = x.clone(), v.clone()
    H = A + A.transpose(1, 2)
    torch.testing.assert_close(hvp(fn, x, v), torch.einsum("nij,nj->ni", H, v))
    torch.testing.assert_close(input_hessian(fn, x), H)
    assert torch.equal(x, x0) and torch.equal(v, v0)
    op = hessian_operator(fn, x)
    torch.testing.assert_close(op.grad, torch.einsum("nij,nj->ni", H, x))
    torch.testing.assert_close(op.score, fn(x))


@pytest.fixture(scope="module")
def quadratic_with_known_spectrum():
    """fn(x) = 1/2 x^T H_n x with H_n = Q diag(lam) Q^T, indefinite, distinct magnitudes; D = 12, N = 2."""
    gen = torch.Generator().manual_seed(1)
    D = 12
    lam = torch.tensor([9.0, -7.0, 5.0, -3.0, 2.0, 1.0, -0.8, 0.5, 0.4, -0.3, 0.2, 0.1], dtype=DT)
    Hs = []
    for _ in range(2):
        Q = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=DT)).Q
        Hs.append(Q @ torch.diag(lam) @ Q.T)
    H = torch.stack(Hs)
    fn = lambda x: 0.5 * torch.einsum("ni,nij,nj->n", x, H, x)  # noqa: E731
    x = torch.randn(2, D, generator=gen, dtype=DT)
    return fn, x, H


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenpairs_of_a_known_spectrum(quadratic_with_known_spectrum, method):
    fn, x, H = quadratic_with_known_spectrum
    res = top_eigenpairs(fn, x, 3, method=method, tol=1e-12, iters=None if method == "lanczos" else 500)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([[9.0, -7.0, 5.0]] * 2, dtype=DT), rtol=0, atol=1e-8)
    _assert_pairs_match(res, H, 3, atol=1e-8)
    assert res.eigenvectors.shape == (2, 3, 12)


def test_lanczos_with_few_steps_finds_dominant_pairs():
    """D = 200, a few dominant eigenvalues on a bulk of small ones: 40 Lanczos steps suffice for the top 3."""
    gen = torch.Generator().manual_seed(2)
    D = 200
    bulk = 0.1 * torch.rand(D - 3, generator=gen, dtype=DT) - 0.05
    lam = torch.cat([torch.tensor([10.0, -8.0, 6.0], dtype=DT), bulk])
    Q = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=DT)).Q
    H = (Q @ torch.diag(lam) @ Q.T)[None]
    fn = lambda x: 0.5 * torch.einsum("ni,nij,nj->n", x, H, x)  # noqa: E731
    res = top_eigenpairs(fn, torch.zeros(1, D, dtype=DT), 3, iters=40)
    assert res.hvp_calls == 40 + 3  # 40 steps + 3 residual checks
    _assert_pairs_match(res, H, 3, atol=1e-8)


# ------------------------------------------------------------------------------------------------ networks


def test_two_layer_softplus_closed_form():
    net = TwoLayerSoftplus.random(d=6, width=5, seed=3)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=gen, dtype=DT)
    W, w = net.W.detach(), net.w.detach()
    u = x @ W.T
    sig = torch.sigmoid(u)
    H_closed = torch.einsum("hi,nh,hj->nij", W, w * sig * (1 - sig), W)  # W^T diag(w * softplus''(Wx)) W
    torch.testing.assert_close(input_hessian(net, x), H_closed, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_autograd_hessians(net, x), H_closed, rtol=1e-12, atol=1e-14)
    op = hessian_operator(net, x)
    torch.testing.assert_close(op.grad, (w * sig) @ W)  # W^T (w * sigmoid(Wx))
    v = torch.randn(4, 6, generator=gen, dtype=DT)
    torch.testing.assert_close(op(v), torch.einsum("nij,nj->ni", H_closed, v))
    # rank <= width: the 6th eigenvalue is 0
    res = top_eigenpairs(net, x, 6)
    assert res.eigenvalues[:, 5].abs().max() < 1e-12


def test_cnn_surrogate_hessian_matches_autograd_and_eigh():
    torch.manual_seed(4)
    cnn = SmallCNN(1, 3, width=4).to(DT).eval()
    sur = softplus_surrogate(cnn, beta=1.0)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 1, 6, 6, generator=gen, dtype=DT)
    target = torch.tensor([0, 2])
    fn = score_fn(sur, target)
    H = input_hessian(fn, x)
    H_ref = _autograd_hessians(sur, x, target)
    scale = float(H_ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(H, H_ref, rtol=0, atol=1e-9 * scale)
    res = top_eigenpairs(fn, x, 4, iters=36)
    assert res.eigenvectors.shape == (2, 4, 1, 6, 6)
    _assert_pairs_match(res, H_ref, 4, atol=1e-9 * scale)


@pytest.fixture(scope="module")
def trained_softplus_mlp():
    """A softplus MLP trained (seconds) on 8-d data with a curved class boundary."""
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(300, 8, generator=gen, dtype=DT)
    y = ((X[:, :4] ** 2).sum(1) > 3.4).long()
    torch.manual_seed(5)
    model = MLP(8, [24], 2, activation="softplus").to(DT)
    hist = train(model, X, y, epochs=40, lr=1e-2, batch_size=32, seed=5, progress=False)
    assert hist["train_acc"][-1] > 0.85
    return model.eval(), X


def test_trained_mlp_eigenpairs_match_eigh(trained_softplus_mlp):
    model, X = trained_softplus_mlp
    x = X[:3]
    target = model(x).argmax(1)
    H_ref = _autograd_hessians(model, x, target)
    fn = score_fn(model, target)
    scale = float(H_ref.abs().max())
    torch.testing.assert_close(input_hessian(fn, x), H_ref, rtol=0, atol=1e-10 * scale)
    for method in ("lanczos", "power"):
        res = top_eigenpairs(fn, x, 2, method=method, tol=1e-13, iters=None if method == "lanczos" else 2000)
        _assert_pairs_match(res, H_ref, 2, atol=1e-7 * scale)


def test_batch_equals_per_sample_loop(trained_softplus_mlp):
    model, X = trained_softplus_mlp
    x = X[:4]
    target = torch.tensor([0, 1, 1, 0])
    gen = torch.Generator().manual_seed(6)
    v = torch.randn(4, 8, generator=gen, dtype=DT)
    batch = hvp(score_fn(model, target), x, v)
    loop = torch.cat([hvp(score_fn(model, target[i : i + 1]), x[i : i + 1], v[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, loop, rtol=1e-12, atol=1e-15)
    eb = top_eigenpairs(score_fn(model, target), x, 3, iters=8)
    el = [top_eigenpairs(score_fn(model, target[i : i + 1]), x[i : i + 1], 3, iters=8) for i in range(4)]
    torch.testing.assert_close(eb.eigenvalues, torch.cat([e.eigenvalues for e in el]), rtol=1e-9, atol=1e-12)


def test_linear_model_has_zero_hessian_and_no_gradient_rotation():
    torch.manual_seed(7)
    linear = MLP(5, [], 3).to(DT).eval()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 5, generator=gen, dtype=DT)
    fn = score_fn(linear, 1)
    assert torch.equal(hvp(fn, x, torch.ones_like(x)), torch.zeros_like(x))
    assert torch.equal(top_eigenpairs(fn, x, 2).eigenvalues, torch.zeros(4, 2, dtype=DT))
    delta = random_sign_like(x, 0.5, seed=1)
    assert torch.equal(gradient_rotation(linear, x, delta), torch.zeros(4, dtype=DT))
    geo = perturbation_geometry(linear, x, 1, delta)
    assert torch.equal(geo.hess_gain, torch.zeros(4, dtype=DT))
    assert geo.saliency_change.max() < 1e-14
    torch.testing.assert_close(geo.score_change, geo.first_order)  # exact for a linear score


# ------------------------------------------------------------------------------------------------ score_fn


def test_score_fn_refuses_relu_and_train_mode():
    torch.manual_seed(8)
    cnn = SmallCNN(1, 3, width=4).to(DT).eval()
    x = torch.rand(2, 1, 6, 6, dtype=DT)
    with pytest.raises(ValueError, match="model: has ReLU.*softplus_surrogate"):
        hvp(score_fn(cnn, 0), x, torch.ones_like(x))
    # first-order use of a ReLU net is fine
    assert score_fn(cnn, 0, require_smooth=False)(x).shape == (2,)
    with pytest.raises(ValueError, match="train mode"):
        score_fn(nn.Sequential(nn.Flatten(), nn.Linear(36, 3), nn.Dropout(0.5)).to(DT), 0)
    with pytest.raises(ValueError, match="target must be in"):
        score_fn(softplus_surrogate(cnn), 5)(x)
    with pytest.raises(ValueError, match="target has"):
        score_fn(softplus_surrogate(cnn), torch.tensor([0, 1, 2]))(x)
    with pytest.raises(TypeError, match="target"):
        score_fn(softplus_surrogate(cnn), 0.5)


# ------------------------------------------------------------------------------------------------ geometry


def test_perturbation_geometry_against_closed_forms():
    net = TwoLayerSoftplus.random(d=10, width=8, seed=9)

    class AsClassifier(nn.Module):  # (N, 2) scores: S and -S
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            s = self.inner(x)
            return torch.stack([s, -s], 1)

    model = AsClassifier(net).eval()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 10, generator=gen, dtype=DT)
    delta = 1e-4 * torch.randn(3, 10, generator=gen, dtype=DT)
    geo = perturbation_geometry(model, x, 0, delta)
    W, w = net.W.detach(), net.w.detach()
    sig = torch.sigmoid(x @ W.T)
    grad = (w * sig) @ W
    H = torch.einsum("hi,nh,hj->nij", W, w * sig * (1 - sig), W)
    Hd = torch.einsum("nij,nj->ni", H, delta)
    torch.testing.assert_close(geo.cos_grad, (grad * delta).sum(1) / (grad.norm(dim=1) * delta.norm(dim=1)))
    torch.testing.assert_close(geo.hess_delta_norm, Hd.norm(dim=1))
    torch.testing.assert_close(geo.hess_gain, Hd.norm(dim=1) / delta.norm(dim=1))
    torch.testing.assert_close(geo.first_order, (grad * delta).sum(1))
    torch.testing.assert_close(geo.score_change, net(x + delta) - net(x))
    # for a small delta the actual saliency change is the linearised one, ||H delta||, up to O(|delta|^2)
    torch.testing.assert_close(geo.saliency_change, Hd.norm(dim=1), rtol=1e-3, atol=0)
    torch.testing.assert_close(geo.relative_saliency_change, geo.saliency_change / grad.norm(dim=1))
    torch.testing.assert_close(geo.delta_linf, delta.abs().amax(1))
    # a perturbation orthogonal to the gradient has cos 0 and first-order score change 0
    ortho = delta - ((delta * grad).sum(1) / (grad * grad).sum(1))[:, None] * grad
    geo_o = perturbation_geometry(model, x, 0, ortho)
    assert geo_o.cos_grad.abs().max() < 1e-10 and geo_o.first_order.abs().max() < 1e-16


def test_random_sign_like_is_seeded_and_respects_bounds():
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(10))
    a = random_sign_like(x, 0.1, seed=1)
    assert torch.equal(a, random_sign_like(x, 0.1, seed=1))
    assert not torch.equal(a, random_sign_like(x, 0.1, seed=2))
    torch.testing.assert_close(a.abs(), torch.full_like(x, 0.1))
    assert 0.3 < float((a > 0).float().mean()) < 0.7
    b = random_sign_like(x, 0.5, seed=1, lower=0.0, upper=1.0)
    assert (x + b).min() >= 0 and (x + b).max() <= 1 and b.abs().max() <= 0.5


# ------------------------------------------------------------------------------------------------ the 2-D toy


@pytest.fixture(scope="module")
def toy():
    return fit_toy_models(0, epochs=100)


def test_toy_data_and_models(toy):
    X, y = toy_geometry_data(100, seed=3)
    X2, y2 = toy_geometry_data(100, seed=3)
    assert X.shape == (100, 2) and torch.equal(X, X2) and torch.equal(y, y2) and int(y.sum()) == 50
    Xc, _ = toy_geometry_data(100, seed=3, kind="circles", noise=0.0)
    radii = Xc.norm(dim=1)
    torch.testing.assert_close(radii[:50], torch.ones(50))
    torch.testing.assert_close(radii[50:], torch.full((50,), 0.5))
    # a curved boundary: the MLP separates the moons, the linear model cannot
    assert toy.mlp_accuracy >= 0.97
    assert toy.linear_accuracy < toy.mlp_accuracy - 0.04


def test_gradient_rotation_matches_arccos_of_autograd_gradients(toy):
    x = toy.X[::20]
    delta = random_sign_like(x, 0.2, seed=4)
    ang = gradient_rotation(toy.mlp, x, delta, target=1)

    def grads(z):
        z = z.clone().requires_grad_(True)
        return torch.autograd.grad(toy.mlp(z)[:, 1].sum(), z)[0]

    g0, g1 = grads(x), grads(x + delta)
    cos = (g0 * g1).sum(1) / (g0.norm(dim=1) * g1.norm(dim=1))
    ref = torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))
    torch.testing.assert_close(ang, ref, rtol=0, atol=1e-2)  # float32 model; arccos is ill-conditioned near 0
    assert ang.max() > 5  # the curved model's gradient turns ...
    assert gradient_rotation(toy.linear, x, delta, target=1).abs().max() == 0  # ... the linear one's does not


def test_decision_grid_values_match_the_model(toy):
    xx, yy, prob = decision_grid(toy.mlp, (-1.5, 2.5), (-1.0, 1.5), n=30)
    assert xx.shape == yy.shape == prob.shape == (30, 30)
    assert 0 <= prob.min() and prob.max() <= 1 and prob.min() < 0.05 and prob.max() > 0.95
    i, j = 7, 22
    pt = torch.tensor([[xx[i, j], yy[i, j]]], dtype=torch.float32)
    with torch.no_grad():
        out = toy.mlp(pt)
    assert prob[i, j] == pytest.approx(float(torch.softmax(out, 1)[0, 1]), abs=1e-6)
    np.testing.assert_allclose(xx[0], np.linspace(-1.5, 2.5, 30))
    _, _, margin = decision_grid(toy.mlp, (-1.5, 2.5), (-1.0, 1.5), n=30, value="margin")
    np.testing.assert_array_equal(margin > 0, prob > 0.5)
    _, _, score = decision_grid(toy.mlp, (-1.5, 2.5), (-1.0, 1.5), n=30, value="score", target=0)
    assert score[i, j] == pytest.approx(float(out[0, 0]), abs=1e-5)


def test_dimension_sweep_aligned_perturbations_grow_with_dimension():
    res = dimension_sweep(dims=(4, 64, 512), width=16, eps=0.05, n_points=6, seed=0)
    assert set(res) == {"dims", "random_mean", "random_std", "aligned_mean", "aligned_std", "random_cos", "aligned_cos"}
    assert all(len(v) == 3 for v in res.values())
    assert np.all(np.diff(res["aligned_mean"]) > 0)
    assert res["aligned_mean"][-1] > 3 * res["random_mean"][-1]
    assert res["random_cos"][-1] < res["random_cos"][0]  # random directions become orthogonal to the gradient


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_naming_the_argument():
    fn = lambda x: (x**2).sum(1)  # noqa: E731
    x = torch.randn(2, 3, dtype=DT)
    with pytest.raises(ValueError, match="v must have the shape"):
        hvp(fn, x, torch.ones(2, 4, dtype=DT))
    with pytest.raises(ValueError, match="k must be in"):
        top_eigenpairs(fn, x, 4)
    with pytest.raises(ValueError, match="method"):
        top_eigenpairs(fn, x, 1, method="arnoldi")
    with pytest.raises(ValueError, match="iters"):
        top_eigenpairs(fn, x, 1, iters=0)
    with pytest.raises(ValueError, match="fn must map"):
        hvp(lambda z: z**2, x, x)
    with pytest.raises(ValueError, match="x must have shape"):
        hvp(fn, torch.randn(3, dtype=DT), torch.randn(3, dtype=DT))
    with pytest.raises(ValueError, match="x contains NaN"):
        hvp(fn, torch.full((2, 3), math.nan, dtype=DT), x)
    with pytest.raises(ValueError, match="fn: its output does not depend on x"):
        hvp(lambda z: torch.zeros(z.shape[0], dtype=DT), x, x)
    with pytest.raises(ValueError, match="eps"):
        random_sign_like(x, -1.0)
    with pytest.raises(ValueError, match="deltas"):
        perturbation_geometry(MLP(3, [], 2).to(DT).eval(), x, 0, torch.ones(2, 2, dtype=DT))
    with pytest.raises(ValueError, match="xlim"):
        decision_grid(MLP(2, [], 2).eval(), (1.0, 0.0), (0.0, 1.0))
    with pytest.raises(ValueError, match="kind"):
        toy_geometry_data(10, kind="spirals")
    with pytest.raises(ValueError, match="dims"):
        dimension_sweep(dims=())


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_repeated_eigenvalues_need_lanczos_restarts(method):
    """With 3 distinct eigenvalues the Krylov space stops growing after 3 steps (breakdown): the restart must still
    find the whole multiplicity. Degenerate eigenvectors are not unique: check values, residuals, orthonormality."""
    gen = torch.Generator().manual_seed(11)
    lam = torch.tensor([5.0, 5.0, 5.0, -2.0, -2.0, 1.0, 1.0, 1.0], dtype=DT)
    Q = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=DT)).Q
    H = (Q @ torch.diag(lam) @ Q.T)[None]
    fn = lambda x: 0.5 * torch.einsum("ni,nij,nj->n", x, H, x)  # noqa: E731
    res = top_eigenpairs(fn, torch.zeros(1, 8, dtype=DT), 5, method=method, tol=1e-12)
    torch.testing.assert_close(
        res.eigenvalues, torch.tensor([[5.0, 5.0, 5.0, -2.0, -2.0]], dtype=DT), rtol=0, atol=1e-9
    )
    assert res.residuals.max() < 1e-8
    V = res.eigenvectors[0]
    torch.testing.assert_close(V @ V.T, torch.eye(5, dtype=DT), rtol=0, atol=1e-9)


def test_moved_geometry_names_are_still_found_in_hessian():
    """The toy and input-dimension code moved to flipfrag.fragility.geometry; the old names still resolve."""
    from flipfrag import fragility, hessian
    from flipfrag.fragility import geometry

    for name in ("toy_geometry_data", "ToyModels", "fit_toy_models", "decision_grid", "TwoLayerSoftplus",
                 "dimension_sweep"):  # fmt: skip
        assert getattr(hessian, name) is getattr(geometry, name) is getattr(fragility, name)
        assert name in dir(hessian)
    with pytest.raises(AttributeError, match="no_such_name"):
        hessian.no_such_name  # noqa: B018
