r"""Automatic micro-batching: the largest micro-batch whose product fits a memory budget.

Splitting a batch into micro-batches and accumulating leaves every curvature
operator unchanged (see :mod:`curvops.linops.curvature`); only memory changes. The
memory of one product is measured, not guessed: a *probe* runs the operator's own
product on the first one and two examples of the widest batch and fits

.. math::

    \mathrm{bytes}(m) \approx b_0 + m\, b_1,

(fixed cost :math:`b_0`, cost per example :math:`b_1`), then picks the largest
:math:`m` with :math:`\mathrm{bytes}(m) \le` budget.

The measurements are :mod:`curvops.linops.memory_probe`'s, the same quantity on every
device: the product's peak above the memory allocated before it, the building of its
cache state included, and the state the operator's cache then holds (``held``, fitted
the same way: :math:`h_0 + m\, h_1`), so that the rest of a product, :math:`b - h`, can be
told from the state a cache keeps.

* **CUDA**: ``torch.cuda.max_memory_allocated`` above entry
  (:func:`~curvops.linops.memory_probe.peak_memory`); budget = ``safety ·`` free memory
  unless given.
* **CPU**: the peak of torch's CPU allocations above entry, replayed from the profiler's
  allocation events (:func:`~curvops.linops.memory_probe.cpu_allocation_peak`): outputs,
  gradients and temporaries, not only what autograd saves, raised by
  :data:`CPU_HEAP_OVERHEAD` for what glibc's heap holds beyond the live tensors. Where the
  profiler cannot run (another one is active), the tensors autograd saves
  (:func:`~curvops.linops.memory_probe.saved_tensor_bytes`), a lower bound. Budget =
  ``memory_budget_bytes``, else ``safety ·`` ``MemAvailable`` from ``/proc/meminfo``;
  without either nothing is split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_int, check_real
from .data import DataSource
from .memory_probe import (
    available_memory_bytes,
    cpu_allocation_peak,
    peak_memory,
    saved_tensor_bytes,
)
from .objective import Objective, as_objective

__all__ = ["CPU_HEAP_OVERHEAD", "MicroBatchPlan", "plan_micro_batches"]

#: The resident memory a CPU product adds beyond its peak of live tensors, as a share of
#: that peak: the heap keeps freed blocks between live ones. Measured on the 124 M GPT-2's
#: first (cache-building) GGN product: 3.41 GB resident for 3.07 GB of tensors with glibc's
#: defaults, 3.80 GB with :func:`~curvops.linops.host_allocator.reuse_freed_memory`.
CPU_HEAP_OVERHEAD = 0.25


@dataclass(frozen=True)
class MicroBatchPlan:
    """The outcome of :func:`plan_micro_batches`.

    Attributes:
        micro_batch_size: Examples per micro-batch, or ``None`` when whole batches fit.
        batch_size: Examples in the largest batch of the data.
        batch_size_used: ``micro_batch_size`` if splitting, else ``batch_size``.
        bytes_per_example: Measured slope :math:`b_1`.
        fixed_bytes: Measured intercept :math:`b_0`.
        budget_bytes: The budget the plan was made for (``None``: unknown, no split).
        method: ``"cuda_peak"``, ``"cpu_allocator_peak"``, ``"saved_tensors"`` (the CPU
            fallback) or ``"none"`` (nothing measured).
        held_bytes_per_example: Measured slope :math:`h_1` of the cache state.
        held_fixed_bytes: Measured intercept :math:`h_0` of the cache state.
    """

    micro_batch_size: int | None
    batch_size: int
    batch_size_used: int
    bytes_per_example: float
    fixed_bytes: float
    budget_bytes: int | None
    method: str
    held_bytes_per_example: float = 0.0
    held_fixed_bytes: float = 0.0

    def product_bytes(self, examples: int | None = None) -> float:
        """A product's peak for a micro-batch of ``examples`` (default: the one used),
        the building of its cache state included."""
        m = self.batch_size_used if examples is None else examples
        return self.fixed_bytes + self.bytes_per_example * m

    def held_bytes(self, examples: int | None = None) -> float:
        """The cache state of a micro-batch of ``examples`` (default: the one used)."""
        m = self.batch_size_used if examples is None else examples
        return self.held_fixed_bytes + self.held_bytes_per_example * m

    def as_dict(self) -> dict[str, Any]:
        """The plan as a plain dict (for result metadata)."""
        return asdict(self)


def _example_width(batch: Any) -> float:
    """Tensor entries per example of a batch (to find the widest batch)."""
    tensors: list[Tensor] = []

    def collect(x: Any) -> None:
        if isinstance(x, Tensor):
            tensors.append(x)
        elif isinstance(x, (tuple, list)):
            for t in x:
                collect(t)
        elif isinstance(x, dict):
            for t in x.values():
                collect(t)

    collect(batch)
    lead = [t for t in tensors if t.dim() > 0]
    if not lead:
        return 0.0
    n = max(int(lead[0].shape[0]), 1)
    return sum(t.numel() for t in lead) / n


def _probe_bytes(
    operator_cls: type,
    model: nn.Module,
    objective: Objective,
    batch: Any,
    params: Any,
    operator_kwargs: dict[str, Any],
    device: torch.device,
) -> tuple[int, int, str]:
    """One product's peak above entry, the cache state it leaves, and how it was measured."""
    op = operator_cls(
        model, objective, batch, params, check_deterministic=False, **operator_kwargs
    )
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[0], generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    if device.type == "cuda":
        with peak_memory(device) as peak:
            op.matvec(v)
        return int(peak["peak_bytes"]), op.cache_bytes, "cuda_peak"
    try:
        with cpu_allocation_peak() as peak:
            op.matvec(v)
        resident = (1.0 + CPU_HEAP_OVERHEAD) * peak["peak_bytes"]
        return int(resident), op.cache_bytes, "cpu_allocator_peak"
    except RuntimeError:  # the profiler cannot run here: count what autograd saves
        op.clear_cache()
        with saved_tensor_bytes(exclude=list(model.parameters())) as counted:
            op.matvec(v)
        return counted(), op.cache_bytes, "saved_tensors"


