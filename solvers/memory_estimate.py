r"""What a Lanczos run itself allocates, estimated before it starts.

:func:`lanczos_memory_bytes` follows the layout of :mod:`curvops.solvers.lanczos` (its
Krylov basis in blocks, its working vectors, the verification of the Ritz pairs), so a
front door can choose a strategy that fits a memory budget before the first product, and
a finished run's ledger (``LanczosResult.peak_memory_bytes``) can be compared with it.
The operator's own memory (its cache, a product's temporaries) is not included.
"""

from __future__ import annotations

import math

import torch

__all__ = ["lanczos_memory_bytes"]

# Rows per block of the solver's Krylov basis (one block of min(m+1, 64) rows first).
BASIS_BLOCK_ROWS = 64
# Float32 rows of a low-precision basis alive at once: full/selective upcast 32-row chunks
# and the next chunk is made while the last is still referenced (2 x 32); partial upcasts
# one run of consecutive rows of a block (<= 64).
UPCAST_ROWS = {"full": 64, "selective": 64, "partial": 64}
# Selective's cache of good Ritz vectors grows in blocks of this many rows.
SELECTIVE_CACHE_BLOCK_ROWS = 16


def lanczos_memory_bytes(n: int, strategy: str, op_dtype: torch.dtype,
                          basis_dtype: torch.dtype, iters: int, k: int, *,
                          ncv: int | None = None,
                          return_eigenvectors: bool = True) -> dict[str, int]:
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
      products (reused as the check's scratch) and the products themselves (plus their
      cast to the working dtype when the operator's dtype differs); ``none``: the Ritz
      vectors and their products accumulated by the second pass, in the working dtype, one
      per copy of a wanted value (k more rows are allowed for numerical copies; more
      copies than that add vectors this estimate does not count).

    * ``full`` with a thick restart (``ncv`` below the iterations): ``ncv`` basis rows,
      the start vector and one working vector (the residual :math:`w`); the verification
      works one pair at a time on the basis's own rows (one product, the operator's own
      memory, with the prediction made slice by slice), plus the k returned unit Ritz
      vectors when ``return_eigenvectors``. ``at_first_product`` is what it holds while
      its first product runs: the start vector and the first basis row (a CPU basis's
      other rows take memory only as they are written; on CUDA all of ``total`` is
      allocated by then).

    Args:
        n: Operator size.
        strategy: ``full``, ``selective``, ``partial`` or ``none``.
        op_dtype: The operator's dtype.
        basis_dtype: The Krylov vectors' storage dtype.
        iters: Iteration cap :math:`m`.
        k: Wanted eigenvalues.
        ncv: The thick restart's basis bound (``full`` only); None: no restart.
        return_eigenvectors: Whether the Ritz vectors are returned (the thick restart's
            verification needs no copy of them otherwise).

    Returns:
        The parts and their ``total``, in bytes.
    """
    work = 8 if basis_dtype == torch.float64 else 4
    b_c = torch.empty(0, dtype=basis_dtype).element_size()
    b_op = torch.empty(0, dtype=op_dtype).element_size()
    cast = n * b_op if b_op != work else 0
    parts = {"start_vector": 2 * n * work, "input_cast": cast}
    if strategy == "full" and ncv is not None and ncv < min(iters, n):
        rows = min(ncv, BASIS_BLOCK_ROWS)
        parts["basis"] = math.ceil(ncv / rows) * rows * n * b_c
        parts["vectors"] = n * work  # w (the start vector is row 0 of the basis)
        parts["verification"] = k * n * work if return_eigenvectors else 0
        parts["total"] = max(parts["start_vector"], sum(
            v for key, v in parts.items() if key != "start_vector"))
        parts["at_first_product"] = parts["start_vector"] + n * b_c + cast
        return parts
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
    if strategy == "none":
        # The second pass accumulates the Ritz vectors and their products (work dtype), one
        # per copy of a wanted value: a block of k more rows allows for numerical copies.
        parts["verification"] = 3 * k * n * work
    else:
        # Ritz vectors, the relation's prediction (the check's scratch) and the batched
        # product, cast to the working dtype when the operator's differs.
        parts["verification"] = 3 * k * n * work + (k * n * b_op if b_op != work else 0)
    parts["total"] = max(parts["start_vector"], sum(v for key, v in parts.items()
                                                    if key != "start_vector"))
    return parts


