"""Lossless self-speculative decoding that keeps the drafts' K/V, reduced-vocabulary exit heads, decode-only timing."""

from __future__ import annotations

import time

import pytest
import torch

from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.generate import GenerationConfig, generate_ids
from consistentee.generation.rules import make_rule

from .conftest import ToyTokenizer, tiny_base
from .test_decoder import ScriptedRule, _ids

L = 6


@pytest.fixture(scope="module")
def model() -> EarlyExitLM:
    base = tiny_base(layers=L, seed=3)
    model = EarlyExitLM(base, ExitsConfig(adapter_rank=4))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_modules().parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _hf(model, ids, mask, n):
    out = model.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def _lossless(model, ids, mask, rule, k, n=17, prefilled=None):
    cfg = GenerationConfig(max_new_tokens=n, lossless=True, draft_tokens=k)
    return generate_ids(model, ToyTokenizer(), ids, mask, cfg, rule, prefilled=prefilled)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("layer", [1, 2, 4])
def test_static_drafter_equals_full_greedy_and_runs_each_token_through_each_layer_once(model, k, layer):
    ids, mask = _ids(batch=1, length=7)
    res = _lossless(model, ids, mask, make_rule("static", layer), k)
    assert res.token_ids[0] == _hf(model, ids, mask, 17)
    # the drafts' first `layer` layers are reused: every position of a round (k drafts + the bonus token's
    # predecessor) goes through every layer exactly once, drafting included
    assert res.token_layers == (res.drafted + res.steps) * L
    assert res.full_head_rows == res.drafted + res.steps  # verification reads the full head once per position
    assert res.exit_head_rows == res.drafted and res.drafted > 0
    assert 0 <= res.accepted <= res.drafted


def test_policy_and_mixed_exits_drafters_are_lossless(model):
    ids, mask = _ids(batch=1, length=6, seed=4)
    want = _hf(model, ids, mask, 15)
    for rule in (make_rule("consistentee", 0.5), ScriptedRule([[1], [6], [3], [2], [5]]),
                 make_rule("confidence-maxprob", 0.05)):
        for k in (2, 4):
            assert _lossless(model, ids, mask, rule, k, n=15).token_ids[0] == want


def test_rejection_at_the_first_token_every_round(model):
    """Drafts from a vocabulary the full model never picks: every draft is rejected, the output is exact."""
    ids, mask = _ids(batch=1, length=7)
    want = _hf(model, ids, mask, 12)
    unused = [t for t in range(64) if t not in want][:3]
    model.set_draft_vocab(torch.tensor(unused))
    try:
        res = _lossless(model, ids, mask, make_rule("static", 2), 3, n=12)
    finally:
        model.set_draft_vocab(None)
    assert res.token_ids[0] == want
    assert res.accepted == 0 and res.drafted > 0 and res.steps == 12  # one token per round, the verifier's


def test_full_acceptance_when_the_drafter_is_the_full_model(model):
    ids, mask = _ids(batch=1, length=7)
    res = _lossless(model, ids, mask, None, 4, n=16)  # no rule: drafts at full depth
    assert res.token_ids[0] == _hf(model, ids, mask, 16)
    assert res.steps == 4  # 16 tokens in rounds of 4 drafts + 1, the last round limited by max_new_tokens
    # a full-depth draft is the full model's token, not a guess: no acceptance to count, and verification does
    # not project it through the full head a second time (one full-head row per token, as at full depth)
    assert res.accepted == res.drafted == 0
    assert res.full_head_rows == 16 and res.token_layers == 16 * L


def test_a_drafter_asked_at_one_exit_runs_other_tokens_to_full_depth_unchecked(model):
    ids, mask = _ids(batch=1, length=7, seed=2)
    want = _hf(model, ids, mask, 14)
    everywhere = _lossless(model, ids, mask, make_rule("confidence-maxprob", 0.05), 2, n=14)
    at_two = _lossless(model, ids, mask, make_rule("confidence-maxprob", 0.05, [2]), 2, n=14)
    assert everywhere.token_ids[0] == at_two.token_ids[0] == want
    assert everywhere.exit_head_rows > 0 and at_two.exit_head_rows == at_two.checks  # one head per check
    assert set(at_two.exit_layers[0]) <= {2, L} and at_two.checks <= everywhere.checks
    strict = _lossless(model, ids, mask, make_rule("confidence-maxprob", 2.0, [2]), 2, n=14)  # never confident
    assert strict.token_ids[0] == want and strict.drafted == 0 and strict.full_head_rows == 14


