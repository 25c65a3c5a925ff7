"""The scipy view plugged into scipy as it is, operator algebra, dense limits, flat vectors.

Every number is checked against the dense references of ``tests/references.py``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import references as R
import scipy.sparse.linalg as spla
import torch
from curvops.linops import (
    Count,
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
)
from torch import Tensor, nn

TOL = 1e-10



@functools.cache
def problem() -> R.Problem:
    return R.mlp_ce("mean")


@functools.cache
def dense(kind: str) -> Tensor:
    p = problem()
    names = R.selected_names(p.model, None)
    return R.dense_reference(kind, p.model, names, p.spec, p.batches)


@functools.cache
def operator(kind: str):
    p = problem()
    cls = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": EmpiricalFisherOperator}[kind]
    return cls(p.model, p.spec.module(), p.batches)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------
# scipy view
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hessian", "ggn", "ef"])
def test_eigsh_top_eigenvalues(kind):
    view = operator(kind).to_scipy()
    assert isinstance(view, spla.LinearOperator)
    assert view.dtype == np.float64 and view.shape == operator(kind).shape
    k = 4
    ref = np.linalg.eigvalsh(dense(kind).numpy())[::-1][:k]
    # the top k+1 eigenvalues are well separated here, so eigsh's answer is unique
    assert np.all(np.abs(np.diff(np.linalg.eigvalsh(dense(kind).numpy())[::-1][: k + 1]))
                  >= 1e-3 * abs(ref[0]))
    v0 = rng(0).standard_normal(view.shape[0])
    vals = np.sort(spla.eigsh(view, k=k, which="LA", tol=1e-13, v0=v0,
                              return_eigenvectors=False))[::-1]
    np.testing.assert_allclose(vals, ref, rtol=1e-8, atol=1e-8 * abs(ref[0]))


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_lobpcg_agrees(kind):
    view = operator(kind).to_scipy()
    k = 3
    ref = np.linalg.eigvalsh(dense(kind).numpy())[::-1][:k]
    X = rng(1).standard_normal((view.shape[0], k))
    vals, _ = spla.lobpcg(view, X, largest=True, tol=1e-9, maxiter=500)
    np.testing.assert_allclose(np.sort(vals)[::-1], ref, rtol=1e-7)


@pytest.mark.parametrize("solver", ["cg", "minres"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_linear_solves_on_damped_operator(kind, solver):
    lam = 0.1
    view = operator(kind).damped(lam).to_scipy()
    A = dense(kind).numpy() + lam * np.eye(view.shape[0])
    b = rng(2).standard_normal(view.shape[0])
    rtol = 1e-10
    solve = spla.cg if solver == "cg" else spla.minres
    x, info = solve(view, b, rtol=rtol, maxiter=2000)
    assert info == 0
    # each solver's own stopping rule, checked on the dense matrix with slack 10 for the
    # recursively updated residual drifting from the true one: cg stops on ‖r‖ ≤ rtol‖b‖,
    # minres on ‖r‖ ≤ rtol(‖A‖‖x‖ + ‖b‖)
    bound = rtol * np.linalg.norm(b)
    if solver == "minres":
        bound += rtol * np.linalg.norm(A, 2) * np.linalg.norm(x)
    assert np.linalg.norm(A @ x - b) <= 10 * bound
    # the same iterations as on the dense matrix itself
    x_dense, _ = solve(A, b, rtol=rtol, maxiter=2000)
    np.testing.assert_allclose(x, x_dense, rtol=1e-8, atol=1e-10 * np.abs(x).max())
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-6, atol=1e-6 * np.abs(x).max())


def test_scipy_view_products_and_batched_matmat():
    op = operator("hessian")
    view = op.to_scipy()
    D = dense("hessian").numpy()
    X = rng(3).standard_normal((op.shape[0], 5))
    np.testing.assert_allclose(view.matvec(X[:, 0]), D @ X[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(view.rmatvec(X[:, 0]), D @ X[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(view.matmat(X), D @ X, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(view @ X, D @ X, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(view.H @ X, D @ X, rtol=1e-10, atol=1e-12)
    assert view.matvec(X[:, 0]).shape == (op.shape[0],)
    assert view.matvec(X[:, :1]).shape == (op.shape[0], 1)

    # matmat is one batched product, not a loop over columns
    calls: list[int] = []
    original = op._matmat

    def spy(V: Tensor) -> Tensor:
        calls.append(V.shape[1])
        return original(V)

    op._matmat = spy
    try:
        view.matmat(X)
    finally:
        del op._matmat
    assert calls == [5]


def test_scipy_view_dtypes():
    op = operator("ggn")
    D = dense("ggn").numpy()
    x = rng(4).standard_normal(op.shape[0])
    # float32 view of a float64 operator: float32 in and out, float32 accuracy
    v32 = op.to_scipy(np.float32)
    assert v32.dtype == np.float32
    y = v32.matvec(x.astype(np.float32))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, D @ x.astype(np.float32).astype(np.float64), rtol=1e-5,
                               atol=1e-5 * np.abs(D @ x).max())
    # torch dtypes are accepted and mean the same
    assert op.to_scipy(torch.float32).dtype == np.float32
    assert op.to_scipy(torch.float64).dtype == np.float64
    assert op.to_scipy("float64").dtype == np.float64
    for bad in (np.int32, np.int64, np.complex128, torch.int64, torch.bfloat16, np.float16):
        with pytest.raises(TypeError):
            op.to_scipy(bad)


def test_bf16_operator_has_float32_view():
    model = R.reinit_(nn.Sequential(nn.Linear(3, 2)).to(torch.bfloat16), 5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 3, generator=gen).to(torch.bfloat16)
    op = GGNOperator(model, nn.CrossEntropyLoss(), (x, torch.tensor([0, 1, 1, 0])))
    view = op.to_scipy()
    assert view.dtype == np.float32
    v = np.ones(op.shape[0], dtype=np.float32)
    out = view.matvec(v)
    assert out.dtype == np.float32
    expected = op.matvec(torch.ones(op.shape[0], dtype=torch.bfloat16)).float().numpy()
    np.testing.assert_array_equal(out, expected)
    assert op.to_scipy(np.float64).dtype == np.float64


# --------------------------------------------------------------------------------------
# Algebra
# --------------------------------------------------------------------------------------


def test_operator_algebra_against_dense():
    H, G, E = operator("hessian"), operator("ggn"), operator("ef")
    DH, DG, DE = dense("hessian"), dense("ggn"), dense("ef")
    n = H.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    cases = {
        "sum": (H + G, DH + DG),
        "sum of three": (H + G + E, DH + DG + DE),
        "scalar left": (2.5 * G, 2.5 * DG),
        "scalar right": (G * -0.5, -0.5 * DG),
        "int scalar": (3 * E, 3 * DE),
        "numpy scalar": (np.float64(1.5) * H, 1.5 * DH),
        "scaled twice": (2.0 * (3.0 * H), 6.0 * DH),
        "negation": (-H, -DH),
        "difference": (G - E, DG - DE),
        "damped": (G.damped(0.3), DG + 0.3 * eye),
        "identity": (IdentityOperator.like(G), eye),
        "explicit damping": (H + 0.7 * IdentityOperator.like(H), DH + 0.7 * eye),
        "combination": (0.5 * (H + E).damped(1e-2), 0.5 * (DH + DE + 1e-2 * eye)),
    }
    for label, (op, ref) in cases.items():
        assert op.shape == (n, n) and op.dtype == torch.float64, label
        assert R.relative_error(op.matmat(eye), ref) <= TOL, label
        assert R.relative_error(op.to_dense(), ref) <= TOL, label


def test_algebra_refuses_mismatches():
    G = operator("ggn")
    with pytest.raises(TypeError):
        G + 1.0  # ambiguous: op + lam*I must be explicit
    with pytest.raises(ValueError):
        G + IdentityOperator(G.shape[0] + 1, torch.float64)
    with pytest.raises(TypeError):
        G + IdentityOperator(G.shape[0], torch.float32)
    with pytest.raises(TypeError):
        G * "2"
    with pytest.raises(TypeError):
        G * torch.ones(1)


# --------------------------------------------------------------------------------------
# to_dense limits, attributes, flat vectors
# --------------------------------------------------------------------------------------


def test_to_dense_refuses_large_sizes():
    op = operator("ggn")
    n = op.shape[0]
    with pytest.raises(MemoryError, match="max_bytes"):
        op.to_dense(max_bytes=n * n * 8 - 1)
    D = op.to_dense(max_bytes=n * n * 8, chunk_size=7)
    assert R.relative_error(D, dense("ggn")) <= TOL


def test_operator_attributes():
    p = problem()
    op = operator("ggn")
    X, Y = p.merged()
    n = sum(q.numel() for q in p.model.parameters())
    assert op.shape == (n, n) and op.dtype == torch.float64 and op.device == torch.device("cpu")
    assert op.model is p.model
    assert op.param_names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert list(op.params) == list(p.model.parameters())
    assert op.total == Count(Y.shape[0], Y.shape[0])
    assert op.normalizer == pytest.approx(1.0 / Y.shape[0], rel=1e-15)
    assert op.objective.normalization == "mean" and op.objective.sample_unit == "example"
    assert op.is_psd and not operator("hessian").is_psd and operator("ef").is_psd
    assert {operator(k).name for k in ("hessian", "ggn", "ef")} == {
        "hessian", "ggn", "empirical_fisher"}
    assert FisherOperator(p.model, p.spec.module(), p.batches).name == "fisher"
    s = R.mlp_mse("sum")
    op_sum = GGNOperator(s.model, s.spec.module(), s.batches)
    assert op_sum.normalizer == 1.0 and op_sum.total.terms == s.merged()[1].numel()
    assert repr(op).startswith("GGNOperator(")


def test_flatten_unflatten_round_trip():
    p = problem()
    op = operator("hessian")
    names = R.selected_names(p.model, None)
    flat = op.flatten([q.detach() for q in op.params])
    assert torch.equal(flat, R.flat_parameters(p.model, names))
    blocks = op.unflatten(flat)
    assert [b.shape for b in blocks] == [q.shape for q in op.params]
    assert all(torch.equal(b, q) for b, q in zip(blocks, op.params))
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(op.flatten(op.unflatten(v)), v)
    # a batch of vectors (m, n) round-trips too
    V = torch.randn(3, op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    assert torch.equal(op.space.flatten(op.space.unflatten(V)), V)
    with pytest.raises(ValueError):
        op.unflatten(v[:-1])
    with pytest.raises(ValueError):
        op.flatten([q.detach() for q in op.params[:-1]])
    # the flat layout is the one the references use: block i of A v is A[block i] @ v
    Av = op.matvec(v)
    for block, sl in zip(op.unflatten(Av), R.block_slices(p.model, names)):
        torch.testing.assert_close(block.reshape(-1), dense("hessian")[sl] @ v, rtol=1e-10,
                                   atol=1e-13)
