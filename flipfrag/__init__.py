"""flipfrag — closest flip points and the fragility of interpretations, reproduced in PyTorch.

Modules (one concept each): ``profiles``, ``datasets``, ``models``, ``smooth``, ``flip``, ``flipstats``,
``saliency``, ``attacks``, ``metrics``, ``influence``, ``hessian``, ``plotting``; ``engine`` runs the heavy work
(in process or on a Dask cluster, ``FLIPFRAG_SCHEDULER``) with resumable, checksummed caches.
"""

import os as _os

import torch as _torch

__version__ = "0.1.0"

# The reference machine has 2 cores; more threads than cores slows small models down. FLIPFRAG_THREADS overrides.
_torch.set_num_threads(int(_os.environ.get("FLIPFRAG_THREADS", "2")))
