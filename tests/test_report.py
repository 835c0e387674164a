"""flipfrag.report: one written verdict rule per kind of claim, applied by record_claim and re-derived here.

The oracle for the verdicts is the rule as written in docs/papers/README.md ("Verdict rules"), re-implemented
below in a few lines independently of flipfrag.report; it is applied to hand-made cases and to every row of the
committed figures/claims.json.
"""

import json
import math
import re
from pathlib import Path

import pytest

from flipfrag import plotting, report

REPO = Path(__file__).resolve().parent.parent
CLAIMS = REPO / "figures" / "claims.json"
RULES_DOC = REPO / "docs" / "papers" / "README.md"
ORDER = ["reproduced", "partly", "not reproduced"]


def written_rule(row: dict) -> str:
    """The rule of docs/papers/README.md, computed from a claims row's stored fields (independent of report.py)."""
    kind = row["kind"]
    if kind == "measured":
        return "measured only"
    if kind == "qualitative":
        return "holds" if all(row["conditions"].values()) else "does not hold"
    assert kind == "numeric", f"{row['id']}: kind {kind!r} has no written rule"
    n = row["numbers"]
    keys = list(n["paper"]) if isinstance(n["paper"], dict) else [None]

    def get(field, k):
        v = n[field]
        return v[k] if isinstance(v, dict) else v

    worst = 0
    for k in keys:
        p, o, t, r = (get(f, k) for f in ("paper", "ours", "tolerance", "reference"))
        if abs(o - p) <= t + 1e-9:  # the doc's "up to float rounding"
            v = 0
        elif p != r and (o - r) * math.copysign(1, p - r) > t:
            v = 1
        else:
            v = 2
        worst = max(worst, v)
    return ORDER[worst]


@pytest.fixture
def run(tmp_path):
    return plotting.start_run("fragility/99_test", profile="smoke", seed=0, figures_dir=tmp_path,
                              parameters={}, substitutions="digits for ImageNet")  # fmt: skip


# ------------------------------------------------------------------------------------------ the numeric rule


# (paper, ours, tolerance, reference, expected) — worked by hand from the written rule
NUMERIC_CASES = [
    (0.21, 0.25, 0.05, 1.0, "reproduced"),  # |0.04| <= 0.05
    (0.21, 0.26, 0.05, 1.0, "reproduced"),  # boundary: exactly the tolerance
    (0.21, 0.60, 0.05, 1.0, "partly"),  # 0.60 is 0.40 below "no effect" (paper's direction), not within 0.05
    (0.21, 0.96, 0.05, 1.0, "not reproduced"),  # moved 0.04 <= t: no effect beyond the tolerance
    (0.21, 1.00, 0.05, 1.0, "not reproduced"),  # no effect at all
    (74.0, 20.0, 10.0, 5.0, "partly"),  # center shift: 15 px beyond random's 5 px, far from 74
    (74.0, 4.0, 10.0, 5.0, "not reproduced"),  # below the random baseline: wrong direction
    (0.099, 0.040, 0.02, 0.039, "not reproduced"),  # top-k center shift: no more than random noise's
    (0.0, 0.843, 0.1, 1.0, "partly"),  # influence rho: paper 0, ours moved 0.157 > 0.1 from 1
    (0.0, 0.95, 0.1, 1.0, "not reproduced"),  # moved only 0.05 from 1
    (0.0, 0.05, 0.1, 1.0, "reproduced"),
    (0.5, 0.5, 0.0, 0.5, "reproduced"),  # paper == reference: only "within tolerance" can pass
    (0.5, 0.9, 0.0, 0.5, "not reproduced"),
]


@pytest.mark.parametrize(("paper", "ours", "tol", "ref", "expected"), NUMERIC_CASES)
def test_numeric_verdict_by_hand(paper, ours, tol, ref, expected):
    assert report.numeric_verdict(paper, ours, tolerance=tol, reference=ref) == expected
    row = {"id": "x", "kind": "numeric", "numbers": {"paper": paper, "ours": ours, "tolerance": tol, "reference": ref}}
    assert written_rule(row) == expected


