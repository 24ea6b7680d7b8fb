"""Layer-wise backbones reproduce their Hugging Face base model exactly, one layer at a time."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AlbertConfig,
    AutoModel,
    BertConfig,
    CamembertConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    GPT2Model,
    MPNetConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from consistentee.model import (
    EncoderState,
    LayerwiseBackbone,
    backbone_from_config,
    load_backbone,
    wrap_backbone,
)
from consistentee.model.families import (
    AlbertBackbone,
    BertBackbone,
    DebertaV2Backbone,
    DistilBertBackbone,
    ElectraBackbone,
    MPNetBackbone,
    RobertaBackbone,
)

TOL = 1e-5
LENGTHS = (7, 4, 9)  # different lengths, right padded to 9
_COMMON = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=37)


def _configs():
    return {
        "bert": BertConfig(**_COMMON, num_hidden_layers=3, max_position_embeddings=64),
        "roberta": RobertaConfig(**_COMMON, num_hidden_layers=3, max_position_embeddings=64),
        "xlm-roberta": XLMRobertaConfig(**_COMMON, num_hidden_layers=2, max_position_embeddings=64),
        "camembert": CamembertConfig(**_COMMON, num_hidden_layers=2, max_position_embeddings=64),
        "albert": AlbertConfig(
            **_COMMON, embedding_size=16, num_hidden_layers=3, num_hidden_groups=1, max_position_embeddings=64
        ),
        # 4 layers in 2 shared groups: layers 0-1 use group 0, layers 2-3 group 1.
        "albert-2groups": AlbertConfig(
            **_COMMON, embedding_size=16, num_hidden_layers=4, num_hidden_groups=2, max_position_embeddings=64
        ),
        "distilbert": DistilBertConfig(
            vocab_size=100, dim=32, n_layers=3, n_heads=4, hidden_dim=37, max_position_embeddings=64
        ),
        "electra": ElectraConfig(
            **_COMMON, embedding_size=16, num_hidden_layers=3, max_position_embeddings=64
        ),
        "mpnet": MPNetConfig(**_COMMON, num_hidden_layers=3, max_position_embeddings=64),
        # DeBERTa-v3 style: log-bucketed relative positions, no absolute positions, conv after layer 0.
        "deberta-v2": DebertaV2Config(
            **_COMMON,
            num_hidden_layers=3,
            max_position_embeddings=64,
            relative_attention=True,
            position_buckets=8,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            position_biased_input=False,
            conv_kernel_size=3,
            type_vocab_size=0,
        ),
        # DeBERTa-v2 without the conv layer, with absolute positions and token types.
        "deberta-v2-noconv": DebertaV2Config(
            **_COMMON,
            num_hidden_layers=2,
            max_position_embeddings=64,
            relative_attention=True,
            max_relative_positions=-1,
            pos_att_type=["c2p", "p2c"],
            type_vocab_size=2,
        ),
    }


CLASSES = {
    "bert": BertBackbone,
    "roberta": RobertaBackbone,
    "xlm-roberta": RobertaBackbone,
    "camembert": RobertaBackbone,
    "albert": AlbertBackbone,
    "albert-2groups": AlbertBackbone,
    "distilbert": DistilBertBackbone,
    "electra": ElectraBackbone,
    "mpnet": MPNetBackbone,
    "deberta-v2": DebertaV2Backbone,
    "deberta-v2-noconv": DebertaV2Backbone,
}
FAMILIES = list(CLASSES)
EAGER_ONLY = {"mpnet", "deberta-v2", "deberta-v2-noconv"}  # no sdpa support in transformers
NO_TOKEN_TYPES = {"distilbert", "mpnet", "deberta-v2"}
WITH_POOLER = ["bert", "roberta", "albert", "mpnet"]
CASES = [(f, impl) for f in FAMILIES for impl in ("sdpa", "eager") if impl == "eager" or f not in EAGER_ONLY]


def make_model(family: str, attn: str = "eager"):
    torch.manual_seed(0)
    config = _configs()[family]
    model = AutoModel.from_config(config, attn_implementation=attn)
    model.eval()
    return model


def make_batch(model, lengths=LENGTHS, seed=1):
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(3, config.vocab_size, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = ids.masked_fill(mask == 0, pad)
    batch = {"input_ids": ids, "attention_mask": mask}
    if config.model_type not in NO_TOKEN_TYPES and getattr(config, "type_vocab_size", 0) > 1:
        types = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            types[row, n // 2 : n] = 1
        batch["token_type_ids"] = types
    return batch


def reference_hidden_states(model, batch):
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (a - b).abs()
    if mask is not None:
        diff = diff[mask.bool()]
    return float(diff.max())


def run_layers(backbone: LayerwiseBackbone, state: EncoderState, start: int = 0) -> EncoderState:
    for i in range(start, backbone.num_layers):
        state = backbone.forward_layer(i, state)
    return state


# ------------------------------------------------------------------------------------------------
# Equality with the Hugging Face forward


@pytest.mark.parametrize(("family", "attn"), CASES)
def test_layerwise_states_equal_hf_hidden_states(family, attn):
    model = make_model(family, attn)
    backbone = wrap_backbone(model)
    assert type(backbone) is CLASSES[family]
    assert backbone.model is model  # drives the model's own modules, no copies
    batch = make_batch(model)

    expected = reference_hidden_states(model, batch)
    with torch.no_grad():
        got = backbone(**batch)

    assert len(got) == len(expected) == backbone.num_layers + 1
    for layer, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g.shape == e.shape == (3, max(LENGTHS), backbone.hidden_size)
        assert max_diff(g, e, batch["attention_mask"]) <= TOL, f"layer {layer}, real tokens"
        # Same operations on the same tensors: padded positions agree too.
        assert max_diff(g, e) <= TOL, f"layer {layer}, padded positions"


def test_hidden_size_and_layers_of_distilbert_come_from_its_own_config_names():
    backbone = wrap_backbone(make_model("distilbert"))
    assert (backbone.num_layers, backbone.hidden_size) == (3, 32)


def test_electra_projects_embeddings_into_the_hidden_size():
    backbone = wrap_backbone(make_model("electra"))
    batch = make_batch(backbone.model)
    state = backbone.embed(**batch)
    assert backbone.model.config.embedding_size == 16
    assert state.hidden.shape[-1] == 32


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_flow_through_the_layers_in_training_mode(family):
    model = make_model(family)
    model.train()
    backbone = wrap_backbone(model)
    batch = make_batch(model)
    states = backbone(**batch)
    states[-1].pow(2).mean().backward()
    first_layer_params = [
        p for name, p in model.named_parameters() if ".0." in name and p.requires_grad and "layer" in name
    ]
    assert first_layer_params
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in first_layer_params)
    assert model.get_input_embeddings().weight.grad is not None


# ------------------------------------------------------------------------------------------------
# Row gathering and trimming


@pytest.mark.parametrize(("family", "attn"), [("bert", "sdpa"), ("bert", "eager"), ("mpnet", "eager")])
def test_select_commutes_with_a_layer(family, attn):
    model = make_model(family, attn)
    backbone = wrap_backbone(model)
    batch = make_batch(model)
    rows = torch.tensor([2, 0])
    with torch.no_grad():
        state = backbone.forward_layer(0, backbone.embed(**batch))
        assert state.cache, "prepared mask (and MPNet's bias) should be cached"
        selected_first = backbone.forward_layer(1, state.select(rows))
        layer_first = backbone.forward_layer(1, state).select(rows)
    for key, value in selected_first.cache.items():
        assert value.shape[0] == 2, key
    if family == "mpnet":
        assert any(
            v.dim() == 4 and v.shape[1] == 4 for v in selected_first.cache.values()
        )  # [B, heads, T, T]
    assert torch.equal(selected_first.attention_mask, layer_first.attention_mask)
    assert max_diff(selected_first.hidden, layer_first.hidden) <= TOL


@pytest.mark.parametrize("rows", [[0, 1], [0]], ids=["with-padding", "no-padding-left"])
@pytest.mark.parametrize(("family", "attn"), CASES)
def test_trim_after_dropping_the_longest_row_keeps_the_states(family, attn, rows):
    model = make_model(family, attn)
    backbone = wrap_backbone(model)
    batch = make_batch(model)
    rows = torch.tensor(rows)
    kept_lengths = [LENGTHS[r] for r in rows.tolist()]
    with torch.no_grad():
        full = backbone.embed(**batch)
        after_one = backbone.forward_layer(0, full)
        reference = run_layers(backbone, after_one, start=1).select(rows)

        # trimmed before the first layer (DeBERTa's conv layer then sees the shorter input) ...
        trimmed = full.select(rows).trim()
        assert trimmed.hidden.shape[1] == max(kept_lengths) < full.hidden.shape[1]
        assert not trimmed.cache
        from_embeddings = run_layers(backbone, trimmed)
        # ... and between two layers (cached masks / biases must be rebuilt for the new length)
        from_layer_one = run_layers(backbone, after_one.select(rows).trim(), start=1)

    width = max(kept_lengths)
    real = reference.attention_mask[:, :width]
    assert torch.equal(real.sum(1), torch.tensor(kept_lengths))
    for got in (from_embeddings, from_layer_one):
        assert got.hidden.shape == (len(kept_lengths), width, backbone.hidden_size)
        assert max_diff(got.hidden, reference.hidden[:, :width], real) <= TOL


# ------------------------------------------------------------------------------------------------
# Pooling


def test_mean_pooling_ignores_padding():
    backbone = wrap_backbone(make_model("bert"))
    batch = make_batch(backbone.model)
    with torch.no_grad():
        state = run_layers(backbone, backbone.embed(**batch))
    pooled = backbone.pool(state, "mean")
    assert pooled.shape == (3, 32)

    padded = state.hidden.clone()
    padded[1, LENGTHS[1] :] += 100.0  # row 1 has 4 real tokens
    changed_padding = backbone.pool(EncoderState(padded, state.attention_mask), "mean")
    assert torch.allclose(changed_padding, pooled, atol=1e-6)

    real = state.hidden.clone()
    real[1, 0] += 100.0
    changed_real = backbone.pool(EncoderState(real, state.attention_mask), "mean")
    assert not torch.allclose(changed_real[1], pooled[1], atol=1e-3)
    expected = state.hidden[1, : LENGTHS[1]].mean(0)
    assert torch.allclose(pooled[1], expected, atol=1e-6)


def test_cls_pooling_is_the_first_token():
    backbone = wrap_backbone(make_model("roberta"))
    batch = make_batch(backbone.model)
    with torch.no_grad():
        state = backbone.embed(**batch)
    assert torch.equal(backbone.pool(state, "cls"), state.hidden[:, 0])


@pytest.mark.parametrize("family", WITH_POOLER)
def test_pooler_equals_the_models_pooler_output(family):
    model = make_model(family)
    backbone = wrap_backbone(model)
    assert backbone.has_pooler
    batch = make_batch(model)
    with torch.no_grad():
        expected = model(**batch).pooler_output
        pooled = backbone.pool(run_layers(backbone, backbone.embed(**batch)), "pooler")
    assert pooled.shape == expected.shape == (3, 32)
    assert max_diff(pooled, expected) <= TOL


@pytest.mark.parametrize("family", ["distilbert", "electra", "deberta-v2"])
def test_pooler_on_a_family_without_one_raises(family):
    backbone = wrap_backbone(make_model(family))
    assert not backbone.has_pooler
    with torch.no_grad():
        state = backbone.embed(**make_batch(backbone.model))
    with pytest.raises(ValueError, match="pooler"):
        backbone.pool(state, "pooler")


def test_bert_without_pooling_layer_has_no_pooler():
    torch.manual_seed(0)
    from transformers import BertModel

    backbone = wrap_backbone(BertModel(_configs()["bert"], add_pooling_layer=False))
    assert not backbone.has_pooler
    with pytest.raises(ValueError):
        backbone.apply_pooler(torch.zeros(2, 32))


# ------------------------------------------------------------------------------------------------
# Registry, construction and loading

_TINY_GPT2 = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)


def test_wrap_backbone_rejects_an_unsupported_model_type():
    with pytest.raises(ValueError, match="gpt2"):
        wrap_backbone(GPT2Model(GPT2Config(**_TINY_GPT2)))


def test_backbone_from_config_builds_the_family_with_model_prefixed_keys():
    backbone = backbone_from_config(_configs()["mpnet"])
    assert isinstance(backbone, MPNetBackbone)
    keys = list(backbone.state_dict())
    assert keys and all(k.startswith("model.") for k in keys)
    with pytest.raises(ValueError, match="gpt2"):
        backbone_from_config(GPT2Config(**_TINY_GPT2))


def test_load_backbone_rejects_a_missing_path():
    with pytest.raises(ValueError, match="no/such/model"):
        load_backbone("./no/such/model")


def test_load_backbone_rejects_an_unsupported_saved_model(tmp_path):
    GPT2Model(GPT2Config(**_TINY_GPT2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize("with_pooler", [True, False])
def test_load_backbone_reports_whether_pooler_weights_were_in_the_checkpoint(tmp_path, with_pooler):
    from transformers import BertModel

    torch.manual_seed(0)
    saved = BertModel(_configs()["bert"], add_pooling_layer=with_pooler)
    saved.save_pretrained(tmp_path)

    backbone, pooler_trained = load_backbone(str(tmp_path))
    assert isinstance(backbone, BertBackbone)
    assert backbone.has_pooler  # AutoModel always adds the pooling layer ...
    assert pooler_trained is with_pooler  # ... but only a saved one is trained
    loaded = backbone.model.embeddings.word_embeddings.weight
    assert torch.equal(loaded, saved.embeddings.word_embeddings.weight)


def test_load_backbone_of_a_family_without_pooler_says_untrained(tmp_path):
    make_model("distilbert").save_pretrained(tmp_path)
    backbone, pooler_trained = load_backbone(str(tmp_path), dtype=torch.float32)
    assert isinstance(backbone, DistilBertBackbone)
    assert pooler_trained is False


# ------------------------------------------------------------------------------------------------
# The real built-in model

SENTENCES = [
    "The movie was great.",
    "I did not enjoy a single minute of this long, boring and badly acted film.",
    "Fine.",
]


@pytest.mark.integration
def test_minilm_layerwise_equals_hf_and_pooler_flag_is_true():
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from consistentee.resources import builtin_model_path

    path = builtin_model_path("minilm")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        has_pooler_weights = "pooler.dense.weight" in set(f.keys())

    backbone, pooler_trained = load_backbone("minilm")
    assert isinstance(backbone, BertBackbone) and backbone.num_layers == 6
    assert pooler_trained is has_pooler_weights is True

    model = backbone.model.eval()
    batch = dict(AutoTokenizer.from_pretrained(str(path))(SENTENCES, padding=True, return_tensors="pt"))
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3

    expected = reference_hidden_states(model, batch)
    with torch.no_grad():
        got = backbone(**batch)
        pooled = backbone.pool(run_layers(backbone, backbone.embed(**batch)), "pooler")
        pooler_output = model(**batch).pooler_output
    for g, e in zip(got, expected, strict=True):
        assert max_diff(g, e, batch["attention_mask"]) <= TOL
        assert max_diff(g, e) <= TOL
    assert max_diff(pooled, pooler_output) <= TOL
