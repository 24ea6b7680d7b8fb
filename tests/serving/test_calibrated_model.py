"""A calibrated model folder round-trips: ``consistentee calibrate`` writes the operating point, and
``predict`` and ``serve`` run it when no rule or knob is given, and say so."""

from __future__ import annotations

import argparse
import json
import shutil

import httpx
import pytest

from consistentee.cli import predict as predict_cli
from consistentee.cli import serve as serve_cli
from consistentee.cli.main import main
from consistentee.exits.operating_point import load_operating_point

TEXTS = ["a gorgeous witty film", "tedious and overlong", "moving", "boring, I walked out", "a delight"]


def _calibrate(folder, calibration_csv, *extra: str) -> int:
    return main(["calibrate", "--model", str(folder), "--dataset", calibration_csv, "--dev-file", calibration_csv,
                 "--test-file", calibration_csv, "--split", "dev", "--max-length", "32", "--device", "cpu",
                 "--no-progress", *extra])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, served_model_dir, calibration_csv):
    """A copy of the served model calibrated for 20 points on 240 dev rows (no capsys here: the server tests
    below must not log into a captured stream that pytest closes)."""
    folder = tmp_path_factory.mktemp("calibrated") / "model"
    shutil.copytree(served_model_dir, folder)
    assert _calibrate(folder, calibration_csv, "--max-loss", "20", "--delta", "0.1", "--rule", "entropy",
                      "--grid-points", "50") == 0
    return folder


def test_calibrate_says_what_it_chose(tmp_path, served_model_dir, calibration_csv, capsys):
    folder = tmp_path / "model"
    shutil.copytree(served_model_dir, folder)
    assert _calibrate(folder, calibration_csv, "--max-loss", "20", "--rule", "entropy", "--dry-run") == 0
    captured = capsys.readouterr()
    assert "operating point: rule entropy" in captured.err and "certified" in captured.err
    assert json.loads(captured.out)["rule"] == "entropy"
    assert not (folder / "operating_point.json").exists()  # --dry-run writes nothing


def test_calibrate_writes_a_point_with_its_guarantee(calibrated):
    point = load_operating_point(calibrated)
    assert point.rule == "entropy" and point.knob > 0
    c = point.calibration
    assert c["max_loss_points"] == 20 and c["delta"] == 0.1 and c["loss"] == "accuracy_drop"
    assert c["calibration_examples"] == 240 and c["split"] == "dev" and c["certified"] >= 1
    assert "full-depth correct minus early-exit correct" in c["loss_definition"]


def _predict_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    predict_cli.add_parser(parser.add_subparsers(dest="verb"))
    return parser.parse_args(["predict", "--device", "cpu", "--no-progress", *argv])


def _expected(folder):
    from consistentee.inference import EarlyExitPredictor

    point = load_operating_point(folder)
    explicit = EarlyExitPredictor.from_pretrained(folder, rule=point.rule, knob=point.rule_knob(), device="cpu")
    return [(r["label"], r["exit_layer"]) for r in explicit.predict(TEXTS)]


def test_predict_runs_the_calibrated_point_and_says_so(calibrated, tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "out.jsonl"
    assert predict_cli.run(_predict_args("--model", str(calibrated), "--input", str(inputs), "--output", str(out))) == 0
    assert "using the calibrated operating point: rule entropy" in capsys.readouterr().err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["label"], r["exit_layer"]) for r in got] == _expected(calibrated)


def test_serve_runs_the_calibrated_point(calibrated, start_server):
    parser = argparse.ArgumentParser()
    serve_cli.add_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["serve", "--model", str(calibrated), "--device", "cpu"])
    notes = []
    app, _ = serve_cli.build_app(args, log=notes.append)
    assert any("using the calibrated operating point: rule entropy" in n for n in notes)
    assert app.state.predictor.rule.name == "entropy"
    server = start_server(app.state.predictor)
    with httpx.Client(base_url=server.url, timeout=10) as client:
        served = client.post("/predict", json={"texts": TEXTS}).json()["predictions"]
    assert [(r["label"], r["exit_layer"]) for r in served] == _expected(calibrated)


def test_a_budget_nothing_meets_sets_full_depth_and_says_so(tmp_path, served_model_dir, calibration_csv, capsys):
    folder = tmp_path / "model"
    shutil.copytree(served_model_dir, folder)
    assert _calibrate(folder, calibration_csv, "--max-loss", "0.01", "--rule", "confidence") == 0
    assert "runs at full depth" in capsys.readouterr().err
    point = load_operating_point(folder)
    assert (point.rule, point.knob) == ("static", 3)


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-loss", "0"], "--max-loss must lie in (0, 100)"),
    (["--delta", "1.5"], "--delta must lie in (0, 1)"),
    (["--grid-points", "1"], "--grid-points must be >= 2"),
    (["--order-examples", "0"], "--order-examples must be >= 1"),
])
def test_bad_calibration_options_are_one_line_errors(tmp_path, served_model_dir, calibration_csv, capsys, argv,
                                                     message):
    folder = tmp_path / "model"
    shutil.copytree(served_model_dir, folder)
    rc = main(["calibrate", "--model", str(folder), "--dataset", calibration_csv, "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (folder / "operating_point.json").exists()


def test_pcee_is_calibrated_as_one_chain_ordered_on_training_rows(tmp_path, served_model_dir, calibration_csv,
                                                                  capsys):
    folder = tmp_path / "model"
    shutil.copytree(served_model_dir, folder)
    assert _calibrate(folder, calibration_csv, "--max-loss", "20", "--rule", "pcee", "--grid-points", "20",
                      "--order-examples", "100", "--dry-run") == 0
    captured = capsys.readouterr()
    chained = json.loads(captured.out)["calibration"]
    assert chained["order"] == "train (100 training rows)" and chained["sequences_tested"] == 1
    assert "one chain ordered on 100 training rows" in captured.err
    assert _calibrate(folder, calibration_csv, "--max-loss", "20", "--rule", "pcee", "--grid-points", "20",
                      "--calibration-order", "knobs", "--dry-run") == 0
    separate = json.loads(capsys.readouterr().out)["calibration"]
    assert separate["order"] == "knobs" and separate["sequences_tested"] > 1  # one per patience, delta split
    assert _calibrate(folder, calibration_csv, "--max-loss", "20", "--rule", "entropy", "--dry-run") == 0
    assert json.loads(capsys.readouterr().out)["calibration"]["order"] == "single sequence"


def test_auto_certifies_confidence_on_a_consistentee_model_too(tmp_path, served_model_dir, calibration_csv, capsys):
    """On ConsistentEE models a confidence threshold certifies faster points than their policy
    (docs/calibration.md, "Which rule"), so auto calibrates it whatever trained the model."""
    folder = tmp_path / "model"
    shutil.copytree(served_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault("extra", {})["policy_training"] = {"beta": 0.05, "completed": ["r1-policy"]}
    (folder / "config.json").write_text(json.dumps(config))
    for rule, searched in (("auto", "confidence"), ("consistentee", "consistentee")):
        assert _calibrate(folder, calibration_csv, "--max-loss", "20", "--rule", rule, "--grid-points", "20",
                          "--dry-run") == 0
        assert json.loads(capsys.readouterr().out)["calibration"]["rule_searched"] == searched
