r"""Checkpoints of a Lanczos run: atomic files, fingerprints, and the refusal of a mismatch.

A checkpoint is one ``torch.save`` file holding a dict of tensors and plain Python values
(ints, floats, bools, strings, lists, dicts, None) and nothing else, so that it loads with
``torch.load(..., weights_only=True)``: no pickle of arbitrary objects is ever read back.

It is written atomically: into a temporary file in the same folder (an ``os.replace``
across file systems would not be atomic), flushed and ``os.fsync``-ed, renamed over the
previous checkpoint with ``os.replace``, and the folder ``fsync``-ed where the platform
allows it. A crash at any moment leaves either the previous checkpoint or the new one,
never a mixture.

A checkpoint is resumed only by the run it belongs to. Its *fingerprint* holds

* the operator: its size, dtype, device type and a short sketch of its product with a
  fixed seeded probe vector (one product, not counted in ``matvecs``), compared with a
  relative tolerance (an operator whose products do not repeat bit for bit, such as a GPU
  model with non-deterministic reductions, must still be recognised);
* the settings that change the result, the start vector's hash among them.

Anything that differs is refused with a :class:`CheckpointError` naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from curvops.linops.checks import check_int
from curvops.linops.dtypes import working_dtype

from ._as_operator import TorchOperator, non_finite_product

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "check_checkpoint_settings",
    "host_copy",
    "probe_operator",
    "tensor_digest",
]

FORMAT = "curvops.lanczos.checkpoint"
VERSION = 1

#: Seed of the probe vector: fixed, so that every run of every process draws the same one.
PROBE_SEED = 0x5EED_C4EC
#: Entries of the probe product kept in the fingerprint (with its norm and x^T A x).
PROBE_ENTRIES = 32
#: The probe products of one operator must agree to this many epsilons of its precision ...
PROBE_EPS_FACTOR = 1e3
#: ... and never more loosely than this (1e3 eps of a bf16 operator would accept anything).
PROBE_RTOL_MAX = 1e-2


class CheckpointError(ValueError):
    """A Lanczos checkpoint cannot be resumed: another operator or settings, or damaged."""


def check_checkpoint_settings(path: object, every: object, label) -> int:
    """Refuse a bad ``checkpoint_path`` / ``checkpoint_every`` before any product.

    Args:
        path: None, or a str / ``os.PathLike`` whose parent folder exists.
        every: Iterations between two checkpoints: a positive int.
        label: The name a message gives a setting (a function of the field's name).

    Returns:
        ``every`` as a Python int.

    Raises:
        TypeError: ``path`` is not a str or path-like object.
        NumberTypeError: ``every`` is not an int (a TypeError and a ValueError).
        ValueError: ``every`` is below 1; ``path``'s folder does not exist, or ``path`` is
            itself a folder.
    """
    steps = check_int(label("checkpoint_every"), every, minimum=1)
    if path is None:
        return steps
    if not isinstance(path, str | os.PathLike) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"{label('checkpoint_path')} must be None, a str or an os.PathLike, "
                        f"got {type(path).__name__}")
    file = Path(os.fspath(path))
    if file.is_dir():
        raise ValueError(f"{label('checkpoint_path')}={os.fspath(path)!r} is a folder; it must "
                         "name a file")
    if not file.parent.is_dir():
        raise ValueError(f"{label('checkpoint_path')}={os.fspath(path)!r}: its folder "
                         f"{str(file.parent)!r} does not exist")
    return steps


def host_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    """A detached CPU copy of ``t`` that owns its storage.

    ``torch.save`` of a view writes the whole storage it views (a basis row would write
    its whole block), so every tensor of a checkpoint is copied first.
    """
    if t is None:
        return None
    return t.detach().to("cpu", copy=True).contiguous()


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (dtype-agnostic: read as raw bytes)."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def probe_operator(op: TorchOperator) -> dict[str, object]:
    r"""The operator part of the fingerprint: one product with a fixed seeded unit vector.

    Kept: ``PROBE_ENTRIES`` entries of :math:`y = Ax` at seeded positions,
    :math:`\|y\|` and :math:`x^\top y`, as one short float64 tensor; with the size, dtype
    and device type. The product is made here, outside the run's count.

    Raises:
        NonFiniteProductError: The product has NaN/Inf.
        TypeError: The operator returned something other than a length-n vector.
    """
    gen = torch.Generator(device="cpu").manual_seed(PROBE_SEED)
    x = torch.randn(op.n, generator=gen, dtype=working_dtype(op.dtype))
    x = (x / torch.linalg.vector_norm(x)).to(dtype=op.dtype, device=op.device)
    idx = torch.randint(0, op.n, (min(op.n, PROBE_ENTRIES),), generator=gen)
    y = op.matvec(x).to(device=op.device)
    parts = [y[idx.to(op.device)].to(torch.float64),
             torch.linalg.vector_norm(y, dtype=torch.float64).reshape(1),
             torch.dot(x.to(torch.float64), y.to(torch.float64)).reshape(1)]
    sketch = torch.cat(parts).cpu()
    if not bool(torch.isfinite(sketch).all()):
        raise non_finite_product("lanczos", "in the checkpoint's probe product")
    return {"n": op.n, "dtype": str(op.dtype), "device": op.device.type, "probe": sketch}


def probe_tolerance(op_dtype: torch.dtype, operator_eps: float | None) -> float:
    """Relative tolerance of the probe comparison: ``PROBE_EPS_FACTOR`` times the precision
    of one product (its dtype's epsilon, or ``operator_eps`` when larger), capped."""
    eps = float(torch.finfo(op_dtype).eps)
    if operator_eps is not None:
        eps = max(eps, float(operator_eps))
    return min(PROBE_EPS_FACTOR * eps, PROBE_RTOL_MAX)


def _operator_differences(saved: dict, now: dict, rtol: float) -> list[str]:
    diffs = [f"operator {key}: checkpoint {saved.get(key)!r}, now {now[key]!r}"
             for key in ("n", "dtype", "device") if saved.get(key) != now[key]]
    if diffs:
        return diffs  # the probes of operators of another size or dtype do not compare
    old, new = saved.get("probe"), now["probe"]
    if not isinstance(old, torch.Tensor) or old.shape != new.shape:
        return ["operator probe: the checkpoint's is malformed"]
    scale = float(old[-2])  # ||A x||
    gap = float(torch.max(torch.abs(new - old)))
    rel = gap / scale if scale > 0 else (0.0 if gap == 0 else math.inf)
    if not rel <= rtol:
        diffs.append(
            f"operator: its product with the probe vector differs by {rel:.3g} relative "
            f"(tolerance {rtol:.3g}) — another operator, or one whose products do not repeat "
            "to that tolerance (set operator_eps to its relative accuracy)"
        )
    return diffs


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder (Windows).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(path: Path, payload: dict) -> None:
    """``torch.save(payload)`` to ``path`` atomically (see the module docstring)."""
    folder = path.parent
    fd = None
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as fh:
            fd = None  # owned by fh now
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:  # a failed write leaves the previous checkpoint, no temp file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    _fsync_folder(folder)


class Checkpoint:
    """The checkpoint file of one run: when to write it, writing, reading, removing.

    Args:
        path: The file (its folder exists: checked with the settings).
        every: Write after every ``every``-th iteration.
        operator: :func:`probe_operator`'s fingerprint of the run's operator.
        settings: The settings that change the result, as ``{name: text}``.
        rtol: Tolerance of the probe comparison (:func:`probe_tolerance`).
        writer: Whether this process writes and removes the file; in a distributed run
            only rank 0 does (every rank reads it).

    Attributes:
        seconds: Wall time spent writing checkpoints.
        written: Checkpoints written.
    """

    def __init__(self, path: str | os.PathLike, every: int, operator: dict,
                 settings: dict[str, str], rtol: float, writer: bool = True) -> None:
        self.path = Path(os.fspath(path))
        self.every = int(every)
        self.writer = bool(writer)
        self.operator, self.settings, self.rtol = operator, settings, rtol
        self.seconds = 0.0
        self.written = 0

    def due(self, iterations: int) -> bool:
        """Whether this process writes a checkpoint after ``iterations`` iterations."""
        return self.writer and iterations % self.every == 0

    def save(self, state: dict) -> None:
        """Write ``state`` (tensors and plain values only) with the fingerprint, atomically."""
        t0 = time.perf_counter()
        save_atomic(self.path, {"format": FORMAT, "version": VERSION,
                                "operator": self.operator, "settings": self.settings,
                                "state": state})
        self.seconds += time.perf_counter() - t0
        self.written += 1

    def load(self) -> dict | None:
        """The saved run state, or None when there is no checkpoint file.

        Raises:
            CheckpointError: The file cannot be read as a checkpoint (damaged, truncated,
                or not a curvops Lanczos checkpoint), or it belongs to another operator or
                other settings (the message names every difference).
        """
        if not self.path.exists():
            return None
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many kinds for a bad file
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} cannot be read ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}): it is damaged or not a "
                "curvops Lanczos checkpoint; delete it to start afresh"
            ) from err
        if (not isinstance(payload, dict) or payload.get("format") != FORMAT
                or not isinstance(payload.get("state"), dict)
                or not isinstance(payload.get("operator"), dict)
                or not isinstance(payload.get("settings"), dict)):
            raise CheckpointError(f"{str(self.path)!r} is not a curvops Lanczos checkpoint; "
                                  "delete it or choose another checkpoint_path")
        if payload.get("version") != VERSION:
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} has format version {payload.get('version')!r}; "
                f"this curvops reads version {VERSION}; delete it to start afresh"
            )
        diffs = _operator_differences(payload["operator"], self.operator, self.rtol)
        saved = payload["settings"]
        diffs += [f"{name}: checkpoint {saved.get(name, '(absent)')}, now {value}"
                  for name, value in self.settings.items() if saved.get(name) != value]
        if diffs:
            raise CheckpointError(
                f"checkpoint {str(self.path)!r} belongs to another run and is not resumed: "
                + "; ".join(diffs)
                + ". Resume with the operator and settings that wrote it, or delete it"
            )
        return payload["state"]

    def damaged(self, err: BaseException) -> CheckpointError:
        """The error for a checkpoint whose state does not fit the run it matched."""
        return CheckpointError(
            f"checkpoint {str(self.path)!r} matches this run but its state is inconsistent "
            f"({type(err).__name__}: {err}): it is damaged; delete it to start afresh"
        )

    def remove(self) -> None:
        """Delete the checkpoint (the run finished) and any temporary file a killed write
        left beside it; only the writer does."""
        if not self.writer:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
