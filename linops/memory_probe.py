r"""Measuring memory: every primitive curvops and its validation measure memory with.

Four quantities, each measured one way:

* **Available memory** (:func:`available_memory_bytes`): what new tensors may still take on
  a device; the default budgets of the product cache and of micro-batch planning.
* **Peak above entry** (:func:`peak_memory`): the most memory a block added at any moment.
  CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at entry (the
  allocator's exact count). CPU: the resident set size (:func:`rss_bytes`) sampled by a
  thread (torch's CPU allocator keeps no peak), a lower bound, since a spike between two
  samples is missed.
* **CPU allocations above entry** (:func:`cpu_allocation_peak`): the most bytes torch's
  CPU allocator held above entry at any moment of a block, from the time-ordered
  allocation events of torch's profiler (exact; every temporary, output and gradient
  counted, where a sampled resident set size misses short spikes and freed blocks glibc
  keeps blur it).
* **Bytes saved for backward** (:func:`saved_tensor_bytes`): the distinct storages autograd
  saves while a block runs (``torch.autograd.graph.saved_tensors_hooks``): the activations
  that dominate a product's memory, counted exactly on any device.
* **Bytes a result keeps alive** (:func:`graph_bytes`, :func:`measure_held`): a result's
  own tensors and everything their autograd graph saved (a walk of the graph's
  ``_saved_*`` tensors), or on CUDA the growth of ``torch.cuda.memory_allocated`` while the
  result is built and held.

Storages are counted once however many tensors view them; the tensors that exist anyway
(parameters, buffers) can be excluded.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "available_memory_bytes",
    "cpu_allocation_peak",
    "graph_bytes",
    "measure_held",
    "peak_memory",
    "PeakTracker",
    "rss_bytes",
    "saved_tensor_bytes",
]

T = TypeVar("T")

#: Seconds between two samples of the resident set size in :func:`peak_memory` (CPU).
RSS_SAMPLE_INTERVAL = 0.005


def available_memory_bytes(device: torch.device) -> int:
    """Memory available for new tensors on ``device``, in bytes.

    CUDA: free device memory (``torch.cuda.mem_get_info``). CPU: ``MemAvailable`` from
    ``/proc/meminfo``, falling back to the number of free physical pages; 0 where neither
    is known.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic platforms
        return 0


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux
        return 0


class PeakTracker:
    """The peak memory in use on a device since :meth:`start`, readable at any time.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at start (the peak
    statistics are reset at start). CPU: the peak resident set size above the one at
    start, sampled every ``interval`` seconds by a thread (a lower bound: short spikes
    between samples can be missed).

    Args:
        device: Where the work runs.
        interval: Seconds between two samples (CPU only).
    """

    def __init__(self, device: torch.device, interval: float = RSS_SAMPLE_INTERVAL) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.base = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakTracker:
        """Start measuring from now."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.base = self._peak = rss_bytes()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def max_bytes(self) -> int:
        """The absolute peak so far (CUDA: allocated; CPU: resident set size)."""
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):  # a failed kernel must not hide its error
                torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        self._peak = max(self._peak, rss_bytes())
        return self._peak

    def peak_bytes(self) -> int:
        """The peak so far above the memory in use at start."""
        return max(self.max_bytes() - self.base, 0)

    def stop(self) -> None:
        """Stop the sampling thread (CPU)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


@contextlib.contextmanager
def peak_memory(
    device: torch.device, interval: float = RSS_SAMPLE_INTERVAL
) -> Iterator[dict[str, float]]:
    """Measure the peak memory a block adds above what was in use at entry.

    On exit the yielded dict holds ``"peak_bytes"`` (an int, above the entry),
    ``"peak_mb"`` (the same in MiB), ``"base_bytes"`` (in use at entry) and, on CUDA,
    ``"max_allocated_bytes"`` (the absolute peak). See :class:`PeakTracker` for what is
    measured on each device.

    Args:
        device: Where the block computes.
        interval: Seconds between two samples (CPU only).

    Yields:
        The dict the figures are written into when the block ends.
    """
    tracker = PeakTracker(device, interval).start()
    out: dict[str, float] = {"peak_bytes": 0, "peak_mb": 0.0, "base_bytes": tracker.base}
    try:
        yield out
    finally:
        tracker.stop()
        top = tracker.max_bytes()
        if tracker.device.type == "cuda":
            out["max_allocated_bytes"] = top
        out["peak_bytes"] = max(top - tracker.base, 0)
        out["peak_mb"] = out["peak_bytes"] / 2**20


#: The profiler range a curvature product's vector-dependent step runs in (the step a
#: cached product repeats): :func:`cpu_allocation_peak` measures the peak inside it.
APPLY_RANGE = "curvops.apply"


