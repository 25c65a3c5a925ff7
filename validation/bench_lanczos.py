r"""Benchmark of the Lanczos eigensolver against ARPACK and against its own products.

Part 1, matvec counts: on the test matrices (n = 1000, float64, known spectra), the
products each strategy needs for the top 5 at ``tol=1e-10`` against
``scipy.sparse.linalg.eigsh`` (ARPACK) at the same ``tol`` from the same start vector,
counted by a counting ``LinearOperator``; both sides' errors against
``numpy.linalg.eigvalsh`` are listed (equal accuracy).

Part 2, the MLP 784-256-256-10 (ReLU, 269,322 parameters) GGN on one batch of 256
(then of 2048: vectors of the same length, a product 5-6x dearer), float32, cross-entropy: for each
strategy at k = 5, ``tol=1e-6``, ``overhead = lanczos wall / (matvecs x one matvec)``; end
to end, curvops' Lanczos against ``eigsh`` on curvlinops' scipy operator
(``bash scripts/setup-bench.sh``) at the same tol.

Run (thread settings are part of the result and recorded)::

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 python -m curvops.validation.bench_lanczos

Writes ``validation/results/bench_lanczos.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from curvops.linops import GGNOperator
from curvops.solvers._tridiagonal import select_which
from curvops.solvers.lanczos import LanczosConfig, lanczos
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("full", "selective", "partial", "none")


class _Counting(LinearOperator):
    def __init__(self, A: np.ndarray) -> None:
        super().__init__(dtype=A.dtype, shape=A.shape)
        self.A, self.count = A, 0

    def _matvec(self, x):
        self.count += 1
        return self.A @ x.reshape(-1)


def known_spectrum_matrices(n: int = 1000) -> dict[str, np.ndarray]:
    """The spectra of the tests (decaying, clustered, low-rank, indefinite, separated)."""
    rng = np.random.default_rng(12)
    spectra = {
        "decaying": np.concatenate([10 * 0.8 ** np.arange(30), rng.uniform(0, 0.01, n - 30)]),
        "clustered": np.concatenate([1 + 1e-3 * np.arange(6)[::-1], rng.uniform(0, 0.9, n - 6)]),
        "low-rank (rank 3, k=5)": np.concatenate([[3.0, 2.0, 1.0], np.zeros(n - 3)]),
        "indefinite": np.concatenate([[-6.0, -5.5, 5.0, 4.5, 4.0, 3.5, 3.0],
                                      rng.uniform(-1, 1, n - 7)]),
        "separated": np.concatenate([[10, 8, 6, 4, 2, 1.5], rng.uniform(0, 1, n - 6)]),
    }
    out = {}
    for i, (name, ev) in enumerate(spectra.items()):
        Q, _ = np.linalg.qr(np.random.default_rng(i).standard_normal((n, n)))
        A = (Q * ev) @ Q.T
        out[name] = (A + A.T) / 2
    return out


def matvec_table(k: int = 5, tol: float = 1e-10) -> list[dict[str, Any]]:
    rows = []
    for name, A in known_spectrum_matrices().items():
        ev = np.linalg.eigvalsh(A)
        ref = ev[select_which(ev, k, "LA")]
        scale = np.abs(ev).max()
        v0 = np.random.default_rng(1000).standard_normal(A.shape[0])
        op = _Counting(A)
        w = np.sort(eigsh(op, k, which="LA", tol=tol, v0=v0, return_eigenvectors=False))[::-1]
        row: dict[str, Any] = {"matrix": name, "eigsh_matvecs": op.count,
                               "eigsh_err": float(np.max(np.abs(w - ref)) / scale)}
        for reorth in STRATEGIES:
            res = lanczos(A, k, config=LanczosConfig(reorth=reorth, tol=tol,
                                                     return_eigenvectors=False), v0=v0)
            got = res.eigenvalues
            err = (float(np.max(np.abs(got - ref)) / scale) if got.size == k
                   else float("nan"))
            row[reorth] = {"matvecs": res.matvecs, "ratio": res.matvecs / op.count,
                           "err": err, "orthogonality_loss": res.orthogonality_loss,
                           "values": got.size}
        rows.append(row)
    return rows


def _mlp_problem(seed: int = 0, batch: int = 256):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    X = torch.randn(batch, 784, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return model, (X, y)


def mlp_ggn(
    tol: float = 1e-6, k: int = 5, repeats: int = 7, batch_size: int = 256
) -> dict[str, Any]:
    model, batch = _mlp_problem(batch=batch_size)
    loss = nn.CrossEntropyLoss()
    op = GGNOperator(model, loss, [batch])
    n = op.shape[0]
    gen = torch.Generator().manual_seed(0)
    vs = [torch.randn(n, generator=gen) for _ in range(5)]
    op.matvec(vs[0])  # builds the cache, as the first product of a run does

    def one_matvec() -> float:
        # Median of 5 products on distinct vectors, taken right before each run: the speed
        # of this machine drifts by +-20 % over minutes, so a matvec timed once at the
        # start is no yardstick for a run taken later.
        times = []
        for x in vs:
            t0 = time.perf_counter()
            op.matvec(x)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    out: dict[str, Any] = {"n": n, "batch": batch_size, "strategies": {}}
    values = {}
    runs: dict[str, list[tuple[float, float, Any]]] = {s: [] for s in STRATEGIES}
    # The same runs without the final orthogonality diagnostic (j^2 n flops).
    bare: dict[str, list[tuple[float, float, Any]]] = {s: [] for s in STRATEGIES[:-1]}
    for _ in range(repeats):
        for reorth in STRATEGIES:  # interleaved: every strategy sees the same drift
            for measure, into in ((True, runs), (False, bare)):
                if reorth not in into:
                    continue
                t_mv = one_matvec()
                t0 = time.perf_counter()
                res = lanczos(op, k, config=LanczosConfig(
                    reorth=reorth, tol=tol, return_eigenvectors=False,
                    measure_orthogonality=measure))
                into[reorth].append((time.perf_counter() - t0, t_mv, res))
    out["matvec_seconds"] = statistics.median(r[1] for rs in runs.values() for r in rs)
    for reorth, rs in runs.items():
        res = rs[-1][2]
        values[reorth] = res.eigenvalues
        out["strategies"][reorth] = {
            "wall": statistics.median(r[0] for r in rs), "matvecs": res.matvecs,
            "iterations": res.iterations,
            # Included in matvecs: the batched product of the k Ritz vectors (one matmat,
            # timed like k products) that verifies the converged pairs.
            "verification_matvecs": res.verification_matvecs,
            # Median over the runs of wall / (matvecs x the matvec timed just before).
            "overhead": statistics.median(r[0] / (r[2].matvecs * r[1]) for r in rs),
            # The same ratio with the matvec time measured inside the run itself: what the
            # recurrence adds beyond the operator (the operator slowed by the basis
            # streaming through the cache counts as matvec time here).
            "overhead_in_run": statistics.median(r[0] / r[2].seconds_matvec for r in rs),
            "seconds_matvec": res.seconds_matvec, "seconds_other": res.seconds_other,
            "orthogonality_loss": res.orthogonality_loss,
            "eigenvalues": res.eigenvalues.tolist(),
        }
        if reorth in bare:
            out["strategies"][reorth]["overhead_without_orthogonality_check"] = (
                statistics.median(r[0] / (r[2].matvecs * r[1]) for r in bare[reorth]))
    try:
        import curvlinops  # optional: the bench extra (scripts/setup-bench.sh)
    except ImportError:
        out["curvlinops"] = "not installed (pip install curvlinops-for-pytorch)"
        return out
    params = [p for p in model.parameters() if p.requires_grad]
    cl = curvlinops.GGNLinearOperator(model, loss, params, [batch], check_deterministic=False)
    sop = cl.to_scipy()
    walls = []
    for r in range(repeats):
        counted = _Counting.__new__(_Counting)
        LinearOperator.__init__(counted, dtype=sop.dtype, shape=sop.shape)
        counted.count = 0

        def _mv(x, sop=sop, c=counted):
            c.count += 1
            return sop.matvec(x)

        counted._matvec = _mv
        v0 = np.random.default_rng(r).standard_normal(n).astype(sop.dtype)
        t0 = time.perf_counter()
        w = eigsh(counted, k, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        walls.append(time.perf_counter() - t0)
    w = np.sort(w)[::-1]
    eigsh_wall = statistics.median(walls)
    out["eigsh_curvlinops"] = {"wall": eigsh_wall, "matvecs": counted.count,
                               "eigenvalues": w.tolist(),
                               "curvlinops": getattr(curvlinops, "__version__", "unknown")}
    for reorth, vals in values.items():
        out["strategies"][reorth]["speedup_vs_eigsh"] = (
            eigsh_wall / out["strategies"][reorth]["wall"])
        out["strategies"][reorth]["max_rel_diff_vs_eigsh"] = float(
            np.max(np.abs(vals - w) / np.abs(w)))
    return out


def markdown(result: dict[str, Any]) -> str:
    load = result.get("loadavg")
    lines = [f"Threads: {result['threads']}"
             + (f"; load average (1 min) {load['start']:.2f} at the start, {load['end']:.2f} "
                "at the end" if isinstance(load, dict) and "end" in load else ""), "",
             "| matrix | eigsh | " + " | ".join(STRATEGIES) + " |",
             "| --- | --- | " + " | ".join("---" for _ in STRATEGIES) + " |"]
    for row in result["matvec_table"]:
        cells = [
            f"{row[s]['matvecs']} ({row[s]['ratio']:.2f}x, "
            + (f"err {row[s]['err']:.0e})" if math.isfinite(row[s]["err"])
               else f"{row[s]['values']} distinct values: no basis to continue after the "
               "breakdown)")
            for s in STRATEGIES
        ]
        lines.append(f"| {row['matrix']} | {row['eigsh_matvecs']} (err "
                     f"{row['eigsh_err']:.0e}) | " + " | ".join(cells) + " |")
    for mlp in [result.get("mlp_ggn"), *result.get("mlp_ggn_other_batches", [])]:
        if not isinstance(mlp, dict):
            continue
        lines += ["", f"MLP GGN, n = {mlp['n']}, batch {mlp.get('batch', 256)}, one matvec "
                  f"{mlp['matvec_seconds'] * 1e3:.1f} ms",
                  "", "| strategy | matvecs (iterations + verification) | wall (s) | overhead | "
                  "overhead without the orthogonality check | overhead (in run) | "
                  "speedup vs eigsh |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for s, d in mlp["strategies"].items():
            bare = d.get("overhead_without_orthogonality_check")
            split = (f" ({d['iterations']} + {d['verification_matvecs']})"
                     if "verification_matvecs" in d and d["verification_matvecs"] else "")
            lines.append(f"| {s} | {d['matvecs']}{split} | {d['wall']:.2f} | "
                         f"{d['overhead']:.2f} | "
                         f"{'' if bare is None else f'{bare:.2f}'} | "
                         f"{d['overhead_in_run']:.2f} | "
                         f"{d.get('speedup_vs_eigsh', float('nan')):.2f} |")
        e = mlp.get("eigsh_curvlinops")
        if isinstance(e, dict):
            lines.append(f"| eigsh on curvlinops | {e['matvecs']} | {e['wall']:.2f} | | | | "
                         "1.00 |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-mlp", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 2048],
                        help="MLP batch sizes: the first is the headline (the reported MLP), "
                        "the others show how the overhead falls as the product gets dearer")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_lanczos.json")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                    "MKL_NUM_THREADS")}
        | {"torch": torch.get_num_threads()},
        "platform": platform.platform(), "torch": torch.__version__,
        # Other work on the machine skews every timing: recorded beside the results.
        "loadavg": {"start": os.getloadavg()[0]},
        "matvec_table": [] if args.skip_table else matvec_table(),
    }
    print(markdown(result))
    if not args.skip_mlp:
        try:
            result["mlp_ggn"] = mlp_ggn(repeats=args.repeats, batch_size=args.batches[0])
            result["mlp_ggn_other_batches"] = [
                mlp_ggn(repeats=args.repeats, batch_size=b) for b in args.batches[1:]
            ]
        except ImportError as err:
            result["mlp_ggn"] = f"skipped: {err}"
    result["loadavg"]["end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
