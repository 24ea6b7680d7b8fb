"""The benchmark report: ``report.json`` (schema below), ``report.md`` (tables a person reads) and plots.

report.json (keys may be added, never renamed)::

    {"dataset", "model", "num_layers", "split_sizes": {...},
     "full_depth": {"accuracy", "macro_f1", ...},
     "methods": {"<rule>": {"points": [{"knob", "accuracy", "macro_f1", "mean_exit_layer", "layer_speedup",
                                         "flops_speedup", "wall_speedup", ...}],
                            "auc", "best_layer_speedup_at_0.5pt", "best_layer_speedup_at_1pt",
                            "dev_selected": {"0.5pt": {...}, "1pt": {"knob", "test_accuracy",
                                             "test_layer_speedup", "test_wall_speedup", ...}}, ...}},
     "oracle": {"accuracy", "mean_exit_layer", "layer_speedup", ...},
     "settings": {...}}

Accuracies are fractions in JSON and percentages in the Markdown; ``wall_speedup`` is ``null`` for the
points that were not timed (see ``settings.wall_clock.measured``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consistentee.evaluation.curves import pareto_frontier
from consistentee.evaluation.plots import (
    plot_budget_curves,
    plot_exit_histograms,
    plot_histogram,
    plot_tradeoff,
)
from consistentee.utils.io import write_json, write_text

__all__ = [
    "DEV_SELECTED_KEYS",
    "METHOD_KEYS",
    "POINT_KEYS",
    "REPORT_KEYS",
    "PLOT_FILES",
    "check_report_schema",
    "render_markdown",
    "summary_table",
    "write_plots",
    "write_report",
]

REPORT_KEYS = ("dataset", "model", "num_layers", "split_sizes", "full_depth", "methods", "oracle", "settings")
FULL_DEPTH_KEYS = ("accuracy", "macro_f1")
METHOD_KEYS = ("points", "auc", "best_layer_speedup_at_0.5pt", "best_layer_speedup_at_1pt", "dev_selected")
POINT_KEYS = ("knob", "accuracy", "macro_f1", "mean_exit_layer", "layer_speedup", "flops_speedup", "wall_speedup")
DEV_SELECTED_KEYS = ("knob", "test_accuracy", "test_layer_speedup", "test_wall_speedup")
ORACLE_KEYS = ("accuracy", "mean_exit_layer", "layer_speedup")
BUDGET_KEYS = ("0.5pt", "1pt")

#: plot name -> file name (in the report directory).
PLOT_FILES = {
    "tradeoff_layer": "tradeoff_layer_speedup.png",
    "tradeoff_flops": "tradeoff_flops_speedup.png",
    "tradeoff_wall": "tradeoff_wall_speedup.png",
    "exit_histograms": "exit_histograms.png",
    "memorized_layers": "memorized_layers.png",
    "calibration_speedup": "calibration_speedup_vs_budget.png",
    "calibration_violations": "calibration_violations_vs_budget.png",
}


def check_report_schema(report: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` listing every required key that is missing (or of the wrong kind)."""
    problems: list[str] = []

    def need(obj: Any, keys, where: str) -> None:
        if not isinstance(obj, Mapping):
            problems.append(f"{where} is not an object")
            return
        problems.extend(f"{where}.{k}" for k in keys if k not in obj)

    need(report, REPORT_KEYS, "report")
    if isinstance(report, Mapping):
        need(report.get("full_depth"), FULL_DEPTH_KEYS, "full_depth")
        need(report.get("oracle"), ORACLE_KEYS, "oracle")
        if not isinstance(report.get("split_sizes"), Mapping):
            problems.append("split_sizes is not an object")
        methods = report.get("methods")
        if isinstance(methods, Mapping):
            for name, method in methods.items():
                need(method, METHOD_KEYS, f"methods.{name}")
                if not isinstance(method, Mapping):
                    continue
                pts = method.get("points")
                if not isinstance(pts, list) or not pts:
                    problems.append(f"methods.{name}.points is not a non-empty list")
                else:
                    for i, p in enumerate(pts):
                        need(p, POINT_KEYS, f"methods.{name}.points[{i}]")
                sel = method.get("dev_selected")
                if isinstance(sel, Mapping):
                    for b in BUDGET_KEYS:
                        need(sel.get(b), DEV_SELECTED_KEYS, f"methods.{name}.dev_selected.{b}")
        else:
            problems.append("methods is not an object")
    if problems:
        raise ValueError("report.json schema: missing or malformed " + ", ".join(problems))


