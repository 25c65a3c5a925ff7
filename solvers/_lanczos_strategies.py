r"""The four reorthogonalization strategies of :func:`~curvops.solvers.lanczos.lanczos`.

Each strategy is one object that owns its orthogonalization, its model of the rounding
that makes the Lanczos vectors lose orthogonality, its recovery when that model is found
behind, and the extraction of its Ritz pairs; the recurrence loop in ``lanczos.py`` calls
the same hooks on every strategy:

* :meth:`Strategy.orthogonalize` right after the three-term update (before the one host
  synchronisation of the iteration), :meth:`Strategy.probe` for what the strategy wants
  measured in that synchronisation;
* :meth:`Strategy.settle` after it (local pass, near-invariant pass, the
  :math:`\omega`-recurrence, guards);
* :meth:`Strategy.converged`, :meth:`Strategy.prepare_next`, :meth:`Strategy.advance`;
* :meth:`Strategy.extract` at the end: Ritz values, vectors, and the Lanczos relation's
  prediction of their products for the verification (``_ritz_verification.py``).

Every threshold follows :math:`\varepsilon_A` (``ctx.eps_a``), which the run raises to what
the operator's products are measured to deliver (``_operator_accuracy.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
from curvops.linops.memory_probe import available_memory_bytes

from ._as_operator import non_finite_product
from ._checkpoint import host_copy
from ._cullum_willoughby import GhostFilter
from ._reductions import dot, vector_norm
from ._reorthogonalization import (
    KrylovBasis,
    SelectiveCache,
    block_rows_for,
    offending_range,
    omega_update,
)
from ._tridiagonal import (
    convergence_thresholds,
    select_which,
    tridiag_eigh,
    wanted_ritz,
)

__all__ = ["Extracted", "Step", "Strategy", "make_strategy"]


@dataclass
class Step:
    """The state of one iteration between the hooks."""

    j: int
    u: torch.Tensor  # the product A v_j (the operator's output, not owned)
    v: torch.Tensor
    w: torch.Tensor
    alpha: float
    beta_j: float
    beta_next: float
    unorm: float  # ||A v_j|| measured
    probe: np.ndarray  # what probe() asked for, measured on w before settle()
    breakdown: bool = False
    near_invariant: bool = False


@dataclass
class Extracted:
    """Ritz pairs of a finished run, before verification."""

    values: np.ndarray
    bounds: np.ndarray
    bound_converged: np.ndarray
    Y: torch.Tensor | None  # Ritz vectors (rows, not normalized), for verification
    AY: torch.Tensor | None  # their products, when the strategy has them (none: 2nd pass)
    predicted: torch.Tensor | None  # the Lanczos relation's prediction of A Y
    tnorm: float
    spurious_removed: int = 0
    orthogonality_loss: float = float("nan")
    regularization_used: float = 0.0
    rayleigh_ritz: bool = False
    restarts: int = 0
    # Set when the strategy verified its pairs itself (the thick restart, one by one):
    verification: object | None = None
    vectors: torch.Tensor | None = None  # unit Ritz vectors as rows


class Relation:
    r"""The recorded Lanczos relation :math:`A V = V C + Y_c D + w e_m^\top + F`.

    :math:`C` holds the tridiagonal and every coefficient a reorthogonalization removed
    along basis rows, :math:`D` those removed along the selective cache :math:`Y_c`;
    :math:`F` is what the products (and the arithmetic) got wrong. Coefficients stay on
    the device until the end (no host sync). Recorded only when something reads it (the
    verification, the Rayleigh–Ritz step of a low-precision basis).
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.rows: list[tuple[int, np.ndarray | None, torch.Tensor]] = []
        self.cache: list[tuple[int, torch.Tensor]] = []

    def add_rows(self, j: int, rows: np.ndarray | None, h: torch.Tensor) -> None:
        """Step j removed ``h`` along basis ``rows`` (None: rows 0..len(h)-1)."""
        if self.enabled:
            self.rows.append((j, rows, h))

    def add_cache(self, j: int, d: torch.Tensor) -> None:
        """Step j removed ``d`` along the first len(d) cached Ritz vectors."""
        if self.enabled and d.numel():
            self.cache.append((j, d))

    def state_dict(self) -> dict[str, list]:
        """The recorded coefficients (on the CPU), for a checkpoint."""
        return {
            "rows": [[j, None if rows is None else torch.from_numpy(np.array(rows, np.int64)),
                      host_copy(h)] for j, rows, h in self.rows],
            "cache": [[j, host_copy(d)] for j, d in self.cache],
        }

    def load_state_dict(self, state: dict[str, list]) -> None:
        """Restore what :meth:`state_dict` saved (the coefficients stay on the CPU: they
        are read on the host at the end anyway)."""
        self.rows = [(int(j), None if rows is None else rows.numpy(), h)
                     for j, rows, h in state["rows"]]
        self.cache = [(int(j), d) for j, d in state["cache"]]

    def matrices(self, alpha: np.ndarray, couplings: np.ndarray, g: int):
        """``(C, D)``: C (m, m) with the tridiagonal (``couplings`` = beta_2..beta_m, zero
        where the run restarted) plus the corrections; D (g, m)."""
        m = alpha.size
        C = np.diag(alpha) + np.diag(couplings, 1) + np.diag(couplings, -1)
        for j, rows, h in self.rows:
            if j >= m:
                continue
            hv = h.double().cpu().numpy()
            idx = np.arange(hv.size) if rows is None else rows
            keep = idx < m
            C[idx[keep], j] += hv[keep]
        D = np.zeros((g, m))
        for j, d in self.cache:
            if j < m:
                dv = d.double().cpu().numpy()
                D[: dv.size, j] += dv
        return C, D


