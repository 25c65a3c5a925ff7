"""Input checks that run before any expensive work.

The determinism check runs the model twice on the same inputs and requires equal
outputs. It must not change the model: buffers and the global RNG states are saved
before and restored after.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .dtypes import working_dtype


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` has no NaN/Inf, in one reduction where it is finite.

    A NaN or Inf makes the sum non-finite; the exact element-wise test runs only when the
    sum is not finite (a NaN/Inf, or an overflow of finite values). It runs on every
    product, on the model's outputs.
    """
    if x.numel() == 0:
        return True
    return math.isfinite(float(x.sum(dtype=working_dtype(x.dtype)))) or bool(
        torch.isfinite(x).all()
    )


def as_integer(value: Any) -> int | None:
    """``value`` as a Python ``int`` if it is an integer, else ``None``.

    Python ints and numpy integer scalars count (``np.int64(3)``); ``bool`` does not, and
    neither does a float with an integral value (``3.0``): a count or a seed given as a
    float is more likely a mistake than a request.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def as_real(value: Any) -> float | None:
    """``value`` as a Python ``float`` if it is a real number, else ``None``.

    Python and numpy real scalars count (``np.float32(1e-6)``, ``np.int64(2)``); ``bool``
    does not.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


class NumberTypeError(TypeError, ValueError):
    """A numeric argument of the wrong type: a string, a bool, a float where an int is due.

    A ``TypeError``, as a wrong type is, and a ``ValueError`` as well: several entry points
    (``micro_batch_size``, ``mc_samples``, ``chunk_size``, the language-model limits,
    :class:`~curvops.solvers.lanczos.LanczosConfig`, ``SpectralConfig``) document
    ``ValueError`` for any bad value of such an argument, and both promises hold.
    """


def _bounds(
    minimum: float | None, maximum: float | None, above: float | None, below: float | None
) -> str:
    """`` >= 1 and < 2``: the bounds of a number, as a message states them."""
    parts = [
        f"{op} {bound}" if isinstance(bound, int) else f"{op} {bound:g}"
        for op, bound in ((">=", minimum), (">", above), ("<=", maximum), ("<", below))
        if bound is not None
    ]
    return " " + " and ".join(parts) if parts else ""


def _refuse(name: str, kind: str, bounds: str, allow_none: bool, value: Any) -> str:
    """The one wording of a refused number: ``"k must be an int >= 1, got 0"``."""
    return f"{name} must be {kind}{bounds}{' or None' if allow_none else ''}, got {value!r}"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
) -> int | None:
    """``value`` as a Python ``int`` within ``[minimum, maximum]`` (either bound optional).

    What counts as an integer is :func:`as_integer`'s rule: Python and numpy integers, not
    ``bool`` and not an integral float.

    Args:
        name: The argument's name, for the message.
        value: What was passed.
        minimum: The smallest value allowed.
        maximum: The largest value allowed.
        allow_none: Return ``None`` for ``None`` (the argument's "not given").

    Returns:
        The integer, or ``None`` when ``value`` is ``None`` and that is allowed.

    Raises:
        NumberTypeError: For anything that is not an integer (a ``TypeError`` and a
            ``ValueError``).
        ValueError: For an integer out of bounds.
    """
    if value is None and allow_none:
        return None
    number = as_integer(value)
    if number is None:
        raise NumberTypeError(_refuse(name, "an int", "", allow_none, value))
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        bounds = _bounds(minimum, maximum, None, None)
        raise ValueError(_refuse(name, "an int", bounds, allow_none, value))
    return number


