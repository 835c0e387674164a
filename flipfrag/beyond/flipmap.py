"""Study 2: is paper 1's explanation — the direction to the closest flip point — fragile too?

The **flip-explanation map** of an image ``x`` with closest flip point ``x_flip`` is ``|x_flip - x|`` summed over
channels and normalised to sum 1 (:func:`flip_explanation_map`: the papers' saliency post-processing,
:func:`flipfrag.saliency.saliency_map`, applied to ``x_flip - x``). It is attacked with paper 2's attacks, in paper 2's
loop (:class:`flipfrag.attacks.InterpretationAttack`; same ε-ball, step, label-kept rule, best-iterate selection
and metrics):

* :class:`FlipRandomSignAttack` — the one-shot random sign perturbation (same seed, hence the same perturbation, as
  the saliency methods' random rows);
* :class:`FlipTopKAttack`, :class:`FlipCenterAttack` — the top-k and center-of-mass attacks, whose step direction
  differentiates the map *through the flip solver*: ``closest_flip_point(..., differentiable=True)`` (implicit
  function theorem at the certified KKT point). Where that API is missing (:func:`differentiable_available`) they
  raise :class:`NotImplementedError` and the study reports the rows as not available;
* transfer (:func:`transfer_attack`) — the perturbations found by the top-k / center attacks against the
  simple-gradient map, applied unchanged to the flip explanation.

**ReLU networks: the surrogate direction.** The closest flip point of a ReLU network usually lies on a kink of its
decision boundary, where ``x_flip`` has no derivative (:mod:`flipfrag.flip.gradient`). As paper 2 does for saliency
maps, the top-k / center attacks then take their step *direction* from a smooth surrogate (``surrogate=``, e.g.
:func:`flip_surrogate`: the same weights with ReLU -> softplus(beta) and max-pooling -> log-sum-exp pooling(beta),
:func:`flipfrag.smooth.softplus_surrogate` ``maxpool=True``): the direction differentiates the *surrogate's* flip
map through ``closest_flip_point(surrogate, x, differentiable=True)`` (``surrogate_solver``: extra solver
arguments for that solve, e.g. the ReLU flip point's ``target``). Everything reported — the map at every iterate,
the label-kept rule, the best-iterate selection, the metrics, the target class — is the ReLU model's, with its own
certified flip point. :func:`flip_fragility_rows` labels these rows ``surrogate-topk`` / ``surrogate-center``
(``surrogate_beta=``; default sharpness :data:`SURROGATE_BETA`).

Only images whose closest flip point is certified are attacked; an iterate whose flip point is not certified has
no map (NaN), so it is never selected; a returned image without a certified flip point is excluded and counted. For
every returned image the study also records whether the closest flip point still flips to the same *target* class.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..attacks import MassCenterAttack, RandomSignAttack, TopKAttack
from ..flip import FlipResult, closest_flip_point
from ..fragility.grid import grid_for, grid_spec
from ..fragility.paper import METHODS
from ..fragility.settings import ImageSetting
from ..metrics import ReferenceMaps
from ..saliency import saliency_map
from ..smooth import softplus_surrogate
from .boundary import boundary_flips
from .cases import flip_arguments, grid_overrides, sg_attack

__all__ = [
    "FLIP_METHOD",
    "FlipStudy",
    "SURROGATE_BETA",
    "differentiable_available",
    "flip_surrogate",
    "flip_explanation_map",
    "flip_explanation",
    "FlipRandomSignAttack",
    "FlipTopKAttack",
    "FlipCenterAttack",
    "transfer_attack",
    "flip_fragility_rows",
    "summarize_flip_fragility",
]

#: The method name of the flip explanation in tables.
FLIP_METHOD = "flip"
_NAN = float("nan")

#: Default sharpness of :func:`flip_surrogate` (softplus and log-sum-exp pooling). Measured on the first CIFAR-10
#: photos (quick profile, the flip point toward the ReLU flip point's target): beta = 3 / 10 / 30 give surrogate
#: flip maps with top-k ∩ 0.75 / 0.81 / (not certified) and Spearman ρ 0.91 / 0.95 / - against the ReLU model's map
#: on photo 0 (0.64 / 0.79 / 0.84 on photo 1); beta = 10 is the sharpest whose flip points certify with a derivative
#: on both ("ok"), in ~0.8 s per photo (vs ~4 s for the ReLU model's own solve).
SURROGATE_BETA = 10.0


def flip_surrogate(model: nn.Module, beta: float = SURROGATE_BETA) -> nn.Module:
    """The smooth surrogate whose flip map gives a ReLU network's flip-map attack direction: the same weights
    (shared) with ReLU -> softplus(beta) and max-pooling -> log-sum-exp pooling(beta)
    (:func:`flipfrag.smooth.softplus_surrogate` ``maxpool=True``), so that its flip points have a derivative."""
    return softplus_surrogate(model, float(beta), maxpool=True)


def differentiable_available() -> bool:
    """Whether :func:`flipfrag.flip.closest_flip_point` takes ``differentiable=True`` (x_flip carrying gradients): a
    keyword of the call or, since the solver's settings live in :class:`~flipfrag.flip.FlipOptions`, a field of its
    options."""
    from ..flip import FlipOptions

    return "differentiable" in inspect.signature(closest_flip_point).parameters or "differentiable" in {
        f.name for f in fields(FlipOptions)}


def flip_explanation_map(x: torch.Tensor, x_flip: torch.Tensor) -> torch.Tensor:
    """(N, H, W) map ``|x_flip - x|`` summed over channels, normalised to sum 1 per image
    (:func:`flipfrag.saliency.saliency_map`); all-NaN for an image whose ``x_flip`` has a NaN (no certified flip
    point). ``x``, ``x_flip``: (N, C, H, W). Differentiable in both."""
    if not isinstance(x, torch.Tensor) or not isinstance(x_flip, torch.Tensor):
        raise TypeError("x and x_flip must be torch.Tensors")
    if x.dim() != 4 or x_flip.shape != x.shape:
        raise ValueError(f"x and x_flip must be (N, C, H, W) of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(x_flip.shape)}")  # fmt: skip
    bad = torch.isnan(x_flip).flatten(1).any(1)
    diff = torch.where(bad.view(-1, 1, 1, 1), torch.zeros_like(x), x_flip.to(x.dtype) - x)
    m = saliency_map(diff)
    return torch.where(bad.view(-1, 1, 1), torch.full_like(m, _NAN), m)


def flip_explanation(model: nn.Module, x: torch.Tensor, solver: dict[str, Any]) -> tuple[torch.Tensor, FlipResult]:
    """The flip-explanation maps (N, H, W) of ``x`` (NaN rows where not certified) and the solver's result."""
    res = closest_flip_point(model, x, **solver)
    return flip_explanation_map(x, res.x_flip.to(x.dtype)), res


