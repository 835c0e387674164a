"""Every claim rule of paper 2 and of the beyond studies can fail: fed "no effect at all" (the attacks and the noise
leave every map unchanged) or a broken attack (every attack fails and returns x), no rule may say "reproduced",
"partly" or "holds". Fed the paper's own numbers, the paper-2 rules must say "reproduced" / "holds" (so the tests
above do not pass merely because a rule can never pass)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flipfrag import fragility, report
from flipfrag.beyond import claims as beyond_claims
from flipfrag.fragility import claims as fclaims
from flipfrag.fragility.exemplars import influence_claims

FAILING = ("not reproduced", "does not hold")
METHODS = ("gradient", "deeplift", "integrated_gradients", "dtd")


def verdict(c: dict[str, Any]) -> str:
    """The verdict report.record_claim would store for a claim dict of the rule functions."""
    if c["kind"] == "numeric":
        return report.numeric_verdict(c["paper_value"], c["ours"], tolerance=c["tolerance"], reference=c["reference"])
    if c["kind"] == "qualitative":
        return report.qualitative_verdict(c["conditions"])
    return report.MEASURED_VERDICT


def _summary(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col, default in (("n_images", 10), ("n_failed", 0), ("label_kept", 1.0), ("conf0", 0.9), ("conf_adv", 0.9),
                         ("k", 100), ("side", 32)):  # fmt: skip
        if col not in df:
            df[col] = default
    return df


def no_effect_summary(*, broken: bool = False) -> pd.DataFrame:
    """Nothing moves: ∩ = ρ = 1, no center shift, for every method, attack and ε. ``broken``: moreover every attack
    failed (x returned unchanged, so its label is trivially kept)."""
    rows = []
    for m in METHODS:
        for a in ("topk", "center", "random"):
            for e in (0.0, 1.0, 2.0, 4.0, 8.0):
                failed = 10 if (broken and e > 0 and a != "random") else 0
                rows.append({"method": m, "attack": a, "eps255": e, "topk": 1.0, "spearman": 1.0, "center": 0.0,
                             "center_rel": 0.0, "n_failed": failed})  # fmt: skip
    return _summary(rows)


def attacks_like_random_summary() -> pd.DataFrame:
    """Random noise has the paper's effect; the attacks do no better than it (a broken objective, a wrong sign)."""
    pg = fragility.paper_grid()
    rnd = pg[pg.attack == "random"]
    rows = []
    for _, r in rnd.iterrows():
        for a in ("topk", "center", "random"):
            rows.append({**r.to_dict(), "attack": a})
    for m in METHODS:
        for a in ("topk", "center", "random"):
            rows.append({"method": m, "attack": a, "eps255": 0.0, "topk": 1.0, "spearman": 1.0, "center": 0.0,
                         "center_rel": 0.0})  # fmt: skip
    return _summary(rows)


def paper_summary() -> pd.DataFrame:
    """The paper's F3 as if it were our grid (every attack succeeded, every label kept)."""
    pg = fragility.paper_grid()
    zero = [{"method": m, "attack": a, "eps255": 0.0, "topk": 1.0, "spearman": 1.0, "center": 0.0, "center_rel": 0.0}
            for m in METHODS for a in ("topk", "center", "random")]  # fmt: skip
    return _summary([*pg.to_dict("records"), *zero])


def no_effect_summary_broken() -> pd.DataFrame:
    return no_effect_summary(broken=True)


@pytest.mark.parametrize("make", [no_effect_summary, no_effect_summary_broken,
                                  attacks_like_random_summary], ids=["no_effect", "broken_attack", "like_random"])
def test_grid_claims_fail_without_an_effect(make):
    claims = fclaims.grid_claims(make(), deviation="test")
    ids = {c["claim_id"].split("/")[1] for c in claims}
    assert {"claim1_random_topk_eps8", "claim2_topk_eps8", "claim3c_center_vs_random", "claim5_shape",
            "claim6_label_kept", "claim9_dtd"} <= ids  # fmt: skip
    got = {c["claim_id"]: verdict(c) for c in claims}
    if make is not no_effect_summary_broken:
        # claim 6 is about labels: images perturbed (n_failed = 0) with their labels kept do reproduce it; the broken
        # attack (every attack returned x) must not
        got.pop("fragility/claim6_label_kept")
    if make is attacks_like_random_summary:
        # random noise has the paper's effect here: only the claims about the attacks must fail
        got = {cid: v for cid, v in got.items() if "random" not in cid}
    bad = {cid: v for cid, v in got.items() if v not in FAILING}
    assert not bad, bad


def test_grid_claims_reproduce_the_papers_own_numbers():
    got = {c["claim_id"].split("/")[1]: verdict(c) for c in fclaims.grid_claims(paper_summary(), deviation="test")}
    assert set(got.values()) <= {"reproduced", "holds"}, got
    assert len(got) == 11


