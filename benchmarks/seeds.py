"""The benchmark over several training seeds, and what the seeds agree on.

    python benchmarks/seeds.py run --seeds 0,1,2 --run-dir 'runs/rt-snippets-seed{seed}' \\
        --out-dir benchmarks/results/rt-snippets-seeds -- --dataset rt-snippets --epochs 2 --betas 0.03,0.05
    python benchmarks/seeds.py aggregate --out-dir benchmarks/results/rt-snippets-seeds
    python benchmarks/seeds.py aggregate --reports benchmarks/results/rt-snippets/report.json --out-dir /tmp/x
    python benchmarks/seeds.py combine --summaries benchmarks/results/rt-snippets-seeds benchmarks/results/trec6-seeds \\
        --out-dir benchmarks/results

``run`` calls ``consistentee benchmark --run-dir RUN_DIR --seed SEED --out-dir OUT/seed-SEED OPTIONS`` once per
seed, one after the other (each uses every core), skips a seed whose ``report.json`` exists (unless ``--force``),
records each command in ``OUT/runs.json`` and then aggregates. ``aggregate`` reads ``OUT/seed-*/report.json`` (or
``--reports``) and writes ``summary.json``, ``summary.md`` and ``summary.png`` to ``OUT``: per rule the mean, std,
min and max over seeds of AUC and of the best layer speed-up within 0.5 / 1 point (standard and same-weights
settings), the calibrated median speed-up and violation rate, and per setting and metric a verdict: the gap of
consistentee to the best other rule with a t-interval over the paired per-seed differences. ``combine`` reads
the ``summary.json`` of several datasets (one each; default: every ``benchmarks/results/*/summary.json``) and
writes one ``summary.json``, ``summary.md`` and ``summary.png`` over them: per dataset, setting and rule the mean
and std of AUC (%), the best speed-ups and the calibrated speed-up @1pt, the verdicts, and whether consistentee
leads; ``benchmarks/readme_table.py --summary`` turns it into the README's table.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from consistentee.utils.io import read_json, write_json, write_text

EXIT_USAGE = 2
DEFAULT_BENCHMARK_CMD = "consistentee benchmark"
CHALLENGER = "consistentee"
ORACLE = "oracle"
#: options seeds.py sets for each seed; given after ``--`` they would make every seed the same run.
OWN_OPTIONS = ("--run-dir", "--out-dir", "--seed", "--stage1.seed", "--policy.seed", "--learned-seed")

#: metric -> (label, kind): kind "pct" (a fraction shown in %, gaps in points), "x" (a speed-up), "rate".
METRICS = {
    "auc": ("AUC (%)", "pct"),
    "best_layer_speedup_at_0.5pt": ("best layer x @0.5pt", "x"),
    "best_layer_speedup_at_1pt": ("best layer x @1pt", "x"),
    "median_speedup_at_0.5pt": ("median x @0.5pt", "x"),
    "violation_rate_at_0.5pt": ("violations @0.5pt", "rate"),
    "median_speedup_at_1pt": ("median x @1pt", "x"),
    "violation_rate_at_1pt": ("violations @1pt", "rate"),
    "separate_median_speedup_at_1pt": ("separate sequences: median x @1pt", "x"),
}
CURVE_METRICS = ("auc", "best_layer_speedup_at_0.5pt", "best_layer_speedup_at_1pt")
CALIBRATED_METRICS = ("median_speedup_at_0.5pt", "violation_rate_at_0.5pt", "median_speedup_at_1pt",
                      "violation_rate_at_1pt", "separate_median_speedup_at_1pt")
#: metrics that get a verdict (higher is better); violation rates are checked against delta, not ranked.
RANKED = {"standard": CURVE_METRICS, "same_weights": CURVE_METRICS,
          "calibrated": ("median_speedup_at_0.5pt", "median_speedup_at_1pt")}
SETTINGS = {
    "standard": "Standard setting: every rule on the stage-1 model, ConsistentEE on its own models (`methods`)",
    "same_weights": "Same weights: every rule on each ConsistentEE model (`same_weights`)",
    "calibrated": "Calibrated operating points (Learn-then-Test resampling study, `calibration.budgets`)",
}
#: settings that legitimately differ between the seeds of one study.
SEED_SETTINGS = {"command", "run_dir", "seeds", "machine", "versions", "wall_clock", "device", "flops",
                 "auc_x_range", "bench.out_dir", "stage1.seed", "policy.seed", "learned.learned_seed"}


class SeedsError(Exception):
    """Bad input: reported as one line, exit status 2."""


# ------------------------------------------------------------------------------------------- reading reports


@dataclass
class Run:
    label: str
    seed: int | None
    path: Path
    report: dict


def _report_seed(report: dict) -> int | None:
    seed = ((report.get("settings") or {}).get("seeds") or {}).get("stage1")
    return seed if isinstance(seed, int) else None


def read_input(path: Path):
    """The JSON at ``path``; a missing or unreadable file is a :class:`SeedsError`."""
    try:
        return read_json(path)
    except FileNotFoundError:
        raise SeedsError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SeedsError(f"{path}: not a readable JSON file ({exc})") from None


def load_report(path: Path) -> dict:
    report = read_input(path)
    if not isinstance(report, dict) or not isinstance(report.get("methods"), dict) or not report["methods"]:
        raise SeedsError(f"{path}: not a report.json of consistentee benchmark (no 'methods')")
    return report


def seed_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """``(seed, OUT/seed-SEED/report.json)`` for every seed folder with a report, by seed."""
    found = []
    for child in out_dir.glob("seed-*"):
        match = re.fullmatch(r"seed-(\d+)", child.name)
        if match and (child / "report.json").is_file():
            found.append((int(match.group(1)), child / "report.json"))
    return sorted(found)


def load_runs(out_dir: Path, reports: Sequence[str] | None) -> list[Run]:
    if reports:
        loaded = [(Path(p), load_report(Path(p))) for p in reports]
        seeds = [_report_seed(r) for _, r in loaded]
        labels = [str(s) if s is not None else p.parent.name for s, (p, _) in zip(seeds, loaded, strict=True)]
        if len(set(labels)) < len(labels):  # the same seed twice (e.g. one report per dataset): name the folders
            labels = [f"{label} ({p.parent.name})" for label, (p, _) in zip(labels, loaded, strict=True)]
        return [Run(label, s, p, r) for label, s, (p, r) in zip(labels, seeds, loaded, strict=True)]
    found = seed_dirs(out_dir)
    if not found:
        raise SeedsError(f"no {out_dir}/seed-*/report.json: run the seeds first or pass --reports")
    return [Run(str(seed), seed, path, load_report(path)) for seed, path in found]


# ------------------------------------------------------------------------- per-seed values, one dict a setting


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def standard_values(report: dict) -> dict[str, dict[str, float | None]]:
    return {rule: {m: _number(method.get(m)) for m in CURVE_METRICS} for rule, method in report["methods"].items()}


def same_weights_values(report: dict) -> dict[str, dict[str, float | None]]:
    """Each rule's metrics averaged over the betas of this report (the betas of one seed share stage 1, so the
    seed, not the beta, is the unit of the spread)."""
    per_rule: dict[str, dict[str, list[float]]] = {}
    for entry in (report.get("same_weights") or {}).values():
        for rule, metrics in (entry.get("rules") or {}).items():
            for m in CURVE_METRICS:
                value = _number(metrics.get(m))
                if value is not None:
                    per_rule.setdefault(rule, {}).setdefault(m, []).append(value)
    return {rule: {m: statistics.fmean(vals) if vals else None for m, vals in metrics.items()}
            for rule, metrics in per_rule.items()}


def _budget_entry(budgets: dict, budget: float) -> dict:
    for key, entry in budgets.items():
        try:
            if math.isclose(float(key), budget):
                return entry or {}
        except ValueError:
            continue
    return {}


def calibrated_values(report: dict) -> dict[str, dict[str, float | None]]:
    budgets = (report.get("calibration") or {}).get("budgets") or {}
    out: dict[str, dict[str, float | None]] = {}
    for budget, key in ((0.5, "0.5pt"), (1.0, "1pt")):
        for rule, entry in _budget_entry(budgets, budget).items():
            out.setdefault(rule, {})[f"median_speedup_at_{key}"] = _number(entry.get("median_speedup"))
            out[rule][f"violation_rate_at_{key}"] = _number(entry.get("violation_rate"))
            if key == "1pt":  # a rule calibrated as one chain: its separate sequences on the same re-splits
                separate = ((entry.get("by_order") or {}).get("knobs") or {}).get("median_speedup")
                out[rule]["separate_median_speedup_at_1pt"] = _number(separate)
    return out


def reference_values(report: dict) -> dict[str, float | None]:
    oracle, full = report.get("oracle") or {}, report.get("full_depth") or {}
    return {"full_depth_accuracy": _number(full.get("accuracy")), "oracle_accuracy": _number(oracle.get("accuracy")),
            "oracle_layer_speedup": _number(oracle.get("layer_speedup")),
            "oracle_flops_speedup": _number(oracle.get("flops_speedup"))}


EXTRACT = {"standard": standard_values, "same_weights": same_weights_values, "calibrated": calibrated_values}


# ------------------------------------------------------------------------------------------------ statistics


def describe(per_seed: dict[str, float | None]) -> dict | None:
    """Mean, sample std (None for one seed), min and max of the seeds that have a value."""
    values = {label: v for label, v in per_seed.items() if v is not None}
    if not values:
        return None
    vals = list(values.values())
    return {"n": len(vals), "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals), "per_seed": values}


def t_quantile(level: float, df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def paired_gap(a: dict[str, float | None], b: dict[str, float | None], level: float) -> dict:
    """``a - b`` over the seeds both have: mean, std and the two-sided ``level`` t-interval of the mean."""
    diffs = [a[k] - b[k] for k in a if a[k] is not None and b.get(k) is not None]
    n = len(diffs)
    out = {"n": n, "mean": statistics.fmean(diffs) if diffs else None, "std": None, "interval": None}
    if n >= 2:
        out["std"] = statistics.stdev(diffs)
        half = t_quantile(level, n - 1) * out["std"] / math.sqrt(n)
        out["interval"] = [out["mean"] - half, out["mean"] + half]
    return out


def verdict(rules: dict[str, dict], metric: str, level: float) -> dict | None:
    """The best non-oracle rule by mean, and consistentee against the best other rule (paired over seeds)."""
    ranked = [(stats[metric]["mean"], rule) for rule, stats in rules.items() if rule != ORACLE and stats.get(metric)]
    if not ranked:
        return None
    best_mean, best = max(ranked, key=lambda t: t[0])  # max keeps the first of a tie (report order)
    out = {"best_rule": best, "best_mean": best_mean, "other_rule": None, "gap": None}
    others = [(m, r) for m, r in ranked if r != CHALLENGER]
    if len(others) == len(ranked):
        return {**out, "verdict": "no consistentee"}
    if not others:
        return {**out, "verdict": "no other rule"}
    other = max(others, key=lambda t: t[0])[1]
    gap = paired_gap(rules[CHALLENGER][metric]["per_seed"], rules[other][metric]["per_seed"], level)
    if gap["n"] == 0:
        text = "no common seed"
    elif gap["n"] == 1:
        text = "one seed: no spread"
    elif gap["std"] == 0 and gap["mean"] == 0:
        text = "tie on every seed"
    elif gap["interval"][0] > 0:
        text = "consistentee ahead"
    elif gap["interval"][1] < 0:
        text = "consistentee behind"
    else:
        text = "not separable"
    return {**out, "other_rule": other, "gap": gap, "verdict": text}


def settings_warnings(runs: list[Run]) -> list[str]:
    """Datasets or settings (other than seeds, paths and the machine) that differ between the runs."""
    def flat(report: dict) -> dict[str, object]:
        out = {"dataset": report.get("dataset")}
        for key, value in (report.get("settings") or {}).items():
            if isinstance(value, dict):
                out.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                out[key] = value
        return {k: v for k, v in out.items() if k not in SEED_SETTINGS and k.split(".")[0] not in SEED_SETTINGS}

    def shown(settings: dict, key: str) -> str:  # a setting a report lacks came with a later version
        return repr(settings[key]) if key in settings else "not recorded (an older version)"

    first, warnings = flat(runs[0].report), []
    for run in runs[1:]:
        other = flat(run.report)
        differ = [f"{k}: {shown(first, k)} vs {shown(other, k)}" for k in sorted(set(first) | set(other))
                  if first.get(k) != other.get(k)]
        if differ:
            warnings.append(f"seed {run.label} ran with other settings than seed {runs[0].label}: "
                            + "; ".join(differ[:6]) + (f" (+{len(differ) - 6} more)" if len(differ) > 6 else ""))
    for run in runs:
        if run.path.parent.name.startswith("seed-") and run.seed is not None \
                and run.path.parent.name != f"seed-{run.seed}":
            warnings.append(f"{run.path} says stage-1 seed {run.seed}, not the seed of its folder")
    return warnings


def _run_seconds(run: Run, runs_log: dict) -> float | None:
    logged = (runs_log.get("seeds") or {}).get(str(run.seed)) or {}
    if logged.get("seconds") is not None and Path(logged.get("report", "")).resolve() == run.path.resolve():
        return float(logged["seconds"])
    timing = run.report.get("timing_seconds") or {}
    values = [float(v) for v in timing.values() if _number(v) is not None]
    return sum(values) if values else None


def summarize(runs: list[Run], *, level: float = 0.95, command: str | None = None, runs_log: dict | None = None) -> dict:
    """Everything summary.json holds (see the module docstring)."""
    runs_log = runs_log or {}
    per_setting: dict[str, dict] = {}
    verdicts: dict[str, dict] = {}
    for setting, extract in EXTRACT.items():
        per_seed = {run.label: extract(run.report) for run in runs}
        rules = list(dict.fromkeys(rule for values in per_seed.values() for rule in values))
        metrics = CURVE_METRICS if setting != "calibrated" else CALIBRATED_METRICS
        table = {rule: {m: describe({label: values.get(rule, {}).get(m) for label, values in per_seed.items()})
                        for m in metrics} for rule in rules}
        per_setting[setting] = {rule: stats for rule, stats in table.items() if any(stats.values())}
        verdicts[setting] = {m: v for m in RANKED[setting] if (v := verdict(per_setting[setting], m, level))}
    reference = {k: describe({run.label: reference_values(run.report)[k] for run in runs})
                 for k in ("full_depth_accuracy", "oracle_accuracy", "oracle_layer_speedup", "oracle_flops_speedup")}
    betas = {run.label: list(run.report.get("same_weights") or {}) for run in runs}
    seconds = {run.label: _run_seconds(run, runs_log) for run in runs}
    first = runs[0].report
    return {
        "seeds": [run.label for run in runs],
        "datasets": list(dict.fromkeys(str(run.report.get("dataset")) for run in runs)),
        "dataset_per_seed": {run.label: str(run.report.get("dataset")) for run in runs},
        "model": first.get("model"),
        "joint_scope": joint_scope(first),
        "betas": configured_betas(first),
        "split_sizes": first.get("split_sizes") if all(run.report.get("split_sizes") == first.get("split_sizes")
                                                       for run in runs) else None,  # None: they differ
        "data_seeds": sorted({s for run in runs
                              if (s := ((run.report.get("settings") or {}).get("seeds") or {}).get("data"))
                              is not None}),
        "level": level,
        "same_weights_betas": betas,
        "same_weights_aggregation": "per seed, each rule's value averaged over that seed's betas",
        "delta": (first.get("calibration") or {}).get("delta"),
        "settings": per_setting,
        "reference": {k: v for k, v in reference.items() if v},
        "verdicts": verdicts,
        "reports": {run.label: str(run.path) for run in runs},
        "commands": {
            "seeds_py": list(dict.fromkeys(
                cmd for run in runs if (cmd := ((runs_log.get("seeds") or {}).get(str(run.seed)) or {}).get("seeds_py")))),
            "aggregate": command,
            "per_seed": {run.label: (run.report.get("settings") or {}).get("command") for run in runs},
        },
        "machine": {run.label: {"device": (run.report.get("settings") or {}).get("device"),
                                **((run.report.get("settings") or {}).get("machine") or {})} for run in runs},
        "seconds_per_seed": seconds,
        "total_seconds": sum(s for s in seconds.values() if s is not None),
        "warnings": settings_warnings(runs),
    }


# ----------------------------------------------------------------------------------------------- summary.md


def _fmt(value: float | None, kind: str, *, signed: bool = False) -> str:
    if value is None:
        return "—"
    if kind == "x":
        return f"{value:+.2f}x" if signed else f"{value:.2f}x"
    digits = 1 if kind == "rate" else 2  # a rate: 200 re-splits move it by 0.5%
    scaled = 100 * value
    return f"{scaled:+.{digits}f}" if signed else f"{scaled:.{digits}f}" + ("" if kind == "pct" else "%")  # "acc": an accuracy


def _cell(stats: dict | None, kind: str) -> str:
    if not stats:
        return "—"
    if stats["n"] == 1:
        return _fmt(stats["mean"], kind)
    std = _fmt(stats["std"], kind).rstrip("x%")
    return f"{_fmt(stats['mean'], kind)} ± {std} ({_fmt(stats['min'], kind)}–{_fmt(stats['max'], kind)})"


def _gap_unit(kind: str) -> str:
    return {"pct": " pt", "rate": " pt"}.get(kind, "")


def verdict_rows(summary: dict) -> list[str]:
    level = f"{100 * summary['level']:g}%"
    rows = [f"| setting | metric | best rule (mean) | consistentee − best other (paired mean ± std) | {level} t-interval "
            "| verdict |", "| :--- | :--- | :--- | ---: | ---: | :--- |"]
    for setting, metrics in summary["verdicts"].items():
        for metric, v in metrics.items():
            label, kind = METRICS[metric]
            best = f"{v['best_rule']} ({_fmt(v['best_mean'], kind)})"
            gap = v.get("gap")
            if gap is None or gap["mean"] is None:
                rows.append(f"| {setting} | {label} | {best} | — | — | {v['verdict']} |")
                continue
            unit = _gap_unit(kind)
            spread = "" if gap["std"] is None else f" ± {_fmt(gap['std'], kind).rstrip('x%')}"
            diff = f"{_fmt(gap['mean'], kind, signed=True)}{unit}{spread} vs {v['other_rule']}"
            interval = "—" if gap["interval"] is None else \
                f"{_fmt(gap['interval'][0], kind, signed=True)} to {_fmt(gap['interval'][1], kind, signed=True)}"
            rows.append(f"| {setting} | {label} | {best} | {diff} | {interval} | **{v['verdict']}** |")
    return rows


def rule_table(rules: dict[str, dict], metrics: Sequence[str], delta: float | None = None) -> list[str]:
    """One row a rule; with ``delta``, a rate whose mean is above it is marked ``(> delta)``."""
    rows = ["| rule | " + " | ".join(METRICS[m][0] for m in metrics) + " |",
            "| :--- | " + " | ".join("---:" for _ in metrics) + " |"]
    for rule, stats in rules.items():
        cells = []
        for m in metrics:
            cell, kind = _cell(stats.get(m), METRICS[m][1]), METRICS[m][1]
            if kind == "rate" and delta is not None and stats.get(m) and stats[m]["mean"] > delta:
                cell += " (> delta)"
            cells.append(cell)
        rows.append(f"| {rule} | " + " | ".join(cells) + " |")
    return rows


def _betas_line(summary: dict) -> str:
    betas = list(summary["same_weights_betas"].values())
    if not any(betas):
        return "No report has a same-weights block."
    shown = ", ".join(betas[0]) if all(b == betas[0] for b in betas) else \
        "; ".join(f"seed {k}: {', '.join(v) or 'none'}" for k, v in summary["same_weights_betas"].items())
    return (f"Per seed, each rule's value is **averaged over the betas** ({shown}): the betas of one seed share "
            "stage 1 and are not independent, so the seed stays the unit of the spread.")


def render_markdown(summary: dict) -> str:
    n = len(summary["seeds"])
    datasets = ", ".join(summary["datasets"])
    sizes = summary.get("split_sizes")
    sizes = f"test split {sizes.get('test', '?')} rows, dev {sizes.get('dev', '?')}" if sizes else \
        "split sizes differ between the reports"
    out = [f"# Results over seeds: {datasets}", ""]
    out.append(f"{n} run(s) of `consistentee benchmark` (seeds {', '.join(summary['seeds'])}) on {datasets} with "
               f"{summary.get('model')}; {sizes}; stage 3 trained `{summary.get('joint_scope') or 'not recorded'}` "
               "(`--joint-scope`). Each seed sets every training seed (stage 1, learned heads, ConsistentEE "
               "policies); the data splits "
               f"stay fixed (data seed {', '.join(map(str, summary['data_seeds'])) or '?'}), so the spread below is "
               "the spread over training seeds on one test set.")
    out.append("")
    out.append("Cells: mean ± std (min–max) over seeds (std: sample standard deviation); one seed shows its value "
               "alone. x = layer speed-up against full depth. AUC and best speed-ups are read off the **test** curve "
               "(an upper bound of what a knob chosen on dev delivers); calibrated points are chosen on dev.")
    if len(summary["datasets"]) > 1:
        out += ["", f"**Warning:** the reports are from {len(summary['datasets'])} datasets ({datasets}); the spread "
                "mixes datasets, not only seeds."]
    for warning in summary["warnings"]:
        out += ["", f"**Warning:** {warning}"]
    out += ["", "## Verdicts", ""]
    out.append("Best rule: the highest mean among the non-oracle rules. Gap: consistentee minus the best other rule "
               f"(by mean), paired per seed; the {100 * summary['level']:g}% t-interval is that of the mean of the "
               "per-seed differences (t with n−1 degrees of freedom). **ahead** / **behind**: the interval excludes "
               "0, the gap exceeds the seed-to-seed spread; **not separable**: it does not; **one seed: no spread**: "
               "no interval can be had from one seed. AUC gaps are in points. Violation rates are not ranked (a rule "
               "that never exits early never violates); they are compared with delta below.")
    out += ["", *verdict_rows(summary)]
    curve_metrics = list(CURVE_METRICS)
    out += ["", f"## {SETTINGS['standard']}", "", *rule_table(summary["settings"]["standard"], curve_metrics)]
    ref = summary.get("reference") or {}
    if ref:
        ref_cells = [f"full-depth test accuracy {_cell(ref.get('full_depth_accuracy'), 'acc')}",
                     f"oracle (earliest correct exit, the upper bound of every rule) accuracy "
                     f"{_cell(ref.get('oracle_accuracy'), 'acc')}",
                     f"oracle layer speed-up {_cell(ref.get('oracle_layer_speedup'), 'x')}"]
        out += ["", "Reference: " + "; ".join(ref_cells) + "."]
    out += ["", f"## {SETTINGS['same_weights']}", "", _betas_line(summary)]
    if summary["settings"]["same_weights"]:
        out += ["", *rule_table(summary["settings"]["same_weights"], curve_metrics)]
    out += ["", f"## {SETTINGS['calibrated']}", ""]
    if summary["settings"]["calibrated"]:
        delta = summary.get("delta")
        out.append("Median speed-up and violation rate (realised accuracy loss above the budget) of the calibrated "
                   "knob over the study's dev/test re-splits" + (f"; a violation rate should stay at most delta = "
                                                                 f"{delta:g}." if delta is not None else ".")
                   + " A rule whose knobs form several sequences (ConsistentEE models, PCEE patiences) is calibrated "
                     "as one chain ordered on training rows when the reports say so; *separate sequences* is the "
                     "same study with delta split among its sequences instead (— for the other rules).")
        out += ["", *rule_table(summary["settings"]["calibrated"], CALIBRATED_METRICS, delta)]
    else:
        out.append("No report has a calibration block.")
    out += ["", "## Per seed", "", "| seed | dataset | full-depth acc % | consistentee best x @1pt | best other x @1pt "
            "| time |", "| :--- | :--- | ---: | ---: | ---: | ---: |"]
    standard = summary["settings"]["standard"]
    for label in summary["seeds"]:
        def at(rule: str, label: str = label) -> float | None:
            stats = (standard.get(rule) or {}).get("best_layer_speedup_at_1pt")
            return stats and stats["per_seed"].get(label)
        others = [(v, r) for r in standard if r not in (CHALLENGER, ORACLE) and (v := at(r)) is not None]
        best_other = max(others, key=lambda t: t[0]) if others else None
        full = ((ref.get("full_depth_accuracy") or {}).get("per_seed") or {}).get(label)
        seconds = summary["seconds_per_seed"].get(label)
        out.append(f"| {label} | {summary['dataset_per_seed'][label]} | {_fmt(full, 'pct')} | {_fmt(at(CHALLENGER), 'x')} | "
                   + (f"{_fmt(best_other[0], 'x')} ({best_other[1]})" if best_other else "—")
                   + f" | {_duration(seconds)} |")
    out += ["", "## Reproduce", ""]
    commands = summary["commands"]
    if commands.get("seeds_py"):
        out += ["The seeds (seeds.py run):", "", *(f"    {cmd}" for cmd in commands["seeds_py"]), ""]
    out += ["Each seed (from its report's `settings.command`):", ""]
    out += [f"    {cmd}" for cmd in commands["per_seed"].values() if cmd]
    if commands.get("aggregate"):
        out += ["", "This summary:", "", f"    {commands['aggregate']}"]
    machines = {json.dumps(m, sort_keys=True): m for m in summary["machine"].values()}
    out += ["", "Machine: " + "; ".join(_machine(m) for m in machines.values()) + ". "
            f"Total time: {_duration(summary['total_seconds'])} over {n} seed(s) (the wall time `run` measured, "
            "else the sum of the report's `timing_seconds`, which counts no training a reused run directory "
            "already had)."]
    return "\n".join(out) + "\n"


def _machine(machine: dict) -> str:
    parts = [machine.get("device") or "?", machine.get("processor"), machine.get("platform")]
    if machine.get("cpu_count"):
        parts.append(f"{machine['cpu_count']} CPUs")
    if machine.get("torch_threads"):
        parts.append(f"{machine['torch_threads']} torch threads")
    if machine.get("cuda"):
        parts.append(f"CUDA {machine['cuda']}")
    return ", ".join(str(p) for p in parts if p)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------------- summary.png


#: the settings drawn side by side: (key, label, colour).
BAR_SETTINGS = (("standard", "standard", "tab:blue"), ("same_weights", "same weights", "tab:orange"))


def _setting_bars(ax, x, i: int, stats: Sequence[tuple[float, float | None] | None], *, bottom: float):
    """Setting ``i`` of BAR_SETTINGS as bars at ``x`` from ``(mean, std)`` pairs (None: no bar) with ±1 std error
    bars (none at all when no std is known: one seed); returns the bars' positions."""
    import numpy as np

    _, label, color = BAR_SETTINGS[i]
    width = 0.8 / len(BAR_SETTINGS)
    pos = x + (i - (len(BAR_SETTINGS) - 1) / 2) * width
    means = np.array([s[0] if s else np.nan for s in stats])
    errs = [s[1] if s and s[1] is not None else 0.0 for s in stats]
    ax.bar(pos, means - bottom, width, bottom=bottom, yerr=errs if any(errs) else None, capsize=3, color=color,
           alpha=0.8, label=label, error_kw={"elinewidth": 1})
    return pos


