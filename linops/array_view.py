r"""The array-library views of an operator, written once against an array namespace.

A view is a scipy-style ``LinearOperator`` (``shape``, ``dtype``, ``matvec``,
``matmat``, ``rmatvec``, ``rmatmat``, ``adjoint``) whose products take and return
arrays of one library: numpy for the scipy view, cupy for the cupy view. Both run the
same product, :func:`apply_operator`, for an ``(n,)`` or ``(n, m)`` array :math:`X`:

1. refuse what is not an array of the namespace (or lives on another device), is not
   of shape ``(n,)``/``(n, m)``, or is complex;
2. make :math:`X` contiguous in the view's dtype (a no-op when it already is);
3. hand its memory to torch (``torch.from_numpy`` on the CPU, DLPack on a GPU: no copy);
4. convert to the operator's device and dtype (the one documented conversion: bf16 and
   fp16 operators are viewed in float32, and for cupy this happens on the device);
5. compute :math:`A X` as **one** batched ``op.matmat``, never a loop over columns;
6. convert back to the view's dtype and hand the memory to the array library.

What differs between libraries is collected in an :class:`ArrayNamespace`: the array
module, how arrays are accepted, how memory is exchanged with torch, and on which
stream the product runs (nothing to do on the CPU; torch's current CUDA stream, with
explicit synchronisation against the caller's cupy stream, on a GPU).

The operators are symmetric (curvature matrices), so ``rmatvec``/``rmatmat`` are the
products themselves and the adjoint and the transpose are the view itself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .dtypes import LOW_PRECISION, TORCH_OF_NUMPY

__all__ = [
    "NUMPY",
    "ArrayNamespace",
    "ArrayViewMixin",
    "apply_operator",
    "dlpack_namespace",
    "torch_dtype_of_view",
    "view_dtype",
]

#: The dtypes a view may have: float32 and float64 (numpy and cupy have no bfloat16; bf16 and
#: fp16 operators are viewed in float32, see :func:`view_dtype`).
_TORCH_OF_NUMPY = {
    np_dtype: dtype for np_dtype, dtype in TORCH_OF_NUMPY.items() if dtype not in LOW_PRECISION
}
_NUMPY_OF_TORCH = {dtype: np_dtype for np_dtype, dtype in _TORCH_OF_NUMPY.items()}


def view_dtype(op_dtype: torch.dtype, dtype: Any) -> np.dtype:
    """The dtype of a view: the requested one, else the operator's (float32 for bf16/fp16).

    numpy and cupy have no bfloat16, so bf16 and fp16 operators are viewed in float32 by
    default: the one documented conversion. cupy shares numpy's dtype objects, so the
    result serves both views.

    Args:
        op_dtype: The operator's torch dtype.
        dtype: ``None``, or float32 / float64 as a numpy/cupy dtype, a string or a torch
            dtype.

    Returns:
        ``numpy.dtype('float32')`` or ``numpy.dtype('float64')``.

    Raises:
        TypeError: For a dtype other than float32 / float64.
    """
    if dtype is None:
        return np.dtype(_NUMPY_OF_TORCH.get(op_dtype, np.float32))
    if isinstance(dtype, torch.dtype):
        dtype = _NUMPY_OF_TORCH.get(dtype, dtype)
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"view dtype must be float32 or float64, got {dtype!r}") from err
    if dt not in _TORCH_OF_NUMPY:
        raise TypeError(f"view dtype must be float32 or float64, got {dt}")
    return dt


def torch_dtype_of_view(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a view dtype returned by :func:`view_dtype`."""
    return _TORCH_OF_NUMPY[np.dtype(dtype)]


@dataclass(frozen=True)
class ArrayNamespace:
    """What one array library needs to exchange vectors with a torch operator.

    Attributes:
        name: The library, for messages (``"numpy"``, ``"cupy"``).
        xp: The array module (``numpy`` or ``cupy``): ``xp.ascontiguousarray`` is used.
        accept: ``accept(X, device) -> array``: the input as an array of this library;
            raises ``TypeError``/``ValueError`` for arrays it must not take (another
            library, another device). Never copies between host and device.
        to_torch: Array -> tensor sharing its memory (contiguous input).
        from_torch: Tensor -> array of this library (sharing memory where possible).
        on_stream: ``on_stream(device)`` -> the context every product runs in (the
            stream discipline; a no-op on the CPU).
    """

    name: str
    xp: Any
    accept: Callable[[Any, torch.device], Any]
    to_torch: Callable[[Any], Tensor]
    from_torch: Callable[[Tensor], Any]
    on_stream: Callable[[torch.device], AbstractContextManager[Any]] = lambda device: nullcontext()


def _numpy_accept(X: Any, device: torch.device) -> np.ndarray:
    # Any array-like (scipy passes ndarrays already); the device is the operator's concern.
    return np.asarray(X)


