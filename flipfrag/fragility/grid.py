"""The attack grid (F3 and its CIFAR-10 analogue): one specification, cached cells, summaries and tables."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._checks import check_int as _check_int
from .._checks import check_names as _check_list
from .._io import atomic_write, cache_dir, sha256_files
from ..engine import EngineCacheError, Task, TaskCache, TaskResult, default_device, run_tasks
from .paper import _LOWER_IS_MORE_CHANGE, ATTACKS, GRID_METHODS, METHODS, METRICS, paper_grid, role_k
from .settings import ROLES, ImageSetting, grid_sizes

# ------------------------------------------------------------------------------------------ the attack grid


def best_by_metric(history: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-metric best label-preserving iterate, recomputed from an attack's history (the authors' ``measure``).

    Parameters
    ----------
    history : dict
        ``out.history`` of an attack run with ``record_metrics=True``: ``label_kept`` (P+1, N) bool and ``topk``,
        ``spearman``, ``center`` (P+1, N), row 0 being the original image.

    Returns
    -------
    dict metric -> Tensor (N,)
        The lowest top-k intersection, the lowest Spearman correlation and the largest center shift over the
        iterates that keep the label (the original image included: an image where no iterate helps gets the
        "no change" values 1, 1, 0). Images with no label-preserving row (skipped ones) get row 0's value.
    """
    missing = [k for k in ("label_kept", *METRICS) if k not in history]
    if missing:
        raise ValueError(f"history lacks {missing}; run the attack with record_metrics=True")
    kept = history["label_kept"].bool()
    out = {}
    for m in METRICS:
        v = history[m].double()
        if v.shape != kept.shape:
            raise ValueError(f"history[{m!r}] has shape {tuple(v.shape)}, label_kept {tuple(kept.shape)}")
        lower = _LOWER_IS_MORE_CHANGE[m]
        fill = torch.full_like(v, math.inf if lower else -math.inf)
        v = torch.where(kept & ~torch.isnan(v), v, fill)
        best = v.min(0).values if lower else v.max(0).values
        out[m] = torch.where(kept.any(0), best, history[m][0].double())
    return out


class GridCacheError(RuntimeError):
    """A cached grid cell is corrupt, truncated, or belongs to other settings."""


CELL_COLUMNS = ["method", "attack", "eps", "eps255", "image", "label", "map_h", "map_w", "k",
                 "topk", "spearman", "center", "topk_best", "spearman_best", "center_best",
                 "success", "label_kept", "best_iter", "conf0", "conf_adv", "cell_seconds"]  # fmt: skip


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        from .._io import tensor_hash

        return {"tensor_sha256": tensor_hash(value.detach().cpu()), "shape": list(value.shape)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return repr(value)  # exact, so 8/255 and 0.0313725... do not collide by rounding
    return value


def grid_cache_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict[str, Any]) -> str:
    """sha256 (first 24 hex) of the model's weights, the images, the labels and every setting of the grid."""
    from .._io import tensor_hash

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_hash(t.detach().cpu()).encode())
    h.update(tensor_hash(x.detach().cpu(), y.detach().cpu()).encode())
    h.update(json.dumps(_jsonable(settings), sort_keys=True).encode())
    return h.hexdigest()[:24]


def _code_version() -> str:
    """sha256 (16 hex) of the source a grid cell's numbers depend on, so that cached cells computed by other code (a
    fixed bug in an attack, a changed saliency rule) are never reused: the attack, metric, saliency, surrogate and
    ImageNet-CNN modules whole, and of this module only the functions that compute a cell (so that a change to the
    summaries, tables or docs here keeps the committed paper-scale cells of :mod:`flipfrag.fragility.cells` valid)."""
    from .. import attacks, efficientnet, metrics, saliency, smooth

    saliency_files = sorted(Path(saliency.__file__).parent.glob("*.py"))  # the package: every module of it
    files = sha256_files([attacks.__file__, metrics.__file__, *saliency_files, smooth.__file__, efficientnet.__file__])
    return hashlib.sha256((files + _own_source()).encode()).hexdigest()[:16]


def _own_source() -> str:
    """The source of this module's cell-computing functions, read once from the functions defined here (so that a
    test replacing one of them by a stub does not change the version of the cells it reads)."""
    if not _OWN_SOURCE:
        import inspect

        own = [inspect.getsource(f) for f in _CELL_FUNCTIONS]
        _OWN_SOURCE.append(json.dumps([CELL_COLUMNS, *own]))
    return _OWN_SOURCE[0]