# ---------------------------------------------------------------------------------------------
# formatting


def _pct(x: Any, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * float(x):.{digits}f}"


def _separate(entry: dict) -> str:
    """The ``by_order.knobs`` cell of a calibration-study row ("—" for a rule with one sequence)."""
    knobs = (entry.get("by_order") or {}).get("knobs")
    return "—" if not knobs else f"{100 * knobs['violation_rate']:.1f}% / {_x(knobs['median_speedup'])}"


def _x(x: Any) -> str:
    return "—" if x is None else f"{float(x):.2f}x"


def _signed(x: Any) -> str:
    return "—" if x is None else f"{float(x):+.2f}"


def _knob(method: Mapping[str, Any], knob: Any) -> str:
    if knob is None:
        return "none"
    if isinstance(knob, Mapping):
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in knob.items())
    name = method.get("knob_name") or "knob"
    return f"{name}={knob:.4g}" if isinstance(knob, int | float) else f"{name}={knob}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or ("l" + "r" * (len(header) - 1))
    sep = ["---:" if a == "r" else ":---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _summary_rows(report: Mapping[str, Any], budget: str = "1pt") -> list[list[str]]:
    full = report["full_depth"]["accuracy"]
    rows = []
    for name, m in report["methods"].items():
        sel = m["dev_selected"].get(budget) or {}
        loss = None if sel.get("test_accuracy") is None else 100 * (sel["test_accuracy"] - full)
        rows.append([
            name,
            _pct(m["auc"]),
            _x(m["best_layer_speedup_at_0.5pt"]),
            _x(m["best_layer_speedup_at_1pt"]),
            _knob(m, sel.get("knob")) if sel.get("knob") is not None else "none within budget on dev",
            _pct(sel.get("test_accuracy")) + ("" if loss is None else f" ({loss:+.2f})"),
            _x(sel.get("test_layer_speedup")),
            _x(sel.get("test_flops_speedup")),
            _x(sel.get("test_wall_speedup")),
        ])
    return rows


SUMMARY_HEADER = ["rule", "AUC (%)", "best layer x @0.5pt", "best layer x @1pt", "dev-selected {b} knob",
                  "test acc % (pt vs full)", "layer x", "FLOPs x", "wall x"]


def summary_table(report: Mapping[str, Any]) -> str:
    """A plain-text summary for the console (same content as the Markdown summary table)."""
    header = [h.format(b="1pt") for h in SUMMARY_HEADER]
    rows = _summary_rows(report, "1pt")
    oracle = report["oracle"]
    rows.append(["oracle", "", "", "", "(labels)", _pct(oracle["accuracy"]), _x(oracle["layer_speedup"]),
                 _x(oracle.get("flops_speedup")), ""])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [header, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    fd = report["full_depth"]
    title = (f"{report['dataset']} / {report['model']}: full depth {_pct(fd['accuracy'])}% accuracy "
             f"({report['num_layers']} layers); test curve budgets in accuracy points vs full depth; "
             "knobs chosen on dev")
    return "\n".join([title, *lines])


def render_markdown(report: Mapping[str, Any], plots: Mapping[str, str] | None = None) -> str:
    """The human report: summary, dev-selected points, oracle, every operating point, how it was run, plots."""
    s = report.get("settings", {})
    fd, oracle = report["full_depth"], report["oracle"]
    sizes = report["split_sizes"]
    wall = s.get("wall_clock", {})
    x_range = s.get("auc_x_range")
    out = [f"# Early-exit benchmark: {report['dataset']} with {report['model']}", ""]
    out.append(f"{report['num_layers']} layers, {report.get('num_labels', '?')} labels"
               + (f" ({', '.join(report['labels'])})" if report.get("labels") else "")
               + (f", pooling `{report['pooling']}`" if report.get("pooling") else "")
               + ". Splits: " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ".")
    out.append("")
    out.append(f"**Full depth (test):** accuracy {_pct(fd['accuracy'])}%, macro-F1 {_pct(fd['macro_f1'])}%"
               + (f", MCC {fd['mcc']:.3f}" if fd.get("mcc") is not None else "")
               + (f"; dev accuracy {_pct(fd['dev_accuracy'])}%" if fd.get("dev_accuracy") is not None else "") + ".")
    if fd.get("per_exit_accuracy"):
        out.append("Accuracy of every exit on test (%): "
                   + " / ".join(_pct(a, 1) for a in fd["per_exit_accuracy"]) + ".")
    out.append("")
    out.append(f"**Oracle** (earliest correct exit, the upper bound of every rule on this model): accuracy "
               f"{_pct(oracle['accuracy'])}%, mean exit layer {oracle['mean_exit_layer']:.2f}, layer speed-up "
               f"{_x(oracle['layer_speedup'])}" + (f", FLOPs speed-up {_x(oracle.get('flops_speedup'))}"
                                                   if oracle.get("flops_speedup") else "") + ".")
    out += ["", "## Summary", ""]
    out.append("AUC: mean attainable test accuracy over saved fraction "
               + (f"{x_range[0]:.2f}..{x_range[1]:.2f} " if x_range else "")
               + "(common to all rules). Best layer speed-up: read off the **test** curve within 0.5 / 1 accuracy "
               "point of full depth. Dev-selected: the knob with the largest **dev** speed-up within 1 point on dev, "
               "and what it gave on test (in brackets: points against full depth; dev choices can overshoot). "
               "x = speed-up against full depth; `—` = none within budget, or not timed.")
    out.append("")
    out += _table([h.format(b="1pt") for h in SUMMARY_HEADER], _summary_rows(report, "1pt"), "lrrrlrrrr")
    out += ["", "### Dev-selected within 0.5 point", ""]
    out += _table([h.format(b="0.5pt") for h in SUMMARY_HEADER], _summary_rows(report, "0.5pt"), "lrrrlrrrr")
    if any(m.get("calibrated") for m in report["methods"].values()):
        cal = report.get("calibration") or {}
        delta = cal.get("delta", s.get("bench", {}).get("delta"))
        out += ["", "## Calibrated operating points", ""]
        out.append("The fastest knob that Learn-then-Test certifies on **dev** to keep the accuracy loss against full "
                   f"depth within the budget with probability at least 1 - delta (delta = {delta}), and what it gave "
                   "on test. `none certified` = the model runs at full depth.")
        for b in ("0.5pt", "1pt"):
            rows = []
            for name, m in report["methods"].items():
                c = (m.get("calibrated") or {}).get(b)
                if not c:
                    continue
                loss = c.get("test_loss_points")
                rows.append([name, _knob(m, c["knob"]) if c.get("knob") is not None else "none certified",
                             str(c.get("certified", 0)),
                             _pct(c.get("test_accuracy")) + ("" if loss is None else f" ({-loss:+.2f})"),
                             _x(c.get("test_layer_speedup")), _x(c.get("test_flops_speedup")),
                             _x(c.get("test_wall_speedup"))])
            out += ["", f"### Budget {b}", ""]
            out += _table(["rule", "calibrated knob", "certified knobs", "test acc % (pt vs full)", "layer x",
                           "FLOPs x", "wall x"], rows, "llrrrrr")
    if report.get("calibration"):
        cal = report["calibration"]
        out += ["", "## How often a chosen operating point breaks its budget on unseen data", ""]
        out.append(f"{cal['resampling'][:1].upper()}{cal['resampling'][1:]} ({cal['resplits']} re-splits, {cal['calibration_size']} / "
                   f"{cal['test_size']} rows). Loss: {cal['loss_definition']}. Method: {cal['method']}. "
                   + (f"Guarantee `{cal['guarantee']}`: {cal['guarantee_definition']}. " if cal.get("guarantee") else "")
                   + "Violation rate should stay at most delta for calibrated points; the naive choice has no such "
                   "guarantee. Ratio = median calibrated speed-up / best layer speed-up read off the test curve. "
                   "Other guarantees on the same re-splits: violation rate / median speed-up.")
        chained = any("by_order" in e for rules in cal["budgets"].values() for e in rules.values())
        if chained:
            out.append("")
            out.append("Rules whose knobs form several sequences (one per ConsistentEE model, one per PCEE patience) "
                       "are calibrated as one chain ordered on training rows; *separate sequences* is the same "
                       "study with delta split among their sequences instead (violation rate / median speed-up).")
        for b, rules in cal["budgets"].items():
            rows = [[name, f"{100 * e['violation_rate']:.1f}%", _x(e["median_speedup"]),
                     f"{e['speedup_p10']:.2f}-{e['speedup_p90']:.2f}x", f"{100 * e['none_certified_rate']:.0f}%",
                     _x(e["best_test_speedup"]),
                     "—" if e.get("ratio_to_best") is None else f"{100 * e['ratio_to_best']:.0f}%",
                     f"{100 * e['naive_violation_rate']:.1f}%", _x(e["naive_median_speedup"])]
                    + [f"{100 * o['violation_rate']:.1f}% / {_x(o['median_speedup'])}"
                       for o in (e.get("by_method") or {}).values()]
                    + ([_separate(e)] if chained else [])
                    for name, e in rules.items()]
            others = list(next(iter(rules.values()), {}).get("by_method") or {})
            out += ["", f"### Budget {float(b):g} point(s)", ""]
            out += _table(["rule", "violation rate", "median x", "p10-p90", "none certified", "best test x",
                           "ratio", "naive violation rate", "naive median x"] + [f"`{o}`" for o in others]
                          + (["separate sequences"] if chained else []), rows)
    routing_rows = []
    for name, m in report["methods"].items():
        for where, r in (m.get("routing") or {}).items():
            counts = r["exit_layer_counts"]
            total = max(sum(counts), 1)
            routing_rows.append([
                name, where.replace("_1pt", " 1pt").replace("_", " "), _knob(m, r.get("knob")),
                " / ".join(f"{100 * c / total:.0f}" for c in counts),
                "—" if r.get("spearman_with_oracle_exit") is None else f"{r['spearman_with_oracle_exit']:+.2f}",
                " / ".join("—" if a is None else f"{100 * a:.0f}" for a in r["accuracy_by_exit_layer"])])
    if routing_rows:
        out += ["", "## Routing: does the rule tell inputs apart?", ""]
        out.append("On test, at the rule's calibrated and dev-selected 1-point settings: the share of inputs that exit "
                   "at each layer (%), the Spearman correlation of the exit taken with the oracle's earliest correct "
                   "exit (how well the exit tracks the input's hardness; `—`: one layer for every input), and the "
                   "accuracy of the inputs sent to each layer (%).")
        out.append("")
        out += _table(["rule", "setting", "knob", "exit share by layer (%)", "rank corr. with oracle exit",
                       "accuracy by exit layer (%)"], routing_rows, "lllrrr")
    sensitivity = {beta: v["policy_sensitivity"] for beta, v in (report.get("consistentee_models") or {}).items()
                   if v.get("policy_sensitivity")}
    if sensitivity:
        out += ["", *policy_sensitivity_section(sensitivity)]
    if report.get("same_weights"):
        out += ["", "## Same weights: every rule on each ConsistentEE model", ""]
        out.append("Each rule's decisions on the ConsistentEE model's own weights (budgets against the stage-1 full "
                   "depth, as above; AUC over that model's common range): what the policy's decision adds beyond "
                   "consistent training.")
        for beta, block in report["same_weights"].items():
            out += ["", f"### beta {beta} (full depth {_pct(block['full_depth_test_accuracy'])}%)", ""]
            rows = [[name, _pct(r["auc"]), _x(r["best_layer_speedup_at_0.5pt"]), _x(r["best_layer_speedup_at_1pt"])]
                    for name, r in block["rules"].items()]
            out += _table(["rule", "AUC (%)", "best layer x @0.5pt", "best layer x @1pt"], rows)
    sig = report.get("significance")
    if sig and sig.get("rules"):
        ref = sig["reference"]
        out += ["", f"## Is {ref} ahead beyond the test split's noise?", ""]
        out.append(f"Paired bootstrap over the {sig['rows']} test rows ({sig['resamples']} resamples; every rule scored "
                   "on the same draw, knobs fixed): median and 95% interval of each metric, of "
                   f"{ref} minus the rule, and the share of resamples in which {ref} is ahead. It measures the "
                   "noise of the test split only; seeds measure the noise of training.")
        out.append("")
        rows = []
        for name, e in sig["rules"].items():
            diff, ahead = e.get("reference_minus_rule") or {}, e.get("reference_ahead_share") or {}
            row = [name]
            for key, fmt in (("auc", lambda v: f"{100 * v:.2f}"), ("best_layer_speedup_at_1pt", lambda v: f"{v:.2f}")):
                lo, mid, hi = e[key]
                row.append(f"{fmt(mid)} [{fmt(lo)}, {fmt(hi)}]")
                if key in diff:
                    dlo, dmid, dhi = diff[key]
                    row.append(f"{fmt(dmid)} [{fmt(dlo)}, {fmt(dhi)}]")
                    row.append(f"{100 * ahead[key]:.0f}%")
                else:
                    row += ["—", "—"]
            rows.append(row)
        out += _table(["rule", "AUC (%)", f"{ref} - rule (AUC pt)", f"{ref} ahead (AUC)", "best layer x @1pt",
                       f"{ref} - rule (x @1pt)", f"{ref} ahead (x @1pt)"], rows)
    out += ["", "### Gap to the oracle", ""]
    out.append(f"The oracle reaches {_pct(oracle['accuracy'])}% at {_x(oracle['layer_speedup'])}. Accuracy gap: "
               "oracle accuracy minus the rule's best test accuracy at a speed-up at least the oracle's "
               "(`—`: the rule never goes that fast). Speed-up gap: oracle layer speed-up minus the rule's best "
               "within 1 point (negative: the rule is faster; the oracle maximises accuracy, not speed).")
    out.append("")
    gap_rows = []
    for name, m in report["methods"].items():
        g = m.get("oracle_gap", {})
        gap_rows.append([name, _pct(g.get("accuracy_at_oracle_speedup")), _signed(g.get("accuracy_gap_points")),
                         _x(m["best_layer_speedup_at_1pt"]), _signed(g.get("layer_speedup_gap_at_1pt"))])
    out += _table(["rule", "acc % at oracle speed-up", "accuracy gap (pt)", "best layer x @1pt", "speed-up gap"],
                  gap_rows)
    if report.get("consistentee_models"):
        out += ["", "### ConsistentEE models", ""]
        rows = [[beta, v.get("path", ""), _pct(v.get("full_depth_test_accuracy"))]
                for beta, v in report["consistentee_models"].items()]
        out += _table(["beta", "model", "full-depth test acc (%)"], rows, "llr")
    out += ["", "## Operating points on the test frontier", ""]
    out.append("Each rule's points on its test Pareto frontier (layer speed-up, accuracy) and every timed point; "
               "report.json lists every simulated point.")
    out.append("")
    for name, m in report["methods"].items():
        rows = []
        frontier = {tuple(p) for p in pareto_frontier([(p["layer_speedup"], p["accuracy"]) for p in m["points"]])}
        shown = [p for p in m["points"]
                 if (p["layer_speedup"], p["accuracy"]) in frontier or p.get("wall_speedup") is not None]
        for p in shown:
            on = "*" if (p["layer_speedup"], p["accuracy"]) in frontier else ""
            rows.append([_knob(m, p["knob"]) + on, _pct(p["accuracy"]), _pct(p["macro_f1"]),
                         f"{p['mean_exit_layer']:.2f}", _x(p["layer_speedup"]), _x(p["flops_speedup"]),
                         _x(p["wall_speedup"]), _pct(p.get("dev_accuracy")), _x(p.get("dev_layer_speedup"))])
        out += [f"<details><summary>{name}: {len(shown)} of {len(m['points'])} points (* = on the test frontier)"
                "</summary>", ""]
        out += _table(["knob", "acc %", "macro-F1 %", "mean exit", "layer x", "FLOPs x", "wall x", "dev acc %",
                       "dev layer x"], rows)
        out += ["", "</details>", ""]
    out += ["## How it was run", ""]
    machine, versions = s.get("machine", {}), s.get("versions", {})
    if s.get("command"):
        out.append(f"- command: `{s['command']}`")
    if s.get("run_dir"):
        out.append(f"- run directory: `{s['run_dir']}`")
    out.append(f"- machine: {machine.get('platform', '?')}, {machine.get('processor', '?')}, "
               f"{machine.get('cpu_count', '?')} CPUs, torch threads {machine.get('torch_threads', '?')}, "
               f"device {s.get('device', '?')}" + (f", GPU {machine['cuda']}" if machine.get("cuda") else ""))
    if versions:
        out.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    out.append("- sizes: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    if s.get("seeds"):
        out.append("- seeds: " + ", ".join(f"{k} {v}" for k, v in s["seeds"].items()))
    for part, label in (("data", "data"), ("model", "model"), ("stage1", "stage 1"), ("learned", "learned exit heads"), ("policy", "ConsistentEE policy"),
                        ("bench", "benchmark")):
        if isinstance(s.get(part), Mapping):
            items = [(k, v) for k, v in s[part].items() if not (part == "policy" and k == "beta")]
            out.append(f"- {label}: " + ", ".join(f"{k}={v}" for k, v in items)
                       + (" (beta: swept, see benchmark.betas)" if part == "policy" else ""))
    if wall:
        out.append(f"- wall clock: {wall.get('engine')}; batch size {wall.get('batch_size')}, "
                   f"{wall.get('repeats')} interleaved rounds (median), {wall.get('examples')} test examples per "
                   f"round, {wall.get('threads')} threads on {wall.get('device')}; measured: {wall.get('measured')}"
                   + (f"; full depth {wall['examples_per_second_full_depth']:.1f} examples/s"
                      if wall.get("examples_per_second_full_depth") else "")
                   + (f"; engine vs simulated exit layers agree on >= {100 * wall['engine_exit_agreement_min']:.1f}% "
                      "of rows" if wall.get("engine_exit_agreement_min") is not None else "")
                   + (f". **Warning:** {wall['warning']}" if wall.get("warning") else ""))
    if s.get("flops"):
        out.append("- FLOPs: analytic count from the config and each example's real token length (embeddings, "
                   "attention, FFN, exit heads, pooler when used; policies for consistentee only, learned heads "
                   "for learned only)")
    if report.get("timing_seconds"):
        out.append("- time per step: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["timing_seconds"].items()))
    if plots:
        out += ["", "## Plots", ""]
        captions = {"tradeoff_layer": "accuracy vs layer speed-up (each rule's test frontier)",
                    "tradeoff_flops": "accuracy vs FLOPs speed-up (each rule's test frontier)",
                    "tradeoff_wall": "accuracy vs wall-clock speed-up (timed points only)",
                    "exit_histograms": "exit layers on test at each rule's dev-selected 1-point setting",
                    "memorized_layers": "memorized layer of the training examples",
                    "calibration_speedup": "resampling study: median calibrated layer speed-up against the budget",
                    "calibration_violations": "resampling study: how often the calibrated point broke its budget"}
        for key, file in plots.items():
            out.append(f"- `{file}`: {captions.get(key, key)}")
        out.append("")
        for key, file in plots.items():
            out.append(f"![{captions.get(key, key)}]({file})")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# writing


def _curve(points, key: str) -> list[tuple[float, float]]:
    pts = [(p[key], p["accuracy"]) for p in points if p.get(key) is not None]
    return pareto_frontier(pts)


def write_plots(
    report: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    exit_layers_by_rule: Mapping[str, Any] | None = None,
    memorized_layers: Any = None,
) -> dict[str, str]:
    """The PNGs of the report; returns plot name -> file name (relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    methods, oracle = report["methods"], report["oracle"]
    full = report["full_depth"]["accuracy"]
    files: dict[str, str] = {}
    model = Path(str(report.get("model") or "")).name
    name = Path(str(report["dataset"])).name + (f" ({model})" if model else "")
    for key, measure, label in (("tradeoff_layer", "layer_speedup", "layer speed-up (L / mean exit layer)"),
                                ("tradeoff_flops", "flops_speedup", "FLOPs speed-up (analytic)"),
                                ("tradeoff_wall", "wall_speedup", "wall-clock speed-up (measured)")):
        curves = {name: _curve(m["points"], measure) for name, m in methods.items()}
        if not any(curves.values()):
            continue
        star = oracle.get(measure)
        x_max = max(3.0, min(4.0, 1.1 * float(star or 0.0)))
        plot_tradeoff(curves, label, out_dir / PLOT_FILES[key], full_accuracy=full,
                      oracle=None if star is None else (star, oracle["accuracy"]),
                      title=f"{name}: accuracy vs {label.split(' (')[0]} (test)",
                      steps=True, x_max=x_max)
        files[key] = PLOT_FILES[key]
    study = (report.get("calibration") or {}).get("budgets")
    if study:
        rules = list(next(iter(study.values())))
        for key, field, label, line in (
                ("calibration_speedup", "median_speedup", "median layer speed-up on the held-out part", None),
                ("calibration_violations", "violation_rate", "share of re-splits over budget",
                 report["calibration"]["delta"])):
            series = {r: [(float(b), study[b][r][field]) for b in study] for r in rules}
            plot_budget_curves(series, label, out_dir / PLOT_FILES[key], hline=line,
                               hline_label=None if line is None else "delta",
                               title=f"{name}: calibrated operating points ({report['calibration']['resplits']} "
                                     "re-splits)")
            files[key] = PLOT_FILES[key]
    if exit_layers_by_rule:
        plot_exit_histograms(exit_layers_by_rule, report["num_layers"], out_dir / PLOT_FILES["exit_histograms"])
        files["exit_histograms"] = PLOT_FILES["exit_histograms"]
    if memorized_layers is not None and len(memorized_layers):
        plot_histogram(memorized_layers, report["num_layers"], "memorized layer of training examples",
                       out_dir / PLOT_FILES["memorized_layers"])
        files["memorized_layers"] = PLOT_FILES["memorized_layers"]
    return files


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def policy_sensitivity_section(models: dict[str, list[dict[str, Any]]], split: str = "test") -> list[str]:
    """Markdown: per ConsistentEE model, does each layer's policy read its input (``policy_sensitivity``)?"""
    def corr(v: float | None) -> str:
        return "—" if v is None else f"{v:+.2f}"

    out = ["## Does the policy read its input?", "",
           f"On {split}, per ConsistentEE model and per layer's policy (layer 1 first): the spread (std) of the policy's "
           "logit over the inputs, its Spearman correlation with that exit's max probability, and the max "
           "probability's own correlation with the exit being right (what a confidence threshold ranks by). A "
           "policy with a logit that barely moves, or moves against the confidence, decides by layer, not by input.",
           ""]
    rows = [[beta, " / ".join(f"{r['logit_std']:.2f}" for r in layers),
             " / ".join(corr(r["spearman_with_max_prob"]) for r in layers),
             " / ".join(corr(r["spearman_with_correct"]) for r in layers),
             " / ".join(corr(r["max_prob_spearman_with_correct"]) for r in layers)]
            for beta, layers in models.items()]
    return out + _table(["beta", "logit std by layer", "rank corr. with max prob", "rank corr. with right",
                         "max prob's rank corr. with right"], rows, "lrrrr")


def write_report(
    report: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    exit_layers_by_rule: Mapping[str, Any] | None = None,
    memorized_layers: Any = None,
) -> dict[str, Path]:
    """Check the schema, write the plots, ``report.md`` and ``report.json`` (all atomically).

    Adds ``report["files"]`` (name -> file name in ``out_dir``). Returns name -> path.
    """
    check_report_schema(report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, out_dir, exit_layers_by_rule=exit_layers_by_rule, memorized_layers=memorized_layers)
    report["files"] = {"report_json": "report.json", "report_md": "report.md", **plots}
    write_text(out_dir / "report.md", render_markdown(report, plots))
    write_json(out_dir / "report.json", _jsonable(report))
    return {k: out_dir / v for k, v in report["files"].items()}
