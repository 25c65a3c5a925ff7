r"""The cupy view of an operator: a GPU-resident ``cupyx.scipy.sparse.linalg.LinearOperator``.

cupy arrays in and out, on the operator's GPU; no vector ever visits the host.

* **Memory** is exchanged with torch through DLPack in both directions
  (``torch.from_dlpack(cupy_array)``, ``cupy.from_dlpack(tensor)``): zero copy.
* **Streams.** Each product runs on torch's *current* stream of the operator's
  device, which cupy sees as a ``cupy.cuda.ExternalStream`` for the duration of the
  product. When the caller's current cupy stream is a different stream, the product
  first waits for the caller's stream (the input may still be being written there),
  the caller's stream then waits for the product (the output is read there), and the
  output's memory is marked as used by the caller's stream (``Tensor.record_stream``)
  so torch's caching allocator does not hand it out again while the caller still
  reads it. On the default setup (both libraries on the legacy default stream) there
  is nothing to synchronise.
* **Dtypes.** float32 or float64 views (:func:`~curvops.linops.array_view.view_dtype`);
  a bf16/fp16 operator is viewed in float32 and the conversion happens on the device
  (cupy float32 -> torch float32 -> bf16, product, -> float32 -> cupy). The dtype is
  passed to cupy explicitly, so cupy never probes it with a trial product.
* **Devices.** The operator must live on a CUDA device; inputs must be cupy arrays on
  that same device (a numpy array is refused rather than silently copied to the GPU).

The product logic itself is :func:`~curvops.linops.array_view.apply_operator`, the
same code the scipy view runs with numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .array_view import ArrayNamespace, ArrayViewMixin, dlpack_namespace, view_dtype

__all__ = ["cupy_namespace", "import_cupy", "to_cupy"]

_INSTALL_HINT = "install the gpu extra: pip install 'curvops[gpu]' (cupy-cuda12x)"


def import_cupy() -> tuple[Any, Any]:
    """Import cupy and ``cupyx.scipy.sparse.linalg`` lazily (cupy is an optional dependency).

    Returns:
        ``(cupy, cupyx.scipy.sparse.linalg)``.

    Raises:
        ImportError: Without cupy, naming the ``gpu`` extra.
    """
    try:
        import cupy  # optional: the gpu extra
        import cupyx.scipy.sparse.linalg as cupy_linalg
    except ImportError as err:
        raise ImportError(f"the cupy view needs cupy ({err}); {_INSTALL_HINT}") from err
    return cupy, cupy_linalg


def _cuda_problem(cupy: Any) -> str | None:
    """Why the cupy view cannot run on this machine, or ``None`` when it can."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        if not cupy.cuda.is_available():
            return "cupy sees no CUDA device"
    except Exception as err:  # cupy raises its own CUDA runtime errors without a driver
        return f"cupy cannot reach CUDA ({type(err).__name__}: {err})"
    return None


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _torch_stream_of(ptr: int, index: int) -> torch.cuda.Stream:
    """A torch handle of a CUDA stream pointer (0 is the legacy default stream)."""
    if ptr == 0:
        return torch.cuda.default_stream(index)
    return torch.cuda.ExternalStream(ptr, device=index)


def cupy_namespace(cupy: Any) -> ArrayNamespace:
    """The cupy array namespace: DLPack exchange on torch's current stream.

    Args:
        cupy: The ``cupy`` module.
    """
    # The caller's cupy stream while a product runs on another (torch's) stream; None
    # when they are the same stream. Per thread: each thread has its own current streams.
    state = threading.local()

    def accept(X: Any, device: torch.device) -> Any:
        if not isinstance(X, cupy.ndarray):
            raise TypeError(
                f"the cupy view takes cupy arrays, got {type(X).__module__}."
                f"{type(X).__name__}; move host data with cupy.asarray (the view never "
                "copies between host and device), or use op.to_scipy() for numpy"
            )
        index = _device_index(device)
        if X.device.id != index:
            raise ValueError(
                f"operator lives on cuda:{index} but the input is on cuda:{X.device.id}"
            )
        return X

    @contextmanager
    def on_stream(device: torch.device) -> Iterator[None]:
        index = _device_index(device)
        with cupy.cuda.Device(index), torch.cuda.device(index):
            caller = cupy.cuda.get_current_stream()
            torch_stream = torch.cuda.current_stream(index)
            if caller.ptr == torch_stream.cuda_stream:
                yield
                return
            product_stream = cupy.cuda.ExternalStream(torch_stream.cuda_stream)
            # The input may still be being written on the caller's stream.
            product_stream.wait_event(caller.record())
            state.caller = _torch_stream_of(caller.ptr, index)
            try:
                with product_stream:
                    yield
            finally:
                state.caller = None
            # The caller's stream reads the output only once the product is done.
            caller.wait_event(product_stream.record())

    def from_torch(Y: torch.Tensor) -> Any:
        caller = getattr(state, "caller", None)
        if caller is not None:
            # Torch's caching allocator would otherwise reuse Y's block for work on its
            # own stream as soon as the cupy array is freed, while the caller's stream
            # may still be reading it.
            Y.record_stream(caller)
        return cupy.from_dlpack(Y)

    namespace = dlpack_namespace("cupy", cupy, accept, on_stream)
    return dataclasses.replace(namespace, from_torch=from_torch)


@functools.cache
def _cupy_view_class(base: type) -> type:
    """The view class over cupyx's ``LinearOperator`` (built once cupy is imported)."""

    class CupyView(ArrayViewMixin, base):  # type: ignore[misc, valid-type]
        """``cupyx.scipy.sparse.linalg.LinearOperator`` over a CUDA curvops operator.

        Args:
            op: A curvops operator on a CUDA device.
            dtype: ``float32`` or ``float64`` (see
                :func:`~curvops.linops.array_view.view_dtype`).
            namespace: The cupy :class:`~curvops.linops.array_view.ArrayNamespace`.
        """

        def __init__(self, op: Any, dtype: Any, namespace: ArrayNamespace) -> None:
            self._bind(op, namespace)
            # dtype given explicitly: cupy would otherwise probe it with a trial product.
            super().__init__(dtype=dtype, shape=op.shape)

    return CupyView


def to_cupy(op: Any, dtype: Any = None) -> Any:
    """The cupy view of ``op``: a GPU-resident ``cupyx.scipy.sparse.linalg.LinearOperator``.

    Args:
        op: A curvops operator on a CUDA device.
        dtype: ``float32`` or ``float64``; default the operator's dtype for fp32/fp64
            operators and float32 for bf16/fp16 ones (converted on the device).

    Returns:
        The view (``shape``, ``dtype``, ``matvec``, ``matmat``, ``rmatvec``, ``rmatmat``,
        ``H``/``adjoint``), products as one batched ``op.matmat`` each.

    Raises:
        TypeError: For a dtype other than float32 / float64.
        ImportError: Without cupy (names the ``gpu`` extra).
        RuntimeError: On a machine without CUDA.
        ValueError: If the operator does not live on a CUDA device.
    """
    dt = view_dtype(op.dtype, dtype)
    cupy, cupy_linalg = import_cupy()
    problem = _cuda_problem(cupy)
    if problem is not None:
        raise RuntimeError(f"the cupy view needs CUDA, and this machine has none: {problem}")
    if op.device.type != "cuda":
        raise ValueError(
            f"the cupy view needs an operator on a CUDA device, this one lives on {op.device}; "
            "move the model and data to the GPU, or use op.to_scipy() for a host view"
        )
    return _cupy_view_class(cupy_linalg.LinearOperator)(op, dt, cupy_namespace(cupy))
