"""Uncached single-vector sandwich products take Jv by forward mode (dual parameters).

They must equal the dense references and the double-vjp products to round-off, fall back
to double-vjp for good where forward mode fails and double-vjp does not (an op without a
forward-mode formula, a non-reentrant activation checkpoint), raise the error where both
fail, and respect parameter selection (unselected parameters carry no tangent).
"""

from __future__ import annotations

import pytest
import references as R
import torch
from curvops.linops import FisherOperator, GGNOperator
from test_operators_dense import PROBLEMS, problem, reference
from torch import nn

TOL = 1e-10

SANDWICH = {
    "ggn": lambda m, loss, data, params=None, **kw: GGNOperator(m, loss, data, params, **kw),
    "fisher": lambda m, loss, data, params=None, **kw: FisherOperator(
        m, loss, data, params, mode="exact", **kw),
    "fisher_mc": lambda m, loss, data, params=None, **kw: FisherOperator(
        m, loss, data, params, mode="mc", mc_samples=3, seed=7, **kw),
}


def columns(n: int, m: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(m)]


def double_vjp(op):
    op._forward_mode = False  # the reverse-only path, as after a forward-mode failure
    return op


@pytest.mark.parametrize("kind", sorted(SANDWICH))
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_forward_mode_products_equal_double_vjp_and_reference(name, kind):
    p = problem(name)
    fwd = SANDWICH[kind](p.model, p.spec.module(), p.batches, cache="none")
    rev = double_vjp(SANDWICH[kind](p.model, p.spec.module(), p.batches, cache="none"))
    for v in columns(fwd.shape[0], 3, seed=1):
        got = fwd @ v
        assert R.relative_error(got, rev @ v) <= TOL
        if kind != "fisher_mc":
            assert R.relative_error(got, reference(name, "ggn") @ v) <= TOL
    assert fwd._forward_mode is True
    assert rev._forward_mode is False


@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_forward_mode_with_a_parameter_subset(kind):
    p = problem("mlp_ce_mean")
    names = ("0.bias", "2.weight")
    op = SANDWICH[kind](p.model, p.spec.module(), p.batches, list(names), cache="none")
    for v in columns(op.shape[0], 2, seed=2):
        assert R.relative_error(op @ v, reference("mlp_ce_mean", "ggn", names) @ v) <= TOL
    assert op._forward_mode is True


def test_forward_mode_with_micro_batches():
    p = problem("seq_ce")
    op = GGNOperator(p.model, p.spec.module(), p.batches, micro_batch_size=2, cache="none")
    for v in columns(op.shape[0], 2, seed=3):
        assert R.relative_error(op @ v, reference("seq_ce", "ggn") @ v) <= TOL


def _with_mlp_weights(model: nn.Module, p: R.Problem) -> nn.Module:
    """``model`` (fc1 -> tanh -> fc2) with the weights of ``p``'s 5-8-3 MLP: same matrix."""
    model.load_state_dict({"fc1.weight": p.model[0].weight, "fc1.bias": p.model[0].bias,
                           "fc2.weight": p.model[2].weight, "fc2.bias": p.model[2].bias})
    return model


class _TanhWithoutJvp(torch.autograd.Function):
    """tanh with a backward but no forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class _NoJvpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(_TanhWithoutJvp.apply(self.fc1(x)))


def test_falls_back_to_double_vjp_where_forward_mode_is_missing():
    p = problem("mlp_ce_mean")
    model = _with_mlp_weights(_NoJvpNet().double(), p)
    op = GGNOperator(model, p.spec.module(), p.batches, cache="none")
    with pytest.raises(RuntimeError, match="(?i)jvp|forward"):  # torch really refuses it
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            _TanhWithoutJvp.apply(fwAD.make_dual(torch.zeros(2), torch.ones(2)))
    for v in columns(op.shape[0], 2, seed=4):
        assert R.relative_error(op @ v, reference("mlp_ce_mean", "ggn") @ v) <= TOL
    assert op._forward_mode is False


class _CheckpointedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        hidden = torch.utils.checkpoint.checkpoint(
            lambda t: torch.tanh(self.fc1(t)), x, use_reentrant=False)
        return self.fc2(hidden)


def test_falls_back_on_a_non_reentrant_activation_checkpoint():
    # Forward mode fails there only in the backward (the recomputation saves other
    # tensors); the product must still come out right, by double-vjp.
    p = problem("mlp_ce_mean")
    model = _with_mlp_weights(_CheckpointedNet().double(), p)
    op = GGNOperator(model, p.spec.module(), p.batches, cache="none")
    for v in columns(op.shape[0], 2, seed=8):
        assert R.relative_error(op @ v, reference("mlp_ce_mean", "ggn") @ v) <= TOL
    assert op._forward_mode is False


def test_other_errors_are_not_swallowed():
    p = R.mlp_ce("mean")  # its own copy: the model is modified below
    op = GGNOperator(p.model, p.spec.module(), p.batches, cache="none")
    with torch.no_grad():
        p.model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        op @ columns(op.shape[0], 1, seed=5)[0]
    assert op._forward_mode is None  # double-vjp failed too: forward mode is not blamed


class _EmbeddingNet(nn.Module):
    def __init__(self, **embedding_kw) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4, **embedding_kw)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.emb(ids))).mean(dim=1)


@pytest.mark.parametrize("embedding_kw", [{"padding_idx": 0}, {"padding_idx": 2},
                                          {"scale_grad_by_freq": True}])
def test_embedding_gradient_conventions_match_reverse_mode(embedding_kw):
    # torch's embedding backward gives the padding row no gradient and rescales by
    # frequency with scale_grad_by_freq; every product must use the same matrix.
    torch.manual_seed(0)
    model = _EmbeddingNet(**embedding_kw).double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (5, 7), generator=gen)
    ids[0, :3] = torch.tensor([0, 2, 2])  # the padding rows are used
    data = (ids, torch.randint(0, 3, (5,), generator=gen))
    fwd = GGNOperator(model, nn.CrossEntropyLoss(), data, cache="none")
    rev = double_vjp(GGNOperator(model, nn.CrossEntropyLoss(), data, cache="none"))
    for v in columns(fwd.shape[0], 3, seed=6):
        assert R.relative_error(fwd @ v, rev @ v) <= TOL
    assert fwd._forward_mode is ("scale_grad_by_freq" not in embedding_kw)
