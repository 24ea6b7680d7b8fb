"""ConsistentEE stages 2/3: rollouts agree with the full-depth model, and the policy learns hardness."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from consistentee.data import LabelList
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.pipeline.memorize import run_memorize
from consistentee.training.policy import PolicyConfig, evaluate_policy, run_beta_sweep, train_policy
from consistentee.training.rl import trajectory_log_prob
from consistentee.training.rollout import repeat_batch, rollout
from consistentee.training.run import DataConfig, ModelConfig, load_run_model, save_run_settings


def _batch(tiny_encoder_dir, texts, labels):
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    enc = tok(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "token_type_ids": enc["token_type_ids"], "labels": torch.tensor(labels), "index": torch.arange(len(texts))}


TEXTS = ["short", "a somewhat longer sentence here", "mid sized text", "x", "the longest of all these example texts"]


@pytest.mark.parametrize("trim", [True, False])
def test_rollout_log_prob_and_exit_scores_equal_the_full_depth_model(tiny_encoder_dir, trim):
    torch.manual_seed(0)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["a", "b"], pooling="mean").eval()
    for policy in model.policies:  # spread the policies so that every exit layer occurs
        policy.net[-1].bias.data.fill_(-0.3)
    batch = repeat_batch(_batch(tiny_encoder_dir, TEXTS, [0, 1, 0, 1, 1]), 6)
    ro = rollout(model, batch, train_backbone=False, generator=torch.Generator().manual_seed(3), trim=trim)
    with torch.no_grad():
        full = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    p = full.policy_logits.sigmoid()
    assert set(ro.exit_layer.tolist()) == {1, 2, 3}
    assert torch.allclose(ro.log_prob, trajectory_log_prob(p, ro.exit_layer), atol=1e-5)
    # Brute force on the tiny model: the probability of each sampled trajectory, as a product over the layers.
    for row in range(30):
        e = int(ro.exit_layer[row])
        prob = 1.0
        for j in range(1, e):
            prob *= 1 - float(p[row, j - 1])
        if e < 3:
            prob *= float(p[row, e - 1])
        assert abs(float(ro.log_prob[row].detach().exp()) - prob) < 1e-5
    log_q = full.exit_logits.log_softmax(-1)[torch.arange(30), ro.exit_layer - 1, batch["labels"]]
    assert torch.allclose(ro.log_q_exit, log_q, atol=1e-5)
    taken = full.exit_logits[torch.arange(30), ro.exit_layer - 1].argmax(-1)
    assert torch.equal(ro.correct, taken == batch["labels"])
    assert torch.equal(ro.decisions, (ro.exit_layer.clamp(max=2)).float())  # no decision at the forced last layer


def test_exited_rows_stop_running_deeper_layers(tiny_encoder_dir):
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["a", "b"], pooling="mean").eval()
    seen = []
    for layer in model.backbone.model.encoder.layer:
        layer.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    for policy in model.policies:
        policy.net[-1].bias.data.fill_(2.0)  # p ~ 0.88: most rows leave at layer 1
    batch = repeat_batch(_batch(tiny_encoder_dir, TEXTS, [0, 1, 0, 1, 1]), 8)
    ro = rollout(model, batch, train_backbone=False, generator=torch.Generator().manual_seed(0))
    assert seen[0] == 40 and seen[1] < 15 and seen[1] == int((ro.exit_layer > 1).sum())


def test_expected_ce_weights_each_exit_by_its_detached_probability(tiny_encoder_dir):
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["a", "b"], pooling="mean").eval()
    batch = _batch(tiny_encoder_dir, TEXTS, [0, 1, 0, 1, 1])
    ro = rollout(model, batch, train_backbone=True, expected_ce=True, generator=torch.Generator().manual_seed(0))
    full = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    p = full.policy_logits.sigmoid()
    dist = torch.stack([p[:, 0], (1 - p[:, 0]) * p[:, 1], (1 - p[:, 0]) * (1 - p[:, 1])], dim=1)
    ce = torch.nn.functional.cross_entropy(full.exit_logits.transpose(1, 2), batch["labels"].unsqueeze(1).expand(5, 3),
                                           reduction="none")
    assert torch.allclose(ro.expected_ce, (dist * ce).sum(1), atol=1e-5)
    assert ro.expected_ce.requires_grad


def test_every_exit_rollout_gives_each_exits_outcome_and_a_differentiable_exit_distribution(tiny_encoder_dir):
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["a", "b"], pooling="mean").eval()
    for policy in model.policies:
        policy.net[-1].bias.data.fill_(2.0)  # most sampled exits at layer 1: every row still runs to full depth
    batch = _batch(tiny_encoder_dir, TEXTS, [0, 1, 0, 1, 1])
    ro = rollout(model, batch, train_backbone=False, every_exit=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    p = full.policy_logits.sigmoid()
    dist = torch.stack([p[:, 0], (1 - p[:, 0]) * p[:, 1], (1 - p[:, 0]) * (1 - p[:, 1])], dim=1)
    assert torch.allclose(ro.exit_probs, dist, atol=1e-5) and ro.exit_probs.requires_grad
    assert torch.equal(ro.layer_correct, full.exit_logits.argmax(-1) == batch["labels"].unsqueeze(1))
    log_q = full.exit_logits.log_softmax(-1).gather(2, batch["labels"].view(5, 1, 1).expand(5, 3, 1)).squeeze(2)
    assert torch.allclose(ro.layer_log_q, log_q, atol=1e-5)
    taken = ro.layer_correct.gather(1, (ro.exit_layer - 1).unsqueeze(1)).squeeze(1)
    assert torch.equal(ro.correct, taken)  # the sampled trajectory is still reported (logs, rewards)


def test_invalid_policy_settings_are_refused():
    with pytest.raises(ValueError, match="beta"):
        PolicyConfig(beta=-0.1)
    with pytest.raises(ValueError, match="rollouts"):
        PolicyConfig(rollouts=0)
    with pytest.raises(ValueError, match="reward"):
        PolicyConfig(reward="speed")
    with pytest.raises(ValueError, match="policy_loss"):
        PolicyConfig(policy_loss="exact")


# --- learning: easy inputs leave early, hard ones go deep --------------------------------------------------

EASY = ["sunny bright day", "happy bright sun", "warm sunny morning", "bright happy light"]
HARD = ["cold dark night", "grey rainy evening", "dark stormy sky", "rainy cold wind"]


@pytest.fixture(scope="module")
def hardness_run(tmp_path_factory, tiny_encoder_dir):
    """A run whose stage-1 model is built by hand: exits 1..L-1 always say 'easy' (right for easy inputs,
    wrong for hard ones); only the last exit tells them apart. Easy inputs have m=1, hard ones m=L."""
    run_dir = tmp_path_factory.mktemp("hardness-run")
    rows = [{"id": f"e{i}", "text": f"sunny sunny sunny {EASY[i % 4]}", "label": "easy"} for i in range(40)]
    rows += [{"id": f"h{i}", "text": f"dark dark dark {HARD[i % 4]}", "label": "hard"} for i in range(40)]
    csv = run_dir / "data.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    data_cfg = DataConfig(dataset=str(csv), id_column="id", max_length=16)
    save_run_settings(run_dir, data_cfg, ModelConfig(model=tiny_encoder_dir, pooling="mean"))
    LabelList(("easy", "hard")).save(run_dir)

    torch.manual_seed(0)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["easy", "hard"], pooling="mean")
    model.config.classifier_dropout = 0.0
    model.eval()
    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        pooled = model(enc["input_ids"], enc["attention_mask"], return_pooled=True).pooled[:, -1]
        easy_mean, hard_mean = pooled[:40].mean(0), pooled[40:].mean(0)
        direction = hard_mean - easy_mean
        scale = 20.0 / direction.norm() ** 2
        for exit_head in model.exits[:-1]:
            exit_head.weight.zero_()
            exit_head.bias.copy_(torch.tensor([4.0, -4.0]))
        last = model.exits[-1]
        last.weight.copy_(torch.stack([-direction, direction]) * scale / 2)
        mid = (easy_mean + hard_mean) / 2
        last.bias.copy_(torch.stack([mid @ direction, -(mid @ direction)]) * scale / 2)
    model.save_pretrained(run_dir / "stage1" / "model", tokenizer=tok)
    (run_dir / "stage1" / "metrics.json").write_text(json.dumps({"complete": True, "history": []}))
    run_memorize(run_dir, device="cpu", progress=False, log=lambda *_: None)
    return run_dir


def _mean_exit_by_kind(model_dir, run_dir):
    model = EarlyExitForSequenceClassification.from_pretrained(model_dir)
    _, data = load_run_model(run_dir, device="cpu")
    from consistentee.training.run import split_tables

    tables = split_tables(model, data, "train", progress=False)
    exits = torch.where(tables.policy_probs > 0.5, torch.arange(1, 3), 3).min(dim=1).values
    easy = torch.tensor([i.startswith("e") for i in data.splits.train.ids])
    return exits[easy].float().mean().item(), exits[~easy].float().mean().item()


def test_the_hand_built_run_has_the_intended_hardness(hardness_run):
    table = json.loads((hardness_run / "memorized_layers.json").read_text())["layers"]
    assert {m for i, m in table.items() if i.startswith("e")} == {1}
    assert {m for i, m in table.items() if i.startswith("h")} == {3}


#: Stage 2 alone on the hand-built run: the state tells easy from hard, and the log-probability reward with
#: per-group scaling is the docs/method.md form of hardness guidance.
HARDNESS_POLICY = dict(beta=0.5, policy_epochs=12, joint_epochs=0, policy_batch_size=16, policy_learning_rate=1e-2,
                       policy_features="state", reward_quality="log_prob", advantage_norm="group_std", seed=0)


def _assert_learns_hardness(run_dir, cfg: PolicyConfig):
    """Easy inputs leave at layer 1, hard ones go to the last layer, and no depth cost keeps easy inputs deeper."""
    model_dir = train_policy(run_dir, cfg, device="cpu", progress=False, log=lambda *_: None)
    easy, hard = _mean_exit_by_kind(model_dir, run_dir)
    assert easy < 1.3 and hard > 2.7, (easy, hard)
    flat = train_policy(run_dir, PolicyConfig(**{**cfg.__dict__, "beta": 0.0}), device="cpu", progress=False,
                        log=lambda *_: None)
    easy0, hard0 = _mean_exit_by_kind(flat, run_dir)
    assert hard0 > 2.7 and easy0 > easy + 0.4, (easy0, easy)
    return model_dir


def test_stage2_learns_to_exit_easy_inputs_early_and_hard_ones_late(hardness_run):
    # The exits of this run are equally confident on every input: only the state tells easy from hard.
    model_dir = _assert_learns_hardness(hardness_run, PolicyConfig(rollouts=8, **HARDNESS_POLICY))
    progress = json.loads((model_dir.parent / "progress.json").read_text())
    assert progress["complete"] and progress["completed"] == ["r1-policy"]
    log = (model_dir.parent / "log.csv").read_text().splitlines()
    assert log[0].startswith("unit,epoch,step,loss,reward,mean_exit_layer,exit_histogram")
    assert len(log) - 1 == 12 * 4  # 64 training rows / 16 per step x 12 epochs


def test_the_expected_reward_loss_learns_hardness_too(hardness_run, tmp_path):
    # The exact expected reward over all exits instead of sampled exits (two rollouts: dropout only).
    run = tmp_path / "run"  # its own copy: the betas above are trained in the shared run with other settings
    shutil.copytree(hardness_run, run, ignore=shutil.ignore_patterns("policies"))
    _assert_learns_hardness(run, PolicyConfig(rollouts=2, policy_loss="expected", **HARDNESS_POLICY))


def test_joint_rounds_and_sweep_write_one_model_per_beta(hardness_run):
    cfg = PolicyConfig(rollouts=4, rounds=2, policy_epochs=1, joint_epochs=1, policy_batch_size=32, refresh_memorized=True,
                       policy_train_examples=32, seed=1)
    dirs = run_beta_sweep(hardness_run, [0.1, 0.3], cfg, device="cpu", progress=False, log=lambda *_: None)
    assert sorted(dirs) == [0.1, 0.3]
    for beta, path in dirs.items():
        progress = json.loads((path.parent / "progress.json").read_text())
        assert progress["completed"] == ["r1-policy", "r1-joint", "r2-policy", "r2-joint"], beta
        assert (path.parent / "memorized_layers_round2.json").is_file()
        model = EarlyExitForSequenceClassification.from_pretrained(path)
        _, data = load_run_model(hardness_run, device="cpu")
        result = evaluate_policy(model, data, "dev")
        assert 1.0 <= result["mean_exit_layer"] <= 3.0


def test_a_beta_trained_with_other_settings_is_not_silently_reused(hardness_run):
    cfg = PolicyConfig(beta=0.7, rollouts=2, policy_epochs=1, joint_epochs=0, policy_batch_size=32, seed=0)
    train_policy(hardness_run, cfg, device="cpu", progress=False, log=lambda *_: None)
    other = PolicyConfig(**{**cfg.__dict__, "policy_features": "state"})
    with pytest.raises(ValueError, match="other settings .*policy_features"):
        train_policy(hardness_run, other, device="cpu", progress=False, log=lambda *_: None)


def test_a_policy_holdout_keeps_stage1_and_the_policy_stages_on_disjoint_examples(tiny_csv, tiny_encoder_dir, tmp_path):
    from consistentee.training.run import run_stage1, train_partition
    from consistentee.training.stage1 import Stage1Config

    ids = [f"x{i}" for i in range(40)]
    stage1_rows, policy_rows = train_partition(ids, 0.25, seed=0)
    assert len(policy_rows) == 10 and not set(stage1_rows) & set(policy_rows)
    assert sorted(stage1_rows + policy_rows) == list(range(40))
    assert train_partition(ids, 0.25, seed=0) == (stage1_rows, policy_rows)
    assert train_partition(ids, 0.0, seed=0) == (list(range(40)), list(range(40)))

    data = DataConfig(dataset=tiny_csv, id_column="id", max_length=16, policy_holdout=0.25)
    messages = []
    run_stage1(tmp_path, data, ModelConfig(model=tiny_encoder_dir, pooling="mean"), Stage1Config(epochs=1, batch_size=8),
               device="cpu", progress=False, log=messages.append)
    assert any("stage 1 trains on 36 examples; 12 are held out" in m for m in messages)
    metrics = json.loads((tmp_path / "stage1" / "metrics.json").read_text())
    assert metrics["history"][0]["steps"] == 5  # ceil(36 / 8)
    run_memorize(tmp_path, device="cpu", progress=False, log=lambda *_: None)
    cfg = PolicyConfig(rollouts=2, policy_epochs=1, joint_epochs=0, policy_batch_size=4)
    train_policy(tmp_path, cfg, device="cpu", progress=False, log=lambda *_: None)
    log = (tmp_path / "policies" / "beta-0.05" / "log.csv").read_text().splitlines()
    assert len(log) - 1 == 3  # 12 held-out examples / 4 per step
    with pytest.raises(ValueError, match="policy_holdout"):
        DataConfig(policy_holdout=1.0)


@pytest.mark.parametrize("field_value", [("policy_learning_rate", float("nan")), ("joint_learning_rate", float("inf")),
                                         ("joint_head_learning_rate", 0.0), ("beta", float("inf"))])
def test_non_finite_or_zero_rates_are_refused_before_training(field_value):
    name, value = field_value
    with pytest.raises(ValueError, match=name):
        PolicyConfig(**{name: value})


def _always_exit_first_run(hardness_run, tmp_path):
    """A copy of the hand-built run whose stage-1 policies exit every input at layer 1."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(hardness_run, run_dir, ignore=shutil.ignore_patterns("policies"))
    model_dir = run_dir / "stage1" / "model"
    model = EarlyExitForSequenceClassification.from_pretrained(model_dir)
    with torch.no_grad():
        for policy in model.policies:
            policy.net[-1].weight.zero_()
            policy.net[-1].bias.fill_(30.0)
    model.save_pretrained(model_dir, tokenizer=AutoTokenizer.from_pretrained(model_dir))
    return run_dir


@pytest.mark.parametrize("anchor", [0.0, 0.5])
def test_the_anchor_trains_the_deep_exits_that_no_rollout_reaches(hardness_run, tmp_path, anchor):
    run_dir = _always_exit_first_run(hardness_run, tmp_path)
    stage1 = EarlyExitForSequenceClassification.from_pretrained(run_dir / "stage1" / "model")
    before = stage1.exits[-1].weight.clone()
    cfg = PolicyConfig(beta=0.1, rollouts=2, policy_epochs=0, joint_epochs=1, policy_batch_size=32, seed=0,
                       anchor_weight=anchor, policy_features=stage1.config.policy_features)  # keeps the policies
    model_dir = train_policy(run_dir, cfg, device="cpu", progress=False, log=lambda *_: None)
    after = EarlyExitForSequenceClassification.from_pretrained(model_dir).exits[-1].weight
    changed = (after - before).abs().max().item()
    if anchor == 0:
        assert changed == 0  # the paper's stage 3: only the exit taken learns
    else:
        assert changed > 1e-4


@pytest.mark.parametrize(("scope", "anchor"), [("all", 0.0), ("exits", 0.0), ("exits", 0.5)])
def test_stage3_on_the_exits_alone_keeps_the_backbone_and_the_last_exit(hardness_run, tmp_path, scope, anchor):
    # without the anchor only the loss at the exit taken trains exit 1; the anchor would train every exit through
    # the backbone, yet with scope "exits" full depth still cannot move
    run_dir = _always_exit_first_run(hardness_run, tmp_path)
    stage1 = EarlyExitForSequenceClassification.from_pretrained(run_dir / "stage1" / "model")
    cfg = PolicyConfig(beta=0.1, rollouts=2, policy_epochs=0, joint_epochs=1, policy_batch_size=32, seed=0,
                       anchor_weight=anchor, joint_scope=scope, policy_features=stage1.config.policy_features)
    model = EarlyExitForSequenceClassification.from_pretrained(
        train_policy(run_dir, cfg, device="cpu", progress=False, log=lambda *_: None))
    before, after = dict(stage1.named_parameters()), dict(model.named_parameters())
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    backbone = {name for name in before if not name.startswith(("exits.", "policies."))}
    assert any(name.startswith("exits.0.") for name in moved)  # the exit every rollout takes learns
    if scope == "exits":
        assert not moved & backbone
        assert not any(name.startswith(f"exits.{stage1.num_layers - 1}.") for name in moved)
    else:
        assert moved & backbone


def test_a_negative_anchor_weight_is_refused():
    with pytest.raises(ValueError, match="anchor_weight"):
        PolicyConfig(anchor_weight=-1.0)


def test_input_scaling_standardises_what_each_policy_reads_on_the_stage1_model(hardness_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(hardness_run, run, ignore=shutil.ignore_patterns("policies"))
    cfg = PolicyConfig(beta=0.3, rollouts=2, policy_epochs=1, joint_epochs=1, policy_batch_size=32,
                       policy_features="path", policy_input_scaling=True, seed=0)
    model = EarlyExitForSequenceClassification.from_pretrained(train_policy(run, cfg, device="cpu", progress=False,
                                                                            log=lambda *_: None))
    stage1, data = load_run_model(run, device="cpu")
    stage1.reset_policies("path", stage1.config.policy_hidden_size)
    train = data.encoded["train"]
    batch = data.collate([train[i] for i in range(len(train))])  # no policy hold-out: every training row
    with torch.no_grad():
        pooled = stage1(batch["input_ids"], batch["attention_mask"], return_pooled=True).pooled
        first = stage1.policy_inputs(0, pooled[:, 0])
        second = stage1.policy_inputs(1, pooled[:, 1], stage1.advance_path(0, pooled[:, 0], None))
    # stage 3 moved the exits afterwards; the scaling stays what stage 2 measured on the stage-1 exits
    for policy, inputs in zip(model.policies, (first, second), strict=True):
        assert torch.allclose(policy.input_shift, inputs.mean(0), atol=1e-4)
        assert torch.allclose(policy.input_scale, inputs.std(0, unbiased=False).clamp_min(1e-3), atol=1e-4)
    assert not torch.equal(model.policies[1].input_scale, torch.ones_like(model.policies[1].input_scale))
