"""The adversarial study of notebook ``flip_points/05_adversarial`` (E4): flip points of MNIST test digits with
only the first k pixels of an order free — RR-QR of the training flips of the digit's class, the digit's own flip
direction, random pixels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..flip import FlipResult
from .directions import direction_matrix, rrqr_directions
from .features import flips_vs_k
from .runs import FlipSet

RRQR_ORDER = "RR-QR (training flips of the class)"


@dataclass
class AdversarialStudy:
    """What :func:`adversarial_study` returns: the digits (``picked``, rows of the test flip set; ``x``, ``src``,
    ``tgt``), the per-(order, k, digit) table ``curve``, its ``summary`` per (order, k) (share flipped, median
    distance), and the restricted solves by order (``results``)."""

    picked: torch.Tensor
    x: torch.Tensor
    src: torch.Tensor
    tgt: torch.Tensor
    curve: pd.DataFrame
    summary: pd.DataFrame
    results: dict[str, FlipResult]


def pick_digits(test: FlipSet, n: int) -> torch.Tensor:
    """The first certified, correctly classified test digit of each class, ``n`` of them at most."""
    res = test.res
    good = torch.nonzero(res.converged & (res.source == test.y)).flatten()
    picked, seen = [], set()
    for i in good.tolist():
        if int(test.y[i]) not in seen:
            picked.append(i)
            seen.add(int(test.y[i]))
        if len(picked) == n:
            break
    return torch.tensor(picked)


def adversarial_study(test: FlipSet, train: FlipSet, prof: Any, *, seed: int = 0) -> AdversarialStudy:
    """Flip points of :func:`pick_digits` toward their closest flip point's class with the first k pixels
    (``prof["adversarial_ks"]``) of each order free: RR-QR of the class's training flip directions (unit rows), the
    digit's own flip direction by magnitude, a random permutation (seeded)."""
    res = test.res
    n_pix = int(np.prod(test.x.shape[1:]))
    picked = pick_digits(test, prof["adversarial_n_images"])
    x = test.x[picked]
    src, tgt = res.source[picked], res.target[picked]
    rng = np.random.default_rng(seed)
    orders = {
        RRQR_ORDER: np.stack([
            rrqr_directions(direction_matrix(train.directions, rows=(train.res.source == c).numpy(),
                                             normalize=True)).order
            for c in src.tolist()
        ]),
        "own flip direction": np.argsort(-np.abs(test.directions[picked.numpy()]), axis=1, kind="stable"),
        "random pixels": np.stack([rng.permutation(n_pix) for _ in range(len(picked))]),
    }  # fmt: skip
    results, tables = {}, []
    for name, order in orders.items():
        t, r = flips_vs_k(test.model, x, order, prof["adversarial_ks"], target=tgt, options=test.options,
                          **test.bounds)  # fmt: skip
        results[name] = r
        tables.append(t.assign(order=name))
    curve = pd.concat(tables, ignore_index=True)
    summary = (
        curve.groupby(["order", "k"]).agg(flipped=("flips", "mean"), median_distance=("distance", "median"))
        .reset_index()
    )  # fmt: skip
    return AdversarialStudy(picked, x, src, tgt, curve, summary, results)


__all__ = ["RRQR_ORDER", "AdversarialStudy", "adversarial_study", "pick_digits"]
