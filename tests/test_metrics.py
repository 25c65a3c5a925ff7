"""Spectrum metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from curvops.solvers.metrics import condition_number, effective_rank, spectrum_metrics


def entropy_rank(p: list[float]) -> float:
    """exp(-Σ p ln p), written out."""
    return math.exp(-sum(x * math.log(x) for x in p))


def test_psd_spectrum_with_a_zero():
    m = spectrum_metrics([1.0, 4.0, 0.0, 2.0], is_psd=True)  # any order
    assert m["max_eigenvalue"] == 4.0
    assert m["min_computed_eigenvalue"] == m["smallest_eigenvalue"] == 0.0
    assert m["spectral_gap"] == 2.0  # 4 - 2
    assert m["spectral_range"] == 4.0  # 4 - 0
    assert m["trace_of_computed"] == 7.0
    assert m["condition_number"] == 4.0  # 4 / 1: the zero is filtered out
    # p = (4/7, 2/7, 1/7): H = 0.95566, exp(H) = 2.6004.
    assert m["effective_rank"] == pytest.approx(entropy_rank([4 / 7, 2 / 7, 1 / 7]), rel=1e-14)
    assert m["effective_rank"] == pytest.approx(2.6004, abs=1e-4)
    assert m["n_computed"] == 4 and m["n_numerically_zero"] == 1
    assert m["eps"] == 4 * np.finfo(np.float64).eps
    assert "computed eigenvalues only" in m["note"] and "indefinite" not in m["note"]


def test_equal_values_have_full_effective_rank_and_unit_condition():
    m = spectrum_metrics([3.0, 3.0, 3.0], is_psd=True)
    assert m["condition_number"] == 1.0
    assert m["effective_rank"] == pytest.approx(3.0, rel=1e-14)
    assert m["spectral_gap"] == 0.0 and m["spectral_range"] == 0.0


def test_eps_filter_drops_numerically_zero_values():
    values = [1.0, 1e-3, 1e-12]
    m = spectrum_metrics(values, is_psd=True, eps=1e-6)
    assert m["condition_number"] == pytest.approx(1e3, rel=1e-14)
    assert m["n_numerically_zero"] == 1
    assert m["effective_rank"] == pytest.approx(entropy_rank([1 / 1.001, 1e-3 / 1.001]), rel=1e-14)
    # A smaller eps keeps the tiny value: condition 1e12.
    assert condition_number(np.array(values), 1e-15) == pytest.approx(1e12, rel=1e-12)
    assert spectrum_metrics(values, is_psd=True, eps=1e-15)["n_numerically_zero"] == 0


def test_indefinite_spectrum_uses_absolute_values_and_says_so():
    m = spectrum_metrics([3.0, -2.0, 1.0], is_psd=False)
    assert m["max_eigenvalue"] == 3.0 and m["min_computed_eigenvalue"] == -2.0
    assert m["spectral_gap"] == 2.0  # 3 - 1 (descending algebraic order: 3, 1, -2)
    assert m["spectral_range"] == 5.0  # 3 - (-2)
    assert m["trace_of_computed"] == 2.0
    assert m["condition_number"] == 3.0  # |3| / |1|
    assert m["effective_rank"] == pytest.approx(entropy_rank([1 / 2, 1 / 3, 1 / 6]), rel=1e-14)
    assert "indefinite" in m["note"] and "|λ|" in m["note"]


def test_nonpsd_operator_with_positive_computed_values_is_not_called_indefinite():
    m = spectrum_metrics([5.0, 2.0], is_psd=False)  # e.g. the top-2 of a Hessian
    assert m["condition_number"] == 2.5
    assert "indefinite" not in m["note"]


def test_psd_roundoff_negatives_count_as_zero_with_a_note():
    m = spectrum_metrics([2.0, 1.0, -1e-3], is_psd=True, eps=1e-6)
    assert m["condition_number"] == 2.0
    assert m["n_numerically_zero"] == 1
    assert m["min_computed_eigenvalue"] == -1e-3  # reported as computed
    assert "round-off" in m["note"] and "-1.000e-03" in m["note"]
    assert m["effective_rank"] == pytest.approx(entropy_rank([2 / 3, 1 / 3]), rel=1e-14)


def test_edge_cases():
    single = spectrum_metrics([5.0], is_psd=True)
    assert math.isnan(single["spectral_gap"])
    assert single["condition_number"] == 1.0 and single["effective_rank"] == 1.0
    zeros = spectrum_metrics([0.0, 0.0], is_psd=True)
    assert zeros["condition_number"] == math.inf and zeros["effective_rank"] == 0.0
    assert zeros["n_numerically_zero"] == 2
    empty = spectrum_metrics([], is_psd=True)
    assert empty["n_computed"] == 0 and math.isnan(empty["condition_number"])
    assert empty["note"] == "no eigenvalues were computed"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        spectrum_metrics([1.0, float("nan")], is_psd=True)
    with pytest.raises(ValueError, match="eps"):
        spectrum_metrics([1.0, 2.0], is_psd=True, eps=-1.0)
    with pytest.raises(ValueError, match="negative"):
        condition_number(np.array([2.0, -1.0]), 1e-12)
    with pytest.raises(ValueError, match="negative"):
        effective_rank(np.array([2.0, -1.0]), 1e-12)
    with pytest.raises(ValueError, match="Inf"):
        effective_rank(np.array([np.inf, 1.0]), 1e-12)
    # Round-off negatives within eps * max|λ| are accepted (and filtered as zero).
    assert condition_number(np.array([2.0, 1.0, -1e-14]), 1e-12) == 2.0
