"""flipfrag.beyond against oracles: scipy's Spearman ρ and a slow bootstrap loop, closed-form flip explanations of
linear models, invariants of the flip-explanation map, the transfer rows' perturbation, constructed relations."""

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from flipfrag import beyond
from flipfrag.flip import closest_flip_point
from flipfrag.fragility import grid_spec
from flipfrag.fragility.settings import prepare_setting
from flipfrag.models import MLP
from flipfrag.profiles import get_profile

# ----------------------------------------------------------------------------------------------- correlation


def test_spearman_matches_scipy_with_ties_and_the_bootstrap_matches_a_slow_loop():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 6, 30).astype(float)  # ties
    b = a + rng.normal(0, 2, 30)
    c = beyond.spearman_ci(a, b, n_boot=300, seed=7)
    assert c.rho == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    idx = beyond.bootstrap_indices(30, 300, 7)
    slow = []
    for row in idx:
        if np.unique(a[row]).size > 1 and np.unique(b[row]).size > 1:
            slow.append(spearmanr(a[row], b[row]).statistic)
    lo, hi = np.quantile(slow, [0.025, 0.975])
    assert (c.low, c.high) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert c.n_boot_degenerate == 300 - len(slow)
    assert c.low <= c.rho <= c.high


def test_monotone_relations_give_plus_and_minus_one_and_nans_are_excluded_and_counted():
    d = np.linspace(0.1, 3.0, 20)
    up = beyond.spearman_ci(d, np.exp(d), n_boot=100)
    down = beyond.spearman_ci(d, -(d**3), n_boot=100)
    assert (up.rho, up.low, up.high) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))
    assert down.rho == pytest.approx(-1.0) and down.excludes_zero
    d2 = d.copy()
    d2[[2, 5]] = np.nan
    c = beyond.spearman_ci(d2, np.exp(d), n_boot=100)
    assert (c.n, c.n_excluded, c.rho) == (18, 2, pytest.approx(1.0))
    assert np.isnan(beyond.spearman_ci([1.0, np.nan, 2.0], [1.0, 2.0, 3.0]).rho)  # fewer than 3 pairs


def test_spearman_ci_is_seeded_and_checks_its_input():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=25), rng.normal(size=25)
    assert beyond.spearman_ci(a, b, seed=1) == beyond.spearman_ci(a, b, seed=1)
    assert beyond.spearman_ci(a, b, seed=1).low != beyond.spearman_ci(a, b, seed=2).low
    with pytest.raises(ValueError, match="same length"):
        beyond.spearman_ci(a, b[:-1])
    with pytest.raises(ValueError, match="level"):
        beyond.spearman_ci(a, b, level=1.5)
    with pytest.raises(ValueError, match="inf"):
        beyond.spearman_ci(np.r_[a[:-1], np.inf], b)


def test_boundary_correlations_of_a_constructed_monotone_frame():
    d = np.linspace(0.2, 2.0, 12)
    frame = pd.DataFrame({"model": "m", "method": "gradient", "image": range(12), "distance": d,
                          "curvature": 1 / d, "topk_attack": d / 3, "spearman_attack": np.sqrt(d),
                          "topk_random": np.full(12, 0.9)})  # fmt: skip
    frame.loc[3, "distance"] = np.nan  # an uncertified flip point: excluded and counted
    t = beyond.boundary_correlations(frame, n_boot=200).set_index(["x", "y"])
    assert t.loc[("distance", "topk_attack"), "rho"] == pytest.approx(1.0)
    assert t.loc[("distance", "topk_attack"), "relation"] == "positive"
    assert t.loc[("distance", "topk_attack"), "n_excluded"] == 1
    assert t.loc[("curvature", "topk_attack"), "rho"] == pytest.approx(-1.0)
    assert t.loc[("curvature", "topk_attack"), "n_excluded"] == 0
    assert t.loc[("distance", "curvature"), "relation"] == "negative"
    assert t.loc[("distance", "topk_random"), "relation"] == "not available"  # constant: ρ undefined


# ------------------------------------------------------------------------------------------ flip explanation


