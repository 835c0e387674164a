"""The benchmark scripts run (tiny sizes) and report what their tables claim: no timing assertions here."""

import importlib.util
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_attacks_smoke(tmp_path, capsys):
    res = _load("bench_attacks").main(["--smoke", "--out", str(tmp_path)])
    rows = res["attack"]
    assert [(r["method"], r["record_metrics"]) for r in rows] == [("gradient", True), ("gradient", False), ("ig", True)]
    for r in rows:
        assert r["batched_s"] > 0 and r["one_at_a_time_s"] > 0
        assert math.isclose(r["throughput_ratio"], r["one_at_a_time_s"] / r["batched_s"])
    assert all(r["direction_ms_per_image_batched"] > 0 for r in rows if r["record_metrics"])
    # flipfrag's IG equals Captum's (riemann_right) to float32 rounding of the attributions
    (ig,) = res["ig_vs_captum"]
    assert ig["max_abs_diff"] <= 1e-5 * ig["max_abs_attr"]
    out = capsys.readouterr().out
    assert "ceiling on the ratio" in out and "| tiny16 | gradient (no history) |" in out
    assert not list(tmp_path.iterdir())  # --smoke prints, it does not overwrite the recorded results


def test_bench_paper_cost_smoke_projection_follows_its_formula(tmp_path, capsys):
    """The paper-cost projection is the stated formula applied to the measured per-cell costs; IG's FLOPs at M = 100
    are the linear extrapolation of two counts; nothing is written with --smoke."""
    bench = _load("bench_paper_cost")
    res = bench.main(["--smoke", "--out", str(tmp_path), "--gpu-tflops", "4"])
    proj, prof = res["projection"], bench.get_profile("paper")
    assert (proj["images"], proj["iterations"], proj["n_eps"]) == (512, 300, 4)
    assert len(res["cells"]) == 8 and {c["method"] for c in res["cells"]} == set(bench.METHODS)
    for row, cell in zip(res["cells"], proj["cells"]):
        assert row["iter_flops"] > 0 and row["iter_s"] >= 0 and row["setup_s"] >= 0
        per_image = row["setup_s"] + 4 * (2 * (300 * row["iter_s"] + row["setup_s"]) + row["setup_s"])
        assert math.isclose(cell["cpu_hours"], 512 * per_image / 3600, rel_tol=1e-12)
        assert math.isclose(cell["gpu_hours"], cell["flops"] / 4e12 / 3600, rel_tol=1e-12)
        assert cell["cpu_hours_authors"] >= cell["cpu_hours"]
    by = {(r["role"], r["method"]): r for r in res["cells"]}
    for role in ("cifar", "imagenet"):  # IG with M = 100 interpolants costs far more FLOPs than one gradient
        assert by[role, "integrated_gradients"]["iter_flops"] > 30 * by[role, "gradient"]["iter_flops"]
    assert math.isclose(proj["flip"]["cpu_hours"], 60_000 * res["flip"]["point_s"] / 3600, rel_tol=1e-12)
    assert math.isclose(proj["total_cpu_hours"], proj["grid_cpu_hours"] + proj["flip"]["cpu_hours"])
    assert prof["grid_n_images"] == 512 and "GPU-hours (estimate)" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_flop_count_matches_a_closed_form():
    """The benchmark's FLOP counter: a (n, d) @ (d, m) matmul is 2ndm FLOPs, its backward twice that."""
    bench = _load("bench_paper_cost")
    import torch

    a, b = torch.randn(5, 7, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    with bench.FlopCount() as fc:
        (a @ b).sum().backward()
    assert fc.total == 3 * 2 * 5 * 7 * 3


def test_bench_cifar_cnn_smoke(tmp_path, capsys):
    res = _load("bench_cifar_cnn").main(["--smoke", "--out", str(tmp_path), "--methods", "gradient", "dtd"])
    rows = res["methods"]
    assert [r["method"] for r in rows] == ["gradient", "dtd"]
    for r in rows:
        t = r["seconds"]
        assert all(s > 0 for s in t.values())
        assert math.isclose(r["overhead_a_over_d"], t["a_flipfrag"] / t["d_direction"] - 1)
        assert math.isclose(r["flipfrag_over_hand_time"], t["a_flipfrag"] / t["c_hand_loop"])
        assert math.isclose(r["batched_over_one_at_a_time"], t["a_one_at_a_time"] / t["a_flipfrag"])
        # the hand-written loop follows flipfrag's trajectory exactly (same objective at every iterate)
        f = r["fairness"]
        assert f["objective_max_abs_diff"] <= 1e-6 * f["objective_max_abs"]
        assert f["final_x_max_abs_diff"] is None or f["final_x_max_abs_diff"] <= 1e-6
    assert "e_model_map" in rows[0]["seconds"] and "e_model_map" not in rows[1]["seconds"]
    out = capsys.readouterr().out
    assert "| SG |" in out and "| DTD |" in out and "ratios" in out
    assert not list(tmp_path.iterdir())  # --smoke prints, it does not overwrite the recorded results