def check_real(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    finite: bool = True,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a Python ``float`` within the given bounds.

    What counts as a real number is :func:`as_real`'s rule: Python and numpy real scalars,
    not ``bool``.

    Args:
        name: The argument's name, for the message.
        value: What was passed.
        minimum: Allowed values are ``>= minimum``.
        maximum: Allowed values are ``<= maximum``.
        above: Allowed values are ``> above``.
        below: Allowed values are ``< below``.
        finite: Refuse infinities (NaN is refused whatever this says).
        allow_none: Return ``None`` for ``None`` (the argument's "not given").

    Returns:
        The number, or ``None`` when ``value`` is ``None`` and that is allowed.

    Raises:
        NumberTypeError: For anything that is not a real number (a ``TypeError`` and a
            ``ValueError``).
        ValueError: For a number out of bounds (or not finite when ``finite``).
    """
    if value is None and allow_none:
        return None
    number = as_real(value)
    if number is None:
        raise NumberTypeError(_refuse(name, "a real number", "", allow_none, value))
    outside = (
        (finite and not math.isfinite(number))
        or math.isnan(number)
        or (minimum is not None and not number >= minimum)
        or (maximum is not None and not number <= maximum)
        or (above is not None and not number > above)
        or (below is not None and not number < below)
    )
    if outside:
        kind = "a finite number" if finite else "a number"
        bounds = _bounds(minimum, maximum, above, below)
        raise ValueError(_refuse(name, kind, bounds, allow_none, value))
    return number


def check_materialized(model: nn.Module) -> None:
    """Refuse a model whose parameters or buffers live on the ``meta`` device (no values)."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if t.device.type == "meta":
                raise ValueError(
                    f"{kind} {name!r} is on the meta device (it has a shape but no values); "
                    "materialise the model first: load its weights, or model.to_empty("
                    "device=...) followed by an initialisation or load_state_dict"
                )


def check_batch_inputs(
    index: int,
    inputs: list[tuple[str, Tensor]],
    dtype: torch.dtype,
    first: dict[str, torch.Size] | None,
) -> dict[str, torch.Size]:
    """Refuse a batch's model inputs that would fail or poison the products.

    Floating inputs must be finite (an Inf input can give finite outputs and NaN
    gradients) and in the model's dtype (nothing is cast silently); they must keep the
    number of dimensions of the first batch's input of the same name, and a 2-D input
    ``(examples, features)`` its feature size. Other sizes are not compared: in an input
    of more dimensions the one that may vary (sequence length, image size) cannot be told
    from the others. Integer inputs (token ids) are not compared.

    Args:
        index: The batch's position in the data, for the messages.
        inputs: The batch's model inputs, named (``"inputs"``, ``"inputs[0]"``, ...).
        dtype: The model's dtype (:func:`~curvops.linops.params.model_dtype`).
        first: The shapes of the first batch's floating inputs (``None`` for batch 0).

    Returns:
        The shapes of this batch's floating inputs (pass them as ``first`` for later ones).

    Raises:
        TypeError: For a floating input of another dtype than the model's.
        ValueError: For NaN/Inf entries or a feature size that differs from batch 0's.
    """
    shapes: dict[str, torch.Size] = {}
    for name, t in inputs:
        if not t.is_floating_point():
            continue
        if t.dtype != dtype:
            raise TypeError(
                f"batch {index}: {name} has dtype {t.dtype} but the model computes in {dtype}; "
                f"pass {name}.to({dtype}) (curvops never casts inputs silently)"
            )
        if not all_finite(t):
            what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise ValueError(
                f"batch {index}: {name} contains {what} entries; the products would be NaN. "
                "Remove or replace them before building the operator"
            )
        shapes[name] = t.shape
        was = None if first is None else first.get(name)
        if was is not None and (len(was) != t.dim() or (t.dim() == 2 and was[1] != t.shape[1])):
            raise ValueError(
                f"batch {index}: {name} has shape {tuple(t.shape)} but batch 0's has "
                f"{tuple(was)}; every batch must give the model inputs of the same feature "
                "size and number of dimensions (only the number of examples may vary)"
            )
    return shapes


#: Torch's wording when an op meets an argument of the wrong dtype.
_DTYPE_ERROR = re.compile(r"dtype|scalar type|weight type")


def explain_input_dtype_error(
    err: Exception, inputs: list[tuple[str, Tensor]], dtype: torch.dtype
) -> TypeError | None:
    """A message in curvops' words for a forward pass that failed on an input's dtype.

    Integer inputs are legitimate for embedding layers, so they cannot be refused before
    the forward pass; when the model then fails with a dtype error, this names the input
    whose dtype is not the model's.

    Args:
        err: What the model's forward pass raised.
        inputs: The model inputs of the batch, named.
        dtype: The model's dtype.

    Returns:
        A ``TypeError`` to raise from ``err``, or ``None`` when ``err`` is not such an error.
    """
    if not isinstance(err, RuntimeError) or not _DTYPE_ERROR.search(str(err)):
        return None
    odd = [(name, t) for name, t in inputs if t.dtype != dtype]
    if not odd:
        return None
    name, t = odd[0]
    first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
    return TypeError(
        f"the model's forward pass failed on {name} of dtype {t.dtype} ({first_line}); the "
        f"model computes in {dtype}: pass {name}.to({dtype}) for floating inputs (integer "
        "inputs are for embedding layers; curvops never casts inputs silently)"
    )


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
