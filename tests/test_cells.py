"""The committed paper-scale grid cells (flipfrag.fragility.cells, issue 21): the plan covers the grid, the committed
files are well-formed and belong to it, a sample of them recomputes on this machine within the stated tolerances,
and a forged, edited or stale cell is caught."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from flipfrag._io import sha256_file
from flipfrag.fragility import cells
from flipfrag.fragility.grid import GridCacheError, grid_cache_key, load_grid_cell, save_grid_cell

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setting():
    return cells.scale_setting()


@pytest.fixture(scope="module")
def the_plan(setting):
    return cells.plan(setting)


@pytest.fixture(scope="module")
def committed(the_plan):
    folder = cells.cells_dir()
    present = [c for c in the_plan if (folder / f"cell-{c.key}.provenance.json").exists()]
    return folder, present


def test_the_plan_covers_the_scale_grid(setting, the_plan):
    g = cells.SCALE_GRID
    assert len(setting.x) == g["n_images"] and setting.k == 1000 and tuple(setting.x.shape[-2:]) == (224, 224)
    n_chunks = -(-g["n_images"] // g["chunk"])
    combos = {(c.method, c.attack, round(c.eps * 255, 6)) for c in the_plan}
    # per method: eps 0 once (shared by the attacks) + every other eps x the three attacks
    per_eps = {m: [e for e in (g["ig_epsilons"] if m == "integrated_gradients" else g["epsilons"])]
               for m in (*g["methods"], "integrated_gradients")}  # fmt: skip
    expected = sum(1 + 3 * (len(e) - 1) for e in per_eps.values())
    assert len(combos) == expected and len(the_plan) == expected * n_chunks
    assert len({c.key for c in the_plan}) == len(the_plan)  # distinct photos / settings -> distinct keys
    for combo in combos:
        photos = sorted(i for c in the_plan if (c.method, c.attack, round(c.eps * 255, 6)) == combo for i in c.images)
        assert photos == list(range(g["n_images"]))
    # the headline first among the iterative cells: SG's top-k attack at eps = 8
    first = next(c for c in the_plan if c.iterative)
    assert (first.method, first.attack, first.eps) == ("gradient", "topk", 8 / 255)


def test_plan_keys_equal_grid_cache_key(setting, the_plan):
    # plan() hashes the weights once and copies the hash state per cell: the keys must be grid_cache_key's, byte
    # for byte (a committed cell is found by its key); first, last and one from the middle, recomputed the slow way
    spec = cells.scale_spec(setting)
    for cell in (the_plan[0], the_plan[len(the_plan) // 2], the_plan[-1]):
        idx = list(cell.images)
        settings = {**spec.cell_settings(cell.method, cell.attack, cell.eps), "code": cells._code_version()}
        assert cell.key == grid_cache_key(setting.model, setting.x[idx], setting.y[idx], settings)


def test_committed_cells_are_well_formed_and_belong_to_the_grid(committed, setting):
    folder, present = committed
    files = sorted(folder.glob("cell-*.provenance.json"))
    grid = cells.load_scale_grid(folder, setting=setting)  # raises on a corrupt cell or a mismatched provenance
    assert len(grid.provenance) == len(present)
    assert grid.stale == len(files) - len(present)
    for prov in grid.provenance:
        assert prov["code_version"] == cells._code_version()
        assert prov["model"] == "efficientnet-lite0" and prov["dtype"] == "torch.float32"
        assert prov["wall_seconds"] > 0 and prov["device"]
        kept = np.asarray(prov["history"]["label_kept"], dtype=bool)
        topk = np.asarray(prov["history"]["topk"], dtype=float)
        assert topk.shape == kept.shape and topk.shape[0] == len(prov["images"])
        if prov["eps"] > 0 and prov["attack"] != "random":
            assert topk.shape[1] == cells.SCALE_GRID["iters"] + 1
    if not grid.df.empty:
        # the rows of a complete (method, attack, eps): one per photo; iterative rows agree with their history
        counts = grid.df.groupby(["method", "attack", "eps255"]).image.nunique()
        assert (counts == cells.SCALE_GRID["n_images"]).all()
        assert grid.df.topk.between(0, 1).all() and grid.df.label_kept.all()


def _sample(present, iterative: bool):
    group = [c for c in present if c.iterative == iterative]
    if not group:
        pytest.skip(f"no committed {'iterative' if iterative else 'one-shot'} cell matches the current code "
                    "(stale or none yet): `make cells` computes them")  # fmt: skip
    return group[0]


def test_a_committed_random_sign_cell_recomputes_whole(committed, setting):
    folder, present = committed
    report = cells.verify_cell(_sample(present, False), folder, setting=setting)
    assert report["ok"], report


def test_a_committed_iterative_cell_recomputes_its_first_iterations(committed, setting):
    folder, present = committed
    report = cells.verify_cell(_sample(present, True), folder, setting=setting, iters=2)
    assert report["compared"].startswith("iterates 0-2 of 50")
    assert report["ok"], report


def _copy(folder, cell, tmp_path):
    for suffix in (".json", ".provenance.json"):
        shutil.copy(folder / f"cell-{cell.key}{suffix}", tmp_path / f"cell-{cell.key}{suffix}")
    return tmp_path / f"cell-{cell.key}.json", tmp_path / f"cell-{cell.key}.provenance.json"


def test_an_edited_cell_is_refused_and_a_forged_one_fails_the_recomputation(committed, setting, tmp_path):
    folder, present = committed
    cell = _sample(present, False)
    path, prov_path = _copy(folder, cell, tmp_path)
    df = load_grid_cell(path, cell.key)
    df.loc[0, "topk"] = df.loc[0, "topk"] - 0.3
    save_grid_cell(path, cell.key, df)  # a well-formed cell file with its own checksum, but other numbers
    with pytest.raises(GridCacheError, match="provenance"):
        cells.read_cell(tmp_path, cell)
    prov = json.loads(prov_path.read_text())
    prov["cell_sha256"] = sha256_file(path)  # the forger fixes the provenance too
    prov_path.write_text(json.dumps(prov))
    report = cells.verify_cell(cell, tmp_path, setting=setting)
    assert not report["ok"] and report["max_abs_diff_topk"] >= 0.29


def test_a_forged_history_fails_the_recomputation(committed, setting, tmp_path):
    folder, present = committed
    cell = _sample(present, True)
    _, prov_path = _copy(folder, cell, tmp_path)
    prov = json.loads(prov_path.read_text())
    v = prov["history"]["topk"][0][1]
    prov["history"]["topk"][0][1] = v - 0.1 if v >= 0.1 else v + 0.1  # a first step other than the one computed
    prov_path.write_text(json.dumps(prov))
    report = cells.verify_cell(cell, tmp_path, setting=setting, iters=2)
    assert not report["ok"]


def test_stale_cells_are_counted_and_not_used(committed, setting, monkeypatch):
    folder, present = committed
    if not present:
        pytest.skip("no committed cell matches the current code")
    monkeypatch.setattr(cells, "_code_version", lambda: "other-code")
    grid = cells.load_scale_grid(folder, setting=setting)
    assert grid.df.empty and grid.provenance == [] and grid.stale >= len(present)
    assert not grid.coverage.complete.any()


def test_run_cells_saves_each_cell_and_resumes(setting, tmp_path):
    only = ["gradient/random/eps255=2/photos 0-"]
    done = cells.run_cells(tmp_path, only=only, progress=False, setting=setting)
    assert [d["cell"] for d in done] == ["gradient/random/eps255=2/photos 0-3"]
    assert len(list(tmp_path.glob("cell-*.json"))) == 2  # the cell and its provenance
    assert cells.run_cells(tmp_path, only=only, progress=False, setting=setting) == []  # resumed: nothing left to do
    grid = cells.load_scale_grid(tmp_path, setting=setting)
    row = grid.coverage[(grid.coverage.method == "gradient") & (grid.coverage.attack == "random")
                        & (grid.coverage.eps255 == 2)].iloc[0]  # fmt: skip
    assert row.chunks == 1 and not row.complete and grid.df.empty  # an incomplete cell is not drawn
