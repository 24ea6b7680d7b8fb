"""Paired bootstrap: differences between rules come with intervals from the test split's own noise."""

from __future__ import annotations

import numpy as np

from consistentee.evaluation.calibration import Outcomes
from consistentee.evaluation.summary import paired_bootstrap, policy_sensitivity


def _rule(ref: np.ndarray, exit_layers: list[int], wrong_share: list[float], seed: int) -> Outcomes:
    """Candidate k exits every row at ``exit_layers[k]`` and gets ``wrong_share[k]`` of full depth's right rows wrong."""
    rng = np.random.default_rng(seed)
    n = len(ref)
    correct = np.stack([ref & ~(rng.random(n) < w) for w in wrong_share])
    layers = np.stack([np.full(n, e) for e in exit_layers])
    return Outcomes(layers, correct, correct == ref[None, :], ref, [list(range(len(exit_layers)))], 6)


def test_a_clearly_faster_rule_is_ahead_in_almost_every_resample_and_a_copy_is_level():
    ref = np.random.default_rng(0).random(3000) < 0.85
    fast = _rule(ref, [6, 2], [0.0, 0.002], seed=1)  # 3x within 1 point
    slow = _rule(ref, [6, 4, 3], [0.0, 0.003, 0.05], seed=2)  # 1.5x within 1 point, 2x far outside
    result = paired_bootstrap({"consistentee": fast, "slow": slow, "copy": fast}, np.arange(3000), (0.0, 0.8),
                              resamples=300, seed=0)
    lo, mid, hi = result["rules"]["consistentee"]["best_layer_speedup_at_1pt"]
    assert lo <= mid <= hi and mid == 3.0
    diff = result["rules"]["slow"]["reference_minus_rule"]["best_layer_speedup_at_1pt"]
    assert diff[0] > 1.0  # 3x against 1.5x in every resample
    assert result["rules"]["slow"]["reference_ahead_share"]["best_layer_speedup_at_1pt"] == 1.0
    assert result["rules"]["copy"]["reference_minus_rule"]["auc"] == [0.0, 0.0, 0.0]
    assert result["rules"]["copy"]["reference_ahead_share"]["auc"] == 0.0
    assert "reference_minus_rule" not in result["rules"]["consistentee"]


def test_the_same_seed_gives_the_same_intervals():
    ref = np.random.default_rng(5).random(500) < 0.8
    outs = {"consistentee": _rule(ref, [6, 3], [0.0, 0.02], 1), "other": _rule(ref, [6, 2], [0.0, 0.05], 2)}
    a = paired_bootstrap(outs, np.arange(500), (0.0, 0.8), resamples=50, seed=7)
    b = paired_bootstrap(outs, np.arange(500), (0.0, 0.8), resamples=50, seed=7)
    assert a == b


def test_policy_sensitivity_tells_a_confidence_reading_policy_from_a_per_layer_constant():
    rng = np.random.default_rng(0)
    n = 200
    confident = rng.uniform(0.5, 1.0, n)  # exit 1's max probability (2 classes)
    probs = np.zeros((n, 3, 2))
    probs[:, 0, 0], probs[:, 0, 1] = confident, 1 - confident
    probs[:, 1:, 0] = 0.9
    probs[:, 1:, 1] = 0.1
    labels = (rng.uniform(size=n) > confident).astype(int)  # less confident rows are more often wrong
    reads = 1 / (1 + np.exp(-(8 * confident - 6)))  # a policy monotone in the confidence
    against = 1 - reads
    constant = np.full(n, 0.3)
    layers = policy_sensitivity(np.stack([reads, constant], 1), probs, labels)
    assert [r["layer"] for r in layers] == [1, 2]
    assert layers[0]["spearman_with_max_prob"] == 1.0 and layers[0]["logit_std"] > 0.5
    assert layers[0]["spearman_with_correct"] == layers[0]["max_prob_spearman_with_correct"] > 0
    assert layers[1]["logit_std"] == 0.0 and layers[1]["spearman_with_max_prob"] is None  # decides by layer
    assert policy_sensitivity(np.stack([against, constant], 1), probs, labels)[0]["spearman_with_max_prob"] == -1.0
