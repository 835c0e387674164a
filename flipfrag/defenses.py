"""Explanation defenses as saliency methods: SmoothGrad, sparsified SmoothGrad (certified) and beta-smoothed maps.

Each defense is an object with the call shape of :mod:`flipfrag.saliency`'s functions,
``defense(model, x, target, *, create_graph=False) -> attributions``, differentiable with respect to ``x`` (so the
attacks of :mod:`flipfrag.attacks` accept it as ``method=`` and differentiate *through the defense*: an adaptive
attack), plus a function form for direct use:

* :class:`SmoothGrad` / :func:`smoothgrad` (Smilkov et al. 2017): the mean of a base method's attributions over ``n``
  Gaussian copies ``x + sigma z`` of the input. The draws ``z`` come from a private generator seeded by ``seed``
  (:func:`noise_draws`): the map is a deterministic function of ``x``, and an attacker that calls the same object
  differentiates the expectation over the *same* ``n`` draws the defense uses (the strongest white-box reading;
  a defense that redraws its noise at every call is a different, randomised, object).
* :class:`SparsifiedSmoothGrad` / :func:`sparsified_smoothgrad` (Levine, Singla & Feizi 2019, "Certifiably robust
  interpretation in deep learning"): every noisy copy's pixel map ``p = sum_c |g_c|`` is first made sparse and
  bounded — divided by its ``T``-th largest value and clipped at 1 (the top ``clip`` fraction of pixels become 1),
  and every pixel outside the top ``keep`` fraction set to 0 — then averaged. Each pixel of the result is the
  Gaussian smoothing of a function with values in [0, 1], which is what the certificate needs. ``clip = keep`` gives
  the binary "top-K -> 1, rest -> 0" map (piecewise constant in x: zero gradient almost everywhere, so no gradient
  attack can move it; keep ``clip < keep`` for an attackable map, as the authors' own experiments, 1 % and 10 %).
* :class:`BetaSmoothed` / :func:`beta_smoothed` (Dombrowski et al. 2019, "Explanations can be manipulated and
  geometry is to blame"): the base method's map of the network whose ReLUs are replaced by ``softplus(beta)``
  (:func:`flipfrag.smooth.softplus_surrogate`, same weights). The attacker differentiates that smoothed network
  itself; the label is still checked on the original network.

:func:`certified_topk_overlap` is Levine et al.'s certificate: a lower bound on the top-k overlap between the
sparsified SmoothGrad map of ``x`` and that of any ``x'`` with ``||x' - x||_2 <= radius``, from the fact that
``Phi^{-1}(E[h(x + sigma z)])`` is ``1/sigma``-Lipschitz for every ``h`` with values in [0, 1] (Salman et al. 2019).

Units: images in [0, 1]; ``sigma`` and ``radius`` on that scale (``sigma = 0.15`` is Smilkov et al.'s 15 % of the
input range).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._checks import check_batch, check_int
from .saliency import attribute, canonical_method, check_model
from .saliency.common import target_tensor
from .smooth import softplus_surrogate

__all__ = [
    "DEFENSES",
    "SmoothGrad",
    "SparsifiedSmoothGrad",
    "BetaSmoothed",
    "smoothgrad",
    "sparsified_smoothgrad",
    "beta_smoothed",
    "noise_draws",
    "sparsify",
    "smoothed_bounds",
    "certified_topk_overlap",
    "certified_radius",
]

#: Methods differentiated on the network itself by the attacks (their rule ratios are smooth in x).
_ON_MODEL = frozenset({"deeplift", "dtd"})


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def noise_draws(shape: tuple[int, ...], n: int, sigma: float, seed: int, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """``n`` Gaussian draws ``sigma * z`` of a batch's shape: a tensor (n, *shape), the same for the same arguments.

    Drawn in float64 on the CPU from a private ``torch.Generator`` seeded by ``seed`` (no global RNG state is touched),
    then cast, so the draws do not depend on the device or dtype asked for.
    """
    check_int(n, "n", 1)
    sigma = _check_positive(sigma, "sigma")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    return (sigma * z).to(device=device, dtype=dtype)


def sparsify(pixel_map: torch.Tensor, keep: float, clip: float) -> torch.Tensor:
    """Levine et al.'s sparsification of non-negative maps (N, *features), each row on its own.

    With ``d`` features per row, ``K = max(1, round(keep d))`` and ``T = max(1, round(clip d))`` (``T <= K``): the row
    divided by its ``T``-th largest value and clipped at 1, then every entry outside the row's ``K`` largest set to 0.
    Values in [0, 1]; the ``T`` largest are 1. Differentiable where the ``K``-th and ``T``-th values are unique.
    """
    if not isinstance(pixel_map, torch.Tensor) or pixel_map.dim() < 2:
        raise ValueError("pixel_map must be a tensor (N, *features)")
    keep, clip = _check_fraction(keep, "keep"), _check_fraction(clip, "clip")
    if clip > keep:
        raise ValueError(f"clip ({clip}) must be <= keep ({keep}): the clipped pixels are among the kept ones")
    flat = pixel_map.flatten(1)
    d = flat.shape[1]
    k_keep, k_clip = max(1, round(keep * d)), max(1, round(clip * d))
    k_clip = min(k_clip, k_keep)
    top = flat.topk(k_keep, dim=1)
    scale = top.values[:, k_clip - 1 : k_clip].clamp_min(torch.finfo(flat.dtype).tiny)
    mask = torch.zeros_like(flat).scatter_(1, top.indices, 1.0)
    return ((flat / scale).clamp(max=1.0) * mask).view_as(pixel_map)


class _Defense:
    """Shared part of the defenses: the base method, its keyword arguments and the attack protocol.

    Attributes the attacks read: ``name`` (for tables and the attack's config) and ``on_model`` (True: the attacker
    differentiates the defended map on the model itself; False: on the softplus surrogate, as for the plain method).
    """

    name = "defense"

    def __init__(self, method: str = "gradient", **method_kwargs: Any):
        self.method = canonical_method(method)
        if "create_graph" in method_kwargs:
            raise ValueError("method_kwargs: create_graph is set per call, do not pass it")
        self.method_kwargs = dict(method_kwargs)

    @property
    def on_model(self) -> bool:
        return self.method in _ON_MODEL

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"

    def describe(self) -> str:
        return self.method


class SmoothGrad(_Defense):
    """SmoothGrad of a base method: ``(1/n) sum_i A(x + sigma z_i)`` over ``n`` fixed Gaussian draws.

    Parameters
    ----------
    method : str
        Base saliency method (:data:`flipfrag.saliency.METHODS`; Smilkov et al.: "gradient").
    n : int
        Number of noise draws (default 16).
    sigma : float
        Noise standard deviation on the [0, 1] pixel scale (default 0.15).
    seed : int
        Seed of the draws (:func:`noise_draws`): the same seed gives the same map.
    batch_size : int or None
        At most this many noisy copies per pass of the base method (bounds memory; None = all ``n * N`` at once).
    **method_kwargs
        Keyword arguments of the base method (e.g. ``baseline``, ``steps``).

    Calling it: ``SmoothGrad(...)(model, x, target, create_graph=False)`` -> Tensor of ``x``'s shape.
    """

    name = "smoothgrad"

    def __init__(self, method: str = "gradient", *, n: int = 16, sigma: float = 0.15, seed: int = 0,
                 batch_size: int | None = None, **method_kwargs: Any):  # fmt: skip
        super().__init__(method, **method_kwargs)
        self.n = check_int(n, "n", 1)
        self.sigma = _check_positive(sigma, "sigma")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        if batch_size is not None:
            check_int(batch_size, "batch_size", 1)
        self.batch_size = batch_size

    def describe(self) -> str:
        return f"{self.method}, n={self.n}, sigma={self.sigma:g}, seed={self.seed}"

    def draws(self, x: torch.Tensor) -> torch.Tensor:
        """The noise (n, *x.shape) this defense adds to ``x``."""
        return noise_draws(tuple(x.shape), self.n, self.sigma, self.seed, dtype=x.dtype, device=x.device)

    def _per_draw(self, model: nn.Module, x: torch.Tensor, target: Any, create_graph: bool) -> torch.Tensor:
        """The base method on every noisy copy, (n, *x.shape) (before any reduction)."""
        check_model(model)
        check_batch(x)
        n_img = x.shape[0]
        t = target_tensor(target, n_img, x.device)
        noisy = (x.unsqueeze(0) + self.draws(x)).flatten(0, 1)  # (n * N, ...): draw-major
        tt = t.repeat(self.n)
        step = noisy.shape[0] if self.batch_size is None else self.batch_size
        parts = [
            attribute(model, noisy[i : i + step], tt[i : i + step], self.method, create_graph=create_graph,
                      **self._kwargs(i, step, n_img))  # fmt: skip
            for i in range(0, noisy.shape[0], step)
        ]
        return torch.cat(parts).view(self.n, *x.shape)

    def _kwargs(self, start: int, step: int, n_img: int) -> dict[str, Any]:
        """The base method's keyword arguments for rows ``start:start+step`` of the draw-major batch: a per-image
        baseline (N, ...) is repeated to match."""
        kw = dict(self.method_kwargs)
        b = kw.get("baseline")
        if isinstance(b, torch.Tensor) and b.dim() >= 1 and b.shape[0] == n_img and n_img > 1:
            kw["baseline"] = b.repeat(self.n, *([1] * (b.dim() - 1)))[start : start + step]
        return kw

    def __call__(self, model: nn.Module, x: torch.Tensor, target: Any, *, create_graph: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            out = self._per_draw(model, x, target, create_graph).mean(0)
        return out if create_graph else out.detach()


class SparsifiedSmoothGrad(SmoothGrad):
    """Sparsified SmoothGrad (Levine et al. 2019): the mean over ``n`` fixed draws of :func:`sparsify` applied to each
    noisy copy's pixel map ``sum_c |A_c(x + sigma z_i)|``.

    Parameters as :class:`SmoothGrad`, plus ``keep`` (fraction of pixels kept per draw, default 0.1) and ``clip``
    (fraction set to 1 per draw, default 0.01; both the authors' CIFAR-10 settings). Returns (N, 1, H, W) for images
    (N, C, H, W) — values in [0, 1], one channel, so that :func:`flipfrag.saliency.saliency_map` and the attacks use
    it unchanged — and (N, D) for flat inputs (N, D).
    """

    name = "sparsified_smoothgrad"

    def __init__(self, method: str = "gradient", *, n: int = 16, sigma: float = 0.15, seed: int = 0,
                 keep: float = 0.1, clip: float = 0.01, batch_size: int | None = None,
                 **method_kwargs: Any):  # fmt: skip
        super().__init__(method, n=n, sigma=sigma, seed=seed, batch_size=batch_size, **method_kwargs)
        self.keep, self.clip = _check_fraction(keep, "keep"), _check_fraction(clip, "clip")
        if self.clip > self.keep:
            raise ValueError(f"clip ({clip}) must be <= keep ({keep})")

    def describe(self) -> str:
        return f"{super().describe()}, keep={self.keep:g}, clip={self.clip:g}"

    def __call__(self, model: nn.Module, x: torch.Tensor, target: Any, *, create_graph: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(create_graph or torch.is_grad_enabled()):
            a = self._per_draw(model, x, target, create_graph).flatten(0, 1)  # (n * N, *shape)
            pix = a.abs().sum(1) if a.dim() == 4 else a.abs()
            out = sparsify(pix, self.keep, self.clip).view(self.n, x.shape[0], *pix.shape[1:]).mean(0)
            if x.dim() == 4:
                out = out.unsqueeze(1)
        return out if create_graph else out.detach()


class BetaSmoothed(_Defense):
    """The base method's map of the network with every ReLU replaced by ``softplus(beta)`` (Dombrowski et al.).

    Parameters
    ----------
    method : str
        Base saliency method ("gradient", "integrated_gradients", "deeplift", ...).
    beta : float
        Softplus sharpness (large: close to the ReLU net's map; small: smoother, further from it). Default 3.
    **method_kwargs
        Keyword arguments of the base method.

    The attacker differentiates the smoothed network itself (``on_model = True``): it is smooth, no further
    surrogate is needed.
    """

    name = "beta_smoothed"
    on_model = True  # type: ignore[assignment]

    def __init__(self, method: str = "gradient", *, beta: float = 3.0, **method_kwargs: Any):
        super().__init__(method, **method_kwargs)
        self.beta = _check_positive(beta, "beta")

    def describe(self) -> str:
        return f"{self.method}, beta={self.beta:g}"

    def __call__(self, model: nn.Module, x: torch.Tensor, target: Any, *, create_graph: bool = False) -> torch.Tensor:
        check_model(model)
        return attribute(softplus_surrogate(model, self.beta), x, target, self.method, create_graph=create_graph,
                         **self.method_kwargs)  # fmt: skip


#: Defense classes by name.
DEFENSES = {"smoothgrad": SmoothGrad, "sparsified_smoothgrad": SparsifiedSmoothGrad, "beta_smoothed": BetaSmoothed}


def smoothgrad(model: nn.Module, x: torch.Tensor, target: Any, *, method: str = "gradient", n: int = 16,
               sigma: float = 0.15, seed: int = 0, create_graph: bool = False, batch_size: int | None = None,
               **method_kwargs: Any) -> torch.Tensor:  # fmt: skip
    """SmoothGrad attributions (N, *shape) of ``method``: see :class:`SmoothGrad`."""
    return SmoothGrad(method, n=n, sigma=sigma, seed=seed, batch_size=batch_size, **method_kwargs)(
        model, x, target, create_graph=create_graph
    )


def sparsified_smoothgrad(model: nn.Module, x: torch.Tensor, target: Any, *, method: str = "gradient", n: int = 16,
                          sigma: float = 0.15, seed: int = 0, keep: float = 0.1, clip: float = 0.01,
                          create_graph: bool = False, **method_kwargs: Any) -> torch.Tensor:  # fmt: skip
    """Sparsified SmoothGrad map (N, 1, H, W) (or (N, D)), values in [0, 1]: see :class:`SparsifiedSmoothGrad`
    (which also bounds memory with ``batch_size``)."""
    return SparsifiedSmoothGrad(method, n=n, sigma=sigma, seed=seed, keep=keep, clip=clip,
                                **method_kwargs)(model, x, target, create_graph=create_graph)  # fmt: skip


def beta_smoothed(model: nn.Module, x: torch.Tensor, target: Any, *, method: str = "gradient", beta: float = 3.0,
                  create_graph: bool = False, **method_kwargs: Any) -> torch.Tensor:  # fmt: skip
    """Attributions (N, *shape) of ``method`` on the softplus(beta) copy of ``model``: see :class:`BetaSmoothed`."""
    return BetaSmoothed(method, beta=beta, **method_kwargs)(model, x, target, create_graph=create_graph)


# --------------------------------------------------------------------------------------------- certificate

_NORMAL = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))


def smoothed_bounds(values: torch.Tensor, radius: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of ``H(x')`` over ``||x' - x||_2 <= radius`` for ``H = E[h(. + sigma z)]``, ``h`` in [0, 1], given
    ``H(x) = values``: ``(Phi(Phi^{-1}(v) - radius/sigma), Phi(Phi^{-1}(v) + radius/sigma))`` (float64).

    Tight: ``h = 1[u_1 > 0]`` has ``H(x) = Phi(x_1 / sigma)`` and attains both ends.
    """
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius!r}")
    sigma = _check_positive(sigma, "sigma")
    v = torch.as_tensor(values, dtype=torch.float64).clamp(0.0, 1.0)
    q = _NORMAL.icdf(v)  # -inf at 0, +inf at 1: the bounds then stay at 0 / 1
    shift = float(radius) / sigma
    return _NORMAL.cdf(q - shift), _NORMAL.cdf(q + shift)


def certified_topk_overlap(smoothed: torch.Tensor, k: int, radius: float, sigma: float, *,
                           n_samples: int | None = None, confidence: float = 0.95) -> torch.Tensor:  # fmt: skip
    """Levine et al.'s certified lower bound on the top-k overlap, per map: an integer in [0, k] (N,).

    For maps ``v`` (N, *features) of a Gaussian-smoothed function with values in [0, 1] (the
    :class:`SparsifiedSmoothGrad` map before normalisation), sorted per row ``v_(1) >= v_(2) >= ...``: with
    ``L_i``, ``U_j`` the lower / upper ends of :func:`smoothed_bounds` at ``radius``, every ``x'`` in the L2 ball
    keeps at least ``m`` of the ``k`` original top features in its top-k, where ``m`` is the number of ``i <= k`` with
    ``L_(i) > U_(2k + 1 - i)`` (an index past the last feature counts as certified). Argument: fewer than ``m``
    shared features needs ``k - m + 1`` outsiders above ``k - m + 1`` insiders, i.e. ``U_(2k+1-m) >= L_(m)``. It is the
    exact minimum over the box of per-feature ranges, ties resolved against the map.

    ``n_samples=None``: ``v`` is taken as the exact expectation (the plug-in bound: no sampling error accounted for).
    ``n_samples=n``: ``v`` is a mean over ``n`` draws; every feature's interval is widened by the two-sided Hoeffding
    half-width ``sqrt(log(2 d / (1 - confidence)) / (2 n))`` (union bound over the ``d`` features), so the bound holds
    with probability ``>= confidence`` over the draws.
    """
    if not isinstance(smoothed, torch.Tensor) or smoothed.dim() < 2:
        raise ValueError("smoothed must be a tensor (N, *features) of values in [0, 1]")
    flat = smoothed.detach().flatten(1).to(torch.float64)
    if (flat < 0).any() or (flat > 1).any() or not torch.isfinite(flat).all():
        raise ValueError("smoothed must hold values in [0, 1] (the sparsified SmoothGrad map before normalisation)")
    d = flat.shape[1]
    k = check_int(k, "k", 1)
    if k > d:
        raise ValueError(f"k must be <= {d} (features per map), got {k}")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 <= radius < math.inf:
        raise ValueError(f"radius must be a finite number >= 0, got {radius!r}")
    err = 0.0
    if n_samples is not None:
        check_int(n_samples, "n_samples", 1)
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        err = math.sqrt(math.log(2 * d / (1 - confidence)) / (2 * n_samples))
    v = flat.sort(dim=1, descending=True).values
    lower, _ = smoothed_bounds(v[:, :k] - err, radius, sigma)
    j = 2 * k - 1 - torch.arange(k)  # partner of insider i (0-based): outsider 2k - 1 - i
    inside = j < d
    partner = v[:, j.clamp(max=d - 1)]
    _, upper = smoothed_bounds(partner + err, radius, sigma)
    upper = torch.where(inside, upper, torch.full_like(upper, -math.inf))
    return (lower > upper).sum(1)


def certified_radius(smoothed: torch.Tensor, k: int, sigma: float, fraction: float = 0.5, *,
                     n_samples: int | None = None, confidence: float = 0.95,
                     tol: float = 1e-4) -> torch.Tensor:  # fmt: skip
    """The largest L2 radius (N,) at which :func:`certified_topk_overlap` still certifies ``>= fraction * k`` shared
    features (bisection to ``tol``; 0 where even radius 0 does not)."""
    fraction = _check_fraction(fraction, "fraction")
    need = math.ceil(fraction * k)
    out = []
    for row in smoothed.detach().flatten(1):
        def ok(r: float, row: torch.Tensor = row) -> bool:
            return int(certified_topk_overlap(row[None], k, r, sigma, n_samples=n_samples,
                                              confidence=confidence)[0]) >= need  # fmt: skip

        if not ok(0.0):
            out.append(0.0)
            continue
        lo, hi = 0.0, sigma
        while ok(hi) and hi < 1e6:
            lo, hi = hi, 2 * hi
        while hi - lo > tol:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        out.append(lo)
    return torch.tensor(out, dtype=torch.float64)
