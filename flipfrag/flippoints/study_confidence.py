"""The confidence study of notebook ``flip_points/02_confidence`` (E1): misclassification detection by the distance
to the closest flip point against the softmax, per model, in one table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from scipy.stats import spearmanr

from .confidence import auroc_difference, confidence_scores, misclassification_detection
from .runs import standard_flips

#: the models of the study: (zoo key, hidden activation)
CONFIDENCE_MODELS = (
    *(("adult-erf", a) for a in ("erf", "tanh", "softplus")),
    *(("breast_cancer-erf", a) for a in ("erf", "tanh", "softplus")),
    ("mnist-erf", "erf"),
)


def confidence_row(t: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """One model's row of ``flip_points/table_confidence`` from its :func:`confidence_scores` table ``t``: counts,
    median distances of correct / misclassified inputs, AUROC (with 95 % bootstrap intervals) and AUPR of the
    distance, the softmax, the logit gap and the linearised distance, the paired AUROC difference distance −
    softmax, and the Spearman correlation of distance and softmax (certified points only)."""
    det = misclassification_detection(t, n_boot=n_boot, seed=seed).set_index("score")
    ok = t[t["certified"]]
    rho = spearmanr(ok["distance"], ok["softmax"]).statistic
    wrong = ~ok["correct"].to_numpy()
    if wrong.any() and (~wrong).any():
        diff, diff_lo, diff_hi = auroc_difference(-ok["distance"], -ok["softmax"], wrong, n_boot=n_boot, seed=seed)
    else:
        diff = diff_lo = diff_hi = float("nan")
    dist_wrong = ok.loc[~ok["correct"], "distance"].median()
    dist_right = ok.loc[ok["correct"], "distance"].median()
    return {
        "n": int(det.loc["distance", "n"]),
        "n misclassified": int(det.loc["distance", "n_misclassified"]),
        "n excluded": int(det.loc["distance", "n_excluded"]),
        "median distance, correct": dist_right,
        "median distance, misclassified": dist_wrong,
        "AUROC distance": det.loc["distance", "auroc"],
        "AUROC distance 95% CI": f"{det.loc['distance', 'auroc_lo']:.3f}–{det.loc['distance', 'auroc_hi']:.3f}",
        "AUROC softmax": det.loc["softmax", "auroc"],
        "AUROC softmax 95% CI": f"{det.loc['softmax', 'auroc_lo']:.3f}–{det.loc['softmax', 'auroc_hi']:.3f}",
        "AUROC distance − softmax": diff,
        "paired 95% CI": f"{diff_lo:+.3f} to {diff_hi:+.3f}",
        "AUROC logit gap": det.loc["logit_gap", "auroc"],
        "AUROC linearised distance": det.loc["linearized", "auroc"],
        "AUPR distance": det.loc["distance", "aupr"],
        "AUPR softmax": det.loc["softmax", "aupr"],
        "AUPR chance": det.loc["distance", "aupr_chance"],
        "Spearman(distance, softmax)": rho,
    }


def confidence_study(prof: Mapping[str, Any], *, seed: int = 0,
                     models: Sequence[tuple[str, str]] = CONFIDENCE_MODELS,
                     ) -> tuple[pd.DataFrame, dict[tuple[str, str], pd.DataFrame]]:  # fmt: skip
    """The study over ``models`` (each on the flip points of :func:`standard_flips` of its test split, 1000
    bootstrap resamples): the table (dataset, activation, then :func:`confidence_row`) and the per-point
    :func:`confidence_scores` tables by (dataset, activation)."""
    loaded: dict[str, Any] = {}
    tables: dict[tuple[str, str], pd.DataFrame] = {}
    rows = []
    for key, act in models:
        name = key.split("-")[0]
        fset = standard_flips(key, prof, split="test", seed=seed, activation=act, data=loaded.get(name))
        loaded[name] = fset.data
        t = confidence_scores(fset.model, fset.x, fset.y, fset.res)
        tables[(name, act)] = t
        rows.append({"dataset": name, "activation": act, **confidence_row(t, n_boot=1000, seed=seed)})
    return pd.DataFrame(rows), tables


__all__ = ["CONFIDENCE_MODELS", "confidence_row", "confidence_study"]
