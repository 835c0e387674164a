"""The two networks of the beyond studies, as :class:`flipfrag.fragility.ImageSetting` s, and their flip solver
settings.

* ``"cifar10-cnn"`` — the real pretrained CIFAR-10 CNN (ReLU, BatchNorm folded) on the 20 shipped CIFAR-10 test
  photos (true labels): :func:`flipfrag.fragility.image_setting` ``("cifar", ...)``, the same images and reference
  as ``notebooks/fragility/04_cifar_grid``. Its second-order attacks use the softplus surrogate (the fragility
  notebooks' choice); its flip points are solved on the ReLU network itself.
* ``"mnist-erf"`` — the erf MLP 784-100-10 of the flip-point notebooks (``flipfrag.models.ZOO["mnist-erf"]``: in
  ``quick`` the checkpoint shipped in ``data/models``, no training), on MNIST-5k test digits. Smooth, so it is
  attacked without a surrogate. Role ``mnist28`` (k = 15 of 784 pixels, the paper's ImageNet fraction), reference
  image: the mean training digit (per channel), as the MNIST settings of the fragility notebooks.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..attacks import MassCenterAttack, TopKAttack
from ..flip import FlipOptions
from ..fragility.grid import GridSpec
from ..fragility.settings import ImageSetting, image_setting, prepare_setting

__all__ = ["CASES", "beyond_setting", "flip_arguments", "flip_solver_options", "grid_overrides", "sg_attack"]

CASES = ("mnist-erf", "cifar10-cnn")


def _mnist_erf(prof: dict[str, Any], *, n: int, seed: int) -> ImageSetting:
    from ..flippoints import trained_variant

    model, data, meta = trained_variant("mnist-erf", "erf", prof, seed=seed)
    dtype = next(model.parameters()).dtype
    X = data.X_test.to(dtype)
    baseline = data.X_train.to(dtype).mean().reshape(1, 1, 1)
    hidden = "-".join(str(h) for h in model.config["hidden"])
    desc = (f"erf MLP 784-{hidden}-10 (flipfrag.models.ZOO['mnist-erf'], test accuracy {meta['test_acc']:.3f}) "
            f"on MNIST test digits ({data.source})")  # fmt: skip
    return prepare_setting("mnist28", model.eval(), X, data.y_test, n=n, baseline=baseline,
                           class_names=data.class_names, description=desc,
                           substitution="MNIST-5k + the erf MLP of the flip-point notebooks (smooth: no surrogate)",
                           seed=seed, meta={"source": data.source, "test_acc": meta["test_acc"]},
                           model_name="mnist-erf")  # fmt: skip


def beyond_setting(case: str, prof: dict[str, Any], *, n: int, seed: int = 0) -> ImageSetting:
    """The model and ``n`` correctly classified images of a case (:data:`CASES`)."""
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if case == "mnist-erf":
        return _mnist_erf(prof, n=n, seed=seed)
    return image_setting("cifar", prof, seed=seed, n=min(n, 20))


def flip_solver_options(setting: ImageSetting, prof: dict[str, Any]) -> FlipOptions:
    """The solver options of a case: the flip-point notebooks' options for images (:func:`flipfrag.flippoints.
    flip_options`: the profile's ``flip_tol`` / ``flip_max_iter``, ``max_ineq=2``). The float32 ReLU CIFAR-10 CNN:
    relative tolerance 1e-5 (its float32 scores carry rounding errors of that order, see
    :class:`~flipfrag.flip.FlipOptions`), ``screen=1`` target and ``beyond_cifar_flip_iters`` iterations (~3 s per
    photo at 20)."""
    from ..flippoints import flip_options

    over: dict[str, Any] = {}
    if setting.model_name == "cifar10-cnn":
        over = dict(tol=max(float(prof["flip_tol"]), 1e-5), screen=1, max_iter=int(prof["beyond_cifar_flip_iters"]))
    return flip_options(prof, images=True, **over)


def flip_arguments(setting: ImageSetting, prof: dict[str, Any], *, box: bool = True) -> dict[str, Any]:
    """Keyword arguments of :func:`flipfrag.flip.closest_flip_point` for a case: the pixel box ``lower=0``,
    ``upper=1`` (``box=False``: no bounds, a labelled variant: boxed MNIST flip points have no derivative, see
    :mod:`flipfrag.beyond.flipmap`) and ``options`` (:func:`flip_solver_options`)."""
    box_kw = {"lower": 0.0, "upper": 1.0} if box else {}
    return {**box_kw, "options": flip_solver_options(setting, prof)}


def grid_overrides(setting: ImageSetting, prof: dict[str, Any]) -> dict[str, Any]:
    """Changes to the fragility grid's settings (:func:`flipfrag.fragility.grid_spec`) for a case's saliency attacks.
    The CIFAR-10 CNN: none, so its cells are those of ``notebooks/fragility/04_cifar_grid`` (same keys, read from its
    cache). The MNIST erf MLP: ``beyond_mnist_iters`` iterations for every method (the quick budget)."""
    if setting.model_name == "cifar10-cnn":
        return {}
    return {"iters": int(prof["beyond_mnist_iters"]), "method_iters": {}}


def sg_attack(spec: GridSpec, model: nn.Module, attack: str, eps: float) -> TopKAttack | MassCenterAttack:
    """The top-k or center attack on the simple-gradient map exactly as the grid cell of ``spec`` builds it
    (:func:`flipfrag.fragility.grid.run_attack_grid`): its perturbations are the ones transferred."""
    if attack not in ("topk", "center"):
        raise ValueError(f"attack must be 'topk' or 'center', got {attack!r}")
    cls = TopKAttack if attack == "topk" else MassCenterAttack
    return cls(model, "gradient", eps=float(eps), step=spec.step, iters=spec.iters_for("gradient"), beta=spec.beta,
               k=spec.k, method_kwargs=spec.method_kwargs.get("gradient", {}), floor_center=spec.floor_center,
               record_metrics=True, progress=False)  # fmt: skip
