r"""The GPU validation run of issue 10: one process, one wall-clock budget, JSON after every step.

On the GPU machine (one ``device`` call, at most 600 s)::

    pip install --no-deps --no-build-isolation -e . >/dev/null && python -m curvops.validation.gpu_run --out $OUT

On a CPU, the same logic on tiny shapes in a few seconds (``tests/test_gpu_run.py``)::

    python -m curvops.validation.gpu_run --smoke --out /tmp/gpu-smoke

Three sections run in order, each under its share of ``--budget-s`` (default 540 s, which
leaves a margin under the device tool's 600 s for the install and the start-up):

1. **crosscheck** — :func:`curvops.validation.crosscheck.cross_check` on small zoo models
   moved to the device (float64 and float32), with every default method including
   ``cupy-eigsh`` (cupyx ``eigsh`` on ``op.to_cupy()``); the rows are the cross-check's own.
2. **matvec_cost** — one GGN product on a ~10 M-parameter GPT-2 (float32) through the torch
   operator, the cupy view and the scipy view (which copies the vectors to the host and
   back), visited in a new seeded order each round; medians of wall time (bracketed by
   ``torch.cuda.synchronize``) and of CUDA-event time, and the ratios
   :math:`t_\text{cupy}/t_\text{torch}` and :math:`t_\text{scipy}/t_\text{torch}`.
3. **scale_ladder** — randomly initialised language models built from configs (nothing is
   downloaded): GPT-2-small, a Qwen2.5-1.5B-shaped and a LLaMA-7B-shaped model, in
   bfloat16, on a batch of 4 x 128 tokens. For each, the top-k (k = 10) eigenvalues of the
   exact Fisher = GGN (:class:`~curvops.linops.GGNOperator`) with every feasible Lanczos
   strategy, with wall time, matvecs, seconds per matvec and peak memory
   (``torch.cuda.max_memory_allocated``, reset before each run); the agreement of the
   strategies, :math:`\max_i|\lambda_i - \lambda_i^\text{ref}| / \max_i|\lambda_i^\text{ref}|`
   against the best strategy that ran (full > selective > partial > none); and of the
   bf16 run against a float32 run of the same (bf16-rounded) weights where float32 fits.
   The models have the shapes of the named ones (widths, depths, heads, vocabularies,
   tied embeddings); numerical details that change no shape (RoPE base, norm epsilon) are
   the config classes' defaults.

Memory. Before each Lanczos run the memory it needs is estimated as

.. math::

    M = M_\text{now} + P + S(\text{strategy}, m),

with :math:`M_\text{now}` the memory allocated (weights, cached product state),
:math:`P` the measured peak a cached product adds (a warm-up product), and :math:`S` the
solver's own tensors for :math:`m` iterations, read off the code of
:mod:`curvops.solvers.lanczos` (:func:`solver_bytes_estimate`): float32 working vectors
(five for ``none``, four with a basis; float64 for a float64 basis), the basis in blocks of
:math:`\min(m+1, 64)` rows, the float32 upcast of up to 64 rows of a bf16 basis during a
product with the basis, and selective's cache of good Ritz vectors. A basis strategy runs
with the largest :math:`m` that fits ``total memory`` (up to the model's cap) and is
``skipped: memory`` when fewer than :math:`k + 10` iterations fit; ``none`` is always
tried in the main dtype; the float32 comparison run is ``skipped: memory`` when its
estimate (weights and product scaled by 2, plus its solver) exceeds the device. A CUDA out-of-memory error is caught and recorded as ``OOM`` with the memory
figures, and the run goes on.

Time. Each step is given a share of what is left of the budget; a Lanczos run gets at most
as many iterations as its share allows at the measured seconds per product, and is
``skipped: budget`` below :math:`k + 10`. A watchdog thread ends the process at the
deadline (exit code 3) after writing the JSON with the step in flight marked
``timeout: budget``, so a killed run still leaves every finished figure.

Output: ``DIR/gpu-<device-name-slug>.json`` (``-smoke`` appended in smoke mode) with the
device, the versions of python/torch/CUDA/transformers/cupy/scipy/numpy, the settings and
every figure; a compact Markdown summary on stdout.
"""  # noqa: E501 (the install command above is one line, as it is typed)

from __future__ import annotations

import time

_T_PROCESS = time.monotonic()  # before the heavy imports: the budget counts them too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import importlib  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..linops import GGNOperator  # noqa: E402
from ..linops.hf import hf_objective  # noqa: E402
from ..solvers import LanczosConfig, lanczos  # noqa: E402
from .crosscheck import (  # noqa: E402
    DEFAULT_METHODS,
    METHODS,
    cross_check,
    peak_memory,
    relative_error,
)
from .report import compact_markdown_table  # noqa: E402
from .zoo import ZooProblem, build, token_data  # noqa: E402

__all__ = ["LadderSpec", "main", "solver_bytes_estimate"]

SCHEMA = "curvops.gpu_run/1"
EXIT_TIMEOUT = 3
_GiB = 2**30
_STRATEGY_PREFERENCE = ("full", "selective", "partial", "none")
_BASIS_BLOCK_ROWS = 64  # KrylovBasis: rows per block (one block of min(m+1, 64) rows first)
# Float32 rows of a low-precision basis alive at once: full/selective upcast 32-row chunks
# and the next chunk is made while the last is still referenced (2 x 32); partial upcasts
# one run of consecutive rows of a block (<= 64).
_UPCAST_ROWS = {"full": 64, "selective": 64, "partial": 64}