class _FlipMap:
    """Mixin: the attacked "saliency method" is the flip explanation (see the module docstring).

    ``solver``: keyword arguments of :func:`flipfrag.flip.closest_flip_point`; ``weak``: see
    :func:`flipfrag.flip.attach_gradients`; ``surrogate``: ``None`` (the direction differentiates the model's own
    flip map) or a smooth ``nn.Module`` with the model's classes whose flip map gives the direction (e.g.
    :func:`flip_surrogate`); ``surrogate_solver``: solver arguments that differ for the surrogate's solve (e.g.
    ``target``, one per image of the attacked batch). The model's flip points at the images evaluated are kept
    per image for the attack's lifetime (:meth:`remember` adds known ones), so the returned image — always one of
    the iterates or ``x`` — is not solved twice."""

    def __init__(self, model: nn.Module, *, solver: dict[str, Any] | None = None, weak: str = "nan",
                 surrogate: nn.Module | None = None, surrogate_solver: dict[str, Any] | None = None,
                 **kwargs: Any):  # fmt: skip
        if "method" in kwargs or "method_kwargs" in kwargs:
            raise TypeError("the flip-explanation attacks take no method / method_kwargs (the map is the flip map)")
        super().__init__(model, "gradient", **kwargs)  # validates the shared budget; the method is replaced below
        self.method = FLIP_METHOD
        self.solver = dict(solver or {})
        if "differentiable" in self.solver:
            raise ValueError("solver: differentiable is set by the attack, do not pass it")
        if weak not in ("nan", "active"):
            raise ValueError(f"weak must be 'nan' or 'active', got {weak!r}")
        if surrogate is not None and not isinstance(surrogate, nn.Module):
            raise TypeError(f"surrogate must be None or an nn.Module, got {type(surrogate).__name__}")
        if surrogate_solver is not None and surrogate is None:
            raise ValueError("surrogate_solver is given but surrogate is None")
        self.surrogate = surrogate  # (the base class's "softplus" default does not apply: see _direction_model)
        self.surrogate_solver = dict(surrogate_solver or {})
        if "differentiable" in self.surrogate_solver:
            raise ValueError("surrogate_solver: differentiable is set by the attack, do not pass it")
        self.weak = weak
        self.last_flip: FlipResult | None = None
        self._memo: dict[bytes, FlipResult] = {}
        #: (N,) bool after a call: whether x_flip had a derivative at some iterate where a direction was computed
        self.derivative_seen: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, y: Any = None, **kwargs: Any):
        self.derivative_seen = None
        return super().__call__(x, y, **kwargs)

    def remember(self, x: torch.Tensor, res: FlipResult) -> None:
        """Use ``res`` (a :func:`closest_flip_point` result of the model at ``x`` with this attack's ``solver``) for
        those images instead of re-solving them."""
        if len(res) != x.shape[0]:
            raise ValueError(f"res has {len(res)} points, x has {x.shape[0]} images")
        for i in range(x.shape[0]):
            self._memo[_image_key(x[i])] = _take(res, i)

    def _direction_model(self, x: torch.Tensor) -> nn.Module:
        # the flip solver works on the network itself (smooth, or ReLU: then mostly no derivative) or on a surrogate
        return self.model if self.surrogate is None else self.surrogate

    def _model_flip(self, x: torch.Tensor) -> FlipResult:
        """The model's flip points at x (no graph), solved only for the images not seen before."""
        keys = [_image_key(xi) for xi in x]
        todo = [keys.index(key) for key in dict.fromkeys(k for k in keys if k not in self._memo)]
        if todo:
            res = closest_flip_point(self.model, x[todo], **self.solver)
            for j, i in enumerate(todo):
                self._memo[keys[i]] = _take(res, j)
        return _concat([self._memo[key] for key in keys])

    def _attr(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, create_graph: bool):
        kw = dict(self.solver)
        if model is not self.model:
            kw.update(self.surrogate_solver)
        if create_graph:
            if not differentiable_available():
                raise NotImplementedError("closest_flip_point(..., differentiable=True) is not available in this "
                                          "flipfrag: the differentiated flip-map attacks cannot run")  # fmt: skip
            res = _flip_with_derivative(model, x, kw, self.weak)
        elif model is self.model:
            res = self._model_flip(x)
        else:
            res = closest_flip_point(model, x, **kw)
        self.last_flip = res
        ok = res.converged.to(x.device).view(-1, 1, 1, 1)
        # the direction path fills uncertified rows with 0 (no step; their maps are set to NaN in _direction)
        fill = 0.0 if create_graph else _NAN
        return torch.where(ok, res.x_flip.to(x.dtype) - x, torch.full_like(x, fill)), None

    def _direction(self, dmodel, obj, x, y):
        g, value, maps, logits = super()._direction(dmodel, obj, x, y)
        ok = self.last_flip.converged.to(x.device)
        status = self.last_flip.grad_status
        has_derivative = ok & _derivative_ok(status, len(ok), x.device)
        seen = self.derivative_seen
        self.derivative_seen = has_derivative if seen is None else seen | has_derivative
        # no derivative (degenerate active set: NaN gradient): no step for that image
        g = torch.nan_to_num(torch.where(has_derivative.view(-1, 1, 1, 1), g, torch.zeros_like(g)), nan=0.0)
        if maps is not None:
            maps = torch.where(ok.view(-1, 1, 1), maps, torch.full_like(maps, _NAN))
        return g, value, maps, logits

    def _scores(self, ref: ReferenceMaps, maps: torch.Tensor, region, names=None) -> dict[str, torch.Tensor]:
        # no certified flip point (NaN map): every metric NaN, so that the iterate is never selected (the plain
        # metrics would rank a NaN map as totally changed: top-k ∩ 0) and the returned image is never such a one
        out = super()._scores(ref, torch.nan_to_num(maps, nan=0.0), region, names)
        bad = torch.isnan(maps).flatten(1).any(1)
        return {k: torch.where(bad, torch.full_like(v, _NAN), v) for k, v in out.items()}