def _finish_axes(ax, x, rules: Sequence[str], ylabel: str, *, bottom: float, oracle: float | None = None) -> None:
    """Labels, grid and legend; the oracle's mean dashed (drawn before the y limit is fixed, so that it shows)."""
    if oracle is not None:
        ax.axhline(oracle, color="black", linestyle="--", linewidth=0.9, label="oracle (standard)")
    ax.set_ylim(bottom=bottom)
    ax.set_xticks(x)
    ax.set_xticklabels(rules)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over a bar


def plot_summary(summary: dict, path: Path) -> Path:
    """Grouped bars (standard, same weights) with std error bars and each seed as a dot: AUC and best x @1pt."""
    import numpy as np
    from matplotlib.figure import Figure

    from consistentee.evaluation.plots import save_figure

    rules = list(dict.fromkeys(r for s, _, _ in BAR_SETTINGS for r in summary["settings"][s] if r != ORACLE))
    panels = [("auc", "AUC (%)", 100.0), ("best_layer_speedup_at_1pt", "best layer speed-up within 1 pt (x)", 1.0)]
    fig = Figure(figsize=(max(6.4, 1.1 * len(rules) + 2), 6.6))
    width = 0.8 / len(BAR_SETTINGS)
    x = np.arange(len(rules))
    for row, (metric, ylabel, scale) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, row + 1)
        lows = []
        for i, (setting, _, _) in enumerate(BAR_SETTINGS):
            stats = [summary["settings"][setting].get(r, {}).get(metric) for r in rules]
            pairs = [(scale * s["mean"], s["std"] and scale * s["std"]) if s else None for s in stats]
            pos = _setting_bars(ax, x, i, pairs, bottom=1.0 if metric != "auc" else 0.0)
            for p, s in zip(pos, stats, strict=True):
                if s:
                    seeds = [scale * v for v in s["per_seed"].values()]
                    spread = np.linspace(-0.2, 0.2, len(seeds)) * width if len(seeds) > 1 else [0.0]
                    ax.plot(p + np.asarray(spread), seeds, "o", color="black", markersize=2.5, zorder=3)
                    lows.append(min(seeds) - (s["std"] or 0) * scale)
        oracle = (summary.get("reference") or {}).get("oracle_layer_speedup")
        _finish_axes(ax, x, rules, ylabel, bottom=max(0.0, math.floor(min(lows) - 2)) if metric == "auc" and lows
                     else 1.0, oracle=oracle["mean"] if metric != "auc" and oracle else None)
    n = len(summary["seeds"])
    scope = summary.get("joint_scope")
    scope = f" (stage 3: --joint-scope {scope})" if scope not in (None, DEFAULT_JOINT_SCOPE) else ""
    fig.suptitle(f"{', '.join(summary['datasets'])}{scope}: mean over {n} seed(s)"
                 + (", error bars ±1 std, dots = seeds" if n > 1 else " (one seed: no spread)"), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------ combine: one summary a dataset


RESULTS_DIR = Path(__file__).resolve().parent / "results"
COMBINE_BY = "benchmarks/seeds.py combine"
#: combined key -> (metric of the per-dataset summary, scale): AUC in percent, speed-ups as they are.
COMBINED_METRICS = {"auc": ("auc", 100.0), "best_speedup_05pt": ("best_layer_speedup_at_0.5pt", 1.0),
                    "best_speedup_1pt": ("best_layer_speedup_at_1pt", 1.0)}
COMBINED_SETTINGS = ("standard", "same_weights")
UNITS = {"auc": "percent: 100 x the fractions of the per-dataset summary.json (its tables show percent); "
                "std in points",
         "speedup": "x, layer speed-up against full depth",
         "std": "sample standard deviation over the dataset's seeds; null for one seed (no spread)"}
#: the lead table: combined key, its label, how its gap is written.
LEAD_METRICS = (("auc", "highest mean AUC", "pt"), ("best_speedup_1pt", "highest mean best x @1pt", "x"))


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (what a committed summary should hold)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def summary_paths(given: Sequence[str] | None, out_dir: Path) -> list[Path]:
    """The summaries given (a folder stands for its summary.json), else every ``RESULTS_DIR/*/summary.json`` but
    ``out_dir``'s own and combined ones."""
    if given:
        return [Path(p) / "summary.json" if Path(p).is_dir() else Path(p) for p in given]
    own = (out_dir / "summary.json").resolve()
    found = []
    for path in sorted(RESULTS_DIR.glob("*/summary.json")):
        if path.resolve() == own:
            continue
        content = read_input(path)
        if isinstance(content, dict) and content.get("generated_by") == COMBINE_BY:
            continue
        found.append(path)
    if not found:
        raise SeedsError(f"no {_shown(RESULTS_DIR)}/*/summary.json: run seeds.py run or aggregate first, "
                         "or pass --summaries")
    return found


#: The benchmark's default model; other models' datasets are named with it in the combined summary.
DEFAULT_MODEL = "minilm"


def load_seeds_summary(path: Path) -> tuple[str, dict]:
    """``(dataset, summary)`` of a summary.json written by ``run`` or ``aggregate`` on one dataset."""
    summary = read_input(path)
    settings = summary.get("settings") if isinstance(summary, dict) else None
    if not isinstance(settings, dict) or not all(isinstance(settings.get(s), dict) for s in EXTRACT) \
            or not isinstance(summary.get("seeds"), list) or not isinstance(summary.get("datasets"), list):
        raise SeedsError(f"{path}: not a summary.json of seeds.py run/aggregate (no 'seeds', 'datasets' and "
                         "'settings' per setting)")
    if len(summary["datasets"]) != 1:
        raise SeedsError(f"{path}: summarises {len(summary['datasets'])} datasets "
                         f"({', '.join(summary['datasets']) or 'none'}); combine takes one dataset a summary")
    return summary["datasets"][0], summary


def _mean_std(stats: dict | None, scale: float = 1.0) -> tuple[float | None, float | None]:
    if not stats:
        return None, None
    return scale * stats["mean"], None if stats.get("std") is None else scale * stats["std"]


def combined_rules(summary: dict, setting: str) -> dict[str, dict]:
    """Per rule of ``setting``: mean and std of AUC (%), best x @0.5/1pt and the calibrated median x @1pt."""
    calibrated = summary["settings"]["calibrated"]
    rules = {}
    for rule, stats in summary["settings"][setting].items():
        row: dict[str, float | int | None] = {}
        for key, (metric, scale) in COMBINED_METRICS.items():
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(stats.get(metric), scale)
        row["calibrated_speedup_1pt_mean"], row["calibrated_speedup_1pt_std"] = \
            _mean_std((calibrated.get(rule) or {}).get("median_speedup_at_1pt"))
        row["n_seeds"] = max((s["n"] for s in stats.values() if s), default=0)
        rules[rule] = row
    return rules


def lead(rules: dict[str, dict], key: str) -> dict:
    """Whether consistentee has the highest mean ``key`` among the non-oracle rules; ``gap``: consistentee minus
    the best other rule (``other_rule``). ``leads`` is None without consistentee; a tie leads."""
    means = {r: row[f"{key}_mean"] for r, row in rules.items() if r != ORACLE and row.get(f"{key}_mean") is not None}
    others = {r: m for r, m in means.items() if r != CHALLENGER}
    other = max(others, key=others.__getitem__) if others else None  # the first of a tie (report order)
    if CHALLENGER not in means:
        return {"leads": None, "leader": other, "other_rule": other, "gap": None}
    if other is None:
        return {"leads": True, "leader": CHALLENGER, "other_rule": None, "gap": None}
    gap = means[CHALLENGER] - others[other]
    return {"leads": gap >= 0, "leader": CHALLENGER if gap >= 0 else other, "other_rule": other, "gap": gap}


#: Stage 3's default scope (the paper's); a summary of another scope is named with it in the combined summary.
DEFAULT_JOINT_SCOPE = "all"


def joint_scope(report: dict) -> str | None:
    """What stage 3 trained for the report's ConsistentEE models (None: an older report that did not say)."""
    return ((report.get("settings") or {}).get("policy") or {}).get("joint_scope")


def configured_betas(report: dict) -> list[str] | None:
    """The ConsistentEE betas the report's benchmark trained (None: a report that does not say)."""
    betas = (((report.get("settings") or {}).get("bench") or {}).get("betas"))
    return [b.strip() for b in str(betas).split(",") if b.strip()] if betas else None


def dataset_key(dataset: str, model: str | None, scope: str | None = None, betas: int = 1) -> str:
    """A dataset's name in the combined summary: with the model's when it is not the default (trec6-mpnet), with
    stage 3's scope when it is not the paper's (trec6-joint-exits), and with the number of ConsistentEE models
    when a study sweeps beta (trec6-joint-exits-4betas), so variants sit side by side."""
    name = dataset if model in (None, DEFAULT_MODEL) else f"{dataset}-{Path(str(model).rstrip('/')).name}"
    name = name if scope in (None, DEFAULT_JOINT_SCOPE) else f"{name}-joint-{scope}"
    return name if betas <= 1 else f"{name}-{betas}betas"


def combine_summaries(paths: Sequence[Path], command: str | None = None) -> dict:
    datasets: dict[str, dict] = {}
    sources: dict[str, Path] = {}
    for path in paths:
        name, summary = load_seeds_summary(path)
        name = dataset_key(name, summary.get("model"), summary.get("joint_scope"), len(summary.get("betas") or ()))
        if name in datasets:
            raise SeedsError(f"{sources[name]} and {path} both summarise dataset {name}: give one summary a dataset")
        sources[name] = path
        settings = {setting: {"rules": combined_rules(summary, setting)} for setting in COMBINED_SETTINGS}
        datasets[name] = {
            "seeds": summary["seeds"], "source": _shown(path), "model": summary.get("model"),
            "joint_scope": summary.get("joint_scope"),
            "level": summary.get("level"), "settings": settings,
            "lead": {setting: {key: lead(settings[setting]["rules"], key) for key, _, _ in LEAD_METRICS}
                     for setting in COMBINED_SETTINGS},
            "verdicts": summary.get("verdicts") or {}, "reference": summary.get("reference") or {},
        }
    return {"datasets": datasets, "units": UNITS, "command": command, "generated_by": COMBINE_BY}


def _pm(mean: float | None, std: float | None, unit: str = "") -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}{unit}" + ("" if std is None else f" ± {std:.2f}")