# --- settings -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LadderSpec:
    """One model of the scale ladder.

    Attributes:
        name: Row label.
        family: ``"gpt2"``, ``"qwen2"`` or ``"llama"`` (the transformers classes).
        config: Keyword arguments of the transformers config class.
        dtype: The dtype of the main runs.
        strategies: Lanczos strategies of the main runs, in the order they run.
        compare_dtype: The dtype of the comparison run of the same weights (None: none).
        compare_strategy: The strategy of the comparison run.
        max_iters: Iteration cap of every run (lowered to fit memory and time).
        weight: Share of the ladder's time budget.
    """

    name: str
    family: str
    config: dict[str, Any]
    dtype: torch.dtype
    strategies: tuple[str, ...]
    compare_dtype: torch.dtype | None = None
    compare_strategy: str = "none"
    max_iters: int = 150
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that shapes a run (recorded in the JSON)."""

    smoke: bool
    budget_s: float
    seed: int
    k: int
    batch: int
    seq: int
    reps: int
    crosscheck_share: float
    matvec_share: float
    crosscheck_cases: tuple[tuple[str, str, tuple[str, ...]], ...]
    matvec_model: str
    ladder: tuple[LadderSpec, ...]
    tol: dict[str, float]
    sections: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        out = dataclasses.asdict(self)
        out["ladder"] = [dict(dataclasses.asdict(s), dtype=_dname(s.dtype),
                              compare_dtype=_dname(s.compare_dtype)) for s in self.ladder]
        return out


_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
_GPU_LADDER = (
    LadderSpec("gpt2-small-124m", "gpt2",
               dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                    use_cache=False, **_NO_DROPOUT),
               torch.bfloat16, ("full", "selective", "partial", "none"),
               compare_dtype=torch.float32, compare_strategy="full", max_iters=150, weight=1.0),
    LadderSpec("qwen2.5-1.5b-shape", "qwen2",
               dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                    max_position_embeddings=32768, tie_word_embeddings=True,
                    use_sliding_window=False, use_cache=False),
               torch.bfloat16, ("none", "full", "selective", "partial"),
               compare_dtype=torch.float32, compare_strategy="none", max_iters=150, weight=1.6),
    LadderSpec("llama-7b-shape", "llama",
               dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                    max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False),
               torch.bfloat16, ("none",), compare_dtype=torch.float32, compare_strategy="none",
               max_iters=150, weight=1.4),
)
# Smoke: the same code on tiny shapes, float32 (bf16 is emulated and ~60x slower on a CPU)
# except one tiny model that runs bf16 against float32 as the GPU ladder does.
_SMOKE_LADDER = (
    LadderSpec("gpt2-smoke", "gpt2",
               dict(n_embd=16, n_layer=1, n_head=2, vocab_size=48, n_positions=16,
                    use_cache=False, **_NO_DROPOUT),
               torch.float32, ("full", "selective", "partial", "none"), max_iters=80),
    LadderSpec("qwen2-smoke", "qwen2",
               dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=48,
                    max_position_embeddings=32, tie_word_embeddings=True,
                    use_sliding_window=False, use_cache=False),
               torch.float32, ("none", "full"), max_iters=80),
    LadderSpec("llama-smoke-bf16", "llama",
               dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, vocab_size=16,
                    max_position_embeddings=16, tie_word_embeddings=False, use_cache=False),
               torch.bfloat16, ("full", "none"), compare_dtype=torch.float32,
               compare_strategy="full", max_iters=60),
)
_GPU_CROSSCHECK = (
    ("mlp", "float64", ("ggn", "hessian")),
    ("gpt2-tiny", "float64", ("ggn",)),
    ("llama-tiny", "float32", ("ggn",)),
    ("gpt2-small", "float32", ("ggn",)),
    ("cnn", "float64", ("ggn",)),
    ("mlp", "float32", ("ggn",)),
    ("mlp", "float64", ("ef",)),
)
_SMOKE_CROSSCHECK = (("mlp", "float64", ("ggn",)),)
SECTIONS = ("crosscheck", "matvec_cost", "scale_ladder")


def make_settings(args: argparse.Namespace) -> Settings:
    """The settings of a GPU run or of a smoke run, with the command line's overrides."""
    smoke = bool(args.smoke)
    ladder = _SMOKE_LADDER if smoke else _GPU_LADDER
    if args.models:
        wanted = set(args.models.split(","))
        unknown = wanted - {s.name for s in ladder}
        if unknown:
            raise SystemExit(f"unknown ladder model(s) {sorted(unknown)}; "
                             f"choose from {[s.name for s in ladder]}")
        ladder = tuple(s for s in ladder if s.name in wanted)
    sections = tuple(args.sections.split(",")) if args.sections else SECTIONS
    bad = set(sections) - set(SECTIONS)
    if bad:
        raise SystemExit(f"unknown section(s) {sorted(bad)}; choose from {SECTIONS}")
    return Settings(
        smoke=smoke, budget_s=float(args.budget_s), seed=int(args.seed),
        k=int(args.k or (4 if smoke else 10)), batch=int(args.batch or (2 if smoke else 4)),
        seq=int(args.seq or (8 if smoke else 128)), reps=int(args.reps or (3 if smoke else 15)),
        crosscheck_share=0.2, matvec_share=0.08,
        crosscheck_cases=_SMOKE_CROSSCHECK if smoke else _GPU_CROSSCHECK,
        matvec_model="gpt2-tiny" if smoke else "gpt2-10m", ladder=ladder,
        # Requested tolerances; the solver raises them to its precision floor (bf16: 2^-7).
        tol={"bfloat16": 1e-3, "float32": 1e-6 if smoke else 1e-5, "float64": 1e-10},
        sections=sections,
    )


# --- small helpers --------------------------------------------------------------------------
def _dname(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _plain(x: Any) -> Any:
    """JSON-ready copy: numpy → Python, NaN → None, ±inf → "inf"/"-inf", dtypes → names."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return _plain(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, torch.dtype):
        return _dname(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _free(device: torch.device) -> None:
    """Give memory back between steps (the caller has dropped its references).

    On CUDA: collect reference cycles (a full ``gc`` pass, ~0.2 s with transformers loaded)
    and return the cached blocks to the device. On a CPU, reference counting has freed the
    tensors already and the pass would only cost time.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(err, MemoryError))


def _memory_figures(device: torch.device) -> dict[str, Any]:
    """Allocated, peak, reserved, free and total device memory, in bytes (None on a CPU)."""
    if device.type != "cuda":
        return {"allocated_bytes": None, "max_allocated_bytes": None, "free_bytes": None,
                "total_bytes": None}
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated_bytes": torch.cuda.memory_allocated(device),
            "max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "reserved_bytes": torch.cuda.memory_reserved(device),
            "free_bytes": int(free), "total_bytes": int(total)}


def _error_record(err: BaseException, device: torch.device) -> dict[str, Any]:
    """``OOM`` (with the memory figures at the failure) or ``error``, and the message."""
    first = str(err).strip().splitlines()[0][:400] if str(err).strip() else ""
    if _is_oom(err):
        return {"status": "OOM", "error": f"{type(err).__name__}: {first}",
                "memory_at_failure": _memory_figures(device)}
    return {"status": "error", "error": f"{type(err).__name__}: {first}"}


@contextlib.contextmanager
def _measured(device: torch.device) -> Iterator[dict[str, Any]]:
    """Wall time and peak memory of a block.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at entry
    (absolute, and above the allocation at entry). CPU: the resident-set peak above entry,
    sampled (:func:`curvops.validation.crosscheck.peak_memory`, a lower bound).
    """
    out: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            yield out
        finally:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            out.update(seconds=time.perf_counter() - t0, allocated_before_bytes=before,
                       max_memory_allocated_bytes=peak, peak_above_before_bytes=peak - before)
        return
    t0 = time.perf_counter()
    with peak_memory(device) as mem:
        try:
            yield out
        finally:
            out["seconds"] = time.perf_counter() - t0
    out["peak_above_before_bytes"] = int(mem["peak_mb"] * 2**20)
    out["max_memory_allocated_bytes"] = None


