"""Inputs that would change the matrix under a solver, or fail deep inside torch, are refused
at construction with a message that names the offending argument; what is fine keeps working.

Covers the operators (Hessian, GGN, Fisher exact/MC, empirical Fisher) and the Gram operator
with plain torch modules and losses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import references as R
import torch
from curvops.linops import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    GramOperator,
    HessianOperator,
    per_example_gradients,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

ALL = [HessianOperator, GGNOperator, FisherOperator, EmpiricalFisherOperator]
WITH_GRAM = [*ALL, GramOperator]
CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()
DT = torch.float64


@pytest.fixture(autouse=True)
def global_rng_untouched():
    """Every test here leaves the global RNG as it found it."""
    before = torch.get_rng_state()
    yield
    assert torch.equal(torch.get_rng_state(), before), "the test changed the global RNG"


def built(make, seed: int = 1) -> nn.Module:
    """``make()`` with seeded parameters; torch's default initialisation draws from the
    global RNG, so it runs on a forked one."""
    with torch.random.fork_rng(devices=[]):
        model = make()
    return R.reinit_(model, seed)


def net(dtype: torch.dtype = DT) -> R.CountingNet:
    return built(R.CountingNet).to(dtype)


def data(n: int = 4, seed: int = 2, features: int = 3) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, dtype=DT, generator=gen)
    return x, torch.randint(0, 2, (n,), generator=gen)


def refused(exc, model, loss_fn, batches, match, classes=WITH_GRAM, max_forwards=0, **kwargs):
    """Every class refuses at construction, after at most ``max_forwards`` forward passes."""
    R.assert_refused(exc, model, loss_fn, batches, match, classes=classes,
                     max_forwards=max_forwards, **kwargs)


def ones(op) -> Tensor:
    return torch.ones(op.shape[0], dtype=op.dtype)


# --------------------------------------------------------------------------------------
# The MC Fisher needs the data in a fixed order
# --------------------------------------------------------------------------------------


def _loader(**kwargs) -> DataLoader:
    x, y = data(n=8)
    # A loader generator of its own: iterating never touches the global RNG.
    return DataLoader(TensorDataset(x, y), batch_size=3, generator=torch.Generator(), **kwargs)


@pytest.mark.parametrize("cache", ["auto", "none"])
@pytest.mark.parametrize("check", [True, False])
def test_mc_fisher_refuses_a_shuffling_loader(cache, check):
    with pytest.raises(ValueError, match=r"shuffle=False.*fixed permutation as the sampler"):
        FisherOperator(net(), CE, _loader(shuffle=True), mode="mc", cache=cache,
                       check_deterministic=check)


class Reordering:
    """A replayable source (not a DataLoader) that gives its examples in another order on
    every pass: a new batch order, or one batch whose rows are permuted."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]], within: bool = False) -> None:
        self.batches, self.within, self.passes = batches, within, 0

    def __call__(self):
        self.passes += 1
        if self.within:
            (x, y), = self.batches
            perm = torch.roll(torch.arange(x.shape[0]), self.passes)
            return iter([(x[perm], y[perm])])
        k = self.passes % len(self.batches)
        return iter(self.batches[k:] + self.batches[:k])