def combined_cells(row: dict) -> list[str]:
    """AUC %, best x @0.5pt, best x @1pt, calibrated x @1pt (each mean ± std) and the number of seeds."""
    return [_pm(row["auc_mean"], row["auc_std"]),
            *(_pm(row[f"{key}_mean"], row[f"{key}_std"], "x")
              for key in ("best_speedup_05pt", "best_speedup_1pt", "calibrated_speedup_1pt")),
            str(row["n_seeds"])]


COMBINED_HEADER = "AUC % | best x @0.5pt | best x @1pt | calibrated x @1pt | seeds |"
COMBINED_ALIGN = "---: | ---: | ---: | ---: | ---: |"
SETTING_NAMES = {"standard": "standard", "same_weights": "same weights"}


def _lead_cell(entry: dict, unit: str) -> str:
    if entry["leads"] is None:
        return "— (no consistentee)"
    if entry["gap"] is None:
        return "yes (no other rule)"
    gap = f"{abs(entry['gap']):.2f}" + (" pt" if unit == "pt" else "x")
    if entry["leads"]:
        return f"yes, tied with {entry['other_rule']}" if entry["gap"] == 0 else \
            f"yes, +{gap} over {entry['other_rule']}"
    return f"no: {entry['leader']} leads by {gap}"


