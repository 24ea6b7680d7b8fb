"""The optional backbone LoRA (peft): exact at the start, trained in stage 1 only, saved in peft's format with the
exits, reloaded and merged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from consistentee.generation import training as T
from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.lora import LoRAConfig, has_lora
from consistentee.utils.io import read_json

from .conftest import tiny_base


def _cfg(**kw) -> T.LMTrainConfig:
    base = dict(seq_len=12, batch_size=2, stage1_steps=3, head_positions=4, memorize_chunks=3, stage2_steps=2,
                rollouts=2, stage3_steps=2, beta=0.1)
    return T.LMTrainConfig(**{**base, **kw})


def test_peft_lora_with_zero_b_is_the_base_model_exactly_and_trains_only_the_adapters():
    base = tiny_base(layers=4)
    ids = torch.randint(3, 64, (2, 7))
    ref = base(input_ids=ids).logits
    model = EarlyExitLM(base, ExitsConfig(adapter_rank=2))
    params = model.add_lora(LoRAConfig(2, 16.0, ("q_proj", "v_proj")))
    assert has_lora(base) and len(params) == 4 * 2 * 2  # layers x (q, v) x (A, B)
    assert torch.equal(base(input_ids=ids).logits, ref)  # peft starts B at zero: the original model, bitwise
    states, _ = T.run_with_exits(model, ids)
    assert (model.head_logits(4, states[4]) - ref).abs().max() < 1e-5
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
    assert model.add_lora(LoRAConfig(2, 16.0, ("q_proj", "v_proj"))) == params  # same LoRA: the same adapters
    with pytest.raises(ValueError, match="already has a LoRA"):
        model.add_lora(LoRAConfig(4, 16.0, ("q_proj",)))


def test_stage1_trains_the_lora_and_heads_and_leaves_the_pretrained_weights_bitwise():
    model = EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2))
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    cfg = _cfg(lora_rank=2)
    params = model.add_lora(cfg.lora_config())
    lora_before = {n: p.clone() for n, p in model.lora_params.items()}
    heads_before = [p.clone() for p in model.heads.parameters()]
    T.stage1(model, torch.randint(3, 64, (6, 12)), cfg, progress=False)
    assert all(not torch.equal(lora_before[n], p) for n, p in model.lora_params.items() if "lora_B" in n)
    assert any(not torch.equal(a, b) for a, b in zip(heads_before, model.heads.parameters(), strict=True))
    assert len(params) == len(lora_before)
    after = model.base.state_dict()
    for key, value in before.items():  # peft keeps q_proj.weight at q_proj.base_layer.weight
        moved = key.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")
        assert torch.equal(value, after[moved]), key


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft's loader calls a transformers method deprecated in v5
def test_lora_exits_round_trip_in_peft_format_and_merge(tmp_path):
    from peft import PeftModel

    model = EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2))
    model.add_lora(LoRAConfig(2, 8.0, ("q_proj", "o_proj", "down_proj")))
    with torch.no_grad():
        for p in [*model.trainable_modules().parameters(), *model.lora_params.values()]:
            p.add_(0.3 * torch.randn_like(p))
    model.save_exits(tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not any(k.startswith("lora") for k in load_file(tmp_path / "exits.safetensors"))
    loaded = EarlyExitLM.load_exits(tmp_path, tiny_base(layers=4))  # a fresh base: adapters re-created
    assert loaded.lora == model.lora and has_lora(loaded.base)
    ids = torch.randint(3, 64, (2, 7))
    states, _ = T.run_with_exits(model, ids)
    states2, _ = T.run_with_exits(loaded, ids)
    for layer in model.exit_layers:
        assert torch.equal(model.head_logits(layer, states[layer]), loaded.head_logits(layer, states2[layer]))
    # peft's own loader reads the adapter: the same full model
    plain = PeftModel.from_pretrained(tiny_base(layers=4), str(tmp_path / "adapter"))
    assert torch.allclose(plain(input_ids=ids).logits, model.head_logits(4, states[4]), atol=1e-5)
    # merged for inference: no adapter modules left, same logits up to rounding
    merged = EarlyExitLM.load_exits(tmp_path, tiny_base(layers=4), merge=True)
    assert not has_lora(merged.base) and merged.lora_merged
    states3, _ = T.run_with_exits(merged, ids)
    for layer in model.exit_layers:
        assert torch.allclose(model.head_logits(layer, states[layer]), merged.head_logits(layer, states3[layer]),
                              atol=1e-5)
    with pytest.raises(ValueError, match="merged"):
        merged.save_exits(tmp_path / "again")
    with pytest.raises(ValueError, match="without LoRA"):  # a LoRA-free exits dir on a base that has one
        plain_dir = tmp_path / "plain"
        EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2)).save_exits(plain_dir)
        EarlyExitLM.load_exits(plain_dir, model.base)


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
    assert model.lora_params.keys() == again.lora_params.keys()
    assert all(torch.equal(model.lora_params[k], again.lora_params[k]) for k in model.lora_params)
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
