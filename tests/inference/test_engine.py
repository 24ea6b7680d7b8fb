"""The batched engine must give exactly what one-row-at-a-time inference and the offline simulator give."""

from __future__ import annotations

import copy

import pytest
import torch

from consistentee.data.tokenize import collate
from consistentee.exits.rules import (
    ConsistentEERule,
    LayerSignals,
    exit_probability,
    exit_softmax,
    make_rule,
    simulate_exits,
)
from consistentee.exits.tables import collect_exit_tables
from consistentee.inference.engine import EarlyExitEngine, full_depth_logits

RULE_NAMES = ["entropy", "confidence", "patience", "pcee", "learned", "static", "consistentee", "oracle"]


def _batch(tokenizer, texts):
    encoded = tokenizer(texts, truncation=True, max_length=64)
    items = [{"input_ids": encoded["input_ids"][i], "attention_mask": encoded["attention_mask"][i],
              "token_type_ids": encoded["token_type_ids"][i], "index": i} for i in range(len(texts))]
    return collate(items, tokenizer.pad_token_id)


@torch.inference_mode()
def _tables(model, heads, batch):
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], return_pooled=True)
    probs = exit_softmax(out.exit_logits)
    policy = exit_probability(out.policy_logits)
    learned = torch.stack([heads.score(i, out.pooled[:, i]) for i in range(model.num_layers)], dim=1)
    return probs, policy, learned


def _between(values: torch.Tensor, quantile: float) -> float:
    """A threshold halfway between two neighbouring observed values: far from every row's value."""
    v = values.flatten().sort().values
    k = min(max(int(quantile * len(v)), 1), len(v) - 1)
    return float((v[k - 1] + v[k]) / 2)


def _knobs(probs, policy, learned, num_layers):
    """A knob per rule that spreads exits over the layers of this model (picked from the full tables)."""
    first = probs[:, : num_layers - 1]
    entropy = torch.special.entr(first).sum(-1)
    return {  # layer-1 quantiles: about a third of the rows leave at layer 1, the rest spread deeper
        "entropy": _between(entropy[:, 0], 0.35),
        "confidence": _between(first[:, 0].max(-1).values, 0.65),
        "patience": 2,
        "pcee": (2, _between(entropy, 0.6)),
        "learned": _between(learned[:, 0], 0.65),
        "static": 2,
        "consistentee": _between(policy[:, 0], 0.65),
        "oracle": None,
    }


def _row_signals(model, heads, ids, mask, types):
    """A single unpadded row, layer by layer (no batch, no gathering): every layer's signals."""
    with torch.inference_mode():
        state = model.embed(ids, mask, types)
        per_layer, path = [], None
        for i in range(model.num_layers):
            state, pooled = model.run_layer(i, state)
            policy = exit_probability(model.policy_logits(i, pooled, path)) if i < model.num_layers - 1 else None
            if model.policies_read_path:
                path = model.advance_path(i, pooled, path)
            per_layer.append((exit_softmax(model.exit_logits(i, pooled)), policy, heads.score(i, pooled)))
    return per_layer


def _one_at_a_time(rule, per_layer, label):
    """Reference decisions for one row: stop at the first layer whose decision is 'exit'."""
    rule_state = rule.init_state(1)
    for i, (probs, policy, learned) in enumerate(per_layer):
        if i == len(per_layer) - 1:
            break
        signals = LayerSignals(probs=probs, policy_prob=policy, learned_score=learned, labels=label)
        exit_, rule_state = rule.decide(i + 1, signals, rule_state)
        if bool(exit_[0]):
            return int(probs.argmax(-1)), i + 1, probs[0]
    probs = per_layer[-1][0]
    return int(probs.argmax(-1)), len(per_layer), probs[0]


