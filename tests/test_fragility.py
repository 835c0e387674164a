"""flipfrag.fragility: the experiment drivers of the fragility notebooks (grid, cache, paper values, settings)."""

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from flipfrag import fragility as fr
from flipfrag.attacks import TopKAttack
from flipfrag.datasets import Dataset, load_digits
from flipfrag.metrics import center_of_mass_shift, spearman, topk_intersection
from flipfrag.models import SmallCNN, train
from flipfrag.profiles import get_profile
from flipfrag.saliency import gradient, saliency_map

#: The repository's own paper notes; §4 holds the F3 table transcribed in fr.PAPER_F3.
PAPER_NOTES = Path(__file__).resolve().parent.parent / "docs" / "papers" / "fragility.md"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def digits_model():
    """A small ReLU CNN trained for a second on sklearn's 8x8 digits, and 4 images it classifies correctly."""
    data = load_digits(seed=0)
    torch.manual_seed(0)
    model = SmallCNN(1, 10, width=4)
    train(model, data.X_train, data.y_train, epochs=6, lr=1e-2, batch_size=64, seed=0, progress=False)
    x, y, acc = fr.select_correct(model, data.X_test, data.y_test, 4, seed=0)
    assert acc > 0.5, "the tiny model should learn the digits"
    return model, x, y


GRID_KW = dict(k=6, methods=["gradient", "deeplift"], epsilons=[0, 4 / 255, 8 / 255], iters=3)


@pytest.fixture(scope="module")
def grid(digits_model, tmp_path_factory):
    model, x, y = digits_model
    folder = tmp_path_factory.mktemp("grid-cache")
    df = fr.run_attack_grid(model, x, y, cache=folder, **GRID_KW)
    return df, folder


# ------------------------------------------------------------------------------------------------ paper values


def test_paper_grid_matches_the_paper_notes_text():
    """Entries transcribed by hand from the F3 table of docs/papers/fragility.md §4 (the oracle is the notes, not
    PAPER_F3)."""
    p = fr.paper_grid()
    assert len(p) == 4 * 3 * 4  # methods (SG, DL, IG, DTD) x attacks x eps 1, 2, 4, 8

    def row(method, attack, eps):
        r = p[(p.method == method) & (p.attack == attack) & (p.eps255 == eps)]
        assert len(r) == 1
        return r.iloc[0]

    assert row("gradient", "topk", 1).topk == 0.06 and row("gradient", "topk", 8).spearman == 0.285
    assert row("gradient", "center", 8).center == 74 and row("gradient", "random", 8).topk == 0.21
    assert row("deeplift", "center", 8).center == 63.5 and row("deeplift", "topk", 2).spearman == 0.46
    assert row("integrated_gradients", "topk", 8).topk == 0.18
    assert row("integrated_gradients", "random", 8).center == 5.5
    assert row("integrated_gradients", "center", 4).spearman == 0.59
    assert row("dtd", "random", 8).topk == 0.755 and row("dtd", "center", 1).center == 35
    assert row("gradient", "center", 8).center_rel == pytest.approx(74 / 227)


def test_paper_grid_matches_every_entry_of_the_paper_notes_table():
    """Parse the F3 table of docs/papers/fragility.md §4 and compare all 144 numbers (the file is in the repo)."""
    names = {"SG": "gradient", "DeepLIFT": "deeplift", "IG": "integrated_gradients", "DTD (appx)": "dtd"}
    p = fr.paper_grid().set_index(["method", "attack", "eps255"])
    seen = 0
    for line in PAPER_NOTES.read_text().splitlines():
        m = re.match(r"\s*\| (SG|DeepLIFT|IG|DTD \(appx\)) \| (top-k|center|random) \| (.+) \| (.+) \| (.+) \|", line)
        if not m:
            continue
        method, attack = names[m.group(1)], m.group(2).replace("top-k", "topk")
        for metric, cell in zip(fr.METRICS, m.groups()[2:]):
            values = [float(v) for v in cell.split("/")]
            for eps, v in zip(fr.PAPER_EPS255, values):
                assert p.loc[(method, attack, float(eps)), metric] == v, (method, attack, eps, metric)
                seen += 1
    assert seen == 144


def test_paper_numbers_of_the_other_claims():
    assert fr.PAPER_NUMBERS["influence_top5_attack_eps8"]["value"] == 2
    assert fr.PAPER_NUMBERS["influence_val_accuracy"]["value"] == 0.975
    assert fr.PAPER_NUMBERS["cifar_test_accuracy"]["value"] == 0.73


def test_role_k_gives_the_papers_k_at_the_papers_sizes():
    assert fr.role_k("imagenet", 227 * 227) == 1000
    assert fr.role_k("cifar", 32 * 32) == 100
    assert fr.role_k("imagenet", 28 * 28) == round(784 * 1000 / 51529) == 15
    assert fr.role_k("cifar", 14 * 14) == 19
    assert fr.role_k("imagenet", 4) == 1  # never 0
    with pytest.raises(ValueError, match="role"):
        fr.role_k("mnist", 784)
    with pytest.raises(ValueError, match="n_pixels"):
        fr.role_k("cifar", 0)


# ------------------------------------------------------------------------------------------------ small helpers


def test_downsample_is_the_mean_of_blocks():
    X = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    out = fr.downsample(X, 2)
    manual = X.reshape(2, 3, 3, 2, 3, 2).mean((3, 5))
    torch.testing.assert_close(out, manual)
    with pytest.raises(ValueError, match="factor"):
        fr.downsample(X, 4)
    with pytest.raises(ValueError, match="X"):
        fr.downsample(X[0], 2)