class _Linear2(nn.Module):
    """Two classes, z1 - z0 = w.x + b on (N, 1, H, W) images."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w.double(), float(b)

    def forward(self, x):
        s = x.flatten(1) @ self.w.flatten() + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def test_flip_explanation_map_sums_to_one_is_zero_where_unchanged_and_nan_without_a_flip_point():
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    x_flip = x.clone()
    x_flip[0, :, 1, 2] += torch.tensor([0.3, -0.1], dtype=torch.float64)
    x_flip[0, 1, 3, 3] -= 0.2
    x_flip[1] += 0.05 * torch.randn(2, 4, 4, dtype=torch.float64)
    x_flip[2, 0, 0, 0] = float("nan")
    m = beyond.flip_explanation_map(x, x_flip)
    assert m.shape == (3, 4, 4)
    assert m[:2].flatten(1).sum(1).tolist() == pytest.approx([1.0, 1.0])
    expected = torch.zeros(4, 4, dtype=torch.float64)
    expected[1, 2], expected[3, 3] = 0.4, 0.2
    torch.testing.assert_close(m[0], expected / 0.6)  # zero exactly where x_flip = x
    assert torch.isnan(m[2]).all()
    with pytest.raises(ValueError, match="same shape"):
        beyond.flip_explanation_map(x, x_flip[:, :1])


def test_flip_explanation_of_a_linear_model_is_the_normalised_weight_magnitude():
    """Closed form: the closest flip point of a linear model is the projection on the hyperplane, x_flip - x ∝ w."""
    w = torch.randn(1, 5, 5, dtype=torch.float64)
    x = torch.full((2, 1, 5, 5), 0.5, dtype=torch.float64)
    model = _Linear2(w, b=0.3 - 0.5 * float(w.sum()))
    maps, res = beyond.flip_explanation(model, x, {"lower": 0.0, "upper": 1.0})
    assert bool(res.converged.all())
    torch.testing.assert_close(maps, (w.abs() / w.abs().sum()).expand(2, 5, 5), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------------------- study 2


def _tiny_setting():
    torch.manual_seed(0)
    model = MLP(36, [12], 3, activation="erf").double().eval()
    X = torch.rand(40, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = model(X).argmax(1)
    return prepare_setting("mnist28", model, X, y, n=6, baseline=X.mean().reshape(1, 1, 1),
                           class_names=["a", "b", "c"], description="tiny erf MLP", substitution=None,
                           model_name="tiny-erf")  # fmt: skip


def _tiny_profile():
    return get_profile("smoke", epsilons=[0, 8 / 255], grid_iters=3, flip_max_iter=100)


def test_transfer_rows_use_exactly_the_simple_gradient_attacks_perturbation(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path))
    st, prof = _tiny_setting(), _tiny_profile()
    rows, info = beyond.flip_fragility_rows(st, prof, methods=("gradient",), attacks=("random",),
                                            transfer=("topk",), seed=0)  # fmt: skip
    assert info["n_certified"] >= 3
    # independently: the certified images, the grid's SG top-k attack, the flip explanation at its output
    solver = beyond.flip_arguments(st, prof)
    res0 = closest_flip_point(st.model, st.x, **solver)
    ok = res0.converged
    x, y = st.x[ok], st.y[ok]
    spec = grid_spec(st, prof, methods=("gradient",), epsilons=(8 / 255,))
    sg = beyond.sg_attack(spec, st.model, "topk", 8 / 255)(x, y)
    map0 = beyond.flip_explanation_map(x, res0.x_flip[ok])
    maps, res = beyond.flip_explanation(st.model, sg.x_adv, solver)
    tr = beyond.transfer_attack(st.model, sg.x_adv, y, map0, res0.target[ok], k=st.k, solver=solver)
    assert tr["x_adv"] is sg.x_adv
    expected = beyond.flipmap._compare(map0, maps, st.k, False)
    got = rows[(rows.method == "flip") & (rows.attack == "transfer-topk")].sort_values("image")
    np.testing.assert_allclose(got.topk.to_numpy(), expected["topk"].numpy())
    np.testing.assert_allclose(got.spearman.to_numpy(), expected["spearman"].numpy())
    np.testing.assert_allclose(got.target_kept.astype(bool).to_numpy(),
                               (res.converged & (res.target == res0.target[ok])).numpy())  # fmt: skip
    # the SG row of the same table is that attack's own result on the SG map
    sg_row = rows[(rows.method == "gradient") & (rows.attack == "topk")].sort_values("image")
    np.testing.assert_allclose(sg_row.topk.to_numpy(), sg.metrics["topk"].numpy())
    # the differentiated attacks: rows present, honestly marked when the differentiable solver is missing
    assert set(rows[rows.method == "flip"].attack) >= {"none", "random", "transfer-topk"}


def test_flip_random_sign_row_uses_the_saliency_methods_random_perturbation(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path))
    st, prof = _tiny_setting(), _tiny_profile()
    solver = beyond.flip_arguments(st, prof)
    kw = dict(eps=8 / 255, seed=0, k=st.k, progress=False)
    flip_atk = beyond.FlipRandomSignAttack(st.model, solver=solver, **kw)
    out = flip_atk(st.x, st.y)
    from flipfrag.attacks import RandomSignAttack

    sg_out = RandomSignAttack(st.model, "gradient", **kw)(st.x, st.y)
    torch.testing.assert_close(out.x_adv, sg_out.x_adv)
    maps, _ = beyond.flip_explanation(st.model, out.x_adv, solver)
    torch.testing.assert_close(out.saliency_adv, maps, equal_nan=True)
    assert flip_atk.last_flip is not None and flip_atk.method == "flip"


def test_differentiated_flip_attacks_refuse_to_run_without_the_differentiable_solver(monkeypatch):
    st = _tiny_setting()
    monkeypatch.setattr(beyond.flipmap, "differentiable_available", lambda: False)
    atk = beyond.FlipTopKAttack(st.model, solver={"lower": 0.0, "upper": 1.0}, iters=2, k=st.k, progress=False)
    with pytest.raises(NotImplementedError, match="differentiable"):
        atk(st.x[:2], st.y[:2])
    with pytest.raises(TypeError, match="method"):
        beyond.FlipTopKAttack(st.model, method="gradient")


def test_certified_distance_never_replaces_an_uncertified_point():
    res = closest_flip_point(_Linear2(torch.ones(1, 2, 2), -10.0), torch.full((2, 1, 2, 2), 0.5, dtype=torch.float64),
                             lower=0.0, upper=1.0)  # fmt: skip
    assert not res.converged.any()  # the boundary sum(x) = 10 lies outside the box
    d = beyond.certified_distance(res, 3)
    assert np.isnan(d).all()


def test_claims_of_a_constructed_relation_follow_its_intervals():
    d = np.linspace(0.2, 2.0, 12)
    frame = pd.DataFrame({"model": "m", "method": "gradient", "image": range(12), "distance": d, "curvature": 1 / d,
                          "topk_attack": d / 3, "spearman_attack": d, "topk_random": d})  # fmt: skip
    corr = beyond.boundary_correlations(frame, n_boot=100)
    flips = {"m": {"n_solved": 12, "n_certified": 12, "seconds": 1.0}}
    rows = {r["claim_id"]: r for r in beyond.boundary_claims(corr, flips, deviation="test", n_boot=100)}
    cond = rows["beyond/boundary_curvature_mediator"]["conditions"]
    assert list(cond.values()) == [True]  # curvature = 1/d: rho = -1, interval below 0
    assert "+1.00 [+1.00, +1.00] (positive)" in rows["beyond/boundary_fragility_corr"]["ours"]
    frame["curvature"] = d  # now curved images are the robust ones: the Hessian prediction fails
    corr = beyond.boundary_correlations(frame, n_boot=100)
    rows = {r["claim_id"]: r for r in beyond.boundary_claims(corr, flips, deviation="test", n_boot=100)}
    assert list(rows["beyond/boundary_curvature_mediator"]["conditions"].values()) == [False]
    assert "12 of 12 certified" in rows["beyond/flip_points_certified"]["ours"]


def test_the_top_k_attack_through_the_differentiable_solver_stays_in_budget_and_never_worsens(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path))
    if not beyond.differentiable_available():
        pytest.skip("closest_flip_point(differentiable=True) not in this build")
    st = _tiny_setting()
    solver = {"max_ineq": 2}  # no box: the flip points of this net have a derivative
    eps = 8 / 255
    atk = beyond.FlipTopKAttack(st.model, solver=solver, eps=eps, iters=4, k=st.k, progress=False)
    out = atk(st.x, st.y)
    assert bool(atk.derivative_seen.any())
    assert float((out.x_adv - st.x).abs().max()) <= eps + 1e-12
    assert bool(out.label_kept.all())
    assert bool((out.metrics["topk"] <= 1.0).all()) and bool((out.metrics["topk"][out.success] < 1.0).all())
    maps, _ = beyond.flip_explanation(st.model, out.x_adv, solver)
    torch.testing.assert_close(out.saliency_adv, maps)  # the reported map is the flip map at the returned image


def test_the_cifar_saliency_cells_are_the_cifar_grid_notebooks_cells():
    """fragility_cells asks the grid for a subset of 04_cifar_grid's cells with unchanged settings, so every cell key
    (and with it the cached result) is the same; the quick profile uses the same photos."""
    from flipfrag.fragility import METHODS, grid_cache_key, image_setting

    prof = get_profile("quick")
    assert prof["beyond_cifar_n"] == prof["grid_n_images"]
    st = beyond.beyond_setting("cifar10-cnn", prof, n=int(prof["beyond_cifar_n"]))
    ref = image_setting("cifar", prof, n=min(20, int(prof["grid_n_images"])))  # 04_cifar_grid's call
    torch.testing.assert_close(st.x, ref.x)
    assert beyond.cases.grid_overrides(st, prof) == {}
    full = grid_spec(ref, prof, methods=METHODS)
    ours = grid_spec(st, prof, methods=METHODS, attacks=("random", "topk"), epsilons=(8 / 255,))
    for cell in ours.cells():
        assert grid_cache_key(st.model, st.x, st.y, ours.cell_settings(*cell)) == grid_cache_key(
            ref.model, ref.x, ref.y, full.cell_settings(*cell)
        )


def test_the_one_sided_derivative_moves_boxed_images_the_strict_one_refuses(tmp_path, monkeypatch):
    """weak='active' (flip.gradient): weakly active pixel bounds kept active, so a boxed flip point gets a derivative
    where the strict rule says none; both attacks stay in the budget and keep the label."""
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path))
    if not beyond.differentiable_available():
        pytest.skip("closest_flip_point(differentiable=True) not in this build")
    st = _tiny_setting()
    solver = {"lower": 0.0, "upper": 1.0, "max_ineq": 2}
    x = st.x.clone()
    x[:, :, :2] = 0.0  # pixels at the lower bound, as MNIST's background
    with torch.no_grad():
        keep = st.model(x).argmax(1) == st.y
    x, y = x[keep], st.y[keep]
    for weak in ("nan", "active"):
        atk = beyond.FlipTopKAttack(st.model, solver=solver, weak=weak, eps=8 / 255, iters=2, k=st.k, progress=False)
        out = atk(x, y)
        assert float((out.x_adv - x).abs().max()) <= 8 / 255 + 1e-12 and bool(out.label_kept.all())
        if weak == "active":
            assert bool(atk.derivative_seen.all())
    with pytest.raises(ValueError, match="weak"):
        beyond.FlipTopKAttack(st.model, weak="maybe")


# ------------------------------------------------------------------------------- ReLU networks: surrogate direction

_TIGHT = dict(tol=1e-12, kkt_tol=1e-7, max_iter=200, upper_bounds=False, max_ineq=2)  # accurate, for differences


class _Centered(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(4 * (x - 0.5))


def _tiny_relu_cnn():
    """A ReLU CNN with max-pooling (the CIFAR-10 CNN's kinds of layers) on 1 x 6 x 6 images, 3 classes, float64."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 8), nn.ReLU(),
                        nn.Linear(8, 3))  # fmt: skip
    model = _Centered(net).double().eval()
    x = torch.rand(8, 1, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


@pytest.mark.parametrize("cls", [beyond.FlipTopKAttack, beyond.FlipCenterAttack])
def test_the_surrogate_direction_is_the_derivative_of_the_surrogates_flip_map_objective(cls):
    """The step direction of a surrogate-direction attack on a ReLU CNN, against central finite differences of the
    attack's objective on the surrogate's flip map, re-solved (toward the given targets) at x ± h v (random v)."""
    if not beyond.differentiable_available():
        pytest.skip("closest_flip_point(differentiable=True) not in this build")
    model, x, y = _tiny_relu_cnn()
    sur = beyond.flip_surrogate(model, beta=10.0)
    # toward each image's runner-up class of the ReLU model (pinned: the targets the ReLU solver picks moved with its
    # region polish, and the derivative under test does not depend on which class is the target)
    with torch.no_grad():
        target = model(x).topk(2, dim=1).indices[:, 1]
    atk = cls(model, solver=_TIGHT, surrogate=sur, surrogate_solver={"target": target}, k=6, progress=False)
    assert atk._direction_model(x) is sur
    res = closest_flip_point(sur, x, target=target, **_TIGHT)
    good = res.converged
    assert int(good.sum()) >= 6
    # the objective's reference: any fixed map will do; shifted, so that the center objective's gradient is not ~0
    map0 = torch.roll(torch.nan_to_num(beyond.flip_explanation_map(x, res.x_flip)), shifts=(2, 1), dims=(1, 2))
    obj = atk.objective(map0, x, y, 6)
    g, value, maps, _ = atk._direction(sur, obj, x, y)
    assert maps is None  # the surrogate's map is never reported
    assert bool(atk.derivative_seen[good].all()) and not bool(atk.derivative_seen[~good].any())
    assert bool((g[~good] == 0).all())  # no certified surrogate flip point: no step
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h = 1e-5

    def f(t):
        r = closest_flip_point(sur, x + t * v, target=target, **_TIGHT)
        assert bool(r.converged[good].all())
        return obj(beyond.flip_explanation_map(x + t * v, r.x_flip))

    fd = ((f(h) - f(-h)) / (2 * h))[good]
    an = (g * v).flatten(1).sum(1)[good]
    rel = (an - fd).abs() / an.abs()
    assert bool((an.abs() > 1e-3).all())  # a real direction, not zeros
    # the differences carry the solver's error / h (kkt ~1e-8) and cross kinks of |x_flip - x| (pixels where
    # x_flip ~ x): measured with the runner-up targets median 3e-5 (top-k) / 3.4e-4 (center), worst 1.2e-3 / 1.5e-3
    # (the same at h = 3e-5: not the difference quotient's noise); a wrong derivative is off by O(1)
    assert float(rel.median()) <= 1e-3 and float(rel.max()) <= 1e-2, rel


def test_surrogate_direction_rows_are_labelled_and_measured_on_the_relu_model(tmp_path, monkeypatch):
    """flip_fragility_rows(surrogate_beta=...): rows surrogate-topk / surrogate-center; the reported map at the returned
    image is the ReLU model's own certified flip map (independently re-solved here), the label is kept on the ReLU
    model, the budget holds, and only the first n_differentiated images with a surrogate derivative are attacked."""
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path))
    if not beyond.differentiable_available():
        pytest.skip("closest_flip_point(differentiable=True) not in this build")
    model, x, y = _tiny_relu_cnn()
    st = prepare_setting("mnist28", model, x[:5], y[:5], n=5, baseline=x.mean().reshape(1, 1, 1),
                         class_names=["a", "b", "c"], description="tiny ReLU CNN", substitution=None,
                         model_name="tiny-relu")  # fmt: skip
    prof = get_profile("smoke", epsilons=[0, 8 / 255], grid_iters=2, flip_max_iter=30)
    eps = 8 / 255
    rows, info = beyond.flip_fragility_rows(st, prof, methods=("gradient",), epsilons=(eps,), transfer=(),
                                            attacks=("random", "topk", "center"), surrogate_beta=10.0, flip_iters=2,
                                            n_differentiated=2, n_examples=3, seed=0)  # fmt: skip
    flip = rows[rows.method == "flip"]
    assert set(flip.attack) == {"random", "surrogate-topk", "surrogate-center"}
    assert info["surrogate_beta"] == 10.0 and info["n_derivative"] >= 2 and info["n_differentiated"] == 2
    own = flip[flip.attack == "surrogate-topk"].sort_values("image")
    assert int(own.available.sum()) == 2  # the first two images with a surrogate derivative
    solver = beyond.flip_arguments(st, prof)
    res = closest_flip_point(model, st.x, **solver)
    ok = res.converged
    assert int(ok.sum()) == info["n_certified"] >= 2
    # re-run the attack by hand: the reported numbers are the ReLU model's at the returned images
    xs, ys, t0 = st.x[ok], st.y[ok], res.target[ok]
    sur = beyond.flip_surrogate(model, 10.0)
    d = closest_flip_point(sur, xs, target=t0, differentiable=True, **solver)
    has_d = d.converged & torch.tensor([s.startswith("ok") for s in d.grad_status])
    has_d &= torch.cumsum(has_d.long(), 0) <= 2
    spec = grid_spec(st, prof, methods=("gradient",), epsilons=(eps,))
    atk = beyond.FlipTopKAttack(model, solver=solver, surrogate=sur, surrogate_solver={"target": t0[has_d]},
                                eps=eps, step=spec.step, iters=2, k=spec.k, progress=False)  # fmt: skip
    out = atk(xs[has_d], ys[has_d])
    assert bool(atk.derivative_seen.all())  # every attacked image got a (surrogate) direction
    assert float((out.x_adv - xs[has_d]).abs().max()) <= eps + 1e-12
    with torch.no_grad():
        assert bool((model(out.x_adv).argmax(1) == ys[has_d]).all())
    maps, _ = beyond.flip_explanation(model, out.x_adv, solver)
    torch.testing.assert_close(out.saliency_adv, maps, equal_nan=True)
    np.testing.assert_allclose(own[own.available].topk.to_numpy(), out.metrics["topk"].numpy())
    # the example panels' data: the attacked images first, with the same maps
    ex = info["examples"]
    assert len(ex) == 3 and {e["image"] for e in ex[:2]} == set(torch.nonzero(has_d)[:, 0].tolist())
    assert "flip_own" not in ex[2]  # not attacked by the flip map's own attack
    assert [e["photo"] for e in ex] == [torch.nonzero(ok)[e["image"], 0].item() for e in ex]
    j = {i: k for k, i in enumerate(torch.nonzero(has_d)[:, 0].tolist())}
    for e in ex[:2]:
        np.testing.assert_allclose(e["flip_own"], out.saliency_adv[j[e["image"]]].numpy())
        np.testing.assert_allclose(e["flip"], beyond.flip_explanation_map(xs, res.x_flip[ok])[e["image"]].numpy())
        np.testing.assert_allclose(e["x"], xs[e["image"]].numpy())


