"""flippoints against oracles: scikit-learn metrics, closed-form linear flip points, hand-made direction matrices
with known PCA / RR-QR answers, a retraining protocol with a known answer, models that ignore / use a protected
column by construction, and the flip-point cache (write, reuse, corrupt, stale)."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import minimize
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from flipfrag import flippoints as fs
from flipfrag.flip import closest_flip_point
from flipfrag.models import MLP, train

# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def logreg():
    """A logistic regression on 6 features in [0, 1] (label from a noisy linear rule), its torch model and data."""
    rng = np.random.default_rng(0)
    X = rng.random((300, 6))
    y = (X @ np.array([2.0, -1.0, 0.5, 0.0, 1.5, -0.7]) - 1.0 + 0.3 * rng.standard_normal(300) > 0).astype(int)
    clf = LogisticRegression(C=10.0, max_iter=5000).fit(X, y)
    return clf, fs.LinearScores.from_sklearn(clf), X


@pytest.fixture(scope="module")
def blob_mlp():
    """A tiny erf MLP trained on two overlapping 2-D Gaussian blobs (so it makes mistakes), float64."""
    gen = torch.Generator().manual_seed(0)
    n = 200
    X = torch.cat([torch.randn(n, 2, generator=gen, dtype=torch.float64) + torch.tensor([-1.0, 0.0]),
                   torch.randn(n, 2, generator=gen, dtype=torch.float64) + torch.tensor([1.0, 0.0])])  # fmt: skip
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    torch.manual_seed(0)
    model = MLP(2, [8], 2, activation="erf").double()
    train(model, X, y, epochs=30, lr=1e-2, batch_size=64, seed=0, progress=False)
    return model, X, y


# --------------------------------------------------------------------------------------------- confidence


def test_auroc_and_average_precision_match_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        scores = rng.integers(0, 6, 150).astype(float)  # many ties
        pos = rng.random(150) < 0.25
        assert fs.auroc(scores, pos) == pytest.approx(roc_auc_score(pos, scores), abs=1e-12)
        assert fs.average_precision(scores, pos) == pytest.approx(average_precision_score(pos, scores), abs=1e-12)
    cont = rng.standard_normal(80)
    pos = cont + rng.standard_normal(80) > 0
    assert fs.auroc(torch.tensor(cont), torch.tensor(pos)) == pytest.approx(roc_auc_score(pos, cont), abs=1e-12)


def test_auroc_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        fs.auroc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="scores"):
        fs.auroc([0.1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="same length"):
        fs.average_precision([0.1, 0.2, 0.3], [True, False])


def test_bootstrap_ci_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(2)
    s = rng.standard_normal(100)
    p = s + rng.standard_normal(100) > 0.5
    lo, hi = fs.bootstrap_ci(fs.auroc, s, p, n_boot=200, seed=3)
    assert lo <= fs.auroc(s, p) <= hi and hi - lo < 0.3
    assert (lo, hi) == fs.bootstrap_ci(fs.auroc, s, p, n_boot=200, seed=3)
    # the vectorised AUROC path equals the generic loop over resamples
    slow = fs.bootstrap_ci(lambda a, b: fs.auroc(a, b), s, p, n_boot=200, seed=3)
    assert slow == pytest.approx((lo, hi), abs=1e-12)


def test_linearized_distance_is_exact_for_a_linear_model(logreg):
    clf, model, X = logreg
    x = torch.tensor(X[:20])
    _, d = fs.linear_flip_point(clf.coef_[0], clf.intercept_[0], X[:20])
    np.testing.assert_allclose(fs.linearized_distance(model, x).numpy(), d, rtol=1e-12)


def test_confidence_table_and_detection_on_a_trained_mlp(blob_mlp):
    model, X, y = blob_mlp
    x, yy = X[::4], y[::4]
    x_before = x.clone()
    res = closest_flip_point(model, x)
    table = fs.confidence_scores(model, x, yy, res)
    assert torch.equal(x, x_before)  # inputs are never mutated
    assert list(table.columns) == ["true", "pred", "correct", "softmax", "logit_gap", "linearized", "distance",
                                   "certified"]  # fmt: skip
    assert table["certified"].all() and (~table["correct"]).sum() >= 3
    # for a 2-class net the softmax is a monotone function of the logit gap: identical rankings
    det = fs.misclassification_detection(table, n_boot=50).set_index("score")
    assert det.loc["softmax", "auroc"] == pytest.approx(det.loc["logit_gap", "auroc"], abs=1e-12)
    wrong = ~table["correct"].to_numpy()
    assert det.loc["distance", "auroc"] == pytest.approx(roc_auc_score(wrong, -table["distance"]), abs=1e-12)
    assert det.loc["distance", "auroc"] > 0.7  # mistakes of a smooth 2-D net sit near its boundary
    assert det.loc["distance", "auroc_lo"] <= det.loc["distance", "auroc"] <= det.loc["distance", "auroc_hi"]
    assert (det["n_misclassified"] == wrong.sum()).all() and (det["n_excluded"] == 0).all()
    # an uncertified row is excluded from every detector alike
    table.loc[0, "certified"] = False
    assert (fs.misclassification_detection(table)["n"] == len(table) - 1).all()


def test_confidence_scores_rejects_a_result_of_other_inputs(blob_mlp):
    model, X, y = blob_mlp
    res = closest_flip_point(model, X[:5])
    with pytest.raises(ValueError, match="same length"):
        fs.confidence_scores(model, X[:6], y[:6], res)


# --------------------------------------------------------------------------------------------- model-agnostic


def test_logistic_regression_pipeline_agrees_with_the_closed_form(logreg):
    clf, model, X = logreg
    x = torch.tensor(X[:40])
    probs = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(probs, clf.predict_proba(X[:40]), atol=1e-12)
    w, b = clf.coef_[0], clf.intercept_[0]
    for bounds in ({}, {"lower": 0.0, "upper": 1.0}):
        res = closest_flip_point(model, x, **bounds)
        xf, d = fs.linear_flip_point(w, b, X[:40], **bounds)
        ok = res.converged.numpy() & np.isfinite(d)
        assert ok.mean() >= 0.95
        np.testing.assert_allclose(res.distance.numpy()[ok], d[ok], rtol=1e-6)
        np.testing.assert_allclose(res.x_flip.numpy()[ok], xf[ok], atol=1e-6)
    # the unbounded closed form is the projection; its flip directions are all parallel to w: rank 1
    xf, _ = fs.linear_flip_point(w, b, X[:40])
    rr = fs.rrqr_directions(xf - X[:40])
    assert rr.rank == 1 and rr.order[0] == np.argmax(np.abs(w))
    pca = fs.pca_directions(xf - X[:40], center=False)
    assert pca.explained[0] == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(pca.components[0]), np.abs(w) / np.linalg.norm(w), atol=1e-12)


def test_boxed_linear_flip_point_matches_scipy_slsqp():
    rng = np.random.default_rng(4)
    w, b = rng.standard_normal(5), 0.4
    X = rng.random((6, 5))
    xf, d = fs.linear_flip_point(w, b, X, lower=0.0, upper=1.0)
    for i in range(len(X)):
        if not np.isfinite(d[i]):
            continue
        sol = minimize(lambda z, i=i: 0.5 * np.sum((z - X[i]) ** 2), X[i], jac=lambda z, i=i: z - X[i],
                       constraints=[{"type": "eq", "fun": lambda z: z @ w + b, "jac": lambda z: w}],
                       bounds=[(0, 1)] * 5, method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})  # fmt: skip
        assert sol.success
        np.testing.assert_allclose(xf[i], sol.x, atol=1e-6)
        assert xf[i] @ w + b == pytest.approx(0.0, abs=1e-10)
    # a hyperplane that misses the box: NaN, not a wrong point
    xf, d = fs.linear_flip_point(np.ones(3), 10.0, np.full((1, 3), 0.5), lower=0.0, upper=1.0)
    assert np.isnan(d).all() and np.isnan(xf).all()


def test_linear_scores_and_linear_flip_point_validate_input():
    with pytest.raises(ValueError, match="bias"):
        fs.LinearScores(np.ones(3), np.ones(2))
    with pytest.raises(TypeError, match="clf"):
        fs.LinearScores.from_sklearn(object())
    with pytest.raises(ValueError, match="w is zero"):
        fs.linear_flip_point(np.zeros(3), 1.0, np.ones((2, 3)))
    with pytest.raises(ValueError, match="features"):
        fs.linear_flip_point(np.ones(3), 1.0, np.ones((2, 4)))


# --------------------------------------------------------------------------------------------- PCA / RR-QR


def test_pca_of_hand_made_direction_matrices():
    v = np.array([0.0, 3.0, 0.0, -4.0]) / 5.0
    a = np.array([1.0, -2.0, 0.5, 3.0])
    D = np.outer(a, v)  # rank 1: every direction along v
    p = fs.pca_directions(D, center=False)
    assert p.singular_values[0] == pytest.approx(np.linalg.norm(a))
    np.testing.assert_allclose(p.singular_values[1:], 0, atol=1e-12)
    assert p.explained[0] == pytest.approx(1.0) and p.n_components(0.99) == 1
    np.testing.assert_allclose(p.components[0], -v, atol=1e-12)  # sign: largest-|.| entry (-4/5) made positive
    # centred: D = c + t u with sum(t) = 0 -> mean c, one component u
    c, u, t = np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 0.0]), np.array([-1.0, 0.0, 1.0, 2.0, -2.0])
    p = fs.pca_directions(c + np.outer(t, u), center=True)
    np.testing.assert_allclose(p.mean, c, atol=1e-12)
    np.testing.assert_allclose(p.components[0], u, atol=1e-12)
    assert p.singular_values[0] == pytest.approx(np.linalg.norm(t)) and p.explained[0] == pytest.approx(1.0)
    # unit-normalised rows: directions of different lengths along one vector collapse to one row repeated
    p = fs.pca_directions(np.outer([1.0, 5.0, 0.2], v), center=False, normalize=True)
    assert p.singular_values[0] == pytest.approx(math.sqrt(3))
    assert fs.pca_directions(np.outer([1.0, 5.0, 0.2], v), center=True, normalize=True).n_components(0.9) == 0
    # against the covariance eigen-decomposition for a random matrix
    R = np.random.default_rng(5).standard_normal((30, 4)) @ np.diag([3.0, 2.0, 1.0, 0.5])
    ev = np.sort(np.linalg.eigvalsh(np.cov(R.T)))[::-1]
    np.testing.assert_allclose(fs.pca_directions(R).explained, ev / ev.sum(), rtol=1e-10)


def test_rrqr_of_hand_made_direction_matrices():
    # orthogonal columns of distinct norms: pivots sorted by norm, |R_kk| = the norms
    D = np.zeros((4, 4))
    for col, (row, norm) in enumerate([(0, 1.0), (1, 4.0), (2, 2.0), (3, 3.0)]):
        D[row, col] = norm
    r = fs.rrqr_directions(D)
    assert r.order.tolist() == [1, 3, 2, 0] and r.rank == 4
    np.testing.assert_allclose(r.r_diag, [4.0, 3.0, 2.0, 1.0])
    # a dependent column: c3 = c0 + c1 (largest norm, first pivot), c2 orthogonal (second); rank 3
    c0, c1, c2 = np.array([3.0, 0, 0, 0]), np.array([0, 1.0, 0, 0]), np.array([0, 0, 2.0, 0])
    r = fs.rrqr_directions(np.stack([c0, c1, c2, c0 + c1], axis=1))
    assert r.order[:2].tolist() == [3, 2] and r.rank == 3
    np.testing.assert_allclose(r.r_diag[:3], [math.sqrt(10), 2.0, math.sqrt(0.9)], rtol=1e-12)
    assert r.r_diag[3] < 1e-12
    assert r.top(2, names=["a", "b", "c", "d"]) == ["d", "c"]
    with pytest.raises(ValueError, match="NaN"):
        fs.rrqr_directions(np.array([[1.0, np.nan]]))


def test_direction_matrix_drops_uncertified_rows_and_normalises():
    D = np.array([[3.0, 4.0], [np.nan, np.nan], [0.0, 2.0], [0.0, 0.0]])
    np.testing.assert_array_equal(fs.direction_matrix(D), D[[0, 2, 3]])
    np.testing.assert_allclose(fs.direction_matrix(D, normalize=True), [[0.6, 0.8], [0.0, 1.0]])
    np.testing.assert_array_equal(fs.direction_matrix(D, rows=[True, True, False, True]), D[[0, 3]])
    with pytest.raises(ValueError, match="rows"):
        fs.direction_matrix(D, rows=[True])


# --------------------------------------------------------------------------------------------- features


def test_unit_flips_and_flips_vs_k_match_closed_forms():
    w = torch.tensor([2.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    b = -0.5
    model = fs.LinearScores(w, b)
    x = torch.tensor([[0.1, 0.3, 0.2, 0.7]], dtype=torch.float64)
    f = float(x[0] @ w + b)  # -0.5: class 0
    table, res = fs.unit_flips(model, x, {"a": [0], "b": [1], "c": [2], "d": [3], "ab": [0, 1]},
                               lower=0.0, upper=1.0)  # fmt: skip
    t = table.set_index("unit")
    # one free feature j: x_j moves by -f / w_j if that stays inside [0, 1]
    assert t.loc["a", "flips"] and t.loc["a", "distance"] == pytest.approx(abs(f / 2.0), rel=1e-6)
    assert not t.loc["b", "flips"]  # needs x_1 = 0.3 - 0.5 < 0
    assert not t.loc["c", "flips"]  # needs x_2 = 0.2 + 1.0 > 1
    assert not t.loc["d", "flips"]  # w_3 = 0: the feature cannot flip the output
    assert t.loc["ab", "distance"] == pytest.approx(abs(f) / math.sqrt(5), rel=1e-6)
    assert t.loc["a", "change"] == pytest.approx(0.25, rel=1e-6)
    # only the allowed features moved
    assert torch.equal(res.x_flip[0, 1:], x[0, 1:])
    # top-k features by |w| free, no bounds: distance |f| / ||w_S||
    xs = torch.tensor([[0.1, 0.3, 0.2, 0.7], [0.9, 0.1, 0.5, 0.5]], dtype=torch.float64)
    order = np.argsort(-np.abs(w.numpy()))
    df, _ = fs.flips_vs_k(model, xs, order, [1, 2, 3])
    for _, row in df.iterrows():
        fi = float(xs[int(row.point)] @ w + b)
        assert row.flips
        assert row.distance == pytest.approx(abs(fi) / np.linalg.norm(w.numpy()[order[: int(row.k)]]), rel=1e-6)
        assert row.l0 == row.k
    assert (df.groupby("point").distance.apply(lambda s: s.is_monotonic_decreasing)).all()


def test_rank_features_orders_by_change_and_reports_original_units():
    v = np.array([0.1, -0.5, 0.0, 0.3])
    df = fs.rank_features(v, ["a", "b", "c", "d"], original=v * np.array([10.0, 100.0, 1.0, 1.0]), top=3)
    assert df["feature"].tolist() == ["b", "d", "a"]
    np.testing.assert_allclose(df["change_original"], [-50.0, 0.3, 1.0])
    assert df["share"].iloc[0] == pytest.approx(0.25 / 0.35)
    with pytest.raises(ValueError, match="feature_names"):
        fs.rank_features(v, ["a"])


def test_topk_mask_and_columns_of():
    m = fs.topk_mask([2, 0, 1], 2)
    assert m.tolist() == [True, False, True]
    assert fs.topk_mask([[0, 1], [1, 0]], 1).tolist() == [[True, False], [False, True]]
    with pytest.raises(ValueError, match="k must"):
        fs.topk_mask([0, 1], 3)

    class Data:
        feature_names = ["age", "sex=Male", "race=A", "race=B"]
        groups = {"sex": [1], "race": [2, 3]}

    assert fs.columns_of(Data, "race") == [2, 3] and fs.columns_of(Data, "age") == [0]
    assert fs.attribute_units(Data) == {"age": [0], "sex": [1], "race": [2, 3]}
    with pytest.raises(ValueError, match="attribute"):
        fs.columns_of(Data, "income")


# --------------------------------------------------------------------------------------------- bias


def test_toggle_test_on_models_that_ignore_or_use_the_protected_column():
    gen = torch.Generator().manual_seed(6)
    X = torch.rand(50, 5, generator=gen, dtype=torch.float64)
    X[:, 1] = (X[:, 1] > 0.5).double()  # binary protected column
    X[:, 2:] = torch.nn.functional.one_hot(torch.randint(0, 3, (50,), generator=gen), 3).double()  # a 3-way group
    ignores = fs.LinearScores(torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0]), -0.5)
    uses = fs.LinearScores(torch.tensor([0.1, 10.0, 0.0, 0.0, 0.0]), -5.0)  # class = the protected column
    t = fs.toggle_test(ignores, X, [1])
    assert len(t) == 50 and not t["flipped"].any()
    t = fs.toggle_test(uses, X, [1])
    assert t["flipped"].all() and (t["from"] + t["to"] == 1).all()
    # one-hot group: only a change to or from category 2 (column 4) can flip this model
    group_model = fs.LinearScores(torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0]), -2.0)
    t = fs.toggle_test(group_model, X, [2, 3, 4])
    assert len(t) == 2 * 50  # every other category of each point
    assert (t["flipped"] == ((t["from"] == 4) | (t["to"] == 4))).all()
    # a trained MLP whose label is the protected column learns to use it
    y = X[:, 1].long()
    torch.manual_seed(0)
    mlp = MLP(5, [8], 2).double()
    train(mlp, X, y, epochs=200, lr=3e-2, batch_size=50, seed=0, progress=False)
    assert fs.toggle_test(mlp, X, [1])["flipped"].mean() >= 0.95


def test_attribute_shares_and_order():
    units = {"a": [0], "b": [1, 2], "c": [3]}
    D = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 4.0, 0.0], [np.nan] * 4])
    s = fs.attribute_shares(D, units)
    np.testing.assert_allclose(s.iloc[0], [0.25, 0.5, 0.25])
    np.testing.assert_allclose(s.iloc[1], [0.0, 1.0, 0.0])
    assert s.iloc[2].isna().all()
    o = fs.attribute_order([2, 3, 0, 1], units)
    assert o["attribute"].tolist() == ["b", "c", "a"] and o["first_pivot"].tolist() == [0, 1, 2]
    assert o["rank"].tolist() == [1, 2, 3] and o["column"].tolist() == [2, 3, 0]


# --------------------------------------------------------------------------------------------- training points


def test_select_training_subset_against_a_loop():
    rng = np.random.default_rng(7)
    d = rng.random(40)
    d[[3, 17]] = np.nan
    y = rng.integers(0, 2, 40)
    for how in ("closest", "farthest"):
        idx = fs.select_training_subset(d, y, 0.25, how)
        for c in (0, 1):
            pool = [i for i in range(40) if y[i] == c and not np.isnan(d[i])]
            k = max(1, round(0.25 * len(pool)))
            want = sorted(pool, key=lambda i: d[i], reverse=how == "farthest")[:k]
            assert sorted(i for i in idx if y[i] == c) == sorted(want)
    r = fs.select_training_subset(d, y, 0.5, "random", seed=1)
    assert 3 not in r and 17 not in r and len(set(r)) == len(r)
    assert np.array_equal(r, fs.select_training_subset(d, y, 0.5, "random", seed=1))
    with pytest.raises(ValueError, match="how"):
        fs.select_training_subset(d, y, 0.5, "middle")
    with pytest.raises(ValueError, match="fraction"):
        fs.select_training_subset(d, y, 0.0, "closest")


def test_retraining_protocol_on_a_toy_set_with_a_known_answer():
    """1-D, a max-margin threshold learner: the closest points reproduce the full model exactly, the farthest
    points move the threshold to a value we compute by hand."""
    x0, x1 = np.linspace(0.0, 1.0, 50), np.linspace(2.0, 10.0, 50)
    X = torch.tensor(np.r_[x0, x1])[:, None]
    y = torch.tensor([0] * 50 + [1] * 50)
    distance = np.abs(X[:, 0].numpy() - 1.5)  # distance to the full model's boundary at 1.5
    X_test = torch.linspace(0.0, 10.0, 1001, dtype=torch.float64)[:, None]
    y_test = (X_test[:, 0] > 1.5).long()

    def fit(Xs, ys, seed):
        thr = 0.5 * (float(Xs[ys == 0].max()) + float(Xs[ys == 1].min()))
        return lambda Z: (Z[:, 0] > thr).long()

    df = fs.retraining_experiment(fit, X, y, distance, X_test, y_test, fractions=[0.2, 1.0], repeats=2)
    res = df.set_index(["selection", "fraction", "repeat"])
    assert res.loc[("closest", 0.2, 0), "agreement"] == 1.0 and res.loc[("closest", 0.2, 0), "test_acc"] == 1.0
    thr_far = 0.5 * (x0[9] + x1[40])  # farthest 10 per class: class 0 up to x0[9], class 1 from x1[40]
    expected = 1.0 - float(((X_test[:, 0] > 1.5) & (X_test[:, 0] <= thr_far)).double().mean())
    assert res.loc[("farthest", 0.2, 0), "agreement"] == pytest.approx(expected)
    assert res.loc[("farthest", 0.2, 0), "n_train"] == 20
    assert res.xs(1.0, level="fraction")["agreement"].eq(1.0).all()  # everything: the full model
    assert len(df) == 3 * 2 + 3 * 2  # fraction 1: one training per repeat, reported for each selection


def test_mlp_trainer_learns_a_separable_problem(blob_mlp):
    _, X, y = blob_mlp
    fit = fs.mlp_trainer(2, 2, [4], steps=150, lr=2e-2, batch_size=32)
    pred = fit(X[::10], y[::10], 0)(X)
    assert pred.shape == y.shape and float((pred == y).double().mean()) > 0.75
    assert torch.equal(pred, fit(X[::10], y[::10], 0)(X))  # seeded


# --------------------------------------------------------------------------------------------- cache


def test_flip_cache_reuses_rejects_corruption_and_stale_keys(blob_mlp, tmp_path):
    model, X, _ = blob_mlp
    x = X[:6]
    kw = dict(lower=-5.0, upper=5.0, max_iter=50)
    first = fs.cached_flip_points(model, x, name="t", cache=tmp_path, **kw)
    assert first.cache_info["cached"] is False
    again = fs.cached_flip_points(model, x, name="t", cache=tmp_path, **kw)
    assert again.cache_info["cached"] is True
    assert again.cache_info["seconds"] == pytest.approx(first.cache_info["seconds"])
    for name in ("x_flip", "distance", "source", "target", "converged", "distances", "kkt"):
        a, b = getattr(first, name), getattr(again, name)
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), name
    assert again.status == first.status
    # other inputs or other settings: another key, another file
    assert fs.flip_cache_key(model, x, **kw) != fs.flip_cache_key(model, X[1:7], **kw)
    assert fs.flip_cache_key(model, x, **kw) != fs.flip_cache_key(model, x, **{**kw, "max_iter": 51})
    assert fs.flip_cache_key(model, x, **kw) == fs.flip_cache_key(model, x.clone(), progress=True, **kw)
    # a corrupt file: a clear error on load, a warning and a fresh solve in cached_flip_points
    path = first.cache_info["path"]
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(fs.FlipCacheError, match="sha256"):
        fs.load_flip_result(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = fs.cached_flip_points(model, x, name="t", cache=tmp_path, **kw)
    assert fresh.cache_info["cached"] is False and any("recomputing" in str(w.message) for w in caught)
    _, meta = fs.load_flip_result(path)
    with pytest.raises(fs.FlipCacheError, match="key"):
        fs.load_flip_result(path, key="0" * 16)
    assert meta["n"] == 6
    with pytest.raises(ValueError, match="name"):
        fs.cached_flip_points(model, x, name="a/b", cache=tmp_path)


def test_flip_options_follow_the_profile():
    prof = {"flip_tol": 1e-6, "flip_max_iter": 77, "flip_restarts": 2}

    class Tab:
        feature_names = ["a"]
        lower, upper = torch.zeros(1), torch.ones(1)

    o = fs.flip_options(prof, images=fs.is_image_data(Tab))
    assert o.max_iter == 77 and o.restarts == 2 and o.homotopy is True and o.max_ineq == 8
    assert fs.data_bounds(Tab)["lower"].dtype == torch.float64
    assert fs.flip_options(prof, images=False, restricted=True).homotopy is False
    o = fs.flip_options(prof, images=True, max_iter=5)
    assert o.restarts == 0 and not o.homotopy and o.max_iter == 5 and o.max_ineq == 2
    assert fs.data_bounds(None) == {}


def test_cache_keys_do_not_depend_on_how_the_settings_are_passed():
    from flipfrag.flip import FlipOptions

    model, x = torch.nn.Linear(3, 2).double().eval(), torch.zeros(2, 3, dtype=torch.float64)
    key = fs.flip_cache_key(model, x, options=FlipOptions(tol=1e-5), lower=0.0)
    assert key == fs.flip_cache_key(model, x, tol=1e-5, lower=0.0)
    assert key == fs.flip_cache_key(model, x, options=FlipOptions(tol=1e-3), tol=1e-5, lower=0.0)
    assert key != fs.flip_cache_key(model, x, tol=1e-5)
    with pytest.raises(TypeError, match="tolerance"):
        fs.flip_cache_key(model, x, tolerance=1e-5)


def test_results_are_tables():
    assert isinstance(fs.attribute_shares(np.eye(2), {"a": [0], "b": [1]}), pd.DataFrame)


def test_paired_auroc_difference():
    rng = np.random.default_rng(8)
    pos = rng.random(120) < 0.3
    good = pos + 0.1 * rng.standard_normal(120)
    noise = rng.standard_normal(120)
    diff, lo, hi = fs.auroc_difference(good, noise, pos, n_boot=200, seed=0)
    assert diff == pytest.approx(fs.auroc(good, pos) - fs.auroc(noise, pos)) and 0 < lo <= diff <= hi
    assert fs.auroc_difference(noise, noise, pos, n_boot=50) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="one length"):
        fs.auroc_difference(good, noise[:-1], pos)


def test_restricted_flip_point_with_the_free_feature_starting_at_its_bound():
    """One free feature that starts at its upper bound (a binary attribute such as sex=1): the flip point is the
    root of the decision function along that feature (closed form for a linear model)."""
    model = fs.LinearScores(torch.tensor([1.0, 0.5]), -1.2)  # class 1 iff x0 + 0.5 x1 > 1.2
    x = torch.tensor([[1.0, 0.9], [0.0, 0.9]], dtype=torch.float64)  # x0 at its upper / lower bound
    res = fs.restricted_flip_points(model, x, [True, False], lower=0.0, upper=1.0)
    assert res.converged.all(), res.status
    np.testing.assert_allclose(res.x_flip[:, 0].numpy(), [1.2 - 0.45, 1.2 - 0.45], atol=1e-6)
    np.testing.assert_allclose(res.distance.numpy(), [0.25, 0.75], atol=1e-6)
    assert torch.equal(res.x_flip[:, 1], x[:, 1])


def test_standard_flips_share_one_cached_solve(tmp_path, monkeypatch):
    from flipfrag.profiles import get_profile

    monkeypatch.setenv("FLIPFRAG_CACHE", str(tmp_path))
    prof = get_profile("smoke", mlp_epochs=1, flip_n_points=6, flip_restarts=0, flip_max_iter=40)
    first = fs.standard_flips("breast_cancer-erf", prof, split="train", activation="tanh")
    assert first.model.config["activation"] == "tanh" and first.res.cache_info["cached"] is False
    assert first.x.shape == (6, 30) and first.x.dtype == torch.float64 and len(first.index.unique()) == 6
    assert torch.equal(first.y, first.data.y_train[first.index])
    assert first.directions.shape == (6, 30)
    again = fs.standard_flips("breast_cancer-erf", prof, split="train", activation="tanh", data=first.data)
    assert again.res.cache_info["cached"] is True and torch.equal(again.index, first.index)
    with pytest.raises(ValueError, match="split"):
        fs.standard_flips("breast_cancer-erf", prof, split="val")
    with pytest.raises(ValueError, match="key"):
        fs.trained_variant("mnist-cnn", "tanh", prof)


def test_bad_arguments_are_named_and_inputs_are_not_mutated(logreg):
    _, model, X = logreg
    x = torch.tensor(X[:3])
    x_before = x.clone()
    fs.flips_vs_k(model, x, np.arange(6), [2, 6])
    fs.unit_flips(model, x[0], {"a": [0]})
    fs.restricted_flip_points(model, x, [True] * 6, lower=0.0, upper=1.0)
    assert torch.equal(x, x_before)
    with pytest.raises(ValueError, match="ks"):
        fs.flips_vs_k(model, x, np.arange(6), [])
    with pytest.raises(ValueError, match="free"):
        fs.restricted_flip_points(model, x, [True, False])
    with pytest.raises(ValueError, match="units"):
        fs.unit_flips(model, x[0], {"a": [17]})
    with pytest.raises(ValueError, match="single input"):
        fs.unit_flips(model, x, {"a": [0]})
    with pytest.raises(TypeError, match="fit"):
        fs.retraining_experiment(None, x, torch.zeros(3), np.ones(3), x, torch.zeros(3), fractions=[0.5])
    with pytest.raises(ValueError, match="selections"):
        fs.retraining_experiment(lambda *a: None, x, torch.zeros(3), np.ones(3), x, torch.zeros(3), fractions=[0.5],
                                 selections=["middle"])  # fmt: skip
    with pytest.raises(TypeError, match="model"):
        fs.flip_cache_key("not a model", x)
    with pytest.raises(ValueError, match="D must"):
        fs.pca_directions(np.zeros((0, 3)))


def test_concat_flip_results_keeps_order_and_merges_every_field_also_new_ones(blob_mlp):
    """Shards solved separately, concatenated: each field equals its explicit concatenation (tensors row by row,
    status in order, shared tolerances kept); a FlipResult subclass with new fields (a per-point tensor, a
    shared tensor, a dict of diagnostics) merges too; disagreeing parts are errors naming the field."""
    from dataclasses import dataclass, field, replace

    from flipfrag.flip import FlipResult

    model, X, _ = blob_mlp
    parts = [closest_flip_point(model, X[a:b], max_iter=50) for a, b in ((0, 3), (3, 4), (4, 9))]
    out = fs.concat_flip_results(parts)
    assert len(out) == 9
    for name in ("x_flip", "x_attempt", "distance", "source", "target", "residual", "margin", "bound_violation",
                 "kkt", "iterations", "converged", "start", "scores", "distances", "upper_bound"):  # fmt: skip
        a, b = getattr(out, name), torch.cat([getattr(p, name) for p in parts])
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), name
    assert out.status == parts[0].status + parts[1].status + parts[2].status
    assert out.rounding_changed is None and (out.tol, out.kkt_tol, out.margin_param) == (1e-6, 1e-4, 0.0)
    assert torch.equal(out.x_flip[3], parts[1].x_flip[0])  # order kept

    @dataclass
    class FlipResultPlus(FlipResult):
        per_point: torch.Tensor | None = None
        shared: torch.Tensor | None = None
        extra: dict = field(default_factory=dict)

    plus = [FlipResultPlus(**{f: getattr(p, f) for f in p.__dataclass_fields__},
                           per_point=torch.arange(len(p)) + 10 * i, shared=torch.ones(2),
                           extra={"rows": torch.full((len(p),), i), "note": "x"})
            for i, p in enumerate(parts)]  # fmt: skip
    merged = fs.concat_flip_results(plus)
    assert isinstance(merged, FlipResultPlus)
    assert merged.per_point.tolist() == [0, 1, 2, 10, 20, 21, 22, 23, 24]
    assert torch.equal(merged.shared, torch.ones(2)) and merged.extra["note"] == "x"
    assert merged.extra["rows"].tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="tol"):
        fs.concat_flip_results([parts[0], replace(parts[1], tol=1e-5)])
    with pytest.raises(ValueError, match="distances"):
        fs.concat_flip_results([parts[0], replace(parts[1], distances=None)])
    with pytest.raises(ValueError, match="shared"):
        fs.concat_flip_results([plus[0], replace(plus[1], shared=torch.zeros(2))])
    with pytest.raises(ValueError, match="x_flip"):
        fs.concat_flip_results([parts[0], replace(parts[1], x_flip=parts[1].x_flip.float())])
    with pytest.raises(ValueError, match="parts"):
        fs.concat_flip_results([])
    with pytest.raises(TypeError, match=r"parts\[1\]"):
        fs.concat_flip_results([parts[0], "no"])
