"""Stochastic Lanczos quadrature against exact spectra (float64).

References: matrices Q diag(λ) Qᵀ with known λ; the dense GGN of a small MLP built by
``tests/references.py`` (jacrev + closed-form output Hessians, no curvops) and its
``torch.linalg.eigvalsh`` spectrum; closed forms for tr f(A) and log det.
Distance between spectra: Wasserstein-1 (``scipy.stats.wasserstein_distance``) between the
pooled quadrature measure and the uniform measure on the exact eigenvalues.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import references as R
import torch
from curvops.linops import GGNOperator
from curvops.solvers.slq import (
    log_determinant,
    slq_quadrature,
    spectral_density,
    trace_function,
)
from scipy.sparse.linalg import aslinearoperator
from scipy.stats import wasserstein_distance


def two_bulk_spectrum(n: int = 200) -> torch.Tensor:
    """A bulk near zero, a second bulk, and a few outliers (like a network's GGN)."""
    gen = torch.Generator().manual_seed(7)
    bulk = 0.5 * torch.rand(n - 40, generator=gen, dtype=torch.float64)
    second = 3.0 + torch.rand(35, generator=gen, dtype=torch.float64)
    outliers = torch.tensor([8.0, 9.5, 12.0, 15.0, 20.0], dtype=torch.float64)
    return torch.cat([bulk, second, outliers])


def w1_to_spectrum(rule, eigenvalues: np.ndarray) -> float:
    nodes, weights = rule.measure()
    return wasserstein_distance(nodes, eigenvalues, u_weights=weights)


@pytest.fixture(scope="module")
def two_bulk():
    lam = two_bulk_spectrum()
    return R.matrix_with_spectrum(lam), lam.numpy()


@pytest.mark.parametrize("reorth", ["full", "none"])
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_density_integrates_to_one_and_matches_known_spectrum(two_bulk, reorth, probe):
    A, lam = two_bulk
    d = spectral_density(A, num_probes=8, lanczos_steps=60, probe=probe, reorth=reorth, seed=3)
    assert abs(d.integral() - 1.0) < 1e-6
    for w in d.weights:  # each probe's rule is a probability measure
        assert abs(w.sum() - 1.0) < 1e-12 and (w >= 0).all()
    spread = lam.max() - lam.min()
    w1 = w1_to_spectrum(d.quadrature, lam)
    assert w1 < 0.01 * spread, w1
    # The distance is sensitive: a spectrum shifted by 2 % of the spread is far away.
    assert w1_to_spectrum(d.quadrature, lam + 0.02 * spread) > 2 * w1
    assert d.density.shape == d.grid.shape == d.standard_error.shape
    assert d.quadrature.matvecs == 8 * 60


def test_gaussian_broadening_is_the_closed_form_on_one_node_per_probe():
    # A = c I: every probe's rule is the single node c with weight 1.
    A = 2.5 * torch.eye(30, dtype=torch.float64)
    d = spectral_density(A, num_probes=3, lanczos_steps=5, sigma=0.1, num_points=201)
    for x, w in zip(d.nodes, d.weights):
        np.testing.assert_allclose(x, [2.5], rtol=1e-14)
        np.testing.assert_allclose(w, [1.0], rtol=1e-14)
    expected = np.exp(-0.5 * ((d.grid - 2.5) / 0.1) ** 2) / (0.1 * math.sqrt(2 * math.pi))
    np.testing.assert_allclose(d.density, expected, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(d.standard_error, 0.0, atol=1e-12)
    assert d.quadrature.matvecs == 3  # the Krylov space is invariant after one step


@pytest.mark.parametrize("reorth", ["full", "none"])
def test_quadrature_reproduces_the_probe_moments(two_bulk, reorth):
    # Gauss quadrature with m nodes is exact for degree <= 2m - 1: sum_j tau_j^2 theta_j^k
    # = q^T A^k q for the normalised probe q. Without reorthogonalization the ghosts
    # only split weight, so the moments still hold.
    A, _ = two_bulk
    rule = slq_quadrature(A, num_probes=2, lanczos_steps=40, reorth=reorth, seed=5)
    gen = torch.Generator().manual_seed(5)
    V = torch.randint(0, 2, (A.shape[0], 2), generator=gen).double() * 2 - 1
    for p in range(2):
        q = V[:, p] / V[:, p].norm()
        for k in range(1, 7):
            exact = float(q @ torch.linalg.matrix_power(A, k) @ q)
            approx = float((rule.weights[p] * rule.nodes[p] ** k).sum())
            assert approx == pytest.approx(exact, rel=1e-9)


def test_density_of_small_model_ggn_matches_dense_spectrum():
    problem = R.mlp_ce("mean")
    names = R.selected_names(problem.model, None)
    dense = R.dense_ggn(problem.model, names, problem.spec, problem.batches)
    lam = torch.linalg.eigvalsh(dense).numpy()
    op = GGNOperator(problem.model, problem.spec.module(), problem.batches)
    d = spectral_density(op, num_probes=6, lanczos_steps=40, seed=1)
    assert abs(d.integral() - 1.0) < 1e-6
    w1 = w1_to_spectrum(d.quadrature, lam)
    assert w1 < 0.01 * lam.max(), (w1, lam.max())
    # The rank-deficient GGN (rank <= 15 examples x 2) makes every probe's Krylov space
    # invariant before 40 steps: the runs stop early, with exact quadrature.
    assert all(x.size <= 31 for x in d.nodes)
    assert d.quadrature.matvecs < 6 * 40


def test_log_scale_density():
    lam = torch.logspace(-6, 2, 120, dtype=torch.float64)
    A = R.matrix_with_spectrum(lam, seed=2)
    d = spectral_density(A, num_probes=6, lanczos_steps=60, log_scale=True, seed=4)
    assert d.scale == "log" and d.weight_below_floor == 0.0
    assert abs(d.integral() - 1.0) < 1e-6
    # The density of ln λ is uniform over [ln 1e-6, ln 1e2]: its mean is the midpoint.
    t = np.log(d.grid)
    mean_log = np.trapezoid(d.density * t, t)
    assert mean_log == pytest.approx(np.log(lam.numpy()).mean(), abs=0.3)
    # A floor above some nodes puts their mass at the floor, and says how much.
    d2 = spectral_density(
        A, num_probes=6, lanczos_steps=60, log_scale=True, log_floor=1e-2, seed=4
    )
    assert 0.3 < d2.weight_below_floor < 0.7  # half the spectrum lies below 1e-2


def test_trace_function_and_logdet_within_three_standard_errors():
    gen = torch.Generator().manual_seed(11)
    lam = 0.1 + 9.9 * torch.rand(150, generator=gen, dtype=torch.float64)
    A = R.matrix_with_spectrum(lam, seed=3)
    cases = [
        (log_determinant(A, num_probes=30, lanczos_steps=20, seed=0), torch.log(lam).sum()),
        (
            log_determinant(A, damping=0.5, num_probes=30, lanczos_steps=20, seed=1),
            torch.log(lam + 0.5).sum(),
        ),
        (trace_function(A, np.sqrt, num_probes=30, lanczos_steps=20, seed=2), lam.sqrt().sum()),
        (
            trace_function(A, lambda x: np.exp(-x), num_probes=30, lanczos_steps=20, seed=3),
            torch.exp(-lam).sum(),
        ),
    ]
    for est, exact in cases:
        exact = float(exact)
        assert est.standard_error < 0.05 * abs(exact)  # the error bar is informative
        assert abs(est.value - exact) <= 3 * est.standard_error, (est.value, exact)
        assert est.samples.mean() == pytest.approx(est.value, rel=1e-14)
        assert est.num_probes == 30 and est.matvecs == 30 * 20


def test_slq_trace_of_identity_function_is_exact_for_rademacher():
    # n * q^T A q = v^T A v for Rademacher v (|v|^2 = n): each sample is Hutchinson's.
    A = R.matrix_with_spectrum(torch.linspace(1, 5, 50, dtype=torch.float64), seed=4)
    est = trace_function(A, lambda x: x, num_probes=4, lanczos_steps=10, seed=9)
    gen = torch.Generator().manual_seed(9)
    V = torch.randint(0, 2, (50, 4), generator=gen).double() * 2 - 1
    np.testing.assert_allclose(est.samples, ((A @ V) * V).sum(0).numpy(), rtol=1e-12)


def test_same_result_from_numpy_scipy_and_torch_inputs():
    A = R.matrix_with_spectrum(torch.linspace(0, 3, 40, dtype=torch.float64), seed=6)
    ref = slq_quadrature(A, num_probes=2, lanczos_steps=10, seed=1)
    for other in (A.numpy(), aslinearoperator(A.numpy())):
        rule = slq_quadrature(other, num_probes=2, lanczos_steps=10, seed=1)
        for x, y in zip(rule.nodes, ref.nodes):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)
    other_seed = slq_quadrature(A, num_probes=2, lanczos_steps=10, seed=2)
    assert not np.allclose(other_seed.nodes[0], ref.nodes[0])


def test_float32_operator_runs_in_float32():
    A = R.matrix_with_spectrum(torch.linspace(0.5, 3, 60, dtype=torch.float64), seed=8)
    rule32 = slq_quadrature(A.float(), num_probes=2, lanczos_steps=15, seed=0)
    rule64 = slq_quadrature(A, num_probes=2, lanczos_steps=15, seed=0)
    for x, y in zip(rule32.nodes, rule64.nodes):
        np.testing.assert_allclose(x, y, rtol=1e-4)


def test_bad_input_is_refused():
    A = torch.eye(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="exceeds the dimension"):
        slq_quadrature(A, lanczos_steps=11)
    with pytest.raises(ValueError, match="reorth"):
        slq_quadrature(A, lanczos_steps=5, reorth="partial")
    with pytest.raises(ValueError, match="probe"):
        slq_quadrature(A, lanczos_steps=5, probe="uniform")
    with pytest.raises(TypeError, match="seed"):
        slq_quadrature(A, lanczos_steps=5, seed=1.5)
    with pytest.raises(ValueError, match="num_probes"):
        slq_quadrature(A, lanczos_steps=5, num_probes=0)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(A, lanczos_steps=5, sigma=-1.0)
    with pytest.raises(ValueError, match="positive spectrum"):
        spectral_density(-A, lanczos_steps=5, log_scale=True)
    with pytest.raises(ValueError, match="log_floor"):
        spectral_density(A, lanczos_steps=5, log_floor=1e-3)
    indefinite = torch.diag(torch.linspace(-1, 1, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="not positive definite"):
        log_determinant(indefinite, lanczos_steps=5)
    with pytest.raises(ValueError, match="damping"):
        log_determinant(A, lanczos_steps=5, damping=-1.0)
    with pytest.raises(ValueError, match="square"):
        slq_quadrature(torch.zeros(3, 4, dtype=torch.float64), lanczos_steps=2)
    nan_op = torch.full((5, 5), float("nan"), dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        slq_quadrature(nan_op, lanczos_steps=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reorth", ["full", "none"])
def test_non_finite_product_raises_one_error(bad, reorth):
    from curvops.solvers import NonFiniteProductError
    from curvops.solvers.lanczos_coefficients import lanczos_coefficients

    A = torch.eye(8, dtype=torch.float64)
    A[3, 3] = bad
    match = "lanczos_coefficients: the operator returned NaN/Inf at step 1"
    for run in (lambda: slq_quadrature(A, lanczos_steps=3, reorth=reorth),
                lambda: spectral_density(A, lanczos_steps=3, reorth=reorth),
                lambda: trace_function(A, np.exp, lanczos_steps=3, reorth=reorth),
                lambda: log_determinant(A, lanczos_steps=3, reorth=reorth),
                lambda: lanczos_coefficients(A, torch.ones(8, dtype=torch.float64), 3,
                                             reorth=reorth)):
        with pytest.raises(NonFiniteProductError, match=match):
            run()


@pytest.mark.gpu
def test_cuda_matches_cpu():
    from curvops.solvers.trace import hutchinson_diagonal, hutchpp_trace

    A = R.matrix_with_spectrum(two_bulk_spectrum(120), seed=1)
    Ac = A.cuda()
    cpu = slq_quadrature(A, num_probes=3, lanczos_steps=30, seed=2)
    gpu = slq_quadrature(Ac, num_probes=3, lanczos_steps=30, seed=2)  # same probes
    for x, y in zip(cpu.nodes, gpu.nodes):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)
    d = spectral_density(Ac, quadrature=None, num_probes=3, lanczos_steps=30, seed=2)
    assert abs(d.integral() - 1.0) < 1e-6
    assert hutchpp_trace(Ac, matvecs=30, seed=1).value == pytest.approx(
        hutchpp_trace(A, matvecs=30, seed=1).value, rel=1e-10
    )
    diag = hutchinson_diagonal(Ac, num_probes=10, seed=0)
    assert diag.diagonal.device.type == "cuda"
    torch.testing.assert_close(
        diag.diagonal.cpu(), hutchinson_diagonal(A, num_probes=10, seed=0).diagonal
    )
