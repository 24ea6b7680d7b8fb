"""benchmarks/dev_ablation.py: variants compared on dev from their reports' points."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("benchmark_dev_ablation", ROOT / "benchmarks" / "dev_ablation.py")
dev_ablation = importlib.util.module_from_spec(spec)
sys.modules["benchmark_dev_ablation"] = dev_ablation
spec.loader.exec_module(dev_ablation)


def _report(points: list[tuple[float, float]], own_full: float = 0.88) -> dict:
    """A 4-layer report whose consistentee points are (dev speed-up, dev accuracy); test fields are decoys."""
    return {"num_layers": 4, "full_depth": {"dev_accuracy": 0.90, "accuracy": 0.10},
            "methods": {"consistentee": {"points": [
                {"dev_layer_speedup": s, "dev_accuracy": a, "layer_speedup": 4.0, "accuracy": 1.0}
                for s, a in points]}},
            "consistentee_models": {"0.1": {"full_depth_dev_accuracy": own_full}}}


def test_dev_figures_come_from_the_dev_fields_alone():
    row = dev_ablation.dev_row(_report([(1.0, 0.90), (2.0, 0.895), (3.0, 0.88), (4.0, 0.70)]), "consistentee")
    assert row["best_05"] == 2.0 and row["best_1"] == 2.0  # 0.88 is 2 points below 0.90
    # saved fraction 0..0.75 (x = 1 - 1/speed-up): 0.895 is reachable up to 0.5, 0.88 up to 2/3, 0.70 up to 0.75
    expected = (0.5 * 0.895 + (2 / 3 - 0.5) * 0.88 + (0.75 - 2 / 3) * 0.70) / 0.75
    assert row["dev_auc"] == pytest.approx(100 * expected)
    assert row["own_full_dev"] == [pytest.approx(88.0)]


def test_a_missing_report_is_one_line_and_status_2(tmp_path, capsys):
    assert dev_ablation.main([f"a={tmp_path / 'nope.json'}"], "consistentee", None) == 2
    assert "want NAME=REPORT_JSON" in capsys.readouterr().err


def test_the_table_has_one_row_per_variant(tmp_path):
    for name, acc in (("a", 0.89), ("b", 0.85)):
        (tmp_path / f"{name}.json").write_text(json.dumps(_report([(1.0, 0.90), (2.0, acc)])))
    out = tmp_path / "table.md"
    assert dev_ablation.main([f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'b.json'}"], "consistentee", str(out)) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| a |") or line.startswith("| b |")]
    assert rows[0].split("|")[4].strip() == "2.00x" and rows[1].split("|")[4].strip() == "1.00x"


def test_several_seeds_give_mean_and_spread_and_the_worst_full_depth_change(tmp_path):
    paths = []
    for seed, (acc, own) in enumerate(((0.89, 0.90), (0.85, 0.88))):
        path = tmp_path / f"seed{seed}.json"
        path.write_text(json.dumps(_report([(1.0, 0.90), (2.0, acc)], own_full=own)))
        paths.append(str(path))
    out = tmp_path / "table.md"
    assert dev_ablation.main([f"v={','.join(paths)}"], "consistentee", str(out)) == 0
    row = next(line for line in out.read_text().splitlines() if line.startswith("| v |")).split("|")
    assert row[4].strip() == "1.50x ± 0.71x"  # best x @1pt: 2.00x on seed 0, 1.00x on seed 1
    assert row[7].strip() == "-1.00 (worst -2.00)"  # own full depth 90% and 88% against 90%
    assert row[8].strip() == "—"  # no point at the policy's default threshold
    assert row[9].strip() == "2"
    assert dev_ablation.main([f"v={paths[0]},{tmp_path / 'missing.json'}"], "consistentee", None) == 2


def _sweep_report(betas: dict[float, list[tuple[float, float, float]]]) -> dict:
    """A report whose ConsistentEE points are (threshold, dev speed-up, dev accuracy) per beta."""
    report = _report([])
    report["methods"]["consistentee"]["points"] = [
        {"knob": {"beta": beta, "threshold": t}, "dev_layer_speedup": s, "dev_accuracy": a}
        for beta, points in betas.items() for t, s, a in points]
    report["consistentee_models"] = {str(beta): {"full_depth_dev_accuracy": 0.90 - beta} for beta in betas}
    return report


def test_one_beta_of_a_sweep_is_compared_alone_with_its_default_threshold(tmp_path):
    report = _sweep_report({0.05: [(0.9, 1.0, 0.90), (0.5, 2.0, 0.88)], 0.1: [(0.5, 3.0, 0.895)]})
    whole, alone = dev_ablation.dev_row(report, "consistentee"), dev_ablation.dev_row(report, "consistentee", 0.05)
    assert whole["best_1"] == 3.0 and alone["best_1"] == 1.0  # beta 0.1's point is left out
    assert alone["own_full_dev"] == [pytest.approx(85.0)]
    assert alone["default_x"] == [2.0] and alone["default_loss"] == [pytest.approx(2.0)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    out = tmp_path / "table.md"
    assert dev_ablation.main([f"v={path}"], "consistentee", str(out), 0.05) == 0
    row = next(line for line in out.read_text().splitlines() if line.startswith("| v |")).split("|")
    assert row[8].strip() == "2.00x / +2.00"
    assert dev_ablation.main([f"v={path}"], "consistentee", None, 0.2) == 2  # no model at that beta
