"""Bad input gets a clear exception at construction, before any product; the determinism
check leaves the model's buffers and the RNG as they were."""

from __future__ import annotations

import functools

import pytest
import references as R
import torch
from curvops.linops import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ALL = [HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator]



def net() -> R.CountingNet:
    return R.reinit_(R.CountingNet().double(), 1)


def data(n: int = 4, targets: str = "class", seed: int = 2) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    if targets == "class":
        return x, torch.randint(0, 2, (n,), generator=gen)
    return x, torch.randn(n, 2, dtype=torch.float64, generator=gen)


CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()


assert_refused = functools.partial(R.assert_refused, classes=ALL)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def test_empty_data():
    assert_refused(ValueError, net(), CE, [], match="empty")
    assert_refused(ValueError, net(), CE, (), match="empty")
    assert_refused(ValueError, net(), CE, None, match="empty")
    assert_refused(ValueError, net(), CE, lambda: iter([]), match="empty")
    empty = TensorDataset(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0).long())
    assert_refused(ValueError, net(), CE, DataLoader(empty, batch_size=2), match="empty")
    # a batch with zero examples
    assert_refused(ValueError, net(), CE, [(torch.zeros(0, 3, dtype=torch.float64),
                                            torch.zeros(0).long())], match="empty")
    # cross-entropy where every target is ignored: no loss terms
    x, _ = data()
    assert_refused(ValueError, net(), CE, [(x, torch.full((4,), -100))], match="empty")


def test_one_shot_generator_is_refused():
    batches = [data(seed=s) for s in range(3)]
    assert_refused(TypeError, net(), CE, (b for b in batches), match="one-shot")
    assert_refused(TypeError, net(), CE, iter(batches), match="one-shot")


def test_not_iterable_data_and_bad_batches():
    assert_refused(TypeError, net(), CE, 3)
    x, y = data()
    assert_refused(TypeError, net(), CE, [(x, y, y)], match="pair")
    assert_refused(TypeError, net(), CE, [(x, [0, 1, 0, 1])], match="tensor")


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn, exc",
    [
        (nn.NLLLoss(), TypeError),
        (nn.L1Loss(), TypeError),
        (nn.HuberLoss(), TypeError),
        (nn.KLDivLoss(), TypeError),
        (lambda out, y: ((out - y) ** 2).sum(), TypeError),
        (nn.CrossEntropyLoss(weight=torch.ones(2, dtype=torch.float64)), ValueError),
        (nn.CrossEntropyLoss(label_smoothing=0.1), ValueError),
        (nn.CrossEntropyLoss(ignore_index=5), ValueError),
        (nn.CrossEntropyLoss(reduction="none"), ValueError),
        (nn.MSELoss(reduction="none"), ValueError),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(2, dtype=torch.float64)), ValueError),
        (nn.BCEWithLogitsLoss(weight=torch.ones(2, dtype=torch.float64)), ValueError),
        (nn.BCEWithLogitsLoss(reduction="none"), ValueError),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, type) else v.__name__,
)
def test_unsupported_losses(loss_fn, exc):
    assert_refused(exc, net(), loss_fn, [data()])


def test_targets_checked():
    x, y = data()
    # float (probability) targets for cross-entropy
    assert_refused(ValueError, net(), CE, [(x, torch.rand(4, 2, dtype=torch.float64))],
                   match="float")
    # class index out of range
    assert_refused(ValueError, net(), CE, [(x, torch.tensor([0, 1, 2, 0]))], max_forwards=2)
    # MSE: shape mismatch, integer targets, another float dtype
    _, t = data(targets="values")
    assert_refused(ValueError, net(), MSE, [(x, t[:, :1])], match="shape", max_forwards=2)
    assert_refused(ValueError, net(), MSE, [(x, t.unsqueeze(-1))], match="shape", max_forwards=2)
    assert_refused(ValueError, net(), MSE, [(x, t.long())], match="floating")
    assert_refused(TypeError, net(), MSE, [(x, t.float())], match="dtype", max_forwards=2)
    # outputs and targets with a different number of examples
    assert_refused(ValueError, net(), MSE, [(x, t[:3])], max_forwards=2)


# --------------------------------------------------------------------------------------
# Model, parameters, options
# --------------------------------------------------------------------------------------


def test_nan_or_inf_in_parameters():
    for bad in (float("nan"), float("inf")):
        model = net()
        with torch.no_grad():
            model.fc2.bias[1] = bad
        assert_refused(ValueError, model, CE, [data()], match="fc2.bias")
        # an unselected parameter with NaN still makes the outputs NaN: refused too
        assert_refused(ValueError, model, CE, [data()], params=["fc1.*"], max_forwards=2)


def test_nan_in_inputs():
    x, y = data()
    x[2, 1] = float("nan")
    assert_refused(ValueError, net(), CE, [(x, y)], match="NaN", max_forwards=2)


def test_inf_loss():
    # finite outputs, infinite loss (overflowing logits would be Inf outputs; use MSE)
    x, _ = data()
    t = torch.full((4, 2), 1e200, dtype=torch.float64)
    assert_refused(ValueError, net(), MSE, [(x, t)], match="loss", max_forwards=2)


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc(x))


