"""The three parameter sets every notebook and script reads: ``smoke``, ``quick`` (default) and ``paper``.

One place for every size knob. A notebook receives ``profile`` (a name) in its papermill parameters cell and calls
:func:`get_profile`; values it needs beyond these come from the same dict so that a reader sees, in one file, what
each profile changes.

* ``smoke`` — ``make test`` runs every notebook with it: tiny data, few iterations, seconds per notebook.
* ``quick`` — ``make figures`` default: offline data (shipped in ``data/`` or bundled with packages), small models
  trained by flipfrag with their weights shipped in ``data/models`` (loaded, not retrained), the whole figure build
  within 20 minutes on 2 CPU cores.
* ``paper`` — the papers' own datasets and pretrained weights (downloaded, sha256-verified) and settings.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PROFILES", "get_profile", "profile_names"]

_COMMON: dict[str, Any] = {
    # flip points (paper 1)
    "flip_tol": 1e-6,
    "flip_margin_code": None,  # None -> 0.2 / n_classes when reproducing the authors' code
    "homotopy_steps": 10,
    "homotopy_tau": 0.1,
    # fragility (paper 2)
    "attack_step": 0.5 / 255,
    "epsilons": [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255],
    "ig_steps": 100,
    "softplus_beta": 1.0,
    "influence_eps": 8 / 255,
}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        **_COMMON,
        "name": "smoke",
        "offline": True,
        # data sizes
        "mnist_n": 600,  # images drawn (stratified) from the shipped MNIST-5k
        "adult_n_train": 1500,
        "adult_n_test": 500,
        # training
        "mlp_epochs": 3,
        "cnn_epochs": 1,
        "tabular_hidden": [20, 20],
        "mnist_hidden": [32],
        # flip points
        "flip_n_points": 16,
        "flip_max_iter": 60,
        "flip_restarts": 1,
        "retrain_fractions": [0.2, 0.5],
        "retrain_repeats": 1,
        # flip-point analyses (flippoints / notebooks/flip_points)
        "retrain_pool": 300,
        "retrain_steps": 60,
        "adversarial_n_images": 2,
        "adversarial_ks": [10, 784],
        "homotopy_n_points": 6,
        # attacks
        "attack_n_images": 2,
        "attack_iters": 3,
        "ig_steps": 8,
        "epsilons": [0, 2 / 255, 8 / 255],
        "k_top": 20,
        # influence / hessian
        "influence_n_train": 100,
        "influence_n_test": 6,
        "hessian_n_images": 2,
        "lanczos_k": 3,
        # fragility grids (F3 and its CIFAR-10 analogue): methods x attacks x epsilons, so sized separately
        "grid_n_images": 2,
        "grid_iters": 3,
        "grid_ig_iters": 2,
        "grid_ig_steps": 4,
        # the ImageNet role offline: the pretrained EfficientNet-Lite0 at 224x224 (its own sizes: ~100x the cost of the
        # 32x32 CNN per image-iteration; see flipfrag.fragility.grid_sizes)
        "imagenet_grid": {"n_images": 1, "iters": 1, "ig_iters": 1, "ig_steps": 2, "step": 8 / 255, "beta": 10.0,
                          "epsilons": [0, 2 / 255, 8 / 255], "example_iters": 1, "convergence_iters": 2,
                          "convergence_n_images": 1, "held_out_n": 2, "hessian_n_images": 1, "lanczos_k": 2,
                          "ig_internal_batch": 4, "side": 64},  # smoke: the photos at 64x64 (seconds per notebook)
        # the input-dimension comparison (MNIST CNNs at 28x28 and 14x14) and the convergence tables
        "dim_n_images": 2,
        "dim_iters": 3,
        "convergence_iters": 4,
        "convergence_n_images": 2,
        # beyond (notebooks/beyond): study 1 (distance to the closest flip point vs fragility) and study 2 (the
        # flip-explanation map attacked); per network: images, flip points, attack iterations
        "beyond_mnist_n": 8,
        "beyond_cifar_n": 2,
        "beyond_cifar_flip_n": 1,
        "beyond_cifar_flipmap_n": 1,
        "beyond_cifar_flip_iters": 5,
        "beyond_lanczos_iters": 4,
        "beyond_mnist_iters": 3,
        "beyond_flip_n": 4,
        "beyond_flip_iters": 2,
        "beyond_diff_eps255": [8],  # eps (0-255) of the flip-map attacks differentiated through the solver
        "beyond_cifar_diff_n": 1,  # CIFAR-10 photos of the surrogate-direction flip-map attacks
        "beyond_cifar_diff_attacks": ["center"],  # quick runs the top-k attack: together both paths are exercised
        "beyond_cifar_diff_iters": 1,
        "beyond_cifar_diff_step255": 8,
        "beyond_cifar_surrogate_iters": 25,  # SQP iterations of the surrogate's flip solves (10: photo 0 not certified)
        "beyond_n_boot": 200,
        # defenses (notebooks/beyond/03_defenses): explanation defenses under the adaptive top-k attack
        "defense_role": "cifar",
        "defense_n_images": 1,
        "defense_iters": 1,
        "defense_step": 8 / 255,
        "defense_eps": 8 / 255,
        "defense_sg_n": 2,
        "defense_sg_sigma": 0.15,
        "defense_keep": 0.1,
        "defense_clip": 0.01,
        "defense_beta": 3.0,
        "defense_faith_steps": 2,
        "defense_quantus_samples": 1,
        # the ImageNet example (one photo, smoke: at 64x64): SG, SmoothGrad, beta-smoothed before / after their attack
        "defense_example_iters": 1,
        "defense_example_step": 8 / 255,
        "defense_example_sg_n": 2,
    },
    "quick": {
        **_COMMON,
        "name": "quick",
        "offline": True,
        "mnist_n": 5000,
        "adult_n_train": 32561,
        "adult_n_test": 16281,
        "mlp_epochs": 20,
        "cnn_epochs": 8,
        "tabular_hidden": [30, 30],
        "mnist_hidden": [100],
        "flip_n_points": 400,
        "flip_max_iter": 300,
        "flip_restarts": 3,
        "retrain_fractions": [0.05, 0.1, 0.2, 0.4, 0.7, 1.0],
        "retrain_repeats": 3,
        "retrain_pool": 2000,  # Adult training points whose flip points rank them for retraining (E5)
        "retrain_steps": 300,  # Adam steps per retraining, whatever the subset size
        "adversarial_n_images": 8,
        "adversarial_ks": [5, 10, 20, 50, 100, 200, 784],
        "homotopy_n_points": 100,
        "attack_n_images": 32,
        "attack_iters": 40,  # single attacks of the example figures (F1, F4) and the Hessian panels
        "ig_steps": 16,
        "k_top": 100,
        "influence_n_train": 1000,
        "influence_n_test": 60,
        "hessian_n_images": 8,
        "lanczos_k": 8,
        # the CIFAR-10 CNN grids: sizes chosen from the convergence tables of 03_imagenet_grid (∩ vs iterations,
        # IG vs M) within the 12-minute budget of the fragility notebooks; IG costs ~M times more per iteration;
        # 10 photos: measured with 12, the fragility notebooks took 728 s from a cold cache (each grid ~290 s)
        # 6 photos, 20 iterations (IG 10): the quick build's 20 minutes now carry the ImageNet CNN's grids; the paper
        # profile keeps the full sizes; 4 photos since the committed paper-scale ImageNet cells (fragility/03) and the
        # ImageNet defense examples (beyond/03) joined the build (measured 1252 s with 6 photos before them)
        "grid_n_images": 4,
        "grid_iters": 20,  # measured: SG / DeepLIFT converge by 10-20 iterations, DTD by 30, IG by 20 (at M = 8)
        "grid_ig_iters": 10,
        "grid_ig_steps": 8,
        # the ImageNet role: EfficientNet-Lite0 on the shipped ImageNet photos at 224x224, k = 1000 (the paper's).
        # beta = 10 chosen by the surrogate's fidelity on the 7 held-out photos (fragility/03's table); steps of
        # 2/255 so that 4 iterations reach eps = 8/255 (the paper: 0.5/255 x 300 iterations); the convergence
        # table of fragility/03 shows the intersection against the iterations (measured with steps of 1.5/255: SG
        # best-so-far top-k ∩ 0.036 after 1 iteration, 0.007 after 4, 0.005 after 8). The quick build's 20 minutes
        # allow eps in {0, 2, 8}/255 here (the paper's five values: 744 s for fragility/03 alone, measured; per
        # image-iteration SG 0.65 s, DeepLIFT ~1.6 s, DTD ~0.8 s, IG ~0.7 s per interpolant); 6 iterations of 1.5/255
        # cost the grid 220 s of the build (measured), 4 iterations 178 s on 2 photos; one photo since the committed
        # cells (flipfrag.fragility.cells: 16 photos x 50 iterations) carry F3 at scale — the live grid checks that
        # this code still computes it (claims 1-6, 9 on it are anecdotal either way: 2 photos were no sample either)
        "imagenet_grid": {"n_images": 1, "iters": 4, "ig_iters": 2, "ig_steps": 4, "step": 2 / 255, "beta": 10.0,
                          "epsilons": [0, 2 / 255, 8 / 255], "example_iters": 6,
                          "convergence_iters": 8, "convergence_n_images": 1, "held_out_n": 7,
                          "hessian_n_images": 1, "lanczos_k": 4, "lanczos_iters": 16, "targeted_n_images": 1,
                          "ig_internal_batch": 4},  # IG interpolants per double backward: <= 2 GB resident
        "dim_n_images": 8,  # 12 with 30 iterations cost the build 79 s (measured)
        "dim_iters": 20,  # SG / DeepLIFT converge by 10-20 iterations (above); 30 cost the MNIST 28/14 grids 79 s
        "convergence_iters": 100,
        "convergence_n_images": 4,
        # beyond: sized to <= ~90 s per notebook on 2 cores (the quick build's budget is full); the ReLU CIFAR-10 CNN's
        # flip points cost ~3 s each (20 iterations, screen=1), so study 2 re-solves only a few
        "beyond_mnist_n": 40,
        "beyond_cifar_n": 4,  # = grid_n_images: the saliency attacks are 04_cifar_grid's cached cells
        "beyond_cifar_flip_n": 6,  # measured (region-gap certificate): 10 photos x 20 iterations = 30 s, 7 certified
        "beyond_cifar_flipmap_n": 2,  # study 2 re-solves each photo per attack: ~3 s per photo and solve
        "beyond_cifar_flip_iters": 20,
        "beyond_lanczos_iters": 12,
        "beyond_mnist_iters": 10,  # MNIST saliency attacks (the CIFAR-10 ones are 04_cifar_grid's 30 / IG 20)
        "beyond_flip_n": 8,
        "beyond_flip_iters": 6,  # each iteration is a differentiable flip solve (~1 s for 8 digits)
        "beyond_diff_eps255": [8],  # the budget: random sign and transfer run on the whole eps grid
        # the CIFAR-10 flip-map attacks with the smooth surrogate's direction: every iteration is a surrogate solve
        # (~0.8 s per photo) and a ReLU flip solve (~4 s per photo). Measured on 2 photos (cold cache, 2 shared
        # cores): top-k and center with 2 iterations of 4/255 -> notebook 02 156 s, but 2 coarse steps do not beat
        # the random sign (top-k ∩ 0.64 vs 0.52); top-k alone with 4 iterations of 2/255 costs the same and does
        # (final quick run: ∩ 0.25 vs 0.49 random on the same 2 photos; 8 of 1/255: 0.38, 74 s for top-k alone), so
        # quick runs that (the center attack: smoke, paper)
        "beyond_cifar_diff_n": 2,
        "beyond_cifar_diff_attacks": ["topk"],
        "beyond_cifar_diff_iters": 4,
        "beyond_cifar_diff_step255": 2,
        "beyond_cifar_surrogate_iters": 40,  # the surrogate's solves: measured 5-18 SQP iterations on photos 0-1
        "beyond_n_boot": 2000,
        # defenses (notebooks/beyond/03_defenses): the CIFAR-10 CNN on 4 photos (a double backward costs ~15 ms per
        # photo on one free core, SmoothGrad n times that; measured: the study ~25 s of the notebook's <= 60 s),
        # 5 steps of 2/255 (4 reach eps = 8/255). EfficientNet-Lite0 at 224 (~1 s per double backward): paper only
        "defense_role": "cifar",
        "defense_n_images": 4,
        "defense_iters": 5,
        "defense_step": 2 / 255,
        "defense_eps": 8 / 255,
        "defense_sg_n": 4,
        "defense_sg_sigma": 0.15,
        "defense_keep": 0.1,  # sparsified SmoothGrad: Levine et al.'s CIFAR-10 settings (10 % kept, 1 % set to 1)
        "defense_clip": 0.01,
        "defense_beta": 3.0,
        "defense_faith_steps": 16,
        "defense_quantus_samples": 4,
        # the ImageNet example of 03_defenses: one EfficientNet-Lite0 photo at 224x224, SG / SmoothGrad / beta-smoothed
        # maps before and after their own top-k attack. Measured on one core (the other busy): 4 steps of 2/255 and 2
        # draws: 23 s, of which 6 s load the model and photo (SG 4.0 s, SmoothGrad 8.6 s, beta 3.8 s; 4 draws:
        # SmoothGrad 14 s); 2 steps of 4/255: every SG iterate changed the label (no attack), hence 4 small steps
        "defense_example_iters": 4,
        "defense_example_step": 2 / 255,
        "defense_example_sg_n": 2,
    },
    "paper": {
        **_COMMON,
        "name": "paper",
        "offline": False,
        "mnist_n": None,  # full MNIST via torchvision
        "adult_n_train": 32561,
        "adult_n_test": 16281,
        "mlp_epochs": 50,
        "cnn_epochs": 30,
        "tabular_hidden": [50, 50],
        "mnist_hidden": [200, 200],
        "flip_n_points": 2000,
        "flip_max_iter": 500,  # fmincon MaxIterations in the authors' CFP.m
        "flip_restarts": 5,
        "retrain_fractions": [0.05, 0.1, 0.2, 0.4, 0.7, 1.0],
        "retrain_repeats": 5,
        "retrain_pool": None,  # the whole training set
        "retrain_steps": 2000,
        "adversarial_n_images": 32,
        "adversarial_ks": [5, 10, 20, 50, 100, 200, 784],
        "homotopy_n_points": 500,
        "attack_n_images": 512,  # Ghorbani et al.: 512 correctly classified ImageNet images
        "attack_iters": 300,
        "ig_steps": 100,
        "k_top": 1000,
        "influence_n_train": 1000,
        "influence_n_test": 200,
        "hessian_n_images": 32,
        "lanczos_k": 20,
        "grid_n_images": 512,  # Ghorbani et al.: 512 correctly classified ImageNet images, 300 iterations, M = 100
        "grid_iters": 300,
        "grid_ig_iters": 300,
        "grid_ig_steps": 100,
        "imagenet_grid": None,  # the paper's own SqueezeNet (downloaded) with the grid_* settings above
        "dim_n_images": 512,
        "dim_iters": 300,
        "convergence_iters": 300,
        "convergence_n_images": 16,
        "beyond_mnist_n": 500,
        "beyond_cifar_n": 100,
        "beyond_cifar_flip_n": 100,
        "beyond_cifar_flipmap_n": 100,
        "beyond_cifar_flip_iters": 300,
        "beyond_lanczos_iters": 30,
        "beyond_mnist_iters": 300,
        "beyond_flip_n": 100,
        "beyond_flip_iters": 100,
        "beyond_diff_eps255": [1, 2, 4, 8],
        "beyond_cifar_diff_n": 100,
        "beyond_cifar_diff_attacks": ["topk", "center"],
        "beyond_cifar_diff_iters": 100,
        "beyond_cifar_diff_step255": 0.5,  # the paper's step
        "beyond_cifar_surrogate_iters": 300,
        "beyond_n_boot": 10000,
        # defenses: the paper's ImageNet role, SmoothGrad with 50 draws (Smilkov et al.), the paper's attack
        "defense_role": "imagenet",
        "defense_n_images": 32,
        "defense_iters": 300,
        "defense_step": 0.5 / 255,
        "defense_eps": 8 / 255,
        "defense_sg_n": 50,
        "defense_sg_sigma": 0.15,
        "defense_keep": 0.1,
        "defense_clip": 0.01,
        "defense_beta": 3.0,
        "defense_faith_steps": 50,
        "defense_quantus_samples": 50,
        # the example figure's photo: the paper's attack and Smilkov et al.'s 50 draws
        "defense_example_iters": 300,
        "defense_example_step": 0.5 / 255,
        "defense_example_sg_n": 50,
    },
}


def profile_names() -> list[str]:
    return list(PROFILES)


def get_profile(name: str = "quick", **overrides: Any) -> dict[str, Any]:
    """Return a copy of the named profile, with ``overrides`` applied (unknown keys are an error)."""
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {profile_names()}, got {name!r}")
    prof = copy.deepcopy(PROFILES[name])
    unknown = set(overrides) - set(prof)
    if unknown:
        raise ValueError(f"overrides: unknown profile keys {sorted(unknown)}")
    prof.update(overrides)
    return prof