def _check_all_rules(model, tokenizer, heads, texts, *, require_spread: bool):
    batch = _batch(tokenizer, texts)
    labels = torch.randint(0, model.num_labels, (len(texts),), generator=torch.Generator().manual_seed(3))
    probs, policy, learned = _tables(model, heads, batch)
    knobs = _knobs(probs, policy, learned, model.num_layers)
    lengths = batch["attention_mask"].sum(1).tolist()
    rows = [_row_signals(model, heads, batch["input_ids"][i : i + 1, : lengths[i]],
                         batch["attention_mask"][i : i + 1, : lengths[i]],
                         batch["token_type_ids"][i : i + 1, : lengths[i]]) for i in range(len(texts))]
    for name in RULE_NAMES:
        rule = make_rule(name, knobs[name])
        reference = [_one_at_a_time(rule, rows[i], labels[i : i + 1]) for i in range(len(texts))]
        ref_pred = torch.tensor([r[0] for r in reference])
        ref_layer = torch.tensor([r[1] for r in reference])
        ref_probs = torch.stack([r[2] for r in reference])
        simulated = simulate_exits(rule, probs, policy, learned, labels)
        assert torch.equal(simulated.exit_layer, ref_layer), name
        assert torch.equal(simulated.predictions, ref_pred), name
        if require_spread and name != "static":
            assert len(set(ref_layer.tolist())) >= 2, f"{name}: knob gives no spread of exits"
        if name in ("patience", "pcee") and model.num_layers > 3:
            # a stateful rule: some rows leave while others still carry state into a later decision
            assert ((ref_layer > 1) & (ref_layer < model.num_layers - 1)).any() and (ref_layer > ref_layer.min()).any()
        for trim in (True, False):
            engine = EarlyExitEngine(model, rule, learned_heads=heads, trim=trim)
            out = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels=labels)
            assert torch.equal(out.exit_layers, ref_layer), (name, trim)
            assert torch.equal(out.predictions, ref_pred), (name, trim)
            torch.testing.assert_close(out.probs, ref_probs.float(), atol=1e-4, rtol=1e-4)
            assert out.probs.dtype == torch.float32
            expected_rows = [int((ref_layer >= layer).sum()) for layer in range(1, model.num_layers + 1)]
            assert out.rows_per_layer == expected_rows, (name, trim)
        single = EarlyExitEngine(model, rule, learned_heads=heads)(
            batch["input_ids"][:1, : lengths[0]], batch["attention_mask"][:1, : lengths[0]],
            batch["token_type_ids"][:1, : lengths[0]], labels=labels[:1])
        assert int(single.exit_layers[0]) == int(ref_layer[0])


def test_every_rule_matches_one_at_a_time_and_simulator(tiny_model, tiny_tokenizer, tiny_heads, helpers):
    _check_all_rules(tiny_model, tiny_tokenizer, tiny_heads, helpers.TEXTS, require_spread=True)


def test_stateful_rules_on_a_deeper_model(deep_tiny_model, tiny_tokenizer, helpers):
    heads = helpers.StandInLearnedHeads(deep_tiny_model.backbone.hidden_size, deep_tiny_model.num_layers).eval()
    _check_all_rules(deep_tiny_model, tiny_tokenizer, heads, helpers.TEXTS, require_spread=True)


def test_policies_reading_the_path_match_while_rows_leave(deep_tiny_model, tiny_tokenizer, helpers):
    # "path" policies read what earlier exits said (agreement run, previous confidence): the engine must keep
    # that summary aligned with the rows still running as others leave the batch.
    model = copy.deepcopy(deep_tiny_model)
    torch.manual_seed(11)
    model.reset_policies("path", 16)
    model.eval()
    heads = helpers.StandInLearnedHeads(model.backbone.hidden_size, model.num_layers).eval()
    _check_all_rules(model, tiny_tokenizer, heads, helpers.TEXTS, require_spread=True)


