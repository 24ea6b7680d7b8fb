"""Stage 1 on a tiny random model: it learns, checkpoints atomically and resumes to the same result."""

from __future__ import annotations

import json

import pytest
import torch

from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.pipeline.memorize import run_memorize
from consistentee.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from consistentee.training.run import (
    DataConfig,
    ModelConfig,
    load_run_model,
    run_evaluate,
    run_stage1,
    split_tables,
)
from consistentee.training.stage1 import (
    Stage1Config,
    multi_exit_loss,
    pabee_weights,
    phases_for,
    self_distillation_loss,
)


def test_pabee_weights_grow_with_depth_and_sum_to_one():
    w = pabee_weights(4)
    assert torch.allclose(w, torch.tensor([1, 2, 3, 4]) / 10.0)


def test_multi_exit_loss_is_the_weighted_sum_of_per_exit_ce():
    logits = torch.randn(5, 3, 2)
    labels = torch.tensor([0, 1, 1, 0, 1])
    w = torch.tensor([0.2, 0.3, 0.5])
    per_exit = [torch.nn.functional.cross_entropy(logits[:, i], labels) for i in range(3)]
    expected = sum(wi * ce for wi, ce in zip(w, per_exit, strict=True))
    assert torch.allclose(multi_exit_loss(logits, labels, w), expected)


def test_self_distillation_is_the_weighted_kl_from_the_detached_last_exit():
    logits = torch.randn(4, 3, 5, requires_grad=True)
    w = torch.tensor([0.1, 0.3, 0.6])
    p_last = torch.softmax(logits[:, -1].detach(), -1)
    kl = [(p_last * (p_last.log() - torch.log_softmax(logits[:, i], -1))).sum(-1).mean() for i in range(2)]
    expected = (0.1 * kl[0] + 0.3 * kl[1]) / 0.4
    loss = self_distillation_loss(logits, w)
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert logits.grad[:, -1].abs().sum() == 0  # the teacher is not pulled towards its students
    assert logits.grad[:, 0].abs().sum() > 0


def test_self_distillation_is_zero_when_every_exit_already_agrees_with_the_last():
    same = torch.randn(4, 1, 5).expand(4, 3, 5)
    assert self_distillation_loss(same, pabee_weights(3)).abs() < 1e-6
    assert self_distillation_loss(same, torch.tensor([0.0, 0.0, 1.0])) == 0  # the final phase of deebert


def test_deebert_recipe_trains_the_final_exit_then_the_others():
    first, second = phases_for("deebert", 4)
    assert first.train_backbone and first.trained_exits == [3] and first.exit_weights.tolist() == [0, 0, 0, 1]
    assert not second.train_backbone and second.trained_exits == [0, 1, 2] and second.exit_weights[3] == 0


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="recipe"):
        Stage1Config(recipe="magic")
    with pytest.raises(ValueError, match="epochs"):
        Stage1Config(epochs=0)
    with pytest.raises(ValueError, match="distill_weight"):
        Stage1Config(distill_weight=-0.5)


def _cfgs(tiny_csv, tiny_encoder_dir, **stage1):
    data = DataConfig(dataset=tiny_csv, id_column="id", max_length=16)
    model = ModelConfig(model=tiny_encoder_dir, pooling="mean")
    return data, model, Stage1Config(**{"epochs": 3, "batch_size": 8, "learning_rate": 1e-3,
                                        "head_learning_rate": 3e-3, "checkpoint_every": 2, **stage1})


