r"""Thick-restart Lanczos (Wu & Simon 2000): a bounded basis of at most ``ncv`` vectors.

When the basis of :math:`m` = ``ncv`` orthonormal vectors is full, with

.. math::

    A V_m = V_m H_m + f e_m^\top, \qquad H_m = V_m^\top A V_m,

the Ritz pairs :math:`(\theta_i, V_m s_i)` of the :math:`l` values nearest the wanted end are
kept, the basis is rotated in place to them (:math:`V_l \leftarrow V_m S_l`), and the
residual :math:`f` becomes the next vector :math:`v_{l+1} = f / \|f\|`:

.. math::

    A V_l = V_l \Theta_l + v_{l+1} b^\top, \qquad b_i = \|f\|\, e_m^\top s_i .

The recurrence then continues from :math:`v_{l+1}`; its first step removes the couplings
:math:`b` (an arrowhead instead of a tridiagonal), every later step the usual
:math:`\beta_j v_{j-1}`. Every step is orthogonalized against the whole (small) basis: a
local pass against :math:`v_j` and one classical Gram–Schmidt pass against every row, a
second one when the first cancelled (DGKS). The projected matrix :math:`H` is kept dense
(``ncv`` x ``ncv``): its upper triangle holds the coefficients each step computed, its lower
triangle the couplings the recurrence used; the Ritz values are those of its symmetric part,
and the difference of the two triangles is the measured asymmetry of the products (the
process precision, as the recurrence's step defect is for the unrestarted strategies).

A Ritz pair's residual bound is :math:`\|f\|\,|e_m^\top s_i|`, as for the unrestarted
recurrence; the pairs are verified one at a time against their true residuals
(:func:`~._ritz_verification.verify_ritz_pairs_one_by_one`): the basis is rotated to the
Ritz vectors in place, each pair's product is formed and dropped in turn, and its
prediction is made column slice by column slice, so the verification adds one vector (the
product) to the basis, not three blocks of k.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

from ._as_operator import non_finite_product
from ._lanczos_strategies import Extracted, _fresh_vector
from ._reductions import dot, row_norms, vector_norm
from ._reorthogonalization import KrylovBasis
from ._ritz_verification import verify_ritz_pairs_one_by_one
from ._tridiagonal import convergence_thresholds, select_which

__all__ = ["ThickRestart", "kept_count"]


def kept_count(ncv: int, k: int) -> int:
    """Ritz vectors a restart keeps: the k wanted and half the room beyond them.

    Keeping more than the wanted values (Wu & Simon's choice of about half the basis)
    keeps the next-nearest approximations, which speed the wanted ones; at least one new
    vector is always added per cycle.
    """
    return min(ncv - 1, k + max(1, (ncv - k) // 2))


class ThickRestart:
    """The thick-restarted recurrence with full orthogonalization in a bounded basis.

    Args:
        ctx: The run (``lanczos.py``'s ``_Run``): operator, settings, precision monitor,
            ledger, generator, progress bar.
    """

    name = "full"
    KAPPA = 1.0 / math.sqrt(2.0)

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.ncv = int(ctx.cfg.ncv)
        # One block for the whole (bounded) basis: its column slices are strided views, so
        # the coefficient products, the rotations and the Gram matrix copy nothing.
        self.basis = KrylovBasis(ctx.n, ctx.dtype_c, ctx.basis_device, self.ncv, ctx.ledger)
        self.H = np.zeros((self.ncv, self.ncv))
        self.restarts = 0
        self.reorths = 0
        self.tnorm = 0.0
        self._w: torch.Tensor | None = None

    # -- the recurrence ---------------------------------------------------------------
    def _row(self, i: int) -> torch.Tensor:
        return self.basis.get(i, self.ctx.work, self.ctx.device)

    def _ritz(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Eigenpairs of the symmetric part of H (ascending)."""
        Hm = self.H[:m, :m]
        return scipy.linalg.eigh(0.5 * (Hm + Hm.T))

    def _step(self, j: int) -> tuple[float, float]:
        """One product and its orthogonalization against rows 0..j; returns (||f||, ||Av||).

        Fills column j of H's upper triangle with what the step computed.
        """
        ctx = self.ctx
        v = self._row(j)
        if self._w is None:
            self._w = torch.empty(ctx.n, dtype=ctx.work, device=ctx.device)
            ctx.ledger.alloc(self._w)
        # The operator writes its product into w where it can (no output vector of its
        # own); otherwise u is its output, which is never changed.
        u = ctx.apply(v, out=self._w)
        into = u.data_ptr() == self._w.data_ptr()
        unorm_t = vector_norm(u)
        # The couplings the recurrence already knows: beta_j v_{j-1}, or b after a restart,
        # subtracted in w (while u is copied into it when the operator did not write
        # there): one pass over w for the usual single coupling, one per run of rows after
        # a restart, instead of one per coupling.
        known = np.flatnonzero(self.H[j, :j])
        if known.size == 1:
            i = int(known[0])
            w = torch.sub(u, self._row(i), alpha=float(self.H[j, i]), out=self._w)
        else:
            w = self._w if into else self._w.copy_(u)
            if known.size:
                self.basis.subtract_rows(w, known, torch.as_tensor(
                    self.H[j, known], dtype=w.dtype, device=w.device))
        del u
        a1 = dot(v, w)
        w.addcmul_(v, a1, value=-1.0)
        before = vector_norm(w)
        w, h = self.basis.cgs(w, j + 1)
        flat = torch.cat([torch.stack([a1.double(), unorm_t, before, vector_norm(w)]),
                          h.double()]).tolist()
        alpha, unorm, nb, beta = flat[:4]
        hv = np.asarray(flat[4:])
        if not (math.isfinite(alpha) and math.isfinite(beta) and math.isfinite(unorm)):
            raise non_finite_product("lanczos", f"at iteration {ctx.iterations + 1}")
        if beta < self.KAPPA * nb:  # the pass cancelled: once more (DGKS)
            w, h2 = self.basis.cgs(w, j + 1)
            flat = torch.cat([vector_norm(w).reshape(1), h2.double()]).tolist()
            beta, hv = flat[0], hv + np.asarray(flat[1:])
        self.reorths += 1
        self.H[:j, j] = self.H[j, :j] + hv[:j]
        self.H[j, j] = alpha + hv[j]
        # The asymmetry of the products, measured along every earlier row (the exact
        # parts cancel: v_i^T A v_j = v_j^T A v_i).
        if j:
            i = int(np.argmax(np.abs(hv[:j])))
            ratio = ctx.monitor.observe(self.H[i, j], self.H[j, i], max(ctx.anorm, unorm),
                                        ctx.iterations + 1)
            del ratio  # the full orthogonalization has no model of rounding to rescale
        return beta, unorm

    def _converged(self, theta: np.ndarray, S: np.ndarray, beta: float, m: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ctx = self.ctx
        idx = select_which(theta, ctx.k, ctx.cfg.which)
        bounds = abs(beta) * np.abs(S[m - 1, idx])
        conv = bounds <= convergence_thresholds(theta[idx], self.tnorm, ctx.tol or 1e-8)
        return idx, bounds, conv

    def run(self, start: list[torch.Tensor], resume: int | None = None) -> tuple[int, float]:
        """Iterate until the k wanted values converge or ``maxiter`` products are spent.

        Args:
            start: A list holding the unit start vector; it is taken out (so that the
                caller holds no second copy of a vector as large as a basis row).
            resume: The row the next step works on, when :meth:`load_state_dict` restored
                a checkpoint (the start vector is then not used); None starts afresh.

        Returns:
            ``(m, beta)``: the rows of the final basis and the norm of its residual (the
            residual itself is kept for :meth:`extract`).
        """
        ctx = self.ctx
        v0 = start.pop()
        if resume is None:
            self.basis.set(0, v0)
        del v0
        j = 0 if resume is None else resume
        saved_at = ctx.iterations  # a resumed run does not write the state it read
        while True:
            if (ctx.checkpoint is not None and ctx.iterations != saved_at
                    and ctx.checkpoint.due(ctx.iterations)):
                ctx.save_checkpoint({"restart": self.state_dict(j)})
                saved_at = ctx.iterations
            beta, unorm = self._step(j)
            ctx.iterations += 1
            m = j + 1
            ctx.anorm = max(ctx.anorm, unorm, abs(self.H[j, j]))
            theta, S = self._ritz(m)
            self.tnorm = max(self.tnorm, float(np.max(np.abs(theta))))
            breakdown = ctx.breaks_down(beta)
            if breakdown:
                ctx.breakdowns += 1
                beta = 0.0
            if ctx.history is not None:
                ctx.history.append(theta.copy())
            if ctx.pbar is not None:
                ctx.pbar.update(1)
            idx, _bounds, conv = self._converged(theta, S, beta, m)
            if ctx.pbar is not None:
                ctx.pbar.set_postfix(converged=int(conv.sum()), restarts=self.restarts)
            done = ctx.tol > 0 and idx.size >= ctx.k and bool(conv.all())
            if done or ctx.iterations >= ctx.cfg.max_iters:
                return m, beta
            if m < self.ncv:
                self._advance(m, beta, breakdown)
                j = m
                continue
            # The basis is full: keep the l Ritz vectors nearest the wanted end.
            keep = select_which(theta, kept_count(self.ncv, ctx.k), ctx.cfg.which)
            keep = np.sort(keep)
            l = keep.size
            self.basis.rotate(S[:, keep], m)
            b = beta * S[m - 1, keep]
            self.H[:] = 0.0
            self.H[np.arange(l), np.arange(l)] = theta[keep]
            self._advance(l, beta, breakdown)
            self.H[l, :l] = 0.0 if breakdown else b
            self.restarts += 1
            j = l

    def _advance(self, m: int, beta: float, breakdown: bool) -> None:
        """Row m: the normalized residual, or after a breakdown a fresh random vector
        orthogonal to the basis (coupling 0: the blocks decouple)."""
        if breakdown:
            self.basis.set(m, _fresh_vector(self.ctx, self.basis, m))
        else:
            self.basis.set_scaled(m, self._w, 1.0 / beta)  # w itself is not read again
            self.H[m, m - 1] = beta

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self, j: int) -> dict[str, object]:
        """The recurrence before the step on row ``j``: rows 0..j, H, the counts."""
        return {"j": int(j), "H": torch.from_numpy(self.H.copy()),
                "basis": self.basis.state_dict(j + 1), "restarts": int(self.restarts),
                "reorths": int(self.reorths), "tnorm": float(self.tnorm)}

    def load_state_dict(self, state: dict[str, object]) -> int:
        """Restore :meth:`state_dict`'s state; return the row the next step works on."""
        j = int(state["j"])
        H = state["H"].numpy()
        rows = state["basis"]
        if H.shape != self.H.shape or not 0 <= j < self.ncv or rows.shape[0] != j + 1:
            raise ValueError(f"a restarted state of row {j}, H {tuple(H.shape)} and "
                             f"{rows.shape[0]} rows does not fit ncv={self.ncv}")
        self.H[:] = H
        self.basis.load_state_dict(rows)
        self.restarts, self.reorths = int(state["restarts"]), int(state["reorths"])
        self.tnorm = float(state["tnorm"])
        return j

    # -- the result ---------------------------------------------------------------------
    def extract(self, m: int, beta: float, want_vectors: bool) -> Extracted:
        """Ritz pairs of the final basis, verified one at a time when ``verify``."""
        ctx, cfg = self.ctx, self.ctx.cfg
        theta, S = self._ritz(m)
        idx, bounds, bound_conv = self._converged(theta, S, beta, m)
        values = theta[idx]
        ortho = float("nan")
        if cfg.measure_orthogonality:
            G = self.basis.gram(m, exact=False)  # float32 slices, summed in float64
            ortho = float(np.max(np.abs(G - np.eye(m))))
        if not values.size or not (ctx.verify or want_vectors):
            return Extracted(values, bounds, bound_conv, None, None, None, self.tnorm,
                             orthogonality_loss=ortho, restarts=self.restarts)
        # Rotate the whole basis to the Ritz vectors (S is orthogonal: the relation
        # A V S = V S (S^T H S) + f e_m^T S still holds), so each Ritz vector is a row.
        Hm = self.H[:m, :m]
        self.basis.rotate(S, m)
        rows = [self._row(int(i)) for i in idx]
        verification = None
        if ctx.verify:
            # The prediction of A y_i along the rotated rows, plus the residual's share.
            coeffs = torch.as_tensor(S.T @ Hm @ S[:, idx], dtype=ctx.dtype_c,
                                     device=self.basis.device)
            last = S[m - 1, idx]
            w = self._w

            def predict(i: int, c0: int, c1: int) -> torch.Tensor:
                pred = self.basis.combine_slice(coeffs[:, i], m, c0, c1).to(ctx.work)
                if w is not None:  # the residual f = A V s - V H s, unnormalized
                    pred.add_(w[c0:c1].to(pred.device), alpha=float(last[i]))
                return pred.to(ctx.device)

            verification = verify_ritz_pairs_one_by_one(
                rows, ctx.apply, predict, values, bound_conv, self.tnorm,
                ctx.tol or 1e-8, ctx.eps_a,
            )
            ctx.verification_matvecs = values.size
        vectors = None
        if want_vectors:
            if self._w is not None:
                ctx.ledger.free(self._w)
                self._w = None
            vectors = torch.stack(rows)
            ctx.ledger.alloc(vectors)
            vectors.div_(row_norms(vectors)[:, None].to(vectors.dtype))
        return Extracted(values, bounds, bound_conv, None, None, None, self.tnorm,
                         orthogonality_loss=ortho, restarts=self.restarts,
                         verification=verification, vectors=vectors)

    def release(self) -> None:
        self.basis.release()
        self._w = None
