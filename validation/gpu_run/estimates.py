r"""Memory and time a Lanczos run of the scale ladder needs, and the iteration caps that fit.

Before each run the memory it needs is estimated as

.. math::

    M = M_\text{now} + P + S(\text{strategy}, m),

with :math:`M_\text{now}` the memory allocated (weights, cached product state), :math:`P`
the measured peak a cached product adds (a warm-up product), and :math:`S` the solver's
own tensors for :math:`m` iterations (:func:`solver_bytes_estimate`). Every finished run
records :math:`S` beside the solver's own ledger (``LanczosResult.peak_memory_bytes``), so
the JSON shows whether the estimate covered it.

:math:`S` follows the layout of :mod:`curvops.solvers.lanczos`, which exposes no estimate
of its own: the constants below mirror its private basis layout and must follow it.
"""

from __future__ import annotations

import math

import torch

__all__ = ["fit_iters", "iters_in_time", "solver_bytes_estimate"]

# Rows per block of the solver's Krylov basis (one block of min(m+1, 64) rows first).
BASIS_BLOCK_ROWS = 64
# Float32 rows of a low-precision basis alive at once: full/selective upcast 32-row chunks
# and the next chunk is made while the last is still referenced (2 x 32); partial upcasts
# one run of consecutive rows of a block (<= 64).
UPCAST_ROWS = {"full": 64, "selective": 64, "partial": 64}
# Selective's cache of good Ritz vectors grows in blocks of this many rows.
SELECTIVE_CACHE_BLOCK_ROWS = 16


def solver_bytes_estimate(n: int, strategy: str, op_dtype: torch.dtype,
                          basis_dtype: torch.dtype, iters: int, k: int) -> dict[str, int]:
    r"""Bytes the Lanczos solver itself allocates (not the operator's).

    * ``none``: five working vectors (float32; float64 for a float64 basis) live through
      the run — the normalised start vector (held by :func:`~curvops.solvers.lanczos`), its
      rounding to the basis dtype (kept for a second pass), :math:`v_\text{prev}`,
      :math:`v` and :math:`w` — plus one vector of the basis dtype while the next vector is
      rounded;
    * ``full``/``selective``/``partial``: the start vector, :math:`v`, :math:`v_\text{prev}`
      and :math:`w` (four working vectors); the basis in blocks of :math:`\min(m+1, 64)`
      rows of the basis dtype; for a low-precision basis, up to 64 rows upcast to float32
      at once (two live 32-row chunks for full/selective, one run of a block for partial);
      selective's cache of good Ritz vectors, working vectors in 16-row blocks: assumed
      :math:`k + 2` of them (one block for :math:`k \le 14`) plus :math:`k + 2` being
      formed — good Ritz vectors at the other end of the spectrum add blocks;
    * the product's input, cast to the operator's dtype when that differs from the working
      dtype; the start vector is drawn and normalised (two copies) before anything else;
    * the verification: the k Ritz vectors, the Lanczos relation's prediction of their
      products and the products themselves (``none``: vectors and products of the second
      pass, which forms one vector per copy of a wanted value: numerically multiple copies
      add vectors this estimate does not count).

    Args:
        n: Operator size.
        strategy: ``full``, ``selective``, ``partial`` or ``none``.
        op_dtype: The operator's dtype.
        basis_dtype: The Krylov vectors' storage dtype.
        iters: Iteration cap :math:`m`.
        k: Wanted eigenvalues.

    Returns:
        The parts and their ``total``, in bytes.
    """
    work = 8 if basis_dtype == torch.float64 else 4
    b_c = torch.empty(0, dtype=basis_dtype).element_size()
    b_op = torch.empty(0, dtype=op_dtype).element_size()
    cast = n * b_op if b_op != work else 0
    parts = {"start_vector": 2 * n * work, "input_cast": cast}
    if strategy == "none":
        parts["vectors"] = 5 * n * work + n * b_c
    else:
        rows = min(iters + 1, BASIS_BLOCK_ROWS)
        parts["basis"] = math.ceil((iters + 1) / rows) * rows * n * b_c
        parts["upcast"] = 0 if b_c == work else min(UPCAST_ROWS[strategy], iters) * n * work
        parts["vectors"] = 4 * n * work
        block = SELECTIVE_CACHE_BLOCK_ROWS
        cache_rows = block * math.ceil((k + 2) / block) + k + 2
        parts["selective_cache"] = cache_rows * n * work if strategy == "selective" else 0
    parts["verification"] = 3 * k * n * work + k * n * b_op
    parts["total"] = max(parts["start_vector"], sum(v for key, v in parts.items()
                                                    if key != "start_vector"))
    return parts


def fit_iters(n: int, strategy: str, op_dtype: torch.dtype, cap: int, k: int,
              available: float) -> int:
    """The largest iteration cap ``<= cap`` whose solver estimate fits ``available`` bytes."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if solver_bytes_estimate(n, strategy, op_dtype, op_dtype, mid, k)["total"] <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


def iters_in_time(seconds: float, n: int, strategy: str, dtype: torch.dtype,
                  product_s: float, device: torch.device, cap: int) -> int:
    r"""The most iterations (``<= cap``) expected to finish in ``seconds``.

    Iteration :math:`j` costs one product (:math:`1.2\times` the measured one, for the
    vector updates) plus, for ``full``, two Gram–Schmidt passes over :math:`j` basis rows,
    each reading them twice (and, for a low-precision basis, writing and reading their
    float32 upcast): :math:`4 j n (b + 8)` bytes at an assumed 2 TB/s on a GPU, 10 GB/s on
    a CPU; selective and partial touch the basis far less (a quarter of that is assumed).
    """
    if seconds <= 0:
        return 0
    b = torch.empty(0, dtype=dtype).element_size()
    row_bytes = 4 * n * (b + (8 if b < 4 else 0))
    bandwidth = 2e12 if device.type == "cuda" else 1e10
    per_row = {"full": 1.0, "selective": 0.25, "partial": 0.25, "none": 0.0}[strategy]
    per_row *= row_bytes / bandwidth
    step = 1.2 * max(product_s, 1e-5)
    # m steps cost m * step + per_row * m^2 / 2.
    if per_row == 0.0:
        m = seconds / step
    else:
        m = (-step + math.sqrt(step * step + 2.0 * per_row * seconds)) / per_row
    return int(min(cap, max(0.0, m)))
