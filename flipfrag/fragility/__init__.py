"""Experiment drivers for *Interpretation of Neural Networks is Fragile* (Ghorbani, Abid & Zou 2019).

The notebooks under ``notebooks/fragility/`` only load, call and plot; everything they compute lives here (the
algorithms themselves are in :mod:`flipfrag.saliency`, :mod:`flipfrag.attacks`, :mod:`flipfrag.metrics`,
:mod:`flipfrag.influence` and :mod:`flipfrag.hessian`). One concept per module; every public name is re-exported
here, so ``from flipfrag import fragility; fragility.run_attack_grid(...)`` works.

* :mod:`~flipfrag.fragility.paper` — the grid's names (methods, attacks, metrics) and the paper's numbers:
  :data:`PAPER_F3` / :func:`paper_grid` (F3 read off the authors' README figure), :data:`PAPER_NUMBERS`, and
  :func:`role_k` (k at the paper's fraction of the map).
* :mod:`~flipfrag.fragility.settings` — :class:`ImageSetting` (model, attacked images, IG/DeepLIFT reference, k) for
  each experiment, built by :func:`image_setting` for a profile: offline the real pretrained CIFAR-10 CNN on shipped
  photos (and the MNIST CNNs for the input-dimension comparison); ``paper``: SqueezeNet on ImageNet (download).
* :mod:`~flipfrag.fragility.grid` — the attack grid: :class:`GridSpec` (one specification: methods, attacks,
  epsilons, iterations, IG steps, k, ...), :func:`run_attack_grid` (cached, checksummed cells), :func:`summarize_grid`
  and :func:`grid_table` (ours next to the paper's values).
* :mod:`~flipfrag.fragility.cells` — the paper-scale F3 on the ImageNet CNN from committed, checked grid cells
  (:data:`SCALE_GRID`, :func:`run_cells` — ``make cells`` — :func:`load_scale_grid`, :func:`verify_cell`).
* :mod:`~flipfrag.fragility.claims` — the REPRODUCTION.md rows the grids answer (:func:`grid_claims`,
  :func:`dimension_claim`).
* :mod:`~flipfrag.fragility.plots` — :func:`plot_attack_grid` (F3's layout).
* :mod:`~flipfrag.fragility.examples` — single attacks for the example figures (F1, F4: :func:`attack_examples`,
  :func:`target_box`).
* :mod:`~flipfrag.fragility.exemplars` — influence functions (F5): :func:`influence_setting`, :func:`influence_curves`.
* :mod:`~flipfrag.fragility.geometry` — the geometry section: the 2-D toy (:func:`toy_geometry_data`,
  :func:`fit_toy_models`, :func:`decision_grid`, F2's :func:`toy_rotation`), F6's attack-vs-random geometry
  (:func:`geometry_comparison`) and the input-dimension sweep (:class:`TwoLayerSoftplus`, :func:`dimension_sweep`).

Units: images are in [0, 1]; epsilons are given on that scale (the paper's ε = 8 is ``8/255``) and reported on the
paper's 0-255 scale as ``eps255``. Center shifts are in pixels of the saliency map; ``center_rel`` divides by the
map's side so that maps of different sizes can be compared.
"""

from .cells import (
    SCALE_GRID,
    ScaleGrid,
    load_scale_grid,
    plot_scale_grid,
    run_cells,
    scale_claims,
    scale_deviation,
    verify_cell,
)
from .claims import attacks_beat_random, dimension_claim, grid_claims, shape_stats
from .examples import attack_examples, target_box
from .exemplars import (
    CNNFeatures,
    InceptionFeatures,
    InfluenceSetting,
    influence_claims,
    influence_curves,
    influence_setting,
    median_example,
    summarize_influence,
)
from .geometry import (
    ToyModels,
    TwoLayerSoftplus,
    decision_grid,
    dimension_sweep,
    fit_toy_models,
    geometry_comparison,
    toy_geometry_data,
    toy_rotation,
)
from .grid import (
    BETA_RULE,
    CELL_COLUMNS,
    GridCacheError,
    GridSpec,
    best_by_metric,
    choose_beta,
    dimension_table,
    grid_cache_key,
    grid_deviation,
    grid_for,
    grid_spec,
    grid_table,
    ig_steps_convergence,
    iteration_convergence,
    load_grid_cell,
    run_attack_grid,
    save_grid_cell,
    summarize_grid,
    surrogate_fidelity,
)
from .paper import (
    ATTACK_LABELS,
    ATTACKS,
    GRID_METHODS,
    METHOD_LABELS,
    METHODS,
    METRIC_LABELS,
    METRICS,
    PAPER_EPS255,
    PAPER_F3,
    PAPER_NUMBERS,
    PAPER_SIDE,
    paper_grid,
    role_k,
)
from .plots import plot_attack_grid
from .settings import (
    CIFAR10_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ROLES,
    ImageSetting,
    Normalized,
    cifar10_setting,
    cifar_paper_setting,
    downsample,
    efficientnet_setting,
    grid_sizes,
    image_setting,
    imagenet_paper_setting,
    mnist_setting,
    prepare_setting,
    select_correct,
    substitution_text,
)

__all__ = [
    "SCALE_GRID",
    "ScaleGrid",
    "load_scale_grid",
    "plot_scale_grid",
    "run_cells",
    "scale_claims",
    "scale_deviation",
    "verify_cell",
    "BETA_RULE",
    "choose_beta",
    "GridSpec",
    "grid_spec",
    "grid_sizes",
    "ig_steps_convergence",
    "iteration_convergence",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CELL_COLUMNS",
    "METHODS",
    "GRID_METHODS",
    "ATTACKS",
    "METRICS",
    "METHOD_LABELS",
    "ATTACK_LABELS",
    "METRIC_LABELS",
    "PAPER_EPS255",
    "PAPER_F3",
    "PAPER_NUMBERS",
    "PAPER_SIDE",
    "paper_grid",
    "role_k",
    "substitution_text",
    "Normalized",
    "downsample",
    "select_correct",
    "ImageSetting",
    "prepare_setting",
    "image_setting",
    "imagenet_paper_setting",
    "CIFAR10_MEAN",
    "ROLES",
    "cifar10_setting",
    "efficientnet_setting",
    "cifar_paper_setting",
    "mnist_setting",
    "best_by_metric",
    "GridCacheError",
    "grid_cache_key",
    "save_grid_cell",
    "load_grid_cell",
    "run_attack_grid",
    "summarize_grid",
    "grid_table",
    "shape_stats",
    "grid_claims",
    "dimension_claim",
    "attacks_beat_random",
    "plot_attack_grid",
    "grid_for",
    "grid_deviation",
    "attack_examples",
    "surrogate_fidelity",
    "dimension_table",
    "summarize_influence",
    "median_example",
    "influence_claims",
    "target_box",
    "CNNFeatures",
    "InceptionFeatures",
    "InfluenceSetting",
    "influence_setting",
    "influence_curves",
    "toy_rotation",
    "geometry_comparison",
    "toy_geometry_data",
    "ToyModels",
    "fit_toy_models",
    "decision_grid",
    "TwoLayerSoftplus",
    "dimension_sweep",
]