def _image_key(x: torch.Tensor) -> bytes:
    xd = x.detach().cpu().contiguous()
    return str((xd.dtype, tuple(xd.shape))).encode() + xd.numpy().tobytes()


def _take(res: FlipResult, i: int) -> FlipResult:
    """Point ``i`` of a result as a one-point result (per-point tensors and lists sliced, settings kept)."""
    n = len(res)
    out = {}
    for f in fields(res):
        v = getattr(res, f.name)
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
            v = v[i : i + 1]
        elif isinstance(v, list) and len(v) == n:
            v = v[i : i + 1]
        out[f.name] = v
    return replace(res, **out)


def _concat(parts: list[FlipResult]) -> FlipResult:
    """One-point results (of the same solver settings) back into one result, in order."""
    out = {}
    for f in fields(parts[0]):
        v = getattr(parts[0], f.name)
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            v = torch.cat([getattr(p, f.name) for p in parts])
        elif isinstance(v, list):
            v = [e for p in parts for e in getattr(p, f.name)]
        out[f.name] = v
    return replace(parts[0], **out)


def _derivative_ok(status: list[str] | None, n: int, device) -> torch.Tensor:
    """(n,) bool: ``grad_status`` says x_flip has a derivative (``"ok"`` or ``"ok (one-sided: ...)"``)."""
    return torch.tensor([st.startswith("ok") for st in status] if status is not None else [False] * n,
                        dtype=torch.bool, device=device)  # fmt: skip


