"""Influential training points (E5): train on the points closest to / farthest from the decision boundary, or random
ones, and compare the test accuracy."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .._options import Options
from ._util import _as_numpy

_SELECTIONS = ("closest", "random", "farthest")


def select_training_subset(distance: Any, y: Any, fraction: float, how: str, *, seed: int = 0,
                           stratify: bool = True) -> np.ndarray:  # fmt: skip
    """Indices of ``fraction`` of the training points chosen by their distance to their closest flip point.

    Parameters
    ----------
    distance : array-like (N,)
        Distance of each training point to its closest flip point; NaN (uncertified) points are never selected.
    y : array-like (N,)
        Labels.
    fraction : float in (0, 1]
        Fraction of the *certified* points to keep (per class when ``stratify``).
    how : {"closest", "random", "farthest"}
        Smallest distances, a uniform random subset (seeded), or largest distances.
    stratify : bool
        Select within each class, keeping the class balance of the certified pool (default True, so the
        comparison is about closeness, not class balance). Each class keeps at least one point.

    Returns
    -------
    Sorted int64 array of indices into the training set.
    """
    d = _as_numpy(distance, "distance", ndim=1)
    yy = _as_numpy(y, "y", ndim=1, dtype=np.int64)
    if d.shape != yy.shape:
        raise ValueError(f"distance and y must have the same length, got {d.shape} and {yy.shape}")
    if how not in _SELECTIONS:
        raise ValueError(f"how must be one of {_SELECTIONS}, got {how!r}")
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    pool = np.nonzero(np.isfinite(d))[0]
    if pool.size == 0:
        raise ValueError("distance has no finite entry (no certified flip point)")
    rng = np.random.default_rng(seed)
    strata = [pool[yy[pool] == c] for c in np.unique(yy[pool])] if stratify else [pool]
    picked = []
    for idx in strata:
        k = max(1, int(round(fraction * idx.size)))
        if how == "random":
            picked.append(rng.choice(idx, size=k, replace=False))
        else:
            srt = idx[np.argsort(d[idx], kind="mergesort")]  # stable: ties keep index order
            picked.append(srt[:k] if how == "closest" else srt[::-1][:k])
    return np.sort(np.concatenate(picked))


@dataclass(frozen=True)
class RetrainingOptions(Options):
    """Settings of :func:`retraining_experiment` (validated when made; keywords of the call override them).

    Attributes
    ----------
    repeats : training seeds per (selection, fraction); random subsets are also redrawn per repeat.
    selections : which subsets to train on, among ``("closest", "random", "farthest")``.
    stratify : passed to :func:`select_training_subset`.
    seed : base seed of the subsets (``seed + 1000 * repeat``) and of the trainer (``seed + repeat``).
    progress : tqdm over the training runs.
    """

    repeats: int = 1
    selections: Sequence[str] = _SELECTIONS
    stratify: bool = True
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        for s in self.selections:
            if s not in _SELECTIONS:
                raise ValueError(f"selections must be among {_SELECTIONS}, got {s!r}")


def retraining_experiment(
    fit: Callable[[torch.Tensor, torch.Tensor, int], Callable[[torch.Tensor], torch.Tensor]],
    X: torch.Tensor,
    y: torch.Tensor,
    distance: Any,
    X_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    fractions: Sequence[float],
    reference: torch.Tensor | None = None,
    options: RetrainingOptions | None = None,
    **overrides: Any,
) -> pd.DataFrame:
    """E5: retrain on the closest / random / farthest fraction of the training set; compare with the full model.

    Our operationalisation of "the distance to the closest flip point identifies the most influential training
    points": if the points nearest the decision boundary are the influential ones, a model trained only on them
    should reproduce the full model (test accuracy, and agreement of its test predictions with the full model's)
    better than one trained on as many random points, and much better than one trained on the farthest points.

    Parameters
    ----------
    fit : callable ``fit(X_sub, y_sub, seed) -> predict``
        Trains a model and returns a function mapping inputs (M, ...) to predicted labels (M,). Use the same
        trainer for the reference model (e.g. :func:`mlp_trainer`).
    X, y : training set (N, ...), (N,); distance : (N,) distances of the training points to their flip points.
    X_test, y_test : test set.
    fractions : fractions of the certified training points to keep, each in (0, 1].
    reference : LongTensor (M,), optional
        The full model's test predictions; default: ``fit(X, y, seed)`` on the whole training set.
    options : RetrainingOptions, optional
        ``repeats``, ``selections``, ``stratify``, ``seed``, ``progress``; ``**overrides`` replace its fields (so
        ``repeats=2`` works as a keyword).

    Returns
    -------
    DataFrame with one row per (selection, fraction, repeat): ``selection``, ``fraction``, ``repeat``, ``n_train``,
    ``test_acc``, ``agreement`` (fraction of test inputs predicted as the reference predicts), ``mean_distance``
    of the selected points. At fraction 1 all selections are the same set and are trained once per repeat.
    """
    opts = RetrainingOptions.resolve(options, overrides)
    repeats, selections, stratify, seed = opts.repeats, opts.selections, opts.stratify, opts.seed
    if not callable(fit):
        raise TypeError("fit must be callable: fit(X_sub, y_sub, seed) -> predict function")
    d = _as_numpy(distance, "distance", ndim=1)
    if d.shape[0] != X.shape[0] or y.shape[0] != X.shape[0]:
        raise ValueError(f"X, y and distance must have the same length, got {X.shape[0]}, {y.shape[0]}, {d.shape[0]}")
    if reference is None:
        reference = fit(X, y, seed)(X_test)
    reference = torch.as_tensor(reference).long()
    jobs = []
    for frac in fractions:
        for r in range(repeats):
            for s in selections if frac < 1 else ("all",):
                jobs.append((s, float(frac), r))
    done: dict[tuple, dict] = {}
    rows = []
    for s, frac, r in tqdm(jobs, desc="retraining", disable=not opts.progress, leave=False):
        if (s, frac, r) not in done:
            idx = select_training_subset(d, y, frac, "random" if s == "all" else s, seed=seed + 1000 * r,
                                         stratify=stratify)  # fmt: skip
            pred = torch.as_tensor(fit(X[idx], y[idx], seed + r)(X_test)).long()
            done[(s, frac, r)] = {"n_train": int(idx.size), "test_acc": float((pred == y_test).float().mean()),
                                  "agreement": float((pred == reference).float().mean()),
                                  "mean_distance": float(np.mean(d[idx]))}  # fmt: skip
        for sel in selections if s == "all" else (s,):
            rows.append({"selection": sel, "fraction": frac, "repeat": r, **done[(s, frac, r)]})
    return pd.DataFrame(rows)


class TrainedPredictor:
    """What :func:`mlp_trainer`'s ``fit`` returns: call it on inputs (M, ...) for labels (M,); ``.model`` is the net."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.model = model
        self.dtype = dtype

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        from ..models import predict

        return predict(self.model, X.to(self.dtype)).argmax(1)


def mlp_trainer(in_features: int, n_classes: int, hidden: Sequence[int], *, activation: str = "erf",
                steps: int = 500, lr: float = 1e-3, batch_size: int = 64,
                dtype: torch.dtype = torch.float64) -> Callable[[torch.Tensor, torch.Tensor, int], TrainedPredictor]:
    """A ``fit(X, y, seed) -> predictor`` function for :func:`retraining_experiment`: an :class:`~flipfrag.models.MLP`
    trained with Adam for about ``steps`` gradient steps whatever the subset size.

    A fixed step budget (not a fixed number of epochs) keeps small subsets from being under-trained: epochs =
    ``ceil(steps * batch_size / n)``, with the batch capped at ``n``. The predictor's ``.model`` is the trained net
    (e.g. to compute the reference model's flip points).
    """
    from ..models import MLP, train

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")

    def fit(X: torch.Tensor, y: torch.Tensor, seed: int) -> TrainedPredictor:
        torch.manual_seed(seed)  # the initial weights (train() seeds the batch order itself)
        model = MLP(in_features, hidden, n_classes, activation=activation).to(dtype)
        n = X.shape[0]
        bs = min(batch_size, n)
        epochs = max(1, math.ceil(steps * bs / n))
        train(model, X.to(dtype), y, epochs=epochs, lr=lr, batch_size=bs, seed=seed, progress=False)
        return TrainedPredictor(model, dtype)

    return fit
