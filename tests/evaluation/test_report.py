"""report.json schema, the Markdown a person reads, plots written atomically."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from consistentee.evaluation.report import (
    PLOT_FILES,
    check_report_schema,
    render_markdown,
    summary_table,
    write_report,
)


def _point(knob, acc, speed, wall=None):
    return {"knob": knob, "accuracy": acc, "macro_f1": acc - 0.01, "mean_exit_layer": 6 / speed,
            "layer_speedup": speed, "flops_speedup": speed * 0.95, "wall_speedup": wall}


def _selected(knob, acc, speed, wall=None):
    return {"index": 0, "knob": knob, "test_accuracy": acc, "test_layer_speedup": speed,
            "test_flops_speedup": None if speed is None else speed * 0.95, "test_wall_speedup": wall}


def _study(budget: str) -> dict:
    speed = 1.2 + float(budget)
    return {"violation_rate": 0.04, "median_speedup": speed, "speedup_p10": speed - 0.1, "speedup_p90": speed + 0.1,
            "median_loss_points": 0.1, "none_certified_rate": 0.0, "naive_violation_rate": 0.4,
            "naive_median_speedup": speed + 0.3, "best_test_speedup": speed + 0.2,
            "ratio_to_best": speed / (speed + 0.2)}


def make_report() -> dict:
    return {
        "dataset": "rt-snippets", "model": "minilm", "num_layers": 6, "num_labels": 2,
        "split_sizes": {"train": 8000, "dev": 1000, "test": 1568},
        "full_depth": {"accuracy": 0.8565, "macro_f1": 0.856, "mcc": 0.71, "per_exit_accuracy": [0.6, 0.7, 0.8, 0.84,
                                                                                                  0.85, 0.8565]},
        "methods": {
            "entropy": {
                "knob_name": "S",
                "points": [_point(0.0, 0.8565, 1.0), _point(0.2, 0.853, 1.56, 1.4), _point(0.4, 0.84, 1.83)],
                "auc": 0.83, "best_layer_speedup_at_0.5pt": 1.56, "best_layer_speedup_at_1pt": 1.56,
                "dev_selected": {"0.5pt": _selected(0.2, 0.853, 1.56, 1.4), "1pt": _selected(0.4, 0.84, 1.83)},
                "oracle_gap": {"accuracy_at_oracle_speedup": None, "accuracy_gap_points": None,
                               "layer_speedup_gap_at_1pt": 1.71},
            },
            "consistentee": {
                "knob_name": "beta,threshold",
                "points": [_point({"beta": 0.05, "threshold": 0.5}, 0.85, 2.1, 1.9)],
                "auc": 0.84, "best_layer_speedup_at_0.5pt": None, "best_layer_speedup_at_1pt": 2.1,
                "dev_selected": {"0.5pt": {**_selected(None, None, None), "knob": None},
                                 "1pt": _selected({"beta": 0.05, "threshold": 0.5}, 0.85, 2.1, 1.9)},
            },
        },
        "oracle": {"accuracy": 0.9298, "mean_exit_layer": 1.84, "layer_speedup": 3.27, "flops_speedup": 3.1},
        "calibration": {
            "delta": 0.1, "resplits": 200, "loss": "accuracy_drop", "loss_definition": "full minus exit correct",
            "calibration_size": 1000, "test_size": 1568, "method": "LTT", "resampling": "pooled and re-split",
            "budgets": {b: {name: _study(b) for name in ("entropy", "consistentee")} for b in ("0.5", "1.0")},
        },
        "settings": {"command": "consistentee benchmark --run-dir runs/x", "machine": {"cpu_count": 2},
                     "versions": {"torch": "2.x"}, "seeds": {"data": 0}, "auc_x_range": [0.0, 0.8],
                     "wall_clock": {"engine": "EarlyExitEngine", "batch_size": 32, "repeats": 5, "examples": 512,
                                    "measured": "dev-selected and frontier points"}},
    }


def test_schema_accepts_a_complete_report_and_names_what_is_missing():
    report = make_report()
    check_report_schema(report)
    broken = copy.deepcopy(report)
    del broken["oracle"]["layer_speedup"]
    del broken["methods"]["entropy"]["points"][1]["wall_speedup"]
    del broken["methods"]["consistentee"]["dev_selected"]["1pt"]
    del broken["split_sizes"]
    with pytest.raises(ValueError) as err:
        check_report_schema(broken)
    message = str(err.value)
    for missing in ("oracle.layer_speedup", "methods.entropy.points[1].wall_speedup",
                    "methods.consistentee.dev_selected.1pt", "report.split_sizes"):
        assert missing in message


def test_markdown_and_console_summary_are_readable():
    report = make_report()
    md = render_markdown(report, {"tradeoff_layer": PLOT_FILES["tradeoff_layer"]})
    assert md.startswith("# Early-exit benchmark: rt-snippets with minilm")
    assert "| entropy | 83.00 | 1.56x | 1.56x | S=0.4 | 84.00 (-1.65) | 1.83x | 1.74x | — |" in md
    assert "beta=0.05, threshold=0.5" in md and "none within budget on dev" in md
    assert "consistentee benchmark --run-dir runs/x" in md and "tradeoff_layer_speedup.png" in md
    assert "Gap to the oracle" in md and "+1.71" in md
    assert "| entropy | 4.0% | 2.20x | 2.10-2.30x | 0% | 2.40x | 92% | 40.0% | 2.50x |" in md
    assert "separate sequences" not in md  # no rule was calibrated as one chain
    chained = copy.deepcopy(report)
    chained["calibration"]["budgets"]["1.0"]["consistentee"]["by_order"] = {
        "knobs": {"violation_rate": 0.0, "median_speedup": 1.0, "none_certified_rate": 1.0}}
    md = render_markdown(chained, {})
    assert "| consistentee | 4.0% | 2.20x | 2.10-2.30x | 0% | 2.40x | 92% | 40.0% | 2.50x | 0.0% / 1.00x |" in md
    assert "| entropy | 4.0% | 2.20x | 2.10-2.30x | 0% | 2.40x | 92% | 40.0% | 2.50x | — |" in md
    text = summary_table(report)
    lines = text.splitlines()
    assert lines[0].startswith("rt-snippets / minilm: full depth 85.65%")
    assert any(line.startswith("consistentee") and "1.90x" in line for line in lines)
    assert lines[-1].startswith("oracle") and "3.27x" in lines[-1]


def test_write_report_writes_json_markdown_and_plots(tmp_path):
    report = make_report()
    out = tmp_path / "report"
    paths = write_report(report, out, exit_layers_by_rule={"entropy": [1, 2, 6], "oracle": [1, 1, 3]},
                         memorized_layers=np.array([1, 1, 2, 6]))
    names = sorted(os.listdir(out))
    assert names == sorted(["report.json", "report.md", *PLOT_FILES.values()])  # no temp files left
    for key in PLOT_FILES:
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "report.json").read_text())
    check_report_schema(saved)
    assert saved["files"]["tradeoff_wall"] == "tradeoff_wall_speedup.png"
    assert saved["methods"]["entropy"]["points"][0]["wall_speedup"] is None
    assert "exit_histograms.png" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="schema"):
        write_report({"dataset": "x"}, tmp_path / "bad")
    assert not (tmp_path / "bad" / "report.json").exists()


def test_markdown_shows_the_paired_bootstrap_when_the_report_has_it():
    report = make_report()
    report["significance"] = {
        "resamples": 1000, "rows": 1568, "reference": "consistentee", "seed": 0, "percentiles": [2.5, 50, 97.5],
        "rules": {
            "entropy": {"auc": [0.81, 0.83, 0.85], "best_layer_speedup_at_1pt": [1.4, 1.56, 1.8],
                        "reference_minus_rule": {"auc": [-0.01, 0.01, 0.03], "best_layer_speedup_at_1pt": [0.1, 0.5, 0.9]},
                        "reference_ahead_share": {"auc": 0.7, "best_layer_speedup_at_1pt": 0.99}},
            "consistentee": {"auc": [0.82, 0.84, 0.86], "best_layer_speedup_at_1pt": [1.8, 2.1, 2.4]},
        },
    }
    md = render_markdown(report, {})
    assert "## Is consistentee ahead beyond the test split's noise?" in md
    assert "| entropy | 83.00 [81.00, 85.00] | 1.00 [-1.00, 3.00] | 70% | 1.56 [1.40, 1.80] | 0.50 [0.10, 0.90] | 99% |" in md
    assert "| consistentee | 84.00 [82.00, 86.00] | — | — | 2.10 [1.80, 2.40] | — | — |" in md
    assert "beyond the test split" not in render_markdown(make_report(), {})
