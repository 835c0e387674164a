"""The influential-training-points study of notebook ``flip_points/06_influential_training`` (E5): retrain on the
training points closest to / farthest from their flip points, or random ones, and compare with the reference model
trained on the whole pool."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from .cache import cached_flip_points
from .runs import data_bounds, flip_options, is_image_data
from .training import mlp_trainer, retraining_experiment

#: per dataset: the training pool (None = the whole training split), Adam's learning rate and batch size
RETRAIN_SETUPS = {
    "breast_cancer": dict(pool=None, lr=3e-3, batch_size=32),
    "adult": dict(pool="retrain_pool", lr=3e-3, batch_size=64),
}


def training_study(prof: Mapping[str, Any], *, seed: int = 0) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """Per dataset of :data:`RETRAIN_SETUPS` (a pool of the profile's ``retrain_pool`` size where named): a
    reference erf MLP on the pool, the flip points of the pool under it (cached), and
    :func:`retraining_experiment` over ``retrain_fractions`` x ``retrain_repeats``. Returns the curve (rows of
    every run, with ``dataset``) and per dataset the pool's size, certified share, reference test accuracy and median
    distance."""
    from ..datasets import load_dataset, stratified_subset

    curves, pools = [], {}
    for name, cfg in RETRAIN_SETUPS.items():
        data = load_dataset(name, prof, seed=seed)
        pool = None if cfg["pool"] is None else prof[cfg["pool"]]
        idx = stratified_subset(data.y_train, pool, seed)
        Xp, yp = data.X_train[idx].double(), data.y_train[idx]
        fit = mlp_trainer(Xp.shape[1], data.n_classes, prof["tabular_hidden"], activation="erf",
                          steps=prof["retrain_steps"], lr=cfg["lr"], batch_size=cfg["batch_size"])  # fmt: skip
        reference = fit(Xp, yp, seed)
        options = flip_options(prof, images=is_image_data(data))
        res = cached_flip_points(reference.model, Xp, name=f"{name}-retrain-pool", options=options, **data_bounds(data))
        X_test, y_test = data.X_test.double(), data.y_test
        ref_pred = reference(X_test)
        df = retraining_experiment(fit, Xp, yp, res.distance, X_test, y_test, fractions=prof["retrain_fractions"],
                                   repeats=prof["retrain_repeats"], reference=ref_pred, seed=seed)  # fmt: skip
        curves.append(df.assign(dataset=name))
        pools[name] = {
            "pool": len(idx),
            "certified": res.success_rate,
            "reference test acc": float((ref_pred == y_test).double().mean()),
            "median distance": float(res.distance.nanmedian()),
        }
    return pd.concat(curves, ignore_index=True), pools


def summarize_training(curve: pd.DataFrame) -> pd.DataFrame:
    """Mean (and standard deviation over the repeats) of size, test accuracy, agreement with the reference and mean
    distance per (dataset, selection, fraction)."""
    return (
        curve.groupby(["dataset", "selection", "fraction"])
        .agg(
            n_train=("n_train", "mean"),
            test_acc=("test_acc", "mean"),
            test_acc_sd=("test_acc", "std"),
            agreement=("agreement", "mean"),
            agreement_sd=("agreement", "std"),
            mean_distance=("mean_distance", "mean"),
        )
        .reset_index()
    )


__all__ = ["RETRAIN_SETUPS", "summarize_training", "training_study"]
