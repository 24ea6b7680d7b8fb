"""Two CPU processes (gloo, started by `accelerate launch`) train decoder exits like one process.

`consistentee train-lm` (stage 1 -> memorized layers -> stage 2 -> stage 3) runs once in this process with batch
2b and once under `accelerate launch` with 2 processes of batch b, on a tiny random Llama (no dropout) with the
MiniLM tokenizer over the built-in WikiText-2. Same seed, data and sampled exits: the trained exit weights of
every stage agree up to float rounding and the memorized layers are equal. The exits learn the full model's
greedy token (``--target full``: a random model never predicts WikiText, and its memorized layers would all be
L). 5 memorized chunks in global batches of 4 leave the second process without a chunk in the last batch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from consistentee.cli.main import main
from consistentee.generation.decoder import EXITS_WEIGHTS, LORA_DIR
from consistentee.generation.lora import ADAPTER_WEIGHTS
from consistentee.generation.training import MEMORIZED_FILE

from .test_two_processes import DDP_CPU, _free_port


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A 4-layer, 32-wide random Llama saved like a hub checkpoint, with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from consistentee.resources import builtin_model_path

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("minilm"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _args(run_dir, model, batch, lora_rank) -> list[str]:
    return ["train-lm", "--run-dir", str(run_dir), "--model", model, "--exit-every", "1", "--adapter-rank", "2",
            "--seq-len", "16", "--batch-size", str(batch), "--stage1-steps", "3", "--head-positions", "6",
            "--memorize-chunks", "5", "--stage2-steps", "3", "--rollouts", "2", "--stage3-steps", "3",
            "--beta", "0.1", "--target", "full", "--lora-rank", str(lora_rank), "--device", "cpu"]


@pytest.mark.parametrize("lora_rank", [0, 2], ids=["frozen-backbone", "lora"])
def test_two_processes_train_decoder_exits_like_one_process(tiny_llama_dir, tmp_path, lora_rank):
    one, two = tmp_path / "one" / "exits", tmp_path / "two" / "exits"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU),
              "--num_processes", "2", "--main_process_port", str(_free_port()), "-m", "consistentee.cli.main",
              *_args(two.parent, tiny_llama_dir, 2, lora_rank)]
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # One process with the global batch, here, while the two processes run.
        assert main(_args(one.parent, tiny_llama_dir, 4, lora_rank)) == 0
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]

    for stage in ("stage1", "stage2", "stage3"):
        a, b = load_file(one / stage / EXITS_WEIGHTS), load_file(two / stage / EXITS_WEIGHTS)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst < 1e-4, (stage, worst)
    # Stage 2 trained the policies and stage 3 the heads: the comparison above is of trained weights.
    s1, s2, s3 = (load_file(one / stage / EXITS_WEIGHTS) for stage in ("stage1", "stage2", "stage3"))
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("policies."))
    assert any(not torch.equal(s2[k], s3[k]) for k in s2 if k.startswith("heads."))
    adapter = one / "stage1" / LORA_DIR / ADAPTER_WEIGHTS
    assert adapter.is_file() == (lora_rank > 0)
    if lora_rank:  # the peft adapters, trained in stage 1, agree too (and stay fixed in stages 2 and 3)
        a, b = load_file(adapter), load_file(two / "stage1" / LORA_DIR / ADAPTER_WEIGHTS)
        assert a.keys() == b.keys() and any("lora_B" in k for k in a)
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
        assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
        c = load_file(one / "stage3" / LORA_DIR / ADAPTER_WEIGHTS)
        assert all(torch.equal(a[k], c[k]) for k in a)
    memorized = load_file(one / MEMORIZED_FILE)["memorized"]
    assert torch.equal(memorized, load_file(two / MEMORIZED_FILE)["memorized"])
    assert memorized.shape == (5, 16) and memorized.min() < memorized.max()
    for name in ("train_config.json", "timings.json"):
        assert (two / name).is_file()
    # Only the main process printed the run's lines.
    assert output.count("memorized layers: mean") == output.count("trained exits:") == 1
