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
        assert r["batched_s"] > 0 and r["one_at_a_time_s"] > 0 and r["throughput_ratio"] > 0
    assert all(r["direction_ms_per_image_batched"] > 0 for r in rows if r["record_metrics"])
    # flipfrag's IG equals Captum's (riemann_right) to float32 rounding of the attributions
    (ig,) = res["ig_vs_captum"]
    assert ig["max_abs_diff"] <= 1e-5 * ig["max_abs_attr"]
    out = capsys.readouterr().out
    assert "ceiling on the ratio" in out and "| tiny16 | gradient (no history) |" in out
    assert not list(tmp_path.iterdir())  # --smoke prints, it does not overwrite the recorded results


class _Clock:
    """A fake ``time.perf_counter`` that only the instrumented work advances."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_bench_attacks_times_what_it_says(monkeypatch):
    """The ratio is not recomputed from the fields it is made of: every attack call costs a known fake time (0.5 s
    per call + 0.1 s per image), so the batched run of 4 images costs 0.9 s and one image at a time 4 x 0.6 s; the
    benchmark must report exactly that (warm-up excluded, every image once, the ratio the right way up)."""
    bench = _load("bench_attacks")
    clock = _Clock()
    real_call = bench.TopKAttack.__call__

    def timed_call(self, x, y=None, **kw):
        out = real_call(self, x, y, **kw)
        clock.now += 0.5 + 0.1 * x.shape[0]
        return out

    monkeypatch.setattr(bench.TopKAttack, "__call__", timed_call)
    monkeypatch.setattr(bench, "time", clock)
    cfg = bench.SMOKE["configs"][0]
    r = bench.bench_batched_attack(cfg, "gradient", n=4, iters=2, ig_steps=2, record_metrics=False, repeats=3)
    assert math.isclose(r["batched_s"], 0.9) and math.isclose(r["one_at_a_time_s"], 2.4)
    assert math.isclose(r["throughput_ratio"], 2.4 / 0.9) and math.isclose(r["batched_images_per_s"], 4 / 0.9)
    assert math.isclose(r["one_at_a_time_ms_per_image_iter"], 1e3 * 2.4 / (4 * 2))


def test_bench_paper_cost_smoke_projection_follows_its_formula(tmp_path, capsys):
    """The paper-cost projection is the stated formula applied to the measured per-cell costs; IG's FLOPs at M = 100
    are the linear extrapolation of two counts; nothing is written with --smoke."""
    bench = _load("bench_paper_cost")
    res = bench.main(["--smoke", "--out", str(tmp_path), "--gpu-tflops", "4"])
    proj, prof = res["projection"], bench.get_profile("paper")
    assert (proj["images"], proj["iterations"], proj["n_eps"]) == (512, 300, 4)
    assert len(res["cells"]) == 12 and {c["method"] for c in res["cells"]} == set(bench.METHODS)
    # the offline ImageNet CNN's cells are projected too, but apart: the paper profile's total is its two roles
    alt = [c for c in proj["cells"] if c["role"] == "imagenet-offline"]
    assert len(alt) == 4 and not any(c["in_total"] for c in alt)
    assert math.isclose(proj["grid_cpu_hours"], sum(c["cpu_hours"] for c in proj["cells"]
                                                   if c["role"] in ("cifar", "imagenet")), rel_tol=1e-12)
    # every cell names its model; the full run costs the CIFAR-10 role on the pretrained CNN the paper profile runs
    # (--smoke: a tiny stand-in, said so), the benchmark's source building it from fragility's paper setting's model
    assert {c["model"] for c in res["cells"] if c["role"] == "cifar"} == {"SmallCNN stand-in (--smoke)"}
    assert "pretrained CIFAR-10 CNN" in bench.MODEL_NAMES["cifar"]
    assert "cifar10_cnn(pretrained=True, folded=True)" in Path(bench.__file__).read_text()
    for row, cell in zip(res["cells"], proj["cells"]):
        assert row["iter_flops"] > 0 and row["iter_s"] >= 0 and row["setup_s"] >= 0
        per_image = row["setup_s"] + 4 * (2 * (300 * row["iter_s"] + row["setup_s"]) + row["setup_s"])
        assert math.isclose(cell["cpu_hours"], 512 * per_image / 3600, rel_tol=1e-12)
        assert math.isclose(cell["gpu_hours"], cell["flops"] / 4e12 / 3600, rel_tol=1e-12)
        assert cell["cpu_hours_authors"] >= cell["cpu_hours"]
    by = {(r["role"], r["method"]): r for r in res["cells"]}
    for role in ("cifar", "imagenet", "imagenet-offline"):  # IG with M = 100 interpolants: far more FLOPs than SG
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
        assert all(s > 0 for s in r["seconds"].values())
        # the hand-written loop follows flipfrag's trajectory exactly (same objective at every iterate)
        f = r["fairness"]
        assert f["objective_max_abs_diff"] <= 1e-6 * f["objective_max_abs"]
        assert f["final_x_max_abs_diff"] is None or f["final_x_max_abs_diff"] <= 1e-6
    assert "e_model_map" in rows[0]["seconds"] and "e_model_map" not in rows[1]["seconds"]
    out = capsys.readouterr().out
    assert "| SG |" in out and "| DTD |" in out and "ratios" in out
    assert not list(tmp_path.iterdir())  # --smoke prints, it does not overwrite the recorded results


# --------------------------------------------------------------------------------------------- bench_flip / gpu_check


def test_pass_counter_counts_forward_rows_and_backward_passes():
    """AttackBench counting: forward calls x batch rows; each backward pass reaching the output x its rows; copies
    (flipfrag's float64 working copy) share the tally."""
    import copy

    import torch

    bench = _load("bench_flip")
    torch.manual_seed(0)
    net = bench.PassCounter(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))
    x = torch.rand(5, 6, requires_grad=True)
    with torch.no_grad():
        net(x)
    assert (net.tally.fwd, net.tally.bwd) == (5, 0)
    z = net(x)
    for c in range(3):  # a Jacobian by one backward pass per class (FAB's way): 3 x 5 backward passes
        torch.autograd.grad(z, x, torch.nn.functional.one_hot(torch.full((5,), c), 3).float(), retain_graph=True)
    assert (net.tally.fwd, net.tally.bwd) == (10, 15)
    net.tally.reset()
    xr = x.detach().repeat_interleave(3, 0).requires_grad_(True)  # flipfrag's way: one pass of 15 rows
    torch.autograd.grad(net(xr), xr, torch.eye(3).repeat(5, 1))
    assert (net.tally.fwd, net.tally.bwd) == (15, 15)
    twin = copy.deepcopy(net).double()
    twin(x.detach().double())
    assert twin.tally is net.tally and net.tally.fwd == 20


