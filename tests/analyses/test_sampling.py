"""Pass@k and mG-Pass@k against brute force and the reference values; the summary's structure."""

from __future__ import annotations

from itertools import combinations
from math import ceil

import numpy as np
import pytest

from analyses.sampling import (
    default_ks,
    g_pass_at_k,
    mg_pass_at_k,
    pass_at_k,
    sample_statistics,
    wilson_ci,
)


def _subsets(n: int, c: int, k: int):
    """Every k-subset of n samples (the first c correct): the count of correct ones in each."""
    return [sum(i < c for i in subset) for subset in combinations(range(n), k)]


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 4), (6, 6, 6), (7, 1, 7)])
def test_estimators_equal_the_subset_average(n, c, k):
    counts = np.array(_subsets(n, c, k))
    assert pass_at_k(n, c, k) == pytest.approx(np.mean(counts >= 1))
    for tau in (0.25, 0.5, 0.75, 1.0):
        assert g_pass_at_k(n, c, k, tau) == pytest.approx(np.mean(counts >= max(ceil(tau * k), 1)))
    expected = 2 / k * sum(np.mean(counts >= i) for i in range(ceil(k / 2) + 1, k + 1))
    assert mg_pass_at_k(n, c, k) == pytest.approx(expected)


def test_reference_values_of_gpassk():
    """The example of the reference implementation (open-compass/GPassK, HF `evaluate` gpassk):
    16 samples, 8 correct."""
    assert mg_pass_at_k(16, 8, 4) == pytest.approx(0.16153846153846152)
    assert mg_pass_at_k(16, 8, 8) == pytest.approx(0.09518259518259518)
    assert g_pass_at_k(16, 8, 4, 0.25) == pytest.approx(0.9615384615384616)
    assert g_pass_at_k(16, 8, 8, 1.0) == pytest.approx(7.77000777000777e-05)
    assert mg_pass_at_k(4, 4, 1) == 0.0  # the sum over i in (k/2, k] is empty for k = 1
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)


def test_wilson_and_default_ks():
    lo, hi = wilson_ci(4, 4)
    assert 0.5 < lo < 1.0 and hi == 1.0
    assert np.isnan(wilson_ci(0, 0)[0])
    assert default_ks(4) == [1, 2, 4] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]


def test_sample_statistics():
    correct = [[True, True, False, True], [False, False, False, False], [True, True, True, True]]
    tokens = [[10, 12, 40, 11], [50, 60, 70, 80], [5, 6, 7, 8]]
    truncated = [[False, False, True, False], [False, False, False, True], [False] * 4]
    s = sample_statistics(["a", "b", "c"], correct, tokens, truncated, n_boot=200)
    assert s["n_questions"] == 3 and s["n_samples"] == 12 and s["samples_per_question"] == [4, 4]
    assert s["accuracy"]["value"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert s["pass_at_k"]["1"]["value"] == pytest.approx(s["accuracy"]["value"])
    assert s["pass_at_k"]["4"]["value"] == pytest.approx(2 / 3)
    assert list(s["mg_pass_at_k"]) == ["2", "4"]
    lo, hi = s["accuracy"]["ci"]
    assert 0 <= lo <= s["accuracy"]["value"] <= hi <= 1
    assert s["length"]["min"] == 5 and s["length"]["max"] == 80
    assert s["length"]["mean_incorrect"] == pytest.approx((40 + 50 + 60 + 70 + 80) / 5)
    assert s["truncated"]["value"] == pytest.approx((0.25 + 0.25 + 0) / 3)
    assert (s["all_correct"], s["none_correct"]) == (1, 1)
    assert s["per_question"][0] == {"group": "a", "n": 4, "n_correct": 3, "accuracy": 0.75,
                                    "ci": list(wilson_ci(3, 4)), "mean_tokens": 18.25, "n_truncated": 1}
    # unequal sample counts: a k above a question's count leaves it out of that k
    s = sample_statistics(["a", "b"], [[True, False], [True]], ks=[1, 2])
    assert s["pass_at_k"]["2"]["n_questions"] == 1 and "length" not in s and "truncated" not in s
