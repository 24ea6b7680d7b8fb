"""``consistentee benchmark-lm``: ConsistentEE and its decoder peers on one trained early-exit LM.

Trains the exits (stages 1-3 on WikiText-2) into RUN_DIR/exits unless --exits-dir is given, then measures
perplexity (WikiText-2 test), ROUGE-1/2/L on a fixed XSum subset, agreement with full depth, mean exit layer,
and decode tokens/s against Hugging Face ``generate`` (full depth, KV cache), interleaved in the same run.
Writes RUN_DIR/report.json, report.md and two PNGs. XSum needs the BIG-bench 1.0.0 sdist.
"""

from __future__ import annotations

import argparse
import dataclasses

from consistentee.cli.train_lm import BENCH, TRAIN, lm_verb


def add_parser(verbs) -> argparse.ArgumentParser:
    train = dataclasses.replace(TRAIN, title="training (when --exits-dir is not given)")
    return lm_verb(verbs, "benchmark-lm", "early-exit generation benchmark (decoder LMs)", __doc__, [BENCH, train],
                   "directory for the trained exits and the report")


def run(args: argparse.Namespace) -> int:
    from consistentee.pipeline.benchmark_lm import run_benchmark

    cfg, train_cfg = BENCH.from_args(args), TRAIN.from_args(args)
    report = run_benchmark(args.run_dir, cfg, train_cfg, device=args.device, progress=args.progress)
    goal = report["goal"]
    print(f"report: {args.run_dir}/report.md; target met: {goal['target_met']}")
    return 0
