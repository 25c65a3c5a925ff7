r"""The in-house Lanczos eigensolver with full, selective, partial or no reorthogonalization.

For a symmetric operator :math:`A` (n x n) and a unit start vector :math:`v_1`, the
Lanczos recurrence

.. math::

    \beta_{j+1} v_{j+1} = A v_j - \alpha_j v_j - \beta_j v_{j-1},\qquad
    \alpha_j = v_j^\top A v_j,\quad \beta_{j+1} = \|\cdot\|

builds :math:`A V_m = V_m T_m + \beta_{m+1} v_{m+1} e_m^\top` with :math:`T_m` tridiagonal;
the eigenvalues of :math:`T_m` (Ritz values) approximate the extreme eigenvalues of
:math:`A`. One product with :math:`A` per iteration; the recurrence scalars of an
iteration reach the host together, in one synchronisation. See ``docs/lanczos.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import scipy.linalg
import torch

from ._as_operator import TorchOperator, as_operator, with_parameters_fixed
from ._reorthogonalization import (
    REORTH,
    KrylovBasis,
    SelectiveCache,
    block_rows_for,
    offending_range,
    omega_update,
)
from ._tridiagonal import (
    EPS64,
    WHICH,
    convergence_thresholds,
    cullum_willoughby,
    residual_bounds,
    select_which,
    tridiag_eigh,
    tridiag_eigvals,
)

__all__ = [
    "LanczosCoefficients",
    "LanczosConfig",
    "LanczosResult",
    "lanczos",
    "lanczos_coefficients",
]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class LanczosConfig:
    """Settings of :func:`lanczos` (the seed's fields plus the strategy controls).

    Attributes:
        k: Number of eigenvalues (the ``k`` argument of :func:`lanczos` wins).
        max_iters: Hard cap on Lanczos iterations (matvecs of the first pass). Strategies
            that keep a basis are also capped at n.
        tol: Relative convergence tolerance: a Ritz value :math:`\\theta` has converged when
            :math:`\\beta_{m+1}|e_m^\\top s| \\le \\text{tol}\\cdot\\max(|\\theta|,
            \\varepsilon^{2/3}\\|T\\|)` (ARPACK's floor, float64 :math:`\\varepsilon`).
            ``tol=0`` runs to ``max_iters``.
        reorth_period: The seed's switch: 0 means full reorthogonalization, > 0 selective
            (unless ``reorth`` is given). Periodic reorthogonalization is not a sound
            strategy, so the value itself is not used as a period.
        dtype_compute: Dtype of the stored Krylov vectors; None = the operator's dtype.
        dtype_tridiag: Must be ``torch.float64`` (the tridiagonal and all recurrence
            scalars are float64); other values are refused.
        seed: Seed of the start vector (and of fresh vectors after a breakdown).
        regularization: Jitter used only after a solver failure (reported); default 0.
        reorth: "full", "selective", "partial", "none", or None (derive from
            ``reorth_period``).
        which: "LA" (default), "SA", "LM" or "BE".
        basis_device: Where the basis lives: None (the operator's device) or "cpu"
            (offload; vectors travel to the CPU for the reorthogonalization products).
        return_eigenvectors: Return the Ritz vectors (for "none" this is a second pass
            with as many matvecs again).
        record_history: Keep all Ritz values of every iteration (O(j^2) per iteration).
        progress: Show a tqdm progress bar (needs the ``progress`` extra).
        cullum_willoughby: For "none": remove spurious Ritz values and merge ghosts.
            Switch off only to see what the test is for.
        rayleigh_ritz: Rayleigh–Ritz on (V^T A V, V^T V) at the end; None = on for a
            bf16/fp16 basis with full reorthogonalization (the only case it needs and
            supports).
        measure_orthogonality: Compute ``orthogonality_loss`` = :math:`\\max|V^\\top V - I|`
            at the end of a run that keeps a basis: :math:`j^2 n` flops, about one matvec of
            a small MLP at 19 iterations but hundreds of matvecs' worth at j = 300 on a
            large model. False skips it (the loss is reported as NaN).
        operator_eps: Relative accuracy of one product with the operator; None =
            ``torch.finfo(operator dtype).eps`` (2^-7 for a bf16 operator, whose products
            carry noise of that order and are not exactly linear or symmetric). Set it for
            an operator that is less accurate than its dtype (a float64 operator built from
            float32 data, a stochastic product). The process precision
            :math:`\\varepsilon_A = \\max(\\varepsilon_{\\text{basis}}, \\text{operator\\_eps})`
            sets every threshold: semi-orthogonality :math:`\\sqrt{\\varepsilon_A}`, the
            :math:`\\omega`-recurrence noise, Cullum–Willoughby's ghost merging, breakdown,
            and the floor of ``tol`` (see ``docs/lanczos.md``).
    """

    k: int = 5
    max_iters: int = 300
    tol: float = 1e-10
    reorth_period: int = 0
    dtype_compute: torch.dtype | None = None
    dtype_tridiag: torch.dtype = torch.float64
    seed: int = 0
    regularization: float = 0.0
    reorth: str | None = None
    which: str = "LA"
    basis_device: str | torch.device | None = None
    return_eigenvectors: bool = True
    record_history: bool = False
    progress: bool = False
    cullum_willoughby: bool = True
    rayleigh_ritz: bool | None = None
    operator_eps: float | None = None
    measure_orthogonality: bool = True

    def __post_init__(self) -> None:
        self.validate()

    @property
    def strategy(self) -> str:
        """The reorthogonalization strategy after the seed mapping."""
        if self.reorth is not None:
            return self.reorth
        return "full" if self.reorth_period == 0 else "selective"

    def validate(self) -> None:
        """Raise ValueError/TypeError for any invalid field (called before any work)."""
        if not isinstance(self.k, int | np.integer) or self.k < 1:
            raise ValueError(f"k must be a positive int, got {self.k!r}")
        if not isinstance(self.max_iters, int | np.integer) or self.max_iters < 1:
            raise ValueError(f"max_iters must be a positive int, got {self.max_iters!r}")
        if not (isinstance(self.tol, int | float) and math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        if not isinstance(self.reorth_period, int | np.integer) or self.reorth_period < 0:
            raise ValueError(f"reorth_period must be an int >= 0, got {self.reorth_period!r}")
        if self.reorth is not None and self.reorth not in REORTH:
            raise ValueError(f"unknown reorth={self.reorth!r}; expected one of {REORTH}")
        if self.which not in WHICH:
            raise ValueError(f"unknown which={self.which!r}; expected one of {WHICH}")
        if self.dtype_tridiag is not torch.float64:
            raise ValueError(
                f"dtype_tridiag must be torch.float64 (got {self.dtype_tridiag}); the tridiagonal "
                "and recurrence scalars are always float64"
            )
        if self.dtype_compute is not None and (
            not isinstance(self.dtype_compute, torch.dtype)
            or not self.dtype_compute.is_floating_point
        ):
            raise TypeError(f"dtype_compute must be a floating torch dtype, got "
                            f"{self.dtype_compute!r}")
        if not isinstance(self.seed, int | np.integer):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if not (math.isfinite(self.regularization) and self.regularization >= 0):
            raise ValueError(f"regularization must be >= 0, got {self.regularization!r}")
        if self.operator_eps is not None and not (
            isinstance(self.operator_eps, int | float) and 0 < self.operator_eps < 1
        ):
            raise ValueError(f"operator_eps must be None or a number in (0, 1), got "
                             f"{self.operator_eps!r}")
        if self.rayleigh_ritz and self.strategy != "full":
            raise ValueError("rayleigh_ritz=True needs reorth='full' (it uses its coefficients)")


@dataclass(frozen=True)
class LanczosResult:
    """What :func:`lanczos` found.

    Attributes:
        eigenvalues: float64, length <= k, in the order ``which`` defines.
        eigenvectors: (n, len(eigenvalues)) torch tensor of unit Ritz vectors (columns), on
            the operator's device, or None.
        residual_norms: Residual estimates :math:`\\beta_{m+1}|e_m^\\top s_i|` (float64).
        converged: Per value, whether it met ``tol``.
        iterations: Lanczos iterations (length of the tridiagonal).
        matvecs: Products with the operator (second pass of "none" included).
        spurious_removed: Ritz values the Cullum–Willoughby test removed ("none").
        orthogonality_loss: :math:`\\max|V^\\top V - I|` of the stored basis (NaN for "none"
            and with ``measure_orthogonality=False``).
        history: Per iteration, all Ritz values (ascending), if ``record_history``.
        seconds_matvec: Wall time inside the operator.
        seconds_other: The rest of the wall time.
        peak_memory_bytes: Peak bytes of the tensors the solver itself allocates (basis,
            working vectors, Ritz vectors); the operator's own memory is not included.
        strategy: The reorthogonalization strategy used.
        which: The ``which`` used.
        breakdowns: Times the recurrence broke down (:math:`\\beta \\approx 0`).
        regularization_used: Jitter applied after a solver failure (0 if none).
        rayleigh_ritz: Whether the values come from the Rayleigh–Ritz step.
        notes: Human-readable remarks (fewer values than k, fallbacks, a raised ``tol``).
        process_eps: :math:`\\varepsilon_A`, the precision every threshold used (the larger
            of the basis dtype's epsilon and ``operator_eps``).
        tol_used: The convergence tolerance applied: ``config.tol``, or the accuracy floor
            when ``config.tol`` asked for more than the operator can give (then ``notes``
            says so); 0 for ``tol=0``.
        reorthogonalizations: Iterations that orthogonalized against more than the local
            vectors (every iteration for "full"; partial's triggered steps; selective's
            steps with at least one good Ritz vector; 0 for "none").
    """

    eigenvalues: np.ndarray
    eigenvectors: torch.Tensor | None
    residual_norms: np.ndarray
    converged: np.ndarray
    iterations: int
    matvecs: int
    spurious_removed: int
    orthogonality_loss: float
    history: list[np.ndarray] | None
    seconds_matvec: float
    seconds_other: float
    peak_memory_bytes: int
    strategy: str
    which: str
    breakdowns: int = 0
    regularization_used: float = 0.0
    rayleigh_ritz: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)
    process_eps: float = float("nan")
    tol_used: float = float("nan")
    reorthogonalizations: int = 0

    @property
    def all_converged(self) -> bool:
        return bool(np.all(self.converged)) and self.converged.size > 0

    def eigenvector_as_params(
        self, i: int, like: Sequence[torch.Tensor] | Sequence[torch.Size]
    ) -> list[torch.Tensor]:
        """Eigenvector ``i`` split into tensors shaped like ``like`` (parameters or shapes).

        Args:
            i: Which eigenvector (column of ``eigenvectors``).
            like: Parameters (tensors) or shapes, in the operator's flattening order.

        Returns:
            Views of the flat vector, one per entry of ``like``.
        """
        if self.eigenvectors is None:
            raise ValueError("no eigenvectors: run with return_eigenvectors=True")
        shapes = [tuple(p.shape) if isinstance(p, torch.Tensor) else tuple(p) for p in like]
        sizes = [math.prod(s) for s in shapes]
        vec = self.eigenvectors[:, i]
        if sum(sizes) != vec.numel():
            raise ValueError(f"shapes hold {sum(sizes)} entries, the eigenvector {vec.numel()}")
        return [c.view(s) for c, s in zip(torch.split(vec, sizes), shapes)]


class _Ledger:
    """Bytes of the tensors the solver allocates (current and peak)."""

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0

    def alloc(self, t: torch.Tensor | int) -> None:
        self.current += t if isinstance(t, int) else t.numel() * t.element_size()
        self.peak = max(self.peak, self.current)

    def free(self, t: torch.Tensor | int) -> None:
        self.current -= t if isinstance(t, int) else t.numel() * t.element_size()


class _Timer:
    """Wall time inside the operator; CUDA events avoid a host sync per matvec."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.cpu_seconds = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def __call__(self, op: TorchOperator, x: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = op(x)
            end.record()
            self.events.append((start, end))
            return y
        t0 = time.perf_counter()
        y = op(x)
        self.cpu_seconds += time.perf_counter() - t0
        return y

    def seconds(self) -> float:
        if self.cuda and self.events:
            torch.cuda.synchronize()
            return self.cpu_seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1e3
        return self.cpu_seconds


def _validate_v0(v0: object, n: int, device: torch.device, work: torch.dtype) -> torch.Tensor:
    if isinstance(v0, LanczosResult):
        if v0.eigenvectors is None:
            raise ValueError("v0 is a LanczosResult without eigenvectors")
        # A warm start needs a component along every wanted eigenvector: their sum has it.
        v0 = v0.eigenvectors.sum(dim=1)
    if isinstance(v0, np.ndarray):
        if not np.issubdtype(v0.dtype, np.floating):
            raise TypeError(f"v0 must be a floating array, got dtype {v0.dtype}")
        v0 = torch.from_numpy(np.ascontiguousarray(v0))
    if not isinstance(v0, torch.Tensor):
        raise TypeError(f"v0 must be a torch tensor, numpy array or LanczosResult, got "
                        f"{type(v0).__name__}")
    if not v0.is_floating_point():
        raise TypeError(f"v0 must have a real floating dtype, got {v0.dtype}")
    if v0.ndim != 1 or v0.numel() != n:
        raise ValueError(f"v0 must be a 1-D vector of length {n}, got shape {tuple(v0.shape)}")
    v = v0.detach().to(device=device, dtype=work)  # the start vector's documented conversion
    if not bool(torch.isfinite(v).all()):
        raise ValueError("v0 contains NaN or Inf")
    nrm = float(torch.linalg.vector_norm(v))
    if nrm == 0.0:
        raise ValueError("v0 is the zero vector")
    return v / nrm


def _work_dtype(dtype_compute: torch.dtype) -> torch.dtype:
    # Arithmetic on the current vectors: float64 for a float64 basis, else float32.
    return torch.float64 if dtype_compute == torch.float64 else torch.float32


def _fresh_vector(
    n: int, gen: torch.Generator, basis: KrylovBasis, j: int, work: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """A random unit vector orthogonal to rows 0..j-1 of the basis (after a breakdown)."""
    for _ in range(5):
        r = torch.randn(n, generator=gen, dtype=work).to(device=device)
        r = r / torch.linalg.vector_norm(r)
        for _ in range(3):
            r, _h = basis.cgs(r, j)
        nrm = float(torch.linalg.vector_norm(r))
        if nrm > 1e-3:
            return r / nrm
    raise RuntimeError("could not find a vector orthogonal to the Krylov basis")


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "progress=True needs tqdm: pip install 'curvops[progress]'"
        ) from err
    return tqdm(total=total, desc="lanczos", unit="it")


def _rayleigh_ritz(
    coef_cols: list[np.ndarray], G: np.ndarray, regularization: float
) -> tuple[np.ndarray, np.ndarray, float, str | None]:
    r"""Ritz pairs of the projected pencil :math:`(V^\top A V, V^\top V)`.

    With every coefficient of the recurrence and the reorthogonalization kept,
    :math:`A v_j = \sum_{i \le j} c_{ij} v_i + w_j` with :math:`w_j` orthogonal to
    :math:`v_0..v_j` to the working precision. Hence, for :math:`i \le j`,
    :math:`(V^\top A V)_{ij} = \sum_l G_{il} c_{lj}` with :math:`G = V^\top V`; symmetry
    fills the lower triangle, with no extra product with A.
    """
    m = len(coef_cols)
    C = np.zeros((m, m))
    for j, col in enumerate(coef_cols):
        C[: col.size, j] = col
    M = G @ C
    M = np.triu(M) + np.triu(M, 1).T
    used = 0.0
    try:
        theta, S = scipy.linalg.eigh(M, G)
        return theta, S, used, None
    except (np.linalg.LinAlgError, ValueError):
        if regularization <= 0:
            return np.zeros(0), np.zeros((m, 0)), 0.0, (
                "Rayleigh–Ritz failed (V^T V not positive definite); values read off T instead"
            )
        used = regularization * max(1.0, float(np.abs(np.diag(G)).max()))
        theta, S = scipy.linalg.eigh(M, G + used * np.eye(m))
        return theta, S, used, f"Rayleigh–Ritz needed jitter {used:.3g} on V^T V"


@with_parameters_fixed
def lanczos(
    A: object,
    k: int | None = None,
    *,
    config: LanczosConfig | None = None,
    v0: torch.Tensor | np.ndarray | LanczosResult | None = None,
) -> LanczosResult:
    """Extreme eigenvalues (and vectors) of a symmetric operator by Lanczos.

    Args:
        A: A curvops operator, a ``scipy.sparse.linalg.LinearOperator``, a numpy array, a
            torch tensor, or anything with ``shape`` and ``matvec``. It must be symmetric.
        k: Number of eigenvalues; None = ``config.k``. Must be < n.
        config: Settings (:class:`LanczosConfig`); default ``LanczosConfig()``.
        v0: Start vector (length n), or a previous :class:`LanczosResult` to warm-start
            from (the sum of its Ritz vectors); default a seeded random vector.

    Returns:
        A :class:`LanczosResult`.

    Raises:
        ValueError: k >= n, non-square operator, unknown which/reorth, max_iters < k, bad v0.
        TypeError: Unsupported operator or v0 types.
    """
    t_start = time.perf_counter()
    cfg = LanczosConfig() if config is None else config
    cfg.validate()
    if k is not None:
        cfg = replace(cfg, k=k)
    k = cfg.k
    op = as_operator(A)
    n = op.n
    if k >= n:
        raise ValueError(f"k={k} must be smaller than the operator size n={n}")
    if cfg.max_iters < k:
        raise ValueError(f"max_iters={cfg.max_iters} must be at least k={k}")
    strategy = cfg.strategy
    dtype_c = op.dtype if cfg.dtype_compute is None else cfg.dtype_compute
    work = _work_dtype(dtype_c)
    device = op.device
    basis_device = device if cfg.basis_device is None else torch.device(cfg.basis_device)
    use_rr = cfg.rayleigh_ritz
    if use_rr is None:
        use_rr = strategy == "full" and dtype_c in _LOW_PRECISION
    gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    if v0 is None:
        # Drawn on the CPU generator (the same seed gives the same vector on any device),
        # in the working dtype (float64 draws cost as much as a cheap matvec at n ~ 1e5).
        v = torch.randn(n, generator=gen, dtype=work).to(device=device)
        v = v / torch.linalg.vector_norm(v)
    else:
        v = _validate_v0(v0, n, device, work)
    pbar = _progress_bar(cfg.max_iters, cfg.progress)

    runner = _Run(op, cfg, strategy, dtype_c, work, basis_device, gen, k, use_rr)
    try:
        res = runner.run(v, pbar)
    finally:
        if pbar is not None:
            pbar.close()
    total = time.perf_counter() - t_start
    t_mv = runner.timer.seconds()
    return replace(res, seconds_matvec=t_mv, seconds_other=max(0.0, total - t_mv),
                   process_eps=runner.eps_a, tol_used=runner.tol,
                   reorthogonalizations=runner.reorths)


class _Run:
    """One Lanczos run: the state shared by the iteration and the extraction."""

    #: Ghost copies are merged within this many eps_A ||T|| (Cullum–Willoughby).
    CW_MERGE = 2.0

    def __init__(self, op, cfg, strategy, dtype_c, work, basis_device, gen, k, use_rr):
        self.op, self.cfg, self.strategy = op, cfg, strategy
        self.dtype_c, self.work, self.gen, self.k = dtype_c, work, gen, k
        self.use_rr = use_rr
        self.n = op.n
        self.device = op.device
        self.basis_device = basis_device
        self.keeps_basis = strategy != "none"
        self.m_max = min(cfg.max_iters, self.n) if self.keeps_basis else cfg.max_iters
        self.ledger = _Ledger()
        self.timer = _Timer(op.device)
        self.eps_c = float(torch.finfo(dtype_c).eps)
        self.eps_w = float(torch.finfo(work).eps)
        # The operator's own accuracy: a bf16 product is only good to ~2^-8 relative, and
        # that noise (not the float64 or float32 of the vectors) is the "rounding error" of
        # Paige's analysis that makes converged Ritz vectors leak back into the basis.
        self.eps_op = (float(torch.finfo(op.dtype).eps) if cfg.operator_eps is None
                       else float(cfg.operator_eps))
        self.eps_a = max(self.eps_c, self.eps_op)
        # beta below this times ||A|| is rounding noise of a product with a vector of an
        # invariant subspace (measured: ~50 eps ||A|| at n = 500 in float64).
        # Without a basis ("none") the noise is larger (no reorthogonalization cleans it),
        # and a missed breakdown costs a whole run of matvecs on noise. A noisy operator
        # returns ~eps_op ||A|| for a vector of an invariant subspace.
        self.bd_factor = max(
            self.eps_w * ((1000.0 if strategy == "none" else 100.0) + math.sqrt(self.n)),
            self.eps_op,
        )
        self.matvecs = 0
        self.breakdowns = 0
        self.notes: list[str] = []
        self.tol = self._tolerance()
        self.reorths = 0
        self.history: list[np.ndarray] | None = [] if cfg.record_history else None
        self.vec_bytes = self.n * torch.empty(0, dtype=work).element_size()
        self._wbuf: torch.Tensor | None = None

    def _tolerance(self) -> float:
        """``config.tol``, raised to the accuracy the process can deliver (with a note).

        Residual bounds below :math:`\\varepsilon\\,|\\theta|` are rounding noise of the
        process: asking for them only adds iterations (and, without a basis, ghosts). The
        floor is :math:`\\varepsilon_A`, or the operator's epsilon alone when the
        Rayleigh–Ritz step recovers the accuracy a low-precision basis loses.
        """
        tol = float(self.cfg.tol)
        if tol == 0.0:
            return 0.0
        floor = self.eps_op if self.use_rr else self.eps_a
        if tol >= floor:
            return tol
        self.notes.append(
            f"tol={tol:.3g} is below the precision of the process (epsilon {floor:.3g}: "
            f"operator {self.eps_op:.3g}, basis {self.eps_c:.3g}); converged means "
            f"tol={floor:.3g}"
        )
        return floor

    # -- one product, with the documented cast when the basis dtype differs --------------
    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """One product, in the operator's dtype, on the working device (not yet owned)."""
        x = v if v.dtype == self.op.dtype else v.to(self.op.dtype)
        u = self.timer(self.op, x)
        self.matvecs += 1
        if not isinstance(u, torch.Tensor) or u.shape != (self.n,):
            raise TypeError(f"operator returned {type(u).__name__} of shape "
                            f"{getattr(u, 'shape', None)}, expected a vector of length {self.n}")
        return u.to(device=self.device)

    def _three_term(self, v, v_prev, beta_j):
        """``w = A v - beta_j v_prev - alpha v`` in the solver's own buffer.

        The operator's output is never updated in place: a curvops operator returns a
        fresh tensor today, but a caching operator, a numpy operator's buffer or an
        operator returning its input would be corrupted. Owning it costs nothing: the
        first update writes into the preallocated buffer (``torch.sub(..., out=)``, which
        also does the cast of a bf16 product) instead of updating in place, the same
        memory traffic; only the first iteration pays one copy.

        Returns w, alpha (device scalar) and None: no host sync. (||A v|| is estimated on
        the host as sqrt(alpha^2 + beta_j^2 + beta_{j+1}^2), which costs nothing.)
        """
        u = self.apply(v)
        if self._wbuf is None:
            self._wbuf = torch.empty(self.n, dtype=self.work, device=self.device)
        if v_prev is not None:
            w = torch.sub(u, v_prev, alpha=beta_j, out=self._wbuf)
        else:
            w = self._wbuf.copy_(u)
        a1 = torch.dot(v, w)
        w.addcmul_(v, a1, value=-1.0)
        return w, a1, None

    #: eps_1 of the omega-recurrence in units of eps_A (see _run_with_basis).
    OMEGA_NOISE = 10.0

    #: beta_{j+1} below this share of ||A v_j|| (or below sqrt(eps_A) of it) takes a pass
    #: against the whole basis before the breakdown test (see _run_with_basis).
    NEAR_INVARIANT = 1e-3

    #: DGKS / PROPACK's kappa: a second local Gram–Schmidt pass against v_j only when the
    #: first one cancelled, ||w|| < KAPPA ||A v_j|| (else it is orthogonal to ~eps already).
    KAPPA = 1.0 / math.sqrt(2.0)

    def _breaks_down(self, beta_next: float, anorm: float) -> bool:
        """Whether ``beta_next`` is rounding noise of ``||A||`` (an invariant subspace)."""
        return beta_next <= self.bd_factor * max(anorm, np.finfo(float).tiny)

    def _cancelled(self, alpha_j: float, beta_j: float, beta_next: float) -> bool:
        # ||A v_j||^2 = alpha_j^2 + beta_j^2 + beta_{j+1}^2 up to the basis's orthogonality.
        return beta_next**2 < self.KAPPA**2 * (alpha_j**2 + beta_j**2 + beta_next**2)

    def _local_pass(self, v, w, alpha_t):
        """Second Gram–Schmidt pass of ``w`` against ``v`` (in place); one more sync."""
        c = torch.dot(v, w)
        w.addcmul_(v, c, value=-1.0)
        alpha_t = alpha_t + c
        bnorm = torch.linalg.vector_norm(w)
        alpha_j, beta_next = torch.stack([alpha_t.double(), bnorm.double()]).tolist()
        return w, alpha_j, beta_next

    def run(self, v: torch.Tensor, pbar) -> LanczosResult:
        if self.keeps_basis:
            return self._run_with_basis(v, pbar)
        return self._run_none(v, pbar)

    # -- full / selective / partial -----------------------------------------------------
    def _run_with_basis(self, v: torch.Tensor, pbar) -> LanczosResult:
        n, work = self.n, self.work
        block = block_rows_for(n, self.dtype_c, self.basis_device, self.m_max + 1)
        basis = KrylovBasis(n, self.dtype_c, self.basis_device, block, self.ledger)
        self.ledger.alloc(4 * self.vec_bytes)  # u/w, v, v_prev and one temporary
        basis.set(0, v)
        v = basis.get(0, work, self.device)  # the stored (possibly rounded) vector
        alpha: list[float] = []
        beta: list[float] = [0.0]  # beta[j] couples v_{j-1} and v_j
        coef_cols: list[np.ndarray] = []
        anorm = 0.0
        # Semi-orthogonality (Parlett, Simon): |v_i^T v_j| <= sqrt(eps_A) keeps T_m the
        # projection of A to within eps_A ||A||, which is all a process of precision eps_A
        # can give; eps_A includes the operator's noise (a bf16 product), not only the
        # basis dtype's rounding.
        delta = math.sqrt(self.eps_a)
        eta = self.eps_a**0.75
        # Noise level of the omega-recurrence: the rounding each step adds, in units of
        # ||A|| (omega_update). PROPACK's sqrt(n) eps / 2 exceeds the threshold itself for
        # large n in float32 (a reorthogonalization every step), and torch's inner products
        # round to ~0.1 eps here; OMEGA_NOISE eps_A is the smallest multiple that kept every
        # low-rank float32 case semi-orthogonal (measured; 1 and 3 left 7e-4 > sqrt(eps)).
        eps1 = min(self.OMEGA_NOISE * self.eps_a, delta / 10.0)  # capped: bf16
        omega_prev = np.zeros(0)
        omega_cur = np.ones(1)
        force_idx = np.zeros(0, dtype=np.int64)
        cache = (
            SelectiveCache(
                n, work, self.device, self.eps_a, self.ledger, noise=self.OMEGA_NOISE
            )
            if self.strategy == "selective" else None
        )
        v_prev = None
        beta_next = 0.0
        m = 0
        for j in range(self.m_max):
            w, a1, unorm = self._three_term(v, v_prev, beta[j])
            h = None
            if self.strategy == "full":
                w, h = basis.cgs2(w, j + 1)
                alpha_t = a1 + h[j]
                self.reorths += 1
            else:
                alpha_t = a1
                if cache is not None and cache.count:
                    w = cache.project(w)
                    self.reorths += 1
                if force_idx.size:
                    w = basis.project_rows(force_idx, w)
                    self.reorths += 1
            bnorm = torch.linalg.vector_norm(w)
            # One host synchronisation per iteration: all recurrence scalars together.
            alpha_j, beta_next = torch.stack([alpha_t.double(), bnorm.double()]).tolist()
            if h is None and self._cancelled(alpha_j, beta[j], beta_next):
                w, alpha_j, beta_next = self._local_pass(v, w, alpha_t)
            unorm_f = math.sqrt(alpha_j**2 + beta[j] ** 2 + beta_next**2)
            near_invariant = h is None and beta_next < max(delta, self.NEAR_INVARIANT) * unorm_f
            if near_invariant:
                # Near an invariant subspace w is mostly what a semi-orthogonal basis leaves
                # along its own vectors (up to sqrt(eps_A) ||A||): only a pass against the
                # whole basis tells a breakdown from a new direction. (Without it a rank-8
                # operator's exhausted Krylov space went on with that pollution as its next
                # vector, and the run diverged.) Rare: only where beta collapses.
                w, _ = basis.cgs2(w, j + 1)
                beta_next = float(torch.linalg.vector_norm(w))
                self.reorths += 1
            alpha.append(alpha_j)
            anorm = max(anorm, unorm_f, abs(alpha_j))
            if h is not None and self.use_rr:
                # Kept on the device; moved to the host once, at the end.
                col = h.double().clone()
                col[j] += a1.double()
                if j > 0:
                    col[j - 1] += beta[j]
                coef_cols.append(col)
            m = j + 1
            if not math.isfinite(beta_next) or not math.isfinite(alpha_j):
                raise FloatingPointError(
                    f"Lanczos produced NaN/Inf at iteration {m}: the operator returned "
                    "non-finite values"
                )

            if self.strategy == "partial":
                omega_next = omega_update(
                    omega_prev, omega_cur, np.asarray(alpha), np.asarray(beta), beta_next, eps1,
                    anorm,
                )
                if force_idx.size:
                    omega_next[force_idx] = eps1
                    force_idx = np.zeros(0, dtype=np.int64)
                if near_invariant:
                    omega_next[:-1] = eps1  # orthogonal to the whole basis now
                elif beta_next > 0 and np.max(np.abs(omega_next[:-1]), initial=0.0) > delta:
                    idx = offending_range(omega_next, eta)
                    w = basis.project_rows(idx, w)
                    self.reorths += 1
                    beta_next = float(torch.linalg.vector_norm(w))
                    omega_next[idx] = eps1
                    force_idx = idx  # Simon: the next vector is reorthogonalized too
                omega_prev, omega_cur = omega_cur, omega_next

            breakdown = self._breaks_down(beta_next, anorm)
            if breakdown:
                self.breakdowns += 1
                beta_next = 0.0
            if pbar is not None:
                pbar.update(1)
            theta = S = None
            if self.strategy == "selective" or (self.tol > 0 and m >= self.k):
                theta, S = tridiag_eigh(np.asarray(alpha), np.asarray(beta[1:]))
            # Convergence: the wanted Ritz values of T_m with beta_{m+1} (0 on breakdown).
            stop = False
            if self.tol > 0 and m >= self.k:
                conv = self._converged(theta, S[-1], beta_next)
                stop = bool(conv.all()) and conv.size >= self.k
                if pbar is not None:
                    pbar.set_postfix(converged=int(conv.sum()))
            if self.history is not None:
                self.history.append(
                    theta.copy() if theta is not None
                    else tridiag_eigvals(np.asarray(alpha), np.asarray(beta[1:]))
                )
            if stop or m >= self.m_max or m >= n:
                break
            if self.strategy == "selective" and not breakdown:
                # Only for a next vector: a run that stops here forms no Ritz vector.
                tnorm = float(np.max(np.abs(theta)))
                bounds = beta_next * np.abs(S[-1])
                new = cache.new_good(theta, S, bounds, tnorm)
                if new.size:
                    Y = basis.combine_rows(S[:, new], m, work).to(self.device)
                    cache.add(theta[new], S[:, new], Y)
                    w = cache.project(w)
                    beta_next = float(torch.linalg.vector_norm(w))
                    if self._breaks_down(beta_next, anorm):
                        breakdown = True
                        self.breakdowns += 1
                        beta_next = 0.0
            if breakdown:
                v_next = _fresh_vector(n, self.gen, basis, m, work, self.device)
                if self.strategy == "partial":
                    omega_cur = np.full(m + 1, eps1)
                    omega_cur[-1] = 1.0
                    omega_prev = np.zeros(m)
                    force_idx = np.zeros(0, dtype=np.int64)
                basis.set(m, v_next)
            else:
                row = basis.row(m)
                if row.device == w.device:
                    # Normalized straight into the basis row (the documented cast included).
                    torch.div(w, beta_next, out=row)
                else:  # an offloaded basis
                    row.copy_(w.div_(beta_next))
            beta.append(beta_next)
            v_prev = v
            v = basis.get(m, work, self.device)
        v = v_prev = w = None  # views of the basis
        try:
            return self._extract_with_basis(basis, alpha, beta[1:m], beta_next, coef_cols, m)
        finally:
            basis.release()
            if cache is not None:
                cache.Y.release()

    def _converged(self, theta: np.ndarray, s_last: np.ndarray, beta_next: float) -> np.ndarray:
        idx = select_which(theta, self.k, self.cfg.which)
        tnorm = float(np.max(np.abs(theta)))
        bounds = abs(beta_next) * np.abs(s_last[idx])
        return bounds <= convergence_thresholds(theta[idx], tnorm, self.tol)

    def _extract_with_basis(self, basis, alpha, beta_off, beta_next, coef_cols, m):
        cfg, work = self.cfg, self.work
        a = np.asarray(alpha[:m])
        b = np.asarray(beta_off)
        theta, S = tridiag_eigh(a, b)
        tnorm = float(np.max(np.abs(theta)))
        idx = select_which(theta, self.k, cfg.which)
        bounds = abs(beta_next) * np.abs(S[-1, idx])
        conv = bounds <= convergence_thresholds(theta[idx], tnorm, self.tol or 1e-8)
        values = theta[idx]
        S_sel = S[:, idx]
        # float64 Gram only where it feeds the Rayleigh-Ritz step; otherwise the basis's
        # own dtype (its orthogonality cannot be measured finer than that anyway).
        G = None
        ortho = float("nan")
        if self.use_rr or cfg.measure_orthogonality:
            G = basis.gram(m, exact=self.use_rr)
        if cfg.measure_orthogonality:
            ortho = float(np.max(np.abs(G - np.eye(m))))
        reg_used = 0.0
        rr_done = False
        if self.use_rr:
            cols = [c.cpu().numpy() for c in coef_cols[:m]]
            th_rr, S_rr, reg_used, note = _rayleigh_ritz(cols, G, cfg.regularization)
            if note:
                self.notes.append(note)
            if th_rr.size:
                idx_rr = select_which(th_rr, self.k, cfg.which)
                values, S_sel, rr_done = th_rr[idx_rr], S_rr[:, idx_rr], True
        if values.size < self.k:
            self.notes.append(f"only {values.size} Ritz values available (k={self.k})")
        vecs = None
        if cfg.return_eigenvectors:
            Y = basis.combine_rows(S_sel, m, work).to(self.device)
            Y = Y / torch.linalg.vector_norm(Y, dim=1, keepdim=True)
            self.ledger.alloc(Y)
            vecs = Y.T
        return LanczosResult(
            eigenvalues=np.asarray(values, dtype=np.float64),
            eigenvectors=vecs,
            residual_norms=np.asarray(bounds, dtype=np.float64),
            converged=np.asarray(conv, dtype=bool),
            iterations=m,
            matvecs=self.matvecs,
            spurious_removed=0,
            orthogonality_loss=ortho,
            history=self.history,
            seconds_matvec=0.0,
            seconds_other=0.0,
            peak_memory_bytes=int(self.ledger.peak),
            strategy=self.strategy,
            which=cfg.which,
            breakdowns=self.breakdowns,
            regularization_used=reg_used,
            rayleigh_ritz=rr_done,
            notes=tuple(self.notes),
        )

    # -- none: three vectors and the Cullum–Willoughby test ---------------------------

    @staticmethod
    def _lock(values, bounds, tnorm, tol, locked: list[tuple[float, float]]) -> np.ndarray:
        """Convergence with locking, for "none".

        While a ghost copy of a converged value emerges, the two copies mix and their
        bounds rise for a few iterations although the value does not move. A value that
        met its threshold once stays converged while it stays within that bound plus the
        threshold of the locked value (eigenvalue error <= residual bound).
        """
        thr = convergence_thresholds(values, tnorm, tol)
        conv = bounds <= thr
        for i, th in enumerate(values):
            if not conv[i] and any(abs(th - t) <= b + thr[i] for t, b in locked):
                conv[i] = True
            elif bounds[i] <= thr[i]:
                locked.append((float(th), float(bounds[i])))
        return conv

    def _cw_rel_tol(self, m: int) -> float:
        # The spurious test compares eigenvalues of T and T-hat computed from the same
        # scalars: their agreement is set by the arithmetic of the recurrence, not by the
        # operator's noise.
        return max(100.0 * m * EPS64, 10.0 * math.sqrt(m) * self.eps_w)

    def _cw_merge_rel_tol(self, m: int) -> float:
        # Ghost copies agree to about the working precision times ||T|| (a float64-only
        # tolerance leaves float32 ghosts unmerged and then misjudged as spurious), and no
        # better than the process precision eps_A: with a bf16 operator, copies of lambda_1
        # differ by ~1e-3 ||T|| (measured), one CW_MERGE * eps_A.
        return max(self._cw_rel_tol(m), self.CW_MERGE * self.eps_a)

    def _ritz_none(self, alpha: np.ndarray, beta_off: np.ndarray, beta_next: float, tol: float):
        """Wanted (values, positions in theta, n_spurious) after the CW test.

        A Ritz value whose residual bound meets the convergence threshold is within that
        bound of an eigenvalue of A (Paige), so the CW test never drops it as spurious: a
        weakly represented genuine eigenvalue (small first component of its eigenvector of
        T) matches an eigenvalue of T-hat to about ``s_1^2 ||T||``, inside the tolerance.
        """
        if self.cfg.cullum_willoughby:
            theta, S = tridiag_eigh(alpha, beta_off)
            tnorm = float(np.max(np.abs(theta)))
            genuine = (residual_bounds(S[-1], beta_next)
                       <= convergence_thresholds(theta, tnorm, tol))
            values, reps, n_spur = cullum_willoughby(
                alpha, beta_off, theta, self._cw_rel_tol(alpha.size),
                self._cw_merge_rel_tol(alpha.size), genuine=genuine)
        else:
            theta = tridiag_eigvals(alpha, beta_off)
            values, reps, n_spur = theta, np.arange(theta.size), 0
        idx = select_which(values, self.k, self.cfg.which)
        return theta, values, reps, idx, n_spur

    def _gap_in_wanted(self, alpha: np.ndarray, beta_off: np.ndarray, theta: np.ndarray,
                       reps: np.ndarray, sel: np.ndarray) -> bool:
        """Whether an unresolved dropped value lies among the wanted ones (do not stop).

        The CW tolerance is widened to the working precision (:meth:`_cw_rel_tol`), so it
        also drops genuine values whose eigenvector of T has a small first component
        (``|theta - theta_hat| ~ s_1^2 ||T||``): a weakly represented eigenvalue that has
        not converged yet. A value is certainly spurious only when it matches an eigenvalue
        of T-hat to the float64 arithmetic of the two eigenvalue computations
        (``100 m eps64 ||T||``, Cullum and Willoughby's own test). A dropped value that
        ranks (by ``which``) at or above the last wanted one and is not certainly spurious
        keeps the iteration going until it resolves: it converges (and is then kept, see
        :meth:`_ritz_none`) or settles onto T-hat.
        """
        if not self.cfg.cullum_willoughby or sel.size == 0:
            return False
        m = theta.size
        tnorm = max(float(np.max(np.abs(theta))), 1e-300)
        group = np.concatenate([[0], np.cumsum(np.diff(theta) > self._cw_merge_rel_tol(m)
                                               * tnorm)])
        dropped = ~np.isin(group, group[reps])
        if not dropped.any():
            return False
        cand = theta[dropped]
        which = self.cfg.which
        if which == "LA":
            inside = cand >= sel.min()
        elif which == "SA":
            inside = cand <= sel.max()
        elif which == "LM":
            inside = np.abs(cand) >= np.abs(sel).min()
        else:  # BE: descending, the top ceil(k/2) first
            top, bottom = sel[: sel.size - sel.size // 2], sel[sel.size - sel.size // 2 :]
            inside = cand >= top.min()
            if bottom.size:
                inside |= cand <= bottom.max()
        cand = cand[inside]
        if cand.size == 0:
            return False
        theta_hat = tridiag_eigvals(alpha[1:], beta_off[1:])
        dist = np.min(np.abs(theta_hat[:, None] - cand[None, :]), axis=0)
        return bool(np.any(dist > 100.0 * m * EPS64 * tnorm))

    def _bounds_none(self, alpha, beta_off, theta, reps_sel, beta_next):
        """Residual bounds and eigenvectors of T for the chosen copies (best copy of a ghost)."""
        if reps_sel.size == 0:
            return np.zeros(0), np.zeros((alpha.size, 0)), reps_sel
        tol_m = self._cw_merge_rel_tol(alpha.size) * max(float(np.max(np.abs(theta))), 1e-300)
        # Expand each representative to its group of copies, then pick the best bound.
        groups = []
        for r in reps_sel:
            lo = r
            hi = r
            while hi + 1 < theta.size and theta[hi + 1] - theta[hi] <= tol_m:
                hi += 1
            groups.append((lo, hi))
        lo_all = min(g[0] for g in groups)
        hi_all = max(g[1] for g in groups)
        _, S = tridiag_eigh(alpha, beta_off, (int(lo_all), int(hi_all)))
        bounds, best = [], []
        for lo, hi in groups:
            cols = np.arange(lo, hi + 1) - lo_all
            b = abs(beta_next) * np.abs(S[-1, cols])
            i = int(np.argmin(b))
            bounds.append(b[i])
            best.append(cols[i])
        return np.asarray(bounds), S[:, best], np.asarray(best) + lo_all

    def _run_none(self, v0: torch.Tensor, pbar) -> LanczosResult:
        cfg = self.cfg
        self.ledger.alloc(4 * self.vec_bytes)  # v_prev, v, w and the product
        v = v0.to(self.dtype_c).to(self.work)  # the documented rounding of the stored vector
        v_start = v
        alpha: list[float] = []
        beta: list[float] = [0.0]
        v_prev = None
        beta_next = 0.0
        anorm = 0.0
        m = 0
        locked: list[tuple[float, float]] = []
        for j in range(self.m_max):
            w, alpha_t, unorm = self._three_term(v, v_prev, beta[j])
            # Always a second local pass here: without a basis, local orthogonality is all
            # that holds the vectors (the conditional DGKS pass of the basis strategies
            # measurably loosened the second-pass eigenvectors of a 250-step run).
            w, alpha_j, beta_next = self._local_pass(v, w, alpha_t)
            unorm_f = math.sqrt(alpha_j**2 + beta[j] ** 2 + beta_next**2)
            if not (math.isfinite(alpha_j) and math.isfinite(beta_next)):
                raise FloatingPointError(f"Lanczos produced NaN/Inf at iteration {j + 1}")
            alpha.append(alpha_j)
            anorm = max(anorm, unorm_f, abs(alpha_j))
            m = j + 1
            breakdown = self._breaks_down(beta_next, anorm)
            if breakdown:
                self.breakdowns += 1
                beta_next = 0.0
            if pbar is not None:
                pbar.update(1)
            a, b = np.asarray(alpha), np.asarray(beta[1:])
            stop = False
            if self.tol > 0 and m >= self.k:
                theta, values, reps, idx, _ = self._ritz_none(a, b, beta_next, self.tol)
                bnds, _S, _ = self._bounds_none(a, b, theta, reps[idx], beta_next)
                tnorm = float(np.max(np.abs(theta)))
                conv = self._lock(values[idx], bnds, tnorm, self.tol, locked)
                stop = (idx.size >= self.k and bool(conv.all())
                        and not self._gap_in_wanted(a, b, theta, reps, values[idx]))
            if self.history is not None:
                self.history.append(tridiag_eigvals(a, b))
            if stop or breakdown or m >= self.m_max:
                if breakdown and not stop:
                    self.notes.append(
                        f"breakdown at iteration {m}: an invariant subspace was found; 'none' "
                        "keeps no basis to continue from, so at most one copy of each "
                        "eigenvalue in it is reported"
                    )
                break
            beta.append(beta_next)
            v_next = (w / beta_next).to(self.dtype_c).to(self.work)
            v_prev, v = v, v_next

        a, b = np.asarray(alpha), np.asarray(beta[1:m])
        theta, values, reps, idx, n_spur = self._ritz_none(a, b, beta_next, self.tol or 1e-8)
        bnds, S_sel, best = self._bounds_none(a, b, theta, reps[idx], beta_next)
        if cfg.cullum_willoughby and best.size:
            # Of numerically multiple copies, report the best-converged one.
            values = values.copy()
            values[idx] = theta[best]
        tnorm = float(np.max(np.abs(theta)))
        conv = self._lock(values[idx], bnds, tnorm, self.tol or 1e-8, locked)
        if idx.size < self.k:
            self.notes.append(f"only {idx.size} distinct good Ritz values (k={self.k})")
        vecs = None
        if cfg.return_eigenvectors and idx.size:
            vecs = self._second_pass(v_start, a, b, S_sel, m)
        return LanczosResult(
            eigenvalues=np.asarray(values[idx], dtype=np.float64),
            eigenvectors=vecs,
            residual_norms=np.asarray(bnds, dtype=np.float64),
            converged=np.asarray(conv, dtype=bool),
            iterations=m,
            matvecs=self.matvecs,
            spurious_removed=int(n_spur),
            orthogonality_loss=float("nan"),
            history=self.history,
            seconds_matvec=0.0,
            seconds_other=0.0,
            peak_memory_bytes=int(self.ledger.peak),
            strategy="none",
            which=cfg.which,
            breakdowns=self.breakdowns,
            notes=tuple(self.notes),
        )

    def _second_pass(self, v_start, alpha, beta_off, S_sel, m) -> torch.Tensor:
        """Regenerate the Lanczos vectors (same operations, so the same vectors) and
        accumulate the Ritz vectors :math:`y_i = \\sum_j s_{ji} v_j` on the fly."""
        p = S_sel.shape[1]
        Y = torch.zeros(p, self.n, dtype=self.work, device=self.device)
        self.ledger.alloc(Y)
        St = torch.as_tensor(S_sel, dtype=self.work, device=self.device)
        v, v_prev = v_start, None
        beta = np.concatenate([[0.0], beta_off])
        for j in range(m):
            Y.add_(St[j][:, None] * v[None, :])
            if j + 1 >= m:
                break
            w, alpha_t, _ = self._three_term(v, v_prev, float(beta[j]))
            self._local_pass(v, w, alpha_t)
            v_next = (w / float(beta[j + 1])).to(self.dtype_c).to(self.work)
            v_prev, v = v, v_next
        Y = Y / torch.linalg.vector_norm(Y, dim=1, keepdim=True)
        return Y.T


# --------------------------------------------------------------------------------------
# The bare recurrence: tridiagonal coefficients from given start vectors (SLQ, Gauss rules)
# --------------------------------------------------------------------------------------

COEFFICIENT_REORTH = ("full", "none")


@dataclass(frozen=True)
class LanczosCoefficients:
    r"""The tridiagonals of an m-step Lanczos run from each of P start vectors.

    Attributes:
        alphas: Per start vector, the diagonal :math:`\alpha_1..\alpha_{m_p}` (float64).
        betas: Per start vector, the off-diagonal :math:`\beta_2..\beta_{m_p}` (length
            :math:`m_p - 1`). :math:`m_p < m` when that start vector's Krylov space became
            invariant (:math:`\beta_{j+1} \le \varepsilon^{3/4}\|T_j\|`, :math:`\varepsilon`
            of the operator's dtype): its tridiagonal is then complete.
        matvecs: Products with the operator (columns of the blocks, active ones only).
    """

    alphas: tuple[np.ndarray, ...]
    betas: tuple[np.ndarray, ...]
    matvecs: int


def _block_cgs2(B: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Classical Gram–Schmidt twice of each column of ``W`` (n, P) against its own basis
    ``B[p]`` (j, n): ``w <- w - B^T (B w)``, all columns in one batched product."""
    Wt = W.T.unsqueeze(2)  # (P, n, 1)
    for _ in range(2):  # "twice is enough" (Giraud et al. 2005)
        Wt = Wt - torch.bmm(B.transpose(1, 2), torch.bmm(B, Wt))
    return Wt.squeeze(2).T


def _column_dots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return (X.to(torch.float64) * Y.to(torch.float64)).sum(dim=0)


@with_parameters_fixed
def lanczos_coefficients(
    A: object, start: torch.Tensor, steps: int, *, reorth: str = "full"
) -> LanczosCoefficients:
    r"""The Lanczos tridiagonal :math:`T_m` from given start vectors, without any filtering.

    From each column :math:`q_p = v_p/\|v_p\|` of ``start``, ``steps`` iterations of

    .. math::

        \beta_{j+1} q_{j+1} = A q_j - \alpha_j q_j - \beta_j q_{j-1},\qquad
        \alpha_j = q_j^\top A q_j,

    all columns as one block: every step is one batched product :math:`A Q` with
    :math:`Q` of shape (n, P). This is the building block of Gauss quadrature
    (:math:`q^\top f(A) q \approx e_1^\top f(T_m) e_1`, stochastic Lanczos quadrature).
    Unlike :func:`lanczos` it has no stopping test, no restart after a breakdown, and no
    Cullum–Willoughby filtering: ghosts of converged values stay in :math:`T_m` (for
    quadrature they only split their weight).

    Args:
        A: The symmetric operator (anything :func:`lanczos` accepts).
        start: A start vector (n,) or a block of them (n, P), in the operator's dtype and
            on its device (nothing is cast); none may be zero.
        steps: Iterations m per start vector, 1 <= m <= n.
        reorth: ``"full"`` (classical Gram–Schmidt twice against the start vector's own
            stored basis: P·m vectors of memory) or ``"none"`` (three blocks).

    Returns:
        The coefficients per start vector (a single vector gives tuples of length 1).

    Raises:
        ValueError: Bad shapes, ``steps`` outside [1, n], unknown ``reorth``, a zero start
            vector, non-finite products.
        TypeError: ``start`` not a tensor of the operator's dtype and device.
    """
    op = as_operator(A)
    if reorth not in COEFFICIENT_REORTH:
        raise ValueError(f"reorth must be one of {COEFFICIENT_REORTH}, got {reorth!r}")
    if not isinstance(start, torch.Tensor):
        raise TypeError(f"start must be a torch tensor, got {type(start).__name__}")
    if start.dtype != op.dtype or start.device != op.device:
        raise TypeError(f"start is {start.dtype} on {start.device}; the operator takes "
                        f"{op.dtype} on {op.device}")
    V = start[:, None] if start.ndim == 1 else start
    if V.ndim != 2 or V.shape[0] != op.n:
        raise ValueError(f"start must be (n={op.n},) or (n, P), got {tuple(start.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or not (
            1 <= steps <= op.n):
        raise ValueError(f"steps must be an int in [1, n={op.n}], got {steps!r}")
    norms = _column_dots(V, V).sqrt()
    if not bool((norms > 0).all()):
        raise ValueError("a start vector is zero")
    n, P = V.shape
    eps = torch.finfo(op.dtype).eps
    V = V / norms.to(op.dtype)
    V_prev = torch.zeros_like(V)
    beta_prev = torch.zeros(P, dtype=torch.float64, device=op.device)
    # Basis as (P, steps, n): each column's vectors contiguous, for batched Gram–Schmidt.
    basis = (torch.empty(P, steps, n, dtype=op.dtype, device=op.device) if reorth == "full"
             else None)
    alpha = np.zeros((steps, P))
    beta = np.zeros((steps, P))
    length = np.full(P, steps)
    active = np.ones(P, dtype=bool)
    tnorm = np.zeros(P)
    matvecs = 0
    for j in range(steps):
        if basis is not None:
            basis[:, j] = V.T
        W = op.matmat(V)
        matvecs += int(active.sum())
        a = _column_dots(V, W)
        W = W - V * a.to(op.dtype) - V_prev * beta_prev.to(op.dtype)
        if basis is not None:
            W = _block_cgs2(basis[:, : j + 1], W)
        b = _column_dots(W, W).sqrt()
        a_np, b_np = a.cpu().numpy(), b.cpu().numpy()  # one host synchronisation per step
        if not (np.all(np.isfinite(a_np[active])) and np.all(np.isfinite(b_np[active]))):
            raise ValueError(
                f"Lanczos step {j} produced NaN/Inf: the operator's product is not finite"
            )
        alpha[j] = np.where(active, a_np, 0.0)
        tnorm = np.maximum(tnorm, np.abs(a_np) + b_np + (beta[j - 1] if j else 0.0))
        if j == steps - 1:
            break
        stop = active & (b_np <= eps**0.75 * np.maximum(tnorm, np.finfo(float).tiny))
        length[stop] = j + 1
        active &= ~stop
        if not active.any():
            break
        beta[j] = np.where(active, b_np, 0.0)
        keep = torch.as_tensor(active, device=op.device)
        b_safe = torch.where(keep, b, torch.ones_like(b))
        V_prev, V = V, torch.where(keep, W / b_safe.to(op.dtype), torch.zeros_like(W))
        beta_prev = torch.where(keep, b, torch.zeros_like(b))
    return LanczosCoefficients(
        tuple(alpha[: length[p], p].copy() for p in range(P)),
        tuple(beta[: length[p] - 1, p].copy() for p in range(P)),
        matvecs,
    )
