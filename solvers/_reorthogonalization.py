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
  :math:`y_i = V s_i` whose bound :math:`\beta_{j+1}|s_{ji}| \le \sqrt{\varepsilon}\|T\|`.
  Keeps the basis semi-orthogonal (:math:`\sim\sqrt\varepsilon`).
* ``partial`` (Simon 1984): the :math:`\omega`-recurrence estimates
  :math:`\omega_{jk} \approx v_j^\top v_k` from the recurrence scalars alone; when
  :math:`\max_k|\omega_{j+1,k}|` exceeds :math:`\sqrt{\varepsilon/m}`, reorthogonalize this
  and the next vector against the offending range :math:`\{k: |\omega_{j+1,k}| >
  \varepsilon^{3/4}\}`.
* ``none``: no basis at all (see ``_tridiagonal.cullum_willoughby``).

These helpers are pure functions of tensors (and one small cache class); the Lanczos
loop in ``lanczos.py`` decides when to call them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = [
    "REORTH",
    "KrylovBasis",
    "SelectiveCache",
    "cgs",
    "omega_update",
    "offending_range",
]

REORTH = ("full", "selective", "partial", "none")

# Upcasting a low-precision basis for a product with a float32 vector is done this many
# rows at a time, so the temporary costs at most this many float32 vectors.
_CHUNK_ROWS = 32


