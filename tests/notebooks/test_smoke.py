"""Every notebook, executed with papermill in the smoke profile, produces exactly the figure/table ids and claims it
declares in flipfrag.report.NOTEBOOK_OUTPUTS, with well-formed claims rows whose verdicts follow the written rule;
and a notebook run twice from a cold cache gives the same table."""

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flipfrag import report
from flipfrag.runner import REPO_ROOT, find_notebooks

NOTEBOOKS = find_notebooks()
ROOT = REPO_ROOT / "notebooks"

#: Notebooks run side by side, each lane a separate worker process (papermill changes the working directory of the
#: process that runs it), one torch thread per kernel. Measured: a smoke notebook's ~18 s are mostly its kernel
#: starting and importing torch (~8 s); importing papermill costs the worker ~3.6 s once (nbformat's jsonschema).
LANES = 2

#: Notebooks that still type their verdicts in (old record_claim API; owned by the fragility rewrite). Empty this
#: set as they switch to kind=...: the test fails if a listed notebook has no old-API row, or an unlisted one has.
STILL_ON_OLD_API: set[str] = set()
#: Started first, so that the lanes finish together (the longest smoke notebooks, measured: 55 s and 48 s).
SLOW_FIRST = ("fragility/03_imagenet_grid", "beyond/02_flip_explanation_fragility")


def _name(path):
    return str(path.relative_to(ROOT).with_suffix(""))


def _run_job(path: Path, figs: Path, out: Path, env: dict[str, str]) -> str | None:
    """Run one notebook in the smoke profile (in a pool worker); None on success, else the runner's error message
    (it names the cell and the executed copy) or the exception."""
    from flipfrag.runner import run_notebook

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the kernel the runner starts
    try:
        run_notebook(path, profile="smoke", seed=0, figures_dir=figs, output_dir=out, threads=1)
    except Exception as err:  # reported by the test of that notebook
        return f"{_name(path)}: {type(err).__name__}: {err}"
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return None


@pytest.fixture(scope="session")
def smoke_runs(request, tmp_path_factory):
    """The notebooks of the selected smoke tests run once each in the smoke profile, :data:`LANES` at a time, plus
    the two cold-cache runs of the determinism test if it is selected: ``{job: (figures_dir, error or None)}``."""
    base = tmp_path_factory.mktemp("smoke")
    here = [item for item in request.session.items if item.path == Path(__file__)]
    wanted = {_name(item.callspec.params["path"]) for item in here if hasattr(item, "callspec")}
    jobs = {_name(p): (p, base / _name(p) / "figures", base / _name(p) / "out", {}) for p in NOTEBOOKS
            if _name(p) in wanted}  # fmt: skip
    if any(item.originalname.endswith("_from_a_cold_cache") for item in here):
        for i in range(2):  # the determinism test's runs, each from its own empty cache
            run = base / f"cold{i}"
            jobs[f"cold{i}"] = (ROOT / "00_data_overview.ipynb", run / "figures", run / "out",
                                {"FLIPFRAG_CACHE": str(run / "cache")})  # fmt: skip
    order = sorted(jobs, key=lambda j: j not in SLOW_FIRST)
    with ProcessPoolExecutor(LANES, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {j: pool.submit(_run_job, *jobs[j]) for j in order}
        return {j: (jobs[j][1], futures[j].result()) for j in order}


def _smoke_run(smoke_runs, job: str) -> Path:
    figs, error = smoke_runs[job]
    if error is not None:
        pytest.fail(error, pytrace=False)
    return figs


def _assert_has_content(item_id: str, path) -> None:
    """More than structure: a figure is not blank (its pixels vary), a table has rows and at least one finite
    number. A notebook whose plot call drew nothing, or whose table came out empty or all-NaN, fails here."""
    if path.suffix == ".png":
        import matplotlib.image

        img = matplotlib.image.imread(path)
        assert img.ndim == 3 and float(img[..., :3].std()) > 0.01, f"{item_id}: {path.name} is blank"
    elif path.suffix == ".csv":
        table = pd.read_csv(path)
        numbers = table.select_dtypes("number").to_numpy(dtype=float)
        assert len(table) > 0 and np.isfinite(numbers).any(), f"{item_id}: {path.name} has no finite number"


def test_content_check_rejects_a_blank_figure_and_an_empty_table(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    fig.savefig(tmp_path / "drawn.png")
    ax.remove()  # the bug: the notebook saved its figure after clearing the axes
    fig.savefig(tmp_path / "blank.png")
    plt.close(fig)
    pd.DataFrame({"method": ["a"], "topk": [np.nan]}).to_csv(tmp_path / "nan.csv", index=False)
    pd.DataFrame({"method": ["a"], "topk": [0.5]}).to_csv(tmp_path / "ok.csv", index=False)
    _assert_has_content("x", tmp_path / "drawn.png")
    _assert_has_content("x", tmp_path / "ok.csv")
    for bad in ("blank.png", "nan.csv"):
        with pytest.raises(AssertionError):
            _assert_has_content("x", tmp_path / bad)


def test_every_notebook_declares_its_outputs():
    assert sorted(map(_name, NOTEBOOKS)) == sorted(report.NOTEBOOK_OUTPUTS)


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_profile(path, smoke_runs):
    name = _name(path)
    declared = report.NOTEBOOK_OUTPUTS[name]
    omitted = set(declared.get("smoke_omits", ()))
    figs = _smoke_run(smoke_runs, name)
    manifest = json.loads((figs / "MANIFEST.json").read_text())
    assert sorted(manifest["entries"]) == sorted(set(declared["items"]) - omitted), f"{name}: figure/table ids differ"
    for item_id, entry in manifest["entries"].items():
        assert entry["profile"] == "smoke" and entry["seed"] == 0 and entry["notebook"] == name
        for f in entry["files"]:
            assert (figs / f).stat().st_size > 0, f"{item_id}: {f} missing"
            _assert_has_content(item_id, figs / f)
    assert list(manifest["notebooks"]) == [name], f"{name} did not call plotting.finish_run()"
    claims = report.read_claims(figs)["claims"]
    assert sorted(claims) == sorted(set(declared["claims"]) - omitted), f"{name}: claim ids differ"
    problems = [p for row in claims.values() for p in report.check_claim_row(row)]
    assert not problems, "\n".join(problems)
    for row in claims.values():
        assert row["notebook"] == name and row["profile"] == "smoke"
    legacy = [cid for cid, row in claims.items() if row["kind"] == "legacy"]
    if name in STILL_ON_OLD_API:
        assert legacy, f"{name} no longer uses the old API: remove it from STILL_ON_OLD_API"
    else:
        assert not legacy, f"{name}: claims {legacy} type their verdict in; pass kind= (flipfrag.report)"


@pytest.mark.notebooks
def test_same_profile_and_seed_reproduce_the_same_table_from_a_cold_cache(smoke_runs):
    """Two runs of 00_data_overview with the same profile and seed, each from its own empty cache (models trained
    afresh, no cached flip points or attack cells; side by side in the pool), give the same table values
    (determinism, not a cache hit)."""
    tables = []
    for i in range(2):
        figs = _smoke_run(smoke_runs, f"cold{i}")
        cache = figs.parent / "cache"  # FLIPFRAG_CACHE of that run, read by flipfrag._io.cache_dir in the kernel
        assert any((cache / "models").iterdir()), "the run should have trained and cached its models afresh"
        tables.append(pd.read_csv(figs / "beyond" / "table_data.csv"))
    pd.testing.assert_frame_equal(tables[0], tables[1])
