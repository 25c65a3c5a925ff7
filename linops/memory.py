r"""Automatic micro-batching: the largest micro-batch whose product fits a memory budget.

Splitting a batch into micro-batches and accumulating leaves every curvature
operator unchanged (see :mod:`curvops.linops.curvature`); only memory changes. The
memory of one product is measured, not guessed: a *probe* runs the operator's own
product on the first one and two examples of the widest batch and fits

.. math::

    \mathrm{bytes}(m) \approx b_0 + m\, b_1,

(fixed cost :math:`b_0`, cost per example :math:`b_1`), then picks the largest
:math:`m` with :math:`\mathrm{bytes}(m) \le` budget.

Each probe measures three quantities, each fitted the same way (:math:`h_0 + m\, h_1`,
:math:`c_0 + m\, c_1`): the first product's peak above the memory in use before it (the
building of its cache state included), the state the operator's cache then holds
(``held``), and the peak of a cached product beside that state (``cached``: far less than
the first on a language model, whose first product also runs the forward pass and builds
the first-order graph).

* **CUDA**: ``torch.cuda.max_memory_allocated`` above entry
  (:func:`~curvops.linops.memory_probe.peak_memory`) of the first product and of a second,
  cached one; budget = ``safety ·`` free memory unless given.
* **CPU**: the peak of torch's CPU allocations above entry, replayed from the profiler's
  allocation events (:func:`~curvops.linops.memory_probe.cpu_allocation_peak`): outputs,
  gradients and temporaries, not only what autograd saves; the cached product's peak is
  that of the first product's vector-dependent step (the profiler range
  :data:`~curvops.linops.memory_probe.APPLY_RANGE`, the step a cached product repeats)
  above where it began. Both, and the cache state, are raised by :data:`CPU_HEAP_OVERHEAD`
  for what glibc's heap holds beyond the live tensors. Where the profiler cannot run
  (another one is active), the tensors autograd saves
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
    APPLY_RANGE,
    available_memory_bytes,
    cpu_allocation_peak,
    peak_memory,
    saved_tensor_bytes,
)
from .objective import Objective, as_objective

__all__ = ["CPU_HEAP_OVERHEAD", "MicroBatchPlan", "plan_micro_batches"]

#: The resident memory of a CPU product and of a cache state beyond their live tensors, as a
#: share of them: the heap keeps freed blocks between live ones and pages that small live
#: blocks pin. Measured on the 124 M GPT-2's top-5 GGN run (``validation/bench_lm_top5.py``
#: under a 10 GB process limit, a thick restart of 11 vectors): 3.30 GB resident above the
#: solver's own vectors at its plateau, 3.47 GB at its peak, for 1.40 GB of cache state and
#: 1.06 GB of a cached product's tensors (x 1.34-1.41).
CPU_HEAP_OVERHEAD = 0.40


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
        cached_bytes_per_example: Measured slope :math:`c_1` of a cached product's peak.
        cached_fixed_bytes: Measured intercept :math:`c_0` of a cached product's peak.
        output_bytes: The product's output vector, which the measured peaks leave out
            (the probe writes into a buffer, as a thick-restarted Lanczos run's products
            do, :meth:`~curvops.linops.curvature.CurvatureOperator.matvec_into`).
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
    cached_bytes_per_example: float = 0.0
    cached_fixed_bytes: float = 0.0
    output_bytes: float = 0.0

    def _fitted(self, fixed: float, per_example: float, examples: int | None) -> float:
        """``fixed + per_example · m`` for ``m = examples`` (default: the micro-batch used)."""
        m = self.batch_size_used if examples is None else examples
        return fixed + per_example * m

    def product_bytes(self, examples: int | None = None, *, into: bool = False) -> float:
        """A product's peak for a micro-batch of ``examples`` (default: the one used),
        the building of its cache state included; ``into``: written into the caller's
        buffer (no output vector of its own)."""
        output = 0.0 if into else self.output_bytes
        return self._fitted(self.fixed_bytes, self.bytes_per_example, examples) + output

    def held_bytes(self, examples: int | None = None) -> float:
        """The cache state of a micro-batch of ``examples`` (default: the one used)."""
        return self._fitted(self.held_fixed_bytes, self.held_bytes_per_example, examples)

    def cached_product_bytes(self, examples: int | None = None, *, into: bool = False
                             ) -> float:
        """A cached product's peak beside the cache (that of its vector-dependent step),
        for a micro-batch of ``examples`` (default: the one used); ``into`` as for
        :meth:`product_bytes`."""
        output = 0.0 if into else self.output_bytes
        return self._fitted(self.cached_fixed_bytes, self.cached_bytes_per_example,
                            examples) + output

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


@dataclass(frozen=True)
class _Probe:
    """One probe's measurements (bytes): see the module docstring."""

    peak: int
    held: int
    cached: int
    method: str
    output: int = 0