@contextlib.contextmanager
def cpu_allocation_peak(window: str | None = None) -> Iterator[dict[str, int]]:
    """Measure the most bytes torch's CPU allocator held above entry inside the block.

    Runs the block under ``torch.profiler.profile(profile_memory=True)`` and replays its
    CPU allocation events in time order: the peak of their running sum. Allocations made
    outside torch (numpy, Python objects) are not seen.

    Args:
        window: The name of ``torch.profiler.record_function`` ranges inside the block:
            ``"window_peak_bytes"`` is then the largest growth of the running sum within
            one of them, above its value where the range began (0 without such a range).

    Yields:
        A dict whose ``"peak_bytes"`` (and ``"window_peak_bytes"``) are filled when the
        block ends.

    Raises:
        RuntimeError: When the profiler cannot run (another profiler is active) or its
            events cannot be read (a torch without ``kineto_results``); callers fall back
            to another measurement.
    """
    from torch.profiler import ProfilerActivity, profile

    if torch._C._autograd._profiler_enabled():
        # A second profiler would end the user's session when it stops.
        raise RuntimeError("another profiler is active")
    out = {"peak_bytes": 0, "window_peak_bytes": 0}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield out
    try:
        events = prof.profiler.kineto_results.events()
        trace = sorted((e.start_ns(), e.nbytes()) for e in events
                       if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
        ranges = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
                  if window is not None and e.name() == window]
    except AttributeError as err:
        raise RuntimeError(f"the profiler's allocation events cannot be read: {err}") from err
    times = [t for t, _ in trace]
    running = list(itertools.accumulate(nbytes for _, nbytes in trace))
    out["peak_bytes"] = int(max([0, *running]))
    for start, end in ranges:
        first, stop = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        if first < stop:
            level = running[first - 1] if first else 0
            out["window_peak_bytes"] = max(out["window_peak_bytes"],
                                           int(max(running[first:stop]) - level))


def storage_key(t: Tensor) -> tuple[str, int]:
    """What identifies a tensor's storage: views of one storage share it."""
    return (str(t.device), t.untyped_storage().data_ptr())


def _count(storages: dict[tuple[str, int], int], t: Any) -> None:
    """Record the storage of ``t`` (a tensor with values; anything else is passed over)."""
    if isinstance(t, Tensor) and t.device.type != "meta":
        storages[storage_key(t)] = int(t.untyped_storage().nbytes())


def _excluded_total(storages: dict[tuple[str, int], int], exclude: Iterable[Tensor]) -> int:
    """The bytes of ``storages`` without those of the ``exclude`` tensors."""
    for t in exclude:
        storages.pop(storage_key(t), None)
    return sum(storages.values())


@contextlib.contextmanager
def saved_tensor_bytes(exclude: Sequence[Tensor] = ()) -> Iterator[Callable[[], int]]:
    """Count the bytes of distinct storages autograd saves for backward inside the block.

    Args:
        exclude: Tensors whose storages are not counted (the parameters: they exist anyway).

    Yields:
        A function returning the bytes counted so far.
    """
    storages: dict[tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        _count(storages, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield lambda: _excluded_total(dict(storages), exclude)


def saved_storages(roots: Iterable[Tensor | None]) -> dict[tuple[str, int], int]:
    """Distinct storages saved for backward in the autograd graph behind ``roots``.

    Walks every node reachable from the roots' ``grad_fn`` and reads its ``_saved_*``
    attributes (tensors, or tuples/lists of tensors).
    """
    stack = [r.grad_fn for r in roots if isinstance(r, Tensor) and r.grad_fn is not None]
    seen: set[Any] = set()
    storages: dict[tuple[str, int], int] = {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # buffers already freed
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                _count(storages, t)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return storages


def graph_bytes(tensors: Sequence[Tensor | None], exclude: Iterable[Tensor]) -> int:
    """Bytes ``tensors`` keep alive: their own storages and everything their graph saved.

    Args:
        tensors: Graph outputs and plain tensors (``None`` entries are passed over).
        exclude: Tensors that exist anyway (parameters, buffers): their storages are
            not counted.
    """
    storages = saved_storages(tensors)
    for t in tensors:
        _count(storages, t)
    return _excluded_total(storages, exclude)


def measure_held(
    device: torch.device,
    build: Callable[[], T],
    tensors: Callable[[T], Sequence[Tensor | None]],
    exclude: Iterable[Tensor],
) -> tuple[T, int]:
    """Build a result and measure the memory it keeps alive.

    Args:
        device: Where ``build`` computes.
        build: Makes the result.
        tensors: The result's tensors (graph outputs and plain tensors).
        exclude: Tensors that exist anyway (CPU count only; on CUDA they were allocated
            before ``build`` ran).

    Returns:
        The result and its bytes. CUDA: the growth of ``torch.cuda.memory_allocated``
        while it was built (the allocator's own count of what is still live). CPU:
        :func:`graph_bytes` of its tensors.
    """
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        result = build()
        return result, max(torch.cuda.memory_allocated(device) - before, 0)
    result = build()
    return result, graph_bytes(tensors(result), exclude)
