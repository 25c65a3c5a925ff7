"""The linear-operator base class and its algebra: shapes, checks, views, sums, scalings.

Subclasses implement ``_matmat`` on an ``(n, m)`` tensor already checked for shape,
dtype and device. Everything else (``matvec``, ``@``, dense materialisation, the
scipy/cupy views, sums, scalings and damping) is shared. The algebra's operators
(:class:`IdentityOperator`, :class:`ScaledOperator`, :class:`SumOperator`) live here
because the base class's ``+``, ``*`` and :meth:`~LinearOperatorBase.damped` build them.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .checks import as_real, check_real
from .cupy_view import to_cupy
from .scipy_view import to_scipy

# Materialising more than this many bytes needs an explicit ``max_bytes``.
DEFAULT_DENSE_LIMIT_BYTES = 2 * 1024**3


class LinearOperatorBase:
    """A symmetric linear operator on flat torch vectors.

    Attributes:
        shape: ``(n, n)``.
        dtype: The dtype of input and output vectors.
        device: Where input and output vectors live.
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    #: Whether the operator is known to be positive semi-definite.
    is_psd: bool = False
    #: The ``torch.distributed`` group over which products are summed (data-parallel
    #: operators), or None: the solvers read it to print and write on rank 0 only.
    process_group: Any = None

    # --- products -------------------------------------------------------------------------
    def _matmat(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, X: Tensor, ndim: int) -> None:
        if not isinstance(X, Tensor):
            raise TypeError(
                f"expected a torch.Tensor, got {type(X).__name__}; use .to_scipy() for numpy"
            )
        if X.dim() != ndim or X.shape[0] != self.shape[1]:
            want = f"({self.shape[1]},)" if ndim == 1 else f"({self.shape[1]}, m)"
            raise ValueError(f"expected a tensor of shape {want}, got {tuple(X.shape)}")
        if X.dtype != self.dtype:
            raise TypeError(
                f"operator dtype is {self.dtype} but the input is {X.dtype}; convert explicitly "
                "(operators never cast silently)"
            )
        if X.device != self.device:
            raise ValueError(f"operator lives on {self.device} but the input is on {X.device}")

    def parameters_fixed(self) -> contextlib.AbstractContextManager:
        """A block in which the model's parameters are promised not to change.

        Operators with a product cache skip their per-product check for updated
        parameters inside it (see :meth:`CurvatureOperator.parameters_fixed`); for the
        others it does nothing. The solvers enter it for their whole run.
        """
        return contextlib.nullcontext()

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a vector of shape ``(n,)``."""
        self._check(v, 1)
        return self._matmat(v.unsqueeze(1)).squeeze(1)

    def matvec_into(self, v: Tensor, out: Tensor) -> Tensor:
        """``A v`` written into ``out`` (an ``(n,)`` tensor of the operator's dtype and
        device); returns ``out``. Operators that can write their product straight into it
        (the curvature operators) allocate no output vector of their own."""
        self._check_out(out)
        return out.copy_(self.matvec(v))

    def _check_out(self, out: Tensor) -> None:
        """Refuse an output buffer of another type, shape, dtype or device."""
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != (self.shape[0],):
            raise ValueError(f"out must have shape ({self.shape[0]},), got {tuple(out.shape)}")
        if out.dtype != self.dtype:
            raise TypeError(f"out must have the operator's dtype {self.dtype}, got {out.dtype}")
        if out.device != self.device:
            raise ValueError(f"out must be on the operator's device {self.device}, got "
                             f"{out.device}")

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for a matrix of shape ``(n, m)``, as one batched product."""
        self._check(V, 2)
        if V.shape[1] == 0:
            return V.clone()
        return self._matmat(V)

    def rmatvec(self, v: Tensor) -> Tensor:
        """``Aᵀ v``; equal to :meth:`matvec` since the operator is symmetric."""
        return self.matvec(v)

    def rmatmat(self, V: Tensor) -> Tensor:
        """``Aᵀ V``; equal to :meth:`matmat` since the operator is symmetric."""
        return self.matmat(V)

    def __matmul__(self, X: Tensor) -> Tensor:
        if isinstance(X, Tensor) and X.dim() == 1:
            return self.matvec(X)
        return self.matmat(X)

    # --- dense and views ------------------------------------------------------------------
    def to_dense(self, *, max_bytes: int | None = None, chunk_size: int = 64) -> Tensor:
        """Materialise the ``(n, n)`` matrix by products with identity columns.

        Args:
            max_bytes: Refuse when the matrix would be larger (default 2 GiB).
            chunk_size: Columns per batched product.

        Raises:
            MemoryError: If the dense matrix exceeds ``max_bytes``.
        """
        n = self.shape[0]
        nbytes = n * n * torch.finfo(self.dtype).bits // 8
        limit = DEFAULT_DENSE_LIMIT_BYTES if max_bytes is None else max_bytes
        if nbytes > limit:
            raise MemoryError(
                f"the dense {n}x{n} matrix needs {nbytes / 2**30:.2f} GiB, over the limit of "
                f"{limit / 2**30:.2f} GiB; pass max_bytes= to allow it"
            )
        out = torch.empty(n, n, dtype=self.dtype, device=self.device)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            E = torch.zeros(n, stop - start, dtype=self.dtype, device=self.device)
            E[torch.arange(start, stop), torch.arange(stop - start)] = 1
            out[:, start:stop] = self._matmat(E)
        return out

    def to_scipy(self, dtype: Any = None) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` view (numpy in, numpy out).

        Args:
            dtype: ``numpy.float32`` or ``numpy.float64``; default the operator's dtype
                for fp32/fp64 operators and float32 for bf16/fp16 ones.
        """
        return to_scipy(self, dtype)

    def to_cupy(self, dtype: Any = None) -> Any:
        """A ``cupyx.scipy.sparse.linalg.LinearOperator`` view (GPU-resident, via DLPack)."""
        return to_cupy(self, dtype)

    # --- algebra --------------------------------------------------------------------------
    def __add__(self, other: Any) -> LinearOperatorBase:
        if isinstance(other, LinearOperatorBase):
            return SumOperator([self, other])
        if isinstance(other, numbers.Number):
            raise TypeError(
                "adding a scalar to an operator is ambiguous; use op.damped(lam) or "
                "op + lam * IdentityOperator.like(op) for op + lam*I"
            )
        return NotImplemented

    def __radd__(self, other: Any) -> LinearOperatorBase:
        return self.__add__(other)

    def __mul__(self, scalar: Any) -> LinearOperatorBase:
        factor = as_real(scalar)
        if factor is None:
            return NotImplemented
        return ScaledOperator(self, factor)

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperatorBase:
        return self * -1.0

    def __sub__(self, other: Any) -> LinearOperatorBase:
        if isinstance(other, LinearOperatorBase):
            return self + (-other)
        return NotImplemented

    def damped(self, damping: float) -> LinearOperatorBase:
        """``A + damping · I``.

        Args:
            damping: A finite real number (Python or numpy scalar).

        Raises:
            TypeError: If ``damping`` is not a real number.
            ValueError: If it is NaN or infinite.
        """
        return self + check_real("damping", damping) * IdentityOperator.like(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


class IdentityOperator(LinearOperatorBase):
    """The identity on ``n``-vectors.

    Args:
        n: Dimension.
        dtype: Vector dtype.
        device: Vector device.
    """

    is_psd = True

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)

    @classmethod
    def like(cls, op: LinearOperatorBase) -> IdentityOperator:
        """The identity on ``op``'s space."""
        return cls(op.shape[0], op.dtype, op.device)

    def _matmat(self, V: Tensor) -> Tensor:
        return V.clone()


class ScaledOperator(LinearOperatorBase):
    """``scalar · A``."""

    def __init__(self, op: LinearOperatorBase, scalar: float) -> None:
        self.op, self.scalar = op, float(scalar)
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self.is_psd = op.is_psd and self.scalar >= 0.0
        self.process_group = op.process_group

    def _matmat(self, V: Tensor) -> Tensor:
        return self.scalar * self.op._matmat(V)

    def parameters_fixed(self) -> contextlib.AbstractContextManager:
        return self.op.parameters_fixed()

    def __mul__(self, scalar: object) -> LinearOperatorBase:
        factor = as_real(scalar)
        if factor is None:
            return NotImplemented
        return ScaledOperator(self.op, self.scalar * factor)

    __rmul__ = __mul__


class SumOperator(LinearOperatorBase):
    """``A₁ + A₂ + …`` on one space.

    Raises:
        ValueError: If shapes or devices differ.
        TypeError: If dtypes differ (no silent cast).
    """

    def __init__(self, ops: Sequence[LinearOperatorBase]) -> None:
        flat: list[LinearOperatorBase] = []
        for op in ops:
            flat.extend(op.ops if isinstance(op, SumOperator) else [op])
        first = flat[0]
        for op in flat[1:]:
            if op.shape != first.shape:
                raise ValueError(f"cannot add operators of shapes {first.shape} and {op.shape}")
            if op.dtype != first.dtype:
                raise TypeError(f"cannot add operators of dtypes {first.dtype} and {op.dtype}")
            if op.device != first.device:
                raise ValueError(f"cannot add operators on {first.device} and {op.device}")
        groups = {
            id(op.process_group): op.process_group for op in flat if op.process_group is not None
        }
        if len(groups) > 1:
            raise ValueError("cannot add operators summed over different process groups")
        self.ops = flat
        self.shape, self.dtype, self.device = first.shape, first.dtype, first.device
        self.is_psd = all(op.is_psd for op in flat)
        self.process_group = next(iter(groups.values()), None)

    def parameters_fixed(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        with stack:  # exits what was entered if a later entry fails
            for op in self.ops:
                stack.enter_context(op.parameters_fixed())
            return stack.pop_all()

    def _matmat(self, V: Tensor) -> Tensor:
        out = self.ops[0]._matmat(V)
        for op in self.ops[1:]:
            out = out + op._matmat(V)
        return out
