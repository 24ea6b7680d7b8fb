from __future__ import annotations

import pytest
import torch

from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.generate import GenerationConfig, generate_ids
from consistentee.generation.rules import TokenExitRule, make_rule

from .conftest import ToyTokenizer, tiny_base


class ScriptedRule(TokenExitRule):
    """Exits row b at layer script[step][b] (deterministic, to compare K/V strategies)."""

    name = "scripted"

    def __init__(self, script):
        super().__init__(0)
        self.script, self.step = script, -1

    def start_step(self, batch):
        self.step += 1

    def decide(self, model, layer, h, prev):
        want = torch.tensor(self.script[self.step % len(self.script)])
        return want <= layer, None


def _ids(batch=2, length=9, pad_first=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[0, :pad_first] = 0
        ids[0, :pad_first] = 0
    return ids, mask


def test_prefill_logits_match_hf(tiny_model):
    ids, mask = _ids()
    ref = tiny_model.base(input_ids=ids, attention_mask=mask).logits
    cache = tiny_model.new_cache(2, capacity=4)  # forces growth
    ours = tiny_model.head_logits(tiny_model.num_layers, tiny_model.forward_tokens(cache, ids, mask))
    assert (ref - ours)[mask.bool()].abs().max() < 1e-4


def test_stepwise_logits_match_hf(tiny_model):
    ids, mask = _ids()
    ref = tiny_model.base(input_ids=ids, attention_mask=mask).logits
    cache = tiny_model.new_cache(2)
    tiny_model.forward_tokens(cache, ids[:, :4], mask[:, :4])
    for j in range(4, ids.shape[1]):
        out = tiny_model.step(cache, ids[:, j:j + 1], None, "full")
        assert (out.logits - ref[:, j]).abs().max() < 1e-4
        assert out.exit_layer.tolist() == [tiny_model.num_layers] * 2


def test_parallel_training_pass_matches_hf(tiny_model):
    from consistentee.generation.training import run_with_exits

    ids, mask = _ids()
    states, exit_layer = run_with_exits(tiny_model, ids, mask)
    ours = tiny_model.head_logits(4, states[4])
    ref = tiny_model.base(input_ids=ids, attention_mask=mask).logits
    assert (ref - ours)[mask.bool()].abs().max() < 1e-4
    assert bool((exit_layer == 4).all())


@pytest.mark.parametrize("kv", ["full", "propagate", "recompute"])
def test_full_depth_generation_equals_hf_generate(tiny_model, toy_tokenizer, kv):
    ids, mask = _ids()
    hf = tiny_model.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
    res = generate_ids(tiny_model, ToyTokenizer(), ids, mask, GenerationConfig(max_new_tokens=10, kv=kv), None)
    assert res.token_ids == [row for row in hf[:, ids.shape[1]:].tolist()]


def test_lossless_equals_hf_generate(tiny_model, toy_tokenizer):
    ids, mask = _ids(batch=1, length=7)
    hf = tiny_model.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
    for rule in (make_rule("static", 1), make_rule("consistentee", 0.5), ScriptedRule([[1], [4], [2], [3]])):
        for kv in ("propagate", "recompute"):
            res = generate_ids(tiny_model, ToyTokenizer(), ids, mask,
                               GenerationConfig(max_new_tokens=15, kv=kv, lossless=True, draft_tokens=3), rule)
            assert res.token_ids[0] == hf[0, ids.shape[1]:].tolist()
            assert res.drafted > 0


def test_propagate_kv_equal_skipped_layers_projections(tiny_model):
    ids, mask = _ids(batch=2, length=5)
    cache = tiny_model.new_cache(2)
    tiny_model.forward_tokens(cache, ids[:, :-1], mask[:, :-1])
    slot = cache.t
    out = tiny_model.step(cache, ids[:, -1:], make_rule("static", 2), "propagate")
    assert out.exit_layer.tolist() == [2, 2] and out.layers_run == 2
    # the exit state: run the first two layers by hand
    h = tiny_model.embed(ids[:, -1:])
    pos = cache.pos[:, slot:slot + 1]
    cos, sin = tiny_model.rope(h, pos)
    ref_cache = tiny_model.new_cache(2)
    tiny_model.forward_tokens(ref_cache, ids[:, :-1], mask[:, :-1])
    ref_cache.append(torch.ones(2, 1, dtype=torch.bool))
    for i in range(2):
        h = tiny_model.layer(i, h, cos, sin, ref_cache.mask(slot, slot + 1), ref_cache, slot)
    for i in range(2, 4):
        layer = tiny_model.layers[i]
        hn = layer.input_layernorm(h)  # the skipped layer's own input norm (the authors' code forgot it)
        k = layer.self_attn.k_proj(hn).view(2, 1, -1, tiny_model.head_dim).transpose(1, 2)
        v = layer.self_attn.v_proj(hn).view(2, 1, -1, tiny_model.head_dim).transpose(1, 2)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        assert torch.allclose(cache.k[i][:, :, slot:slot + 1], k, atol=1e-6)
        assert torch.allclose(cache.v[i][:, :, slot:slot + 1], v, atol=1e-6)
        assert cache.n[i] == slot + 1


def test_recompute_equals_full_and_propagate_differs(tiny_model, toy_tokenizer):
    ids, mask = _ids()
    script = [[1, 3], [2, 1], [4, 4], [1, 1], [3, 2], [1, 4]]
    outs = {}
    for kv in ("full", "recompute", "propagate"):
        cache = tiny_model.new_cache(2)
        tiny_model.forward_tokens(cache, ids, mask)
        rule = ScriptedRule(script)
        logits = []
        tok = ids[:, -1:]
        for _ in range(len(script)):
            out = tiny_model.step(cache, tok, rule, kv)
            logits.append(out.logits)
            tok = out.logits.argmax(-1, keepdim=True) if kv == "full" else outs["full"]["tokens"][len(logits) - 1]
        outs[kv] = {"logits": torch.stack(logits), "tokens": [x.argmax(-1, keepdim=True) for x in logits]}
        if kv == "recompute":
            assert cache.n[0] == cache.t  # shallow layers complete
    assert torch.allclose(outs["full"]["logits"], outs["recompute"]["logits"], atol=1e-4)
    assert not torch.allclose(outs["full"]["logits"], outs["propagate"]["logits"], atol=1e-3)


def test_batch_rows_exit_independently(tiny_model, toy_tokenizer):
    ids, mask = _ids()
    rule = ScriptedRule([[1, 3]])
    res = generate_ids(tiny_model, ToyTokenizer(), ids, mask, GenerationConfig(max_new_tokens=4), rule)
    assert res.exit_layers == [[1] * 4, [3] * 4]
    # each row equals that row generated alone
    alone = generate_ids(tiny_model, ToyTokenizer(), ids[1:], mask[1:], GenerationConfig(max_new_tokens=4),
                         ScriptedRule([[3]]))
    assert res.token_ids[1] == alone.token_ids[0]


def test_exit_layer_subset_and_save_load(tmp_path):
    base = tiny_base(layers=6)
    model = EarlyExitLM(base, ExitsConfig(exit_layers=[2, 4], adapter_rank=2))
    assert model.exit_layers == [2, 4, 6]
    with torch.no_grad():
        for p in model.trainable_modules().parameters():
            p.add_(torch.randn_like(p))
    model.save_exits(tmp_path / "exits")
    again = EarlyExitLM.load_exits(tmp_path / "exits", base)
    h = torch.randn(3, 32)
    assert torch.equal(model.head_logits(2, h), again.head_logits(2, h))
    assert torch.equal(model.policy_prob(4, h), again.policy_prob(4, h))
    with pytest.raises(ValueError):
        EarlyExitLM.load_exits(tmp_path / "exits", tiny_base(layers=4))


def test_qwen2_family_with_attention_bias_matches_hf():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base = Qwen2ForCausalLM(cfg).eval()
    model = EarlyExitLM(base)
    ids, mask = _ids()
    ref = base(input_ids=ids, attention_mask=mask).logits
    ours = model.head_logits(3, model.forward_tokens(model.new_cache(2), ids, mask))
    assert (ref - ours)[mask.bool()].abs().max() < 1e-4
