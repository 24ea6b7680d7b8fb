"""The model families that :mod:`consistentee.model.backbone` can drive one layer at a time.

Each class reuses the wrapped Hugging Face base model's own submodules and reproduces what that base
model's ``forward`` does between two layers (attention-mask preparation, relative-position biases,
projections), so that ``backbone.forward`` returns the same hidden states as
``model(..., output_hidden_states=True).hidden_states``.

Prepared attention masks and per-batch biases live in ``EncoderState.cache`` (batch first). They are
rebuilt from ``state.attention_mask`` whenever they are missing, e.g. after ``EncoderState.trim``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from consistentee.model.backbone import (
    _FAMILIES,
    EncoderState,
    LayerwiseBackbone,
    register_backbone,
    supported_model_types,
    wrap_backbone,
)
from consistentee.resources import resolve_model_path

__all__ = [
    "AlbertBackbone",
    "BertBackbone",
    "DebertaV2Backbone",
    "DistilBertBackbone",
    "ElectraBackbone",
    "MPNetBackbone",
    "RobertaBackbone",
    "backbone_from_config",
    "load_backbone",
]

_MASK = "attention_mask_4d"
# Marks "the attention implementation needs no mask for these rows" (no padding under sdpa): an
# empty [batch, 0] tensor, so that it survives ``select`` like every other cache entry.
_NO_MASK = "attention_mask_4d_none"


def _is_batch_tensor(value, batch_size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch_size


class _MaskedBackbone(LayerwiseBackbone):
    """Families whose base model prepares its mask with ``create_bidirectional_mask``."""

    def _build_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        return create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask
        )

    def _store_mask(self, state: EncoderState, mask) -> None:
        if mask is None:
            state.cache[_NO_MASK] = state.attention_mask.new_zeros((state.batch_size, 0))
        elif _is_batch_tensor(mask, state.batch_size):
            state.cache[_MASK] = mask
        # anything else (e.g. a flex-attention BlockMask) cannot be gathered by rows: rebuilt per layer

    def _mask(self, state: EncoderState):
        if _MASK in state.cache:
            return state.cache[_MASK]
        if _NO_MASK in state.cache:
            return None
        mask = self._build_mask(state.hidden, state.attention_mask)
        self._store_mask(state, mask)
        return mask

    def _new_state(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> EncoderState:
        state = EncoderState(hidden=hidden, attention_mask=attention_mask)
        self._store_mask(state, self._build_mask(hidden, attention_mask))
        return state

    @staticmethod
    def _next(state: EncoderState, hidden: torch.Tensor) -> EncoderState:
        return EncoderState(hidden=hidden, attention_mask=state.attention_mask, cache=dict(state.cache))


class _PoolerMixin:
    """``model.pooler`` is a module mapping the first token's hidden state (BERT-style pooler)."""

    @property
    def has_pooler(self) -> bool:
        return getattr(self.model, "pooler", None) is not None

    def apply_pooler(self, first_token: torch.Tensor) -> torch.Tensor:
        if not self.has_pooler:
            return LayerwiseBackbone.apply_pooler(self, first_token)
        # BertPooler-style modules take [batch, seq, hidden] and read position 0.
        return self.model.pooler(first_token.unsqueeze(1))


@register_backbone
class BertBackbone(_PoolerMixin, _MaskedBackbone):
    """BERT and its clones: embeddings -> ``encoder.layer[i](hidden, mask)``."""

    model_types = ("bert",)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> EncoderState:
        hidden = self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        return self._new_state(hidden, attention_mask)

    def forward_layer(self, index: int, state: EncoderState) -> EncoderState:
        mask = self._mask(state)
        hidden = self.model.encoder.layer[index](state.hidden, mask)
        return self._next(state, hidden)


@register_backbone
class RobertaBackbone(BertBackbone):
    """RoBERTa, XLM-RoBERTa, CamemBERT (same base-model forward; positions come from the input ids)."""

    model_types = ("roberta", "xlm-roberta", "camembert")


@register_backbone
class ElectraBackbone(BertBackbone):
    """ELECTRA: BERT layers, with ``embeddings_project`` when ``embedding_size != hidden_size``."""

    model_types = ("electra",)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> EncoderState:
        hidden = self.model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        if hasattr(self.model, "embeddings_project"):
            hidden = self.model.embeddings_project(hidden)
        return self._new_state(hidden, attention_mask)


@register_backbone
class AlbertBackbone(_MaskedBackbone):
    """ALBERT: projection into the hidden size, then shared layer groups."""

    model_types = ("albert",)

    @property
    def has_pooler(self) -> bool:
        return getattr(self.model, "pooler", None) is not None

    def apply_pooler(self, first_token: torch.Tensor) -> torch.Tensor:
        if not self.has_pooler:
            return super().apply_pooler(first_token)
        return self.model.pooler_activation(self.model.pooler(first_token))

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> EncoderState:
        embedding_output = self.model.embeddings(input_ids, token_type_ids=token_type_ids)
        # The base model builds its mask from the (embedding-size) embedding output: only batch size,
        # length, dtype and device are read, so the projected states give the same mask.
        hidden = self.model.encoder.embedding_hidden_mapping_in(embedding_output)
        return self._new_state(hidden, attention_mask)

    def forward_layer(self, index: int, state: EncoderState) -> EncoderState:
        config = self.model.config
        group = int(index / (config.num_hidden_layers / config.num_hidden_groups))
        mask = self._mask(state)
        hidden = self.model.encoder.albert_layer_groups[group](state.hidden, mask)
        return self._next(state, hidden)


