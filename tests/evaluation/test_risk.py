"""Learn-then-Test building blocks: p-values checked against hand computation, fixed-sequence testing,
and the guarantee itself on losses whose true mean is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from consistentee.evaluation.risk import (
    fixed_sequence_rejections,
    hoeffding_bentkus_pvalue,
    learn_then_test,
    shift_to_unit,
    wsr_pvalue,
)


def test_hoeffding_bentkus_is_the_smaller_of_its_two_bounds_computed_by_hand():
    n, alpha, r = 100, 0.1, 0.02
    hoeffding = math.exp(-n * (r * math.log(r / alpha) + (1 - r) * math.log((1 - r) / (1 - alpha))))
    bentkus = math.e * sum(math.comb(n, k) * alpha**k * (1 - alpha) ** (n - k) for k in range(0, 3))
    assert hoeffding == pytest.approx(0.0059368, rel=1e-4)
    assert float(hoeffding_bentkus_pvalue(r, n, alpha)) == pytest.approx(min(hoeffding, bentkus), rel=1e-9)
    assert float(hoeffding_bentkus_pvalue(0.0, n, alpha)) == pytest.approx(min(0.9**100, math.e * 0.9**100))
    # a risk at or above the budget is never evidence against H
    assert float(hoeffding_bentkus_pvalue(0.1, n, alpha)) == 1.0
    assert float(hoeffding_bentkus_pvalue(0.3, n, alpha)) == 1.0


def test_wsr_pvalue_follows_the_betting_recursion_step_by_step():
    x, alpha, delta = [0.0, 0.5, 0.0, 1.0, 0.0], 0.4, 0.1
    n = len(x)
    wealth, best, mus, sigma2_prev = 1.0, 1.0, [], 0.25
    for i, xi in enumerate(x, start=1):
        nu = min(1.0, math.sqrt(2 * math.log(1 / delta) / (n * sigma2_prev)))
        wealth *= 1 - nu * (xi - alpha)
        best = max(best, wealth)
        mus.append((0.5 + sum(x[:i])) / (i + 1))
        sigma2_prev = (0.25 + sum((x[j] - mus[j]) ** 2 for j in range(i))) / (i + 1)
    assert float(wsr_pvalue(np.array(x), alpha, delta)) == pytest.approx(min(1.0, 1 / best), rel=1e-12)
    # rows are independent candidates
    both = wsr_pvalue(np.array([x, [1.0] * n]), alpha, delta)
    assert both[0] == pytest.approx(min(1.0, 1 / best)) and both[1] == 1.0


def test_wsr_rejects_a_clearly_safe_candidate_and_keeps_an_unsafe_one():
    rng = np.random.default_rng(0)
    safe = (rng.random(2000) < 0.02).astype(float)
    unsafe = (rng.random(2000) < 0.08).astype(float)
    p = wsr_pvalue(np.stack([safe, unsafe]), 0.05, 0.1)
    assert p[0] < 1e-3 and p[1] > 0.5


def test_shift_maps_a_ternary_drop_and_its_budget_alike():
    unit, a = shift_to_unit(np.array([-1, 0, 1]), 0.01)
    assert unit.tolist() == [0.0, 0.5, 1.0] and a == pytest.approx(0.505)


def test_fixed_sequence_stops_at_the_first_failure():
    assert fixed_sequence_rejections([0.01, 0.05, 0.2, 0.01], 0.1) == 2
    assert fixed_sequence_rejections([0.2, 0.01], 0.1) == 0
    assert fixed_sequence_rejections([], 0.1) == 0
    assert fixed_sequence_rejections([float("nan")], 0.1) == 0


def test_learn_then_test_splits_delta_over_sequences_and_evaluates_lazily():
    p = np.array([0.01, 0.04, 0.06, 0.07, 0.001])
    # two sequences: level 0.05 each
    assert learn_then_test(p, [[0, 1, 2], [3, 4]], 0.1) == [0, 1]
    # one sequence: level 0.1
    assert learn_then_test(p, [[4, 0, 1, 2, 3]], 0.1) == [4, 0, 1, 2, 3]
    asked = []

    def lazy(indices):
        asked.extend(indices)
        return p[indices]

    assert learn_then_test(lazy, [[0, 1, 2, 3, 4]], 0.05, chunk=2) == [0, 1]
    assert asked == [0, 1, 2, 3]  # chunk [4] never computed after the failure at 2
    with pytest.raises(ValueError, match="delta"):
        learn_then_test(p, [[0]], 1.5)


def test_the_guarantee_holds_on_losses_with_a_known_mean():
    """Candidates with true risk 0.00, 0.01, ..., 0.09 against a budget of 0.05: over many calibration sets,
    some candidate above the budget is certified in at most delta of them, and the safe ones usually are."""
    rng = np.random.default_rng(1)
    true_risk = np.arange(10) / 100
    delta, alpha, n, trials = 0.1, 0.05, 800, 300
    bad = certified_safe = 0
    for _ in range(trials):
        losses = (rng.random((10, n)) < true_risk[:, None]).astype(float)
        p = hoeffding_bentkus_pvalue(losses.mean(axis=1), n, alpha)
        chosen = learn_then_test(p, [list(range(10))], delta)
        bad += any(true_risk[i] > alpha for i in chosen)
        certified_safe += 2 in chosen
    assert bad / trials <= delta
    assert certified_safe / trials > 0.9
