"""Names of the grid (methods, attacks, metrics) and the paper's numbers (F3, the other claims), with ``role_k``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

# ------------------------------------------------------------------------------------------------ names

#: Saliency methods of the grid, in the paper's column order (DTD: the appendix's 4th column).
METHODS = ("gradient", "deeplift", "integrated_gradients", "dtd")
#: Every method the grid accepts (``methods=``): also LRP-epsilon, the arXiv-v1 "relevance propagation".
GRID_METHODS = (*METHODS, "lrp")
#: Short method names of the claims' per-method values (REPRODUCTION.md rows: "SG 0.00 / DL 0.01 / IG 0.18").
METHOD_ABBREV = {"gradient": "SG", "deeplift": "DL", "integrated_gradients": "IG", "lrp": "LRP", "dtd": "DTD"}
#: Attacks of the grid: the paper's top-k and center attacks and its random-sign baseline.
ATTACKS = ("topk", "center", "random")
#: Metrics (rows of F3): top-k intersection, Spearman rank correlation, center-of-mass shift (pixels).
METRICS = ("topk", "spearman", "center")
_LOWER_IS_MORE_CHANGE = {"topk": True, "spearman": True, "center": False}

METHOD_LABELS = {
    "gradient": "Simple gradient",
    "deeplift": "DeepLIFT",
    "integrated_gradients": "Integrated gradients",
    "lrp": "LRP-ε",
    "dtd": "DTD",
}
ATTACK_LABELS = {"topk": "Top-k attack", "center": "Center attack", "random": "Random sign"}
METRIC_LABELS = {
    "topk": "Top-k intersection",
    "spearman": "Spearman rank correlation",
    "center": "Center shift (pixels)",
}

# ----------------------------------------------------------------------------------------- paper values

#: The paper's non-zero epsilons on the 0-255 pixel scale (F3's x axis also has 0).
PAPER_EPS255 = (1, 2, 4, 8)
#: Side of the paper's ImageNet saliency maps (SqueezeNet input 227x227), to express center shifts relative to it.
PAPER_SIDE = 227

#: Ghorbani et al., F3 (README ``SaliencyMethodsComparison.png``; the DTD column is the appendix's), values at
#: eps = 1, 2, 4, 8 read off the figure by eye (``docs/papers/fragility.md`` §4: ±0.02 on [0, 1] axes, ±2 px on the
#: center-shift axis).
#: 512 ImageNet validation images, SqueezeNet 1.0, k = 1000 of 227x227 pixels. Keys: (method, attack) -> metric.
PAPER_F3: dict[tuple[str, str], dict[str, tuple[float, float, float, float]]] = {
    ("gradient", "topk"): {"topk": (0.06, 0.005, 0.005, 0.005), "spearman": (0.54, 0.38, 0.30, 0.285),
                           "center": (15.5, 21, 22.5, 22.5)},
    ("gradient", "center"): {"topk": (0.16, 0.065, 0.035, 0.03), "spearman": (0.55, 0.41, 0.325, 0.29),
                             "center": (34, 52, 66, 74)},
    ("gradient", "random"): {"topk": (0.56, 0.42, 0.30, 0.21), "spearman": (0.78, 0.70, 0.62, 0.55),
                             "center": (1.5, 2.2, 3.5, 5)},
    ("deeplift", "topk"): {"topk": (0.17, 0.04, 0.01, 0.01), "spearman": (0.61, 0.46, 0.32, 0.27),
                           "center": (11, 17.5, 22.5, 23)},
    ("deeplift", "center"): {"topk": (0.23, 0.10, 0.055, 0.04), "spearman": (0.62, 0.47, 0.37, 0.315),
                             "center": (24.5, 40.5, 55, 63.5)},
    ("deeplift", "random"): {"topk": (0.57, 0.44, 0.32, 0.22), "spearman": (0.78, 0.70, 0.62, 0.55),
                             "center": (1.5, 2.2, 3.3, 5)},
    ("integrated_gradients", "topk"): {"topk": (0.30, 0.21, 0.19, 0.18), "spearman": (0.69, 0.63, 0.61, 0.60),
                                       "center": (10, 12, 12.5, 12.5)},
    ("integrated_gradients", "center"): {"topk": (0.27, 0.22, 0.21, 0.215), "spearman": (0.67, 0.615, 0.59, 0.59),
                                         "center": (12.5, 18, 20.5, 20.7)},
    ("integrated_gradients", "random"): {"topk": (0.60, 0.47, 0.35, 0.26), "spearman": (0.83, 0.76, 0.69, 0.63),
                                         "center": (1.5, 2.5, 3.5, 5.5)},
    ("dtd", "topk"): {"topk": (0.37, 0.20, 0.175, 0.175), "spearman": (0.84, 0.69, 0.62, 0.60),
                      "center": (21.5, 33, 36.5, 37)},
    ("dtd", "center"): {"topk": (0.49, 0.41, 0.39, 0.39), "spearman": (0.83, 0.745, 0.71, 0.71),
                        "center": (35, 44.5, 47, 47)},
    ("dtd", "random"): {"topk": (0.91, 0.865, 0.81, 0.755), "spearman": (0.94, 0.915, 0.885, 0.865),
                        "center": (0.5, 0.8, 1.8, 2.5)},
}  # fmt: skip

#: Other numbers of ``docs/papers/fragility.md`` §7 (evidence tags defined in ``docs/papers/README.md``).
PAPER_NUMBERS: dict[str, dict[str, Any]] = {
    "cifar_test_accuracy": {"value": 0.73, "source": "[PAPER-3P]"},
    "cifar_k": {"value": 100, "source": "[PAPER-3P]"},
    "imagenet_k": {"value": 1000, "source": "[CODE]"},
    "imagenet_n_images": {"value": 512, "source": "[PAPER-3P]"},
    "influence_val_accuracy": {"value": 0.975, "source": "[PAPER-3P]"},
    "influence_top5_attack_eps8": {"value": 2.0, "source": "[PAPER-3P]"},  # of 5
    "influence_spearman_attack_eps8": {"value": 0.0, "source": "[PAPER-3P] 'essentially uncorrelated'"},
    "influence_spearman_random_eps10": {"value": 0.8, "source": "[PAPER-3P]"},
    "influence_n_train": {"value": 1000, "source": "[CODE]"},
    "influence_n_test": {"value": 200, "source": "[CODE]"},
}


def paper_grid(methods: Sequence[str] | None = None) -> pd.DataFrame:
    """:data:`PAPER_F3` as a table: one row per (method, attack, eps255) with ``topk``, ``spearman``, ``center`` (px)
    and ``center_rel`` (center / 227). ``methods`` filters (default: all four: SG, DeepLIFT, IG, DTD)."""
    if methods is not None:
        bad = sorted(set(methods) - {m for m, _ in PAPER_F3})
        if bad:
            raise ValueError(f"methods: no paper values for {bad}; the paper has {sorted({m for m, _ in PAPER_F3})}")
    rows = []
    for (method, attack), values in PAPER_F3.items():
        if methods is not None and method not in methods:
            continue
        for i, eps in enumerate(PAPER_EPS255):
            rows.append({"method": method, "attack": attack, "eps255": float(eps),
                         **{m: float(values[m][i]) for m in METRICS}})  # fmt: skip
    df = pd.DataFrame(rows)
    df["center_rel"] = df["center"] / PAPER_SIDE
    return df


def role_k(role: str, n_pixels: int) -> int:
    """Top-k size for a saliency map of ``n_pixels`` in a role, at the paper's fraction of the map.

    ``"imagenet"``: 1000 of 227x227 = 51,529 pixels (1.94 %); ``"cifar"``: 100 of 32x32 = 1,024 (9.8 %). Gives exactly
    1000 / 100 at the paper's sizes, 15 for a 28x28 map (ImageNet role), 19 for 14x14 (CIFAR role). At least 1.
    """
    fractions = {"imagenet": 1000 / PAPER_SIDE**2, "cifar": 100 / 1024}
    if role not in fractions:
        raise ValueError(f"role must be one of {sorted(fractions)}, got {role!r}")
    if isinstance(n_pixels, bool) or not isinstance(n_pixels, (int, np.integer)) or n_pixels < 1:
        raise ValueError(f"n_pixels must be a positive integer, got {n_pixels!r}")
    return max(1, min(int(n_pixels), round(fractions[role] * int(n_pixels))))

