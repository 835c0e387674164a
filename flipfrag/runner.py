"""Run the notebooks with papermill: ``python -m flipfrag.runner --profile quick [--select flip_points ...]``.

Each notebook under ``notebooks/`` is executed with kernel ``python3`` and the parameters ``profile``, ``seed`` and
``figures_dir``; the executed copy goes to ``build/notebooks/<same path>``. The kernel gets ``FLIPFRAG_THREADS``
(``--threads``, else the caller's ``$FLIPFRAG_THREADS``, else 2), which each notebook's ``plotting.start_run`` applies
with :func:`flipfrag.set_threads`.

``--scheduler`` (``make figures SCHEDULER=...``; default ``$FLIPFRAG_SCHEDULER``) says where the heavy work runs
(:mod:`flipfrag.engine`: ``serial``, ``local:N``, ``tcp://host:port``). It is checked before the first notebook (a
``tcp://`` scheduler that does not answer stops the run at once), then given to every kernel as the environment
variable ``FLIPFRAG_SCHEDULER`` — which :func:`flipfrag.engine.run_tasks` reads, so a notebook needs no change — and,
to notebooks whose parameters cell declares ``scheduler``, also as that papermill parameter (so the executed copy
shows it). Notebooks that do not declare it get no unknown parameter injected.

A failing notebook stops the run with its name, the failing cell's number and the error, and a non-zero exit code.
After a successful run, ``<figures_dir>/REPRODUCTION.md`` is regenerated, and for the repository's own ``figures/``
also the generated blocks of ``README.md`` (headline claims, runtimes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._options import Options

__all__ = ["NotebookFailed", "find_notebooks", "run_notebook", "KernelOptions", "run_all", "main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Torch threads of a notebook's kernel when neither ``threads=`` nor ``$FLIPFRAG_THREADS`` says otherwise.
DEFAULT_THREADS = 2


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names the notebook, the cell and the error."""


@dataclass
class NotebookRun:
    path: Path
    output: Path
    seconds: float


#: The notebook folder run after all others (its notebooks reuse the others' caches).
LAST_FOLDER = "beyond"


def find_notebooks(root: str | Path = REPO_ROOT / "notebooks", select: list[str] | None = None) -> list[Path]:
    """Notebooks under ``root`` (sorted; the :data:`LAST_FOLDER` folder last), optionally only those whose relative
    path starts with one of ``select`` (e.g. ``flip_points`` or ``fragility/01``; a trailing ``.ipynb`` is
    optional)."""
    root = Path(root)
    # the beyond/ studies build on both papers' notebooks and read their cached attack cells: run them last
    found = sorted((p for p in root.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts),
                   key=lambda p: (p.relative_to(root).parts[0] == LAST_FOLDER, p))  # fmt: skip
    if not select:
        return found
    keys = [s.removeprefix("notebooks/").removesuffix(".ipynb") for s in select]
    chosen = [p for p in found if any(str(p.relative_to(root)).startswith(k) for k in keys)]
    if not chosen:
        raise ValueError(f"select: no notebook under {root} matches {select}")
    return chosen