def test_flip_results_split_per_image_and_concatenated_are_unchanged():
    model, x, _ = _tiny_relu_cnn()
    res = closest_flip_point(model, x[:4], lower=0.0, upper=1.0, max_ineq=2, max_iter=20)
    back = beyond.flipmap._concat([beyond.flipmap._take(res, i) for i in (0, 1, 2, 3)])
    for f in ("x_flip", "distance", "target", "converged", "scores", "kkt"):
        torch.testing.assert_close(getattr(back, f), getattr(res, f), equal_nan=True)
    assert back.status == res.status and back.tol == res.tol
    two = beyond.flipmap._select(res, torch.tensor([True, False, True, True]), torch.tensor([False, True, True]))
    torch.testing.assert_close(two.x_flip, res.x_flip[[2, 3]], equal_nan=True)


def test_boundary_examples_are_the_least_and_most_fragile_certified_images_with_their_cells(tmp_path, monkeypatch):
    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path))
    st, prof = _tiny_setting(), get_profile("smoke", grid_iters=3, flip_max_iter=100, beyond_lanczos_iters=3)
    frame, res = beyond.boundary_frame(st, prof, methods=("gradient",), seed=0)
    ex = beyond.boundary_examples(st, prof, frame, seed=0)
    g = frame[(frame.method == "gradient") & frame.certified]
    assert [e["role"] for e in ex] == ["most fragile", "least fragile"]
    assert ex[0]["topk"] == pytest.approx(g.topk_attack.min()) and ex[1]["topk"] == pytest.approx(g.topk_attack.max())
    for e in ex:
        row = g[g.image == e["image"]].iloc[0]
        assert e["topk"] == pytest.approx(row.topk_attack, abs=1e-12)  # the re-run reproduces the grid cell
        assert e["distance"] == pytest.approx(row.distance)
        assert e["map"].shape == e["map_adv"].shape == (6, 6) and e["map"].sum() == pytest.approx(1.0)
    assert beyond.boundary_examples(st, prof, frame.assign(certified=False)) == []
    with pytest.raises(ValueError, match="method"):
        beyond.boundary_examples(st, prof, frame, method="dtd")