def test_bench_flip_row_on_a_tiny_mlp():
    """One model row with every kind of peer on a tiny MLP: passes per point, the budget-matched steps, the goal
    columns and the flat rows the README generator reads."""
    import torch

    bench = _load("bench_flip")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).eval()
    spec = {"net": net, "X": torch.rand(8, 6), "lo": 0.0, "hi": 1.0, "label": "tiny", "key": "tiny"}
    peers = ("FAB", "DeepFool", "FMN", "FMN@budget", "DDN@budget")
    cfg = {"repeats": 1, "slsqp": "estimated"}
    r = bench.run_model(spec, cfg, 3, peers=peers)
    assert r["points"] == 3 and r["certified"] == 1.0
    assert r["ours_passes_fwd"] > 0 and r["ours_passes_bwd"] > 0
    assert r["budget_steps"] == max(1, int(min(r["ours_passes_fwd"], r["ours_passes_bwd"])))
    assert r["FMN"]["passes_bwd"] == 100 and r["FMN"]["steps"] is None  # the documented default: 100 steps
    for p in ("FMN@budget", "DDN@budget"):
        assert r[p]["steps"] == r["budget_steps"] and r[p]["passes_bwd"] == r["budget_steps"]
        assert r[p]["passes_fwd"] <= r["budget_steps"] + 3  # + foolbox's own checks
    assert r["FAB"]["passes_bwd"] == 100 * 3  # 100 steps x one backward pass per class
    assert r["SLSQP"]["passes_bwd"] > 0 and "estimated" in r["SLSQP"]["basis"]
    g = r["goals"]
    assert set(g) == {"fastest_qualifying_peer", "speedup_vs_fastest_qualifying", "speed_2x",
                      "fastest_qualifying_peer_own_distance", "speedup_vs_fastest_qualifying_own_distance",
                      "speed_2x_own_distance",
                      "farther_than_1pct_of_a_crossing", "never_farther", "certified_99"}
    if g["fastest_qualifying_peer"] is not None:
        q = g["fastest_qualifying_peer"]
        assert r[q]["qualifies"] and math.isclose(g["speedup_vs_fastest_qualifying"], r[q]["ms"] / r["ours_ms"])
    rows = bench.flat_rows({"mode": "test", "models": [r]})
    assert [x["method"] for x in rows] == ["flipfrag", *peers, "SLSQP"]
    assert all({"ms_per_point", "passes_fwd", "passes_bwd", "model_key"} <= set(x) for x in rows)
    assert rows[0]["certified_share"] == 1.0 and rows[1]["label_changed_share"] is not None
    md = bench.to_markdown({"machine": "test", "mode": "test", "repeats": 1, "models": [r], "notes": []})
    assert f"FMN ({r['budget_steps']} steps)" in md and "| tiny | flipfrag |" in md


