"""The flip-point figures that need more than a few lines of matplotlib (drawn from the studies' results)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .study_pca import leading_directions

_SPECTRUM_STYLES = {
    "flip directions, centred": ("#1f77b4", "-"),
    "flip directions, unit rows, centred": ("#2ca02c", "-"),
    "flip directions, unit rows, uncentred": ("#2ca02c", "--"),
    "data (inputs), centred": ("0.4", ":"),
}


def plot_pca_rrqr(spectra: dict[str, dict], qrs: dict, adult_train: Any, mnist_train: Any, *, profile: str):
    """``flip_points/fig_pca``: (a, b) cumulative PCA spectra of the flip directions vs the data (Adult, MNIST),
    (c) the RR-QR diagonals, (d) Adult's and (e) MNIST's dominant flip direction per predicted class.
    ``spectra``: dataset -> :func:`~flipfrag.flippoints.study_pca.pca_spectra`; ``qrs``: (dataset, label) -> the
    unit-row RR-QR of :func:`~flipfrag.flippoints.study_pca.rrqr_study`. Returns the figure."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 10.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.05])
    ax_a, ax_b, ax_c = top.subplots(1, 3)
    for ax, name, kmax in ((ax_a, "Adult", 30), (ax_b, "MNIST", 150)):
        _spectra_panel(ax, spectra[name], name, kmax)
    _rrqr_panel(ax_c, qrs)
    left, right = bottom.subfigures(1, 2, width_ratios=[1, 1.25])
    _adult_direction_panel(left.subplots(1, 1), adult_train)
    _mnist_direction_panels(right, mnist_train)
    fig.suptitle(f"Flip directions of a whole training subset: PCA and rank-revealing QR (erf MLPs, profile={profile})")
    return fig


def _spectra_panel(ax, spectra: dict, name: str, kmax: int) -> None:
    for label, p in spectra.items():
        c, ls = _SPECTRUM_STYLES[label]
        cum = 100 * np.cumsum(p.explained)[:kmax]
        ax.plot(np.arange(1, len(cum) + 1), cum, color=c, ls=ls, lw=2, label=f"{label} (90% at {p.n_components(0.9)})")
    ax.axhline(90, color="0.75", lw=0.8)
    ax.set_xlabel("number of principal components")
    ax.set_ylabel("cumulative share of variance (%)")
    ax.set_title(f"({'a' if name == 'Adult' else 'b'}) {name}: PCA of flip directions vs data")
    ax.legend(fontsize=7.5, loc="lower right")
    ax.set_ylim(0, 101)


def _rrqr_panel(ax, qrs: dict) -> None:
    for (ds, label), q in qrs.items():
        if label.startswith("flips out of") and (
            ds == "Adult" or label.endswith("3 (training)") or label.endswith("8 (training)")
        ):
            ax.semilogy(
                np.arange(1, len(q.r_diag) + 1), q.r_diag / q.r_diag[0], lw=1.6, label=f"{ds}: {label.split(' (')[0]}"
            )
    ax.axhline(1e-2, color="0.75", lw=0.8)
    ax.set_ylim(1e-6, 2)  # below ~1e-6 the remaining pivots are columns the flips never move (rank deficiency)
    ax.set_xlabel("pivot k (features in RR-QR order)")
    ax.set_ylabel("|R_kk| / |R_11|")
    ax.set_title("(c) RR-QR of flip directions (unit rows)")
    ax.legend(fontsize=7.5)


