"""Paper-scale F3 on the ImageNet CNN from committed grid cells (computed where compute is, checked where it is read).

The quick profile computes F3 on EfficientNet-Lite0 live, on one photo and a few iterations (what fits a 20-minute
build on two cores). The larger grid of :data:`SCALE_GRID` — 16 photos x 50 iterations for SG, DeepLIFT and DTD at
every ε, and IG with 16 steps at ε = 8 — costs about 0.7 / 1.7 / 1.0 s per image-iteration for SG / DeepLIFT / DTD
on that machine (IG: ~16x SG), i.e. CPU-hours. It is split into *cells*: one (method, attack, ε) on one chunk of 4
photos. Each cell is computed by :func:`run_cells` (``python -m flipfrag.fragility.cells run``, ``make cells``)
wherever compute is available — a CPU in the background across sessions, a GPU with ``--device cuda`` — and
written, as soon as it is done, to the committed folder ``results/cells/imagenet/`` (:func:`cells_dir`):

* ``cell-<key>.json``: the grid rows, as the cache of :func:`~flipfrag.fragility.grid.run_attack_grid` writes them
  (same key: weights, photos, the cell's settings and the source of the code that computes it);
* ``cell-<key>.provenance.json``: the code version, settings, photos, device, dtype, torch version, threads, wall
  time, the sha256 of the cell file, and every iterate's metrics per photo (the attack's history).

:func:`load_scale_grid` reads only the cells whose key matches the current code and settings (a stale cell — other
code — is counted and ignored; a corrupt one, or one whose provenance does not match it, raises), and says which
(method, attack, ε) are complete. :func:`verify_cell` recomputes a cell on the reading machine: a random-sign or
ε = 0 cell whole, an iterative one for its first iterations, compared with the committed history within stated
tolerances, so that a forged or edited cell cannot pass (``tests/test_cells.py`` checks a sample of them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .._io import atomic_write_json, sha256_file, tensor_hash
from .grid import (
    CELL_COLUMNS,
    GridCacheError,
    GridSpec,
    _code_version,
    _jsonable,
    _run_cell,
    load_grid_cell,
    save_grid_cell,
)
from .paper import ATTACKS, METRICS
from .settings import ImageSetting

#: The committed paper-scale grid on the ImageNet CNN (issue 21): at least 16 photos x 50 iterations for SG, DeepLIFT
#: and DTD at every ε, IG with 16 steps at ε = 8. Step 1/255 (the paper's 0.5/255 over 300 iterations travels 150/255;
#: 50 steps of 1/255 travel 50/255, six times the largest ε) and the surrogate's β = 10 chosen by fidelity on held-out
#: photos (notebook fragility/03). Seed 0 draws the random-sign noise; the 16 photos are the first correctly
#: classified shipped ImageNet photos at 224 x 224.
SCALE_GRID: dict[str, Any] = {
    "n_images": 16,
    "chunk": 4,
    "iters": 50,
    "step": 1 / 255,
    "beta": 10.0,
    "epsilons": (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255),
    "methods": ("gradient", "deeplift", "dtd"),
    "ig_steps": 16,
    "ig_epsilons": (0.0, 8 / 255),
    "ig_internal_batch": 64,
    "seed": 0,
}

#: Recomputation tolerances of :func:`verify_cell` (absolute, per photo and iterate): top-k ∩ and Spearman ρ 0.02
#: (20 of k = 1000 pixels), center shift 8 px of 224. :func:`verify_cell` recomputes with the torch thread count the
#: provenance records, and then agrees exactly on the committing machine; float reductions in another thread count or
#: BLAS flip the sign of near-zero gradient entries, which moves the trajectory: measured with 2 threads against a
#: 1-thread cell after 2 iterations, ∩ 0.003, ρ 0.008, center 4.5 px (a forged history is off by far more).
VERIFY_TOL = {"topk": 0.02, "spearman": 0.02, "center": 8.0}


def _recorded_threads(prov: dict[str, Any]) -> int | None:
    """The torch thread count a cell was computed with (from its provenance's device text), if on a CPU."""
    import re

    m = re.search(r"(\d+) torch threads", str(prov.get("device", "")))
    return int(m.group(1)) if m else None


def cells_dir() -> Path:
    """The committed cells' folder: ``$FLIPFRAG_CELLS`` or ``<repository>/results/cells/imagenet``."""
    env = os.environ.get("FLIPFRAG_CELLS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "results" / "cells" / "imagenet"


@dataclass(frozen=True)
class ScaleCell:
    """One unit of work: (method, attack, eps) on photos ``images`` of the scale setting, with its cache key."""

    method: str
    attack: str
    eps: float
    chunk: int
    images: tuple[int, ...]
    key: str

    @property
    def name(self) -> str:
        return f"{self.method}/{self.attack}/eps255={self.eps * 255:g}/photos {self.images[0]}-{self.images[-1]}"

    @property
    def iterative(self) -> bool:
        return self.eps > 0 and self.attack != "random"


def scale_setting() -> ImageSetting:
    """The photos and model of the committed grid: EfficientNet-Lite0 (folded) on the first 16 correctly classified
    shipped ImageNet photos at 224 x 224 (the quick profile's setting with n = 16, seed 0)."""
    from ..profiles import get_profile
    from .settings import efficientnet_setting

    return efficientnet_setting(get_profile("quick"), n=SCALE_GRID["n_images"], seed=SCALE_GRID["seed"])


def scale_spec(setting: ImageSetting) -> GridSpec:
    """The :class:`GridSpec` of the committed grid (all four methods; IG's epsilons are restricted by :func:`plan`)."""
    g = SCALE_GRID
    return GridSpec(k=setting.k, methods=(*g["methods"], "integrated_gradients"), attacks=ATTACKS,
                    epsilons=g["epsilons"], iters=g["iters"], step=g["step"], beta=g["beta"],
                    method_kwargs=setting.method_kwargs(g["ig_steps"], g["ig_internal_batch"]), floor_center=False,
                    seed=g["seed"], batch_size=None)  # fmt: skip


def _priority(method: str, attack: str, eps255: float) -> tuple:
    """Cheap cells first (ε = 0, random sign), then the headline (top-k and center at ε = 8, SG first), then the
    smaller epsilons, IG last (16 interpolants per step)."""
    cheap = eps255 == 0 or attack == "random"
    order = {"gradient": 0, "dtd": 1, "deeplift": 2, "integrated_gradients": 3}[method]
    attack_order = {"topk": 0, "center": 1, "random": 2}[attack]
    if cheap:
        return (0, order, attack_order, eps255)
    if method == "integrated_gradients":
        return (4, attack_order, -eps255)
    tier = 1 if eps255 == 8 and (method == "gradient" or attack == "topk") else (2 if method == "gradient" else 3)
    return (tier, order, -eps255, attack_order)


def plan(setting: ImageSetting | None = None, spec: GridSpec | None = None) -> list[ScaleCell]:
    """Every cell of the committed grid, in the order :func:`run_cells` computes them (ε = 0 is one cell per method
    and chunk, shared by the attacks, keyed with attack ``"topk"``)."""
    setting = scale_setting() if setting is None else setting
    spec = scale_spec(setting) if spec is None else spec
    g = SCALE_GRID
    code = _code_version()
    combos = []
    for method in spec.methods:
        epsilons = g["ig_epsilons"] if method == "integrated_gradients" else spec.epsilons
        for eps in epsilons:
            for attack in ("topk",) if eps == 0 else spec.attacks:
                combos.append((method, attack, float(eps)))
    combos.sort(key=lambda c: _priority(c[0], c[1], round(c[2] * 255, 6)))
    n, size = len(setting.x), int(g["chunk"])
    key_of = _keyer(setting.model)
    cells = []
    for method, attack, eps in combos:
        for c, start in enumerate(range(0, n, size)):
            idx = tuple(range(start, min(start + size, n)))
            x, y = setting.x[list(idx)], setting.y[list(idx)]
            key = key_of(x, y, {**spec.cell_settings(method, attack, eps), "code": code})
            cells.append(ScaleCell(method, attack, eps, c, idx, key))
    return cells


def _keyer(model: torch.nn.Module):
    """:func:`~flipfrag.fragility.grid.grid_cache_key` for one model and many cells, hashing the weights once (the
    sha256 state after the weights is copied per cell): the same bytes, so the same keys (a test checks both agree).
    ``grid_cache_key`` itself is part of the hashed cell code, so it stays unchanged."""
    h0 = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h0.update(name.encode())
        h0.update(tensor_hash(t.detach().cpu()).encode())

    def key(x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any]) -> str:
        h = h0.copy()
        h.update(tensor_hash(x.detach().cpu(), y.detach().cpu()).encode())
        h.update(json.dumps(_jsonable(settings), sort_keys=True).encode())
        return h.hexdigest()[:24]

    return key


def _paths(folder: Path, key: str) -> tuple[Path, Path]:
    return folder / f"cell-{key}.json", folder / f"cell-{key}.provenance.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def compute_cell(cell: ScaleCell, setting: ImageSetting, spec: GridSpec, *, device: str = "cpu",
                 iters: int | None = None) -> tuple[pd.DataFrame, list[dict[str, torch.Tensor]], float]:  # fmt: skip
    """Run one cell (or, with ``iters``, its first ``iters`` iterations) on ``device``: (rows, per-batch attack
    histories, wall seconds)."""
    from ..engine import task_device

    dev = task_device(device)
    if iters is not None:
        spec = replace(spec, iters=int(iters), method_iters={cell.method: int(iters)})
    model = setting.model.to(dev) if dev.type != "cpu" else setting.model
    x, y = setting.x[list(cell.images)].to(dev), setting.y[list(cell.images)].to(dev)
    moved = {m: {k: v.to(dev) if torch.is_tensor(v) else v for k, v in kw.items()}
             for m, kw in spec.method_kwargs.items()}  # fmt: skip
    spec = replace(spec, method_kwargs=moved)
    histories: list[dict[str, torch.Tensor]] = []
    start = time.perf_counter()
    df = _run_cell(model, x, y, spec, cell.method, cell.attack, cell.eps, histories=histories)
    seconds = time.perf_counter() - start
    if dev.type != "cpu":
        setting.model.to("cpu")
    df["image"] = [cell.images[i] for i in df["image"]]
    return df, histories, seconds


