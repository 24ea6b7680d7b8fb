"""Bad input, table-driven, over the command line and the Python API.

Every case must give one line naming the problem, exit status 2, no traceback (``--debug`` shows it) and no
partial output: no run directory, no predictions file. Run with ``-s`` to see what each case printed.
"""

from __future__ import annotations

import json
import shutil
import socket
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

from consistentee.cli.main import main

BIG_TEXT = "word " * 200_000  # 1 MB


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_csv, tiny_encoder_dir) -> dict[str, str]:
    """Every bad file and model directory of the table, built once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    frame = pd.read_csv(tiny_csv, dtype=str, keep_default_na=False)
    paths = {"data": tiny_csv, "encoder": tiny_encoder_dir}

    def put(name: str, content: str | bytes) -> None:
        path = root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        paths[name] = str(path)

    put("empty.csv", "")
    put("header_only.csv", "id,text,label\n")
    put("non_utf8.csv", b"text,label\n\xff\xfe caf\xe9,positive\nfine,negative\n")
    put("empty_text.csv", 'text,label\ngood,positive\n"",negative\n')
    put("nan_label.jsonl", '{"text": "good", "label": "positive"}\n{"text": "bad", "label": NaN}\n')
    put("null_label.jsonl", '{"text": "good", "label": "positive"}\n{"text": "bad", "label": null}\n')
    put("list_label.jsonl", '{"text": "good", "label": "positive"}\n{"text": "bad", "label": ["neg"]}\n')
    put("float_label.jsonl", '{"text": "good", "label": 0.25}\n{"text": "bad", "label": 0.75}\n')
    unseen = frame.copy()
    unseen.loc[0, "label"] = "neutral"
    put("unseen_test.csv", unseen.to_csv(index=False))
    put("texts.txt", "a great film\nawful\n")
    put("texts_empty_line.txt", "a great film\n\nawful\n")
    put("big.txt", BIG_TEXT + "\nshort\n")

    pickled = root / "pickle_encoder"
    shutil.copytree(tiny_encoder_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    paths["pickle_encoder"] = str(pickled)
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("nothing here")
    paths["not_a_model"] = str(root / "not_a_model")

    # A trained consistentee model (1 tiny epoch) and copies of it broken in different ways.
    run = root / "run"
    assert main(["stage1", "--run-dir", str(run), "--dataset", tiny_csv, "--id-column", "id", "--model",
                 tiny_encoder_dir, "--pooling", "mean", "--max-length", "16", "--epochs", "1", "--batch-size", "16",
                 "--device", "cpu", "--no-progress"]) == 0
    paths["run"] = str(run)
    paths["model"] = str(run / "stage1" / "model")
    mismatched = root / "mismatched_model"
    shutil.copytree(run / "stage1" / "model", mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["backbone"]["num_hidden_layers"] = 4
    (mismatched / "config.json").write_text(json.dumps(config))
    paths["mismatched_model"] = str(mismatched)
    pickled_model = root / "pickled_model"
    shutil.copytree(run / "stage1" / "model", pickled_model)
    (pickled_model / "model.safetensors").rename(pickled_model / "pytorch_model.bin")
    paths["pickled_model"] = str(pickled_model)

    # A run with two trained policy models (copies of stage 1, marked complete): which one is ambiguous.
    two = root / "two_policies"
    shutil.copytree(run, two)
    for beta in ("0.1", "0.2"):
        shutil.copytree(run / "stage1" / "model", two / "policies" / f"beta-{beta}" / "model")
        (two / "policies" / f"beta-{beta}" / "progress.json").write_text('{"complete": true}')
    paths["two_policies"] = str(two)
    # A model whose exits overflow to NaN (finite but absurd weights pass the load checks): never NaN in the output.
    from transformers import AutoTokenizer

    from consistentee.model.modeling import EarlyExitForSequenceClassification

    nan_model = EarlyExitForSequenceClassification.from_pretrained(run / "stage1" / "model")
    with torch.no_grad():
        for head in nan_model.exits:
            head.weight.fill_(3e38)
    nan_model.save_pretrained(root / "nan_model", tokenizer=AutoTokenizer.from_pretrained(run / "stage1" / "model"))
    paths["nan_model"] = str(root / "nan_model")

    put("unterminated.csv", 'text,label\n"a great film,positive\nawful,negative\nfine,positive\n')
    put("unterminated_texts.csv", 'text\nfine\n"a great film\nawful\n')
    put("ragged.csv", "text\nfine\nawful,extra\n")
    put("epochs_float.toml", "[stage1]\nepochs = 1.5\n")
    put("lr_string.toml", '[stage1]\nlearning_rate = "fast"\n')
    put("pooling_bad.json", '{"pooling": "max"}')
    put("bool_bad.json", '{"trust_remote_code": "yes"}')
    put("list_config.json", "[1, 2]")
    put("broken.toml", "[stage1\nepochs = 2\n")
    put("nan_lr.json", '{"learning_rate": NaN}')
    put("broken.yaml", "stage1: [epochs\n")
    put("recipe_bad.yaml", '{"stage1": {"recipe": 3}}')  # YAML in JSON's syntax (YAML holds JSON)
    put("policy_section.yaml", '{"policy": {"rollouts": 4}}')
    return paths


@pytest.fixture(scope="module", autouse=True)
def busy_port(inputs):
    """A port another program listens on (``{busy_port}`` in the table)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        inputs["busy_port"] = str(sock.getsockname()[1])
        yield