def test_cache_after_lossless_equals_a_full_depth_pass(model):
    ids, mask = _ids(batch=1, length=7)
    cache = model.new_cache(1)
    model.forward_tokens(cache, ids[:, :-1])
    res = _lossless(model, ids, mask, make_rule("static", 2), 3, n=10, prefilled=(cache, ids[:, -1:]))
    full = torch.cat([ids, torch.tensor([res.token_ids[0]])], dim=1)
    ref = model.new_cache(1)
    model.forward_tokens(ref, full[:, :cache.t])
    assert cache.n == [cache.t] * L  # every layer complete
    for i in range(L):
        assert torch.allclose(cache.k[i][:, :, :cache.t], ref.k[i][:, :, :cache.t], atol=1e-5)
        assert torch.allclose(cache.v[i][:, :, :cache.t], ref.v[i][:, :, :cache.t], atol=1e-5)


def test_reduced_vocabulary_exit_head_and_full_head_at_the_last_layer(model):
    h = torch.randn(3, 32)
    vocab = torch.tensor([9, 2, 40, 17])
    model.set_draft_vocab(vocab)
    try:
        reduced = model.exit_logits(2, h)
        assert reduced.shape == (3, 4)
        full = model.head_logits(2, h)
        order = vocab.unique()
        assert torch.allclose(reduced, full[:, order], atol=1e-6)
        expanded = model.to_full_vocab(reduced)
        assert expanded.shape == full.shape and torch.isinf(expanded[:, 0]).all()
        assert torch.equal(expanded.argmax(-1), order[reduced.argmax(-1)])
        assert model.exit_logits(L, h).shape == (3, 64)  # the last layer always projects onto everything
        ids, mask = _ids(batch=2)
        res = generate_ids(model, ToyTokenizer(), ids, mask, GenerationConfig(max_new_tokens=4),
                           make_rule("static", 2))
        assert all(t in order.tolist() for row in res.token_ids for t in row)
        assert res.exit_head_rows == 8 and res.full_head_rows == 0
    finally:
        model.set_draft_vocab(None)


def test_decode_clock_excludes_tokenizer_lookups(model):
    class SlowVocab(ToyTokenizer):
        def get_vocab(self):
            time.sleep(0.3)
            return {}

    ids, mask = _ids(batch=1)
    start = time.perf_counter()
    res = generate_ids(model, SlowVocab(), ids, mask, GenerationConfig(max_new_tokens=3), None)
    elapsed = time.perf_counter() - start
    # the 0.3 s lookup happened, but outside the decode clock (robust to a slow, busy machine)
    assert elapsed >= 0.3 and res.seconds <= elapsed - 0.3 + 0.02


def test_a_text_ended_by_a_full_depth_draft_costs_what_full_depth_decoding_costs(model):
    ids, mask = _ids(batch=1, length=7)
    free = _hf(model, ids, mask, 12)
    eos = free[2]  # the third token ends the text: the last of the first round's three drafts
    tok = ToyTokenizer(eos=eos)
    full = generate_ids(model, tok, ids, mask, GenerationConfig(max_new_tokens=12), None)
    lossless = generate_ids(model, tok, ids, mask, GenerationConfig(max_new_tokens=12, lossless=True,
                                                                    draft_tokens=3), None)
    assert lossless.token_ids == full.token_ids and len(full.token_ids[0]) == free.index(eos)
    # drafts at full depth up to the end: no pass over the slot after the end of the text
    assert lossless.token_layers == full.token_layers


def test_a_text_ended_by_a_shallow_draft_leaves_no_slot_after_the_end(model, monkeypatch):
    """Verification of drafts that end the text completes their pending layers only: like full-depth decoding,
    the end-of-text token is never run through the model (tried with each greedy token as the end of text)."""
    ids, mask = _ids(batch=1, length=7)
    free = _hf(model, ids, mask, 12)
    completions = []
    original = model.complete_pending
    monkeypatch.setattr(model, "complete_pending", lambda cache: (completions.append(cache.t), original(cache)))
    for j in range(1, 10):
        if free[j] in free[:j]:
            continue
        tok = ToyTokenizer(eos=free[j])
        cache = model.new_cache(1)
        model.forward_tokens(cache, ids[:, :-1])
        start, before = cache.t, len(completions)
        cfg = GenerationConfig(max_new_tokens=12, lossless=True, draft_tokens=3)
        res = generate_ids(model, tok, ids, mask, cfg, make_rule("static", 2), prefilled=(cache, ids[:, -1:]))
        full = generate_ids(model, tok, ids, mask, GenerationConfig(max_new_tokens=12), None)
        assert res.token_ids == full.token_ids == [free[:j]]
        ended = len(completions) - before  # rounds whose last draft was the end of text (accepted or not)
        # every slot runs through every layer once: k drafted slots per round, plus the slot after the last
        # draft in the rounds that did not draft the end of text
        assert res.token_layers == (res.drafted + res.steps - ended) * L
        # slots: the prompt's last token and every generated token but the end of text, every layer complete
        assert cache.t == start + 1 + j and cache.n == [cache.t] * L
    assert completions  # some texts ended inside the drafts
