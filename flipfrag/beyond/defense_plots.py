"""The figures of study 3 (explanation defenses): the robustness-vs-faithfulness plane and example maps."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

__all__ = ["plot_defense_plane", "plot_defense_examples", "DEFENSE_MARKERS", "BASE_COLORS"]

DEFENSE_MARKERS = {"none": "o", "smoothgrad": "s", "sparsified": "D", "beta": "^"}
BASE_COLORS = {"gradient": "#1f77b4", "deeplift": "#d62728"}
_DEFENSE_TEXT = {"none": "no defense", "smoothgrad": "SmoothGrad", "sparsified": "sparsified SmoothGrad",
                 "beta": "β-smoothed"}  # fmt: skip
_BASE_TEXT = {"gradient": "simple gradient", "deeplift": "DeepLIFT"}


def plot_defense_plane(rows: pd.DataFrame, *, title: str):
    """Each method and defense as one point: faithfulness (insertion − deletion AUC of the map at x; x axis, higher =
    more faithful) against the top-k ∩ that survives the adaptive top-k attack (y axis, higher = more robust); bars:
    the range over images (faint). Colour: the base method; marker: the defense."""
    from .. import plotting

    fig, ax = plotting.subplots(figsize=(7.2, 5.0))
    for case, g in rows.groupby("case", sort=False):
        base, defense = g.base.iloc[0], g.defense.iloc[0]
        fx, ty = g.faithfulness.to_numpy(float), g.topk_attack.to_numpy(float)
        mx, my = fx.mean(), ty.mean()
        ax.errorbar(mx, my, xerr=[[mx - fx.min()], [fx.max() - mx]], yerr=[[my - ty.min()], [ty.max() - my]],
                    fmt="none", ecolor=BASE_COLORS[base], alpha=0.3, capsize=2, lw=1)  # fmt: skip
        ax.plot(mx, my, DEFENSE_MARKERS[defense], color=BASE_COLORS[base], ms=10, mec="white", zorder=3)
        ax.annotate(case, (mx, my), textcoords="offset points", xytext=(7, 5), fontsize=8)
    ax.set_xlabel("faithfulness: insertion − deletion AUC (higher = more faithful)")
    ax.set_ylabel("top-k ∩ after the adaptive attack (higher = more robust)")
    ax.set_ylim(-0.02, 1.02)
    handles = [plt_line(BASE_COLORS[b], "o", _BASE_TEXT[b]) for b in BASE_COLORS if b in set(rows.base)]
    handles += [plt_line("#555555", DEFENSE_MARKERS[d], _DEFENSE_TEXT[d]) for d in DEFENSE_MARKERS
                if d in set(rows.defense)]  # fmt: skip
    ax.legend(handles=handles, loc="best", fontsize=8, frameon=True)
    ax.set_title(title, fontsize=10)
    return fig


def plt_line(color: str, marker: str, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color, marker=marker, ls="", ms=8, label=label)


def plot_defense_examples(x: torch.Tensor, x_adv: Mapping[str, torch.Tensor], examples: Mapping[str, tuple],
                          rows: pd.DataFrame, *, image: int = 0, title: str, panel: float = 1.75,
                          clip_quantile: float = 0.995):  # fmt: skip
    """One image: its map under every method / defense (top row) and the map after that case's adaptive top-k attack
    (bottom row), with the top-k ∩ between them; the first column shows the photo and the attacked photo (of the
    first case: every case has its own perturbation, all within the same L∞ budget). Each case's two maps share one
    colour scale, from 0 (dark) to the ``clip_quantile`` quantile of their pixels (bright: a few hot pixels would
    hide the rest, as in fragility's example figure). ``panel``: the width of one panel in inches (larger for a
    large photo)."""
    from .. import plotting

    labels = list(examples)
    fig, axes = plotting.subplots(2, len(labels) + 1, figsize=(panel * (len(labels) + 1), 4.3 * panel / 1.75))
    first = labels[0]
    for r, img in enumerate((x[image], x_adv[first][image])):
        axes[r, 0].imshow(np.clip(img.permute(1, 2, 0).numpy(), 0, 1))
        axes[r, 0].set_title("photo" if r == 0 else f"attacked\n({first})", fontsize=8)
    for c, label in enumerate(labels, start=1):
        before, after = examples[label]
        g = rows[(rows.case == label) & (rows.image == image)].iloc[0]
        pair = (before[image].numpy(), after[image].numpy())
        vmax = float(np.quantile(np.concatenate([m.ravel() for m in pair]), clip_quantile)) or None
        for r, m in enumerate(pair):
            axes[r, c].imshow(m, cmap="inferno", vmin=0, vmax=vmax)
        axes[0, c].set_title(label.replace(" (", "\n("), fontsize=8)
        axes[1, c].set_title(f"after attack: ∩ {g.topk_attack:.2f}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("map of the photo\n(bright = salient)", fontsize=9)
    axes[1, 0].set_ylabel("map after attack", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig
