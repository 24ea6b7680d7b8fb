"""The command line: documented options, one-line errors with exit status 2, and the whole pipeline."""

from __future__ import annotations

import json

import pytest

from consistentee.cli.main import build_parser, main


@pytest.mark.parametrize("verb", ["train", "stage1", "memorize", "policy", "evaluate"])
def test_every_verb_documents_its_options_and_defaults(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        main([verb, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--run-dir" in text and "(default:" in text


def test_every_option_of_train_has_help_text():
    parser = build_parser()
    train = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "train" in a.choices)
    for action in train.choices["train"]._actions:
        assert action.help, action.dest


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--run-dir", "{tmp}/r", "--dataset", "{tmp}/missing.csv"], "missing.csv"),
        (["train", "--run-dir", "{tmp}/r", "--beta", "-1"], "beta must be >= 0"),
        (["train", "--run-dir", "{tmp}/r", "--rollouts", "0"], "rollouts"),
        (["train", "--run-dir", "{tmp}/r", "--epochs", "0"], "epochs must be >= 1"),
        (["memorize", "--run-dir", "{tmp}/nowhere"], "not a consistentee run directory"),
        (["evaluate", "--run-dir", "{tmp}/nowhere"], "not a consistentee run directory"),
        (["train", "--run-dir", "{tmp}/r", "--config", "{tmp}/missing.toml"], "missing.toml does not exist"),
    ],
)
def test_bad_input_gives_one_line_and_status_2(argv, message, tmp_path, capsys):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "stage1").exists()


def test_a_config_file_with_an_unknown_option_is_refused(tmp_path, capsys):
    (tmp_path / "c.toml").write_text("[stage1]\nepochz = 3\n")
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--config", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s): " in err and "epochz" in err


def test_the_whole_pipeline_from_a_config_file(tiny_csv, tiny_encoder_dir, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        f'[data]\ndataset = "{tiny_csv}"\nid_column = "id"\nmax_length = 16\n'
        f'[model]\nmodel = "{tiny_encoder_dir}"\npooling = "mean"\n'
        "[stage1]\nepochs = 1\nbatch_size = 16\n"
        "[policy]\nrollouts = 2\npolicy_epochs = 1\njoint_epochs = 1\npolicy_batch_size = 16\n"
    )
    run_dir = tmp_path / "run"
    code = main(["train", "--run-dir", str(run_dir), "--config", str(config), "--betas", "0.1,0.2",
                 "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run_dir / "run.json").read_text())["data"]["max_length"] == 16
    for beta in ("0.1", "0.2"):
        progress = json.loads((run_dir / "policies" / f"beta-{beta}" / "progress.json").read_text())
        assert progress["complete"] and progress["config"]["rollouts"] == 2
    assert main(["evaluate", "--run-dir", str(run_dir), "--beta", "0.1", "--no-progress", "--device", "cpu"]) == 0
    assert "ConsistentEE beta 0.1" in capsys.readouterr().out
