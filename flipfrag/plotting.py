"""One figure style for every notebook, and the only way figures and tables are written.

Usage in a notebook (after its ``parameters`` cell)::

    from flipfrag import plotting
    run = plotting.start_run("flip_points/confidence", profile=profile, seed=seed, figures_dir=figures_dir,
                             parameters=dict(profile=profile, seed=seed), substitutions="MNIST-5k for MNIST")
    fig, ax = plotting.subplots()
    ...
    plotting.save_figure(fig, "flip_points/fig_confidence")      # figures/flip_points/fig_confidence.png + .pdf
    plotting.save_table(df, "flip_points/table_confidence")      # .csv + .md

Every save writes the files atomically and records an entry in ``<figures_dir>/MANIFEST.json``:
``{"id", "files", "notebook", "profile", "parameters", "seed", "runtime_s", "created"}`` (``runtime_s`` = seconds
since :func:`start_run` when the item was saved). :func:`finish_run` records the notebook's total runtime under
``"notebooks"``. Each figure carries a footer line naming its id, profile, seed and any substitution.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from ._io import atomic_write, atomic_write_json

__all__ = [
    "set_style",
    "subplots",
    "start_run",
    "finish_run",
    "current_run",
    "save_figure",
    "save_table",
    "figures_dir",
    "read_manifest",
    "Run",
    "PALETTE",
]

PALETTE = {
    "gradient": "#1f77b4",
    "integrated_gradients": "#2ca02c",
    "deeplift": "#d62728",
    "lrp": "#9467bd",
    "topk": "#d62728",
    "center": "#ff7f0e",
    "random": "#7f7f7f",
    "targeted": "#17becf",
    "correct": "#1f77b4",
    "misclassified": "#d62728",
}

REPO_ROOT = Path(__file__).resolve().parent.parent


def set_style() -> None:
    """The shared seaborn style: white grid, readable font sizes, 150-dpi PNGs, tight bounding boxes."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="deep", font_scale=1.0)
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "image.cmap": "viridis",
            "pdf.fonttype": 42,
        }
    )


def subplots(*args: Any, **kwargs: Any):
    """``plt.subplots`` with the shared style applied and ``constrained_layout`` on."""
    set_style()
    kwargs.setdefault("layout", "constrained")
    return plt.subplots(*args, **kwargs)


@dataclass
class Run:
    """What a notebook records about itself with every figure it saves."""

    notebook: str
    profile: str
    seed: int
    figures_dir: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    substitutions: str | None = None
    started: float = field(default_factory=time.perf_counter)
    #: :func:`code_version` at the start of the run (commit, dirty flag, hashes of flipfrag's and the notebook's source)
    code: dict[str, Any] = field(default_factory=dict)
    #: per kind of cached work unit ("attack-grid cells", "flip points ..."): {"cached", "computed", "code"}
    cache_use: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ids of the claims recorded by this run (:func:`flipfrag.report.record_claim`): at :func:`finish_run` the
    #: notebook's other claims in claims.json (from an earlier run with other sizes) are removed as stale
    claims: set[str] = field(default_factory=set)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


_RUN: Run | None = None