def test_numeric_verdict_is_the_weakest_component():
    paper = {"SG": 0.21, "DL": 0.22, "IG": 0.26}
    assert report.numeric_verdict(paper, {"SG": 0.22, "DL": 0.2, "IG": 0.27}, tolerance=0.05, reference=1) == (
        "reproduced"
    )
    assert report.numeric_verdict(paper, {"SG": 0.22, "DL": 0.5, "IG": 0.27}, tolerance=0.05, reference=1) == "partly"
    assert report.numeric_verdict(paper, {"SG": 0.22, "DL": 0.5, "IG": 0.99}, tolerance=0.05, reference=1) == (
        "not reproduced"
    )
    # per-component tolerance and reference
    got = report.numeric_verdict({"a": 1.0, "b": 10.0}, {"a": 1.1, "b": 8.0}, tolerance={"a": 0.2, "b": 3.0},
                                 reference={"a": 0.0, "b": 0.0})  # fmt: skip
    assert got == "reproduced"


def test_numeric_verdict_rejects_bad_input():
    with pytest.raises(ValueError, match="components"):
        report.numeric_verdict({"SG": 0.2}, {"DL": 0.2}, tolerance=0.05, reference=1)
    with pytest.raises(ValueError, match="tolerance"):
        report.numeric_verdict(0.2, 0.2, tolerance=-1, reference=1)
    with pytest.raises(ValueError, match="ours"):
        report.numeric_verdict(0.2, float("nan"), tolerance=0.05, reference=1)
    with pytest.raises(TypeError, match="paper_value"):
        report.numeric_verdict("0.2", 0.2, tolerance=0.05, reference=1)
    with pytest.raises(ValueError, match="single number"):
        report.numeric_verdict(0.2, {"SG": 0.2}, tolerance=0.05, reference=1)


def test_qualitative_verdict():
    assert report.qualitative_verdict({"a": True, "b": True}) == "holds"
    assert report.qualitative_verdict({"a": True, "b": False}) == "does not hold"
    with pytest.raises(ValueError, match="conditions"):
        report.qualitative_verdict({})
    with pytest.raises(TypeError, match="bool"):
        report.qualitative_verdict({"a": 1})


# ------------------------------------------------------------------------------------------ record_claim


def test_record_claim_derives_and_stores_what_the_verdict_needs(run, tmp_path):
    row = report.record_claim("fragility/c1", claim="random eps=8 top-k overlap", kind="numeric",
                              paper_value={"SG": 0.21, "IG": 0.26}, ours={"SG": 0.76, "IG": 0.87}, tolerance=0.05,
                              reference=1.0, source="F3 [FIG]", deviation="digits")  # fmt: skip
    assert row["verdict"] == "partly"
    stored = report.read_claims(tmp_path)["claims"]["fragility/c1"]
    assert stored["numbers"] == {"paper": {"SG": 0.21, "IG": 0.26}, "ours": {"SG": 0.76, "IG": 0.87},
                                 "tolerance": {"SG": 0.05, "IG": 0.05}, "reference": {"SG": 1.0, "IG": 1.0},
                                 "direction": {"SG": "down", "IG": "down"}}  # fmt: skip
    assert stored["paper"] == "SG 0.21 / IG 0.26" and stored["ours"] == "SG 0.76 / IG 0.87"
    assert written_rule(stored) == report.derive_verdict(stored) == stored["verdict"]
    q = report.record_claim("fragility/c2", claim="IG most robust", kind="qualitative", paper_value="IG most robust",
                            ours="IG 0.87 vs SG 0.76", conditions={"IG has the highest overlap": True})  # fmt: skip
    assert q["verdict"] == "holds" and written_rule(q) == "holds"
    m = report.record_claim("fragility/c3", claim="accuracy", kind="measured", ours=0.93)
    assert m["verdict"] == "measured only" and m["paper"] == "not available offline"


def test_a_given_verdict_must_equal_the_derived_one(run):
    with pytest.raises(ValueError, match="rule gives 'partly'"):
        report.record_claim("x/y", claim="c", kind="numeric", paper_value=0.2, ours=0.6, tolerance=0.05, reference=1,
                            verdict="reproduced")  # fmt: skip
    row = report.record_claim("x/y", claim="c", kind="numeric", paper_value=0.2, ours=0.6, tolerance=0.05,
                              reference=1, verdict="partly")  # fmt: skip
    assert row["verdict"] == "partly"


def test_a_negative_text_cannot_get_a_softer_verdict(run):
    with pytest.raises(ValueError, match="does not hold"):
        report.record_claim("x/t", claim="targeted attack", kind="qualitative", paper_value="moves saliency",
                            ours="does not hold: box 1 % -> 3 %", conditions={"box mass doubles": True})  # fmt: skip
    with pytest.raises(ValueError, match="not reproduced"):
        report.record_claim("x/t", claim="c", kind="measured", ours="not reproduced here")
    # old API: the negative text wins over the typed-in verdict
    old = report.record_claim("x/t", claim="targeted attack", paper_value="qualitative",
                              ours="does not hold: 1 % -> 3 %", verdict="qualitative only")  # fmt: skip
    assert old["verdict"] == "does not hold" and old["kind"] == "legacy"


