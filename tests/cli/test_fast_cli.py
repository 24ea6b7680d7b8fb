"""A fast command line: no heavy imports for --help, --version and input errors; one verb table; config types."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consistentee.cli.main import VERBS, build_parser, main, verb_table
from consistentee.cli.options import config_value

HEAVY = ("torch", "transformers", "matplotlib", "pandas", "fastapi", "numpy")


def _imports_after(argv: list[str]) -> tuple[int, str, set[str]]:
    """Run ``consistentee ARGV`` in a fresh interpreter; (exit status, stderr, heavy modules imported)."""
    code = ("import sys\nfrom consistentee.cli.main import main\n"
            "try:\n    status = main(sys.argv[1:])\nexcept SystemExit as exc:\n    status = exc.code\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\nsys.exit(status)\n")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    return done.returncode, "\n".join(lines[:-1]), set(eval(lines[-1]))  # noqa: S307 - our own print


@pytest.mark.parametrize("argv", [
    ["--help"], ["--version"], ["predict", "--help"], ["serve", "--help"],
    ["predict", "--model", "/no/such/model", "--input", "x.txt"],
    ["predict", "--model", "/no/such/model", "--rule", "static", "--knob", "abc"],
    ["predict", "--model", "/no/such/model", "--knob", "nan"],
    ["serve", "--model", "/no/such/model", "--port", "70000"],
    ["serve", "--model", "/no/such/model", "--host", "0.0.0.0"],
    ["nonsense-verb"],
])
def test_help_version_and_input_errors_import_nothing_heavy(argv):
    status, err, heavy = _imports_after(argv)
    assert status in (0, 2), err
    assert heavy == set(), f"{argv} imported {heavy}"
    if status == 2:
        assert len(err.splitlines()) == 1 and err.startswith("consistentee"), err


def test_help_is_fast():
    """Median of 5 runs of `consistentee --help` (the acceptance bound is 1 s on a warm machine; this machine
    also trains in the background, so the test allows some slack)."""
    times = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "consistentee.cli.main", "--help"], capture_output=True, check=True,
                       timeout=60)
        times.append(time.perf_counter() - started)
    assert statistics.median(times) < 1.5, times


def test_version(capsys):
    import consistentee
    from consistentee.cli.main import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"consistentee {version()}"
    expected = getattr(consistentee, "__version__", None)
    if expected is None:
        from importlib.metadata import version as dist_version

        expected = dist_version("consistentee")
    assert version() == expected


def test_every_verb_in_the_table_builds_and_runs_from_its_module():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    table = verb_table()
    assert list(sub.choices) == list(table)
    assert {"train", "stage1", "predict", "serve", "benchmark"} <= set(table)
    for verb in table.values():
        module = verb.load()
        assert callable(getattr(module, verb.add_parser)) and callable(getattr(module, verb.run)), verb
    assert len({v.name for v in VERBS}) == len(VERBS)


def test_only_the_chosen_verb_is_built(monkeypatch):
    loaded = []
    real = type(VERBS[0]).load

    def spy(self):
        loaded.append(self.name)
        return real(self)

    monkeypatch.setattr(type(VERBS[0]), "load", spy)
    build_parser(["predict", "--help"])
    assert loaded == ["predict"]


def test_rule_names_match_the_rules():
    from consistentee.exits.rules import PREDICT_RULES, RULES

    assert set(PREDICT_RULES) == set(RULES) - {"oracle"}


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("epochs", 3, 3), ("learning_rate", 1e-4, 1e-4), ("learning_rate", 1, 1.0), ("pooling", "mean", "mean"),
    ("trust_remote_code", True, True), ("max_train_examples", None, None), ("betas", [0.1, 0.2], [0.1, 0.2]),
])
def test_config_values_of_the_right_type_pass(key, value, expected):
    parser = build_parser(["train"])
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    action = next(a for a in train._actions if a.dest == key)
    assert config_value(action, key, value, Path("c.toml")) == expected


@pytest.mark.parametrize(("key", "value", "message"), [
    ("epochs", 1.5, "c.toml: epochs = 1.5 must be an integer"),
    ("epochs", "2", "epochs = '2' must be a number, not a string"),
    ("epochs", True, "epochs = true must be a number"),
    ("learning_rate", float("inf"), "learning_rate = Infinity: 'inf' is not a finite number"),
    ("pooling", 3, "pooling = 3 must be a string"),
    ("pooling", "max", "choose one of auto, pooler, cls, mean"),
    ("trust_remote_code", 1, "trust_remote_code = 1 must be true or false"),
    ("epochs", None, "this option cannot be null"),
    ("dataset", ["a"], "a list is not a valid value here"),
])
def test_config_values_of_the_wrong_type_name_the_file(key, value, message):
    parser = build_parser(["train"])
    train = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    action = next(a for a in train._actions if a.dest == key)
    with pytest.raises(ValueError, match="config file c.toml: ") as caught:
        config_value(action, key, value, Path("c.toml"))
    assert message in str(caught.value)


# -- training: non-finite loss, changed settings, max_length from the data -------------------------------------


STAGE1 = ["--id-column", "id", "--pooling", "mean", "--epochs", "1", "--batch-size", "16", "--device", "cpu",
          "--no-progress"]


def test_a_non_finite_loss_stops_training_and_leaves_nothing(tiny_csv, tiny_encoder_dir, tmp_path, monkeypatch,
                                                             capsys):
    from consistentee.training import stage1

    real = stage1.multi_exit_loss
    monkeypatch.setattr(stage1, "multi_exit_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    run = tmp_path / "run"
    code = main(["stage1", "--run-dir", str(run), "--dataset", tiny_csv, "--model", tiny_encoder_dir,
                 "--max-length", "16", *STAGE1])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.splitlines() == [line for line in err.splitlines() if line.startswith("consistentee: error:")]
    assert "stage 1 [joint] epoch 1 step 1: the loss is not finite (nan); stopped without saving" in err
    assert not run.exists()


def test_max_length_defaults_to_what_fits_the_data(tiny_csv, tiny_encoder_dir):
    from transformers import AutoTokenizer

    from consistentee.training.run import DataConfig, auto_max_length, load_data, prepare_data

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    cfg = DataConfig(dataset=tiny_csv, id_column="id")
    assert cfg.max_length is None
    data = prepare_data(cfg, tokenizer)
    lengths = sorted(len(tokenizer(t)["input_ids"]) for t in load_data(cfg).train.texts)
    assert data.max_length == lengths[-(-95 * len(lengths) // 100) - 1]
    assert data.max_length < lengths[-1] or lengths[-1] == lengths[-2]
    assert "95th percentile" in data.max_length_note
    assert max(data.encoded["train"].lengths) == data.max_length
    tokenizer.model_max_length = 5
    value, note = auto_max_length(load_data(cfg).train, tokenizer)
    assert value == 5 and "capped at the model limit 5" in note


def test_stage1_records_the_chosen_max_length_and_refuses_other_data(tiny_csv, tiny_encoder_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["stage1", "--run-dir", str(run), "--dataset", tiny_csv, "--model", tiny_encoder_dir, *STAGE1]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "run.json").read_text())["data"]["max_length"]
    assert isinstance(saved, int) and f"max_length {saved}: the 95th percentile" in out
    # the same command again: reused (the automatic max_length means the one chosen then)
    assert main(["stage1", "--run-dir", str(run), "--dataset", tiny_csv, "--model", tiny_encoder_dir, *STAGE1]) == 0
    assert "already complete" in capsys.readouterr().out
    other = tmp_path / "other.csv"
    other.write_text(Path(tiny_csv).read_text())
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code = main(["stage1", "--run-dir", str(run), "--dataset", str(other), "--model", tiny_encoder_dir, *STAGE1])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{run} was trained with other settings (data.dataset: run '{tiny_csv}', asked '{other}')" in err
    assert "use another --run-dir, or delete" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
