"""Token-level exit rules for generation, behind one interface (docs/exit-rules.md, decoder peers).

A rule is asked at every exit layer ``l < L`` whether each row's current token stops there. Rules that need
the exit head's distribution (CALM's confidence measures) pay one exit-head projection per check (onto the
reduced vocabulary when the model has one, :meth:`.decoder.EarlyExitLM.set_draft_vocab`); the
ConsistentEE policy and hidden-state saturation read the hidden state only.

Every rule also has an offline form (:meth:`TokenExitRule.decide_offline`) over per-exit features computed in
one full-depth pass (perplexity under the rule with ``full`` K/V semantics; knob sweeps without re-running).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class TokenExitRule:
    name = "base"
    knob_name = "knob"
    needs_head = False

    def __init__(self, knob: float):
        self.knob = knob

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
        return f"{self.name}({self.knob_name}={self.knob:g})"


class ConsistentEERule(TokenExitRule):
    """Exit at the first exit layer whose policy p_l > threshold."""

    name, knob_name = "consistentee", "threshold"

    def decide(self, model, layer, h, prev):
        return model.policy_prob(layer, h) > self.knob, None

    def decide_offline(self, features, exit_layers):
        return features["policy"] > self.knob


class StaticRule(TokenExitRule):
    """Always exit at layer k (the first exit layer >= k)."""

    name, knob_name = "static", "layer"

    def decide(self, model, layer, h, prev):
        return torch.full((h.shape[0],), layer >= self.knob, dtype=torch.bool, device=h.device), None

    def decide_offline(self, features, exit_layers):
        n = features["policy"].shape[0]
        row = torch.tensor([e >= self.knob for e in exit_layers[:-1]], dtype=torch.bool)
        return row.unsqueeze(0).expand(n, -1)


class ConfidenceRule(TokenExitRule):
    """CALM softmax confidence: max probability (``max_prob``) or top-2 gap (``top2_gap``) >= lambda."""

    knob_name = "lambda"
    needs_head = True

    def __init__(self, knob: float, measure: str = "max_prob"):
        super().__init__(knob)
        if measure not in ("max_prob", "top2_gap"):
            raise ValueError(f"unknown confidence measure {measure!r}")
        self.measure = measure
        self.name = f"confidence-{'maxprob' if measure == 'max_prob' else 'gap'}"

    def decide(self, model, layer, h, prev):
        logits = model.exit_logits(layer, h)  # the reduced vocabulary when the model has one
        return confidence(logits, self.measure) >= self.knob, logits

    def decide_offline(self, features, exit_layers):
        return features[self.measure] >= self.knob


class SaturationRule(TokenExitRule):
    """CALM hidden-state saturation: cosine(h_l, h_{l-1}) >= lambda."""

    name, knob_name = "saturation", "lambda"

    def decide(self, model, layer, h, prev):
        return F.cosine_similarity(h.float(), prev.float(), dim=-1) >= self.knob, None

    def decide_offline(self, features, exit_layers):
        return features["cosine"] >= self.knob


def confidence(logits: Tensor, measure: str) -> Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return probs.max(-1).values
    top = probs.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


RULES = {
    "consistentee": lambda k: ConsistentEERule(k),
    "static": lambda k: StaticRule(int(k)),
    "confidence-maxprob": lambda k: ConfidenceRule(k, "max_prob"),
    "confidence-gap": lambda k: ConfidenceRule(k, "top2_gap"),
    "saturation": lambda k: SaturationRule(k),
}
DEFAULT_KNOBS = {"consistentee": 0.5, "static": 15, "confidence-maxprob": 0.9, "confidence-gap": 0.8,
                 "saturation": 0.99}


def make_rule(name: str, knob: float | None = None) -> TokenExitRule | None:
    """A rule by name ("full" or "none": no early exit -> None)."""
    if name in ("full", "none"):
        return None
    if name not in RULES:
        raise ValueError(f"unknown exit rule {name!r}; choose one of full, {', '.join(RULES)}")
    return RULES[name](DEFAULT_KNOBS[name] if knob is None else knob)


def first_exit(decisions: Tensor, exit_layers: list[int]) -> Tensor:
    """Exit layer [N] (1..L) from bool decisions [N, n-1] at the exit layers; forced exit at L."""
    n = decisions.shape[0]
    forced = torch.ones(n, 1, dtype=torch.bool, device=decisions.device)
    idx = torch.cat([decisions.bool(), forced], dim=1).to(torch.uint8).argmax(dim=1)
    return torch.tensor(exit_layers, device=decisions.device)[idx]
