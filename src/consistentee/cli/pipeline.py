"""The training verbs of ``consistentee``: train, stage1, memorize, policy, evaluate.

Each ``add_*_parser(verbs)`` adds one verb; ``run_*(args)`` runs it. They import the training code only when
called, so ``consistentee --help`` and the other verbs never pay for it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from consistentee.cli.options import add_dataclass_options, dataclass_from_args


def _main():
    from consistentee.cli import main  # main imports this module lazily

    return main


def _betas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--betas takes comma-separated numbers, got {text!r}") from None
    if not values or any(not v >= 0 or v == float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"--betas needs one or more values >= 0 (finite), got {text!r}")
    return values


def _policy_options(parser: argparse.ArgumentParser) -> None:
    from consistentee.training.policy import PolicyConfig

    group = parser.add_argument_group("ConsistentEE policy (stages 2 and 3)")
    add_dataclass_options(group, PolicyConfig)
    group.add_argument("--betas", type=_betas, default=None, metavar="B1,B2,...",
                       help="train one policy per beta (a sweep) instead of the single --beta")


def _training_parser(verbs, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    from consistentee.training.run import DataConfig, ModelConfig
    from consistentee.training.stage1 import Stage1Config

    main = _main()
    parser = verbs.add_parser(name, formatter_class=main._Formatter, help=help_text, description=description)
    parser.add_argument("--run-dir", required=True, help="directory for everything the run writes")
    main._config_option(parser)
    add_dataclass_options(parser.add_argument_group("data"), DataConfig)
    add_dataclass_options(parser.add_argument_group("model"), ModelConfig)
    add_dataclass_options(parser.add_argument_group("stage 1"), Stage1Config)
    main.common_options(parser)
    return parser


def add_train_parser(verbs) -> argparse.ArgumentParser:
    parser = _training_parser(
        verbs, "train", "the whole pipeline: stage 1, memorized layers, ConsistentEE stages 2/3",
        "Stage 1 (multi-exit fine-tuning), the memorized layer of every training example, then "
        "ConsistentEE policy learning (stages 2/3) for one beta or a sweep, and the test accuracy "
        "of every exit. Re-running with the same --run-dir skips finished stages and resumes an "
        "interrupted one from its last checkpoint; changed data or model settings are refused.",
    )
    _policy_options(parser)
    return parser


def add_stage1_parser(verbs) -> argparse.ArgumentParser:
    return _training_parser(
        verbs, "stage1", "stage 1 only (multi-exit fine-tuning)",
        "Multi-exit fine-tuning (docs/method.md section 5) into RUN_DIR/stage1; resumes when interrupted. "
        "A run directory trained with other data or model settings is refused.",
    )


def add_memorize_parser(verbs) -> argparse.ArgumentParser:
    main = _main()
    parser = verbs.add_parser(
        "memorize", formatter_class=main._Formatter, help="memorized layers of a run's training set",
        description="Memorized layer m(x) of every training example under the run's stage-1 model "
                    "(docs/method.md section 4): JSON keyed by example id, a printed histogram and a PNG.",
    )
    parser.add_argument("--run-dir", required=True, help="a run directory with a finished stage 1")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    main.common_options(parser)
    return parser


def add_policy_parser(verbs) -> argparse.ArgumentParser:
    main = _main()
    parser = verbs.add_parser(
        "policy", formatter_class=main._Formatter, help="ConsistentEE stages 2/3 from a saved run directory",
        description="Policy learning (stage 2) and consistent joint training (stage 3), alternating for "
                    "--rounds, from the run's stage-1 model and memorized layers. Each beta is saved to "
                    "RUN_DIR/policies/beta-<beta>/model.",
    )
    parser.add_argument("--run-dir", required=True, help="a run directory with stage 1 and memorized layers")
    main._config_option(parser)
    _policy_options(parser)
    main.common_options(parser)
    return parser


def add_evaluate_parser(verbs) -> argparse.ArgumentParser:
    main = _main()
    parser = verbs.add_parser(
        "evaluate", formatter_class=main._Formatter, help="accuracy of every exit (and of a policy) on a split",
        description="Accuracy of every exit of a run's stage-1 model on one split; with --beta, also the "
                    "accuracy and mean exit layer of that ConsistentEE policy at --threshold.",
    )
    parser.add_argument("--run-dir", required=True, help="a run directory with a finished stage 1")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"), help="which split")
    parser.add_argument("--beta", type=float, default=None, help="also evaluate the policy trained with this beta")
    parser.add_argument("--threshold", type=float, default=0.5, help="exit when the policy's p_l > threshold")
    parser.add_argument("--batch-size", type=int, default=128, help="evaluation batch size")
    main.common_options(parser)
    return parser


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


def _run_stage1(args: argparse.Namespace, *, train: bool) -> int:
    from consistentee.training import run
    from consistentee.training.stage1 import Stage1Config

    data_cfg = dataclass_from_args(run.DataConfig, args)
    model_cfg = dataclass_from_args(run.ModelConfig, args)
    stage1_cfg = dataclass_from_args(Stage1Config, args)
    if train:
        _policy_cfg(args)  # validate every option before hours of training
    run.run_stage1(args.run_dir, data_cfg, model_cfg, stage1_cfg, device=args.device, progress=args.progress)
    if train:
        if not (Path(args.run_dir) / "memorized_layers.json").is_file():
            run.run_memorize(args.run_dir, device=args.device, progress=args.progress)
        run.run_evaluate(args.run_dir, "test", device=args.device, progress=args.progress)
        _run_policies(args)
    print(f"run directory: {os.path.abspath(args.run_dir)}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    return _run_stage1(args, train=True)


def run_stage1(args: argparse.Namespace) -> int:
    return _run_stage1(args, train=False)


def run_memorize(args: argparse.Namespace) -> int:
    from consistentee.training import run

    run.run_memorize(args.run_dir, device=args.device, batch_size=args.batch_size, progress=args.progress)
    return 0


def run_policy(args: argparse.Namespace) -> int:
    _run_policies(args)
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from consistentee.training.policy import policy_model_dir

    if not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold must be in [0, 1], got {args.threshold}")
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
        result = evaluate_policy(model, data, args.split, args.threshold, batch_size=args.batch_size)
        print(f"ConsistentEE beta {args.beta:g} threshold {args.threshold:g} on {args.split}: accuracy "
              f"{100 * result['accuracy']:.2f}% at mean exit layer {result['mean_exit_layer']:.2f} "
              f"({result['layer_speedup']:.2f}x layer speed-up)")
    return 0
