"""The result type of :func:`~flipfrag.flip.closest_flip_point`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FlipResult:
    """Closest flip points of a batch of N inputs, with a per-point certificate.

    Attributes
    ----------
    x_flip : Tensor (N, *shape)
        The certified flip point; NaN where ``converged`` is False (never a silently wrong point).
    x_attempt : Tensor (N, *shape)
        The solver's last iterate for every point (equal to ``x_flip`` where converged) — for diagnosis.
    distance : Tensor (N,)
        ``||scale * (x_flip - x)||_2`` (input units times scale); NaN where not converged.
    source, target : LongTensor (N,)
        The classes whose scores are equal at ``x_flip``. With ``target=None``, ``target`` is the class of the
        closest certified flip point (for a point with none: the runner-up class at ``x``, whose attempt is shown).
    residual : Tensor (N,)
        ``|z_source - z_target|`` at ``x_attempt``, recomputed with the original model in its dtype.
    margin : Tensor (N,)
        ``min_k (z_target - z_k)`` over the other classes at ``x_attempt`` (``+inf`` for two classes).
    bound_violation : Tensor (N,)
        ``max(lower - x, x - upper, |x - x_hat| on masked features, 0)`` at ``x_attempt``.
    kkt : Tensor (N,)
        First-order optimality measure (``docs/flip_solver.md``); 0 when ``x`` itself is a flip point. For
        piecewise-linear models, the measure on the point's activation region (kinks as constraints) where the plain
        one fails.
    iterations : LongTensor (N,)
        SQP iterations used by the returned candidate (summed over homotopy steps for the homotopy candidate).
    converged : BoolTensor (N,)
        True only if residual, margin, bounds and KKT all meet their tolerances.
    status : list of str (N,)
        ``"converged"`` or why not, e.g. ``"residual 3.1e-02 > 1.0e-06 (solver: max_iter)"``.
    start : LongTensor (N,)
        Which candidate won: 0 = direct solve from ``x``, 1 = homotopy path, 2.. = random restarts, 100 / 101 / 102 =
        solves from the segment crossings toward the DeepFool-style point / ``candidates`` / the solver's iterates,
        103 = the region polish (piecewise-linear models), 104 = the solve from the crossing toward the first-order
        walk's point (``walk_steps``); -1 if none was certified.
    distances : Tensor (N, C) or None
        With ``target=None``: the certified distance toward every class, ``inf`` where that solve failed and in
        the source column. None when ``target`` was given.
    scores : Tensor (N, C)
        Model scores at ``x_attempt`` (original model and dtype).
    rounding_changed : BoolTensor (N,) or None
        With ``groups``: True where rounding the relaxed one-hot blocks to valid categories moved the point.
    tol, kkt_tol, margin_param : float
        The tolerances and the margin used.
    upper_bound : Tensor (N,) or None
        The distance of the closest boundary point found by segment crossings toward label-changing points (the
        DeepFool-style steps, ``candidates``, the solver's own iterates): an upper bound on the closest flip
        point's distance; ``inf`` where none was found. ``converged`` requires ``distance <= 1.01 * upper_bound``.
        With ``groups`` only crossings with valid categories count (the relaxed problem's have fractional ones):
        segments that keep a category assignment fixed — x's own, the rounded relaxed solution's, and x's with
        one block changed to each of its other categories — and move the other features.
    region_gap : Tensor (N,) or None
        Piecewise-linear models: ``distance / LB - 1`` with LB a lower bound (weak duality) on the distance of every
        flip point in the closure of the activation region at ``x_attempt`` — for a polished point (``start`` 103)
        the region the polish solved in (``docs/flip_solver.md``); NaN where it was not needed (the plain or region KKT
        test passed) or not measured (infeasible attempts). None for smooth models.
    grad_status : list of str (N,) or None
        With ``differentiable=True``: ``"ok"`` where ``x_flip`` has a derivative, else why not (NaN gradient there;
        :mod:`flipfrag.flip.gradient`). None otherwise.
    """

    x_flip: torch.Tensor
    x_attempt: torch.Tensor
    distance: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    residual: torch.Tensor
    margin: torch.Tensor
    bound_violation: torch.Tensor
    kkt: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor
    status: list[str]
    start: torch.Tensor
    scores: torch.Tensor
    distances: torch.Tensor | None = None
    rounding_changed: torch.Tensor | None = None
    tol: float = 1e-6
    kkt_tol: float = 1e-4
    margin_param: float = 0.0
    upper_bound: torch.Tensor | None = None
    region_gap: torch.Tensor | None = None
    grad_status: list[str] | None = None

    def __len__(self) -> int:
        return int(self.distance.shape[0])

    @property
    def success_rate(self) -> float:
        """Fraction of points with a certified flip point."""
        return float(self.converged.float().mean())
