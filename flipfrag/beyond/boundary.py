"""Study 1: are the images near the decision boundary the ones with fragile saliency maps?

Per image (:func:`boundary_frame`): the distance to its closest flip point (:func:`flipfrag.flip.closest_flip_point`,
cached; **certified points only** — an uncertified solve gives NaN and is counted, never replaced by the solver's
last iterate or a bound), the fragility of each saliency method's map (top-k intersection and Spearman ρ between the
original map and the map after the one-shot random sign perturbation and after the top-k attack at ε = 8/255: the
cells of :func:`flipfrag.fragility.run_attack_grid`), and the local curvature (largest-magnitude eigenvalue of the
input Hessian of the class logit, :func:`flipfrag.hessian.top_eigenpairs`; on the softplus surrogate for a ReLU
net). :func:`boundary_correlations` gives Spearman correlations across images with seeded bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..flip import FlipResult
from ..flippoints import cached_flip_points
from ..fragility.grid import grid_for, grid_spec
from ..fragility.settings import ImageSetting
from ..hessian import score_fn, top_eigenpairs
from ..smooth import has_relu, softplus_surrogate
from .cases import flip_arguments, grid_overrides, sg_attack
from .correlation import spearman_ci

__all__ = ["boundary_flips", "certified_distance", "curvature", "fragility_cells", "boundary_frame",
           "boundary_correlations", "boundary_examples", "PAIRS"]  # fmt: skip

#: The correlations reported: (x quantity, y quantity, what the Hessian argument / the question predicts).
PAIRS = (
    ("distance", "topk_attack", "boundary-near images (small distance) more fragile (low ∩): ρ > 0"),
    ("distance", "spearman_attack", "ρ > 0"),
    ("distance", "topk_random", "ρ > 0"),
    ("curvature", "topk_attack", "curved images more fragile: ρ < 0"),
    ("distance", "curvature", "boundary-near images more curved: ρ < 0"),
)


def boundary_flips(setting: ImageSetting, prof: dict[str, Any], *, n: int | None = None,
                   box: bool = True) -> FlipResult:  # fmt: skip
    """Closest flip points (toward the closest other class) of the first ``n`` images of a setting (default all),
    with :func:`flipfrag.beyond.cases.flip_arguments`; solved once and cached
    (:func:`flipfrag.flippoints.cached_flip_points`, shared by both beyond notebooks)."""
    x = setting.x if n is None else setting.x[:n]
    return cached_flip_points(setting.model, x, name=f"beyond-{setting.model_name}",
                              **flip_arguments(setting, prof, box=box))  # fmt: skip


def certified_distance(res: FlipResult, n: int) -> np.ndarray:
    """(n,) Euclidean distance to the closest flip point where certified, NaN elsewhere (also for images beyond
    ``len(res)``, which were not solved)."""
    out = np.full(n, np.nan)
    d = res.distance.detach().cpu().double().numpy()
    ok = res.converged.cpu().numpy()
    m = min(n, len(res))
    out[:m] = np.where(ok[:m], d[:m], np.nan)
    return out


def curvature(setting: ImageSetting, prof: dict[str, Any], *, seed: int = 0) -> np.ndarray:
    """(N,) ``|λ_max|`` of the input Hessian of the class logit at each image (Lanczos with
    ``prof["beyond_lanczos_iters"]`` steps; the model itself if smooth, else its softplus(``softplus_beta``)
    surrogate)."""
    model = setting.model
    if has_relu(model, setting.x[:1]):
        model = softplus_surrogate(model, float(prof["softplus_beta"]))
    fn = score_fn(model, setting.y)
    eig = top_eigenpairs(fn, setting.x, k=1, iters=int(prof["beyond_lanczos_iters"]), seed=seed)
    return eig.eigenvalues[:, 0].abs().detach().cpu().double().numpy()


def fragility_cells(setting: ImageSetting, prof: dict[str, Any], *, methods: Sequence[str], seed: int = 0,
                    eps: float = 8 / 255) -> pd.DataFrame:  # fmt: skip
    """Per-image top-k ∩ and Spearman ρ after the random sign perturbation and the top-k attack at ``eps``: the
    cells of :func:`flipfrag.fragility.grid_for` with the fragility notebooks' settings (``grid_iters`` iterations,
    IG ``grid_ig_iters`` with ``grid_ig_steps`` steps; :func:`~flipfrag.beyond.cases.grid_overrides`), so that the
    CIFAR-10 cells are the very cells ``notebooks/fragility/04_cifar_grid`` computes and caches (same images, same
    keys)."""
    return grid_for(setting, prof, seed=seed, methods=methods, attacks=("random", "topk"), epsilons=(float(eps),),
                    **grid_overrides(setting, prof))  # fmt: skip


def boundary_frame(setting: ImageSetting, prof: dict[str, Any], *, methods: Sequence[str], seed: int = 0,
                   n_flip: int | None = None) -> tuple[pd.DataFrame, FlipResult]:  # fmt: skip
    """One row per (method, image): ``distance`` (NaN unless certified), ``certified``, ``flip_status``,
    ``curvature``, ``topk_random``, ``spearman_random``, ``topk_attack``, ``spearman_attack``, ``label_kept``
    (of the top-k attack). Flip points are solved for the first ``n_flip`` images only (default all).
    Returns ``(frame, flip result)``."""
    n = len(setting.x)
    res = boundary_flips(setting, prof, n=n_flip)
    dist = certified_distance(res, n)
    certified = np.isfinite(dist)
    status = list(res.status) + ["not solved"] * (n - len(res))
    curv = curvature(setting, prof, seed=seed)
    cells = fragility_cells(setting, prof, methods=methods, seed=seed)
    rows = []
    for method in methods:
        rnd = cells[(cells.method == method) & (cells.attack == "random")].set_index("image")
        atk = cells[(cells.method == method) & (cells.attack == "topk")].set_index("image")
        for i in range(n):
            rows.append({
                "model": setting.model_name, "method": method, "image": i, "label": int(setting.y[i]),
                "distance": dist[i], "certified": bool(certified[i]), "flip_status": status[i],
                "curvature": curv[i], "topk_random": rnd.topk[i], "spearman_random": rnd.spearman[i],
                "topk_attack": atk.topk[i], "spearman_attack": atk.spearman[i], "label_kept": bool(atk.label_kept[i]),
            })  # fmt: skip
    return pd.DataFrame(rows), res


def boundary_correlations(frame: pd.DataFrame, *, n_boot: int = 2000, level: float = 0.95,
                          seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """Spearman ρ across images, per (model, method), for every pair of :data:`PAIRS`, with the percentile bootstrap
    interval (:func:`flipfrag.beyond.correlation.spearman_ci`, ``seed``). Columns: model, method, x, y, rho, low,
    high, n, n_excluded (images without a certified flip point, for the distance pairs), relation ("positive",
    "negative", "none found": the interval contains 0, "not available": fewer than 3 images), expected."""
    rows = []
    for (model, method), g in frame.groupby(["model", "method"], sort=False):
        for xq, yq, expected in PAIRS:
            c = spearman_ci(g[xq].to_numpy(float), g[yq].to_numpy(float), n_boot=n_boot, level=level, seed=seed)
            if not np.isfinite(c.rho):
                rel = "not available"
            elif c.excludes_zero:
                rel = "positive" if c.low > 0 else "negative"
            else:
                rel = "none found"
            rows.append({"model": model, "method": method, "x": xq, "y": yq, "rho": c.rho, "low": c.low,
                         "high": c.high, "n": c.n, "n_excluded": c.n_excluded, "relation": rel,
                         "expected": expected})  # fmt: skip
    return pd.DataFrame(rows)


def boundary_examples(setting: ImageSetting, prof: dict[str, Any], frame: pd.DataFrame, *, seed: int = 0,
                      method: str = "gradient", eps: float = 8 / 255) -> list[dict[str, Any]]:  # fmt: skip
    """The least and the most fragile image (by ``method``'s top-k ∩ after the top-k attack in ``frame``, among the
    images with a certified flip point) with the map before / after that attack, re-run on those two images with the
    grid cell's settings (:func:`flipfrag.beyond.cases.sg_attack` for the simple gradient), for the figure's
    example panels. Per image: ``role`` ("least fragile" / "most fragile"), ``image``, ``label``, ``x``,
    ``distance``, ``curvature``, ``map``, ``map_adv``, ``topk`` (of the re-run; equal to the frame's cell value).
    Empty when fewer than two images are certified."""
    if method != "gradient":
        raise ValueError(f"method: only 'gradient' (the simple gradient) has example panels, got {method!r}")
    g = frame[(frame.model == setting.model_name) & (frame.method == method) & frame.certified.astype(bool)]
    g = g[np.isfinite(g.topk_attack.to_numpy(float))]
    if len(g) < 2:
        return []
    order = g.sort_values(["topk_attack", "image"])
    picks = [("most fragile", int(order.image.iloc[0])), ("least fragile", int(order.image.iloc[-1]))]
    idx = [i for _, i in picks]
    spec = grid_spec(setting, prof, seed=seed, methods=(method,), attacks=("topk",), epsilons=(float(eps),),
                     **grid_overrides(setting, prof))  # fmt: skip
    out = sg_attack(spec, setting.model, "topk", eps)(setting.x[idx], setting.y[idx])
    names = setting.class_names
    cpu = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    ex = []
    for j, (role, i) in enumerate(picks):
        row = g[g.image == i].iloc[0]
        ex.append({"role": role, "image": i, "label": names[int(setting.y[i])] if names else str(int(setting.y[i])),
                   "x": cpu(setting.x[i]), "distance": float(row.distance), "curvature": float(row.curvature),
                   "map": cpu(out.saliency[j]), "map_adv": cpu(out.saliency_adv[j]),
                   "topk": float(out.metrics["topk"][j])})  # fmt: skip
    return ex