def _fresh_vector(ctx, basis: KrylovBasis, j: int) -> torch.Tensor:
    """A random unit vector orthogonal to rows 0..j-1 of the basis (after a breakdown)."""
    for _ in range(5):
        r = torch.randn(ctx.n, generator=ctx.gen, dtype=ctx.work).to(device=ctx.device)
        r = r / vector_norm(r).to(r.dtype)
        for _ in range(3):
            r, _h = basis.cgs(r, j)
        nrm = float(vector_norm(r))
        if nrm > 1e-3:
            return r / nrm
    raise RuntimeError("could not find a vector orthogonal to the Krylov basis")


def rayleigh_ritz(
    C_upper: np.ndarray, G: np.ndarray, regularization: float
) -> tuple[np.ndarray, np.ndarray, float, str | None]:
    r"""Ritz pairs of the projected pencil :math:`(V^\top A V, V^\top V)`.

    With every coefficient of the recurrence and the reorthogonalization kept,
    :math:`A v_j = \sum_{i \le j} c_{ij} v_i + w_j` with :math:`w_j` orthogonal to
    :math:`v_0..v_j` to the working precision. Hence, for :math:`i \le j`,
    :math:`(V^\top A V)_{ij} = \sum_l G_{il} c_{lj}` with :math:`G = V^\top V`; symmetry
    fills the lower triangle, with no extra product with A.
    """
    m = C_upper.shape[0]
    M = G @ C_upper
    M = np.triu(M) + np.triu(M, 1).T
    try:
        theta, S = scipy.linalg.eigh(M, G)
        return theta, S, 0.0, None
    except (np.linalg.LinAlgError, ValueError):
        if regularization <= 0:
            return np.zeros(0), np.zeros((m, 0)), 0.0, (
                "Rayleigh–Ritz failed (V^T V not positive definite); values read off T instead"
            )
        used = regularization * max(1.0, float(np.abs(np.diag(G)).max()))
        theta, S = scipy.linalg.eigh(M, G + used * np.eye(m))
        return theta, S, used, f"Rayleigh–Ritz needed jitter {used:.3g} on V^T V"


class Strategy:
    """The hooks every strategy implements (see the module docstring)."""

    name = ""
    ends_on_breakdown = False

    #: DGKS / PROPACK's kappa: a second local Gram–Schmidt pass against v_j only when the
    #: first one cancelled, ||w|| < KAPPA ||A v_j|| (else it is orthogonal to ~eps already).
    KAPPA = 1.0 / math.sqrt(2.0)

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.relation = Relation(ctx.verify or ctx.use_rr)

    # -- iteration hooks -----------------------------------------------------------------
    def begin(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def orthogonalize(self, j: int, w: torch.Tensor, a1: torch.Tensor) -> torch.Tensor:
        """Orthogonalize ``w`` in place before the synchronisation; return alpha (device)."""
        return a1

    def probe(self, j: int, w: torch.Tensor) -> torch.Tensor | None:
        """Device values to measure in the iteration's synchronisation (or None)."""
        return None

    def recalibrate(self, ratio: float) -> None:
        """The process precision grew by ``ratio``: rescale the model of rounding."""

    def settle(self, st: Step, alpha: list[float], beta: list[float]) -> None:
        """After the synchronisation: finish orthogonalizing ``st.w`` (may sync)."""

    def converged(self, m: int, alpha: list[float], beta: list[float], beta_next: float
                  ) -> bool:
        raise NotImplementedError

    def prepare_next(self, m: int, st: Step, alpha: list[float], beta: list[float]) -> None:
        """Before the next vector is formed (selective: cache the new good Ritz vectors)."""

    def advance(self, m: int, st: Step) -> torch.Tensor:
        raise NotImplementedError

    def extract(self, m: int, alpha: list[float], beta: list[float], beta_next: float,
                w_last: torch.Tensor, want_vectors: bool) -> Extracted:
        raise NotImplementedError

    def release(self) -> None:
        """Free what the strategy holds."""

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self, m: int, v_prev: torch.Tensor, v: torch.Tensor) -> dict[str, object]:
        """Everything the strategy holds after ``m`` iterations, as tensors and plain values.

        Args:
            m: Iterations done; the next one works on ``v``.
            v_prev: The loop's previous vector :math:`v_{m-1}`.
            v: The loop's current vector :math:`v_m`.
        """
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, object]) -> tuple[torch.Tensor, torch.Tensor]:
        """Restore :meth:`state_dict`'s state; return the loop's ``(v_prev, v)``."""
        raise NotImplementedError

    # -- shared pieces -------------------------------------------------------------------
    def _cancelled(self, alpha_j: float, beta_j: float, beta_next: float) -> bool:
        # ||A v_j||^2 = alpha_j^2 + beta_j^2 + beta_{j+1}^2 up to the basis's orthogonality.
        return beta_next**2 < self.KAPPA**2 * (alpha_j**2 + beta_j**2 + beta_next**2)

    def _local_pass(self, st: Step) -> None:
        """Second Gram–Schmidt pass of ``w`` against ``v`` (in place); one more sync."""
        c = dot(st.v, st.w)
        st.w.addcmul_(st.v, c, value=-1.0)
        dc, st.beta_next = torch.stack([c.double(), vector_norm(st.w)]).tolist()
        st.alpha += dc