def _history_lists(histories: list[dict[str, torch.Tensor]]) -> dict[str, list[list[float]]]:
    """Per photo, per iterate: the attack's metrics and label_kept (batches concatenated along photos)."""
    out: dict[str, list[list[float]]] = {}
    for name in ("label_kept", *METRICS):
        if all(name in h for h in histories):
            t = torch.cat([h[name] for h in histories], dim=1).double()  # (P + 1, photos)
            out[name] = t.T.tolist()
    return out


def save_cell(folder: Path, cell: ScaleCell, setting: ImageSetting, spec: GridSpec, df: pd.DataFrame,
              histories: list[dict[str, torch.Tensor]], seconds: float, device: str) -> Path:  # fmt: skip
    """Write the cell (atomically) and then its provenance sidecar (atomically; it names the cell file's sha256)."""
    path, prov_path = _paths(folder, cell.key)
    save_grid_cell(path, cell.key, df)
    from ..engine import task_device

    provenance = {
        "format": 1, "key": cell.key, "cell": cell.name, "method": cell.method, "attack": cell.attack,
        "eps": cell.eps, "eps255": round(cell.eps * 255, 6), "chunk": cell.chunk, "images": list(cell.images),
        "image_names": [setting.image_names[i] for i in cell.images] if setting.image_names else [],
        "code_version": _code_version(), "settings": _jsonable(spec.cell_settings(cell.method, cell.attack, cell.eps)),
        "model": setting.model_name, "device": _device_name(task_device(device)), "dtype": str(setting.x.dtype),
        "torch": torch.__version__, "python": platform.python_version(), "wall_seconds": round(seconds, 3),
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "cell_sha256": sha256_file(path),
        "history": _history_lists(histories),
    }  # fmt: skip
    atomic_write_json(prov_path, provenance)
    return path


