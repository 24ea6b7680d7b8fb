"""The optional backbone LoRA: exact at the start, trained in stage 1 only, saved and reloaded with the exits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from consistentee.generation import training as T
from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.lora import LoRAConfig, LoRALinear, has_lora
from consistentee.utils.io import read_json

from .conftest import tiny_base


def _cfg(**kw) -> T.LMTrainConfig:
    base = dict(seq_len=12, batch_size=2, stage1_steps=3, head_positions=4, memorize_chunks=3, stage2_steps=2,
                rollouts=2, stage3_steps=2, beta=0.1)
    return T.LMTrainConfig(**{**base, **kw})


def test_lora_linear_with_zero_b_is_the_base_linear_exactly():
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    lora = LoRALinear(base, rank=3, alpha=16.0)
    x = torch.randn(2, 4, 8)
    assert torch.equal(lora(x), base(x))
    assert not base.weight.requires_grad and lora.lora_A.requires_grad and lora.lora_B.requires_grad
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = base(x) + x @ lora.lora_A.T @ lora.lora_B.T * (16.0 / 3)
    assert torch.allclose(lora(x), expected, atol=1e-6)


def test_stage1_trains_the_lora_and_heads_and_leaves_the_pretrained_weights_bitwise():
    model = EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2))
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    cfg = _cfg(lora_rank=2)
    params = model.add_lora(cfg.lora_config())
    assert len(params) == 4 * 2 * 2  # layers x (q, v) x (A, B)
    lora_before = [p.clone() for p in params]
    heads_before = [p.clone() for p in model.heads.parameters()]
    T.stage1(model, torch.randint(3, 64, (6, 12)), cfg, progress=False)
    assert all(not torch.equal(a, b) for a, b in zip(lora_before[1::2], params[1::2], strict=True))  # every B
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, model.heads.parameters(), strict=True))
    after = model.base.state_dict()
    for key, value in before.items():  # q_proj.weight now lives at q_proj.base.weight
        moved = key.replace("q_proj.", "q_proj.base.").replace("v_proj.", "v_proj.base.")
        assert torch.equal(value, after[moved]), key


def test_lora_exits_round_trip_give_identical_logits_at_every_exit(tmp_path):
    model = EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2))
    model.add_lora(LoRAConfig(2, 8.0, ("q_proj", "o_proj", "down_proj")))
    with torch.no_grad():
        for p in model.trainable_modules().parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_exits(tmp_path)
    loaded = EarlyExitLM.load_exits(tmp_path, tiny_base(layers=4))  # a fresh base: adapters re-created
    assert loaded.lora == model.lora and has_lora(loaded.base)
    ids = torch.randint(3, 64, (2, 7))
    states, _ = T.run_with_exits(model, ids)
    states2, _ = T.run_with_exits(loaded, ids)
    for layer in model.exit_layers:
        assert torch.equal(model.head_logits(layer, states[layer]), loaded.head_logits(layer, states2[layer]))
    with pytest.raises(ValueError, match="without LoRA"):  # a LoRA-free exits dir on a base that has one
        plain = tmp_path / "plain"
        EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2)).save_exits(plain)
        EarlyExitLM.load_exits(plain, model.base)


def test_lora_rank_zero_adds_nothing_and_saves_as_before(tmp_path):
    model = EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2))
    cfg = _cfg(stage1_steps=2)
    assert cfg.lora_config() is None
    T.train_exits(model, _Tok(), tmp_path, cfg, progress=False)
    assert not has_lora(model.base) and model.lora is None
    assert set(model.trainable_modules()) == {"heads", "policies"}
    assert "lora" not in read_json(tmp_path / "stage3" / "exits_config.json")
    assert not any(k.startswith("lora") for k in load_file(tmp_path / "stage3" / "exits.safetensors"))


def test_train_exits_with_lora_saves_it_and_resumes(tmp_path, capsys):
    cfg = _cfg(stage1_steps=2, lora_rank=2)
    model = EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2))
    out = T.train_exits(model, _Tok(), tmp_path, cfg, progress=False)
    again = EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2))
    T.train_exits(again, _Tok(), tmp_path, cfg, progress=True)
    assert capsys.readouterr().out.count("already done, loaded") == 3
    assert all(torch.equal(a, b) for a, b in zip(model.lora_params.values(), again.lora_params.values(), strict=True))
    with pytest.raises(ValueError, match="saved with LoRA"):
        T.train_exits(EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2)), _Tok(), tmp_path,
                      _cfg(stage1_steps=2))
    assert EarlyExitLM.load_exits(out, tiny_base(layers=4)).lora == cfg.lora_config()


@pytest.mark.parametrize("kw", [{"lora_rank": -1}, {"lora_rank": 2, "lora_targets": "q_proj,nope"},
                                {"lora_rank": 2, "lora_targets": ""}, {"lora_rank": 2, "lora_alpha": 0.0}])
def test_lora_options_are_checked(kw):
    with pytest.raises(ValueError):
        _cfg(**kw)


class _Tok:
    """Characters as token ids (what lm_chunks needs)."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 61 for c in text]}
