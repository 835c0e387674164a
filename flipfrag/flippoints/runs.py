"""The standard flip-point runs of the notebooks: the solver options per kind of data (:func:`flip_options`), the zoo
models with other activations (:func:`trained_variant`) and the cached flip points of a split
(:func:`standard_flips`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..flip import FlipOptions, FlipResult
from .cache import cached_flip_points
from .directions import flip_directions


def flip_options(profile: Mapping[str, Any], *, images: bool, restricted: bool = False,
                 **overrides: Any) -> FlipOptions:  # fmt: skip
    """The solver options every flip-point notebook uses for a kind of data (so that they share cached solves).

    ``tol = profile["flip_tol"]``, ``max_iter = profile["flip_max_iter"]``; for tabular data (``images`` False) the
    homotopy candidate plus ``profile["flip_restarts"]`` random restarts; for images only the direct solve, since
    each extra candidate costs a full 784-dimensional solve per target class (``09_homotopy`` measures what the
    extra candidates change), with :meth:`FlipOptions.for_images` (``max_ineq=2``). ``restricted=True`` (problems
    where most features are fixed by a mask: one attribute free, top-k pixels) drops the homotopy candidate:
    measured on Adult it found no additional flip point there at 5-10x the cost. ``overrides`` replace any field.
    """
    base: dict[str, Any] = {"tol": float(profile["flip_tol"]), "max_iter": int(profile["flip_max_iter"])}
    if images:
        return FlipOptions.for_images(**{**base, **overrides})
    base.update(homotopy=not restricted, restarts=int(profile["flip_restarts"]))
    return FlipOptions(**{**base, **overrides})


def data_bounds(data: Any) -> dict[str, torch.Tensor]:
    """``lower`` / ``upper`` of a dataset's feature box (model units, float64) where it has them: the bounds of
    every flip-point solve on its inputs."""
    out = {}
    for name in ("lower", "upper"):
        if getattr(data, name, None) is not None:
            out[name] = getattr(data, name).double()
    return out


def is_image_data(data: Any) -> bool:
    """Images (no ``feature_names``) or tabular data: which :func:`flip_options` a dataset gets."""
    return not getattr(data, "feature_names", None)


def trained_variant(key: str, activation: str, profile: Mapping[str, Any] | str = "quick", *, seed: int = 0,
                    data: Any = None, progress: bool = False) -> tuple[nn.Module, Any, dict[str, Any]]:  # fmt: skip
    """A model of the zoo (:data:`flipfrag.models.ZOO`, e.g. ``"adult-erf"``) with another hidden activation.

    Same data, widths, epochs, optimiser and seed as the zoo entry, only ``activation`` ("erf", "tanh",
    "softplus", "relu") differs; trained once and cached like the zoo models. ``"erf"`` returns the zoo model
    itself. Returns ``(model, dataset, meta)`` as :func:`flipfrag.models.trained_model`.
    """
    from ..datasets import load_dataset
    from ..models import MLP, ZOO, evaluate, train_cached, trained_model
    from ..profiles import get_profile

    if key not in ZOO or ZOO[key]["arch"] != "mlp":
        raise ValueError(f"key must be an MLP entry of the zoo, got {key!r}")
    prof = get_profile(profile) if isinstance(profile, str) else profile
    spec = ZOO[key]
    if activation == spec["activation"]:
        return trained_model(key, prof, seed=seed, data=data, progress=progress)
    data = data if data is not None else load_dataset(spec["dataset"], prof, seed=seed)
    dtype = getattr(torch, spec["dtype"])
    d = int(np.prod(data.input_shape))
    epochs = int(prof[spec["epochs"]] * spec.get("epoch_scale", 1))
    model, meta = train_cached(
        lambda: MLP(d, prof[spec["hidden"]], data.n_classes, activation=activation), data.X_train.to(dtype),
        data.y_train, name=f"{spec['dataset']}-{activation}", seed=seed, dtype=dtype, progress=progress,
        epochs=epochs, lr=spec["lr"], batch_size=spec["batch_size"],
    )  # fmt: skip
    meta.update(train_acc=evaluate(model, data.X_train.to(dtype), data.y_train),
                test_acc=evaluate(model, data.X_test.to(dtype), data.y_test), epochs=epochs)  # fmt: skip
    return model, data, meta


@dataclass
class FlipSet:
    """The flip points of a subset of a dataset under one model, as the notebooks share them.

    Attributes: ``model``, ``data`` (:class:`flipfrag.datasets.Dataset`), ``meta`` (training metadata),
    ``split`` ("train" or "test"), ``index`` (LongTensor, rows of that split), ``x`` (float64 inputs), ``y``
    (labels), ``res`` (:class:`~flipfrag.flip.FlipResult`, source = predicted class, target = closest other class),
    ``options`` (the solver's :class:`~flipfrag.flip.FlipOptions`) and ``bounds`` (``lower`` / ``upper`` of the
    data's feature box): ``closest_flip_point(model, x, options=fset.options, **fset.bounds)`` is the same solve.
    """

    model: nn.Module
    data: Any
    meta: dict[str, Any]
    split: str
    index: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    res: FlipResult
    options: FlipOptions
    bounds: dict[str, torch.Tensor]

    @property
    def directions(self) -> np.ndarray:
        """``x_flip - x`` flattened (N, n_features); NaN rows where uncertified."""
        return flip_directions(self.res, self.x)


def standard_flips(key: str, profile: Mapping[str, Any] | str = "quick", *, split: str = "test", seed: int = 0,
                   n: int | None = None, activation: str | None = None, data: Any = None,
                   progress: bool = False, **overrides: Any) -> FlipSet:  # fmt: skip
    """Closest flip points of a stratified subset of a zoo model's data — computed once, cached, shared.

    The subset is ``flipfrag.datasets.stratified_subset(y, n, seed)`` of the split (``n`` defaults to the profile's
    ``flip_n_points``; all points if the split is smaller); the solver options are :func:`flip_options` (plus
    ``overrides``), the bounds :func:`data_bounds`; the solve goes through :func:`cached_flip_points`, so every
    notebook asking for the same (model, subset, settings) reads the same file.
    """
    from ..datasets import stratified_subset
    from ..profiles import get_profile

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prof = get_profile(profile) if isinstance(profile, str) else profile
    act = activation or key.split("-")[-1]
    model, data, meta = trained_variant(key, act, prof, seed=seed, data=data, progress=progress)
    X, y = (data.X_train, data.y_train) if split == "train" else (data.X_test, data.y_test)
    n = prof["flip_n_points"] if n is None else n
    index = stratified_subset(y, n, seed + (11 if split == "train" else 0))
    x = X[index].double()
    options = flip_options(prof, images=is_image_data(data), **overrides)
    bounds = data_bounds(data)
    name = f"{key.split('-')[0]}-{act}-{split}"
    res = cached_flip_points(model, x, name=name, progress=progress, options=options, **bounds)
    return FlipSet(model, data, meta, split, index, x, y[index], res, options, bounds)
