"""The two figures of the beyond notebooks (one shared style: :mod:`flipfrag.plotting`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from ..fragility.paper import METHOD_LABELS
from .flipmap import FLIP_METHOD

__all__ = ["plot_boundary_vs_fragility", "plot_flip_explanation_fragility", "METHOD_COLORS"]

METHOD_COLORS = {"gradient": "#1f77b4", "integrated_gradients": "#2ca02c", "deeplift": "#d62728", "dtd": "#9467bd",
                 FLIP_METHOD: "#000000"}  # fmt: skip
_LABELS = {**METHOD_LABELS, FLIP_METHOD: "Flip explanation |x_flip − x|"}
_MODEL_LABELS = {"mnist-erf (no box)": "MNIST erf MLP, flip points without the pixel box",
                 "mnist-erf (one-sided derivative)": "MNIST erf MLP, boxed flip points, one-sided derivative",
                 "mnist-erf": "MNIST erf MLP (smooth, no surrogate)",
                 "cifar10-cnn": "CIFAR-10 CNN (ReLU; softplus surrogate for the attacks)"}  # fmt: skip
_SHORT_MODEL = {"mnist-erf (no box)": "MNIST, no box", "mnist-erf (one-sided derivative)": "MNIST, one-sided",
                "mnist-erf": "MNIST erf MLP", "cifar10-cnn": "CIFAR-10 CNN"}  # fmt: skip


_FLIP_COLORS = {"random": "#000000", "topk": "#555555", "center": "#555555", "transfer-topk": "#ff7f0e",
                "transfer-center": "#8c564b", "surrogate-topk": "#17becf", "surrogate-center": "#17becf"}  # fmt: skip
_ATTACK_TEXT = {
    "topk": "top-k attack",
    "random": "random sign",
    "center": "center attack",
    "surrogate-topk": "top-k attack, direction from the smooth surrogate's flip map",
    "surrogate-center": "center attack, direction from the smooth surrogate's flip map",
    "transfer-topk": "SG top-k attack's perturbation",
    "transfer-center": "SG center attack's perturbation",
}


def _line_label(method: str, attack: str) -> str:
    if method == FLIP_METHOD:
        return f"flip map: {_ATTACK_TEXT[attack]}"
    return f"{METHOD_LABELS[method]}: {_ATTACK_TEXT[attack]}"


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True,
            bbox={"boxstyle": "round", "fc": "#f4f4f4", "ec": "#999999"})  # fmt: skip


def _figure(n_rows: int, top_height: float, n_example_rows: int, n_example_cols: int, example_height: float, *,
            row_heights: Sequence[float] | None = None, **gridspec):  # fmt: skip
    """A figure with the (n_rows, 3) panel grid on top and, when ``n_example_rows``, a grid of image panels below it
    (two subfigures, so that the image panels keep their own widths). ``row_heights``: every panel row in its own
    subfigure (its columns laid out on their own: a row with long tick labels does not squeeze the others)."""
    import matplotlib.pyplot as plt

    from ..plotting import set_style

    set_style()
    ex_h = example_height * n_example_rows
    fig = plt.figure(figsize=(15, top_height + ex_h), layout="constrained")
    if n_example_rows:
        top, bottom = fig.subfigures(2, 1, height_ratios=[top_height, ex_h], hspace=0.02)
    else:
        top, bottom = fig, None
    if row_heights is None:
        axes = top.subplots(n_rows, 3, squeeze=False, gridspec_kw=gridspec)
    else:
        rows = top.subfigures(n_rows, 1, height_ratios=list(row_heights), squeeze=False)[:, 0]
        axes = np.array([row.subplots(1, 3, squeeze=False, gridspec_kw=gridspec)[0] for row in rows])
    ex = bottom.subplots(n_example_rows, n_example_cols, squeeze=False) if bottom is not None else None
    return fig, axes, ex


def _image(ax, x: np.ndarray, title: str, ylabel: str = "") -> None:
    """An image (C, H, W) in [0, 1]: RGB, or gray for one channel."""
    img = np.clip(np.transpose(x, (1, 2, 0)), 0, 1)
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img)
    _bare(ax, title, ylabel)


def _map(ax, m: np.ndarray | None, title: str, vmax: float | None = None) -> None:
    """A saliency / flip map (H, W), from 0 (dark) to ``vmax`` (bright: the most salient pixels)."""
    if m is None or not np.isfinite(m).all():
        _note(ax, "not available" if m is None else "no certified\nflip point")
        ax.set_axis_off()
        ax.set_title(title, fontsize=8.5)
        return
    ax.imshow(m, cmap="inferno", vmin=0, vmax=vmax if vmax else float(m.max()) or 1.0)
    _bare(ax, title)


def _bare(ax, title: str, ylabel: str = "") -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.set_title(title, fontsize=8.5)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8.5)


def _cap(topk: float | None, paren: bool = False) -> str:
    """'; ∩ 0.42' (or ' (∩ 0.42)') for a finite top-k intersection, else nothing."""
    if topk is None or not np.isfinite(topk):
        return ""
    return f" (∩ {topk:.2f})" if paren else f"; ∩ {topk:.2f}"


def _pair_max(*maps) -> float:
    vals = [float(np.nanmax(m)) for m in maps if m is not None and np.isfinite(m).any()]
    return max(vals) if vals else 1.0


def plot_boundary_vs_fragility(frame: pd.DataFrame, corr: pd.DataFrame, *, models: Sequence[str], title: str = "",
                               examples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None):  # fmt: skip
    """Rows = networks; columns: top-k ∩ after the top-k attack (ε = 8/255) vs the distance to the closest certified
    flip point, the same vs the curvature |λ_max|, and the Spearman ρ of every pair with its bootstrap interval.
    ``examples[model]`` (:func:`flipfrag.beyond.boundary_examples`): below, one row per network with its most and
    least fragile image, the simple-gradient map and the map after the top-k attack, with the image's distance."""
    ex_models = [m for m in models if examples and examples.get(m)]
    fig, axes, ex_axes = _figure(len(models), 4.3 * len(models), len(ex_models), 6, 2.9,
                                 width_ratios=[1, 1, 1.25])  # fmt: skip
    for r, model in enumerate(models):
        f = frame[frame.model == model]
        c = corr[corr.model == model]
        methods = list(dict.fromkeys(f.method))
        ax_d, ax_c, ax_r = axes[r]
        n_img = f.image.nunique()
        n_cert = int(f.drop_duplicates("image").certified.sum())
        for m in methods:
            g = f[f.method == m]
            ax_d.scatter(g.distance, g.topk_attack, s=18, alpha=0.75, color=METHOD_COLORS[m], label=_LABELS[m])
            ax_c.scatter(g.curvature, g.topk_attack, s=18, alpha=0.75, color=METHOD_COLORS[m], label=_LABELS[m])
        if n_cert == 0:
            n_solved = int(f.drop_duplicates("image").flip_status.ne("not solved").sum())
            _note(ax_d, f"no certified flip point\n(0 of {n_solved} solved images)")
        ax_d.set_xlabel("distance to the closest flip point (L2, [0, 1] pixels)")
        ax_d.set_ylabel("top-k ∩ after top-k attack, ε = 8/255")
        ax_d.set_title(f"{_MODEL_LABELS.get(model, model)}\n{n_cert} of {n_img} images with a certified flip point")
        curv = f.curvature[f.curvature > 0]
        if len(curv) and curv.max() > 20 * curv.min():  # log scale only when the curvatures span decades
            ax_c.set_xscale("log")
            ax_c.xaxis.set_minor_formatter(NullFormatter())
        ax_c.set_xlabel("curvature |λ_max| of the input Hessian of the class logit")
        ax_c.set_title(f"{n_img} images")
        ax_c.legend(loc="best", fontsize=8)
        for ax in (ax_d, ax_c):
            ax.set_ylim(-0.03, 1.03)
        labels, y = [], 0.0
        for (xq, yq), g in c.groupby(["x", "y"], sort=False):
            # distance vs curvature does not depend on the method: one interval, in black
            ms = methods[:1] if (xq, yq) == ("distance", "curvature") else methods
            start = y
            for m in ms:
                row = g[g.method == m]
                if row.empty:
                    continue
                row = row.iloc[0]
                color = "#000000" if len(ms) == 1 else METHOD_COLORS[m]
                if np.isfinite(row.rho):
                    ax_r.errorbar(row.rho, y, xerr=[[row.rho - row.low], [row.high - row.rho]], fmt="o",
                                  color=color, ms=4, capsize=2)  # fmt: skip
                y += 1
            if not np.isfinite(g[g.method.isin(ms)].rho).any():
                ax_r.text(0.02, (start + y - 1) / 2, f"n/a (n = {int(g.n.max())})", fontsize=8, va="center",
                          color="#555555")  # fmt: skip
            labels.append(((start + y - 1) / 2, f"{xq} vs\n{yq.replace('_', ' ')}"))
            y += 0.8
        ax_r.axvline(0, color="#555555", lw=1)
        ax_r.set_yticks([p for p, _ in labels], [t for _, t in labels], fontsize=8)
        ax_r.invert_yaxis()
        ax_r.set_xlim(-1.05, 1.05)
        ax_r.set_xlabel("Spearman ρ across images (95 % bootstrap interval)")
        ax_r.set_title("correlations (one dot per method)")
    for r, model in enumerate(ex_models):
        for j, e in enumerate(list(examples[model])[:2]):
            a_img, a_map, a_adv = ex_axes[r, 3 * j : 3 * j + 3]
            _image(a_img, e["x"], f"{e['role']}: image {e['image']} ({e['label']})\ndistance to flip point "
                   f"{e['distance']:.3g}", ylabel=_SHORT_MODEL.get(model, model) if j == 0 else "")  # fmt: skip
            vmax = _pair_max(e["map"], e["map_adv"])
            _map(a_map, e["map"], "simple-gradient map", vmax)
            _map(a_adv, e["map_adv"], f"after the top-k attack (ε = 8/255)\ntop-k ∩ {e['topk']:.2f}", vmax)
        for a in ex_axes[r, 3 * len(list(examples[model])[:2]) :]:
            a.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


