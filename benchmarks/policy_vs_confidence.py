"""The ConsistentEE policy against the confidence rule on the *same* ConsistentEE model (test split).

    python benchmarks/policy_vs_confidence.py RUN_DIR BETA [BETA ...] [--out DIR]

The benchmark compares every rule on the stage-1 model, while ConsistentEE answers with its own model (stage 3
changes the exits). This separates the two: each beta's model is run once, then the policy (thresholds swept)
and the confidence rule (max probability, thresholds swept) pick the exits on the same per-layer tables. Printed:
the best test accuracy each reaches at a layer speed-up of at least 1.5x, 1.75x, ... (the frontier), then whether
each layer's policy reads its input (``policy_sensitivity``: the spread of its logit, its rank correlation with the
exit's max probability). With ``--out DIR``: also DIR/policy_sensitivity.json and .md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from consistentee.evaluation.report import policy_sensitivity_section
from consistentee.evaluation.summary import policy_sensitivity
from consistentee.exits.rules import make_rule, simulate_exits
from consistentee.exits.tables import collect_exit_tables
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.training.policy import policy_model_dir
from consistentee.training.run import load_run_model
from consistentee.utils.io import write_json, write_text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common.py
import common  # noqa: E402

SPEEDUPS = (1.5, 1.75, 2.0, 2.25, 2.5)


def curve(rule_name: str, knobs, tables) -> list[tuple[float, float]]:
    """(accuracy %, layer speed-up) of ``rule_name`` at each knob, simulated on the tables as the engine runs it."""
    num_layers = tables.probs.shape[1]
    points = []
    for knob in knobs:
        result = simulate_exits(make_rule(rule_name, float(knob)), tables.probs, policy_probs=tables.policy_probs,
                                labels=tables.labels)
        accuracy = 100 * float((result.predictions == tables.labels).float().mean())
        points.append((accuracy, num_layers / float(result.exit_layer.float().mean())))
    return points


def best_at(points: list[tuple[float, float]], speedup: float) -> float:
    return max((acc for acc, s in points if s >= speedup), default=float("nan"))


def main(run_dir: str, betas: list[float], out: str | None = None) -> int:
    torch.manual_seed(0)
    _, data = load_run_model(run_dir, device="cpu")
    print(f"test split of {run_dir}: best accuracy (%) at a layer speed-up of at least "
          + ", ".join(f"{s}x" for s in SPEEDUPS))
    print("| beta | full depth | rule | " + " | ".join(f"{s}x" for s in SPEEDUPS) + " |")
    print("| ---: | ---: | :--- | " + " | ".join("---:" for _ in SPEEDUPS) + " |")
    sensitivity = {}
    for beta in betas:
        model = EarlyExitForSequenceClassification.from_pretrained(policy_model_dir(run_dir, beta), device="cpu")
        tables = collect_exit_tables(model, data.encoded["test"], data.collate, progress=False)
        sensitivity[f"{beta:g}"] = policy_sensitivity(tables.policy_probs, tables.probs, tables.labels)
        full = 100 * float((tables.probs[:, -1].argmax(-1) == tables.labels).float().mean())
        curves = {"confidence": curve("confidence", np.linspace(0.5, 1.0, 51), tables),
                  "consistentee": curve("consistentee", [*np.linspace(0.0, 0.95, 20), 0.97, 0.99], tables)}
        for rule, points in curves.items():
            print(f"| {beta:g} | {full:.2f} | {rule} | " + " | ".join(f"{best_at(points, s):.1f}" for s in SPEEDUPS)
                  + " |")
    markdown = "\n".join(policy_sensitivity_section(sensitivity)) + "\n"
    print("\n" + markdown)
    if out is not None:
        command = "python benchmarks/policy_vs_confidence.py " + " ".join(sys.argv[1:])
        write_json(Path(out) / "policy_sensitivity.json", {"run_dir": run_dir, "split": "test", "command": command,
                                                           "betas": sensitivity})
        write_text(Path(out) / "policy_sensitivity.md", f"# Policy sensitivity: {run_dir}\n\n`{command}`\n\n"
                   + markdown)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("betas", nargs="+", type=float)
    parser.add_argument("--out", help="folder that gets policy_sensitivity.json and .md")
    args = parser.parse_args()
    sys.exit(common.exit_on_bad_input("policy_vs_confidence.py", main, args.run_dir, args.betas, args.out))