def plan_micro_batches(
    operator_cls: type,
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    params: Any = None,
    *,
    memory_budget_bytes: int | None = None,
    safety: float = 0.5,
    operator_kwargs: dict[str, Any] | None = None,
) -> MicroBatchPlan:
    """Choose the micro-batch size of an operator from a measured probe and a budget.

    Args:
        operator_cls: The curvops operator class (``GGNOperator``, ``HessianOperator``, ...).
        model: The model.
        loss_fn: The loss or objective the operator will use.
        data: The operator's data.
        params: The operator's parameter selection.
        memory_budget_bytes: Bytes one product may use; default ``safety ·`` free memory
            (CUDA) or ``safety ·`` ``MemAvailable`` (CPU).
        safety: Fraction of free memory used when no budget is given.
        operator_kwargs: Extra keyword arguments of the operator (e.g. ``mode="mc"``).

    Returns:
        The plan; ``micro_batch_size`` is ``None`` when whole batches fit.

    Raises:
        ValueError: For a budget that is not a positive int, or ``safety`` outside
            ``(0, 1]`` (a wrong type raises :class:`~curvops.linops.checks.NumberTypeError`,
            a ``ValueError`` too).
        MemoryError: When even one example does not fit the budget.
    """
    memory_budget_bytes = check_int(
        "memory_budget_bytes", memory_budget_bytes, minimum=1, allow_none=True
    )
    safety = check_real("safety", safety, above=0, maximum=1)
    objective = as_objective(loss_fn)
    operator_kwargs = dict(operator_kwargs or {})
    batches = list(DataSource(data))
    sizes = [objective.count(b).examples for b in batches]
    batch_size = max(sizes)
    probe = max(batches, key=_example_width)
    probe_n = objective.count(probe).examples
    device = next(model.parameters()).device

    budget = memory_budget_bytes
    if budget is None:
        avail = available_memory_bytes(device)
        budget = int(safety * avail) if avail > 0 else None
    if budget is None or batch_size <= 1:
        return MicroBatchPlan(None, batch_size, batch_size, 0.0, 0.0, budget, "none")

    def measure(m: int) -> tuple[int, int, str]:
        part = objective.split(probe, m)[0]
        return _probe_bytes(operator_cls, model, objective, part, params, operator_kwargs, device)

    def line(one: int, two: int | None) -> tuple[float, float]:
        """(slope, intercept) through the measurements at one and two examples."""
        if two is None:
            return float(one), 0.0
        slope = float(two - one) if two > one else two / 2.0
        return slope, max(float(one) - slope, 0.0)

    b1, h1, method = measure(1)
    b2, h2, _ = measure(2) if probe_n >= 2 else (None, None, method)
    slope, fixed = line(b1, b2)
    held_slope, held_fixed = line(h1, h2)

    def plan(micro: int | None, used: int) -> MicroBatchPlan:
        return MicroBatchPlan(micro, batch_size, used, slope, fixed, budget, method,
                              held_slope, held_fixed)

    if slope <= 0.0:  # nothing measurable grows with the batch: whole batches fit
        return plan(None, batch_size)
    fits = int((budget - fixed) // slope)
    if fits < 1:
        raise MemoryError(
            f"one example needs about {(fixed + slope) / 2**20:.1f} MiB per product, over the "
            f"memory budget of {budget / 2**20:.1f} MiB"
        )
    if fits >= batch_size:
        return plan(None, batch_size)
    return plan(fits, fits)
