"""Options generated from the configuration dataclasses: what ``--help`` shows and what only ``--help-all`` does,
namespaced options for a field two configurations share, the ``--seed`` shorthand, old spellings kept for one
release, and config files (YAML, TOML, JSON) that set advanced and namespaced options."""

from __future__ import annotations

import json

import pytest

from consistentee.cli import benchmark, options
from consistentee.cli import main as cli_main
from consistentee.cli.main import build_parser, main
from consistentee.cli.pipeline import training_sections

TRAINING_VERBS = ["train", "stage1", "policy", "benchmark", "train-lm", "benchmark-lm"]
MAX_OPTIONS = 40


def _help(verb: str, flag: str, capsys) -> list[str]:
    """The options (first flag of each line that starts with ``  --``) that ``consistentee VERB FLAG`` lists."""
    with pytest.raises(SystemExit) as exc:
        main([verb, flag])
    assert exc.value.code == 0
    return [line.split()[0].rstrip(",") for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]


def _parse(argv: list[str]):
    """``argv`` parsed the way ``consistentee`` does, config file included."""
    parser = build_parser(argv)
    options.apply_config(parser, argv)
    return parser.parse_args(argv)


def _settings(*extra: str):
    return benchmark.settings_from_args(_parse(["benchmark", "--run-dir", "r", *extra]))


@pytest.mark.parametrize("verb", TRAINING_VERBS)
def test_help_lists_at_most_40_options_and_help_all_lists_the_advanced_ones_too(verb, capsys):
    short, full = _help(verb, "--help", capsys), _help(verb, "--help-all", capsys)
    assert len(short) <= MAX_OPTIONS, short
    assert set(short) < set(full) and "--help-all" in short


def test_ablation_switches_are_hidden_from_help_but_listed_by_help_all(capsys):
    short, full = _help("benchmark", "--help", capsys), _help("benchmark", "--help-all", capsys)
    hidden = {"--reward-quality", "--advantage-norm", "--epsilon-start", "--learned-epochs", "--learned-seed",
              "--wall-batch-size", "--wall-autocast", "--stage1.seed", "--policy.seed", "--stage1.max-grad-norm",
              "--policy.mixed-precision", "--recipe"}
    assert hidden <= set(full) and not hidden & set(short)
    assert {"--epochs", "--betas", "--policy-holdout", "--rollouts", "--policy-epochs", "--seed"} <= set(short)
    # an old spelling works (see below) but no help lists it
    assert "--max-grad-norm" not in full and "--mixed-precision" not in full


def test_namespaced_options_reach_their_own_section():
    s = _settings("--stage1.seed", "3", "--policy.max-grad-norm", "0.5", "--stage1.checkpoint-every", "7",
                  "--policy.mixed-precision", "no", "--stage1.eval-batch-size", "64")
    assert (s.stage1.seed, s.policy.seed, s.learned.learned_seed) == (3, 0, 0)
    assert (s.stage1.max_grad_norm, s.policy.max_grad_norm) == (1.0, 0.5)
    assert (s.stage1.checkpoint_every, s.policy.checkpoint_every) == (7, 50)
    assert (s.stage1.mixed_precision, s.policy.mixed_precision) == ("auto", "no")
    assert (s.stage1.eval_batch_size, s.policy.eval_batch_size) == (64, 128)


def test_seed_sets_every_training_seed_and_a_namespaced_seed_wins_in_any_order():
    for argv in (["--seed", "9", "--policy.seed", "4"], ["--policy.seed", "4", "--seed", "9"]):
        s = _settings(*argv)
        assert (s.stage1.seed, s.policy.seed, s.learned.learned_seed, s.data.data_seed) == (9, 4, 9, 0)
    s = _settings()
    assert (s.stage1.seed, s.policy.seed, s.learned.learned_seed) == (0, 0, 0)


def test_every_shared_field_is_namespaced_and_no_option_sets_two_sections_silently():
    """A field two pipeline configurations have gets --SECTION.name; its plain spelling is the documented --seed
    or a hidden alias that warns."""
    shared = options.shared_names(s.cls for s in training_sections().values())
    assert shared == {"seed", "max_grad_norm", "checkpoint_every", "eval_batch_size", "mixed_precision"}
    parser = build_parser(["train"])
    train = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "train" in a.choices)
    actions = {flag: a for a in train.choices["train"]._actions for flag in a.option_strings}
    for name in shared:
        flag = "--" + name.replace("_", "-")
        assert f"--stage1.{flag[2:]}" in actions and f"--policy.{flag[2:]}" in actions
        plain = actions[flag]
        assert (name == "seed" and "sets --stage1.seed and --policy.seed" in plain.help) or \
            isinstance(plain, options._Deprecated)


def test_old_spellings_still_work_with_a_one_line_warning(capsys):
    s = _settings("--max-grad-norm", "0.5", "--policy.max-grad-norm", "2")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "consistentee: warning: --max-grad-norm is deprecated" in err
    assert "--stage1.max-grad-norm and --policy.max-grad-norm" in err
    assert (s.stage1.max_grad_norm, s.policy.max_grad_norm) == (0.5, 2.0)
    assert _parse(["evaluate", "--run-dir", "r", "--threshold", "0.3"]).knob == 0.3
    assert "--threshold is deprecated" in capsys.readouterr().err
    assert _parse(["predict", "--model", "m", "--dtype", "bf16"]).autocast == "bf16"
    assert "use --autocast" in capsys.readouterr().err
    assert _parse(["evaluate", "--run-dir", "r"]).knob == 0.5  # no warning without the old flag
    assert capsys.readouterr().err == ""


