"""The model-agnostic study of notebook ``flip_points/08_model_agnostic`` (E8): the flip-point pipeline on logistic
regression, checked against its closed-form closest flip point."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .agnostic import LinearScores, linear_flip_point
from .cache import cached_flip_points
from .confidence import confidence_scores, misclassification_detection
from .directions import direction_matrix, flip_directions, pca_directions
from .runs import standard_flips


def agnostic_study(prof: Mapping[str, Any], *, seed: int = 0) -> tuple[pd.DataFrame, dict, dict]:
    """Per tabular dataset (Adult, breast cancer): logistic regression (scikit-learn, C = 1) on the training split,
    its flip points on the test subset of :func:`standard_flips` (same options, cached) against
    :func:`linear_flip_point`, its misclassification detection, and the singular-value spectra of its and the erf
    MLP's flip directions. Returns the table, per dataset (closed-form distance, solver distance, relative
    difference) on the points where both exist, and the spectra."""
    from sklearn.linear_model import LogisticRegression

    rows, pts, spectra = [], {}, {}
    for key in ("adult-erf", "breast_cancer-erf"):
        fset = standard_flips(key, prof, split="test", seed=seed)
        data = fset.data
        clf = LogisticRegression(C=1.0, max_iter=5000).fit(data.X_train.double().numpy(), data.y_train.numpy())
        lin = LinearScores.from_sklearn(clf)
        res = cached_flip_points(lin, fset.x, name=f"{data.name}-logreg-test", options=fset.options, **fset.bounds)
        xf, d = linear_flip_point(clf.coef_[0], clf.intercept_[0], fset.x.numpy(), lower=data.lower.double(),
                                  upper=data.upper.double())  # fmt: skip
        both = res.converged.numpy() & np.isfinite(d)
        rel = np.abs(res.distance.numpy()[both] - d[both]) / d[both]
        pts[data.name] = (d[both], res.distance.numpy()[both], rel)
        conf = confidence_scores(lin, fset.x, fset.y, res)
        det = misclassification_detection(conf).set_index("score")
        spectra[data.name] = {
            "logistic regression": pca_directions(direction_matrix(flip_directions(res, fset.x)), center=False,
                                                  normalize=True),
            "erf MLP": pca_directions(direction_matrix(fset.directions), center=False, normalize=True),
        }  # fmt: skip
        rows.append(
            {
                "dataset": data.name,
                "test inputs": len(fset.x),
                "LR test acc": float((lin(data.X_test.double()).argmax(1) == data.y_test).double().mean()),
                "certified (%)": 100 * res.success_rate,
                "closed form exists (%)": 100 * float(np.isfinite(d).mean()),
                "max relative difference": float(rel.max()),
                "median relative difference": float(np.median(rel)),
                "max |x_flip difference|": float(np.abs(res.x_flip.numpy()[both] - xf[both]).max()),
                "AUROC distance (LR)": det.loc["distance", "auroc"],
                "AUROC softmax (LR)": det.loc["softmax", "auroc"],
            }
        )
    return pd.DataFrame(rows), pts, spectra


__all__ = ["agnostic_study"]
