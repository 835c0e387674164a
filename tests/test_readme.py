"""The README's quick-start code runs as written (with fewer iterations) on the shipped pretrained CIFAR-10 CNN."""

import re

import torch

from flipfrag import set_threads


def test_readme_quick_start_runs(repo):
    text = (repo / "README.md").read_text()
    block = re.search(r"## Quick start: your own model.*?```python\n(.*?)```", text, re.S)
    assert block, "README has a quick-start code block"
    code = block.group(1)
    for long, short in (("iters=300", "iters=2"), ("max_iter=50", "max_iter=5"), ("set_threads(2)", "set_threads(1)")):
        assert long in code, long
        code = code.replace(long, short)
    before = torch.get_num_threads()
    ns: dict = {}
    try:
        exec(compile(code, "README.md quick start", "exec"), ns)
    finally:
        set_threads(before)
    res, out, x, y, model = ns["res"], ns["out"], ns["x"], ns["y"], ns["model"]
    assert res.x_flip.shape == x.shape and len(res.status) == 2
    # both photos certified even with the shortened budget (measured: 5 iterations suffice), so the checks below
    # never run on an empty selection
    assert res.converged.all(), res.status
    with torch.no_grad():  # recomputed here: the source and the runner-up tie at x_flip, and no class beats them
        z = model(res.x_flip)
    runner_up = ns["scores"].topk(2, 1).indices[:, 1]
    assert torch.equal(res.source, y) and torch.equal(res.target, runner_up)
    zs, zt = z.gather(1, y[:, None])[:, 0], z.gather(1, runner_up[:, None])[:, 0]
    torch.testing.assert_close(zs, zt, atol=1e-4, rtol=1e-5)
    assert (z.max(1).values <= torch.maximum(zs, zt) + 1e-4).all()
    dist = (res.x_flip - x).flatten(1).norm(dim=1).to(res.distance.dtype)
    torch.testing.assert_close(res.distance, dist, atol=1e-5, rtol=1e-5)
    assert res.x_flip.min() >= 0 and res.x_flip.max() <= 1
    # the attack: the label re-checked on the model here (not out.label_kept, which holds by construction), the
    # perturbation inside the budget and actually there (a failed attack returns x itself)
    with torch.no_grad():
        assert torch.equal(model(out.x_adv).argmax(1), y)
    assert out.success.all() and ((out.x_adv - x).flatten(1).abs().amax(1) > 0).all()
    assert (out.x_adv - x).abs().max() <= 8 / 255 + 1e-6 and out.x_adv.min() >= 0 and out.x_adv.max() <= 1
    assert ns["net"](x).shape == (2, 10)


# ------------------------------------------------------------------------- every README number from an artifact


def test_readme_is_what_the_generator_writes(repo):
    """Every generated block (claims, runtimes and provenance, tests, speed, cost, beyond) equals what
    `python -m flipfrag.report --readme` writes from the committed files: a hand-edited or stale number fails."""
    from flipfrag import report

    text = (repo / "README.md").read_text()
    assert set(report.readme_blocks(repo / "README.md")) == set(report.README_BLOCKS)
    assert text == report.render_readme(repo / "README.md", repo / "figures"), (
        "README.md differs from its sources: run `python -m flipfrag.report --readme`"
    )


def test_readme_prose_carries_no_figures(repo):
    """Outside generated blocks and code, README prose holds words: a measured number typed into it fails here."""
    from flipfrag.readme import prose_number_problems

    problems = prose_number_problems((repo / "README.md").read_text())
    assert not problems, "\n".join(problems)


def test_prose_check_flags_typed_numbers_and_spares_generated_ones():
    from flipfrag.readme import prose_number_problems

    text = ("Intro for arXiv:1903.08789 (2019) on CIFAR-10 at ε = 8/255.\n"
            "```bash\nmake test   # 537 s\n```\n"
            "<!-- speed:begin -->\n| 3,671x |\n<!-- speed:end -->\n"
            "The suite ran 502 tests in `537` s.\nFAB is 2.1× slower.\n")  # fmt: skip
    problems = prose_number_problems(text)
    assert [p.split(": ", 1)[1].split(" in ")[0] for p in problems] == ["'502'", "'2.1×'"]


