"""Thick-restart Lanczos (``ncv``): a bounded basis, proven against dense references.

References: ``numpy.linalg.eigvalsh`` of the dense matrix, ``scipy.sparse.linalg.eigsh``
on a curvature operator, and the unrestarted ``full`` strategy on the same operator.
Every case below restarts (``restarts > 0`` is asserted), so the restart path is what is
tested, not a run that never filled its basis.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch
from curvops.solvers import NonSymmetricOperatorError
from curvops.solvers._thick_restart import kept_count
from curvops.solvers.lanczos import LanczosConfig, lanczos
from curvops.solvers.memory_estimate import lanczos_memory_bytes

N = 300
# Six separated values at each end of a dense bulk.
SPECTRUM = np.concatenate([[5.0, 4.6, 4.1, 3.9, 3.5, 3.3], np.linspace(1.0, 2.0, N - 12),
                           [0.0, 0.1, 0.25, 0.4, 0.6, 0.7]])


def _matrix(spectrum: np.ndarray, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((spectrum.size, spectrum.size)))
    return torch.tensor((Q * spectrum) @ Q.T)


@pytest.fixture(scope="module")
def dense() -> tuple[torch.Tensor, np.ndarray]:
    A = _matrix(SPECTRUM)
    return A, np.linalg.eigvalsh(A.numpy())


def _expected(ref: np.ndarray, k: int, which: str) -> np.ndarray:
    if which == "LA":
        return ref[::-1][:k]
    if which == "SA":
        return ref[:k]
    if which == "LM":
        return ref[np.argsort(-np.abs(ref), kind="stable")][:k]
    top, bottom = k - k // 2, k // 2
    return np.sort(np.concatenate([ref[::-1][:top], ref[:bottom]]))[::-1]


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
@pytest.mark.parametrize("ncv", [7, 10, 16])
def test_matches_dense_eigenvalues_and_vectors(dense, which: str, ncv: int) -> None:
    A, ref = dense
    k = 5
    # (ncv = k + 2 at the clustered small end takes 1706 products with 2 threads and 3306
    # with 1: the rounding of the products, which the thread count changes, sets the pace)
    res = lanczos(A, k, which=which, ncv=ncv, tol=1e-10, maxiter=6000)
    assert res.restarts > 0 and res.ncv == ncv
    assert res.all_converged and res.verified
    np.testing.assert_allclose(res.eigenvalues, _expected(ref, k, which), rtol=0, atol=1e-9)
    # The vectors: true residuals and orthonormality, checked here without the solver.
    Y = res.eigenvectors
    R = A @ Y - Y * torch.as_tensor(res.eigenvalues)
    assert float(torch.linalg.vector_norm(R, dim=0).max()) < 1e-8
    np.testing.assert_allclose((Y.T @ Y).numpy(), np.eye(k), atol=1e-10)
    assert res.orthogonality_loss < 1e-12
    assert res.iterations <= 6000 and res.matvecs == res.iterations + k


def test_memory_is_bounded_by_ncv(dense) -> None:
    A, _ = dense
    ncv, k = 8, 4
    res = lanczos(A, k, ncv=ncv, tol=1e-10, maxiter=400, return_eigenvectors=False)
    assert res.restarts > 3
    vec = N * 8
    # The basis (ncv rows) and w: nothing grows with the iterations.
    assert res.peak_memory_bytes <= (ncv + 1) * vec
    est = lanczos_memory_bytes(N, "full", torch.float64, torch.float64, 400, k, ncv=ncv,
                               return_eigenvectors=False)
    assert res.peak_memory_bytes <= est["total"]
    unbounded = lanczos(A, k, tol=1e-10, maxiter=400, return_eigenvectors=False)
    assert unbounded.peak_memory_bytes > 2 * res.peak_memory_bytes
    np.testing.assert_allclose(res.eigenvalues, unbounded.eigenvalues, rtol=1e-12)


def test_ncv_at_or_above_the_iterations_is_the_unrestarted_run(dense) -> None:
    A, _ = dense
    plain = lanczos(A, 5, tol=1e-10, maxiter=60)
    same = lanczos(A, 5, tol=1e-10, maxiter=60, ncv=60)
    assert same.restarts == 0 and same.ncv is None
    np.testing.assert_array_equal(plain.eigenvalues, same.eigenvalues)
    assert plain.matvecs == same.matvecs


def test_maxiter_caps_the_products_and_says_not_converged(dense) -> None:
    A, ref = dense
    res = lanczos(A, 5, which="SA", ncv=7, tol=1e-12, maxiter=25)
    assert res.iterations == 25 and res.matvecs == 30
    assert not res.all_converged  # 25 products are too few for 1e-12
    # What it reports as converged, if anything, is right.
    for value, ok in zip(res.eigenvalues, res.converged):
        if ok:
            assert np.min(np.abs(ref - value)) < 1e-9


def test_agrees_with_eigsh_on_a_curvature_operator() -> None:
    zoo = pytest.importorskip("curvops.validation.zoo")
    linops = pytest.importorskip("curvops.linops")
    prob = zoo.build("mlp", dtype=torch.float64, seed=0)
    op = linops.GGNOperator(prob.model, prob.loss_fn, prob.data)
    res = lanczos(op, 5, ncv=12, tol=1e-10, maxiter=2000)
    assert res.restarts > 0 and res.all_converged
    ref = sla.eigsh(op.to_scipy(), k=5, which="LA", tol=1e-12,
                    v0=np.ones(op.shape[0]), return_eigenvectors=False)
    np.testing.assert_allclose(res.eigenvalues, np.sort(ref)[::-1], rtol=1e-9)


def test_breakdown_on_a_low_rank_operator() -> None:
    # Rank 3: the Krylov space is exhausted after 3 steps; the run continues with fresh
    # vectors and reports the zero eigenvalue as often as asked, like the unrestarted one.
    rng = np.random.default_rng(3)
    U, _ = np.linalg.qr(rng.standard_normal((40, 3)))
    A = torch.tensor((U * np.array([3.0, 2.0, 1.0])) @ U.T)
    res = lanczos(A, 4, ncv=6, tol=1e-10, maxiter=200)
    np.testing.assert_allclose(res.eigenvalues, [3.0, 2.0, 1.0, 0.0], atol=1e-10)
    assert res.breakdowns >= 1


def test_noisy_operator_with_operator_eps() -> None:
    # A 1e-3-accurate, non-linear, non-symmetric product (a model of a bf16 one): the
    # values are within the contract's accuracy, and the noise is measured.
    spectrum = np.concatenate([[10, 8, 6, 4, 2.5],
                               np.random.default_rng(0).uniform(0, 1.5, 195)])
    A = _matrix(spectrum, seed=1)
    gen = torch.Generator().manual_seed(1)

    class Noisy:
        shape = (200, 200)
        dtype = torch.float64
        device = torch.device("cpu")

        def matvec(self, v):
            u = A @ v
            g = torch.randn(200, generator=gen, dtype=torch.float64)
            return u + 1e-3 * torch.linalg.vector_norm(u) * g / 200**0.5

    res = lanczos(Noisy(), 5, ncv=9, tol=1e-10, maxiter=150, operator_eps=1e-3,
                  return_eigenvectors=False)
    assert res.restarts > 0
    np.testing.assert_allclose(res.eigenvalues, spectrum[:5], atol=3e-2, rtol=0)
    assert res.process_eps >= 1e-3 and res.operator_accuracy > 1e-5


def test_bf16_operator_with_float32_basis() -> None:
    zoo = pytest.importorskip("curvops.validation.zoo")
    linops = pytest.importorskip("curvops.linops")
    prob = zoo.build("mlp", dtype=torch.bfloat16, seed=0)
    model64 = copy.deepcopy(prob.model).double()
    data64 = [(X.double(), y) for X, y in prob.data]
    ref = np.sort(np.linalg.eigvalsh(
        linops.GGNOperator(model64, prob.loss_fn, data64).to_dense().numpy()))[::-1]
    op = linops.GGNOperator(prob.model, prob.loss_fn, prob.data)
    res = lanczos(op, 4, ncv=8, tol=1e-5, maxiter=300, basis_dtype=torch.float32,
                  return_eigenvectors=False)
    np.testing.assert_allclose(res.eigenvalues, ref[:4], rtol=3e-2)
    assert np.all(-np.diff(res.eigenvalues) > 1e-2 * ref[0])  # no ghost


def test_a_non_symmetric_operator_is_refused() -> None:
    rng = np.random.default_rng(0)
    B = torch.tensor(rng.standard_normal((50, 50)))
    with pytest.raises(NonSymmetricOperatorError):
        lanczos(B, 3, ncv=6, tol=1e-8, maxiter=100)


@pytest.mark.parametrize("kwargs, match", [
    ({"ncv": 6, "reorth": "partial"}, "reorth='full'"),
    ({"ncv": 6, "reorth": "none"}, "reorth='full'"),
    ({"ncv": 4}, "ncv"),  # below k + 2
    ({"ncv": 6, "basis_dtype": torch.bfloat16}, "float32 or float64"),
    ({"ncv": 6, "rayleigh_ritz": True}, "rayleigh_ritz"),
    ({"ncv": 301}, "at most the operator size"),
])
def test_bad_settings_are_refused_before_any_product(dense, kwargs, match) -> None:
    A, _ = dense
    calls = []

    class Counting:
        shape, dtype, device = A.shape, A.dtype, A.device

        def matvec(self, v):
            calls.append(1)
            return A @ v

    with pytest.raises(ValueError, match=match):
        lanczos(Counting(), 3, **kwargs)
    assert not calls


def test_ncv_settings_are_checked_with_the_config(dense) -> None:
    A, _ = dense
    with pytest.raises(ValueError, match=r"ncv must be an int >= 7"):
        LanczosConfig(k=5, ncv=3)  # checked when the config is made
    cfg = LanczosConfig(k=3, ncv=8)
    with pytest.raises(ValueError, match=r"config.ncv=8 \(thick restart\).*reorth='full'"):
        lanczos(A, config=cfg, reorth="partial")


def test_kept_count() -> None:
    assert kept_count(7, 5) == 6
    assert kept_count(12, 5) == 8
    assert all(k < kept_count(ncv, k) < ncv for k in range(1, 10) for ncv in range(k + 2, 40))


def test_one_by_one_verification_decides_as_the_batched_one() -> None:
    # The same pairs, products and predictions: the streamed check (slice by slice, one
    # product at a time) gives the batched check's residuals, noise and verdicts.
    from curvops.solvers._ritz_verification import (
        verify_ritz_pairs,
        verify_ritz_pairs_one_by_one,
    )

    rng = np.random.default_rng(5)
    n, p = 1000, 4
    A = _matrix(np.concatenate([[4.0, 3.0, 2.0, 1.5], rng.uniform(0, 1, n - 4)]), seed=2)
    evals, evecs = np.linalg.eigh(A.numpy())
    gen = torch.Generator().manual_seed(0)
    Y = torch.tensor(evecs[:, ::-1][:, :p].T.copy())
    Y += 1e-11 * torch.randn(p, n, generator=gen, dtype=torch.float64)
    Y[1] = Y[0] + 1e-11 * torch.randn(n, generator=gen, dtype=torch.float64)  # a ghost
    theta = np.array([4.0, 4.0, 2.0, 1.5 + 1e-3])  # the last one is off: it must fail
    AY = (A @ Y.T).T
    P = AY + 1e-9 * torch.randn(p, n, generator=gen, dtype=torch.float64)  # a noisy prediction
    bound = np.ones(p, dtype=bool)
    batched = verify_ritz_pairs(Y.clone(), AY.clone(), theta, bound, 4.0, 1e-6, 1e-15,
                                P.clone())
    streamed = verify_ritz_pairs_one_by_one(
        list(Y), lambda y: A @ y, lambda i, c0, c1: P[i, c0:c1].clone(), theta, bound, 4.0,
        1e-6, 1e-15, slice_cols=96)
    np.testing.assert_allclose(streamed.residuals, batched.residuals, rtol=1e-10, atol=1e-15)
    assert streamed.noise == pytest.approx(batched.noise, rel=1e-8)
    np.testing.assert_array_equal(streamed.converged, batched.converged)
    np.testing.assert_array_equal(batched.converged, [True, False, True, False])
    assert streamed.notes == batched.notes


def test_one_by_one_verification_holds_one_product_at_a_time() -> None:
    # Every allocation counted (torch's CPU allocation events): checking four pairs never
    # holds more than the product being checked, so a basis as large as memory allows
    # leaves room for the check. (A slice view of the previous product once kept it alive
    # through the next one.)
    from curvops.linops.memory_probe import cpu_allocation_peak
    from curvops.solvers._ritz_verification import verify_ritz_pairs_one_by_one

    n, p = 1 << 18, 4
    gen = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=gen)
    Y = torch.randn(p, n, generator=gen)
    Y /= Y.norm(dim=1, keepdim=True)
    with cpu_allocation_peak() as peak:
        verify_ritz_pairs_one_by_one(
            list(Y), lambda y: d * y, lambda i, c0, c1: (d[c0:c1] * Y[i, c0:c1]),
            np.ones(p), np.ones(p, dtype=bool), 1.0, 1e-4, 1e-7, slice_cols=1 << 14)
    assert peak["peak_bytes"] < 1.5 * n * 4  # the product and a few slices


def test_the_recurrence_writes_products_into_its_residual_buffer(dense) -> None:
    """An operator with ``matvec_into`` gets the solver's residual buffer for every product
    of the recurrence (the verification's products are its own), and the run is the one
    without it, bit for bit."""
    from curvops.linops.base import LinearOperatorBase

    A, ref = dense

    class Dense(LinearOperatorBase):
        def __init__(self, into: bool) -> None:
            self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device
            self.into, self.buffers = into, set()

        def _matmat(self, V: torch.Tensor) -> torch.Tensor:
            return A @ V

        def matvec_into(self, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            self.buffers.add(out.data_ptr())
            return torch.mv(A, v, out=out)

    with_buffer = Dense(True)
    res = lanczos(with_buffer, 5, which="LA", ncv=10, tol=1e-10, maxiter=500)
    plain = lanczos(A, 5, which="LA", ncv=10, tol=1e-10, maxiter=500)
    assert res.restarts > 0 and res.all_converged and res.verified
    assert len(with_buffer.buffers) == 1  # one buffer: the residual w, every product
    np.testing.assert_array_equal(res.eigenvalues, plain.eigenvalues)
    assert res.matvecs == plain.matvecs
