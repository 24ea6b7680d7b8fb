"""``consistentee`` command line: one verb per step of the pipeline.

    train     the whole pipeline: stage 1 -> memorized layers -> ConsistentEE stages 2/3 (one beta or a sweep)
    stage1    multi-exit fine-tuning only
    memorize  memorized layers of a run's training set
    policy    ConsistentEE stages 2/3 from a saved run directory (one beta or a sweep)
    evaluate  accuracy of every exit (and of the policy) on a split
    benchmark every exit rule side by side on one trained model: report.json, report.md, plots
    demo      the benchmark on the built-in MiniLM and rt-snippets (what `make demo` runs)
    predict   batched early-exit predictions for a file or stdin (JSONL out)
    serve     an HTTP server with dynamic micro-batching
    generate  text generation with per-token early exit (decoder-only LMs)
    benchmark-lm  decoder exit rules side by side: perplexity, ROUGE, tokens/s
    train-lm  early exits of a decoder LM (stages 1-3), also under `accelerate launch`

Every verb that writes into a run directory skips what is already finished there and resumes what was
interrupted. Errors caused by the input (a missing file, an unknown column, an invalid option value, a model
directory of the wrong kind) print one line naming the problem and exit with status 2; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path

from consistentee.cli.options import add_dataclass_options, dataclass_from_args
from consistentee.utils.runtime import DEVICE_CHOICES

EXIT_USAGE = 2


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``consistentee VERB: error: ...``) and exit status 2, like every other input error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings caused by the input, one line each, without the source line Python would show."""
    text = " ".join(str(message).split())
    print(f"consistentee: warning: {text}", file=sys.stderr if file is None else file)


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where to run: auto picks CUDA when available, else the CPU")
    # "%(default).0s" prints nothing and keeps the formatter from adding a confusing "(default: True)".
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars (shown by default)%(default).0s")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _betas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--betas takes comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"--betas needs one or more values >= 0, got {text!r}")
    return values


def _policy_options(parser: argparse.ArgumentParser) -> None:
    from consistentee.training.policy import PolicyConfig

    group = parser.add_argument_group("ConsistentEE policy (stages 2 and 3)")
    add_dataclass_options(group, PolicyConfig)
    group.add_argument("--betas", type=_betas, default=None, metavar="B1,B2,...",
                       help="train one policy per beta (a sweep) instead of the single --beta")


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML or JSON file with option values (sections or flat keys, named like the "
                             "options with underscores); flags given on the command line win")


def build_parser() -> argparse.ArgumentParser:
    from consistentee.cli import benchmark, benchmark_lm, generate, predict, serve, train_lm
    from consistentee.training.run import DataConfig, ModelConfig
    from consistentee.training.stage1 import Stage1Config

    parser = _Parser(
        prog="consistentee",
        description="Early-exit inference for transformer classifiers: ConsistentEE and its peers.",
        formatter_class=_Formatter,
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True

    train = verbs.add_parser(
        "train", formatter_class=_Formatter,
        help="the whole pipeline: stage 1, memorized layers, ConsistentEE stages 2/3",
        description="Stage 1 (multi-exit fine-tuning), the memorized layer of every training example, then "
                    "ConsistentEE policy learning (stages 2/3) for one beta or a sweep, and the test accuracy "
                    "of every exit. Re-running with the same --run-dir skips finished stages and resumes an "
                    "interrupted one from its last checkpoint.",
    )
    stage1 = verbs.add_parser(
        "stage1", formatter_class=_Formatter, help="stage 1 only (multi-exit fine-tuning)",
        description="Multi-exit fine-tuning (METHOD.md section 5.1) into RUN_DIR/stage1; resumes when interrupted.",
    )
    for p in (train, stage1):
        p.add_argument("--run-dir", required=True, help="directory for everything the run writes")
        _config_option(p)
        add_dataclass_options(p.add_argument_group("data"), DataConfig)
        add_dataclass_options(p.add_argument_group("model"), ModelConfig)
        add_dataclass_options(p.add_argument_group("stage 1"), Stage1Config)
        common_options(p)
    _policy_options(train)

    memorize = verbs.add_parser(
        "memorize", formatter_class=_Formatter, help="memorized layers of a run's training set",
        description="Memorized layer m(x) of every training example under the run's stage-1 model "
                    "(METHOD.md section 4): JSON keyed by example id, a printed histogram and a PNG.",
    )
    memorize.add_argument("--run-dir", required=True, help="a run directory with a finished stage 1")
    memorize.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    common_options(memorize)

    policy = verbs.add_parser(
        "policy", formatter_class=_Formatter, help="ConsistentEE stages 2/3 from a saved run directory",
        description="Policy learning (stage 2) and consistent joint training (stage 3), alternating for "
                    "--rounds, from the run's stage-1 model and memorized layers. Each beta is saved to "
                    "RUN_DIR/policies/beta-<beta>/model.",
    )
    policy.add_argument("--run-dir", required=True, help="a run directory with stage 1 and memorized layers")
    _config_option(policy)
    _policy_options(policy)
    common_options(policy)

    evaluate = verbs.add_parser(
        "evaluate", formatter_class=_Formatter, help="accuracy of every exit (and of a policy) on a split",
        description="Accuracy of every exit of a run's stage-1 model on one split; with --beta, also the "
                    "accuracy and mean exit layer of that ConsistentEE policy at --threshold.",
    )
    evaluate.add_argument("--run-dir", required=True, help="a run directory with a finished stage 1")
    evaluate.add_argument("--split", default="test", choices=("train", "dev", "test"), help="which split")
    evaluate.add_argument("--beta", type=float, default=None, help="also evaluate the policy trained with this beta")
    evaluate.add_argument("--threshold", type=float, default=0.5, help="exit when the policy's p_l > threshold")
    evaluate.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    common_options(evaluate)

    benchmark.add_parser(verbs)
    benchmark.add_demo_parser(verbs)
    predict.add_parser(verbs)
    serve.add_parser(verbs)
    generate.add_parser(verbs)
    benchmark_lm.add_parser(verbs)
    train_lm.add_parser(verbs)
    return parser


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Values from --config become the defaults of the chosen verb's options."""
    if "--config" not in argv:
        return
    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise ValueError("--config needs a file name")
    path = Path(argv[index + 1])
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}") from None
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    flat = {k.replace("-", "_"): v for k, v in flat.items()}
    verb_parser = _subparser(parser, argv)
    known = {a.dest for a in verb_parser._actions}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown option(s): {', '.join(unknown)}")
    verb_parser.set_defaults(**flat)


