"""Print the README's results table from the committed benchmark reports.

    python benchmarks/readme_table.py benchmarks/results/rt-snippets benchmarks/results/trec6

Every figure comes from a ``report.json`` written by ``consistentee benchmark`` (its command is inside).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}x"


def rows(report: dict) -> list[str]:
    full = report["full_depth"]["accuracy"]
    out = []
    for rule, method in report["methods"].items():
        chosen = method["dev_selected"]["1pt"]
        test = "—" if chosen is None else f"{100 * chosen['test_accuracy']:.2f} ({100 * (chosen['test_accuracy'] - full):+.2f})"
        out.append(f"| {report['dataset']} | {rule} | {100 * method['auc']:.2f} | {_x(method['best_layer_speedup_at_0.5pt'])} "
                   f"| {_x(method['best_layer_speedup_at_1pt'])} | {test} "
                   f"| {_x(chosen and chosen.get('test_layer_speedup'))} | {_x(chosen and chosen.get('test_flops_speedup'))} "
                   f"| {_x(chosen and chosen.get('test_wall_speedup'))} |")
    oracle = report["oracle"]
    out.append(f"| {report['dataset']} | oracle | | | | {100 * oracle['accuracy']:.2f} | {_x(oracle['layer_speedup'])} "
               f"| {_x(oracle.get('flops_speedup'))} | |")
    return out


def main(dirs: list[str]) -> int:
    print("| data | rule | AUC % | best @0.5pt | best @1pt | dev-chosen 1pt: test acc % | layer | FLOPs | wall |")
    print("| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for directory in dirs:
        report = json.loads((Path(directory) / "report.json").read_text(encoding="utf-8"))
        print("\n".join(rows(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