def test_the_surrogate_direction_claim_compares_on_the_attacked_images_and_says_no_effect_when_there_is_none():
    def frame(sur_topk):
        recs = []
        for attack, topk in (("random", [0.6, 0.4, 0.0]), ("surrogate-topk", sur_topk), ("surrogate-center",
                             [0.5, 0.5, np.nan]), ("transfer-topk", [0.2, 0.2, 0.9])):  # fmt: skip
            for i, t in enumerate(topk):
                recs.append({"model": "relu", "method": "flip", "attack": attack, "eps": 8 / 255, "eps255": 8.0,
                             "image": i, "topk": t, "spearman": 0.9, "center": 1.0, "label_kept": True,
                             "flip_certified": True, "target_kept": True,
                             "available": not (attack.startswith("surrogate") and i == 2)})  # fmt: skip
        return pd.DataFrame(recs)

    info = {"relu": {"n_certified": 3, "n_images": 3, "surrogate_beta": 10.0, "n_differentiated": 2,
                     "n_derivative": 3, "differentiable": True}}  # fmt: skip
    for sur, effect in (([0.1, 0.3, np.nan], "surrogate-topk: lowers ∩ below the random sign's"),
                        ([0.5, 0.5, np.nan], "surrogate-topk: no effect")):  # fmt: skip
        rows = frame(sur)
        claims = beyond.flip_claims(beyond.summarize_flip_fragility(rows), info, deviation="t", rows=rows)
        c = {r["claim_id"]: r for r in claims}["beyond/flip_relu_surrogate_direction"]
        assert effect in c["ours"] and "2 of 3 certified images attacked" in c["ours"]
        # the random sign and transfer on the attacked images 0 and 1 only: 0.50 and 0.20 (not 0.33 / 0.43)
        assert "random 0.50/0.90" in c["ours"] and "transfer-topk 0.20/0.90" in c["ours"]
        assert f"surrogate-topk {np.mean(sur[:2]):.2f}/0.90" in c["ours"]
        assert "surrogate-center: no effect" in c["ours"]  # 0.50 vs the random sign's 0.50
    only_center = rows[rows.attack != "surrogate-topk"]  # (as smoke runs it)
    c = beyond.flip_claims(beyond.summarize_flip_fragility(only_center), info, deviation="t", rows=only_center)[-1]
    assert "surrogate-topk" not in c["ours"] and "surrogate-center 0.50/0.90" in c["ours"]
    info["relu"]["n_differentiated"] = 0
    c = beyond.flip_claims(beyond.summarize_flip_fragility(rows), info, deviation="t", rows=rows)[-1]
    assert "not available" in c["ours"]


