r"""Reorthogonalization strategies for the Lanczos recurrence.

In floating point the Lanczos vectors lose orthogonality as soon as a Ritz pair
converges (Paige 1971): the new vectors pick up components along the converged Ritz
vector, and the tridiagonal then grows *ghost* copies of converged eigenvalues. The
strategies differ in what they pay to prevent that:

* ``full``: classical Gram–Schmidt against the whole basis, twice ("twice is enough",
  Giraud et al. 2005): :math:`w \leftarrow w - V(V^\top w)`, two matrix–vector
  products with the basis, 4jn flops per iteration; orthogonality at the unit roundoff.
* ``selective`` (Parlett & Scott 1979): loss of orthogonality happens only along
  converged Ritz vectors; orthogonalize against the *good* Ritz vectors
  :math:`y_i = V s_i` whose bound :math:`\beta_{j+1}|s_{ji}|` is below a multiple of
  :math:`\sqrt{\varepsilon_A}\|T\|` (:class:`SelectiveCache`). Keeps the basis
  semi-orthogonal (:math:`\sim\sqrt{\varepsilon_A}`).
* ``partial`` (Simon 1984): the :math:`\omega`-recurrence (:func:`omega_update`) estimates
  :math:`\omega_{jk} \approx v_j^\top v_k` from the recurrence scalars alone; when
  :math:`\max_k|\omega_{j+1,k}|` exceeds :math:`\sqrt{\varepsilon_A}`, reorthogonalize this
  and the next vector against the offending range :math:`\{k: |\omega_{j+1,k}| >
  \varepsilon_A^{3/4}\}` (:func:`offending_range`).
* ``none``: no basis at all (see ``_cullum_willoughby.py``).

Here are the stored basis (:class:`KrylovBasis`), the good Ritz vectors of ``selective``
and the :math:`\omega`-recurrence; the strategy objects in ``_lanczos_strategies.py``
decide when to call them.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from ._reductions import gram, row_norms

__all__ = [
    "REORTH",
    "KrylovBasis",
    "block_rows_for",
    "SelectiveCache",
    "omega_update",
    "offending_range",
]

REORTH = ("full", "selective", "partial", "none")

# Upcasting a low-precision basis for a product with a float32 vector is done this many
# rows at a time, and never more than _UPCAST_BYTES of upcast values at once: at
# n = 1.5e9, 32 float32 rows would be a 192 GB temporary, so rows longer than the bound
# are cut into column slices (of every row chunk). Both are read at call time (patchable).
_CHUNK_ROWS = 32
_UPCAST_BYTES = 256 << 20

# Largest basis block on the CPU. glibc serves blocks above its mmap threshold (at most
# 32 MiB) with fresh pages that fault on first touch, a cost of the order of a matvec of a
# small model per run; 8 MiB blocks are recycled from the heap. CUDA's caching allocator
# has no such cost, so one large block (a single product per pass) is kept there.
_CPU_BLOCK_BYTES = 8 << 20

# Columns per slice of the CPU's float32 coefficient products (see KrylovBasis.coeffs).
_COEFF_SLICE = 1 << 16
_MAX_BLOCK_ROWS = 64


class _BlockPool:
    """CPU basis blocks of finished runs, kept (at most ``limit`` bytes) for the next run.

    A fresh block's pages fault on first touch (the kernel zeroes them), which on a short
    run of a small model costs as much as a matvec or two. Reusing the blocks of the
    previous run of the same size avoids it, the way CUDA's caching allocator does on the
    GPU (where no pool is kept). Blocks larger than the limit are never kept, so a large
    model's basis is always given back.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.blocks: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, rows: int, n: int, dtype: torch.dtype) -> torch.Tensor | None:
        with self.lock:
            for i, blk in enumerate(self.blocks):
                if blk.shape == (rows, n) and blk.dtype == dtype:
                    return self.blocks.pop(i)
        return None

    def give(self, blocks: list[torch.Tensor]) -> None:
        with self.lock:
            held = sum(b.numel() * b.element_size() for b in self.blocks)
            for blk in blocks:
                size = blk.numel() * blk.element_size()
                if held + size <= self.limit:
                    self.blocks.append(blk)
                    held += size