def test_label_kept_counts_failed_attacks_as_not_kept():
    """A broken attack returns x (label trivially kept): the rate is the share of images perturbed with the label
    kept, so 3 failures of 10 per cell give 0.7, and all failures give 0 -> not reproduced."""
    s = paper_summary()
    s.loc[(s.eps255 > 0) & s.attack.isin(["topk", "center"]), "n_failed"] = 3
    c = fclaims.label_kept_claim(s, deviation="")
    assert c["ours"] == pytest.approx(0.7) and verdict(c) == "partly"
    s.loc[(s.eps255 > 0) & s.attack.isin(["topk", "center"]), "label_kept"] = 0.9  # and one image lost its label
    assert fclaims.label_kept_claim(s, deviation="")["ours"] == pytest.approx(0.6)
    assert verdict(fclaims.label_kept_claim(no_effect_summary(broken=True), deviation="")) == "not reproduced"
    assert verdict(fclaims.label_kept_claim(paper_summary(), deviation="")) == "reproduced"


def test_claim5_texts_agree_on_the_papers_gap():
    c = next(c for c in fclaims.grid_claims(paper_summary(), deviation="") if c["claim_id"].endswith("claim5_shape"))
    gap = fclaims.shape_stats(fragility.paper_grid())["max_gap"]
    assert gap == pytest.approx(0.045)
    assert f"= {gap:.3f}" in c["paper_value"] and any(f"(paper: {gap:.3f})" in k for k in c["conditions"])


def test_claim9_dtd_is_numeric_and_misses_on_wrong_numbers():
    s = paper_summary()
    c = next(c for c in fclaims.grid_claims(s, deviation="") if c["claim_id"].endswith("claim9_dtd"))
    assert c["kind"] == "numeric" and verdict(c) == "reproduced"
    s.loc[(s.method == "dtd") & (s.attack == "random") & (s.eps255 == 8), "spearman"] = 0.97  # ρ 0.97, not 0.865
    c = next(c for c in fclaims.grid_claims(s, deviation="") if c["claim_id"].endswith("claim9_dtd"))
    assert verdict(c) == "not reproduced"  # 0.97 is within 0.05 of no effect (1)


def test_dimension_claim_fails_without_an_effect_and_names_its_inputs():
    flat = no_effect_summary()
    c = fclaims.dimension_claim(flat, flat, deviation="", claim_id="claim7b_dimension_mnist", small_name="MNIST 14x14",
                                large_name="MNIST 28x28")  # fmt: skip
    assert verdict(c) == "does not hold"
    assert "MNIST 14x14" in c["claim"] and "CIFAR-10 (smaller" not in c["claim"]
    c7 = fclaims.dimension_claim(flat, fragility.paper_grid(), deviation="")
    assert verdict(c7) == "does not hold" and c7["claim"].startswith("CIFAR-10")


def _influence_summary(top5: float, rho8: float, rho10: float) -> pd.DataFrame:
    return pd.DataFrame([{"kind": "attack", "eps255": 8.0, "top5": top5, "spearman": rho8, "n": 60},
                         {"kind": "random", "eps255": 10.0, "top5": 5.0, "spearman": rho10, "n": 60}])


def test_influence_claims_fail_without_an_effect():
    rows = influence_claims(_influence_summary(5.0, 1.0, 1.0), SimpleNamespace(test_accuracy=0.5), deviation="")
    assert {r["claim_id"].split("/")[1]: verdict(r) for r in rows} == {
        "claim8_influence_top5_eps8": "not reproduced", "claim8b_influence_spearman_eps8": "not reproduced",
        "claim8c_influence_random_eps10": "not reproduced", "claim8d_influence_accuracy": "not reproduced"}
    # the paper's own numbers pass; claim 8c's tolerance is half the gap to no effect (0.1), not 0.2
    rows = influence_claims(_influence_summary(2.0, 0.0, 0.8), SimpleNamespace(test_accuracy=0.975), deviation="")
    assert {verdict(r) for r in rows} == {"reproduced"}
    c8c = next(r for r in rows if "claim8c" in r["claim_id"])
    assert c8c["tolerance"] == pytest.approx(0.1)
    assert verdict({**c8c, "ours": 0.91}) == "not reproduced"


def test_boundary_curvature_claim_fails_when_no_correlation_can_be_computed():
    corr = pd.DataFrame([
        {"model": "m", "x": xq, "y": yq, "method": "gradient", "rho": np.nan, "low": np.nan, "high": np.nan,
         "relation": "none found", "n": 10}
        for xq, yq in (("distance", "topk_attack"), ("distance", "topk_random"), ("curvature", "topk_attack"),
                       ("distance", "curvature"))])  # fmt: skip
    rows = beyond_claims.boundary_claims(corr, {"m": {"n_solved": 10, "n_certified": 10, "seconds": 1.0}},
                                         deviation="", n_boot=100)  # fmt: skip
    mediator = next(r for r in rows if r["claim_id"] == "beyond/boundary_curvature_mediator")
    assert verdict(mediator) == "does not hold"


