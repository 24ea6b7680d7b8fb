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
import typing
from pathlib import Path
from typing import Any

from consistentee.cli.options import _base_type, _none_or, add_dataclass_options, dataclass_from_args

__all__ = ["add_demo_parser", "add_parser", "run", "run_demo", "run_settings", "settings_from_args"]

DESCRIPTION = """\
Train what is needed and compare every exit rule on the same multi-exit model:
stage 1 once (shared by all rules), the memorized layers, the learned exit heads and one ConsistentEE
model per beta, all in --run-dir (a second run reuses what exists). Every rule's knob is swept on per-layer
tables of dev and test; knobs are chosen on dev only and reported on test, with accuracy, macro-F1, layer,
FLOPs and wall-clock speed-ups, AUC, the best speed-up within 0.5 / 1 accuracy point and the gap to the oracle.
Writes report.json, report.md and PNG plots to --out-dir (default RUN_DIR/report).
"""


def _add_config_options(parser: argparse.ArgumentParser, group, cls: type, prefix: str, *,
                        always_prefix: bool = False, skip: tuple[str, ...] = ()) -> None:
    """Options of a settings dataclass whose field names may clash with options already on ``parser``.

    A field gets its plain flag (``--rollouts``, dest ``rollouts``) when no option has it yet, else (or with
    ``always_prefix``) ``--PREFIX-NAME`` with dest ``PREFIX_NAME`` (``--policy-seed``, ``--learned-epochs``).
    Which dest holds which field is remembered on the parser for :func:`_config_from_args`.
    """
    hints = typing.get_type_hints(cls)
    dests: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or "help" not in f.metadata:
            continue
        kind, optional = _base_type(hints[f.name])
        if kind not in (int, float, str, bool):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        plain = "--" + f.name.replace("_", "-")
        if always_prefix or plain in parser._option_string_actions:
            flag, dest = f"--{prefix}-{f.name.replace('_', '-')}", f"{prefix}_{f.name}"
        else:
            flag, dest = plain, f.name
        dests[f.name] = dest
        extra: dict[str, Any] = {}
        if "choices" in f.metadata:
            extra["choices"] = f.metadata["choices"]
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=f.metadata["help"])
        else:
            group.add_argument(flag, dest=dest, type=_none_or(kind) if optional else kind, default=default,
                               metavar=f.metadata.get("metavar", kind.__name__.upper()), help=f.metadata["help"],
                               **extra)
    parser.set_defaults(**{f"_{prefix}_dests": dests})


def _config_from_args(cls: type, args: argparse.Namespace, prefix: str) -> Any:
    dests = getattr(args, f"_{prefix}_dests", None) or {}
    return cls(**{name: getattr(args, dest) for name, dest in dests.items() if hasattr(args, dest)})


def _main_helpers():
    """``(formatter, common options, --config option)`` of ``cli/main.py`` (imported late: main imports us)."""
    from consistentee.cli import main

    common = getattr(main, "common_options", None) or main._common
    return main._Formatter, common, getattr(main, "_config_option", None)


def add_parser(verbs) -> argparse.ArgumentParser:
    """Add the ``benchmark`` verb to ``verbs`` (the sub-parsers of ``consistentee``)."""
    from consistentee.evaluation.harness import BenchmarkConfig, _policy_config_class
    from consistentee.exits.learned import LearnedHeadConfig
    from consistentee.training.run import DataConfig, ModelConfig
    from consistentee.training.stage1 import Stage1Config

    formatter, common, config_option = _main_helpers()
    parser = verbs.add_parser(
        "benchmark", formatter_class=formatter,
        help="compare every exit rule on one trained model: report.json, report.md and plots",
        description=DESCRIPTION,
    )
    parser.add_argument("--run-dir", required=True, help="directory for everything the run trains and writes")
    if config_option is not None:
        config_option(parser)
    add_dataclass_options(parser.add_argument_group("data"), DataConfig)
    add_dataclass_options(parser.add_argument_group("model"), ModelConfig)
    add_dataclass_options(parser.add_argument_group("stage 1"), Stage1Config)
    add_dataclass_options(parser.add_argument_group("benchmark"), BenchmarkConfig)
    _add_config_options(parser, parser.add_argument_group("learned exit heads"), LearnedHeadConfig, "learned",
                        always_prefix=True)
    policy_cls = _policy_config_class()
    if policy_cls is not None:
        _add_config_options(parser, parser.add_argument_group(
            "ConsistentEE policy (one model per --betas value; options shared with stage 1 are --policy-*)"),
            policy_cls, "policy", skip=("beta",))
    common(parser)
    return parser


def settings_from_args(args: argparse.Namespace):
    from consistentee.evaluation.harness import BenchmarkConfig, BenchmarkSettings, _policy_config_class
    from consistentee.exits.learned import LearnedHeadConfig
    from consistentee.training.run import DataConfig, ModelConfig
    from consistentee.training.stage1 import Stage1Config

    policy_cls = _policy_config_class()
    return BenchmarkSettings(
        data=dataclass_from_args(DataConfig, args),
        model=dataclass_from_args(ModelConfig, args),
        stage1=dataclass_from_args(Stage1Config, args),
        learned=_config_from_args(LearnedHeadConfig, args, "learned"),
        policy=None if policy_cls is None else _config_from_args(policy_cls, args, "policy"),
        bench=dataclass_from_args(BenchmarkConfig, args),
    )


def _command_line() -> str:
    return shlex.join(["consistentee", *sys.argv[1:]]) if Path(sys.argv[0]).name == "consistentee" \
        else shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])


def run_settings(run_dir: str | os.PathLike, settings, *, device: str = "auto", progress: bool = True,
                 command: str | None = None, log=print) -> int:
    """Run the benchmark with ``settings``, print the summary table and where everything is."""
    from consistentee.evaluation.harness import run_benchmark
    from consistentee.evaluation.report import summary_table

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
    formatter, common, _ = _main_helpers()
    parser = verbs.add_parser(
        "demo", formatter_class=formatter, help="the benchmark on rt-snippets with the built-in MiniLM (make demo)",
        description="The benchmark at a size that finishes in about 20 minutes on 2 CPU cores: rt-snippets, the "
                    "built-in MiniLM, a training subset, every exit rule and two ConsistentEE betas. Prints the "
                    "summary table and where the report and plots are. Re-running reuses what --run-dir holds.",
    )
    parser.add_argument("--run-dir", default="runs/demo", help="directory for everything the demo trains and writes")
    parser.add_argument("--max-train-examples", type=int, default=None,
                        help="override the demo's training subset (none: the demo's own size)")
    parser.add_argument("--betas", default=None, help="override the demo's ConsistentEE betas (comma-separated)")
    common(parser)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Run ``consistentee demo`` (missing attributes fall back to the demo's defaults)."""
    from consistentee.evaluation.harness import demo_settings

    overrides = {"betas": args.betas} if getattr(args, "betas", None) else {}
    settings = demo_settings(**overrides)
    limit = getattr(args, "max_train_examples", None)
    if limit is not None:
        settings.data = dataclasses.replace(settings.data, max_train_examples=limit)
    return run_settings(getattr(args, "run_dir", "runs/demo"), settings, device=getattr(args, "device", "auto"),
                        progress=getattr(args, "progress", True), command=getattr(args, "command_line", None))