def _git(*args: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_hash(notebook: str | None = None) -> dict[str, str | None]:
    """sha256 (16 hex) of flipfrag's source (every ``.py`` of the package) and of ``notebooks/<notebook>.ipynb``
    (None if there is no such file): what a figure's code is, independent of git."""
    from ._io import sha256_files

    package = Path(__file__).resolve().parent
    files = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    nb = REPO_ROOT / "notebooks" / f"{notebook}.ipynb" if notebook else None
    return {"flipfrag": sha256_files(files)[:16],
            "notebook": sha256_files([nb])[:16] if nb is not None and nb.exists() else None}  # fmt: skip


def code_version(notebook: str | None = None) -> dict[str, Any]:
    """The code a figure is made with: git ``commit`` (None outside a git checkout), ``dirty`` (uncommitted changes
    to tracked files under flipfrag/ or notebooks/), and the :func:`source_hash` of flipfrag and the notebook."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "flipfrag", "notebooks")
    return {"commit": commit, "dirty": bool(dirty) if dirty is not None else None, **source_hash(notebook)}


def note_cache_use(kind: str, *, cached: int, computed: int, code: str = "") -> None:
    """Count a batch of cached work units (attack-grid cells, flip-point shards) for the MANIFEST of the current
    run: how many came from the cache and how many were computed, and the source hash of the code they depend on
    (part of their cache key, so cached and computed units alike come from that code). No run: nothing."""
    if _RUN is None:
        return
    use = _RUN.cache_use.setdefault(kind, {"cached": 0, "computed": 0, "code": []})
    use["cached"] += int(cached)
    use["computed"] += int(computed)
    if code and code not in use["code"]:
        use["code"].append(code)


def figures_dir(path: str | os.PathLike | None = None) -> Path:
    """The output folder: ``path``, else ``$FLIPFRAG_FIGURES``, else ``figures/`` in the repository."""
    return Path(path or os.environ.get("FLIPFRAG_FIGURES") or REPO_ROOT / "figures").resolve()


def start_run(
    notebook: str,
    *,
    profile: str,
    seed: int,
    figures_dir: str | os.PathLike | None = None,
    parameters: dict[str, Any] | None = None,
    substitutions: str | None = None,
) -> Run:
    """Start recording for a notebook (call right after the parameters cell). Applies the figure style and the
    thread count of ``$FLIPFRAG_THREADS`` if set (:func:`flipfrag.set_threads`; the runner and ``make`` set it)."""
    from . import set_threads
    from .profiles import get_profile

    get_profile(profile)  # validates the name
    set_threads()
    global _RUN
    set_style()
    _RUN = Run(
        notebook=notebook,
        profile=profile,
        seed=int(seed),
        figures_dir=globals()["figures_dir"](figures_dir),
        parameters=dict(parameters or {}),
        substitutions=substitutions,
        code=code_version(notebook),
    )
    _RUN.figures_dir.mkdir(parents=True, exist_ok=True)
    return _RUN


def current_run() -> Run:
    if _RUN is None:
        raise RuntimeError("no run started: call flipfrag.plotting.start_run(...) after the parameters cell")
    return _RUN


def read_json_store(path: Path, sections: tuple[str, ...]) -> dict[str, Any]:
    """Read a JSON file made of named dict sections (MANIFEST.json, claims.json); validated, empty if missing."""
    if not path.exists():
        return {s: {} for s in sections}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it and re-run `make figures`") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(s), dict) for s in sections):
        raise ValueError(f"{path} does not have the expected sections {list(sections)}")
    return data


@contextlib.contextmanager
def locked_json_store(path: Path, sections: tuple[str, ...]):
    """Read-modify-write a JSON store under an exclusive lock (notebooks may run in parallel); atomic write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        data = read_json_store(path, sections)
        yield data
        atomic_write_json(path, {s: dict(sorted(data[s].items())) for s in sections})


_MANIFEST_SECTIONS = ("entries", "notebooks")


def read_manifest(folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """The MANIFEST of a figures folder: ``{"entries": {id: entry}, "notebooks": {name: info}}``."""
    return read_json_store(figures_dir(folder) / "MANIFEST.json", _MANIFEST_SECTIONS)


def _split_id(item_id: str) -> tuple[str, str]:
    parts = item_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c in item_id for c in " \\.."):
        raise ValueError(f"id must look like '<paper>/<name>' (e.g. 'flip_points/fig_confidence'), got {item_id!r}")
    return parts[0], parts[1]


def _record(item_id: str, files: list[Path], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    run = current_run()
    entry = {
        "id": item_id,
        "files": [str(f.relative_to(run.figures_dir)) for f in files],
        "notebook": run.notebook,
        "profile": run.profile,
        "parameters": run.parameters,
        "seed": run.seed,
        "runtime_s": round(run.elapsed, 2),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "code": run.code,
        # the cached work units the notebook had used when the figure was saved (its figures draw on them)
        "cache": {k: {**v, "code": list(v["code"])} for k, v in run.cache_use.items()},
        **(extra or {}),
    }
    with locked_json_store(run.figures_dir / "MANIFEST.json", _MANIFEST_SECTIONS) as manifest:
        manifest["entries"][item_id] = entry
    return entry


def _footer(item_id: str) -> str:
    run = current_run()
    text = f"flipfrag {item_id} · profile={run.profile} · seed={run.seed}"
    if run.substitutions:
        text += f" · substitute: {run.substitutions}"
    return text


def save_figure(fig, item_id: str, *, footer: bool = True) -> dict[str, Any]:
    """Write ``fig`` as ``<figures_dir>/<paper>/<name>.png`` and ``.pdf`` and record it in the MANIFEST."""
    paper, name = _split_id(item_id)
    run = current_run()
    folder = run.figures_dir / paper
    if footer:
        # wrapped to the figure's width (~19 characters of 7-pt text per inch), so that a long substitution note
        # does not widen the saved (tight) figure beyond its panels
        text = textwrap.fill(_footer(item_id), width=max(40, int(19 * fig.get_figwidth())))
        fig.text(0.0, -0.01, text, fontsize=7, color="0.4", ha="left", va="top", transform=fig.transFigure)
    files = []
    for ext in ("png", "pdf"):
        path = folder / f"{name}.{ext}"
        # PDF metadata carries a timestamp by default; drop it so reruns give identical files
        meta = {"CreationDate": None} if ext == "pdf" else {"Software": None}
        atomic_write(path, lambda tmp, ext=ext, meta=meta: fig.savefig(tmp, format=ext, metadata=meta))
        files.append(path)
    return _record(item_id, files)


def save_table(df: pd.DataFrame, item_id: str, *, float_format: str = "%.4g", caption: str | None = None
               ) -> dict[str, Any]:  # fmt: skip
    """Write ``df`` as ``<paper>/<name>.csv`` and ``.md`` (a Markdown table with a caption line) and record it."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    paper, name = _split_id(item_id)
    run = current_run()
    folder = run.figures_dir / paper
    csv_path, md_path = folder / f"{name}.csv", folder / f"{name}.md"
    atomic_write(csv_path, lambda tmp: df.to_csv(tmp, index=False, float_format=float_format))
    md = f"**{item_id}** — {caption or ''}\n\n" if caption else f"**{item_id}**\n\n"
    md += df.to_markdown(index=False, floatfmt=float_format.lstrip("%")) + f"\n\n_{_footer(item_id)}_\n"
    atomic_write(md_path, lambda tmp: tmp.write_text(md))
    return _record(item_id, [csv_path, md_path])


def finish_run() -> dict[str, Any]:
    """Record the notebook's total runtime (seconds) in the MANIFEST's ``notebooks`` section."""
    run = current_run()
    info = {
        "profile": run.profile,
        "seed": run.seed,
        "runtime_s": round(run.elapsed, 2),
        "finished": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "code": run.code,
        "cache": {k: {**v, "code": list(v["code"])} for k, v in run.cache_use.items()},
    }
    with locked_json_store(run.figures_dir / "MANIFEST.json", _MANIFEST_SECTIONS) as manifest:
        manifest["notebooks"][run.notebook] = info
    claims_path = run.figures_dir / "claims.json"
    if claims_path.exists():  # a claim this notebook no longer makes (e.g. an epsilon its profile dropped) goes
        with locked_json_store(claims_path, ("claims", "substitutions")) as store:
            stale = [cid for cid, c in store["claims"].items()
                     if c.get("notebook") == run.notebook and cid not in run.claims]  # fmt: skip
            for cid in stale:
                del store["claims"][cid]
        info["stale_claims_removed"] = stale
    return info


def stale_figures(folder: str | os.PathLike | None = None) -> dict[str, str]:
    """Figures and tables of a MANIFEST whose code changed after they were made: ``{id: why}`` — the recorded
    source hash of flipfrag or of the notebook differs from the current one, or none was recorded. Empty: every
    figure was made by the code in this checkout."""
    out = {}
    current: dict[str, dict[str, str | None]] = {}
    for item_id, e in read_manifest(folder)["entries"].items():
        code = e.get("code") or {}
        if not code.get("flipfrag"):
            out[item_id] = "no code version recorded (made before provenance was recorded)"
            continue
        now = current.setdefault(e["notebook"], source_hash(e["notebook"]))
        why = [f"{what} source {code.get(what)} -> {now[what]}" for what in ("flipfrag", "notebook")
               if code.get(what) != now[what]]  # fmt: skip
        if why:
            out[item_id] = "; ".join(why)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="List figures whose code changed after they were made")
    parser.add_argument("--figures-dir", default=None)
    args = parser.parse_args(argv)
    stale = stale_figures(args.figures_dir)
    for item_id, why in stale.items():
        print(f"{item_id}: {why}")
    n = len(read_manifest(args.figures_dir)["entries"])
    print(f"{len(stale)} of {n} figures/tables made by other code than this checkout's" if stale else
          f"all {n} figures/tables made by this checkout's code")  # fmt: skip
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