def _records_digest(records: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()


def save_grid_cell(path: str | Path, key: str, df: pd.DataFrame) -> Path:
    """Write one grid cell (rows of :func:`run_attack_grid`) atomically as JSON with its key and a checksum."""
    # plain Python values: json writes floats with repr, so the round trip is exact
    records = [{c: (v.item() if hasattr(v, "item") else v) for c, v in row.items()}
               for row in df[CELL_COLUMNS].to_dict(orient="records")]  # fmt: skip
    payload = {"format": 1, "key": key, "columns": CELL_COLUMNS, "sha256": _records_digest(records),
               "records": records}  # fmt: skip
    text = json.dumps(payload)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_grid_cell(path: str | Path, key: str) -> pd.DataFrame:
    """Read a cell written by :func:`save_grid_cell`; raise :class:`GridCacheError` naming the file if it does not
    parse, its checksum or key does not match, or its columns are not the expected ones."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GridCacheError(f"grid cache {path} cannot be read ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != 1:
        raise GridCacheError(f"grid cache {path}: unknown format")
    if payload.get("key") != key:
        raise GridCacheError(f"grid cache {path}: key {payload.get('key')!r} != requested {key!r}")
    records = payload.get("records")
    if not isinstance(records, list) or payload.get("sha256") != _records_digest(records):
        raise GridCacheError(f"grid cache {path}: checksum does not match its records (corrupt or edited)")
    if payload.get("columns") != CELL_COLUMNS or any(set(r) != set(CELL_COLUMNS) for r in records):
        raise GridCacheError(f"grid cache {path}: columns differ from {CELL_COLUMNS}")
    return pd.DataFrame(records, columns=CELL_COLUMNS)


class GridCellCache(TaskCache):
    """The grid's cell cache as a :class:`flipfrag.engine.TaskCache`: ``<folder>/cell-<key>.json`` written by
    :func:`save_grid_cell`, verified by :func:`load_grid_cell` (JSON, no pickles; exact float round trip)."""

    def path(self, key: str) -> Path:
        return self.folder / f"cell-{key}.json"

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def save(self, result: Any) -> Path:
        return save_grid_cell(self.path(result.key), result.key, result.value)

    def load(self, key: str) -> Any:
        try:
            df = load_grid_cell(self.path(key), key)
        except GridCacheError as err:
            raise EngineCacheError(str(err)) from err
        return TaskResult(key=key, value=df, device="cpu", dtype="", seconds=0.0, worker="", cached=True)


def _confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x), 1).gather(1, y[:, None])[:, 0]


@dataclass(frozen=True)
class GridSpec:
    """Everything an attack grid (F3) runs, in one object: ``run_attack_grid(model, x, y, spec)``.

    Parameters
    ----------
    k : int
        Top-k size of the top-k attack and of the top-k intersection metric.
    methods : subset of :data:`GRID_METHODS` (default: the paper's SG, DeepLIFT and IG)
    attacks : subset of :data:`ATTACKS`
        "topk" and "center" are the iterative attacks (best iterate on their own criterion: lowest intersection /
        largest center shift); "random" is the one-shot ``x + eps * sign(N(0, 1))`` baseline, resampled up to
        ``random_tries`` times until the label is kept.
    epsilons : sequence of float
        L-inf budgets on the [0, 1] scale (the paper: 0, 1, 2, 4, 8 / 255). At 0 every attack returns ``x``.
    iters : int
        Sign-gradient iterations P of the iterative attacks (paper: 300).
    method_iters : dict method -> int
        Per-method overrides of ``iters`` (a budget choice: IG costs ``steps`` times as much per iteration).
    step : float
        Step size (paper: 0.5/255).
    beta : float
        Softplus sharpness of the surrogate (see :mod:`flipfrag.attacks`).
    method_kwargs : dict method -> dict
        Saliency-method arguments, e.g. ``{"integrated_gradients": {"baseline": b, "steps": 100}}``.
    floor_center : bool
        Floor centers of mass to integer pixels in the center criterion and metric, as the authors' code.
    random_tries : int
        Redraws of the random baseline until the label is kept.
    seed : int
        Seed of the random-sign baseline.
    batch_size : int or None
        Images per attack call (default: all at once); bounds memory for big models, changes no value.
    """

    k: int
    methods: tuple[str, ...] = METHODS[:3]
    attacks: tuple[str, ...] = ATTACKS
    epsilons: tuple[float, ...] = (0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
    iters: int = 300
    method_iters: dict[str, int] = field(default_factory=dict)
    step: float = 0.5 / 255
    beta: float = 1.0
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    floor_center: bool = False
    random_tries: int = 10
    seed: int = 0
    batch_size: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the fields once, here
        set_(self, "methods", tuple(_check_list("methods", self.methods, GRID_METHODS)))
        set_(self, "attacks", tuple(_check_list("attacks", self.attacks, ATTACKS)))
        eps = self.epsilons
        if isinstance(eps, (str, float, int)) or len(eps) == 0:
            raise ValueError(f"epsilons must be a non-empty sequence of numbers >= 0, got {eps!r}")
        if any(isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e < math.inf for e in eps):
            raise ValueError(f"epsilons must be finite numbers >= 0, got {list(eps)}")
        set_(self, "epsilons", tuple(float(e) for e in eps))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        _check_int(self.iters, "iters", 1)
        bad = sorted(set(self.method_iters) - set(GRID_METHODS))
        if bad:
            raise ValueError(f"method_iters: unknown methods {bad}")
        for m, it in self.method_iters.items():
            _check_int(it, f"method_iters[{m!r}]", 1)
        if not (isinstance(self.step, (int, float)) and self.step > 0):
            raise ValueError(f"step must be a number > 0, got {self.step!r}")
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"beta must be a number > 0, got {self.beta!r}")
        bad = sorted(set(self.method_kwargs) - set(GRID_METHODS))
        if bad:
            raise ValueError(f"method_kwargs: unknown methods {bad}")
        _check_int(self.random_tries, "random_tries", 1)
        if self.batch_size is not None:
            _check_int(self.batch_size, "batch_size", 1)

    def iters_for(self, method: str) -> int:
        """Iterations of the iterative attacks on ``method``'s map."""
        return int(self.method_iters.get(method, self.iters))

    def cells(self) -> list[tuple[str, str, float]]:
        """The (method, attack, eps) cells, in the grid's order."""
        return [(m, a, e) for m in self.methods for a in self.attacks for e in self.epsilons]

    def cell_settings(self, method: str, attack: str, eps: float) -> dict[str, Any]:
        """What a cell's result depends on (besides weights, images and code): its cache key's settings. eps = 0 is
        the same unperturbed run for every attack, so it is keyed without the attack and its iteration settings."""
        cell = {"k": self.k, "floor_center": bool(self.floor_center), "random_tries": int(self.random_tries),
                "seed": int(self.seed), "format": 1, "method": method, "attack": "none" if eps == 0 else attack,
                "eps": float(eps), "kwargs": self.method_kwargs.get(method, {})}  # fmt: skip
        if eps > 0 and attack != "random":
            cell.update(iters=self.iters_for(method), step=float(self.step), beta=float(self.beta))
        return cell


def _run_cell(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: GridSpec, method: str, attack: str,
              eps: float, histories: list[dict[str, torch.Tensor]] | None = None) -> pd.DataFrame:  # fmt: skip
    from ..attacks import MassCenterAttack, RandomSignAttack, TopKAttack

    common = dict(k=spec.k, method_kwargs=spec.method_kwargs.get(method, {}), floor_center=spec.floor_center,
                  record_metrics=True, progress=False)  # fmt: skip
    if eps == 0 or attack == "random":
        # eps = 0 needs no iterations: the one-shot path projects x + 0 back onto x (a real run, not a constant).
        atk = RandomSignAttack(model, method, eps=float(eps), seed=spec.seed, tries=spec.random_tries, **common)
    else:
        cls = TopKAttack if attack == "topk" else MassCenterAttack
        atk = cls(model, method, eps=float(eps), step=spec.step, iters=spec.iters_for(method), beta=spec.beta,
                  **common)  # fmt: skip
    start = time.perf_counter()
    rows = []
    bs = x.shape[0] if spec.batch_size is None else spec.batch_size
    for s in range(0, x.shape[0], bs):
        xb, yb = x[s : s + bs], y[s : s + bs]
        out = atk(xb, yb)
        if histories is not None:  # per-iterate metrics of each batch (the committed cells keep them, for checks)
            histories.append({m: v.detach().cpu() for m, v in out.history.items()})
        best = best_by_metric(out.history)
        conf0, conf1 = _confidence(model, xb, yb), _confidence(model, out.x_adv, yb)
        for i in range(xb.shape[0]):
            rows.append({
                "method": method, "attack": attack, "eps": float(eps), "eps255": round(float(eps) * 255, 6),
                "image": s + i, "label": int(yb[i]), "map_h": int(x.shape[-2]), "map_w": int(x.shape[-1]),
                "k": spec.k, **{m: float(out.metrics[m][i]) for m in METRICS},
                **{f"{m}_best": float(best[m][i]) for m in METRICS},
                "success": bool(out.success[i]), "label_kept": bool(out.label_kept[i]),
                "best_iter": int(out.best_iter[i]), "conf0": float(conf0[i]), "conf_adv": float(conf1[i]),
            })  # fmt: skip
    seconds = time.perf_counter() - start
    df = pd.DataFrame(rows)
    df["cell_seconds"] = seconds
    return df[CELL_COLUMNS]


def run_attack_grid(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: GridSpec | None = None,
    *,
    cache: bool | str | Path = True,
    progress: bool = False,
    scheduler: str | None = None,
    device: str | None = None,
    **spec_kwargs: Any,
) -> pd.DataFrame:
    """Ghorbani et al.'s attack grid (F3): every method x attack x epsilon of ``spec`` on the images ``x``.

    Parameters
    ----------
    model : nn.Module
        ReLU classifier on [0, 1] images (eval mode). The attacks differentiate its softplus(``beta``) surrogate for
        the simple gradient, IG and LRP, and the model itself for DeepLIFT and DTD (see :mod:`flipfrag.attacks`).
    x : Tensor (N, C, H, W)
        Correctly classified images in [0, 1]; ``y`` (N,) their labels.
    spec : GridSpec
        What to run (methods, attacks, epsilons, iterations, k, ...). Instead of a spec, its fields may be given as
        keyword arguments (``run_attack_grid(model, x, y, k=15, methods=["gradient"])``).
    cache : bool or path
        True: cache each (method, attack, eps) cell under ``cache_dir("fragility")``; a path: cache there; False: none.
        The key covers the weights, the images, the cell's settings and the source of the attack/saliency/metric
        modules; a corrupt or foreign cell is recomputed with a warning.
    progress : bool
        tqdm over cells.
    scheduler : str or None
        Where the cells run (:mod:`flipfrag.engine`): None reads ``$FLIPFRAG_SCHEDULER`` (unset = in this process),
        ``"local:N"`` a Dask LocalCluster of N workers, ``"tcp://host:port"`` an existing cluster.
    device : "cpu", "cuda", "auto" or None
        Where each cell computes. None (default): ``$FLIPFRAG_DEVICE`` (``make figures DEVICE=auto``), else the CPU,
        so that cached numbers do not depend on the machine's GPU (:func:`flipfrag.engine.default_device`).

    Returns
    -------
    DataFrame
        One row per (method, attack, eps, image): ``topk``, ``spearman``, ``center`` at the returned iterate;
        ``topk_best``, ``spearman_best``, ``center_best`` at the best label-preserving iterate per metric;
        ``success`` (False: no label-preserving iterate changed the criterion, so ``x`` itself is returned and counts
        as "no change"), ``label_kept``, ``best_iter``, ``conf0`` / ``conf_adv`` (softmax probability of the label
        before / after), ``map_h``, ``map_w``, ``k``, ``cell_seconds`` (runtime of the cell when computed).
    """
    if spec is None:
        spec = GridSpec(**spec_kwargs)
    elif spec_kwargs:
        raise TypeError(f"give either spec or its fields as keywords, not both ({sorted(spec_kwargs)})")
    if not isinstance(spec, GridSpec):
        raise TypeError(f"spec must be a GridSpec, got {type(spec).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty image batch (N, C, H, W), got {getattr(x, 'shape', None)}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise ValueError(f"y must be a tensor of shape ({x.shape[0]},)")
    if spec.k > x.shape[-2] * x.shape[-1]:
        raise ValueError(f"k must be an integer in [1, {x.shape[-2] * x.shape[-1]}], got {spec.k!r}")
    if cache is True:
        store: GridCellCache | None = GridCellCache(cache_dir("fragility"))
    elif cache is False or cache is None:
        store = None
    else:
        store = GridCellCache(cache)
    device = default_device(device)
    x, y = x.detach(), y.detach()
    code = _code_version()
    cells = spec.cells()
    tasks = [
        Task(grid_cache_key(model, x, y, {**spec.cell_settings(method, attack, eps), "code": code}), _run_cell,
             (model, x, y, spec, method, attack, eps), name=f"{method}/{attack}/eps255={eps * 255:g}")
        for method, attack, eps in cells
    ]  # fmt: skip
    # serial in this process unless FLIPFRAG_SCHEDULER (or scheduler=) names a Dask cluster (flipfrag.engine);
    # every finished cell is written at once, so an interrupted grid resumes from the cells it has
    results = run_tasks(tasks, store if store is not None else False, scheduler=scheduler, device=device,
                        progress=progress, desc="attack grid", code=code)  # fmt: skip
    frames = []
    for (_, attack, _), res in zip(cells, results):
        df = res.value.copy()
        df["attack"] = attack  # eps = 0 cells are shared by the attacks
        frames.append(df)
    return pd.concat(frames, ignore_index=True)[CELL_COLUMNS]


def grid_spec(setting: ImageSetting, prof: dict[str, Any], *, seed: int = 0, methods: Sequence[str] = METHODS,
              **overrides: Any) -> GridSpec:  # fmt: skip
    """The :class:`GridSpec` of a setting with the profile's choices, so that every notebook asking for the same grid
    gets the same cache cells: the role's sizes (:func:`grid_sizes`: ``prof["epsilons"]``, ``grid_iters`` iterations
    of ``attack_step`` (IG: ``grid_ig_iters``), softplus ``softplus_beta``, IG with ``grid_ig_steps`` steps, or
    ``prof["imagenet_grid"]``'s for the ImageNet CNN) and the setting's reference image
    (also DeepLIFT's), ``k = setting.k``, float centers offline and floored centers (the authors' code) in
    ``paper``. For inputs larger than 64x64 (the paper's 227x227) the images are attacked 16 at a time and IG
    evaluates at most 256 interpolants per pass, which bounds memory without changing any value. ``overrides``
    replace any field (e.g. ``beta=``, ``epsilons=``, ``attacks=``)."""
    big = setting.n_pixels > 64 * 64
    sizes = grid_sizes(setting.role, prof)
    ig_iters = sizes["ig_iters"]
    fields = dict(
        k=setting.k, methods=tuple(methods), epsilons=tuple(sizes["epsilons"]), iters=int(sizes["iters"]),
        method_iters={"integrated_gradients": int(ig_iters)} if ig_iters else {},
        step=float(sizes["step"]), beta=float(sizes["beta"]),
        method_kwargs=setting.method_kwargs(sizes["ig_steps"], sizes["ig_internal_batch"] or (256 if big else None)),
        floor_center=not prof.get("offline", True), seed=seed, batch_size=16 if big else None,
    )  # fmt: skip
    fields.update(overrides)
    return GridSpec(**fields)


def grid_for(setting: ImageSetting, prof: dict[str, Any], *, seed: int = 0, methods: Sequence[str] = METHODS,
             cache: bool | str | Path = True, progress: bool = False, **overrides: Any) -> pd.DataFrame:  # fmt: skip
    """:func:`run_attack_grid` on a setting with :func:`grid_spec`'s choices for the profile."""
    spec = grid_spec(setting, prof, seed=seed, methods=methods, **overrides)
    return run_attack_grid(setting.model, setting.x, setting.y, spec, cache=cache, progress=progress)


def grid_deviation(setting: ImageSetting, prof: dict[str, Any]) -> str:
    """What differs from the paper's F3 setting, for the claims' deviation column."""
    paper_k = {"imagenet": "1000 of 51,529", "cifar": "100 of 1,024"}[ROLES[setting.role]]
    parts = ["computed live by this run (not the committed paper-scale cells)"]
    if setting.substitution:
        parts.append(setting.substitution)
    sizes = grid_sizes(setting.role, prof)
    fraction = "same fraction" if setting.k == role_k(ROLES[setting.role], setting.n_pixels) else "the paper's k"
    parts.append(f"k = {setting.k} of {setting.n_pixels} px (paper {paper_k}, {fraction})")
    ig_iters = int(sizes["ig_iters"] or sizes["iters"])
    if len(setting.x) != 512 or sizes["iters"] != 300 or ig_iters != 300 or sizes["ig_steps"] != 100:
        parts.append(f"{len(setting.x)} images, {sizes['iters']} iterations (IG {ig_iters}), IG M = "
                     f"{sizes['ig_steps']} (paper 512, 300, 100)")  # fmt: skip
    if abs(float(sizes["step"]) - 0.5 / 255) > 1e-12:
        parts.append(f"step {255 * float(sizes['step']):g}/255 (paper 0.5/255)")
    beta = float(sizes["beta"])
    if setting.model_name == "cifar10-cnn":
        parts.append(f"softplus β = {beta:g} acting on 0–255 pre-activations (the CNN scales its "
                     "[0, 1] input by 255), as the authors' SqueezeNet")  # fmt: skip
    elif setting.model_name == "efficientnet-lite0":
        parts.append(f"softplus β = {beta:g} on both kinks of ReLU6, chosen by the surrogate's fidelity on held-out "
                     "photos (the authors' β = 1 acted on a network fed 0–255 pixels; this one normalises its input "
                     "to [-1, 1], where β = 1 is a much smoother surrogate)")  # fmt: skip
    else:
        parts.append(f"softplus β = {beta:g} on [0, 1]-scale inputs (the authors' β = 1 acted on "
                     "0–255 inputs, a much sharper surrogate)")  # fmt: skip
    parts.append("ε on the [0, 1] scale × 255 as in the paper; " +
                 ("float centers of mass" if prof.get("offline", True) else "floored centers (authors' code)"))
    return "; ".join(parts)


def summarize_grid(df: pd.DataFrame, *, selection: str = "own") -> pd.DataFrame:
    """Mean metrics per (method, attack, eps255) over images.

    ``selection="own"``: metrics at the iterate each attack selects on its own criterion (the notes' recommended
    reading); ``"per_metric"``: each metric at its own best iterate (the authors' ``measure`` argument). Failed
    attacks are averaged in as "no change" (the authors' code) and counted in ``n_failed``. Adds ``center_rel``
    (center shift / map side), ``label_kept`` (fraction), ``conf0`` / ``conf_adv`` (mean softmax probability of the
    label) and ``seconds`` (the cells' runtime).
    """
    if selection not in ("own", "per_metric"):
        raise ValueError(f"selection must be 'own' or 'per_metric', got {selection!r}")
    missing = sorted(set(CELL_COLUMNS) - set(df.columns))
    if missing:
        raise ValueError(f"df lacks columns {missing}: pass the output of run_attack_grid")
    d = df.copy()
    if selection == "per_metric":
        for m in METRICS:
            d[m] = d[f"{m}_best"]
    d["failed"] = (~d["success"].astype(bool)) & (d["eps"] > 0)
    d["center_rel"] = d["center"] / d["map_w"]
    keys = ["method", "attack", "eps255"]
    out = d.groupby(keys, sort=False).agg(
        topk=("topk", "mean"), spearman=("spearman", "mean"), center=("center", "mean"),
        center_rel=("center_rel", "mean"), n_images=("image", "count"), n_failed=("failed", "sum"),
        label_kept=("label_kept", "mean"), conf0=("conf0", "mean"), conf_adv=("conf_adv", "mean"),
        seconds=("cell_seconds", "first"), k=("k", "first"), side=("map_w", "first"),
    ).reset_index()  # fmt: skip
    out["n_failed"] = out["n_failed"].astype(int)
    return out


def grid_table(summary: pd.DataFrame, *, paper: bool = True, per_metric: pd.DataFrame | None = None,
               model: str | None = None) -> pd.DataFrame:  # fmt: skip
    """The grid's numbers, one row per (method, attack, eps255), next to the paper's F3 values where they exist.

    Columns: ours ``topk``, ``spearman``, ``center`` (px), ``center_rel``, the counts and ``label_kept`` (and
    ``conf0`` / ``conf_adv`` when the summary has them); with ``per_metric`` (a
    ``summarize_grid(..., selection="per_metric")``) also ``topk_pm``, ``spearman_pm``, ``center_pm``; with ``paper``
    the paper's ``paper_topk``, ``paper_spearman``, ``paper_center`` (px of 227) and ``paper_center_rel`` (empty
    for eps = 0 and for methods the paper does not have, e.g. LRP-ε). ``model`` (e.g. ``"cifar10-cnn"``) becomes a
    first column ``model``.
    """
    keys = ["method", "attack", "eps255"]
    cols = keys + ["topk", "spearman", "center", "center_rel", "n_images", "n_failed", "label_kept", "k", "side"]
    cols += [c for c in ("conf0", "conf_adv") if c in summary.columns]  # claim 6's note reads them from the table
    table = summary[cols].copy()
    if per_metric is not None:
        pm = per_metric[keys + list(METRICS)].rename(columns={m: f"{m}_pm" for m in METRICS})
        table = table.merge(pm, on=keys, how="left")
    if paper:
        pg = paper_grid().rename(columns={m: f"paper_{m}" for m in (*METRICS, "center_rel")})
        table = table.merge(pg, on=keys, how="left")
    if model is not None:
        table.insert(0, "model", model)
    return table

def surrogate_fidelity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, betas: Sequence[float], *,
                       k: int) -> pd.DataFrame:  # fmt: skip
    """How close the softplus(β) surrogate's simple-gradient map is to the ReLU model's map, per β: mean top-k
    intersection and Spearman ρ between the two maps and cosine of the two input gradients (``grad_cos``) over the
    images (1 = the surrogate explains like the model)."""
    from ..metrics import spearman, topk_intersection
    from ..saliency import gradient, saliency_map
    from ..smooth import softplus_surrogate

    g_relu = gradient(model, x, y)
    relu = saliency_map(g_relu)
    rows = []
    for beta in betas:
        g = gradient(softplus_surrogate(model, float(beta)), x, y)
        smooth = saliency_map(g)
        cos = torch.nn.functional.cosine_similarity(g.flatten(1).double(), g_relu.flatten(1).double(), dim=1)
        rows.append({"beta": float(beta), "topk": float(topk_intersection(relu, smooth, k).mean()),
                     "spearman": float(spearman(relu, smooth).mean()), "grad_cos": float(cos.mean())})  # fmt: skip
    return pd.DataFrame(rows)


#: The surrogate-fidelity rule of :func:`choose_beta`: the surrogate's input gradient points the model's way and its
#: map ranks pixels alike, on average over photos.
BETA_RULE = {"grad_cos": 0.5, "spearman": 0.5}


def choose_beta(fidelity: pd.DataFrame, rule: dict[str, float] | None = None) -> float:
    """The smallest (smoothest) β of a :func:`surrogate_fidelity` table whose mean gradient cosine and map Spearman ρ
    with the model reach the rule's thresholds (:data:`BETA_RULE`); the largest β if none does (with a warning)."""
    import warnings

    rule = dict(BETA_RULE if rule is None else rule)
    missing = set(rule) - set(fidelity.columns)
    if missing or fidelity.empty:
        raise ValueError(f"fidelity must be a non-empty surrogate_fidelity table with columns {sorted(rule)}")
    ok = fidelity[np.logical_and.reduce([fidelity[c] >= v for c, v in rule.items()])]
    if ok.empty:
        warnings.warn(f"no beta meets {rule}; using the largest", stacklevel=2)
        return float(fidelity.beta.max())
    return float(ok.beta.min())


def dimension_table(small: pd.DataFrame, large: pd.DataFrame) -> pd.DataFrame:
    """The smaller-input grid next to the larger-input one: per (method, attack, eps255) the top-k intersection,
    Spearman ρ and relative center shift of both (suffixes ``_small`` / ``_large``)."""
    keys = ["method", "attack", "eps255"]
    cols = ["topk", "spearman", "center", "center_rel", "n_images", "n_failed", "k", "side"]
    a = small[keys + cols].rename(columns={c: f"{c}_small" for c in cols})
    b = large[keys + cols].rename(columns={c: f"{c}_large" for c in cols})
    return a.merge(b, on=keys, how="left")



def iteration_convergence(setting: ImageSetting, prof: dict[str, Any], *, methods: Sequence[str] = METHODS,
                          iters: int = 100, checkpoints: Sequence[int] = (5, 10, 20, 40, 100), n: int = 4,
                          eps: float = 8 / 255, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """How the top-k attack's result converges with the number of iterations P (to choose P within a budget).

    Runs the top-k attack at ``eps`` for ``iters`` iterations on the first ``n`` images of ``setting`` for each
    method (the grid's settings otherwise: :func:`grid_spec`) and reads, from its per-iterate history, the mean top-k
    intersection and Spearman ρ of the best label-preserving iterate *so far* after each checkpoint P (the value a
    run of P iterations returns). Returns one row per (method, P) with ``topk``, ``spearman`` and
    ``seconds_per_image_iter``.
    """
    from ..attacks import TopKAttack

    iters = _check_int(iters, "iters", 1)
    checkpoints = sorted({int(c) for c in checkpoints if 1 <= int(c) <= iters} | {iters})
    spec = grid_spec(setting, prof, seed=seed, methods=methods)
    x, y = setting.x[:n], setting.y[:n]
    rows = []
    for method in spec.methods:
        atk = TopKAttack(setting.model, method, eps=float(eps), step=spec.step, iters=iters, k=spec.k, beta=spec.beta,
                         method_kwargs=spec.method_kwargs.get(method, {}), floor_center=spec.floor_center,
                         progress=False)  # fmt: skip
        start = time.perf_counter()
        out = atk(x, y)
        seconds = (time.perf_counter() - start) / (len(x) * iters)
        kept = out.history["label_kept"].bool()
        crit = torch.where(kept, out.history["topk"].double(), torch.full_like(out.history["topk"].double(), math.inf))
        for p in checkpoints:
            # the own-criterion iterate among rows 0..p (row 0 = the original image, always label-preserving)
            best = crit[: p + 1].argmin(0)
            cols = torch.arange(len(x))
            rows.append({"method": method, "iterations": p,
                         "topk": float(out.history["topk"][best, cols].mean()),
                         "spearman": float(out.history["spearman"][best, cols].mean()),
                         "seconds_per_image_iter": seconds})  # fmt: skip
    return pd.DataFrame(rows)


def ig_steps_convergence(setting: ImageSetting, steps: Sequence[int] = (4, 8, 16, 32, 100), *, reference: int = 200,
                         n: int | None = None, internal_batch_size: int | None = None) -> pd.DataFrame:  # fmt: skip
    """How close integrated gradients with M Riemann steps is to M = ``reference`` on the setting's images (its
    reference image as baseline): mean top-k intersection (``setting.k``) and Spearman ρ between the two maps, and
    the mean completeness gap |sum(IG) - (S(x) - S(baseline))| / |S(x) - S(baseline)|. ``internal_batch_size``
    bounds the interpolants per pass (memory; the values are the same)."""
    from ..metrics import spearman, topk_intersection
    from ..saliency import completeness_gap, integrated_gradients, saliency_map

    x, y = (setting.x, setting.y) if n is None else (setting.x[:n], setting.y[:n])
    chunk = {} if internal_batch_size is None else {"internal_batch_size": int(internal_batch_size)}
    ref = saliency_map(integrated_gradients(setting.model, x, y, baseline=setting.baseline, steps=int(reference),
                                            **chunk))  # fmt: skip
    rows = []
    for m in steps:
        attr = integrated_gradients(setting.model, x, y, baseline=setting.baseline, steps=int(m), **chunk)
        mp = saliency_map(attr)
        gap = completeness_gap(setting.model, x, y, attr, baseline=setting.baseline)
        diff = attr.detach().flatten(1).sum(1) - gap  # S(x) - S(baseline)
        rows.append({"steps": int(m), "topk_vs_ref": float(topk_intersection(ref, mp, setting.k).mean()),
                     "spearman_vs_ref": float(spearman(ref, mp).mean()),
                     "completeness_gap": float((gap.abs() / diff.abs().clamp_min(1e-12)).mean())})  # fmt: skip
    return pd.DataFrame(rows)


_OWN_SOURCE: list[str] = []
#: The functions whose source is part of a cell's code version (bound at import, before any test stubs them).
_CELL_FUNCTIONS = (_jsonable, grid_cache_key, best_by_metric, _confidence, _run_cell, GridSpec.cell_settings)