def _subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in argv:
                if word in action.choices:
                    return action.choices[word]
    raise ValueError("--config needs a verb (e.g. `consistentee train --config run.toml`)")


def _policy_cfg(args: argparse.Namespace):
    from consistentee.training.policy import PolicyConfig

    return dataclass_from_args(PolicyConfig, args)


def _run_policies(args: argparse.Namespace) -> None:
    from consistentee.training.policy import run_beta_sweep

    cfg = _policy_cfg(args)
    betas = args.betas or [cfg.beta]
    dirs = run_beta_sweep(args.run_dir, betas, cfg, device=args.device, progress=args.progress)
    for beta, path in dirs.items():
        print(f"beta {beta:g}: {path}")


def _policy_dir(args: argparse.Namespace) -> Path:
    from consistentee.training.policy import policy_model_dir

    return policy_model_dir(args.run_dir, args.beta)


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an error message (library messages can span many lines)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    return next((line.strip() for line in str(message).splitlines() if line.strip()), type(exc).__name__)


def _run(args: argparse.Namespace) -> int:
    from consistentee.cli import benchmark, benchmark_lm, generate, predict, serve, train_lm
    from consistentee.training import run
    from consistentee.training.stage1 import Stage1Config

    if args.verb in ("train", "stage1"):
        data_cfg = dataclass_from_args(run.DataConfig, args)
        model_cfg = dataclass_from_args(run.ModelConfig, args)
        stage1_cfg = dataclass_from_args(Stage1Config, args)
        if args.verb == "train":
            _policy_cfg(args)  # validate every option before hours of training
        run.run_stage1(args.run_dir, data_cfg, model_cfg, stage1_cfg, device=args.device, progress=args.progress)
        if args.verb == "train":
            if not (Path(args.run_dir) / "memorized_layers.json").is_file():
                run.run_memorize(args.run_dir, device=args.device, progress=args.progress)
            run.run_evaluate(args.run_dir, "test", device=args.device, progress=args.progress)
            _run_policies(args)
        print(f"run directory: {os.path.abspath(args.run_dir)}")
    elif args.verb == "memorize":
        run.run_memorize(args.run_dir, device=args.device, batch_size=args.batch_size, progress=args.progress)
    elif args.verb == "policy":
        _run_policies(args)
    elif args.verb == "evaluate":
        if not 0 <= args.threshold <= 1:
            raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
        if args.beta is not None and not (policy_dir := _policy_dir(args)).is_dir():
            raise FileNotFoundError(f"{policy_dir} does not exist: no policy was trained with beta {args.beta:g}")
        run.run_evaluate(args.run_dir, args.split, device=args.device, batch_size=args.batch_size,
                         progress=args.progress)
        if args.beta is not None:
            from consistentee.model.modeling import EarlyExitForSequenceClassification
            from consistentee.training.policy import evaluate_policy, policy_model_dir

            model_dir = policy_model_dir(args.run_dir, args.beta)
            model = EarlyExitForSequenceClassification.from_pretrained(model_dir)
            _, data = run.load_run_model(args.run_dir, device="cpu")
            result = evaluate_policy(model, data, args.split, args.threshold, batch_size=args.batch_size)
            print(f"ConsistentEE beta {args.beta:g} threshold {args.threshold:g} on {args.split}: accuracy "
                  f"{100 * result['accuracy']:.2f}% at mean exit layer {result['mean_exit_layer']:.2f} "
                  f"({result['layer_speedup']:.2f}x layer speed-up)")
    else:  # verbs whose module owns its whole run
        runners = {"benchmark": benchmark.run, "demo": benchmark.run_demo, "predict": predict.run,
                   "serve": serve.run, "generate": generate.run, "benchmark-lm": benchmark_lm.run,
                   "train-lm": train_lm.run}
        return runners[args.verb](args)
    return 0


def _user_error_types() -> tuple[type[BaseException], ...]:
    from consistentee.training.checkpoint import CheckpointError

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError, CheckpointError)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with warnings.catch_warnings():
            from consistentee.data.errors import DataWarning

            warnings.simplefilter("always", DataWarning)
            if not debug:
                warnings.showwarning = _show_warning
            if "--no-progress" in argv:  # also the libraries' bars (e.g. "Loading weights"): stderr stays clean
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            parser = build_parser()
            _apply_config(parser, argv)
            args = parser.parse_args(argv)
            return _run(args)
    except KeyboardInterrupt:
        print("consistentee: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as exc:
        if debug:
            raise
        print(f"consistentee: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # anything else: still one line, traceback behind --debug
        if debug:
            raise
        print(f"consistentee: error: {type(exc).__name__}: {_one_line(exc)} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
