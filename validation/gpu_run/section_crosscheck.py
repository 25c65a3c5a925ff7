"""Section ``crosscheck``: every default method of the cross-check, on the device.

Small zoo models moved to the device (float64 and float32), cross-checked with every
default method, ``cupy-eigsh`` (cupyx ``eigsh`` on ``op.to_cupy()``) included; the rows
are the cross-check's own.
"""

from __future__ import annotations

import time
from typing import Any

from curvops.linops.dtypes import dtype_from_name

from ..crosscheck import DEFAULT_METHODS, cross_check
from ..zoo import build
from .context import Run
from .device import error_record, free, on_device
from .settings import CROSSCHECK_LANCZOS_TOL

__all__ = ["run_section"]


def run_section(run: Run, section: dict[str, Any], end_time: float) -> None:
    """Cross-check small zoo models on the device with every default method.

    Each (model, dtype, operator) is one :func:`~curvops.validation.crosscheck.cross_check`;
    its rows (method, eigenvalues, reference, rel_error, tolerance, status, matvecs,
    seconds, peak_mb, note) go into ``section["rows"]`` as the cross-check made them,
    labelled with ``rung`` ``"gpu-<dtype>"``. A case whose expected time (the longest case
    so far, 5 s before the first) does not fit before ``end_time`` is recorded
    ``skipped: budget``.
    """
    s = run.settings
    cases = section.setdefault("cases", [])
    section.setdefault("rows", [])
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
                problem = on_device(build(model_name, dtype_from_name(dtype_name), s.seed),
                                    run.device)
                op = problem.operator(op_name)
                result = cross_check(
                    op, min(5, op.shape[0] - 1), methods=DEFAULT_METHODS, problem=problem,
                    labels={"rung": f"gpu-{dtype_name}", "model": model_name,
                            "device": str(run.device)},
                    operator_name=op_name, seed=s.seed, record_history=False,
                    lanczos_tol=CROSSCHECK_LANCZOS_TOL[dtype_name],
                )
                rows = result.rows
                counts = {st: sum(r["status"] == st for r in rows)
                          for st in sorted({r["status"] for r in rows})}
                updates = {"status": "done", "passed": result.passed, "counts": counts,
                           "reference": result.reference.source if result.reference else None}
            except Exception as err:  # one broken case must not end the section
                rows = []
                updates = error_record(err, run.device)
            finally:
                problem = op = result = None
                free(run.device)
            seconds = time.perf_counter() - t0
            longest = max(longest, seconds)
            with run.recorder.change():
                section["rows"].extend(rows)
            run.recorder.end(case, seconds=seconds, **updates)
            run.say(f"crosscheck {model_name}/{dtype_name}/{op_name}: {case['status']} "
                    f"{case.get('counts', '')} ({seconds:.1f} s)")