def _move(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_move(t, device) for t in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def _on_device(problem: ZooProblem, device: torch.device) -> ZooProblem:
    """The zoo problem with its model and data on ``device`` (the model is moved in place)."""
    return dataclasses.replace(problem, model=problem.model.to(device),
                               data=_move(problem.data, device))


def _cupy_problem(device: torch.device) -> str | None:
    """Why the cupy view cannot be used here (None: it can)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import cupy  # optional: the gpu extra

        if not cupy.cuda.is_available():
            return "cupy sees no CUDA device"
    except Exception as err:  # ImportError, or cupy's own CUDA runtime errors
        return f"cupy unavailable ({type(err).__name__}: {err})"
    return None


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device name and memory, and the versions of everything the run uses."""
    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda_torch_built_with": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": _version("transformers"), "scipy": _version("scipy"),
        "numpy": np.__version__, "cupy": _version("cupy"), "curvops": None,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    with contextlib.suppress(Exception):
        env["curvops"] = importlib.metadata.version("curvops")
    if env["cupy"] is not None:
        with contextlib.suppress(Exception):
            import cupy  # optional: the gpu extra

            env["cupy_cuda_runtime"] = int(cupy.cuda.runtime.runtimeGetVersion())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = {"name": props.name, "total_memory_bytes": int(props.total_memory),
                         "capability": f"{props.major}.{props.minor}",
                         "multiprocessors": props.multi_processor_count}
        with contextlib.suppress(Exception):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,memory.total,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            env["nvidia_smi"] = smi.stdout.strip() or None
    else:
        env["device"] = {"name": "cpu", "total_memory_bytes": None, "capability": None,
                         "processor": platform.processor() or platform.machine()}
    return env


# --- the record: one JSON file, written after every step; a watchdog for the deadline ------
class Recorder:
    """The run's results, written to ``path`` after every step (atomically).

    Every change goes through :meth:`change` under one lock, so the watchdog can write a
    consistent file at the deadline while the main thread is in the middle of a step.
    """

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.lock = threading.RLock()

    @contextlib.contextmanager
    def change(self) -> Iterator[dict[str, Any]]:
        """Mutate ``data`` under the lock; the file is rewritten afterwards."""
        with self.lock:
            yield self.data
            self.write()

    def write(self) -> None:
        """Write the JSON (temporary file, then rename: a reader never sees half a file)."""
        with self.lock:
            self.data["elapsed_s"] = time.monotonic() - self.data["_t0"]
            text = json.dumps(self.snapshot(), indent=1)
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the data."""
        return _plain({k: v for k, v in self.data.items() if k != "_t0"})

    def begin(self, record: dict[str, Any]) -> None:
        """Mark ``record`` (already placed in ``data``) as in flight."""
        with self.change():
            record["status"] = "running"

    def end(self, record: dict[str, Any], **updates: Any) -> None:
        """Finish ``record`` with ``updates``."""
        with self.change():
            record.update(updates)

    def mark_running(self, status: str) -> None:
        """Give every record still ``running`` the status ``status`` (at the deadline)."""
        def walk(x: Any) -> None:
            if isinstance(x, dict):
                if x.get("status") == "running":
                    x["status"] = status
                for v in list(x.values()):
                    walk(v)
            elif isinstance(x, list):
                for v in list(x):
                    walk(v)

        walk(self.data)


class Watchdog(threading.Thread):
    """At the deadline: mark the step in flight ``timeout: budget``, write, print, exit 3."""

    def __init__(self, deadline: float, recorder: Recorder, on_expire: Callable[[], None]):
        super().__init__(daemon=True, name="gpu_run-watchdog")
        self.deadline, self.recorder, self.on_expire = deadline, recorder, on_expire
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(max(0.0, min(1.0, self.deadline - time.monotonic()))):
            if time.monotonic() >= self.deadline:
                break
        if self.stopped.is_set():
            return
        got = self.recorder.lock.acquire(timeout=10.0)
        try:
            for _ in range(3):  # the main thread may be changing a dict outside the lock
                try:
                    self.recorder.mark_running("timeout: budget")
                    self.recorder.data["status"] = "timeout: budget"
                    self.recorder.write()
                    self.on_expire()
                    break
                except RuntimeError:
                    time.sleep(0.05)
        finally:
            if got:
                self.recorder.lock.release()
            sys.stdout.flush()
            os._exit(EXIT_TIMEOUT)

    def stop(self) -> None:
        """Stand down (the run finished in time)."""
        self.stopped.set()


@dataclasses.dataclass
class Run:
    """What every section needs: settings, device, budget, the record."""

    settings: Settings
    device: torch.device
    t0: float
    recorder: Recorder

    @property
    def deadline(self) -> float:
        """Monotonic time at which the budget is spent."""
        return self.t0 + self.settings.budget_s

    def remaining(self) -> float:
        """Seconds left of the budget."""
        return self.deadline - time.monotonic()

    def say(self, text: str) -> None:
        """One progress line, flushed (the device tool shows the tail of stdout)."""
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", flush=True)


# --- section 1: the cross-check on small models -----------------------------------------------
def section_crosscheck(run: Run, section: dict[str, Any], end_time: float) -> None:
    """Cross-check small zoo models on the device with every default method.

    Each (model, dtype, operator) is one :func:`cross_check`; its rows (method,
    eigenvalues, reference, rel_error, tolerance, status, matvecs, seconds, peak_mb, note)
    go into ``section["rows"]`` as the cross-check made them, labelled with ``rung``
    ``"gpu-<dtype>"``. A case whose expected time (the longest case so far, 5 s before the
    first) does not fit before ``end_time`` is recorded ``skipped: budget``.
    """
    s = run.settings
    cases = section.setdefault("cases", [])
    section.setdefault("rows", [])
    context = {"float64": {"lanczos_tol": 1e-10}, "float32": {"lanczos_tol": 1e-8}}
    longest = 5.0
    for model_name, dtype_name, operators in s.crosscheck_cases:
        for op_name in operators:
            case = {"model": model_name, "dtype": dtype_name, "operator": op_name}
            with run.recorder.change():
                cases.append(case)
            if time.monotonic() + longest > end_time:
                run.recorder.end(case, status="skipped: budget",
                                 note=f"expected ~{longest:.0f} s, "
                                      f"{max(0.0, end_time - time.monotonic()):.0f} s left")
                continue
            run.recorder.begin(case)
            t0 = time.perf_counter()
            try:
                problem = _on_device(build(model_name, _dtype(dtype_name), s.seed), run.device)
                op = problem.operator(op_name)
                result = cross_check(
                    op, min(5, op.shape[0] - 1), methods=DEFAULT_METHODS, problem=problem,
                    labels={"rung": f"gpu-{dtype_name}", "model": model_name,
                            "device": str(run.device)},
                    operator_name=op_name, seed=s.seed, record_history=False,
                    **context[dtype_name],
                )
                rows = result.rows
                counts = {st: sum(r["status"] == st for r in rows)
                          for st in sorted({r["status"] for r in rows})}
                updates = {"status": "done", "passed": result.passed, "counts": counts,
                           "reference": result.reference.source if result.reference else None}
            except Exception as err:  # one broken case must not end the section
                rows = []
                updates = _error_record(err, run.device)
            finally:
                problem = op = result = None
                _free(run.device)
            seconds = time.perf_counter() - t0
            longest = max(longest, seconds)
            with run.recorder.change():
                section["rows"].extend(rows)
            run.recorder.end(case, seconds=seconds, **updates)
            run.say(f"crosscheck {model_name}/{dtype_name}/{op_name}: {case['status']} "
                    f"{case.get('counts', '')} ({seconds:.1f} s)")


# --- section 2: the cost of one product through each view -------------------------------------
def _timed(fn: Callable[[], Any], run: Run) -> tuple[float, float | None, Any]:
    """Wall seconds (synchronised before and after), CUDA-event seconds, and the result."""
    if run.device.type != "cuda":
        t0 = time.perf_counter()
        y = fn()
        return time.perf_counter() - t0, None, y
    torch.cuda.synchronize(run.device)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    y = fn()
    stop.record()
    torch.cuda.synchronize(run.device)
    return time.perf_counter() - t0, start.elapsed_time(stop) / 1e3, y


def _to_numpy(y: Any) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        return y.detach().double().cpu().numpy()
    if isinstance(y, np.ndarray):
        return y.astype(np.float64)
    import cupy  # optional (the gpu extra); only cupy arrays are left

    return cupy.asnumpy(y).astype(np.float64)


def section_matvec_cost(run: Run, section: dict[str, Any], end_time: float) -> None:
    """Time one GGN product (and one 8-column ``matmat``) through torch, cupy and scipy.

    All contenders multiply the same vectors; each round visits them in a new order drawn
    from a seeded generator, each timed warm (two products of each before the rounds). The
    scipy view is what a host-side numpy user gets: its input and output cross the PCIe bus
    on every product. ``max_rel_diff`` checks the three give the same product.
    """
    s = run.settings
    problem = _on_device(build(s.matvec_model, torch.float32, s.seed), run.device)
    op = problem.operator("ggn")
    n = int(op.shape[0])
    cupy_reason = _cupy_problem(run.device)
    gen = torch.Generator().manual_seed(s.seed)
    X_host = torch.randn(n, 8, generator=gen, dtype=torch.float32)
    x_t, X_t = X_host[:, 0].contiguous().to(run.device), X_host.to(run.device)
    x_np, X_np = X_host[:, 0].numpy().copy(), X_host.numpy().copy()
    host = op.to_scipy()
    contenders: dict[str, dict[str, Callable[[], Any]]] = {
        "matvec": {"torch": lambda: op @ x_t, "scipy": lambda: host.matvec(x_np)},
        "matmat8": {"torch": lambda: op.matmat(X_t), "scipy": lambda: host.matmat(X_np)},
    }
    if cupy_reason is None:
        import cupy  # optional: the gpu extra

        view = op.to_cupy()
        x_cp, X_cp = cupy.asarray(x_np), cupy.asarray(X_np)
        contenders["matvec"]["cupy"] = lambda: view.matvec(x_cp)
        contenders["matmat8"]["cupy"] = lambda: view.matmat(X_cp)
    with run.recorder.change():
        section.update(model=s.matvec_model, n=n, dtype="float32", operator="ggn",
                       cupy="ok" if cupy_reason is None else f"skipped: no CUDA/cupy "
                                                              f"({cupy_reason})",
                       timing="wall: perf_counter between torch.cuda.synchronize calls; "
                              "event: CUDA events on torch's current stream")
    for kind, fns in contenders.items():
        outputs = {}
        for name, fn in fns.items():  # warm-up: cache build, cuBLAS handles, cupy kernels
            for _ in range(2):
                _, _, y = _timed(fn, run)
            outputs[name] = _to_numpy(y)
        ref = outputs["torch"]
        scale = float(np.abs(ref).max()) or 1.0
        diffs = {name: float(np.abs(o - ref).max() / scale) for name, o in outputs.items()
                 if name != "torch"}
        per_round = sum(_timed(fn, run)[0] for fn in fns.values())
        left = end_time - time.monotonic()
        reps = max(1, min(s.reps, int(left / (2 * max(per_round, 1e-6)))))
        wall: dict[str, list[float]] = {name: [] for name in fns}
        event: dict[str, list[float]] = {name: [] for name in fns}
        rng = np.random.default_rng(s.seed)
        names = list(fns)
        for _ in range(reps):
            for i in rng.permutation(len(names)):
                w, e, _ = _timed(fns[names[i]], run)
                wall[names[i]].append(w)
                if e is not None:
                    event[names[i]].append(e)
        med = {name: float(np.median(v)) for name, v in wall.items()}
        entry = {
            "reps": reps,
            "wall_s_median": med,
            "event_s_median": {name: float(np.median(v)) for name, v in event.items() if v},
            "wall_s_all": wall,
            "ratios_wall": {f"{name}_over_torch": med[name] / med["torch"] for name in med
                            if name != "torch"},
            "max_rel_diff_vs_torch": diffs,
            "host_bytes_per_product_scipy": 2 * X_np[:, : 1 if kind == "matvec" else 8].nbytes,
        }
        if "cupy" not in fns:
            entry["cupy"] = section["cupy"]
        with run.recorder.change():
            section[kind] = entry
            section["cache"] = _plain(getattr(op, "cache_info", None))
        run.say(f"matvec_cost {kind}: " + ", ".join(f"{k} {v * 1e3:.2f} ms"
                                                     for k, v in med.items()))
    view = host = op = problem = None
    _free(run.device)


# --- section 3: the scale ladder --------------------------------------------------------------
def solver_bytes_estimate(n: int, strategy: str, op_dtype: torch.dtype,
                          basis_dtype: torch.dtype, iters: int, k: int) -> dict[str, int]:
    r"""Bytes the Lanczos solver itself allocates (not the operator's), read off its code.

    * ``none``: five working vectors (float32; float64 for a float64 basis) live through
      the run — the normalised start vector (held by :func:`lanczos`), its rounding to the
      basis dtype (kept for a second pass), :math:`v_\text{prev}`, :math:`v` and
      :math:`w` — plus one vector of the basis dtype while the next vector is rounded;
    * ``full``/``selective``/``partial``: the start vector, :math:`v`, :math:`v_\text{prev}`
      and :math:`w` (four working vectors); the basis in blocks of :math:`\min(m+1, 64)`
      rows of the basis dtype; for a low-precision basis, up to 64 rows upcast to float32
      at once (two live 32-row chunks for full/selective, one run of a block for partial);
      selective's cache of good Ritz vectors, working vectors in 16-row blocks: assumed
      :math:`k + 2` of them (one block for :math:`k \le 14`) plus :math:`k + 2` being
      formed — good Ritz vectors at the other end of the spectrum add blocks;
    * the product's input, cast to the operator's dtype when that differs from the working
      dtype; the start vector is drawn and normalised (two copies) before anything else.

    Args:
        n: Operator size.
        strategy: ``full``, ``selective``, ``partial`` or ``none``.
        op_dtype: The operator's dtype.
        basis_dtype: The Krylov vectors' storage dtype.
        iters: Iteration cap :math:`m`.
        k: Wanted eigenvalues.

    Returns:
        The parts and their ``total``, in bytes.
    """
    work = 8 if basis_dtype == torch.float64 else 4
    b_c = torch.empty(0, dtype=basis_dtype).element_size()
    b_op = torch.empty(0, dtype=op_dtype).element_size()
    cast = n * b_op if b_op != work else 0
    parts = {"start_vector": 2 * n * work, "input_cast": cast}
    if strategy == "none":
        parts["vectors"] = 5 * n * work + n * b_c
    else:
        rows = min(iters + 1, _BASIS_BLOCK_ROWS)
        parts["basis"] = math.ceil((iters + 1) / rows) * rows * n * b_c
        parts["upcast"] = 0 if b_c == work else min(_UPCAST_ROWS[strategy], iters) * n * work
        parts["vectors"] = 4 * n * work
        # The cache of good Ritz vectors grows in 16-row blocks of working vectors; assumed:
        # the wanted k and two more (one block for k <= 14), plus those being formed.
        cache_rows = 16 * math.ceil((k + 2) / 16) + k + 2
        parts["selective_cache"] = cache_rows * n * work if strategy == "selective" else 0
    # The verification: the k Ritz vectors, the relation's prediction of their products and
    # the products themselves ("none": vectors and products of the second pass).
    parts["verification"] = 3 * k * n * work + k * n * b_op
    parts["total"] = max(parts["start_vector"], sum(v for key, v in parts.items()
                                                    if key != "start_vector"))
    return parts


def _fit_iters(n: int, strategy: str, op_dtype: torch.dtype, cap: int, k: int,
               available: float) -> int:
    """The largest iteration cap ``<= cap`` whose solver estimate fits ``available`` bytes."""
    lo, hi = 0, cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if solver_bytes_estimate(n, strategy, op_dtype, op_dtype, mid, k)["total"] <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _iters_in_time(seconds: float, n: int, strategy: str, dtype: torch.dtype,
                   product_s: float, device: torch.device, cap: int) -> int:
    r"""The most iterations (``<= cap``) expected to finish in ``seconds``.

    Iteration :math:`j` costs one product (:math:`1.2\times` the measured one, for the
    vector updates) plus, for ``full``, two Gram–Schmidt passes over :math:`j` basis rows,
    each reading them twice (and, for a low-precision basis, writing and reading their
    float32 upcast): :math:`4 j n (b + 8)` bytes at an assumed 2 TB/s on a GPU, 10 GB/s on
    a CPU; selective and partial touch the basis far less (a quarter of that is assumed).
    """
    if seconds <= 0:
        return 0
    b = torch.empty(0, dtype=dtype).element_size()
    row_bytes = 4 * n * (b + (8 if b < 4 else 0))
    bandwidth = 2e12 if device.type == "cuda" else 1e10
    per_row = {"full": 1.0, "selective": 0.25, "partial": 0.25, "none": 0.0}[strategy]
    per_row *= row_bytes / bandwidth
    step = 1.2 * max(product_s, 1e-5)
    # m steps cost m * step + per_row * m^2 / 2.
    if per_row == 0.0:
        m = seconds / step
    else:
        m = (-step + math.sqrt(step * step + 2.0 * per_row * seconds)) / per_row
    return int(min(cap, max(0.0, m)))


def _lm_classes(family: str) -> tuple[Any, Any]:
    import transformers  # optional: the hf extra

    transformers.utils.logging.set_verbosity_error()
    return {
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[family]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def count_parameters(spec: LadderSpec) -> int:
    """Parameters of ``spec``'s model, counted on the meta device (nothing allocated)."""
    config_cls, model_cls = _lm_classes(spec.family)
    with torch.device("meta"):
        model = model_cls(config_cls(**spec.config))
    return sum(p.numel() for p in model.parameters())


def build_lm(spec: LadderSpec, device: torch.device, seed: int) -> torch.nn.Module:
    """``spec``'s model with a seeded random init, built directly on ``device`` in its dtype.

    The global RNG (CPU and the device's) is forked and restored: building changes no caller
    state. On a CUDA device the weights are drawn by the device's generator, so the same
    seed gives the same model on the same kind of device.
    """
    config_cls, model_cls = _lm_classes(spec.family)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device), \
            _default_dtype(spec.dtype):
        torch.manual_seed(seed)
        model = model_cls(config_cls(**spec.config))
    return model.eval()


def _make_operator(model: torch.nn.Module, data: list[Any]) -> tuple[Any, str]:
    """``GGNOperator`` with the HF objective; if the two-pass determinism check fails on this
    device, again without it (and say so: it is a finding, not a reason to lose the case)."""
    try:
        return GGNOperator(model, hf_objective(model, normalization="token"), data), ""
    except ValueError as err:
        if "differ between two identical passes" not in str(err):
            raise
        return (GGNOperator(model, hf_objective(model, normalization="token"), data,
                            check_deterministic=False),
                "determinism check failed on this device (outputs of two identical passes "
                "differ); operator built with check_deterministic=False")


def _warm_products(op: Any, run: Run) -> dict[str, Any]:
    """Two products with a seeded vector: the first builds the cache, the second is timed
    as a Lanczos step sees it; the second's peak above its start is ``P``."""
    n = int(op.shape[0])
    gen = torch.Generator(device=run.device).manual_seed(run.settings.seed + 7)
    x = torch.randn(n, generator=gen, device=run.device, dtype=op.dtype)
    with _measured(run.device) as first:
        y = op @ x
        del y
    with _measured(run.device) as second:
        y = op @ x
        del y
    del x
    out = {"first_s": first["seconds"], "cached_s": second["seconds"],
           "first_peak_above_before_bytes": first["peak_above_before_bytes"],
           "cached_peak_above_before_bytes": second["peak_above_before_bytes"],
           "cache": _plain(getattr(op, "cache_info", None))}
    _free(run.device)
    return out


def _lanczos_case(run: Run, spec: LadderSpec, model_rec: dict[str, Any], op: Any,
                  dtype: torch.dtype, strategy: str, product: dict[str, Any],
                  allot_s: float) -> None:
    """One Lanczos run with the memory and time checks; appends its record."""
    s = run.settings
    n = int(op.shape[0])
    case: dict[str, Any] = {"model": spec.name, "dtype": _dname(dtype), "strategy": strategy,
                            "n": n, "k": s.k}
    with run.recorder.change():
        model_rec["cases"].append(case)
    min_iters = min(s.k + 10, n - 1)
    cap = min(spec.max_iters, n - 1)
    # Memory: the iteration cap that fits (basis strategies), or the plain estimate.
    mem_note = ""
    if run.device.type == "cuda":
        total = torch.cuda.mem_get_info(run.device)[1]
        now = torch.cuda.memory_allocated(run.device)
        usable = 0.97 * total - now - product["cached_peak_above_before_bytes"]
        if strategy != "none":
            fit = _fit_iters(n, strategy, dtype, cap, s.k, usable)
            est = solver_bytes_estimate(n, strategy, dtype, dtype, max(fit, min_iters), s.k)
            case["memory_estimate"] = dict(est, allocated_now=now, product_peak=product[
                "cached_peak_above_before_bytes"], total_device=total, iters_that_fit=fit)
            if fit < min_iters:
                run.recorder.end(case, status="skipped: memory",
                                 note=f"the basis fits {fit} iterations (< {min_iters}): needs "
                                      f"{(now + product['cached_peak_above_before_bytes'] + est['total']) / _GiB:.1f} "  # noqa: E501
                                      f"GiB of {total / _GiB:.1f} GiB")
                return
            if fit < cap:
                mem_note = f"iterations capped at {fit} by memory"
            cap = fit
        else:
            est = solver_bytes_estimate(n, strategy, dtype, dtype, cap, s.k)
            need = now + product["cached_peak_above_before_bytes"] + est["total"]
            case["memory_estimate"] = dict(est, allocated_now=now, product_peak=product[
                "cached_peak_above_before_bytes"], total_device=total, fits=need <= 0.97 * total)
    # Time: the start vector (drawn on the CPU), the products, the reorthogonalization.
    start_s = n / 3e8 if run.device.type == "cuda" else 0.0
    avail_s = min(allot_s, run.remaining() - 5.0) - start_s - 2.0
    budget_iters = _iters_in_time(avail_s, n, strategy, dtype, product["cached_s"],
                                  run.device, cap)
    if budget_iters < min_iters:
        run.recorder.end(case, status="skipped: budget",
                         note=f"{budget_iters} iterations fit the time left ({allot_s:.0f} s "
                              f"allotted, {product['cached_s']:.3g} s per product)")
        return
    iters = min(cap, budget_iters)
    notes = [t for t in (mem_note, f"iterations capped at {iters} by time"
                         if budget_iters < cap else "") if t]
    tol = s.tol[_dname(dtype)]
    config = LanczosConfig(k=s.k, max_iters=iters, tol=tol, reorth=strategy, seed=s.seed,
                           return_eigenvectors=False, record_history=False,
                           measure_orthogonality=n <= 200_000_000)
    with run.recorder.change():
        case.update(status="running", max_iters=iters, tol_requested=tol)
    run.say(f"ladder {spec.name} {_dname(dtype)} {strategy}: max_iters {iters}")
    res = None
    mem: dict[str, Any] = {}
    try:
        with _measured(run.device) as mem:
            res = lanczos(op, config=config)
        updates: dict[str, Any] = {
            "status": "ok",
            "eigenvalues": [float(v) for v in res.eigenvalues],
            "converged": [bool(c) for c in res.converged],
            "all_converged": bool(res.all_converged),
            "residual_norms": [float(r) for r in res.residual_norms],
            "iterations": int(res.iterations), "matvecs": int(res.matvecs),
            "seconds": mem["seconds"], "seconds_matvec": float(res.seconds_matvec),
            "seconds_other": float(res.seconds_other),
            "seconds_per_matvec": float(res.seconds_matvec) / max(1, int(res.matvecs)),
            "max_memory_allocated_bytes": mem["max_memory_allocated_bytes"],
            "peak_above_before_bytes": mem["peak_above_before_bytes"],
            "solver_peak_bytes": int(res.peak_memory_bytes),
            "spurious_removed": int(res.spurious_removed),
            "orthogonality_loss": float(res.orthogonality_loss),
            "rayleigh_ritz": bool(res.rayleigh_ritz), "tol_used": float(res.tol_used),
            "breakdowns": int(res.breakdowns), "notes": notes + list(res.notes),
        }
    except Exception as err:
        updates = dict(_error_record(err, run.device), notes=notes,
                       seconds=mem.get("seconds"),
                       max_memory_allocated_bytes=mem.get("max_memory_allocated_bytes"))
    res = None
    _free(run.device)
    run.recorder.end(case, **updates)
    lam = case.get("eigenvalues") or [None]
    run.say(f"ladder {spec.name} {_dname(dtype)} {strategy}: {case['status']} "
            f"λ1={lam[0]} mv={case.get('matvecs')} {case.get('seconds') or 0:.1f} s")


def _agreement(cases: list[dict[str, Any]], spec: LadderSpec, k: int) -> dict[str, Any]:
    """Strategies against the best one that ran; the comparison dtype against each run.

    The tolerance is the cross-check's for the Lanczos methods in the main dtype
    (``METHODS["lanczos-full"].tolerance``: 1e-4 for float32, 2e-2 for bfloat16).
    """
    main = [c for c in cases if c["dtype"] == _dname(spec.dtype) and c["status"] == "ok"]
    ref = next((c for name in _STRATEGY_PREFERENCE for c in main if c["strategy"] == name),
               None)
    tol = METHODS["lanczos-full"].tolerance(spec.dtype)
    out: dict[str, Any] = {"tolerance": tol, "reference": ref["strategy"] if ref else None,
                           "strategies": []}
    for c in main:
        if c is ref or ref is None:
            continue
        rel = relative_error(np.asarray(c["eigenvalues"]), np.asarray(ref["eigenvalues"]), k)
        c["rel_diff_vs_reference"] = rel
        out["strategies"].append({
            "strategy": c["strategy"], "rel_error": rel, "agree": rel <= tol,
            "both_converged": bool(c["all_converged"] and ref["all_converged"])})
    if spec.compare_dtype is not None:
        other = next((c for c in cases if c["dtype"] == _dname(spec.compare_dtype)
                      and c["status"] == "ok"), None)
        out["dtype_reference"] = (f"{_dname(spec.compare_dtype)} {other['strategy']}"
                                  if other else None)
        out["dtype"] = []
        for c in main if other is not None else []:
            rel = relative_error(np.asarray(c["eigenvalues"]), np.asarray(other["eigenvalues"]),
                                 k)
            c["rel_diff_vs_compare_dtype"] = rel
            out["dtype"].append({"strategy": c["strategy"], "rel_error": rel,
                                 "agree": rel <= tol})
    return out


def _ladder_model(run: Run, spec: LadderSpec, rec: dict[str, Any], end_time: float) -> None:
    """Build one model, run its strategies, then the comparison dtype; record everything."""
    s = run.settings
    n_params = count_parameters(spec)
    weight_bytes = n_params * torch.empty(0, dtype=spec.dtype).element_size()
    with run.recorder.change():
        rec.update(n_params=n_params, weights_bytes=weight_bytes)
    n_cases = len(spec.strategies) + (spec.compare_dtype is not None)
    if run.device.type == "cuda" and weight_bytes > 0.9 * torch.cuda.mem_get_info()[1]:
        run.recorder.end(rec, status="skipped: memory",
                         note=f"weights alone need {weight_bytes / _GiB:.1f} GiB")
        return
    model = op = data = None
    try:
        run.recorder.begin(rec)
        with _measured(run.device) as built:
            model = build_lm(spec, run.device, s.seed)
        vocab = int(model.config.vocab_size)
        data = _move(token_data(s.batch, s.seq, vocab, seed=s.seed + 1), run.device)
        with _measured(run.device) as made:
            op, note = _make_operator(model, data)
        product = _warm_products(op, run)
        with run.recorder.change():
            rec.update(build_s=built["seconds"], operator_s=made["seconds"],
                       operator_note=note, product={_dname(spec.dtype): product},
                       memory_after_build=_memory_figures(run.device))
        run.say(f"ladder {spec.name}: {_count_text(n_params)} parameters, built in "
                f"{built['seconds']:.1f} s, product {product['cached_s'] * 1e3:.1f} ms")
        done = 0
        for strategy in spec.strategies:
            allot = (end_time - time.monotonic()) / max(1, n_cases - done)
            _lanczos_case(run, spec, rec, op, spec.dtype, strategy, product, allot)
            done += 1
        n = int(op.shape[0])
        op.clear_cache()
        op = None
        _free(run.device)
        if spec.compare_dtype is not None:
            _compare_run(run, spec, rec, model, data, n, end_time)
        with run.recorder.change():
            rec.update(status="done", agreement=_agreement(rec["cases"], spec, s.k))
    except Exception as err:
        run.recorder.end(rec, **_error_record(err, run.device))
        run.say(f"ladder {spec.name}: {rec['status']} {rec.get('error', '')}")
    finally:
        model = op = data = None
        _free(run.device)


def _compare_run(run: Run, spec: LadderSpec, rec: dict[str, Any], model: torch.nn.Module,
                 data: list[Any], n: int, end_time: float) -> None:
    """The comparison dtype on the same (bf16-rounded) weights, converted in place."""
    s = run.settings
    assert spec.compare_dtype is not None
    name = _dname(spec.compare_dtype)
    if run.device.type == "cuda":
        # Before converting: the weights, the product scaled by the dtype ratio, the solver.
        ratio = (torch.empty(0, dtype=spec.compare_dtype).element_size()
                 / torch.empty(0, dtype=spec.dtype).element_size())
        total = torch.cuda.mem_get_info(run.device)[1]
        product_peak = rec["product"][_dname(spec.dtype)]["cached_peak_above_before_bytes"]
        est = solver_bytes_estimate(n, spec.compare_strategy, spec.compare_dtype,
                                    spec.compare_dtype, spec.max_iters, s.k)
        need = ratio * (rec["weights_bytes"] + product_peak) + est["total"]
        if need > 0.97 * total:
            with run.recorder.change():
                rec["cases"].append({
                    "model": spec.name, "dtype": name, "strategy": spec.compare_strategy,
                    "n": n, "k": s.k, "status": "skipped: memory",
                    "memory_estimate": dict(est, weights_and_product=ratio * (
                        rec["weights_bytes"] + product_peak), total_device=total),
                    "note": f"{name} needs ~{need / _GiB:.1f} GiB of {total / _GiB:.1f} GiB"})
            return
    op2 = None
    try:
        model.to(spec.compare_dtype)  # exact: every bf16 value is a float32 value
        op2, note = _make_operator(model, data)
        product = _warm_products(op2, run)
        with run.recorder.change():
            rec["product"][name] = product
            if note:
                rec["operator_note_compare"] = note
        allot = end_time - time.monotonic()
        _lanczos_case(run, spec, rec, op2, spec.compare_dtype, spec.compare_strategy, product,
                      allot)
    except Exception as err:  # converting or the warm-up products failed (e.g. OOM)
        with run.recorder.change():
            rec["cases"].append(dict({"model": spec.name, "dtype": name,
                                      "strategy": spec.compare_strategy, "n": n, "k": s.k},
                                     **_error_record(err, run.device)))
    finally:
        if op2 is not None:
            op2.clear_cache()
        op2 = None
        _free(run.device)


def section_scale_ladder(run: Run, section: dict[str, Any], end_time: float) -> None:
    """Every ladder model in turn, each with its weighted share of the time left."""
    specs = run.settings.ladder
    models = section.setdefault("models", [])
    for i, spec in enumerate(specs):
        rec: dict[str, Any] = {"name": spec.name, "family": spec.family, "config": spec.config,
                               "dtype": _dname(spec.dtype),
                               "compare_dtype": _dname(spec.compare_dtype),
                               "tokens": [run.settings.batch, run.settings.seq], "cases": []}
        with run.recorder.change():
            models.append(rec)
        weights = [t.weight for t in specs[i:]]
        share = (end_time - time.monotonic()) * spec.weight / sum(weights)
        if share < 5.0:
            run.recorder.end(rec, status="skipped: budget", note=f"{share:.0f} s left for it")
            continue
        _ladder_model(run, spec, rec, time.monotonic() + share)


# --- the summary ----------------------------------------------------------------------------
def _g(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return format(x, spec)


def _count_text(count: int | None) -> str:
    if not count:
        return "–"
    if count >= 1e9:
        return f"{count / 1e9:.2f} B"
    return f"{count / 1e6:.1f} M" if count >= 1e6 else f"{count / 1e3:.1f} k"


def summary_markdown(data: dict[str, Any]) -> str:
    """Compact Markdown tables of every section (what the run printed at the end)."""
    env = data.get("environment", {})
    lines = [f"## curvops GPU run: {env.get('device', {}).get('name')} "
             f"(torch {env.get('torch')}, CUDA {env.get('cuda_torch_built_with')}, "
             f"cupy {env.get('cupy')}) — {data.get('status')}, {data.get('elapsed_s', 0):.0f} s",
             ""]
    sec = data.get("sections", {})
    for name, body in sec.items():
        if str(body.get("status", "")).startswith("skipped") or body.get("error"):
            lines += [f"{name}: {body.get('status')} {body.get('error', '')}".rstrip(), ""]
    cc = sec.get("crosscheck")
    if cc and cc.get("cases"):
        lines += ["### Cross-check on the device", ""]
        rows = cc.get("rows", [])
        lines.append(compact_markdown_table(rows) if rows else "(no rows)")
        skipped = [f"{c['model']}/{c['dtype']}/{c['operator']}: {c['status']}"
                   for c in cc.get("cases", []) if c.get("status") not in ("done",)]
        if skipped:
            lines += ["", "Not run: " + "; ".join(skipped)]
        lines.append("")
    mv = sec.get("matvec_cost")
    if mv and ("matvec" in mv or "matmat8" in mv):
        lines += [f"### Product cost by view ({mv.get('model')}, n = {mv.get('n')}, fp32 GGN)",
                  "", "| product | torch ms | cupy ms | scipy ms | cupy/torch | scipy/torch |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for kind in ("matvec", "matmat8"):
            e = mv.get(kind)
            if not e:
                continue
            med, rat = e["wall_s_median"], e["ratios_wall"]

            def ms(name: str, med: dict[str, float] = med) -> str:
                return _g(med[name] * 1e3, ".3g") if name in med else "skipped"

            lines.append(f"| {kind} | {ms('torch')} | {ms('cupy')} | {ms('scipy')} | "
                         f"{_g(rat.get('cupy_over_torch'), '.2f')} | "
                         f"{_g(rat.get('scipy_over_torch'), '.2f')} |")
        if mv.get("cupy") != "ok":
            lines += ["", f"cupy: {mv.get('cupy')}"]
        lines.append("")
    sl = sec.get("scale_ladder")
    if sl and sl.get("models"):
        lines += ["### Scale ladder: top-k eigenvalues of the exact Fisher/GGN", "",
                  "| model | params | dtype | strategy | status | λ₁ | λ_k | conv. | iters | "
                  "matvecs | s | s/matvec | peak GiB | vs ref. strategy | vs other dtype |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
                  "| --- | --- |"]
        for m in sl.get("models", []):
            params = _count_text(m.get("n_params"))
            if not m.get("cases"):
                lines.append(f"| {m['name']} | {params} | {m.get('dtype')} | – | "
                             f"{m.get('status')} | " + " | ".join(["–"] * 10) + " |")
            for c in m.get("cases", []):
                ev = c.get("eigenvalues") or []
                conv = c.get("converged") or []
                peak = c.get("max_memory_allocated_bytes")
                if peak is None:  # CPU: the sampled resident-set peak above the start
                    peak = c.get("peak_above_before_bytes")
                if peak is None:
                    peak = (c.get("memory_at_failure") or {}).get("max_allocated_bytes")
                lines.append(
                    f"| {m['name']} | {params} | {c['dtype']} | {c['strategy']} | "
                    f"{c['status']} | {_g(ev[0] if ev else None)} | "
                    f"{_g(ev[-1] if ev else None)} | "
                    f"{sum(conv)}/{len(conv) if conv else c.get('k')} | "
                    f"{_g(c.get('iterations'), 'd')} | {_g(c.get('matvecs'), 'd')} | "
                    f"{_g(c.get('seconds'), '.2f')} | {_g(c.get('seconds_per_matvec'), '.3g')} | "
                    f"{_g(peak / _GiB if peak is not None else None, '.2f')} | "
                    f"{_g(c.get('rel_diff_vs_reference'), '.1e')} | "
                    f"{_g(c.get('rel_diff_vs_compare_dtype'), '.1e')} |")
        lines.append("")
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m curvops.validation.gpu_run",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for gpu-<device>.json")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="hard wall-clock budget of the whole run, from process start")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU (or whatever device), in a few seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=None, help="top eigenvalues (default 10; smoke 4)")
    p.add_argument("--batch", type=int, default=None, help="sequences (default 4; smoke 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (128; smoke 8)")
    p.add_argument("--reps", type=int, default=None, help="timing rounds (15; smoke 3)")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--models", default=None, help="comma-separated subset of the ladder")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, *, t_start: float | None = None) -> dict[str, Any]:
    """Run the sections within the budget; write the JSON after every step; print a summary.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
        t_start: Monotonic start of the budget (default: now; the command line passes the
            process start).

    Returns:
        The recorded data (as written to the JSON).
    """
    args = _parse(argv)
    t0 = time.monotonic() if t_start is None else t_start
    settings = make_settings(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    env = environment(device)
    slug = _slug(env["device"]["name"]) + ("-smoke" if settings.smoke else "")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"schema": SCHEMA, "status": "running", "_t0": t0,
                            "environment": env, "settings": settings.as_dict(),
                            "device_used": str(device), "sections": {}}
    recorder = Recorder(out_dir / f"gpu-{slug}.json", data)
    run = Run(settings, device, t0, recorder)
    watchdog = Watchdog(run.deadline, recorder,
                        lambda: print("\n" + summary_markdown(recorder.snapshot()), flush=True))
    threads = torch.get_num_threads()
    if settings.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    watchdog.start()
    try:
        if device.type != "cuda" and not settings.smoke:
            with recorder.change():
                data["status"] = "error: no CUDA device (use --smoke on a CPU)"
            print(data["status"], file=sys.stderr)
            return data
        recorder.write()
        run.say(f"device {env['device']['name']}, torch {env['torch']}, budget "
                f"{settings.budget_s:.0f} s, {run.remaining():.0f} s left; writing "
                f"{recorder.path}")
        shares = {"crosscheck": settings.crosscheck_share,
                  "matvec_cost": settings.matvec_share, "scale_ladder": 1.0}
        steps = {"crosscheck": section_crosscheck, "matvec_cost": section_matvec_cost,
                 "scale_ladder": section_scale_ladder}
        for name in SECTIONS:
            section: dict[str, Any] = {}
            with recorder.change():
                data["sections"][name] = section
            if name not in settings.sections:
                recorder.end(section, status="skipped: not selected")
                continue
            if name != "scale_ladder" and device.type != "cuda":
                with recorder.change():
                    section["note"] = "no CUDA: cupy rows and figures are recorded as skipped"
            end_time = time.monotonic() + shares[name] * max(0.0, run.remaining() - 5.0)
            t_sec = time.perf_counter()
            recorder.begin(section)
            try:
                steps[name](run, section, end_time)
                status = "done"
                extra: dict[str, Any] = {}
            except Exception as err:  # record, free, and go on to the next section
                extra = _error_record(err, device)
                status = extra.pop("status")
                run.say(f"{name}: {status} {extra.get('error')}")
            _free(device)
            recorder.end(section, status=status, seconds=time.perf_counter() - t_sec, **extra)
        with recorder.change():
            data["status"] = "complete"
    finally:
        watchdog.stop()
        torch.set_num_threads(threads)
        recorder.write()
    print("\n" + summary_markdown(recorder.snapshot()), flush=True)
    run.say(f"wrote {recorder.path}")
    return data


if __name__ == "__main__":
    _data = main(t_start=_T_PROCESS)
    sys.exit(0 if _data["status"] == "complete" else 2)
