"""Long-vector norms and dot products that keep float32 precision at any length.

References: the same reductions in float64 (exact to float32's needs). The vectors mimic a
model's parameters: a few large entries among many small ones, where float32 accumulation
over a whole vector loses the most (``torch.linalg.vector_norm`` on the CPU: 1.5e-2 off at
n = 1.24e8, measured). A Lanczos run on such vectors keeps its basis orthonormal to float32
precision only with these reductions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curvops.solvers import lanczos
from curvops.solvers._reductions import BLOCK, dot, gram, row_norms, vector_norm

N = (1 << 22) + 123  # not a multiple of the block


def _model_like(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(n).uniform_(-12.0, 2.0, generator=gen))
    return torch.randn(n, generator=gen) * scale


@pytest.fixture(scope="module")
def vectors() -> tuple[torch.Tensor, torch.Tensor]:
    return _model_like(N, 0), _model_like(N, 1)


def test_vector_norm_and_row_norms(vectors) -> None:
    x, y = vectors
    ref = float(x.double().norm())
    assert abs(float(vector_norm(x)) - ref) <= 5e-7 * ref  # plain torch: ~2e-5 here
    assert vector_norm(x).dtype == torch.float64
    X = torch.stack([x, y])
    np.testing.assert_allclose(row_norms(X).numpy(), X.double().norm(dim=1).numpy(), rtol=5e-7)
    # Short, float64 and bf16 inputs take the same function.
    assert float(vector_norm(x[:100])) == pytest.approx(float(x[:100].double().norm()), rel=1e-7)
    assert float(vector_norm(x.double())) == pytest.approx(ref, rel=1e-14)
    xb = x.bfloat16()
    assert float(vector_norm(xb)) == pytest.approx(float(xb.double().norm()), rel=1e-6)


def test_dot_and_gram(vectors) -> None:
    x, y = vectors
    # A nearly parallel pair (the Rayleigh quotient's case) and an independent pair.
    z = 3.0 * x + 1e-3 * y
    for a, b in ((x, z), (x, y)):
        ref = float(torch.dot(a.double(), b.double()))
        scale = float(a.double().norm() * b.double().norm())
        assert abs(float(dot(a, b)) - ref) <= 1e-7 * scale
        assert dot(a, b).dtype == torch.float32
    X = torch.stack([x, y, z])
    Xd = X.double()
    np.testing.assert_allclose(gram(X).numpy(), (Xd @ Xd.T).numpy(), rtol=5e-7,
                               atol=1e-7 * float((Xd @ Xd.T).abs().max()))
    assert N > BLOCK


def test_gram_of_two_strided_inputs_and_of_low_precision(vectors) -> None:
    x, y = vectors
    z = 3.0 * x + 1e-3 * y
    M = torch.stack([x, y, z, y - x])  # rows 1..2 and 0..3: strided row views of it
    X, Y = M[1:3], M[0:4]
    ref = (X.double() @ Y.double().T).numpy()
    scale = float(M.double().norm(dim=1).max()) ** 2
    np.testing.assert_allclose(gram(X, Y).numpy(), ref, rtol=5e-7, atol=1e-7 * scale)
    assert gram(X, Y).dtype == torch.float64 and gram(X, Y).shape == (2, 4)
    # bf16 rows: exact in float32, the products and the float64 sums keep it.
    Mb = M.bfloat16()
    refb = (Mb.double() @ Mb.double().T).numpy()
    np.testing.assert_allclose(gram(Mb).numpy(), refb, rtol=5e-7, atol=1e-7 * scale)


def test_basis_gram_over_several_row_blocks_matches_float64() -> None:
    """The measured orthogonality of a float32 basis on the CPU (short float32 products,
    block pair by block pair) against the float64 Gram matrix of the same stored rows."""
    from curvops.solvers import _reorthogonalization as ro

    n, j = 3 * BLOCK * 11 + 77, 13
    Q, _ = torch.linalg.qr(torch.randn(n, j, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(5)))
    basis = ro.KrylovBasis(n, torch.float32, torch.device("cpu"), block_rows=4)
    for i in range(j):
        basis.set(i, Q[:, i].float())
    V = torch.stack([basis.get(i, torch.float64, torch.device("cpu")) for i in range(j)])
    ref = (V @ V.T).numpy()
    G = basis.gram(j, exact=False)
    np.testing.assert_allclose(G, ref, rtol=0, atol=5e-8)  # a float32 basis: ~1e-7 itself
    np.testing.assert_array_equal(G, G.T)
    np.testing.assert_allclose(basis.gram(j, exact=True), ref, rtol=0, atol=1e-13)


def test_lanczos_basis_stays_orthonormal_on_model_like_vectors() -> None:
    # A diagonal float32 operator and a start vector shaped like a model's parameters.
    # With whole-row float32 coefficient products the basis lost orthogonality to 1.6e-4,
    # the values were off by 2e-4 and full reported them not converged (measured); with
    # the sliced ones: 6.5e-6 and <= 9e-6.
    n = 1 << 21
    gen = torch.Generator().manual_seed(3)
    d = torch.rand(n, generator=gen) * torch.exp(torch.empty(n).uniform_(-8, 0, generator=gen))
    d[:6] = torch.tensor([9.0, 8.0, 7.5, 7.0, 6.0, 5.5])

    class Diagonal:
        shape, dtype, device = (n, n), torch.float32, torch.device("cpu")

        def matvec(self, v):
            return d * v

    v0 = _model_like(n, 4).abs() + 1e-6
    for ncv in (None, 9):
        res = lanczos(Diagonal(), 4, v0=v0, tol=1e-5, maxiter=200, ncv=ncv,
                      return_eigenvectors=False)
        np.testing.assert_allclose(res.eigenvalues, [9.0, 8.0, 7.5, 7.0], rtol=2e-5)
        assert res.all_converged
        assert res.orthogonality_loss < 2e-5