def test_numeric_rule_never_reproduces_no_effect():
    """The rule itself: a value within the tolerance of the reference is "not reproduced" when the paper's value is
    not (even where ours is also within the tolerance of the paper's value)."""
    assert report.numeric_verdict(0.7, 1.0, tolerance=0.2, reference=1.0) == "not reproduced"
    # the paper's own number as close to no effect as ours: no grounds to call ours a failure
    assert report.numeric_verdict(0.9, 0.95, tolerance=0.1, reference=1.0) == "reproduced"
    assert report.numeric_verdict(0.8, 0.85, tolerance=0.1, reference=1.0) == "reproduced"
    assert report.numeric_verdict(0.8, 0.5, tolerance=0.1, reference=1.0) == "partly"


def _drop_cells(s: pd.DataFrame, cells: list[tuple[str, str]]) -> pd.DataFrame:
    """``s`` without the (method, attack) rows at every ε > 0: a committed grid with these cells not yet complete."""
    gone = np.zeros(len(s), dtype=bool)
    for m, a in cells:
        gone |= (s.method == m).to_numpy() & (s.attack == a).to_numpy() & (s.eps255 > 0).to_numpy()
    return s[~gone].reset_index(drop=True)


INCOMPLETE = [("integrated_gradients", "topk"), ("integrated_gradients", "center"), ("deeplift", "center")]


def test_scale_claims_judge_each_claim_on_the_complete_cells_only():
    """The paper-scale claims: each over the methods whose cells it needs are complete, named scale_claim…, the
    paper's own numbers reproduce, the shape claim (needs every method at ε = 2 and 8) is left out."""
    claims = {c["claim_id"]: c for c in fragility.scale_claims(_drop_cells(paper_summary(), INCOMPLETE), deviation="")}
    assert all(cid.startswith("fragility/scale_claim") for cid in claims)
    assert all(c["claim"].endswith("(committed cells)") for c in claims.values())
    assert set(claims["fragility/scale_claim1_random_topk_eps8"]["ours"]) == {"SG", "DL", "IG", "DTD"}
    assert set(claims["fragility/scale_claim2_topk_eps8"]["ours"]) == {"SG", "DL", "DTD"}
    assert set(claims["fragility/scale_claim3_center_shift_eps8"]["ours"]) == {"SG", "DTD"}
    assert set(claims["fragility/scale_claim4_strongest_spearman_eps8"]["ours"]) == {"SG", "DTD"}
    assert "DL" not in claims["fragility/scale_claim3c_center_vs_random"]["ours"]
    assert "fragility/scale_claim5_shape" not in claims and "fragility/scale_claim9_dtd" in claims
    got = {cid: verdict(c) for cid, c in claims.items()}
    assert set(got.values()) <= {"reproduced", "holds"}, got
    # the paper's own values, recomputed from its F3 (not copied from the rule): SG 74 px / 5 px, DTD 47 / 2.5
    ratio_text = claims["fragility/scale_claim3c_center_vs_random"]["paper_value"]
    assert f"SG {74 / 5:.1f}" in ratio_text and f"DTD {47 / 2.5:.1f}" in ratio_text
    # with every cell complete the full set appears, the shape claim included
    full = {c["claim_id"] for c in fragility.scale_claims(paper_summary(), deviation="")}
    assert "fragility/scale_claim5_shape" in full and len(full) == 11


@pytest.mark.parametrize("make", [no_effect_summary, no_effect_summary_broken], ids=["no_effect", "broken_attack"])
def test_scale_claims_fail_without_an_effect(make):
    claims = fragility.scale_claims(_drop_cells(make(), INCOMPLETE), deviation="")
    got = {c["claim_id"]: verdict(c) for c in claims}
    if make is no_effect_summary:  # images perturbed with their labels kept do reproduce claim 6
        assert got.pop("fragility/scale_claim6_label_kept") == "reproduced"
    bad = {cid: v for cid, v in got.items() if v not in FAILING}
    assert len(got) >= 8 and not bad, bad


def test_scale_claims_leave_out_what_no_complete_cell_answers():
    s = paper_summary()
    only_random = s[(s.attack == "random") | (s.eps255 == 0)]
    ids = {c["claim_id"].split("/")[1] for c in fragility.scale_claims(only_random, deviation="")}
    assert ids == {"scale_claim1_random_topk_eps8", "scale_claim1b_random_spearman_eps8"}
