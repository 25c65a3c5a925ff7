r"""Memory and time a Lanczos run of the scale ladder needs, and the iteration caps that fit.

Before each run the memory it needs is estimated as

.. math::

    M = M_\text{now} + P + S(\text{strategy}, m),

with :math:`M_\text{now}` the memory allocated (weights, cached product state), :math:`P`
the measured peak a cached product adds (a warm-up product), and :math:`S` the solver's
own tensors for :math:`m` iterations
(:func:`~curvops.solvers.memory_estimate.lanczos_memory_bytes`). Every finished run records
:math:`S` beside the solver's own ledger (``LanczosResult.peak_memory_bytes``), so the JSON
shows whether the estimate covered it.
"""

from __future__ import annotations

import math

import torch
from curvops.solvers.memory_estimate import lanczos_memory_bytes

__all__ = ["fit_iters", "iters_in_time"]

def fit_iters(n: int, strategy: str, op_dtype: torch.dtype, cap: int, k: int,
              available: float) -> int:
    """The largest iteration cap ``<= cap`` whose solver estimate fits ``available`` bytes."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if lanczos_memory_bytes(n, strategy, op_dtype, op_dtype, mid, k)["total"] <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


def iters_in_time(seconds: float, n: int, strategy: str, dtype: torch.dtype,
                  product_s: float, device: torch.device, cap: int,
                  ncv: int | None = None) -> int:
    r"""The most iterations (``<= cap``) expected to finish in ``seconds``.

    Iteration :math:`j` costs one product (:math:`1.2\times` the measured one, for the
    vector updates) plus, for ``full``, two Gram–Schmidt passes over :math:`j` basis rows,
    each reading them twice (and, for a low-precision basis, writing and reading their
    float32 upcast): :math:`4 j n (b + 8)` bytes at an assumed 2 TB/s on a GPU, 10 GB/s on
    a CPU; selective and partial touch the basis far less (a quarter of that is assumed).
    With a thick restart (``ncv``) the passes cover at most ``ncv`` rows: the cost of a
    step stops growing there.
    """
    if seconds <= 0:
        return 0
    b = torch.empty(0, dtype=dtype).element_size()
    row_bytes = 4 * n * (b + (8 if b < 4 else 0))
    bandwidth = 2e12 if device.type == "cuda" else 1e10
    per_row = {"full": 1.0, "selective": 0.25, "partial": 0.25, "none": 0.0}[strategy]
    per_row *= row_bytes / bandwidth
    step = 1.2 * max(product_s, 1e-5)
    if ncv is not None:
        return int(min(cap, max(0.0, seconds / (step + per_row * ncv))))
    # m steps cost m * step + per_row * m^2 / 2.
    if per_row == 0.0:
        m = seconds / step
    else:
        m = (-step + math.sqrt(step * step + 2.0 * per_row * seconds)) / per_row
    return int(min(cap, max(0.0, m)))
