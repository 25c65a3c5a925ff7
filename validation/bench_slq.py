"""Benchmark: SLQ spectral density, curvops vs curvlinops, on the same GGN operator.

Two parts, in one process:

1. **Agreement with the exact density** on a small MLP (float64, dense GGN by
   ``op.to_dense()`` and ``numpy.linalg.eigvalsh``): Wasserstein-1 distance between each
   method's density (grid points weighted by density, normalised) and the exact
   eigenvalues, and for curvops also of its quadrature measure (before broadening).
2. **Time** on an MLP 784-384-10 (≈0.3 M parameters, float32, 128 examples): curvops
   ``spectral_density`` (80 Lanczos steps, 4 probes, all probes in one batched product
   per step; ``reorth="full"`` and ``"none"``) against curvlinops'
   ``lanczos_approximate_spectrum`` (``ncv=80``, ``num_repeats=4``; no
   reorthogonalization; one product per probe and step), interleaved, reported as ratios.
   curvlinops needs the spectrum's boundaries: both get the same ones, computed once
   before timing (so the eigsh call is not timed). Both use the same Gaussian width
   (curvlinops' :math:`\\sigma = 2/(ncv-1)/\\sqrt{8\\ln\\kappa}` on the normalised interval),
   so their densities can be compared number for number (L1 distance on one grid).

Both libraries act on the *same* curvops ``GGNOperator`` (curvlinops only needs
``shape``, ``dtype``, ``device``, ``@`` and ``to_scipy``). curvlinops draws its start
vectors from torch's global RNG: it is seeded with ``torch.manual_seed``.

Run: ``OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 python -m curvops.validation.bench_slq``
(``--quick`` for a smoke run). Writes ``validation/results/bench_slq.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from curvops.linops import GGNOperator
from curvops.solvers.slq import spectral_density
from scipy.stats import wasserstein_distance
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"


def _mlp_problem(
    d_in: int, hidden: int, classes: int, examples: int, dtype: torch.dtype, seed: int
) -> GGNOperator:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
    model = model.to(dtype)
    X = torch.randn(examples, d_in, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.randint(0, classes, (examples,), generator=gen)
    return GGNOperator(model, nn.CrossEntropyLoss(), [(X, y)])


def _curvlinops_sigma(lo: float, hi: float, ncv: int, kappa: float, margin: float) -> float:
    """curvlinops' Gaussian width, converted from [-1, 1] to eigenvalue units."""
    width = (hi - lo) * (1 + 2 * margin)
    return (width / 2) * 2 / (ncv - 1) / math.sqrt(8 * math.log(kappa))


def _grid_w1(grid: np.ndarray, density: np.ndarray, exact: np.ndarray) -> float:
    weights = np.clip(density, 0, None)
    return float(wasserstein_distance(grid, exact, u_weights=weights / weights.sum()))


def _curvlinops_density(op, ncv, repeats, boundaries, seed, kappa=3.0, margin=0.05):
    from curvlinops.papyan2020traces.spectrum import (  # optional peer: the bench extra
        lanczos_approximate_spectrum,
    )

    torch.manual_seed(seed)
    grid, density = lanczos_approximate_spectrum(
        op, ncv, num_points=1024, num_repeats=repeats, kappa=kappa, boundaries=boundaries,
        margin=margin,
    )
    return grid.double().cpu().numpy(), density.double().cpu().numpy()


