"""One internal view of every operator the solvers accept.

The solvers work on torch vectors. Users hand them curvops operators, scipy
``LinearOperator`` objects, dense numpy arrays, dense torch tensors, scipy sparse
matrices or any object with ``shape`` and ``matvec``. :func:`as_operator` wraps each
of them into a :class:`TorchOperator`: a callable on 1-D torch vectors with
``n``, ``dtype`` and ``device``, that never casts silently, and a ``matmat`` on
``(n, m)`` blocks that makes **one** batched product where the operator has one
(curvops operators, torch and numpy matrices, scipy ``LinearOperator.matmat``) and loops
over columns otherwise. The one documented
conversion is the numpy boundary of scipy-style operators (torch -> numpy on the CPU
and back), because numpy code cannot take torch tensors.

The conditions every solver refuses the same way live here too: a product that returns
NaN/Inf (:class:`NonFiniteProductError`), an operator that is clearly not symmetric
(:class:`NonSymmetricOperatorError`), and a bad user vector (:func:`check_vector`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import scipy.sparse
import torch
from curvops.linops.dtypes import TORCH_OF_NUMPY
from scipy.sparse.linalg import aslinearoperator

__all__ = [
    "NonFiniteProductError",
    "NonSymmetricOperatorError",
    "TorchOperator",
    "as_operator",
    "check_vector",
    "non_finite_product",
    "with_parameters_fixed",
]

R = TypeVar("R")


class NonFiniteProductError(ValueError, FloatingPointError):
    """A product with the operator returned NaN or Inf.

    Raised by every solver (``lanczos``, ``lanczos_coefficients`` and the SLQ estimators
    built on it, the trace and diagonal estimators, ``cg``, ``minres``). It is a
    ``ValueError``, like every other refusal of what the user passed, and a
    ``FloatingPointError``, the built-in exception for failed floating-point arithmetic:
    ``except ValueError`` and ``except FloatingPointError`` both catch it.
    """


class NonSymmetricOperatorError(ValueError):
    """The operator's products are clearly not those of a symmetric matrix."""


def non_finite_product(solver: str, where: str) -> NonFiniteProductError:
    """The one error (and message) for a product that returned NaN/Inf.

    Args:
        solver: The public function that found it (``"lanczos"``, ``"cg"``, ...).
        where: Where in the run (``"at iteration 3"``).

    Returns:
        The exception, for the caller to raise.
    """
    return NonFiniteProductError(
        f"{solver}: the operator returned NaN/Inf {where}; its products must be finite "
        "(check the model, the data and the operator's dtype for overflow)"
    )


