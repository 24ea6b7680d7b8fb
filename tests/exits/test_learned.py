"""Learned exit heads (BERxiT-style): shapes, saving, training on cached states, a frozen model."""

from __future__ import annotations

import os

import pytest
import torch

from consistentee.data.tokenize import DataCollator, EncodedSplit
from consistentee.exits.learned import (
    LearnedExitHeads,
    LearnedHeadConfig,
    cache_pooled_states,
    train_learned_heads,
)
from consistentee.exits.rules import make_rule, simulate_exits
from consistentee.exits.tables import ExitTables


@pytest.mark.parametrize("hidden", [0, 5])
def test_heads_score_shapes_flops_and_save_load_roundtrip(tmp_path, hidden):
    torch.manual_seed(0)
    heads = LearnedExitHeads(hidden_size=8, num_layers=3, hidden=hidden)
    pooled = torch.randn(4, 3, 8)
    scores = heads.score_all(pooled)
    assert scores.shape == (4, 3) and ((scores > 0) & (scores < 1)).all()
    assert torch.allclose(heads.score(1, pooled[:, 1]), scores[:, 1])
    assert heads.flops_per_layer() == (2 * 8 if hidden == 0 else 2 * (8 * 5 + 5))
    target = tmp_path / "heads"
    heads.save(target, extra={"note": "x"})
    assert sorted(os.listdir(tmp_path)) == ["heads"]  # no temporary directory left behind
    assert LearnedExitHeads.is_saved(target)
    loaded = LearnedExitHeads.load(target)
    assert not loaded.training and loaded.hidden == hidden
    assert torch.allclose(loaded.score_all(pooled), scores)
    heads.save(target)  # overwriting an existing directory is atomic too
    assert LearnedExitHeads.load(target).num_layers == 3


def test_load_refuses_what_is_not_a_heads_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        LearnedExitHeads.load(tmp_path)
    with pytest.raises(ValueError, match="shape"):
        LearnedExitHeads(0, 3)
    with pytest.raises(ValueError, match="epochs"):
        LearnedHeadConfig(learned_epochs=0)


def _synthetic_cache(n=400, layers=3, d=6, seed=0) -> ExitTables:
    """Exit l is right exactly when feature l of the pooled state is positive."""
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(n, layers, d, generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    right = pooled[:, torch.arange(layers), torch.arange(layers)] > 0  # [n, L]
    pred = torch.where(right, labels.unsqueeze(1), 1 - labels.unsqueeze(1))
    probs = torch.nn.functional.one_hot(pred, 2).float() * 0.8 + 0.1
    return ExitTables(probs=probs, policy_probs=torch.zeros(n, layers - 1), labels=labels,
                      seq_lens=torch.full((n,), 5), pooled=pooled)


def test_training_on_cached_states_learns_which_exit_is_right():
    cache = _synthetic_cache()
    assert cache.correct().shape == (400, 3)
    cfg = LearnedHeadConfig(learned_epochs=15, learned_batch_size=100, learned_learning_rate=0.1, learned_seed=1)
    heads = train_learned_heads(None, None, None, cfg, cache=cache, device="cpu", progress=False)
    assert heads.history[-1] < heads.history[0] and not heads.training
    scores = heads.score_all(cache.pooled)
    accuracy = ((scores > 0.5).float() == cache.correct()).float().mean()
    assert accuracy > 0.9
    # same seed, same heads
    again = train_learned_heads(None, None, None, cfg, cache=cache, device="cpu", progress=False)
    assert torch.allclose(again.score_all(cache.pooled), scores)
    # the scores drive the learned rule: tau=0.5 exits where the head thinks the exit is right
    result = simulate_exits(make_rule("learned", 0.5), cache.probs, learned_scores=scores.detach(),
                            labels=cache.labels)
    assert result.exit_layer.float().mean() < 3


def test_cache_and_training_keep_the_model_frozen(tiny_encoder_dir):
    from consistentee.model.modeling import EarlyExitForSequenceClassification

    torch.manual_seed(0)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["neg", "pos"], pooling="mean")
    model.train()
    rows = [[101, 2000 + i, 2001 + (i % 3), 102][: 3 + i % 2] for i in range(10)]
    data = EncodedSplit([f"x{i}" for i in range(10)], {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]},
                        [i % 2 for i in range(10)])
    collate = DataCollator(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = cache_pooled_states(model, data, collate, batch_size=4, progress=False)
    assert model.training  # restored
    assert cache.pooled.shape == (10, 3, 32) and cache.probs.shape == (10, 3, 2)
    assert cache.policy_probs.shape == (10, 2) and cache.seq_lens.tolist() == [len(r) for r in rows]
    model.eval()
    with torch.no_grad():
        batch = collate([data[i] for i in range(10)])
        out = model(batch["input_ids"], batch["attention_mask"], return_pooled=True)
    assert torch.allclose(out.pooled, cache.pooled, atol=1e-5)
    assert torch.allclose(out.exit_logits.double().softmax(-1), cache.probs, atol=1e-5)
    heads = train_learned_heads(model, data, collate, LearnedHeadConfig(learned_epochs=2, learned_batch_size=4),
                                progress=False)
    assert heads.num_layers == 3 and heads.hidden_size == 32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cache_of_a_subset_has_one_row_per_subset_item_in_order(tiny_encoder_dir):
    """Learned heads and policies fit on a held-out part of the train split: row i of the cache is item i of the
    subset, whatever the items' indices in the full split."""
    from torch.utils.data import Subset

    from consistentee.model.modeling import EarlyExitForSequenceClassification

    torch.manual_seed(0)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["neg", "pos"], pooling="mean")
    rows = [[101, 2000 + i, 2001 + (i % 3), 102][: 3 + i % 2] for i in range(10)]
    data = EncodedSplit([f"x{i}" for i in range(10)], {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]},
                        [i % 2 for i in range(10)])
    collate = DataCollator(0)
    full = cache_pooled_states(model, data, collate, batch_size=3, progress=False)
    picked = [7, 8, 2]
    part = cache_pooled_states(model, Subset(data, picked), collate, batch_size=2, progress=False)
    assert part.pooled.shape[0] == 3
    assert torch.allclose(part.pooled, full.pooled[picked], atol=1e-5)
    assert part.labels.tolist() == [1, 0, 0] and part.seq_lens.tolist() == [len(rows[i]) for i in picked]
