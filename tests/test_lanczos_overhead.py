"""The cheaper host work of the Lanczos solver gives the same decisions as the full work.

Each shortcut is checked against the computation it replaces: the convergence test on the
wanted eigenpairs of T only (against all pairs), the vectorized Cullum–Willoughby test
(against the per-value loop it replaced), the chunked combination of ghost copies of
"none" (against the float64 copies it replaced), the verification of unit-scaled Ritz
vectors with a scratch block (against the unscaled vectors), and selective's projection of
a new vector against the newly cached Ritz vectors only.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import scipy.linalg
import torch
from curvops.solvers._cullum_willoughby import cullum_willoughby
from curvops.solvers._lanczos_strategies import _combine_copies
from curvops.solvers._reorthogonalization import SelectiveCache
from curvops.solvers._ritz_verification import verify_ritz_pairs
from curvops.solvers._tridiagonal import EPS64, WHICH, select_which, tridiag_eigvals, wanted_ritz
from curvops.solvers.lanczos import lanczos

# The package re-exports the function ``lanczos`` under the module's name.
strategies = importlib.import_module("curvops.solvers._lanczos_strategies")


def _tridiagonal(m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(m), rng.uniform(0.05, 1.0, m - 1)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("m", [10, 40, 150])
def test_wanted_ritz_matches_all_pairs(which: str, m: int) -> None:
    for seed in range(5):
        alpha, beta = _tridiagonal(m, seed)
        theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
        for k in (1, 3, m // 2):
            sub, S_sub, tnorm = wanted_ritz(alpha, beta, k, which)
            i_all = select_which(theta, k, which)
            i_sub = select_which(sub, k, which)
            scale = float(np.max(np.abs(theta)))
            assert tnorm == pytest.approx(scale, rel=1e-13)
            # Both are backward stable (MRRR on a range, or on the whole spectrum).
            np.testing.assert_allclose(sub[i_sub], theta[i_all], rtol=0, atol=1e-12 * scale)
            # The bounds read the last entries of the unit eigenvectors.
            np.testing.assert_allclose(np.abs(S_sub[-1, i_sub]), np.abs(S[-1, i_all]),
                                       rtol=0, atol=1e-10)


def test_wanted_ritz_needs_disjoint_ranges() -> None:
    alpha, beta = _tridiagonal(9, 0)
    with pytest.raises(ValueError, match="2k <= m"):
        wanted_ritz(alpha, beta, 5, "LA")


def _clustered(n: int = 400, gap: float = 3e-5) -> np.ndarray:
    rng = np.random.default_rng(3)
    ev = np.concatenate([1 + gap * np.arange(6)[::-1], rng.uniform(0, 0.9, n - 6)])
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (Q * ev) @ Q.T
    return (A + A.T) / 2


@pytest.mark.parametrize("which", ["LA", "LM", "BE"])
@pytest.mark.parametrize("reorth", ["full", "partial"])
def test_wanted_only_convergence_test_stops_at_the_same_iteration(
    reorth: str, which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of 100+ iterations (the wanted-only test applies from 96): the same stopping
    iteration, the same bits, as the test on all pairs of T."""
    A = _clustered()
    kw = dict(which=which, tol=1e-10, reorth=reorth, return_eigenvectors=False, maxiter=300)
    res = lanczos(A, 5, **kw)
    assert res.iterations >= strategies._BasisStrategy.WANTED_ONLY_FROM
    monkeypatch.setattr(strategies._BasisStrategy, "WANTED_ONLY_FROM", 10**9)
    ref = lanczos(A, 5, **kw)
    assert res.iterations == ref.iterations
    assert res.matvecs == ref.matvecs
    np.testing.assert_array_equal(res.eigenvalues, ref.eigenvalues)
    np.testing.assert_array_equal(res.converged, ref.converged)
    if which == "LA":
        ev = np.sort(np.linalg.eigvalsh(A))[::-1][:5]
        assert res.all_converged
        np.testing.assert_allclose(res.eigenvalues, ev, rtol=0, atol=1e-9)


