"""The individual-features study of notebook ``flip_points/03_features`` (E2): for two Adult inputs, the features
that flip the decision — all free, with the immutable attributes fixed, one attribute at a time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..flip import FlipResult
from .features import attribute_units, columns_of, rank_features, restricted_flip_points, unit_flips
from .runs import FlipSet, flip_options

#: original units of Adult's numeric features (labels of the figure)
ADULT_UNITS = {
    "age": "years",
    "fnlwgt": "census weight",
    "education-num": "levels",
    "capital-gain": "USD",
    "capital-loss": "USD",
    "hours-per-week": "hours/week",
}

#: attributes a person cannot change
IMMUTABLE = ("sex", "race", "native-country")


def pick_examples(fset: FlipSet) -> dict[str, int]:
    """Two certified test inputs: a correct ">50K" decision where there is one (else the first correct one), and a
    misclassified input (else another correct one). Label -> row of the flip set."""
    data, res = fset.data, fset.res
    pred, ok = res.source, res.converged
    correct = torch.nonzero(ok & (pred == fset.y)).flatten()
    rich = torch.nonzero(ok & (pred == fset.y) & (pred == 1)).flatten()
    wrong = torch.nonzero(ok & (pred != fset.y)).flatten()
    first = int((rich if len(rich) else correct)[0])  # tiny smoke models may have no ">50K" decision
    examples = {f"correct, predicted {data.class_names[int(pred[first])]}": first}
    examples["misclassified" if len(wrong) else "another correct input"] = (
        int(wrong[0]) if len(wrong) else int(correct[1])
    )
    return examples


@dataclass
class FeatureStudy:
    """What :func:`feature_study` returns, per example label: the ranked changes with all features free
    (``ranked``), with the immutable attributes fixed and age only growing (``ranked_mut``; their flip points
    ``res_mut``, one row per example) and the one-attribute flips (``single``)."""

    examples: dict[str, int]
    ranked: dict[str, pd.DataFrame]
    ranked_mut: dict[str, pd.DataFrame]
    res_mut: FlipResult
    single: dict[str, pd.DataFrame]


def feature_study(fset: FlipSet, prof: Mapping[str, Any]) -> FeatureStudy:
    """The three views of :func:`pick_examples` on the Adult flip set ``fset``; the restricted problems use the
    tabular options without the homotopy candidate (:func:`flip_options` ``restricted=True``)."""
    data, names = fset.data, fset.data.feature_names
    examples = pick_examples(fset)
    solver = flip_options(prof, images=False, restricted=True)
    ranked = {}
    for label, i in examples.items():
        v = torch.tensor(fset.directions[i])
        ranked[label] = rank_features(v, names, original=data.delta_to_original_units(v.float()), top=8)
    immutable = [c for attr in IMMUTABLE for c in columns_of(data, attr)]
    free = torch.ones(len(names), dtype=torch.bool)
    free[immutable] = False
    idx = torch.tensor(list(examples.values()))
    lower = data.lower.double().expand(len(idx), -1).clone()
    age = names.index("age")
    lower[:, age] = fset.x[idx, age]  # age can only increase
    res_mut = restricted_flip_points(fset.model, fset.x[idx], free, lower=lower, upper=data.upper.double(),
                                     options=solver)  # fmt: skip
    ranked_mut = {}
    for j, (label, i) in enumerate(examples.items()):
        v = res_mut.x_flip[j] - fset.x[i]
        ranked_mut[label] = rank_features(v, names, original=data.delta_to_original_units(v.float()), top=8)
    units = attribute_units(data)
    single = {}
    for label, i in examples.items():
        single[label], _ = unit_flips(fset.model, fset.x[i], units, lower=data.lower.double(),
                                      upper=data.upper.double(), options=solver)  # fmt: skip
    return FeatureStudy(examples, ranked, ranked_mut, res_mut, single)


__all__ = ["ADULT_UNITS", "IMMUTABLE", "FeatureStudy", "feature_study", "pick_examples"]
