"""save_figure / save_table / MANIFEST, and the claims table behind REPRODUCTION.md."""

import json
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest

from flipfrag import plotting, report


@pytest.fixture
def run(tmp_path):
    return plotting.start_run("test_nb", profile="smoke", seed=3, figures_dir=tmp_path,
                              parameters={"profile": "smoke", "seed": 3}, substitutions="toy for real")  # fmt: skip


def test_save_figure_writes_files_and_manifest(run, tmp_path):
    fig, ax = plotting.subplots()
    ax.plot([0, 1], [0, 1])
    entry = plotting.save_figure(fig, "beyond/fig_test")
    assert (tmp_path / "beyond" / "fig_test.png").stat().st_size > 1000
    assert (tmp_path / "beyond" / "fig_test.pdf").read_bytes().startswith(b"%PDF")
    manifest = json.loads((tmp_path / "MANIFEST.json").read_text())
    saved = manifest["entries"]["beyond/fig_test"]
    assert saved == entry
    assert set(saved) >= {"id", "files", "notebook", "profile", "parameters", "seed", "runtime_s", "created"}
    assert saved["files"] == ["beyond/fig_test.png", "beyond/fig_test.pdf"] and saved["profile"] == "smoke"
    assert not list(tmp_path.rglob("*.tmp"))


def test_save_table_and_ids(run, tmp_path):
    df = pd.DataFrame({"a": [1.0, 2.5], "b": ["x", "y"]})
    plotting.save_table(df, "flip_points/table_x", caption="cap")
    assert pd.read_csv(tmp_path / "flip_points" / "table_x.csv").equals(df)
    md = (tmp_path / "flip_points" / "table_x.md").read_text()
    assert "| 2.5 | y   |" in md and "profile=smoke" in md and "toy for real" in md
    for bad in ("nopaper", "a/b/c", "../x", "a/ b"):
        with pytest.raises(ValueError, match="id must look like"):
            plotting.save_table(df, bad)
    with pytest.raises(TypeError, match="df"):
        plotting.save_table([1, 2], "beyond/t")
    info = plotting.finish_run()
    assert plotting.read_manifest(tmp_path)["notebooks"]["test_nb"] == info


def test_manifest_survives_concurrent_writers(run, tmp_path):
    df = pd.DataFrame({"a": [1]})
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: plotting.save_table(df, f"beyond/t{i}"), range(12)))
    assert len(plotting.read_manifest(tmp_path)["entries"]) == 12


def test_corrupt_manifest_is_reported(run, tmp_path):
    (tmp_path / "MANIFEST.json").write_text("{not json")
    with pytest.raises(ValueError, match="MANIFEST.json"):
        plotting.read_manifest(tmp_path)


def test_claims_and_reproduction(run, tmp_path):
    report.record_claim("fragility/c1", claim="random eps=8 top-k overlap < 0.3", paper_value=0.21, ours=0.25,
                        verdict="reproduced", source="[FIG]")  # fmt: skip
    report.record_claim("flip_points/c1", claim="dist beats softmax", paper_value=None, ours="AUROC 0.9 vs 0.8",
                        verdict="qualitative only")  # fmt: skip
    with pytest.raises(ValueError, match="verdict"):
        report.record_claim("x/y", claim="c", paper_value=1, ours=1, verdict="great")
    with pytest.raises(ValueError, match="paper_value"):
        report.record_claim("x/y", claim="c", paper_value=None, ours=1, verdict="reproduced")
    text = report.write_reproduction(tmp_path).read_text()
    assert "## fragility" in text and "## flip_points" in text
    assert "not available offline" in text and "0.21 ([FIG])" in text and "toy for real" in text


VERDICT_CASES = [(0.2, 0.22, "reproduced"), (0.2, 0.3, "partly"), (0.2, 0.6, "not reproduced"), (74, 60, "reproduced")]


@pytest.mark.parametrize(("paper", "ours", "expected"), VERDICT_CASES)
def test_verdict_between(paper, ours, expected):
    assert report.verdict_between(paper, ours) == expected


def test_save_without_run_is_an_error(monkeypatch):
    monkeypatch.setattr(plotting, "_RUN", None)
    with pytest.raises(RuntimeError, match="start_run"):
        plotting.save_table(pd.DataFrame({"a": [1]}), "beyond/t")


def test_written_files_are_world_readable(run, tmp_path):
    plotting.save_table(pd.DataFrame({"a": [1]}), "beyond/perm")
    for f in ("MANIFEST.json", "beyond/perm.csv", "beyond/perm.md"):
        assert (tmp_path / f).stat().st_mode & 0o044 == 0o044, f


# ------------------------------------------------------------------------------------------------ provenance


def test_manifest_records_code_version_and_cache_use(tmp_path):
    """Every entry records the code it was made with and the cached work units used so far; a figure whose
    flipfrag source or notebook changed afterwards is listed by stale_figures (make check-figures)."""
    import json

    import pandas as pd

    from flipfrag import engine, plotting, report

    plotting.start_run("fragility/03_imagenet_grid", profile="smoke", seed=0, figures_dir=tmp_path)
    tasks = [engine.Task(f"k{i}", int, (i,)) for i in range(3)]
    engine.run_tasks(tasks, tmp_path / "cache", progress=False, desc="attack grid", code="abc")
    engine.run_tasks(tasks[:2], tmp_path / "cache", progress=False, desc="attack grid", code="abc")  # 2 cached
    plotting.save_table(pd.DataFrame({"a": [1.0]}), "fragility/table_x")
    plotting.finish_run()
    entry = plotting.read_manifest(tmp_path)["entries"]["fragility/table_x"]
    now = plotting.source_hash("fragility/03_imagenet_grid")
    assert entry["code"]["flipfrag"] == now["flipfrag"] and entry["code"]["notebook"] == now["notebook"] is not None
    assert entry["cache"] == {"attack grid": {"cached": 2, "computed": 3, "code": ["abc"]}}
    assert plotting.stale_figures(tmp_path) == {}
    text = report.render_provenance(tmp_path)
    assert "attack grid: 2 from the cache, 3 computed (code abc)" in text and "1 at code `" in text
    # the code changes after the figure was made: the figure is listed, and so is one with no provenance
    path = tmp_path / "MANIFEST.json"
    m = json.loads(path.read_text())
    m["entries"]["fragility/table_x"]["code"]["flipfrag"] = "0" * 16
    m["entries"]["fragility/table_old"] = {**m["entries"]["fragility/table_x"], "code": {}}
    path.write_text(json.dumps(m))
    stale = plotting.stale_figures(tmp_path)
    assert set(stale) == {"fragility/table_x", "fragility/table_old"}
    assert "flipfrag source" in stale["fragility/table_x"]
    assert plotting.main(["--figures-dir", str(tmp_path)]) == 1