def _probe(
    operator_cls: type,
    model: nn.Module,
    objective: Objective,
    batch: Any,
    params: Any,
    operator_kwargs: dict[str, Any],
    device: torch.device,
) -> _Probe:
    """An operator's first product on ``batch``: its peak, the cache state it leaves and the
    peak of a cached product beside that state."""
    op = operator_cls(
        model, objective, batch, params, check_deterministic=False, **operator_kwargs
    )
    # A product's memory does not depend on the vector's values: a constant unit vector
    # (a seeded float64 draw of 124 M numbers took 2.4 s, twice per plan).
    n = op.shape[0]
    v = torch.full((n,), n**-0.5, dtype=op.dtype, device=op.device)
    # The products write into a buffer allocated here: their peaks leave the output out.
    out = torch.empty_like(v)
    output = out.numel() * out.element_size()
    if device.type == "cuda":
        peaks = []
        for _ in range(2):  # the first builds the cache, the second is served from it
            with peak_memory(device) as peak:
                op.matvec_into(v, out)
            peaks.append(int(peak["peak_bytes"]))
        return _Probe(peaks[0], op.cache_bytes, peaks[1], "cuda_peak", output)
    try:
        with cpu_allocation_peak(window=APPLY_RANGE) as peak:
            op.matvec_into(v, out)
        # The first product's vector-dependent step is what a cached product repeats; without
        # a cache (its state did not fit the probe operator's budget) every product is
        # fresh, as large as the first.
        window = peak["window_peak_bytes"] if op.cache_active else peak["peak_bytes"]
        first, cached, held = ((1.0 + CPU_HEAP_OVERHEAD) * x for x in (
            peak["peak_bytes"], window, op.cache_bytes))
        return _Probe(int(first), int(held), int(cached), "cpu_allocator_peak", output)
    except RuntimeError:  # the profiler cannot run here: count what autograd saves
        op.clear_cache()
        with saved_tensor_bytes(exclude=list(model.parameters())) as counted:
            op.matvec_into(v, out)
        saved, held = counted(), op.cache_bytes
        # A cached product saves nothing new: its peak is taken as the first's beyond the
        # state (no better count without the profiler); without a cache, as the first's.
        cached = max(saved - held, 0) if op.cache_active else saved
        return _Probe(saved, held, cached, "saved_tensors", output)


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

    def measure(m: int) -> _Probe:
        part = objective.split(probe, m)[0]
        return _probe(operator_cls, model, objective, part, params, operator_kwargs, device)

    def line(one: int, two: int | None) -> tuple[float, float]:
        """(slope, intercept) through the measurements at one and two examples."""
        if two is None:
            return float(one), 0.0
        slope = float(two - one) if two > one else two / 2.0
        return slope, max(float(one) - slope, 0.0)

    one = measure(1)
    two = measure(2) if probe_n >= 2 else None

    def fit(quantity: str) -> tuple[float, float]:
        """(slope, intercept) of one of the probes' measurements."""
        return line(getattr(one, quantity), None if two is None else getattr(two, quantity))

    slope, fixed = fit("peak")
    held_slope, held_fixed = fit("held")
    cached_slope, cached_fixed = fit("cached")

    def plan(micro: int | None, used: int) -> MicroBatchPlan:
        return MicroBatchPlan(micro, batch_size, used, slope, fixed, budget, one.method,
                              held_slope, held_fixed, cached_slope, cached_fixed,
                              float(one.output))

    if slope <= 0.0:  # nothing measurable grows with the batch: whole batches fit
        return plan(None, batch_size)
    fits = int((budget - fixed - one.output) // slope)
    if fits < 1:
        raise MemoryError(
            f"one example needs about {(fixed + slope + one.output) / 2**20:.1f} MiB per "
            f"product, over the memory budget of {budget / 2**20:.1f} MiB"
        )
    if fits >= batch_size:
        return plan(None, batch_size)
    return plan(fits, fits)
