r"""Reusing freed host memory across products (glibc's ``malloc`` thresholds).

On Linux, torch allocates CPU tensors with ``malloc``. glibc serves a block above its
*mmap threshold* with a fresh ``mmap`` and returns it to the kernel on ``free``; the
threshold adapts upwards but never beyond 32 MiB on 64-bit systems. A curvature product
of a language model allocates and frees the same large tensors every time (logits-sized
tangents, the embedding's gradient, the flat output vector), so each product faults every
page of them in again: the kernel zeroes them 4 KiB at a time. On a 124 M GPT-2 (4 × 128
tokens, 2 threads) that is about 250 000 page faults and 20 % of a cached GGN product
(4.1 s against 3.3 s when the memory is reused; ``validation/results/bench_lm_top5*.json``).

On entering the outermost block, :func:`reuse_freed_memory` first returns the free memory
earlier work left in the heap (``malloc_trim(0)``: a memory plan's probes leave gigabytes
there on a 124 M model, which the large tensors of a run would not reuse). It then raises
the mmap threshold to :data:`REUSE_THRESHOLD_BYTES` and the trim threshold to its maximum
for the duration of the block, so freed blocks stay in the heap and the next product
reuses them without a fault. On leaving the outermost block the thresholds are set to
where glibc's own adaptation settles in a process that frees large blocks
(:data:`SETTLED_MMAP_THRESHOLD_BYTES`, twice that for trimming), and ``malloc_trim(0)``
gives the kept memory back to the kernel when the heap holds more free memory than that trim
threshold (below it, glibc would keep it too).

It changes no number, only where memory comes from. The cost is memory: the heap keeps the
freed blocks of a product's temporaries until the block ends, and packs them less tightly
(the 124 M GPT-2's first product: 3.80 GB resident against 3.41 GB with glibc's defaults,
for 3.07 GB of tensors at its peak). Elsewhere (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "REUSE_THRESHOLD_BYTES",
    "SETTLED_MMAP_THRESHOLD_BYTES",
    "release_free_memory",
    "reuse_freed_memory",
]

#: ``mallopt`` parameters (``<malloc.h>``).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks below this come from the heap (and are reused) inside :func:`reuse_freed_memory`:
#: every temporary of a product up to a 250 M-parameter float32 vector.
REUSE_THRESHOLD_BYTES = 1 << 30
#: glibc's largest dynamic mmap threshold on 64-bit (``4 MiB * sizeof(long)``), where it
#: settles once a block that large was freed; the trim threshold settles at twice it.
SETTLED_MMAP_THRESHOLD_BYTES = 32 << 20
#: ``mallopt`` takes an ``int``: the largest trim threshold it accepts.
_KEEP_FREE_BYTES = (1 << 31) - 1

_lock = threading.Lock()
_depth = 0


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (``<malloc.h>``)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


@functools.cache
def _glibc() -> Any | None:
    """The process's glibc with ``mallopt`` and ``malloc_trim`` typed, or None (looked up
    once: every CPU Lanczos run enters :func:`reuse_freed_memory`)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (absent on musl: not glibc)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info = getattr(libc, "mallinfo2", None)  # glibc >= 2.33
    if info is not None:
        info.argtypes, info.restype = [], _MallInfo2
    return libc


def _free_heap_bytes(libc: Any) -> int | None:
    """Bytes free in the heap's arenas, or None where glibc cannot tell (before 2.33)."""
    info = getattr(libc, "mallinfo2", None)
    return None if info is None else int(info().fordblks)


def _settle(libc: Any) -> None:
    libc.mallopt(_M_MMAP_THRESHOLD, SETTLED_MMAP_THRESHOLD_BYTES)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 * SETTLED_MMAP_THRESHOLD_BYTES)
    # Below the settled trim threshold glibc would keep the free memory itself; giving it
    # back would cost a small run more than its own reductions (3-4 ms for 40 MB free
    # after a run on a 269 k-parameter model), and its next run the page faults.
    free = _free_heap_bytes(libc)
    if free is None or free >= 2 * SETTLED_MMAP_THRESHOLD_BYTES:
        libc.malloc_trim(0)


@contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Keep freed host memory for reuse inside the block (glibc only; thread-safe, nests).

    Use it around a solver run on CPU operators, e.g. ``with reuse_freed_memory():
    scipy.sparse.linalg.eigsh(op.to_scipy(), ...)``; :func:`curvops.solvers.lanczos`
    enters it itself for CPU operators (``reuse_freed_memory=False`` to opt out).

    Args:
        enabled: False makes the block do nothing (for callers with a switch).

    Yields:
        Whether the thresholds are raised (False off glibc, when disabled, or when glibc
        refused the setting).
    """
    global _depth
    libc = _glibc() if enabled else None
    active = False
    if libc is not None:
        with _lock:
            if _depth == 0:
                # What earlier work left free in the heap goes back first: large blocks
                # would not be served from it, and the run's peak starts from what is used.
                libc.malloc_trim(0)
                active = (libc.mallopt(_M_MMAP_THRESHOLD, REUSE_THRESHOLD_BYTES) == 1
                          and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREE_BYTES) == 1)
                if not active:
                    _settle(libc)
            else:
                active = True
            if active:
                _depth += 1
    try:
        yield active
    finally:
        if active:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    _settle(libc)


def release_free_memory() -> bool:
    """Return the heap's free memory to the kernel now (``malloc_trim(0)``; glibc only).

    Inside :func:`reuse_freed_memory` the heap keeps what a product frees for the next
    one. A product larger than those that follow leaves more than they reuse, resident
    for the rest of the run: the one that builds a product cache (its forward pass and
    first-order graph; on a 124 M GPT-2, 3 GB of temporaries against 1 GB for a cached
    product) calls this when it ends.

    Returns:
        Whether the heap was trimmed (False off glibc).
    """
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        libc.malloc_trim(0)
    return True
