"""Analyses built on closest flip points (Yousefzadeh & O'Leary 2019): confidence, influential features, bias,
adversarial changes, influential training points, and PCA / rank-revealing QR of flip directions.

The flip points themselves come from :func:`flipfrag.flip.closest_flip_point`; this module never solves for them
by other means. It adds what the paper does *with* them:

==============================  =======================================================================================
module: concept                 functions
==============================  =======================================================================================
``cache``: solve once, reuse    :func:`cached_flip_points` (sharded engine tasks), :func:`concat_flip_results`,
                                :func:`save_flip_result`, :func:`load_flip_result`, :func:`flip_cache_key`,
                                :func:`solver_arguments`
``runs``: the standard runs     :func:`standard_flips`, :func:`flip_options`, :func:`data_bounds`,
                                :func:`trained_variant` (zoo models with tanh / softplus activations)
``confidence`` (E1)             :func:`confidence_scores`, :func:`misclassification_detection`, :func:`auroc`,
                                :func:`average_precision`, :func:`bootstrap_ci`, :func:`auroc_difference`,
                                :func:`linearized_distance`
``features`` (E2, E3, E4)       individual features: :func:`rank_features`, :func:`columns_of`,
                                :func:`restricted_flip_points`, :func:`unit_flips`; bias: :func:`attribute_shares`,
                                :func:`attribute_order`, :func:`toggle_test`; adversarial changes: :func:`topk_mask`,
                                :func:`flips_vs_k`
``training`` (E5)               influential training points: :func:`select_training_subset`,
                                :func:`retraining_experiment`, :func:`mlp_trainer`
``directions`` (E6, E7)         :func:`flip_directions`, :func:`direction_matrix`, :func:`pca_directions`,
                                :func:`rrqr_directions`
``agnostic`` (E8)               model-agnostic: :class:`LinearScores`, :func:`linear_flip_point`
``study_*``, ``claims``,        the notebooks' studies — 02 :func:`confidence_study`, 03 :func:`feature_study`, 04
``plots``                       :func:`bias_study`, 05 :func:`adversarial_study`, 06 :func:`training_study`, 07
                                :func:`pca_spectra` / :func:`rrqr_study`, 08 :func:`agnostic_study`, 09
                                :func:`homotopy_study` — their REPRODUCTION.md rows (``claims``) and figures
                                (``plots``)
==============================  =======================================================================================

Conventions
-----------
* A *flip direction* is ``x_flip - x`` for one input, flattened to the model's feature space (the scaled space
  the network sees, e.g. [0, 1] per feature). Distances are Euclidean in that space. Changes in original units are
  obtained with :meth:`flipfrag.datasets.Dataset.delta_to_original_units` (tabular data only).
* Points whose flip point was not certified (``FlipResult.converged`` False) are never used silently: the functions
  either drop them and say how many (``n_excluded``), or keep NaN.
* "Misclassified" detection: a *low* distance (or a low softmax) should mean "probably wrong", so the detectors
  score a point by ``-distance`` / ``-softmax``; AUROC = 0.5 is chance, 1.0 perfect.
"""

from __future__ import annotations

from .agnostic import LinearScores, linear_flip_point
from .cache import (
    FlipCacheError,
    cached_flip_points,
    concat_flip_results,
    flip_cache_key,
    load_flip_result,
    save_flip_result,
    solver_arguments,
)
from .claims import (
    adversarial_claim,
    agnostic_claim,
    bias_claim,
    confidence_claim,
    features_claim,
    homotopy_claim,
    pca_claim,
    rrqr_claim,
    training_claim,
)
from .confidence import (
    auroc,
    auroc_difference,
    average_precision,
    bootstrap_ci,
    confidence_scores,
    linearized_distance,
    misclassification_detection,
)
from .directions import PCAResult, RRQRResult, direction_matrix, flip_directions, pca_directions, rrqr_directions
from .features import (
    attribute_order,
    attribute_shares,
    attribute_units,
    columns_of,
    flips_vs_k,
    rank_features,
    restricted_flip_points,
    toggle_test,
    topk_mask,
    unit_flips,
)
from .plots import (
    plot_adversarial,
    plot_confidence,
    plot_features,
    plot_homotopy,
    plot_influential_training,
    plot_model_agnostic,
    plot_pca_rrqr,
)
from .runs import FlipSet, data_bounds, flip_options, is_image_data, standard_flips, trained_variant
from .study_adversarial import AdversarialStudy, adversarial_study, pick_digits
from .study_agnostic import agnostic_study
from .study_bias import bias_study
from .study_confidence import CONFIDENCE_MODELS, confidence_row, confidence_study
from .study_features import ADULT_UNITS, IMMUTABLE, FeatureStudy, feature_study, pick_examples
from .study_homotopy import homotopy_strategies, homotopy_study
from .study_pca import SPECTRA, leading_directions, pca_spectra, rrqr_groups, rrqr_study
from .study_training import RETRAIN_SETUPS, summarize_training, training_study
from .training import (
    RetrainingOptions,
    TrainedPredictor,
    mlp_trainer,
    retraining_experiment,
    select_training_subset,
)

__all__ = [
    # cache
    "FlipCacheError",
    "flip_cache_key",
    "save_flip_result",
    "load_flip_result",
    "cached_flip_points",
    "concat_flip_results",
    "flip_options",
    "data_bounds",
    "is_image_data",
    "solver_arguments",
    "trained_variant",
    "FlipSet",
    "standard_flips",
    # confidence
    "auroc",
    "average_precision",
    "bootstrap_ci",
    "auroc_difference",
    "linearized_distance",
    "confidence_scores",
    "misclassification_detection",
    # directions and features
    "flip_directions",
    "rank_features",
    "columns_of",
    "attribute_units",
    "restricted_flip_points",
    "unit_flips",
    # bias
    "attribute_shares",
    "attribute_order",
    "toggle_test",
    # adversarial
    "topk_mask",
    "flips_vs_k",
    # influential training points
    "select_training_subset",
    "retraining_experiment",
    "RetrainingOptions",
    "mlp_trainer",
    "TrainedPredictor",
    # PCA / RR-QR
    "direction_matrix",
    "PCAResult",
    "pca_directions",
    "RRQRResult",
    "rrqr_directions",
    # the studies of the notebooks: results, claims, figures
    "bias_study",
    "bias_claim",
    "ADULT_UNITS",
    "IMMUTABLE",
    "FeatureStudy",
    "feature_study",
    "pick_examples",
    "features_claim",
    "plot_features",
    "homotopy_strategies",
    "homotopy_study",
    "homotopy_claim",
    "plot_homotopy",
    "agnostic_study",
    "agnostic_claim",
    "plot_model_agnostic",
    "RETRAIN_SETUPS",
    "training_study",
    "summarize_training",
    "training_claim",
    "plot_influential_training",
    "AdversarialStudy",
    "adversarial_study",
    "pick_digits",
    "adversarial_claim",
    "plot_adversarial",
    "CONFIDENCE_MODELS",
    "confidence_row",
    "confidence_study",
    "confidence_claim",
    "plot_confidence",
    "SPECTRA",
    "pca_spectra",
    "rrqr_groups",
    "rrqr_study",
    "leading_directions",
    "pca_claim",
    "rrqr_claim",
    "plot_pca_rrqr",
    # model-agnostic
    "LinearScores",
    "linear_flip_point",
]
