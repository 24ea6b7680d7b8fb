"""A new exit rule is one class: registered, it runs in the sweep, the batched engine and the predictor (knob given
as text) with no other file touched. The toy rule lives here only; the fixture registers it and takes it out again.
"""

from __future__ import annotations

import pytest
import torch

from consistentee.data.tokenize import collate
from consistentee.evaluation.flops import EncoderShape, flops_speedup
from consistentee.evaluation.sweep import EvalTables, FlopsSpec, build_candidates, rule_flops_kwargs, sweep
from consistentee.exits.rules import (
    RULES,
    ExitRule,
    make_rule,
    parse_knob,
    register_rule,
    rule_names,
    simulate_exits,
    unregister_rule,
)
from consistentee.inference.engine import EarlyExitEngine
from consistentee.inference.predictor import EarlyExitPredictor


class MarginRule(ExitRule):
    """Toy rule: exit when the top-2 margin of the exit's softmax reaches ``m`` (m in [0, 1], "0.2" or "20%")."""

    name = "toy-margin"
    knob_name = "m"
    default_knob = 0.5

    @classmethod
    def validate_knob(cls, knob):
        if isinstance(knob, bool) or not isinstance(knob, int | float) or not 0.0 <= knob <= 1.0:
            raise ValueError(f"rule {cls.name!r}: {cls.knob_name!r} must lie in [0, 1], got {knob!r}")
        return float(knob)

    @classmethod
    def knob_from_text(cls, text):
        text = text.strip()
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)

    @staticmethod
    def margin(probs):
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]

    def decide(self, layer, signals, state):
        self.check_signals(signals)
        return self.margin(signals.probs) >= self.knob, state

    @classmethod
    def aggressiveness(cls, knob):
        return -float(knob)

    @classmethod
    def default_grid(cls, *, num_classes=2, num_layers=12):
        return [0.0, 0.5, 1.0]


@pytest.fixture
def toy_rule():
    register_rule(MarginRule)
    yield MarginRule
    unregister_rule(MarginRule.name)
    assert MarginRule.name not in RULES


def _batch(tokenizer, texts):
    encoded = tokenizer(texts, truncation=True, max_length=64)
    return collate([{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
                     "token_type_ids": encoded["token_type_ids"][i], "index": i} for i in range(len(texts))],
                   tokenizer.pad_token_id)


@torch.inference_mode()
def _probs(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).exit_logits.float().softmax(-1)


def _knob(margins: torch.Tensor) -> float:
    """Halfway between the two middle layer-1 margins: about half the rows leave at layer 1, no ties."""
    v = margins.sort().values
    k = len(v) // 2
    return float((v[k - 1] + v[k]) / 2)


def test_the_toy_rule_is_known_only_while_registered(toy_rule):
    assert make_rule("toy-margin").knob == 0.5
    assert parse_knob("toy-margin", "25%") == 0.25 and parse_knob("toy-margin", " 0.3 ") == 0.3
    with pytest.raises(ValueError, match="knob 'abc' is not a real number"):
        parse_knob("toy-margin", "abc")
    with pytest.raises(ValueError, match="must lie in"):
        parse_knob("toy-margin", "150%")
    assert "toy-margin" in rule_names(without={"labels"})
    assert RULES["toy-margin"].knob_to_json(0.1234567) == 0.123457
    cost = RULES["toy-margin"].cost()
    assert cost.every_classifier and not (cost.policy or cost.learned_head or cost.pooled_every_layer)


def test_the_toy_rule_in_the_sweep(toy_rule, tiny_model, tiny_tokenizer, helpers):
    batch = _batch(tiny_tokenizer, helpers.TEXTS)
    probs = _probs(tiny_model, batch)
    labels = torch.arange(len(helpers.TEXTS)) % 2
    tables = EvalTables(probs, labels, batch["attention_mask"].sum(1))
    knob = _knob(MarginRule.margin(probs[:, 0]))
    candidates = build_candidates("toy-margin", tables, tables, grid=[knob, 1.0])
    assert [c.knob for c in candidates] == [round(knob, 6), 1.0]
    shape = EncoderShape.from_hf_config(tiny_model.backbone.config, num_labels=2, has_pooler=False)
    points = sweep(candidates, FlopsSpec(shape))
    margins = MarginRule.margin(probs)  # [N, L]
    first = [next((layer + 1 for layer in range(tiny_model.num_layers - 1) if margins[i, layer] >= knob),
                  tiny_model.num_layers) for i in range(len(labels))]
    assert points[0].test_exit_layers.tolist() == first and len(set(first)) >= 2
    assert points[1].test_exit_layers.tolist() == [tiny_model.num_layers] * len(labels)
    # it reads every exit's softmax: every classifier runs at every executed layer
    assert rule_flops_kwargs("toy-margin", FlopsSpec(shape))["heads_every_layer"] is True
    assert points[0].test["flops_speedup"] == pytest.approx(
        flops_speedup(shape, tables.seq_lens, torch.tensor(first), heads_every_layer=True))


def test_the_toy_rule_in_the_engine_and_the_predictor(toy_rule, tiny_model, tiny_tokenizer, helpers):
    batch = _batch(tiny_tokenizer, helpers.TEXTS)
    probs = _probs(tiny_model, batch)
    knob = _knob(MarginRule.margin(probs[:, 0]))
    rule = make_rule("toy-margin", knob)
    expected = simulate_exits(rule, probs)
    out = EarlyExitEngine(tiny_model, rule)(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert torch.equal(out.exit_layers, expected.exit_layer) and torch.equal(out.predictions, expected.predictions)
    assert len(set(out.exit_layers.tolist())) >= 2
    predictor = EarlyExitPredictor(tiny_model, tiny_tokenizer, rule="toy-margin", knob=repr(knob))
    assert isinstance(predictor.rule, MarginRule) and predictor.rule.knob == knob
    results = predictor.predict(helpers.TEXTS, batch_size=7)
    assert [r["exit_layer"] for r in results] == out.exit_layers.tolist()
    names = tiny_model.config.label_names
    assert [r["label"] for r in results] == [names[i] for i in out.predictions.tolist()]
