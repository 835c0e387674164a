"""Every notebook, executed with papermill in the smoke profile, writes its figures and MANIFEST entries."""

import json

import pandas as pd
import pytest

from flipfrag.runner import find_notebooks, run_notebook

NOTEBOOKS = find_notebooks()


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_profile(path, tmp_path):
    figs = tmp_path / "figures"
    run_notebook(path, profile="smoke", seed=0, figures_dir=figs, output_dir=tmp_path / "out")
    manifest = json.loads((figs / "MANIFEST.json").read_text())
    assert manifest["entries"], f"{path.name} saved no figure or table"
    for item_id, entry in manifest["entries"].items():
        assert entry["profile"] == "smoke" and entry["seed"] == 0
        for f in entry["files"]:
            assert (figs / f).stat().st_size > 0, f"{item_id}: {f} missing"
    assert manifest["notebooks"], f"{path.name} did not call plotting.finish_run()"


@pytest.mark.notebooks
def test_same_profile_and_seed_reproduce_the_same_table(tmp_path):
    """A second run with the same profile and seed gives the same table values (determinism)."""
    nb = next(p for p in NOTEBOOKS if p.name == "00_data_overview.ipynb")
    tables = []
    for i in range(2):
        figs = tmp_path / f"run{i}"
        run_notebook(nb, profile="smoke", seed=0, figures_dir=figs, output_dir=tmp_path / f"out{i}")
        tables.append(pd.read_csv(figs / "beyond" / "table_data.csv"))
    pd.testing.assert_frame_equal(tables[0], tables[1])
