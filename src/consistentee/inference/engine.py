"""Batched early-exit inference: rows that exit leave the batch, so deeper layers run on fewer rows.

The loop, for a batch of B rows::

    state = model.embed(...)                        # [B, T, d]
    for layer l = 1 .. L:
        state, pooled = model.run_layer(l - 1, state)   # only the rows still running
        signals = what the rule needs (exit softmax, policy p_l, learned score), for those rows only
        exit = rule.decide(l, signals, rule_state)      # l < L; at L every remaining row exits
        rows that exit: their exit classifier (computed now if the rule did not need it) -> output
        rows that stay: gathered (``EncoderState.select``) together with the rule's per-row state,
                        then optionally trimmed to their longest remaining length

Bookkeeping of which original row each active row is lives on the host: the exit decision is copied
to the host once per layer (the only device-to-host sync the decision needs) and every index used to
gather or scatter is built from it. Results are scattered back into input order at the end.

The rule protocol and the semantics match :func:`consistentee.exits.rules.simulate_exits` exactly:
``decide`` is called at layers ``1 .. L-1`` on the rows still running, in their order, and the last
layer is a forced exit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from consistentee.exits.rules import ExitRule, LayerSignals, exit_probability, exit_softmax, select_state
from consistentee.model.backbone import EncoderState

__all__ = ["AUTOCAST_DTYPES", "EarlyExitEngine", "EngineOutput", "LearnedScorer", "full_depth_logits"]

#: Names accepted for ``autocast_dtype``.
AUTOCAST_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class LearnedScorer(Protocol):
    """A learned-exit head (BERxiT): probability that exit ``index`` (0-based) is correct, [B]."""

    def score(self, index: int, pooled: Tensor) -> Tensor: ...


@dataclass
class EngineOutput:
    #: [B] class id predicted by the exit each row took.
    predictions: Tensor
    #: [B] 1-based layer each row exited at.
    exit_layers: Tensor
    #: [B, C] float32 softmax of the exit taken.
    probs: Tensor
    #: number of rows each layer ran on (``rows_per_layer[i]`` for layer ``i + 1``).
    rows_per_layer: list[int] = field(default_factory=list)

    @property
    def layers_run(self) -> int:
        """Row-layers actually executed (sum of ``rows_per_layer``)."""
        return sum(self.rows_per_layer)


def _resolve_autocast(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype in ("no", "none", "fp32", "float32", torch.float32):
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"autocast_dtype must be fp16 or bf16, got {dtype}")
        return dtype
    try:
        return AUTOCAST_DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown autocast_dtype {dtype!r}; choose fp16, bf16 or none") from None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _model_device(model: torch.nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


class EarlyExitEngine:
    """Early-exit inference of a :class:`~consistentee.model.modeling.EarlyExitForSequenceClassification`.

    ``rule`` is any :class:`~consistentee.exits.rules.ExitRule`. Only the signals in ``rule.needs`` are
    computed while rows are running (e.g. ``consistentee`` computes the policy only, and each row's
    classifier once, at its exit; ``static`` computes nothing before layer ``k``). ``learned_heads``
    (anything with ``score(i, pooled) -> [B]``) is required by the ``learned`` rule. ``trim`` cuts the
    padding columns that no remaining row uses after rows leave (inputs must be right-padded).
    ``autocast_dtype`` (``"fp16"``/``"bf16"``) runs the model under ``torch.autocast`` on its device;
    decisions and returned probabilities are computed in float32.
    """

    def __init__(
        self,
        model,
        rule: ExitRule,
        *,
        learned_heads: LearnedScorer | None = None,
        trim: bool = True,
        autocast_dtype: str | torch.dtype | None = None,
    ) -> None:
        if not isinstance(rule, ExitRule):
            raise TypeError(f"rule must be an ExitRule (see consistentee.exits.make_rule), got {type(rule).__name__}")
        if "learned_score" in rule.needs and learned_heads is None:
            raise ValueError(f"rule {rule.name!r} needs learned exit heads: pass learned_heads")
        if learned_heads is not None and not callable(getattr(learned_heads, "score", None)):
            raise TypeError("learned_heads must have a score(index, pooled) method")
        self.model = model
        self.rule = rule
        self.learned_heads = learned_heads
        self.trim = bool(trim)
        self.autocast_dtype = _resolve_autocast(autocast_dtype)

    @property
    def device(self) -> torch.device:
        return _model_device(self.model)

    def __call__(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> EngineOutput:
        was_training = self.model.training
        if was_training:  # dropout in an exit head would make exits random: always infer in eval mode
            self.model.eval()
        try:
            with torch.inference_mode():
                return self._run(input_ids, attention_mask, token_type_ids, labels)
        finally:
            if was_training:
                self.model.train()

    # -- the loop ----------------------------------------------------------------------------------

    def _run(self, input_ids, attention_mask, token_type_ids, labels) -> EngineOutput:
        model, rule = self.model, self.rule
        needs = rule.needs
        device = self.device
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be [batch, length], got {tuple(input_ids.shape)} "
                f"and {tuple(attention_mask.shape)}"
            )
        n = input_ids.shape[0]
        num_layers, num_labels = model.num_layers, model.num_labels
        if n == 0:
            return EngineOutput(
                predictions=torch.zeros(0, dtype=torch.long),
                exit_layers=torch.zeros(0, dtype=torch.long),
                probs=torch.zeros(0, num_labels),
                rows_per_layer=[0] * num_layers,
            )
        if "labels" in needs:
            if labels is None:
                raise ValueError(f"rule {rule.name!r} needs the gold labels: pass labels")
            labels = torch.as_tensor(labels).to(device=device, dtype=torch.long)
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
        else:
            labels = None  # only the rules that read them get them (and only then are they gathered)
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        if token_type_ids is not None:
            token_type_ids = token_type_ids.to(device)
        if self.trim and input_ids.shape[1] > 1 and not bool(attention_mask[:, 0].all()):
            raise ValueError("trim=True needs right-padded inputs (attention_mask[:, 0] must be 1 for every row)")

        probs_out = torch.zeros(n, num_labels, dtype=torch.float32, device=device)
        exit_layers = torch.full((n,), num_layers, dtype=torch.long)  # host
        rows_per_layer: list[int] = []
        active = torch.arange(n)  # host: original index of every running row, in order
        lengths = attention_mask.sum(dim=1).cpu() if self.trim else None  # host, one sync per call
        rule_state = rule.init_state(n, device)
        path = None  # what "path" policies read of the exits already passed
        keep_path = "policy_prob" in needs and model.policies_read_path

        with _autocast(device, self.autocast_dtype):
            state = model.embed(input_ids, attention_mask, token_type_ids)
            for index in range(num_layers):
                layer = index + 1
                rows = active.numel()
                rows_per_layer.append(rows)
                state, pooled = model.run_layer(index, state)
                if layer == num_layers:  # forced exit for every row still running
                    probs_out.index_copy_(0, active.to(device), self._probs(index, pooled).to(probs_out.dtype))
                    break
                probs = self._probs(index, pooled) if "probs" in needs else None
                signals = LayerSignals(
                    probs=probs if probs is not None else pooled.new_zeros((rows, 0)),
                    policy_prob=(
                        exit_probability(model.policy_logits(index, pooled, path)) if "policy_prob" in needs else None
                    ),
                    learned_score=(
                        self.learned_heads.score(index, pooled) if "learned_score" in needs else None
                    ),
                    labels=labels if "labels" in needs else None,
                )
                exit_, rule_state = rule.decide(layer, signals, rule_state)
                if keep_path:
                    path = model.advance_path(index, pooled, path)
                exit_host = exit_.to(torch.bool).cpu()  # the one sync per layer
                if exit_host.shape != (rows,):
                    raise RuntimeError(
                        f"rule {rule.name!r} returned {tuple(exit_host.shape)} decisions for {rows} rows"
                    )
                exited = torch.nonzero(exit_host).squeeze(1)
                if exited.numel() == 0:
                    continue
                exited_dev = exited.to(device)
                done = active.index_select(0, exited)
                exit_layers[done] = layer
                exit_probs = (
                    probs.index_select(0, exited_dev)
                    if probs is not None
                    else self._probs(index, pooled.index_select(0, exited_dev))
                )
                probs_out.index_copy_(0, done.to(device), exit_probs.to(probs_out.dtype))
                if exited.numel() == rows:
                    break
                keep = torch.nonzero(~exit_host).squeeze(1)
                keep_dev = keep.to(device)
                active = active.index_select(0, keep)
                state = state.select(keep_dev)
                rule_state = select_state(rule_state, keep_dev)
                if path is not None:
                    path = path.select(keep_dev)
                if labels is not None:
                    labels = labels.index_select(0, keep_dev)
                if lengths is not None:
                    longest = max(int(lengths.index_select(0, active).max()), 1)
                    if longest < state.hidden.shape[1]:
                        state = _trim_to(state, longest)
        rows_per_layer.extend([0] * (num_layers - len(rows_per_layer)))
        return EngineOutput(
            predictions=probs_out.argmax(dim=-1).cpu(),
            exit_layers=exit_layers,
            probs=probs_out.cpu(),
            rows_per_layer=rows_per_layer,
        )

    def _probs(self, index: int, pooled: Tensor) -> Tensor:
        return exit_softmax(self.model.exit_logits(index, pooled))


def _trim_to(state: EncoderState, length: int) -> EncoderState:
    """Cut to ``length`` columns (right padding); the family rebuilds its mask cache from the 2-D mask.

    Same result as :meth:`EncoderState.trim`, without its device-to-host sync (lengths are on the host).
    """
    return EncoderState(state.hidden[:, :length], state.attention_mask[:, :length])


def full_depth_logits(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor | None = None,
    *,
    autocast_dtype: str | torch.dtype | None = None,
) -> Tensor:
    """The baseline without early exit: the plain Hugging Face forward of the backbone, pooling, last exit.

    This is what a user would run without this library: ``model.backbone.model(...)`` (the wrapped HF
    base model) -> ``last_hidden_state`` -> the model's pooling -> the last exit classifier. [B, C] logits.
    """
    device = _model_device(model)
    dtype = _resolve_autocast(autocast_dtype)
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids.to(device)
    was_training = model.training
    if was_training:
        model.eval()
    try:
        with torch.inference_mode(), _autocast(device, dtype):
            hidden = model.backbone.model(**kwargs).last_hidden_state
            state = EncoderState(hidden=hidden, attention_mask=kwargs["attention_mask"])
            pooled = model.backbone.pool(state, model.config.pooling)
            return model.exit_logits(model.num_layers - 1, pooled)
    finally:
        if was_training:
            model.train()
