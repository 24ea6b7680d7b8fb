"""``consistentee train-lm``: train the exits of a decoder LM (stages 1-3 on WikiText-2) into RUN_DIR/exits.

The backbone stays frozen; exit heads and per-token policies are trained (stage 1: heads, memorized layers,
stage 2: policies, stage 3: heads at the policies' exits), each stage saved when done and skipped when re-run.
Runs under ``accelerate launch`` too (e.g. ``--config_file examples/accelerate/ddp_cpu.yaml --num_processes 2
-m consistentee.cli.main train-lm --device cpu ...``): --batch-size is per process, and N processes with batch b
train like one process with batch N*b. Use the exits with ``generate --exits-dir`` or ``benchmark-lm --exits-dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from consistentee.cli.options import Section, common_options, section_verb
from consistentee.generation.training import LMTrainConfig
from consistentee.pipeline.benchmark_lm import BenchmarkLMConfig

#: The options of ``benchmark-lm`` that choose the model and its exits (shared, so the two verbs agree).
MODEL_OPTIONS = ("model", "exit_every", "adapter_rank")
#: The configurations of the decoder verbs: ``benchmark-lm`` has both, ``train-lm`` the model options and training.
BENCH = Section("bench", BenchmarkLMConfig, "benchmark")
TRAIN = Section("train", LMTrainConfig, "training")


def lm_verb(verbs, name: str, help_text: str, doc: str | None, sections: list[Section], run_dir_help: str):
    """A decoder verb: the options of ``sections``, a field both configurations have namespaced alike in both
    verbs (``--train.seed``; ``--seed`` sets every seed)."""
    parser, _ = section_verb(verbs, name, help_text, doc.split("\n\n", 1)[1].strip() if doc else None, sections,
                             run_dir_help=run_dir_help, family=(BenchmarkLMConfig, LMTrainConfig))
    common_options(parser)
    return parser


def add_parser(verbs) -> argparse.ArgumentParser:
    skip = tuple(f.name for f in BENCH.fields() if f.name not in MODEL_OPTIONS)
    model = Section(BENCH.name, BenchmarkLMConfig, "model", skip=skip)
    return lm_verb(verbs, "train-lm", "train early exits of a decoder LM (stages 1-3)", __doc__, [model, TRAIN],
                   "directory for the trained exits (RUN_DIR/exits)")


def run(args: argparse.Namespace) -> int:
    from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
    from consistentee.generation.loading import load_causal_lm
    from consistentee.generation.training import lm_accelerator, train_exits
    from consistentee.utils.runtime import resolve_device, set_seed

    cfg = TRAIN.from_args(args)
    if args.exit_every < 1:
        raise ValueError(f"--exit-every must be >= 1, got {args.exit_every}")
    accelerator = lm_accelerator(resolve_device(args.device))
    set_seed(cfg.seed)  # the same initial exits on every process
    with accelerator.main_process_first():  # a built-in model is converted into the cache once
        base, tokenizer = load_causal_lm(args.model, accelerator.device)
    layers = base.config.num_hidden_layers
    exits = ExitsConfig(exit_layers=list(range(args.exit_every, layers + 1, args.exit_every)),
                        adapter_rank=args.adapter_rank)
    model = EarlyExitLM(base, exits)
    out = train_exits(model, tokenizer, Path(args.run_dir) / "exits", cfg, args.progress, accelerator=accelerator)
    if accelerator.is_main_process:
        print(f"trained exits: {out}")
    return 0
