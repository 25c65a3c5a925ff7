"""The shared homes: the operator registry, the number checks, the dtype table, the memory probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from curvops.adapters.seed_api import GGN_MODES, ggn_mode_of
from curvops.linops import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    make_operator,
    operator_spec,
)
from curvops.linops.checks import NumberTypeError, check_int, check_real
from curvops.linops.dtypes import DTYPES_BY_NAME, LOW_PRECISION, dtype_from_name, dtype_name
from curvops.linops.memory_probe import (
    cpu_allocation_peak,
    graph_bytes,
    peak_memory,
    saved_tensor_bytes,
)
from curvops.linops.registry import OPERATORS, SHORT_NAMES, operator_names
from references import CountingNet
from torch import nn


def _problem():
    torch.manual_seed(0)
    model = CountingNet().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, model.fc1.in_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, model.fc2.out_features, (6,), generator=g)
    return model, nn.CrossEntropyLoss(), [(x, y)]


def test_every_name_selects_its_operator():
    assert SHORT_NAMES == ("hessian", "ggn", "ef", "fisher_mc")
    expected = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": GGNOperator,
                "empirical_fisher": EmpiricalFisherOperator, "ef": EmpiricalFisherOperator,
                "fisher_mc": FisherOperator}
    assert set(operator_names()) == set(expected)
    model, loss, data = _problem()
    for name, cls in expected.items():
        op = make_operator(name, model, loss, data)
        assert type(op) is cls
        assert op.name == operator_spec(name).name  # the canonical name is the operator's own
    assert make_operator("fisher_mc", model, loss, data).mode == "mc"
    with pytest.raises(ValueError, match="unknown operator 'kfac'; choose from hessian, ggn"):
        make_operator("kfac", model, loss, data)
    with pytest.raises(TypeError, match="mode"):
        OPERATORS["fisher_mc"].build(model, loss, data, mode="exact")


def test_ggn_modes_name_registry_operators():
    assert GGN_MODES == ("empirical", "true", "mc", "auto")
    assert [ggn_mode_of(n) for n in ("ggn", "fisher", "ef", "empirical_fisher", "fisher_mc")] == [
        "true", "true", "empirical", "empirical", "mc"]
    with pytest.raises(ValueError, match="compute_hessian_eigenvalues_lanczos"):
        ggn_mode_of("hessian")


def test_exact_fisher_is_the_ggn():
    model, loss, data = _problem()
    fisher, ggn = FisherOperator(model, loss, data), GGNOperator(model, loss, data)
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(ggn.shape[0], 3, dtype=torch.float64, generator=gen)
    assert fisher.name == "fisher" and torch.equal(fisher.matmat(V), ggn.matmat(V))


def test_number_checks_share_one_wording_and_both_error_types():
    assert check_int("k", np.int64(3), minimum=1) == 3
    assert check_int("k", None, allow_none=True) is None
    assert check_real("tol", np.float32(0.5), minimum=0) == 0.5
    for bad in (2.0, True, "2", None):
        with pytest.raises(NumberTypeError, match="k must be an int, got") as info:
            check_int("k", bad)
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    with pytest.raises(ValueError, match=r"^k must be an int >= 1 and <= 4, got 5$"):
        check_int("k", 5, minimum=1, maximum=4)
    with pytest.raises(ValueError, match=r"^eps must be a finite number > 0 and < 1 or None"):
        check_real("eps", 1.0, above=0, below=1, allow_none=True)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a finite number"):
            check_real("damping", bad)
    with pytest.raises(ValueError, match="must be a number >= 0"):
        check_real("x", float("nan"), minimum=0, finite=False)
    assert check_real("x", float("inf"), minimum=0, finite=False) == float("inf")


def test_dtype_table():
    assert DTYPES_BY_NAME == {"float64": torch.float64, "float32": torch.float32,
                              "bfloat16": torch.bfloat16, "float16": torch.float16}
    assert all(dtype_from_name(dtype_name(d)) is d for d in DTYPES_BY_NAME.values())
    assert LOW_PRECISION == {torch.bfloat16, torch.float16}
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose from float64"):
        dtype_from_name("int8")


def test_memory_probe_counts_storages_once():
    w = torch.randn(50, 40, dtype=torch.float64, requires_grad=True)
    x = torch.randn(30, 50, dtype=torch.float64)
    with saved_tensor_bytes(exclude=[w]) as counted:
        y = torch.tanh(x @ w)  # saves x (w excluded) and tanh's output
    assert counted() == x.nbytes + y.nbytes
    assert graph_bytes([y], exclude=[w]) == x.nbytes + y.nbytes  # the same storages, held
    with peak_memory(torch.device("cpu")) as mem:
        torch.ones(2**20, dtype=torch.float64).sum()
    assert set(mem) == {"peak_bytes", "peak_mb", "base_bytes"}
    assert mem["peak_mb"] == mem["peak_bytes"] / 2**20 and mem["base_bytes"] > 0


def test_cpu_allocation_peak_of_the_block_and_of_its_named_ranges():
    """Known allocations: 1 MiB kept before a range, 2 MiB then 3 MiB freed inside it (the
    range's peak is 3 MiB above where it began), 4 MiB after it."""
    mib = 2**20
    with cpu_allocation_peak(window="probe.range") as peak:
        kept = torch.empty(mib, dtype=torch.uint8)
        with torch.profiler.record_function("probe.range"):
            a = torch.empty(2 * mib, dtype=torch.uint8)
            del a
            b = torch.empty(3 * mib, dtype=torch.uint8)
            del b
        c = torch.empty(4 * mib, dtype=torch.uint8)
        del c, kept
    assert peak["peak_bytes"] == 5 * mib
    assert peak["window_peak_bytes"] == 3 * mib
    with cpu_allocation_peak(window="absent") as none:
        torch.empty(mib, dtype=torch.uint8)
    assert none["window_peak_bytes"] == 0 and none["peak_bytes"] == mib