def test_an_iterate_without_a_certified_flip_point_is_never_selected(monkeypatch):
    """Every solve away from x fails certification (patched; the first step, at x, is real): the attack must return
    x unchanged with top-k ∩ 1, not pick an uncertified iterate (whose NaN map the plain metrics rank as ∩ 0)."""
    if not beyond.differentiable_available():
        pytest.skip("closest_flip_point(differentiable=True) not in this build")
    st = _tiny_setting()
    x0 = st.x[:3]
    real = beyond.flipmap.closest_flip_point

    def failing_away_from_x0(model, x, *, differentiable=False, **kw):
        res = real(model, x, differentiable=differentiable, **kw)
        moved = (x - x0[: len(x)]).flatten(1).abs().amax(1) > 0 if len(x) == len(x0) else torch.ones(len(x), dtype=bool)
        return replace(res, converged=res.converged & ~moved)

    monkeypatch.setattr(beyond.flipmap, "closest_flip_point", failing_away_from_x0)
    atk = beyond.FlipTopKAttack(st.model, solver={"max_ineq": 2}, eps=8 / 255, iters=3, k=st.k, progress=False)
    out = atk(x0, st.y[:3])
    assert bool(atk.derivative_seen.all())  # the attack did step
    assert not bool(out.success.any()) and torch.equal(out.x_adv, x0)
    assert out.metrics["topk"].tolist() == [1.0, 1.0, 1.0]
    assert torch.isnan(out.history["topk"][1:]).all()  # every iterate: no certified flip point, no value
    # and the random sign: a returned image without a certified flip point gets NaN metrics (excluded, counted)
    rnd = beyond.FlipRandomSignAttack(st.model, solver={"max_ineq": 2}, eps=8 / 255, k=st.k, progress=False)
    r = rnd(x0, st.y[:3])
    moved = (r.x_adv != x0).flatten(1).any(1)
    assert bool(moved.all()) and torch.isnan(r.metrics["topk"][moved]).all()
