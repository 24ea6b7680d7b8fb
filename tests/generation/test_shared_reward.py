"""The decoder's per-token reward is the encoder's (training.rl): the same numbers as the decoder's own code before
it shared it, and the encoder's reward forms and hardness kinds per token."""

from __future__ import annotations

import pytest
import torch

from consistentee.generation import training as T
from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.training.rl import make_reward, reward_quality, weight_from_hardness

from .conftest import tiny_base


def _old_stage2_reward(log_q, right, exit_layer, memorized, num_layers, *, reward, quality, floor, beta):
    """The decoder's stage-2 reward as generation/training.py computed it on its own (before this change)."""
    q = log_q if quality == "log_prob" else right.float()
    if reward == "hardness":
        weight = floor + (1.0 - floor) * (1.0 - memorized.to(torch.float32) / num_layers)
    else:
        weight = torch.ones_like(memorized, dtype=torch.float32)
    return (q.detach() - beta * weight.to(q.dtype) * exit_layer.to(q.dtype)).detach()


def _tokens(seed=0, n=6, t=9, num_layers=12):
    g = torch.Generator().manual_seed(seed)
    log_q = -torch.rand(n, t, generator=g) * 6
    right = torch.rand(n, t, generator=g) < 0.4
    exit_layer = torch.randint(1, num_layers + 1, (n, t), generator=g)
    memorized = torch.randint(1, num_layers + 1, (n, t), generator=g)
    return log_q, right, exit_layer, memorized


@pytest.mark.parametrize("reward", ["hardness", "cost"])
@pytest.mark.parametrize("quality", ["correct", "log_prob"])
@pytest.mark.parametrize("floor", [0.0, 0.2, 1.0])
def test_the_shared_reward_equals_the_decoders_old_one(reward, quality, floor):
    log_q, right, exit_layer, memorized = _tokens()
    beta = 0.07
    old = _old_stage2_reward(log_q, right, exit_layer, memorized, 12, reward=reward, quality=quality, floor=floor,
                             beta=beta)
    weight = weight_from_hardness("memorized", memorized, 12, floor) if reward == "hardness" else None
    new = make_reward(reward, beta)(reward_quality(quality, log_q, right), exit_layer, weight, 12)
    assert torch.equal(new, old)
    if reward == "hardness" and quality == "log_prob":
        assert torch.equal(T.token_rewards(log_q, exit_layer, T.hardness_weight(memorized, 12, floor), beta), old)


def test_the_decoder_gains_the_accuracy_reward_and_the_loss_hardness():
    log_q, right, exit_layer, _ = _tokens(1)
    assert torch.equal(make_reward("accuracy", 0.1)(reward_quality("correct", log_q, right), exit_layer, None, 12),
                       right.float())
    loss = torch.rand(4, 5) * 3
    assert torch.allclose(weight_from_hardness("loss", loss, 12, 0.25), 0.25 + 0.75 * torch.exp(-loss))
    with pytest.raises(ValueError, match="unknown reward"):
        T.LMTrainConfig(reward="nope")
    with pytest.raises(ValueError, match="unknown hardness"):
        T.LMTrainConfig(hardness="nope")


def test_stage2_trains_with_the_accuracy_reward_and_the_loss_hardness(tmp_path):
    model = EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2))
    chunks = torch.randint(3, 64, (6, 12))
    loss = T.compute_final_exit_loss(model, chunks, T.LMTrainConfig(seq_len=12, batch_size=2))
    assert loss.shape == chunks.shape and bool((loss[:, :-1] > 0).all()) and bool((loss[:, -1] == 0).all())
    for kw in ({"hardness": "loss", "hardness_floor": 0.1}, {"reward": "accuracy"}):
        cfg = T.LMTrainConfig(seq_len=12, batch_size=2, stage2_steps=2, rollouts=2, beta=0.1, **kw)
        before = [p.clone() for p in model.policies.parameters()]
        hist = T.stage2(model, chunks, loss if kw.get("hardness") == "loss" else T.compute_memorized(model, chunks, cfg),
                        cfg, progress=False)
        assert len(hist) == 2 and all(r["loss"] == r["loss"] for r in hist)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.policies.parameters(), strict=True))


def test_the_loss_hardness_is_computed_once_and_kept(tmp_path):
    from safetensors.torch import load_file

    from .test_training import _CharTokenizer

    cfg = T.LMTrainConfig(seq_len=12, batch_size=2, stage1_steps=1, head_positions=4, memorize_chunks=3,
                          stage2_steps=1, rollouts=2, stage3_steps=1, hardness="loss")
    T.train_exits(EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2)), _CharTokenizer(), tmp_path, cfg,
                  progress=False)
    kept = load_file(tmp_path / T.FINAL_LOSS_FILE)[T.FINAL_LOSS_KEY]
    assert kept.shape == (3, 12) and not (tmp_path / T.MEMORIZED_FILE).exists()
