"""The F3-style figure of a grid summary."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from .paper import ATTACK_LABELS, ATTACKS, GRID_METHODS, METHOD_LABELS, METRIC_LABELS, METRICS, PAPER_EPS255, PAPER_F3

# ------------------------------------------------------------------------------------------------- plotting


def plot_attack_grid(
    summary: pd.DataFrame,
    *,
    per_metric: pd.DataFrame | None = None,
    paper: bool = False,
    methods: Sequence[str] | None = None,
    title: str = "",
):
    """F3: rows = metrics, columns = methods, x = epsilon (0-255 scale), one line per attack.

    Solid lines: own-criterion selection. ``per_metric``: dashed thin lines, each metric at its own best iterate.
    ``paper=True``: the paper's F3 values as faint dotted lines with crosses on the top-k and Spearman rows (not on
    the center row, whose pixels belong to 227x227 maps). Returns the matplotlib figure.
    """
    from ..plotting import PALETTE, subplots

    methods = list(methods or [m for m in GRID_METHODS if m in set(summary.method)])
    fig, axes = subplots(len(METRICS), len(methods), figsize=(3.1 * len(methods), 7.6), sharex=True, squeeze=False)
    for j, method in enumerate(methods):
        for i, metric in enumerate(METRICS):
            ax = axes[i, j]
            for attack in ATTACKS:
                sel = summary[(summary.method == method) & (summary.attack == attack)].sort_values("eps255")
                if sel.empty:
                    continue
                color = PALETTE[attack]
                ax.plot(sel.eps255, sel[metric], "o-", color=color, lw=1.8, ms=4, label=ATTACK_LABELS[attack])
                if per_metric is not None and attack != "random":
                    pm = per_metric[(per_metric.method == method) & (per_metric.attack == attack)].sort_values("eps255")
                    ax.plot(pm.eps255, pm[metric], "--", color=color, lw=1.0, alpha=0.8)
                if paper and metric != "center" and (method, attack) in PAPER_F3:
                    vals = [1.0 if metric in ("topk", "spearman") else 0.0, *PAPER_F3[(method, attack)][metric]]
                    ax.plot([0, *PAPER_EPS255], vals, "x:", color=color, lw=1.0, alpha=0.45)
            if metric == "topk":
                ax.set_ylim(-0.03, 1.03)
            elif metric == "spearman":
                ax.set_ylim(min(-0.03, float(summary[metric].min()) - 0.05), 1.03)
            else:  # one scale per row, so that the methods can be compared
                top = max(float(summary[metric].max()), float((per_metric if per_metric is not None else summary)
                                                             [metric].max()))  # fmt: skip
                ax.set_ylim(0, 1.08 * top if top > 0 else 1)
            if i == 0:
                ax.set_title(METHOD_LABELS[method])
            if j == 0:
                ax.set_ylabel(METRIC_LABELS[metric])
            if i == len(METRICS) - 1:
                ax.set_xlabel("L∞ norm of perturbation ε (0–255 scale)")
            ax.set_xticks(sorted(set(summary.eps255)))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    if per_metric is not None:
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1.0))
        labels.append("best iterate per metric")
    if paper:
        handles.append(Line2D([], [], color="0.3", ls=":", marker="x", lw=1.0, alpha=0.6))
        labels.append("paper F3 (SqueezeNet/ImageNet)")
    # above the panels ("outside": constrained layout makes room), clear of the footer save_figure adds; the title
    # goes in the legend's title because constrained layout does not stack a suptitle and an outside legend
    fig.legend(handles, labels, loc="outside upper center", ncol=min(5, len(labels)), frameon=False,
               title=title or None, title_fontsize=11)  # fmt: skip
    return fig

