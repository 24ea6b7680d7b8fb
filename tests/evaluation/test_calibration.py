"""Calibrated operating points: knob order from the rule, the fastest certified knob, and a resampling
study in which calibrated choices keep their budget while naive ones break it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from consistentee.evaluation.calibration import (
    Outcomes,
    calibrate,
    candidate_sequences,
    chain_on_order_split,
    outcomes_from_points,
    pvalues,
    resampling_study,
    unseen_pvalues,
)
from consistentee.evaluation.risk import learn_then_test
from consistentee.evaluation.sweep import EvalTables, build_candidates, sweep
from consistentee.exits.rules import RULES


def test_sequences_run_from_conservative_to_aggressive_per_model_and_patience():
    assert candidate_sequences("confidence", [0.9, 0.5, 0.99]) == [[2, 0, 1]]
    assert candidate_sequences("entropy", [0.3, 0.01, 0.1]) == [[1, 2, 0]]
    assert candidate_sequences("static", [1, 6, 3]) == [[1, 2, 0]]
    seqs = candidate_sequences("pcee", [(1, 0.2), (2, 0.1), (1, 0.05), (2, 0.3)])
    assert sorted(seqs) == [[1, 3], [2, 0]]
    seqs = candidate_sequences("consistentee", [0.5, 0.9, 0.5, 0.9], model_keys=[0.03, 0.03, 0.05, 0.05])
    assert sorted(seqs) == [[1, 0], [3, 2]]


def test_one_chain_follows_the_order_splits_frontier_from_slow_to_fast():
    # two models' sequences; mean exit layer and accuracy drop of each candidate on the order rows
    layers = np.array([6.0, 5.0, 4.0, 5.5, 4.5, 3.5])
    losses = np.array([0.0, 0.1, 0.5, 0.0, 0.3, 0.2])
    # 2 and 4 are beaten by 5 (faster, smaller loss); 0 and 3 tie on the loss, so both stay
    assert chain_on_order_split([[0, 1, 2], [3, 4, 5]], layers, losses) == [[0, 3, 1, 5]]
    assert chain_on_order_split([], layers, losses) == []
    # a faster knob that fixes a full-depth mistake on the order rows (drop < 0) does not push out the safe,
    # slower ones: the chain still starts where nothing is lost
    assert chain_on_order_split([[0, 1], [2]], np.array([6.0, 5.0, 4.8]), np.array([0.0, 0.0, -0.1])) == [[0, 1, 2]]


def test_one_chain_tests_at_the_whole_delta_where_separate_sequences_split_it():
    p = np.array([0.01, 0.07, 0.01, 0.2])
    separate = [[0, 1], [2, 3]]  # delta / 2 = 0.05 each: candidate 1 (p = 0.07) is not certified
    assert sorted(learn_then_test(p, separate, 0.1)) == [0, 2]
    chain = chain_on_order_split(separate, np.array([6.0, 4.0, 5.5, 3.0]), np.array([0.0, 0.2, 0.0, 0.9]))
    assert chain == [[0, 2, 1, 3]]
    assert sorted(learn_then_test(p, chain, 0.1)) == [0, 1, 2]


def _synthetic(n: int, drops: list[float], seed: int = 0) -> Outcomes:
    """Candidate k exits at layer 6 - k and loses ``drops[k]`` of accuracy against a 90%-right full depth."""
    rng = np.random.default_rng(seed)
    ref = rng.random(n) < 0.9
    correct = []
    for d in drops:
        flip = rng.random(n) < d / 0.9
        correct.append(ref & ~flip)
    k = len(drops)
    exit_layers = np.stack([np.full(n, max(1, 6 - i)) for i in range(k)])
    correct = np.stack(correct)
    return Outcomes(exit_layers, correct, correct == ref[None, :], ref, [list(range(k))], 6)


def test_calibrate_picks_the_fastest_certified_knob_and_full_depth_when_none_is():
    out = _synthetic(20000, [0.0, 0.002, 0.004, 0.02, 0.05])
    choice = calibrate(out, np.arange(20000), max_loss_points=1.0, delta=0.1)
    assert choice.index == 2 and choice.certified == 3
    assert choice.layer_speedup == pytest.approx(6 / 4)
    none = calibrate(_synthetic(200, [0.05, 0.1]), np.arange(200), max_loss_points=1.0, delta=0.1)
    assert none.index is None and none.layer_speedup == 1.0
    strict = calibrate(out, np.arange(20000), max_loss_points=1.0, delta=0.1, loss="disagreement")
    assert strict.index is not None and strict.index <= 2


def test_resampling_study_keeps_the_budget_where_the_naive_choice_breaks_it():
    # many candidates near the budget: the naive dev choice is the luckiest of them
    drops = [0.0, 0.004, 0.008, 0.01, 0.011, 0.012, 0.013, 0.014, 0.015]
    out = _synthetic(2500, drops, seed=3)
    study = resampling_study(out, calibration_size=1000, test_size=1500, budgets=[1.0], delta=0.1, resplits=100)
    row = study["1.0"]
    assert row["violation_rate"] <= 0.1
    assert row["naive_violation_rate"] > 0.3
    assert 1.0 <= row["median_speedup"] <= row["naive_median_speedup"]
    with pytest.raises(ValueError, match="cannot split"):
        resampling_study(out, calibration_size=2000, test_size=1000, budgets=[1.0])


def _tables(n: int, seed: int) -> EvalTables:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    logits = torch.randn(n, 4, 2, generator=g)
    logits[torch.arange(n), :, labels] += torch.linspace(0.2, 3.0, 4)  # deeper exits are better
    return EvalTables(logits.softmax(-1), labels, torch.full((n,), 10))


def test_dense_grids_trace_the_curve_and_feed_the_outcomes():
    dev, test = _tables(300, 0), _tables(400, 1)
    default = build_candidates("confidence", dev, test)
    dense = build_candidates("confidence", dev, test, grid_points=60)
    assert len(dense) > 3 * len(default)
    scores = torch.cat([dev.probs, test.probs])[:, :-1].max(-1).values
    knobs = [c.rule.knob for c in dense]
    assert min(knobs) <= scores.min().item() + 1e-6 and max(knobs) >= scores.max().item() - 1e-6
    points = sweep(dense)
    out = outcomes_from_points("confidence", points, dev, test)
    assert out.exit_layers.shape == (len(points), 700)
    # rows 0..299 are dev: they reproduce each point's dev accuracy
    dev_acc = out.correct[:, :300].mean(axis=1)
    assert np.allclose(dev_acc, [p.dev["accuracy"] for p in points])
    assert out.sequences == [sorted(range(len(points)), key=lambda i: -knobs[i])]


def test_every_thresholded_rule_has_a_data_grid_and_an_order():
    probs = torch.rand(50, 4, 3).softmax(-1)
    for name, cls in RULES.items():
        if name == "oracle":
            continue
        grid = cls.data_grid(probs, torch.rand(50, 3), torch.rand(50, 4), points=20)
        assert grid, name
        order = [cls.aggressiveness(k) for k in grid]
        assert all(isinstance(v, float) for v in order), name


def test_unseen_pvalue_is_the_normal_tail_of_the_two_means_hand_computed():
    # 10 rows, one candidate: losses (drop) 1, -1 and eight 0s -> mean 0; budget 5 points, 40 unseen rows
    ref = np.ones(10, dtype=bool)
    ref[1] = False
    correct = np.ones((1, 10), dtype=bool)
    correct[0, 0] = False
    out = Outcomes(np.full((1, 10), 3), correct, correct == ref[None, :], ref, [[0]], 6)
    # variance with one pseudo-row at -1 and one at +1: (1 + 1 + 1 + 1) / 12; sd of the difference of means
    sd = math.sqrt(4 / 12 * (1 / 10 + 1 / 40))
    expected = 0.5 * math.erfc(-((0.0 - 0.05) / sd) / math.sqrt(2))
    p = unseen_pvalues(out, np.arange(10), "accuracy_drop", 5.0, test_size=40)
    assert p[0] == pytest.approx(expected, rel=1e-9)
    both = pvalues(out, np.arange(10), "accuracy_drop", 5.0, 0.1, method="expected+unseen", test_size=40)
    alone = pvalues(out, np.arange(10), "accuracy_drop", 5.0, 0.1, method="expected")
    assert both[0] == pytest.approx(max(alone[0], expected))
    with pytest.raises(ValueError, match="needs test_size"):
        pvalues(out, np.arange(10), "accuracy_drop", 5.0, 0.1, method="unseen")
    with pytest.raises(ValueError, match="unknown calibration method"):
        pvalues(out, np.arange(10), "accuracy_drop", 5.0, 0.1, method="bogus", test_size=5)


def test_a_knob_just_under_the_budget_breaks_it_on_unseen_rows_unless_they_are_tested():
    # candidate 1 loses 0.8 points in expectation: on a huge calibration set the expected-loss test
    # certifies it, yet on 500 unseen rows its realised loss exceeds 1 point about 30% of the time.
    out = _synthetic(100500, [0.0, 0.008])
    rows = np.arange(100000)
    expected = calibrate(out, rows, max_loss_points=1.0, delta=0.1, method="expected")
    guarded = calibrate(out, rows, max_loss_points=1.0, delta=0.1, method="expected+unseen", test_size=500)
    assert expected.index == 1
    assert guarded.index == 0
    study = resampling_study(out, calibration_size=100000, test_size=500, budgets=[1.0], resplits=40,
                             method="expected+unseen", compare_methods=("expected",))
    assert study["1.0"]["violation_rate"] <= 0.1 < study["1.0"]["by_method"]["expected"]["violation_rate"]
