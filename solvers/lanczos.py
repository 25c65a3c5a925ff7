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

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from curvops.linops import host_allocator
from curvops.linops.checks import check_int, check_real
from curvops.linops.distributed import collective_step, is_main_rank
from curvops.linops.dtypes import LOW_PRECISION, working_dtype
from curvops.linops.memory_probe import PeakTracker

from ._as_operator import (
    TorchOperator,
    as_operator,
    check_vector,
    non_finite_product,
    with_parameters_fixed,
)
from ._checkpoint import (
    Checkpoint,
    check_checkpoint_settings,
    host_copy,
    probe_operator,
    probe_tolerance,
    tensor_digest,
)
from ._lanczos_strategies import Step, make_strategy
from ._operator_accuracy import AccuracyMonitor
from ._reductions import dot, row_norms, vector_norm
from ._reorthogonalization import REORTH
from ._ritz_verification import verify_ritz_pairs
from ._thick_restart import ThickRestart
from ._tridiagonal import WHICH, tridiag_eigvals

__all__ = [
    "LanczosConfig",
    "LanczosResult",
    "lanczos",
]


@dataclass
class LanczosConfig:
    """Settings of :func:`lanczos` as one object (the seed API's ``config=``).

    Every field is also a keyword of :func:`lanczos`; a keyword passed explicitly there
    overrides the field. Three fields keep the seed's names: ``max_iters`` is the
    keyword ``maxiter``, ``dtype_compute`` is ``basis_dtype`` and ``regularization`` is
    ``rayleigh_ritz_jitter``. Two exist only here: ``reorth_period`` (the seed's way of
    choosing ``reorth``) and ``dtype_tridiag`` (which has one legal value).

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
        regularization: Relative diagonal shift of :math:`V^\\top V` in the Rayleigh–Ritz
            step, applied only when that Gram matrix is numerically not positive definite
            (the shift used is reported); default 0 (the values are then read off T).
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
            and the floor of ``tol`` (see ``docs/lanczos.md``). The run raises
            :math:`\\varepsilon_A` further to the operator accuracy it measures.
        verify: Confirm every value before calling it converged: one batched product of
            the k Ritz vectors (strategies with a basis) or the products of the second
            pass ("none", which then runs even without ``return_eigenvectors``) give the
            true residuals :math:`\\|A y - \\theta y\\|`; a pair that fails, or copies an
            earlier one, is reported not converged with a note. False trusts the residual
            bounds of the tridiagonal (no extra products; ``notes`` says so).
        checkpoint_path: File to save the run's state to, every ``checkpoint_every``
            iterations (atomically: a temporary file in the same folder, fsync, rename).
            A run with the same operator and settings finds it after a crash and resumes
            from it, bit-identically (``result.notes`` says so); a checkpoint of another
            operator or other settings is refused with a ``CheckpointError`` (a
            ValueError). A finished run deletes the file. Its folder must exist. None (the
            default) saves nothing. Costs one product with a probe vector per run (not
            counted in ``matvecs``) and the writes. See ``docs/lanczos.md``.
        checkpoint_every: Iterations between two checkpoints (a positive int); it does not
            change the result, so a run may resume with another value.
        ncv: Most Lanczos vectors kept at once (scipy's name): when the basis is full, the
            run restarts thickly (Wu & Simon 2000), keeping the Ritz vectors nearest the
            wanted end, so memory stays at ``ncv`` vectors however many iterations run.
            None (default): the basis grows to ``max_iters``. Needs ``reorth="full"``, a
            float32/float64 basis and at least ``k + 2``; from ``min(max_iters, n)`` up it
            changes nothing. See ``docs/lanczos.md``.
        reuse_freed_memory: Keep freed host memory for reuse during the run of a CPU
            operator (:func:`curvops.linops.host_allocator.reuse_freed_memory`: glibc's
            mmap threshold raised, so each product does not fault its large temporaries
            in again); changes no number. False leaves the allocator alone.
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
    verify: bool = True
    checkpoint_path: str | os.PathLike | None = None
    checkpoint_every: int = 10
    ncv: int | None = None
    reuse_freed_memory: bool = True

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
        _check_settings(self, lambda name: name)


#: The keywords of :func:`lanczos` and the :class:`LanczosConfig` field each one sets.
_KEYWORD_FIELDS = {
    "k": "k",
    "which": "which",
    "tol": "tol",
    "maxiter": "max_iters",
    "return_eigenvectors": "return_eigenvectors",
    "reorth": "reorth",
    "seed": "seed",
    "verify": "verify",
    "operator_eps": "operator_eps",
    "basis_dtype": "dtype_compute",
    "basis_device": "basis_device",
    "rayleigh_ritz": "rayleigh_ritz",
    "rayleigh_ritz_jitter": "regularization",
    "cullum_willoughby": "cullum_willoughby",
    "measure_orthogonality": "measure_orthogonality",
    "record_history": "record_history",
    "progress": "progress",
    "checkpoint_path": "checkpoint_path",
    "checkpoint_every": "checkpoint_every",
    "ncv": "ncv",
    "reuse_freed_memory": "reuse_freed_memory",
}
_FLAGS = ("return_eigenvectors", "record_history", "progress", "cullum_willoughby",
          "measure_orthogonality", "verify", "reuse_freed_memory")


def _check_settings(cfg: LanczosConfig, label: Callable[[str], str]) -> None:
    """Validate every field of ``cfg`` (numpy scalars become Python numbers, in place).

    Args:
        cfg: The settings.
        label: The name a message gives a field (the field itself, or the keyword of
            :func:`lanczos` that set it).

    Raises:
        ValueError: A value out of range or unknown.
        TypeError: A value of the wrong type.
    """
    cfg.k = check_int(label("k"), cfg.k, minimum=1)
    cfg.max_iters = check_int(label("max_iters"), cfg.max_iters, minimum=1)
    cfg.tol = check_real(label("tol"), cfg.tol, minimum=0)
    cfg.reorth_period = check_int(label("reorth_period"), cfg.reorth_period, minimum=0)
    if cfg.reorth is not None and cfg.reorth not in REORTH:
        raise ValueError(f"unknown {label('reorth')}={cfg.reorth!r}; expected one of {REORTH}")
    if cfg.which not in WHICH:
        raise ValueError(f"unknown {label('which')}={cfg.which!r}; expected one of {WHICH}")
    if cfg.dtype_tridiag is not torch.float64:
        raise ValueError(
            f"{label('dtype_tridiag')} must be torch.float64 (got {cfg.dtype_tridiag}); the "
            "tridiagonal and recurrence scalars are always float64"
        )
    if cfg.dtype_compute is not None and (
        not isinstance(cfg.dtype_compute, torch.dtype) or not cfg.dtype_compute.is_floating_point
    ):
        raise TypeError(f"{label('dtype_compute')} must be a floating torch dtype, got "
                        f"{cfg.dtype_compute!r}")
    if cfg.basis_device is not None:
        if not isinstance(cfg.basis_device, str | torch.device):
            raise TypeError(f"{label('basis_device')} must be None, a str or a torch.device, "
                            f"got {type(cfg.basis_device).__name__}")
        try:
            torch.device(cfg.basis_device)
        except RuntimeError as err:
            raise ValueError(f"{label('basis_device')}={cfg.basis_device!r} is not a device: "
                             f"{err}") from None
    cfg.seed = check_int(label("seed"), cfg.seed)
    cfg.regularization = check_real(label("regularization"), cfg.regularization, minimum=0)
    cfg.operator_eps = check_real(
        label("operator_eps"), cfg.operator_eps, above=0, below=1, allow_none=True
    )
    for name in _FLAGS:
        value = getattr(cfg, name)
        if not isinstance(value, bool | np.bool_):
            raise TypeError(f"{label(name)} must be a bool, got {value!r}")
        setattr(cfg, name, bool(value))
    if cfg.rayleigh_ritz is not None:
        if not isinstance(cfg.rayleigh_ritz, bool | np.bool_):
            raise TypeError(f"{label('rayleigh_ritz')} must be None or a bool, got "
                            f"{cfg.rayleigh_ritz!r}")
        cfg.rayleigh_ritz = bool(cfg.rayleigh_ritz)
    if cfg.rayleigh_ritz and cfg.strategy != "full":
        raise ValueError(f"{label('rayleigh_ritz')}=True needs {label('reorth')}='full' (it "
                         "uses its coefficients)")
    cfg.checkpoint_every = check_checkpoint_settings(cfg.checkpoint_path, cfg.checkpoint_every,
                                                     label)
    cfg.ncv = check_int(label("ncv"), cfg.ncv, minimum=cfg.k + 2, allow_none=True)
    if cfg.ncv is not None:
        why = None
        if cfg.strategy != "full":
            why = (f"it keeps its small basis fully orthogonal: pass {label('reorth')}='full' "
                   f"(got {cfg.strategy!r})")
        elif cfg.dtype_compute is not None and cfg.dtype_compute in LOW_PRECISION:
            why = (f"a restart rotates the basis in its own dtype, and {cfg.dtype_compute} "
                   "would round every kept Ritz vector: use a float32 or float64 basis")
        elif cfg.rayleigh_ritz:
            why = "its values are already those of V^T A V: leave rayleigh_ritz None"
        if why:
            raise ValueError(f"{label('ncv')}={cfg.ncv} (thick restart): {why}")


class _FromConfig:
    """The default of a keyword of :func:`lanczos`: "not passed, take it from ``config``".

    Its repr is the value that then applies without a ``config`` (``LanczosConfig()``'s),
    so ``help(lanczos)`` shows the real defaults.
    """

    __slots__ = ("shown",)

    def __init__(self, shown: object) -> None:
        self.shown = shown

    def __repr__(self) -> str:
        return repr(self.shown)


#: Seconds between two samples of the resident set size during a run (CPU): coarse enough
#: that the sampling thread costs nothing measurable next to the products.
PEAK_SAMPLE_INTERVAL = 0.02

_DEFAULTS = LanczosConfig()
#: One marker per keyword, named like it: ``_DEFAULT.maxiter`` shows as ``300``.
_DEFAULT = SimpleNamespace(**{
    key: _FromConfig(_DEFAULTS.strategy if key == "reorth" else getattr(_DEFAULTS, name))
    for key, name in _KEYWORD_FIELDS.items()
})


@dataclass(frozen=True)
class LanczosResult:
    """What :func:`lanczos` found.

    Attributes:
        eigenvalues: float64, length <= k, in the order ``which`` defines.
        eigenvectors: (n, len(eigenvalues)) torch tensor of unit Ritz vectors (columns), on
            the operator's device, or None.
        residual_norms: The verified true residuals :math:`\\|A y_i - \\theta_i y_i\\|` of the
            unit Ritz vectors; without verification the bounds
            :math:`\\beta_{m+1}|e_m^\\top s_i|` (float64).
        converged: Per value, whether its bound met ``tol`` and its pair passed the
            verification (see ``verify``).
        iterations: Lanczos iterations (length of the tridiagonal).
        matvecs: Products with the operator (second pass of "none" and the verification
            included).
        spurious_removed: Ritz values the Cullum–Willoughby test removed ("none").
        orthogonality_loss: :math:`\\max|V^\\top V - I|` of the stored basis (NaN for "none"
            and with ``measure_orthogonality=False``).
        history: Per iteration, all Ritz values (ascending), if ``record_history``.
        seconds_matvec: Wall time inside the operator.
        seconds_other: The rest of the wall time.
        peak_memory_bytes: Peak bytes of the tensors the solver itself allocates (basis,
            working vectors, Ritz vectors), counted; the operator's own memory is not
            included (compare ``lanczos_memory_bytes``, its estimate before a run).
        process_peak_bytes: The measured peak memory of the whole process during the run
            above its start: solver, products and the operator's cache together (CUDA:
            ``max_memory_allocated``, whose peak statistics the run resets; CPU: the
            resident set size sampled every 20 ms, a lower bound).
        operator_cache_bytes: The operator's product cache at the end of the run (curvops
            operators, measured when the cache was built), else None.
        restarts: Thick restarts the run made (``ncv``); 0 without.
        ncv: The basis bound of a thick-restarted run; None for a run without restarts.
        strategy: The reorthogonalization strategy used.
        which: The ``which`` used.
        breakdowns: Times the recurrence broke down (:math:`\\beta \\approx 0`).
        regularization_used: The diagonal shift of :math:`V^\\top V` the Rayleigh–Ritz step
            needed (``rayleigh_ritz_jitter`` times its largest diagonal entry; 0 if none).
        rayleigh_ritz: Whether the values come from the Rayleigh–Ritz step.
        notes: Human-readable remarks (fewer values than k, fallbacks, a raised ``tol``).
        process_eps: :math:`\\varepsilon_A`, the precision every threshold used (the larger
            of the basis dtype's epsilon and ``operator_eps``).
        tol_used: The convergence tolerance applied: ``tol``, or the accuracy floor when
            ``tol`` asked for more than the operator can give (then ``notes`` says so); 0
            for ``tol=0``.
        reorthogonalizations: Iterations that orthogonalized against more than the local
            vectors (every iteration for "full"; partial's triggered steps; selective's
            steps with at least one good Ritz vector; 0 for "none").
        operator_accuracy: The measured relative accuracy of one product: from the
            verification, :math:`\\|\\tilde A y - P y\\| / \\|T\\|` (the product against
            the Lanczos relation's prediction: full norm); without it (or for "none"), the
            largest step defect :math:`|v_{j-1}^\\top A v_j - v_j^\\top A v_{j-1}| / \\|T\\|`
            (a projection of the error, smaller than its norm).
        verified: Whether the values were checked against true residuals.
        verification_matvecs: Products spent on the verification (included in
            ``matvecs``).
        fingerprint_matvecs: Products spent on the checkpoint's fingerprint (one probe
            product when ``checkpoint_path`` is given, else 0); not in ``matvecs``.
        resumed_from: The iteration the run resumed from a checkpoint after (0: it
            started afresh). ``matvecs`` then counts the products before that checkpoint
            (saved in it) and those of this call, as an uninterrupted run would.
        checkpoint_seconds: Wall time spent writing checkpoints (in ``seconds_other``).
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
    operator_accuracy: float = float("nan")
    verified: bool = False
    verification_matvecs: int = 0
    fingerprint_matvecs: int = 0
    resumed_from: int = 0
    checkpoint_seconds: float = 0.0
    process_peak_bytes: int = 0
    operator_cache_bytes: int | None = None
    restarts: int = 0
    ncv: int | None = None

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

    def __call__(self, op: TorchOperator, x: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        def product() -> torch.Tensor:
            return op.matvec(x) if out is None else op.matvec_into(x, out)

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y = product()
            end.record()
            self.events.append((start, end))
            return y
        t0 = time.perf_counter()
        y = product()
        self.cpu_seconds += time.perf_counter() - t0
        return y

    def block(self, op: TorchOperator, X: torch.Tensor) -> torch.Tensor:
        """One batched product ``op.matmat(X)``, timed like single products."""
        t0 = time.perf_counter()
        Y = op.matmat(X)
        if self.cuda:
            torch.cuda.synchronize()
        self.cpu_seconds += time.perf_counter() - t0
        return Y

    def seconds(self) -> float:
        if self.cuda and self.events:
            torch.cuda.synchronize()
            return self.cpu_seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1e3
        return self.cpu_seconds


def _start_vector(v0: object, n: int, device: torch.device, work: torch.dtype) -> torch.Tensor:
    """The unit start vector from ``v0`` (cast to the working dtype on the run's device)."""
    if isinstance(v0, LanczosResult):
        if v0.eigenvectors is None:
            raise ValueError("v0 is a LanczosResult without eigenvectors")
        # A warm start needs a component along every wanted eigenvector: their sum has it.
        v0 = v0.eigenvectors.sum(dim=1)
    if isinstance(v0, np.ndarray):
        v0 = torch.from_numpy(np.ascontiguousarray(v0))
    if not isinstance(v0, torch.Tensor):
        raise TypeError(f"v0 must be a torch tensor, numpy array or LanczosResult, got "
                        f"{type(v0).__name__}")
    check_vector(v0, "v0", n, nonzero=True)
    v = v0.detach().to(device=device, dtype=work)  # the start vector's documented conversion
    nrm = float(vector_norm(v))
    if not (math.isfinite(nrm) and nrm > 0.0):
        raise ValueError(f"v0 is not representable in {work} (its norm there is {nrm})")
    return v / nrm


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm  # optional: the progress extra
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "progress=True needs tqdm: pip install 'curvops[progress]'"
        ) from err
    return tqdm(total=total, desc="lanczos", unit="it")


def _dot_with(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x . u`` in ``u``'s dtype (a product's own dtype: no float32 copy of a bf16 one)."""
    return dot(x if x.dtype == u.dtype else x.to(u.dtype), u)


@with_parameters_fixed
def lanczos(
    A: object,
    k: int | None = _DEFAULT.k,
    *,
    which: str = _DEFAULT.which,
    tol: float = _DEFAULT.tol,
    maxiter: int = _DEFAULT.maxiter,
    v0: torch.Tensor | np.ndarray | LanczosResult | None = None,
    return_eigenvectors: bool = _DEFAULT.return_eigenvectors,
    reorth: str = _DEFAULT.reorth,
    seed: int = _DEFAULT.seed,
    verify: bool = _DEFAULT.verify,
    operator_eps: float | None = _DEFAULT.operator_eps,
    basis_dtype: torch.dtype | None = _DEFAULT.basis_dtype,
    basis_device: str | torch.device | None = _DEFAULT.basis_device,
    rayleigh_ritz: bool | None = _DEFAULT.rayleigh_ritz,
    rayleigh_ritz_jitter: float = _DEFAULT.rayleigh_ritz_jitter,
    cullum_willoughby: bool = _DEFAULT.cullum_willoughby,
    measure_orthogonality: bool = _DEFAULT.measure_orthogonality,
    record_history: bool = _DEFAULT.record_history,
    progress: bool = _DEFAULT.progress,
    checkpoint_path: str | os.PathLike | None = _DEFAULT.checkpoint_path,
    checkpoint_every: int = _DEFAULT.checkpoint_every,
    ncv: int | None = _DEFAULT.ncv,
    reuse_freed_memory: bool = _DEFAULT.reuse_freed_memory,
    config: LanczosConfig | None = None,
) -> LanczosResult:
    """Extreme eigenvalues (and vectors) of a symmetric operator by Lanczos.

    Shaped like ``scipy.sparse.linalg.eigsh``: ``lanczos(A, k, which=..., tol=...,
    maxiter=..., v0=...)``. The settings can also come as one :class:`LanczosConfig`
    (``config=``, the seed API's way); a keyword passed explicitly overrides the same
    setting of ``config``, a keyword left out takes the config's value (or the default
    shown, without a config). Every setting is checked before the first product.

    Args:
        A: A curvops operator, a ``scipy.sparse.linalg.LinearOperator``, a numpy array, a
            torch tensor, or anything with ``shape`` and ``matvec``. It must be symmetric.
        k: Number of eigenvalues, < n; None = ``config.k``.
        which: "LA" (largest algebraic, the default, returned descending), "SA" (smallest,
            ascending), "LM" (largest magnitude) or "BE" (both ends, scipy's split).
        tol: Relative convergence tolerance: a Ritz value :math:`\\theta` has converged
            when :math:`\\beta_{m+1}|e_m^\\top s| \\le \\text{tol}\\cdot\\max(|\\theta|,
            \\varepsilon^{2/3}\\|T\\|)` (ARPACK's floor). ``tol=0`` runs to ``maxiter``. A
            ``tol`` below the precision of the process is raised to it, with a note.
        maxiter: Hard cap on Lanczos iterations (at least ``k``); strategies that keep a
            basis are also capped at n.
        v0: Start vector (length n), or a previous :class:`LanczosResult` to warm-start
            from (the sum of its Ritz vectors); default a seeded random vector.
        return_eigenvectors: Return the Ritz vectors (for "none" this is a second pass
            with as many matvecs again).
        reorth: Reorthogonalization: "full", "selective", "partial" or "none" (see
            ``docs/lanczos.md``).
        seed: Seed of the start vector (and of fresh vectors after a breakdown).
        verify: Check every pair against its true residual before calling it converged
            (one batched product of the k Ritz vectors; "none" uses its second pass).
            False trusts the residual bounds of the tridiagonal.
        operator_eps: Relative accuracy of one product; None = the operator dtype's
            epsilon. Every threshold of the run follows it (and what the run measures).
        basis_dtype: Dtype the Krylov vectors are stored in; None = the operator's dtype.
        basis_device: Where the basis lives: None (the operator's device) or "cpu".
        rayleigh_ritz: Rayleigh–Ritz on :math:`(V^\\top A V, V^\\top V)` at the end (needs
            ``reorth="full"``); None = on for a bf16/fp16 basis.
        rayleigh_ritz_jitter: Relative diagonal shift of :math:`V^\\top V` used only when
            the Rayleigh–Ritz step finds it not positive definite (reported as
            ``regularization_used``); 0 reads the values off T instead.
        cullum_willoughby: For "none": remove spurious Ritz values and merge ghosts.
        measure_orthogonality: Report ``orthogonality_loss`` (:math:`j^2 n` flops at the
            end); False reports NaN.
        record_history: Keep all Ritz values of every iteration.
        progress: Show a tqdm progress bar (the ``progress`` extra).
        checkpoint_path: Save the run's state to this file every ``checkpoint_every``
            iterations, atomically; a run with the same operator and settings resumes from
            it after a crash (bit-identical result; ``notes`` says so); a finished run
            deletes it. A checkpoint of another operator or other settings, or a damaged
            one, is refused (``CheckpointError``). Costs one probe product (counted in
            ``fingerprint_matvecs``, not ``matvecs``) and the writes.
        checkpoint_every: Iterations between two checkpoints (positive int).
        ncv: Most Lanczos vectors kept at once; a full basis restarts thickly, keeping the
            Ritz vectors nearest the wanted end (memory: ``ncv`` vectors, whatever
            ``maxiter``). None = no restart. Needs ``reorth="full"`` and ``ncv >= k + 2``.
        reuse_freed_memory: For a CPU operator, keep freed host memory for reuse during
            the run (no page faults on each product's large temporaries; glibc only; no
            number changes). False leaves the allocator alone.
        config: All settings as one :class:`LanczosConfig`; see above for how it combines
            with the keywords.

    Returns:
        A :class:`LanczosResult`.

    Raises:
        ValueError: k >= n, non-square operator, unknown which/reorth, maxiter < k, a bad
            setting or v0; :class:`NonSymmetricOperatorError` (a ValueError) for an
            operator whose products are clearly not symmetric (measured in the first
            iterations; the message gives the defect); :class:`NonFiniteProductError` (a
            ValueError and FloatingPointError) for a product with NaN/Inf;
            :class:`CheckpointError` (a ValueError) for a checkpoint of another operator
            or other settings, or a damaged one (the message names what differs).
        TypeError: Unsupported operator, config, setting or v0 types.
    """
    arguments = locals()  # first statement: exactly the call's arguments
    t_start = time.perf_counter()
    passed = {
        key: arguments[key] for key in _KEYWORD_FIELDS
        if not isinstance(arguments[key], _FromConfig)
        and not (key == "k" and arguments[key] is None)
    }
    cfg = _settings(config, passed)
    op = as_operator(A)
    n = op.n
    if cfg.k >= n:
        raise ValueError(f"k={cfg.k} must be smaller than the operator size n={n}")
    if cfg.max_iters < cfg.k:
        name = "maxiter" if config is None or "maxiter" in passed else "config.max_iters"
        raise ValueError(f"{name}={cfg.max_iters} must be at least k={cfg.k}")
    if cfg.ncv is not None and cfg.ncv > n:
        raise ValueError(f"ncv={cfg.ncv} must be at most the operator size n={n}")
    run = _Run(op, cfg, t_start)
    if v0 is None:
        # Drawn on the CPU generator (the same seed gives the same vector on any device),
        # in the working dtype (float64 draws cost as much as a cheap matvec at n ~ 1e5).
        v = torch.randn(n, generator=run.gen, dtype=run.work).to(device=run.device)
        v = v / vector_norm(v).to(v.dtype)
    else:
        v = _start_vector(v0, n, run.device, run.work)
    run.tracker.start()
    try:
        with host_allocator.reuse_freed_memory(cfg.reuse_freed_memory
                                               and run.device.type == "cpu"):
            if cfg.checkpoint_path is not None:
                run.open_checkpoint(v)
            if run.restarted:
                # The run takes the start vector out of the list: no second n-vector is held.
                start = [v]
                del v
                return run.solve_restarted(start)
            return run.solve(v)
    finally:
        run.tracker.stop()


def _settings(config: LanczosConfig | None, passed: dict[str, object]) -> LanczosConfig:
    """``config`` (default ``LanczosConfig()``) with the keywords ``passed`` set, validated.

    The caller's config is not changed. A message names a setting by the keyword when it
    was passed (or there is no config), else as ``config.<field>``.
    """
    if config is not None and not isinstance(config, LanczosConfig):
        raise TypeError(f"config must be a LanczosConfig, got {type(config).__name__}")
    cfg = copy.copy(_DEFAULTS if config is None else config)
    keyword_of = {field_name: key for key, field_name in _KEYWORD_FIELDS.items()}
    for key, value in passed.items():
        setattr(cfg, _KEYWORD_FIELDS[key], value)

    def label(field_name: str) -> str:
        key = keyword_of.get(field_name)
        if key is not None and (config is None or key in passed):
            return key
        return f"config.{field_name}"

    _check_settings(cfg, label)
    return cfg


class _Run:
    """One Lanczos run: what the recurrence loop and the strategy share."""

    def __init__(self, op: TorchOperator, cfg: LanczosConfig, t_start: float) -> None:
        self.op, self.cfg, self.k = op, cfg, cfg.k
        self.t_start = t_start  # when the call began: the result's wall time counts from it
        self.strategy_name = cfg.strategy
        self.n, self.device = op.n, op.device
        self.dtype_c = op.dtype if cfg.dtype_compute is None else cfg.dtype_compute
        self.work = working_dtype(self.dtype_c)  # arithmetic on the current vectors
        self.basis_device = (self.device if cfg.basis_device is None
                             else torch.device(cfg.basis_device))
        use_rr = cfg.rayleigh_ritz
        if use_rr is None:
            use_rr = self.strategy_name == "full" and self.dtype_c in LOW_PRECISION
        self.use_rr = bool(use_rr)
        self.verify = cfg.verify
        self.gen = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
        keeps_basis = self.strategy_name != "none"
        self.m_max = min(cfg.max_iters, self.n) if keeps_basis else cfg.max_iters
        # A thick restart only where the basis could outgrow ncv.
        self.restarted = cfg.ncv is not None and cfg.ncv < self.m_max
        self.iterations = 0  # of the restarted recurrence
        self.verification_matvecs = 0
        self.ledger = _Ledger()
        # The whole process's peak during the run (products, cache, solver), sampled.
        self.tracker = PeakTracker(self.device, interval=PEAK_SAMPLE_INTERVAL)
        self.timer = _Timer(op.device)
        self.eps_c = float(torch.finfo(self.dtype_c).eps)
        self.eps_w = float(torch.finfo(self.work).eps)
        # The operator's precision as its dtype (or the user) states it: a bf16 product is
        # only good to ~2^-8. The run raises it to what the products are measured to give.
        self.eps_op = (float(torch.finfo(op.dtype).eps) if cfg.operator_eps is None
                       else float(cfg.operator_eps))
        self.monitor = AccuracyMonitor(max(self.eps_c, self.eps_op))
        # beta below this times ||A|| is rounding noise of a product with a vector of an
        # invariant subspace (about 50 eps ||A|| at n = 500 in float64). Without a
        # basis the noise is larger (no reorthogonalization cleans it), and a missed
        # breakdown costs a whole run of matvecs on noise.
        self.bd_floor = self.eps_w * ((1000.0 if not keeps_basis else 100.0)
                                      + math.sqrt(self.n))
        self.matvecs = 0
        self.breakdowns = 0
        self.anorm = 0.0
        self.notes: list[str] = []
        self.history: list[np.ndarray] | None = [] if cfg.record_history else None
        self.vec_bytes = self.n * torch.empty(0, dtype=self.work).element_size()
        self.pbar = None
        self._wbuf: torch.Tensor | None = None
        self.checkpoint: Checkpoint | None = None
        self.resumed_from = 0

    # -- the precision of the process, as measured so far ----------------------------
    @property
    def eps_a(self) -> float:
        r""":math:`\varepsilon_A`: basis and operator epsilon, raised to the measured defect."""
        return self.monitor.eps_a

    @property
    def tol(self) -> float:
        """The requested ``tol``, raised to the accuracy the process can deliver.

        Residual bounds below :math:`\\varepsilon_A|\\theta|` are rounding noise of the
        process: asking for them only adds iterations (and, without a basis, ghosts). The
        floor is :math:`\\varepsilon_A`, or the operator's precision alone when the
        Rayleigh–Ritz step recovers the accuracy a low-precision basis loses.
        """
        tol = float(self.cfg.tol)
        if tol == 0.0:
            return 0.0
        floor = max(self.eps_op, self.monitor.defect) if self.use_rr else self.eps_a
        return max(tol, floor)

    def breaks_down(self, beta_next: float) -> bool:
        """Whether ``beta_next`` is rounding noise of ``||A||`` (an invariant subspace)."""
        factor = max(self.bd_floor, self.eps_op, self.monitor.defect)
        return beta_next <= factor * max(self.anorm, np.finfo(float).tiny)

    # -- one product, with the documented cast when the basis dtype differs ------------
    def apply(self, v: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """One product, in the operator's dtype, on the working device (not owned).

        With ``out`` (a solver buffer of the working dtype and device) the product is
        written into it where the operator's dtype and device are those (and ``out`` is
        returned); otherwise it is left to the caller to copy.
        """
        x = v if v.dtype == self.op.dtype else v.to(self.op.dtype)
        usable = (out is not None and out.dtype == self.op.dtype
                  and out.device == self.op.device)
        u = self.timer(self.op, x, out if usable else None)
        self.matvecs += 1
        return u.to(device=self.device)

    def three_term(self, u, v, v_prev, beta_j):
        """``w = A v - beta_j v_prev - alpha v`` in the solver's own buffer.

        The operator's output is never updated in place (a caching operator, a numpy
        operator's buffer or an operator returning its input would be corrupted); the
        first update writes into the preallocated buffer instead, which also casts a bf16
        product. Returns w and alpha (a device scalar: no host sync).
        """
        if self._wbuf is None:
            self._wbuf = torch.empty(self.n, dtype=self.work, device=self.device)
        if v_prev is not None:
            w = torch.sub(u, v_prev, alpha=beta_j, out=self._wbuf)
        else:
            w = self._wbuf.copy_(u)
        a1 = dot(v, w)
        w.addcmul_(v, a1, value=-1.0)
        return w, a1

    # -- the recurrence ---------------------------------------------------------------
    def solve(self, v0: torch.Tensor) -> LanczosResult:
        """The run of one of the four strategies (the basis grows to ``maxiter``)."""
        strat = make_strategy(self.strategy_name, self)

        def iterate(resume):
            return self._iterate(strat, v0, resume)

        def extract(loop):
            m, alpha, beta, beta_next, w_last = loop
            return m, strat.extract(m, alpha, beta, beta_next, w_last,
                                    self.cfg.return_eigenvectors)

        return self._solve(strat, iterate, extract)

    def solve_restarted(self, start: list[torch.Tensor]) -> LanczosResult:
        """The thick-restarted run (``ncv``): bounded basis, pairs verified one by one."""
        tr = ThickRestart(self)

        def extract(loop):
            m, beta = loop
            return self.iterations, tr.extract(m, beta, self.cfg.return_eigenvectors)

        return self._solve(tr, lambda resume: tr.run(start, resume), extract)

    def _solve(self, strat, iterate, extract) -> LanczosResult:
        """Resume (or start), iterate under the progress bar, extract, finish, remove the
        checkpoint; ``strat`` is released whatever happens."""
        try:
            resume = self._resume(strat)
            self.pbar = _progress_bar(
                self.cfg.max_iters, self.cfg.progress and is_main_rank(self.op.process_group)
            )
            try:
                loop = iterate(resume)
            finally:
                if self.pbar is not None:
                    self.pbar.close()
            iterations, ext = extract(loop)
            result = self._finish(strat, ext, iterations)
            if self.checkpoint is not None:
                # The run is done: nothing is left to resume. Rank 0 removes the file and
                # every rank returns after it did.
                with collective_step(self.op.process_group, self.device,
                                     "removing the checkpoint"):
                    self.checkpoint.remove()
            return result
        finally:
            strat.release()

    def _iterate(self, strat, v0: torch.Tensor, resume=None):
        if resume is None:
            v = strat.begin(v0)
            alpha: list[float] = []
            beta: list[float] = [0.0]  # beta[j] couples v_{j-1} and v_j
            v_prev = None
            s_pending = None  # v_j^T A v_{j-1}, for the defect of the next step
            m = 0
        else:
            m, alpha, beta, v_prev, v, s_pending = resume
            if self.pbar is not None:
                self.pbar.update(m)
        st = None
        for j in range(m, self.m_max):
            u = self.apply(v)
            w, a1 = self.three_term(u, v, v_prev, beta[j])
            alpha_t = strat.orthogonalize(j, w, a1)
            probe = strat.probe(j, w)
            parts = [alpha_t.double(), vector_norm(w), vector_norm(u)]
            if v_prev is not None:
                parts += [_dot_with(v_prev, u).double(), s_pending.double()]
            if probe is not None:
                parts.append(probe.double())
            # One host synchronisation per iteration: all recurrence scalars together.
            flat = torch.cat([p.reshape(-1) for p in parts]).tolist()
            alpha_j, beta_next, unorm = flat[:3]
            if not (math.isfinite(alpha_j) and math.isfinite(beta_next)
                    and math.isfinite(unorm)):
                raise non_finite_product("lanczos", f"at iteration {j + 1}")
            rest = flat[3:]
            if v_prev is not None:
                ratio = self.monitor.observe(rest[0], rest[1], max(self.anorm, unorm), j + 1)
                rest = rest[2:]
                if ratio > 1.0:
                    strat.recalibrate(ratio)
            st = Step(j, u, v, w, alpha_j, beta[j], beta_next, unorm, np.asarray(rest))
            strat.settle(st, alpha, beta)
            alpha.append(st.alpha)
            self.anorm = max(self.anorm, unorm, abs(st.alpha),
                             math.sqrt(st.alpha**2 + st.beta_j**2 + st.beta_next**2))
            m = j + 1
            if self.breaks_down(st.beta_next):
                st.breakdown = True
                self.breakdowns += 1
                st.beta_next = 0.0
            if self.pbar is not None:
                self.pbar.update(1)
            stop = strat.converged(m, alpha, beta, st.beta_next)
            if self.history is not None:
                self.history.append(tridiag_eigvals(np.asarray(alpha), np.asarray(beta[1:m])))
            if stop or m >= self.m_max:  # m_max <= n for the strategies with a basis
                break
            if st.breakdown and strat.ends_on_breakdown:
                self.notes.append(
                    f"breakdown at iteration {m}: an invariant subspace was found; "
                    f"'{strat.name}' keeps no basis to continue from, so at most one copy of "
                    "each eigenvalue in it is reported"
                )
                break
            strat.prepare_next(m, st, alpha, beta)
            v_next = strat.advance(m, st)
            beta.append(st.beta_next)
            s_pending = _dot_with(v_next, u)
            v_prev, v = v, v_next
            if self.checkpoint is not None and self.checkpoint.due(m):
                self.checkpoint.save(self._state(strat, m, alpha, beta, v_prev, v, s_pending))
        return m, alpha, beta, st.beta_next, st.w

    # -- checkpoints ------------------------------------------------------------------------
    def open_checkpoint(self, v0: torch.Tensor) -> None:
        """Fingerprint the operator (one probe product, not in ``matvecs``) and the
        settings, for the checkpoints of this run and the refusal of another run's."""
        cfg = self.cfg
        settings = {
            # Keyword names (what the user passes); the resolved values where a None
            # default resolves (the same result either way).
            "k": cfg.k, "which": cfg.which, "tol": cfg.tol, "maxiter": cfg.max_iters,
            "reorth": self.strategy_name, "seed": cfg.seed,
            "v0 (the start vector's SHA-256)": tensor_digest(v0),
            "basis_dtype": self.dtype_c, "basis_device": self.basis_device,
            "rayleigh_ritz": self.use_rr, "rayleigh_ritz_jitter": cfg.regularization,
            "operator_eps": cfg.operator_eps, "verify": cfg.verify,
            "return_eigenvectors": cfg.return_eigenvectors,
            "record_history": cfg.record_history, "cullum_willoughby": cfg.cullum_willoughby,
            "measure_orthogonality": cfg.measure_orthogonality, "ncv": cfg.ncv,
        }
        self.checkpoint = Checkpoint(
            cfg.checkpoint_path, cfg.checkpoint_every, probe_operator(self.op),
            {name: str(value) for name, value in settings.items()},
            probe_tolerance(self.op.dtype, cfg.operator_eps),
            writer=is_main_rank(self.op.process_group),
        )

    def _state(self, strat, m: int, alpha: list[float], beta: list[float],
               v_prev: torch.Tensor, v: torch.Tensor, s_pending: torch.Tensor) -> dict:
        """The run's state after ``m`` iterations: tensors and plain values only."""
        return {
            **self._common_state(m),
            "alpha": [float(a) for a in alpha], "beta": [float(b) for b in beta],
            "s_pending": host_copy(s_pending), "strategy": strat.state_dict(m, v_prev, v),
        }

    def save_checkpoint(self, part: dict) -> None:
        """Write the run's common state with a loop's own ``part`` (the thick restart)."""
        self.checkpoint.save({**self._common_state(self.iterations), **part})

    def _common_state(self, m: int) -> dict:
        """What every run saves after ``m`` iterations: counts, notes, history, the
        generator and the measured precision."""
        return {
            "m": m, "matvecs": self.matvecs,
            "breakdowns": self.breakdowns, "anorm": float(self.anorm),
            "notes": list(self.notes),
            "history": (None if self.history is None
                        else [torch.from_numpy(np.array(h, np.float64)) for h in self.history]),
            "generator": self.gen.get_state(), "monitor": self.monitor.state_dict(),
            "peak_memory_bytes": int(self.ledger.peak),
        }

    def _load_common(self, state: dict) -> int:
        """Restore :meth:`_common_state`'s part; return the iterations it was saved after."""
        m = int(state["m"])
        self.matvecs = int(state["matvecs"])
        self.breakdowns = int(state["breakdowns"])
        self.anorm = float(state["anorm"])
        self.notes = [str(note) for note in state["notes"]]
        if self.history is not None:
            self.history = [h.numpy() for h in state["history"]]
        self.gen.set_state(state["generator"])
        self.monitor.load_state_dict(state["monitor"])
        self.ledger.peak = max(self.ledger.peak, int(state["peak_memory_bytes"]))
        self.resumed_from = m
        return m

    def _resume(self, strat):
        """The loop state of the checkpoint this run resumes, or None to start afresh."""
        if self.checkpoint is None:
            return None
        group = self.op.process_group
        # Every rank reads the file rank 0 writes; they must all resume from the same
        # iteration (or all start afresh), else they would leave lockstep.
        state = None
        with collective_step(
            group, self.device,
            "reading the checkpoint",
        ):
            state = self.checkpoint.load()
        found = -1 if state is None else int(state.get("m", -1))
        with collective_step(
            group, self.device,
            "reading the checkpoint", [found],
            f"the checkpoint {str(self.checkpoint.path)!r} (each rank must read the same "
            "file: put it on a file system every rank sees)",
        ):
            pass
        if state is None:
            return None
        try:
            loop = self._load_state(strat, state)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError,
                AttributeError) as err:
            # The fingerprint matched, so a state that does not fit is a damaged file.
            raise self.checkpoint.damaged(err) from err
        self.notes.append(
            f"resumed from the checkpoint {str(self.checkpoint.path)!r} after iteration "
            f"{self.resumed_from}: matvecs counts the {self.matvecs} "
            "products before it and those of this call; the fingerprint's probe product is "
            "not counted"
        )
        return loop

    def _load_state(self, strat, state: dict):
        if isinstance(strat, ThickRestart):
            m = self._load_common(state)
            if not 1 <= m < self.cfg.max_iters:
                raise ValueError(f"iteration {m} of at most {self.cfg.max_iters}")
            self.iterations = m
            return strat.load_state_dict(state["restart"])
        m = int(state["m"])
        alpha = [float(a) for a in state["alpha"]]
        beta = [float(b) for b in state["beta"]]
        if not (1 <= m < self.m_max and len(alpha) == m and len(beta) == m + 1):
            raise ValueError(f"iteration {m} with {len(alpha)} alphas and {len(beta)} betas")
        self._load_common(state)
        v_prev, v = strat.load_state_dict(state["strategy"])
        return m, alpha, beta, v_prev, v, state["s_pending"].to(self.device)

    # -- verification and the result ----------------------------------------------------
    def _note_multiplicity(self, values: np.ndarray, residuals: np.ndarray) -> None:
        """Say so where a wanted eigenvalue is repeated: a single start vector sees one copy
        of it per restart, so further copies cannot be excluded."""
        tnorm = max(float(np.max(np.abs(values), initial=0.0)), np.finfo(float).tiny)
        for i in range(values.size):
            for j in range(i + 1, values.size):
                if abs(values[i] - values[j]) <= (residuals[i] + residuals[j]
                                                  + 100 * self.eps_a * tnorm):
                    self.notes.append(
                        f"eigenvalue {values[i]:.10g} is repeated among the wanted values; "
                        "single-vector Lanczos finds one copy per restart, so further copies "
                        "cannot be excluded (compare with a block method such as eigsh with "
                        "a larger ncv, or lobpcg)"
                    )
                    return

    def _finish(self, strat, ext, m: int) -> LanczosResult:
        cfg = self.cfg
        if ext.values.size < self.k:
            self.notes.append(f"only {ext.values.size} Ritz values available (k={self.k})")
        conv = np.asarray(ext.bound_converged, dtype=bool)
        residuals = np.asarray(ext.bounds, dtype=np.float64)
        accuracy = self.monitor.defect
        verified = False
        mv_before = self.matvecs
        vecs = None if ext.vectors is None else ext.vectors.T
        ver = ext.verification  # set when the strategy verified its pairs itself
        if ext.Y is not None:
            # The strategy's Y, AY and prediction are the run's own tensors: they are
            # scaled to unit rows in place, and the product of the unit Ritz vectors is
            # read through a view (no (k, n) temporaries: on the CPU each costs page
            # faults worth a good part of a product).
            ynorm = row_norms(ext.Y)[:, None].to(ext.Y.dtype)
            Yn = ext.Y.div_(ynorm)
            if self.verify:
                AY, scratch = ext.AY, ext.predicted
                if AY is None:  # one batched product of the Ritz vectors
                    Z = self.timer.block(self.op, Yn.T.to(self.op.dtype))
                    self.matvecs += Yn.shape[0]
                    AY = Z.T.to(device=self.device, dtype=self.work)  # the operator's own
                else:
                    AY = AY.div_(ynorm)
                    if scratch is None and AY.dtype == Yn.dtype and AY.device == Yn.device:
                        scratch = AY  # not read after the check
                pred = None if ext.predicted is None else ext.predicted.div_(ynorm)
                ver = verify_ritz_pairs(Yn, AY, ext.values, conv, ext.tnorm,
                                        self.tol or 1e-8, self.eps_a, pred,
                                        scale=ynorm.reshape(-1).double().cpu().numpy(),
                                        scratch=scratch)
            if cfg.return_eigenvectors:
                vecs = Yn.T
        if ver is not None:
            if not np.all(np.isfinite(ver.residuals)):
                raise non_finite_product("lanczos", "in the products of the Ritz vectors")
            conv, residuals, verified = ver.converged, ver.residuals, True
            self.notes.extend(ver.notes)
            if math.isfinite(ver.noise):
                accuracy = max(ver.noise, self.monitor.defect)
        self._note_multiplicity(np.asarray(ext.values), residuals)
        if not self.verify:
            self.notes.append("verify=False: converged means the residual bound met tol; the "
                              "pairs were not checked against true residuals")
        # The floor only rises during a run: the final tol is the largest one applied.
        if 0 < cfg.tol < self.tol:
            self.notes.insert(0,
                f"tol={cfg.tol:.3g} is below the precision of the process (epsilon "
                f"{self.tol:.3g}: operator {self.eps_op:.3g}, measured "
                f"{self.monitor.defect:.3g}, basis {self.eps_c:.3g}); converged means "
                f"tol={self.tol:.3g}"
            )
        seconds_matvec = self.timer.seconds()
        seconds_total = time.perf_counter() - self.t_start
        return LanczosResult(
            eigenvalues=np.asarray(ext.values, dtype=np.float64),
            eigenvectors=vecs,
            residual_norms=residuals,
            converged=conv,
            iterations=m,
            matvecs=self.matvecs,
            spurious_removed=ext.spurious_removed,
            orthogonality_loss=ext.orthogonality_loss,
            history=self.history,
            seconds_matvec=seconds_matvec,
            seconds_other=max(0.0, seconds_total - seconds_matvec),
            peak_memory_bytes=int(self.ledger.peak),
            process_peak_bytes=self.tracker.peak_bytes(),
            operator_cache_bytes=(None if self.op.cache_bytes is None
                                  else self.op.cache_bytes()),
            strategy=self.strategy_name,
            which=cfg.which,
            breakdowns=self.breakdowns,
            regularization_used=ext.regularization_used,
            rayleigh_ritz=ext.rayleigh_ritz,
            notes=tuple(self.notes),
            process_eps=self.eps_a,
            tol_used=self.tol,
            reorthogonalizations=getattr(strat, "reorths", 0),
            operator_accuracy=float(accuracy),
            verified=verified,
            verification_matvecs=(self.verification_matvecs if ext.verification is not None
                                  else self.matvecs - mv_before if ext.AY is None else 0),
            fingerprint_matvecs=0 if self.checkpoint is None else 1,
            resumed_from=self.resumed_from,
            checkpoint_seconds=0.0 if self.checkpoint is None else self.checkpoint.seconds,
            restarts=ext.restarts,
            ncv=self.cfg.ncv if self.restarted else None,
        )
