"""The predictor and ``predict``: stored operating point, run-directory resolution, top_k, streaming."""

from __future__ import annotations

import argparse
import io
import json
import shutil

import pytest

from consistentee.cli import predict as predict_cli


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, deep_tiny_model, tiny_tokenizer):
    path = tmp_path_factory.mktemp("op") / "model"
    deep_tiny_model.save_pretrained(path, tokenizer=tiny_tokenizer)
    return path


@pytest.fixture
def calibrated_dir(tmp_path, model_dir):
    """A copy of the model with an operating point stored (what ``consistentee calibrate`` writes)."""
    from consistentee.exits.operating_point import OperatingPoint, save_operating_point

    path = tmp_path / "calibrated"
    shutil.copytree(model_dir, path)
    save_operating_point(path, OperatingPoint("entropy", 0.4, {"max_loss_points": 1.0, "delta": 0.1,
                                                                "calibration_examples": 50, "split": "dev"}))
    return path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    verbs = parser.add_subparsers(dest="verb")
    predict_cli.add_parser(verbs)
    return parser.parse_args(["predict", "--device", "cpu", "--no-progress", *argv])


def test_the_stored_operating_point_is_used_and_said(calibrated_dir, helpers, caplog):
    from consistentee.inference import EarlyExitPredictor

    with caplog.at_level("INFO", logger="consistentee"):
        predictor = EarlyExitPredictor.from_pretrained(calibrated_dir, device="cpu")
    assert predictor.rule.name == "entropy" and predictor.rule.knob == 0.4
    assert predictor.operating_point is not None
    assert any("using the calibrated operating point: rule entropy with knob 0.4" in r.message for r in caplog.records)
    explicit = EarlyExitPredictor.from_pretrained(calibrated_dir, device="cpu", rule="entropy", knob=0.4)
    assert predictor.predict(helpers.TEXTS) == explicit.predict(helpers.TEXTS)
    # explicit flags win, and then nothing is said about the stored point
    other = EarlyExitPredictor.from_pretrained(calibrated_dir, device="cpu", rule="confidence", knob=0.9)
    assert other.rule.name == "confidence" and other.operating_point is None and other.notes == []
    knob_only = EarlyExitPredictor.from_pretrained(calibrated_dir, device="cpu", knob=0.7)
    assert knob_only.rule.name == "consistentee" and knob_only.rule.knob == 0.7


def test_predict_cli_says_it_uses_the_stored_point(calibrated_dir, tmp_path, helpers, capsys):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(helpers.TEXTS[:5]) + "\n")
    assert predict_cli.run(_args("--model", str(calibrated_dir), "--input", str(source))) == 0
    from consistentee.exits.operating_point import load_operating_point

    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if "operating point" in line]
    assert notes == [f"consistentee: using the calibrated operating point: {load_operating_point(calibrated_dir).describe()}"]
    assert notes[0].startswith("consistentee: using the calibrated operating point: rule entropy with knob 0.4")
    assert len(captured.out.splitlines()) == 5
    assert predict_cli.run(_args("--model", str(calibrated_dir), "--input", str(source), "--rule", "entropy",
                                 "--knob", "0.2")) == 0
    assert "operating point" not in capsys.readouterr().err


def test_no_stored_point_means_consistentee_at_its_default(model_dir):
    from consistentee.inference import EarlyExitPredictor

    predictor = EarlyExitPredictor.from_pretrained(model_dir, device="cpu")
    assert predictor.rule.name == "consistentee" and predictor.operating_point is None
    # and the user is told that this default guarantees nothing, and what would
    assert predictor.notes == [f"{model_dir} stores no calibrated operating point: using rule consistentee at its "
                               "default knob 0.5, which guarantees no accuracy; `consistentee calibrate` chooses one "
                               "for a budget"]
    assert EarlyExitPredictor.from_pretrained(model_dir, device="cpu", rule="consistentee").notes == []


def test_a_run_directory_resolves_to_its_one_trained_policy_model(tmp_path, model_dir, capsys):
    from consistentee.inference.predictor import resolve_model

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "stage1" / "model")
    (run / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="has no trained ConsistentEE policy"):
        resolve_model(run)
    path, note = resolve_model(run, rule="entropy")  # exits only: the stage-1 model is right
    assert path == run / "stage1" / "model" and "for rule 'entropy'" in note
    policy = run / "policies" / "beta-0.05"
    shutil.copytree(model_dir, policy / "model")
    with pytest.raises(ValueError, match="policy training is not finished"):
        resolve_model(run)
    (policy / "progress.json").write_text(json.dumps({"complete": True}))
    path, note = resolve_model(run)
    assert path == policy / "model" and "its trained ConsistentEE policy model" in note
    source = tmp_path / "in.txt"
    source.write_text("fine\nawful\n")
    assert predict_cli.run(_args("--model", str(run), "--input", str(source))) == 0
    assert f"consistentee: run directory {run}: using {policy / 'model'}" in capsys.readouterr().err


