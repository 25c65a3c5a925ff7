r"""The Monte-Carlo Fisher: one fixed matrix, keyed by example, converging to the exact Fisher.

The MC Fisher with seed :math:`k` is :math:`X_k = c \sum_r J_r^\top \big(\tfrac1S
\sum_s g_{rs} g_{rs}^\top\big) J_r` with :math:`g_{rs}` the loss gradient at a label drawn
from the model. :math:`\mathbb E[g g^\top] = H_r` for CE, MSE (:math:`y \sim \mathcal
N(f, \tfrac12 I)`) and BCE, so :math:`\mathbb E[X_k] = F` (the GGN). Over :math:`K`
independent seeds the average :math:`\bar X` has :math:`\mathbb E\lVert \bar X - F
\rVert_F^2 = \sigma^2 / K`, :math:`\sigma^2 = \mathbb E \lVert X_k - F \rVert_F^2`.
"""

from __future__ import annotations

import functools

import pytest
import references as R
import torch
from curvops.linops import FisherOperator, GGNOperator, Rows
from torch import Tensor, nn

TOL = 1e-10
TOL_BATCHING = 1e-12



def mc(p: R.Problem, seed: int = 0, samples: int = 1, data=None, **kwargs) -> FisherOperator:
    return FisherOperator(
        p.model, p.spec.module(), p.batches if data is None else data,
        mode="mc", mc_samples=samples, seed=seed, **kwargs,
    )


def dense(op) -> Tensor:
    return op.matmat(torch.eye(op.shape[0], dtype=op.dtype))


# --------------------------------------------------------------------------------------
# One fixed matrix
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [R.mlp_ce, R.mlp_mse, R.mlp_bce, R.sequence_ce],
                         ids=["ce", "mse", "bce", "seq_ce"])
def test_mc_fisher_is_a_fixed_seeded_matrix(make):
    p = make()
    op = mc(p, seed=3)
    assert op.name == "fisher_mc" and op.is_psd
    v = torch.randn(op.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    first = op.matvec(v)
    assert torch.equal(op.matvec(v), first)  # two products, the same vector: bit-identical
    assert torch.equal(mc(p, seed=3).matvec(v), first)  # a new construction, the same seed
    other = mc(p, seed=4).matvec(v)
    assert R.relative_error(other, first) > 1e-3  # another seed, another matrix
    assert R.relative_error(mc(p, seed=3, samples=2).matvec(v), first) > 1e-3
    # products do not depend on (or disturb) the global RNG
    torch.manual_seed(123)
    assert torch.equal(op.matvec(v), first)
    state = torch.get_rng_state()
    op.matvec(v)
    assert torch.equal(torch.get_rng_state(), state)
    # symmetric and PSD
    D = dense(op)
    assert torch.allclose(D, D.T, rtol=0, atol=1e-14 * float(D.abs().max()))
    assert float(torch.linalg.eigvalsh(D).min()) >= -1e-12 * float(D.abs().max())


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("make", [R.mlp_ce, R.mlp_mse, R.mlp_bce, R.sequence_ce],
                         ids=["ce", "mse", "bce", "seq_ce"])
def test_mc_fisher_matches_sandwich_reference(make, samples):
    r"""With the core's own sampled gradients :math:`g_{rs}` fed in, the operator equals
    :math:`c \sum_r J_r^\top (\frac1S \sum_s g_{rs} g_{rs}^\top) J_r` built by the reference
    (jacrev Jacobians); the law of the samples is tested statistically below."""
    p = make()
    op = mc(p, seed=5, samples=samples)
    names = R.selected_names(p.model, None)
    f = R.forward_fn(p.model, names)
    theta = R.flat_parameters(p.model, names)
    offsets = [0]
    for _, y in p.batches:
        offsets.append(offsets[-1] + y.shape[0])

    def middle(b: int, out: Tensor, y: Tensor) -> Tensor:
        keep, _ = R.output_hessian_rows(p.spec.kind, out, y)
        n = out.shape[0]
        if p.spec.kind == "ce":
            C = out.shape[1]
            F_ = out.movedim(1, -1).reshape(-1, C)[keep]
            per = y[0].numel()
            ex = torch.arange(n).repeat_interleave(per)[keep]
            Y = y.reshape(-1)[keep]
        else:
            F_ = out.reshape(n, -1)
            ex = torch.arange(n)
            Y = y.reshape(n, -1)
        G = op.sampled_row_gradients(Rows(F_, Y, ex, n), offsets[b])
        assert G.shape == (samples, F_.shape[0], F_.shape[1])
        return torch.einsum("sri,srj->rij", G, G) / samples

    ref = R.dense_sandwich(p.model, names, p.spec, p.batches, middle)
    assert R.relative_error(dense(op), ref) <= TOL
    # rank: each row contributes at most S directions
    rows = sum(int(middle(b, f(theta, x), y).shape[0]) for b, (x, y) in enumerate(p.batches))
    if rows * samples < op.shape[0]:
        assert int(torch.linalg.matrix_rank(ref)) <= rows * samples


@pytest.mark.parametrize("make", [R.mlp_ce, R.mlp_mse, R.sequence_ce], ids=["ce", "mse", "seq"])
def test_mc_labels_are_keyed_by_global_example_index(make):
    p = make()
    D = dense(mc(p, seed=7, samples=2))
    N = p.merged()[1].shape[0]
    variants = {
        "one batch": dict(data=[p.merged()]),
        "singletons": dict(data=p.rebatched([1] * N)),
        "uneven": dict(data=p.rebatched([2, N - 2])),
        "micro 2": dict(micro_batch_size=2),
        "micro 1 of one batch": dict(data=[p.merged()], micro_batch_size=1),
    }
    for label, kwargs in variants.items():
        assert R.relative_error(dense(mc(p, seed=7, samples=2, **kwargs)), D) <= TOL_BATCHING, label


def test_mc_fisher_with_a_fully_ignored_batch():
    """A batch (or micro-batch) whose targets are all -100 contributes nothing; the exact
    operators handle it, the MC one must too (padding-only micro-batches happen with
    language-model data)."""
    p = R.sequence_ce()
    batches = [(x, y.clone()) for x, y in p.batches]
    batches.append((batches[0][0][:2], torch.full((2, 4), -100)))
    exact = dense(FisherOperator(p.model, p.spec.module(), batches))
    assert R.relative_error(exact, dense(GGNOperator(p.model, p.spec.module(), p.batches))) <= TOL
    D = dense(mc(p, seed=1, data=batches))
    assert R.relative_error(D, dense(mc(p, seed=1))) <= TOL_BATCHING


# --------------------------------------------------------------------------------------
# Statistics: the MC Fisher averages to the exact Fisher
# --------------------------------------------------------------------------------------

K = 64  # seeds per estimate
Z = 4.0  # the bound in units of the estimated standard error σ/√K (see below)


def stat_problem(kind: str) -> R.Problem:
    """MLP 3-4-C with 40 examples in batches of 25 and 15 (reduction mean)."""
    C = 3 if kind == "ce" else 2
    model = R.reinit_(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C)).double(), 8,
                      scale=0.7)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(40, 3, dtype=torch.float64, generator=gen)
    if kind == "ce":
        y = torch.randint(0, C, (40,), generator=gen)
    elif kind == "mse":
        y = torch.randn(40, C, dtype=torch.float64, generator=gen)
    else:
        y = torch.randint(0, 2, (40, C), generator=gen).double()
    return R.Problem(kind, model, R.LossSpec(kind, "mean"), [(x[:25], y[:25]), (x[25:], y[25:])])


