r"""Automatic micro-batching: the largest micro-batch whose product fits a memory budget.

Splitting a batch into micro-batches and accumulating leaves every curvature
operator unchanged (see :mod:`curvops.linops.curvature`); only memory changes. The
memory of one product is measured, not guessed: a *probe* runs the operator's own
product on the first one and two examples of the widest batch and fits

.. math::

    \mathrm{bytes}(m) \approx b_0 + m\, b_1,

(fixed cost :math:`b_0`, cost per example :math:`b_1`), then picks the largest
:math:`m` with :math:`\mathrm{bytes}(m) \le` budget.

The measurements are :mod:`curvops.linops.memory_probe`'s:

* **CUDA**: bytes = the product's peak above the memory allocated before it
  (:func:`~curvops.linops.memory_probe.peak_memory`); budget = ``safety ·`` free memory
  unless given.
* **CPU**: bytes = the tensors autograd saves for backward during the product
  (:func:`~curvops.linops.memory_probe.saved_tensor_bytes`, parameters excluded): the
  activations that dominate a product's memory, counted exactly where a sampled resident
  set size would be noisy. Budget = ``memory_budget_bytes``, else ``safety ·``
  ``MemAvailable`` from ``/proc/meminfo``; without either nothing is split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .checks import check_int, check_real
from .data import DataSource
from .memory_probe import available_memory_bytes, peak_memory, saved_tensor_bytes
from .objective import Objective, as_objective

__all__ = ["MicroBatchPlan", "plan_micro_batches"]


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
        method: ``"cuda_peak"``, ``"saved_tensors"`` or ``"none"`` (nothing measured).
    """

    micro_batch_size: int | None
    batch_size: int
    batch_size_used: int
    bytes_per_example: float
    fixed_bytes: float
    budget_bytes: int | None
    method: str

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
) -> int:
    op = operator_cls(
        model, objective, batch, params, check_deterministic=False, **operator_kwargs
    )
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[0], generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    if device.type == "cuda":
        with peak_memory(device) as peak:
            op.matvec(v)
        return int(peak["peak_bytes"])
    with saved_tensor_bytes(exclude=list(model.parameters())) as counted:
        op.matvec(v)
    return counted()


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
    method = "cuda_peak" if device.type == "cuda" else "saved_tensors"
    if budget is None or batch_size <= 1:
        return MicroBatchPlan(None, batch_size, batch_size, 0.0, 0.0, budget, "none")

    def measure(m: int) -> int:
        part = objective.split(probe, m)[0]
        return _probe_bytes(operator_cls, model, objective, part, params, operator_kwargs, device)

    b1 = measure(1)
    if probe_n >= 2:
        b2 = measure(2)
        slope = float(b2 - b1) if b2 > b1 else b2 / 2.0
    else:
        slope = float(b1)
    fixed = max(float(b1) - slope, 0.0)
    if slope <= 0.0:  # nothing measurable grows with the batch: whole batches fit
        return MicroBatchPlan(None, batch_size, batch_size, slope, fixed, budget, method)
    fits = int((budget - fixed) // slope)
    if fits < 1:
        raise MemoryError(
            f"one example needs about {(fixed + slope) / 2**20:.1f} MiB per product, over the "
            f"memory budget of {budget / 2**20:.1f} MiB"
        )
    if fits >= batch_size:
        return MicroBatchPlan(None, batch_size, batch_size, slope, fixed, budget, method)
    return MicroBatchPlan(fits, batch_size, fits, slope, fixed, budget, method)
