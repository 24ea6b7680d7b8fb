"""benchmarks/decision_ceiling.py: richer exit decisions on fixed exits, compared with one confidence threshold."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from consistentee.exits.rules import make_rule, simulate_exits

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("benchmark_decision_ceiling", ROOT / "benchmarks" / "decision_ceiling.py")
dc = importlib.util.module_from_spec(spec)
sys.modules["benchmark_decision_ceiling"] = dc
spec.loader.exec_module(dc)


def _tables(n: int = 300, layers: int = 4, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(n, layers, classes, generator=gen), -1)
    labels = torch.randint(0, classes, (n,), generator=gen)
    return probs.numpy(), labels.numpy()


def test_the_confidence_row_is_the_projects_confidence_rule():
    probs, labels = _tables()
    view = {"max_prob": probs.max(-1)}
    for tau in (0.4, 0.6, 0.8, 0.95):
        mine = dc.first_exit(view["max_prob"] >= tau)
        theirs = simulate_exits(make_rule("confidence", tau), torch.from_numpy(probs)).exit_layer.numpy() - 1
        np.testing.assert_array_equal(mine, theirs)


def test_per_layer_thresholds_find_a_layer_that_is_right_only_when_confident():
    # layer 1 is right exactly when its max probability exceeds 0.8; layers 2-3 are never better than layer 4
    n = 400
    rng = np.random.default_rng(0)
    max_prob = rng.uniform(0.5, 1.0, (n, 4))
    correct = np.zeros((n, 4))
    correct[:, 0] = max_prob[:, 0] > 0.8
    correct[:, 3] = 1.0
    th = dc.per_layer_thresholds(max_prob, correct, lam=0.2)
    assert 0.78 <= th[0] <= 0.82
    assert not (max_prob[:, 1:3] >= th[1:3]).any()  # nobody exits where the exit is always wrong
    acc, speedup = dc.point(dc.first_exit(max_prob >= th), correct)
    leave = np.mean(max_prob[:, 0] >= th[0])  # the rest go to layer 4
    assert acc == 100.0 and speedup == pytest.approx(4 / (leave + 4 * (1 - leave)))


def test_the_gain_rule_exits_early_on_inputs_that_full_depth_gets_wrong():
    # every exit is equally confident, but rows whose first exit predicts class 0 are wrong at full depth too:
    # the path says so, the confidence does not, so only the gain rule lets them leave at layer 1
    n = 600
    rng = np.random.default_rng(1)
    labels = rng.integers(1, 3, n)
    probs = np.full((n, 3, 3), 0.1)
    first = rng.integers(0, 3, n)
    probs[np.arange(n), 0, first] = 0.8
    probs[:, 1:, :] = 0.1
    last = np.where(first == 0, 0, labels)  # hopeless rows stay wrong at full depth
    probs[np.arange(n), 1, last] = 0.8
    probs[np.arange(n), 2, last] = 0.8
    view = dc.split_view(type("T", (), {"probs": torch.from_numpy(probs), "labels": torch.from_numpy(labels)})())
    exits = dc.decisions(view, view)
    gain = [dc.point(layers, view["correct"]) for layers in exits["path, gain"]]
    confidence = [dc.point(layers, view["correct"]) for layers in exits["confidence"]]
    full = 100 * view["correct"][:, -1].mean()
    assert dc.best_speedup(gain, full, 0.0) > dc.best_speedup(confidence, full, 0.0) + 0.2


def test_the_state_rule_reads_what_the_confidence_does_not_show():
    # exit 1 is equally confident on every row but right only where the input's state says so (its first
    # coordinate, the direction of largest spread); exits 2-3 are always right: only the state rule can tell
    n, d = 600, 16
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, n)
    states = rng.normal(size=(n, 3, d))
    states[:, :, 0] *= 5
    probs = np.full((n, 3, 2), 0.1)
    first = np.where(states[:, 0, 0] > 0, labels, 1 - labels)
    probs[np.arange(n), 0, first] = 0.8
    probs[np.arange(n), 0, 1 - first] = 0.2
    probs[np.arange(n), 1:, :] = 0.1
    probs[np.arange(n), 1, labels] = 0.9
    probs[np.arange(n), 2, labels] = 0.9
    tables = type("T", (), {"probs": torch.from_numpy(probs), "labels": torch.from_numpy(labels),
                            "pooled": torch.from_numpy(states)})()
    fit, test = dc.split_view(tables), dc.split_view(tables)
    exits = dc.decisions(fit, test)
    state = [dc.point(layers, test["correct"]) for layers in exits["path + state, calibrated"]]
    confidence = [dc.point(layers, test["correct"]) for layers in exits["confidence"]]
    assert dc.best_speedup(confidence, 100.0, 0.5) == pytest.approx(1.5)
    assert dc.best_speedup(state, 100.0, 0.5) > 1.8


def test_without_pooled_states_there_is_no_state_rule():
    probs, labels = _tables(n=120)
    view = dc.split_view(type("T", (), {"probs": torch.from_numpy(probs), "labels": torch.from_numpy(labels)})())
    assert "path + state, calibrated" not in dc.decisions(view, view)


def test_summary_reports_no_difference_for_the_same_decision_and_renders():
    probs, labels = _tables(n=120)
    correct = (probs.argmax(-1) == labels[:, None]).astype(float)
    layers = [dc.first_exit(probs.max(-1) >= t) for t in dc.confidence_grid(3)]
    result = dc.summarise({"confidence": layers, "copy": layers}, correct)
    for cell in result["rules"]["copy"]["difference_vs_confidence"].values():
        assert cell["low"] == cell["high"] == 0.0
    text = dc.markdown(result, "# t")
    assert "| copy |" in text and "best x @1pt" in text


def test_a_folder_that_is_no_run_directory_is_one_line_and_status_2(tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decision_ceiling.py"), str(tmp_path / "nope"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"decision_ceiling.py: error: {tmp_path / 'nope' / 'run.json'} not found: {tmp_path / 'nope'} is not a "
        "consistentee run directory"]
    assert not (tmp_path / "out").exists()
