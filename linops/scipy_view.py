"""The scipy view of an operator: a ``scipy.sparse.linalg.LinearOperator``.

numpy arrays in and out; each product converts the block of vectors once (one
batched ``matmat``, never a loop over columns). float32 and float64 views only:
bf16/fp16 operators are viewed in float32, the one documented conversion. The
product logic lives in :mod:`curvops.linops.array_view`, shared with the cupy view;
only the namespace (numpy, ``torch.from_numpy``/``Tensor.numpy``) is specific here.
"""

from __future__ import annotations

from typing import Any

from scipy.sparse.linalg import LinearOperator

from .array_view import NUMPY, ArrayViewMixin, view_dtype

__all__ = ["ScipyView", "to_scipy", "view_dtype"]


class ScipyView(ArrayViewMixin, LinearOperator):
    """``scipy.sparse.linalg.LinearOperator`` over a curvops operator.

    An operator on a GPU can be viewed too: each product copies the numpy block to the
    operator's device and the result back (use the cupy view to stay on the device).

    Args:
        op: Any curvops operator (``shape``, ``dtype``, ``device``, ``matmat``).
        dtype: ``numpy.float32`` or ``numpy.float64`` (see :func:`view_dtype`).

    Raises:
        TypeError: For a dtype other than float32 / float64, or an object that is not an
            operator.
    """

    def __init__(self, op: Any, dtype: Any = None) -> None:
        self._bind(op, NUMPY)
        super().__init__(dtype=view_dtype(op.dtype, dtype), shape=op.shape)


def to_scipy(op: Any, dtype: Any = None) -> ScipyView:
    """The scipy view of ``op`` (see :class:`ScipyView`)."""
    return ScipyView(op, dtype)