@functools.cache
def mc_draws(kind: str, samples: int) -> Tensor:
    """``(K, n, n)``: the MC Fisher for seeds 0..K-1 (seeds 1000.. for S > 1)."""
    p = stat_problem(kind)
    base = 0 if samples == 1 else 1000
    return torch.stack([
        dense(mc(p, seed=base + k, samples=samples, check_deterministic=False)) for k in range(K)
    ])


@pytest.mark.parametrize("kind", ["ce", "mse", "bce"])
def test_mc_average_converges_to_exact_fisher(kind):
    r"""Tolerance from a variance argument. :math:`K\lVert\bar X - F\rVert_F^2/\sigma^2`
    tends (CLT) to :math:`\sum_i w_i \chi^2_{1,i}` with :math:`w_i \ge 0`,
    :math:`\sum_i w_i = 1`, whose tail beyond :math:`t \ge 1.54` is at most that of one
    :math:`\chi^2_1` (Székely & Bakirov, 2003): :math:`P(\lVert \bar X - F\rVert_F > 4
    \sigma/\sqrt K) \le P(\chi^2_1 > 16) \approx 6\cdot 10^{-5}`. σ is estimated from the
    spread of the K draws (≈ ±10 % at K = 64). The seeds are fixed, so the test is
    reproducible; the same bound must reject a 10 % wrong scale and the empirical Fisher."""
    p = stat_problem(kind)
    names = R.selected_names(p.model, None)
    F = R.dense_ggn(p.model, names, p.spec, p.batches)
    EF = R.dense_empirical_fisher(p.model, names, p.spec, p.batches)
    norm_F = float(torch.linalg.norm(F))
    for samples in (1, 16):
        X = mc_draws(kind, samples)
        X_bar = X.mean(0)
        sigma = float(torch.sqrt((X - X_bar).pow(2).sum() / (K - 1)))
        bound = Z * sigma / K**0.5
        err = float(torch.linalg.norm(X_bar - F))
        assert err <= bound, (samples, err / (sigma / K**0.5))
        if samples == 16:
            # the test has power: it resolves 8 % of ‖F‖ and rejects wrong matrices
            assert bound <= 0.08 * norm_F, bound / norm_F
            assert float(torch.linalg.norm(X_bar - 1.1 * F)) > bound
            assert float(torch.linalg.norm(X_bar - EF)) > bound


@pytest.mark.parametrize("kind", ["ce", "mse", "bce"])
def test_mc_samples_are_independent_draws(kind):
    r"""``mc_samples=S`` averages S independent draws: the per-seed variance σ² falls by S
    (16 here; the ratio of two 64-draw variance estimates stays within [8, 32] unless the
    draws are correlated, e.g. S copies of one label, which would give a ratio near 1)."""
    var = {}
    for samples in (1, 16):
        X = mc_draws(kind, samples)
        var[samples] = float((X - X.mean(0)).pow(2).sum() / (K - 1))
    assert 8.0 <= var[1] / var[16] <= 32.0, var[1] / var[16]
