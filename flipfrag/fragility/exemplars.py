"""Influence functions (F5): frozen features + a logistic layer, attack curves, summaries and claims."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .paper import PAPER_NUMBERS

# ------------------------------------------------------------------------------------------------ influence


class CNNFeatures(nn.Module):
    """Frozen features of a :class:`flipfrag.models.SmallCNN`: its conv blocks, then global average pooling.

    (N, C, H, W) -> (N, 4 * width). The offline stand-in for Inception v3's 2048-d pool features. The CNN is used as
    is (put in eval mode; its weights are not changed — "frozen" means nobody trains them further).
    """

    def __init__(self, cnn: nn.Module):
        super().__init__()
        if not hasattr(cnn, "features"):
            raise TypeError("cnn must have a .features block (a flipfrag.models.SmallCNN)")
        self.cnn = cnn.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn.features(x).mean((-2, -1))


class InceptionFeatures(nn.Module):
    """Inception v3's 2048-d pool features (the input of its ``fc`` layer) of [0, 1] images, scaled to Inception's
    [-1, 1] input inside and resized to ``size`` (299, Inception's native size; the authors fed 227x227 raw 0-255
    pixels to the Keras model). Built with torchvision's feature extraction, so the given network is not modified."""

    def __init__(self, inception: nn.Module, size: int = 299):
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        if not hasattr(inception, "fc"):
            raise TypeError("inception must be a torchvision Inception3 (with an .fc layer)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # train/eval node lists differ (aux head); we only use eval mode
            self.net = create_feature_extractor(inception.eval(), return_nodes={"flatten": "features"}).eval()
        self.size = int(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.net(x * 2 - 1)["features"]


def _batched_features(extractor: nn.Module, X: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([extractor(X[i : i + batch_size]) for i in range(0, len(X), batch_size)]).double()


@dataclass
class InfluenceSetting:
    """The influence-function experiment: frozen features, a logistic layer and its influence on test points.

    Attributes
    ----------
    extractor : nn.Module
        Frozen, differentiable features ``phi``: (N, C, H, W) in [0, 1] -> (N, d).
    influence : flipfrag.influence.LogisticInfluence
        Fitted head and exact-Hessian influence on the training set (``influence.theta`` holds the head).
    X_train, y_train, X_test, y_test : Tensor
        Images in [0, 1] and 0/1 labels.
    test_accuracy : float
    class_names : list of str
    description, substitution : str
    """

    extractor: nn.Module
    influence: Any
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    test_accuracy: float
    train_accuracy: float
    class_names: list[str]
    description: str
    substitution: str | None
    meta: dict[str, Any] = field(default_factory=dict)


def influence_setting(prof: dict[str, Any], *, seed: int = 0, classes: tuple[int, int] = (3, 8), l2: float = 1e-3,
                      loss: str = "bce", data=None, extractor: nn.Module | None = None,
                      progress: bool = False) -> InfluenceSetting:  # fmt: skip
    """Build the influence experiment for a profile dict.

    Offline: two MNIST digits ``classes`` (stand-in for roses vs sunflowers; the shipped 500 images per class allow
    ``min(prof["influence_n_train"], 800)`` train / ``min(200, 1000 - n_train)`` test images) and, as the frozen
    feature extractor, a SmallCNN trained on the *other eight* digits of MNIST-5k (as Inception was trained on
    ImageNet, not on the flowers): 64-d GAP features. Paper: :func:`flipfrag.datasets.load_flowers` (1,000 / 200,
    downloaded, verified) and Inception v3 pool features (2,048-d, pretrained weights downloaded). ``data`` /
    ``extractor`` override the loaders (tests use stand-ins for the paper path).

    The head is a logistic unit fitted by Newton's method to the exact minimum of the mean ``loss`` ("bce"; the
    authors trained squared error with Adam for 10 epochs) plus ``l2/2 ||w||^2`` (so that the minimiser is unique
    on separable features); influence uses the exact Hessian, no damping (the authors' choice).
    """
    from .. import datasets, models
    from ..influence import LogisticInfluence, fit_logistic

    if prof.get("offline", True) and data is None:
        n_train = min(int(prof["influence_n_train"]), 800)
        n_test = min(200, 1000 - n_train)
        data = datasets.load_two_class_mnist(classes, n_train, n_test, seed=seed)
        if extractor is None:
            full = datasets.load_mnist(None, offline=True, seed=seed)
            keep = (full.y_train != classes[0]) & (full.y_train != classes[1])
            others = [c for c in range(10) if c not in classes]
            remap = torch.full((10,), -1, dtype=torch.long)
            remap[others] = torch.arange(len(others))
            cnn, _ = models.train_cached(
                lambda: models.SmallCNN(1, len(others), width=16), full.X_train[keep], remap[full.y_train[keep]],
                name=f"mnist-without-{classes[0]}{classes[1]}-cnn", seed=seed, progress=progress,
                epochs=int(prof["cnn_epochs"]), lr=2e-3, batch_size=64,
            )  # fmt: skip
            extractor = CNNFeatures(cnn)
        desc = (f"MNIST {classes[0]} vs {classes[1]} ({len(data.X_train)} train / {len(data.X_test)} test); features: "
                f"SmallCNN trained on the other 8 digits, 64-d GAP; logistic layer ({loss}, l2={l2:g})")
        sub = (f"MNIST {classes[0]} vs {classes[1]} + CNN features (other digits) for roses vs sunflowers + "
               "Inception v3 features")
    else:
        data = datasets.load_flowers(int(prof["influence_n_train"]), 200, size=299, seed=seed) if data is None else data
        if extractor is None:
            extractor = InceptionFeatures(models.inception_v3(pretrained=True))
        desc = (f"{data.name}: {len(data.X_train)} train / {len(data.X_test)} test; Inception v3 pool features "
                f"(2048-d); logistic layer ({loss}, l2={l2:g})")
        sub = None
    extractor = extractor.eval()
    f_train = _batched_features(extractor, data.X_train)
    f_test = _batched_features(extractor, data.X_test)
    head = fit_logistic(f_train, data.y_train, loss=loss, l2=l2, method="newton", max_iter=200)
    infl = LogisticInfluence(head, f_train, data.y_train)
    train_acc = float((infl.predict(f_train) == data.y_train).double().mean())
    test_acc = float((infl.predict(f_test) == data.y_test).double().mean())
    return InfluenceSetting(
        extractor=extractor, influence=infl, X_train=data.X_train, y_train=data.y_train, X_test=data.X_test,
        y_test=data.y_test, test_accuracy=test_acc, train_accuracy=train_acc, class_names=list(data.class_names),
        description=desc, substitution=sub, meta={"head_fit": head.fit_info, "d": f_train.shape[1]},
    )  # fmt: skip


def influence_curves(
    setting: InfluenceSetting,
    epsilons: Sequence[float],
    *,
    n_images: int | None = None,
    seed: int = 0,
    k: int = 5,
    n_targets: int = 3,
    feature_step: float = 0.01,
) -> pd.DataFrame:
    """The gradient-sign influence attack and random sign noise at each epsilon on the first ``n_images`` test
    images (default all). One row per (kind, eps, image): ``spearman`` (over all training points), ``top5`` (shared
    among the top-``k`` most influential, of ``k``), ``label_kept``, and ``target_change``: the mean change of the
    (normalised) influence of the original top-``n_targets`` training points — the ones the attack aims at — so that
    one can see whether the attack does what it is built for. ``kind`` is "attack" or "random"."""
    from ..influence import influence_attack, random_sign_influence, top_influential

    if isinstance(epsilons, (str, int, float)) or not len(epsilons):
        raise ValueError(f"epsilons must be a non-empty sequence of numbers >= 0, got {epsilons!r}")
    if any(not 0 <= e < math.inf for e in epsilons):
        raise ValueError(f"epsilons must be finite numbers >= 0, got {list(epsilons)}")
    n = len(setting.X_test) if n_images is None else int(n_images)
    if not 1 <= n <= len(setting.X_test):
        raise ValueError(f"n_images must be in [1, {len(setting.X_test)}], got {n_images!r}")
    x = setting.X_test[:n]
    rows = []
    for eps in epsilons:
        for kind in ("attack", "random"):
            if kind == "attack":
                res = influence_attack(setting.extractor, setting.influence, x, eps=float(eps), k=k,
                                       n_targets=n_targets, feature_step=feature_step)  # fmt: skip
            else:
                res = random_sign_influence(setting.extractor, setting.influence, x, eps=float(eps), seed=seed, k=k)
            targets = top_influential(res.scores, n_targets)  # the original top points (what the attack aims at)
            change = (res.scores_adv.gather(1, targets) - res.scores.gather(1, targets)).mean(1)
            for i in range(n):
                rows.append({"kind": kind, "eps": float(eps), "eps255": round(float(eps) * 255, 6), "image": i,
                             "spearman": float(res.spearman[i]), "top5": int(res.topk_overlap[i]),
                             "target_change": float(change[i]), "label_kept": bool(res.label_kept[i])})  # fmt: skip
    return pd.DataFrame(rows)


def summarize_influence(curves: pd.DataFrame) -> pd.DataFrame:
    """Means over images of :func:`influence_curves` per (kind, eps255): ``spearman``, ``top5``, ``target_change``
    with their standard errors (``*_se``), ``label_kept`` (fraction), ``n``, and the paper's values where it has one
    (``paper_spearman``, ``paper_top5``)."""
    g = curves.groupby(["kind", "eps255"], sort=True)
    out = g.agg(spearman=("spearman", "mean"), spearman_sd=("spearman", "std"), top5=("top5", "mean"),
                top5_sd=("top5", "std"), target_change=("target_change", "mean"),
                target_change_sd=("target_change", "std"), label_kept=("label_kept", "mean"),
                n=("image", "count")).reset_index()  # fmt: skip
    for col in ("spearman", "top5", "target_change"):
        out[f"{col}_se"] = out.pop(f"{col}_sd").fillna(0) / np.sqrt(out["n"])
    paper_rho = {("attack", 8.0): PAPER_NUMBERS["influence_spearman_attack_eps8"]["value"],
                 ("random", 10.0): PAPER_NUMBERS["influence_spearman_random_eps10"]["value"]}
    paper_top5 = {("attack", 8.0): PAPER_NUMBERS["influence_top5_attack_eps8"]["value"]}
    out["paper_spearman"] = [paper_rho.get((kd, round(e, 6)), np.nan) for kd, e in zip(out.kind, out.eps255)]
    out["paper_top5"] = [paper_top5.get((kd, round(e, 6)), np.nan) for kd, e in zip(out.kind, out.eps255)]
    return out


def median_example(curves: pd.DataFrame, *, eps255: float = 8, kind: str = "attack") -> int:
    """Index of a typical test image for the F5a panel: the label-kept image whose Spearman ρ under ``kind`` at
    ``eps255`` is the median one (not the most dramatic)."""
    sel = curves[(curves.kind == kind) & np.isclose(curves.eps255, eps255) & curves.label_kept]
    if sel.empty:
        raise ValueError(f"no label-kept rows for kind={kind!r} at eps255={eps255}")
    order = sel.sort_values("spearman").reset_index(drop=True)
    return int(order.image.iloc[(len(order) - 1) // 2])


def influence_claims(summary: pd.DataFrame, setting: InfluenceSetting, *, deviation: str,
                     prefix: str = "fragility") -> list[dict[str, Any]]:  # fmt: skip
    """Claim 8 (``docs/papers/fragility.md`` §7) as REPRODUCTION.md rows for ``report.record_claim(**row)``: the
    attack's top-5 overlap and ρ at ε = 8, random noise's ρ at ε = 10, and the head's accuracy; numeric claims with
    the "no effect" reference r (5 of 5 kept, ρ = 1; chance accuracy 0.5) and tolerance min(max(25 % of the paper's
    value p, 0.05), |p − r| / 2), so that no effect can never be "reproduced" (claim 8c: 0.1, not 0.2).
    ``summary``: :func:`summarize_influence` with eps255 8 and 10."""

    def at(kind, eps, col):
        sel = summary[(summary.kind == kind) & np.isclose(summary.eps255, eps)]
        if len(sel) != 1:
            raise ValueError(f"summary needs one ({kind}, eps255={eps}) row")
        return float(sel[col].iloc[0])

    def tol(p, ref):
        # half the gap to "no effect" at most: otherwise no effect at all (e.g. ρ = 1 against the paper's 0.8) would
        # fall within the tolerance and read "reproduced"
        return round(min(max(0.25 * abs(p), 0.05), abs(p - ref) / 2), 6)

    src = "[PAPER-3P]"
    t5, rho, rnd = at("attack", 8, "top5"), at("attack", 8, "spearman"), at("random", 10, "spearman")
    p_t5 = PAPER_NUMBERS["influence_top5_attack_eps8"]["value"]
    p_rho = PAPER_NUMBERS["influence_spearman_attack_eps8"]["value"]
    p_rnd = PAPER_NUMBERS["influence_spearman_random_eps10"]["value"]
    p_acc = PAPER_NUMBERS["influence_val_accuracy"]["value"]
    n = int(summary.n.max())
    common = {"kind": "numeric", "deviation": deviation}
    return [
        {"claim_id": f"{prefix}/claim8_influence_top5_eps8", "claim": "Influence attack (gradient sign, ε = 8): "
         "top-5 most influential training images kept (of 5)", "paper_value": p_t5, "ours": round(t5, 2),
         "tolerance": tol(p_t5, 5.0), "reference": 5.0, "note": f"{n} test images (paper 200)", "source": src,
         **common},
        {"claim_id": f"{prefix}/claim8b_influence_spearman_eps8", "claim": "Influence attack, ε = 8: rank correlation "
         "of influences before/after ('essentially uncorrelated')", "paper_value": p_rho, "ours": round(rho, 3),
         "tolerance": tol(p_rho, 1.0), "reference": 1.0, "source": src + " (wording, ≈ 0)", **common},
        {"claim_id": f"{prefix}/claim8c_influence_random_eps10", "claim": "Random sign noise, ε ≈ 10: rank correlation "
         "stays ≈ 0.8", "paper_value": p_rnd, "ours": round(rnd, 3), "tolerance": tol(p_rnd, 1.0), "reference": 1.0,
         "source": src, **common},
        {"claim_id": f"{prefix}/claim8d_influence_accuracy", "claim": "Logistic layer on frozen features: "
         "validation accuracy", "paper_value": p_acc, "ours": round(setting.test_accuracy, 3), "tolerance": 0.025,
         "reference": 0.5, "source": src, **common},
    ]
