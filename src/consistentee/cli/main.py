"""``consistentee`` command line: one verb per step of the pipeline.

Errors caused by the input (a missing file, an unknown column, an invalid option value, a model directory
of the wrong kind) print one line naming the problem and exit with status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from consistentee.cli.options import add_dataclass_options, dataclass_from_args
from consistentee.utils.runtime import DEVICE_CHOICES

EXIT_USAGE = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where to run: auto picks CUDA when available, else the CPU")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                        help="hide progress bars")
    parser.set_defaults(progress=True)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    from consistentee.training.run import DataConfig, ModelConfig
    from consistentee.training.stage1 import Stage1Config

    parser = argparse.ArgumentParser(
        prog="consistentee",
        description="Early-exit inference for transformer classifiers: ConsistentEE and its peers.",
        formatter_class=_Formatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    train = verbs.add_parser(
        "train", formatter_class=_Formatter,
        help="stage 1 (multi-exit fine-tuning), memorized layers and per-exit test accuracy",
        description="Fine-tune a multi-exit model (stage 1), compute the memorized layer of every training "
                    "example and evaluate every exit on the test split. Re-running with the same --run-dir "
                    "resumes an interrupted run from its last checkpoint.",
    )
    train.add_argument("--run-dir", required=True, help="directory for everything the run writes")
    add_dataclass_options(train.add_argument_group("data"), DataConfig)
    add_dataclass_options(train.add_argument_group("model"), ModelConfig)
    add_dataclass_options(train.add_argument_group("stage 1"), Stage1Config)
    _common(train)

    memorize = verbs.add_parser(
        "memorize", formatter_class=_Formatter, help="memorized layers of a run's training set",
        description="Memorized layer m(x) of every training example under the run's stage-1 model "
                    "(METHOD.md section 4): JSON keyed by example id, a printed histogram and a PNG.",
    )
    memorize.add_argument("--run-dir", required=True, help="a run directory with a finished stage 1")
    memorize.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    _common(memorize)

    evaluate = verbs.add_parser(
        "evaluate", formatter_class=_Formatter, help="accuracy of every exit on a split",
        description="Accuracy of every exit of a run's stage-1 model on one split.",
    )
    evaluate.add_argument("--run-dir", required=True, help="a run directory with a finished stage 1")
    evaluate.add_argument("--split", default="test", choices=("train", "dev", "test"), help="which split")
    evaluate.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    _common(evaluate)

    demo = verbs.add_parser(
        "demo", formatter_class=_Formatter, help="the main job on the built-in model and data (make demo)",
        description="Stage 1 on rt-snippets with the built-in MiniLM, memorized layers and per-exit test "
                    "accuracy; prints where everything was written.",
    )
    demo.add_argument("--run-dir", default="runs/demo", help="output directory")
    demo.add_argument("--epochs", type=int, default=2, help="stage-1 epochs")
    demo.add_argument("--max-train-examples", type=int, default=None, help="train on a seeded subset")
    _common(demo)
    return parser


def _run(args: argparse.Namespace) -> int:
    from consistentee.training import run
    from consistentee.training.stage1 import Stage1Config

    if args.verb in ("train", "demo"):
        if args.verb == "train":
            data_cfg = dataclass_from_args(run.DataConfig, args)
            model_cfg = dataclass_from_args(run.ModelConfig, args)
            stage1_cfg = dataclass_from_args(Stage1Config, args)
        else:
            data_cfg = run.DataConfig(max_train_examples=args.max_train_examples)
            model_cfg = run.ModelConfig()
            stage1_cfg = Stage1Config(epochs=args.epochs)
        run.run_stage1(args.run_dir, data_cfg, model_cfg, stage1_cfg, device=args.device, progress=args.progress)
        run.run_memorize(args.run_dir, device=args.device, progress=args.progress)
        run.run_evaluate(args.run_dir, "test", device=args.device, progress=args.progress)
        print(f"run directory: {os.path.abspath(args.run_dir)} (model in stage1/model, histogram in "
              "memorized_layers.png, metrics in stage1/metrics.json and eval_test.json)")
    elif args.verb == "memorize":
        run.run_memorize(args.run_dir, device=args.device, batch_size=args.batch_size, progress=args.progress)
    elif args.verb == "evaluate":
        run.run_evaluate(args.run_dir, args.split, device=args.device, batch_size=args.batch_size,
                         progress=args.progress)
    return 0


def _user_error_types() -> tuple[type[BaseException], ...]:
    from consistentee.training.checkpoint import CheckpointError

    return (ValueError, FileNotFoundError, NotADirectoryError, KeyError, CheckpointError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parser.parse_known_args(argv)[0] if debug else None
        args = parser.parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:
        print("consistentee: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as exc:
        if debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"consistentee: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # anything else: still one line, traceback behind --debug
        if debug:
            raise
        print(f"consistentee: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(run again with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
