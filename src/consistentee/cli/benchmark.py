"""``consistentee benchmark``: every exit rule on one trained multi-exit model, one report.

Wiring (in ``cli/main.py``): ``benchmark.add_parser(verbs)`` (and ``benchmark.add_demo_parser(verbs)``) inside
``build_parser``; ``return benchmark.run(args)`` for ``benchmark`` and ``return benchmark.run_demo(args)`` for
``demo``. ``run_settings`` runs any :class:`~consistentee.pipeline.benchmark.BenchmarkSettings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
from pathlib import Path

from consistentee.cli.options import Section, _Formatter, common_options
from consistentee.cli.pipeline import training_parser, training_sections
from consistentee.evaluation.report import summary_table
from consistentee.exits.learned import LearnedHeadConfig
from consistentee.pipeline.benchmark import BenchmarkConfig, BenchmarkSettings, demo_settings, run_benchmark

__all__ = ["add_demo_parser", "add_parser", "run", "run_demo", "run_settings", "settings_from_args"]

DESCRIPTION = """\
Train what is needed and compare every exit rule on the same multi-exit model:
stage 1 once (shared by all rules), the memorized layers, the learned exit heads and one ConsistentEE
model per beta, all in --run-dir (a second run reuses what exists). Every rule's knob is swept on per-layer
tables of dev and test; knobs are chosen on dev only and reported on test, with accuracy, macro-F1, layer,
FLOPs and wall-clock speed-ups, AUC, the best speed-up within 0.5 / 1 accuracy point and the gap to the oracle.
Writes report.json, report.md and PNG plots to --out-dir (default RUN_DIR/report).
"""


def benchmark_sections() -> list[Section]:
    """The configurations of ``benchmark``, named like the fields of :class:`BenchmarkSettings`: those of
    ``consistentee train`` (without the single --beta) and the benchmark's own."""
    known = training_sections()
    return [known["data"], known["model"], known["stage1"], Section("bench", BenchmarkConfig, "benchmark"),
            Section("learned", LearnedHeadConfig, "learned exit heads"),
            dataclasses.replace(known["policy"], title="ConsistentEE policy (one model per --betas value)",
                                skip=("beta",))]


def add_parser(verbs) -> argparse.ArgumentParser:
    """Add the ``benchmark`` verb to ``verbs`` (the sub-parsers of ``consistentee``).

    The training options are those of ``consistentee train``, generated the same way (a field that two
    configurations share is namespaced: ``--stage1.seed``, ``--policy.seed``; ``--seed`` sets every seed).
    """
    parser, _ = training_parser(verbs, "benchmark", "compare every exit rule on one trained model: report.json, "
                                "report.md and plots", DESCRIPTION, benchmark_sections(),
                                "directory for everything the run trains and writes")
    common_options(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    return BenchmarkSettings(**{section.name: section.from_args(args) for section in benchmark_sections()})


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
    """Add the ``demo`` verb (``make demo``): the benchmark at :func:`~consistentee.pipeline.benchmark.demo_settings`."""
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
