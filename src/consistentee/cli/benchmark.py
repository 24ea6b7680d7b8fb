"""``consistentee benchmark``: every exit rule on one trained multi-exit model, one report.

Wiring (in ``cli/main.py``): ``benchmark.add_parser(verbs)`` (and ``benchmark.add_demo_parser(verbs)``) inside
``build_parser``; ``return benchmark.run(args)`` for ``benchmark`` and ``return benchmark.run_demo(args)`` for
``demo``. ``run_settings`` runs any :class:`~consistentee.evaluation.harness.BenchmarkSettings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

from consistentee.cli.options import add_dataclass_options, dataclass_from_args
from consistentee.evaluation.harness import BenchmarkConfig, BenchmarkSettings, demo_settings, run_benchmark
from consistentee.evaluation.report import summary_table
from consistentee.exits.learned import LearnedHeadConfig
from consistentee.training.policy import PolicyConfig
from consistentee.training.run import DataConfig, ModelConfig
from consistentee.training.stage1 import Stage1Config

__all__ = ["add_demo_parser", "add_parser", "run", "run_demo", "run_settings", "settings_from_args"]

DESCRIPTION = """\
Train what is needed and compare every exit rule on the same multi-exit model:
stage 1 once (shared by all rules), the memorized layers, the learned exit heads and one ConsistentEE
model per beta, all in --run-dir (a second run reuses what exists). Every rule's knob is swept on per-layer
tables of dev and test; knobs are chosen on dev only and reported on test, with accuracy, macro-F1, layer,
FLOPs and wall-clock speed-ups, AUC, the best speed-up within 0.5 / 1 accuracy point and the gap to the oracle.
Writes report.json, report.md and PNG plots to --out-dir (default RUN_DIR/report).
"""


def add_parser(verbs) -> argparse.ArgumentParser:
    """Add the ``benchmark`` verb to ``verbs`` (the sub-parsers of ``consistentee``).

    The training options are those of ``consistentee train``, generated the same way: an option that two
    configurations share (``--seed``, ``--checkpoint-every``, ...) sets both.
    """
    from consistentee.cli.main import _config_option, _Formatter, common_options  # main imports this module

    parser = verbs.add_parser(
        "benchmark", formatter_class=_Formatter,
        help="compare every exit rule on one trained model: report.json, report.md and plots",
        description=DESCRIPTION,
    )
    parser.add_argument("--run-dir", required=True, help="directory for everything the run trains and writes")
    _config_option(parser)
    add_dataclass_options(parser.add_argument_group("data"), DataConfig)
    add_dataclass_options(parser.add_argument_group("model"), ModelConfig)
    add_dataclass_options(parser.add_argument_group("stage 1"), Stage1Config)
    add_dataclass_options(parser.add_argument_group("benchmark"), BenchmarkConfig)
    add_dataclass_options(parser.add_argument_group("learned exit heads"), LearnedHeadConfig)
    add_dataclass_options(parser.add_argument_group("ConsistentEE policy (one model per --betas value)"),
                          PolicyConfig, skip=("beta",))
    common_options(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    return BenchmarkSettings(
        data=dataclass_from_args(DataConfig, args),
        model=dataclass_from_args(ModelConfig, args),
        stage1=dataclass_from_args(Stage1Config, args),
        learned=dataclass_from_args(LearnedHeadConfig, args),
        policy=dataclass_from_args(PolicyConfig, args),
        bench=dataclass_from_args(BenchmarkConfig, args),
    )


def _command_line() -> str:
    return shlex.join(["consistentee", *sys.argv[1:]]) if Path(sys.argv[0]).name == "consistentee" \
        else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def run_settings(run_dir: str | os.PathLike, settings: BenchmarkSettings, *, device: str = "auto",
                 progress: bool = True, command: str | None = None, log=print) -> int:
    """Run the benchmark with ``settings``, print the summary table and where everything is."""
    report = run_benchmark(run_dir, settings, device=device, progress=progress, log=log,
                           command=command or _command_line())
    out_dir = Path(report["out_dir"]).resolve()
    print()
    print(summary_table(report))
    print()
    print(f"report: {out_dir / 'report.md'} and {out_dir / 'report.json'}")
    plots = [v for k, v in report["files"].items() if k not in ("report_json", "report_md")]
    if plots:
        print(f"plots in {out_dir}: {', '.join(plots)}")
    print(f"run directory (models, reused by a second run): {Path(run_dir).resolve()}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``consistentee benchmark`` from parsed arguments."""
    return run_settings(args.run_dir, settings_from_args(args), device=args.device, progress=args.progress,
                        command=getattr(args, "command_line", None))


def add_demo_parser(verbs) -> argparse.ArgumentParser:
    """Add the ``demo`` verb (``make demo``): the benchmark at :func:`~consistentee.evaluation.harness.demo_settings`."""
    from consistentee.cli.main import _Formatter, common_options  # main imports this module

    parser = verbs.add_parser(
        "demo", formatter_class=_Formatter, help="the benchmark on rt-snippets with the built-in MiniLM (make demo)",
        description="The benchmark at a size that finishes in about 20 minutes on 2 CPU cores: rt-snippets, the "
                    "built-in MiniLM, a training subset, every exit rule and two ConsistentEE betas. Prints the "
                    "summary table and where the report and plots are. Re-running reuses what --run-dir holds.",
    )
    parser.add_argument("--run-dir", default="runs/demo", help="directory for everything the demo trains and writes")
    parser.add_argument("--max-train-examples", type=int, default=None,
                        help="override the demo's training subset (none: the demo's own size)")
    parser.add_argument("--betas", default=None, help="override the demo's ConsistentEE betas (comma-separated)")
    common_options(parser)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Run ``consistentee demo`` (missing attributes fall back to the demo's defaults)."""
    overrides = {"betas": args.betas} if getattr(args, "betas", None) else {}
    settings = demo_settings(**overrides)
    limit = getattr(args, "max_train_examples", None)
    if limit is not None:
        settings.data = dataclasses.replace(settings.data, max_train_examples=limit)
    return run_settings(getattr(args, "run_dir", "runs/demo"), settings, device=getattr(args, "device", "auto"),
                        progress=getattr(args, "progress", True), command=getattr(args, "command_line", None))
