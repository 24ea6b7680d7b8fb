"""The Hugging Face face of the model: Auto classes, pipeline, ``.logits``/loss, operating point, hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from consistentee.exits.operating_point import OperatingPoint, save_operating_point
from consistentee.model.constants import FORMAT_VERSION
from consistentee.model.modeling import EarlyExitForSequenceClassification

from .conftest import LABELS, TEXTS


def _batch(model_dir, texts=TEXTS):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(texts, padding=True, return_tensors="pt")


def _copy(src, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _separating_confidence(model_dir) -> float:
    """A confidence threshold far from every row's layer-1/2 confidence that exits some rows at layer 1 only."""
    model = EarlyExitForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        conf = model(**_batch(model_dir)).exit_logits.softmax(-1).max(-1).values[:, :-1]
    values = conf.flatten().sort().values.tolist()
    best, best_margin = None, -1.0
    for lo, hi in zip(values, values[1:], strict=False):
        tau = (lo + hi) / 2
        first = int((conf[:, 0] >= tau).sum())
        if 2 <= first <= len(conf) - 2 and hi - lo > best_margin:
            best, best_margin = tau, hi - lo
    assert best is not None and best_margin > 1e-3, "the fixture model does not separate the rows"
    return best


def test_auto_classes_and_pipeline_give_the_predictors_labels_at_the_stored_operating_point(hf_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

    from consistentee.inference.predictor import EarlyExitPredictor

    folder = _copy(hf_model_dir, tmp_path / "m")
    tau = _separating_confidence(folder)
    save_operating_point(folder, OperatingPoint(rule="confidence", knob=tau))

    assert type(AutoConfig.from_pretrained(folder)).__name__ == "EarlyExitConfig"
    auto = AutoModelForSequenceClassification.from_pretrained(folder)
    assert isinstance(auto, EarlyExitForSequenceClassification) and not auto.training
    out = auto(**_batch(folder))
    exits = out.exit_layer.tolist()
    auto_labels = [LABELS[i] for i in out.logits.argmax(-1).tolist()]
    full_depth = [LABELS[i] for i in out.exit_logits[:, -1].argmax(-1).tolist()]
    assert len(set(exits)) > 1 and auto_labels != full_depth  # the operating point matters here

    expected = EarlyExitPredictor.from_pretrained(folder, rule="confidence", knob=tau, device="cpu").predict(TEXTS)
    assert auto_labels == [row["label"] for row in expected]
    assert exits == [row["exit_layer"] for row in expected]

    classifier = pipeline("text-classification", model=str(folder), device="cpu")
    piped = classifier(TEXTS)
    assert [row["label"] for row in piped] == auto_labels
    for row, want in zip(piped, expected, strict=True):
        assert row["score"] == pytest.approx(want["probability"], abs=1e-4)


def test_forward_returns_the_logits_of_the_exit_taken_and_a_mean_exit_loss(hf_model_dir):
    model = EarlyExitForSequenceClassification.from_pretrained(hf_model_dir)
    batch = _batch(hf_model_dir)
    labels = torch.tensor([1] * 8 + [0] * 8)
    out = model(**batch, labels=labels, exit_rule="static", exit_knob=2)
    assert out.exit_layer.tolist() == [2] * len(TEXTS)
    assert torch.equal(out.logits, out.exit_logits[:, 1])
    per_exit = [F.cross_entropy(out.exit_logits[:, i], labels) for i in range(model.num_layers)]
    assert out.loss.item() == pytest.approx(torch.stack(per_exit).mean().item(), rel=1e-5)
    assert out.policy_probs.shape == (len(TEXTS), model.num_layers - 1)
    assert out.policy_probs.dtype == torch.float64  # see test_rules: saturated policies stay ordered
    assert torch.allclose(out.policy_probs, out.policy_logits.double().sigmoid())
    assert out["logits"] is out.logits and out.to_tuple()[0] is out.loss

    model.train()
    trained = model(**batch, labels=labels)
    assert trained.exit_layer.shape == (len(TEXTS),) and trained.loss.requires_grad
    trained.loss.backward()
    assert model.exits[0].weight.grad is not None


@pytest.mark.parametrize(("rule", "knob"), [("entropy", 0.3), ("confidence", 0.9), ("patience", 2),
                                            ("pcee", (2, 0.4)), ("static", 2), ("consistentee", 0.5)])
def test_the_exit_taken_is_what_simulate_exits_gives_for_every_rule(hf_model_dir, rule, knob):
    from consistentee.exits.rules import make_rule, simulate_exits

    model = EarlyExitForSequenceClassification.from_pretrained(hf_model_dir)
    with torch.no_grad():
        out = model(**_batch(hf_model_dir), exit_rule=rule, exit_knob=knob)
    want = simulate_exits(make_rule(rule, knob), out.exit_logits.softmax(-1), policy_probs=out.policy_probs)
    assert torch.equal(out.exit_layer, want.exit_layer)
    assert torch.equal(out.logits.argmax(-1), want.predictions)


def test_a_stored_learned_operating_point_warns_and_reports_full_depth(hf_model_dir, tmp_path):
    from consistentee.model.constants import ModelFormatWarning

    folder = _copy(hf_model_dir, tmp_path / "m")
    save_operating_point(folder, OperatingPoint(rule="learned", knob=0.5))
    model = EarlyExitForSequenceClassification.from_pretrained(folder)
    with pytest.warns(ModelFormatWarning, match="learned exit heads"):
        out = model(**_batch(folder))
    assert out.exit_layer.tolist() == [model.num_layers] * len(TEXTS)
    with pytest.raises(ValueError, match="learned exit heads"):
        model(**_batch(folder), exit_rule="learned", exit_knob=0.5)


def test_the_default_operating_point_is_full_depth_then_trained_policies_then_the_stored_one(hf_model_dir, tmp_path):
    folder = _copy(hf_model_dir, tmp_path / "m")
    batch = _batch(folder)
    model = EarlyExitForSequenceClassification.from_pretrained(folder)
    assert model.exit_rule().name == "static" and "full depth" in model.describe_operating_point()
    assert model(**batch).exit_layer.tolist() == [model.num_layers] * len(TEXTS)

    model.config.extra["policy_training"] = {"beta": 0.1}  # what stage 2/3 records
    model.save_pretrained(folder)
    model = EarlyExitForSequenceClassification.from_pretrained(folder)
    out = model(**batch)
    want = model(**batch, exit_rule="consistentee", exit_knob=0.5).exit_layer
    assert model.exit_rule().name == "consistentee" and torch.equal(out.exit_layer, want)
    assert len(set(want.tolist())) > 1

    save_operating_point(folder, OperatingPoint(rule="static", knob=1))
    model = EarlyExitForSequenceClassification.from_pretrained(folder)
    assert model(**batch).exit_layer.tolist() == [1] * len(TEXTS)
    model.save_pretrained(tmp_path / "copy")  # the operating point travels with the model
    assert json.loads((tmp_path / "copy" / "operating_point.json").read_text())["knob"] == 1

    model.reset_policies("state", 8)  # new policies are untrained again
    assert "policy_training" not in model.config.extra and not model.policies_trained


def test_save_pretrained_writes_labels_tokenizer_and_a_model_card(tiny_encoder_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["neg", "pos", "neutral"])
    model.config.extra.update(dataset="rt-snippets (80/10/10 split)", command="consistentee train --dataset rt",
                              metrics={"test_accuracy": 0.8712, "speedup": 2.31})
    model.operating_point = OperatingPoint(rule="entropy", knob=0.2, calibration={"max_loss_points": 1.0})
    model.save_pretrained(tmp_path / "m", tokenizer=tokenizer)
    data = json.loads((tmp_path / "m" / "config.json").read_text())
    assert data["model_type"] == "consistentee-early-exit" and data["format_version"] == FORMAT_VERSION == 3
    assert data["id2label"] == {"0": "neg", "1": "pos", "2": "neutral"}
    assert data["label2id"] == {"neg": 0, "pos": 1, "neutral": 2}
    assert "id2label" not in data["backbone"]  # no LABEL_0/LABEL_1 left from the encoder
    assert AutoTokenizer.from_pretrained(tmp_path / "m").vocab_size == tokenizer.vocab_size
    card = (tmp_path / "m" / "README.md").read_text()
    for text in ("pipeline_tag", "rt-snippets", "consistentee train --dataset rt", "0.8712", "2.31",
                 "entropy", "| 2 | neutral |", tiny_encoder_dir):
        assert text in card
    assert "base_model:" not in card  # a local path is not hub metadata


def test_inherited_push_to_hub_uploads_what_save_pretrained_writes(hf_model_dir, monkeypatch):
    import transformers.utils.hub as hub

    uploaded = {}

    class Api:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    class Card:
        def save(self, path):
            Path(path).write_text("hub card\n")

    def upload(self, folder, repo_id, *args, **kwargs):
        uploaded["files"] = sorted(p.name for p in Path(folder).iterdir())
        uploaded["config"] = json.loads((Path(folder) / "config.json").read_text())

    monkeypatch.setattr(hub, "hf_api", lambda *a, **k: Api())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: Card())
    monkeypatch.setattr(EarlyExitForSequenceClassification, "_upload_modified_files", upload)
    model = EarlyExitForSequenceClassification.from_pretrained(hf_model_dir)
    model.push_to_hub("someone/tiny-early-exit")
    assert {"config.json", "model.safetensors"} <= set(uploaded["files"])
    assert len(uploaded["config"]["weights_sha256"]) == 64


def test_a_hub_id_is_downloaded_and_loaded_like_a_folder(hf_model_dir, monkeypatch):
    import huggingface_hub

    calls = []

    def download(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("revision"), kwargs.get("allow_patterns")))
        return hf_model_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    model = EarlyExitForSequenceClassification.from_pretrained("someone/tiny-early-exit", revision="v1")
    assert model.config.label_names == LABELS
    repo, revision, patterns = calls[0]
    assert (repo, revision) == ("someone/tiny-early-exit", "v1")
    assert "*.bin" not in patterns and all("pt" not in p for p in patterns)  # never a pickle


def test_import_is_cheap_and_registers_lazily_in_a_fresh_process(hf_model_dir):
    code = (
        "import sys, consistentee\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'import consistentee is heavy'\n"
        "from transformers import AutoModelForSequenceClassification as A\n"
        "m = A.from_pretrained(sys.argv[1])\n"
        "print(type(m).__name__, m.config.label_names, consistentee.__version__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", code, hf_model_dir], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from importlib.metadata import version

    assert result.stdout.split() == ["EarlyExitForSequenceClassification", "['negative',", "'positive']",
                                     version("consistentee")]