def _flip_with_derivative(model: nn.Module, x: torch.Tensor, solver: dict[str, Any], weak: str) -> FlipResult:
    """``closest_flip_point(..., differentiable=True)``; ``weak="active"``: weakly active bounds / inequalities kept
    active (:func:`flipfrag.flip.attach_gradients`, the one-sided derivative of that branch)."""
    if weak == "nan":
        return closest_flip_point(model, x, differentiable=True, **solver)
    from ..flip import attach_gradients

    res = closest_flip_point(model, x.detach(), **solver)
    return attach_gradients(res, model, x, lower=solver.get("lower"), upper=solver.get("upper"), weak=weak)


class FlipRandomSignAttack(_FlipMap, RandomSignAttack):
    """Random sign perturbation of the flip explanation (:class:`flipfrag.attacks.RandomSignAttack`'s one shot;
    ``solver``: keyword arguments of :func:`flipfrag.flip.closest_flip_point`)."""


class FlipTopKAttack(_FlipMap, TopKAttack):
    """Top-k attack on the flip explanation, differentiated through the flip solver (implicit function theorem)."""


class FlipCenterAttack(_FlipMap, MassCenterAttack):
    """Center-of-mass attack on the flip explanation, differentiated through the flip solver."""


def transfer_attack(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, map0: torch.Tensor,
                    target0: torch.Tensor, *, k: int, solver: dict[str, Any],
                    floor_center: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """The flip explanation at perturbed images ``x_adv`` (e.g. the simple-gradient attack's ``out.x_adv``, used
    unchanged) against ``map0``, the flip explanation at the original images (whose flip points flip to
    ``target0``).

    Returns a dict of (N,) tensors: ``topk``, ``spearman``, ``center`` (NaN where the flip point at ``x_adv`` or the
    original one is not certified), ``label_kept``, ``certified`` (flip point at ``x_adv``), ``target_kept`` (same
    target class, certified), ``x_adv`` (the images evaluated) and ``maps`` (N, H, W: their flip maps)."""
    maps, res = flip_explanation(model, x_adv, solver)
    with torch.no_grad():
        label_kept = model(x_adv).argmax(1) == y
    return {**_compare(map0, maps, k, floor_center), "label_kept": label_kept, "certified": res.converged,
            "target_kept": res.converged & (res.target == target0), "x_adv": x_adv, "maps": maps}  # fmt: skip


def _compare(map0: torch.Tensor, maps: torch.Tensor, k: int, floor_center: bool) -> dict[str, torch.Tensor]:
    """top-k ∩, Spearman ρ and center shift of ``maps`` against ``map0``; NaN where either map is NaN."""
    ok = ~(torch.isnan(map0).flatten(1).any(1) | torch.isnan(maps).flatten(1).any(1))
    ref = ReferenceMaps(torch.nan_to_num(map0, nan=0.0), k, floor_center=floor_center)
    safe = torch.nan_to_num(maps, nan=0.0)
    nan = torch.full(ok.shape, _NAN, dtype=map0.dtype, device=map0.device)
    return {
        m: torch.where(ok, f(safe), nan)
        for m, f in (("topk", ref.topk_intersection), ("spearman", ref.spearman), ("center", ref.center_shift))
    }


_ROW_METRICS = ("topk", "spearman", "center")


def _rows(model_name: str, method: str, attack: str, eps: float, values: dict[str, Any], n: int,
          available: bool | torch.Tensor = True) -> list[dict[str, Any]]:  # fmt: skip
    def get(name: str, i: int):
        v = values.get(name)
        if v is None:
            return None
        return v[i].item() if isinstance(v, torch.Tensor) else v[i]

    avail = [bool(available[i]) if isinstance(available, torch.Tensor) else bool(available) for i in range(n)]
    return [{"model": model_name, "method": method, "attack": attack, "eps": float(eps),
             "eps255": round(float(eps) * 255, 6), "image": i,
             **{m: (float(get(m, i)) if avail[i] else _NAN) for m in _ROW_METRICS},
             "label_kept": get("label_kept", i) if avail[i] else None, "flip_certified": get("certified", i),
             "target_kept": get("target_kept", i) if avail[i] else None, "available": avail[i]}
            for i in range(n)]  # fmt: skip


def _flip_attack_values(atk, x: torch.Tensor, y: torch.Tensor, target0: torch.Tensor):
    out = atk(x, y)
    last = atk.last_flip  # the solve at the returned images (the attack's final evaluation)
    vals: dict[str, Any] = {m: out.metrics[m] for m in _ROW_METRICS}
    vals.update(
        label_kept=out.label_kept,
        certified=last.converged,
        target_kept=last.converged & (last.target.to(target0.device) == target0),
    )
    return vals, out


def _own_attack_values(atk, x, y, target0, res_sel, has_d):
    """The flip map's own top-k / center attack on the images with a derivative (``has_d``), from the reference
    map of their original flip points (``res_sel``, not a re-solve). Returns the metrics (N,) — 0 where not attacked
    —, where a derivative was seen (N,) and the attack's output."""
    n = len(x)
    atk.remember(x[has_d], res_sel)
    part, out = _flip_attack_values(atk, x[has_d], y[has_d], target0[has_d])
    avail = torch.zeros(n, dtype=torch.bool)
    avail[has_d.cpu()] = atk.derivative_seen.cpu()
    vals = {}
    for key, v in part.items():
        full = torch.zeros(n, dtype=v.dtype, device=v.device)
        full[has_d] = v
        vals[key] = full
    return vals, avail, out


#: the columns of study 2's rows
_ROW_COLUMNS = ["model", "method", "attack", "eps", "eps255", "image", *_ROW_METRICS, "label_kept", "flip_certified",
                "target_kept", "available"]  # fmt: skip


@dataclass(frozen=True)
class FlipStudy:
    """What study 2 runs on one network (:func:`flip_fragility_rows`), checked once. ``epsilons`` (default
    ``prof["epsilons"]``), the saliency ``methods``, the flip map's own ``attacks`` and the ``transfer``-red
    simple-gradient attacks, ``n_flip`` (images solved, default all), ``box``, ``differentiated_eps`` (default every
    ε), ``weak``, ``surrogate_beta`` / ``surrogate_solver``, ``flip_iters`` / ``flip_step``, ``n_differentiated``,
    ``n_examples``: see :func:`flip_fragility_rows`."""

    epsilons: tuple[float, ...] | None = None
    methods: tuple[str, ...] = tuple(METHODS)
    attacks: tuple[str, ...] = ("random", "topk", "center")
    transfer: tuple[str, ...] = ("topk", "center")
    n_flip: int | None = None
    box: bool = True
    differentiated_eps: tuple[float, ...] | None = None
    weak: str = "nan"
    surrogate_beta: float | None = None
    surrogate_solver: Mapping[str, Any] | None = None
    flip_iters: int | None = None
    flip_step: float | None = None
    n_differentiated: int | None = None
    n_examples: int = 0

    def __post_init__(self) -> None:
        for name in ("epsilons", "methods", "attacks", "transfer", "differentiated_eps"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(v))
        for a in self.attacks:
            if a not in ("random", "topk", "center"):
                raise ValueError(f"attacks: unknown attack {a!r}")
        for a in self.transfer:
            if a not in ("topk", "center"):
                raise ValueError(f"transfer: unknown attack {a!r}")
        beta = self.surrogate_beta
        if beta is not None and not (isinstance(beta, (int, float)) and beta > 0):
            raise ValueError(f"surrogate_beta must be None or a number > 0, got {beta!r}")
        nd = self.n_differentiated
        if nd is not None and (not isinstance(nd, int) or nd < 0):
            raise ValueError(f"n_differentiated must be None or an integer >= 0, got {nd!r}")
        extra = dict(self.surrogate_solver or {})
        if beta is None and extra:
            raise ValueError("surrogate_solver is given but surrogate_beta is None")
        if "target" in extra or "differentiable" in extra:
            raise ValueError("surrogate_solver: target and differentiable are set by the study, do not pass them")


def flip_fragility_rows(setting: ImageSetting, prof: dict[str, Any], *, seed: int = 0, study: FlipStudy | None = None,
                        progress: bool = False, **overrides: Any) -> tuple[pd.DataFrame, dict[str, Any]]:  # fmt: skip
    """Study 2 on one network (``study``: a :class:`FlipStudy`, its fields also as keywords): per-image rows
    (model, method, attack, eps, eps255, image, topk, spearman, center, label_kept, flip_certified, target_kept,
    available) for the saliency ``methods`` (the cached attack-grid cells of
    :func:`flipfrag.fragility.grid_for`, the fragility notebooks' settings)
    and for the flip explanation (``method="flip"``): its own random / top-k / center attacks
    (``prof["beyond_flip_iters"]`` iterations, at the ``differentiated_eps`` (default: every ε); rows with
    ``available=False`` and NaN metrics where the differentiable solver is missing or x_flip has no derivative at
    the image — degenerate active set, ``info["grad_status"]``) and ``transfer-topk`` / ``transfer-center``: the
    simple-gradient attacks' perturbations. ``box=False``: flip points without the pixel box (a labelled variant,
    model name ``"<name> (no box)"``); ``weak="active"``: the one-sided derivative where bounds are weakly active
    (:func:`flipfrag.flip.attach_gradients`; model name ``"<name> (one-sided derivative)"``).

    ``surrogate_beta`` (for ReLU networks, whose flip points lie on kinks): the own top-k / center attacks take their
    direction from the flip map of :func:`flip_surrogate` ``(model, surrogate_beta)``, solved toward the target class
    of the model's flip point at the original image; rows ``attack="surrogate-topk"`` / ``"surrogate-center"``,
    everything in them measured on the model (module docstring); ``surrogate_solver``: solver arguments that
    differ for the surrogate's solves (e.g. ``max_iter``). ``flip_iters`` / ``flip_step``: iterations and
    step of the own top-k / center attacks (default ``prof["beyond_flip_iters"]`` and the grid's step);
    ``n_differentiated``: only the first that many certified images (with a derivative) are attacked by them (the
    other images' rows are ``available=False``; default all).

    Only the images (of the first ``n_flip``) whose closest flip point is certified are used — for every method, so
    all rows are on the same images. ``epsilons`` default: ``prof["epsilons"]``. Returns ``(rows, info)``, info:
    ``model``, ``n_images``, ``n_certified``, ``differentiable`` (bool), ``n_derivative`` (certified images where
    x_flip — the surrogate's, with ``surrogate_beta`` — has a derivative), ``grad_status``, ``surrogate_beta``,
    ``n_differentiated`` (images the own top-k / center attacks ran on), ``seconds`` per part, ``examples``
    (:func:`_examples`: up to ``n_examples`` images with their maps before / after the attacks at the largest ε,
    for the figure's example panels; images attacked by the own top-k attack first).
    """
    import time

    st = replace(study or FlipStudy(), **overrides)
    eps_grid = tuple(float(e) for e in (prof["epsilons"] if st.epsilons is None else st.epsilons))
    solver = flip_arguments(setting, prof, box=st.box)
    res0 = boundary_flips(setting, prof, n=st.n_flip, box=st.box)
    ok = res0.converged.to(setting.x.device)
    n_solved = len(res0)
    name = setting.model_name + ("" if st.box else " (no box)")
    name += " (one-sided derivative)" if st.weak == "active" else ""
    info: dict[str, Any] = {"model": name, "n_images": n_solved, "n_certified": int(ok.sum()), "box": st.box,
                            "differentiable": differentiable_available(), "surrogate_beta": st.surrogate_beta,
                            "n_differentiated": 0, "examples": [], "seconds": {}}  # fmt: skip
    if not ok.any():
        return pd.DataFrame(columns=_ROW_COLUMNS), info
    sub = replace(setting, x=setting.x[:n_solved][ok], y=setting.y[:n_solved][ok])
    x, y, n = sub.x, sub.y, int(ok.sum())
    map0 = flip_explanation_map(x, res0.x_flip[ok].to(x.dtype))
    target0 = res0.target[ok]
    over = grid_overrides(setting, prof)
    spec = grid_spec(sub, prof, seed=seed, methods=st.methods,
                     attacks=tuple(dict.fromkeys([*st.attacks, *st.transfer])), epsilons=eps_grid, **over)  # fmt: skip
    t = time.perf_counter()
    grid = grid_for(sub, prof, seed=seed, methods=st.methods, attacks=spec.attacks, epsilons=eps_grid,
                    progress=progress, **over)  # fmt: skip
    info["seconds"]["saliency grid"] = time.perf_counter() - t
    grid = grid.assign(model=name, flip_certified=None, target_kept=None, available=True)
    rows: list[dict[str, Any]] = []
    common = dict(solver=solver, k=spec.k, floor_center=spec.floor_center, progress=False)
    diff_eps = eps_grid if st.differentiated_eps is None else tuple(float(e) for e in st.differentiated_eps)
    has_d = torch.zeros(n, dtype=torch.bool, device=x.device)
    dmodel = sub.model if st.surrogate_beta is None else flip_surrogate(sub.model, st.surrogate_beta)
    extra = dict(st.surrogate_solver or {})
    dsolver = solver if st.surrogate_beta is None else {**solver, **extra, "target": target0}
    own = {"topk": "topk", "center": "center"} if st.surrogate_beta is None else {
        "topk": "surrogate-topk", "center": "surrogate-center"}  # fmt: skip
    if info["differentiable"] and any(a in ("topk", "center") for a in st.attacks):
        has_d = _derivative_check(dmodel, x, dsolver, st.weak, info)
    info["n_derivative"] = int(has_d.sum())
    if st.n_differentiated is not None:  # the budget: only the first n_differentiated images with a derivative
        has_d &= torch.cumsum(has_d.long(), 0) <= st.n_differentiated
    info["n_differentiated"] = int(has_d.sum())
    iters = int(prof["beyond_flip_iters"]) if st.flip_iters is None else int(st.flip_iters)
    step = spec.step if st.flip_step is None else float(st.flip_step)
    t = time.perf_counter()
    examples: dict[str, Any] = {}
    for eps in eps_grid:
        for a in st.attacks:
            if eps == 0 and a != "random":
                continue  # eps = 0: one unperturbed re-solve (the random row) stands for every attack
            if a == "random":
                atk = FlipRandomSignAttack(sub.model, eps=eps, seed=spec.seed, tries=spec.random_tries, **common)
                if eps > 0:  # the reference map is map0 (as for transfer); at eps = 0 the row is the re-solve
                    atk.remember(x, _select(res0, ok))
                vals, _ = _flip_attack_values(atk, x, y, target0)
            elif not info["differentiable"] or not has_d.any() or eps not in diff_eps:
                rows += _rows(name, FLIP_METHOD, own[a], eps, {}, n, available=False)
                continue
            else:
                # only images where x_flip has a derivative at x: elsewhere the direction is 0 and x never moves
                sur = {}
                if st.surrogate_beta is not None:
                    sur = {"surrogate": dmodel, "surrogate_solver": {**extra, "target": target0[has_d]}}
                atk = (FlipTopKAttack if a == "topk" else FlipCenterAttack)(
                    sub.model, eps=eps, step=step, iters=iters, weak=st.weak, **sur, **common)
                vals, avail, out = _own_attack_values(atk, x, y, target0, _select(res0, ok, has_d), has_d)
                if a == "topk" and eps == max(diff_eps):
                    examples["own"] = (has_d.clone(), out)
                rows += _rows(name, FLIP_METHOD, own[a], eps, vals, n, available=avail)
                continue
            rows += _rows(name, FLIP_METHOD, "none" if eps == 0 else a, eps, vals, n)
        if eps == 0:
            continue
        for a in st.transfer:
            sg_out = sg_attack(spec, sub.model, a, eps)(x, y)
            vals = transfer_attack(sub.model, sg_out.x_adv, y, map0, target0, k=spec.k, solver=solver,
                                   floor_center=spec.floor_center)  # fmt: skip
            if a == "topk" and eps == max(eps_grid):
                examples["sg"] = (sg_out, vals)
            rows += _rows(name, FLIP_METHOD, f"transfer-{a}", eps, vals, n)
    info["seconds"]["flip explanation"] = time.perf_counter() - t
    info["examples"] = _examples(sub, map0, examples, st.n_examples, torch.nonzero(ok.cpu())[:, 0].tolist())
    flip_rows = pd.DataFrame(rows)
    keep = [c for c in flip_rows.columns if c in grid.columns]
    grid.loc[grid.eps == 0, "attack"] = "none"
    grid = grid.drop_duplicates(["method", "attack", "eps", "image"])
    return pd.concat([grid[keep], flip_rows], ignore_index=True), info


def _derivative_check(dmodel: nn.Module, x: torch.Tensor, dsolver: dict[str, Any], weak: str,
                      info: dict[str, Any]) -> torch.Tensor:  # fmt: skip
    """(N,) bool: the images whose flip point (of ``dmodel``) is certified and has a derivative; records
    ``info["grad_status"]`` and the time taken (``info["seconds"]["derivative check"]``)."""
    import time

    t = time.perf_counter()
    n = x.shape[0]
    res_d = _flip_with_derivative(dmodel, x, dsolver, weak)
    status = res_d.grad_status or ["not differentiable"] * n
    has_d = res_d.converged.to(x.device) & _derivative_ok(status, n, x.device)
    info["grad_status"] = list(status)
    info["seconds"]["derivative check"] = time.perf_counter() - t
    return has_d


def _examples(sub: ImageSetting, map0: torch.Tensor, found: dict[str, Any], n: int,
              photo: list[int]) -> list[dict[str, Any]]:  # fmt: skip
    """Up to ``n`` example images for the figure: per image (``image``: index into the certified images, as in the
    rows; ``photo``: index into the setting's images) the image, its class,
    the simple-gradient map before / after the SG top-k attack, the flip map before / at the SG attack's image
    (transfer) / after the flip map's own (or surrogate-direction) top-k attack, and their top-k ∩, all at the
    largest ε computed; entries missing where that attack did not run (NaN maps: no certified flip point)."""
    if n <= 0 or "sg" not in found and "own" not in found:
        return []
    m = len(sub.x)
    order = list(range(m))
    own_idx: dict[int, int] = {}
    if "own" in found:
        mask, out = found["own"]
        idx = torch.nonzero(mask.cpu())[:, 0].tolist()
        own_idx = {i: j for j, i in enumerate(idx)}
        moved = {i for i, j in own_idx.items() if bool(out.success[j])}
        order = sorted(order, key=lambda i: (i not in moved, i not in own_idx))  # images the own attack moved first
    cpu = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    names = sub.class_names
    ex = []
    for i in order[:n]:
        label = names[int(sub.y[i])] if names else str(int(sub.y[i]))
        e: dict[str, Any] = {"image": i, "photo": photo[i], "x": cpu(sub.x[i]), "label": label, "flip": cpu(map0[i])}
        if "sg" in found:
            sg_out, tr = found["sg"]
            e.update(sg=cpu(sg_out.saliency[i]), sg_adv=cpu(sg_out.saliency_adv[i]),
                     sg_topk=float(sg_out.metrics["topk"][i]), x_sg=cpu(sg_out.x_adv[i]),
                     flip_transfer=cpu(tr["maps"][i]), transfer_topk=float(tr["topk"][i]))  # fmt: skip
        if i in own_idx:
            _, out = found["own"]
            j = own_idx[i]
            e.update(flip_own=cpu(out.saliency_adv[j]), own_topk=float(out.metrics["topk"][j]),
                     x_own=cpu(out.x_adv[j]))  # fmt: skip
        ex.append(e)
    return ex


def _select(res: FlipResult, *masks: torch.Tensor) -> FlipResult:
    """The points of ``res`` kept by successive boolean masks (each over the points kept so far)."""
    idx = torch.arange(len(res))
    for m in masks:
        idx = idx[m.cpu()]
    return _concat([_take(res, int(i)) for i in idx])


def summarize_flip_fragility(rows: pd.DataFrame) -> pd.DataFrame:
    """Means over images per (model, method, attack, eps255): topk, spearman, center (over images with a value),
    ``n`` images, ``n_missing`` (no value: no certified flip point at the returned image, or — own attacks on the
    flip map — no derivative of x_flip at any iterate), ``label_kept`` and ``target_kept`` (fraction; flip rows
    only), ``available`` (some image has a value)."""
    out = []
    for key, g in rows.groupby(["model", "method", "attack", "eps255"], sort=False):
        avail = bool(g.available.any())
        g = g[g.available.astype(bool)]
        rec = dict(zip(("model", "method", "attack", "eps255"), key))
        rec.update({m: (float(np.nanmean(g[m])) if g[m].notna().any() else _NAN) for m in _ROW_METRICS})
        kept = g.target_kept.dropna()
        rec.update(
            n=len(
                rows[
                    (rows.model == key[0]) & (rows.method == key[1]) & (rows.attack == key[2]) & (rows.eps255 == key[3])
                ]
            ),
            n_missing=0,
            label_kept=float(g.label_kept.astype(float).mean()) if len(g) else _NAN,
            target_kept=float(kept.astype(float).mean()) if len(kept) else _NAN,
            available=avail,
        )
        rec["n_missing"] = rec["n"] - int(g.topk.notna().sum())  # fmt: skip
        out.append(rec)
    return pd.DataFrame(out)