def test_top_k_scores_are_sorted_and_complete(model_dir, helpers):
    from consistentee.inference import EarlyExitPredictor

    predictor = EarlyExitPredictor.from_pretrained(model_dir, device="cpu", rule="entropy", knob=0.3)
    plain = predictor.predict(helpers.TEXTS)
    ranked = predictor.predict(helpers.TEXTS, top_k="all")
    for p, r in zip(plain, ranked, strict=True):
        assert {k: r[k] for k in ("label", "probability", "exit_layer")} == p
        assert [s["label"] for s in r["scores"]][0] == p["label"] and len(r["scores"]) == 2
        assert r["scores"][0]["probability"] >= r["scores"][1]["probability"]
        assert sum(s["probability"] for s in r["scores"]) == pytest.approx(1.0, abs=1e-5)
    assert [len(r["scores"]) for r in predictor.predict(helpers.TEXTS[:3], top_k=1)] == [1, 1, 1]
    assert len(predictor.predict("fine", top_k=10)[0]["scores"]) == 2  # capped at the number of labels
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        predictor.predict("fine", top_k=0)


def test_knobs_are_range_checked_against_the_depth(model_dir):
    from consistentee.exits.rules import make_rule
    from consistentee.inference import EarlyExitPredictor

    predictor = EarlyExitPredictor.from_pretrained(model_dir, device="cpu", rule="static", knob=6)
    assert predictor.rule.knob == 6  # the last layer is a valid (full-depth) choice
    for rule, knob in (("static", 7), ("patience", 99), ("pcee", (7, 0.1))):
        with pytest.raises(ValueError, match="beyond the model's 6 layers"):
            EarlyExitPredictor.from_pretrained(model_dir, device="cpu", rule=rule, knob=knob)
    with pytest.raises(ValueError, match="beyond the model's 6 layers"):
        predictor.engine(make_rule("static", 9))
    with pytest.raises(ValueError, match="finite"):
        EarlyExitPredictor.from_pretrained(model_dir, device="cpu", rule="entropy", knob=float("nan"))


def test_predictions_stream_batch_by_batch(model_dir, helpers):
    from consistentee.inference import EarlyExitPredictor

    predictor = EarlyExitPredictor.from_pretrained(model_dir, device="cpu", rule="entropy", knob=0.3)
    stream = predictor.iter_predict(helpers.TEXTS, batch_size=4)
    calls = predictor.engine_calls
    first = [next(stream) for _ in range(4)]
    assert predictor.engine_calls == calls + 1  # the first batch is out before the second one runs
    rest = list(stream)
    assert first + rest == predictor.predict(helpers.TEXTS, batch_size=4)
    sorted_stream = list(predictor.iter_predict(helpers.TEXTS, batch_size=3, sort_by_length=True))
    expected = predictor.predict(helpers.TEXTS)  # input order even when batches are sorted (padding differs)
    assert [(r["label"], r["exit_layer"]) for r in sorted_stream] == [(r["label"], r["exit_layer"]) for r in expected]
    assert [r["probability"] for r in sorted_stream] == pytest.approx([r["probability"] for r in expected], abs=1e-5)


def test_predict_writes_each_batch_to_stdout_as_it_finishes(model_dir, tmp_path, helpers, monkeypatch):
    from consistentee.inference.predictor import EarlyExitPredictor

    source = tmp_path / "in.txt"
    source.write_text("\n".join(helpers.TEXTS[:8]) + "\n")
    seen: list[tuple[int, int]] = []  # (lines written so far, engine calls so far) at each write

    class Recorder(io.StringIO):
        predictor = None

        def write(self, text):
            seen.append((self.getvalue().count("\n"), Recorder.predictor.engine_calls))
            return super().write(text)

    original = EarlyExitPredictor.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        Recorder.predictor = original(cls, *args, **kwargs)
        return Recorder.predictor

    monkeypatch.setattr(EarlyExitPredictor, "from_pretrained", classmethod(spy))
    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    args = _args("--model", str(model_dir), "--input", str(source), "--rule", "entropy", "--batch-size", "4",
                 "--top-k", "2")
    assert predict_cli.run(args) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(rows) == 8 and all(len(r["scores"]) == 2 for r in rows)
    assert seen[0] == (0, 1)  # the first line went out after one engine call, not after all of them
    assert seen[-1][1] == 2
