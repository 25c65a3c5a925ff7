"""Lanczos on operators less accurate than float64.

A bf16 operator's products carry relative noise ~2^-8 and are not exactly linear or
symmetric; the thresholds of every strategy must follow that precision (eps_A), not the
float64/float32 epsilon of the vectors. Proofs: a bf16 zoo model against the float64
operator of the *same* (bf16-rounded) weights, and a float64 matrix whose products carry
controlled 1e-3 noise. Also the bare coefficient recurrence and the block product.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from curvops.solvers._as_operator import as_operator
from curvops.solvers.lanczos import LanczosConfig, lanczos
from curvops.solvers.lanczos_coefficients import lanczos_coefficients
from scipy.sparse.linalg import LinearOperator

STRATEGIES = ("full", "selective", "partial", "none")
BF16_REL_TOL = 3e-2  # relative error allowed on each of the top k (measured: <= 6e-3)


# ------------------------------------------------------------------ bf16 tiny model
@pytest.fixture(scope="module")
def bf16_pair():
    zoo = pytest.importorskip("curvops.validation.zoo")
    linops = pytest.importorskip("curvops.linops")
    torch.manual_seed(0)
    prob = zoo.build("mlp", dtype=torch.bfloat16, seed=0)
    model64 = copy.deepcopy(prob.model).double()  # the same (bf16-rounded) weights
    data64 = [(X.double(), y) for X, y in prob.data]
    ops = {}
    for name, cls in (("ggn", linops.GGNOperator), ("ef", linops.EmpiricalFisherOperator)):
        op_bf16 = cls(prob.model, prob.loss_fn, prob.data)
        dense = cls(model64, prob.loss_fn, data64).to_dense().numpy()
        ops[name] = (op_bf16, np.sort(np.linalg.eigvalsh(dense))[::-1])
    return ops


@pytest.mark.parametrize("name", ["ggn", "ef"])
@pytest.mark.parametrize("reorth", STRATEGIES)
@pytest.mark.parametrize("long_run", [False, True])
def test_bf16_operator_no_ghosts(bf16_pair, name: str, reorth: str, long_run: bool) -> None:
    op, ref = bf16_pair[name]
    assert op.dtype == torch.bfloat16
    k = 4 if name == "ggn" else 3
    # tol=0 runs to max_iters: the stress case for ghosts (they appear as runs go on).
    cfg = LanczosConfig(reorth=reorth, tol=0 if long_run else 1e-10,
                        max_iters=(60 if reorth != "none" else 150) if long_run else 300,
                        return_eigenvectors=False)
    res = lanczos(op, k, config=cfg)
    assert res.eigenvalues.size == k
    np.testing.assert_allclose(res.eigenvalues, ref[:k], rtol=BF16_REL_TOL)
    # No ghost: k distinct values (a copy of lambda_1 would break the match above too).
    assert np.all(-np.diff(res.eigenvalues) > 1e-2 * ref[0])
    assert res.process_eps == torch.finfo(torch.bfloat16).eps
    if not long_run:
        assert res.tol_used == res.process_eps  # tol=1e-10 raised to the floor, with a note
        assert any("below the precision" in note for note in res.notes)


def test_bf16_operator_fp32_basis(bf16_pair) -> None:
    # An fp32 basis does not make a bf16 operator precise: eps_A is still bf16's.
    op, ref = bf16_pair["ggn"]
    for reorth in ("selective", "partial"):
        res = lanczos(op, 4, config=LanczosConfig(reorth=reorth, tol=1e-5,
                                                  dtype_compute=torch.float32))
        np.testing.assert_allclose(res.eigenvalues, ref[:4], rtol=BF16_REL_TOL)
        assert res.process_eps == torch.finfo(torch.bfloat16).eps


# ------------------------------------------------- a controlled noisy float64 operator
N_NOISY = 200
SPECTRUM = np.concatenate([[10, 8, 6, 4, 2.5],
                           np.random.default_rng(0).uniform(0, 1.5, N_NOISY - 5)])


class NoisyOperator:
    """``A v + 1e-3 ||A v|| g / sqrt(n)`` with fresh seeded noise ``g`` per product: not
    linear, not symmetric, accurate to ~1e-3 (a model of a bf16 product)."""

    shape = (N_NOISY, N_NOISY)
    dtype = torch.float64
    device = torch.device("cpu")

    def __init__(self) -> None:
        rng = np.random.default_rng(1)
        Q, _ = np.linalg.qr(rng.standard_normal(self.shape))
        self.A = torch.tensor((Q * SPECTRUM) @ Q.T)
        self.gen = torch.Generator().manual_seed(1)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        u = self.A @ v
        g = torch.randn(N_NOISY, generator=self.gen, dtype=torch.float64)
        return u + 1e-3 * torch.linalg.vector_norm(u) * g / N_NOISY**0.5


@pytest.mark.parametrize("reorth", STRATEGIES)
@pytest.mark.parametrize("tol", [1e-10, 0.0])
def test_noisy_operator_with_operator_eps(reorth: str, tol: float) -> None:
    cap = 100 if reorth != "none" else 300
    res = lanczos(NoisyOperator(), 5, config=LanczosConfig(
        reorth=reorth, tol=tol, max_iters=cap, operator_eps=1e-3, return_eigenvectors=False))
    # Eigenvalues of a 1e-3-accurate operator: within 3e-3 ||A|| (measured <= 1.1e-3), and
    # no ghost (a copy of 10 in the second slot would be off by 2).
    np.testing.assert_allclose(res.eigenvalues, SPECTRUM[:5], atol=3e-3 * 10, rtol=0)
    assert res.process_eps == 1e-3


@pytest.mark.parametrize("reorth", ["selective", "none"])
def test_noisy_operator_without_operator_eps_is_measured(reorth: str) -> None:
    # Without operator_eps the run measures the noise itself (with float64 thresholds it
    # goes unnoticed and lambda_1 fills the top slots: 10.001 five times).
    cap = 150 if reorth != "none" else 450
    res = lanczos(NoisyOperator(), 5, config=LanczosConfig(
        reorth=reorth, tol=1e-10, max_iters=cap, return_eigenvectors=False))
    assert np.sum(np.abs(res.eigenvalues - 10.0) < 0.05) == 1
    np.testing.assert_allclose(res.eigenvalues, SPECTRUM[:5], atol=3e-3 * 10, rtol=0)
    assert res.process_eps > 1e-6  # raised far above float64's epsilon by measurement


@pytest.mark.parametrize("reorth", ["selective", "partial"])
def test_negative_control_without_measurement_ghosts_are_caught(monkeypatch, reorth) -> None:
    # A solver with float64 thresholds on a noisy operator: measurement and probes
    # switched off. It returns wrong values; the verification must catch them all.
    from curvops.solvers import _lanczos_strategies, _operator_accuracy

    monkeypatch.setattr(_operator_accuracy.AccuracyMonitor, "observe",
                        lambda self, t, s, tnorm, it: 1.0)
    monkeypatch.setattr(_lanczos_strategies._BasisStrategy, "probe", lambda self, j, w: None)
    monkeypatch.setattr(_lanczos_strategies._BasisStrategy, "_grew", lambda self, st: False)
    res = lanczos(NoisyOperator(), 5, config=LanczosConfig(
        reorth=reorth, tol=1e-10, max_iters=150))
    wrong = np.abs(res.eigenvalues - SPECTRUM[: res.eigenvalues.size]) > 100 * 1e-3 * 10
    assert wrong.any()  # the control does produce wrong values ...
    assert not np.any(wrong & res.converged)  # ... and none of them is flagged converged


def test_operator_eps_and_tol_floor_are_validated() -> None:
    for bad in (0.0, 1.0, -1e-3, float("nan"), "1e-3"):
        with pytest.raises(ValueError, match="operator_eps"):
            LanczosConfig(operator_eps=bad)
    A = np.diag(np.arange(1.0, 31.0))
    res = lanczos(A, 3, config=LanczosConfig(tol=1e-8))
    assert res.tol_used == 1e-8 and not res.notes  # float64: nothing raised
    res = lanczos(A.astype(np.float32), 3, config=LanczosConfig(tol=1e-10))
    assert res.tol_used == float(np.finfo(np.float32).eps)
    assert "below the precision" in res.notes[0]
    np.testing.assert_allclose(res.eigenvalues, [30, 29, 28], rtol=1e-5)


# -------------------------------------------------- operators that keep their output
class CachingOperator:
    """Returns the *same* tensor for a repeated input (a product cache): a solver that
    updates the operator's output in place corrupts the cache."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A, self.shape, self.dtype, self.device = A, A.shape, A.dtype, A.device
        self.cache: dict[bytes, torch.Tensor] = {}

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        key = v.numpy().tobytes()
        if key not in self.cache:
            self.cache[key] = self.A @ v
        return self.cache[key]