@pytest.mark.parametrize("within", [False, True], ids=["batch order", "order within a batch"])
@pytest.mark.parametrize("check", [True, False])
def test_mc_fisher_refuses_data_that_reorders_between_passes(within, check):
    batches = [data(n=4)] if within else [data(n=3, seed=s) for s in range(3)]
    model = net()
    model.forwards = 0
    with pytest.raises(ValueError, match="fixed order"):
        FisherOperator(model, CE, Reordering(batches, within), mode="mc",
                       check_deterministic=check)
    assert model.forwards == 0  # refused before any forward pass
    # For the other operators a new order is only another summation order: accepted.
    for cls in ALL:
        op = cls(net(), CE, Reordering(batches, within), check_deterministic=check)
        ref = cls(net(), CE, batches)
        torch.testing.assert_close(op @ ones(op), ref @ ones(ref), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cache", ["auto", "none"])
def test_mc_fisher_over_a_fixed_permutation_is_one_reproducible_matrix(cache):
    """A seeded permutation as the sampler is a fixed order: every construction and every
    product give the same matrix, which is the MC Fisher of the same examples as a list in
    that order (labels keyed by position)."""
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0)).tolist()

    def build(data_):
        return FisherOperator(net(), CE, data_, mode="mc", seed=3, cache=cache)

    op = build(_loader(sampler=perm))
    v = torch.randn(op.shape[0], dtype=DT, generator=torch.Generator().manual_seed(1))
    first = op @ v
    assert torch.equal(op @ v, first)
    assert torch.equal(build(_loader(sampler=perm)) @ v, first)
    x, y = data(n=8)
    as_list = [(x[perm[i : i + 3]], y[perm[i : i + 3]]) for i in range(0, 8, 3)]
    torch.testing.assert_close(build(as_list) @ v, first, rtol=1e-13, atol=1e-15)


def test_exact_operators_accept_a_shuffling_loader():
    for cls in ALL:
        op = cls(net(), CE, _loader(shuffle=True))
        ref = cls(net(), CE, [data(n=8)])
        torch.testing.assert_close(op @ ones(op), ref @ ones(ref), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------
# Losses whose call is not the closed form's
# --------------------------------------------------------------------------------------


class ScaledCE(nn.CrossEntropyLoss):
    def forward(self, o: Tensor, t: Tensor) -> Tensor:
        return super().forward(2 * o, t)


class ShiftedMSE(nn.MSELoss):
    def forward(self, o: Tensor, t: Tensor) -> Tensor:
        return super().forward(o + 1, t)


class CalledBCE(nn.BCEWithLogitsLoss):
    def __call__(self, o: Tensor, t: Tensor) -> Tensor:
        return super().__call__(o.tanh(), t)


class NamedCE(nn.CrossEntropyLoss):
    """A subclass that does not change the loss (only adds a name)."""

    label = "plain"


def test_loss_subclasses_that_change_the_call_are_refused():
    x, y = data()
    t = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(0))
    refused(TypeError, net(), ScaledCE(), [(x, y)], match=r"ScaledCE changes forward of "
            r"nn\.CrossEntropyLoss")
    refused(TypeError, net(), ShiftedMSE(), [(x, t)], match=r"ShiftedMSE changes forward of "
            r"nn\.MSELoss")
    refused(TypeError, net(), CalledBCE(), [(x, t.sigmoid())], match=r"CalledBCE changes "
            r"__call__ of nn\.BCEWithLogitsLoss")
    hooked = nn.CrossEntropyLoss()
    hooked.register_forward_hook(lambda module, args, out: 2 * out)
    refused(TypeError, net(), hooked, [(x, y)], match="forward hooks")
    patched = nn.MSELoss()
    patched.forward = lambda o, t: ((o - t) ** 4).mean()
    refused(TypeError, net(), patched, [(x, t)], match="set on the instance")


def test_loss_subclass_without_a_new_call_is_the_plain_loss():
    batches = [data()]
    for cls in ALL:
        op, ref = cls(net(), NamedCE(), batches), cls(net(), CE, batches)
        assert torch.equal(op @ ones(op), ref @ ones(ref)), cls.__name__


# --------------------------------------------------------------------------------------
# Inputs: Inf, dtype, feature size
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", [True, False])
def test_inf_in_inputs_is_refused_before_any_forward(check):
    """tanh keeps the outputs finite, but the gradients (and every product) would be NaN."""
    good, bad = data(seed=1), data(seed=2)
    bad[0][2, 1] = -math.inf
    model = net()
    with torch.no_grad():
        assert torch.isfinite(model(bad[0])).all()  # finite outputs: the old check passed
    refused(ValueError, model, CE, [good, bad], match=r"batch 1: inputs contains Inf",
            check_deterministic=check)
    nan = data(seed=3)
    nan[0][0, 0] = math.nan
    refused(ValueError, model, CE, [nan], match=r"batch 0: inputs contains NaN")


