"""The bias study of notebook ``flip_points/04_bias`` (E3): the protected attributes of Adult (sex, race) in the
flip directions of three MLPs — their share, their RR-QR rank, flip points with only the attribute free, and the
toggle baseline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from .directions import direction_matrix, rrqr_directions
from .features import (
    attribute_order,
    attribute_shares,
    attribute_units,
    columns_of,
    restricted_flip_points,
    toggle_test,
)
from .runs import flip_options, standard_flips


def bias_study(prof: Mapping[str, Any], *, seed: int = 0,
               activations: tuple[str, ...] = ("erf", "tanh", "softplus")) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """Per MLP (``activations``) and protected attribute of Adult: the mean share of the attribute in the test flip
    directions and its rank, its RR-QR rank over the training flip directions (unit rows), the share of test inputs
    with a flip point when only the attribute may change (restricted options: no homotopy), the median change
    there, and the toggle test against it. Returns the table and the toggle tables by (activation, attribute)."""
    data = None
    rows, toggles = [], {}
    for act in activations:
        test = standard_flips("adult-erf", prof, split="test", seed=seed, activation=act, data=data)
        data = test.data
        train = standard_flips("adult-erf", prof, split="train", seed=seed, activation=act, data=data)
        units = attribute_units(data)
        solver = flip_options(prof, images=False, restricted=True)  # no homotopy for restricted problems
        shares = attribute_shares(test.directions, units).dropna()
        mean_share = shares.mean().sort_values(ascending=False)
        share_rank = {u: r + 1 for r, u in enumerate(mean_share.index)}
        D = direction_matrix(train.directions, normalize=True)
        order = attribute_order(rrqr_directions(D).order, units).set_index("attribute") if len(D) else None
        for attr in data.meta["protected"]:
            cols = columns_of(data, attr)
            free = torch.zeros(len(data.feature_names), dtype=torch.bool)
            free[cols] = True
            only = restricted_flip_points(test.model, test.x, free, lower=data.lower.double(),
                                          upper=data.upper.double(), options=solver)  # fmt: skip
            change = (only.x_flip - test.x)[:, cols].abs().amax(1)
            tog = toggle_test(test.model, test.x, cols)
            toggles[(act, attr)] = tog
            flips_by_toggle = tog.groupby("point")["flipped"].any().reindex(range(len(test.x)), fill_value=False)
            rows.append(
                {
                    "model": f"MLP {act}",
                    "attribute": attr,
                    "columns": len(cols),
                    "mean share of flip direction (%)": 100 * mean_share[attr],
                    "rank by share (of 14)": share_rank[attr] if len(shares) else None,
                    "RR-QR rank (of 14)": int(order.loc[attr, "rank"]) if order is not None else None,
                    "first RR-QR pivot (of 103 columns)": int(order.loc[attr, "first_pivot"]) + 1
                    if order is not None
                    else None,
                    "flip with only this attribute free (%)": 100 * only.success_rate,
                    "median change at that flip": float(change[only.converged].median())
                    if only.converged.any()
                    else float("nan"),
                    "toggle changes decision (%)": 100 * float(flips_by_toggle.mean()),
                    "agreement flip vs toggle (%)": 100
                    * float((only.converged.numpy() == flips_by_toggle.to_numpy()).mean()),
                    "toggle flips, no flip point found (%)": 100
                    * float((flips_by_toggle.to_numpy() & ~only.converged.numpy()).mean()),
                    "test inputs": len(test.x),
                }
            )
    return pd.DataFrame(rows), toggles


__all__ = ["bias_study"]
