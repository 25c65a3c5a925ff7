"""Hutchinson, Hutch++ and the diagonal estimators against exact traces and diagonals.

References: dense float64 matrices with known spectra (trace = Σλ, diagonal = torch.diag);
closed forms (Rademacher Hutchinson is exact on a diagonal matrix, Hutch++ is exact on a
matrix of rank ≤ k); the dense GGN of a small MLP from ``tests/references.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import references as R
import torch
from curvops.linops import GGNOperator
from curvops.solvers.trace import (
    exact_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
)
from scipy.sparse.linalg import aslinearoperator


def low_rank_plus_noise(n: int = 300, rank: int = 10, seed: int = 1) -> torch.Tensor:
    """A few large eigenvalues on top of a small flat bulk: where Hutch++ shines."""
    gen = torch.Generator().manual_seed(seed)
    lam = torch.cat([
        100.0 * torch.linspace(1.0, 2.0, rank, dtype=torch.float64),
        0.05 * torch.rand(n - rank, generator=gen, dtype=torch.float64),
    ])
    return R.matrix_with_spectrum(lam, seed)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_within_three_standard_errors(probe):
    gen = torch.Generator().manual_seed(3)
    A = R.matrix_with_spectrum(torch.rand(120, generator=gen, dtype=torch.float64) * 4 - 1, seed=3)
    exact = float(torch.trace(A))
    est = hutchinson_trace(A, num_probes=200, probe=probe, seed=5, block_size=64)
    assert est.standard_error < 0.1 * abs(exact)
    assert abs(est.value - exact) <= 3 * est.standard_error
    assert est.matvecs == est.num_probes == 200
    # The samples are the quadratic forms of the seeded probes.
    assert est.samples.mean() == pytest.approx(est.value, rel=1e-14)
    # The standard error matches the theoretical one: Var = 2(|A|_F^2 - sum A_ii^2) for
    # Rademacher, 2|A|_F^2 for Gaussian.
    frob2 = float((A * A).sum())
    var = 2 * (frob2 - float((torch.diag(A) ** 2).sum())) if probe == "rademacher" else 2 * frob2
    assert est.standard_error == pytest.approx(np.sqrt(var / 200), rel=0.25)


def test_hutchinson_is_exact_on_a_diagonal_matrix_with_rademacher_probes():
    D = torch.diag(torch.arange(1.0, 21.0, dtype=torch.float64))
    est = hutchinson_trace(D, num_probes=5, seed=0)
    assert est.value == pytest.approx(210.0, rel=1e-14)
    assert est.standard_error == pytest.approx(0.0, abs=1e-12)


def test_hutchpp_within_three_standard_errors_and_exact_on_low_rank():
    gen = torch.Generator().manual_seed(4)
    A = R.matrix_with_spectrum(torch.rand(150, generator=gen, dtype=torch.float64), seed=4)
    exact = float(torch.trace(A))
    est = hutchpp_trace(A, matvecs=90, seed=2)
    assert est.matvecs == 90 and est.num_probes == 30
    assert est.standard_error < 0.1 * exact
    assert abs(est.value - exact) <= 3 * est.standard_error
    # Rank <= k: Q spans the range, the deflated part vanishes, the estimate is exact.
    lam = torch.zeros(150, dtype=torch.float64)
    lam[:8] = torch.linspace(1, 8, 8, dtype=torch.float64)
    L = R.matrix_with_spectrum(lam, seed=6)
    est = hutchpp_trace(L, matvecs=30, seed=0)
    assert est.value == pytest.approx(36.0, rel=1e-12)
    assert est.standard_error < 1e-10


def test_hutchpp_beats_hutchinson_at_equal_matvecs_on_low_rank_plus_noise():
    A = low_rank_plus_noise()
    exact = float(torch.trace(A))
    budget = 60
    err_h = np.array([
        abs(hutchinson_trace(A, num_probes=budget, seed=s).value - exact) for s in range(20)
    ])
    err_pp = np.array([abs(hutchpp_trace(A, matvecs=budget, seed=s).value - exact)
                       for s in range(20)])
    rel_h, rel_pp = err_h.mean() / exact, err_pp.mean() / exact
    print(f"mean relative error at {budget} matvecs: Hutchinson {rel_h:.2e}, Hutch++ {rel_pp:.2e}")
    assert rel_pp < 0.1 * rel_h


def test_hutchinson_diagonal_within_its_error_bars():
    gen = torch.Generator().manual_seed(8)
    A = R.matrix_with_spectrum(torch.rand(80, generator=gen, dtype=torch.float64) * 3, seed=8)
    est = hutchinson_diagonal(A, num_probes=400, seed=1, block_size=128)
    z = ((est.diagonal - torch.diag(A)) / est.standard_error).numpy()
    # z-scores of an unbiased estimator with a right standard error: ~ N(0, 1).
    assert np.mean(np.abs(z) <= 3) >= 0.97
    assert 0.7 < np.sqrt(np.mean(z**2)) < 1.3
    # The standard error is that of the Rademacher estimator: sqrt(sum_{j!=i} A_ij^2 / P).
    off = (A * A).sum(1) - torch.diag(A) ** 2
    np.testing.assert_allclose(est.standard_error.numpy(), (off / 400).sqrt().numpy(), rtol=0.2)


def test_exact_diagonal_of_dense_scipy_and_ggn_operators():
    gen = torch.Generator().manual_seed(9)
    A = R.matrix_with_spectrum(torch.rand(70, generator=gen, dtype=torch.float64), seed=9)
    for other, chunk in ((A, 16), (A.numpy(), 64), (aslinearoperator(A.numpy()), 7)):
        diag = exact_diagonal(other, chunk_size=chunk)
        torch.testing.assert_close(diag.diagonal, torch.diag(A), rtol=1e-14, atol=1e-15)
        assert diag.matvecs == 70 and diag.method == "exact"
    problem = R.mlp_ce("mean")
    names = R.selected_names(problem.model, None)
    dense = R.dense_ggn(problem.model, names, problem.spec, problem.batches)
    op = GGNOperator(problem.model, problem.spec.module(), problem.batches)
    torch.testing.assert_close(
        exact_diagonal(op, chunk_size=32).diagonal, torch.diag(dense), rtol=1e-10, atol=1e-13
    )
    # The GGN's trace: Hutchinson within 3 standard errors of the dense reference.
    est = hutchinson_trace(op, num_probes=60, seed=3)
    assert abs(est.value - float(torch.trace(dense))) <= 3 * est.standard_error


def test_seeds_make_estimates_reproducible():
    A = low_rank_plus_noise(n=60, rank=3)
    one_block = hutchinson_trace(A, num_probes=7, seed=4)
    again = hutchinson_trace(A, num_probes=7, seed=4)
    np.testing.assert_array_equal(again.samples, one_block.samples)
    three_blocks = hutchinson_trace(A, num_probes=7, seed=4, block_size=3)
    np.testing.assert_allclose(three_blocks.samples, one_block.samples, rtol=1e-13)
    assert hutchinson_trace(A, num_probes=7, seed=4).value != hutchinson_trace(
        A, num_probes=7, seed=5
    ).value
    assert hutchpp_trace(A, matvecs=9, seed=1).value == hutchpp_trace(A, matvecs=9, seed=1).value


def test_bad_input_is_refused():
    A = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="matvecs"):
        hutchpp_trace(A, matvecs=2)
    with pytest.raises(ValueError, match="k = 3 <= n"):
        hutchpp_trace(torch.eye(2, dtype=torch.float64), matvecs=9)
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_trace(A, num_probes=0)
    with pytest.raises(ValueError, match="num_probes"):
        hutchinson_diagonal(A, num_probes=1)
    with pytest.raises(ValueError, match="probe"):
        hutchinson_trace(A, probe="sphere")
    with pytest.raises(TypeError, match="seed"):
        hutchinson_trace(A, seed=None)
    with pytest.raises(TypeError):
        hutchinson_trace("not an operator")
    with pytest.raises(ValueError, match="square"):
        exact_diagonal(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="num_probes"):
        hutchinson_trace(A, num_probes=3.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "estimator",
    [
        lambda A: hutchinson_trace(A, num_probes=4),
        lambda A: hutchinson_trace(A, num_probes=4, block_size=1),
        lambda A: hutchpp_trace(A, matvecs=6),
        lambda A: hutchinson_diagonal(A, num_probes=4),
        lambda A: exact_diagonal(A, chunk_size=3),
    ],
    ids=["hutchinson_trace", "hutchinson_trace-blocks", "hutchpp_trace",
         "hutchinson_diagonal", "exact_diagonal"],
)
def test_non_finite_product_raises_one_error(estimator, bad):
    from curvops.solvers import NonFiniteProductError

    A = torch.eye(8, dtype=torch.float64)
    A[5, 5] = bad
    with pytest.raises(NonFiniteProductError, match="the operator returned NaN/Inf"):
        estimator(A)
