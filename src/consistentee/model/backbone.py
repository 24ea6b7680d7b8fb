"""Layer-wise access to Hugging Face encoders.

Early exiting needs to stop after any layer, so a backbone is driven one step at a time:
``embed`` -> ``forward_layer(0)`` -> ... -> ``forward_layer(L-1)``, and ``pool`` turns the hidden
states after any layer into the vector that the exit classifier and the policy of that layer read.
Every model family implements the same small interface; nothing else in the package knows which
family it is talking to.

The state that travels between layers is an :class:`EncoderState`. Its rows can be gathered
(``select``) so that rows which already exited stop costing compute, and it can be trimmed to the
longest remaining sequence (``trim``) so attention cost falls too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from consistentee.model.constants import POOLING_METHODS

__all__ = ["POOLING_METHODS", "EncoderState", "LayerwiseBackbone", "register_backbone", "supported_model_types",
           "wrap_backbone"]


@dataclass
class EncoderState:
    """Hidden states of a batch between two layers.

    ``attention_mask`` is the plain 2-D padding mask (1 = real token). ``cache`` holds per-family
    tensors derived from the mask (prepared 4-D masks, relative-position biases); every tensor in it
    has the batch on its first dimension so that ``select`` can gather it, and it is dropped by
    ``trim`` because its sequence length would no longer match.
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def select(self, rows: torch.Tensor) -> EncoderState:
        """Keep only ``rows`` (indices into the batch), in that order."""
        return EncoderState(
            hidden=self.hidden.index_select(0, rows),
            attention_mask=self.attention_mask.index_select(0, rows),
            cache={k: v.index_select(0, rows) for k, v in self.cache.items()},
        )

    def trim(self) -> EncoderState:
        """Cut trailing padding columns that no remaining row uses (right padding assumed)."""
        length = int(self.attention_mask.sum(dim=1).max().item()) if self.batch_size else 0
        length = max(length, 1)
        if length == self.hidden.shape[1]:
            return self
        return EncoderState(self.hidden[:, :length], self.attention_mask[:, :length])


class LayerwiseBackbone(nn.Module, ABC):
    """One Hugging Face encoder, runnable one layer at a time.

    Subclasses wrap the *base* model (``BertModel``, ``RobertaModel``, ...) and reuse its own modules,
    so the weights are the checkpoint's and ``state_dict`` keys stay those of the wrapped model under
    the prefix ``model.``.
    """

    #: ``config.model_type`` values this class handles.
    model_types: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def has_pooler(self) -> bool:
        """Whether the family has a pooler module (trained or not is the checkpoint's business)."""
        return False

    @abstractmethod
    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> EncoderState:
        """Embeddings (and any projection before the first layer)."""

    @abstractmethod
    def forward_layer(self, index: int, state: EncoderState) -> EncoderState:
        """Run layer ``index`` (0-based) on ``state``."""

    def apply_pooler(self, first_token: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} has no pooler; use pooling 'cls' or 'mean'")

    def pool(self, state: EncoderState, method: str) -> torch.Tensor:
        """The vector that the exit classifier and the policy of a layer read: [batch, hidden]."""
        if method == "cls":
            return state.hidden[:, 0]
        if method == "pooler":
            return self.apply_pooler(state.hidden[:, 0])
        if method == "mean":
            mask = state.attention_mask.to(state.hidden.dtype).unsqueeze(-1)
            return (state.hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        raise ValueError(f"unknown pooling {method!r}; choose one of {', '.join(POOLING_METHODS)}")

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """All hidden states, embeddings first: the layer-wise twin of ``output_hidden_states``."""
        state = self.embed(input_ids, attention_mask, token_type_ids)
        states = [state.hidden]
        for i in range(self.num_layers):
            state = self.forward_layer(i, state)
            states.append(state.hidden)
        return states


_FAMILIES: dict[str, type[LayerwiseBackbone]] = {}


def register_backbone(cls: type[LayerwiseBackbone]) -> type[LayerwiseBackbone]:
    for model_type in cls.model_types:
        _FAMILIES[model_type] = cls
    return cls


def _load_families() -> None:
    """The built-in families register themselves when their module is imported."""
    import consistentee.model.families  # noqa: F401


def supported_model_types() -> list[str]:
    _load_families()
    return sorted(_FAMILIES)


def wrap_backbone(model: PreTrainedModel) -> LayerwiseBackbone:
    """Wrap a loaded Hugging Face base model in the layer-wise interface of its family."""
    _load_families()
    model_type = model.config.model_type
    if model_type not in _FAMILIES:
        raise ValueError(
            f"model type {model_type!r} is not supported for early exiting; "
            f"supported: {', '.join(supported_model_types())}"
        )
    return _FAMILIES[model_type](model)