def _adult_direction_panel(ax, adult_train: Any) -> None:
    cls = adult_train.data.class_names
    anames = adult_train.data.feature_names
    vecs = leading_directions(adult_train, list(cls), adult_train.x.shape[1])
    top_idx = np.argsort(-(np.abs(vecs[cls[0]]) + np.abs(vecs[cls[1]])))[:12][::-1]
    yy = np.arange(len(top_idx))
    ax.barh(yy + 0.2, vecs[cls[0]][top_idx], height=0.4, color="#d62728", label=f"flips out of {cls[0]}")
    ax.barh(yy - 0.2, vecs[cls[1]][top_idx], height=0.4, color="#1f77b4", label=f"flips out of {cls[1]}")
    ax.set_yticks(yy, [anames[i] for i in top_idx], fontsize=8)
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_xlabel("entry of the leading singular vector (unit-length flip directions)")
    ax.set_title("(d) Adult: dominant flip direction per predicted class")
    ax.legend(fontsize=8, loc="lower right")


def _mnist_direction_panels(subfig, mnist_train: Any) -> None:
    img_axes = subfig.subplots(2, 5)
    comps = {c: v.reshape(28, 28) for c, v in leading_directions(mnist_train, list(range(10)), 784).items()}
    vm = max(np.abs(v).max() for v in comps.values())
    for c, ax in enumerate(img_axes.flat):
        im = ax.imshow(comps[c], cmap="RdBu_r", vmin=-vm, vmax=vm)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"out of {c}" if comps[c].any() else f"out of {c}: no flips", fontsize=9)
    subfig.colorbar(im, ax=img_axes, shrink=0.7, label="entry of the leading singular vector")
    subfig.suptitle("(e) MNIST: dominant flip direction per predicted digit", fontsize=11)


def plot_confidence(tables: dict, table: Any, *, profile: str):
    """``flip_points/fig_confidence``: per dataset (erf MLPs) the distance to the closest certified flip point
    against the max softmax, correct and misclassified inputs apart (top), and the ROC curves of misclassification
    detection by distance, softmax and linearised distance (bottom). ``tables`` / ``table``:
    :func:`~flipfrag.flippoints.study_confidence.confidence_study`. Returns the figure."""
    from matplotlib.ticker import NullFormatter

    from ..plotting import PALETTE, subplots

    names = {
        "adult": "Adult income",
        "breast_cancer": "Breast cancer (WDBC)",
        "mnist": "MNIST" + ("" if profile == "paper" else "-5k"),
    }
    fig, axes = subplots(2, 3, figsize=(13, 7.6))
    for j, name in enumerate(["adult", "breast_cancer", "mnist"]):
        t = tables[(name, "erf")]
        t = t[t["certified"]]
        ax = axes[0, j]
        for correct, label in ((True, "correct"), (False, "misclassified")):
            part = t[t["correct"] == correct]
            ax.scatter(part["softmax"], part["distance"], s=10 if correct else 16, alpha=0.45 if correct else 0.9,
                       color=PALETTE["correct" if correct else "misclassified"], label=f"{label} ({len(part)})",
                       edgecolors="none")  # fmt: skip
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("max softmax probability")
        ax.set_ylabel("distance to closest flip point (scaled units)")
        ax.set_title(names[name])
        ax.legend(loc="lower right", frameon=True)
        row = table[(table["dataset"] == name) & (table["activation"] == "erf")].iloc[0]
        _roc_panel(axes[1, j], t, row)
    fig.suptitle(
        f"Confidence: distance to the closest flip point vs softmax, erf MLPs, test subsets (profile={profile})"
    )
    return fig


def _roc_panel(ax, t: Any, row: Any) -> None:
    from sklearn.metrics import roc_curve

    wrong = ~t["correct"].to_numpy()
    for col, label, color, auc in (
        ("distance", "distance to flip point", "#2ca02c", row["AUROC distance"]),
        ("softmax", "max softmax", "#7f7f7f", row["AUROC softmax"]),
        ("linearized", "linearised distance", "#ff7f0e", row["AUROC linearised distance"]),
    ):
        if wrong.any() and (~wrong).any():
            fpr, tpr, _ = roc_curve(wrong, -t[col].to_numpy())
            ax.plot(fpr, tpr, color=color, lw=1.8, label=f"{label} (AUROC {auc:.3f})",
                    ls="--" if col == "linearized" else "-")  # fmt: skip
    ax.plot([0, 1], [0, 1], color="0.7", lw=1, ls=":")
    ax.set_xlabel("false-positive rate (correct outputs flagged)")
    ax.set_ylabel("true-positive rate (mistakes flagged)")
    ax.legend(loc="lower right", fontsize=8)