S1 = ["stage1", "--run-dir", "{out}/run", "--max-length", "16", "--epochs", "1", "--device",
      "cpu", "--no-progress"]


def _stage1(*extra: str, data: str = "{data}", model: str = "{encoder}") -> list[str]:
    return [*S1, "--dataset", data, "--model", model, *extra]


PREDICT = ["predict", "--device", "cpu", "--no-progress", "--output", "{out}/pred.jsonl"]
#: predict with a rule that runs on a stage-1 model (its policies were never trained).
PREDICT_E = [*PREDICT, "--rule", "entropy"]
SERVE = ["serve", "--device", "cpu", "--model", "{model}", "--rule", "entropy"]

# (case, argv, expected fragment of the one-line error)
CASES = [
    ("missing data file", _stage1(data="{out}/missing.csv"), "missing.csv' is not a built-in dataset"),
    ("unknown column", _stage1("--text-column", "body"), "no text column 'body'; available columns: id, text, label"),
    ("empty file", _stage1(data="{empty.csv}"), "empty.csv: file is empty"),
    ("header only", _stage1(data="{header_only.csv}"), "header_only.csv: no rows"),
    ("non-UTF-8 bytes", _stage1(data="{non_utf8.csv}"), "not valid UTF-8 (bad byte at offset 11)"),
    ("empty string text", _stage1(data="{empty_text.csv}"), "empty text in column 'text' at row empty_text-1"),
    ("NaN label", _stage1(data="{nan_label.jsonl}"), "missing label (None/NaN) in column 'label'"),
    ("null label", _stage1(data="{null_label.jsonl}"), "missing label (None/NaN) in column 'label'"),
    ("label of the wrong type (list)", _stage1(data="{list_label.jsonl}"), "label of the wrong type (list"),
    ("label of the wrong type (float)", _stage1(data="{float_label.jsonl}"), "non-integer number 0.25"),
    ("unseen test label", _stage1("--test-file", "{unseen_test.csv}"), "test split of"),
    ("wrong model path", _stage1(model="{out}/no/such/model"), "does not exist"),
    ("model dir without config", _stage1(model="{not_a_model}"), "has no config.json"),
    ("pickle-only encoder", _stage1(model="{pickle_encoder}"), "pytorch_model.bin is a pickle file"),
    ("trained model as encoder", _stage1(model="{model}"), "is a trained consistentee early-exit model"),
    ("max_length 1", _stage1("--max-length", "1"), "max_length must be >= 2"),
    ("epochs 0", _stage1("--epochs", "0"), "epochs must be >= 1"),
    ("not a number", _stage1("--epochs", "two"), "argument --epochs: invalid int value: 'two'"),
    ("unknown choice", _stage1("--pooling", "max"), "argument --pooling: invalid choice: 'max'"),
    ("negative beta (train)", ["train", "--run-dir", "{out}/run", "--beta", "-0.5"], "beta must be >= 0"),
    ("K=0 (train)", ["train", "--run-dir", "{out}/run", "--rollouts", "0"], "rollouts (K) must be >= 2"),
    ("negative beta (policy)", ["policy", "--run-dir", "{run}", "--beta", "-1"], "beta must be >= 0"),
    ("K=0 (policy)", ["policy", "--run-dir", "{run}", "--rollouts", "0"], "rollouts (K) must be >= 2"),
    ("bad --betas", ["policy", "--run-dir", "{run}", "--betas", "0.1,-2"], "--betas needs one or more values >= 0"),
    ("epsilon outside [0,1]", ["policy", "--run-dir", "{run}", "--epsilon-start", "1.5"], "epsilon_start must be in"),
    ("policy without a run", ["policy", "--run-dir", "{out}/nowhere"], "is not a consistentee run directory"),
    ("knob > 1", ["evaluate", "--run-dir", "{run}", "--knob", "1.5"], "--knob must be in [0, 1]"),
    ("knob < 0", ["evaluate", "--run-dir", "{run}", "--knob", "-0.1"], "--knob must be in [0, 1]"),
    ("evaluate batch 0", ["evaluate", "--run-dir", "{run}", "--batch-size", "0"], "batch_size must be >= 1"),
    ("evaluate untrained beta", ["evaluate", "--run-dir", "{run}", "--beta", "0.3"], "no policy was trained"),
    ("memorize batch 0", ["memorize", "--run-dir", "{run}", "--batch-size", "0"], "batch_size must be >= 1"),
    ("benchmark missing data", ["benchmark", "--run-dir", "{out}/run", "--dataset", "{out}/missing.csv"],
     "is not a built-in dataset"),
    ("benchmark K=0", ["benchmark", "--run-dir", "{out}/run", "--rollouts", "0"], "rollouts (K) must be >= 2"),
    ("predict missing input", [*PREDICT, "--model", "{model}", "--input", "{out}/missing.txt"], "input file not found"),
    ("predict empty line", [*PREDICT, "--model", "{model}", "--input", "{texts_empty_line.txt}"], "line 2 is empty"),
    ("predict 1 MB text without truncation", [*PREDICT_E, "--model", "{model}", "--input", "{big.txt}"],
     "input 0 is too long: 200002 tokens"),
    ("predict wrong model path", [*PREDICT, "--model", "{out}/no-model", "--input", "{texts.txt}"],
     "no such model or run directory"),
    ("predict plain encoder", [*PREDICT, "--model", "{encoder}", "--input", "{texts.txt}"],
     "is not a consistentee early-exit model"),
    ("predict mismatched config/weights", [*PREDICT, "--model", "{mismatched_model}", "--input", "{texts.txt}"],
     "does not match"),
    ("predict pickle weights", [*PREDICT, "--model", "{pickled_model}", "--input", "{texts.txt}"],
     "pytorch_model.bin is a pickle file"),
    ("predict threshold knob > 1", [*PREDICT, "--model", "{model}", "--input", "{texts.txt}", "--knob", "1.5"],
     "1.5"),
    ("predict batch 0", [*PREDICT, "--model", "{model}", "--input", "{texts.txt}", "--batch-size", "0"],
     "--batch-size must be >= 1"),
    # -- no silent wrong results --------------------------------------------------------------------------
    ("predict run dir without a trained policy", [*PREDICT, "--model", "{run}", "--input", "{texts.txt}"],
     "has no trained ConsistentEE policy (policies/beta-*/model)"),
    ("predict stage-1 model with the policy rule", [*PREDICT, "--model", "{model}", "--input", "{texts.txt}"],
     "its ConsistentEE policies were never trained"),
    ("predict run dir with two policies", [*PREDICT, "--model", "{two_policies}", "--input", "{texts.txt}"],
     "holds 2 trained ConsistentEE policy models (policies/beta-0.1/model, policies/beta-0.2/model)"),
    ("predict model giving NaN", [*PREDICT_E, "--model", "{nan_model}", "--input", "{texts.txt}"],
     "non-finite scores (NaN or infinity) for input 0"),
    ("stage1 on a finished run with another dataset",
     _stage1("--run-dir", "{run}", "--id-column", "id", "--pooling", "mean", "--batch-size", "16",
             data="{unseen_test.csv}"), "was trained with other settings (data.dataset: run"),
    ("stage1 on a finished run with other epochs",
     _stage1("--run-dir", "{run}", "--id-column", "id", "--pooling", "mean", "--batch-size", "16", "--epochs", "3"),
     "stage1.epochs: run 1, asked 3"),
    ("learning rate nan", _stage1("--learning-rate", "nan"), "argument --learning-rate: 'nan' is not a finite number"),
    ("learning rate inf", _stage1("--learning-rate", "inf"), "argument --learning-rate: 'inf' is not a finite number"),
    ("head learning rate -inf", _stage1("--head-learning-rate=-inf"), "'-inf' is not a finite number"),
    ("learning rate 0", _stage1("--learning-rate", "0"), "learning_rate must be a finite number > 0, got 0.0"),
    ("policy beta nan", ["policy", "--run-dir", "{run}", "--beta", "nan"], "'nan' is not a finite number"),
    ("betas with nan", ["policy", "--run-dir", "{run}", "--betas", "0.1,nan"], "--betas needs one or more values"),
    ("evaluate knob nan", ["evaluate", "--run-dir", "{run}", "--knob", "nan"], "--knob must be in"),
    ("CSV with an unterminated quote (training)", _stage1(data="{unterminated.csv}"),
     "unterminated.csv: line 2: a quoted field is never closed"),
    ("CSV with an unterminated quote (predict)",
     [*PREDICT_E, "--model", "{model}", "--input", "{unterminated_texts.csv}", "--text-column", "text"],
     "unterminated_texts.csv: line 3: a quoted field is never closed"),
    ("CSV row with too many fields (predict)",
     [*PREDICT_E, "--model", "{model}", "--input", "{ragged.csv}", "--text-column", "text"],
     "ragged.csv: line 3 has 2 fields, the header has 1"),
    ("static knob beyond the depth", [*PREDICT, "--model", "{model}", "--input", "{texts.txt}", "--rule", "static",
                                      "--knob", "99"], "knob 99 (exit layer) is beyond the model's 3 layers"),
    ("patience knob beyond the depth", [*PREDICT, "--model", "{model}", "--input", "{texts.txt}", "--rule",
                                        "patience", "--knob", "7"], "knob 7 (patience) is beyond the model's 3"),
    ("pcee knob beyond the depth", [*PREDICT, "--model", "{model}", "--input", "{texts.txt}", "--rule", "pcee",
                                    "--knob", "9,0.2"], "is beyond the model's 3 layers"),
    ("static knob 0", [*PREDICT, "--model", "{model}", "--input", "{texts.txt}", "--rule", "static", "--knob", "0"],
     "'k' must be an integer >= 1, got 0"),
    ("entropy knob inf", [*PREDICT_E, "--model", "{model}", "--input", "{texts.txt}", "--knob", "inf"],
     "knob 'inf' must be a finite number"),
    ("confidence knob nan", [*PREDICT, "--model", "{model}", "--input", "{texts.txt}", "--rule", "confidence",
                             "--knob", "nan"], "knob 'nan' must be a finite number"),
    ("predict top-k 0", [*PREDICT_E, "--model", "{model}", "--input", "{texts.txt}", "--top-k", "0"],
     "--top-k must be an integer >= 1 or 'all', got '0'"),
    ("predict max-length 1", [*PREDICT_E, "--model", "{model}", "--input", "{texts.txt}", "--max-length", "1"],
     "--max-length must be >= 2, got 1"),
    ("predict max-length beyond the model", [*PREDICT_E, "--model", "{model}", "--input", "{texts.txt}",
                                             "--max-length", "100000"], "exceeds what the model accepts"),
    ("predict missing policy model dir", [*PREDICT, "--model", "{run}", "--input", "{texts.txt}",
                                          "--policy-model-dir", "policies/beta-9/model"], "not a model directory"),
    ("predict output folder is a file", [*PREDICT_E[:-4], "--rule", "entropy", "--model", "{model}", "--input",
                                         "{texts.txt}", "--output", "{texts.txt}/pred.jsonl"], "is not a folder"),
    ("predict output is a directory", [*PREDICT_E[:-4], "--rule", "entropy", "--model", "{model}", "--input",
                                       "{texts.txt}", "--output", "{not_a_model}"], "it is a directory"),
    # -- config files: types checked, the file named ------------------------------------------------------
    ("TOML epochs = 1.5", _stage1("--config", "{epochs_float.toml}"), "epochs_float.toml: stage1.epochs = 1.5 must be an integer"),
    ("TOML learning rate as text", _stage1("--config", "{lr_string.toml}"),
     "lr_string.toml: stage1.learning_rate = 'fast' must be a number"),
    ("JSON unknown choice", _stage1("--config", "{pooling_bad.json}"),
     "pooling_bad.json: pooling = 'max': choose one of auto, pooler, cls, mean"),
    ("JSON bool as text", _stage1("--config", "{bool_bad.json}"), "trust_remote_code = 'yes' must be true or false"),
    ("JSON config not an object", _stage1("--config", "{list_config.json}"), "must hold a table/object"),
    ("TOML syntax error", _stage1("--config", "{broken.toml}"), "broken.toml is not valid toml"),
    ("JSON NaN learning rate", _stage1("--config", "{nan_lr.json}"), "learning_rate = NaN: 'nan' is not a finite"),
    ("YAML syntax error", _stage1("--config", "{broken.yaml}"), "broken.yaml is not valid yaml"),
    ("YAML advanced option of the wrong type", _stage1("--config", "{recipe_bad.yaml}"), "recipe = 3 must be a string"),
    ("YAML section of another verb", _stage1("--config", "{policy_section.yaml}"),
     "policy_section.yaml has unknown option(s): "),
    # -- serve: checked before the port is taken and the model loaded -------------------------------------
    ("serve port out of range", [*SERVE, "--port", "70000"], "--port must be in 0..65535, got 70000"),
    ("serve port in use", [*SERVE, "--port", "{busy_port}"], "cannot listen on 127.0.0.1:"),
    ("serve public host without a key", [*SERVE, "--host", "0.0.0.0"],
     "--host 0.0.0.0 is reachable from other machines: set an API key"),
    ("serve empty API key", [*SERVE, "--api-key", " "], "--api-key is empty"),
    ("serve nesting limit 0", [*SERVE, "--max-json-depth", "0"], "max_json_depth must be an integer >= 1"),
    ("serve body timeout 0", [*SERVE, "--body-timeout-s", "0"], "body_timeout_s must be > 0"),
    ("serve body timeout nan", [*SERVE, "--body-timeout-s", "nan"], "'nan' is not a finite number"),
    ("serve threads 0", [*SERVE, "--threads", "0"], "--threads must be >= 1"),
]


