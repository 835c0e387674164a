"""Closest flip points of a classifier: batched, certified, model-agnostic.

A *flip point* between the source class ``s`` and a target class ``t`` is an input where their scores are equal and
every other class scores lower. For an input ``x_hat`` the closest flip point (Yousefzadeh & O'Leary 2019) solves::

    minimise    1/2 || D (x - x_hat) ||^2                       D = diag(scale), default identity
    subject to  z_s(x) - z_t(x) = 0,   z_k(x) - z_t(x) + margin <= 0 for every other class k,
                lower <= x <= upper,   x_i = x_hat_i where mask_i is False.

How it is solved, in the order the files read (the full description: ``docs/flip_solver.md``):

* ``api`` — :func:`closest_flip_point`: argument checks, the problem data, then the pipeline;
* ``options`` — :class:`FlipOptions`, the solver's settings (frozen, checked once);
* ``steps`` — the pipeline: screen the targets, solve from ``x_hat`` (and restarts / homotopy), start again from
  boundary crossings (which also bound the distance from above), polish, choose one certified candidate per point;
* ``sqp`` — the batched SQP core: its QP (solved through its dual), the merit line search and the certificate
  (residual, margin, bounds, KKT measure; for piecewise-linear models the activation region's KKT test and gap);
* ``starts`` — starting points: DeepFool-style steps, segment crossings, the homotopy;
* ``polish`` — the region polish of piecewise-linear (ReLU / max-pooling) models;
* ``categories`` — one-hot ``groups``: relax, round, re-solve; crossings with valid categories;
* ``pool`` / ``problems`` — the candidates with their certificates; the flattened single-target problems;
* ``result`` — :class:`FlipResult`;  ``gradient`` — the implicit-function derivative (``differentiable=True``).

Names with a leading underscore are private to this package (shared between its files, never used outside it).
"""

from __future__ import annotations

from .api import closest_flip_point
from .gradient import GRAD_OK, GradientOptions, attach_gradients
from .options import FlipOptions
from .result import FlipResult
from .starts import erf_homotopy_sigmas

__all__ = [
    "GRAD_OK", "FlipOptions", "FlipResult", "GradientOptions", "attach_gradients", "closest_flip_point",
    "erf_homotopy_sigmas",
]