def _cullum_willoughby_loop(alpha, beta, theta, rel_tol, merge_rel_tol, genuine):
    """The per-value loop the vectorized test replaced (Cullum & Willoughby 1985)."""
    m = alpha.size
    scale = max(float(np.max(np.abs(theta))), np.finfo(float).tiny)
    tol = rel_tol * scale
    merge_tol = max(merge_rel_tol * scale, tol)
    theta_hat = tridiag_eigvals(alpha[1:], beta[1:])
    starts = np.flatnonzero(np.concatenate([[True], np.diff(theta) > merge_tol]))
    ends = np.concatenate([starts[1:], [m]])
    values, reps, n_spurious = [], [], 0
    for s, e in zip(starts, ends):
        if e - s == 1:
            pos = np.searchsorted(theta_hat, theta[s])
            near = [abs(theta_hat[i] - theta[s]) for i in (pos - 1, pos)
                    if 0 <= i < theta_hat.size]
            if near and min(near) <= tol and not (genuine is not None and genuine[s]):
                n_spurious += 1
                continue
        values.append(theta[s:e].mean())
        reps.append(s)
    return np.asarray(values), np.asarray(reps, dtype=np.int64), n_spurious


def test_vectorized_cullum_willoughby_equals_the_loop() -> None:
    rng = np.random.default_rng(1)
    spurious_seen = merged_seen = 0
    for trial in range(600):
        m = int(rng.integers(2, 60))
        alpha = rng.standard_normal(m)
        beta = rng.random(m - 1) * 10.0 ** rng.integers(-8, 1, m - 1)
        theta = tridiag_eigvals(alpha, beta)
        rel_tol = float(10.0 ** rng.integers(-12, -1))
        merge = rel_tol * float(10.0 ** rng.integers(0, 3))
        genuine = rng.random(m) < 0.3 if trial % 2 else None
        want = _cullum_willoughby_loop(alpha, beta, theta, rel_tol, merge, genuine)
        got = cullum_willoughby(alpha, beta, theta, rel_tol, merge, genuine)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert got[2] == want[2]
        spurious_seen += want[2] > 0
        merged_seen += want[0].size + want[2] < m
    assert spurious_seen > 50 and merged_seen > 50  # both branches exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_verification_of_unit_rows_with_scratch_equals_unscaled(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(0)
    n, p = 500, 4
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.concatenate([[5.0, 4.0, 3.0, 2.0], rng.uniform(0, 1, n - 4)])
    A = torch.as_tensor((Q * ev) @ Q.T, dtype=dtype)
    # Ritz-like vectors: eigenvectors plus small errors, of norms 0.3..2 (one below 1/2),
    # the last one a copy of the first (a ghost).
    Y = torch.as_tensor(Q[:, :p].T, dtype=dtype)
    Y = Y + 1e-8 * torch.as_tensor(rng.standard_normal((p, n)), dtype=dtype)
    Y[-1] = Y[0]
    norms = torch.tensor([0.3, 1.0, 2.0, 1.5], dtype=dtype)[:, None]
    Y = Y * norms
    theta = np.array([5.0, 4.0, 3.0, 5.0])
    AY = Y @ A
    pred = AY + 1e-7 * torch.as_tensor(rng.standard_normal((p, n)), dtype=dtype)
    conv = np.ones(p, dtype=bool)
    before = (Y.clone(), AY.clone(), pred.clone())
    ref = verify_ritz_pairs(Y, AY, theta, conv, 5.0, 1e-5, 1e-12, pred)
    for t, t0 in zip((Y, AY, pred), before):  # no scratch given: inputs untouched
        assert torch.equal(t, t0)
    ynorm = torch.linalg.vector_norm(Y, dim=1, keepdim=True)
    got = verify_ritz_pairs(Y / ynorm, AY / ynorm, theta, conv, 5.0, 1e-5, 1e-12,
                            pred / ynorm, scale=ynorm.reshape(-1).double().numpy(),
                            scratch=(pred / ynorm).clone())
    np.testing.assert_array_equal(got.converged, ref.converged)
    assert not ref.converged[-1] and ref.converged[:-1].all()  # the ghost is caught
    # The residuals differ by the rounding of forming them at another scale (eps |theta|).
    atol = 20 * torch.finfo(dtype).eps * float(np.max(theta))
    np.testing.assert_allclose(got.residuals, ref.residuals, rtol=1e-6, atol=atol)
    assert got.noise == pytest.approx(ref.noise, rel=1e-6, abs=atol / 5.0)
    assert got.notes == ref.notes
    assert "a ghost" in ref.notes[0]