def test_floating_inputs_of_another_dtype_are_refused():
    x, y = data()
    refused(TypeError, net(), CE, [(x.float(), y)],
            match=r"batch 0: inputs has dtype torch\.float32 but the model computes in "
            r"torch\.float64; pass inputs\.to\(torch\.float64\)")
    refused(TypeError, net(torch.bfloat16), CE, [(x.float(), y)],
            match=r"inputs has dtype torch\.float32 but the model computes in torch\.bfloat16")
    # a later batch, in a tuple of positional inputs
    two = built(TwoInputNet)
    refused(TypeError, two, CE, [((x, x), y), ((x, x.float()), y)],
            match=r"batch 1: inputs\[1\] has dtype torch\.float32")


class TwoInputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2).double()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.fc(a + b)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_inputs_to_a_floating_model_are_explained(dtype):
    """Integer inputs are legitimate for embeddings, so the forward pass decides; its failure
    is reported in our words, naming the input and its dtype."""
    x, y = data()
    refused(TypeError, net(), CE, [(x.round().to(dtype), y)], max_forwards=2,
            match=rf"inputs of dtype {dtype}.*model computes in torch\.float64: pass "
            r"inputs\.to\(torch\.float64\)")


def test_integer_inputs_to_an_embedding_model_work():
    model = built(lambda: nn.Sequential(nn.Embedding(5, 3), nn.Tanh(), nn.Flatten(),
                                        nn.Linear(6, 2)).double())
    ids = torch.tensor([[0, 1], [2, 3], [4, 0]])
    for cls in WITH_GRAM:
        cls(model, CE, [(ids, torch.tensor([0, 1, 1]))])


def test_a_later_batch_with_another_feature_size_is_refused_before_any_forward():
    refused(ValueError, net(), CE, [data(), data(n=3), data(features=5)],
            match=r"batch 2: inputs has shape \(4, 5\) but batch 0's has \(4, 3\)")
    x, y = data()
    refused(ValueError, net(), CE, [(x, y), (x.unsqueeze(1), y)],
            match=r"batch 1: inputs has shape \(4, 1, 3\)")


def test_sequence_inputs_may_change_length_between_batches():
    """Only 2-D (examples, features) inputs have a feature size to compare: a Conv1d model
    over sequences of two lengths is accepted."""
    model = built(lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(),
                                        nn.Conv1d(3, 3, 1)).double())
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 2, n, dtype=DT, generator=gen), torch.randint(0, 3, (2, n),
                generator=gen)) for n in (4, 6)]
    for cls in ALL:
        op = cls(model, CE, batches)
        assert torch.isfinite(op @ ones(op)).all()


# --------------------------------------------------------------------------------------
# Class labels
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.bool])
def test_class_labels_must_be_int64(dtype):
    x, y = data()
    refused(TypeError, net(), CE, [(x, y.to(dtype))],
            match=rf"CrossEntropyLoss targets have dtype {dtype}; .*torch\.int64.*"
            r"targets\.long\(\)")
    with pytest.raises(TypeError, match="targets have dtype"):
        per_example_gradients(net(), CE, (x, y.to(dtype)))


# --------------------------------------------------------------------------------------
# Parameters and the model
# --------------------------------------------------------------------------------------


def test_selected_frozen_parameter_is_refused():
    model = net()
    model.fc1.weight.requires_grad_(False)
    batches = [data()]
    for params in (["fc1.weight"], ["fc1.*"], [model.fc1.weight], model.fc1.weight):
        refused(ValueError, model, CE, batches, params=params,
                match=r"parameter 'fc1\.weight' is selected in `params` but frozen")
    # params=None leaves frozen parameters out, as before
    for cls in WITH_GRAM:
        op = cls(model, CE, batches, params=["fc1.bias", "fc2.*"]) if cls is not GramOperator \
            else cls(model, CE, batches)
        assert op.params[0] is model.fc1.bias


