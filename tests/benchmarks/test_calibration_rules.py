"""benchmarks/calibration_rules.py: every strategy on the same re-splits, measured on the rows it did not see.
The script is not a package module: it is loaded from its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from consistentee.evaluation.calibration import Outcomes

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("benchmark_calibration_rules", ROOT / "benchmarks" / "calibration_rules.py")
script = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = script
_spec.loader.exec_module(script)


def _outcomes(exit_layers: list[int], wrong_rates: list[float], n: int, seed: int) -> Outcomes:
    """One sequence of candidates on n rows, 6 layers, full depth always right: candidate i exits at
    ``exit_layers[i]`` and is wrong on a random ``wrong_rates[i]`` share of the rows."""
    rng = np.random.default_rng(seed)
    exits = np.array([[e] * n for e in exit_layers])
    correct = np.array([rng.random(n) >= w for w in wrong_rates])
    return Outcomes(exits, correct, correct.copy(), np.ones(n, dtype=bool), [list(range(len(exit_layers)))], 6)


def test_every_strategy_is_measured_on_held_out_rows_and_the_faster_safe_rule_wins():
    n = 2000
    # confidence reaches layer 2 (3x) at no loss; the policy only layer 4 (1.5x); pcee gets 3x by breaking budgets
    outcomes = {"consistentee": _outcomes([6, 5, 4, 3], [0.0, 0.0, 0.0, 0.2], n, 1),
                "confidence": _outcomes([6, 4, 3, 2], [0.0, 0.0, 0.0, 0.0], n, 2),
                "pcee": _outcomes([6, 4, 2], [0.0, 0.0, 0.3], n, 3)}
    args = script.parse_args(["runs/x", "--resplits", "6"])
    found = script.study(outcomes, 1000, args)
    assert set(found) == set(script.STRATEGIES)
    assert found["confidence"]["median_speedup"] == 3.0 and found["consistentee"]["median_speedup"] == 1.5
    assert found["pcee"]["median_speedup"] == 1.5  # its 3x knob loses 30 points: never certified
    assert all(row["violation_rate"] == 0.0 for row in found.values())
    assert found["best-of"]["chosen"]["confidence"] == 1.0 and found["best-of"]["median_speedup"] == 3.0
    assert sum(found["best-of-certified"]["chosen"].values()) == 1.0