def test_verification_without_prediction_may_use_products_as_scratch() -> None:
    rng = np.random.default_rng(1)
    n = 300
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = torch.as_tensor((Q * np.linspace(1, 2, n)) @ Q.T)
    Y = torch.as_tensor(Q[:, -2:].T.copy())
    theta = np.linspace(1, 2, n)[-2:]
    AY = Y @ A
    ref = verify_ritz_pairs(Y, AY, theta, np.ones(2, bool), 2.0, 1e-10, EPS64)
    got = verify_ritz_pairs(Y, AY.clone(), theta, np.ones(2, bool), 2.0, 1e-10, EPS64,
                            scratch=AY)
    np.testing.assert_array_equal(got.converged, ref.converged)
    np.testing.assert_allclose(got.residuals, ref.residuals, rtol=1e-12)
    assert ref.converged.all()


def test_selective_projects_new_vectors_only() -> None:
    """After projecting against the first cached vectors, a projection against the newly
    cached ones leaves w orthogonal to the whole cache, with the coefficients of the
    new rows (zero on the earlier ones)."""
    rng = np.random.default_rng(2)
    n = 200
    cache = SelectiveCache(n, torch.float64, torch.device("cpu"), EPS64)
    Q, _ = np.linalg.qr(rng.standard_normal((n, 6)))
    first = torch.as_tensor(Q[:, :3].T.copy())
    cache.add(np.eye(10)[:, :3], first.clone())
    w = torch.as_tensor(rng.standard_normal(n))
    cache.project(w)
    before = cache.count
    cache.add(np.eye(10)[:, 3:6], torch.as_tensor(Q[:, 3:].T.copy()))
    assert cache.count == 6
    w_all = w.clone()
    _, d_all = cache.project(w_all)
    _, d_new = cache.project(w, start=before)
    assert d_new.shape == d_all.shape == (6,)
    assert torch.all(d_new[:before] == 0)
    torch.testing.assert_close(d_new[before:], d_all[before:], rtol=0, atol=1e-13)
    torch.testing.assert_close(w, w_all, rtol=0, atol=1e-13)
    Yc = torch.as_tensor(Q.T.copy())
    assert float(torch.max(torch.abs(Yc @ w))) < 1e-13


