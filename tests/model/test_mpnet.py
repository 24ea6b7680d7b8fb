"""MPNet through the layer-wise interface: a tiny random one, and the built-in all-mpnet-base-v2 when installed.

MPNet adds a relative-position bias (log-bucketed beyond ``max_exact`` tokens) to every layer's attention
scores; the backbone computes it once per batch and length and passes it to each layer, as ``MPNetModel``
does. Sequences here are long enough to reach the logarithmic buckets.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MPNetConfig, MPNetModel

from consistentee.model import backbone_from_config, wrap_backbone
from consistentee.model.families import MPNetBackbone
from consistentee.resources import MissingResourceError

TOL = 1e-5


def _tiny_mpnet() -> MPNetModel:
    torch.manual_seed(3)
    config = MPNetConfig(vocab_size=120, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=160, relative_attention_num_buckets=32)
    return MPNetModel(config).eval()


def _padded_ids(vocab: int, lengths: list[int], pad: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, vocab, (len(lengths), width), generator=gen).masked_fill(mask == 0, pad)
    return {"input_ids": ids, "attention_mask": mask}


def _assert_layerwise_equals_hf(backbone, batch) -> None:
    with torch.no_grad():
        expected = backbone.model(**batch, output_hidden_states=True).hidden_states
        got = backbone(**batch)
    assert len(got) == len(expected) == backbone.num_layers + 1
    real = batch["attention_mask"].bool()
    for layer, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape
        assert float((g - e).abs()[real].max()) <= TOL, f"layer {layer}"
    assert float((got[-1] - expected[-1]).abs().max()) <= TOL  # padded positions too


def test_tiny_random_mpnet_layerwise_equals_hf_forward():
    model = _tiny_mpnet()
    backbone = wrap_backbone(model)
    assert isinstance(backbone, MPNetBackbone) and backbone.model is model
    batch = _padded_ids(model.config.vocab_size, [70, 23, 41], model.config.pad_token_id)
    _assert_layerwise_equals_hf(backbone, batch)


def test_tiny_mpnet_built_from_its_config_matches_after_loading_the_weights():
    source = _tiny_mpnet()
    backbone = backbone_from_config(source.config)
    backbone.model.load_state_dict(source.state_dict())
    backbone.eval()
    batch = _padded_ids(source.config.vocab_size, [33, 50], source.config.pad_token_id)
    _assert_layerwise_equals_hf(backbone, batch)
    with torch.no_grad():
        assert torch.equal(backbone(**batch)[-1], wrap_backbone(source)(**batch)[-1])


def test_position_bias_is_cached_per_row_and_rebuilt_after_trim():
    model = _tiny_mpnet()
    backbone = wrap_backbone(model)
    batch = _padded_ids(model.config.vocab_size, [60, 12, 25], model.config.pad_token_id)
    heads = model.config.num_attention_heads
    with torch.no_grad():
        state = backbone.forward_layer(0, backbone.embed(**batch))
        biases = [v for v in state.cache.values() if v.dim() == 4 and v.shape[1] == heads]
        assert [tuple(b.shape) for b in biases] == [(3, heads, 60, 60)]
        rest = state.select(torch.tensor([2, 1])).trim()  # the longest row left: 25 columns
        for i in range(1, backbone.num_layers):
            rest = backbone.forward_layer(i, rest)
        short = {k: v[[2, 1], :25] for k, v in batch.items()}
        expected = model(**short).last_hidden_state
    real = short["attention_mask"].bool()
    assert float((rest.hidden - expected).abs()[real].max()) <= TOL


# ------------------------------------------------------------------------------------------------
# The built-in all-mpnet-base-v2 (12 x 768), reassembled from its installed parts

SENTENCES = ["The movie was great.", "I did not enjoy a single minute of this long film."]


@pytest.fixture(scope="module")
def real_mpnet():
    from consistentee.model.modeling import EarlyExitForSequenceClassification
    from consistentee.resources import builtin_model_path

    try:
        path = builtin_model_path("mpnet")
    except MissingResourceError as exc:
        pytest.skip(f"the built-in mpnet is not installed: {exc}")
    model = EarlyExitForSequenceClassification.from_backbone("mpnet", ["negative", "positive"]).eval()
    return model, path


@pytest.mark.integration
def test_builtin_mpnet_has_12_layers_and_layerwise_equals_hf(real_mpnet):
    from consistentee.training.run import load_tokenizer

    model, path = real_mpnet
    backbone = model.backbone
    assert isinstance(backbone, MPNetBackbone)
    assert (backbone.num_layers, backbone.hidden_size) == (12, 768)
    assert model.config.pooling == "mean"  # declared by the sentence-transformers checkpoint
    assert model.config.extra["base_model"] == "mpnet"

    tokenizer = load_tokenizer("mpnet")
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    assert set(batch) == {"input_ids", "attention_mask"}
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 2
    _assert_layerwise_equals_hf(backbone, batch)