def _fill(argv: list[str], inputs: dict[str, str], out: Path) -> list[str]:
    return [a.format(out=out, **{k.replace(".", "_"): v for k, v in inputs.items()}) if "{" in a else a
            for a in [a.replace(".csv}", "_csv}").replace(".jsonl}", "_jsonl}").replace(".txt}", "_txt}")
                      .replace(".toml}", "_toml}").replace(".json}", "_json}").replace(".yaml}", "_yaml}")
                      for a in argv]]


@pytest.mark.parametrize(("case", "argv", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_status_2_and_no_output(case, argv, fragment, inputs, tmp_path, capsys):
    run_files = {p: p.stat().st_mtime_ns for p in Path(inputs["run"]).rglob("*")}
    try:
        code = main(_fill(argv, inputs, tmp_path))
    except SystemExit as exc:  # argparse's usage errors (one line, see cli.main._Parser)
        code = exc.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    print(f"\n{case}: exit {code}: {err}")
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("consistentee"), err
    assert fragment in err, err
    # No partial output anywhere: no new run directory, no predictions, the existing run untouched.
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    assert {p: p.stat().st_mtime_ns for p in Path(inputs["run"]).rglob("*")} == run_files


def test_debug_shows_the_traceback(inputs, tmp_path):
    with pytest.raises(ValueError, match="beta must be >= 0"):
        main(["train", "--run-dir", str(tmp_path / "r"), "--beta", "-1", "--debug"])
    assert not (tmp_path / "r").exists()


def test_a_1mb_training_text_is_truncated_with_one_warning_line(inputs, tmp_path, capsys):
    frame = pd.read_csv(inputs["data"], dtype=str, keep_default_na=False)
    frame.loc[frame["id"] == "p0", "text"] = BIG_TEXT
    data = tmp_path / "big.csv"
    frame.to_csv(data, index=False)
    code = main(["stage1", "--run-dir", str(tmp_path / "run"), "--dataset", str(data), "--id-column", "id",
                 "--model", inputs["encoder"], "--pooling", "mean", "--max-length", "16", "--epochs", "1",
                 "--batch-size", "16", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    print(f"\n1 MB text: exit {code}: {err}")
    assert code == 0
    warning_lines = [line for line in err.splitlines() if "warning" in line]
    assert warning_lines == ["consistentee: warning: train split: 1 of 48 text(s) longer than max_length=16 tokens "
                             "were truncated (longest: id 'p0', 200002 tokens)"]


def test_predict_truncates_a_1mb_text_when_asked_and_writes_jsonl_atomically(inputs, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    code = main([*PREDICT[:-2], "--output", str(out), "--model", inputs["model"], "--input", inputs["big.txt"],
                 "--truncation", "--max-length", "32", "--rule", "entropy"])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and {"label", "probability", "exit_layer"} <= set(rows[0])
    assert [p.name for p in tmp_path.iterdir()] == ["pred.jsonl"]  # no temporary file left


# -- the same problems through the Python API -----------------------------------------------------------------


def test_api_refuses_the_same_inputs(inputs, tmp_path):
    from consistentee.data import DataError, UnknownLabelError, load_splits
    from consistentee.model.configuration import ModelFormatError
    from consistentee.model.modeling import EarlyExitForSequenceClassification
    from consistentee.training.policy import PolicyConfig
    from consistentee.training.run import DataConfig, ModelConfig, check_encoder_source

    for name, fragment in [("empty.csv", "file is empty"), ("non_utf8.csv", "not valid UTF-8"),
                           ("empty_text.csv", "empty text"), ("nan_label.jsonl", "missing label"),
                           ("list_label.jsonl", "wrong type")]:
        with pytest.raises(DataError, match=fragment):
            load_splits(inputs[name])
    with pytest.raises(DataError, match="no label column 'y'"):
        load_splits(inputs["data"], label_column="y")
    with pytest.raises(UnknownLabelError, match="neutral"):
        from consistentee.data import LabelList

        LabelList.from_labels(["negative", "positive"]).encode(["neutral"])
    with pytest.raises(ModelFormatError, match="pickle"):
        EarlyExitForSequenceClassification.from_pretrained(inputs["pickled_model"])
    with pytest.raises(ModelFormatError, match="does not match"):
        EarlyExitForSequenceClassification.from_pretrained(inputs["mismatched_model"])
    with pytest.raises(ModelFormatError, match="not a consistentee early-exit model"):
        EarlyExitForSequenceClassification.from_pretrained(inputs["encoder"])
    with pytest.raises(ValueError, match="pickle file"):
        check_encoder_source(inputs["pickle_encoder"])
    with pytest.raises(ValueError, match="beta must be >= 0"):
        PolicyConfig(beta=-0.1)
    with pytest.raises(ValueError, match="rollouts"):
        PolicyConfig(rollouts=0)
    with pytest.raises(ValueError, match="max_length"):
        DataConfig(max_length=0)
    with pytest.raises(ValueError, match="classifier_dropout"):
        ModelConfig(classifier_dropout=1.5)


def test_api_truncates_a_1mb_text_with_a_warning(inputs):
    from transformers import AutoTokenizer

    from consistentee.data import DataWarning, LabelList, TextSplit, encode_split

    tokenizer = AutoTokenizer.from_pretrained(inputs["encoder"])
    split = TextSplit(["big", "small"], [BIG_TEXT, "short"], None, ["a", "b"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = encode_split(split, tokenizer, LabelList(("a", "b")), 32, name="train split")
    assert encoded.lengths[0] == 32 and encoded.lengths[1] < 32
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 1 and "1 of 2 text(s) longer than max_length=32" in messages[0]


def test_a_read_only_output_folder_names_the_output(inputs, tmp_path, capsys, monkeypatch):
    """As root the folder can't be made read-only, so the refusal is simulated where the OS would give it."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out" / ".pred.jsonl.x1y2z3.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "pred.jsonl"
    code = main([*PREDICT_E[:4], "--rule", "entropy", "--model", inputs["model"], "--input", inputs["texts.txt"],
                 "--output", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1] == f"consistentee: error: cannot write {target}: Permission denied (in folder {target.parent})"
    assert ".tmp" not in err[-1] and list((tmp_path / "out").iterdir()) == []
