"""The saved format: versions, legacy folders, unknown keys, type errors, labels, checksums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from consistentee.model.configuration import EarlyExitConfig
from consistentee.model.constants import FORMAT_VERSION, ModelFormatError, ModelFormatWarning
from consistentee.model.modeling import EarlyExitForSequenceClassification

LEGACY = Path(__file__).parent / "data" / "legacy_format1"


def _copy(src, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_format1_folder_from_the_previous_code_loads_with_the_same_outputs(tmp_path):
    """The fixture was written by the pre-transformers save code (format 1, no policy checksum)."""
    raw = json.loads((LEGACY / "config.json").read_text())
    assert raw["format_version"] == 1 and "model_type" not in raw and "weights_sha256" not in raw
    expected = json.loads((LEGACY / "expected.json").read_text())
    model = EarlyExitForSequenceClassification.from_pretrained(LEGACY)
    assert model.config.label_names == ["negative", "positive"] and model.config.policy_features == "state"
    assert model.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        out = model(torch.tensor(expected["input_ids"]), torch.tensor(expected["attention_mask"]))
    assert torch.allclose(out.exit_logits, torch.tensor(expected["exit_logits"]), atol=1e-6)
    assert torch.allclose(out.policy_logits, torch.tensor(expected["policy_logits"]), atol=1e-6)
    assert out.exit_layer.tolist() == [2, 2]  # untrained policies, no operating point: full depth

    model.save_pretrained(tmp_path / "upgraded")  # saving again upgrades it
    data = json.loads((tmp_path / "upgraded" / "config.json").read_text())
    assert data["format_version"] == FORMAT_VERSION and len(data["weights_sha256"]) == 64
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "upgraded").label_names == ["negative", "positive"]


def test_a_format1_folder_without_policy_features_gets_the_policies_of_that_time(tmp_path):
    folder = _copy(LEGACY, tmp_path / "m")
    _edit_config(folder, lambda d: d.pop("policy_features"))
    assert EarlyExitForSequenceClassification.from_pretrained(folder).config.policy_features == "state"


def test_a_missing_field_of_the_folders_own_format_is_an_error_not_a_default(hf_model_dir, tmp_path):
    folder = _copy(hf_model_dir, tmp_path / "m")
    _edit_config(folder, lambda d: d.pop("pooling"))
    with pytest.raises(ModelFormatError, match=r"config\.json: missing field\(s\) 'pooling'"):
        EarlyExitForSequenceClassification.from_pretrained(folder)


def test_a_newer_folder_with_unknown_keys_loads_with_a_warning_naming_them(hf_model_dir, tmp_path):
    folder = _copy(hf_model_dir, tmp_path / "m")
    _edit_config(folder, lambda d: d.update(format_version=FORMAT_VERSION + 1, exit_cache={"size": 3}, zeta=1))
    with pytest.warns(ModelFormatWarning, match=r"newer consistentee.*'exit_cache', 'zeta'"):
        model = EarlyExitForSequenceClassification.from_pretrained(folder)
    assert not hasattr(model.config, "exit_cache")
    from transformers import AutoModelForSequenceClassification

    with pytest.warns(ModelFormatWarning, match="exit_cache"):
        AutoModelForSequenceClassification.from_pretrained(folder)


def test_a_folder_that_needs_a_newer_reader_is_refused(hf_model_dir, tmp_path):
    folder = _copy(hf_model_dir, tmp_path / "m")
    _edit_config(folder, lambda d: d.update(format_version=FORMAT_VERSION + 1, min_reader_format=FORMAT_VERSION + 1))
    with pytest.raises(ModelFormatError, match="newer consistentee.*upgrade"):
        EarlyExitForSequenceClassification.from_pretrained(folder)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("backbone.num_hidden_layers", "six", "'backbone.num_hidden_layers' must be an integer >= 1, got 'six'"),
    ("backbone.layer_norm_eps", "tiny", "'backbone.layer_norm_eps'"),
    ("backbone.model_type", "no-such-model", "'backbone.model_type'"),
    ("pooling", 3, "'pooling'"),
    ("policy_hidden_size", "32", "'policy_hidden_size' must be an integer >= 1"),
    ("classifier_dropout", "0.1", "'classifier_dropout' must be a number"),
    ("label_names", "ab", "'label_names' must be a list"),
    ("extra", [], "'extra' must be an object"),
    ("format_version", "2", "'format_version' must be an integer"),
    ("weights_sha256", "abc", "'weights_sha256' must be a hex sha256"),
])
def test_a_wrong_type_is_a_one_line_error_naming_the_file_and_the_field(hf_model_dir, tmp_path, field, value, message):
    folder = _copy(hf_model_dir, tmp_path / "m")

    def change(data):
        target, *rest = field.split(".")
        if rest:
            data[target][rest[0]] = value
        else:
            data[target] = value
    _edit_config(folder, change)
    with pytest.raises(ValueError) as info:
        EarlyExitForSequenceClassification.from_pretrained(folder)
    text = str(info.value)
    assert "\n" not in text and str(folder / "config.json") in text and message in text


def test_label_names_must_be_unique(hf_model_dir, tmp_path, tiny_encoder_dir):
    with pytest.raises(ModelFormatError, match="duplicate label"):
        EarlyExitConfig(backbone={}, label_names=["x", "y", "x"])
    with pytest.raises(ModelFormatError, match="duplicate label"):
        EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["x", "x"])
    folder = _copy(hf_model_dir, tmp_path / "m")
    _edit_config(folder, lambda d: d.update(label_names=["x", "x"], id2label={"0": "x", "1": "x"}))
    with pytest.raises(ModelFormatError, match=r"config\.json: field 'label_names' has duplicate label\(s\) 'x'"):
        EarlyExitForSequenceClassification.from_pretrained(folder)
    legacy = _copy(LEGACY, tmp_path / "legacy")
    _edit_config(legacy, lambda d: d.update(label_names=["x", "x"]))
    with pytest.raises(ModelFormatError, match="duplicate label"):
        EarlyExitForSequenceClassification.from_pretrained(legacy)


def test_id2label_that_disagrees_with_label_names_is_refused(hf_model_dir, tmp_path):
    folder = _copy(hf_model_dir, tmp_path / "m")
    _edit_config(folder, lambda d: d.update(id2label={"0": "positive", "1": "negative"}))
    with pytest.raises(ModelFormatError, match="'id2label'.*disagrees"):
        EarlyExitForSequenceClassification.from_pretrained(folder)


def _data_offset(path: Path) -> int:
    header = int.from_bytes(path.read_bytes()[:8], "little")
    return 8 + header


def test_corrupted_weights_are_a_clear_error_never_nan_outputs(hf_model_dir, tmp_path):
    folder = _copy(hf_model_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    start = _data_offset(weights)
    data[start + 4096:start + 4096 + 64 * 1024] = b"\xff" * (64 * 1024)  # NaN bit patterns inside the tensors
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=r"model\.safetensors is corrupted: its sha256"):
        EarlyExitForSequenceClassification.from_pretrained(folder)
    from transformers import pipeline

    with pytest.raises(ValueError, match="corrupted"):  # transformers wraps loading errors in its own ValueError
        pipeline("text-classification", model=str(folder))

    _edit_config(folder, lambda d: d.pop("weights_sha256"))  # a folder without a checksum: NaNs are still caught
    with pytest.raises(ModelFormatError, match="holds NaN or infinite values"):
        EarlyExitForSequenceClassification.from_pretrained(folder)


def test_a_changed_but_finite_weights_file_is_caught_by_the_checksum(hf_model_dir, tmp_path):
    folder = _copy(hf_model_dir, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[_data_offset(weights) + 100] ^= 0x01  # one low mantissa bit: still a finite number
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="corrupted"):
        EarlyExitForSequenceClassification.from_pretrained(folder)


def test_saving_never_writes_pickle_and_refuses_unsafe_serialization(hf_model_dir, tmp_path):
    model = EarlyExitForSequenceClassification.from_pretrained(hf_model_dir)
    with pytest.raises(ValueError, match="safetensors"):
        model.save_pretrained(tmp_path / "m", safe_serialization=False)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="safetensors"):
        EarlyExitForSequenceClassification.from_pretrained(hf_model_dir, use_safetensors=False)


def test_the_version_comes_from_the_package_metadata_and_is_recorded(hf_model_dir):
    from importlib.metadata import version

    import consistentee

    assert consistentee.__version__ == version("consistentee")
    assert json.loads((Path(hf_model_dir) / "config.json").read_text())["consistentee_version"] == version("consistentee")


def test_a_format1_policy_model_in_a_finished_run_keeps_its_trained_policies(tmp_path):
    """Folders trained before ``extra["policy_training"]`` existed: the run's progress.json says so."""
    folder = _copy(LEGACY, tmp_path / "run" / "policies" / "beta-0.1" / "model")
    assert EarlyExitForSequenceClassification.from_pretrained(folder).exit_rule().name == "static"
    (folder.parent / "progress.json").write_text('{"complete": true}')
    model = EarlyExitForSequenceClassification.from_pretrained(folder)
    assert model.policies_trained and model.exit_rule().name == "consistentee"
    model.save_pretrained(tmp_path / "elsewhere")  # the folder itself records it from now on
    moved = EarlyExitForSequenceClassification.from_pretrained(tmp_path / "elsewhere")
    assert moved.policies_trained and moved.config.extra["policy_training"]


def test_auto_from_config_builds_a_fresh_model(hf_model_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(hf_model_dir)
    model = AutoModelForSequenceClassification.from_config(config)
    assert isinstance(model, EarlyExitForSequenceClassification) and model.num_layers == 3