def test_gpu_check_without_cuda_says_why_and_writes_nothing(tmp_path, capsys, monkeypatch):
    import torch

    check = _load("gpu_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main(["--out", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "gpu-check: skipped" in out and "no CUDA" in out and "nothing written" in out
    assert not (tmp_path / "results").exists()


def test_bench_cifar_cnn_times_what_it_says(monkeypatch):
    """Each piece of work costs a known fake time: an attack call 3 s per image-iteration, one hand-written step
    direction 2 s per image, one map of the original model 1 s per image. With 2 images and 2 iterations the
    benchmark must report a = b = 12 s (batched or one at a time), c = 2 x 2 x 2 + 2 (its top-k set) = 10 s,
    d = 8 s, e = 4 s, and the ratios of those: not ratios recomputed from its own fields (a swapped key, a missing
    iteration loop or a timed warm-up would change them)."""
    bench = _load("bench_cifar_cnn")
    clock = _Clock()
    originals = {name: getattr(cls, name) for cls, name in ((bench.TopKAttack, "__call__"),
                                                             (bench.HandLoop, "direction"),
                                                             (bench.HandLoop, "original_map"))}  # fmt: skip

    def costing(fn, cost):
        def wrapped(self, x, *args, **kw):
            out = fn(self, x, *args, **kw)
            clock.now += cost(self, x)
            return out

        return wrapped

    monkeypatch.setattr(bench.TopKAttack, "__call__",
                        costing(originals["__call__"], lambda self, x: 3.0 * x.shape[0] * self.iters))
    monkeypatch.setattr(bench.HandLoop, "direction", costing(originals["direction"], lambda self, x: 2.0 * x.shape[0]))
    monkeypatch.setattr(bench.HandLoop, "original_map",
                        costing(originals["original_map"], lambda self, x: 1.0 * x.shape[0]))  # fmt: skip
    monkeypatch.setattr(bench, "time", clock)
    res = bench.main(["--smoke", "--out", "/nonexistent", "--methods", "gradient"])
    (r,) = res["methods"]
    assert r["images"] == 2 and r["iters"] == 2
    assert r["seconds"] == {"a_flipfrag": 12.0, "b_flipfrag_no_metrics": 12.0, "c_hand_loop": 10.0,
                            "d_direction": 8.0, "e_model_map": 4.0, "a_one_at_a_time": 12.0}  # fmt: skip
    assert math.isclose(r["overhead_a_over_d"], 0.5) and math.isclose(r["overhead_c_over_d"], 0.25)
    assert math.isclose(r["flipfrag_over_hand_time"], 1.2) and math.isclose(r["batched_over_one_at_a_time"], 1.0)
    assert math.isclose(r["overhead_a_over_d_plus_e"], 0.0) and math.isclose(r["model_map_over_direction"], 0.5)


def test_throughput_peak_memory_is_the_fresh_process_own():
    """The throughput table's peak memory is the spawned process's own: Linux keeps ``ru_maxrss`` across ``execve``,
    so a child started from a large parent used to report the parent's peak. Here the parent holds 1 GB more than
    any child needs; the child (which imports the benchmark, torch included) must report well below it."""
    import subprocess
    import sys

    import numpy as np

    ballast = np.ones(2**27)  # 1 GiB, touched
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m._peak_rss_gb())"
    )
    out = subprocess.run([sys.executable, "-c", code, str(BENCH / "bench_cifar_cnn.py")], capture_output=True,
                         text=True, check=True)  # fmt: skip
    child = float(out.stdout.strip().splitlines()[-1])
    parent = _load("bench_cifar_cnn")._peak_rss_gb()
    assert ballast.sum() == 2**27 and parent > 1.0
    assert 0.05 < child < parent - 0.5, (child, parent)