def test_tests_block_reads_the_recorded_run(tmp_path):
    import json

    from flipfrag import readme

    run = {"collected": 12, "outcomes": {"passed": 11, "failed": 1, "skipped": 0}, "selection": "tests/test_x.py",
           "duration_s": 42.4, "commit": "0123456789abcdef", "dirty": False, "machine": "x86_64, 2 CPUs",
           "threads": 2, "date": "2026-12-07"}  # fmt: skip
    path = readme.RESULTS / "_test_tmp_run.json"
    try:
        path.write_text(json.dumps(run))
        text = readme.render_tests(path)
    finally:
        path.unlink()
    assert "12 tests collected" in text and "11 passed, 1 failed" in text and "in 42 s" in text
    assert "`0123456`" in text and "`tests/test_x.py`" in text
    assert "No test run recorded" in readme.render_tests(readme.RESULTS / "_missing.json")


def test_a_nested_pytest_cannot_overwrite_the_run_summary():
    """`make test` asks for the summary through an environment variable; the session takes it out of the environment,
    so a pytest a test starts (tests/test_gpu.py does) writes none over this run's (CI once compared the README with a
    nested run's 16 skipped GPU tests)."""
    import os

    from conftest import SUMMARY_ENV

    assert SUMMARY_ENV not in os.environ


def test_flip_speed_rows_prefer_runs_with_every_peer(tmp_path, monkeypatch):
    """The README's flip-point speed row of a model comes from the latest results file, except that a row measured
    against every peer (FMN / DDN: it has ``goals``) is not replaced by a later one without them; its goals are the
    issue's (fastest qualifying peer, every peer's crossing), rendered from the row's own fields."""
    import copy
    import json

    from flipfrag import readme

    run = json.loads((readme.RESULTS / "flip.json").read_text())
    m = copy.deepcopy(run["models"][0])
    m["goals"].update(fastest_qualifying_peer="DDN", speedup_vs_fastest_qualifying=0.5, speed_2x=False,
                      never_farther=False, farther_than_1pct_of_a_crossing=3)  # fmt: skip
    old = {k: v for k, v in copy.deepcopy(m).items() if k != "goals"}
    old["ours_ms"] = 123.0
    (tmp_path / "flip.json").write_text(json.dumps({**run, "models": [m]}))
    (tmp_path / "flip_later.json").write_text(json.dumps({**run, "models": [old]}))
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    [(source, r, row)] = readme._flip_rows()
    assert source == "flip.json" and row["ours_ms"] == m["ours_ms"]
    text = readme._flip_row(source, r, row)
    assert "≥ 2x the fastest qualifying peer: **not met**" in text and "flipfrag 0.5x as fast" in text
    assert "none farther than 1.01 x any peer's crossing: **not met** (3 points)" in text
    newer = {**copy.deepcopy(m), "ours_ms": 7.0}
    (tmp_path / "flip_newer.json").write_text(json.dumps({**run, "models": [newer]}))
    [(source, _, row)] = readme._flip_rows()
    assert source == "flip_newer.json" and row["ours_ms"] == 7.0


def test_flip_speed_row_of_a_runner_up_run_without_deepfool(tmp_path, monkeypatch):
    """The ImageNet CNN's row (``bench_flip.py --only imagenet``) flips toward the runner-up class only and has no
    DeepFool peer: its README row says so and lists the peers it has, with flipfrag's peak memory."""
    import copy
    import json

    from flipfrag import readme

    run = json.loads((readme.RESULTS / "flip.json").read_text())
    m = copy.deepcopy(run["models"][0])
    del m["DeepFool"], m["speedup_vs_DeepFool"]
    m.update(target="runner-up", ours_peak_rss_gb=3.21, peers=[p for p in m["peers"] if p != "DeepFool"])
    (tmp_path / "flip_imagenet.json").write_text(json.dumps({**run, "models": [m]}))
    monkeypatch.setattr(readme, "RESULTS", tmp_path)
    [(source, r, row)] = readme._flip_rows()
    text = readme._flip_row(source, r, row)
    assert "toward the runner-up class" in text and "other classes" not in text
    assert "DeepFool" not in text and "FAB " in text and "peak memory 3.2 GB" in text