def test_old_api_still_accepted(run, tmp_path):
    a = report.record_claim("x/a", claim="c", paper_value=None, ours="x", verdict="no paper number")
    assert a["kind"] == "measured" and a["verdict"] == "measured only" and written_rule(a) == "measured only"
    b = report.record_claim("x/b", claim="c", paper_value=0.2, ours=0.25, verdict="reproduced")
    assert b["kind"] == "legacy" and b["verdict"] == "reproduced"
    with pytest.raises(ValueError, match="kind"):
        report.record_claim("x/c", claim="c", paper_value=0.2, ours=0.25)
    with pytest.raises(ValueError, match="kind must be"):
        report.record_claim("x/c", claim="c", paper_value=0.2, ours=0.25, kind="numbers")
    assert "(not derived)" in report.render_reproduction(tmp_path)


def test_numeric_and_qualitative_claims_need_their_fields(run):
    with pytest.raises(ValueError, match="tolerance"):
        report.record_claim("x/n", claim="c", kind="numeric", paper_value=0.2, ours=0.2, reference=1)
    with pytest.raises(ValueError, match="conditions"):
        report.record_claim("x/q", claim="c", kind="qualitative", paper_value="p", ours="o")
    with pytest.raises(ValueError, match="paper_value"):
        report.record_claim("x/m", claim="c", kind="measured", paper_value=0.3, ours=0.2)


# ------------------------------------------------------------------------------------------ REPRODUCTION.md


def test_reproduction_lists_deviations_once_per_notebook_and_links_the_notes(run, tmp_path):
    common = "MNIST-5k 28x28 for ImageNet; k = 15 of 784 px"
    for i, ours in enumerate((0.5, 0.6, 0.7)):
        report.record_claim(f"fragility/c{i}", claim=f"claim {i}", kind="numeric", paper_value=0.2, ours=ours,
                            tolerance=0.05, reference=1.0, deviation=common, source="F3 [FIG]")  # fmt: skip
    report.record_claim("fragility/c9", claim="claim 9", kind="measured", ours=1, deviation="only for claim 9")
    text = report.write_reproduction(tmp_path).read_text()
    assert text.count(common) == 1 and text.count("only for claim 9") == 1
    assert "| claim | paper | ours | verdict |" in text
    assert "| claim 0 | 0.2 (F3 [FIG]) | 0.5 | partly |" in text
    assert "digits for ImageNet" in text
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "docs/papers" in link:
            assert (tmp_path / link).resolve().exists(), link


def test_the_rules_doc_states_the_rule_the_code_applies():
    doc = RULES_DOC.read_text()
    for phrase in ("|o − p| ≤ t", "(o − r)·sign(p − r) > t", "weakest", "holds", "does not hold", "measured only"):
        assert phrase in doc, phrase


# ------------------------------------------------------------------------------------------ committed claims


def _committed_rows():
    store = json.loads(CLAIMS.read_text())
    return store["claims"]


def test_every_committed_verdict_follows_from_its_numbers():
    """Re-derive every verdict of figures/claims.json by the written rule (the acceptance test of issue 12)."""
    rows = _committed_rows()
    assert rows, "figures/claims.json has no claims"
    if not any("kind" in r for r in rows.values()):
        pytest.xfail("figures/claims.json predates the verdict rule (no row has a kind): `make figures` rewrites it")
    problems = []
    for cid, row in rows.items():
        if row.get("kind") not in report.KINDS:
            problems.append(f"{cid}: kind {row.get('kind')!r} — the notebook still types its verdict in")
            continue
        if written_rule(row) != row["verdict"]:
            problems.append(f"{cid}: stored {row['verdict']!r}, rule gives {written_rule(row)!r}")
        text = f"{row['claim']} {row['ours']} {row.get('note', '')}"
        if re.search(r"does not hold|not reproduced", text, re.I):
            assert row["verdict"] in ("does not hold", "not reproduced"), cid
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ README


def test_readme_headline_results_and_runtimes_are_the_committed_ones():
    """README's generated blocks equal what figures/claims.json and figures/MANIFEST.json give (no stale numbers);
    the other blocks (speed, cost, tests, beyond) are checked in tests/test_readme.py."""
    blocks = report.readme_blocks(REPO / "README.md")
    figures = REPO / "figures"
    assert blocks["claims"] == report._readme_block("claims", figures), "run `python -m flipfrag.report --readme`"
    assert blocks["runtimes"] == report._readme_block("runtimes", figures), "run `python -m flipfrag.report --readme`"
    manifest = json.loads((figures / "MANIFEST.json").read_text())
    total = sum(nb["runtime_s"] for nb in manifest["notebooks"].values())
    assert f"in {total:.0f} s" in blocks["runtimes"]
    for cid, c in _committed_rows().items():  # every claim, with its verdict, is in the README
        assert report._md_escape(c["claim"]) in blocks["claims"], cid