def test_the_decoder_verbs_namespace_their_shared_seed():
    from consistentee.cli.train_lm import BENCH, TRAIN

    args = _parse(["benchmark-lm", "--run-dir", "r", "--train.seed", "3", "--seed", "5", "--lr-heads", "1e-3"])
    assert (BENCH.from_args(args).seed, TRAIN.from_args(args).seed, TRAIN.from_args(args).lr_heads) == (5, 3, 1e-3)
    assert TRAIN.from_args(_parse(["train-lm", "--run-dir", "r", "--seed", "7"])).seed == 7


CONFIGS = {
    "run.yaml": "data:\n  policy_holdout: 0.2\nstage1:\n  seed: 3\n  learning_rate: 1e-4\n  mixed_precision: no\n"
                "policy:\n  reward_quality: log_prob\n  max_grad_norm: 0.5\nlearned_epochs: 9\n",
    "run.toml": "learned_epochs = 9\n[data]\npolicy_holdout = 0.2\n[stage1]\nseed = 3\nlearning_rate = 1e-4\n"
                'mixed_precision = "no"\n[policy]\nreward_quality = "log_prob"\nmax_grad_norm = 0.5\n',
    "run.json": json.dumps({"data.policy_holdout": 0.2, "stage1": {"seed": 3, "learning_rate": 1e-4,
                                                                   "mixed_precision": "no"},
                            "policy.reward_quality": "log_prob", "policy": {"max_grad_norm": 0.5},
                            "learned-epochs": 9}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_config_file_sets_advanced_and_namespaced_options(name, tmp_path):
    path = tmp_path / name
    path.write_text(CONFIGS[name])
    s = _settings("--config", str(path), "--seed", "8", "--learned-epochs", "2")
    assert s.policy.reward_quality == "log_prob" and s.data.policy_holdout == 0.2  # advanced and plain options
    assert (s.stage1.seed, s.policy.seed, s.learned.learned_seed) == (3, 8, 8)  # [stage1] seed is --stage1.seed
    assert (s.stage1.max_grad_norm, s.policy.max_grad_norm) == (1.0, 0.5)
    assert s.stage1.learning_rate == 1e-4 and s.stage1.mixed_precision == "no"  # YAML: 1e-4 a number, no a string
    assert s.learned.learned_epochs == 2  # the command line wins


@pytest.mark.parametrize(("content", "message"), [
    ("policy:\n  epochs: 3\n", "run.yaml has unknown option(s): policy.epochs"),  # stage 1's, in [policy]
    ("policy:\n  seed: 3\n", None),  # fine: --policy.seed
    ("stage1:\n  max_grad_norm: fast\n", "run.yaml: stage1.max_grad_norm = 'fast' must be a number"),
    ("policy:\n  reward: 3\n", "run.yaml: policy.reward = 3 must be a string"),
    ("reward_quality: [1, 2]\n", "reward_quality = [1, 2]: a list is not a valid value here"),
    ("stage1: [epochs\n", "run.yaml is not valid yaml: while parsing a flow sequence"),
    ("- 1\n- 2\n", "run.yaml must hold a table/object of option values"),
    ("", "run.yaml must hold a table/object of option values"),
])
def test_a_bad_config_file_is_named_in_one_line(content, message, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(content)
    argv = ["benchmark", "--run-dir", "r", "--config", str(path)]
    if message is None:
        assert _settings("--config", str(path)).policy.seed == 3
        return
    with pytest.raises(ValueError) as caught:
        options.apply_config(build_parser(argv), argv)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_deprecated_key_in_a_config_file_warns_and_works(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("checkpoint_every: 5\n")
    s = _settings("--config", str(path))
    assert (s.stage1.checkpoint_every, s.policy.checkpoint_every) == (5, 5)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint_every (in {path}) is deprecated" in err


@pytest.mark.parametrize("content", ["stage1: [epochs\n", '{"policy": {"reward_quality": 3}}', '{"nope": 1}'])
def test_a_bad_config_file_exits_2_with_one_line_and_no_traceback(content, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    assert main(["benchmark", "--run-dir", str(tmp_path / "run"), "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and "bad.yaml" in err
    assert err.startswith("consistentee: error: ") and not (tmp_path / "run").exists()


def _main_reads_configs_through_options() -> bool:
    """Whether cli/main.py hands --config to options.apply_config (its older reader of its own knows no YAML)."""
    return options.apply_config in (getattr(cli_main, "apply_config", None), getattr(cli_main, "_apply_config", None))


@pytest.mark.skipif(not _main_reads_configs_through_options(),
                    reason="cli/main.py does not read config files through options.apply_config yet")
def test_the_command_line_reads_yaml_with_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage1:\n  epochs: 0\n")
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        main(["stage1", "--run-dir", str(tmp_path / "run"), "--config", str(path), "--debug"])