_SHORT_ATTACK = {"topk": "top-k attack", "random": "random sign", "center": "center attack",
                 "surrogate-topk": "top-k, surrogate direction", "surrogate-center": "center, surrogate direction",
                 "transfer-topk": "SG top-k's perturbation", "transfer-center": "SG center's perturbation"}  # fmt: skip
_SHORT_METHOD = {"gradient": "SG", "integrated_gradients": "IG", "deeplift": "DeepLIFT", "dtd": "DTD",
                 FLIP_METHOD: "flip map"}  # fmt: skip
_METRIC_TEXT = {"topk": "top-k intersection", "spearman": "Spearman rank correlation",
                "target_kept": "fraction: flip point keeps its target class"}  # fmt: skip


def _dot_panel(ax, s: pd.DataFrame, metric: str, styles: Mapping[str, tuple], *, labels: bool) -> None:
    """One ε only: a dot per (method, attack) row, the metric on x, in the line panels' colours and markers."""
    entries = []
    for method in dict.fromkeys(s.method):
        if metric == "target_kept" and method != FLIP_METHOD:
            continue
        for attack in ("topk", "random") if method != FLIP_METHOD else styles:
            g = s[(s.method == method) & (s.attack == attack) & s.available]
            if g.empty:
                continue
            color = _FLIP_COLORS[attack] if method == FLIP_METHOD else METHOD_COLORS[method]
            entries.append((f"{_SHORT_METHOD.get(method, method)}: {_SHORT_ATTACK.get(attack, attack)}",
                            float(g[metric].iloc[0]), color, styles[attack][1]))  # fmt: skip
    for y, (_, v, color, mk) in enumerate(entries):
        if np.isfinite(v):
            ax.plot([0, v], [y, y], color=color, lw=1, alpha=0.35)
            ax.plot([v], [y], marker=mk, ms=6, color=color, linestyle="none")
        else:
            ax.text(0.02, y, "no value (no certified flip point at the perturbed image)", fontsize=7, va="center",
                    color="#777777")  # fmt: skip
    ax.set_yticks(range(len(entries)), [t for t, *_ in entries] if labels else [], fontsize=7.5)
    ax.set_ylim(len(entries) - 0.5, -0.5)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel(f"{_METRIC_TEXT[metric]} at ε = {float(s.eps255.iloc[0]):g}/255")


