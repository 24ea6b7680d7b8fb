"""The text-in predictor: saved directories, run directories, order, pairs, validation."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from consistentee.data.tokenize import collate
from consistentee.exits.rules import make_rule
from consistentee.inference import EarlyExitEngine, EarlyExitPredictor, parse_knob


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory, tiny_model, tiny_tokenizer):
    path = tmp_path_factory.mktemp("saved") / "model"
    tiny_model.save_pretrained(path, tokenizer=tiny_tokenizer)
    return path


def _engine_reference(model, tokenizer, texts, pairs=None, rule=("entropy", 0.3)):
    encoded = tokenizer(texts, pairs)
    items = [{k: encoded[k][i] for k in ("input_ids", "attention_mask", "token_type_ids")} | {"index": i}
             for i in range(len(texts))]
    batch = collate(items, tokenizer.pad_token_id)
    out = EarlyExitEngine(model, make_rule(*rule))(batch["input_ids"], batch["attention_mask"],
                                                   batch["token_type_ids"])
    names = model.config.label_names
    return [(names[p], layer) for p, layer in zip(out.predictions.tolist(), out.exit_layers.tolist(), strict=True)]


def _same(a: dict, b: dict) -> None:
    """Same label and exit; the probability up to float noise (padding changes the summation order)."""
    assert (a["label"], a["exit_layer"]) == (b["label"], b["exit_layer"])
    assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_round_trip_through_saved_dir(saved_dir, tiny_model, tiny_tokenizer, helpers):
    predictor = EarlyExitPredictor.from_pretrained(saved_dir, rule="entropy", knob=0.3, device="cpu")
    results = predictor.predict(helpers.TEXTS, batch_size=5)
    assert [set(r) for r in results] == [{"label", "probability", "exit_layer"}] * len(helpers.TEXTS)
    expected = _engine_reference(tiny_model, tiny_tokenizer, helpers.TEXTS)
    assert [(r["label"], r["exit_layer"]) for r in results] == expected
    assert all(0.5 <= r["probability"] <= 1.0 for r in results)
    assert len({r["exit_layer"] for r in results}) >= 2
    assert predictor.engine_calls == 5  # ceil(24 / 5)
    # a single text, and a per-call rule override
    _same(predictor.predict(helpers.TEXTS[2])[0], results[2])
    static = predictor.predict(helpers.TEXTS[:3], rule="static", knob=1)
    assert [r["exit_layer"] for r in static] == [1, 1, 1]
    assert [r["exit_layer"] for r in predictor.predict(helpers.TEXTS[:3], knob=0.0)] == [3, 3, 3]


def test_sort_by_length_keeps_input_order(saved_dir, helpers):
    predictor = EarlyExitPredictor.from_pretrained(saved_dir, rule="patience", knob=2, device="cpu")
    plain = predictor.predict(helpers.TEXTS, batch_size=4)
    predictor.engine_calls = 0
    sorted_ = predictor.predict(helpers.TEXTS, batch_size=4, sort_by_length=True)
    assert [(r["label"], r["exit_layer"]) for r in sorted_] == [(r["label"], r["exit_layer"]) for r in plain]
    for a, b in zip(sorted_, plain, strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    assert predictor.engine_calls == 6


def test_pairs(saved_dir, tiny_model, tiny_tokenizer, helpers):
    predictor = EarlyExitPredictor.from_pretrained(saved_dir, rule="entropy", knob=0.3, device="cpu")
    firsts, seconds = helpers.TEXTS[:8], helpers.TEXTS[8:16]
    results = predictor.predict(list(zip(firsts, seconds, strict=True)), batch_size=3, sort_by_length=True)
    assert [(r["label"], r["exit_layer"]) for r in results] == _engine_reference(
        tiny_model, tiny_tokenizer, firsts, seconds)
    # mixed singles and pairs keep their places
    mixed = predictor.predict([firsts[0], (firsts[1], seconds[1]), firsts[2]])
    _same(mixed[1], results[1])
    _same(mixed[0], predictor.predict(firsts[0])[0])


def test_run_directory_and_learned_heads(tmp_path, saved_dir, monkeypatch, helpers, tiny_model):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(saved_dir, run_dir / "stage1" / "model")
    (run_dir / "run.json").write_text(json.dumps({"data": {}, "model": {}}))
    predictor = EarlyExitPredictor.from_pretrained(run_dir, rule="confidence", knob=0.9, device="cpu")
    assert predictor.num_layers == 3 and predictor.label_names == ["a", "b"]

    stand_in = helpers.StandInLearnedHeads(tiny_model.backbone.hidden_size, tiny_model.num_layers)
    loaded = []
    fake = types.ModuleType("consistentee.exits.learned")
    fake.LearnedExitHeads = type("LearnedExitHeads", (), {
        "load": staticmethod(lambda directory, device="cpu": loaded.append(str(directory)) or stand_in)})
    monkeypatch.setitem(sys.modules, "consistentee.exits.learned", fake)
    learned = EarlyExitPredictor.from_pretrained(run_dir, rule="learned", knob=0.5, device="cpu",
                                                 learned_heads_dir=tmp_path / "heads")
    assert loaded == [str(tmp_path / "heads")]
    results = learned.predict(helpers.TEXTS[:6])
    assert len(results) == 6 and stand_in.calls
    with pytest.raises(ValueError, match="learned exit heads"):
        predictor.predict(helpers.TEXTS[:2], rule="learned")


def test_real_learned_heads_directory(tmp_path, saved_dir, tiny_model, helpers):
    learned = pytest.importorskip("consistentee.exits.learned")
    heads = learned.LearnedExitHeads(tiny_model.backbone.hidden_size, tiny_model.num_layers)
    heads.save(tmp_path / "heads")
    predictor = EarlyExitPredictor.from_pretrained(saved_dir, rule="learned", knob=0.5, device="cpu",
                                                   learned_heads_dir=tmp_path / "heads")
    results = predictor.predict(helpers.TEXTS[:5])
    assert all(1 <= r["exit_layer"] <= 3 for r in results)


def test_validation_errors(saved_dir, tmp_path):
    predictor = EarlyExitPredictor.from_pretrained(saved_dir, rule="entropy", knob=0.3, device="cpu",
                                                   max_length=16)
    with pytest.raises(ValueError, match="input 1: empty text"):
        predictor.predict(["fine", "   "])
    with pytest.raises(ValueError, match="input 0: empty text pair"):
        predictor.predict([("fine", "")])
    long_text = "word " * 40
    with pytest.raises(ValueError, match="input 0 is too long: .* max_length 16"):
        predictor.predict([long_text])
    assert len(predictor.predict([long_text], truncation=True)) == 1
    with pytest.raises(ValueError, match="input 0: expected a text"):
        predictor.predict([3])
    with pytest.raises(ValueError, match="oracle"):
        predictor.predict(["fine"], rule="oracle")
    with pytest.raises(ValueError, match="batch_size"):
        predictor.predict(["fine"], batch_size=0)
    with pytest.raises(ValueError, match="max_length"):
        predictor.predict(["fine"], max_length=100_000)
    assert predictor.predict([]) == []
    with pytest.raises(FileNotFoundError, match="no such model"):
        EarlyExitPredictor.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a model directory"):
        EarlyExitPredictor.from_pretrained(tmp_path / "empty")
    (tmp_path / "run" / "stage1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run directory without a finished model"):
        EarlyExitPredictor.from_pretrained(tmp_path / "run")


def test_parse_knob():
    assert parse_knob("patience", "3") == 3
    assert parse_knob("pcee", "2,0.25") == (2, 0.25)
    assert parse_knob("entropy", "0.2") == 0.2
    assert parse_knob("consistentee", None) is None
    with pytest.raises(ValueError, match="not an integer"):
        parse_knob("static", "1.5")
    with pytest.raises(ValueError, match="unknown exit rule"):
        parse_knob("nope", "1")
    with pytest.raises(ValueError, match="no knob"):
        parse_knob("oracle", "1")
    assert torch.get_num_threads() == 1  # the autouse fixture of this folder