def _combine_copies_float64(Y, AY, groups, values):
    """The whole-vector float64 combination of ghost copies the chunked one replaced."""
    rows, arows, start = [], [], 0
    for g, val in zip(groups, values):
        c = g.shape[1]
        Yg, Ag = Y[start : start + c].double(), AY[start : start + c].double()
        start += c
        cands = [np.eye(c)[i] for i in range(c)]
        if c > 1:
            G, H = (Yg @ Yg.T).numpy(), (Yg @ Ag.T).numpy()
            Rg = Ag - val * Yg
            K = (Rg @ Rg.T).numpy()
            try:
                w, X = scipy.linalg.eigh((H + H.T) / 2.0, G)
                cands.append(X[:, int(np.argmin(np.abs(w - val)))])
                _, X = scipy.linalg.eigh((K + K.T) / 2.0, G)
                cands.append(X[:, 0])
            except (np.linalg.LinAlgError, ValueError):
                pass
        C = torch.as_tensor(np.stack(cands))
        Yc, Ac = C @ Yg, C @ Ag
        res = torch.linalg.vector_norm(Ac - val * Yc, dim=1) / torch.linalg.vector_norm(Yc, dim=1)
        i = int(torch.argmin(res))
        rows.append(Yc[i].to(Y.dtype))
        arows.append(Ac[i].to(Y.dtype))
    return torch.stack(rows), torch.stack(arows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_combination_of_ghost_copies(dtype: torch.dtype, monkeypatch) -> None:
    """Groups of 2 and 3 copies whose residuals cancel in a combination, and single
    copies (kept bit for bit): the combined pair's residual is as small as the float64
    whole-vector search's (to the rounding of the dtype)."""
    monkeypatch.setattr(strategies, "_COMBINE_COLS", 1000)  # several chunks
    rng = np.random.default_rng(0)
    n = 4321
    # Eigenvectors e (values 3, 2, 1), directions q of eigenvalue 0, and the direction r
    # the copies' residuals share (the next Lanczos vector); copies of one value mix e
    # with a little of the q's, as Ritz vectors of ghost copies do.
    e = torch.as_tensor(rng.standard_normal((3, n)), dtype=dtype)
    e /= torch.linalg.vector_norm(e, dim=1, keepdim=True)
    q = torch.as_tensor(rng.standard_normal((3, n)), dtype=dtype) / n**0.5
    r = torch.as_tensor(rng.standard_normal(n), dtype=dtype)
    r /= torch.linalg.vector_norm(r)
    lam = np.array([3.0, 2.0, 1.0])
    Y = torch.stack([0.6 * e[0] + 0.05 * q[0], 0.8 * e[0] + 0.03 * q[1], e[1],
                     0.5 * e[2] + 0.05 * q[0], 0.5 * e[2] + 0.04 * q[1], 0.7 * e[2] + 0.02 * q[2]])
    AY = torch.stack([1.8 * e[0] + 3e-4 * r, 2.4 * e[0] - 2e-4 * r, 2.0 * e[1] + 1e-7 * r,
                      0.5 * e[2] + 1e-4 * r, 0.5 * e[2] + 2e-3 * r, 0.7 * e[2] - 1e-4 * r])
    groups = [np.zeros((9, 2)), np.zeros((9, 1)), np.zeros((9, 3))]
    got = _combine_copies(Y, AY, groups, lam)
    ref = _combine_copies_float64(Y, AY, groups, lam)
    assert torch.equal(got[0][1], Y[2]) and torch.equal(got[1][1], AY[2])

    def residuals(pair):
        y, ay = pair
        th = torch.as_tensor(lam, dtype=torch.float64)[:, None]
        return (torch.linalg.vector_norm(ay.double() - th * y.double(), dim=1)
                / torch.linalg.vector_norm(y.double(), dim=1)).numpy()

    floor = 10 * torch.finfo(dtype).eps * float(lam.max())
    assert np.all(residuals(got) <= residuals(ref) + floor)


def test_none_forms_only_the_best_copies_that_fit_in_memory(monkeypatch):
    """With little free memory, none's second pass keeps each value's best copies (at least
    one), says so, and the verification still decides convergence."""
    from curvops.solvers import _lanczos_strategies as strategies

    n = 400
    rng = np.random.default_rng(0)
    # lambda_1 isolated, lambda_2 and lambda_3 close: by the time they converge (94
    # iterations) lambda_1 has 4 ghost copies.
    ev = np.concatenate([[10.0, 5.0, 4.999], rng.uniform(0, 4.9, n - 3)])
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    A = torch.tensor((Q * ev) @ Q.T, dtype=torch.float64)
    A = (A + A.T) / 2
    kwargs = {"reorth": "none", "tol": 1e-10, "maxiter": 400, "seed": 0}
    roomy = lanczos(A, 3, **kwargs)
    assert not any("copies that fit" in note for note in roomy.notes)
    # Room for 4 Ritz vectors and their products (two float64 vectors of n each), in the
    # half of the free memory they may take: lambda_1 keeps 2 of its 4 copies.
    monkeypatch.setattr(strategies, "available_memory_bytes", lambda device: 2 * 4 * 2 * n * 8)
    tight = lanczos(A, 3, **kwargs)
    assert any("the 4 best-converged copies that fit" in note for note in tight.notes)
    np.testing.assert_allclose(tight.eigenvalues, [10.0, 5.0, 4.999], rtol=1e-9)
    assert tight.verified
