"""Array helpers shared by the flip-point analyses."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_numpy(a: Any, name: str, *, ndim: int | None = None, dtype=np.float64) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    elif not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as err:  # pragma: no cover - numpy's own conversion errors
            raise TypeError(f"{name} must be array-like, got {type(a).__name__}") from err
    if a.dtype == object:
        raise TypeError(f"{name} must be numeric, got an object array")
    a = a.astype(dtype, copy=True)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {a.shape}")
    return a
