"""The notebook runner behind `make figures`: selection, parameters, and a failing notebook failing the run."""

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from flipfrag import runner


def _notebook(path: Path, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('profile = "quick"\nseed = 0\nfigures_dir = "."')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture(autouse=True, scope="module")
def _repo_build_untouched():
    """The toy notebooks of these tests are executed into tmp_path, never into build/notebooks (which `make html`
    publishes as the project's site)."""
    build = runner.REPO_ROOT / "build" / "notebooks"

    def snapshot():
        return {p: p.stat().st_mtime_ns for p in build.rglob("*")} if build.exists() else {}

    before = snapshot()
    yield
    assert snapshot() == before, "a runner test wrote into build/notebooks"


@pytest.fixture
def nb_root(tmp_path):
    root = tmp_path / "notebooks"
    _notebook(root / "a" / "01_ok.ipynb", "from pathlib import Path\nPath(figures_dir, f'ok-{profile}-{seed}').touch()")
    _notebook(root / "b" / "02_fail.ipynb", "x = 1\nraise ValueError('deliberate failure 42')")
    return root


def test_find_notebooks_selects_by_prefix(nb_root):
    assert [p.name for p in runner.find_notebooks(nb_root)] == ["01_ok.ipynb", "02_fail.ipynb"]
    assert [p.name for p in runner.find_notebooks(nb_root, ["a"])] == ["01_ok.ipynb"]
    assert [p.name for p in runner.find_notebooks(nb_root, ["notebooks/b/02_fail.ipynb"])] == ["02_fail.ipynb"]
    with pytest.raises(ValueError, match="select"):
        runner.find_notebooks(nb_root, ["zzz"])


@pytest.mark.notebooks
def test_parameters_reach_the_notebook_and_failure_stops_the_run(nb_root, tmp_path, capsys):
    figs, out = tmp_path / "figs", tmp_path / "out"
    code = runner.main(["--profile", "smoke", "--seed", "5", "--root", str(nb_root), "--figures-dir", str(figs),
                        "--output-dir", str(out), "--select", "a"])  # fmt: skip
    assert code == 0 and (figs / "ok-smoke-5").exists() and (out / "a" / "01_ok.ipynb").exists()
    assert (figs / "REPRODUCTION.md").exists()
    code = runner.main(["--profile", "smoke", "--root", str(nb_root), "--figures-dir", str(figs),
                        "--output-dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "02_fail.ipynb" in err and "cell [3]" in err and "ValueError: deliberate failure 42" in err


@pytest.mark.notebooks
def test_make_figures_fails_on_a_failing_notebook(nb_root, tmp_path, repo):
    """`make figures` itself (the README command) exits non-zero and names the notebook and the error."""
    venv = Path(sys.prefix)
    if not (venv / ".flipfrag-installed").exists():
        pytest.skip("needs the Makefile's venv (run through `make test`)")
    env = {**os.environ, "MAKEFLAGS": ""}
    proc = subprocess.run(
        ["make", "-C", str(repo), "figures", f"VENV={venv}", "PROFILE=smoke", f"NOTEBOOK_ROOT={nb_root}",
         f"FIGURES={tmp_path / 'figs'}", f"EXECUTED={tmp_path / 'executed'}"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "02_fail.ipynb" in proc.stderr and "deliberate failure 42" in proc.stderr
    assert (tmp_path / "figs" / "ok-smoke-0").exists()  # the notebook before it ran
    assert (tmp_path / "executed" / "a" / "01_ok.ipynb").exists()  # executed copies go to EXECUTED=


def _scheduler_notebook(path: Path, declares: bool) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = 'profile = "quick"\nseed = 0\nfigures_dir = "."' + ("\nscheduler = None" if declares else "")
    params = nbformat.v4.new_code_cell(source)
    params.metadata["tags"] = ["parameters"]
    env = 'os.environ.get("FLIPFRAG_SCHEDULER")'
    body = ("import os\nfrom pathlib import Path\n"
            "param = scheduler if 'scheduler' in globals() else 'undeclared'\n"
            f"Path(figures_dir, f'{path.stem}|{{param}}|{{{env}}}').touch()")  # fmt: skip
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.mark.notebooks
def test_scheduler_reaches_kernels_as_env_and_declaring_notebooks_as_parameter(tmp_path, monkeypatch):
    """`make figures SCHEDULER=local:3`: every kernel sees FLIPFRAG_SCHEDULER (normalised); only a notebook whose
    parameters cell declares `scheduler` gets the papermill parameter; the runner's own environment is restored."""
    monkeypatch.delenv("FLIPFRAG_SCHEDULER", raising=False)
    root = tmp_path / "notebooks"
    _scheduler_notebook(root / "a_declares.ipynb", True)
    _scheduler_notebook(root / "b_plain.ipynb", False)
    figs = tmp_path / "figs"
    code = runner.main(["--profile", "smoke", "--root", str(root), "--figures-dir", str(figs), "--output-dir",
                        str(tmp_path / "out"), "--scheduler", "local:03"])  # fmt: skip
    assert code == 0
    marks = sorted(p.name for p in figs.iterdir() if "|" in p.name)
    assert marks == ["a_declares|local:3|local:3", "b_plain|undeclared|local:3"]
    assert "FLIPFRAG_SCHEDULER" not in os.environ
    for name, injected in [("a_declares", True), ("b_plain", False)]:
        nb = nbformat.read(tmp_path / "out" / f"{name}.ipynb", as_version=4)
        (cell,) = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert ('scheduler = "local:3"' in cell.source) is injected, cell.source


def test_bad_or_unreachable_scheduler_stops_before_the_first_notebook(nb_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLIPFRAG_SCHEDULER_TIMEOUT", "2")
    figs = tmp_path / "figs"
    for sched, message in [("locl:2", "is not a scheduler"), ("tcp://127.0.0.1:1", "tcp://127.0.0.1:1")]:
        code = runner.main(["--profile", "smoke", "--root", str(nb_root), "--figures-dir", str(figs),
                            "--output-dir", str(tmp_path / "out"), "--scheduler", sched])  # fmt: skip
        assert code == 1 and message in capsys.readouterr().err
    assert not (figs / "ok-smoke-0").exists()  # no notebook ran


# ------------------------------------------------------------------------------------------ threads


def test_import_flipfrag_changes_no_thread_count():
    """`import flipfrag` (and its modules) leaves the caller's torch thread count alone, even with the env set."""
    code = ("import torch; torch.set_num_threads(3); import flipfrag, flipfrag.attacks, flipfrag.flip; "
            "print(torch.get_num_threads())")  # fmt: skip
    env = {**os.environ, "FLIPFRAG_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "3"


@pytest.fixture
def restore_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads(monkeypatch, restore_threads):
    import torch

    import flipfrag

    assert flipfrag.set_threads(1) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("FLIPFRAG_THREADS", "2")
    assert flipfrag.set_threads() == 2 and torch.get_num_threads() == 2
    monkeypatch.delenv("FLIPFRAG_THREADS")
    torch.set_num_threads(1)
    assert flipfrag.set_threads() == 1  # no count, no env: torch's setting untouched
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="n must"):
            flipfrag.set_threads(bad)
    monkeypatch.setenv("FLIPFRAG_THREADS", "two")
    with pytest.raises(ValueError, match="FLIPFRAG_THREADS"):
        flipfrag.set_threads()


def test_start_run_applies_the_env_thread_count(monkeypatch, tmp_path, restore_threads):
    import torch

    from flipfrag import plotting

    torch.set_num_threads(2)
    monkeypatch.setenv("FLIPFRAG_THREADS", "1")
    plotting.start_run("t", profile="smoke", seed=0, figures_dir=tmp_path)
    assert torch.get_num_threads() == 1


@pytest.mark.notebooks
def test_runner_passes_the_thread_count_to_the_kernel(tmp_path, monkeypatch):
    body = ("import torch\nfrom pathlib import Path\nfrom flipfrag import plotting\n"
            "plotting.start_run('t', profile=profile, seed=seed, figures_dir=figures_dir)\n"
            "Path(figures_dir, 'threads').write_text(str(torch.get_num_threads()))")  # fmt: skip
    nb = _notebook(tmp_path / "nb" / "t.ipynb", body)
    monkeypatch.setenv("FLIPFRAG_THREADS", "2")
    runner.run_notebook(nb, profile="smoke", figures_dir=tmp_path / "f", output_dir=tmp_path / "o", threads=1)
    assert (tmp_path / "f" / "threads").read_text() == "1"
    assert os.environ["FLIPFRAG_THREADS"] == "2"  # restored for the caller
    with pytest.raises(ValueError, match="threads"):
        runner.run_notebook(nb, profile="smoke", figures_dir=tmp_path / "f", output_dir=tmp_path / "o", threads=0)


def test_a_bad_device_stops_the_run_before_any_notebook(tmp_path):
    from flipfrag import runner

    with pytest.raises(ValueError, match="tpu"):
        runner.run_all(profile="smoke", figures_dir=tmp_path / "f", output_dir=tmp_path / "o", root=tmp_path,
                       device="tpu")  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_the_beyond_notebooks_run_last(tmp_path):
    """They read the fragility notebooks' cached attack cells, so they come after every other folder."""
    for rel in ("00_top.ipynb", "beyond/01_a.ipynb", "fragility/04_b.ipynb", "zeta/01_c.ipynb"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        _notebook(tmp_path / rel, "x = 1")
    names = [str(p.relative_to(tmp_path)) for p in runner.find_notebooks(tmp_path)]
    assert names == ["00_top.ipynb", "fragility/04_b.ipynb", "zeta/01_c.ipynb", "beyond/01_a.ipynb"]