def test_stage1_learns_and_writes_the_run_directory(tiny_csv, tiny_encoder_dir, tmp_path):
    data, model_cfg, cfg = _cfgs(tiny_csv, tiny_encoder_dir)
    run_stage1(tmp_path, data, model_cfg, cfg, device="cpu", progress=False, log=lambda *_: None)
    metrics = json.loads((tmp_path / "stage1" / "metrics.json").read_text())
    assert metrics["complete"] and len(metrics["history"]) == 3
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert all(len(h["dev_per_exit_accuracy"]) == 3 for h in metrics["history"])
    assert not (tmp_path / "stage1" / "checkpoint").exists()
    model = EarlyExitForSequenceClassification.from_pretrained(tmp_path / "stage1" / "model")
    assert model.config.label_names == ["negative", "positive"]
    assert (tmp_path / "labels.json").is_file() and (tmp_path / "run.json").is_file()

    layers = run_memorize(tmp_path, device="cpu", progress=False, log=lambda *_: None)
    saved = json.loads((tmp_path / "memorized_layers.json").read_text())
    assert len(saved["layers"]) == len(layers) == 48 and saved["num_layers"] == 3
    assert all(1 <= m <= 3 for m in saved["layers"].values())
    assert (tmp_path / "memorized_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = run_evaluate(tmp_path, "test", device="cpu", progress=False, log=lambda *_: None)
    assert result["examples"] == 6 and len(result["per_exit_accuracy"]) == 3


def test_self_distillation_brings_the_shallow_exits_closer_to_the_last(tiny_csv, tiny_encoder_dir, tmp_path):
    def shallow_kl(run_dir):
        model = EarlyExitForSequenceClassification.from_pretrained(run_dir / "stage1" / "model")
        _, data = load_run_model(run_dir, device="cpu")
        tables = split_tables(model, data, "train", progress=False)
        logits = tables.probs.clamp_min(1e-9).log()
        return self_distillation_loss(logits, pabee_weights(model.num_layers)).item()

    kls = {}
    for weight in (0.0, 2.0):
        # deebert: the same final exit in both runs (phase 1), then only the shallow exits learn (phase 2)
        data, model_cfg, cfg = _cfgs(tiny_csv, tiny_encoder_dir, distill_weight=weight, recipe="deebert", epochs=4,
                                     learning_rate=3e-3, head_learning_rate=1e-2)
        run_stage1(tmp_path / str(weight), data, model_cfg, cfg, device="cpu", progress=False, log=lambda *_: None)
        kls[weight] = shallow_kl(tmp_path / str(weight))
    assert kls[2.0] < 0.8 * kls[0.0], kls


def test_a_rerun_of_a_finished_stage_loads_instead_of_training(tiny_csv, tiny_encoder_dir, tmp_path):
    data, model_cfg, cfg = _cfgs(tiny_csv, tiny_encoder_dir, epochs=1)
    first = run_stage1(tmp_path, data, model_cfg, cfg, device="cpu", progress=False, log=lambda *_: None)
    messages = []
    second = run_stage1(tmp_path, data, model_cfg, cfg, device="cpu", progress=False, log=messages.append)
    assert any("already complete" in m for m in messages)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_from_a_mid_epoch_checkpoint_ends_like_an_uninterrupted_run(tiny_csv, tiny_encoder_dir, tmp_path):
    data, model_cfg, cfg = _cfgs(tiny_csv, tiny_encoder_dir, epochs=2)
    full = run_stage1(tmp_path / "full", data, model_cfg, cfg, device="cpu", progress=False, log=lambda *_: None)

    # Simulate a crash: run 1 epoch + 2 steps into a run dir, then resume with the full setting.
    import consistentee.training.stage1 as stage1

    calls = {"n": 0}
    real_save = stage1.save_checkpoint

    class Crash(Exception):
        pass

    def save_then_maybe_crash(directory, model, state):
        real_save(directory, model, state)
        calls["n"] += 1
        if state["epoch"] == 1 and state["step"] == 2:
            raise Crash

    stage1.save_checkpoint = save_then_maybe_crash
    try:
        with pytest.raises(Crash):
            run_stage1(tmp_path / "crashed", data, model_cfg, cfg, device="cpu", progress=False, log=lambda *_: None)
    finally:
        stage1.save_checkpoint = real_save
    assert (tmp_path / "crashed" / "stage1" / "checkpoint").is_dir()
    resumed = run_stage1(tmp_path / "crashed", data, model_cfg, cfg, device="cpu", progress=False,
                         log=lambda *_: None)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    full_hist = json.loads((tmp_path / "full" / "stage1" / "metrics.json").read_text())["history"]
    res_hist = json.loads((tmp_path / "crashed" / "stage1" / "metrics.json").read_text())["history"]
    assert [h["dev_per_exit_accuracy"] for h in full_hist] == [h["dev_per_exit_accuracy"] for h in res_hist]


def test_a_corrupt_checkpoint_is_detected_and_named(tmp_path):
    model = torch.nn.Linear(3, 2)
    save_checkpoint(tmp_path / "ckpt", model, {"step": 1})
    verify_checkpoint(tmp_path / "ckpt")
    assert load_checkpoint(tmp_path / "ckpt", model)["step"] == 1
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_checkpoint(tmp_path / "ckpt", model)
    weights.write_bytes(bytes(data[:10]))
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(tmp_path / "ckpt")
