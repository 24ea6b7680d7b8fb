"""Token-level exit rules for generation, behind one interface (docs/exit-rules.md, decoder peers).

A rule is asked at every exit layer ``l < L`` whether each row's current token stops there. Rules that need
the exit head's distribution (CALM's confidence measures) pay one exit-head projection per check (onto the
reduced vocabulary when the model has one, :meth:`.decoder.EarlyExitLM.set_draft_vocab`); the
ConsistentEE policy and hidden-state saturation read the hidden state only.

Every rule also has an offline form (:meth:`TokenExitRule.decide_offline`) over per-exit features computed in
one full-depth pass (perplexity under the rule with ``full`` K/V semantics; knob sweeps without re-running).

Shared with the encoder (:mod:`consistentee.exits.rules`): where a decoder rule means what an encoder rule means,
its exit test is the encoder class's (``ThresholdRule.passes`` / ``StaticRule.passes``, and the confidence score
``ConfidenceRule.score``), so the two cannot drift: ``consistentee`` (policy ``p_l > threshold``), ``static``
(``layer >= k``) and ``confidence-maxprob`` (``max softmax >= lambda``). What stays the decoder's own, and why:

* the protocol: a decoder rule computes its signal itself, per token, from the model and the hidden state
  (``decide(model, layer, h, prev)``), because an exit-head projection costs as much as several layers and only
  the rules that need it may pay for it; it also has an offline form over summary features (the max probability,
  the top-2 gap, the cosine; never the full vocabulary distribution the encoder rules read);
* the knobs are not range-checked like the encoder's: a threshold above 1 is a valid "never exit early", and the
  static knob counts layers of the decoder, not exits; their names (``lambda``, ``layer``) label report rows;
* ``confidence-gap`` (CALM's top-2 gap) and ``saturation`` (cosine of consecutive hidden states) have no encoder
  counterpart (the encoder has entropy and patience instead, which the decoder does not run).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from consistentee.exits.rules import ConfidenceRule as EncoderConfidenceRule
from consistentee.exits.rules import ConsistentEERule as EncoderConsistentEERule
from consistentee.exits.rules import StaticRule as EncoderStaticRule


class TokenExitRule:
    name = "base"
    knob_name = "knob"
    #: the knob :func:`make_rule` uses when none is given.
    default_knob: ClassVar[float | None] = None
    #: a check projects the hidden state through an exit head (its cost in FLOPs: one exit head per check).
    needs_head = False
    #: a check runs the layer's exit policy (one policy MLP per check).
    needs_policy = False

    def __init__(self, knob: float):
        self.knob = knob
        #: the exit layers the rule is asked at (None: every exit); elsewhere a token goes on without a check
        self.check_layers: frozenset[int] | None = None

    def only_at(self, layers: Iterable[int] | None) -> TokenExitRule:
        """This rule asked only at ``layers`` (e.g. a lossless drafter that checks one shallow exit and otherwise
        runs the token to full depth, paying no check on the way); None or empty: every exit."""
        self.check_layers = frozenset(int(x) for x in layers) if layers else None
        return self

    def checks_at(self, layer: int) -> bool:
        return self.check_layers is None or layer in self.check_layers

    def offline_decisions(self, features: dict[str, Tensor], exit_layers: list[int]) -> Tensor:
        """:meth:`decide_offline`, with no exit at the layers the rule is not asked at."""
        decisions = self.decide_offline(features, exit_layers)
        if self.check_layers is None:
            return decisions
        asked = torch.tensor([self.checks_at(e) for e in exit_layers[:-1]], dtype=torch.bool)
        return decisions & asked.to(decisions.device)

    def start_step(self, batch: int) -> None:  # hook for stateful rules
        pass

    def decide(self, model, layer: int, h: Tensor, prev: Tensor) -> tuple[Tensor, Tensor | None]:
        """(exit now? bool [B], the exit head's logits [B, V] when the rule computed them, else None)."""
        raise NotImplementedError

    def decide_offline(self, features: dict[str, Tensor], exit_layers: list[int]) -> Tensor:
        """bool [N, n_exits - 1] from per-exit features of a full-depth pass."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        at = "" if self.check_layers is None else f"@{'+'.join(str(x) for x in sorted(self.check_layers))}"
        return f"{self.name}({self.knob_name}={self.knob:g}){at}"


class ConsistentEERule(TokenExitRule):
    """Exit at the first exit layer whose policy p_l > threshold (the encoder rule's test, per token)."""

    name, knob_name = "consistentee", "threshold"
    default_knob = 0.5
    needs_policy = True

    def decide(self, model, layer, h, prev):
        return EncoderConsistentEERule.passes(model.policy_prob(layer, h), self.knob), None

    def decide_offline(self, features, exit_layers):
        return EncoderConsistentEERule.passes(features["policy"], self.knob)


class StaticRule(TokenExitRule):
    """Always exit at layer k (the first exit layer >= k; the encoder rule's test)."""

    name, knob_name = "static", "layer"
    default_knob = 15

    def __init__(self, knob: float):
        super().__init__(int(knob))

    def decide(self, model, layer, h, prev):
        exit_ = EncoderStaticRule.passes(layer, self.knob)
        return torch.full((h.shape[0],), exit_, dtype=torch.bool, device=h.device), None

    def decide_offline(self, features, exit_layers):
        n = features["policy"].shape[0]
        row = torch.tensor([EncoderStaticRule.passes(e, self.knob) for e in exit_layers[:-1]], dtype=torch.bool)
        return row.unsqueeze(0).expand(n, -1)


class ConfidenceRule(TokenExitRule):
    """CALM softmax confidence: max probability (``max_prob``, the encoder's confidence rule) or top-2 gap
    (``top2_gap``) >= lambda."""

    knob_name = "lambda"
    needs_head = True
    measure = "max_prob"

    def __init__(self, knob: float, measure: str | None = None):
        super().__init__(knob)
        if measure is not None:
            if measure not in ("max_prob", "top2_gap"):
                raise ValueError(f"unknown confidence measure {measure!r}")
            self.measure = measure
            self.name = f"confidence-{'maxprob' if measure == 'max_prob' else 'gap'}"

    def decide(self, model, layer, h, prev):
        logits = model.exit_logits(layer, h)  # the reduced vocabulary when the model has one
        return EncoderConfidenceRule.passes(confidence(logits, self.measure), self.knob), logits

    def decide_offline(self, features, exit_layers):
        return EncoderConfidenceRule.passes(features[self.measure], self.knob)


class MaxProbRule(ConfidenceRule):
    name, measure = "confidence-maxprob", "max_prob"
    default_knob = 0.9


class Top2GapRule(ConfidenceRule):
    name, measure = "confidence-gap", "top2_gap"
    default_knob = 0.8


class SaturationRule(TokenExitRule):
    """CALM hidden-state saturation: cosine(h_l, h_{l-1}) >= lambda."""

    name, knob_name = "saturation", "lambda"
    default_knob = 0.99

    def decide(self, model, layer, h, prev):
        return F.cosine_similarity(h.float(), prev.float(), dim=-1) >= self.knob, None

    def decide_offline(self, features, exit_layers):
        return features["cosine"] >= self.knob


def confidence(logits: Tensor, measure: str) -> Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return EncoderConfidenceRule.score(probs)
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


RULES: dict[str, type[TokenExitRule]] = {
    cls.name: cls for cls in (ConsistentEERule, StaticRule, MaxProbRule, Top2GapRule, SaturationRule)
}


def make_rule(name: str, knob: float | None = None, check_layers: Iterable[int] | None = None) -> TokenExitRule | None:
    """A rule by name ("full" or "none": no early exit -> None), asked at ``check_layers`` only when given."""
    if name in ("full", "none"):
        return None
    if name not in RULES:
        raise ValueError(f"unknown exit rule {name!r}; choose one of full, {', '.join(RULES)}")
    cls = RULES[name]
    return cls(cls.default_knob if knob is None else knob).only_at(check_layers)


def parse_check_layers(text: str, exit_layers: list[int]) -> list[int] | None:
    """``--check-layers`` ("6,12"; empty: None, every exit), each one an exit layer below the last."""
    layers = [int(x) for x in text.split(",") if x.strip()] if text else []
    bad = [x for x in layers if x not in exit_layers[:-1]]
    if bad:
        raise ValueError(f"check layers {bad} are not exit layers below the last (exits: {exit_layers})")
    return layers or None


def first_exit(decisions: Tensor, exit_layers: list[int]) -> Tensor:
    """Exit layer [N] (1..L) from bool decisions [N, n-1] at the exit layers; forced exit at L."""
    n = decisions.shape[0]
    forced = torch.ones(n, 1, dtype=torch.bool, device=decisions.device)
    idx = torch.cat([decisions.bool(), forced], dim=1).to(torch.uint8).argmax(dim=1)
    return torch.tensor(exit_layers, device=decisions.device)[idx]
