"""``consistentee`` command line: one verb per step of the pipeline.

    train     the whole pipeline: stage 1 -> memorized layers -> ConsistentEE stages 2/3 (one beta or a sweep)
    stage1    multi-exit fine-tuning only
    memorize  memorized layers of a run's training set
    policy    ConsistentEE stages 2/3 from a saved run directory (one beta or a sweep)
    evaluate  accuracy of every exit (and of the policy) on a split
    benchmark every exit rule side by side on one trained model: report.json, report.md, plots
    demo      the benchmark on the built-in MiniLM and rt-snippets (what `make demo` runs)
    calibrate choose and store an operating point (rule and knob) with a stated accuracy guarantee
    predict   batched early-exit predictions for a file or stdin (JSONL out)
    serve     an HTTP server with dynamic micro-batching
    generate  text generation with per-token early exit (decoder-only LMs)
    benchmark-lm  decoder exit rules side by side: perplexity, ROUGE, tokens/s
    train-lm  early exits of a decoder LM (stages 1-3), also under `accelerate launch`

Every verb that writes into a run directory skips what is already finished there and resumes what was
interrupted. Errors caused by the input (a missing file, an unknown column, an invalid option value, a model
directory of the wrong kind) print one line naming the problem and exit with status 2; ``--debug`` shows the
traceback.

Verbs live in :data:`VERBS`, the one table to extend: a verb's module is imported only when that verb runs
(or when its ``--help`` is asked for), so ``consistentee --help`` and option errors never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consistentee.cli.options import _Formatter, _one_line
from consistentee.cli.options import apply_config as _apply_config

EXIT_USAGE = 2


@dataclass(frozen=True)
class Verb:
    """One ``consistentee`` verb: where its parser and runner live, and its one-line help."""

    name: str
    module: str
    help: str
    add_parser: str = "add_parser"
    run: str = "run"

    def available(self) -> bool:
        """Whether the verb's module is installed (found without importing it)."""
        return importlib.util.find_spec(self.module) is not None

    def load(self) -> Any:
        return importlib.import_module(self.module)


_PIPELINE = "consistentee.cli.pipeline"

#: Every verb, in ``--help`` order. Add a verb here: a module with ``add_parser(verbs)`` and ``run(args)``.
VERBS: tuple[Verb, ...] = (
    Verb("train", _PIPELINE, "the whole pipeline: stage 1, memorized layers, ConsistentEE stages 2/3",
         "add_train_parser", "run_train"),
    Verb("stage1", _PIPELINE, "stage 1 only (multi-exit fine-tuning)", "add_stage1_parser", "run_stage1"),
    Verb("memorize", _PIPELINE, "memorized layers of a run's training set", "add_memorize_parser", "run_memorize"),
    Verb("policy", _PIPELINE, "ConsistentEE stages 2/3 from a saved run directory", "add_policy_parser",
         "run_policy"),
    Verb("evaluate", _PIPELINE, "accuracy of every exit (and of a policy) on a split", "add_evaluate_parser",
         "run_evaluate"),
    Verb("benchmark", "consistentee.cli.benchmark",
         "compare every exit rule on one trained model: report.json, report.md and plots"),
    Verb("demo", "consistentee.cli.benchmark", "the benchmark on rt-snippets with the built-in MiniLM (make demo)",
         "add_demo_parser", "run_demo"),
    Verb("calibrate", "consistentee.cli.calibrate",
         "choose and store an operating point (rule and knob) with an accuracy guarantee"),
    Verb("predict", "consistentee.cli.predict", "label texts with early exit (JSON lines out)"),
    Verb("serve", "consistentee.cli.serve", "HTTP server for early-exit prediction"),
    Verb("generate", "consistentee.cli.generate", "generate text with token-level early exit"),
    Verb("benchmark-lm", "consistentee.cli.benchmark_lm", "decoder exit rules side by side: perplexity, ROUGE, tokens/s"),
    Verb("train-lm", "consistentee.cli.train_lm", "early exits of a decoder LM (stages 1-3)"),
)


def verb_table() -> dict[str, Verb]:
    """The installed verbs by name."""
    return {verb.name: verb for verb in VERBS if verb.available()}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``consistentee VERB: error: ...``) and exit status 2, like every other input error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings caused by the input, one line each, without the source line Python would show."""
    text = " ".join(str(message).split())
    print(f"consistentee: warning: {text}", file=sys.stderr if file is None else file)


def version() -> str:
    """``consistentee.__version__`` when the package defines it, else the installed distribution's version."""
    import consistentee

    found = getattr(consistentee, "__version__", None)
    if found:
        return str(found)
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("consistentee")
    except PackageNotFoundError:
        return "unknown"


def _chosen_verb(argv: Sequence[str], verbs: dict[str, Verb]) -> str | None:
    """The verb of a command line: its first word that is not an option."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in verbs else None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``consistentee`` parser. With ``argv``, only the verb it names gets its full options (the others are
    listed with their help line): building a verb's options imports its module. Without, every verb is built."""
    verbs_by_name = verb_table()
    chosen = None if argv is None else _chosen_verb(argv, verbs_by_name)
    parser = _Parser(
        prog="consistentee",
        description="Early-exit inference for transformer classifiers: ConsistentEE and its peers.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"consistentee {version()}")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    subparsers.required = True
    for name, verb in verbs_by_name.items():
        if argv is None or name == chosen:
            getattr(verb.load(), verb.add_parser)(subparsers)
        else:
            subparsers.add_parser(name, help=verb.help)
    return parser


def _run(args: argparse.Namespace) -> int:
    verb = verb_table()[args.verb]
    return getattr(verb.load(), verb.run)(args)


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by the input. CheckpointError counts when its module was loaded (importing it needs torch)."""
    from consistentee.utils.io import OutputError

    types: list[type[BaseException]] = [ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                        KeyError, OutputError]
    checkpoint = sys.modules.get("consistentee.training.checkpoint")
    if checkpoint is not None:
        types.append(checkpoint.CheckpointError)
    return tuple(types)


def _hide_library_progress_bars() -> None:
    """The libraries' bars too ("Loading weights"): stderr stays clean. Without importing transformers now."""
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        transformers_logging.disable_progress_bar()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with warnings.catch_warnings():
            from consistentee.data.errors import DataWarning

            warnings.simplefilter("always", DataWarning)
            if not debug:
                warnings.showwarning = _show_warning
            parser = build_parser(argv)
            _apply_config(parser, argv)
            args = parser.parse_args(argv)
            if not getattr(args, "progress", True):
                _hide_library_progress_bars()
            return _run(args)
    except KeyboardInterrupt:
        print("consistentee: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `consistentee predict ... | head`: the reader left; not an error worth a message
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
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
