"""Print the README's results tables from the committed benchmark reports.

    python benchmarks/readme_table.py benchmarks/results/rt-snippets benchmarks/results/trec6 ...

Every figure comes from a ``report.json`` written by ``consistentee benchmark`` (its command is inside).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _acc(entry: dict | None, full: float) -> str:
    if not entry or entry.get("test_accuracy") is None:
        return "—"
    return f"{100 * entry['test_accuracy']:.2f} ({100 * (entry['test_accuracy'] - full):+.2f})"


def rows(report: dict) -> list[str]:
    full = report["full_depth"]["accuracy"]
    out = []
    for rule, method in report["methods"].items():
        naive = method["dev_selected"]["1pt"]
        cal = (method.get("calibrated") or {}).get("1pt")
        out.append(f"| {report['dataset']} | {rule} | {100 * method['auc']:.2f} "
                   f"| {_x(method['best_layer_speedup_at_0.5pt'])} | {_x(method['best_layer_speedup_at_1pt'])} "
                   f"| {_acc(naive, full)} | {_acc(cal, full)} | {_x(cal and cal.get('test_layer_speedup'))} "
                   f"| {_x(cal and cal.get('test_flops_speedup'))} | {_x(cal and cal.get('test_wall_speedup'))} |")
    oracle = report["oracle"]
    out.append(f"| {report['dataset']} | oracle | | | | | {100 * oracle['accuracy']:.2f} | {_x(oracle['layer_speedup'])} "
               f"| {_x(oracle.get('flops_speedup'))} | |")
    return out


def study_rows(report: dict) -> list[str]:
    study = (report.get("calibration") or {}).get("budgets") or {}
    out = []
    for rule in report["methods"]:
        cells = []
        for budget in ("0.5", "1.0"):
            e = study.get(budget, {}).get(rule)
            if e is None:
                cells += ["—"] * 3
                continue
            ratio = "—" if e.get("ratio_to_best") is None else f"{100 * e['ratio_to_best']:.0f}%"
            cells += [f"{100 * e['violation_rate']:.1f}% / {100 * e['naive_violation_rate']:.1f}%",
                      _x(e["median_speedup"]), ratio]
        out.append(f"| {report['dataset']} | {rule} | " + " | ".join(cells) + " |")
    return out


def main(dirs: list[str]) -> int:
    reports = [json.loads((Path(d) / "report.json").read_text(encoding="utf-8")) for d in dirs]
    print("| data | rule | AUC % | best @0.5pt | best @1pt | naive dev 1pt: test acc % | calibrated 1pt: test acc % "
          "| layer | FLOPs | wall |")
    print("| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for report in reports:
        print("\n".join(rows(report)))
    print()
    print("| data | rule | 0.5pt: violations calibrated / naive | 0.5pt: median x | 0.5pt: of best | "
          "1pt: violations calibrated / naive | 1pt: median x | 1pt: of best |")
    print("| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for report in reports:
        print("\n".join(study_rows(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