def test_a_saturated_policy_still_orders_its_rows(tiny_model, tiny_tokenizer, helpers):
    # A policy that is sure of itself (RL pushes logits past 17) has a float32 sigmoid of exactly 1 on every row:
    # no threshold could then tell its rows apart, and the ConsistentEE curve jumped from its last point to full
    # depth. The signal is float64, so a threshold between two such rows splits them, the same way in the
    # engine, in forward and in the offline tables, and after the knob's trip through a report's JSON.
    model = copy.deepcopy(tiny_model).eval()
    batch = _batch(tiny_tokenizer, helpers.TEXTS)

    def policy_logits():
        with torch.inference_mode():
            return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).policy_logits

    before = policy_logits()
    with torch.no_grad():  # map each policy's logits on these rows onto [20, 30]: sure of itself everywhere
        for index, policy in enumerate(model.policies):
            low, high = before[:, index].min(), before[:, index].max()
            scale = 10.0 / (high - low)
            policy.net[-1].weight.mul_(scale)
            policy.net[-1].bias.mul_(scale).add_(20.0 - scale * low)
    logits = policy_logits()
    assert bool((logits > 17).all()) and bool((logits[:, 0].float().sigmoid() == 1.0).all())  # float32: all 1
    items = [{k: batch[k][i] for k in ("input_ids", "attention_mask", "token_type_ids")} for i in range(len(helpers.TEXTS))]
    tables = collect_exit_tables(model, items, lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]},
                                 progress=False)
    first = tables.policy_probs[:, 0]
    assert first.dtype == torch.float64 and len(set(first.tolist())) == len(first)  # every row its own value
    knob = ConsistentEERule.knob_from_json(ConsistentEERule.knob_to_json(_between(first, 0.5), model_key=0.05))
    rule = make_rule("consistentee", knob)
    simulated = simulate_exits(rule, tables.probs, tables.policy_probs)
    assert 0 < int((simulated.exit_layer == 1).sum()) < len(first)  # the threshold splits the rows at layer 1
    assert torch.equal(simulated.exit_layer == 1, first > knob)
    engine = EarlyExitEngine(model, rule)(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert torch.equal(engine.exit_layers, simulated.exit_layer)
    with torch.inference_mode():
        forward = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], exit_rule=rule)
    assert torch.equal(forward.exit_layer.cpu(), simulated.exit_layer)


@pytest.mark.integration
def test_every_rule_matches_on_real_minilm(helpers):
    from transformers import AutoTokenizer

    from consistentee.model.modeling import EarlyExitForSequenceClassification
    from consistentee.resources import builtin_model_path

    torch.manual_seed(5)
    model = EarlyExitForSequenceClassification.from_backbone("minilm", ["neg", "pos"], pooling="mean").eval()
    with torch.no_grad():
        for head in model.exits:
            head.weight.mul_(40.0)
        for policy in model.policies:
            policy.net[-1].weight.mul_(30.0)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("minilm"))
    heads = helpers.StandInLearnedHeads(model.backbone.hidden_size, model.num_layers, scale=4.0).eval()
    texts = helpers.TEXTS + [t.upper() + " " + t for t in helpers.TEXTS[:8]]
    _check_all_rules(model, tokenizer, heads, texts, require_spread=False)


