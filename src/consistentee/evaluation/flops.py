"""Analytic FLOPs of a multi-exit BERT-style encoder (FLOPs = 2 x multiply-adds).

Counted per example of ``T`` real tokens (padding is not counted: this is the ideal cost of the
exit decisions, independent of how a batch is padded), hidden size ``d``, FFN size ``i``, ``C``
labels, policy hidden size ``h`` (the model's ``policy_hidden_size``, 32 by default). The arithmetic of the
pieces (a dense map, attention, the MLP, a policy) is :mod:`consistentee.utils.flops`, shared with the decoder's
per-token count (:mod:`consistentee.generation.benchmark`):

* one transformer layer, :func:`layer_flops`::

      8*T*d*d      Q, K, V and output projections (4 matmuls of [T, d] x [d, d])
    + 4*T*T*d      attention scores Q K^T and the weighted sum A V (2 matmuls, summed over heads;
                   the head count does not change the total)
    + 4*T*d*i      feed-forward up [d -> i] and down [i -> d] projections

  Biases, layer norms, softmax, GELU, residual adds and dropout are **not** counted (all O(T*d) or
  O(T*T*heads), a few percent at most).
* embeddings, :func:`embedding_flops`: token/position/type lookups are gathers (0 FLOPs) and their sum
  and layer norm are O(T*d) and not counted, consistent with the layers. When the embedding size
  ``e`` differs from ``d`` (ALBERT), the projection ``e -> d`` costs ``2*T*e*d``; otherwise 0.
* one exit, :func:`exit_flops` (on the pooled vector, once per example, not per token)::

      2*d*d        pooler dense layer, only when the pooler is used for pooling
    + 2*d*C        exit classifier
    + 2*(d*h + h)  ConsistentEE policy (d -> h -> 1), only when policies are evaluated

  The pooling itself (taking [CLS] or a mean over tokens) is not counted.

An example that exits at layer ``e`` costs (:func:`flops_for_exits`)::

    embedding_flops + e * layer_flops + e * (pooler + classifier)  + min(e, L-1) * policy

i.e. the exit head is evaluated after every executed layer (set ``heads_every_layer=False`` when only the
exit actually taken runs its classifier, e.g. a policy-only rule), and the policy after every executed
layer except the last (no policy there: the exit is forced). The full-depth reference
(:func:`full_depth_flops`) is ``embedding_flops + L * layer_flops + (pooler + classifier)``: the final
classifier only, no intermediate heads, no policies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from consistentee.utils.flops import (
    attention_projection_flops,
    attention_score_flops,
    linear_flops,
    mlp_flops,
    policy_flops,
)

from .metrics import as_numpy

__all__ = [
    "EncoderShape",
    "embedding_flops",
    "exit_flops",
    "flops_for_exits",
    "flops_speedup",
    "full_depth_flops",
    "layer_flops",
]

#: model types whose HF implementation has no pooler.
_NO_POOLER = frozenset({"distilbert", "electra", "deberta", "deberta-v2", "modernbert"})


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return value
    return default


@dataclass(frozen=True)
class EncoderShape:
    """The numbers that fix the FLOPs of a multi-exit encoder."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    vocab_size: int
    num_labels: int
    policy_hidden: int = 32
    has_pooler: bool = True
    embedding_size: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_labels",
            "policy_hidden",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EncoderShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_hf_config(
        cls,
        config: Any,
        *,
        num_labels: int | None = None,
        has_pooler: bool | None = None,
        policy_hidden: int = 32,
    ) -> EncoderShape:
        """From a Hugging Face config object (or dict) of the BERT family.

        Understands BERT/RoBERTa/ALBERT/ELECTRA names (``num_hidden_layers``, ``hidden_size``,
        ``intermediate_size``, ``num_attention_heads``, ``embedding_size``) and DistilBERT's
        (``n_layers``, ``dim``, ``hidden_dim``, ``n_heads``). ``has_pooler`` defaults to False for
        model types without a pooler (DistilBERT, ELECTRA, DeBERTa, ModernBERT), True otherwise.
        """
        layers = _cfg(config, "num_hidden_layers", "n_layers")
        hidden = _cfg(config, "hidden_size", "dim")
        inter = _cfg(config, "intermediate_size", "hidden_dim")
        heads = _cfg(config, "num_attention_heads", "n_heads")
        if None in (layers, hidden, inter, heads):
            raise ValueError(
                "config lacks one of num_hidden_layers/hidden_size/intermediate_size/"
                "num_attention_heads (or DistilBERT's n_layers/dim/hidden_dim/n_heads)"
            )
        if num_labels is None:
            num_labels = _cfg(config, "num_labels")
            if num_labels is None:
                id2label = _cfg(config, "id2label")
                num_labels = len(id2label) if id2label else 2
        if has_pooler is None:
            has_pooler = _cfg(config, "model_type", default="") not in _NO_POOLER
        embedding_size = _cfg(config, "embedding_size")
        return cls(
            num_layers=int(layers),
            hidden_size=int(hidden),
            intermediate_size=int(inter),
            num_heads=int(heads),
            vocab_size=int(_cfg(config, "vocab_size", default=0)),
            num_labels=int(num_labels),
            policy_hidden=int(policy_hidden),
            has_pooler=bool(has_pooler),
            embedding_size=None if embedding_size in (None, hidden) else int(embedding_size),
        )


