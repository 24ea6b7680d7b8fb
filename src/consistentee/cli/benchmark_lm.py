"""``consistentee benchmark-lm``: ConsistentEE and its decoder peers on one trained early-exit LM.

Trains the exits (stages 1-3 on WikiText-2) into RUN_DIR/exits unless --exits-dir is given, then measures
perplexity (WikiText-2 test), ROUGE-1/2/L on a fixed XSum subset, agreement with full depth, mean exit layer,
and decode tokens/s against Hugging Face ``generate`` (full depth, KV cache), interleaved in the same run.
Writes RUN_DIR/report.json, report.md and two PNGs. XSum needs the BIG-bench 1.0.0 sdist.
"""

from __future__ import annotations

import argparse

from consistentee.cli.options import add_dataclass_options, dataclass_from_args
from consistentee.generation.benchmark import BenchmarkLMConfig
from consistentee.generation.training import LMTrainConfig


def add_parser(verbs) -> argparse.ArgumentParser:
    from consistentee.cli.main import _Formatter, common_options

    parser = verbs.add_parser(
        "benchmark-lm", formatter_class=_Formatter, help="early-exit generation benchmark (decoder LMs)",
        description=__doc__.split("\n\n", 1)[1].strip() if __doc__ else None,
    )
    parser.add_argument("--run-dir", required=True, help="directory for the trained exits and the report")
    add_dataclass_options(parser.add_argument_group("benchmark"), BenchmarkLMConfig)
    add_dataclass_options(parser.add_argument_group("training (when --exits-dir is not given)"), LMTrainConfig)
    common_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from consistentee.generation.benchmark import run_benchmark

    cfg = dataclass_from_args(BenchmarkLMConfig, args)
    train_cfg = dataclass_from_args(LMTrainConfig, args)
    report = run_benchmark(args.run_dir, cfg, train_cfg, device=args.device, progress=args.progress)
    goal = report["goal"]
    print(f"report: {args.run_dir}/report.md; target met: {goal['target_met']}")
    return 0