def agreement(steps: int, probes: int) -> dict:
    """Both methods against the exact spectrum of a small MLP's GGN (float64)."""
    op = _mlp_problem(64, 32, 10, 200, torch.float64, seed=1)
    exact = np.linalg.eigvalsh(op.to_dense().numpy())
    lo, hi = float(exact.min()), float(exact.max())
    sigma = _curvlinops_sigma(lo, hi, steps, 3.0, 0.05)
    ours = {}
    for reorth in ("full", "none"):
        d = spectral_density(
            op, num_probes=probes, lanczos_steps=steps, reorth=reorth, seed=0, sigma=sigma,
            num_points=1024,
        )
        nodes, weights = d.quadrature.measure()
        ours[reorth] = {
            "w1_density": _grid_w1(d.grid, d.density, exact),
            "w1_quadrature": float(wasserstein_distance(nodes, exact, u_weights=weights)),
            "integral": d.integral(),
        }
    grid, dens = _curvlinops_density(op, steps, probes, (lo, hi), seed=0)
    return {
        "n": op.shape[0],
        "spectrum_range": [lo, hi],
        "sigma": sigma,
        "curvops": ours,
        "curvlinops": {
            "w1_density": _grid_w1(grid, dens, exact),
            "integral": float(np.trapezoid(dens, grid)),
        },
    }


def timing(steps: int, probes: int, rounds: int, examples: int) -> dict:
    """Interleaved wall times on the ≈0.3 M-parameter MLP (float32)."""
    op = _mlp_problem(784, 384, 10, examples, torch.float32, seed=2)
    # Boundaries for curvlinops (and the same sigma for curvops), not timed.
    probe_run = spectral_density(op, num_probes=1, lanczos_steps=30, seed=99)
    lo = min(float(x.min()) for x in probe_run.nodes)
    hi = max(float(x.max()) for x in probe_run.nodes)
    sigma = _curvlinops_sigma(lo, hi, steps, 3.0, 0.05)
    times: dict[str, list[float]] = {"curvops_full": [], "curvops_none": [], "curvlinops": []}
    results = {}
    for r in range(rounds):
        for name in times:
            t0 = time.perf_counter()
            if name == "curvlinops":
                results[name] = _curvlinops_density(op, steps, probes, (lo, hi), seed=r)
            else:
                d = spectral_density(
                    op, num_probes=probes, lanczos_steps=steps, reorth=name.split("_")[1],
                    seed=r, sigma=sigma, grid=np.linspace(lo - 0.05 * (hi - lo),
                                                          hi + 0.05 * (hi - lo), 1024),
                )
                results[name] = (d.grid, d.density)
            times[name].append(time.perf_counter() - t0)
            print(f"round {r} {name}: {times[name][-1]:.1f} s", flush=True)
    best = {k: min(v) for k, v in times.items()}
    grid_c, dens_c = results["curvlinops"]
    l1 = {}
    for name in ("curvops_full", "curvops_none"):
        grid, dens = results[name]
        l1[name] = float(np.trapezoid(np.abs(np.interp(grid_c, grid, dens) - dens_c), grid_c))
    return {
        "n": op.shape[0],
        "examples": examples,
        "dtype": "float32",
        "seconds": times,
        "best_seconds": best,
        "ratio_curvlinops_over_curvops_full": best["curvlinops"] / best["curvops_full"],
        "ratio_curvlinops_over_curvops_none": best["curvlinops"] / best["curvops_none"],
        "l1_distance_to_curvlinops_density": l1,
        "boundaries": [lo, hi],
        "sigma": sigma,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args()
    steps, probes = 80, 4
    rounds, examples = (1, 16) if args.quick else (2, 128)
    import curvlinops  # optional peer: the bench extra

    report = {
        "benchmark": "bench_slq",
        "settings": {
            "lanczos_steps": steps,
            "num_probes": probes,
            "rounds": rounds,
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
            "torch": torch.__version__,
            "curvlinops": getattr(curvlinops, "__version__", "unknown"),
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
        },
        "agreement_small_mlp": agreement(steps, probes),
    }
    print(json.dumps(report["agreement_small_mlp"], indent=2), flush=True)
    report["timing_mlp_0p3M"] = timing(steps, probes, rounds, examples)
    report["settings"]["load_average_at_end"] = list(os.getloadavg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "bench_slq.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["timing_mlp_0p3M"], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
