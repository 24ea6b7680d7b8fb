"""Compare training variants on the **dev** split, from their benchmark reports (the test split stays unlooked-at).

    python benchmarks/dev_ablation.py NAME=REPORT_JSON[,REPORT_JSON...] [NAME=...] [--rule consistentee] [--out FILE]

Each report's points carry their dev accuracy and dev layer speed-up; from them, per variant: the rule's dev AUC
(mean attainable dev accuracy over the saved fraction 0 .. 1 - 1/L), the best dev speed-up within 0.5 and 1 point of
the stage-1 model's dev full depth, and the ConsistentEE models' own full-depth dev accuracy against stage 1's
(what stage 3 cost the deep exits). Several reports per variant (one per training seed) give mean ± std.
A change is kept when it helps here; test figures are read only afterwards.
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
from pathlib import Path

from consistentee.evaluation.curves import auc_saved_fraction, best_speedup_within
from consistentee.utils.io import read_json, write_text

#: The policy threshold a ConsistentEE model runs at when no operating point is stored.
DEFAULT_THRESHOLD = 0.5


def dev_row(report: dict, rule: str, beta: float | None = None) -> dict:
    """``beta``: only that ConsistentEE model's points (a report whose sweep has several betas compared with one
    trained at that beta alone)."""
    method = report["methods"][rule]
    full = report["full_depth"]["dev_accuracy"]
    layers = report["num_layers"]
    kept = [p for p in method["points"] if p.get("dev_accuracy") is not None
            and (beta is None or math.isclose(p["knob"]["beta"], beta))]
    if not kept:
        raise ValueError(f"no {rule} points" + (f" at beta {beta:g}" if beta is not None else "") + " in a report")
    points = [(p["dev_layer_speedup"], p["dev_accuracy"]) for p in kept]
    saved = [(1 - 1 / s, a) for s, a in points]
    models = {b: m for b, m in (report.get("consistentee_models") or {}).items()
              if beta is None or math.isclose(float(b), beta)}
    own_full = [m["full_depth_dev_accuracy"] for m in models.values() if m.get("full_depth_dev_accuracy") is not None]
    default = [p for p in kept if isinstance(p.get("knob"), dict) and p["knob"].get("threshold") == DEFAULT_THRESHOLD]
    return {"dev_auc": 100 * auc_saved_fraction(saved, (0.0, 1 - 1 / layers)),
            "best_05": best_speedup_within(points, full, 0.5), "best_1": best_speedup_within(points, full, 1.0),
            "stage1_full_dev": 100 * full,
            "own_full_dev": [100 * f for f in own_full] if rule == "consistentee" else None,
            "default_x": [p["dev_layer_speedup"] for p in default] if rule == "consistentee" else None,
            "default_loss": [100 * (full - p["dev_accuracy"]) for p in default] if rule == "consistentee" else None}


def _spread(values: list[float | None], fmt: str) -> str:
    """One report: its value; several (seeds): mean ± sample std; "—" when any report has none."""
    if not values or any(v is None for v in values):
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def variant_row(name: str, reports: list[dict], rule: str, beta: float | None = None) -> str:
    """The table row of one variant over its reports (one per training seed)."""
    rows = [dev_row(report, rule, beta) for report in reports]
    cells = [_spread([r["dev_auc"] for r in rows], "{:.2f}"), _spread([r["best_05"] for r in rows], "{:.2f}x"),
             _spread([r["best_1"] for r in rows], "{:.2f}x"), _spread([r["stage1_full_dev"] for r in rows], "{:.2f}%")]
    changes = [own - r["stage1_full_dev"] for r in rows for own in (r["own_full_dev"] or [])]
    if len(rows) == 1:
        own = ", ".join(f"{f:.2f}%" for f in rows[0]["own_full_dev"]) if rows[0]["own_full_dev"] else "—"
    else:
        own = _spread([f for r in rows for f in (r["own_full_dev"] or [])], "{:.2f}%")
    change = f"{statistics.fmean(changes):+.2f} (worst {min(changes):+.2f})" if changes else "—"
    defaults = [(x, loss) for r in rows for x, loss in zip(r["default_x"] or [], r["default_loss"] or [], strict=True)]
    default = (f"{_spread([x for x, _ in defaults], '{:.2f}x')} / {_spread([loss for _, loss in defaults], '{:+.2f}')}"
               if defaults else "—")
    return f"| {name} | {' | '.join(cells)} | {own} | {change} | {default} | {len(rows)} |"


def main(pairs: list[str], rule: str, out: str | None, beta: float | None = None) -> int:
    lines = [f"Dev split, rule {rule}" + (f", the ConsistentEE model of beta {beta:g} alone" if beta is not None
                                          else "")
             + ". AUC: mean attainable dev accuracy (%) over the saved fraction; best x: the "
             "largest dev layer speed-up within the budget of stage 1's dev full depth. Several reports of a "
             "variant (training seeds): mean ± sample std; the change of full depth is each ConsistentEE model's "
             "own dev full depth minus its stage 1's, in points (mean, and the worst). At threshold 0.5: the dev "
             "layer speed-up and accuracy loss (points below stage 1's dev full depth) of the policy threshold a "
             "model runs at when it stores no operating point.", "",
             "| variant | dev AUC % | best x @0.5pt | best x @1pt | stage-1 full depth (dev) | own full depth (dev) "
             "| own − stage 1 (pt) | at threshold 0.5: x / loss (pt) | reports |",
             "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for pair in pairs:
        name, _, paths = pair.partition("=")
        files = [Path(path) for path in paths.split(",")] if paths else []
        if not files or not all(f.is_file() for f in files):
            print(f"dev_ablation: error: want NAME=REPORT_JSON[,REPORT_JSON...] with existing files, got {pair!r}",
                  file=sys.stderr)
            return 2
        try:
            lines.append(variant_row(name, [read_json(f) for f in files], rule, beta))
        except (KeyError, ValueError) as exc:
            print(f"dev_ablation: error: {name}: {exc}", file=sys.stderr)
            return 2
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        write_text(out, f"`python benchmarks/dev_ablation.py {shlex.join(sys.argv[1:])}`\n\n{text}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", metavar="NAME=REPORT_JSON[,REPORT_JSON...]")
    parser.add_argument("--rule", default="consistentee")
    parser.add_argument("--out", help="markdown file to write the table to")
    parser.add_argument("--beta", type=float, help="only the ConsistentEE model of this beta in each report")
    args = parser.parse_args()
    sys.exit(main(args.pairs, args.rule, args.out, args.beta))
