"""flipfrag — closest flip points and the fragility of interpretations, reproduced in PyTorch.

Modules (one concept each): ``profiles``, ``datasets``, ``models``, ``smooth``, ``flip`` (a package: the solver,
its options and its implicit derivative), ``saliency`` (a package: gradient methods, propagation rules, maps),
``defenses`` (SmoothGrad, sparsified SmoothGrad and its certificate, beta-smoothed maps), ``attacks``, ``metrics``,
``faithfulness``, ``influence``, ``hessian``; the studies ``flippoints`` (paper 1), ``fragility`` (paper 2),
``beyond``; ``plotting``; ``engine`` runs the heavy work (in process or on a Dask cluster, ``FLIPFRAG_SCHEDULER``)
with resumable, checksummed caches. Entry points with many settings take them as one frozen options object plus
keyword overrides (``options=None, **overrides``; :class:`flipfrag.flip.FlipOptions` and the others built on
``flipfrag._options.Options``).

``import flipfrag`` changes no global state. :func:`set_threads` sets torch's thread count when asked: the runner
(``python -m flipfrag.runner``, ``make figures``) and ``make test`` pass ``FLIPFRAG_THREADS`` and every notebook's
:func:`flipfrag.plotting.start_run` applies it.
"""

import os as _os

__version__ = "0.1.0"

__all__ = ["set_threads", "THREADS_ENV"]

#: Environment variable read by :func:`set_threads` when no count is given.
THREADS_ENV = "FLIPFRAG_THREADS"


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count for this process and return the count in effect.

    ``n``: the count (>= 1). ``None``: ``$FLIPFRAG_THREADS`` if set, otherwise torch's setting is left alone. On a
    small machine shared by several jobs, more threads than free cores slow small models down (the reference machine
    has 2 cores; ``make`` uses 2).
    """
    import torch

    if n is None:
        raw = _os.environ.get(THREADS_ENV, "").strip()
        if not raw:
            return torch.get_num_threads()
        try:
            n = int(raw)
        except ValueError:
            raise ValueError(f"${THREADS_ENV} must be a positive integer, got {raw!r}") from None
        name = f"${THREADS_ENV}"
    else:
        name = "n"
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    torch.set_num_threads(n)
    return n
