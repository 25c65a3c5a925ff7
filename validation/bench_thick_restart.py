r"""Benchmark: how many vectors a thick-restarted Lanczos needs (``ncv``), against scipy.

On the GGN of a small GPT-2 (2 layers, width 128, vocabulary 5000, 4 x 64 tokens, float32:
1.04 M parameters, cached products), top-5 with ``tol`` 1e-4 and 1e-6:

* curvops ``lanczos(op, 5, ncv=m)`` for m in 8, 10, 12, 16, 20 and without a bound;
* ``scipy.sparse.linalg.eigsh(k=5, ncv=m, tol)`` (ARPACK's implicit restart) with the
  same m, on the same operator.

Reported per run: products (verification included for curvops), wall seconds, restarts,
the measured operator accuracy, the largest difference of the values from the unbounded
curvops run (relative to the largest value), and whether every value was verified
converged. Run::

    OMP_NUM_THREADS=2 python -m curvops.validation.bench_thick_restart

Writes ``validation/results/bench_thick_restart.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = {"layers": 2, "width": 128, "heads": 2, "vocab": 5000}


def _operator(threads: int):
    import torch
    from curvops.linops import GGNOperator
    from curvops.linops.hf import hf_objective

    from .bench_lm_top5 import _problem

    torch.set_num_threads(threads)
    model, data = _problem(SHAPE, 4, 64)
    return GGNOperator(model, hf_objective(model), [data])


def run(threads: int = 2, sizes: tuple[int, ...] = (8, 10, 12, 16, 20),
        tols: tuple[float, ...] = (1e-4, 1e-6)) -> dict[str, Any]:
    """Every (tol, ncv) pair, curvops and eigsh, on one operator."""
    import scipy.sparse.linalg as sla
    import torch
    from curvops.solvers import lanczos

    op = _operator(threads)
    op.matvec(torch.zeros(op.shape[0]))  # builds the product cache: no run pays for it
    A = op.to_scipy()
    n = op.shape[0]
    rows: list[dict[str, Any]] = []
    for tol in tols:
        t0 = time.perf_counter()
        ref = lanczos(op, 5, tol=tol, maxiter=300, return_eigenvectors=False)
        ref_row = {"solver": "curvops", "tol": tol, "ncv": None, "matvecs": ref.matvecs,
                   "seconds": time.perf_counter() - t0, "restarts": 0,
                   "operator_accuracy": ref.operator_accuracy,
                   "converged": bool(ref.all_converged), "max_rel_diff": 0.0}
        rows.append(ref_row)
        scale = float(np.max(np.abs(ref.eigenvalues)))
        for m in sizes:
            t0 = time.perf_counter()
            res = lanczos(op, 5, tol=tol, maxiter=300, ncv=m, return_eigenvectors=False)
            rows.append({"solver": "curvops", "tol": tol, "ncv": m, "matvecs": res.matvecs,
                         "seconds": time.perf_counter() - t0, "restarts": res.restarts,
                         "operator_accuracy": res.operator_accuracy,
                         "converged": bool(res.all_converged),
                         "max_rel_diff": float(np.max(np.abs(res.eigenvalues - ref.eigenvalues))
                                               / scale)})
            count = [0]

            def matvec(x, count=count):
                count[0] += 1
                return A.matvec(x)

            counted = sla.LinearOperator(A.shape, matvec=matvec, dtype=A.dtype)
            v0 = np.random.default_rng(0).standard_normal(n).astype(A.dtype)
            t0 = time.perf_counter()
            try:
                vals = np.sort(sla.eigsh(counted, k=5, which="LA", ncv=m, tol=tol, v0=v0,
                                         maxiter=300, return_eigenvectors=False))[::-1]
                diff = float(np.max(np.abs(vals - ref.eigenvalues)) / scale)
                ok = True
            except sla.ArpackNoConvergence:
                diff, ok = float("nan"), False
            rows.append({"solver": "eigsh", "tol": tol, "ncv": m, "matvecs": count[0],
                         "seconds": time.perf_counter() - t0, "converged": ok,
                         "max_rel_diff": diff})
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), flush=True)
    return {"shape": SHAPE, "tokens": [4, 64], "n": n, "threads": threads, "k": 5,
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    """Run the sweep and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "bench_thick_restart.json"))
    a = p.parse_args(argv)
    result = run(a.threads)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
