"""Compare training variants on the **dev** split, from their benchmark reports (the test split stays unlooked-at).

    python benchmarks/dev_ablation.py NAME=REPORT_JSON [NAME=REPORT_JSON ...] [--rule consistentee] [--out FILE]

Each report's points carry their dev accuracy and dev layer speed-up; from them, per variant: the rule's dev AUC
(mean attainable dev accuracy over the saved fraction 0 .. 1 - 1/L), the best dev speed-up within 0.5 and 1 point of
the stage-1 model's dev full depth, and the ConsistentEE models' own full-depth dev accuracy against stage 1's
(what stage 3 cost the deep exits). A change is kept when it helps here; test figures are read only afterwards.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from consistentee.evaluation.curves import auc_saved_fraction, best_speedup_within
from consistentee.utils.io import read_json, write_text


def dev_row(report: dict, rule: str) -> dict:
    method = report["methods"][rule]
    full = report["full_depth"]["dev_accuracy"]
    layers = report["num_layers"]
    points = [(p["dev_layer_speedup"], p["dev_accuracy"]) for p in method["points"]
              if p.get("dev_accuracy") is not None]
    saved = [(1 - 1 / s, a) for s, a in points]
    models = report.get("consistentee_models") or {}
    own_full = [m["full_depth_dev_accuracy"] for m in models.values() if m.get("full_depth_dev_accuracy") is not None]
    return {"dev_auc": 100 * auc_saved_fraction(saved, (0.0, 1 - 1 / layers)),
            "best_05": best_speedup_within(points, full, 0.5), "best_1": best_speedup_within(points, full, 1.0),
            "stage1_full_dev": 100 * full,
            "own_full_dev": [100 * f for f in own_full] if rule == "consistentee" else None}


def main(pairs: list[str], rule: str, out: str | None) -> int:
    lines = [f"Dev split, rule {rule}. AUC: mean attainable dev accuracy (%) over the saved fraction; best x: the "
             "largest dev layer speed-up within the budget of stage 1's dev full depth.", "",
             "| variant | dev AUC % | best x @0.5pt | best x @1pt | stage-1 full depth (dev) | own full depth (dev) |",
             "| :--- | ---: | ---: | ---: | ---: | ---: |"]
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not path or not Path(path).is_file():
            print(f"dev_ablation: error: want NAME=REPORT_JSON with an existing file, got {pair!r}", file=sys.stderr)
            return 2
        row = dev_row(read_json(path), rule)
        own = ", ".join(f"{f:.2f}%" for f in row["own_full_dev"]) if row["own_full_dev"] else "—"
        best = [f"{x:.2f}x" if x is not None else "—" for x in (row["best_05"], row["best_1"])]
        lines.append(f"| {name} | {row['dev_auc']:.2f} | {best[0]} | {best[1]} | {row['stage1_full_dev']:.2f}% | "
                     f"{own} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_text(out, f"`python benchmarks/dev_ablation.py {shlex.join(sys.argv[1:])}`\n\n{text}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", metavar="NAME=REPORT_JSON")
    parser.add_argument("--rule", default="consistentee")
    parser.add_argument("--out", help="markdown file to write the table to")
    args = parser.parse_args()
    sys.exit(main(args.pairs, args.rule, args.out))
