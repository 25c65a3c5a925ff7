"""Input checks that run before any expensive work.

The determinism check runs the model twice on the same inputs and requires equal
outputs. It must not change the model: buffers and the global RNG states are saved
before and restored after.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import Tensor, nn


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` has no NaN/Inf, in one reduction where it is finite.

    A NaN or Inf makes the sum non-finite; the exact element-wise test runs only when the
    sum is not finite (a NaN/Inf, or an overflow of finite values). It runs on every
    product, on the model's outputs.
    """
    if x.numel() == 0:
        return True
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return math.isfinite(float(x.sum(dtype=wide))) or bool(torch.isfinite(x).all())


def check_finite_parameters(names: list[str], params: list[Tensor]) -> None:
    """Raise ``ValueError`` naming the first parameter with NaN or Inf entries."""
    for name, p in zip(names, params, strict=True):
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"parameter {name!r} contains NaN or Inf")


def check_no_train_mode_batchnorm(model: nn.Module) -> None:
    """Refuse BatchNorm in train mode: its output depends on how data is split into batches."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"BatchNorm module {name or type(module).__name__!r} is in train mode: its "
                "output depends on the batch split, so the curvature is not one fixed matrix; "
                "call model.eval() first"
            )


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore the model's buffers and the global RNG states on exit."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def check_repeatable(
    model: nn.Module,
    context: AbstractContextManager,
    compute: Callable[[], Tensor],
    what: str,
) -> Tensor:
    """Run ``compute`` twice without grad; refuse non-finite or differing results.

    The model's buffers and the global RNG states are restored afterwards (also on error).

    Args:
        model: The model ``compute`` runs.
        context: The context the products run under (e.g. an attention kernel).
        compute: One no-grad pass over the same inputs.
        what: Names the result in the NaN/Inf message (``"outputs"``, ``"loss"``).

    Returns:
        The first result.

    Raises:
        ValueError: For NaN/Inf, or results that differ (dropout left on).
    """
    with preserved_state(model), torch.no_grad(), context:
        first, second = compute(), compute()
    if not bool(torch.isfinite(first).all()):
        raise ValueError(f"the model's {what} contain NaN or Inf")
    if not torch.equal(first, second):
        raise ValueError(
            "the model's outputs differ between two identical passes (dropout or another "
            "random layer left on? call model.eval()); the curvature would not be one fixed "
            "matrix. Pass check_deterministic=False to skip this check"
        )
    return first
