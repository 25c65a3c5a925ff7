r"""The GPU validation run: one process, one wall-clock budget, JSON after every step.

On the GPU machine (one ``device`` call, at most 600 s)::

    pip install --no-deps --no-build-isolation -e . >/dev/null && python -m curvops.validation.gpu_run --out $OUT

On a CPU, the same logic on tiny shapes in a few seconds (``tests/test_gpu_run.py``)::

    python -m curvops.validation.gpu_run --smoke --out /tmp/gpu-smoke

:func:`main` runs three sections in order, each under its share of ``--budget-s`` (default
540 s from process start, which leaves a margin under the device tool's 600 s for the
install and the start-up):

1. ``crosscheck`` (:mod:`.section_crosscheck`) — the cross-check of every default method,
   ``cupy-eigsh`` included, on small zoo models moved to the device (float64 and float32);
2. ``matvec_cost`` (:mod:`.section_matvec_cost`) — one GGN product on a float32 GPT-2
   through the torch operator, the cupy view and the scipy view, and their ratios;
3. ``scale_ladder`` (:mod:`.section_scale_ladder`) — the top-k eigenvalues of the exact
   Fisher = GGN of GPT-2-small, a Qwen2.5-1.5B-shaped and a LLaMA-7B-shaped model in
   bfloat16 (random init from configs: nothing is downloaded) with every feasible Lanczos
   strategy, against each other and against float32 on the same weights where it fits.
   The models have the shapes of the named ones (widths, depths, heads, vocabularies, tied
   embeddings); numerical details that change no shape (RoPE base, norm epsilon) are the
   config classes' defaults.

The modules: :mod:`.settings` (what shapes a run, the command line), :mod:`.record` (the
JSON written after every step, the watchdog), :mod:`.context` (what a section is handed),
:mod:`.environment` and :mod:`.device` (versions, memory figures, out-of-memory records),
:mod:`.estimates` (memory and time of a Lanczos run), :mod:`.language_models` (the ladder's
models), the three sections, and :mod:`.report` (the Markdown summary).

Time: each step gets a share of what is left of the budget and is ``skipped: budget`` when
it no longer fits. A watchdog thread ends the process at the deadline (exit code 3) after
writing the JSON with the step in flight marked ``timeout: budget``, so a killed run still
leaves every finished figure.

Output: ``DIR/gpu-<device-name-slug>.json`` (``-smoke`` appended in smoke mode) with the
device, the versions of python/torch/CUDA/transformers/cupy/scipy/numpy, the settings and
every figure; a compact Markdown summary on stdout.
"""  # noqa: E501 (the install command above is one line, as it is typed)

from __future__ import annotations

import time

# Before the heavy imports: the budget counts them too (``python -m`` imports this first).
T_PROCESS = time.monotonic()

import re  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from . import section_crosscheck, section_matvec_cost, section_scale_ladder  # noqa: E402
from .context import Run  # noqa: E402
from .device import error_record, free  # noqa: E402
from .environment import environment  # noqa: E402
from .record import EXIT_TIMEOUT, SCHEMA, Recorder, Watchdog  # noqa: E402
from .report import summary_markdown  # noqa: E402
from .settings import SECTIONS, make_settings, parse_args  # noqa: E402

__all__ = ["EXIT_TIMEOUT", "SCHEMA", "T_PROCESS", "main"]

_STEPS = {"crosscheck": section_crosscheck.run_section,
          "matvec_cost": section_matvec_cost.run_section,
          "scale_ladder": section_scale_ladder.run_section}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def main(argv: Sequence[str] | None = None, *, t_start: float | None = None) -> dict[str, Any]:
    """Run the sections within the budget; write the JSON after every step; print a summary.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
        t_start: Monotonic start of the budget (default: the call; the command line passes
            the process start, :data:`T_PROCESS`).

    Returns:
        The recorded data (as written to the JSON).
    """
    args = parse_args(argv)
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
                _STEPS[name](run, section, end_time)
                status = "done"
                extra: dict[str, Any] = {}
            except Exception as err:  # record, free, and go on to the next section
                extra = error_record(err, device)
                status = extra.pop("status")
                run.say(f"{name}: {status} {extra.get('error')}")
            free(device)
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
