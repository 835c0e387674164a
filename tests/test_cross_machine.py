"""The committed numbers on another machine: rerun a notebook pair of the quick profile in a clean cache (nothing
trained: ``FLIPFRAG_REQUIRE_SHIPPED=1``, so every model comes from data/models/) and compare its tables with the
committed ``figures/`` tables.

Tolerance (``TOLERANCE``, stated in the README): text cells identical; a numeric cell may differ by at most one unit
of its last printed digit (tables are written with 4 significant digits, ``%.4g``), because inference on the same
weights can round differently in the last bits on another CPU or thread count. The pair: ``00_data_overview``
(accuracies of every shipped zoo model: the weights themselves) and ``fragility/06_influence`` (an end-to-end number
the issue saw drift: CNN features, a Newton-fitted logistic head, influence functions, attacks).
"""

import datetime as dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

PAIR = ["00_data_overview", "fragility/06_influence"]
TABLES = ["beyond/table_data", "fragility/table_influence"]
TOLERANCE = "text identical; numbers within one unit of the 4th significant digit (the %.4g the tables are saved with)"


def _last_digit_unit(x: float, digits: int = 4) -> float:
    return 0.0 if x == 0 else 10.0 ** (math.floor(math.log10(abs(x))) - (digits - 1))


def compare_tables(ours: pd.DataFrame, ref: pd.DataFrame) -> list[str]:
    """Differences beyond TOLERANCE between two tables read from CSV, as readable lines (empty: they agree)."""
    if list(ours.columns) != list(ref.columns):
        return [f"columns differ: {list(ours.columns)} vs {list(ref.columns)}"]
    if ours.shape != ref.shape:
        return [f"shape differs: {ours.shape} vs {ref.shape}"]
    problems = []
    for col in ref.columns:
        for i, (a, b) in enumerate(zip(ours[col], ref[col])):
            if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
                continue
            if isinstance(a, int | float) and isinstance(b, int | float):
                unit = max(_last_digit_unit(float(a)), _last_digit_unit(float(b)))
                if abs(float(a) - float(b)) > unit * (1 + 1e-9):
                    problems.append(f"row {i} {col}: {a} vs committed {b} (allowed ±{unit:g})")
            elif str(a) != str(b):
                problems.append(f"row {i} {col}: {a!r} vs committed {b!r}")
    return problems


def test_compare_tables_applies_the_stated_tolerance():
    ref = pd.DataFrame({"name": ["a", "b"], "x": [0.8466, 1234.0], "n": [60, 60]})
    assert compare_tables(ref.copy(), ref) == []
    assert compare_tables(ref.assign(x=[0.8467, 1235.0]), ref) == []  # one unit of the last digit
    assert len(compare_tables(ref.assign(x=[0.8468, 1234.0]), ref)) == 1  # two units
    assert len(compare_tables(ref.assign(name=["a", "c"]), ref)) == 1
    assert compare_tables(ref.rename(columns={"x": "y"}), ref)[0].startswith("columns differ")


def _created(entry: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(entry["created"])


@pytest.mark.notebooks
@pytest.mark.slow
def test_quick_pair_reproduces_the_committed_tables(repo, tmp_path):
    ref_dir = Path(os.environ.get("FLIPFRAG_REFERENCE_FIGURES", repo / "figures"))
    index_path = repo / "data" / "models" / "INDEX.json"
    if not index_path.exists():
        pytest.skip("no shipped weights (data/models/INDEX.json)")
    shipped = dt.datetime.fromisoformat(json.loads(index_path.read_text())["shipped"])
    manifest = json.loads((ref_dir / "MANIFEST.json").read_text())["entries"]
    for table in TABLES:
        if _created(manifest[table]) < shipped:
            made = manifest[table]["created"]
            pytest.skip(f"{ref_dir / table}.csv was made on {made}, before the shipped weights "
                        f"({shipped.isoformat()}): run make figures to enable this test")  # fmt: skip
    env = {**os.environ, "FLIPFRAG_CACHE": str(tmp_path / "clean-cache"), "FLIPFRAG_REQUIRE_SHIPPED": "1",
           "FLIPFRAG_THREADS": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    env.pop("FLIPFRAG_SHIPPED_MODELS", None)
    figs = tmp_path / "figs"
    proc = subprocess.run(
        [sys.executable, "-m", "flipfrag.runner", "--profile", "quick", "--seed", "0", "--figures-dir", str(figs),
         "--output-dir", str(tmp_path / "nb"), "--select", *PAIR],
        capture_output=True, text=True, env=env, cwd=repo, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    problems = []
    for table in TABLES:
        ours, ref = pd.read_csv(figs / f"{table}.csv"), pd.read_csv(ref_dir / f"{table}.csv")
        problems += [f"{table}: {p}" for p in compare_tables(ours, ref)]
    assert not problems, f"tolerance: {TOLERANCE}\n" + "\n".join(problems[:40])