def plot_flip_explanation_fragility(summary: pd.DataFrame, *, models: Sequence[str], title: str = "",
                                    examples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                                    eps255: float = 8.0):  # fmt: skip
    """Rows = networks; columns: top-k ∩, Spearman ρ and the fraction of images whose closest flip point keeps its
    target class, vs ε (0-255 scale). Saliency methods: top-k attack (solid) and random sign (dotted); the flip
    explanation (black): random sign, its own top-k / center attacks (when available; for the ReLU CNN with the
    surrogate's direction), and the SG attacks' perturbations (transfer). ``examples[model]`` (``info["examples"]``
    of :func:`flipfrag.beyond.flip_fragility_rows`): below, one row per example image: the image, its
    simple-gradient map before / after the SG top-k attack, its flip map before / at the SG attack's image / after
    the flip map's own top-k attack (at ``eps255``)."""
    styles = {"topk": ("-", "o"), "random": (":", "s"), "center": ("-.", "^"), "transfer-topk": ("--", "D"),
              "transfer-center": ("--", "v"), "surrogate-topk": ("-", "P"),
              "surrogate-center": ("-.", "X")}  # fmt: skip
    has_data = [not summary[summary.model == m].empty for m in models]
    heights = [1.0 if h else 0.25 for h in has_data]
    ex_rows = [(m, e) for m in models for e in ((examples or {}).get(m) or [])]
    fig, axes, ex_axes = _figure(len(models), 4.2 * sum(heights) + 2.0, len(ex_rows), 6, 2.6,
                                 row_heights=heights)  # fmt: skip
    for r, model in enumerate(models):
        s = summary[summary.model == model]
        zero = s[s.eps255 == 0]
        for j, metric in enumerate(("topk", "spearman", "target_kept")):
            ax = axes[r, j]
            if s.empty:
                ax.set_axis_off()
                if j == 1:
                    _note(ax, f"{_MODEL_LABELS.get(model, model)}:\nno image with a certified flip point, nothing to "
                              "attack")  # fmt: skip
                continue
            if zero.empty and s.eps255.nunique() == 1:  # one ε only (the ReLU CNN): a dot chart reads better
                _dot_panel(ax, s, metric, styles, labels=j != 1)
                continue
            for method in dict.fromkeys(s.method):
                for attack in ("topk", "random") if method != FLIP_METHOD else styles:
                    g = s[(s.method == method) & (s.attack == attack) & s.available].sort_values("eps255")
                    if g.empty or (metric == "target_kept" and method != FLIP_METHOD):
                        continue
                    z = zero[zero.method == method]
                    g = pd.concat([z, g]) if metric != "target_kept" or method == FLIP_METHOD else g
                    ls, mk = styles[attack]
                    lw = 2.2 if method == FLIP_METHOD else 1.4
                    color = _FLIP_COLORS[attack] if method == FLIP_METHOD else METHOD_COLORS[method]
                    ax.plot(g.eps255, g[metric], linestyle=ls, marker=mk, ms=4, lw=lw, color=color,
                            label=_line_label(method, attack))  # fmt: skip
            own = s[(s.method == FLIP_METHOD) & s.attack.isin(["topk", "surrogate-topk"])]
            if j == 0 and len(own) and (~own.available.astype(bool) | (own.n_missing > 0)).any():
                shown = own[own.available.astype(bool)]
                text = ", ".join(f"ε={e:g}: {n - m}/{n}" for e, n, m in zip(shown.eps255, shown.n, shown.n_missing))
                ax.text(0.02, 0.03, "flip-map top-k / center attacks: images with a derivative of x_flip "
                        + (text if text else "none"), transform=ax.transAxes, fontsize=7, color="#aa0000")  # fmt: skip
            ax.set_xlabel("ε (0–255 pixel scale)")
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlim(-0.4, float(s.eps255.max()) + 0.4)  # from 0 even when only one ε was run
        if s.empty:
            continue
        if not (zero.empty and s.eps255.nunique() == 1):  # (the dot charts say it on their x axes)
            axes[r, 0].set_ylabel("top-k intersection")
            axes[r, 1].set_ylabel("Spearman rank correlation")
            axes[r, 2].set_ylabel("fraction: flip point keeps its target class")
        n = int(s[s.method == FLIP_METHOD].n.max())
        dots = zero.empty and s.eps255.nunique() == 1
        axes[r, 0].set_title(f"{_MODEL_LABELS.get(model, model)}:{chr(10) if dots else ' '}{n} images")
        axes[r, 1].set_title("same images and\nperturbations in every column" if dots else
                             "same images and perturbations in every column")  # fmt: skip
        axes[r, 2].set_title("target class of the closest flip point")
    first = next((r for r, h in enumerate(has_data) if h), None)
    if first is not None:
        # inside the first row's target-class panel, whose lower part is empty (its lines stay near 1): outside the
        # panels a figure legend meets the title (above) or the footer save_figure writes (below)
        axes[first, 2].legend(*axes[first, 0].get_legend_handles_labels(), fontsize=7.5, loc="lower left", ncol=1)
    eps = f"ε = {eps255:g}/255"
    for r, (model, e) in enumerate(ex_rows):
        ax = ex_axes[r]
        label = _SHORT_MODEL.get(model, model)
        _image(ax[0], e["x"], f"image {e.get('photo', e['image'])} ({e['label']})", ylabel=label)
        v_sg = _pair_max(e.get("sg"), e.get("sg_adv"))
        _map(ax[1], e.get("sg"), "simple-gradient map", v_sg)
        _map(ax[2], e.get("sg_adv"), f"SG after SG top-k attack\n({eps}{_cap(e.get('sg_topk'))})", v_sg)
        v_fl = _pair_max(e.get("flip"), e.get("flip_transfer"), e.get("flip_own"))
        _map(ax[3], e.get("flip"), "flip map |x_flip − x|", v_fl)
        _map(ax[4], e.get("flip_transfer"), f"flip map at the SG attack's image{_cap(e.get('transfer_topk'), True)}",
             v_fl)  # fmt: skip
        own = "surrogate-direction" if (summary[(summary.model == model)].attack == "surrogate-topk").any() else "own"
        _map(ax[5], e.get("flip_own"), f"after the flip map's {own}\ntop-k attack{_cap(e.get('own_topk'), True)}",
             v_fl)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