class KrylovBasis:
    """The stored Lanczos vectors, as rows of fixed-size blocks allocated on demand.

    Blocks (rather than one (max_iters, n) tensor) keep memory proportional to the
    iterations actually run; with ``max_iters`` up to ``block_rows`` it is one
    preallocated tensor and every product below is a single matrix-vector product.
    Products with a vector ``w`` run in ``w``'s (working) dtype: a bf16/fp16 basis is
    upcast ``_CHUNK_ROWS`` rows at a time, never as a whole.
    """

    def __init__(
        self, n: int, dtype: torch.dtype, device: torch.device, block_rows: int, ledger=None
    ) -> None:
        self.n, self.dtype, self.device = n, dtype, device
        self.block_rows = max(1, block_rows)
        self.blocks: list[torch.Tensor] = []
        self.ledger = ledger

    def _ensure(self, j: int) -> None:
        while j >= len(self.blocks) * self.block_rows:
            blk = torch.empty(self.block_rows, self.n, dtype=self.dtype, device=self.device)
            if self.ledger is not None:
                self.ledger.alloc(blk)
            self.blocks.append(blk)

    def set(self, j: int, v: torch.Tensor) -> None:
        """Store ``v`` (cast to the basis dtype: the documented rounding) as row j."""
        self._ensure(j)
        self.blocks[j // self.block_rows][j % self.block_rows].copy_(v)

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

    def _chunks(self, j: int, dtype: torch.dtype):
        for blk in self._views(j):
            if blk.dtype == dtype:
                yield blk
            else:
                for i in range(0, blk.shape[0], _CHUNK_ROWS):
                    yield blk[i : i + _CHUNK_ROWS].to(dtype)

    def coeffs(self, w: torch.Tensor, j: int) -> torch.Tensor:
        """``V_j w`` (length j, on ``w``'s device, no host sync)."""
        if j == 0:
            return w.new_zeros(0)
        wv = w.to(self.device)
        parts = [c @ wv for c in self._chunks(j, wv.dtype)]
        h = parts[0] if len(parts) == 1 else torch.cat(parts)
        return h.to(w.device)

    def subtract(self, h: torch.Tensor, j: int, w: torch.Tensor) -> None:
        """``w -= V_j^T h`` in place (no temporary vector when the basis is beside ``w``)."""
        hv = h.to(device=self.device, dtype=w.dtype)
        same = w.device == self.device
        acc = w if same else torch.zeros(self.n, dtype=w.dtype, device=self.device)
        start = 0
        for c in self._chunks(j, w.dtype):
            acc.addmv_(c.T, hv[start : start + c.shape[0]], alpha=-1.0)
            start += c.shape[0]
        if not same:
            w.add_(acc.to(w.device))

    def combine_rows(self, S: np.ndarray, j: int, dtype: torch.dtype) -> torch.Tensor:
        """``S^T V_j`` for a (j, p) float64 matrix ``S``: p vectors (rows), ``dtype``."""
        St = torch.as_tensor(np.ascontiguousarray(S.T), dtype=dtype, device=self.device)
        out = torch.zeros(St.shape[0], self.n, dtype=dtype, device=self.device)
        start = 0
        for c in self._chunks(j, dtype):
            out.addmm_(St[:, start : start + c.shape[0]], c)
            start += c.shape[0]
        return out

    def gather(self, idx: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        lo, hi = (int(idx[0]), int(idx[-1])) if idx.size else (0, -1)
        if (idx.size and hi - lo + 1 == idx.size and lo // self.block_rows == hi // self.block_rows
                and dtype == self.dtype):
            # A contiguous range inside one block (the usual offending range): a view.
            return self.blocks[lo // self.block_rows][lo % self.block_rows : hi % self.block_rows
                                                      + 1]
        rows = [self.get(int(i), dtype, self.device) for i in idx]
        return torch.stack(rows) if rows else torch.zeros(0, self.n, dtype=dtype,
                                                          device=self.device)

    def gram(self, j: int, exact: bool = True) -> np.ndarray:
        """``V_j V_j^T``: in float64 by column chunks (no float64 copy of the basis) when
        ``exact`` or the basis is bf16/fp16, else in the basis dtype with no copy."""
        views = self._views(j)
        if not exact and self.dtype in (torch.float32, torch.float64):
            G = torch.zeros(j, j, dtype=self.dtype, device=self.device)
            for a, Va in enumerate(views):
                for b, Vb in enumerate(views):
                    G[a * self.block_rows : a * self.block_rows + Va.shape[0],
                      b * self.block_rows : b * self.block_rows + Vb.shape[0]] = Va @ Vb.T
            return G.double().cpu().numpy()
        G = torch.zeros(j, j, dtype=torch.float64, device=self.device)
        cols = 1 << 16
        for c0 in range(0, self.n, cols):
            X = torch.cat([b[:, c0 : c0 + cols] for b in views]).to(torch.float64)
            G.addmm_(X, X.T)
        return G.cpu().numpy()

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

    def project_rows(self, idx: np.ndarray, w: torch.Tensor) -> torch.Tensor:
        """One CGS pass of ``w`` against the rows ``idx`` (partial reorthogonalization)."""
        if idx.size == 0:
            return w
        return cgs(self.gather(idx, w.dtype), w)[0]


def cgs(V: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One classical Gram–Schmidt pass against the rows of ``V``, in place on ``w`` (owned).

    Returns:
        ``(w_new, h)``; ``h`` stays on the device (no host synchronisation).
    """
    if V.shape[0] == 0:
        return w, w.new_zeros(0)
    Vw = V.to(device=w.device, dtype=w.dtype)
    h = Vw @ w
    return w.addmv_(Vw.T, h, alpha=-1.0), h


def omega_update(
    omega_prev: np.ndarray,
    omega_cur: np.ndarray,
    alpha: np.ndarray,
    beta: np.ndarray,
    beta_next: float,
    eps1: float,
) -> np.ndarray:
    r"""Simon's :math:`\omega`-recurrence: estimates of :math:`v_{j+1}^\top v_k`, k = 0..j+1.

    With 0-based vectors :math:`v_0..v_j`, :math:`\alpha_k` the diagonal and
    :math:`\beta_k` the coupling of :math:`v_{k-1}, v_k` (:math:`\beta_0 = 0`):

    .. math::

        \beta_{j+1}\omega_{j+1,k} = \beta_{k+1}\omega_{j,k+1} + (\alpha_k-\alpha_j)\omega_{j,k}
            + \beta_k\omega_{j,k-1} - \beta_j\omega_{j-1,k}
            \pm \epsilon_1(\beta_{k+1}+\beta_{j+1}),

    the last term modelling the rounding errors (Simon 1984; PROPACK's
    :math:`\epsilon_1 = \sqrt{n}\,\varepsilon/2`), then :math:`\omega_{j+1,j} = \epsilon_1`
    (local orthogonality is kept explicitly) and :math:`\omega_{j+1,j+1} = 1`.

    Args:
        omega_prev: :math:`\omega_{j-1,\cdot}`, length j (ignored when j = 0).
        omega_cur: :math:`\omega_{j,\cdot}`, length j + 1.
        alpha: :math:`\alpha_0..\alpha_j`.
        beta: :math:`\beta_0..\beta_j` (``beta[0] = 0``).
        beta_next: :math:`\beta_{j+1}`.
        eps1: The rounding-noise level.

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
    t = t + np.where(t >= 0, 1.0, -1.0) * eps1 * (b_k1 + beta_next)
    out[:j] = t / beta_next
    return out


def offending_range(omega: np.ndarray, eta: float) -> np.ndarray:
    r"""Indices k (excluding the newest vector) with :math:`|\omega_k| > \eta`."""
    return np.flatnonzero(np.abs(omega[:-1]) > eta)


class SelectiveCache:
    r"""The good Ritz vectors of selective orthogonalization (Parlett & Scott 1979).

    A Ritz pair :math:`(\theta_i, y_i = V_j s_i)` is *good* once its bound
    :math:`\beta_{j+1}|s_{ji}| \le \sqrt{\varepsilon_A}\,\|T_j\|`, with
    :math:`\varepsilon_A` the precision of the process (the larger of the basis's and the
    operator's epsilon: a bf16 product carries noise of order :math:`2^{-8}` whatever the
    basis). Each good vector is formed once (jn flops) when it becomes good; every later
    Lanczos vector is orthogonalized against the cache, 4gn flops for g cached vectors.

    The cache is kept **orthonormal** (a new vector is orthogonalized twice against it):
    every cached vector lies in the span of the basis, to which the exact next Lanczos
    vector is orthogonal, so projecting against an orthonormal cache can only remove
    error. Without it, Ritz vectors cached at different iterations overlap (0.76 measured
    on a bf16 GGN, where :math:`\sqrt{\varepsilon_A} = 0.088` admits rough ones), one
    Gram–Schmidt pass is no projection, and the recurrence diverged.

    Whether a candidate is already represented is decided on its *coefficients*, on the
    host, before forming anything: with a semi-orthogonal basis the span of the cached
    coefficient vectors (zero-padded to length j) mirrors the span of the cached vectors.
    A candidate whose coefficients lie in it up to a residual of ``REPRESENTED`` is the
    cached vector converged further. (Comparing values within
    :math:`\sqrt{\varepsilon_A}\|T\|`, as the first version did, wrongly merged distinct
    eigenvalues closer than that, e.g. 0.763 and 0.701 in bf16, and left the second one
    unprotected: ghosts.)
    """

    #: Residual (of a unit candidate against the cached span) below which it is cached.
    REPRESENTED = 0.1

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, eps: float) -> None:
        self.sqrt_eps = math.sqrt(eps)
        self.values: list[float] = []
        self.coefficients: list[np.ndarray] = []
        self.Y = torch.zeros(0, n, dtype=dtype, device=device)

    @property
    def count(self) -> int:
        return self.Y.shape[0]

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
        good = np.flatnonzero(bounds <= self.sqrt_eps * tnorm)
        if not self.coefficients or good.size == 0:
            return good
        j = S.shape[0]
        C = np.zeros((j, len(self.coefficients)))
        for c, col in enumerate(self.coefficients):
            C[: col.size, c] = col
        Q, _ = np.linalg.qr(C)
        R = S[:, good] - Q @ (Q.T @ S[:, good])
        return good[np.linalg.norm(R, axis=0) > self.REPRESENTED]

    def add(self, theta_new: np.ndarray, S_new: np.ndarray, Y_new: torch.Tensor) -> None:
        """Orthonormalize the rows of ``Y_new`` against the cache and append those with a
        residual above ``REPRESENTED`` (one host synchronisation, only when adding)."""
        self.coefficients.extend(np.array(S_new[:, i]) for i in range(S_new.shape[1]))
        Y_new = Y_new.to(self.Y.dtype)
        Y_new = Y_new / torch.linalg.vector_norm(Y_new, dim=1, keepdim=True)
        for i in range(Y_new.shape[0]):
            y = Y_new[i].clone()
            for _ in range(2):  # twice is enough
                y = cgs(self.Y, y)[0]
            nrm = float(torch.linalg.vector_norm(y))
            if nrm > self.REPRESENTED:
                self.Y = torch.cat([self.Y, (y / nrm)[None]])
                self.values.append(float(theta_new[i]))

    def project(self, w: torch.Tensor) -> torch.Tensor:
        """Orthogonalize ``w`` against every good Ritz vector (one CGS pass; no sync)."""
        if self.count == 0:
            return w
        return cgs(self.Y, w)[0]