class _BasisStrategy(Strategy):
    """Shared machinery of the strategies that keep the Krylov basis."""

    #: beta_{j+1} below this share of ||A v_j|| (or below sqrt(eps_A) of it) takes a pass
    #: against the whole basis before the breakdown test.
    NEAR_INVARIANT = 1e-3

    #: Whether the strategy reads every Ritz pair each iteration (selective: its good
    #: vectors can be any); the others read only the wanted ones.
    ALL_PAIRS = False

    #: From this many iterations (and 4k), the convergence test computes the wanted
    #: eigenpairs of T only (:func:`wanted_ritz`): below it all pairs cost less.
    WANTED_ONLY_FROM = 96

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        block = block_rows_for(ctx.n, ctx.dtype_c, ctx.basis_device, ctx.m_max + 1)
        self.basis = KrylovBasis(ctx.n, ctx.dtype_c, ctx.basis_device, block, ctx.ledger)
        self.reorths = 0
        self._probe_rows = np.zeros(0, dtype=np.int64)
        self._eig: tuple[int, np.ndarray, np.ndarray] | None = None
        self.recoveries = 0

    def begin(self, v: torch.Tensor) -> torch.Tensor:
        self.basis.set(0, v)
        return self.basis.get(0, self.ctx.work, self.ctx.device)

    def _full_pass(self, j: int, w: torch.Tensor) -> float:
        """Classical Gram–Schmidt twice against rows 0..j (recorded); returns ||w||."""
        w, h = self.basis.cgs2(w, j + 1)
        self.relation.add_rows(j, None, h)
        self.reorths += 1
        return float(vector_norm(w))

    def probe(self, j: int, w: torch.Tensor) -> torch.Tensor | None:
        # The check of the model: the overlaps with rows 0, 1, one in the middle and one
        # that rotates; rows 0..j-2 only (v_j and v_{j-1} are kept orthogonal locally).
        if j < 2:
            self._probe_rows = np.zeros(0, dtype=np.int64)
            return None
        cand = {0, 1, j // 2, (j * 7919) % (j - 1)}
        self._probe_rows = np.array(sorted(r for r in cand if r <= j - 2), dtype=np.int64)
        return self.basis.row_coeffs(self._probe_rows, w)

    def _measured_loss(self, st: Step) -> float:
        """max |v_k^T v_{j+1}| over the probed rows (before this step's settle)."""
        if st.probe.size == 0 or st.beta_next <= 0:
            return 0.0
        return float(np.max(np.abs(st.probe))) / st.beta_next

    def _settle_common(self, st: Step) -> None:
        """Local pass when the first one cancelled; a whole-basis pass near an invariant
        subspace (there w is mostly what a semi-orthogonal basis leaves along its own
        vectors, up to sqrt(eps_A) ||A||: only a pass against the whole basis tells a
        breakdown from a new direction)."""
        if self._cancelled(st.alpha, st.beta_j, st.beta_next):
            self._local_pass(st)
        unorm = math.sqrt(st.alpha**2 + st.beta_j**2 + st.beta_next**2)
        delta = math.sqrt(self.ctx.eps_a)
        if st.beta_next < max(delta, self.NEAR_INVARIANT) * unorm:
            st.near_invariant = True
            st.beta_next = self._full_pass(st.j, st.w)

    def _grew(self, st: Step) -> bool:
        # Projections against an orthonormal set cannot lengthen w: if it grew beyond
        # ||A v_j||, a projection against rows that are no longer orthonormal amplified it.
        return st.beta_next > 1.1 * st.unorm + 1e-300

    def converged(self, m, alpha, beta, beta_next) -> bool:
        ctx = self.ctx
        if ctx.tol <= 0 or m < ctx.k:
            return False
        if not self.ALL_PAIRS and m >= max(self.WANTED_ONLY_FROM, 4 * ctx.k):
            # The test reads the wanted values and the last entries of their vectors only.
            theta, S, tnorm = wanted_ritz(np.asarray(alpha[:m]), np.asarray(beta[1:m]),
                                          ctx.k, ctx.cfg.which)
        else:
            theta, S = self._eigh(m, alpha, beta)
            tnorm = float(np.max(np.abs(theta)))
        idx = select_which(theta, ctx.k, ctx.cfg.which)
        bounds = abs(beta_next) * np.abs(S[-1, idx])
        conv = bounds <= convergence_thresholds(theta[idx], tnorm, ctx.tol)
        if ctx.pbar is not None:
            ctx.pbar.set_postfix(converged=int(conv.sum()))
        return bool(conv.all()) and conv.size >= ctx.k

    def _eigh(self, m, alpha, beta):
        if self._eig is None or self._eig[0] != m:
            theta, S = tridiag_eigh(np.asarray(alpha[:m]), np.asarray(beta[1:m]))
            self._eig = (m, theta, S)
        return self._eig[1], self._eig[2]

    def advance(self, m: int, st: Step) -> torch.Tensor:
        ctx = self.ctx
        if st.breakdown:
            self.basis.set(m, _fresh_vector(ctx, self.basis, m))
            self._after_restart(m)
        else:
            row = self.basis.row(m)
            if row.device == st.w.device:
                # Normalized straight into the basis row (the documented cast included).
                torch.div(st.w, st.beta_next, out=row)
            else:  # an offloaded basis
                row.copy_(st.w.div_(st.beta_next))
        return self.basis.get(m, ctx.work, ctx.device)

    def _after_restart(self, m: int) -> None:
        """The recurrence restarted at row m with a vector orthogonal to the basis."""

    def _cache(self) -> SelectiveCache | None:
        return None

    def extract(self, m, alpha, beta, beta_next, w_last, want_vectors) -> Extracted:
        ctx, cfg = self.ctx, self.ctx.cfg
        a = np.asarray(alpha[:m])
        b = np.asarray(beta[1:m])
        theta, S = tridiag_eigh(a, b)
        tnorm = float(np.max(np.abs(theta)))
        idx = select_which(theta, ctx.k, cfg.which)
        bounds = abs(beta_next) * np.abs(S[-1, idx])
        bound_conv = bounds <= convergence_thresholds(theta[idx], tnorm, ctx.tol or 1e-8)
        values, S_sel = theta[idx], S[:, idx]
        cache = self._cache()
        if self.relation.enabled:
            C, D = self.relation.matrices(a, b, cache.count if cache is not None else 0)
        G = None
        ortho = float("nan")
        if ctx.use_rr or cfg.measure_orthogonality:
            G = self.basis.gram(m, exact=ctx.use_rr)
        if cfg.measure_orthogonality:
            ortho = float(np.max(np.abs(G - np.eye(m))))
        reg_used, rr_done = 0.0, False
        if ctx.use_rr:
            th_rr, S_rr, reg_used, note = rayleigh_ritz(np.triu(C), G, cfg.regularization)
            if note:
                ctx.notes.append(note)
            if th_rr.size:
                idx_rr = select_which(th_rr, ctx.k, cfg.which)
                values, S_sel, rr_done = th_rr[idx_rr], S_rr[:, idx_rr], True
        Y = pred = None
        if ctx.verify and values.size and not want_vectors:
            # The Ritz vectors V^T S and the relation's V^T (C S) in one pass over the basis
            # (only when the vectors are not returned: a returned view would keep the
            # prediction's memory alive).
            p = values.size
            YP = self.basis.combine_rows(np.hstack([S_sel, C @ S_sel]), m, ctx.work)
            YP = YP.to(ctx.device)
            Y, pred = YP[:p], YP[p:]
            ctx.ledger.alloc(Y)
        elif (want_vectors or ctx.verify) and values.size:
            Y = self.basis.combine_rows(S_sel, m, ctx.work).to(ctx.device)
            ctx.ledger.alloc(Y)
            if ctx.verify:
                pred = self.basis.combine_rows(C @ S_sel, m, ctx.work).to(ctx.device)
        if pred is not None:
            pred.addr_(torch.as_tensor(S_sel[-1], dtype=ctx.work, device=ctx.device),
                       w_last.to(ctx.work))
            if cache is not None and cache.count:
                if cache.Y.device == pred.device:
                    cache.Y.combine_rows(D @ S_sel, cache.count, ctx.work, out=pred)
                else:
                    pred.add_(cache.Y.combine_rows(D @ S_sel, cache.count, ctx.work)
                              .to(ctx.device))
            ctx.ledger.alloc(pred)
        return Extracted(values, bounds, bound_conv, Y, None, pred, tnorm,
                         orthogonality_loss=ortho, regularization_used=reg_used,
                         rayleigh_ritz=rr_done)

    def release(self) -> None:
        self.basis.release()

    def state_dict(self, m, v_prev, v):
        # v_prev and v are basis rows m-1 and m: they travel with the basis.
        return {"relation": self.relation.state_dict(), "basis": self.basis.state_dict(m + 1),
                "reorths": int(self.reorths), "recoveries": int(self.recoveries)}

    def load_state_dict(self, state):
        rows = state["basis"]
        m = int(rows.shape[0]) - 1
        if m < 1:
            raise ValueError(f"a checkpoint holds at least two basis rows, this one {m + 1}")
        self.relation.load_state_dict(state["relation"])
        self.basis.load_state_dict(rows)
        self.reorths, self.recoveries = int(state["reorths"]), int(state["recoveries"])
        ctx = self.ctx
        return self.basis.get(m - 1, ctx.work, ctx.device), self.basis.get(m, ctx.work, ctx.device)


class FullReorth(_BasisStrategy):
    """Classical Gram–Schmidt twice against the whole basis, every iteration."""

    name = "full"

    def orthogonalize(self, j, w, a1):
        w, h = self.basis.cgs2(w, j + 1)
        self.reorths += 1
        if self.relation.enabled:
            rec = h.clone()
            rec[j] = 0.0  # its coefficient on v_j goes into alpha_j
            self.relation.add_rows(j, None, rec)
        return a1 + h[j]

    def probe(self, j, w):
        return None  # orthogonal to the working precision by construction


class PartialReorth(_BasisStrategy):
    r"""Simon's partial reorthogonalization, with the :math:`\omega` noise measured.

    The :math:`\omega`-recurrence estimates :math:`v_{j+1}^\top v_k` from the scalars; its
    noise :math:`\epsilon_1` is ``OMEGA_NOISE`` :math:`\varepsilon_A` with
    :math:`\varepsilon_A` raised to the measured step defects (and the estimates rescaled
    when it rises). Every iteration, the true overlaps with a few probed basis rows are
    measured in the same synchronisation; if one exceeds :math:`\sqrt{\varepsilon_A}`
    where the model said it would not (or ``w`` grew beyond ``||A v_j||``), the model was
    behind: this vector and the next are orthogonalized against the whole basis, the
    estimates reset, and the noise model is raised fourfold.
    """

    name = "partial"

    #: eps_1 of the omega-recurrence in units of eps_A (the rounding of a step).
    OMEGA_NOISE = 10.0

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.omega_prev = np.zeros(0)
        self.omega_cur = np.ones(1)
        self.force_idx = np.zeros(0, dtype=np.int64)
        self.boost = 1.0

    @property
    def eps1(self) -> float:
        eps = self.ctx.eps_a
        # Capped: for bf16 10 eps would exceed the semi-orthogonality level itself.
        return min(self.boost * self.OMEGA_NOISE * eps, math.sqrt(eps) / 10.0)

    def recalibrate(self, ratio: float) -> None:
        # The recurrence is linear in eps_1: rescaling gives the estimates the new noise
        # level would have produced from the start.
        self.omega_prev[:-1] *= ratio
        self.omega_cur[:-1] *= ratio

    def orthogonalize(self, j, w, a1):
        if self.force_idx.size:
            w, h, rows = self.basis.project_rows(self.force_idx, w)
            self.relation.add_rows(j, rows, h)
            self.reorths += 1
        return a1

    def settle(self, st, alpha, beta):
        forced = self.force_idx
        self._settle_common(st)
        eps1, delta = self.eps1, math.sqrt(self.ctx.eps_a)
        a_arr = np.asarray(alpha + [st.alpha])
        omega_next = omega_update(self.omega_prev, self.omega_cur, a_arr,
                                  np.asarray(beta[: st.j + 1]), st.beta_next, eps1,
                                  max(self.ctx.anorm, st.unorm))
        if forced.size:
            omega_next[forced] = eps1
            self.force_idx = np.zeros(0, dtype=np.int64)
        measured = self._measured_loss(st)
        model_missed = measured > delta and (
            not self._probe_rows.size
            or bool(np.any(omega_next[self._probe_rows] <= delta)))
        if st.near_invariant:
            omega_next[:-1] = eps1  # orthogonal to the whole basis now
        elif model_missed or self._grew(st):
            self._recover(st, omega_next, measured)
        elif st.beta_next > 0 and np.max(np.abs(omega_next[:-1]), initial=0.0) > delta:
            idx = offending_range(omega_next, self.ctx.eps_a**0.75)
            _, h, rows = self.basis.project_rows(idx, st.w)
            self.relation.add_rows(st.j, rows, h)
            self.reorths += 1
            st.beta_next = float(vector_norm(st.w))
            omega_next[idx] = eps1
            self.force_idx = idx  # Simon: the next vector is reorthogonalized too
        self.omega_prev, self.omega_cur = self.omega_cur, omega_next

    def _recover(self, st: Step, omega_next: np.ndarray, measured: float) -> None:
        st.beta_next = self._full_pass(st.j, st.w)
        self.recoveries += 1
        self.boost *= 4.0
        omega_next[:-1] = self.eps1
        self.force_idx = np.arange(st.j + 1)
        if self.recoveries == 1:
            self.ctx.notes.append(
                f"partial: measured loss of orthogonality {measured:.2g} at iteration "
                f"{st.j + 1} exceeded the model; reorthogonalized fully and raised the "
                "rounding model"
            )

    def state_dict(self, m, v_prev, v):
        state = super().state_dict(m, v_prev, v)
        state.update(omega_prev=torch.from_numpy(self.omega_prev.copy()),
                     omega_cur=torch.from_numpy(self.omega_cur.copy()),
                     force_idx=torch.from_numpy(np.array(self.force_idx, np.int64)),
                     boost=float(self.boost))
        return state

    def load_state_dict(self, state):
        vectors = super().load_state_dict(state)
        self.omega_prev = state["omega_prev"].numpy()
        self.omega_cur = state["omega_cur"].numpy()
        self.force_idx = state["force_idx"].numpy()
        self.boost = float(state["boost"])
        return vectors

    def _after_restart(self, m: int) -> None:
        self.omega_cur = np.full(m + 1, self.eps1)
        self.omega_cur[-1] = 1.0
        self.omega_prev = np.zeros(m)
        self.force_idx = np.zeros(0, dtype=np.int64)


class SelectiveReorth(_BasisStrategy):
    r"""Parlett and Scott's selective orthogonalization against good Ritz vectors.

    Good means a bound below ``OMEGA_NOISE`` :math:`\sqrt{\varepsilon_A}\|T\|` (capped),
    with :math:`\varepsilon_A` following the measured step defects. The probed overlaps
    guard it like partial's: a measured loss above :math:`\sqrt{\varepsilon_A}` takes a
    whole-basis pass and admits rougher good vectors from then on.
    """

    name = "selective"
    OMEGA_NOISE = 10.0
    ALL_PAIRS = True

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.cache = SelectiveCache(ctx.n, ctx.work, ctx.device, ctx.eps_a, ctx.ledger,
                                    noise=self.OMEGA_NOISE)
        self.boost = 1.0

    def _cache(self) -> SelectiveCache:
        return self.cache

    def recalibrate(self, ratio: float) -> None:
        self.cache.set_precision(self.ctx.eps_a, self.boost)

    def orthogonalize(self, j, w, a1):
        if self.cache.count:
            _, d = self.cache.project(w)
            self.relation.add_cache(j, d)
            self.reorths += 1
        return a1

    def settle(self, st, alpha, beta):
        self._settle_common(st)
        measured = self._measured_loss(st)
        if not st.near_invariant and (measured > math.sqrt(self.ctx.eps_a) or self._grew(st)):
            st.beta_next = self._full_pass(st.j, st.w)
            self.recoveries += 1
            self.boost *= 4.0
            self.cache.set_precision(self.ctx.eps_a, self.boost)
            if self.recoveries == 1:
                self.ctx.notes.append(
                    f"selective: measured loss of orthogonality {measured:.2g} at iteration "
                    f"{st.j + 1}; reorthogonalized fully and admitted rougher good vectors"
                )

    def prepare_next(self, m, st, alpha, beta):
        if st.breakdown:
            return
        ctx = self.ctx
        theta, S = self._eigh(m, alpha, beta)
        tnorm = float(np.max(np.abs(theta)))
        bounds = st.beta_next * np.abs(S[-1])
        new = self.cache.new_good(theta, S, bounds, tnorm)
        if new.size:
            Y = self.basis.combine_rows(S[:, new], m, ctx.work).to(ctx.device)
            before = self.cache.count
            self.cache.add(S[:, new], Y)
            # w was projected against the earlier cache in orthogonalize(); since then
            # only the local pass (a multiple of v_j of the order of the rounding) or a
            # pass against the whole basis touched it, so the new vectors are all that is
            # left to project against.
            _, d = self.cache.project(st.w, start=before)
            self.relation.add_cache(st.j, d)
            st.beta_next = float(vector_norm(st.w))
            if ctx.breaks_down(st.beta_next):
                st.breakdown = True
                ctx.breakdowns += 1
                st.beta_next = 0.0

    def release(self) -> None:
        super().release()
        self.cache.Y.release()

    def state_dict(self, m, v_prev, v):
        state = super().state_dict(m, v_prev, v)
        state.update(cache=self.cache.state_dict(), boost=float(self.boost))
        return state

    def load_state_dict(self, state):
        vectors = super().load_state_dict(state)
        self.cache.load_state_dict(state["cache"])
        self.boost = float(state["boost"])
        return vectors


class NoReorth(Strategy):
    """Three vectors and the Cullum–Willoughby test; Ritz vectors by a second pass."""

    name = "none"
    ends_on_breakdown = True

    #: Relative drift of a regenerated beta beyond which the second pass gives up.
    REPLAY_DRIFT = 1e-3

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.filter = GhostFilter(ctx.k, ctx.cfg.which, ctx.cfg.cullum_willoughby, ctx.eps_w,
                                  ctx.monitor.eps_floor)
        self.v_start: torch.Tensor | None = None
        self.reorths = 0
        ctx.ledger.alloc(4 * ctx.vec_bytes)  # v_prev, v, w and the product

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(self.ctx.dtype_c).to(self.ctx.work)  # the documented rounding

    def begin(self, v):
        self.v_start = self._round(v)
        return self.v_start

    def recalibrate(self, ratio):
        self.filter.defect = self.ctx.monitor.defect

    def settle(self, st, alpha, beta):
        # Always a second local pass: without a basis, local orthogonality is all that
        # holds the vectors.
        self._local_pass(st)

    def converged(self, m, alpha, beta, beta_next):
        ctx = self.ctx
        if not (ctx.tol > 0 and m >= ctx.k):
            return False
        a, b = np.asarray(alpha), np.asarray(beta[1:m])
        theta, values, reps, idx, _, (S, theta_hat) = self.filter.ritz(a, b, beta_next, ctx.tol)
        bnds, _groups, _ = self.filter.bounds(a, b, theta, reps[idx], beta_next, S)
        tnorm = float(np.max(np.abs(theta)))
        conv = self.filter.lock(values[idx], bnds, tnorm, ctx.tol)
        return (idx.size >= ctx.k and bool(conv.all())
                and not self.filter.gap_in_wanted(a, b, theta, reps, values[idx], theta_hat))

    def advance(self, m, st):
        return self._round(st.w / st.beta_next)

    def state_dict(self, m, v_prev, v):
        # No basis: the start vector (for the second pass) and the last two vectors.
        return {"relation": self.relation.state_dict(), "v_start": host_copy(self.v_start),
                "v_prev": host_copy(v_prev), "v": host_copy(v),
                "filter": self.filter.state_dict()}

    def load_state_dict(self, state):
        ctx = self.ctx
        self.relation.load_state_dict(state["relation"])
        self.filter.load_state_dict(state["filter"])
        self.v_start, v_prev, v = (state[key].to(device=ctx.device, dtype=ctx.work)
                                   for key in ("v_start", "v_prev", "v"))
        return v_prev, v

    def extract(self, m, alpha, beta, beta_next, w_last, want_vectors) -> Extracted:
        ctx = self.ctx
        a, b = np.asarray(alpha), np.asarray(beta[1:m])
        tol = ctx.tol or 1e-8
        theta, values, reps, idx, n_spur, (S, _) = self.filter.ritz(a, b, beta_next, tol)
        bnds, groups, best = self.filter.bounds(a, b, theta, reps[idx], beta_next, S)
        if ctx.cfg.cullum_willoughby and best.size:
            # Of numerically multiple copies, report the best-converged one.
            values = values.copy()
            values[idx] = theta[best]
        tnorm = float(np.max(np.abs(theta)))
        conv = self.filter.lock(values[idx], bnds, tnorm, tol)
        if idx.size < ctx.k:
            ctx.notes.append(f"only {idx.size} distinct good Ritz values (k={ctx.k})")
        Y = AY = None
        if (want_vectors or ctx.verify) and idx.size:
            groups = self._within_memory(groups)
            Y, AY = self._second_pass(b, np.concatenate(groups, axis=1), m)
            if Y is not None:
                Y, AY = _combine_copies(Y, AY, groups, values[idx])
        return Extracted(np.asarray(values[idx], dtype=np.float64), np.asarray(bnds),
                         np.asarray(conv, dtype=bool), Y, AY, None, tnorm,
                         spurious_removed=int(n_spur))

    #: Share of the device's free memory the second pass's Ritz vectors may take.
    FREE_MEMORY_SHARE = 0.5

    def _within_memory(self, groups: list[np.ndarray]) -> list[np.ndarray]:
        """Each value's copies, or as many of its best-converged copies as fit.

        The second pass forms two length-n vectors per copy (the Ritz vector and its
        product); a long run has many ghost copies of the first values. When they all
        need more than :attr:`FREE_MEMORY_SHARE` of the free memory, each value keeps its
        best copies (smallest bound first), as many as fit, at least one; the verification
        then says whether they suffice.
        """
        copies = sum(g.shape[1] for g in groups)
        pair = 2 * self.ctx.vec_bytes
        free = available_memory_bytes(self.ctx.device)
        if free <= 0 or copies * pair <= self.FREE_MEMORY_SHARE * free:
            return groups
        allowed = max(len(groups), int(self.FREE_MEMORY_SHARE * free // pair))
        order = [np.argsort(np.abs(g[-1, :]), kind="stable") for g in groups]
        keep = [1] * len(groups)
        while sum(keep) < allowed:
            grew = False
            for i, g in enumerate(groups):
                if keep[i] < g.shape[1] and sum(keep) < allowed:
                    keep[i] += 1
                    grew = True
            if not grew:
                break
        self.ctx.notes.append(
            f"none: {copies} copies of the {len(groups)} wanted values would need "
            f"{copies * pair / 2**30:.2f} GiB for their Ritz vectors; the {sum(keep)} "
            "best-converged copies that fit in half the free memory were used"
        )
        return [g[:, np.sort(o[:c])] for g, o, c in zip(groups, order, keep, strict=True)]

    def _second_pass(self, beta_off: np.ndarray, S_sel: np.ndarray, m: int
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        r"""Regenerate the Lanczos vectors (same operations, so the same vectors for an
        exact operator) and accumulate the Ritz vectors :math:`y_i = \sum_j s_{ji} v_j`
        and, for the verification, their products :math:`\sum_j s_{ji} A v_j` from the
        products the regeneration takes anyway (one more, for the last vector)."""
        ctx = self.ctx
        p = S_sel.shape[1]
        Y = torch.zeros(p, ctx.n, dtype=ctx.work, device=ctx.device)
        AY = torch.zeros(p, ctx.n, dtype=ctx.work, device=ctx.device)
        ctx.ledger.alloc(Y)
        ctx.ledger.alloc(AY)
        St = torch.as_tensor(S_sel, dtype=ctx.work, device=ctx.device)
        v, v_prev = self.v_start, None
        beta = np.concatenate([[0.0], beta_off])
        for j in range(m):
            Y.addr_(St[j], v)
            u = ctx.apply(v)
            AY.addr_(St[j], u.to(ctx.work))
            if j + 1 >= m:
                break
            w, a1 = ctx.three_term(u, v, v_prev, float(beta[j]))
            st = Step(j, u, v, w, 0.0, float(beta[j]), 0.0, 0.0, np.zeros(0))
            self._local_pass(st)
            if not (math.isfinite(st.alpha) and math.isfinite(st.beta_next)):
                raise non_finite_product("lanczos", f"in the second pass, iteration {j + 1}")
            # The same operations give the same vectors only if the products repeat: a
            # non-deterministic operator makes the regenerated recurrence drift from the
            # first one, and the drift grows geometrically once a value has converged.
            ratio = st.beta_next / float(beta[j + 1]) if beta[j + 1] > 0 else 1.0
            if not (math.isfinite(ratio) and abs(ratio - 1.0) <= self.REPLAY_DRIFT):
                ctx.notes.append(
                    f"none: the second pass could not regenerate the Lanczos vectors (at "
                    f"iteration {j + 1} ||w|| differs from the first pass by a factor "
                    f"{ratio:.4g}): the operator's products do not repeat, so no Ritz vectors "
                    "are returned and the values rest on their residual bounds and the "
                    "Cullum–Willoughby test (not verified)"
                )
                ctx.ledger.free(Y)
                ctx.ledger.free(AY)
                return None, None
            v_next = self._round(w / float(beta[j + 1]))
            v_prev, v = v, v_next
        return Y, AY


#: Columns per chunk of the float64 work of :func:`_combine_copies`: a few (c, 32768)
#: float64 blocks at a time instead of float64 copies of whole (c, n) blocks (on the CPU,
#: their page faults cost more than the arithmetic).
_COMBINE_COLS = 1 << 15


def _combine_copies(Y: torch.Tensor, AY: torch.Tensor, groups: list[np.ndarray],
                    values: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One Ritz vector per value from the vectors of all its ghost copies.

    Each copy's Ritz vector may hold only part of the eigenvector (its norm below one),
    and its residual is the same vector :math:`\beta_{m+1} v_{m+1}` times its last
    component: a combination of the copies cancels it. Candidates: each copy, the
    Rayleigh–Ritz pair of their span nearest the value, and the vector of their span with
    the smallest residual for the value (the pencil :math:`(R R^\top, Y Y^\top)`, R the
    copies' residuals). The candidate with the smallest residual is kept: whichever it is,
    its residual is a true one, measured with the second pass's products (explicitly,
    :math:`\|C(AY) - \theta\, C Y\|` per candidate, in float64: a combination that cancels
    the copies' residuals is not read off their Gram matrix). A value with one copy keeps
    it as it is.
    """
    p, n = len(groups), Y.shape[1]
    out_y = torch.empty(p, n, dtype=Y.dtype, device=Y.device)
    out_a = torch.empty(p, n, dtype=Y.dtype, device=Y.device)
    chunks = [slice(c0, min(n, c0 + _COMBINE_COLS)) for c0 in range(0, n, _COMBINE_COLS)]
    start = 0
    for r, (g, val) in enumerate(zip(groups, values)):
        c = g.shape[1]
        Yg, Ag = Y[start : start + c], AY[start : start + c]
        start += c
        if c == 1:
            out_y[r].copy_(Yg[0])
            out_a[r].copy_(Ag[0])
            continue
        G, H, K = (torch.zeros(c, c, dtype=torch.float64, device=Y.device) for _ in range(3))
        for cols in chunks:
            Yd, Ad = Yg[:, cols].double(), Ag[:, cols].double()
            Rd = Ad - val * Yd
            G.addmm_(Yd, Yd.T)
            H.addmm_(Yd, Ad.T)
            K.addmm_(Rd, Rd.T)
        G, H, K = (M.cpu().numpy() for M in (G, H, K))
        cands = [np.eye(c)[i] for i in range(c)]
        try:
            w, X = scipy.linalg.eigh((H + H.T) / 2.0, G)
            cands.append(X[:, int(np.argmin(np.abs(w - val)))])
            _, X = scipy.linalg.eigh((K + K.T) / 2.0, G)
            cands.append(X[:, 0])
        except (np.linalg.LinAlgError, ValueError):  # copies numerically dependent
            pass
        C = torch.as_tensor(np.stack(cands), dtype=torch.float64, device=Y.device)
        res2 = torch.zeros(C.shape[0], dtype=torch.float64, device=Y.device)
        y2 = torch.zeros_like(res2)
        for cols in chunks:
            Yc = C @ Yg[:, cols].double()
            Rc = C @ Ag[:, cols].double() - val * Yc
            y2 += (Yc * Yc).sum(dim=1)
            res2 += (Rc * Rc).sum(dim=1)
        i = int(torch.argmin(res2.sqrt() / y2.sqrt().clamp_min(1e-300)))
        # The same (rounded) coefficients for y and A y: a consistent pair.
        coef = C[i].to(Y.dtype)
        torch.mv(Yg.T, coef, out=out_y[r])
        torch.mv(Ag.T, coef, out=out_a[r])
    return out_y, out_a


_STRATEGIES = {"full": FullReorth, "selective": SelectiveReorth, "partial": PartialReorth,
               "none": NoReorth}


def make_strategy(name: str, ctx) -> Strategy:
    """The strategy object for ``reorth=name``."""
    return _STRATEGIES[name](ctx)