def test_meta_model_is_refused():
    model = nn.Linear(3, 2, device="meta", dtype=DT)
    refused(ValueError, model, CE, [data()], match=r"parameter 'weight' is on the meta device")
    buffered = nn.BatchNorm1d(3).double().eval()
    buffered.running_mean = torch.empty(3, device="meta", dtype=DT)
    refused(ValueError, buffered, MSE, [(data()[0], data()[0])],
            match=r"buffer 'running_mean' is on the meta device")


def test_one_pattern_or_one_parameter_is_accepted_bare():
    model, batches = net(), [data()]
    for cls in ALL:
        listed = cls(model, CE, batches, params=["fc1.*"])
        for bare in ("fc1.*", "fc1.weight"):
            op = cls(model, CE, batches, params=bare)
            assert op.param_names == (("fc1.weight", "fc1.bias") if bare == "fc1.*"
                                      else ("fc1.weight",))
        op = cls(model, CE, batches, params="fc1.*")
        assert torch.equal(op @ ones(op), listed @ ones(listed))
        assert cls(model, CE, batches, params=model.fc2.bias).param_names == ("fc2.bias",)
    refused(ValueError, model, CE, batches, params="fc9.*", match="'fc9.*' matches no parameter")


# --------------------------------------------------------------------------------------
# Numbers: numpy scalars wherever the operators take numbers
# --------------------------------------------------------------------------------------


def test_numpy_integers_are_accepted():
    model, batches = net(), [data(n=5)]
    ref = FisherOperator(model, CE, batches, mode="mc", mc_samples=2, seed=3,
                         micro_batch_size=2, cache_budget_bytes=10**6)
    op = FisherOperator(model, CE, batches, mode="mc", mc_samples=np.int64(2), seed=np.int32(3),
                        micro_batch_size=np.int64(2), cache_budget_bytes=np.int64(10**6))
    assert (op.mc_samples, op.seed, op.micro_batch_size) == (2, 3, 2)
    assert type(op.seed) is int and type(op.cache_budget_bytes) is int
    assert torch.equal(op @ ones(op), ref @ ones(ref))
    op.cache_budget_bytes = np.int64(5 * 10**5)
    assert op.cache_budget_bytes == 5 * 10**5
    g = GramOperator(model, CE, batches, chunk_size=np.int64(2))
    assert torch.equal(g.gradients, GramOperator(model, CE, batches, chunk_size=2).gradients)
    G = per_example_gradients(model, CE, batches[0], chunk_size=np.int16(3))
    assert torch.equal(G, g.gradients)
    # floats, bools and strings stay refused
    for bad in (2.0, True, "2"):
        with pytest.raises(ValueError, match="mc_samples"):
            FisherOperator(model, CE, batches, mode="mc", mc_samples=bad)
        with pytest.raises(ValueError, match="micro_batch_size"):
            GGNOperator(model, CE, batches, micro_batch_size=bad)
        with pytest.raises(TypeError, match="cache_budget_bytes"):
            GGNOperator(model, CE, batches, cache_budget_bytes=bad)
        with pytest.raises(ValueError, match="chunk_size"):
            GramOperator(model, CE, batches, chunk_size=bad)


def test_numpy_reals_scale_and_damp():
    op = GGNOperator(net(), CE, [data()])
    v = ones(op)
    Av = op @ v
    for scalar in (np.float32(0.5), np.float64(0.5), np.int64(2)):
        s = float(scalar)
        torch.testing.assert_close((op * scalar) @ v, s * Av, rtol=0, atol=0)
        torch.testing.assert_close((scalar * op) @ v, s * Av, rtol=0, atol=0)
        torch.testing.assert_close(((2 * op) * scalar) @ v, 2 * s * Av, rtol=0, atol=0)
    damped = op.damped(np.float32(1e-3))
    torch.testing.assert_close(damped @ v, Av + float(np.float32(1e-3)) * v, rtol=0, atol=0)
    with pytest.raises(TypeError, match="damping must be a real number, got '0.1'"):
        op.damped("0.1")
    for bad in (math.nan, np.float32("inf")):
        with pytest.raises(ValueError, match="damping must be a finite number"):
            op.damped(bad)
