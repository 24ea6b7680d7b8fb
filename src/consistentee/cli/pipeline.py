"""The training verbs of ``consistentee``: train, stage1, memorize, policy, evaluate.

Each ``add_*_parser(verbs)`` adds one verb; ``run_*(args)`` runs it. They import the training code only when
called, so ``consistentee --help`` and the other verbs never pay for it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from consistentee.cli.options import Section, _Formatter, common_options, deprecated_alias, section_verb


def training_sections() -> dict[str, Section]:
    """The configurations of the encoder pipeline by namespace (the field names of
    :class:`~consistentee.pipeline.benchmark.BenchmarkSettings`, the sections of a config file): ``train`` has
    all four, ``stage1`` the first three, ``policy`` the last; ``benchmark`` adds its own."""
    from consistentee.training.policy import PolicyConfig
    from consistentee.training.run import DataConfig, ModelConfig
    from consistentee.training.stage1 import Stage1Config

    return {"data": Section("data", DataConfig, "data"), "model": Section("model", ModelConfig, "model"),
            "stage1": Section("stage1", Stage1Config, "stage 1"),
            "policy": Section("policy", PolicyConfig, "ConsistentEE policy (stages 2 and 3)")}


def _betas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--betas takes comma-separated numbers, got {text!r}") from None
    if not values or any(not v >= 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"--betas needs one or more values >= 0 (finite), got {text!r}")
    return values


def training_parser(verbs, name: str, help_text: str, description: str, sections: Sequence[Section],
                    run_dir_help: str = "directory for everything the run writes"):
    """(parser, option groups by section name) of a training verb. A field that two configurations of the
    pipeline share is namespaced in every training verb alike (``--stage1.seed`` in ``stage1`` too), so a flag
    means the same in ``train``, ``stage1``, ``policy`` and ``benchmark``."""
    return section_verb(verbs, name, help_text, description, sections, run_dir_help=run_dir_help,
                        family=[s.cls for s in training_sections().values()])


def _training_parser(verbs, name: str, help_text: str, description: str, sections: tuple[str, ...],
                     run_dir_help: str = "directory for everything the run writes") -> argparse.ArgumentParser:
    known = training_sections()
    parser, groups = training_parser(verbs, name, help_text, description, [known[n] for n in sections],
                                     run_dir_help)
    if "policy" in groups:
        groups["policy"].add_argument("--betas", type=_betas, default=None, metavar="B1,B2,...",
                                      help="train one policy per beta (a sweep) instead of the single --beta")
    common_options(parser)
    return parser


def add_train_parser(verbs) -> argparse.ArgumentParser:
    return _training_parser(
        verbs, "train", "the whole pipeline: stage 1, memorized layers, ConsistentEE stages 2/3",
        "Stage 1 (multi-exit fine-tuning), the memorized layer of every training example, then "
        "ConsistentEE policy learning (stages 2/3) for one beta or a sweep, and the test accuracy "
        "of every exit. Re-running with the same --run-dir skips finished stages and resumes an "
        "interrupted one from its last checkpoint; changed data or model settings are refused.",
        ("data", "model", "stage1", "policy"),
    )


def add_stage1_parser(verbs) -> argparse.ArgumentParser:
    return _training_parser(
        verbs, "stage1", "stage 1 only (multi-exit fine-tuning)",
        "Multi-exit fine-tuning (docs/method.md section 5) into RUN_DIR/stage1; resumes when interrupted. "
        "A run directory trained with other data or model settings is refused.",
        ("data", "model", "stage1"),
    )


def add_memorize_parser(verbs) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "memorize", formatter_class=_Formatter, help="memorized layers of a run's training set",
        description="Memorized layer m(x) of every training example under the run's stage-1 model "
                    "(docs/method.md section 4): JSON keyed by example id, a printed histogram and a PNG.",
    )
    parser.add_argument("--run-dir", required=True, help="a run directory with a finished stage 1")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    common_options(parser)
    return parser


def add_policy_parser(verbs) -> argparse.ArgumentParser:
    return _training_parser(
        verbs, "policy", "ConsistentEE stages 2/3 from a saved run directory",
        "Policy learning (stage 2) and consistent joint training (stage 3), alternating for --rounds, from the "
        "run's stage-1 model and memorized layers. Each beta is saved to RUN_DIR/policies/beta-<beta>/model.",
        ("policy",), run_dir_help="a run directory with stage 1 and memorized layers",
    )


def add_evaluate_parser(verbs) -> argparse.ArgumentParser:
    parser = verbs.add_parser(
        "evaluate", formatter_class=_Formatter, help="accuracy of every exit (and of a policy) on a split",
        description="Accuracy of every exit of a run's stage-1 model on one split; with --beta, also the "
                    "accuracy and mean exit layer of that ConsistentEE policy at --knob.",
    )
    parser.add_argument("--run-dir", required=True, help="a run directory with a finished stage 1")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"), help="which split")
    parser.add_argument("--beta", type=float, default=None, help="also evaluate the policy trained with this beta")
    parser.add_argument("--knob", type=float, default=0.5,
                        help="the policy's knob: exit at the first layer whose exit probability p_l > knob")
    deprecated_alias(parser, "--threshold", "--knob", dest="knob", type=float)
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    common_options(parser)
    return parser


def _config(args: argparse.Namespace, section: str):
    """The configuration of ``section`` (a name of :func:`training_sections`) that ``args`` describe."""
    return training_sections()[section].from_args(args)


def _run_policies(args: argparse.Namespace) -> None:
    from consistentee.training.policy import run_beta_sweep

    cfg = _config(args, "policy")
    betas = args.betas or [cfg.beta]
    dirs = run_beta_sweep(args.run_dir, betas, cfg, device=args.device, progress=args.progress)
    for beta, path in dirs.items():
        print(f"beta {beta:g}: {path}")


def _run_stage1(args: argparse.Namespace, *, train: bool) -> int:
    from consistentee.training import run

    data_cfg, model_cfg, stage1_cfg = (_config(args, name) for name in ("data", "model", "stage1"))
    if train:
        _config(args, "policy")  # validate every option before hours of training
    run.run_stage1(args.run_dir, data_cfg, model_cfg, stage1_cfg, device=args.device, progress=args.progress)
    if train:
        if not (Path(args.run_dir) / "memorized_layers.json").is_file():
            from consistentee.pipeline.memorize import run_memorize

            run_memorize(args.run_dir, device=args.device, progress=args.progress)
        run.run_evaluate(args.run_dir, "test", device=args.device, progress=args.progress)
        _run_policies(args)
    print(f"run directory: {os.path.abspath(args.run_dir)}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    return _run_stage1(args, train=True)


def run_stage1(args: argparse.Namespace) -> int:
    return _run_stage1(args, train=False)


def run_memorize(args: argparse.Namespace) -> int:
    from consistentee.pipeline import memorize

    memorize.run_memorize(args.run_dir, device=args.device, batch_size=args.batch_size, progress=args.progress)
    return 0


def run_policy(args: argparse.Namespace) -> int:
    _run_policies(args)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from consistentee.training.policy import policy_model_dir

    if not 0 <= args.knob <= 1:
        raise ValueError(f"--knob must be in [0, 1], got {args.knob}")
    if args.beta is not None and not (policy_dir := policy_model_dir(args.run_dir, args.beta)).is_dir():
        raise FileNotFoundError(f"{policy_dir} does not exist: no policy was trained with beta {args.beta:g}")
    from consistentee.training import run

    run.run_evaluate(args.run_dir, args.split, device=args.device, batch_size=args.batch_size,
                     progress=args.progress)
    if args.beta is not None:
        from consistentee.model.modeling import EarlyExitForSequenceClassification
        from consistentee.training.policy import evaluate_policy

        model = EarlyExitForSequenceClassification.from_pretrained(policy_model_dir(args.run_dir, args.beta))
        _, data = run.load_run_model(args.run_dir, device="cpu")
        result = evaluate_policy(model, data, args.split, args.knob, batch_size=args.batch_size)
        print(f"ConsistentEE beta {args.beta:g} knob {args.knob:g} on {args.split}: accuracy "
              f"{100 * result['accuracy']:.2f}% at mean exit layer {result['mean_exit_layer']:.2f} "
              f"({result['layer_speedup']:.2f}x layer speed-up)")
    return 0
