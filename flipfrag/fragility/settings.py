"""Image settings: the model, the attacked images, the IG/DeepLIFT reference and ``k`` of each experiment."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .paper import role_k

# --------------------------------------------------------------------------------------------- settings

_SUBSTITUTIONS = {
    "image": ("MNIST-5k at 28x28 + a small ReLU CNN for ImageNet + SqueezeNet 1.0 (ImageNet role); the same digits "
              "pooled to 14x14 + a second CNN for CIFAR-10 + the authors' CNN (CIFAR-10 role)"),
    "influence": ("MNIST 3 vs 8 (800 train / 200 test) + frozen CNN features (trained on the other 8 digits) for "
                  "roses vs sunflowers (1,000 / 200) + Inception v3 features"),
    "toy": None,
}


def substitution_text(kind: str, prof: dict[str, Any]) -> str | None:
    """What a notebook substitutes for the paper's data and models in this profile (for ``plotting.start_run``).

    ``kind``: "image" (the attack notebooks), "influence", or "toy" (the 2-D geometry toy, the paper's own kind of
    figure: None). In the ``paper`` profile the only substitution left is ImageNet's when ``$IMAGENET_DIR`` is unset
    (the 20 shipped validation photos instead of 512 images) and the CIFAR-10 CNN's architecture.
    """
    import os

    if kind not in _SUBSTITUTIONS:
        raise ValueError(f"kind must be one of {sorted(_SUBSTITUTIONS)}, got {kind!r}")
    if prof.get("offline", True):
        return _SUBSTITUTIONS[kind]
    if kind == "image":
        text = "a 3-block SmallCNN for the authors' (unknown) CIFAR-10 CNN"
        if not os.environ.get("IMAGENET_DIR"):
            text = "the 20 shipped ImageNet validation photos for 512 (IMAGENET_DIR unset); " + text
        return text
    if kind == "influence":
        return "a BCE logistic layer fitted exactly (Newton, l2 = 1e-3) for the authors' squared-error Adam fit"
    return None


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a network that takes [0, 1] images (the attacks' pixel box is then [0, 1]).

    ``mean``, ``std``: per-channel sequences (e.g. torchvision's ImageNet statistics).
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.shape != std_t.shape or not bool((std_t > 0).all()):
            raise ValueError("mean and std must have one entry per channel and std must be > 0")
        self.model = model
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.config = {"arch": "Normalized", "inner": getattr(model, "config", None)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def downsample(X: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool images (N, C, H, W) by an integer ``factor`` (H and W divisible by it): the lower-dimensional
    copy of the same images used for the CIFAR-10 role offline (28x28 -> 14x14 for ``factor=2``)."""
    if not isinstance(X, torch.Tensor) or X.dim() != 4:
        raise ValueError(f"X must be a tensor of shape (N, C, H, W), got {getattr(X, 'shape', type(X).__name__)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if X.shape[-1] % factor or X.shape[-2] % factor:
        raise ValueError(f"factor {factor} must divide the image size {tuple(X.shape[-2:])}")
    return F.avg_pool2d(X, factor) if factor > 1 else X.clone()


@torch.no_grad()
def select_correct(
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, n: int | None, *, seed: int = 0, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``n`` correctly classified images, drawn in a seeded random order (the paper attacks only those).

    Returns ``(x, y, accuracy)``, accuracy over all of ``X``. Fewer than ``n`` correct images: all of them, with a
    warning. ``n=None``: all correct images.
    """
    if X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"X and y must have the same non-zero length, got {X.shape[0]} and {y.shape[0]}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    model.eval()
    dtype = next(model.parameters()).dtype
    pred = torch.cat([model(X[i : i + batch_size].to(dtype)).argmax(1).cpu() for i in range(0, len(X), batch_size)])
    correct = pred == y.cpu()
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(int(seed)))
    idx = order[correct[order]]
    if n is not None:
        if len(idx) < n:
            warnings.warn(f"only {len(idx)} of {len(X)} images are correctly classified (asked for n={n})",
                          stacklevel=2)  # fmt: skip
        idx = idx[:n]
    if len(idx) == 0:
        raise ValueError("model classifies none of the images correctly: nothing to attack")
    return X[idx].clone(), y[idx].clone(), float(correct.float().mean())


@dataclass
class ImageSetting:
    """One "role" of the image experiments: model, attacked images and the settings of its saliency maps.

    Attributes
    ----------
    role : {"imagenet", "cifar"}
    model : nn.Module
        ReLU classifier taking (N, C, H, W) images in [0, 1] (any normalisation inside), eval mode.
    x : Tensor (n, C, H, W)
        Correctly classified images in [0, 1]; ``y`` (n,) their labels (= the model's predictions).
    baseline : Tensor broadcastable to x
        IG / DeepLIFT reference: the per-channel mean image (ImageNet role) or the per-pixel mean image (CIFAR role),
        as in Ghorbani et al.
    k : int
        Top-k size (:func:`role_k`).
    class_names : list of str
    test_accuracy : float
        The model's accuracy on the test images it was drawn from.
    description, substitution : str
        What model and data these are; the substitution is None when they are the paper's own.
    """

    role: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    baseline: torch.Tensor
    k: int
    class_names: list[str]
    test_accuracy: float
    description: str
    substitution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def side(self) -> int:
        return int(self.x.shape[-1])

    @property
    def n_pixels(self) -> int:
        return int(self.x.shape[-2] * self.x.shape[-1])

    def method_kwargs(self, ig_steps: int, internal_batch_size: int | None = None) -> dict[str, dict[str, Any]]:
        """Per-method keyword arguments of the saliency methods: the mean-image reference for IG and DeepLIFT and
        ``ig_steps`` Riemann steps for IG (at most ``internal_batch_size`` interpolants per pass, if given)."""
        ig = {"baseline": self.baseline, "steps": int(ig_steps)}
        if internal_batch_size is not None:
            ig["internal_batch_size"] = int(internal_batch_size)
        return {"integrated_gradients": ig, "deeplift": {"baseline": self.baseline}}


def prepare_setting(
    role: str,
    model: nn.Module,
    X_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    n: int | None,
    baseline: torch.Tensor,
    class_names: Sequence[str],
    description: str,
    substitution: str | None,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> ImageSetting:
    """The part shared by every path: pick ``n`` correctly classified images, set ``k`` for the role."""
    if role not in ("imagenet", "cifar"):
        raise ValueError(f"role must be 'imagenet' or 'cifar', got {role!r}")
    if X_test.dim() != 4 or float(X_test.min()) < 0 or float(X_test.max()) > 1:
        raise ValueError("X_test must be images (N, C, H, W) in [0, 1]")
    x, y, acc = select_correct(model.eval(), X_test, y_test, n, seed=seed)
    return ImageSetting(role=role, model=model, x=x, y=y, baseline=baseline.detach().to(x.dtype),
                        k=role_k(role, x.shape[-2] * x.shape[-1]), class_names=list(class_names),
                        test_accuracy=acc, description=description, substitution=substitution,
                        meta=dict(meta or {}))  # fmt: skip


def _offline_setting(role: str, prof: dict[str, Any], n: int, seed: int, progress: bool) -> ImageSetting:
    from .. import datasets, models

    data = datasets.load_mnist(prof["mnist_n"], offline=True, seed=seed)
    if role == "imagenet":
        model, _, meta = models.trained_model("mnist-cnn", prof, seed=seed, data=data, progress=progress)
        X_test = data.X_test
        baseline = data.X_train.mean().reshape(1, 1, 1)  # per-channel mean (1 channel), as for ImageNet
        desc = (f"SmallCNN (ReLU) trained on MNIST-5k at 28x28 ({len(data.X_train)} train images, "
                f"{meta['epochs']} epochs)")  # fmt: skip
        sub = "MNIST-5k 28x28 + SmallCNN for ImageNet + SqueezeNet 1.0 (227x227)"
    else:
        X_train, X_test = downsample(data.X_train, 2), downsample(data.X_test, 2)
        epochs = int(prof["cnn_epochs"])
        model, meta = models.train_cached(
            lambda: models.SmallCNN(1, 10, width=16), X_train, data.y_train, name="mnist14-cnn", seed=seed,
            progress=progress, epochs=epochs, lr=2e-3, batch_size=64,
        )  # fmt: skip
        baseline = X_train.mean(0)  # per-pixel mean image, as for CIFAR-10
        desc = (f"SmallCNN (ReLU) trained on MNIST-5k average-pooled to 14x14 ({len(X_train)} train images, "
                f"{epochs} epochs)")  # fmt: skip
        sub = "MNIST-5k pooled to 14x14 + SmallCNN for CIFAR-10 (32x32) + the authors' CNN"
    return prepare_setting(role, model, X_test, data.y_test, n=n, baseline=baseline, class_names=data.class_names,
                           description=desc, substitution=sub, seed=seed, meta={"source": data.source})  # fmt: skip


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def imagenet_paper_setting(
    n: int, *, seed: int = 0, model: nn.Module | None = None, folder: str | None = None, load_factor: float = 2.0,
    device: str = "auto",
) -> ImageSetting:
    """ImageNet role of the ``paper`` profile: torchvision SqueezeNet 1.0 at 227x227 (input normalised inside).

    ``model=None`` downloads torchvision's pretrained weights (sha256-verified); a given ``model`` (e.g. a stand-in
    in tests) takes ImageNet-normalised input the same way. Images: ``folder`` / ``$IMAGENET_DIR``, else the 20
    shipped validation photos; ``load_factor * n`` images are loaded (SqueezeNet is right on about 58 %), then
    ``n`` correctly classified ones are kept. Baseline: the channel-mean image (the authors' zero in mean-subtracted
    space). ``device``: "auto" = CUDA when available (the paper's sizes are days of CPU time), else CPU.
    """
    from .. import datasets, models

    net = models.squeezenet1_0(pretrained=True) if model is None else model
    device = _device(device)
    wrapped = Normalized(net, IMAGENET_MEAN, IMAGENET_STD).eval().to(device)
    data = datasets.load_imagenet_samples(227, folder=folder, n=max(1, math.ceil(load_factor * n)), seed=seed)
    baseline = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1).to(device)
    return prepare_setting(
        "imagenet", wrapped, data.X_test.to(device), data.y_test.to(device), n=n, baseline=baseline,
        class_names=data.class_names,
        description=f"torchvision SqueezeNet 1.0 (ImageNet weights) at 227x227; {data.source}",
        substitution=data.substitute, seed=seed, meta={"source": data.source},
    )  # fmt: skip


def cifar_paper_setting(prof: dict[str, Any], *, seed: int = 0, data=None, progress: bool = False,
                        width: int = 32, device: str = "auto") -> ImageSetting:  # fmt: skip
    """CIFAR-10 role of the ``paper`` profile: a SmallCNN (3 ReLU conv blocks, GAP head; the authors' own CNN is
    unknown, 73 % test accuracy) trained on downloaded CIFAR-10 (``data`` overrides it, e.g. a stand-in in tests),
    ``prof["cnn_epochs"]`` epochs (on the CPU, cached), per-pixel mean-image baseline; attacked on ``device``
    ("auto" = CUDA when available)."""
    from .. import datasets, models

    data = datasets.load_cifar10(offline=False, seed=seed) if data is None else data
    if len(data.X_train) == 0:
        raise ValueError("data: the CIFAR-10 role needs training images (offline CIFAR-10 has only 20 test images)")
    epochs = int(prof["cnn_epochs"])
    model, _ = models.train_cached(
        lambda: models.SmallCNN(3, 10, width=width), data.X_train, data.y_train, name="cifar-cnn", seed=seed,
        progress=progress, epochs=epochs, lr=1e-3, batch_size=128,
    )  # fmt: skip
    device = _device(device)
    return prepare_setting(
        "cifar", model.to(device), data.X_test.to(device), data.y_test.to(device), n=int(prof["grid_n_images"]),
        baseline=data.X_train.mean(0).to(device),
        class_names=data.class_names, description=f"SmallCNN (width {width}) trained on {data.source}, {epochs} epochs",
        substitution="a 3-block SmallCNN for the authors' (unknown) CIFAR-10 CNN", seed=seed,
        meta={"source": data.source},
    )  # fmt: skip


def image_setting(role: str, prof: dict[str, Any], *, seed: int = 0, n: int | None = None,
                  progress: bool = False) -> ImageSetting:  # fmt: skip
    """The model and images of a role for a profile dict (``prof["offline"]`` selects the path).

    ``n`` defaults to ``prof["grid_n_images"]``. Offline: MNIST-5k stand-ins (see the module docstring); otherwise
    :func:`imagenet_paper_setting` / :func:`cifar_paper_setting` (downloads).
    """
    if role not in ("imagenet", "cifar"):
        raise ValueError(f"role must be 'imagenet' or 'cifar', got {role!r}")
    n = int(prof["grid_n_images"]) if n is None else n
    if prof.get("offline", True):
        return _offline_setting(role, prof, n, seed, progress)
    if role == "imagenet":
        return imagenet_paper_setting(n, seed=seed)
    return cifar_paper_setting({**prof, "grid_n_images": n}, seed=seed, progress=progress)

