"""Attacks on interpretations (Ghorbani, Abid & Zou 2019): random sign, top-k, center of mass, targeted.

Every attack perturbs a batch of correctly classified images within an L∞ ball of radius ``eps`` (on the 0–1 pixel
scale: the paper's ε = 1, 2, 4, 8 are ``1/255 ... 8/255``) and the valid pixel range, keeps the predicted label, and
makes the saliency map as different as possible from the original one. Usage (torchattacks style)::

    attack = TopKAttack(model, method="gradient", k=1000, eps=8/255, step=0.5/255, iters=300)
    out = attack(x, y)   # out.x_adv (N, C, H, W), out.label_kept (N,), out.history{...}

The iterative attacks share one loop (:meth:`InterpretationAttack._run`, the paper's Algorithm 1):

    x^0 = x;  for p = 1..P:  g = ∇_x D(x^{p-1})  (D: the attack's objective on the *surrogate's* saliency map)
                             x^p = Proj_{‖·-x‖∞ <= eps, [lower, upper]}(x^{p-1} + step · sign(g))
                             evaluate x^p on the *original* model: label kept? criterion?
    return, per image, the best label-preserving iterate by the attack's own criterion (or x itself).

Design choices (see the paper notes, ``docs/papers/fragility.md`` §2 and §8):

* **Surrogate.** ReLU nets have zero second derivatives almost everywhere, so for ``gradient``, ``ig`` and ``lrp``
  the step direction is computed on :func:`flipfrag.smooth.softplus_surrogate` (same weights, β = 1 as in the authors'
  code; ``surrogate=`` and ``beta=`` change it). DeepLIFT and DTD are differentiated on the model itself (their
  rule ratios depend smoothly on x), as the authors did for DeepLIFT. A model without any ReLU is used directly. A
  ReLU net with ``surrogate=None`` and a second-order method is rejected. Everything reported — the label check, the
  top-k set and center of the original map, the criterion, the metrics, the history — uses the original model.
* **Selection.** Each attack keeps the best iterate on its own criterion (top-k → lowest top-k intersection,
  center → largest center shift, targeted → largest saliency mass in the target region), the paper's reading. The
  authors' code selects on a ``measure`` chosen independently of the attack: pass ``criterion=`` to do that, or set
  ``record_metrics=True`` (default) and read ``out.history`` / ``out.x_best_by`` for per-metric selection.
* **Failures.** An image with no label-preserving iterate better than the original is returned unchanged with
  ``success = False`` (and ``label_kept = True``); averaged in, it counts as "no change", as in the authors' code.
* **Only correctly classified images are attacked.** ``y`` must equal the model's prediction on ``x``
  (``misclassified="raise"``, default) or such images are returned unchanged with ``attacked = False``
  (``misclassified="skip"``). ``y=None`` uses the model's predictions.
* **Objectives** are small composable callables (:class:`Objective`; lucent style): ``topk_objective(idx)``,
  ``mass_center_objective(center0)``, ``targeted_objective(mask)``; ``2 * a + b`` is an objective too. Subclass
  :class:`InterpretationAttack` and override :meth:`~InterpretationAttack.objective` for a new attack.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from ._checks import check_int
from ._options import Options
from .metrics import ReferenceMaps, default_k, mass_centers, mass_in_region
from .saliency import (
    attribute_with_logits,
    box_bounds,
    canonical_method,
    check_model,
    integrated_gradients_vjp,
    saliency_fn,
    saliency_map,
)
from .smooth import has_relu, softplus_surrogate

__all__ = [
    "Objective",
    "topk_objective",
    "mass_center_objective",
    "targeted_objective",
    "AttackResult",
    "InterpretationAttack",
    "AttackOptions",
    "RandomSignAttack",
    "TopKAttack",
    "MassCenterAttack",
    "TargetedAttack",
    "CRITERIA",
]


# ---------------------------------------------------------------------------------------------- objectives


class Objective:
    """A per-sample scalar function of a batch of saliency maps, (N, H, W) -> (N,), that the attack *maximises*.

    Objectives combine like numbers: ``a + b``, ``a - b``, ``2 * a``, ``-a``, ``Objective.sum([a, b, c])``.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str = "objective"):
        self.fn = fn
        self.name = name

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        return self.fn(maps)

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, Objective):
            return Objective(lambda m: self(m) + other(m), f"({self.name} + {other.name})")
        return Objective(lambda m: self(m) + other, f"({self.name} + {other})")

    __radd__ = __add__

    def __mul__(self, c: float) -> Objective:
        if isinstance(c, Objective):
            raise TypeError("objectives can be scaled by numbers, not multiplied together")
        return Objective(lambda m: c * self(m), f"{c} * {self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return -1.0 * self

    def __sub__(self, other: Objective | float) -> Objective:
        return self + (-other if isinstance(other, Objective) else -float(other))

    @staticmethod
    def sum(objectives: list[Objective]) -> Objective:
        out = objectives[0]
        for o in objectives[1:]:
            out = out + o
        return out

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def topk_objective(idx: torch.Tensor) -> Objective:
    """Minus the saliency mass on the features ``idx`` (N, k) (flat indices into H*W): the top-k attack's objective.

    Maximising it moves the normalised map's mass off the original top-k features.
    """
    idx = idx.detach()
    return Objective(lambda m: -m.flatten(1).gather(1, idx).sum(1), f"topk(k={idx.shape[1]})")


def mass_center_objective(
    center0: torch.Tensor, direction: torch.Tensor | None = None, tie_break: float = 1e-3
) -> Objective:
    """Squared distance ``‖C(m) − c0‖²`` between the map's center of mass (pixels) and ``center0`` (N, 2).

    At the start of an attack ``C(m) = c0`` exactly when the direction is computed on the model itself (DeepLIFT,
    smooth nets), where the squared distance has zero gradient and sign steps would never move. The small linear term
    ``tie_break * <C(m) − c0, direction>`` (``direction`` (N, 2) unit vectors) breaks that tie: with sign steps its
    size does not matter at the start and it is negligible (``tie_break`` pixels) once the center has moved.
    ``direction=None`` or ``tie_break=0`` drops it.
    """
    c0 = center0.detach()
    u = None if direction is None or tie_break == 0 else direction.detach()

    def value(m: torch.Tensor) -> torch.Tensor:
        d = mass_centers(m) - c0.to(m.dtype)
        out = (d**2).sum(-1)
        return out if u is None else out + tie_break * (d * u.to(m.dtype)).sum(-1)

    return Objective(value, "mass_center")


def targeted_objective(mask: torch.Tensor) -> Objective:
    """Saliency mass inside the target region ``mask`` ((H, W) or (N, H, W), 0/1 or weights)."""
    mask = mask.detach()
    return Objective(lambda m: (m * mask.to(m.dtype)).sum((-2, -1)), "targeted")


# ------------------------------------------------------------------------------------------------ criteria

#: Selection criteria: name -> lower_is_better. "target" needs a target region (TargetedAttack).
CRITERIA = {"topk": True, "spearman": True, "center": False, "target": False}
_METRICS = ("topk", "spearman", "center")
#: Methods whose maps are differentiated on the model itself, never on a surrogate: their rule ratios depend smoothly
#: on x even in ReLU nets.
_ON_MODEL = frozenset({"deeplift", "dtd"})
_ALL_CONST = float("inf")


@dataclass
class AttackResult:
    """What an attack returns. Shapes: N images of shape (C, H, W); P = iterations.

    Attributes
    ----------
    x_adv : Tensor (N, C, H, W)
        The returned perturbed images (the original image where the attack failed or was skipped).
    label_kept : BoolTensor (N,)
        ``argmax model(x_adv) == y``, re-checked on the original model.
    success : BoolTensor (N,)
        A label-preserving iterate improved on the original criterion (else x_adv is x: "no change").
    attacked : BoolTensor (N,)
        False for images skipped because ``y`` was not the model's prediction (``misclassified="skip"``).
    best_iter : LongTensor (N,)
        Index p of the returned iterate (0 = the original image).
    criterion : Tensor (N,)
        The selection criterion at ``x_adv``.
    metrics : dict of str -> Tensor (N,)
        ``topk`` (top-k intersection), ``spearman``, ``center`` (center shift in pixels; floored if
        ``floor_center``) between the original map and the map of ``x_adv``, on the original model.
    history : dict of str -> Tensor
        ``criterion`` (P+1, N) for every iterate x^0..x^P (label-changing iterates included: mask them with
        ``label_kept`` (P+1, N)); ``objective`` (P, N) the surrogate objective at x^0..x^{P-1}; with
        ``record_metrics`` also ``topk``, ``spearman``, ``center`` (P+1, N).
    x_best_by : dict of str -> Tensor (N, C, H, W)
        With ``record_metrics``: the best label-preserving iterate by each metric (the authors' per-``measure``
        selection), so every metric row of the paper's figure can be recomputed either way.
    saliency, saliency_adv : Tensor (N, H, W)
        Normalised maps of x and x_adv on the original model.
    """

    x_adv: torch.Tensor
    label_kept: torch.Tensor
    success: torch.Tensor
    attacked: torch.Tensor
    best_iter: torch.Tensor
    criterion: torch.Tensor
    metrics: dict[str, torch.Tensor]
    history: dict[str, torch.Tensor]
    saliency: torch.Tensor
    saliency_adv: torch.Tensor
    x_best_by: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


# Activations the softplus surrogate does not smooth: piecewise linear, so they contribute zero curvature.
_PIECEWISE_LINEAR = {
    F.leaky_relu,
    F.relu6,
    F.hardtanh,
    F.threshold,
    F.prelu,
    torch.clamp,
    torch.clip,
    torch.Tensor.clamp,
    torch.Tensor.clip,
    torch.clamp_min,
    torch.Tensor.clamp_min,
}


class _FindCalls(TorchFunctionMode):
    def __init__(self, funcs: set):
        super().__init__()
        self.funcs = funcs
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.funcs:
            self.found.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _piecewise_linear_calls(model: nn.Module, example: torch.Tensor) -> set[str]:
    with torch.no_grad(), _FindCalls(_PIECEWISE_LINEAR) as mode:
        model(example)
    return mode.found


def _check_number(value: Any, name: str, *, low: float | None = None, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value}")
    return value


# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class AttackOptions(Options):
    """The shared budget and settings of every :class:`InterpretationAttack` (its ``options``; keywords of the
    constructor override the fields, so ``TopKAttack(model, eps=8/255, iters=300)`` works). Validated when made
    (errors name the field); numbers are stored as floats. The fields are described in :class:`InterpretationAttack`.
    """

    eps: float = 8 / 255
    step: float = 0.5 / 255
    iters: int = 300
    k: int | None = None
    lower: float | torch.Tensor = 0.0
    upper: float | torch.Tensor = 1.0
    surrogate: str | nn.Module | None = "softplus"
    beta: float = 1.0
    method_kwargs: dict[str, Any] | None = None
    criterion: str | None = None
    record_metrics: bool = True
    floor_center: bool = False
    misclassified: str = "raise"
    progress: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the checked values once, here
        set_(self, "eps", _check_number(self.eps, "eps", low=0.0))
        set_(self, "step", _check_number(self.step, "step", low=0.0, strict=True))
        check_int(self.iters, "iters", 1)
        if self.k is not None:
            check_int(self.k, "k", 1)
        sur = self.surrogate
        if not (sur is None or sur is False or isinstance(sur, nn.Module)
                or (isinstance(sur, str) and sur == "softplus")):
            raise ValueError(f"surrogate must be 'softplus', an nn.Module or None, got {sur!r}")
        set_(self, "surrogate", None if sur is False else sur)
        set_(self, "beta", _check_number(self.beta, "beta", low=0.0, strict=True))
        if self.method_kwargs is not None and not isinstance(self.method_kwargs, dict):
            raise TypeError(f"method_kwargs must be a dict or None, got {type(self.method_kwargs).__name__}")
        set_(self, "record_metrics", bool(self.record_metrics))
        set_(self, "floor_center", bool(self.floor_center))
        if self.misclassified not in ("raise", "skip"):
            raise ValueError(f"misclassified must be 'raise' or 'skip', got {self.misclassified!r}")
        set_(self, "progress", bool(self.progress))


# ---------------------------------------------------------------------------------------------- base class


class InterpretationAttack:
    """Base class: the shared budget, checks and iterative L∞ loop. Subclasses define :meth:`objective`.

    Parameters
    ----------
    model : nn.Module
        Maps images (N, C, H, W) in [lower, upper] to pre-softmax scores (N, classes); any normalisation is inside.
        Must be in eval mode (samples may not interact).
    method : str or saliency callable
        Saliency method: "gradient" (alias "sg"), "integrated_gradients" ("ig"), "deeplift", "lrp" or "dtd"; or an
        object called as ``method(model, x, target, create_graph=...)`` with the saliency functions' call shape (a
        defense of :mod:`flipfrag.defenses`): the attack then differentiates through it (an adaptive attack), on the
        softplus surrogate unless the object's ``on_model`` attribute is True. Its options live in the object
        (``method_kwargs`` must then be empty).
    eps : float
        L∞ budget on the 0–1 pixel scale (default 8/255, the paper's largest ε). ``eps = 0`` returns x.
    step : float
        Sign-step size (default 0.5/255, the authors' α = 0.5 on the 0–255 scale).
    iters : int
        Number of iterations P (default 300, the authors' code).
    k : int or None
        Top-k size for the top-k objective and the top-k metric; None = :func:`flipfrag.metrics.default_k`
        (1000 for ImageNet-size maps, 100 for CIFAR-size).
    lower, upper : float or Tensor broadcastable to x
        Valid pixel range (default [0, 1]); also DTD's input bounds unless ``method_kwargs`` sets them.
    surrogate : "softplus", nn.Module or None
        Network whose saliency map is differentiated for the step direction. "softplus" (default): the softplus(β)
        copy of ``model`` when it contains ReLUs (except for DeepLIFT and DTD, which use ``model``), else ``model``.
        An ``nn.Module``: used as given. None: ``model`` itself, rejected for ReLU nets with a second-order method.
    beta : float
        Softplus sharpness of the default surrogate (1, as the authors).
    method_kwargs : dict or None
        Extra arguments for the saliency method, e.g. ``{"baseline": mean_image, "steps": 100}`` for IG, ``{"eps":
        1e-6}`` for LRP, ``{"internal_batch_size": 256}`` for IG (bounds memory: the step direction is then
        accumulated chunk by chunk).
    criterion : str or None
        Iterate-selection criterion: "topk" (lower is better), "spearman" (lower), "center" (higher), "target"
        (higher; TargetedAttack only). None = the attack's own.
    record_metrics : bool
        Record all three metrics for every iterate and keep the best iterate by each (``out.x_best_by``).
    floor_center : bool
        Floor centers of mass to integers in the center criterion/metric, as the authors' code (default False:
        float centers; the objective always uses float centers).
    misclassified : {"raise", "skip"}
        What to do with images where ``y`` is not the model's prediction.
    progress : bool
        Show a tqdm progress bar over iterations.

    Every parameter after ``method`` is a field of :class:`AttackOptions`: pass them as keywords, or as
    ``options=AttackOptions(...)`` (keywords then override its fields). The checked values are kept as attributes of
    the same names (``attack.eps``, ``attack.iters``, ...) and the whole set as ``attack.options``.
    """

    default_criterion = "topk"
    second_order = True  # the direction needs d(saliency)/dx

    def __init__(
        self,
        model: nn.Module,
        method: str | Callable[..., torch.Tensor] = "gradient",
        *,
        options: AttackOptions | None = None,
        **overrides: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        # a method is a name (flipfrag.saliency) or a saliency object with the call shape of the saliency functions
        # (e.g. a flipfrag.defenses defense): the attack then differentiates through that object (adaptive attack)
        self._method_fn: Callable[..., torch.Tensor] | None = None
        if isinstance(method, str):
            self.method = canonical_method(method)
        elif callable(method):
            self._method_fn = method
            self.method = str(getattr(method, "name", type(method).__name__))
        else:
            raise TypeError(f"method must be a method name or a saliency callable, got {type(method).__name__}")
        opts = AttackOptions.resolve(options, overrides)
        self.options = opts
        self.eps, self.step, self.iters, self.k = opts.eps, opts.step, opts.iters, opts.k
        self.lower, self.upper = opts.lower, opts.upper
        self.surrogate, self.beta = opts.surrogate, opts.beta
        self.method_kwargs = dict(opts.method_kwargs or {})
        if "create_graph" in self.method_kwargs:
            raise ValueError("method_kwargs: create_graph is set by the attack, do not pass it")
        if self._method_fn is not None and self.method_kwargs:
            raise ValueError("method_kwargs: a saliency object carries its own options; pass them to it instead")
        fn = self._method_fn if self._method_fn is not None else saliency_fn(self.method)
        allowed = set(inspect.signature(fn).parameters) - {"model", "x", "target", "create_graph"}
        unknown = set(self.method_kwargs) - allowed
        if unknown:
            raise TypeError(f"method_kwargs: {sorted(unknown)} are not options of {self.method!r} ({sorted(allowed)})")
        if "steps" in self.method_kwargs:
            check_int(self.method_kwargs["steps"], "steps", 1)
        if self.method == "dtd":  # DTD's box rule uses the attack's pixel range unless told otherwise
            self.method_kwargs.setdefault("lower", opts.lower)
            self.method_kwargs.setdefault("upper", opts.upper)
        criterion = self.default_criterion if opts.criterion is None else opts.criterion
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
        self.criterion = criterion
        self.record_metrics, self.floor_center = opts.record_metrics, opts.floor_center
        self.misclassified, self.progress = opts.misclassified, opts.progress

    # ----------------------------------------------------------------------------------- to override
    def objective(self, map0: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: int) -> Objective:
        """The objective to maximise, built once from the ORIGINAL model's map ``map0`` (N, H, W) of ``x``."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- checks
    def _check_inputs(self, x: torch.Tensor, y: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch of images (N, C, H, W), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf")
        x = x.detach()
        why = "images must be in the model's pixel range (lower, upper; e.g. [0, 1]), normalisation inside the model"
        lo_b, hi_b = box_bounds(x, self.lower, self.upper, why)
        self._lo, self._hi = lo_b, hi_b
        if y is None:
            return x, None
        y = torch.as_tensor(y, device=x.device)
        if y.is_floating_point() or y.dtype == torch.bool or y.shape != (x.shape[0],):
            raise ValueError(f"y must be integer labels of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
        return x, y.long()

    def _k_for(self, n_pixels: int) -> int:
        k = default_k(n_pixels) if self.k is None else self.k
        if not 1 <= k <= n_pixels:
            raise ValueError(f"k must be in [1, {n_pixels}] (pixels per saliency map), got {k}")
        return k

    def _direction_model(self, x: torch.Tensor) -> nn.Module:
        """The network whose map is differentiated for the step direction (see the class notes)."""
        if isinstance(self.surrogate, nn.Module):
            check_model(self.surrogate)
            return self.surrogate
        relu = has_relu(self.model, x[:1])
        if self.surrogate == "softplus" and relu and not self._on_model:
            return softplus_surrogate(self.model, self.beta)
        if self.surrogate is None and relu and not self._on_model:
            raise ValueError(
                f"surrogate=None: the model contains ReLUs, whose second derivative is zero almost everywhere, so "
                f"the {self.method!r} map cannot be attacked by gradients on the model itself; use "
                "surrogate='softplus' (default) or pass a smooth nn.Module"
            )
        return self.model

    # --------------------------------------------------------------------------------------- pieces
    @property
    def _on_model(self) -> bool:
        """Whether the step direction differentiates the map on the model itself (no softplus surrogate)."""
        if self._method_fn is not None:
            return bool(getattr(self._method_fn, "on_model", False))
        return self.method in _ON_MODEL

    def _attr(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool):
        if self._method_fn is not None:
            return self._method_fn(model, x, y, create_graph=create_graph), None
        return attribute_with_logits(model, x, y, self.method, create_graph=create_graph, **self.method_kwargs)

    def _evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map (N, H, W) and scores (N, classes) of x on the original model (no graph)."""
        attr, logits = self._attr(self.model, x, y, create_graph=False)
        if logits is None:
            with torch.no_grad():
                logits = self.model(x)
        return saliency_map(attr).detach(), logits

    def _direction(self, dmodel: nn.Module, obj: Objective, x: torch.Tensor, y: torch.Tensor):
        """Ascent direction ∇_x obj(map(x)) on ``dmodel``; also the map/scores when dmodel is the model itself."""
        ibs = self.method_kwargs.get("internal_batch_size")
        steps = self.method_kwargs.get("steps", 100)
        if self.method == "integrated_gradients" and ibs is not None and x.shape[0] * steps > ibs:
            # Memory-bounded path: dJ/dattr at the current attribution, then the vector-Jacobian product
            # d<dJ/dattr, IG(x)>/dx accumulated chunk by chunk (each chunk's double-backward graph freed at once).
            attr, _ = self._attr(dmodel, x, y, create_graph=False)
            with torch.enable_grad():
                a = attr.detach().requires_grad_(True)
                value = obj(saliency_map(a))
                (w,) = torch.autograd.grad(value.sum(), a)
            g = integrated_gradients_vjp(dmodel, x, y, w, **self.method_kwargs)
            return g, value.detach(), None, None
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            attr, logits = self._attr(dmodel, xg, y, create_graph=True)
            maps = saliency_map(attr)
            value = obj(maps)
            (g,) = torch.autograd.grad(value.sum(), xg, allow_unused=True)
        if g is None:
            g = torch.zeros_like(x)
        shared = dmodel is self.model
        return g, value.detach(), (maps.detach() if shared else None), (logits if shared else None)

    def _project(self, x_new: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        x_new = torch.minimum(torch.maximum(x_new, x0 - self.eps), x0 + self.eps)
        return torch.minimum(torch.maximum(x_new, self._lo), self._hi)

    def _scores(self, ref: ReferenceMaps, maps, region, names=None) -> dict[str, torch.Tensor]:
        """Criterion and (optionally) all metrics between the original maps ``ref`` and ``maps``."""
        out: dict[str, torch.Tensor] = {}
        if names is None:
            names = set(_METRICS) if self.record_metrics else set()
            names.add(self.criterion)
        if "topk" in names:
            out["topk"] = ref.topk_intersection(maps)
        if "spearman" in names:
            out["spearman"] = ref.spearman(maps)
        if "center" in names:
            out["center"] = ref.center_shift(maps)
        if "target" in names:
            if region is None:
                raise ValueError("criterion='target' needs a target region (use TargetedAttack)")
            out["target"] = mass_in_region(maps, region)
        return out

    def _region(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor | None:
        return None

    # ------------------------------------------------------------------------------------------ loop
    def __call__(self, x: torch.Tensor, y: Any = None, **kwargs: Any) -> AttackResult:
        """Attack the batch ``x`` (N, C, H, W) with labels ``y`` (N,) (None = the model's predictions).

        ``x`` is not modified. Returns an :class:`AttackResult`.
        """
        check_model(self.model)
        x0, y = self._check_inputs(x, y)
        self._k = self._k_for(x0.shape[-2] * x0.shape[-1])
        region = self._region(x0, **kwargs)
        if self.criterion == "target" and region is None:
            raise ValueError("criterion='target' needs a target region: use TargetedAttack")
        return self._run(x0, y, region)

    def _start(self, x0: torch.Tensor, y: torch.Tensor | None):
        map0, logits0 = self._evaluate(x0, y if y is not None else self._predict(x0))
        pred = logits0.argmax(1)
        if y is None:
            y = pred
        wrong = pred != y
        if wrong.any() and self.misclassified == "raise":
            raise ValueError(
                f"y: images {wrong.nonzero().flatten().tolist()} are not classified as y by the model; only correctly "
                "classified images are attacked (pass misclassified='skip' to return them unchanged)"
            )
        # with misclassified="skip", map0 explains the given label y (not the prediction); those images stay as x
        return map0, y, ~wrong

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x).argmax(1)

    def _run(self, x0: torch.Tensor, y: torch.Tensor | None, region: torch.Tensor | None) -> AttackResult:
        map0, y, attacked = self._start(x0, y)
        n = x0.shape[0]
        obj = self.objective(map0, x0, y, self._k)
        dmodel = self._direction_model(x0)
        if self.second_order and not self._on_model:
            found = _piecewise_linear_calls(self.model, x0[:1])
            if found:
                warnings.warn(
                    f"model uses {sorted(found)}: piecewise-linear operations that the softplus surrogate does not "
                    "smooth; they contribute no curvature to the attack direction",
                    stacklevel=3,
                )
        better_low = CRITERIA[self.criterion]
        ref = ReferenceMaps(map0, self._k, floor_center=self.floor_center)
        scores0 = self._scores(ref, map0, region)
        keep_metrics = [m for m in _METRICS if self.record_metrics]
        hist_crit = [scores0[self.criterion]]
        hist_kept = [attacked.clone()]
        hist_obj: list[torch.Tensor] = []
        hist_metrics = {m: [scores0[m]] for m in keep_metrics}
        best_x, best_crit = x0.clone(), scores0[self.criterion].clone()
        best_iter = torch.zeros(n, dtype=torch.long, device=x0.device)
        best_by = {m: (x0.clone(), scores0[m].clone()) for m in keep_metrics}

        x = x0
        g, value, maps, logits = self._step_direction(dmodel, obj, x, y, 0)
        bar = tqdm(range(1, self.iters + 1), desc=type(self).__name__, disable=not self.progress, leave=False)
        for p in bar:
            hist_obj.append(value)
            x = self._project(x + self.step * g.sign(), x0)
            if p < self.iters:
                g, value, maps, logits = self._step_direction(dmodel, obj, x, y, p)
            else:
                maps = logits = None
            if maps is None:
                maps, logits = self._evaluate(x, y)
            elif logits is None:
                logits = self._logits(x)
            kept = (logits.argmax(1) == y) & attacked
            scores = self._scores(ref, maps, region)
            crit = scores[self.criterion]
            improve = kept & ((crit < best_crit) if better_low else (crit > best_crit))
            best_x = torch.where(improve.view(-1, 1, 1, 1), x, best_x)
            best_crit = torch.where(improve, crit, best_crit)
            best_iter = torch.where(improve, torch.full_like(best_iter, p), best_iter)
            for m in keep_metrics:
                bx, bv = best_by[m]
                imp = kept & ((scores[m] < bv) if CRITERIA[m] else (scores[m] > bv))
                best_by[m] = (torch.where(imp.view(-1, 1, 1, 1), x, bx), torch.where(imp, scores[m], bv))
                hist_metrics[m].append(scores[m])
            hist_crit.append(crit)
            hist_kept.append(kept)
            if self.progress:
                bar.set_postfix({self.criterion: f"{float(best_crit.mean()):.3f}"})
        history = {
            "criterion": torch.stack(hist_crit),
            "label_kept": torch.stack(hist_kept),
            "objective": torch.stack(hist_obj),
            **{m: torch.stack(v) for m, v in hist_metrics.items()},
        }
        return self._finish(x0, y, ref, best_x, best_iter, attacked, region, history, best_by)

    def _step_direction(self, dmodel, obj, x, y, p):
        return self._direction(dmodel, obj, x, y)

    def _finish(self, x0, y, ref, best_x, best_iter, attacked, region, history, best_by) -> AttackResult:
        map_adv, logits = self._evaluate(best_x, y)
        names = {*_METRICS, self.criterion} | ({"target"} if region is not None else set())
        final = self._scores(ref, map_adv, region, names)
        metrics = {m: final[m] for m in (*_METRICS, "target") if m in final}
        return AttackResult(
            x_adv=best_x,
            label_kept=logits.argmax(1) == y,
            success=best_iter > 0,
            attacked=attacked,
            best_iter=best_iter,
            criterion=final[self.criterion],
            metrics=metrics,
            history=history,
            saliency=ref.maps,
            saliency_adv=map_adv,
            x_best_by={m: bx for m, (bx, _) in best_by.items()},
            config=self._config(),
        )

    def _config(self) -> dict[str, Any]:
        return {
            "attack": type(self).__name__,
            "method": self.method if self._method_fn is None else repr(self._method_fn),
            "eps": self.eps,
            "step": self.step,
            "iters": self.iters,
            "k": self._k,
            "criterion": self.criterion,
            "beta": self.beta,
            "surrogate": self.surrogate
            if isinstance(self.surrogate, (str, type(None)))
            else type(self.surrogate).__name__,
            "floor_center": self.floor_center,
            "method_kwargs": {
                k: (v if not isinstance(v, torch.Tensor) else "tensor") for k, v in self.method_kwargs.items()
            },
        }


# ------------------------------------------------------------------------------------------------ attacks


class TopKAttack(InterpretationAttack):
    """Top-k attack: push the saliency mass off the original map's ``k`` most salient pixels.

    Objective: maximise ``-sum_{i in B} I(x)_i`` with ``B`` the top-k set of the original (ReLU-net) map; selection by
    the lowest top-k intersection. Arguments as :class:`InterpretationAttack`.

    Examples
    --------
    >>> attack = TopKAttack(model, method="gradient", k=1000, eps=8/255, iters=300)  # doctest: +SKIP
    >>> out = attack(x, y); out.metrics["topk"].mean()                              # doctest: +SKIP
    """

    default_criterion = "topk"

    def objective(self, map0, x, y, k):
        return topk_objective(map0.flatten(1).topk(k, dim=1).indices)


class MassCenterAttack(InterpretationAttack):
    """Center-of-mass attack: move the map's center of mass away from the original center.

    Objective: maximise ``‖C(I(x)) − C(I(x_t))‖²`` with float centers (``floor_center=True`` floors ``C(I(x_t))`` as
    the authors' code), plus a negligible tie-break term (see :func:`mass_center_objective`) so that the first step
    is defined when the direction model is the model itself; selection by the largest center shift in pixels.
    Arguments as :class:`InterpretationAttack`.
    """

    default_criterion = "center"

    def objective(self, map0, x, y, k):
        c0 = mass_centers(map0)
        if self.floor_center:
            c0 = c0.floor()  # the authors' code floors the original center in the objective too
        # Tie-break direction: from c0 toward the middle of the image, the side with the most room to move.
        h, w = map0.shape[-2:]
        middle = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=c0.dtype, device=c0.device)
        u = middle - c0
        norm = u.norm(dim=-1, keepdim=True)
        u = torch.where(norm > 1e-6, u / norm.clamp_min(1e-12), torch.tensor([1.0, 0.0], dtype=c0.dtype))
        return mass_center_objective(c0, direction=u)


class TargetedAttack(InterpretationAttack):
    """Targeted attack: raise the saliency mass inside a target region (e.g. move it onto a cloud or a face).

    Parameters
    ----------
    model, method, ...
        As :class:`InterpretationAttack`.
    mask : Tensor (H, W) or (N, H, W), optional
        Target region (bool, 0/1, or non-negative weights). May instead be given per call: ``attack(x, y, mask=m)``.

    Selection by the largest fraction of the map's mass inside the region (criterion "target").
    """

    default_criterion = "target"

    def __init__(self, model: nn.Module, method: str = "gradient", *, mask: torch.Tensor | None = None, **kwargs: Any):
        super().__init__(model, method, **kwargs)
        self.mask = mask

    def _region(self, x: torch.Tensor, mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if kwargs:
            raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
        mask = self.mask if mask is None else mask
        if mask is None:
            raise ValueError("mask: TargetedAttack needs a target region (constructor or call argument)")
        mask = torch.as_tensor(mask, device=x.device)
        hw = tuple(x.shape[-2:])
        if tuple(mask.shape) not in (hw, (x.shape[0], *hw)):
            raise ValueError(f"mask must have shape {hw} or {(x.shape[0], *hw)}, got {tuple(mask.shape)}")
        mask = mask.to(x.dtype)
        if (mask < 0).any() or not (mask.flatten(-2).sum(-1) > 0).all():
            raise ValueError("mask must be non-negative with a non-empty region for every image")
        return mask

    def objective(self, map0, x, y, k):
        return targeted_objective(self._current_region)

    def _run(self, x0, y, region):
        self._current_region = region
        return super()._run(x0, y, region)


class RandomSignAttack(InterpretationAttack):
    """Random sign perturbation, the paper's baseline: ``x + eps * sign(N(0, 1))``, clipped to the pixel range.

    One shot (``walk=False``, default; the paper): each image gets one random ±eps pattern; where the label changes
    a new pattern is drawn, up to ``tries`` times; an image with no label-preserving draw is returned unchanged
    (``success = False``). History rows: [original, returned] (no ``objective`` entry).

    ``walk=True`` (the authors' code): ``iters`` random sign steps of size ``step`` projected onto the ε-ball, with
    best-iterate selection by ``criterion`` (default "topk") — slightly adversarial by construction.

    Parameters
    ----------
    model, method, eps, step, iters, k, lower, upper, method_kwargs, criterion, record_metrics, floor_center,
    misclassified, progress
        As :class:`InterpretationAttack` (``method`` is the saliency method evaluated, not attacked).
    walk : bool
        Random walk instead of one shot.
    tries : int
        One-shot draws per image before giving up (default 10).
    seed : int
        Seed of the private ``torch.Generator`` (no global RNG state is touched).
    """

    default_criterion = "topk"
    second_order = False

    def __init__(
        self,
        model: nn.Module,
        method: str = "gradient",
        *,
        walk: bool = False,
        tries: int = 10,
        seed: int = 0,
        **kwargs: Any,
    ):
        kwargs.setdefault("surrogate", None)
        super().__init__(model, method, **kwargs)
        self.walk = bool(walk)
        self.tries = check_int(tries, "tries", 1)
        self.seed = int(seed)

    def objective(self, map0, x, y, k):
        return Objective(lambda m: torch.zeros(m.shape[0], dtype=m.dtype, device=m.device), "none")

    def _direction_model(self, x):
        return self.model

    def _noise(self, shape, like: torch.Tensor) -> torch.Tensor:
        z = torch.randn(shape, generator=self._gen, dtype=torch.float64)
        return z.sign().to(device=like.device, dtype=like.dtype)

    def _step_direction(self, dmodel, obj, x, y, p):
        zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return self._noise(x.shape, x), zeros, None, None

    def _run(self, x0, y, region):
        self._gen = torch.Generator().manual_seed(self.seed)
        if self.walk:
            return super()._run(x0, y, region)
        map0, y, attacked = self._start(x0, y)
        n = x0.shape[0]
        x_out = x0.clone()
        accepted = torch.zeros(n, dtype=torch.bool, device=x0.device)
        for _ in range(self.tries):
            todo = attacked & ~accepted
            if not todo.any():
                break
            cand = self._project(x0 + self.eps * self._noise(x0.shape, x0), x0)
            kept = (self._predict(cand) == y) & todo
            x_out = torch.where(kept.view(-1, 1, 1, 1), cand, x_out)
            accepted |= kept
        ref = ReferenceMaps(map0, self._k, floor_center=self.floor_center)
        scores0 = self._scores(ref, map0, region)
        maps, _ = self._evaluate(x_out, y)
        scores = self._scores(ref, maps, region)
        history = {
            "criterion": torch.stack([scores0[self.criterion], scores[self.criterion]]),
            "label_kept": torch.stack([attacked, accepted]),
            **{m: torch.stack([scores0[m], scores[m]]) for m in _METRICS if self.record_metrics},
        }
        best_iter = accepted.long()
        best_by = {m: (x_out, None) for m in _METRICS if self.record_metrics}
        return self._finish(x0, y, ref, x_out, best_iter, attacked, region, history, best_by)