def _numpy_to_torch(X: np.ndarray) -> Tensor:
    # torch.from_numpy shares memory but warns on read-only arrays; copying one is cheap
    # next to a curvature product, and the operator never writes its input anyway.
    return torch.from_numpy(X if X.flags.writeable else X.copy())


def _numpy_from_torch(Y: Tensor) -> np.ndarray:
    return Y.cpu().numpy()


NUMPY = ArrayNamespace(
    name="numpy",
    xp=np,
    accept=_numpy_accept,
    to_torch=_numpy_to_torch,
    from_torch=_numpy_from_torch,
)
"""The scipy view's namespace: numpy arrays on the host (copied to the operator's device
and back when the operator lives on a GPU: that is what a numpy view means)."""


def dlpack_namespace(
    name: str,
    xp: Any,
    accept: Callable[[Any, torch.device], Any],
    on_stream: Callable[[torch.device], AbstractContextManager[Any]] | None = None,
) -> ArrayNamespace:
    """A namespace that exchanges memory with torch through DLPack, both directions.

    ``torch.from_dlpack(array)`` and ``xp.from_dlpack(tensor)`` share memory (no copy,
    no host transfer). The cupy view is built this way; the same exchange runs with
    numpy on a CPU, which is how it is tested without a GPU.

    Args:
        name: The library, for messages.
        xp: The array module; it must provide ``from_dlpack`` and ``ascontiguousarray``.
        accept: See :class:`ArrayNamespace`.
        on_stream: See :class:`ArrayNamespace`; default no stream handling.
    """
    return ArrayNamespace(
        name=name,
        xp=xp,
        accept=accept,
        to_torch=torch.from_dlpack,
        from_torch=xp.from_dlpack,
        on_stream=on_stream if on_stream is not None else (lambda device: nullcontext()),
    )


def apply_operator(op: Any, X: Any, dtype: np.dtype, ns: ArrayNamespace) -> Any:
    r"""The product :math:`A X` of a torch operator with an array of the namespace ``ns``.

    One batched ``op.matmat`` for all columns of ``X``; the input is converted to the
    view's ``dtype`` (integers and the other float precision are cast; complex input is
    refused), then to the operator's dtype on the operator's device.

    Args:
        op: A curvops operator (``shape``, ``dtype``, ``device``, ``matmat``).
        X: Array of shape ``(n,)`` or ``(n, m)``.
        dtype: The view dtype (float32 / float64, see :func:`view_dtype`).
        ns: The array namespace.

    Returns:
        ``A X`` as an array of ``ns`` in ``dtype``, of the shape of ``X``.

    Raises:
        TypeError: For arrays of another library or of a complex/non-numeric dtype.
        ValueError: For a wrong shape or another device.
    """
    n = op.shape[1]
    with ns.on_stream(op.device):
        X = ns.accept(X, op.device)
        if X.ndim not in (1, 2) or X.shape[0] != n:
            raise ValueError(f"expected an array of shape ({n},) or ({n}, m), got {tuple(X.shape)}")
        if np.dtype(X.dtype).kind not in "fiu":
            raise TypeError(
                f"the view takes real arrays (it computes in {np.dtype(dtype)}), got {X.dtype}"
            )
        X2 = ns.xp.ascontiguousarray(X if X.ndim == 2 else X.reshape(n, 1), dtype=dtype)
        V = ns.to_torch(X2).to(device=op.device, dtype=op.dtype)
        Y = op.matmat(V).detach().to(dtype=torch_dtype_of_view(dtype))
        out = ns.from_torch(Y)
    return out[:, 0] if X.ndim == 1 else out


class ArrayViewMixin:
    """The product methods shared by the scipy and cupy ``LinearOperator`` views.

    Put it first among the bases, before the library's ``LinearOperator``, and call
    :meth:`_bind` before the base's ``__init__(dtype=..., shape=...)``.

    Attributes:
        op: The wrapped curvops operator.
        namespace: The :class:`ArrayNamespace` of the view.
    """

    op: Any
    namespace: ArrayNamespace
    dtype: Any

    def _bind(self, op: Any, namespace: ArrayNamespace) -> None:
        for attr in ("shape", "dtype", "device", "matmat"):
            if not hasattr(op, attr):
                raise TypeError(
                    f"a view needs a curvops operator (shape, dtype, device, matmat); "
                    f"{type(op).__name__} has no {attr!r}"
                )
        self.op = op
        self.namespace = namespace

    def _apply(self, X: Any) -> Any:
        return apply_operator(self.op, X, self.dtype, self.namespace)

    def _matvec(self, x: Any) -> Any:
        return self._apply(x)

    def _matmat(self, X: Any) -> Any:
        return self._apply(X)

    # The operator is symmetric: Aᵀ = Aᴴ = A (real dtypes only).
    def _rmatvec(self, x: Any) -> Any:
        return self._apply(x)

    def _rmatmat(self, X: Any) -> Any:
        return self._apply(X)

    def _adjoint(self) -> Any:
        return self

    def _transpose(self) -> Any:
        return self