def render_combined_markdown(combined: dict) -> str:
    datasets = combined["datasets"]
    out = [f"# Results over seeds: {', '.join(datasets)}", ""]
    out.append(f"{len(datasets)} dataset(s), each from its own `seeds.py` summary.json. Cells: mean ± std over that "
               "dataset's training seeds (sample std; one seed shows its value alone: no spread). AUC in %; x = layer "
               "speed-up against full depth; best x is read off the **test** curve; calibrated x @1pt is the "
               "median speed-up of the knob calibrated on dev for a 1-point budget (Learn-then-Test re-splits; "
               "the same figure in both settings).")
    for name, entry in datasets.items():
        n = len(entry["seeds"])
        scope = entry.get("joint_scope")
        out += ["", f"## {name}", "", f"{entry.get('model')}, {n} seed(s) ({', '.join(entry['seeds'])}), from "
                f"`{entry['source']}`." + (f" Stage 3 trained `{scope}` (`--joint-scope`)." if scope else "")
                + (" **1 seed: no spread.**" if n == 1 else "")]
        for setting in COMBINED_SETTINGS:
            out += ["", f"### {SETTINGS[setting]}", "", f"| rule | {COMBINED_HEADER}", f"| :--- | {COMBINED_ALIGN}"]
            out += [f"| {rule} | " + " | ".join(combined_cells(row)) + " |"
                    for rule, row in entry["settings"][setting]["rules"].items()]
        if entry["verdicts"]:
            out += ["", "Verdicts (consistentee against the best other rule, from its summary.json):", "",
                    *verdict_rows({"level": entry.get("level") or 0.95, "verdicts": entry["verdicts"]})]
    out += ["", "## Does consistentee lead?", "",
            "Among the non-oracle rules, by mean over seeds; the gap is consistentee minus the best other rule "
            "(see each dataset's verdicts for whether it exceeds the seed-to-seed spread).", "",
            "| dataset | setting | seeds | " + " | ".join(label for _, label, _ in LEAD_METRICS) + " |",
            "| :--- | :--- | ---: | " + " | ".join(":---" for _ in LEAD_METRICS) + " |"]
    for name, entry in datasets.items():
        for setting in COMBINED_SETTINGS:
            cells = [_lead_cell(entry["lead"][setting][key], unit) for key, _, unit in LEAD_METRICS]
            out.append(f"| {name} | {SETTING_NAMES[setting]} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    if combined.get("command"):
        out += ["", "This summary:", "", f"    {combined['command']}"]
    return "\n".join(out) + "\n"


def plot_combined(combined: dict, path: Path) -> Path:
    """Per dataset a panel of the best layer speed-up @1pt per rule, standard and same weights side by side,
    error bars ±1 std over seeds."""
    import numpy as np
    from matplotlib.figure import Figure

    from consistentee.evaluation.plots import save_figure

    datasets = combined["datasets"]
    panels = {name: list(dict.fromkeys(r for s in COMBINED_SETTINGS for r, row in entry["settings"][s]["rules"].items()
                                      if r != ORACLE and row["best_speedup_1pt_mean"] is not None))
              for name, entry in datasets.items()}
    height = 0.4 + 3.0 * len(panels)
    fig = Figure(figsize=(max(6.4, 1.1 * max(map(len, panels.values()), default=1) + 2), height))
    for row, (name, rules) in enumerate(panels.items()):
        ax = fig.add_subplot(len(panels), 1, row + 1)
        x = np.arange(len(rules))
        entry = datasets[name]
        for i, (setting, _, _) in enumerate(BAR_SETTINGS):
            table = entry["settings"][setting]["rules"]
            _setting_bars(ax, x, i, [(table[r]["best_speedup_1pt_mean"], table[r]["best_speedup_1pt_std"])
                                     if table.get(r, {}).get("best_speedup_1pt_mean") is not None else None
                                     for r in rules], bottom=1.0)
        oracle = (entry.get("reference") or {}).get("oracle_layer_speedup")
        _finish_axes(ax, x, rules, "best x within 1 pt", bottom=1.0, oracle=oracle["mean"] if oracle else None)
        n = len(entry["seeds"])
        ax.set_title(f"{name}: mean over {n} seed(s)" + (", error bars ±1 std" if n > 1 else " (1 seed: no spread)"),
                     fontsize=9)
    fig.suptitle("Best layer speed-up within 1 point of full depth (test curve)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / height))  # the top 0.4 inch is the suptitle's, not the first panel's
    return save_figure(fig, path)


def combine(out_dir: Path, summaries: Sequence[str] | None = None, *, command: str | None = None) -> dict:
    """Read every summary first (bad input writes nothing), then OUT/summary.{json,md,png}."""
    combined = combine_summaries(summary_paths(summaries, out_dir), command)
    markdown = render_combined_markdown(combined)
    write_json(out_dir / "summary.json", combined)
    write_text(out_dir / "summary.md", markdown)
    plot_combined(combined, out_dir / "summary.png")
    print(f"wrote {out_dir / 'summary.md'}, summary.json and summary.png ({len(combined['datasets'])} dataset(s): "
          f"{', '.join(combined['datasets'])})")
    return combined



# ------------------------------------------------------------------------------------------------- commands


def this_command(argv: Sequence[str]) -> str:
    """The command as run from the repository root, where the run and out directories it names live (a copy of
    the script run from elsewhere, e.g. a snapshot that keeps a long run apart from edits, is named as the
    repository's)."""
    return shlex.join(["python", f"benchmarks/{Path(__file__).name}", *argv])


def aggregate(out_dir: Path, reports: Sequence[str] | None = None, *, level: float = 0.95,
              command: str | None = None) -> dict:
    runs = load_runs(out_dir, reports)
    log_path = out_dir / "runs.json"
    runs_log = read_json(log_path) if log_path.is_file() and not reports else {}
    summary = summarize(runs, level=level, command=command, runs_log=runs_log)
    write_json(out_dir / "summary.json", summary)
    write_text(out_dir / "summary.md", render_markdown(summary))
    plot_summary(summary, out_dir / "summary.png")
    for warning in summary["warnings"]:
        print(f"seeds.py: warning: {warning}", file=sys.stderr)
    print(f"wrote {out_dir / 'summary.md'}, summary.json and summary.png ({len(runs)} seed(s))")
    return summary


def parse_seeds(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (or both, ``0-2,7``): distinct non-negative integers, in the order given."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise argparse.ArgumentTypeError(f"bad seed {part!r} in {text!r}: want e.g. 0,1,2 or 0-4")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if hi < lo:
            raise argparse.ArgumentTypeError(f"bad seed range {part!r}: {hi} < {lo}")
        seeds += range(lo, hi + 1)
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is given twice in {text!r}")
    return seeds


def _benchmark_argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    if not words:
        raise SeedsError("--benchmark-cmd is empty")
    if "/" not in words[0] and shutil.which(words[0]) is None:
        beside = Path(sys.executable).parent / words[0]  # the venv's script when the venv is not activated
        if beside.is_file():
            words[0] = str(beside)
    return words


def _check_passthrough(options: Sequence[str]) -> None:
    for option in options:
        if option.split("=", 1)[0] in OWN_OPTIONS:
            raise SeedsError(f"{option.split('=', 1)[0]} is set by seeds.py for each seed: leave it out after --")


def _trained_seed(run_dir: Path) -> int | None:
    """The stage-1 seed a run directory was trained with (None when nothing is trained or it is unreadable)."""
    try:
        seed = read_json(run_dir / "stage1" / "metrics.json")["config"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return seed if isinstance(seed, int) else None


def run_seeds(args: argparse.Namespace, options: list[str], command: str) -> int:
    if "{seed}" not in args.run_dir:
        raise SeedsError(f"--run-dir {args.run_dir!r} has no {{seed}}: each seed needs its own run directory "
                         "(the benchmark reuses what a run directory holds)")
    _check_passthrough(options)
    base = _benchmark_argv(args.benchmark_cmd)
    out_dir = Path(args.out_dir)
    plan = []
    for seed in args.seeds:
        run_dir = args.run_dir.replace("{seed}", str(seed))
        seed_out = out_dir / f"seed-{seed}"
        trained = _trained_seed(Path(run_dir))
        if trained is not None and trained != seed:
            raise SeedsError(f"{run_dir} holds a stage 1 trained with seed {trained}, not {seed}: the benchmark "
                             "would reuse it; use another --run-dir")
        extra = ["--run-dir", run_dir, "--seed", str(seed), "--out-dir", str(seed_out), *options]
        skip = (seed_out / "report.json").is_file() and not args.force
        plan.append((seed, run_dir, seed_out, base + extra, shlex.join(shlex.split(args.benchmark_cmd) + extra), skip))
    if args.dry_run:
        for seed, _, _, _, shown, skip in plan:
            print(f"seed {seed}: " + ("skip (report.json exists)" if skip else shown))
        return 0
    log_path = out_dir / "runs.json"
    for i, (seed, run_dir, seed_out, argv, shown, skip) in enumerate(plan, 1):
        if skip:
            print(f"== seed {seed} ({i}/{len(plan)}): {seed_out / 'report.json'} exists, skipped (--force reruns)",
                  flush=True)
            continue
        print(f"== seed {seed} ({i}/{len(plan)}): {shown}", flush=True)
        start = time.monotonic()
        try:
            code = subprocess.run(argv, check=False).returncode
        except FileNotFoundError:
            raise SeedsError(f"cannot run {argv[0]!r} (--benchmark-cmd {args.benchmark_cmd!r})") from None
        seconds = time.monotonic() - start
        # read again just before writing: another seeds.py may have run other seeds into this folder meanwhile
        log = read_json(log_path) if log_path.is_file() else {}
        log.setdefault("seeds", {})[str(seed)] = {
            "command": shown, "run_dir": run_dir, "report": str(seed_out / "report.json"), "exit_code": code,
            "seconds": round(seconds, 2), "seeds_py": command}
        write_json(log_path, log)
        if code != 0:
            print(f"seeds.py: seed {seed} failed (exit status {code}) after {_duration(seconds)}; later seeds not "
                  f"run, nothing aggregated. Its command: {shown}", file=sys.stderr)
            return code if 0 < code < 256 else 1
        if not (seed_out / "report.json").is_file():
            print(f"seeds.py: seed {seed} wrote no {seed_out / 'report.json'}", file=sys.stderr)
            return 1
    aggregate(out_dir, level=args.level, command=command)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit status 2, like the ``consistentee`` verbs."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"--level wants a number between 0 and 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seeds.py", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    run = verbs.add_parser("run", help="run the benchmark once per seed, then aggregate",
                           description="Run `BENCHMARK_CMD --run-dir RUN_DIR --seed SEED --out-dir OUT/seed-SEED "
                                       "OPTIONS` for each seed, one at a time, then aggregate. Benchmark options go "
                                       "after `--`.")
    run.add_argument("--seeds", type=parse_seeds, required=True, help="seeds: 0,1,2 or 0-4")
    run.add_argument("--run-dir", required=True, help="run directory per seed, with {seed} (e.g. runs/rt-seed{seed})")
    run.add_argument("--force", action="store_true", help="rerun a seed whose report.json exists (its run "
                     "directory is still reused: delete it to retrain)")
    run.add_argument("--dry-run", action="store_true", help="print what each seed would run, run nothing")
    run.add_argument("--benchmark-cmd", default=DEFAULT_BENCHMARK_CMD,
                     help="the benchmark command, split like a shell line (default: %(default)s)")
    for sub in (run, verbs.add_parser("aggregate", help="summarise OUT/seed-*/report.json (or --reports)")):
        sub.add_argument("--out-dir", required=True, help="folder of seed-SEED/ results; gets summary.json, "
                         "summary.md and summary.png")
        sub.add_argument("--level", type=_level, default=0.95, help="confidence level of the t-intervals "
                         "(default: %(default)s)")
    verbs.choices["aggregate"].add_argument("--reports", nargs="+", metavar="REPORT",
                                            help="report.json files to take as the seeds instead of OUT/seed-*")
    comb = verbs.add_parser("combine", help="one summary over datasets from their per-dataset summary.json",
                            description="Combine the summary.json of several datasets (one each, written by run "
                                        "or aggregate) into OUT/summary.json, summary.md and summary.png.")
    comb.add_argument("--summaries", nargs="+", metavar="SUMMARY",
                      help="per-dataset summary.json files or their folders (default: every "
                           "benchmarks/results/*/summary.json but OUT's own)")
    comb.add_argument("--out-dir", default=_shown(RESULTS_DIR), help="gets summary.json, summary.md and "
                      "summary.png (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, options = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    args, unknown = parser.parse_known_args(own)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (benchmark options go after --)")
    if options and args.verb != "run":
        parser.error("options after -- are for run only")
    command = this_command(argv)
    try:
        if args.verb == "run":
            return run_seeds(args, options, command)
        if args.verb == "combine":
            combine(Path(args.out_dir), args.summaries, command=command)
        else:
            aggregate(Path(args.out_dir), args.reports, level=args.level, command=command)
        return 0
    except SeedsError as exc:
        print(f"seeds.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("seeds.py: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # an output that cannot be written (utils.io names it)
        print(f"seeds.py: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