def test_dropout_in_train_mode():
    model = R.reinit_(DropoutNet().double(), 3)
    batches = [data(n=8)]
    for cls in ALL:
        with pytest.raises(ValueError, match="differ"):
            cls(model, CE, batches)
        # opting out of the check: constructed without error
        op = cls(model, CE, batches, check_deterministic=False)
        assert op.shape == (8, 8)
    model.eval()
    for cls in ALL:
        cls(model, CE, batches)


def test_batchnorm_in_train_mode():
    p = R.batchnorm_eval()
    p.model.train()
    for cls in ALL:
        for check in (True, False):
            with pytest.raises(ValueError, match="BatchNorm"):
                cls(p.model, p.spec.module(), p.batches, check_deterministic=check)


def test_parameter_selection_errors():
    model = net()
    batches = [data()]
    assert_refused(ValueError, model, CE, batches, params=["fc3.*"], match="fc3")
    assert_refused(ValueError, model, CE, batches, params=["fc1.weight", "nothing"])
    other = nn.Linear(3, 4).double()
    assert_refused(ValueError, model, CE, batches, params=[other.weight], match="belong")
    assert_refused(ValueError, model, CE, batches,
                   params=[model.fc1.weight, model.fc1.weight], match="twice")
    assert_refused(TypeError, model, CE, batches, params=[model.fc1.weight, "fc2.bias"])
    assert_refused(ValueError, model, CE, batches, params=[], match="empty")
    for q in model.parameters():
        q.requires_grad_(False)
    assert_refused(ValueError, model, CE, batches, match="empty")


def test_bad_model_loss_and_options():
    batches = [data()]
    assert_refused(TypeError, lambda x: x, CE, batches)
    assert_refused(TypeError, net(), "cross_entropy", batches)
    for bad in (0, -1, 1.5, True, "2"):
        assert_refused(ValueError, net(), CE, batches, micro_batch_size=bad)
    with pytest.raises(ValueError, match="mode"):
        FisherOperator(net(), CE, batches, mode="sampled")
    for bad in (0, -2, 1.0, True):
        with pytest.raises(ValueError, match="mc_samples"):
            FisherOperator(net(), CE, batches, mode="mc", mc_samples=bad)
    for bad in ("0", 1.5, None):
        with pytest.raises(TypeError, match="seed"):
            FisherOperator(net(), CE, batches, mode="mc", seed=bad)


# --------------------------------------------------------------------------------------
# Vectors given to products
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_bad_vectors(cls):
    op = cls(net(), CE, [data()])
    n = op.shape[0]
    model = op.model
    model.forwards = 0
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(n + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(n, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.zeros(n, dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        op.matmat(torch.zeros(n - 1, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        op.matvec(torch.zeros(n, dtype=torch.float32))
    with pytest.raises(TypeError, match="dtype"):
        op.matmat(torch.zeros(n, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="meta"):
        op.matvec(torch.zeros(n, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="numpy|Tensor"):
        op.matvec(torch.zeros(n, dtype=torch.float64).numpy())
    assert model.forwards == 0  # refused before any forward pass
    # zero columns: an empty result, no work
    assert op.matmat(torch.zeros(n, 0, dtype=torch.float64)).shape == (n, 0)
    assert model.forwards == 0


# --------------------------------------------------------------------------------------
# The determinism check leaves the model and the RNG as they were
# --------------------------------------------------------------------------------------


class StatefulNet(nn.Module):
    """BatchNorm in eval mode (running statistics) plus a buffer the forward pass mutates."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.out(torch.tanh(self.bn(self.fc(x))))


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_determinism_check_preserves_buffers_and_rng(cls):
    model = R.reinit_(StatefulNet().double(), 4)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        model.bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    model.eval()
    before = _state(model)
    rng_before = torch.get_rng_state()
    cls(model, CE, [data(), data(seed=5)])
    after = _state(model)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_failed_determinism_check_restores_rng(cls):
    model = R.reinit_(DropoutNet().double(), 3)
    rng_before = torch.get_rng_state()
    with pytest.raises(ValueError):
        cls(model, CE, [data(n=8)])
    assert torch.equal(torch.get_rng_state(), rng_before)
    # and the check really consumed random numbers (so the restore is what kept them)
    model(data(n=8)[0])
    assert not torch.equal(torch.get_rng_state(), rng_before)


# --------------------------------------------------------------------------------------
# Gaps found in review (these fail against the current core; see the report)
# --------------------------------------------------------------------------------------


def test_data_that_changes_between_passes_is_refused():
    """DECISIONS.md (Data): "a data loader whose content changes between passes (random
    augmentation) is caught by the determinism check". Here every pass over the data adds
    fresh noise to the inputs, so no two products use the same matrix."""
    x, y = data(n=6)
    gen = torch.Generator().manual_seed(7)

    def augmented():
        noise = 0.1 * torch.randn(x.shape, dtype=x.dtype, generator=gen)
        return iter([(x + noise, y)])

    for cls in ALL:
        with pytest.raises(ValueError):
            cls(net(), CE, augmented)


def test_nan_in_a_later_batch_is_refused():
    """DECISIONS.md (Errors): NaN/Inf in outputs or loss raise a ValueError. The check looks
    at the first micro-batch only, so NaN inputs in the second batch pass construction and
    every product silently returns NaN."""
    x, y = data()
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    for cls in ALL:
        with pytest.raises(ValueError, match="NaN"):
            op = cls(net(), CE, [(x, y), (x_bad, y)])
            op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
