"""The problem data shared by every step: :class:`_Problems` (P flattened single-target problems), the score
function of a model, the constraint values, the solver's status codes, and :class:`_Rows` (per-problem results)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

# status codes of the iterative solver (before certification)
_RUNNING, _CONVERGED, _MAX_ITER, _STALLED, _NO_PROGRESS = 0, 1, 2, 3, 4


_SOLVER_STATUS = {_RUNNING: "running", _CONVERGED: "converged", _MAX_ITER: "max_iter", _STALLED: "line search failed",
                  _NO_PROGRESS: "no progress toward feasibility"}


_TINY = 1e-30  # a floor for norms before dividing (representable in float32)


class _Rows:
    """Mixin of the dataclasses whose tensor fields hold one row per problem (``None``: a field not measured):
    select rows, concatenate, merge row by row."""

    def take(self, idx):
        return type(self)(**{f.name: None if (v := getattr(self, f.name)) is None else v[idx] for f in fields(self)})

    @classmethod
    def cat(cls, parts: list):
        def join(vals):
            return None if vals[0] is None else torch.cat(vals)

        return cls(**{f.name: join([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def where(self, mask: torch.Tensor, other):
        """Row p of ``other`` where ``mask[p]`` (P,), else this one's."""

        def pick(a, b):
            return None if a is None else torch.where(mask.reshape(-1, *([1] * (a.dim() - 1))), b, a)

        return type(self)(**{f.name: pick(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})


@dataclass
class _Problems:
    """P flattened single-target problems, all tensors in the working dtype, shape (P, n) or (P,)."""

    xh: torch.Tensor  # the input x_hat
    lo: torch.Tensor  # lower bounds; == hi on fixed (masked) coordinates
    hi: torch.Tensor
    w: torch.Tensor  # scale**2, the diagonal of the objective's Hessian
    src: torch.Tensor
    tgt: torch.Tensor
    offset: torch.Tensor | None = None  # (P, C) added to the scores (homotopy's output-bias shift)

    def __len__(self) -> int:
        return self.xh.shape[0]

    def take(self, idx: torch.Tensor) -> _Problems:
        return _Problems(
            self.xh[idx], self.lo[idx], self.hi[idx], self.w[idx], self.src[idx], self.tgt[idx],
            None if self.offset is None else self.offset[idx],
        )

    def repeat(self, r: int) -> _Problems:
        def rep(t):
            return None if t is None else t.repeat(r, *([1] * (t.dim() - 1)))

        return _Problems(*(rep(t) for t in (self.xh, self.lo, self.hi, self.w, self.src, self.tgt, self.offset)))

    def with_offset(self, offset: torch.Tensor | None) -> _Problems:
        return _Problems(self.xh, self.lo, self.hi, self.w, self.src, self.tgt, offset)

    @property
    def fixed(self) -> torch.Tensor:
        return self.lo == self.hi


ScoreFn = Callable[[torch.Tensor], torch.Tensor]  # (P, n) flat inputs -> (P, C) scores


def _constraint_values(z: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, margin: float):
    """g = z_s - z_t (P,), h = z_k - z_t + margin for the other classes (P, C) with -inf at s and t."""
    zs = z.gather(1, src[:, None])[:, 0]
    zt = z.gather(1, tgt[:, None])[:, 0]
    h = z - zt[:, None] + margin
    other = torch.ones_like(z, dtype=torch.bool)
    other.scatter_(1, src[:, None], False)
    other.scatter_(1, tgt[:, None], False)
    h = torch.where(other, h, torch.full_like(h, -math.inf))
    return zs - zt, h, zs, zt


def _violation(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """l1 constraint violation |g| + sum_k max(0, h_k) (P,)."""
    return g.abs() + h.clamp(min=0).nan_to_num(posinf=math.inf).sum(1)


def _tol_abs(zs: torch.Tensor, zt: torch.Tensor, tol: float) -> torch.Tensor:
    return tol * torch.maximum(torch.ones_like(zs), torch.maximum(zs.abs(), zt.abs()))


def _pad_slots(t: torch.Tensor, m: int, value: float = 0) -> torch.Tensor:
    """(P, k) slot values -> (P, m), padded with ``value``."""
    if t.shape[1] == m:
        return t
    return torch.cat([t, torch.full((t.shape[0], m - t.shape[1]), value, dtype=t.dtype, device=t.device)], 1)


def _offset_fn(fn: ScoreFn, offset: torch.Tensor | None) -> ScoreFn:
    if offset is None:
        return fn
    return lambda x: fn(x) + offset


def _model_fn(model: nn.Module, shape: tuple) -> ScoreFn:
    return lambda xf: model(xf.reshape(xf.shape[0], *shape))


def _chunks(P: int, size: int, device: torch.device | str = "cpu"):
    """Index ranges of ``size`` rows covering range(P) (CPU indices index tensors on any device)."""
    return [torch.arange(i, min(P, i + size), device=device) for i in range(0, P, size)]


def _pair_rows(src: torch.Tensor, tgt: torch.Tensor, C: int, dtype: torch.dtype) -> torch.Tensor:
    """(P, C) rows e_s - e_t: (z * rows).sum(1) = z_s - z_t."""
    rows = torch.zeros(len(src), C, dtype=dtype, device=src.device)
    rows.scatter_(1, src[:, None], 1.0)
    rows.scatter_add_(1, tgt[:, None], -torch.ones_like(rows[:, :1]))
    return rows


def _model_dtype(model: nn.Module, fallback: torch.dtype) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return fallback
