"""Two CPU processes (DDP over gloo, started by `accelerate launch`) train like one process.

The whole `consistentee train` pipeline (stage 1 -> memorized layers -> policy stage 2 -> joint stage 3) runs once
in this process with batch 2b and once under `accelerate launch` with 2 processes of batch b, on a tiny model
without dropout. Same seed and data order: the weights and the metrics must agree up to float rounding. The
batch sizes leave a short last step (48 examples) in which, for the policy stages, the second process has no
example at all and runs a zero-weight filler: that is covered too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from consistentee.cli.main import main

REPO = Path(__file__).resolve().parents[2]
DDP_CPU = REPO / "examples" / "accelerate" / "ddp_cpu.yaml"


@pytest.fixture(scope="module")
def no_dropout_encoder(tmp_path_factory, tiny_encoder_dir) -> str:
    """The tiny BERT of conftest with every dropout at 0 (dropout would make 1 and 2 processes differ)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(run_dir, data, model, batch, policy_batch) -> list[str]:
    return ["train", "--run-dir", str(run_dir), "--dataset", data, "--id-column", "id", "--model", model,
            "--pooling", "mean", "--max-length", "16", "--epochs", "1", "--learning-rate", "1e-3",
            "--head-learning-rate", "3e-3", "--stage1.checkpoint-every", "2", "--policy.checkpoint-every", "2", "--rollouts", "4", "--policy-epochs", "1",
            "--joint-epochs", "1", "--beta", "0.1", "--batch-size", str(batch), "--policy-batch-size",
            str(policy_batch), "--device", "cpu", "--no-progress"]


def test_two_processes_match_one_process(tiny_csv, no_dropout_encoder, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU),
              "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "consistentee.cli.main",
              *_args(two, tiny_csv, no_dropout_encoder, 5, 10)]
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # One process with the global batch sizes, here, while the two processes run.
        assert main(_args(one, tiny_csv, no_dropout_encoder, 10, 20)) == 0
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]

    for weights in ("stage1/model/model.safetensors", "policies/beta-0.1/model/model.safetensors"):
        a, b = load_file(one / weights), load_file(two / weights)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-4, (weights, worst)

    h1 = json.loads((one / "stage1" / "metrics.json").read_text())["history"]
    h2 = json.loads((two / "stage1" / "metrics.json").read_text())["history"]
    assert [h["steps"] for h in h1] == [h["steps"] for h in h2] == [5]  # 48 examples, global batch 10
    for r1, r2 in zip(h1, h2, strict=True):
        assert r1["train_loss"] == pytest.approx(r2["train_loss"], abs=1e-4)
        assert r1["dev_per_exit_accuracy"] == pytest.approx(r2["dev_per_exit_accuracy"], abs=1e-6)

    # Memorized layers (rank 0 only) and the policy log (metrics summed over processes) agree.
    m1 = json.loads((one / "memorized_layers.json").read_text())["layers"]
    m2 = json.loads((two / "memorized_layers.json").read_text())["layers"]
    assert m1 == m2
    log1 = (one / "policies" / "beta-0.1" / "log.csv").read_text().splitlines()
    log2 = (two / "policies" / "beta-0.1" / "log.csv").read_text().splitlines()
    assert len(log1) == len(log2) == 1 + 3 + 3  # header, 3 policy steps, 3 joint steps (global batch 20)
    for row1, row2 in zip(log1[1:], log2[1:], strict=True):
        a, b = row1.split(","), row2.split(",")
        assert a[:3] == b[:3] and a[6] == b[6], (row1, row2)  # unit, epoch, step, exit histogram
        for x, y in zip(a[3:6] + a[7:9], b[3:6] + b[7:9], strict=True):  # loss, reward, exit, accuracy, entropy
            assert float(x) == pytest.approx(float(y), abs=1e-4), (row1, row2)
    p1 = json.loads((one / "policies" / "beta-0.1" / "progress.json").read_text())
    p2 = json.loads((two / "policies" / "beta-0.1" / "progress.json").read_text())
    assert p1["completed"] == p2["completed"] == ["r1-policy", "r1-joint"]
    for unit in p1["completed"]:
        assert p1["dev"][unit] == pytest.approx(p2["dev"][unit], abs=1e-6)
    # Only rank 0 printed the run's progress lines.
    assert output.count("memorized layers written to") == 1


def test_shards_cover_each_global_step_once_with_weights_that_average_to_the_mean():
    from consistentee.training.stage1 import shard_steps

    order = list(range(23))
    single = shard_steps(order, 8, 1, 0)
    shards = [shard_steps(order, 4, 2, rank) for rank in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 3
    for step, (s0, s1) in enumerate(zip(*shards, strict=True)):
        real = [i for s in (s0, s1) for i, w in zip(s.indices, s.weights, strict=True) if w > 0]
        assert real == single[step].indices
        # DDP averages the two processes' gradients: sum of weights / 2 == 1 (a mean over the global step).
        assert sum(s0.weights + s1.weights) / 2 == pytest.approx(1.0)
    last = shards[1][-1]  # 7 examples in the last step: 4 + 3
    assert last.indices == [20, 21, 22] and last.global_examples == 7
    tail = shard_steps(list(range(10)), 5, 3, 2)  # 10 examples, global batch 15: process 2 has none
    assert tail[0].weights == [0.0] and len(tail[0].indices) == 1
