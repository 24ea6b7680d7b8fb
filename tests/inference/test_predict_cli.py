"""``consistentee predict`` through its module: files in, JSON lines out, one-line errors."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from consistentee.cli import predict as predict_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    path = tmp_path_factory.mktemp("cli") / "model"
    tiny_model.save_pretrained(path, tokenizer=tiny_tokenizer)
    return str(path)


def _args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    verbs = parser.add_subparsers(dest="verb")
    predict_cli.add_parser(verbs)
    argv = ["predict", "--model", overrides.pop("model"), "--device", "cpu", "--no-progress"]
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def test_txt_to_jsonl(tmp_path, model_dir, helpers, capsys):
    from consistentee.inference import EarlyExitPredictor

    source = tmp_path / "in.txt"
    source.write_text("\n".join(helpers.TEXTS) + "\n\n", encoding="utf-8")
    out = tmp_path / "sub" / "out.jsonl"
    args = _args(model=model_dir, input=source, output=out, rule="entropy", knob="0.3", batch_size=4,
                 sort_by_length=True)
    assert predict_cli.run(args) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(helpers.TEXTS)
    rows = [json.loads(line) for line in lines]
    expected = EarlyExitPredictor.from_pretrained(model_dir, rule="entropy", knob=0.3, device="cpu").predict(
        helpers.TEXTS)
    assert [(r["label"], r["exit_layer"]) for r in rows] == [(e["label"], e["exit_layer"]) for e in expected]
    assert "mean exit layer" in capsys.readouterr().err
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]  # no temporary file left behind


def test_csv_pairs_and_stdout(tmp_path, model_dir, capsys):
    source = tmp_path / "pairs.csv"
    source.write_text('premise,hypothesis\n"a great film, really",it is good\ndull,it is bad\n', encoding="utf-8")
    args = _args(model=model_dir, input=source, text_column="premise", text_pair_column="hypothesis",
                 rule="patience", knob="2")
    assert predict_cli.run(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(r["label"] in ("a", "b") for r in rows)


def test_jsonl_from_stdin(model_dir):
    stdin = io.StringIO('{"t": "a great film"}\n{"t": "dull"}\n')
    items = predict_cli.read_inputs("-", "auto", "t", None, stdin=stdin)
    assert items == ["a great film", "dull"]
    assert predict_cli.read_inputs("-", stdin=io.StringIO("one\ntwo\n")) == ["one", "two"]


@pytest.mark.parametrize(("content", "name", "kwargs", "message"), [
    ("first\n\nthird\n", "in.txt", {}, "line 2 is empty"),
    ("", "in.txt", {}, "no input"),
    ("a,b\n1,2\n", "in.csv", {"text_column": "text"}, "no column 'text'; available: a, b"),
    ("a,b\n1,2\n", "in.csv", {}, "pass --text-column"),
    ('{"text": "x"}\nnot json\n', "in.jsonl", {"text_column": "text"}, "line 2 is not valid JSON"),
    ('{"text": ""}\n', "in.jsonl", {"text_column": "text"}, "empty text in column 'text' at row 1"),
])
def test_bad_input_files_give_one_line_errors(tmp_path, model_dir, content, name, kwargs, message):
    source = tmp_path / name
    source.write_text(content, encoding="utf-8")
    args = _args(model=model_dir, input=source, rule="entropy", **kwargs)
    with pytest.raises(ValueError) as info:
        predict_cli.run(args)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(source) in str(info.value)


def test_missing_and_undecodable_files(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="input file not found"):
        predict_cli.run(_args(model=model_dir, input=tmp_path / "nope.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        predict_cli.run(_args(model=model_dir, input=bad))
    ok = tmp_path / "ok.txt"
    ok.write_text("fine\n", encoding="utf-8")
    with pytest.raises(ValueError, match="knob"):
        predict_cli.run(_args(model=model_dir, input=ok, rule="patience", knob="x"))
    with pytest.raises(FileNotFoundError, match="no such model"):
        predict_cli.run(_args(model=str(tmp_path / "no-model"), input=ok))
    out = tmp_path / "keep.jsonl"
    out.write_text("old\n")
    long_input = tmp_path / "long.txt"
    long_input.write_text("word " * 200 + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="too long"):
        predict_cli.run(_args(model=model_dir, input=long_input, output=out, max_length=32))
    assert out.read_text() == "old\n"  # a failed run leaves the old output alone


def test_standalone_main_returns_2_on_bad_input(tmp_path, model_dir, capsys):
    assert predict_cli.main(["--model", model_dir, "--input", str(tmp_path / "nope.txt")]) == 2
    assert "input file not found" in capsys.readouterr().err
