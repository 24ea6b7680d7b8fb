"""Print the README's results tables from the committed benchmark reports.

    python benchmarks/readme_table.py benchmarks/results/rt-snippets benchmarks/results/trec6 ...
    python benchmarks/readme_table.py --summary benchmarks/results/summary.json [--write README.md]

Every figure comes from a ``report.json`` written by ``consistentee benchmark`` (its command is inside). With
``--summary``, the table over seeds comes from the ``summary.json`` of ``benchmarks/seeds.py combine``;
``--write`` puts it between the README's ``<!-- results-table:start -->`` and ``<!-- results-table:end -->``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import seeds  # noqa: E402

from consistentee.utils.io import write_text  # noqa: E402

EXIT_USAGE = 2
START, END = "<!-- results-table:start -->", "<!-- results-table:end -->"


class TableError(Exception):
    """Bad input: one line, exit status 2."""


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _acc(entry: dict | None, full: float) -> str:
    if not entry or entry.get("test_accuracy") is None:
        return "—"
    return f"{100 * entry['test_accuracy']:.2f} ({100 * (entry['test_accuracy'] - full):+.2f})"


def _name(report: dict) -> str:
    """The dataset, with the model and stage 3's scope when not the defaults (trec6-mpnet), as in the combined
    summary."""
    return seeds.dataset_key(report["dataset"], report.get("model"), seeds.joint_scope(report))


def rows(report: dict) -> list[str]:
    full = report["full_depth"]["accuracy"]
    out = []
    for rule, method in report["methods"].items():
        naive = method["dev_selected"]["1pt"]
        cal = (method.get("calibrated") or {}).get("1pt")
        out.append(f"| {_name(report)} | {rule} | {100 * method['auc']:.2f} "
                   f"| {_x(method['best_layer_speedup_at_0.5pt'])} | {_x(method['best_layer_speedup_at_1pt'])} "
                   f"| {_acc(naive, full)} | {_acc(cal, full)} | {_x(cal and cal.get('test_layer_speedup'))} "
                   f"| {_x(cal and cal.get('test_flops_speedup'))} | {_x(cal and cal.get('test_wall_speedup'))} |")
    oracle = report["oracle"]
    out.append(f"| {_name(report)} | oracle | | | | | {100 * oracle['accuracy']:.2f} | {_x(oracle['layer_speedup'])} "
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
        out.append(f"| {_name(report)} | {rule} | " + " | ".join(cells) + " |")
    return out


def print_report_tables(dirs: Sequence[str]) -> None:
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


def load_combined(path: Path) -> dict:
    try:
        combined = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TableError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TableError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(combined, dict) or combined.get("generated_by") != seeds.COMBINE_BY \
            or not isinstance(combined.get("datasets"), dict):
        raise TableError(f"{path}: not a summary.json of `python benchmarks/seeds.py combine`")
    return combined


def summary_table(combined: dict) -> str:
    """One row a dataset, setting and rule: mean ± std over seeds of each figure, and the number of seeds."""
    out = [f"| data | setting | rule | {seeds.COMBINED_HEADER}", f"| :--- | :--- | :--- | {seeds.COMBINED_ALIGN}"]
    for name, entry in combined["datasets"].items():
        for setting in seeds.COMBINED_SETTINGS:
            out += [f"| {name} | {seeds.SETTING_NAMES[setting]} | {rule} | "
                    + " | ".join(seeds.combined_cells(row)) + " |"
                    for rule, row in entry["settings"][setting]["rules"].items()]
    single = [name for name, entry in combined["datasets"].items() if len(entry["seeds"]) == 1]
    out += ["", "Mean ± std over training seeds (sample std); AUC in %, x = layer speed-up against full depth, best x "
            "read off the test curve, calibrated x @1pt = median speed-up of the knob calibrated on dev (the same in "
            "both settings)." + (f" {', '.join(single)}: 1 seed: no spread." if single else "")]
    return "\n".join(out)


def replace_between_markers(readme: Path, text: str) -> None:
    try:
        old = readme.read_text(encoding="utf-8")
    except OSError as exc:
        raise TableError(f"{readme}: cannot read it ({exc.strerror or exc})") from None
    if old.count(START) != 1 or old.count(END) != 1 or old.index(START) > old.index(END):
        raise TableError(f"{readme}: wants one {START} and, after it, one {END} around the results table")
    head, rest = old.split(START)
    tail = rest.split(END)[1]
    write_text(readme, f"{head}{START}\n{text}\n{END}{tail}")


def build_parser() -> argparse.ArgumentParser:
    parser = seeds._Parser(prog="readme_table.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="*", metavar="REPORT_DIR", help="folders of report.json (per-report tables)")
    parser.add_argument("--summary", help="summary.json of `benchmarks/seeds.py combine`: the table over seeds")
    parser.add_argument("--write", metavar="README", help="with --summary: put the table between the README's "
                        f"{START} and {END} instead of printing it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summary and args.reports:
        parser.error("give report folders or --summary, not both")
    if not args.summary:
        if args.write:
            parser.error("--write goes with --summary")
        if not args.reports:
            parser.error("give report folders or --summary")
        print_report_tables(args.reports)
        return 0
    try:
        table = summary_table(load_combined(Path(args.summary)))
        if args.write:
            replace_between_markers(Path(args.write), table)
            print(f"wrote the results table from {args.summary} into {args.write}")
        else:
            print(table)
    except TableError as exc:
        print(f"readme_table.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a README that cannot be written (utils.io names it)
        print(f"readme_table.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
