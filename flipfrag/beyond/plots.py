"""The figures of the first two beyond notebooks (one shared style: :mod:`flipfrag.plotting`): study 1's, and
study 2's headline, its example maps and the flip point's target class under attack."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import NullFormatter

from ..fragility.paper import METHOD_LABELS
from .flipmap import FLIP_METHOD

__all__ = [
    "plot_boundary_vs_fragility",
    "plot_flip_explanation_fragility",
    "plot_flip_explanation_examples",
    "plot_flip_target_survival",
    "METHOD_COLORS",
]

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


def _figure(n_rows: int, top_height: float, n_example_rows: int, n_example_cols: int, example_height: float,
            **gridspec):  # fmt: skip
    """A figure with the (n_rows, 3) panel grid on top and, when ``n_example_rows``, a grid of image panels below it
    (two subfigures, so that the image panels keep their own widths)."""
    import matplotlib.pyplot as plt

    from ..plotting import set_style

    set_style()
    ex_h = example_height * n_example_rows
    fig = plt.figure(figsize=(15, top_height + ex_h), layout="constrained")
    if n_example_rows:
        top, bottom = fig.subfigures(2, 1, height_ratios=[top_height, ex_h], hspace=0.02)
    else:
        top, bottom = fig, None
    axes = top.subplots(n_rows, 3, squeeze=False, gridspec_kw=gridspec)
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
#: line style and marker of each attack (the flip map's lines; the saliency methods' top-k attack is solid, "o")
_STYLES = {"topk": ("-", "o"), "random": (":", "s"), "center": ("-.", "^"), "transfer-topk": ("--", "D"),
           "transfer-center": ("--", "v"), "surrogate-topk": ("-", "P"), "surrogate-center": ("-.", "X")}  # fmt: skip
_OWN_TOPK = ("topk", "surrogate-topk")
_OWN_CENTER = ("center", "surrogate-center")


def _flip_own_attacks(s: pd.DataFrame) -> tuple[str, ...]:
    """The flip map's own top-k attacks that ran on one network's rows ``s`` (its center attacks where no top-k
    attack ran: smoke's CIFAR-10 row)."""
    ran = set(s[(s.method == FLIP_METHOD) & s.available.astype(bool)].attack)
    return tuple(a for a in _OWN_TOPK if a in ran) or tuple(a for a in _OWN_CENTER if a in ran)


def _one_eps(s: pd.DataFrame) -> bool:
    """Only one ε and no ε = 0 row (the ReLU CNN): drawn as a dot chart, which reads better than one-point lines."""
    return s[s.eps255 == 0].empty and s.eps255.nunique() == 1


def _look(method: str, attack: str) -> tuple[str, str, str, float]:
    """(colour, line style, marker, line width) of a (method, attack) row."""
    if method == FLIP_METHOD:
        ls, mk = _STYLES[attack]
        return _FLIP_COLORS[attack], ls, mk, 2.2
    return METHOD_COLORS[method], _STYLES[attack][0], _STYLES[attack][1], 1.4


def _line_panel(ax, s: pd.DataFrame, metric: str, entries: Sequence[tuple[str, str]]) -> None:
    """One line per (method, attack) of ``entries`` over ε (0-255 scale), from the method's ε = 0 row."""
    zero = s[s.eps255 == 0]
    for method, attack in entries:
        g = s[(s.method == method) & (s.attack == attack) & s.available.astype(bool)].sort_values("eps255")
        if g.empty:
            continue
        g = pd.concat([zero[zero.method == method], g])
        color, ls, mk, lw = _look(method, attack)
        ax.plot(g.eps255, g[metric], linestyle=ls, marker=mk, ms=4, lw=lw, color=color,
                label=_line_label(method, attack))  # fmt: skip
    ax.set_xlabel("ε (0–255 pixel scale)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(-0.4, float(s.eps255.max()) + 0.4)  # from 0 even when only one ε was run


def _dot_panel(ax, s: pd.DataFrame, metric: str, entries: Sequence[tuple[str, str]]) -> None:
    """One ε only: a dot per (method, attack) of ``entries``, the metric on x, in the line panels' colours and
    markers (labelled on y, and in the legend through invisible lines)."""
    rows = []
    for method, attack in entries:
        g = s[(s.method == method) & (s.attack == attack) & s.available.astype(bool)]
        if not g.empty:
            rows.append((method, attack, float(g[metric].iloc[0])))
    for y, (method, attack, v) in enumerate(rows):
        color, _, mk, _ = _look(method, attack)
        ax.plot([], [], linestyle=_STYLES[attack][0], marker=mk, color=color, label=_line_label(method, attack))
        if np.isfinite(v):
            ax.plot([0, v], [y, y], color=color, lw=1, alpha=0.35)
            ax.plot([v], [y], marker=mk, ms=7, color=color, linestyle="none")
        else:
            ax.text(0.02, y, "no value (no certified flip point at the perturbed image)", fontsize=7.5, va="center",
                    color="#777777")  # fmt: skip
    ax.set_yticks(range(len(rows)), [f"{_SHORT_METHOD.get(m, m)}: {_SHORT_ATTACK.get(a, a)}" for m, a, _ in rows],
                  fontsize=8)  # fmt: skip
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(-0.03, 1.03)
    ax.set_xlabel(f"{_METRIC_TEXT[metric]} at ε = {float(s.eps255.iloc[0]):g}/255")


def _model_panels(summary: pd.DataFrame, models: Sequence[str], metric: str, entries, *, ylabel: str,
                  width: float = 4.4, height: float = 4.3):  # fmt: skip
    """One panel per network (a row): lines over ε, or dots where the network ran one ε; a network without rows
    gets a note. ``entries(s)`` gives the (method, attack) pairs to draw from that network's rows ``s``. Returns the
    figure and the panels, with one legend for all panels in a subfigure of its own below them (a figure legend
    outside the panels meets the title or the footer that save_figure writes)."""
    import matplotlib.pyplot as plt

    from ..plotting import set_style

    set_style()
    fig = plt.figure(figsize=(width * len(models), height + 0.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[height, 0.6])
    axes = list(top.subplots(1, len(models), squeeze=False)[0])
    handles: dict[str, Any] = {}
    labelled = False
    for ax, model in zip(axes, models):
        s = summary[summary.model == model]
        if s.empty:
            ax.set_axis_off()
            _note(ax, f"{_MODEL_LABELS.get(model, model)}:\nno image with a certified flip point, nothing to attack")
            continue
        n = int(s[s.method == FLIP_METHOD].n.max())
        ax.set_title(f"{_MODEL_LABELS.get(model, model)}\n{n} image{'s' if n != 1 else ''}", fontsize=10)
        if _one_eps(s):
            _dot_panel(ax, s, metric, entries(s))
        else:
            _line_panel(ax, s, metric, entries(s))
            if not labelled:  # the line panels share their y scale: one label, on the first
                ax.set_ylabel(ylabel)
                labelled = True
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        bottom.legend(handles.values(), handles.keys(), loc="center", ncol=min(4, len(handles)), fontsize=8.5,
                      frameon=False)  # fmt: skip
    return fig, axes


def _derivative_note(ax, s: pd.DataFrame) -> None:
    """Where the flip map's own attacks lacked a derivative of x_flip on some images: how many had one (in the empty
    lower left of a line panel; under the title of a dot chart, whose rows fill the panel)."""
    own = s[(s.method == FLIP_METHOD) & s.attack.isin([*_OWN_TOPK, *_OWN_CENTER])]
    if len(own) and (~own.available.astype(bool) | (own.n_missing > 0)).any():
        shown = own[own.available.astype(bool) & own.attack.isin(_flip_own_attacks(s))]
        text = ", ".join(f"ε={e:g}: {n - m}/{n}" for e, n, m in zip(shown.eps255, shown.n, shown.n_missing))
        note = "flip map's own attack: images with a derivative\nof x_flip, " + (text or "none")
        if _one_eps(s):
            ax.set_title(f"{ax.get_title()}\n{note.replace(chr(10), ' ')}", fontsize=10)
        else:
            ax.text(0.02, 0.03, note, transform=ax.transAxes, fontsize=7.5, color="#aa0000")


def plot_flip_explanation_fragility(summary: pd.DataFrame, *, models: Sequence[str], title: str = ""):
    """The headline: one panel per network, the top-k ∩ (between the map of x and of the attacked image) against ε
    (0-255 scale) of every explanation under its *own* top-k attack — the saliency methods (colours) and the flip
    explanation |x_flip − x| (black, thick; for the ReLU CNN the attack with the smooth surrogate's direction; the
    center attack where no top-k attack ran) — with the flip map's random sign perturbation (black dotted) as the
    floor a targeted attack must beat. A network run at one ε only: dots at that ε. ``summary``:
    :func:`flipfrag.beyond.summarize_flip_fragility`. Spearman ρ, the other attacks and the target class:
    the table and :func:`plot_flip_target_survival`."""

    def entries(s):
        methods = [m for m in dict.fromkeys(s.method) if m != FLIP_METHOD]
        return [(m, "topk") for m in methods] + [(FLIP_METHOD, a) for a in (*_flip_own_attacks(s), "random")]

    fig, axes = _model_panels(summary, models, "topk", entries, ylabel="top-k intersection (1 = top-k unchanged)")
    for ax, model in zip(axes, models):
        s = summary[summary.model == model]
        if not s.empty:
            _derivative_note(ax, s)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_flip_target_survival(summary: pd.DataFrame, *, models: Sequence[str], title: str = ""):
    """One panel per network: the fraction of images whose closest flip point keeps its target class at the
    attacked image, against ε (0-255 scale), for every attack on the flip map (random sign, its own top-k / center
    attacks, the SG attacks' perturbations); an image without a certified flip point there counts as not kept."""

    def entries(s):
        ran = set(s[s.method == FLIP_METHOD].attack)
        return [(FLIP_METHOD, a) for a in _STYLES if a in ran]

    fig, _ = _model_panels(summary, models, "target_kept", entries,
                           ylabel="fraction: flip point keeps its target class")  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_flip_explanation_examples(summary: pd.DataFrame, examples: Mapping[str, Sequence[Mapping[str, Any]]], *,
                                   models: Sequence[str], title: str = "", eps255: float = 8.0):  # fmt: skip
    """One row per example image (``examples[model]``: ``info["examples"]`` of
    :func:`flipfrag.beyond.flip_fragility_rows`): the image, its simple-gradient map before / after the SG top-k
    attack, its flip map before / at the SG attack's image (transfer) / after the flip map's own top-k attack (the
    surrogate-direction one for the ReLU CNN), all at ``eps255`` (0-255 scale), with the top-k ∩ to the map of x.
    Each pair of maps shares one colour scale."""
    from .. import plotting

    ex_rows = [(m, e) for m in models for e in ((examples or {}).get(m) or [])]
    if not ex_rows:
        raise ValueError("examples: no example image for any of the models")
    fig, axes = plotting.subplots(len(ex_rows), 6, figsize=(13.5, 2.45 * len(ex_rows) + 0.5), squeeze=False)
    eps = f"ε = {eps255:g}/255"
    for ax, (model, e) in zip(axes, ex_rows):
        _image(ax[0], e["x"], f"image {e.get('photo', e['image'])}, class {e['label']}",
               ylabel=_SHORT_MODEL.get(model, model))  # fmt: skip
        v_sg = _pair_max(e.get("sg"), e.get("sg_adv"))
        _map(ax[1], e.get("sg"), "simple-gradient map", v_sg)
        _map(ax[2], e.get("sg_adv"), f"SG after SG top-k attack\n({eps}{_cap(e.get('sg_topk'))})", v_sg)
        v_fl = _pair_max(e.get("flip"), e.get("flip_transfer"), e.get("flip_own"))
        _map(ax[3], e.get("flip"), "flip map |x_flip − x|", v_fl)
        _map(ax[4], e.get("flip_transfer"), f"flip map at the SG attack's\nimage{_cap(e.get('transfer_topk'), True)}",
             v_fl)  # fmt: skip
        own = "surrogate-direction" if (summary[(summary.model == model)].attack == "surrogate-topk").any() else "own"
        _map(ax[5], e.get("flip_own"), f"after the flip map's {own}\ntop-k attack{_cap(e.get('own_topk'), True)}",
             v_fl)  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
