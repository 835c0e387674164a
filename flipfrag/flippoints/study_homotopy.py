"""The homotopy study of notebook ``flip_points/09_homotopy``: direct solves against the homotopy candidate and
random restarts, on the erf MLPs (success, optimality among the strategies, cost)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from .cache import cached_flip_points
from .runs import data_bounds, flip_options


def homotopy_strategies(prof: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The four strategies compared: direct; + homotopy; + the profile's ``flip_restarts`` restarts; + both."""
    return {
        "direct": dict(homotopy=False, restarts=0),
        "direct + homotopy": dict(homotopy=True, restarts=0),
        f"direct + {prof['flip_restarts']} restarts": dict(homotopy=False, restarts=prof["flip_restarts"]),
        "direct + homotopy + restarts": dict(homotopy=True, restarts=prof["flip_restarts"]),
    }


def homotopy_study(prof: Mapping[str, Any], *, seed: int = 0) -> pd.DataFrame:
    """Per erf MLP (Adult, breast cancer, MNIST; ``homotopy_n_points`` test inputs, half for MNIST, whose flip points
    go to the runner-up class) and strategy: inputs, certified share, how often the homotopy candidate won, solve
    time per input, the mean distance above the best of the four strategies and how often each finds it. Every
    strategy uses the tabular options (``max_ineq`` 8) — what they change is the point."""
    from ..datasets import stratified_subset
    from ..models import predict, trained_model

    strategies = homotopy_strategies(prof)
    rows, dists = [], {}
    for key in ("adult-erf", "breast_cancer-erf", "mnist-erf"):
        images = key.startswith("mnist")
        model, data, _ = trained_model(key, prof, seed=seed, progress=False)
        n = prof["homotopy_n_points"] // (2 if images else 1)
        idx = stratified_subset(data.y_test, n, seed + 5)
        x = data.X_test[idx].double()
        extra = {}
        if images:
            extra["target"] = predict(model, x).topk(2, dim=1).indices[:, 1]
        base = flip_options(prof, images=False)
        for name, kw in strategies.items():
            res = cached_flip_points(model, x, name=f"{data.name}-homotopy-study", options=base.replace(**kw),
                                     **data_bounds(data), **extra)  # fmt: skip
            dists[(data.name, name)] = res.distance.numpy()
            rows.append(
                {
                    "dataset": data.name,
                    "strategy": name,
                    "inputs": len(x),
                    "certified (%)": 100 * res.success_rate,
                    "homotopy candidate won (%)": 100 * float((res.start == 1).double().mean()),
                    "ms per input": 1000 * res.cache_info["seconds"] / len(x),
                }
            )
    table = pd.DataFrame(rows)
    best = {ds: np.nanmin(np.stack([dists[(ds, s)] for s in strategies]), axis=0) for ds in table["dataset"].unique()}
    table["distance above best (%, mean)"] = [
        100 * float(np.nanmean(dists[(r.dataset, r.strategy)] / best[r.dataset] - 1)) for r in table.itertuples()
    ]
    table["finds the best (%)"] = [
        100 * float(np.mean(np.isclose(dists[(r.dataset, r.strategy)], best[r.dataset], rtol=1e-6)))
        for r in table.itertuples()
    ]
    return table


__all__ = ["homotopy_strategies", "homotopy_study"]