def test_normalized_applies_mean_and_std_inside():
    inner = torch.nn.Conv2d(3, 2, 1).double()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    model = fr.Normalized(inner, mean, std).double()
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    manual = inner((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(model(x), manual)
    with pytest.raises(ValueError, match="std"):
        fr.Normalized(inner, mean, (0.2, 0.0, 0.3))


def test_select_correct_returns_only_correctly_classified_images(digits_model):
    model, _, _ = digits_model
    data = load_digits(seed=0)
    x, y, acc = fr.select_correct(model, data.X_test, data.y_test, 10, seed=3)
    pred = model(x).argmax(1)
    assert torch.equal(pred, y) and len(x) == 10
    assert acc == pytest.approx(float((model(data.X_test).argmax(1) == data.y_test).float().mean()))
    x2, _, _ = fr.select_correct(model, data.X_test, data.y_test, 10, seed=3)
    assert torch.equal(x, x2)  # seeded
    with pytest.raises(ValueError, match="n must"):
        fr.select_correct(model, data.X_test, data.y_test, 0)


def test_target_box_picks_the_emptiest_corner():
    maps = torch.rand(3, 9, 9, dtype=torch.float64)
    box = fr.target_box(maps, 3)
    corners = [(0, 0), (0, 6), (6, 0), (6, 6)]
    for i in range(3):
        masses = [float(maps[i, r : r + 3, c : c + 3].sum()) for r, c in corners]
        r, c = corners[int(np.argmin(masses))]
        expected = torch.zeros(9, 9, dtype=torch.float64)
        expected[r : r + 3, c : c + 3] = 1
        assert torch.equal(box[i], expected)
    with pytest.raises(ValueError, match="size"):
        fr.target_box(maps, 10)


# ------------------------------------------------------------------------------------------------ best iterate


def test_best_by_metric_matches_a_loop_and_the_attacks_own_best_iterates(digits_model):
    model, x, y = digits_model
    out = TopKAttack(model, "gradient", eps=8 / 255, iters=4, k=6, progress=False)(x, y)
    best = fr.best_by_metric(out.history)
    h = out.history
    for i in range(len(x)):  # slow loop oracle over the label-preserving iterates
        rows = [p for p in range(h["topk"].shape[0]) if bool(h["label_kept"][p, i])]
        assert best["topk"][i] == pytest.approx(min(float(h["topk"][p, i]) for p in rows))
        assert best["spearman"][i] == pytest.approx(min(float(h["spearman"][p, i]) for p in rows))
        assert best["center"][i] == pytest.approx(max(float(h["center"][p, i]) for p in rows))
    # the metric recomputed at the attack's own per-metric best image equals the history's value
    map0 = saliency_map(gradient(model, x, y))
    for metric in fr.METRICS:
        m = saliency_map(gradient(model, out.x_best_by[metric], y))
        value = {"topk": topk_intersection(map0, m, 6), "spearman": spearman(map0, m),
                 "center": center_of_mass_shift(map0, m)}[metric]  # fmt: skip
        torch.testing.assert_close(value.double(), best[metric], atol=1e-5, rtol=0)
    assert torch.equal(best["topk"].float(), out.metrics["topk"].float())  # own criterion = topk here


def test_best_by_metric_skips_label_changing_iterates_and_needs_the_metrics():
    kept = torch.tensor([[True, True], [False, True], [True, False]])
    hist = {"label_kept": kept, "topk": torch.tensor([[1.0, 1.0], [0.1, 0.5], [0.4, 0.2]], dtype=torch.float64),
            "spearman": torch.tensor([[1.0, 1.0], [0.0, 0.9], [0.5, 0.1]], dtype=torch.float64),
            "center": torch.tensor([[0.0, 0.0], [9.0, 2.0], [3.0, 7.0]])}  # fmt: skip
    best = fr.best_by_metric(hist)
    assert best["topk"].tolist() == [0.4, 0.5]
    assert best["spearman"].tolist() == [0.5, 0.9]
    assert best["center"].tolist() == [3.0, 2.0]
    with pytest.raises(ValueError, match="record_metrics"):
        fr.best_by_metric({"label_kept": kept, "topk": hist["topk"]})


# ------------------------------------------------------------------------------------------------ the grid


def _assert_failures_are_no_change(df, min_success: float = 0.5):
    """label_kept holds by construction (a failed attack returns x), so check what it rests on instead: a failed
    attack returned x itself (best iterate 0, maps unchanged, same confidence); a successful top-k / center attack
    moved its map on its own criterion (top-k: ∩ < 1; center: shift > 0) at an iterate > 0; at ε = 0 nothing moves;
    and the attacks did succeed on at least ``min_success`` of the images at ε > 0 (a grid of failures passes every
    other line). Random sign: ``success`` = a label-preserving draw was found (at ε = 0 trivially, x itself)."""

    def unchanged(rows):
        assert (rows.topk == 1).all() and (rows.center == 0).all()
        np.testing.assert_allclose(rows.spearman, 1.0, atol=1e-6)
        np.testing.assert_allclose(rows.conf_adv, rows.conf0, rtol=1e-6)

    unchanged(df[df.eps255 == 0])
    moving = df[df.eps255 > 0]
    failed = moving[~moving.success]
    unchanged(failed)
    assert (failed.best_iter == 0).all() and failed.label_kept.all()  # x itself, correctly classified
    ok = moving[moving.success]
    assert (ok.best_iter > 0).all()
    assert (ok[ok.attack == "topk"].topk < 1).all() and (ok[ok.attack == "center"].center > 0).all()
    attacked = moving[moving.attack.isin(["topk", "center"])]
    assert attacked.success.mean() >= min_success, attacked.success.mean()


def test_grid_shape_and_columns(grid, digits_model):
    df, _ = grid
    _, x, y = digits_model
    assert len(df) == 2 * 3 * 3 * len(x)
    assert list(df.columns) == fr.CELL_COLUMNS
    assert set(df.method) == {"gradient", "deeplift"} and set(df.attack) == set(fr.ATTACKS)
    assert sorted(set(df.eps255)) == [0.0, 4.0, 8.0]
    assert df.groupby(["method", "attack", "eps255"]).size().eq(len(x)).all()
    assert (df.label == np.tile(y.numpy(), 18)).all()
    _assert_failures_are_no_change(df)
    assert df.topk.between(0, 1).all() and (df.center >= 0).all() and df.spearman.between(-1, 1).all()


def test_grid_eps0_is_no_change(grid):
    df, _ = grid
    zero = df[df.eps == 0]
    assert (zero.topk == 1).all() and (zero.topk_best == 1).all()
    np.testing.assert_allclose(zero.spearman, 1, atol=1e-6)
    np.testing.assert_allclose(zero.center, 0, atol=1e-9)
    np.testing.assert_allclose(zero.conf0, zero.conf_adv)


def test_grid_per_metric_best_is_never_worse_than_the_own_criterion_iterate(grid):
    df, _ = grid
    assert (df.topk_best <= df.topk + 1e-9).all()
    assert (df.spearman_best <= df.spearman + 1e-9).all()
    assert (df.center_best >= df.center - 1e-9).all()
    topk = df[df.attack == "topk"]
    center = df[df.attack == "center"]
    np.testing.assert_allclose(topk.topk_best, topk.topk)  # the attack's criterion is that metric
    np.testing.assert_allclose(center.center_best, center.center)


def test_grid_cache_round_trip_is_exact_and_skips_work(grid, digits_model, monkeypatch):
    df, folder = grid
    model, x, y = digits_model
    n_files = len(list(folder.glob("cell-*.json")))
    # eps = 0 is shared by the three attacks: 2 methods x (1 + 3 attacks x 2 eps)
    assert n_files == 2 * (1 + 3 * 2)
    monkeypatch.setattr(fr.grid, "_run_cell", lambda *a, **k: pytest.fail("a cached cell was recomputed"))
    again = fr.run_attack_grid(model, x, y, cache=folder, **GRID_KW)
    pd.testing.assert_frame_equal(again, df)


def test_grid_cache_detects_corruption_and_recomputes(grid, digits_model, tmp_path):
    df, folder = grid
    model, x, y = digits_model
    for f in folder.glob("cell-*.json"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cell = max(tmp_path.glob("cell-*.json"), key=lambda p: p.stat().st_size)
    key = json.loads(cell.read_text())["key"]
    good = fr.load_grid_cell(cell, key)
    payload = json.loads(cell.read_text())
    payload["records"][0]["topk"] = 0.123456  # edited without updating the checksum
    cell.write_text(json.dumps(payload))
    with pytest.raises(fr.GridCacheError, match="checksum"):
        fr.load_grid_cell(cell, key)
    cell.write_text(cell.read_text()[: len(cell.read_text()) // 2])  # truncated
    with pytest.raises(fr.GridCacheError, match="cannot be read"):
        fr.load_grid_cell(cell, key)
    with pytest.warns(UserWarning, match="recomputing"):
        again = fr.run_attack_grid(model, x, y, cache=tmp_path, **GRID_KW)
    pd.testing.assert_frame_equal(again.drop(columns="cell_seconds"), df.drop(columns="cell_seconds"))
    pd.testing.assert_frame_equal(fr.load_grid_cell(cell, key).drop(columns="cell_seconds"),
                                  good.drop(columns="cell_seconds"))  # fmt: skip
    with pytest.raises(fr.GridCacheError, match="key"):
        fr.load_grid_cell(cell, "0" * 24)


def test_grid_cache_is_not_reused_by_other_code(grid, digits_model, monkeypatch, tmp_path):
    """Cells written by other attack/saliency code (another _code_version) are not reused: new cells are written."""
    df, folder = grid
    model, x, y = digits_model
    kw = {**GRID_KW, "methods": ["gradient"], "epsilons": [8 / 255], "attacks": ["topk"]}
    fr.run_attack_grid(model, x, y, cache=tmp_path, **kw)
    assert len(list(tmp_path.glob("cell-*.json"))) == 1
    monkeypatch.setattr(fr.grid, "_code_version", lambda: "another-version")
    fr.run_attack_grid(model, x, y, cache=tmp_path, **kw)
    assert len(list(tmp_path.glob("cell-*.json"))) == 2


def test_grid_cache_key_depends_on_settings_weights_and_images(digits_model):
    model, x, y = digits_model
    base = {"iters": 3, "eps": 8 / 255}
    k0 = fr.grid_cache_key(model, x, y, base)
    assert fr.grid_cache_key(model, x, y, dict(base)) == k0
    assert fr.grid_cache_key(model, x, y, {**base, "iters": 4}) != k0
    assert fr.grid_cache_key(model, x, y, {**base, "eps": 8 / 255 + 1e-12}) != k0
    assert fr.grid_cache_key(model, x[:3], y[:3], base) != k0
    other = SmallCNN(1, 10, width=4)
    assert fr.grid_cache_key(other, x, y, base) != k0
    assert fr.grid_cache_key(model, x, y, {**base, "kw": {"baseline": torch.zeros(1)}}) != fr.grid_cache_key(
        model, x, y, {**base, "kw": {"baseline": torch.ones(1)}})


def test_grid_runs_dtd_and_lrp(digits_model):
    model, x, y = digits_model
    df = fr.run_attack_grid(model, x, y, k=6, methods=["dtd", "lrp"], attacks=["topk", "random"], epsilons=[8 / 255],
                            iters=3, cache=False)  # fmt: skip
    assert set(df.method) == {"dtd", "lrp"} and len(df) == 2 * 2 * len(x)
    _assert_failures_are_no_change(df, min_success=0.1)  # 3 iterations: 1 of 8 measured
    assert df.topk.between(0, 1).all()
    assert fr.METHODS[-1] == "dtd" and "lrp" in fr.GRID_METHODS  # the paper's 4th column; LRP-ε on request


def test_grid_rejects_bad_arguments(digits_model):
    model, x, y = digits_model
    kw = dict(k=6, iters=2, cache=False)
    with pytest.raises(ValueError, match="methods"):
        fr.run_attack_grid(model, x, y, methods=["saliency_v2"], **kw)
    with pytest.raises(ValueError, match="methods"):
        fr.run_attack_grid(model, x, y, methods="gradient", **kw)
    with pytest.raises(ValueError, match="attacks"):
        fr.run_attack_grid(model, x, y, attacks=["fgsm"], **kw)
    with pytest.raises(ValueError, match="epsilons"):
        fr.run_attack_grid(model, x, y, epsilons=[-1 / 255], **kw)
    with pytest.raises(ValueError, match="epsilons"):
        fr.run_attack_grid(model, x, y, epsilons=8 / 255, **kw)
    with pytest.raises(ValueError, match="k must"):
        fr.run_attack_grid(model, x, y, k=0, iters=2, cache=False)
    with pytest.raises(ValueError, match="iters"):
        fr.run_attack_grid(model, x, y, k=6, iters=0, cache=False)
    with pytest.raises(ValueError, match="step"):
        fr.run_attack_grid(model, x, y, step=0, **kw)
    with pytest.raises(ValueError, match="y must"):
        fr.run_attack_grid(model, x, y[:2], **kw)
    with pytest.raises(ValueError, match="x must"):
        fr.run_attack_grid(model, x[0], y, **kw)
    with pytest.raises(ValueError, match="method_kwargs"):
        fr.run_attack_grid(model, x, y, method_kwargs={"ig2": {}}, **kw)
    with pytest.raises(TypeError, match="model"):
        fr.run_attack_grid("net", x, y, **kw)


# ------------------------------------------------------------------------------------------------ summaries


def test_summarize_grid_matches_a_manual_average(grid):
    df, _ = grid
    s = fr.summarize_grid(df)
    for (method, attack, eps), rows in df.groupby(["method", "attack", "eps255"]):
        r = s[(s.method == method) & (s.attack == attack) & (s.eps255 == eps)].iloc[0]
        assert r.topk == pytest.approx(sum(rows.topk) / len(rows))
        assert r.spearman == pytest.approx(sum(rows.spearman) / len(rows))
        assert r.center_rel == pytest.approx(sum(rows.center / rows.map_w) / len(rows))
        assert r.n_failed == sum((not s_) and e > 0 for s_, e in zip(rows.success, rows.eps))
        assert r.n_images == len(rows)
    pm = fr.summarize_grid(df, selection="per_metric")
    assert (pm.topk <= s.topk + 1e-12).all() and (pm.center >= s.center - 1e-12).all()
    with pytest.raises(ValueError, match="selection"):
        fr.summarize_grid(df, selection="best")
    with pytest.raises(ValueError, match="df lacks"):
        fr.summarize_grid(df.drop(columns="topk_best"))


def test_summarize_grid_counts_failures_as_no_change():
    rows = []
    for i, (ok, topk) in enumerate([(True, 0.2), (False, 1.0), (False, 1.0)]):
        rows.append({c: 0 for c in fr.CELL_COLUMNS} | {
            "method": "gradient", "attack": "topk", "eps": 8 / 255, "eps255": 8.0, "image": i, "map_h": 10,
            "map_w": 10, "k": 5, "topk": topk, "spearman": 1.0 if not ok else 0.5, "center": 0.0,
            "success": ok, "label_kept": True})  # fmt: skip
    s = fr.summarize_grid(pd.DataFrame(rows))
    assert s.n_failed.iloc[0] == 2 and s.topk.iloc[0] == pytest.approx((0.2 + 1 + 1) / 3)


def test_grid_table_puts_the_paper_next_to_ours():
    ours = fr.paper_grid(["gradient", "deeplift", "integrated_gradients"]).assign(
        n_images=1, n_failed=0, label_kept=1.0, k=1000, side=227)
    table = fr.grid_table(ours, paper=True)
    sub = table.dropna(subset=["paper_topk"])
    assert len(sub) == len(ours)
    np.testing.assert_allclose(sub.topk, sub.paper_topk)
    np.testing.assert_allclose(sub.center, sub.paper_center)


def _verdict(claim):
    from flipfrag import report

    if claim["kind"] == "numeric":
        return report.numeric_verdict(claim["paper_value"], claim["ours"], tolerance=claim["tolerance"],
                                      reference=claim["reference"])  # fmt: skip
    return report.qualitative_verdict(claim["conditions"])


def test_grid_claims_reproduce_when_fed_the_papers_own_numbers():
    """The claims machinery compares the right fields: the paper's values against themselves all 'reproduce'."""
    p = fr.paper_grid(["gradient", "deeplift", "integrated_gradients"])
    p = pd.concat([p, p[p.eps255 == 1].assign(eps255=0.0, topk=1.0, spearman=1.0, center=0.0, center_rel=0.0)])
    p = p.assign(label_kept=1.0, conf0=0.9, conf_adv=0.9, n_images=512, n_failed=0)
    claims = fr.grid_claims(p, deviation="none")
    ids = {c["claim_id"].split("/")[1].split("_")[0] for c in claims}
    assert {"claim1", "claim1b", "claim2", "claim2b", "claim3", "claim3b", "claim3c", "claim4", "claim5",
            "claim6"} <= ids  # fmt: skip
    for c in claims:
        assert _verdict(c) in ("reproduced", "holds"), c
        assert c["deviation"] == "none"
    shape = next(c for c in claims if c["claim_id"].endswith("claim5_shape"))
    assert shape["ours"] == shape["paper_value"] and "IG most robust on ∩ at ε = 8: holds" in shape["ours"]
    # a grid whose top-k attack does no better than random noise is "not reproduced" on it
    flat = p.copy()
    for m in set(flat.method):
        for e in set(flat.eps255):
            rnd = flat[(flat.method == m) & (flat.attack == "random") & (flat.eps255 == e)].topk.iloc[0]
            flat.loc[(flat.method == m) & (flat.attack == "topk") & (flat.eps255 == e), "topk"] = rnd
    claim2 = next(c for c in fr.grid_claims(flat, deviation="") if c["claim_id"].endswith("claim2_topk_eps8"))
    assert _verdict(claim2) == "not reproduced"
    # the center attack moving the center only twice as far as noise fails claim 3c (the paper: x4-15)
    weak = p.copy()
    weak.loc[weak.attack == "center", "center_rel"] = 2 * weak.loc[weak.attack == "random", "center_rel"].to_numpy()
    c3c = next(c for c in fr.grid_claims(weak, deviation="") if "claim3c" in c["claim_id"])
    assert _verdict(c3c) == "does not hold"


def test_claim9_dtd_on_the_papers_own_numbers():
    p = fr.paper_grid().assign(label_kept=1.0, conf0=0.9, conf_adv=0.9, n_images=512, n_failed=0)
    (c9,) = [c for c in fr.grid_claims(p, deviation="none") if c["claim_id"].endswith("claim9_dtd")]
    # the paper's F3 at eps 8: DTD random ∩ 0.755, ρ 0.865; top-k ∩ 0.175 (SG 0.21 / DL 0.22 / IG 0.26 under noise)
    assert c9["kind"] == "numeric" and c9["ours"] == {"random ∩": 0.755, "random ρ": 0.865, "top-k ∩": 0.175}
    assert c9["note"].startswith("∩ at ε = 8 of the other methods: random SG 0.21 / DL 0.22 / IG 0.26")
    assert _verdict(c9) == "reproduced"
    assert not [c for c in fr.grid_claims(p[p.method != "dtd"], deviation="") if "claim9" in c["claim_id"]]


def test_shape_stats_on_the_paper_and_dimension_claim():
    st = fr.shape_stats(fr.paper_grid())
    assert st["ig_most_robust"] and st["max_gap"] == pytest.approx(0.045) and 0.9 < st["frac_by_eps2"] <= 1
    large = fr.paper_grid(["gradient", "deeplift", "integrated_gradients"])
    small = large.assign(topk=lambda d: (d.topk + 0.1).clip(upper=0.99), spearman=lambda d: d.spearman + 0.05)
    claim = fr.dimension_claim(small, large, deviation="d", small_name="A", large_name="B")
    assert _verdict(claim) == "holds" and claim["ours"].startswith("mean over SG/DL/IG and attacks at ε = 8: A ρ")
    reverse = fr.dimension_claim(large, small, deviation="d")
    assert _verdict(reverse) == "does not hold"
    assert [k for k, v in reverse["conditions"].items() if not v] == [next(iter(reverse["conditions"]))]
    assert fr.attacks_beat_random(large)
    assert not fr.attacks_beat_random(large.assign(topk=0.5))


# ------------------------------------------------------------------------------------------------ settings


def test_imagenet_paper_path_with_a_stand_in_model_and_folder(tmp_path):
    """The paper profile's SqueezeNet path, offline: a randomly initialised SqueezeNet 1.0 and a folder of 227x227
    images labelled with that network's own predictions (the real path downloads weights and reads IMAGENET_DIR)."""
    from PIL import Image

    from flipfrag.models import squeezenet1_0

    torch.manual_seed(0)
    net = squeezenet1_0(pretrained=False)
    gen = torch.Generator().manual_seed(0)
    imgs = (torch.rand(3, 3, 227, 227, generator=gen) * 255).round().to(torch.uint8)
    wrapped = fr.Normalized(net, fr.IMAGENET_MEAN, fr.IMAGENET_STD).eval()
    with torch.no_grad():
        labels = wrapped(imgs.float() / 255).argmax(1)
    for i in range(3):
        Image.fromarray(imgs[i].permute(1, 2, 0).numpy()).save(tmp_path / f"img{i}_{int(labels[i])}.png")
    st = fr.imagenet_paper_setting(2, seed=0, model=net, folder=str(tmp_path))
    assert st.role == "imagenet" and st.x.shape == (2, 3, 227, 227) and st.k == 1000
    assert st.baseline.shape == (3, 1, 1) and st.test_accuracy == 1.0
    with torch.no_grad():
        assert torch.equal(st.model(st.x).argmax(1), st.y)
    kw = st.method_kwargs(7)
    assert kw["integrated_gradients"]["steps"] == 7 and kw["deeplift"]["baseline"] is st.baseline
    # DTD through the normalising wrapper (box bounds mapped to the first conv's input space) and SqueezeNet's fire
    # modules (concatenation), with ReLU scores >= 0: relevance has the score's sign
    from flipfrag.saliency import dtd

    attr = dtd(st.model, st.x[:1], st.y[:1])
    with torch.no_grad():
        score = st.model(st.x[:1])[0, st.y[0]]
    assert attr.shape == st.x[:1].shape and torch.isfinite(attr).all()
    assert score > 0 and (attr >= -1e-6 * attr.abs().max()).all() and attr.sum() > 0


def test_cifar_paper_path_with_stand_in_data():
    """The paper profile's CIFAR-10 path (the pretrained CNN, correct test images, k = 100, per-pixel mean
    reference) on a stand-in for the downloaded CIFAR-10: the 20 shipped test photos and random "training" images."""
    from flipfrag.datasets import load_cifar10

    photos = load_cifar10()
    X_train = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    data = Dataset("cifar-stand-in", X_train, torch.zeros(64, dtype=torch.long), photos.X_test, photos.y_test,
                   photos.class_names, source="test")  # fmt: skip
    st = fr.cifar_paper_setting(get_profile("smoke", grid_n_images=3), seed=0, data=data)
    assert st.role == "cifar" and st.k == 100 and st.x.shape == (3, 3, 32, 32) and st.model_name == "cifar10-cnn"
    torch.testing.assert_close(st.baseline, X_train.mean(0))
    with torch.no_grad():
        assert torch.equal(st.model(st.x).argmax(1), st.y)
    empty = Dataset("none", X_train[:0], torch.zeros(0, dtype=torch.long), photos.X_test, photos.y_test, ["a", "b"])
    with pytest.raises(ValueError, match="data"):
        fr.cifar_paper_setting(get_profile("smoke"), data=empty)


def test_offline_settings_use_the_pretrained_cnns_on_real_photos():
    prof = get_profile("smoke")
    cifar = fr.image_setting("cifar", prof, n=20)
    assert cifar.k == 100 and cifar.model_name == "cifar10-cnn"  # the paper's k = 100 of 1,024
    assert len(cifar.x) == 20 and cifar.test_accuracy == 1.0  # all 20 CIFAR-10 photos are classified correctly
    assert all(n.startswith("cifar10_") for n in cifar.image_names)
    torch.testing.assert_close(cifar.baseline.flatten(), torch.tensor(fr.CIFAR10_MEAN))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in cifar.model.modules())  # folded, for DTD
    with pytest.raises(ValueError, match="efficientnet_setting"):
        fr.cifar10_setting("imagenet", prof, n=2)
    # the ImageNet role: EfficientNet-Lite0 on the correctly classified ImageNet photos, true labels, the paper's k
    small = fr.image_setting("imagenet", prof, n=1)  # smoke: the photos at 64x64, k at the same fraction
    assert small.x.shape[1:] == (3, 64, 64) and small.k == round(1000 * 64**2 / 224**2) == 82
    prof = get_profile("quick")
    assert fr.image_setting("imagenet", prof).x.shape[0] == prof["imagenet_grid"]["n_images"]  # the grid's photos
    imnet = fr.efficientnet_setting(prof, n=None)  # every correctly classified photo
    assert imnet.model_name == "efficientnet-lite0" and imnet.k == 1000 and imnet.x.shape[1:] == (3, 224, 224)
    assert len(imnet.x) == 18 and imnet.test_accuracy == pytest.approx(0.9)  # 18 of the 20 shipped photos
    assert all(n.startswith("imagenet_") for n in imnet.image_names)
    truth = {n: int(n.rsplit("_", 1)[1].split(".")[0]) for n in imnet.image_names}
    assert imnet.y.tolist() == [truth[n] for n in imnet.image_names]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in imnet.model.modules())
    held = fr.efficientnet_setting(prof, n=None, photos="held_out")
    assert len(held.x) == 7 and not set(held.image_names) & set(imnet.image_names)
    with torch.no_grad():
        assert torch.equal(held.model(held.x).argmax(1), held.y)  # no label: the model's own prediction
    with pytest.raises(ValueError, match="photos"):
        fr.efficientnet_setting(prof, n=1, photos="cifar")


def test_grid_sizes_of_the_imagenet_role_and_setting_subset():
    quick = get_profile("quick")
    im, cifar = fr.grid_sizes("imagenet", quick), fr.grid_sizes("cifar", quick)
    assert im["beta"] == quick["imagenet_grid"]["beta"] and im["iters"] == quick["imagenet_grid"]["iters"]
    assert cifar["iters"] == quick["grid_iters"] and cifar["beta"] == quick["softplus_beta"]
    assert fr.grid_sizes("imagenet", get_profile("paper"))["iters"] == 300  # SqueezeNet: the shared paper sizes
    # F4's photos: the role's own count where given, else the grid's photos
    assert im["targeted_n_images"] == quick["imagenet_grid"]["targeted_n_images"]
    more = fr.grid_sizes("imagenet", {**quick, "imagenet_grid": {**quick["imagenet_grid"], "n_images": 3}})
    assert more["n_images"] == 3 and more["targeted_n_images"] == quick["imagenet_grid"]["targeted_n_images"] < 3
    assert cifar["targeted_n_images"] == cifar["n_images"] == quick["grid_n_images"]
    smoke_im = fr.grid_sizes("imagenet", get_profile("smoke"))
    assert smoke_im["targeted_n_images"] == smoke_im["n_images"] == get_profile("smoke")["imagenet_grid"]["n_images"]
    with pytest.raises(ValueError, match="imagenet_grid"):
        fr.grid_sizes("imagenet", {**quick, "imagenet_grid": {"iterations": 3}})
    st = fr.ImageSetting("cifar", torch.nn.Identity(), torch.rand(3, 1, 4, 4), torch.arange(3), torch.zeros(1), 2,
                         [], 1.0, "toy", image_names=["a", "b", "c"])  # fmt: skip
    sub = st.subset([2, 0])
    assert torch.equal(sub.x, st.x[[2, 0]]) and sub.y.tolist() == [2, 0] and sub.image_names == ["c", "a"]
    with pytest.raises(ValueError, match="idx"):
        st.subset([3])


def test_choose_beta_takes_the_smoothest_faithful_surrogate():
    import pandas as pd

    fid = pd.DataFrame({"beta": [1.0, 3.0, 10.0, 30.0], "grad_cos": [0.0, 0.2, 0.6, 0.9],
                        "spearman": [0.1, 0.6, 0.55, 0.8], "topk": [0.0, 0.1, 0.3, 0.6]})  # fmt: skip
    assert fr.choose_beta(fid) == 10.0  # 3.0 has rho >= 0.5 but its gradient points elsewhere
    assert fr.choose_beta(fid, {"grad_cos": 0.0, "spearman": 0.0}) == 1.0
    with pytest.warns(UserWarning, match="no beta"):
        assert fr.choose_beta(fid, {"grad_cos": 0.95}) == 30.0
    with pytest.raises(ValueError, match="fidelity"):
        fr.choose_beta(fid.drop(columns="grad_cos"))


def test_image_setting_and_prepare_setting_check_their_arguments(digits_model):
    model, _, _ = digits_model
    with pytest.raises(ValueError, match="role"):
        fr.image_setting("mnist", get_profile("smoke"))
    X = torch.rand(4, 1, 8, 8) * 2
    with pytest.raises(ValueError, match="X_test"):
        fr.prepare_setting("cifar", model, X, torch.zeros(4, dtype=torch.long), n=2, baseline=torch.zeros(1),
                           class_names=[], description="", substitution=None)  # fmt: skip
    with pytest.raises(ValueError, match="kind"):
        fr.substitution_text("audio", get_profile("quick"))
    assert "MNIST" in fr.substitution_text("image", get_profile("quick"))
    assert fr.substitution_text("toy", get_profile("quick")) is None


def test_attack_examples_targeted_needs_a_mask(digits_model):
    model, x, y = digits_model
    st = fr.ImageSetting("imagenet", model, x, y, torch.zeros(1, 1, 1), 6, [], 1.0, "digits")
    prof = get_profile("smoke")
    with pytest.raises(ValueError, match="mask"):
        fr.attack_examples(st, prof, attack="targeted")
    with pytest.raises(ValueError, match="attack must"):
        fr.attack_examples(st, prof, attack="shuffle")
    mask = fr.target_box(saliency_map(gradient(model, x, y)), 3)
    out = fr.attack_examples(st, prof, attack="targeted", mask=mask, methods=["gradient"], n=2)
    res = out["gradient"]
    assert res.x_adv.shape == x[:2].shape and res.label_kept.all()
    assert (res.x_adv - x[:2]).abs().max() <= 8 / 255 + 1e-6
    assert (res.metrics["target"] >= (res.saliency * mask[:2]).sum((1, 2)) - 1e-6).all()  # never worse than x


def test_surrogate_fidelity_approaches_one_as_beta_grows(digits_model):
    model, x, y = digits_model
    fid = fr.surrogate_fidelity(model, x, y, [1.0, 1000.0], k=6)
    assert list(fid.beta) == [1.0, 1000.0]
    assert fid.topk.iloc[1] == pytest.approx(1.0) and fid.spearman.iloc[1] > 0.99  # softplus(1000) ~ ReLU
    assert fid.spearman.iloc[0] < fid.spearman.iloc[1]


# ------------------------------------------------------------------------------------------------ influence


@pytest.fixture(scope="module")
def influence_standin():
    """The paper path of influence_setting with stand-ins: two digit classes and a random CNN's features."""
    data = load_digits(seed=0)
    keep_tr, keep_te = data.y_train < 2, data.y_test < 2
    two = Dataset("digits01", data.X_train[keep_tr][:80], data.y_train[keep_tr][:80], data.X_test[keep_te][:12],
                  data.y_test[keep_te][:12], ["0", "1"])  # fmt: skip
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))  # a random projection of pixels
    prof = get_profile("paper")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fr.influence_setting(prof, seed=0, data=two, extractor=extractor, l2=1e-2)


def test_influence_setting_paper_path_with_stand_ins(influence_standin):
    st = influence_standin
    assert st.influence.n_train == 80 and st.meta["d"] == 16
    assert st.test_accuracy > 0.9  # 0 vs 1 stays linearly separable after a random projection
    assert st.substitution is None and "Inception" in st.description


def test_influence_curves_eps0_is_no_change_and_rows_are_complete(influence_standin):
    curves = fr.influence_curves(influence_standin, [0.0, 8 / 255], n_images=5, seed=0)
    assert len(curves) == 2 * 2 * 5
    zero = curves[curves.eps == 0]
    np.testing.assert_allclose(zero.spearman, 1.0)
    assert (zero.top5 == 5).all() and zero.label_kept.all()
    s = fr.summarize_influence(curves)
    assert set(s.kind) == {"attack", "random"} and (s.n == 5).all()
    r = s[(s.kind == "attack") & (s.eps255 == 8)].iloc[0]
    manual = curves[(curves.kind == "attack") & (curves.eps255 == 8)]
    assert r.spearman == pytest.approx(manual.spearman.mean())
    assert r.top5_se == pytest.approx(manual.top5.std() / math.sqrt(5))
    assert r.paper_top5 == 2 and r.paper_spearman == 0
    with pytest.raises(ValueError, match="n_images"):
        fr.influence_curves(influence_standin, [0.0], n_images=0)
    with pytest.raises(ValueError, match="epsilons"):
        fr.influence_curves(influence_standin, [-0.1])


def test_median_example_picks_the_median_label_kept_image():
    df = pd.DataFrame({"kind": "attack", "eps255": 8.0, "image": [0, 1, 2, 3, 4],
                       "spearman": [0.9, 0.1, 0.5, 0.3, -0.2], "label_kept": [True, True, True, False, True]})
    assert fr.median_example(df) == 1  # kept rho: -0.2, 0.1, 0.5, 0.9 -> lower median 0.1 (image 1)
    with pytest.raises(ValueError, match="label-kept"):
        fr.median_example(df, eps255=4)


def test_inception_features_are_the_input_of_fc_at_minus_one_one_scale():
    from flipfrag.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(pretrained=False)
    feat = fr.InceptionFeatures(net, size=80)
    x = torch.rand(2, 3, 80, 80)
    with torch.no_grad():
        f = feat(x)
        logits = net(x * 2 - 1)
    assert f.shape == (2, 2048)
    torch.testing.assert_close(f @ net.fc.weight.T + net.fc.bias, logits)  # f feeds Inception's classifier
    assert isinstance(net.fc, torch.nn.Linear)  # the given network is not modified


def test_cnn_features_are_the_gap_of_the_conv_blocks(digits_model):
    model, x, _ = digits_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = fr.CNNFeatures(model)(x)
    with torch.no_grad():
        maps = model.features(x)
    manual = torch.tensor([[float(maps[i, c].mean()) for c in range(maps.shape[1])] for i in range(len(x))])
    torch.testing.assert_close(f.detach(), manual)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="cnn"):
        fr.CNNFeatures(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------------ geometry


def test_toy_rotation_is_zero_for_a_linear_model_and_moves_along_the_level_set():
    from flipfrag.models import MLP

    torch.manual_seed(0)
    X = torch.randn(20, 2, dtype=torch.float64)
    linear = MLP(2, [], 2).double().eval()
    rot = fr.toy_rotation(linear, X, 0.1)
    np.testing.assert_allclose(rot.angle, 0, atol=1e-4)
    mlp = MLP(2, [16], 2, activation="softplus").double().eval()
    rot = fr.toy_rotation(mlp, X, 0.1)
    Xg = X.clone().requires_grad_(True)
    out = mlp(Xg)
    s = out.gather(1, out.argmax(1, keepdim=True)).sum()
    (g,) = torch.autograd.grad(s, Xg)
    dots = rot.dx * g[:, 0].numpy() + rot.dy * g[:, 1].numpy()
    np.testing.assert_allclose(dots, 0, atol=1e-10)  # orthogonal to the score gradient
    np.testing.assert_allclose(np.hypot(rot.dx, rot.dy), 0.1)
    assert (rot.angle > 0).any()
    with pytest.raises(ValueError, match="radius"):
        fr.toy_rotation(mlp, X, 0.0)


def test_geometry_comparison_first_order_term_matches_autograd(digits_model):
    from flipfrag.smooth import softplus_surrogate

    model, x, y = digits_model
    df, x_adv = fr.geometry_comparison(model, x, y, eps=8 / 255, iters=3, k=6)
    assert len(df) == 2 * len(x) and set(df.kind) == {"attack", "random"}
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    smooth = softplus_surrogate(model, 1.0)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(smooth(xg).gather(1, y[:, None]).sum(), xg)
    attack = df[df.kind == "attack"].sort_values("image")
    np.testing.assert_allclose(attack.first_order, ((x_adv - x) * g).flatten(1).sum(1).numpy(), rtol=1e-4,
                               atol=1e-7)  # fmt: skip
    assert (df.abs_cos if "abs_cos" in df else df.cos_grad.abs()).le(1 + 1e-9).all()


def test_grid_spec_is_one_validated_object_with_per_method_iterations(digits_model, tmp_path):
    model, x, y = digits_model
    spec = fr.GridSpec(k=5, methods=["gradient", "deeplift"], attacks=["topk"], epsilons=[8 / 255], iters=6,
                       method_iters={"deeplift": 2})  # fmt: skip
    assert spec.methods == ("gradient", "deeplift")
    assert spec.iters_for("deeplift") == 2 and spec.iters_for("gradient") == 6
    df = fr.run_attack_grid(model, x, y, spec, cache=tmp_path)
    assert (df[df.method == "deeplift"].best_iter <= 2).all() and (df[df.method == "gradient"].best_iter <= 6).all()
    # the same spec given as keywords is the same grid (and the same cache cells)
    again = fr.run_attack_grid(model, x, y, cache=tmp_path, k=5, methods=["gradient", "deeplift"], attacks=["topk"],
                               epsilons=[8 / 255], iters=6, method_iters={"deeplift": 2})  # fmt: skip
    pd.testing.assert_frame_equal(df, again)
    # a changed iteration count is another cell
    assert spec.cell_settings("deeplift", "topk", 8 / 255) != fr.GridSpec(
        k=5, methods=["deeplift"], iters=6).cell_settings("deeplift", "topk", 8 / 255)
    assert spec.cell_settings("deeplift", "topk", 0.0) == spec.cell_settings("deeplift", "center", 0.0)
    with pytest.raises(TypeError, match="either spec"):
        fr.run_attack_grid(model, x, y, spec, k=3)
    with pytest.raises(ValueError, match="method_iters"):
        fr.GridSpec(k=5, method_iters={"gradient": 0})
    with pytest.raises(ValueError, match="method_iters: unknown"):
        fr.GridSpec(k=5, method_iters={"sg2": 3})
    with pytest.raises(ValueError, match="beta"):
        fr.GridSpec(k=5, beta=0)
    with pytest.raises(ValueError, match="k must be"):
        fr.run_attack_grid(model, x, y, fr.GridSpec(k=10_000))


@pytest.mark.slow
def test_grid_is_identical_serially_and_on_a_local_dask_cluster(digits_model, tmp_path):
    """The grid's cells as flipfrag.engine tasks: a LocalCluster of 2 worker processes gives the serial numbers, and
    its cells land in the same checksummed cache (a rerun computes nothing)."""
    from flipfrag import engine

    model, x, y = digits_model
    spec = fr.GridSpec(k=5, methods=["gradient", "deeplift"], attacks=["topk", "random"], epsilons=[0, 8 / 255],
                       iters=3)  # fmt: skip
    serial = fr.run_attack_grid(model, x, y, spec, cache=False, scheduler="serial")
    try:
        dist = fr.run_attack_grid(model, x, y, spec, cache=tmp_path, scheduler="local:2")
    finally:
        engine.close_clusters()
    cols = [c for c in fr.CELL_COLUMNS if c != "cell_seconds"]
    pd.testing.assert_frame_equal(serial[cols], dist[cols])
    assert len(list(tmp_path.glob("cell-*.json"))) == 6  # 2 methods x (topk, random) at 8/255 + one shared eps = 0
    again = fr.run_attack_grid(model, x, y, spec, cache=tmp_path, scheduler="tcp://127.0.0.1:1")  # never contacted
    pd.testing.assert_frame_equal(dist, again)