def run_cells(folder: str | Path | None = None, *, budget_s: float | None = None, device: str = "cpu",
              only: Sequence[str] = (), progress: bool = True,
              setting: ImageSetting | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Compute the missing cells of the committed grid in :func:`plan` order, each saved as soon as it is done (a
    rerun resumes). ``budget_s``: start no new cell after this many seconds; ``only``: cell-name prefixes (e.g.
    ``"gradient/topk/eps255=8"``). Returns one record per cell computed (name, seconds)."""
    from tqdm.auto import tqdm

    folder = cells_dir() if folder is None else Path(folder)
    setting = scale_setting() if setting is None else setting
    spec = scale_spec(setting)
    todo = [c for c in plan(setting, spec) if not _paths(folder, c.key)[1].exists()]
    if only:
        todo = [c for c in todo if any(c.name.startswith(p) for p in only)]
    done: list[dict[str, Any]] = []
    start = time.perf_counter()
    for cell in tqdm(todo, desc="committed grid cells", disable=not progress):
        if budget_s is not None and time.perf_counter() - start >= budget_s:
            break
        df, histories, seconds = compute_cell(cell, setting, spec, device=device)
        save_cell(folder, cell, setting, spec, df, histories, seconds, device)
        done.append({"cell": cell.name, "seconds": round(seconds, 1)})
        if progress:
            print(f"{cell.name}: {seconds:.0f} s, top-k ∩ {df.topk.mean():.3f}", flush=True)
    return done


def read_cell(folder: Path, cell: ScaleCell) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The committed rows and provenance of ``cell``; raise :class:`GridCacheError` naming the file when either is
    unreadable, the provenance does not name this cell's key, or the cell file's sha256 differs from the one the
    provenance recorded."""
    path, prov_path = _paths(folder, cell.key)
    df = load_grid_cell(path, cell.key)
    try:
        prov = json.loads(prov_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GridCacheError(f"committed cell provenance {prov_path} cannot be read ({err})") from err
    if prov.get("key") != cell.key or prov.get("cell_sha256") != sha256_file(path):
        raise GridCacheError(f"committed cell {path}: its provenance names another key or checksum")
    if list(prov.get("images", [])) != list(cell.images):
        raise GridCacheError(f"committed cell {path}: photos {prov.get('images')} != {list(cell.images)}")
    return df, prov


@dataclass
class ScaleGrid:
    """What :func:`load_scale_grid` read: ``df`` (rows of the complete (method, attack, ε) cells, as
    :func:`run_attack_grid` returns them; ``cell_seconds`` the sum over chunks), ``coverage`` (one row per (method,
    attack, eps255): chunks done of all, complete, wall seconds, devices), ``stale`` (files in the folder that match
    no current cell: other code or settings) and ``provenance`` (one record per cell read)."""

    df: pd.DataFrame
    coverage: pd.DataFrame
    stale: int
    provenance: list[dict[str, Any]]

    @property
    def complete(self) -> pd.DataFrame:
        return self.coverage[self.coverage.complete]

    def describe(self) -> str:
        done = self.complete
        g = SCALE_GRID
        hours = sum(p["wall_seconds"] for p in self.provenance) / 3600
        devices = sorted({p["device"].split(" (")[0] for p in self.provenance})
        return (f"committed paper-scale cells: {len(done)} of {len(self.coverage)} (method, attack, ε) complete "
                f"({g['n_images']} photos x {g['iters']} iterations of {g['step'] * 255:g}/255, β = {g['beta']:g}, "
                f"IG M = {g['ig_steps']}); {len(self.provenance)} cell files, {hours:.1f} h of compute on "
                f"{', '.join(devices) or 'no device'}; {self.stale} stale file(s) ignored")  # fmt: skip


def load_scale_grid(folder: str | Path | None = None, *, setting: ImageSetting | None = None) -> ScaleGrid:
    """The committed cells that match the current code and settings (see the module docstring)."""
    folder = cells_dir() if folder is None else Path(folder)
    cells = plan(setting)
    frames, cover, provs = [], [], []
    by_combo: dict[tuple[str, str, float], list[ScaleCell]] = {}
    for c in cells:
        by_combo.setdefault((c.method, c.attack, c.eps), []).append(c)
    wanted = set()
    for (method, attack, eps), group in by_combo.items():
        read = []
        for c in group:
            wanted.add(c.key)
            if _paths(folder, c.key)[1].exists():
                read.append(read_cell(folder, c))
        complete = len(read) == len(group)
        seconds = sum(p["wall_seconds"] for _, p in read)
        attacks = ATTACKS if eps == 0 else (attack,)
        for a in attacks:
            cover.append({"method": method, "attack": a, "eps255": round(eps * 255, 6), "chunks": len(read),
                          "of": len(group), "complete": complete, "seconds": seconds,
                          "device": ", ".join(sorted({p["device"] for _, p in read}))})  # fmt: skip
            if complete:
                df = pd.concat([d for d, _ in read], ignore_index=True).assign(attack=a, cell_seconds=seconds)
                frames.append(df)
        provs += [p for _, p in read]
    present = {p.name.split(".")[0][len("cell-") :] for p in folder.glob("cell-*.json")} if folder.exists() else set()
    df = pd.concat(frames, ignore_index=True)[CELL_COLUMNS] if frames else pd.DataFrame(columns=CELL_COLUMNS)
    return ScaleGrid(df=df, coverage=pd.DataFrame(cover), stale=len(present - wanted), provenance=provs)


def verify_cell(cell: ScaleCell, folder: str | Path | None = None, *, setting: ImageSetting | None = None,
                iters: int = 2) -> dict[str, Any]:  # fmt: skip
    """Recompute a committed cell on this machine and compare: a random-sign or ε = 0 cell whole (its rows), an
    iterative one for its first ``iters`` iterations (the committed history's first rows). Returns the largest
    absolute difference per metric and ``ok`` (every difference within :data:`VERIFY_TOL`, every label_kept equal)."""
    folder = cells_dir() if folder is None else Path(folder)
    setting = scale_setting() if setting is None else setting
    spec = scale_spec(setting)
    stored, prov = read_cell(folder, cell)
    before, threads = torch.get_num_threads(), _recorded_threads(prov)
    try:
        if threads:
            torch.set_num_threads(threads)
        df, histories, seconds = compute_cell(cell, setting, spec, iters=iters if cell.iterative else None)
    finally:
        torch.set_num_threads(before)
    diffs: dict[str, float] = {}
    if cell.iterative:
        new = _history_lists(histories)
        old = prov["history"]
        for m in METRICS:
            a = np.asarray(old[m], dtype=float)[:, : iters + 1]
            b = np.asarray(new[m], dtype=float)[:, : iters + 1]
            diffs[m] = float(np.nanmax(np.abs(a - b))) if a.shape == b.shape else float("inf")
        kept_equal = np.array_equal(np.asarray(old["label_kept"])[:, : iters + 1], np.asarray(new["label_kept"]))
        compared = f"iterates 0-{iters} of {len(old['topk'][0]) - 1}"
    else:
        for m in METRICS:
            diffs[m] = float(np.nanmax(np.abs(stored[m].to_numpy(float) - df[m].to_numpy(float))))
        kept_equal = bool((stored.label_kept.to_numpy() == df.label_kept.to_numpy()).all())
        compared = "whole cell"
    ok = kept_equal and all(diffs[m] <= VERIFY_TOL[m] for m in METRICS)
    return {"cell": cell.name, "compared": compared, "ok": bool(ok), "label_kept_equal": bool(kept_equal),
            "seconds": round(seconds, 1), **{f"max_abs_diff_{m}": v for m, v in diffs.items()}}  # fmt: skip


def scale_deviation(scale: ScaleGrid) -> str:
    """What the committed grid's claims differ in from the paper's F3 (for their deviation column)."""
    g = SCALE_GRID
    return (f"committed cells (results/cells/imagenet, key = this code and settings), not the live quick run: "
            f"EfficientNet-Lite0 at 224 on {g['n_images']} shipped ImageNet photos (paper: SqueezeNet, 512 photos), "
            f"{g['iters']} iterations of {g['step'] * 255:g}/255 (paper 300 of 0.5/255), softplus β = {g['beta']:g} "
            f"chosen by fidelity, IG M = {g['ig_steps']} (paper 100), k = 1000 of 50,176 px; float centers; methods "
            f"with every photo's cell committed only; {scale.describe()}")  # fmt: skip


def scale_claims(summary: pd.DataFrame, *, deviation: str) -> list[dict[str, Any]]:
    """The paper-2 claims of the F3 grid (1–4, 3b/3c, 6, 9; 2b at ε = 1 and the shape claim 5 once their cells are
    complete) on the committed grid (``summary``: :func:`summarize_grid` of ``load_scale_grid().df``, which holds
    complete (method, attack, ε) cells only), named ``fragility/scale_claim…``: :func:`~flipfrag.fragility.grid_claims`
    with SG, DeepLIFT, IG and DTD, each claim over the methods whose cells it needs are complete (none: left out)."""
    from .claims import grid_claims

    n = int(summary.n_images.max()) if len(summary) else 0
    return grid_claims(summary, deviation=deviation, methods=("gradient", "deeplift", "integrated_gradients", "dtd"),
                       tag="scale_", suffix=f" — paper scale: {n} photos x {SCALE_GRID['iters']} iterations "
                       "(committed cells)")  # fmt: skip


def plot_scale_grid(scale: ScaleGrid, summary: pd.DataFrame, per_metric: pd.DataFrame, *, title: str):
    """F3's layout (:func:`~flipfrag.fragility.plot_attack_grid`) on the committed grid's complete cells; a figure
    that says so when none is complete."""
    from ..plotting import subplots
    from .plots import plot_attack_grid

    if not scale.df.empty:
        return plot_attack_grid(summary, per_metric=per_metric, paper=True, title=title)
    fig, ax = subplots(1, 1, figsize=(7, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, "No complete committed cell matches this code and these settings:\n"
            "`make cells` computes them (results/cells/imagenet)", ha="center", va="center")  # fmt: skip
    fig.suptitle(title)
    return fig


def _status(folder: Path) -> pd.DataFrame:
    grid = load_scale_grid(folder)
    print(grid.describe())
    return grid.coverage


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flipfrag.fragility.cells", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="compute missing cells (resumable), saving each as soon as it is done")
    run.add_argument("--budget-minutes", type=float, default=None, help="start no new cell after this many minutes")
    run.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    run.add_argument("--only", nargs="*", default=[], help="cell-name prefixes, e.g. gradient/topk/eps255=8")
    run.add_argument("--threads", type=int, default=None, help="torch threads (default: $FLIPFRAG_THREADS or 2)")
    sub.add_parser("status", help="which cells are committed and complete")
    ver = sub.add_parser("verify", help="recompute a sample of committed cells and compare")
    ver.add_argument("--n", type=int, default=2, help="cells to recompute (one random-sign, the rest iterative)")
    for p in (run, ver, sub.choices["status"]):
        p.add_argument("--folder", default=None, help="cells folder (default: results/cells/imagenet)")
    args = parser.parse_args(argv)
    folder = cells_dir() if args.folder is None else Path(args.folder)
    if args.command == "run":
        torch.set_num_threads(args.threads or int(os.environ.get("FLIPFRAG_THREADS", 2)))
        budget = None if args.budget_minutes is None else 60 * args.budget_minutes
        done = run_cells(folder, budget_s=budget, device=args.device, only=args.only)
        print(f"{len(done)} cell(s) computed into {folder}")
        return 0
    if args.command == "status":
        with pd.option_context("display.max_rows", 200, "display.width", 160):
            print(_status(folder).to_string(index=False))
        return 0
    present = [c for c in plan() if _paths(folder, c.key)[1].exists()]
    sample = [c for c in present if not c.iterative][:1] + [c for c in present if c.iterative][: max(args.n - 1, 0)]
    results = [verify_cell(c, folder) for c in sample]
    print(pd.DataFrame(results).to_string(index=False))
    return 0 if results and all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