def _failure_message(path: Path, output: Path, err: Exception) -> str:
    # exec_count numbers the cells of the executed copy, which has papermill's injected-parameters cell
    cell = getattr(err, "exec_count", None)
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    where = f"cell [{cell}]" if cell is not None else "a cell"
    return f"notebook {path} failed in {where}: {ename}: {evalue}\n  (executed copy with the traceback: {output})"


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """Set ``name`` for the kernels started inside (they inherit this process's environment), then restore it."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@dataclass(frozen=True)
class KernelOptions(Options):
    """How :func:`run_notebook` runs a notebook's kernel (its ``options``; keywords override the fields).

    ``kernel``: the Jupyter kernel name; ``progress``: papermill's progress bar; ``scheduler`` (None: leave
    ``$FLIPFRAG_SCHEDULER`` as it is): set as the kernel's ``FLIPFRAG_SCHEDULER`` and passed as the parameter
    ``scheduler`` if the notebook's parameters cell declares it; ``threads``: torch threads in the kernel (passed as
    ``$FLIPFRAG_THREADS``; default: the caller's ``$FLIPFRAG_THREADS``, else :data:`DEFAULT_THREADS`); ``device``
    (None: leave ``$FLIPFRAG_DEVICE`` as it is): set as the kernel's ``FLIPFRAG_DEVICE``, where the attack-grid
    cells and flip-point shards compute ("cpu", "cuda", "auto")."""

    kernel: str = "python3"
    progress: bool = False
    scheduler: str | None = None
    threads: int | None = None
    device: str | None = None


def run_notebook(
    path: str | Path,
    *,
    profile: str,
    seed: int = 0,
    figures_dir: str | Path,
    output_dir: str | Path,
    root: str | Path = REPO_ROOT / "notebooks",
    options: KernelOptions | None = None,
    **overrides: Any,
) -> NotebookRun:
    """Execute one notebook with papermill; raise :class:`NotebookFailed` naming the cell and the error.

    ``kernel``, ``progress``, ``scheduler``, ``threads`` and ``device`` are the fields of :class:`KernelOptions`
    (``options``), given as keywords."""
    import papermill as pm

    from . import THREADS_ENV
    from .engine import DEVICE_ENV, SCHEDULER_ENV, default_device, parse_scheduler

    opts = KernelOptions.resolve(options, overrides)
    kernel, progress, scheduler, threads, device = opts.kernel, opts.progress, opts.scheduler, opts.threads, opts.device
    path, root = Path(path).resolve(), Path(root).resolve()
    rel = path.relative_to(root) if path.is_relative_to(root) else Path(path.name)
    output = Path(output_dir) / rel
    output.parent.mkdir(parents=True, exist_ok=True)
    Path(figures_dir).mkdir(parents=True, exist_ok=True)
    params = {"profile": profile, "seed": int(seed), "figures_dir": str(Path(figures_dir).resolve())}
    if device is not None:
        device = str(default_device(device))
    if scheduler is not None:
        scheduler = parse_scheduler(scheduler)
        if "scheduler" in pm.inspect_notebook(str(path)):
            params["scheduler"] = scheduler
    start = time.perf_counter()
    n = threads if threads is not None else os.environ.get(THREADS_ENV) or DEFAULT_THREADS
    if isinstance(n, str):
        n = int(n) if n.strip().isdigit() else -1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer (or ${THREADS_ENV}), got {threads!r}")
    try:
        with _environment(SCHEDULER_ENV, scheduler), _environment(THREADS_ENV, str(n)), \
                _environment(DEVICE_ENV, device):
            pm.execute_notebook(
                str(path), str(output), parameters=params, kernel_name=kernel, progress_bar=progress,
                cwd=str(path.parent), log_output=False,
            )  # fmt: skip
    except pm.PapermillExecutionError as err:
        raise NotebookFailed(_failure_message(path, output, err)) from None
    return NotebookRun(path, output, time.perf_counter() - start)


def run_all(
    *,
    profile: str,
    seed: int = 0,
    select: list[str] | None = None,
    figures_dir: str | Path = REPO_ROOT / "figures",
    output_dir: str | Path = REPO_ROOT / "build" / "notebooks",
    root: str | Path = REPO_ROOT / "notebooks",
    scheduler: str | None = None,
    threads: int | None = None,
    device: str | None = None,
) -> list[NotebookRun]:
    """Run the selected notebooks in order, stop at the first failure, then write REPRODUCTION.md.

    ``scheduler`` is checked first (:func:`flipfrag.engine.check_scheduler`), then passed to every notebook."""
    from .engine import check_scheduler, default_device
    from .report import update_readme, write_reproduction

    if scheduler is not None:
        scheduler = check_scheduler(scheduler)
        print(f"scheduler: {scheduler}", flush=True)
    if device is not None:  # checked before the first notebook starts
        device = str(default_device(device))
        print(f"device: {device}", flush=True)

    runs = []
    notebooks = find_notebooks(root, select)
    base = Path(root).resolve().parent
    for i, nb in enumerate(notebooks, 1):
        name = nb.relative_to(base) if nb.is_relative_to(base) else nb
        print(f"[{i}/{len(notebooks)}] {name} (profile={profile}, seed={seed}) ...", flush=True)
        run = run_notebook(nb, profile=profile, seed=seed, figures_dir=figures_dir, output_dir=output_dir, root=root,
                           scheduler=scheduler, threads=threads, device=device)  # fmt: skip
        print(f"      done in {run.seconds:.1f} s -> {run.output}", flush=True)
        runs.append(run)
    Path(figures_dir).mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_reproduction(figures_dir)}")
    if Path(figures_dir).resolve() == (REPO_ROOT / "figures").resolve():  # the committed figures: README follows
        print(f"wrote {update_readme(folder=figures_dir)} (headline claims and runtimes)")
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("PROFILE", "quick"), choices=["smoke", "quick", "paper"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--select", nargs="*", default=None, help="notebook path prefixes, e.g. flip_points")
    parser.add_argument("--figures-dir", default=str(REPO_ROOT / "figures"))
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "build" / "notebooks"))
    parser.add_argument("--root", default=str(REPO_ROOT / "notebooks"))
    parser.add_argument(
        "--scheduler",
        default=os.environ.get("FLIPFRAG_SCHEDULER") or None,
        help="where heavy work runs: serial, local:N or tcp://host:port (default $FLIPFRAG_SCHEDULER)",
    )
    parser.add_argument(
        "--device",
        default=os.environ.get("FLIPFRAG_DEVICE") or None,
        help="where grid cells and flip-point shards compute: cpu (default), cuda or auto ($FLIPFRAG_DEVICE)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per notebook (default $FLIPFRAG_THREADS or 2)"
    )
    args = parser.parse_args(argv)
    from .engine import SchedulerError

    start = time.perf_counter()
    try:
        runs = run_all(profile=args.profile, seed=args.seed, select=args.select or None, figures_dir=args.figures_dir,
                       output_dir=args.output_dir, root=args.root, scheduler=args.scheduler,
                       threads=args.threads, device=args.device)  # fmt: skip
    except (NotebookFailed, ValueError, SchedulerError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    print(f"{len(runs)} notebook(s) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
