"""The dataset-level study of notebook ``flip_points/07_pca_rrqr`` (E6, E7): PCA spectra and rank-revealing QR of the
flip directions of whole training subsets, next to the data's own PCA."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .directions import PCAResult, RRQRResult, direction_matrix, pca_directions, rrqr_directions
from .features import attribute_order

#: the four PCA spectra of a flip set, in the figure's order
SPECTRA = (
    "flip directions, centred",
    "flip directions, unit rows, centred",
    "flip directions, unit rows, uncentred",
    "data (inputs), centred",
)


def pca_spectra(fset: Any) -> dict[str, PCAResult]:
    """The :data:`SPECTRA` of a :class:`~flipfrag.flippoints.FlipSet`: PCA of its flip directions (centred, unit
    rows centred, unit rows uncentred) and of its inputs (centred)."""
    D = direction_matrix(fset.directions)
    X = fset.x.flatten(1).numpy()
    return {
        SPECTRA[0]: pca_directions(D, center=True),
        SPECTRA[1]: pca_directions(D, center=True, normalize=True),
        SPECTRA[2]: pca_directions(D, center=False, normalize=True),
        SPECTRA[3]: pca_directions(X, center=True),
    }


def rrqr_groups(adult_train: Any, adult_test: Any, mnist_train: Any,
                mis_dirs: np.ndarray) -> list[tuple[str, str, np.ndarray, np.ndarray, list[str]]]:  # fmt: skip
    """The flip-direction matrices the RR-QR table ranks: (dataset, label, directions, rows used, feature names) —
    Adult flips out of each class and its misclassified test inputs, MNIST flips out of each digit and its
    misclassified test digits (``mis_dirs``, flipped toward their true class)."""
    anames = adult_train.data.feature_names
    pix = [f"({i // 28},{i % 28})" for i in range(784)]
    adult_wrong = (adult_test.res.source != adult_test.y).numpy()
    groups = [
        ("Adult", f"flips out of {c} (training inputs predicted {c})", adult_train.directions,
         (adult_train.res.source == k).numpy(), anames)
        for k, c in enumerate(adult_train.data.class_names)
    ]  # fmt: skip
    groups.append(("Adult", "misclassified test inputs, toward the true class", adult_test.directions, adult_wrong,
                   anames))  # fmt: skip
    groups += [
        ("MNIST", f"flips out of digit {c} (training)", mnist_train.directions, (mnist_train.res.source == c).numpy(),
         pix)
        for c in range(10)
    ]  # fmt: skip
    groups.append(
        ("MNIST", "misclassified test digits, toward the true class", mis_dirs, np.ones(len(mis_dirs), bool), pix)
    )
    return groups


def rrqr_study(groups: list, units: dict[str, list[int]]) -> tuple[pd.DataFrame, dict, dict]:
    """RR-QR (unit rows and raw rows, rank tolerance 1 %) of every group of :func:`rrqr_groups`. Returns the table
    (one row per non-empty group), the unit-row factorizations by (dataset, label) and, for Adult, the attribute
    ranks by label (:func:`attribute_order`)."""
    rows: list[dict[str, Any]] = []
    qrs: dict[tuple[str, str], RRQRResult] = {}
    aorders: dict[str, pd.Series] = {}
    for ds, label, dirs, sel, names in groups:
        D = direction_matrix(dirs, rows=sel)
        if len(D) == 0:
            continue
        unit = rrqr_directions(D, normalize=True, rank_tol=1e-2)
        raw = rrqr_directions(D, rank_tol=1e-2)
        qrs[(ds, label)] = unit
        if ds == "Adult":
            aorders[label] = attribute_order(unit.order, units).set_index("attribute")["rank"]
        rows.append(
            {
                "dataset": ds,
                "flip directions": label,
                "rows": len(D),
                "rank (|R_kk| > 1% |R_00|)": unit.rank,
                "top-5 RR-QR features (unit rows)": ", ".join(unit.top(5, names)),
                "top-5 RR-QR features (raw rows)": ", ".join(raw.top(5, names)),
                "top-5 attributes (unit rows)": ", ".join(attribute_order(unit.order, units)["attribute"].head(5))
                if ds == "Adult"
                else "—",
            }
        )
    return pd.DataFrame(rows), qrs, aorders


def leading_directions(fset: Any, classes: list, n_features: int) -> dict[Any, np.ndarray]:
    """Per predicted class, the leading right singular vector of the flips out of it (unit rows, uncentred); zeros
    for a class nobody is predicted as (tiny smoke models)."""
    vecs = {}
    for k, c in enumerate(classes):
        D = direction_matrix(fset.directions, rows=(fset.res.source == k).numpy())
        vecs[c] = pca_directions(D, center=False, normalize=True).components[0] if len(D) else np.zeros(n_features)
    return vecs


__all__ = ["SPECTRA", "leading_directions", "pca_spectra", "rrqr_groups", "rrqr_study"]