_POOL = _BlockPool(limit=64 << 20)


def block_rows_for(n: int, dtype: torch.dtype, device: torch.device, max_rows: int) -> int:
    """Rows per basis block: up to ``max_rows`` (and 64); on the CPU at most ~8 MiB."""
    rows = min(max_rows, _MAX_BLOCK_ROWS)
    if torch.device(device).type == "cpu":
        row_bytes = n * torch.empty(0, dtype=dtype).element_size()
        rows = min(rows, max(1, _CPU_BLOCK_BYTES // row_bytes))
    return max(1, rows)


class KrylovBasis:
    """The stored Lanczos vectors, as rows of fixed-size blocks allocated on demand.

    Blocks (rather than one (max_iters, n) tensor) keep memory proportional to the
    iterations actually run; each product below is one matrix-vector product per block
    (see :func:`block_rows_for` for the block size, and :class:`_BlockPool` for the reuse
    of CPU blocks across runs). Products with a vector ``w`` run in ``w``'s (working)
    dtype: a bf16/fp16 basis is upcast ``_CHUNK_ROWS`` rows (and at most ``_UPCAST_BYTES``)
    at a time, never as a whole.
    """

    def __init__(
        self, n: int, dtype: torch.dtype, device: torch.device, block_rows: int, ledger=None
    ) -> None:
        self.n, self.dtype, self.device = n, dtype, torch.device(device)
        self.block_rows = max(1, block_rows)
        self.blocks: list[torch.Tensor] = []
        self.ledger = ledger

    def _ensure(self, j: int) -> None:
        while j >= len(self.blocks) * self.block_rows:
            blk = None
            if self.device.type == "cpu":
                blk = _POOL.take(self.block_rows, self.n, self.dtype)
            if blk is None:
                blk = torch.empty(self.block_rows, self.n, dtype=self.dtype, device=self.device)
            if self.ledger is not None:
                self.ledger.alloc(blk)
            self.blocks.append(blk)

    def release(self) -> None:
        """Drop the blocks (CPU ones go to a small pool for the next run); no views of
        them may be in use."""
        if self.device.type == "cpu":
            _POOL.give(self.blocks)
        self.blocks = []

    def state_dict(self, rows: int) -> torch.Tensor:
        """Rows 0..rows-1 as one CPU tensor in the basis dtype, for a checkpoint.

        Copied block by block into a tensor that owns its storage (``torch.save`` of a
        view would write the whole block).
        """
        out = torch.empty(rows, self.n, dtype=self.dtype)
        start = 0
        for blk in self._views(rows):
            out[start : start + blk.shape[0]].copy_(blk)
            start += blk.shape[0]
        return out

    def load_state_dict(self, rows: torch.Tensor) -> None:
        """Restore rows 0..len(rows)-1 from :meth:`state_dict` (same blocks, same bits)."""
        if rows.ndim != 2 or rows.shape[1] != self.n or rows.dtype != self.dtype:
            raise ValueError(f"basis rows of shape {tuple(rows.shape)} and dtype {rows.dtype} "
                             f"do not fit a basis of length {self.n} in {self.dtype}")
        if rows.shape[0]:
            self._ensure(rows.shape[0] - 1)
        start = 0
        for blk in self._views(rows.shape[0]):
            blk.copy_(rows[start : start + blk.shape[0]])
            start += blk.shape[0]

    def set(self, j: int, v: torch.Tensor) -> None:
        """Store ``v`` (cast to the basis dtype: the documented rounding) as row j."""
        self._ensure(j)
        self.blocks[j // self.block_rows][j % self.block_rows].copy_(v)

    def set_scaled(self, j: int, v: torch.Tensor, scale: float) -> None:
        """Store ``scale * v`` as row j in one pass (cast to the basis dtype)."""
        self._ensure(j)
        row = self.blocks[j // self.block_rows][j % self.block_rows]
        if row.dtype == v.dtype and row.device == v.device:
            torch.mul(v, scale, out=row)
        else:
            row.copy_(v * scale)

    def subtract_rows(self, w: torch.Tensor, idx: np.ndarray, c: torch.Tensor) -> None:
        """``w -= c^T V_idx`` in place, for ascending rows ``idx``: one pass over ``w`` per
        run of consecutive rows."""
        start = 0
        for V in self._runs(idx):
            stop = start + V.shape[0]
            w.addmv_(V.to(device=w.device, dtype=w.dtype).T, c[start:stop], alpha=-1.0)
            start = stop

    def get(self, j: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.blocks[j // self.block_rows][j % self.block_rows].to(dtype=dtype,
                                                                          device=device)

    def _views(self, j: int):
        """Row blocks covering rows 0..j-1."""
        out, start = [], 0
        for blk in self.blocks:
            if start >= j:
                break
            out.append(blk[: min(self.block_rows, j - start)])
            start += self.block_rows
        return out

    def _column_slice(self, views: list[torch.Tensor], c0: int, c1: int) -> torch.Tensor:
        """Columns ``c0:c1`` of rows ``0..j-1`` (``views`` = ``_views(j)``) as one (j, c)
        tensor: a strided view when one block holds them (a thick restart's basis), else a
        small copy."""
        if len(views) == 1:
            return views[0][:, c0:c1]
        return torch.cat([b[:, c0:c1] for b in views])

    def _chunks(self, j: int, dtype: torch.dtype):
        """Rows 0..j-1 in ``dtype``, as ``(row_start, cols, tensor)``: ``tensor`` holds rows
        ``row_start .. row_start + len(tensor) - 1``, columns ``cols`` (a slice).

        A block already in ``dtype`` is yielded whole (a view, no copy). A bf16/fp16 block
        is upcast at most ``_CHUNK_ROWS`` rows and ``_UPCAST_BYTES`` bytes at a time: when
        that many full rows exceed the bound, each row chunk is cut into column slices.
        """
        full = slice(0, self.n)
        elem = torch.empty(0, dtype=dtype).element_size()
        start = 0
        for blk in self._views(j):
            if blk.dtype == dtype:
                yield start, full, blk
            else:
                rows = max(1, min(_CHUNK_ROWS, blk.shape[0]))
                cols = min(self.n, max(1, _UPCAST_BYTES // (rows * elem)))
                for i in range(0, blk.shape[0], rows):
                    if cols == self.n:
                        yield start + i, full, blk[i : i + rows].to(dtype)
                        continue
                    for c0 in range(0, self.n, cols):
                        sl = slice(c0, min(self.n, c0 + cols))
                        yield start + i, sl, blk[i : i + rows, sl].to(dtype)
            start += blk.shape[0]

    def coeffs(self, w: torch.Tensor, j: int) -> torch.Tensor:
        """``V_j w`` (length j, on ``w``'s device, no host sync)."""
        if j == 0:
            return w.new_zeros(0)
        wv = w.to(self.device)
        if (self.device.type == "cpu" and self.n > _COEFF_SLICE
                and self.dtype == wv.dtype == torch.float32):
            # A float32 product over a whole row accumulates in float32 on the CPU: on a
            # model's vectors (a few large entries among many small ones) it is off by
            # ~1e-6 ||v|| ||w|| at n = 1e6 and more beyond, which caps the orthogonality
            # every pass can reach. Column slices, summed in float64: 20x closer, as fast.
            # Block by block (a block's column slice is a strided view: nothing is copied).
            sums = []
            for blk in self._views(j):
                parts = [blk[:, c0 : c0 + _COEFF_SLICE] @ wv[c0 : c0 + _COEFF_SLICE]
                         for c0 in range(0, self.n, _COEFF_SLICE)]
                sums.append(torch.stack(parts).double().sum(0))
            return torch.cat(sums).to(wv.dtype).to(w.device)
        parts = []  # one entry per row chunk: column slices are summed into it
        for r0, cols, c in self._chunks(j, wv.dtype):
            part = c @ wv[cols]
            if parts and parts[-1][0] == r0:
                parts[-1][1].add_(part)
            else:
                parts.append((r0, part))
        h = parts[0][1] if len(parts) == 1 else torch.cat([p for _, p in parts])
        return h.to(w.device)

    def subtract(self, h: torch.Tensor, j: int, w: torch.Tensor) -> None:
        """``w -= V_j^T h`` in place (no temporary vector when the basis is beside ``w``)."""
        hv = h.to(device=self.device, dtype=w.dtype)
        same = w.device == self.device
        acc = w if same else torch.zeros(self.n, dtype=w.dtype, device=self.device)
        for r0, cols, c in self._chunks(j, w.dtype):
            acc[cols].addmv_(c.T, hv[r0 : r0 + c.shape[0]], alpha=-1.0)
        if not same:
            w.add_(acc.to(w.device))

    def combine_rows(self, S: np.ndarray, j: int, dtype: torch.dtype,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """``S^T V_j`` for a (j, p) float64 matrix ``S``: p vectors (rows), ``dtype``.

        With ``out`` ((p, n), ``dtype``, on the basis's device) the product is added to it
        in place (no temporary) and ``out`` is returned.
        """
        St = torch.as_tensor(np.ascontiguousarray(S.T), dtype=dtype, device=self.device)
        fresh = out is None
        if fresh:
            if j == 0:
                return torch.zeros(St.shape[0], self.n, dtype=dtype, device=self.device)
            # The first row chunk writes (beta=0 ignores the uninitialized values): no
            # zero-filling pass.
            out = torch.empty(St.shape[0], self.n, dtype=dtype, device=self.device)
        for r0, cols, c in self._chunks(j, dtype):
            out[:, cols].addmm_(St[:, r0 : r0 + c.shape[0]], c,
                                beta=0.0 if fresh and r0 == 0 else 1.0)
        return out

    def combine_slice(self, c: torch.Tensor, j: int, c0: int, c1: int) -> torch.Tensor:
        """``c^T V_j`` on columns ``c0:c1`` (a fresh tensor of the basis dtype)."""
        return c.to(self.dtype) @ self._column_slice(self._views(j), c0, c1)

    def row(self, j: int) -> torch.Tensor:
        """Row j itself (a view; allocated on demand), to be written in place."""
        self._ensure(j)
        return self.blocks[j // self.block_rows][j % self.block_rows]

    def _runs(self, idx: np.ndarray):
        """Views of the rows ``idx`` (ascending): one per run of consecutive rows in a block."""
        r = self.block_rows
        start = 0
        for i in range(1, idx.size + 1):
            if (i == idx.size or idx[i] != idx[i - 1] + 1
                    or idx[i] // r != idx[start] // r):
                lo, hi = int(idx[start]), int(idx[i - 1])
                yield self.blocks[lo // r][lo % r : hi % r + 1]
                start = i

    def gram(self, j: int, exact: bool = True) -> np.ndarray:
        """``V_j V_j^T`` as float64, summed over column slices of the rows.

        Each slice's product is made in float64 when ``exact``; otherwise in float32 (on
        the CPU over short slices, see :meth:`_gram_short_slices`; on a GPU in the basis
        dtype, bf16/fp16 there in float64). Either way the slices are summed in float64, so
        no product accumulates over a whole row (a float32 product over n = 1.24e8 columns
        is off by up to 7e-2 on the CPU). No float64 copy of the basis is made.
        """
        views = self._views(j)
        if not exact and self.device.type == "cpu" and self.dtype != torch.float64:
            return self._gram_short_slices(views, j)
        # On a GPU, float32 unless ``exact``.
        chunk_dtype = (torch.float64 if exact or self.device.type == "cpu"
                       or self.dtype not in (torch.float32, torch.float64) else self.dtype)
        elem = torch.empty(0, dtype=chunk_dtype).element_size()
        G = torch.zeros(j, j, dtype=torch.float64, device=self.device)
        # CPU: a slice of about 8 MiB that stays in cache for its product. GPU: ~256 MiB
        # slices (8192 columns would make ~15 k launch-bound steps at n = 124 M).
        budget = (8 << 20) if self.device.type == "cpu" else (256 << 20)
        cols = max(1 << 12, budget // (elem * max(j, 1)))
        for c0 in range(0, self.n, cols):
            X = self._column_slice(views, c0, c0 + cols).to(chunk_dtype)
            if chunk_dtype == torch.float64:
                G.addmm_(X, X.T)
            else:
                G += (X @ X.T).double()
        return G.cpu().numpy()

    def _gram_short_slices(self, views: list[torch.Tensor], j: int) -> np.ndarray:
        """``V_j V_j^T`` on the CPU from :func:`gram`'s short float32 products, summed in
        float64, block by block (the upper pairs: no copy of the rows): 3-4x faster than
        float64 slices of the rows, and within 1e-8 to 3e-8 of the exact Gram matrix
        of orthonormal rows, against a float32 basis's own ~1e-7."""
        G = np.zeros((j, j))
        starts = np.cumsum([0] + [v.shape[0] for v in views])
        for a, Va in enumerate(views):
            for b in range(a, len(views)):
                block = gram(Va, views[b]).numpy()
                if b == a:  # a float32 product of a block with itself is not exactly symmetric
                    block = (block + block.T) / 2
                G[starts[a] : starts[a + 1], starts[b] : starts[b + 1]] = block
                G[starts[b] : starts[b + 1], starts[a] : starts[a + 1]] = block.T
        return G

    def rotate(self, Q: np.ndarray, j: int) -> None:
        r"""Rows ``0..p-1`` become :math:`Q^\top V_j` for a (j, p) float64 ``Q``, p <= j, in
        place.

        Column slice by column slice: each slice of the j rows is multiplied (a strided
        view when one block holds the rows) and written back, so no n-long temporary is
        made (a thick restart's basis is as large as memory allows). Rows ``p..j-1`` keep
        their values.
        """
        p = Q.shape[1]
        if p > j or Q.shape[0] != j:
            raise ValueError(f"a ({Q.shape[0]}, {p}) rotation does not fit {j} rows")
        Qt = torch.as_tensor(np.ascontiguousarray(Q.T), dtype=self.dtype, device=self.device)
        views = self._views(j)
        one_block = len(views) == 1
        targets = None if one_block else [self.row(i) for i in range(p)]
        # CPU: slices of ~4 MiB that stay in cache; GPU: ~256 MiB slices (few launches).
        elem = torch.empty(0, dtype=self.dtype).element_size()
        budget = (4 << 20) if self.device.type == "cpu" else (256 << 20)
        cols = max(1 << 12, budget // (elem * j))
        buf = torch.empty(p, min(cols, self.n), dtype=self.dtype, device=self.device)
        for c0 in range(0, self.n, cols):
            c1 = min(self.n, c0 + cols)
            Y = torch.mm(Qt, self._column_slice(views, c0, c1), out=buf[:, : c1 - c0])
            if one_block:
                views[0][:p, c0:c1].copy_(Y)
            else:
                for i, row in enumerate(targets):
                    row[c0:c1].copy_(Y[i])

    def cgs(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        r"""One classical Gram–Schmidt pass against rows 0..j-1, in place on ``w`` (owned)."""
        h = self.coeffs(w, j)
        if j:
            self.subtract(h, j, w)
        return w, h

    def cgs2(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Classical Gram–Schmidt applied twice (the ``full`` strategy).

        Returns:
            ``(w_new, h1 + h2)``: the sum of both passes' coefficients is what ``w`` had
            along the basis (used by the Rayleigh–Ritz step of a low-precision basis).
        """
        w, h1 = self.cgs(w, j)
        w, h2 = self.cgs(w, j)
        return w, h1 + h2

    def row_coeffs(self, idx: np.ndarray, w: torch.Tensor) -> torch.Tensor:
        """``V_idx w`` for ascending row indices ``idx`` (on ``w``'s device, no host sync)."""
        wv = w.to(self.device)
        return torch.cat([V.to(wv.dtype) @ wv for V in self._runs(idx)]).to(w.device)

    def project_rows(
        self, idx: np.ndarray, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """One CGS pass of ``w`` against the rows ``idx`` (partial reorthogonalization).

        Returns:
            ``(w, h, rows)``: ``w`` updated in place, the coefficients ``h`` it had along
            ``rows`` (``idx`` sorted), for the record of the Lanczos relation.
        """
        rows = np.sort(np.asarray(idx, dtype=np.int64))
        if rows.size == 0:
            return w, w.new_zeros(0), rows
        # Classical: every coefficient from the same w, then one update per run of rows.
        h = self.row_coeffs(rows, w)
        self.subtract_rows(w, rows, h)
        return w, h, rows


def omega_update(
    omega_prev: np.ndarray,
    omega_cur: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    beta_next: float,
    eps1: float,
    tnorm: float,
) -> np.ndarray:
    r"""Simon's :math:`\omega`-recurrence: estimates of :math:`v_{j+1}^\top v_k`, k = 0..j+1.

    With 0-based vectors :math:`v_0..v_j`, :math:`\alpha_k` the diagonal and
    :math:`\beta_k` the coupling of :math:`v_{k-1}, v_k` (:math:`\beta_0 = 0`):

    .. math::

        \beta_{j+1}\omega_{j+1,k} = \beta_{k+1}\omega_{j,k+1} + (\alpha_k-\alpha_j)\omega_{j,k}
            + \beta_k\omega_{j,k-1} - \beta_j\omega_{j-1,k}
            \pm \epsilon_1(\beta_{k+1}+\beta_{j+1}+2\|T\|),

    the last term modelling the rounding errors (Simon 1984). The rounding of a step,
    :math:`v_k^\top f_j`, scales with :math:`\|A\|` (the product and the subtraction of
    :math:`\alpha_j v_j`), not only with the couplings: with :math:`\beta` alone the
    estimates run far low once the couplings fall below the leading eigenvalues, and the
    invariant subspace of a low-rank operator goes unnoticed (PROPACK adds
    :math:`\epsilon_1\|A\|` likewise). Then :math:`\omega_{j+1,j} = \epsilon_1` (local
    orthogonality is kept explicitly) and :math:`\omega_{j+1,j+1} = 1`.

    Args:
        omega_prev: :math:`\omega_{j-1,\cdot}`, length j (ignored when j = 0).
        omega_cur: :math:`\omega_{j,\cdot}`, length j + 1.
        alpha: :math:`\alpha_0..\alpha_j`.
        beta: :math:`\beta_0..\beta_j` (``beta[0] = 0``).
        beta_next: :math:`\beta_{j+1}`.
        eps1: The rounding-noise level.
        tnorm: :math:`\|T\|` (an estimate of :math:`\|A\|`) so far.

    Returns:
        :math:`\omega_{j+1,\cdot}`, length j + 2.
    """
    j = alpha.size - 1
    out = np.empty(j + 2)
    out[j + 1] = 1.0
    out[j] = eps1
    if j == 0 or beta_next == 0.0:
        out[: j + 1] = eps1
        out[j + 1] = 1.0
        return out
    k = np.arange(j)
    # beta_{k+1}: coupling of v_k and v_{k+1}; beta_k with beta_0 = 0.
    b_k1 = beta[k + 1]
    b_k = beta[k]
    om_km1 = np.concatenate([[0.0], omega_cur[: j - 1]])
    t = (
        b_k1 * omega_cur[k + 1]
        + (alpha[k] - alpha[j]) * omega_cur[k]
        + b_k * om_km1
        - beta[j] * omega_prev[k]
    )
    t = t + np.where(t >= 0, 1.0, -1.0) * eps1 * (b_k1 + beta_next + 2.0 * tnorm)
    out[:j] = t / beta_next
    return out


def offending_range(omega: np.ndarray, eta: float) -> np.ndarray:
    r"""Indices k (excluding the newest vector) with :math:`|\omega_k| > \eta`."""
    return np.flatnonzero(np.abs(omega[:-1]) > eta)


class SelectiveCache:
    r"""The good Ritz vectors of selective orthogonalization (Parlett & Scott 1979).

    A Ritz pair :math:`(\theta_i, y_i = V_j s_i)` is *good* once its bound
    :math:`\beta_{j+1}|s_{ji}| \le c\sqrt{\varepsilon_A}\,\|T_j\|` (``c = noise``, the
    rounding of a step in units of :math:`\varepsilon_A\|A\|`, capped as below), with
    :math:`\varepsilon_A` the precision of the process (the larger of the basis's and the
    operator's epsilon: a bf16 product carries noise of order :math:`2^{-8}` whatever the
    basis). Each good vector is formed once (jn flops) when it becomes good; every later
    Lanczos vector is orthogonalized against the cache, 4gn flops for g cached vectors.

    The cache is kept **orthonormal** (a new vector is orthogonalized twice against it):
    every cached vector lies in the span of the basis, to which the exact next Lanczos
    vector is orthogonal, so projecting against an orthonormal cache can only remove
    error. Without it, Ritz vectors cached at different iterations can overlap strongly
    (in bf16, :math:`\sqrt{\varepsilon_A} = 0.088` admits rough ones), one Gram–Schmidt
    pass is then no projection, and the recurrence can diverge.

    Whether a candidate is already represented is decided on its *coefficients*, on the
    host, before forming anything: with a semi-orthogonal basis the span of the cached
    coefficient vectors (zero-padded to length j) mirrors the span of the cached vectors.
    A candidate whose coefficients lie in it up to a residual of ``REPRESENTED`` is the
    cached vector converged further. (Comparing values within
    :math:`\sqrt{\varepsilon_A}\|T\|` instead would merge distinct eigenvalues closer
    than that, such as 0.763 and 0.701 in bf16, and leave the second one unprotected:
    ghosts.)
    """

    #: Residual (of a unit candidate against the cached span) below which it is cached.
    REPRESENTED = 0.1

    def __init__(
        self, n: int, dtype: torch.dtype, device: torch.device, eps: float, ledger=None,
        noise: float = 1.0,
    ) -> None:
        # Good once the bound is below noise * sqrt(eps) ||T||: a step's rounding is
        # ~noise * eps ||A|| (see the omega-recurrence), and the loss it causes along a
        # Ritz vector, that rounding over its bound, must stay below sqrt(eps). Capped at
        # 0.1 (or sqrt(eps) where that is larger: bf16) so no rough vector counts as good.
        self.noise = noise
        self.good_bound = 0.0
        self.set_precision(eps)
        self.coefficients: list[np.ndarray] = []
        # Stored like the Krylov basis (recycled blocks, no copy of the cache per addition).
        self.Y = KrylovBasis(n, dtype, device, block_rows_for(n, dtype, device, 16), ledger)
        self._count = 0

    @property
    def count(self) -> int:
        return self._count

    def set_precision(self, eps: float, boost: float = 1.0) -> None:
        """Follow the process precision (raised as the run measures the operator);
        ``boost`` > 1 admits rougher vectors after orthogonality was found lost."""
        self.good_bound = min(boost * self.noise * math.sqrt(eps), max(math.sqrt(eps), 0.1))

    def new_good(
        self, theta: np.ndarray, S: np.ndarray, bounds: np.ndarray, tnorm: float
    ) -> np.ndarray:
        r"""Indices of Ritz values that became good and are not represented in the cache.

        Args:
            theta: Ritz values of :math:`T_j`.
            S: Their eigenvectors (columns), (j, len(theta)).
            bounds: Their residual bounds.
            tnorm: :math:`\|T_j\|`.
        """
        good = np.flatnonzero(bounds <= self.good_bound * tnorm)
        if not self.coefficients or good.size == 0:
            return good
        j = S.shape[0]
        C = np.zeros((j, len(self.coefficients)))
        for c, col in enumerate(self.coefficients):
            C[: col.size, c] = col
        Q, _ = np.linalg.qr(C)
        R = S[:, good] - Q @ (Q.T @ S[:, good])
        return good[np.linalg.norm(R, axis=0) > self.REPRESENTED]

    def add(self, S_new: np.ndarray, Y_new: torch.Tensor) -> None:
        """Orthonormalize the rows of ``Y_new`` against the cache and append those with a
        residual above ``REPRESENTED`` (one host synchronisation, only when adding)."""
        self.coefficients.extend(np.array(S_new[:, i]) for i in range(S_new.shape[1]))
        Y_new = Y_new.to(self.Y.dtype)  # owned: combine_rows returns a fresh tensor
        Y_new.div_(row_norms(Y_new)[:, None].to(Y_new.dtype))
        # Against the cache: block classical Gram–Schmidt, twice.
        for _ in range(2):
            if self._count:
                views = self.Y._views(self._count)
                H = [blk @ Y_new.T for blk in views]  # (rows, p) per block
                for blk, h in zip(views, H):
                    Y_new.addmm_(h.T, blk, alpha=-1.0)
        # Among themselves, in order, on their Gram matrix (one synchronisation): row i
        # keeps its part orthogonal to the accepted earlier rows if that is > REPRESENTED.
        K = gram(Y_new).cpu().numpy()
        p = K.shape[0]
        L = np.zeros((p, p))  # accepted rows = L @ Y_new (orthonormal by construction)
        kept: list[int] = []
        for i in range(p):
            c = np.zeros(p)
            c[i] = 1.0
            for _ in range(2 if kept else 0):  # Gram–Schmidt on coefficients, twice
                c = c - L[kept].T @ (L[kept] @ (K @ c))
            nrm2 = float(c @ K @ c)
            if nrm2 > self.REPRESENTED**2:
                L[i] = c / math.sqrt(nrm2)
                kept.append(i)
        if not kept:
            return
        Lt = torch.as_tensor(L[kept], dtype=Y_new.dtype, device=Y_new.device)
        for r in range(Lt.shape[0]):  # straight into the cache's rows (no temporary)
            row = self.Y.row(self._count)
            if row.dtype == Y_new.dtype:
                torch.mv(Y_new.T, Lt[r], out=row)
            else:
                row.copy_(Y_new.T @ Lt[r])
            self._count += 1

    def state_dict(self) -> dict[str, object]:
        """The cached vectors, their coefficients and the good bound, for a checkpoint."""
        return {
            "coefficients": [torch.from_numpy(np.array(c, dtype=np.float64))
                             for c in self.coefficients],
            "vectors": self.Y.state_dict(self._count),
            "good_bound": float(self.good_bound),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.coefficients = [c.numpy() for c in state["coefficients"]]
        self.Y.load_state_dict(state["vectors"])
        self._count = int(state["vectors"].shape[0])
        self.good_bound = float(state["good_bound"])

    def project(self, w: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Orthogonalize ``w`` against the good Ritz vectors ``start..count-1`` (one CGS
        pass; no sync).

        Args:
            w: The vector, updated in place.
            start: First cached vector to project against; the earlier ones are those
                ``w`` was already projected against (see the selective strategy).

        Returns:
            ``(w, d)``: ``w`` updated in place and its coefficients ``d`` along the cache
            (length ``count``, zero on the rows before ``start``).
        """
        if self._count <= start:
            return w, w.new_zeros(self._count)
        if start == 0:
            return self.Y.cgs(w, self._count)
        w, h, _ = self.Y.project_rows(np.arange(start, self._count), w)
        return w, torch.cat([h.new_zeros(start), h])