@pytest.mark.parametrize("reorth", STRATEGIES)
def test_operator_output_is_never_modified(reorth: str) -> None:
    rng = np.random.default_rng(3)
    ev = np.concatenate([[5.0, 4.0, 3.0], rng.uniform(0, 1, 57)])
    Q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    A = torch.tensor((Q * ev) @ Q.T)
    op = CachingOperator(A)
    res = lanczos(op, 3, config=LanczosConfig(reorth=reorth, tol=1e-10))
    for key, out in op.cache.items():
        v = torch.from_numpy(np.frombuffer(key, dtype=np.float64).copy())
        torch.testing.assert_close(out, A @ v, rtol=0, atol=0)
    np.testing.assert_allclose(res.eigenvalues, [5, 4, 3], rtol=1e-10)
    if res.eigenvectors is not None:  # "none": the second pass reads the cache
        resid = A @ res.eigenvectors - res.eigenvectors * torch.tensor(res.eigenvalues)
        assert float(resid.abs().max()) < 1e-6


# ----------------------------------------------------- the bare coefficient recurrence
def _reference_lanczos(A: np.ndarray, q: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Textbook Lanczos with full reorthogonalization (modified Gram–Schmidt, twice)."""
    Q = [q / np.linalg.norm(q)]
    a, b = [], []
    for j in range(m):
        w = A @ Q[j]
        a.append(Q[j] @ w)
        for _ in range(2):
            for x in Q:
                w = w - (x @ w) * x
        if j < m - 1:
            b.append(np.linalg.norm(w))
            Q.append(w / b[-1])
    return np.array(a), np.array(b)


def test_lanczos_coefficients_match_reference_and_block_equals_columns() -> None:
    rng = np.random.default_rng(5)
    ev = np.concatenate([[4.0, 3.0], rng.uniform(0, 1, 48)])
    Qm, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    A = (Qm * ev) @ Qm.T
    starts = torch.tensor(rng.standard_normal((50, 3)))
    block = lanczos_coefficients(A, starts, 12, reorth="full")
    assert block.matvecs == 36 and len(block.alphas) == 3
    for p in range(3):
        a, b = _reference_lanczos(A, starts[:, p].numpy(), 12)
        np.testing.assert_allclose(block.alphas[p], a, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(block.betas[p], b, rtol=1e-10, atol=1e-12)
        single = lanczos_coefficients(torch.tensor(A), starts[:, p], 12, reorth="none")
        np.testing.assert_allclose(single.alphas[0], a, rtol=1e-8, atol=1e-10)
    # n steps with full reorthogonalization: T has A's spectrum.
    full = lanczos_coefficients(A, starts[:, 0], 50, reorth="full")
    T = np.diag(full.alphas[0]) + np.diag(full.betas[0], 1) + np.diag(full.betas[0], -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), np.sort(ev), atol=1e-10)


def test_lanczos_coefficients_bad_input() -> None:
    A = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="reorth"):
        lanczos_coefficients(A, torch.ones(5, dtype=torch.float64), 2, reorth="partial")
    with pytest.raises(TypeError, match="float32"):
        lanczos_coefficients(A, torch.ones(5), 2)
    with pytest.raises(ValueError, match="steps"):
        lanczos_coefficients(A, torch.ones(5, dtype=torch.float64), 6)
    with pytest.raises(ValueError, match="zero"):
        lanczos_coefficients(A, torch.zeros(5, 2, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="start"):
        lanczos_coefficients(A, torch.ones(4, dtype=torch.float64), 2)


# ------------------------------------------------------------------ block products
class CountingScipy(LinearOperator):
    def __init__(self, A: np.ndarray) -> None:
        super().__init__(dtype=A.dtype, shape=A.shape)
        self.A, self.matvec_calls, self.matmat_calls = A, 0, 0

    def _matvec(self, x):
        self.matvec_calls += 1
        return self.A @ x

    def _matmat(self, X):
        self.matmat_calls += 1
        return self.A @ X


def test_matmat_is_one_batched_product_for_every_kind() -> None:
    rng = np.random.default_rng(7)
    A = rng.standard_normal((20, 20))
    V = torch.tensor(rng.standard_normal((20, 4)))
    expected = torch.tensor(A) @ V
    counting = CountingScipy(A)
    for wrapped in (A, torch.tensor(A), counting):
        torch.testing.assert_close(as_operator(wrapped).matmat(V), expected)
    assert counting.matmat_calls == 1 and counting.matvec_calls == 0

    class NoMatmat:  # only matvec: a loop over columns
        shape, dtype, device = (20, 20), torch.float64, torch.device("cpu")

        def matvec(self, v):
            return torch.tensor(A) @ v

    torch.testing.assert_close(as_operator(NoMatmat()).matmat(V), expected)
    with pytest.raises(ValueError, match="block"):
        as_operator(A).matmat(V[:5])


# ------------------------------------------------------------------ bf16 basis upcast bound
@pytest.mark.parametrize("upcast_bytes", [256 << 20, 4 * 3 * 7, 1])
def test_bf16_basis_products_are_exact_under_any_upcast_bound(monkeypatch, upcast_bytes: int):
    """A bf16 basis upcast in column slices (the bound a 1.5e9-parameter basis needs) gives
    the same coefficients, subtraction and combination as the whole basis upcast at once."""
    from curvops.solvers import _reorthogonalization as ro

    monkeypatch.setattr(ro, "_CHUNK_ROWS", 3)
    monkeypatch.setattr(ro, "_UPCAST_BYTES", upcast_bytes)
    gen = torch.Generator().manual_seed(3)
    n, j = 50, 11
    basis = ro.KrylovBasis(n, torch.bfloat16, torch.device("cpu"), block_rows=4)
    for i in range(j):
        basis.set(i, torch.randn(n, generator=gen))
    V = torch.stack([basis.get(i, torch.float64, torch.device("cpu")) for i in range(j)])
    w = torch.randn(n, dtype=torch.float64, generator=gen)

    torch.testing.assert_close(basis.coeffs(w, j), V @ w, rtol=1e-13, atol=1e-13)
    h = torch.randn(j, dtype=torch.float64, generator=gen)
    w2 = w.clone()
    basis.subtract(h, j, w2)
    torch.testing.assert_close(w2, w - V.T @ h, rtol=1e-13, atol=1e-13)
    S = np.random.default_rng(4).standard_normal((j, 2))
    torch.testing.assert_close(
        basis.combine_rows(S, j, torch.float64), torch.as_tensor(S.T) @ V, rtol=1e-13, atol=1e-13
    )


def test_result_reports_measured_process_peak_and_operator_cache():
    from curvops.linops import GGNOperator
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 64), nn.Tanh(), nn.Linear(64, 4)).double()
    op = GGNOperator(model, nn.CrossEntropyLoss(),
                     (torch.randn(256, 30, dtype=torch.float64), torch.randint(0, 4, (256,))))
    res = lanczos(op, 3, tol=1e-10)
    assert res.operator_cache_bytes == op.cache_bytes > 0
    assert res.process_peak_bytes >= 0
    dense = lanczos(torch.diag(torch.arange(40.0, dtype=torch.float64)), 3)
    assert dense.operator_cache_bytes is None