def test_rows_leave_the_batch_and_padding_is_trimmed(tiny_model, tiny_tokenizer, tiny_heads, helpers):
    """Layer hooks see fewer rows deeper down; with trim, fewer columns once the long rows have left."""
    texts = helpers.TEXTS[:12]
    batch = _batch(tiny_tokenizer, texts)
    lengths = batch["attention_mask"].sum(1)
    long_rows = lengths > lengths.float().median()
    with torch.inference_mode():
        first = tiny_model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).exit_logits[:, 0]
    pred1 = first.argmax(-1)
    # oracle: long rows are right at layer 1 (exit there); short rows are wrong at layer 1 (keep going)
    labels = torch.where(long_rows, pred1, 1 - pred1)
    seen: dict[int, list[tuple[int, int]]] = {}
    layers = tiny_model.backbone.model.encoder.layer
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, i=i: seen.setdefault(i, []).append(tuple(args[0].shape[:2])))
        for i, layer in enumerate(layers)]
    try:
        outputs = {}
        for trim in (True, False):
            seen.clear()
            engine = EarlyExitEngine(tiny_model, make_rule("oracle"), trim=trim)
            outputs[trim] = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], labels)
            rows = [seen[i][0][0] for i in range(len(layers)) if i in seen]
            widths = [seen[i][0][1] for i in range(len(layers)) if i in seen]
            assert rows[0] == len(texts)
            assert rows[1] == int((~long_rows).sum()) < rows[0]
            assert rows == [n for n in outputs[trim].rows_per_layer if n]
            if trim:
                assert widths[1] == int(lengths[~long_rows].max()) < widths[0]
            else:
                assert widths[1] == widths[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert torch.equal(outputs[True].exit_layers, outputs[False].exit_layers)
    assert torch.equal(outputs[True].predictions, outputs[False].predictions)
    assert bool((outputs[True].exit_layers[long_rows] == 1).all())


def test_signals_computed_only_for_what_the_rule_needs(tiny_model, tiny_tokenizer, helpers):
    batch = _batch(tiny_tokenizer, helpers.TEXTS[:10])
    calls = {"exit": [], "policy": []}
    exit_hooks = [head.register_forward_pre_hook(
        lambda m, args, i=i: calls["exit"].append((i, args[0].shape[0]))) for i, head in enumerate(tiny_model.exits)]
    policy_hooks = [p.register_forward_pre_hook(
        lambda m, args, i=i: calls["policy"].append((i, args[0].shape[0]))) for i, p in enumerate(tiny_model.policies)]
    try:
        out = EarlyExitEngine(tiny_model, make_rule("static", 2))(batch["input_ids"], batch["attention_mask"])
        assert calls["exit"] == [(1, 10)] and calls["policy"] == []
        assert out.exit_layers.tolist() == [2] * 10
        calls["exit"].clear()
        out = EarlyExitEngine(tiny_model, make_rule("consistentee", 0.5))(batch["input_ids"], batch["attention_mask"])
        # the classifier runs once per row, at its exit, on the exited rows only
        assert sum(n for _, n in calls["exit"]) == 10
        assert [n for _, n in calls["policy"]] == out.rows_per_layer[:-1][: len(calls["policy"])]
    finally:
        for hook in exit_hooks + policy_hooks:
            hook.remove()


def test_full_depth_logits_is_the_plain_forward(tiny_model, tiny_tokenizer, helpers):
    batch = _batch(tiny_tokenizer, helpers.TEXTS)
    logits = full_depth_logits(tiny_model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.inference_mode():
        expected = tiny_model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).exit_logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    out = EarlyExitEngine(tiny_model, make_rule("static", tiny_model.num_layers))(
        batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert torch.equal(out.predictions, logits.argmax(-1))


def test_autocast_bf16_runs_and_returns_float32(tiny_model, tiny_tokenizer, helpers):
    batch = _batch(tiny_tokenizer, helpers.TEXTS[:6])
    out = EarlyExitEngine(tiny_model, make_rule("entropy", 0.3), autocast_dtype="bf16")(
        batch["input_ids"], batch["attention_mask"])
    assert out.probs.dtype == torch.float32 and out.probs.shape == (6, 2)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(6))
    assert full_depth_logits(tiny_model, batch["input_ids"], batch["attention_mask"], autocast_dtype="bf16").shape == (6, 2)
    with pytest.raises(ValueError, match="autocast_dtype"):
        EarlyExitEngine(tiny_model, make_rule("entropy", 0.3), autocast_dtype="int8")


def test_input_errors(tiny_model, tiny_tokenizer, helpers):
    batch = _batch(tiny_tokenizer, helpers.TEXTS[:4])
    with pytest.raises(ValueError, match="learned"):
        EarlyExitEngine(tiny_model, make_rule("learned", 0.5))
    with pytest.raises(ValueError, match="labels"):
        EarlyExitEngine(tiny_model, make_rule("oracle"))(batch["input_ids"], batch["attention_mask"])
    left = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        EarlyExitEngine(tiny_model, make_rule("entropy", 0.3))(batch["input_ids"].flip(1), left)
    tiny_model.train()
    try:  # a model left in training mode is run in eval mode (no dropout) and handed back as it was
        engine = EarlyExitEngine(tiny_model, make_rule("entropy", 0.3))
        first, second = (engine(batch["input_ids"], batch["attention_mask"]) for _ in range(2))
        assert torch.equal(first.probs, second.probs) and tiny_model.training
    finally:
        tiny_model.eval()
    empty = EarlyExitEngine(tiny_model, make_rule("entropy", 0.3))(
        torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long))
    assert empty.predictions.shape == (0,) and empty.probs.shape == (0, 2)