def plot_adversarial(study: Any, test: Any, ks: list, *, profile: str):
    """``flip_points/fig_adversarial``: the digits, their closest flip points, the change and the flip point with
    the first k RR-QR pixels free (top; k the smallest with half of the digits flipped), and the distance and share
    of digits flipped against k per pixel order (bottom). ``study``:
    :func:`~flipfrag.flippoints.study_adversarial.adversarial_study` of the test flip set ``test``. Returns the
    figure."""
    import matplotlib.pyplot as plt

    from .study_adversarial import RRQR_ORDER

    summary = study.summary
    k_show = min(
        (k for k in ks if summary.query("order.str.startswith('RR-QR') and k == @k")["flipped"].iloc[0] >= 0.5),
        default=ks[-1],
    )
    n_img = len(study.picked)
    fig = plt.figure(figsize=(max(9, 1.45 * n_img + 1.5), 12.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.45, 1])
    _adversarial_images(top, study, test, study.results[RRQR_ORDER], ks.index(k_show), k_show)
    _adversarial_curves(bottom.subplots(1, 4, sharey=False), study)
    bottom.suptitle(
        f"Flip points restricted to the first k pixels of each order; a missing dot = no flip point with k pixels "
        f"({n_img} digits, profile={profile})",
        fontsize=11,
    )
    return fig