@register_backbone
class DistilBertBackbone(_MaskedBackbone):
    """DistilBERT: no token types, no pooler; ``transformer.layer[i]``."""

    model_types = ("distilbert",)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.n_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.dim)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> EncoderState:
        hidden = self.model.embeddings(input_ids)
        return self._new_state(hidden, attention_mask)

    def forward_layer(self, index: int, state: EncoderState) -> EncoderState:
        mask = self._mask(state)
        hidden = self.model.transformer.layer[index](state.hidden, mask)
        return self._next(state, hidden)


_POSITION_BIAS = "mpnet_position_bias"


@register_backbone
class MPNetBackbone(_PoolerMixin, _MaskedBackbone):
    """MPNet: a relative-position bias computed once per batch (and per length) and shared by layers."""

    model_types = ("mpnet",)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> EncoderState:
        hidden = self.model.embeddings(input_ids=input_ids)
        state = self._new_state(hidden, attention_mask)
        state.cache[_POSITION_BIAS] = self.model.encoder.compute_position_bias(hidden)
        return state

    def forward_layer(self, index: int, state: EncoderState) -> EncoderState:
        mask = self._mask(state)
        bias = state.cache.get(_POSITION_BIAS)
        if bias is None:
            bias = self.model.encoder.compute_position_bias(state.hidden)
            state.cache[_POSITION_BIAS] = bias
        hidden = self.model.encoder.layer[index](state.hidden, mask, bias)[0]
        return self._next(state, hidden)


_DEBERTA_MASK = "deberta_attention_mask"


@register_backbone
class DebertaV2Backbone(LayerwiseBackbone):
    """DeBERTa-v2/v3: disentangled relative attention, optional convolution after the first layer.

    The convolution reads the encoder's input (the embedding output), which is exactly the state
    ``forward_layer(0)`` receives, and the 2-D padding mask; so nothing beyond the prepared mask is
    cached. The relative positions ([1, T, T], not per row) are rebuilt per layer (cheap).
    """

    model_types = ("deberta-v2",)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> EncoderState:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.model.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, mask=attention_mask
        )
        state = EncoderState(hidden=hidden, attention_mask=attention_mask)
        state.cache[_DEBERTA_MASK] = self.model.encoder.get_attention_mask(attention_mask)
        return state

    def forward_layer(self, index: int, state: EncoderState) -> EncoderState:
        encoder = self.model.encoder
        mask = state.cache.get(_DEBERTA_MASK)
        if mask is None:
            mask = encoder.get_attention_mask(state.attention_mask)
        relative_pos = encoder.get_rel_pos(state.hidden)
        hidden, _ = encoder.layer[index](
            state.hidden,
            mask,
            relative_pos=relative_pos,
            rel_embeddings=encoder.get_rel_embedding(),
        )
        if index == 0 and encoder.conv is not None:
            hidden = encoder.conv(state.hidden, hidden, state.attention_mask)
        cache = dict(state.cache)
        cache[_DEBERTA_MASK] = mask
        return EncoderState(hidden=hidden, attention_mask=state.attention_mask, cache=cache)


# --------------------------------------------------------------------------------------------------
# Loading

#: Hub ids: ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _check_supported(model_type: str) -> None:
    if model_type not in _FAMILIES:
        raise ValueError(
            f"model type {model_type!r} is not supported for early exiting; "
            f"supported: {', '.join(supported_model_types())}"
        )


def _pooler_missing(missing_keys) -> bool:
    return any("pooler" in key.split(".") for key in missing_keys)


def load_backbone(
    name_or_path: str,
    *,
    trust_remote_code: bool = False,
    dtype=None,
    revision=None,
) -> tuple[LayerwiseBackbone, bool]:
    """Load a pretrained encoder and wrap it; also say whether its pooler weights came from the checkpoint.

    ``name_or_path`` is a built-in short name (see :mod:`consistentee.resources`), a local folder or a
    Hugging Face hub id. Returns ``(backbone, pooler_trained)``: ``pooler_trained`` is True when the
    family has a pooler and none of its weights were missing from the checkpoint (so they are not
    random).
    """
    path = resolve_model_path(name_or_path)
    if not Path(path).exists() and not _HUB_ID.match(path):
        raise ValueError(f"model {name_or_path!r} is neither an existing folder nor a hub id")
    hub_kwargs = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        hub_kwargs["revision"] = revision
    config = AutoConfig.from_pretrained(path, **hub_kwargs)
    _check_supported(config.model_type)
    model_kwargs = dict(hub_kwargs)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    model, info = AutoModel.from_pretrained(path, config=config, output_loading_info=True, **model_kwargs)
    backbone = wrap_backbone(model)
    pooler_trained = backbone.has_pooler and not _pooler_missing(info.get("missing_keys", ()))
    return backbone, bool(pooler_trained)


def backbone_from_config(config: PretrainedConfig) -> LayerwiseBackbone:
    """A randomly initialised backbone of ``config``'s family (weights are expected to be loaded next)."""
    _check_supported(config.model_type)
    model: PreTrainedModel = AutoModel.from_config(config)
    return wrap_backbone(model)
