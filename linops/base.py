"""The linear-operator base class: shapes, checks, views, algebra.

Subclasses implement ``_matmat`` on an ``(n, m)`` tensor already checked for shape,
dtype and device. Everything else (``matvec``, ``@``, dense materialisation, the
scipy/cupy views, sums, scalings and damping) is shared.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any

import torch
from torch import Tensor

from .checks import as_real

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
        from curvops.adapters.scipy_view import to_scipy

        return to_scipy(self, dtype)

    def to_cupy(self, dtype: Any = None) -> Any:
        """A ``cupyx.scipy.sparse.linalg.LinearOperator`` view (GPU-resident, via DLPack)."""
        from curvops.adapters.cupy_view import to_cupy

        return to_cupy(self, dtype)

    # --- algebra --------------------------------------------------------------------------
    def __add__(self, other: Any) -> LinearOperatorBase:
        from .algebra import SumOperator

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
        from .algebra import ScaledOperator

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
        from .algebra import IdentityOperator

        lam = as_real(damping)
        if lam is None:
            raise TypeError(f"damping must be a real number, got {damping!r}")
        if not math.isfinite(lam):
            raise ValueError(f"damping must be finite, got {damping!r}")
        return self + lam * IdentityOperator.like(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )
