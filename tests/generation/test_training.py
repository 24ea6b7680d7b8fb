from __future__ import annotations

import torch

from consistentee.generation import training as T
from consistentee.generation.decoder import EarlyExitLM, ExitsConfig

from .conftest import tiny_base


def test_shifted_targets_align_reward_with_next_token():
    # hand-made sequence: position t must be scored on token t+1; the last position has no target
    ids = torch.tensor([[10, 11, 12, 13]])
    mask = torch.tensor([[0, 1, 1, 1]])  # left pad
    targets, valid = T.shifted_targets(ids, mask)
    assert targets[0, :3].tolist() == [11, 12, 13]
    assert valid.tolist() == [[False, True, True, False]]
    # log q at the exit for the target: a hand-made distribution where only the *next* token is likely
    vocab = 16
    logits = torch.full((1, 4, vocab), -10.0)
    for t in range(3):
        logits[0, t, ids[0, t + 1]] = 10.0  # right: predicts the next token
        logits[0, t, ids[0, t]] = 5.0  # the off-by-one target (the authors' defect) gets less
    logq = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    exit_layer = torch.tensor([[1, 2, 3, 4]])
    r = T.token_rewards(logq, exit_layer, torch.ones(1, 4), beta=0.1)
    assert torch.allclose(r[0, 1:3], logq[0, 1:3] - 0.1 * exit_layer[0, 1:3])
    assert (logq[0, :3] > -0.01).all()  # the aligned target is the likely one


def test_memorized_layers_token_level():
    exits = [2, 4, 6]
    targets = torch.tensor([[5, 5, 5, 5]])
    preds = torch.tensor([[[5, 5, 5], [1, 5, 5], [5, 1, 5], [5, 5, 1]]])
    m = T.memorized_layers(preds, targets, exits)
    assert m.tolist() == [[2, 4, 6, 6]]


def _model():
    base = tiny_base(layers=4)
    return EarlyExitLM(base, ExitsConfig(adapter_rank=2))


def test_run_with_exits_freezes_exited_tokens_like_inference():
    model = _model()
    ids = torch.randint(3, 64, (1, 6))

    def decide(layer, h):  # token 2 exits at layer 1
        d = torch.zeros(h.shape[:2], dtype=torch.bool)
        d[0, 2] = layer == 1
        return d

    states, exit_layer = T.run_with_exits(model, ids, decide=decide, freeze=True)
    assert exit_layer[0].tolist() == [4, 4, 2 - 1, 4, 4, 4]
    assert torch.equal(states[1][0, 2], states[4][0, 2])  # frozen state flows on
    # and equals incremental decoding with the propagate strategy: later tokens see the same K/V
    from consistentee.generation.rules import TokenExitRule

    class R(TokenExitRule):
        def __init__(self):
            super().__init__(0)
            self.i = 1

        def start_step(self, b):
            self.i += 1

        def decide(self, m, layer, h, prev):
            return torch.tensor([self.i == 2 and layer == 1]), None

    cache = model.new_cache(1)
    model.forward_tokens(cache, ids[:, :2])
    rule = R()
    last = None
    for j in range(2, 6):
        last = model.step(cache, ids[:, j:j + 1], rule, "propagate")
    parallel = model.head_logits(4, states[4][:, 5])
    assert torch.allclose(last.logits, parallel, atol=1e-4)


def test_stages_run_and_change_only_exit_parts():
    model = _model()
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    chunks = torch.randint(3, 64, (6, 12))
    cfg = T.LMTrainConfig(seq_len=12, batch_size=2, stage1_steps=3, head_positions=4, stage2_steps=3,
                          rollouts=2, stage3_steps=2, beta=0.1)
    pol_before = [p.clone() for p in model.policies.parameters()]
    losses = T.stage1(model, chunks, cfg, progress=False)
    assert len(losses) == 3 and all(x == x for x in losses)
    mem = T.compute_memorized(model, chunks, cfg)
    assert mem.shape == (6, 12) and int(mem.min()) >= 1 and int(mem.max()) <= 4
    hist = T.stage2(model, chunks, mem, cfg, progress=False)
    assert len(hist) == 3
    assert any(not torch.equal(a, b) for a, b in zip(pol_before, model.policies.parameters(), strict=True))
    T.stage3(model, chunks, cfg, progress=False)
    after = model.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
