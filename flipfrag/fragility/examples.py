"""Single attacks for the example figures (F1, F4) and the targeted attack's region."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .._checks import check_names
from .paper import METHODS
from .settings import ImageSetting, grid_sizes


def target_box(maps: torch.Tensor, size: int) -> torch.Tensor:
    """For each saliency map (N, H, W), a ``size`` x ``size`` box mask at the image corner holding the least
    saliency mass: the targeted attack's region (a place the original interpretation ignores). Returns (N, H, W)."""
    if not isinstance(maps, torch.Tensor) or maps.dim() != 3:
        raise ValueError("maps must be a tensor of shape (N, H, W)")
    h, w = maps.shape[-2:]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= min(h, w):
        raise ValueError(f"size must be an integer in [1, {min(h, w)}], got {size!r}")
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    masks = torch.zeros(len(corners), h, w, dtype=maps.dtype)
    for c, (r0, c0) in enumerate(corners):
        masks[c, r0 : r0 + size, c0 : c0 + size] = 1
    mass = torch.einsum("nhw,chw->nc", maps, masks.to(maps.device))
    return masks.to(maps.device)[mass.argmin(1)]


def attack_examples(setting: ImageSetting, prof: dict[str, Any], *, attack: str = "center", eps: float = 8 / 255,
                    methods: Sequence[str] = METHODS[:3], mask: torch.Tensor | None = None, n: int | None = None,
                    seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Run one attack per method on the first ``n`` images of a setting (F1 / F4 examples).

    ``attack``: "center", "topk" or "targeted" (needs ``mask``, (H, W) or (n, H, W)). Uses the role's sizes
    (:func:`~flipfrag.fragility.grid_sizes`: ``prof["attack_iters"]`` iterations of ``attack_step``, ``softplus_beta``,
    IG with ``prof["ig_steps"]`` steps, or ``prof["imagenet_grid"]``'s) and the mean-image reference.
    Returns ``{method: AttackResult}``.
    """
    from ..attacks import MassCenterAttack, TargetedAttack, TopKAttack

    classes = {"center": MassCenterAttack, "topk": TopKAttack, "targeted": TargetedAttack}
    if attack not in classes:
        raise ValueError(f"attack must be one of {sorted(classes)}, got {attack!r}")
    if attack == "targeted" and mask is None:
        raise ValueError("mask: the targeted attack needs a target region")
    methods = check_names("methods", methods, METHODS)
    n = len(setting.x) if n is None else int(n)
    if not 1 <= n <= len(setting.x):
        raise ValueError(f"n must be in [1, {len(setting.x)}], got {n}")
    x, y = setting.x[:n], setting.y[:n]
    if mask is not None and mask.dim() == 3 and mask.shape[0] == len(setting.x):
        mask = mask[:n]  # one mask per image of the setting: keep those of the attacked images
    sizes = grid_sizes(setting.role, prof)
    kwargs = setting.method_kwargs(sizes["example_ig_steps"], sizes["ig_internal_batch"])
    out = {}
    for method in methods:
        extra = {"mask": mask} if attack == "targeted" else {}
        atk = classes[attack](setting.model, method, eps=float(eps), step=float(sizes["step"]),
                              iters=int(sizes["example_iters"]), k=setting.k, beta=float(sizes["beta"]),
                              method_kwargs=kwargs.get(method, {}), floor_center=not prof.get("offline", True),
                              progress=False, **extra)  # fmt: skip
        out[method] = atk(x, y)
    return out

