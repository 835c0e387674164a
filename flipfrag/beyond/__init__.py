"""Beyond both papers: what neither paper measured, with flip points (paper 1) and fragility (paper 2) together.

* :mod:`~flipfrag.beyond.cases` — the two networks (the pretrained ReLU CIFAR-10 CNN, the smooth MNIST erf MLP) as
  :class:`flipfrag.fragility.ImageSetting` s and their flip solver settings.
* :mod:`~flipfrag.beyond.correlation` — Spearman ρ across images with a seeded bootstrap interval.
* :mod:`~flipfrag.beyond.boundary` — study 1: distance to the closest flip point vs fragility of the saliency map,
  with the input-Hessian curvature as the mediator the Hessian argument predicts (:func:`boundary_examples`: the
  most / least fragile images for the figure).
* :mod:`~flipfrag.beyond.flipmap` — study 2: the flip-explanation map |x_flip - x| attacked with paper 2's attacks
  (ReLU networks: the step direction from a smooth surrogate's flip map, :func:`flip_surrogate`).
* :mod:`~flipfrag.beyond.claims` — the REPRODUCTION.md rows of both studies.
* :mod:`~flipfrag.beyond.plots` — the figures of studies 1 and 2.
* :mod:`~flipfrag.beyond.defenses` — study 3: explanation defenses (SmoothGrad, sparsified SmoothGrad, beta-smoothing)
  under adaptive top-k attacks, their certificate, cost, faithfulness and Quantus metrics, and its REPRODUCTION.md
  rows; :mod:`~flipfrag.beyond.defense_plots` its two figures. (Imported as submodules, not re-exported here.)
"""

from .boundary import (
    PAIRS,
    boundary_correlations,
    boundary_examples,
    boundary_flips,
    boundary_frame,
    certified_distance,
    curvature,
)
from .cases import CASES, beyond_setting, flip_arguments, flip_solver_options, sg_attack
from .claims import boundary_claims, flip_claims
from .correlation import Correlation, bootstrap_indices, spearman_ci, spearman_rows
from .flipmap import (
    FLIP_METHOD,
    SURROGATE_BETA,
    FlipCenterAttack,
    FlipRandomSignAttack,
    FlipStudy,
    FlipTopKAttack,
    differentiable_available,
    flip_explanation,
    flip_explanation_map,
    flip_fragility_rows,
    flip_surrogate,
    summarize_flip_fragility,
    transfer_attack,
)
from .plots import (
    plot_boundary_vs_fragility,
    plot_flip_explanation_examples,
    plot_flip_explanation_fragility,
    plot_flip_target_survival,
)

__all__ = [
    "PAIRS", "boundary_correlations", "boundary_examples", "boundary_flips", "boundary_frame", "certified_distance",
    "curvature",
    "CASES", "beyond_setting", "flip_arguments", "flip_solver_options", "boundary_claims", "flip_claims",
    "plot_boundary_vs_fragility", "plot_flip_explanation_fragility", "plot_flip_explanation_examples",
    "plot_flip_target_survival",
    "Correlation", "bootstrap_indices", "spearman_ci", "spearman_rows",
    "FLIP_METHOD", "SURROGATE_BETA", "FlipStudy", "flip_surrogate",
    "FlipCenterAttack", "FlipRandomSignAttack", "FlipTopKAttack", "differentiable_available",
    "flip_explanation", "flip_explanation_map", "flip_fragility_rows", "sg_attack", "summarize_flip_fragility",
    "transfer_attack",
]  # fmt: skip
