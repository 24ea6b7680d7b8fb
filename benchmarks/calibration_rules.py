"""Which rule should ``consistentee calibrate`` certify on a ConsistentEE model? Re-splits of dev + test.

    python benchmarks/calibration_rules.py RUN_DIR [RUN_DIR ...] [--betas 0.03,0.05] [--resplits 100] [--out DIR]

For every ConsistentEE model of each run directory (``RUN_DIR/policies/beta-<beta>/model``), the model's own dev and
test rows are pooled and split at random ``--resplits`` times into a calibration part (the dev split's size) and a
held-out part. On each split, each strategy picks an operating point on the calibration part, and the point's layer
speed-up and accuracy loss against full depth are measured on the held-out part:

- ``consistentee``, ``confidence``, ``pcee``: that rule alone, certified on the whole calibration part
  (``consistentee calibrate --rule R``; ``--rule auto`` is confidence);
- ``best-of``: the rule that is fastest within the budget on a ``--selection-share`` of the calibration part,
  certified on the rest of it (the rows that test never chose what they test, so the guarantee holds);
- ``best-of-certified``: the same, picking the rule that certifies the fastest point on that share.

Knob candidates, PCEE's chain order (``--order-examples`` training rows) and the Learn-then-Test settings are the
CLI's (``--max-loss``, ``--delta``, guarantee expected+unseen, accuracy drop). Printed and written (``--out``): per
model and strategy the median realised layer speed-up, its 10th-90th percentiles, how often the budget was broken
on the held-out part (the guarantee asks for at most delta) and how often the best-of strategies chose each rule;
then the mean over models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from consistentee.evaluation.calibration import (
    calibrate,
    chain_on_order_split,
    outcomes_from_points,
    realised,
)
from consistentee.evaluation.sweep import EvalTables, build_candidates, order_statistics, sweep
from consistentee.exits.rules import RULES
from consistentee.exits.tables import collect_exit_tables
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.training.policy import policy_model_dir
from consistentee.training.run import load_run_model, split_tables, train_subset
from consistentee.utils.io import write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common.py
import common  # noqa: E402

RULES_TRIED = ("consistentee", "confidence", "pcee")
#: one rule certified on the whole calibration part, or a rule picked on a share of it and certified on the rest
STRATEGIES = (*RULES_TRIED, "best-of", "best-of-certified")


def rule_outcomes(rule: str, dev: EvalTables, test: EvalTables, train: EvalTables, grid_points: int):
    """Outcomes of the rule's knob candidates on dev rows then test rows; PCEE's patiences as one chain ordered on
    the training rows, as ``consistentee calibrate`` does by default."""
    policy_tables = {0.0: (dev, test)} if RULES[rule].model_keyed else None
    candidates = build_candidates(rule, dev, test, policy_tables=policy_tables, grid_points=grid_points)
    outcomes = outcomes_from_points(rule, sweep(candidates), dev, test)
    if len(outcomes.sequences) > 1:
        outcomes.sequences = chain_on_order_split(outcomes.sequences,
                                                  *order_statistics(candidates, {None: train, 0.0: train}))
    return outcomes


def empirical_speedup(outcomes, rows: np.ndarray, max_loss: float) -> float:
    """The fastest candidate whose accuracy drop on ``rows`` is within the budget (1.0 when none is)."""
    drop = outcomes.ref_correct[rows].mean() - outcomes.correct[:, rows].mean(axis=1)
    speed = outcomes.num_layers / outcomes.exit_layers[:, rows].mean(axis=1)
    within = speed[drop <= max_loss / 100.0 + 1e-12]
    return float(max(within.max(), 1.0)) if within.size else 1.0


def study(outcomes: dict, calibration_size: int, args: argparse.Namespace) -> dict:
    """Every strategy on the same ``--resplits`` random splits of the pooled rows."""
    n = next(iter(outcomes.values())).num_rows
    rng = np.random.default_rng(args.seed)
    found = {name: {"speed": [], "loss": []} for name in STRATEGIES}
    chosen = {name: dict.fromkeys(RULES_TRIED, 0) for name in ("best-of", "best-of-certified")}
    for r in range(args.resplits):
        perm = rng.permutation(n)
        cal, held = perm[:calibration_size], perm[calibration_size:]

        def certify(rule: str, rows: np.ndarray, r: int = r, held: np.ndarray = held) -> int | None:
            return calibrate(outcomes[rule], rows, max_loss_points=args.max_loss, delta=args.delta,
                             order_seed=args.seed + r, test_size=len(held)).index

        k = min(max(1, round(args.selection_share * len(cal))), len(cal) - 1)
        pick, rest = cal[:k], cal[k:]  # cal is in random order already
        looks = {rule: empirical_speedup(outcomes[rule], pick, args.max_loss) for rule in RULES_TRIED}
        certified = {rule: realised(outcomes[rule], certify(rule, pick), pick)[0] for rule in RULES_TRIED}
        best, best_certified = (max(RULES_TRIED, key=lambda rule: x[rule]) for x in (looks, certified))
        chosen["best-of"][best] += 1
        chosen["best-of-certified"][best_certified] += 1
        picks = {rule: (rule, certify(rule, cal)) for rule in RULES_TRIED}
        picks["best-of"] = (best, certify(best, rest))
        picks["best-of-certified"] = (best_certified, certify(best_certified, rest))
        for name, (rule, index) in picks.items():
            speed, loss = realised(outcomes[rule], index, held)
            found[name]["speed"].append(speed)
            found[name]["loss"].append(loss)
    out = {}
    for name, values in found.items():
        speed, loss = np.array(values["speed"]), np.array(values["loss"])
        out[name] = {"median_speedup": float(np.median(speed)), "speedup_p10": float(np.percentile(speed, 10)),
                     "speedup_p90": float(np.percentile(speed, 90)),
                     "violation_rate": float(np.mean(loss > args.max_loss + 1e-9)),
                     "median_loss_points": float(np.median(loss))}
    for name, counts in chosen.items():
        out[name]["chosen"] = {rule: count / args.resplits for rule, count in counts.items()}
    return out


def markdown(results: dict, args: argparse.Namespace, command: str) -> str:
    lines = ["# Which rule to certify on a ConsistentEE model", "", f"`{command}`", "",
             f"Budget {args.max_loss:g} point(s), delta {args.delta:g}; {args.resplits} random splits of each model's "
             f"dev + test rows (calibration part: the dev split's size). `best-of` picks the rule that is fastest "
             f"within the budget on {args.selection_share:.0%} of the calibration part, `best-of-certified` the one "
             "that certifies the fastest point there; both certify it on the rest. Cells: median realised layer "
             "speed-up on the held-out part (10th-90th percentile), then the share of splits that broke the budget "
             "there (the guarantee allows delta).", "",
             "| model | " + " | ".join(STRATEGIES) + " |", "| :--- | " + " | ".join("---:" for _ in STRATEGIES) + " |"]
    for name, row in results["models"].items():
        cells = [f"{row[s]['median_speedup']:.2f}x ({row[s]['speedup_p10']:.2f}-{row[s]['speedup_p90']:.2f}), "
                 f"{100 * row[s]['violation_rate']:.0f}%" for s in STRATEGIES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    mean = results["mean_over_models"]
    lines.append("| **mean over models** | " + " | ".join(
        f"{mean[s]['median_speedup']:.2f}x, {100 * mean[s]['violation_rate']:.0f}%" for s in STRATEGIES) + " |")
    lines += ["", "How often the best-of strategies picked each rule (share of splits, mean over models): " + "; ".join(
        f"{name}: " + ", ".join(f"{rule} {100 * share:.0f}%" for rule, share in results["chosen_mean"][name].items())
        for name in ("best-of", "best-of-certified")) + "."]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    common.offline()
    import torch

    torch.set_num_threads(args.threads)
    command = "python benchmarks/calibration_rules.py " + " ".join(sys.argv[1:])
    results: dict = {"command": command, "environment": common.environment(), "max_loss_points": args.max_loss,
                     "delta": args.delta, "resplits": args.resplits, "selection_share": args.selection_share,
                     "models": {}}
    for run_dir in args.run_dirs:
        stage1, data = load_run_model(run_dir, device="cpu")
        rows = np.random.default_rng(args.seed).permutation(len(data.encoded["train"]))[: args.order_examples]
        order_data = train_subset(data, sorted(int(i) for i in rows))
        betas = args.betas or sorted(float(p.name.removeprefix("beta-")) for p in Path(run_dir, "policies").iterdir()
                                     if (p / "model").is_dir())
        for beta in betas:
            model = EarlyExitForSequenceClassification.from_pretrained(policy_model_dir(run_dir, beta), device="cpu")
            dev, test = (EvalTables.from_exit_tables(split_tables(model, data, s, progress=False))
                         for s in ("dev", "test"))
            train = EvalTables.from_exit_tables(collect_exit_tables(model, order_data, data.collate, batch_size=128,
                                                                    device=torch.device("cpu"), progress=False))
            outcomes = {rule: rule_outcomes(rule, dev, test, train, args.grid_points) for rule in RULES_TRIED}
            name = f"{Path(run_dir).name} beta {beta:g}"
            results["models"][name] = study(outcomes, len(dev), args)
            row = results["models"][name]
            print(f"{name}: " + ", ".join(f"{s} {row[s]['median_speedup']:.2f}x ({100 * row[s]['violation_rate']:.0f}%)"
                                          for s in STRATEGIES), flush=True)
    results["mean_over_models"] = {s: {key: float(np.mean([row[s][key] for row in results["models"].values()]))
                                       for key in ("median_speedup", "violation_rate")} for s in STRATEGIES}
    results["chosen_mean"] = {name: {rule: float(np.mean([row[name]["chosen"][rule] for row in results["models"].values()]))
                                     for rule in RULES_TRIED} for name in ("best-of", "best-of-certified")}
    text = markdown(results, args, command)
    print(text)
    if args.out:
        write_json(Path(args.out) / "calibration_rules.json", results)
        write_text(Path(args.out) / "calibration_rules.md", text)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories with ConsistentEE models (policies/beta-*/model)")
    parser.add_argument("--betas", type=lambda s: [float(b) for b in s.split(",")], default=None,
                        help="comma-separated betas (default: every trained one)")
    parser.add_argument("--max-loss", type=float, default=1.0, help="accuracy budget in points")
    parser.add_argument("--delta", type=float, default=0.1, help="the budget holds with probability >= 1 - delta")
    parser.add_argument("--selection-share", type=float, default=0.2, help="share of the calibration part that "
                                                                           "picks best's rule")
    parser.add_argument("--resplits", type=int, default=100, help="random dev/test re-splits")
    parser.add_argument("--grid-points", type=int, default=200, help="knob candidates per rule (the CLI's)")
    parser.add_argument("--order-examples", type=int, default=2000, help="training rows that order PCEE's chain")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and the training-row subset")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=None, help="folder that gets calibration_rules.json and .md")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    sys.exit(common.exit_on_bad_input("calibration_rules.py", main, args))