def test_update_readme_rewrites_only_the_generated_blocks(run, tmp_path):
    report.record_claim("fragility/c1", claim="top-k overlap", kind="numeric", paper_value=0.2, ours=0.9,
                        tolerance=0.05, reference=1.0)  # fmt: skip
    plotting.finish_run()
    readme = tmp_path / "README.md"
    others = "".join(f"<!-- {b}:begin -->\nold {b}\n<!-- {b}:end -->\n" for b in ("tests", "speed", "cost", "beyond"))
    readme.write_text("intro\n<!-- runtimes:begin -->\nold 352 s\n<!-- runtimes:end -->\nmiddle\n"
                      "<!-- claims:begin -->\nold claims\n<!-- claims:end -->\n" + others + "end\n")  # fmt: skip
    report.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert text.startswith("intro\n") and "\nmiddle\n" in text and text.endswith("end\n")
    assert "352" not in text and "old claims" not in text and "old speed" not in text
    assert "| top-k overlap | 0.2 | 0.9 | partly |" in text and "1 notebooks in" in text
    readme.write_text("no blocks")
    with pytest.raises(ValueError, match="claims:begin"):
        report.update_readme(readme, tmp_path)


def test_committed_figures_match_the_declared_notebook_outputs():
    """figures/MANIFEST.json and claims.json hold exactly what NOTEBOOK_OUTPUTS declares, notebook by notebook."""
    manifest = json.loads((REPO / "figures" / "MANIFEST.json").read_text())
    items, claims = {}, {}
    for item_id, e in manifest["entries"].items():
        items.setdefault(e["notebook"], set()).add(item_id)
    for cid, c in _committed_rows().items():
        claims.setdefault(c["notebook"], set()).add(cid)
    for nb, declared in report.NOTEBOOK_OUTPUTS.items():
        if nb not in manifest["notebooks"]:  # a notebook added since the figures were made (make figures adds it)
            continue
        assert items.get(nb, set()) == set(declared["items"]), nb
        profile = manifest["notebooks"][nb]["profile"]  # a claim at a size the profile does not run is omitted
        expected = set(declared["claims"]) - set(declared.get(f"{profile}_omits", ()))
        assert claims.get(nb, set()) == expected, nb
    assert set(items) | set(claims) <= set(report.NOTEBOOK_OUTPUTS)


def test_check_claim_row_finds_problems(run, tmp_path):
    row = report.record_claim("x/a", claim="c", kind="numeric", paper_value=0.2, ours=0.6, tolerance=0.05, reference=1)
    assert report.check_claim_row(row) == []
    assert any("rule gives" in p for p in report.check_claim_row({**row, "verdict": "reproduced"}))
    assert any("missing field" in p for p in report.check_claim_row({k: v for k, v in row.items() if k != "kind"}))
    bad = {**row, "numbers": {**row["numbers"], "tolerance": -1}}
    assert any("cannot re-derive" in p for p in report.check_claim_row(bad))


def test_a_rerun_drops_the_claims_its_notebook_no_longer_makes(run, tmp_path):
    """A notebook rerun with other sizes (the quick ImageNet grid lost eps = 1) must not leave its old claim rows in
    claims.json: finish_run removes that notebook's claims not recorded by the run; other notebooks' stay."""
    kw = dict(claim="top-k overlap", kind="numeric", paper_value=0.2, ours=0.9, tolerance=0.05, reference=1.0)
    report.record_claim("fragility/c_eps1", **kw)
    report.record_claim("fragility/c_eps8", **kw)
    plotting.finish_run()
    plotting.start_run("fragility/98_other", profile="smoke", seed=0, figures_dir=tmp_path)
    report.record_claim("fragility/c_other", **kw)
    plotting.finish_run()
    plotting.start_run("fragility/99_test", profile="smoke", seed=0, figures_dir=tmp_path)
    report.record_claim("fragility/c_eps8", **kw)
    info = plotting.finish_run()
    claims = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert sorted(claims) == ["fragility/c_eps8", "fragility/c_other"]
    assert info["stale_claims_removed"] == ["fragility/c_eps1"]
