"""CG, MINRES, preconditioners and the natural-gradient helper against dense solves.

References: ``numpy.linalg.solve`` on dense float64 matrices: matrices with known
spectra, and the dense GGN / Hessian of small MLPs from ``tests/references.py`` (built
without curvops).
"""

from __future__ import annotations

import numpy as np
import pytest
import references as R
import torch
from curvops.linops import GGNOperator, HessianOperator
from curvops.solvers.linear_solve import (
    DiagonalPreconditioner,
    LowRankPreconditioner,
    cg,
    minres,
    natural_gradient,
)
from curvops.solvers.trace import exact_diagonal
from scipy.sparse.linalg import aslinearoperator
from torch import nn


def rhs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def numpy_solve(A: torch.Tensor, b: torch.Tensor, damping: float = 0.0) -> np.ndarray:
    M = A.numpy() + damping * np.eye(A.shape[0])
    return np.linalg.solve(M, b.numpy())


def rel_err(x: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(x.numpy() - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def ill_conditioned_ggn():
    """GGN of an 8-16-4 tanh MLP on 48 off-centre inputs: a few large outliers, a long tail
    and a 92-dimensional null space (rank <= 48 x 3)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    R.reinit_(model, 21, scale=0.7)
    gen = torch.Generator().manual_seed(22)
    batches = [
        (
            2.0 + torch.randn(24, 8, generator=gen, dtype=torch.float64),
            torch.randint(0, 4, (24,), generator=gen),
        )
        for _ in range(2)
    ]
    op = GGNOperator(model, nn.CrossEntropyLoss(), batches)
    names = R.selected_names(model, None)
    dense = R.dense_ggn(model, names, R.LossSpec("ce", "mean"), batches)
    return op, dense


@pytest.mark.parametrize("solver", [cg, minres])
def test_solves_spd_system_to_tolerance(solver):
    A = R.matrix_with_spectrum(torch.logspace(-3, 1, 120, dtype=torch.float64))
    b = rhs(120)
    ref = numpy_solve(A, b, damping=0.01)
    result = solver(A, b, damping=0.01, tol=1e-10)
    assert result.converged
    assert result.relative_residual <= 1e-9  # true residual, recomputed
    # Forward error <= condition number x residual: kappa = 10.01 / 0.011.
    assert rel_err(result.x, ref) <= 1e3 * 1e-10
    assert result.residual_norms[0] == pytest.approx(float(b.norm()))
    assert result.residual_norms[-1] <= 1e-10 * float(b.norm())
    assert result.matvecs == result.iterations + 1
    assert result.method == solver.__name__


def test_minres_solves_indefinite_system_that_cg_refuses():
    lam = torch.cat([-torch.linspace(0.5, 5, 40, dtype=torch.float64),
                     torch.linspace(0.2, 3, 60, dtype=torch.float64)])
    A = R.matrix_with_spectrum(lam, seed=3)
    b = rhs(100, seed=4)
    result = minres(A, b, tol=1e-10)
    assert result.converged and result.relative_residual <= 1e-9
    assert rel_err(result.x, numpy_solve(A, b)) <= 1e-8
    with pytest.raises(ValueError, match="not positive definite"):
        cg(-R.matrix_with_spectrum(torch.linspace(1, 2, 100, dtype=torch.float64)), b)


def test_minres_on_the_hessian_of_a_small_model():
    problem = R.mlp_ce("mean")
    names = R.selected_names(problem.model, None)
    H = R.dense_hessian_double_backward(problem.model, names, problem.spec, problem.batches)
    lam = torch.linalg.eigvalsh(H)
    assert lam.min() < -1e-3 * lam.max()  # the Hessian is indefinite here
    op = HessianOperator(problem.model, problem.spec.module(), problem.batches)
    b = rhs(op.shape[0], seed=5)
    damping = 0.3  # A + λI stays indefinite (13 negative values) but away from singular
    assert (lam + damping).abs().min() > 1e-2 and (lam + damping < 0).sum() > 5
    result = minres(op, b, damping=damping, tol=1e-10)
    assert result.converged and result.relative_residual <= 1e-9
    assert rel_err(result.x, numpy_solve(H, b, damping)) <= 1e-7


def test_cg_on_damped_ggn_operator_matches_dense_solve(ill_conditioned_ggn):
    op, dense = ill_conditioned_ggn
    b = rhs(op.shape[0], seed=6)
    damping = 1e-2
    result = cg(op, b, damping=damping, tol=1e-10)
    assert result.converged and result.relative_residual <= 1e-9
    assert rel_err(result.x, numpy_solve(dense, b, damping)) <= 1e-8


def test_lanczos_low_rank_preconditioner_reduces_cg_iterations(ill_conditioned_ggn):
    op, dense = ill_conditioned_ggn
    lam_max = float(torch.linalg.eigvalsh(dense).max())
    damping = 1e-4 * lam_max  # condition number 1e4 + 1
    b = rhs(op.shape[0], seed=7)
    ref = numpy_solve(dense, b, damping)
    plain = cg(op, b, damping=damping, tol=1e-8)
    pre = LowRankPreconditioner.from_lanczos(op, 20, damping=damping)
    pcg = cg(op, b, damping=damping, tol=1e-8, preconditioner=pre)
    print(
        f"CG iterations on the damped GGN (n={op.shape[0]}, kappa=1e4): plain {plain.iterations}, "
        f"Lanczos rank-20 preconditioner {pcg.iterations} (+{pre.lanczos_matvecs} Lanczos matvecs)"
    )
    for result in (plain, pcg):
        assert result.converged and result.relative_residual <= 1e-7
        assert rel_err(result.x, ref) <= 1e-4 * 1e4
    assert pcg.iterations <= 0.6 * plain.iterations
    # The preconditioned operator's spectrum: the top 20 mapped to ~1, the rest <= 1.
    lam, U = torch.linalg.eigh(dense)
    exact_pre = LowRankPreconditioner(lam[-20:], U[:, -20:], damping)
    MA = torch.stack([exact_pre(c) for c in (dense + damping * torch.eye(op.shape[0])).T], 1)
    mu = torch.linalg.eigvals(MA).real
    assert float(mu.max()) == pytest.approx(1.0, rel=1e-8)
    kappa_after = float(mu.max() / mu.min())
    kappa_before = float((lam[-1] + damping) / (lam[0] + damping))
    assert kappa_after == pytest.approx(float((lam[-20] + damping) / (lam[0] + damping)), rel=1e-6)
    assert kappa_after < kappa_before / 5


def test_diagonal_preconditioner_is_jacobi():
    gen = torch.Generator().manual_seed(8)
    # Badly scaled SPD matrix: D^(1/2) C D^(1/2), C well conditioned.
    C = R.matrix_with_spectrum(torch.linspace(1, 3, 80, dtype=torch.float64), seed=8)
    d = torch.logspace(-3, 3, 80, dtype=torch.float64)[torch.randperm(80, generator=gen)]
    A = d.sqrt()[:, None] * C * d.sqrt()[None, :]
    b = rhs(80, seed=9)
    jacobi = DiagonalPreconditioner(exact_diagonal(A).diagonal)
    plain = cg(A, b, tol=1e-10)
    pcg = cg(A, b, tol=1e-10, preconditioner=jacobi)
    assert pcg.converged and rel_err(pcg.x, numpy_solve(A, b)) <= 1e-6
    assert pcg.iterations < 40 < plain.iterations
    r = rhs(80, seed=10)
    torch.testing.assert_close(jacobi(r), r / torch.diag(A), rtol=1e-14, atol=0)


def test_natural_gradient_in_parameter_shape(ill_conditioned_ggn):
    op, dense = ill_conditioned_ggn
    shapes = [p.shape for p in op.params]
    gen = torch.Generator().manual_seed(12)
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    g_flat = torch.cat([g.reshape(-1) for g in grads])
    ref = numpy_solve(dense, g_flat, 0.1)
    ng = natural_gradient(op, grads, damping=0.1, tol=1e-10)
    assert [t.shape for t in ng.direction] == shapes
    flat = torch.cat([t.reshape(-1) for t in ng.direction])
    assert rel_err(flat, ref) <= 1e-8
    # As a dict keyed by parameter name, and from the parameters' .grad.
    as_dict = natural_gradient(op, dict(zip(op.param_names, grads)), damping=0.1, tol=1e-10)
    assert list(as_dict.direction) == list(op.param_names)
    for p, g in zip(op.params, grads):
        p.grad = g.clone()
    try:
        from_grad = natural_gradient(op, damping=0.1, tol=1e-10, method="minres")
    finally:
        for p in op.params:
            p.grad = None
    assert rel_err(torch.cat([t.reshape(-1) for t in from_grad.direction]), ref) <= 1e-8


def test_scipy_linear_operator_input():
    A = R.matrix_with_spectrum(torch.linspace(1, 4, 50, dtype=torch.float64), seed=13)
    b = rhs(50, seed=14)
    result = cg(aslinearoperator(A.numpy()), b, tol=1e-12)
    assert rel_err(result.x, numpy_solve(A, b)) <= 1e-11


def test_bad_input_is_refused(ill_conditioned_ggn):
    A = torch.eye(4, dtype=torch.float64)
    b = torch.ones(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        cg(A, b.float())
    with pytest.raises(ValueError, match="shape"):
        cg(A, torch.ones(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        minres(A, b.numpy())
    with pytest.raises(ValueError, match="NaN"):
        cg(A, torch.full((4,), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="maxiter"):
        cg(A, b, maxiter=0)
    with pytest.raises(ValueError, match="positive"):
        DiagonalPreconditioner(torch.tensor([1.0, -2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="orthonormal"):
        LowRankPreconditioner([2.0, 1.0], torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        LowRankPreconditioner([1.0, -1.0], torch.eye(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="preconditioner is not positive definite"):
        cg(A, b, preconditioner=lambda r: -r)
    op, _ = ill_conditioned_ggn
    with pytest.raises(ValueError, match="expected"):
        natural_gradient(op, [torch.zeros(3, dtype=torch.float64)], damping=0.1)
    with pytest.raises(ValueError, match="no .grad"):
        natural_gradient(op, damping=0.1)
    with pytest.raises(TypeError, match="dtype"):
        natural_gradient(op, [p.detach().float() for p in op.params], damping=0.1)
    with pytest.raises(TypeError, match="flatten"):
        natural_gradient(A, [b], damping=0.1)
    # Iteration cap: not converged, and says so.
    capped = cg(R.matrix_with_spectrum(torch.logspace(-3, 1, 60, dtype=torch.float64)),
                rhs(60), tol=1e-12, maxiter=5)
    assert not capped.converged and capped.iterations == 5
    capped = minres(R.matrix_with_spectrum(torch.logspace(-3, 1, 60, dtype=torch.float64)),
                    rhs(60), tol=1e-12, maxiter=4)
    assert not capped.converged and capped.iterations == 4


class CountingMatrix:
    """A torch-native operator that counts its products."""

    def __init__(self, A: torch.Tensor) -> None:
        self.A, self.count = A, 0
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.A @ v


@pytest.mark.parametrize("solver", [cg, minres])
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"maxiter": 0}, ValueError, "maxiter"),
        ({"maxiter": -1}, ValueError, "maxiter"),
        ({"maxiter": 2.0}, TypeError, "maxiter"),
        ({"maxiter": "5"}, TypeError, "maxiter"),
        ({"maxiter": True}, TypeError, "maxiter"),
        ({"tol": 0.0, "atol": 0.0}, ValueError, "explicit maxiter"),
        ({"tol": -1e-6}, ValueError, "tol"),
        ({"tol": "1e-6"}, TypeError, "tol"),
        ({"atol": float("inf")}, ValueError, "atol"),
        ({"damping": float("nan")}, ValueError, "damping"),
        ({"preconditioner": "jacobi"}, TypeError, "preconditioner"),
        ({"x0": torch.full((6,), float("nan"), dtype=torch.float64)}, ValueError, "x0"),
        ({"x0": torch.ones(5, dtype=torch.float64)}, ValueError, "x0"),
    ],
)
def test_settings_checked_before_any_product(solver, kwargs, exc, match):
    op = CountingMatrix(torch.eye(6, dtype=torch.float64))
    with pytest.raises(exc, match=match):
        solver(op, torch.ones(6, dtype=torch.float64), **kwargs)
    assert op.count == 0
    assert solver(op, torch.ones(6, dtype=torch.float64), maxiter=np.int64(3)).converged


@pytest.mark.parametrize("solver", [cg, minres])
def test_old_name_max_iters_is_gone(solver, ill_conditioned_ggn):
    A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="max_iters"):
        solver(A, torch.ones(4, dtype=torch.float64), max_iters=5)
    op, _ = ill_conditioned_ggn
    with pytest.raises(TypeError, match="max_iters"):
        natural_gradient(op, [torch.zeros_like(p) for p in op.params], damping=0.1,
                         max_iters=5)
    with pytest.raises(ValueError, match="maxiter"):
        natural_gradient(op, [torch.zeros_like(p) for p in op.params], damping=0.1, maxiter=0)


@pytest.mark.parametrize("solver", [cg, minres])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("x0", [False, True])
def test_non_finite_product_raises_one_error(solver, bad, x0):
    from curvops.solvers import NonFiniteProductError

    A = torch.eye(6, dtype=torch.float64)
    A[2, 2] = bad
    b = torch.ones(6, dtype=torch.float64)
    where = "in the product with x0" if x0 else "at iteration 1"
    with pytest.raises(NonFiniteProductError,
                       match=f"{solver.__name__}: the operator returned NaN/Inf {where}"):
        solver(A, b, x0=b.clone() if x0 else None)


@pytest.mark.gpu
def test_cuda_solves_match_cpu():
    A = R.matrix_with_spectrum(torch.logspace(-2, 1, 100, dtype=torch.float64), seed=15)
    b = rhs(100, seed=16)
    Ac, bc = A.cuda(), b.cuda()
    lam, U = torch.linalg.eigh(Ac)
    pre = LowRankPreconditioner(lam[-10:], U[:, -10:], 0.01)
    jacobi = DiagonalPreconditioner(torch.diag(Ac), 0.01)
    ref = numpy_solve(A, b, 0.01)
    for solver in (cg, minres):
        for M in (None, pre, jacobi):
            result = solver(Ac, bc, damping=0.01, tol=1e-10, preconditioner=M)
            assert result.x.device.type == "cuda" and result.converged
            assert rel_err(result.x.cpu(), ref) <= 1e-7
