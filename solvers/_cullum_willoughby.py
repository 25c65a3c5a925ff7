r"""Lanczos without reorthogonalization: the Cullum–Willoughby test and its ghost filter.

Without a basis, :math:`T_m` holds good Ritz values, numerically multiple copies
("ghosts") of converged ones, and spurious values. :func:`cullum_willoughby` tells them
apart from the tridiagonal alone; :class:`GhostFilter` applies it at every iteration of the
``none`` strategy with tolerances that follow the measured precision of the process.
"""

from __future__ import annotations

import math

import numpy as np

from ._tridiagonal import (
    EPS64,
    convergence_thresholds,
    residual_bounds,
    select_which,
    tridiag_eigh,
    tridiag_eigvals,
)

__all__ = ["GhostFilter", "cullum_willoughby"]


def cullum_willoughby(
    alpha: np.ndarray,
    beta: np.ndarray,
    theta: np.ndarray | None = None,
    rel_tol: float | None = None,
    merge_rel_tol: float | None = None,
    genuine: np.ndarray | None = None,
    theta_hat: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    r"""Cullum–Willoughby identification test for Lanczos without reorthogonalization.

    Without reorthogonalization, :math:`T_m` has (a) good Ritz values, (b) numerically
    multiple copies ("ghosts") of converged good values, and (c) spurious values.
    Cullum and Willoughby (1985, ch. 4) show that the spurious ones are exactly the
    *simple* eigenvalues of :math:`T_m` that are also eigenvalues of :math:`\hat T_m`
    (:math:`T_m` without its first row and column): their Ritz vector has a negligible
    component along the starting vector. The test:

    1. merge eigenvalues of :math:`T_m` closer than the merge tolerance into one (ghosts);
    2. among the simple ones, drop those within the tolerance of an eigenvalue of
       :math:`\hat T_m`.

    The two tolerances differ when the process is noisier than the arithmetic of
    :math:`T` (a bf16 operator): ghost copies of one eigenvalue then agree only to about
    the process precision :math:`\varepsilon_A\|T\|`, while the spurious test compares two
    float64 eigenvalue computations on the same :math:`T` and stays tight (a tolerance of
    :math:`\varepsilon_A\|T\|` there would drop genuine values whose start-vector
    component is small).

    The T-hat test alone cannot tell a spurious value from a genuine one whose eigenvector
    of :math:`T_m` has a small first component (a weakly represented eigenvalue, or one
    just emerging): :math:`|\theta_i - \hat\theta| \approx |s_{1i}|^2\|T\|`, so a
    genuine value with :math:`|s_{1i}| \sim 10^{-4}` matches :math:`\hat T_m` to
    :math:`10^{-8}\|T\|`. ``genuine`` marks values known to be good by another
    argument: a Ritz value whose residual bound :math:`\beta_{m+1}|e_m^\top s_i|` has
    converged is within that bound of an eigenvalue of :math:`A` (Paige), so it is never
    dropped as spurious.

    Args:
        alpha: Diagonal of :math:`T_m`.
        beta: Off-diagonal of :math:`T_m`.
        theta: Eigenvalues of :math:`T_m` (ascending), if already known.
        rel_tol: Tolerance of the spurious test relative to :math:`\|T_m\|`; default
            :math:`100\, m\, \varepsilon` (float64).
        merge_rel_tol: Tolerance for merging copies, relative to :math:`\|T_m\|`;
            default ``rel_tol``.
        genuine: Optional boolean mask over ``theta``: values that must not be dropped
            as spurious (e.g. those whose residual bound has converged).
        theta_hat: Eigenvalues of :math:`\hat T_m` (ascending), if already known.

    Returns:
        ``(values, representatives, n_spurious)``: the distinct good values (ascending),
        the index into ``theta`` of one copy of each (the copy the Ritz vector is taken
        from), and how many eigenvalues were dropped as spurious (ghost copies not counted).
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    m = alpha.size
    if theta is None:
        theta = tridiag_eigvals(alpha, beta)
    if m == 1:
        return theta.copy(), np.zeros(1, dtype=np.int64), 0
    tnorm = float(np.max(np.abs(theta)))
    scale = max(tnorm, np.finfo(float).tiny)
    tol = (100.0 * m * EPS64 if rel_tol is None else rel_tol) * scale
    merge_tol = tol if merge_rel_tol is None else max(merge_rel_tol * scale, tol)
    if theta_hat is None:
        theta_hat = tridiag_eigvals(alpha[1:], beta[1:])

    # Group numerically multiple copies (theta is ascending).
    starts = np.flatnonzero(np.concatenate([[True], np.diff(theta) > merge_tol]))
    sizes = np.diff(np.concatenate([starts, [m]]))
    # Distance of each group's first value to the nearest eigenvalue of T-hat (its two
    # neighbours in the sorted theta_hat); only simple groups can be spurious.
    first = theta[starts]
    pos = np.searchsorted(theta_hat, first)
    left = np.where(pos > 0, np.abs(theta_hat[np.maximum(pos - 1, 0)] - first), np.inf)
    right = np.where(pos < theta_hat.size,
                     np.abs(theta_hat[np.minimum(pos, theta_hat.size - 1)] - first), np.inf)
    spurious = (sizes == 1) & (np.minimum(left, right) <= tol)
    if genuine is not None:
        spurious &= ~np.asarray(genuine, dtype=bool)[starts]
    keep = ~spurious
    values = first.copy()
    for g in np.flatnonzero(sizes > 1):  # ghost copies: one value, their mean
        values[g] = theta[starts[g] : starts[g] + sizes[g]].mean()
    return values[keep], starts[keep].astype(np.int64), int(spurious.sum())


class GhostFilter:
    """The Cullum–Willoughby machinery of the ``none`` strategy, with locking.

    Args:
        k: Number of wanted values.
        which: "LA", "SA", "LM" or "BE".
        enabled: Apply the test (False shows the raw tridiagonal: ghosts included).
        eps_work: Unit roundoff of the working vectors.
        eps_floor: The precision the dtypes (or ``operator_eps``) state.

    Attributes:
        defect: The measured relative step defect of the products (kept current by the run).
    """

    #: Ghost copies are merged within this many eps ||T||, eps the precision the dtypes
    #: (or ``operator_eps``) state: with a bf16 operator copies of lambda_1 differ by
    #: ~1e-3 ||T|| (measured).
    CW_MERGE = 2.0

    #: ... and within this many measured step defects ||T||: with noisy products the
    #: copies of a converged value drift apart by multiples of the defect (measured: up to
    #: 3x the largest defect after 40 iterations at relative noise 1e-7).
    GHOST_SPREAD = 10.0

    def __init__(self, k: int, which: str, enabled: bool, eps_work: float,
                 eps_floor: float) -> None:
        self.k, self.which, self.enabled, self.eps_w = k, which, enabled, eps_work
        self.eps_floor = eps_floor
        self.defect = 0.0
        self.locked: list[tuple[float, float]] = []

    def state_dict(self) -> dict[str, object]:
        """The locked values and the defect in force, for a checkpoint."""
        return {"locked": [[float(t), float(b)] for t, b in self.locked],
                "defect": float(self.defect)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.locked = [(float(t), float(b)) for t, b in state["locked"]]
        self.defect = float(state["defect"])

    def lock(self, values: np.ndarray, bounds: np.ndarray, tnorm: float,
             tol: float) -> np.ndarray:
        """Convergence with locking.

        While a ghost copy of a converged value emerges, the two copies mix and their
        bounds rise for a few iterations although the value does not move. A value that
        met its threshold once stays converged while it stays within that bound plus the
        threshold of the locked value (eigenvalue error <= residual bound).
        """
        thr = convergence_thresholds(values, tnorm, tol)
        conv = bounds <= thr
        for i, th in enumerate(values):
            if not conv[i] and any(abs(th - t) <= b + thr[i] for t, b in self.locked):
                conv[i] = True
            elif bounds[i] <= thr[i]:
                self.locked.append((float(th), float(bounds[i])))
        return conv

    def cw_rel_tol(self, m: int) -> float:
        # The spurious test compares eigenvalues of T and T-hat computed from the same
        # scalars: their agreement is set by the arithmetic of the recurrence, not by the
        # operator's noise.
        return max(100.0 * m * EPS64, 10.0 * math.sqrt(m) * self.eps_w)

    def merge_rel_tol(self, m: int) -> float:
        # Ghost copies agree to about the working precision times ||T|| (a float64-only
        # tolerance leaves float32 ghosts unmerged and then misjudged as spurious), and no
        # better than the precision of the process: the dtypes' (a bf16 operator: ~1e-3
        # ||T||) or the measured step noise of the products.
        return max(self.cw_rel_tol(m), self.CW_MERGE * self.eps_floor,
                   self.GHOST_SPREAD * self.defect)

    def ritz(self, alpha: np.ndarray, beta_off: np.ndarray, beta_next: float, tol: float):
        """Wanted (theta, values, representatives, positions, n_spurious, decomposition)
        after the test; the decomposition ``(S, theta_hat)`` (the eigenvectors of T and the
        eigenvalues of T-hat, None where not computed) is reused by :meth:`bounds` and
        :meth:`gap_in_wanted` on the same tridiagonal.

        A Ritz value whose residual bound meets the convergence threshold is within that
        bound of an eigenvalue of A (Paige), so the CW test never drops it as spurious: a
        weakly represented genuine eigenvalue (small first component of its eigenvector of
        T) matches an eigenvalue of T-hat to about ``s_1^2 ||T||``, inside the tolerance.
        """
        S = theta_hat = None
        if self.enabled:
            theta, S = tridiag_eigh(alpha, beta_off)
            tnorm = float(np.max(np.abs(theta)))
            genuine = (residual_bounds(S[-1], beta_next)
                       <= convergence_thresholds(theta, tnorm, tol))
            theta_hat = tridiag_eigvals(alpha[1:], beta_off[1:]) if alpha.size > 1 else None
            values, reps, n_spur = cullum_willoughby(
                alpha, beta_off, theta, self.cw_rel_tol(alpha.size),
                self.merge_rel_tol(alpha.size), genuine=genuine, theta_hat=theta_hat)
        else:
            theta = tridiag_eigvals(alpha, beta_off)
            values, reps, n_spur = theta, np.arange(theta.size), 0
        idx = select_which(values, self.k, self.which)
        return theta, values, reps, idx, n_spur, (S, theta_hat)

    def gap_in_wanted(self, alpha: np.ndarray, beta_off: np.ndarray, theta: np.ndarray,
                      reps: np.ndarray, sel: np.ndarray,
                      theta_hat: np.ndarray | None = None) -> bool:
        """Whether an unresolved dropped value lies among the wanted ones (do not stop).

        The CW tolerance is widened to the working precision, so it also drops genuine
        values whose eigenvector of T has a small first component (``|theta - theta_hat|
        ~ s_1^2 ||T||``): a weakly represented eigenvalue that has not converged yet. A
        value is certainly spurious only when it matches an eigenvalue of T-hat to the
        float64 arithmetic of the two eigenvalue computations (``100 m eps64 ||T||``,
        Cullum and Willoughby's own test). A dropped value that ranks (by ``which``) at or
        above the last wanted one and is not certainly spurious keeps the iteration going
        until it resolves: it converges (and is then kept) or settles onto T-hat.
        """
        if not self.enabled or sel.size == 0:
            return False
        m = theta.size
        tnorm = max(float(np.max(np.abs(theta))), 1e-300)
        group = np.concatenate([[0], np.cumsum(np.diff(theta) > self.merge_rel_tol(m)
                                               * tnorm)])
        dropped = ~np.isin(group, group[reps])
        if not dropped.any():
            return False
        cand = theta[dropped]
        if self.which == "LA":
            inside = cand >= sel.min()
        elif self.which == "SA":
            inside = cand <= sel.max()
        elif self.which == "LM":
            inside = np.abs(cand) >= np.abs(sel).min()
        else:  # BE: descending, the top ceil(k/2) first
            top, bottom = sel[: sel.size - sel.size // 2], sel[sel.size - sel.size // 2 :]
            inside = cand >= top.min()
            if bottom.size:
                inside |= cand <= bottom.max()
        cand = cand[inside]
        if cand.size == 0:
            return False
        if theta_hat is None:
            theta_hat = tridiag_eigvals(alpha[1:], beta_off[1:])
        dist = np.min(np.abs(theta_hat[:, None] - cand[None, :]), axis=0)
        return bool(np.any(dist > 100.0 * m * EPS64 * tnorm))

    def bounds(self, alpha, beta_off, theta, reps_sel, beta_next, S=None):
        """Residual bounds of the chosen values (best copy of a ghost group), and the
        eigenvectors of T of every copy of each group (columns), for the Ritz vectors.
        ``S``: all eigenvectors of T when :meth:`ritz` computed them (else the needed
        range is computed here).

        Returns:
            ``(bounds, groups, best)``: the best bound per value, one (m, copies) matrix per
            value, and the position in ``theta`` of each value's best copy.
        """
        if reps_sel.size == 0:
            return np.zeros(0), [], reps_sel
        tol_m = self.merge_rel_tol(alpha.size) * max(float(np.max(np.abs(theta))), 1e-300)
        # Expand each representative to its group of copies, then pick the best bound.
        spans = []
        for r in reps_sel:
            hi = r
            while hi + 1 < theta.size and theta[hi + 1] - theta[hi] <= tol_m:
                hi += 1
            spans.append((r, hi))
        lo_all = min(g[0] for g in spans)
        hi_all = max(g[1] for g in spans)
        if S is None:
            _, S = tridiag_eigh(alpha, beta_off, (int(lo_all), int(hi_all)))
        else:
            S = S[:, int(lo_all) : int(hi_all) + 1]
        bounds, best, groups = [], [], []
        for lo, hi in spans:
            cols = np.arange(lo, hi + 1) - lo_all
            b = abs(beta_next) * np.abs(S[-1, cols])
            i = int(np.argmin(b))
            bounds.append(b[i])
            best.append(cols[i])
            groups.append(S[:, cols])
        return np.asarray(bounds), groups, np.asarray(best) + lo_all
