"""The multi-exit classifier: shapes, save/load round trip, and refusing what it must not load."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from consistentee.model.configuration import EarlyExitConfig, ModelFormatError
from consistentee.model.modeling import EarlyExitForSequenceClassification

LABELS = ["negative", "positive", "neutral"]


def _batch(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(["a short one", "a much longer sentence with many more words in it", "mid length text"],
               padding=True, return_tensors="pt")


def test_one_exit_per_layer_and_one_policy_per_layer_but_the_last(tiny_encoder_dir):
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS).eval()
    out = model(**_batch(tiny_encoder_dir))
    assert out.exit_logits.shape == (3, 3, 3)  # batch, layers, labels
    assert out.policy_logits.shape == (3, 2)
    assert len(model.exits) == 3 and len(model.policies) == 2


def test_pooling_defaults_to_mean_when_the_pooler_was_never_trained(tiny_encoder_dir):
    # The tiny checkpoint was saved from a BertModel, so it has (random but saved) pooler weights.
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS)
    assert model.config.pooling == ("pooler" if model.config.extra["pooler_trained"] else "mean")
    assert EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS, pooling="cls").config.pooling == "cls"


def test_save_and_load_round_trip_gives_identical_logits(tiny_encoder_dir, tmp_path):
    torch.manual_seed(1)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS, pooling="mean").eval()
    batch = _batch(tiny_encoder_dir)
    before = model(**batch)
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitForSequenceClassification.from_pretrained(tmp_path / "m")
    after = loaded(**batch)
    assert torch.equal(before.exit_logits, after.exit_logits)
    assert torch.equal(before.policy_logits, after.policy_logits)
    assert loaded.config.label_names == LABELS and not loaded.training
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_directory_of_another_kind_is_refused(tiny_encoder_dir):
    with pytest.raises(ModelFormatError, match="not a consistentee early-exit model"):
        EarlyExitForSequenceClassification.from_pretrained(tiny_encoder_dir)


def test_a_missing_directory_is_refused_without_a_hub_call(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        EarlyExitForSequenceClassification.from_pretrained(str(tmp_path / "nope" / "deeper" / "model"))


def test_a_pickle_checkpoint_is_refused_with_an_explanation(tiny_encoder_dir, tmp_path):
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelFormatError, match="pickle"):
        EarlyExitForSequenceClassification.from_pretrained(tmp_path / "m")


def test_weights_that_do_not_match_the_config_are_refused(tiny_encoder_dir, tmp_path):
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS)
    model.save_pretrained(tmp_path / "m")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("policies.1")}
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ModelFormatError, match="does not match"):
        EarlyExitForSequenceClassification.from_pretrained(tmp_path / "m")


def test_a_truncated_weights_file_is_a_clear_error(tiny_encoder_dir, tmp_path):
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS)
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="cannot load"):
        EarlyExitForSequenceClassification.from_pretrained(tmp_path / "m")


def test_config_validation():
    with pytest.raises(ModelFormatError, match="pooling"):
        EarlyExitConfig(backbone={}, label_names=["a", "b"], pooling="max")
    with pytest.raises(ModelFormatError, match="at least 2 labels"):
        EarlyExitConfig(backbone={}, label_names=["a"])
    with pytest.raises(ModelFormatError, match="newer"):
        EarlyExitConfig.from_dict({"kind": "consistentee-early-exit-encoder", "format_version": 99,
                                   "min_reader_format": 99})
    json.dumps(EarlyExitConfig(backbone={}, label_names=["a", "b"]).to_dict())


@pytest.mark.integration
def test_the_builtin_sentence_encoder_pools_by_mean_as_it_was_trained():
    model = EarlyExitForSequenceClassification.from_backbone("minilm", ["a", "b"])
    assert model.config.pooling == "mean" and model.num_layers == 6


def test_policies_can_also_read_the_exit_classifier_confidence(tiny_encoder_dir, tmp_path):
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS, pooling="mean").eval()
    model.reset_policies("state+confidence", 16)
    assert model.policies[0].net[0].in_features == 32 + 3
    pooled = torch.randn(4, 32)
    features = model.confidence_features(0, pooled)
    probs = model.exits[0](pooled).softmax(-1)
    assert torch.allclose(features[:, 0], probs.max(-1).values)
    assert torch.all((features[:, 1] >= 0) & (features[:, 1] <= 1))
    batch = _batch(tiny_encoder_dir)
    before = model(**batch).policy_logits
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitForSequenceClassification.from_pretrained(tmp_path / "m")
    assert loaded.config.policy_features == "state+confidence" and loaded.config.policy_hidden_size == 16
    assert torch.equal(before, loaded(**batch).policy_logits)
    with pytest.raises(ModelFormatError, match="policy features"):
        EarlyExitConfig(backbone={}, label_names=["a", "b"], policy_features="logits")


def test_confidence_only_policies_read_three_numbers_and_ignore_the_rest_of_the_state(tiny_encoder_dir, tmp_path):
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS, pooling="mean").eval()
    model.reset_policies("confidence", 8)
    assert model.policies[0].net[0].in_features == 3
    pooled = torch.randn(4, 32)
    # a state change the classifier cannot see (orthogonal to its weights) leaves the decision unchanged
    w = model.exits[0].weight.detach()
    shift = torch.randn(32)
    shift -= w.T @ torch.linalg.lstsq(w.T, shift.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(model.policy_logits(0, pooled), model.policy_logits(0, pooled + 5 * shift), atol=1e-5)
    batch = _batch(tiny_encoder_dir)
    before = model(**batch).policy_logits
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitForSequenceClassification.from_pretrained(tmp_path / "m")
    assert loaded.config.policy_features == "confidence"
    assert torch.equal(before, loaded(**batch).policy_logits)


def test_policy_inputs_are_standardised_once_their_scaling_is_set(tiny_encoder_dir, tmp_path):
    torch.manual_seed(2)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS, pooling="mean").eval()
    model.reset_policies("confidence", 8)
    pooled = torch.randn(64, 32)
    inputs = model.policy_inputs(0, pooled)
    policy = model.policies[0]
    assert torch.equal(model.policy_logits(0, pooled), policy.net(inputs).squeeze(-1))  # the identity until set
    policy.set_input_scaling(inputs)
    standard = (inputs - inputs.mean(0)) / inputs.std(0, unbiased=False)
    assert torch.allclose(model.policy_logits(0, pooled), policy.net(standard).squeeze(-1), atol=1e-5)
    policy.set_input_scaling(torch.ones(5, 3))  # a constant input: a floor on the scale keeps it finite
    assert torch.isfinite(model.policy_logits(0, pooled)).all()
    policy.set_input_scaling(inputs)
    batch = _batch(tiny_encoder_dir)
    before = model(**batch).policy_logits
    model.save_pretrained(tmp_path / "m")
    loaded = EarlyExitForSequenceClassification.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.policies[0].input_scale, policy.input_scale)
    assert torch.equal(before, loaded(**batch).policy_logits)


def test_a_model_saved_before_the_policy_input_scaling_loads_with_the_identity(tiny_encoder_dir, tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(3)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS, pooling="mean").eval()
    batch = _batch(tiny_encoder_dir)
    before = model(**batch).policy_logits
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if not k.endswith(("input_shift", "input_scale"))}
    assert len(tensors) == len(load_file(weights)) - 2 * len(model.policies)
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.pop("weights_sha256", None)  # the checksum was of the older file
    config.update(format_version=2, min_reader_format=2)
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded = EarlyExitForSequenceClassification.from_pretrained(tmp_path / "m")
    assert torch.equal(before, loaded(**batch).policy_logits)
    tensors.pop(next(k for k in tensors if k.startswith("policies.0.net.0.weight")))
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ModelFormatError, match="1 missing"):  # a real weight is still required
        EarlyExitForSequenceClassification.from_pretrained(tmp_path / "m")
