"""``consistentee generate``: text generation with token-level early exit.

Prompts come from the command line (one or more), or from ``--input`` (one prompt per line; '-' reads stdin).
A single prompt streams to stdout as it is generated; several prompts are generated as one batch (per-row
exits) and printed in order, or as JSON lines with ``--json`` (text, tokens, mean exit layer). Every rule but
``full`` needs trained exits: ``--exits-dir``, else those shipped with the built-in model (checked by sha256).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from consistentee.cli.options import _Formatter, add_dataclass_options, common_options, dataclass_from_args
from consistentee.generation.generate import GenerationConfig


def add_parser(verbs) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "generate", formatter_class=_Formatter, help="generate text with token-level early exit",
        description=__doc__.split("\n\n", 1)[1].strip() if __doc__ else None,
    )
    parser.add_argument("prompts", nargs="*", help="prompt(s); omitted: read --input")
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, local directory or hub id")
    parser.add_argument("--exits-dir", default=None,
                        help="trained exit heads and policies (e.g. RUN_DIR/exits/stage3); every rule except "
                             "'full' needs them; default: the exits bundled with the built-in model, if any")
    parser.add_argument("--input", default=None, help="file with one prompt per line ('-': stdin)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--json", action="store_true", help="JSON lines out (no streaming)")
    add_dataclass_options(parser.add_argument_group("generation"), GenerationConfig)
    common_options(parser)
    return parser


def _prompts(args) -> list[str]:
    if args.prompts:
        return list(args.prompts)
    if args.input is None:
        raise ValueError("give a prompt or --input FILE")
    text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{args.input}: no prompts")
    return prompts


def _bundled_exits(model: str, rule: str) -> Path:
    """The exits shipped with the built-in ``model``, checked; a clear error when there are none."""
    from consistentee.generation.bundled import bundled_exits_dir, describe_training, verify_bundle

    found = bundled_exits_dir(model)
    if found is None:
        raise ValueError(f"rule {rule!r} needs trained exits: pass --exits-dir (or use --rule full); no exits are "
                         f"bundled for model {model!r}")
    meta = verify_bundle(found)
    print(f"consistentee: using the bundled exits for {model} (trained with {describe_training(meta)})",
          file=sys.stderr)
    return found


def run(args: argparse.Namespace) -> int:
    from consistentee.generation.decoder import EarlyExitLM
    from consistentee.generation.generate import generate
    from consistentee.generation.loading import load_causal_lm
    from consistentee.utils.runtime import resolve_device

    cfg = dataclass_from_args(GenerationConfig, args)
    prompts = _prompts(args)
    exits_dir = args.exits_dir
    if cfg.rule != "full" and exits_dir is None:
        exits_dir = _bundled_exits(args.model, cfg.rule)
    base, tok = load_causal_lm(args.model, resolve_device(args.device))
    model = EarlyExitLM.load_exits(exits_dir, base, merge=True) if exits_dir else EarlyExitLM(base)
    stream = len(prompts) == 1 and not args.json

    def on_text(row: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(model, tok, prompts, cfg, stop=args.stop, on_text=on_text if stream else None)
    if stream:
        sys.stdout.write("\n")
    elif args.json:
        for text, ids, exits in zip(result.texts, result.token_ids, result.exit_layers, strict=True):
            mean = sum(exits) / len(exits) if exits else None
            print(json.dumps({"text": text, "tokens": len(ids), "mean_exit_layer": mean}))
    else:
        for text in result.texts:
            print(text)
    if args.debug:
        n = sum(len(x) for x in result.token_ids)
        print(f"{n} tokens in {result.seconds:.2f} s", file=sys.stderr)
    return 0