def _adversarial_images(top, study: Any, test: Any, rq: Any, j_show: int, k_show: int) -> None:
    res, picked, x, src, tgt = test.res, study.picked, study.x, study.src, study.tgt
    n_img = len(picked)
    axes = top.subplots(4, n_img, squeeze=False)
    diff = res.x_flip[picked] - x
    vmax = float(diff.abs().max())
    for j in range(n_img):
        i = int(picked[j])
        p = j_show * n_img + j
        imgs = [
            (x[j, 0], "gray", 0, 1),
            (res.x_flip[i, 0], "gray", 0, 1),
            (diff[j, 0], "RdBu_r", -vmax, vmax),
            (rq.x_flip[p, 0] if bool(rq.converged[p]) else None, "gray", 0, 1),
        ]
        for r_, (im, cmap, lo, hi) in enumerate(imgs):
            ax = axes[r_, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if im is None:
                ax.text(0.5, 0.5, "no flip point", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                continue
            ax.imshow(im.numpy(), cmap=cmap, vmin=lo, vmax=hi)
        axes[0, j].set_title(f"{int(src[j])} → {int(tgt[j])}", fontsize=10)
        axes[1, j].set_xlabel(f"L2 {float(res.distance[i]):.2f}", fontsize=8)
        axes[3, j].set_xlabel(f"L2 {float(rq.distance[p]):.2f}" if bool(rq.converged[p]) else "", fontsize=8)
    for r_, label in enumerate(
        ["original", "closest flip point", "change (flip − original)", f"flip, {k_show} RR-QR pixels"]
    ):
        axes[r_, 0].set_ylabel(label, fontsize=9)
    top.colorbar(axes[2, 0].images[0], ax=axes[2, :].tolist(), shrink=0.8, label="pixel change")
    top.suptitle(
        "MNIST test digits: predicted class → class of the closest flip point; pixel values in [0, 1]", fontsize=11
    )


def _adversarial_curves(bax, study: Any) -> None:
    import matplotlib.pyplot as plt

    src, tgt, curve, summary = study.src, study.tgt, study.curve, study.summary
    n_img = len(study.picked)
    digit_colors = plt.get_cmap("tab10")(np.arange(n_img) % 10)
    for a, (name, part) in enumerate(curve.groupby("order", sort=False)):
        ax = bax[a]
        for j in range(n_img):
            d = part[part["point"] == j].sort_values("k")
            ax.plot(d["k"], d["distance"], "o-", ms=3, lw=1, color=digit_colors[j],
                    label=f"{int(src[j])} → {int(tgt[j])}")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("k = pixels allowed to change")
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("L2 distance to the flip point (pixel units)" if a == 0 else "")
    bax[0].legend(fontsize=7, ncol=2, title="digit", title_fontsize=7)
    ymax = max(ax.get_ylim()[1] for ax in bax[:3])
    for ax in bax[:3]:
        ax.set_ylim(0, ymax)
    colors = {"RR-QR (training flips of the class)": "#2ca02c", "own flip direction": "#1f77b4",
              "random pixels": "#7f7f7f"}  # fmt: skip
    for name, part in summary.groupby("order"):
        bax[3].plot(part["k"], 100 * part["flipped"], "o-", color=colors[name], label=name)
    bax[3].set_xscale("log")
    bax[3].set_xlabel("k = pixels allowed to change")
    bax[3].set_ylabel("digits with a flip point (%)")
    bax[3].set_title("Digits that can be flipped", fontsize=10)
    bax[3].set_ylim(-3, 103)
    bax[3].legend(fontsize=7)


def plot_influential_training(agg: Any, pools: dict, prof: Any, *, profile: str):
    """``flip_points/fig_influential_training``: test accuracy and agreement with the reference model against the
    share of the pool kept, per selection (closest / random / farthest), Adult and breast cancer. ``agg``:
    :func:`~flipfrag.flippoints.study_training.summarize_training`; ``pools``: the study's per-dataset facts.
    Returns the figure."""
    from ..plotting import subplots

    titles = {"adult": "Adult income", "breast_cancer": "Breast cancer (WDBC)"}
    colors = {"closest": "#d62728", "random": "#7f7f7f", "farthest": "#1f77b4"}
    sel_labels = {"closest": "closest to the boundary", "random": "random", "farthest": "farthest from the boundary"}
    fig, axes = subplots(2, 2, figsize=(11, 8.4))
    for r, name in enumerate(["adult", "breast_cancer"]):
        part = agg[agg["dataset"] == name]
        for c, (col, label) in enumerate(
            (("test_acc", "test accuracy"), ("agreement", "agreement with the reference model"))
        ):
            ax = axes[r, c]
            for sel in ("closest", "random", "farthest"):
                d = part[part["selection"] == sel].sort_values("fraction")
                ax.errorbar(100 * d["fraction"], d[col], yerr=d[col + "_sd"].fillna(0), fmt="o-", capsize=3, ms=4,
                            color=colors[sel], label=sel_labels[sel])  # fmt: skip
            if col == "test_acc":
                ax.axhline(pools[name]["reference test acc"], color="0.3", ls=":", lw=1,
                           label="reference (whole pool)")  # fmt: skip
            ax.set_xscale("log")
            fr = prof["retrain_fractions"]
            ax.set_xticks([100 * f for f in fr], [f"{100 * f:g}" for f in fr])
            ax.set_xlabel(f"% of the training pool kept (pool: {pools[name]['pool']} points)")
            ax.set_ylabel(label)
            ax.set_title(f"{titles[name]}: {label}")
        axes[r, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"Retraining on the training points closest to / farthest from their flip points "
        f"(erf MLP, {prof['retrain_repeats']} seeds, {prof['retrain_steps']} Adam steps each; profile={profile})"
    )
    return fig


def plot_model_agnostic(pts: dict, spectra: dict, *, profile: str):
    """``flip_points/fig_model_agnostic``: (a) solver vs closed-form distance of logistic regression, (b) their
    relative difference, (c) the spectra of the flip directions, logistic regression vs the erf MLP (``pts``,
    ``spectra``: :func:`~flipfrag.flippoints.study_agnostic.agnostic_study`). Returns the figure."""
    from ..plotting import subplots

    names = {"adult": "Adult", "breast_cancer": "Breast cancer"}
    colors = {"adult": "#1f77b4", "breast_cancer": "#ff7f0e"}
    fig, axes = subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    for n, (d, s, _) in pts.items():
        ax.scatter(d, s, s=12, alpha=0.6, color=colors[n], label=f"{names[n]} ({len(d)} inputs)")
    lim = [min(p[0].min() for p in pts.values()) * 0.8, max(p[0].max() for p in pts.values()) * 1.25]
    ax.plot(lim, lim, color="0.3", lw=1, ls=":", label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("closed-form distance (projection onto w·x + b = 0 within [0, 1])")
    ax.set_ylabel("distance found by closest_flip_point")
    ax.set_title("(a) solver vs closed form, logistic regression")
    ax.legend(fontsize=8)
    ax = axes[1]
    allrel = np.concatenate([p[2] for p in pts.values()])
    bins = np.logspace(np.log10(max(allrel.min(), 1e-17)), np.log10(max(allrel.max(), 1e-15)) + 0.1, 30)
    for n, (_, _, rel) in pts.items():
        ax.hist(np.maximum(rel, 1e-17), bins=bins, alpha=0.6, color=colors[n], label=names[n])
    ax.set_xscale("log")
    ax.set_xlabel("relative difference |d_solver − d_closed| / d_closed")
    ax.set_ylabel("test inputs")
    ax.set_title("(b) agreement with the closed form")
    ax.legend(fontsize=8)
    ax = axes[2]
    for n, sp in spectra.items():
        for model_name, p in sp.items():
            ax.plot(np.arange(1, 7), 100 * np.cumsum(p.explained)[:6], "o-" if model_name == "erf MLP" else "s--",
                    color=colors[n], ms=4, label=f"{names[n]}, {model_name}")  # fmt: skip
    ax.set_xlabel("number of singular vectors (unit-length flip directions, uncentred)")
    ax.set_ylabel("cumulative share (%)")
    ax.set_title("(c) flip directions: linear model vs network")
    ax.set_ylim(min(70, ax.get_ylim()[0]), 100.5)
    ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"The flip-point pipeline on a non-neural model: logistic regression (profile={profile})")
    return fig


def plot_homotopy(table: Any, strategies: list[str], *, profile: str):
    """``flip_points/fig_homotopy``: per dataset and strategy the certified share, how often it finds the closest of
    the strategies' flip points, and the solve time (``table``:
    :func:`~flipfrag.flippoints.study_homotopy.homotopy_study`). Returns the figure."""
    from ..plotting import subplots

    names = {"adult": "Adult", "breast_cancer": "Breast cancer",
             "mnist": "MNIST" + ("" if profile == "paper" else "-5k")}  # fmt: skip
    colors = ["#7f7f7f", "#2ca02c", "#1f77b4", "#9467bd"]
    fig, axes = subplots(1, 3, figsize=(15, 4.6))
    ds_list = list(table["dataset"].unique())
    width = 0.8 / len(strategies)
    panels = (("certified (%)", "certified flip points (%)"),
              ("finds the best (%)", "inputs where it finds the closest flip point (%)"),
              ("ms per input", "solve time per input (ms)"))  # fmt: skip
    for a, (col, ylabel) in enumerate(panels):
        ax = axes[a]
        for s, name in enumerate(strategies):
            vals = [float(table[(table["dataset"] == d) & (table["strategy"] == name)][col].iloc[0]) for d in ds_list]
            ax.bar(np.arange(len(ds_list)) + (s - 1.5) * width, vals, width, color=colors[s], label=name)
            if col != "ms per input":  # the exact value: bars near 100 % look alike
                for j, v in enumerate(vals):
                    ax.text(j + (s - 1.5) * width, v - 2, f"{v:.0f}", ha="center", va="top", fontsize=7,
                            color="white", rotation=90)  # fmt: skip
        ax.set_xticks(np.arange(len(ds_list)), [names[d] for d in ds_list])
        ax.set_ylabel(ylabel)
        if col != "ms per input":
            ax.set_ylim(0, 105)
    axes[0].set_title("(a) success: certified flip points")
    axes[1].set_title("(b) optimality: closest among the four strategies")
    axes[2].set_title("(c) cost")
    axes[2].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Homotopy (erf σ widening + output-bias shift) vs direct solving, erf MLPs (profile={profile})")
    return fig


def plot_features(fset: Any, study: Any, *, profile: str):
    """``flip_points/fig_features``: per example (rows) the changes at its flip point with all features free (a),
    with the immutable attributes fixed (b), and the distance when only one attribute may change (c). ``study``:
    :func:`~flipfrag.flippoints.study_features.feature_study` of the Adult flip set ``fset``. Returns the figure."""
    import torch

    from ..plotting import subplots
    from .study_features import ADULT_UNITS

    data, res, pred = fset.data, fset.res, fset.res.source
    names = data.feature_names
    bar_colors = {True: "#2ca02c", False: "#d62728"}
    fig, axes = subplots(2, 3, figsize=(17, 10), gridspec_kw={"width_ratios": [1.2, 1.2, 0.9]})
    for r, (label, i) in enumerate(study.examples.items()):
        head = f"{label}: true {data.class_names[int(fset.y[i])]}, predicted {data.class_names[int(pred[i])]}"
        panels = (
            (study.ranked[label], f"(a) all features free\ndistance {float(res.distance[i]):.3f}"),
            (study.ranked_mut[label], "(b) sex, race, native country fixed; age may only grow\n"
             f"distance {float(study.res_mut.distance[r]):.3f}"),
        )  # fmt: skip
        for c, (tab, sub) in enumerate(panels):
            ax = axes[r, c]
            tab = tab.iloc[::-1]
            labels = [
                f"{f}  ({o:+.3g} {ADULT_UNITS[f]})" if f in ADULT_UNITS else f"{f}  ({o:+.3f})"
                for f, o in zip(tab["feature"], tab["change_original"])
            ]
            ax.barh(labels, tab["change"], color=[bar_colors[v > 0] for v in tab["change"]])
            ax.axvline(0, color="0.3", lw=0.8)
            ax.set_xlabel("change at the flip point (scaled units)")
            ax.set_title(sub, fontsize=10)
            ax.tick_params(axis="y", labelsize=8)
        ax = axes[r, 2]
        t = study.single[label].sort_values("distance", ascending=False, na_position="first")  # closest on top
        ax.barh(t["unit"], t["distance"].fillna(0), color=["#1f77b4" if f else "0.8" for f in t["flips"]])
        for y, (u, d, f, col, ch) in enumerate(zip(t["unit"], t["distance"], t["flips"], t["column"], t["change"])):
            if not f:
                ax.text(0, y, "  no flip", va="center", fontsize=8, color="0.45")
                continue
            orig = float(data.delta_to_original_units(torch.eye(len(names))[col] * ch)[col])
            note = f" {d:.2f}" + (f" ({orig:+.3g} {ADULT_UNITS[u]})" if u in ADULT_UNITS else "")
            ax.text(d, y, note, va="center", fontsize=8)
        ax.set_xlim(0, 1.6 * max(0.05, float(t["distance"].max(skipna=True) if t["flips"].any() else 0.05)))
        ax.set_xlabel("distance (scaled units)")
        ax.set_title("(c) only one attribute may change", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        axes[r, 0].annotate(head, xy=(0, 1.2), xycoords="axes fraction", fontsize=12, fontweight="bold")
    fig.suptitle(f"Adult income, erf MLP: which features flip the decision for one person (profile={profile})",
                 y=1.05)  # fmt: skip
    return fig


__all__ = ["plot_adversarial", "plot_confidence", "plot_features", "plot_homotopy", "plot_influential_training",
           "plot_model_agnostic", "plot_pca_rrqr"]  # fmt: skip