def layer_flops(shape: EncoderShape, seq_len: Any) -> Any:
    """``8*T*d^2 + 4*T^2*d + 4*T*d*i`` for one layer (scalar or elementwise over an array of T)."""
    t = np.asarray(seq_len, dtype=np.float64)
    d, i = float(shape.hidden_size), float(shape.intermediate_size)
    out = attention_projection_flops(d, d, d, t) + attention_score_flops(d, t, t) + mlp_flops(d, i, 2, t)
    return float(out) if out.ndim == 0 else out


def embedding_flops(shape: EncoderShape, seq_len: Any) -> Any:
    """``2*T*e*d`` when the embedding size ``e`` differs from ``d``, else 0 (see module docstring)."""
    t = np.asarray(seq_len, dtype=np.float64)
    e = shape.embedding_size
    out = t * 0.0 if e is None or e == shape.hidden_size else linear_flops(e, shape.hidden_size, t)
    return float(out) if out.ndim == 0 else out


def _pooler_on(shape: EncoderShape, pooler_used: bool | None) -> bool:
    if pooler_used is None:
        return shape.has_pooler
    if pooler_used and not shape.has_pooler:
        raise ValueError("pooler_used=True but the encoder has no pooler (has_pooler=False)")
    return bool(pooler_used)


def exit_flops(shape: EncoderShape, *, with_policy: bool = False, pooler_used: bool | None = None) -> float:
    """One exit on the pooled vector: ``[2*d*d] + 2*d*C [+ 2*(d*h + h)]`` (see module docstring).

    ``pooler_used`` defaults to ``shape.has_pooler``.
    """
    d = float(shape.hidden_size)
    out = linear_flops(d, shape.num_labels)
    if _pooler_on(shape, pooler_used):
        out += linear_flops(d, d)
    if with_policy:
        out += _policy_flops(shape)
    return out


def _policy_flops(shape: EncoderShape) -> float:
    return policy_flops(float(shape.hidden_size), float(shape.policy_hidden))


def _check_lengths(shape: EncoderShape, seq_lens: Any, exit_layers: Any = None):
    t = as_numpy(seq_lens).astype(np.float64)
    if t.size == 0:
        raise ValueError("need at least one example")
    if (t < 0).any():
        raise ValueError("sequence lengths must be >= 0")
    if exit_layers is None:
        return t, None
    e = as_numpy(exit_layers).astype(np.int64)
    if e.shape != t.shape:
        raise ValueError(f"seq_lens and exit_layers differ in length: {t.size} vs {e.size}")
    if e.min() < 1 or e.max() > shape.num_layers:
        raise ValueError(f"exit layers must lie in [1, {shape.num_layers}]")
    return t, e


def flops_for_exits(
    shape: EncoderShape,
    seq_lens: Any,
    exit_layers: Any,
    with_policy: bool = False,
    pooler_used: bool | None = None,
    *,
    heads_every_layer: bool = True,
    extra_flops_per_layer: float = 0.0,
) -> float:
    """Total FLOPs spent on a set of examples that exit at ``exit_layers`` (1-based).

    Per example: ``embedding_flops(T) + e*layer_flops(T) + n_heads*(pooler + classifier)
    + min(e, L-1)*policy + e*extra_flops_per_layer`` where ``n_heads = e`` if ``heads_every_layer``
    else 1. ``extra_flops_per_layer`` is for any other per-layer head (e.g. a learned-exit head).
    """
    t, e = _check_lengths(shape, seq_lens, exit_layers)
    ef = e.astype(np.float64)
    head = exit_flops(shape, with_policy=False, pooler_used=pooler_used)
    n_heads = ef if heads_every_layer else np.ones_like(ef)
    total = embedding_flops(shape, t) + ef * layer_flops(shape, t) + n_heads * head
    total = total + ef * float(extra_flops_per_layer)
    if with_policy:
        total = total + np.minimum(ef, shape.num_layers - 1) * _policy_flops(shape)
    return float(np.sum(total))


def full_depth_flops(shape: EncoderShape, seq_lens: Any, pooler_used: bool | None = None) -> float:
    """Reference cost: embeddings + all L layers + the final classifier (no other heads, no policies)."""
    t, _ = _check_lengths(shape, seq_lens)
    head = exit_flops(shape, with_policy=False, pooler_used=pooler_used)
    total = embedding_flops(shape, t) + shape.num_layers * layer_flops(shape, t) + head
    return float(np.sum(total))


def flops_speedup(
    shape: EncoderShape,
    seq_lens: Any,
    exit_layers: Any,
    with_policy: bool = False,
    pooler_used: bool | None = None,
    *,
    heads_every_layer: bool = True,
    extra_flops_per_layer: float = 0.0,
) -> float:
    """``full_depth_flops / flops_for_exits`` on the same examples (> 1 means fewer FLOPs)."""
    spent = flops_for_exits(
        shape,
        seq_lens,
        exit_layers,
        with_policy,
        pooler_used,
        heads_every_layer=heads_every_layer,
        extra_flops_per_layer=extra_flops_per_layer,
    )
    return full_depth_flops(shape, seq_lens, pooler_used) / spent
