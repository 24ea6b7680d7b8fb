"""Integration: the real SmolLM2-135M (30 layers), a short prompt."""

from __future__ import annotations

import pytest

from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.generate import GenerationConfig, encode, format_prompts, generate, generate_ids
from consistentee.generation.rules import make_rule

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model(smollm):
    base, _ = smollm
    return EarlyExitLM(base, ExitsConfig(exit_layers=list(range(3, 31, 3))))


def test_layerwise_logits_match_hf(model, smollm):
    _, tok = smollm
    ids, mask = encode(tok, ["The capital of France is"], model.device)
    ref = model.base(input_ids=ids, attention_mask=mask).logits
    cache = model.new_cache(1)
    ours = model.head_logits(30, model.forward_tokens(cache, ids[:, :-1]))
    step = model.step(cache, ids[:, -1:], None, "full")
    diff = max(float((ref[:, :-1] - ours).abs().max()), float((ref[:, -1] - step.logits).abs().max()))
    print(f"SmolLM2 max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


def test_full_and_lossless_equal_hf_generate(model, smollm):
    _, tok = smollm
    prompt = format_prompts(tok, ["Name a fruit."])[0]
    ids, mask = encode(tok, [prompt], model.device)
    hf = model.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    want = hf[0, ids.shape[1]:].tolist()
    want = want[: want.index(tok.eos_token_id)] if tok.eos_token_id in want else want
    full = generate_ids(model, tok, ids, mask, GenerationConfig(max_new_tokens=12), None)
    assert full.token_ids[0] == want
    lossless = generate_ids(model, tok, ids, mask, GenerationConfig(max_new_tokens=12, lossless=True),
                            make_rule("static", 15))
    assert lossless.token_ids[0] == want
    streamed = []
    res = generate(model, tok, "Name a fruit.", GenerationConfig(max_new_tokens=12, rule="full"),
                   on_text=lambda r, t: streamed.append(t))
    assert "".join(streamed) == res.texts[0] == tok.decode(want, skip_special_tokens=True)