def check_vector(
    x: object,
    name: str,
    n: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    block: bool = False,
    nonzero: bool = False,
) -> torch.Tensor:
    """Refuse a user vector (start vector, right-hand side) the same way in every solver.

    Args:
        x: The candidate.
        name: Its argument name, for the messages.
        n: The operator's dimension.
        dtype: The dtype it must have (no silent cast), or None for any real floating dtype.
        device: The device it must be on, or None for any.
        block: Also accept an ``(n, P)`` block of vectors (columns).
        nonzero: Refuse a zero vector (or a zero column).

    Returns:
        ``x`` itself.

    Raises:
        TypeError: Not a torch tensor, not a real floating dtype, or not ``dtype``.
        ValueError: Wrong shape, another device, NaN/Inf entries, or a zero vector.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a real floating dtype, got {x.dtype}")
    if not (x.ndim == 1 or (block and x.ndim == 2)) or x.shape[0] != n:
        shape = f"({n},) or ({n}, P)" if block else f"({n},)"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the operator {dtype} (no silent cast)")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the operator on {device}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has NaN/Inf entries")
    if nonzero and not bool((x != 0).any(dim=0).all()):
        raise ValueError(f"{name} is zero" if x.ndim == 1 else f"a column of {name} is zero")
    return x


@dataclass(frozen=True)
class TorchOperator:
    """A square symmetric operator acting on 1-D torch vectors.

    Attributes:
        n: The dimension (the operator is n x n).
        dtype: The dtype the operator takes and returns.
        device: The device of its input and output vectors.
        apply: ``apply(v) -> A @ v`` for a 1-D tensor of length n in ``dtype`` on ``device``.
        apply_block: ``apply_block(V) -> A @ V`` for an ``(n, m)`` block in one call, or
            None (then :meth:`matmat` loops over columns).
        hold: The wrapped operator's ``parameters_fixed`` (curvops operators), or None.
        process_group: The ``torch.distributed`` group the wrapped operator sums its
            products over (data-parallel curvops operators), or None. Every rank runs the
            solver in lockstep; only rank 0 prints and writes.
        cache_bytes: Reads the wrapped operator's product-cache size (curvops operators),
            or None.
        apply_into: ``apply_into(v, out)`` writes ``A @ v`` into ``out`` (curvops
            operators: their ``matvec_into``), or None.
    """

    n: int
    dtype: torch.dtype
    device: torch.device
    apply: Callable[[torch.Tensor], torch.Tensor]
    apply_block: Callable[[torch.Tensor], torch.Tensor] | None = None
    hold: Callable[[], AbstractContextManager] | None = None
    process_group: Any = None
    cache_bytes: Callable[[], int] | None = None
    apply_into: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.apply(v)

    def matvec_into(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """:math:`Av` in ``out`` (a length-n tensor of ``dtype`` on ``device``): written
        there by the operator where it can, else copied from :meth:`matvec`."""
        if self.apply_into is None:
            return out.copy_(self.matvec(v))
        self.apply_into(v, out)
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """:math:`Av`, refusing an output that is not a length-n tensor.

        Raises:
            TypeError: The operator returned something other than a length-n vector.
        """
        u = self.apply(v)
        if not isinstance(u, torch.Tensor) or u.shape != (self.n,):
            raise TypeError(f"operator returned {type(u).__name__} of shape "
                            f"{getattr(u, 'shape', None)}, expected a vector of length {self.n}")
        return u

    def parameters_fixed(self) -> AbstractContextManager:
        """The wrapped operator's ``parameters_fixed()`` block (nothing for operators
        without one)."""
        return nullcontext() if self.hold is None else self.hold()

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """:math:`AV` for an ``(n, m)`` block: one batched product when the operator has one.

        Raises:
            ValueError: ``V`` is not ``(n, m)``, or the operator returned another shape.
        """
        if V.ndim != 2 or V.shape[0] != self.n:
            raise ValueError(f"matmat needs an (n={self.n}, m) block, got {tuple(V.shape)}")
        if self.apply_block is None:
            out = torch.stack([self.apply(V[:, j]) for j in range(V.shape[1])], dim=1)
        else:
            out = self.apply_block(V)
        if tuple(out.shape) != tuple(V.shape):
            raise ValueError(
                f"operator returned shape {tuple(out.shape)} for input {tuple(V.shape)}"
            )
        return out


def _square_n(shape: object) -> int:
    try:
        dims = tuple(int(s) for s in shape)  # type: ignore[union-attr]
    except TypeError as err:
        raise TypeError(f"operator shape must be a pair of ints, got {shape!r}") from err
    if len(dims) != 2 or dims[0] != dims[1]:
        raise ValueError(f"operator must be square (n, n), got shape {dims}")
    if dims[0] < 1:
        raise ValueError(f"operator must have n >= 1, got shape {dims}")
    return dims[0]


def _numpy_product(product: Callable, np_dtype: np.dtype) -> Callable:
    """Wrap a numpy-in/numpy-out product (matvec or matmat) into a torch one (CPU)."""

    def apply(v: torch.Tensor) -> torch.Tensor:
        out = np.asarray(product(v.detach().cpu().numpy()))
        if out.dtype != np_dtype:
            # The operator itself changed dtype; make that visible instead of guessing.
            raise TypeError(
                f"operator returned dtype {out.dtype}, expected {np_dtype} (its declared dtype)"
            )
        return torch.from_numpy(np.ascontiguousarray(out.reshape(v.shape)))

    return apply


def with_parameters_fixed(solver: Callable[..., R]) -> Callable[..., R]:
    """Run ``solver(A, ...)`` on :func:`as_operator` of ``A`` inside its ``parameters_fixed()``.

    A solver's products all come from one matrix: the cached-product check for updated
    parameters then runs once per run instead of once per product (see
    ``CurvatureOperator.parameters_fixed``).
    """

    @functools.wraps(solver)
    def run(A: object, *args: Any, **kwargs: Any) -> R:
        op = as_operator(A)
        with op.parameters_fixed():
            return solver(op, *args, **kwargs)

    return run


def as_operator(A: object) -> TorchOperator:
    """Wrap ``A`` into a :class:`TorchOperator`.

    Accepted: a curvops operator (or any object whose ``dtype`` is a torch dtype and
    whose ``matvec`` takes torch vectors), a ``torch.Tensor`` (n, n), a
    ``numpy.ndarray`` (n, n), a scipy sparse matrix, a
    ``scipy.sparse.linalg.LinearOperator``, or any object with ``shape`` and ``matvec``
    taking numpy vectors.

    Args:
        A: The operator.

    Returns:
        The wrapped operator.

    Raises:
        TypeError: For objects with no ``shape``/``matvec``, or unsupported dtypes.
        ValueError: For non-square shapes.
    """
    if isinstance(A, TorchOperator):
        return A
    if isinstance(A, torch.Tensor):
        if A.ndim != 2:
            raise ValueError(f"a dense operator must be a 2-D matrix, got {A.ndim}-D")
        n = _square_n(A.shape)
        if not A.is_floating_point():
            raise TypeError(f"dense operator must have a floating dtype, got {A.dtype}")
        mat = A.detach()
        return TorchOperator(n, mat.dtype, mat.device, mat.matmul, mat.matmul)
    if isinstance(A, np.ndarray):
        if A.ndim != 2:
            raise ValueError(f"a dense operator must be a 2-D matrix, got {A.ndim}-D")
        n = _square_n(A.shape)
        if A.dtype not in TORCH_OF_NUMPY:
            raise TypeError(f"dense operator dtype must be float16/32/64, got {A.dtype}")
        mat = torch.from_numpy(np.ascontiguousarray(A))
        return TorchOperator(n, mat.dtype, mat.device, mat.matmul, mat.matmul)

    if scipy.sparse.issparse(A):  # sparse matrices have shape and dot but no matvec
        A = aslinearoperator(A)

    if not (hasattr(A, "shape") and callable(getattr(A, "matvec", None))):
        raise TypeError(
            "the solvers need a curvops operator, a scipy LinearOperator, a numpy array, a "
            f"torch tensor or an object with `shape` and `matvec`; got {type(A).__name__}"
        )
    n = _square_n(A.shape)
    dtype = getattr(A, "dtype", None)
    own_matmat = getattr(A, "matmat", None)
    own_matmat = own_matmat if callable(own_matmat) else None
    if isinstance(dtype, torch.dtype):
        # curvops operators and torch-native look-alikes: torch vectors in and out.
        device = torch.device(getattr(A, "device", "cpu"))
        hold = getattr(A, "parameters_fixed", None)
        cached = (lambda: int(A.cache_bytes)) if hasattr(A, "cache_bytes") else None
        into = getattr(A, "matvec_into", None)
        return TorchOperator(n, dtype, device, A.matvec, own_matmat,
                             hold if callable(hold) else None,
                             getattr(A, "process_group", None), cached,
                             into if callable(into) else None)
    # scipy LinearOperator and generic numpy-style objects.
    np_dtype = np.dtype(np.float64) if dtype is None else np.dtype(dtype)
    if np_dtype not in TORCH_OF_NUMPY:
        raise TypeError(f"operator dtype must be float16/32/64, got {np_dtype}")
    return TorchOperator(
        n,
        TORCH_OF_NUMPY[np_dtype],
        torch.device("cpu"),
        _numpy_product(A.matvec, np_dtype),
        None if own_matmat is None else _numpy_product(own_matmat, np_dtype),
    )
