from __future__ import annotations

import pytest
import torch

from consistentee.generation.generate import GenerationConfig, _Rows, choose_tokens, generate_ids
from consistentee.generation.rules import RULES, first_exit, make_rule

from .conftest import ToyTokenizer


def _ids():
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids, mask


def test_sampling_is_seeded_and_top_p_restricts():
    logits = torch.tensor([[5.0, 4.0, -5.0, -5.0]])
    cfg = GenerationConfig(do_sample=True, top_p=0.5)
    picks = {int(choose_tokens(logits, cfg, torch.Generator().manual_seed(s))) for s in range(30)}
    assert picks == {0}
    cfg = GenerationConfig(do_sample=True, temperature=5.0)
    picks = {int(choose_tokens(logits, cfg, torch.Generator().manual_seed(s))) for s in range(60)}
    assert len(picks) > 2


def test_sampling_generation_reproducible(tiny_model):
    ids, mask = _ids()
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, seed=7, top_p=0.9, temperature=0.8)
    a = generate_ids(tiny_model, ToyTokenizer(), ids, mask, cfg, make_rule("consistentee", 0.5))
    b = generate_ids(tiny_model, ToyTokenizer(), ids, mask, cfg, make_rule("consistentee", 0.5))
    assert a.token_ids == b.token_ids


def test_eos_stop_strings_and_streaming():
    tok = ToyTokenizer(eos=2)
    seen = []
    rows = _Rows(tok, 2, {2}, ["<9>"], 10, lambda r, t: seen.append((r, t)))
    for t in (5, 6):
        rows.add(0, t, 3)
    rows.add(0, 2, 1)  # eos ends row 0
    rows.add(0, 7, 1)  # ignored
    for t in (4, 9, 8):
        rows.add(1, t, 2)
    texts = rows.finish()
    assert texts == ["<5><6>", "<4>"]
    assert rows.ids == [[5, 6], [4, 9]] and rows.done == [True, True]
    assert "".join(t for r, t in seen if r == 0) == "<5><6>"
    assert "".join(t for r, t in seen if r == 1) == "<4>"  # the stop string never streams


def test_max_new_tokens_and_exit_layers_recorded(tiny_model):
    ids, mask = _ids()
    res = generate_ids(tiny_model, ToyTokenizer(), ids, mask, GenerationConfig(max_new_tokens=5),
                       make_rule("static", 2))
    assert [len(x) for x in res.token_ids] == [5, 5]
    assert res.exit_layers == [[2] * 5, [2] * 5]
    assert res.layers_run == 10


def test_confidence_rule_pays_head_calls_policy_does_not(tiny_model):
    ids, mask = _ids()
    r1 = generate_ids(tiny_model, ToyTokenizer(), ids, mask, GenerationConfig(max_new_tokens=3),
                      make_rule("confidence-maxprob", 1.01))
    assert r1.head_calls == 3 * 3  # three exit checks per step, never confident
    r2 = generate_ids(tiny_model, ToyTokenizer(), ids, mask, GenerationConfig(max_new_tokens=3),
                      make_rule("consistentee", 1.01))
    assert r2.head_calls == 0 and r2.layers_run == 3 * 4


def test_offline_rules_match_first_exit():
    exits = [1, 2, 3, 4]
    feats = {"policy": torch.tensor([[0.1, 0.9, 0.9], [0.1, 0.1, 0.1]]),
             "max_prob": torch.tensor([[0.2, 0.95, 0.1], [0.99, 0.1, 0.1]]),
             "top2_gap": torch.zeros(2, 3), "cosine": torch.tensor([[0.5, 0.99, 1.0], [0.1, 0.2, 0.3]])}
    assert first_exit(make_rule("consistentee", 0.5).decide_offline(feats, exits), exits).tolist() == [2, 4]
    assert first_exit(make_rule("confidence-maxprob", 0.9).decide_offline(feats, exits), exits).tolist() == [2, 1]
    assert first_exit(make_rule("saturation", 0.98).decide_offline(feats, exits), exits).tolist() == [2, 4]
    assert first_exit(make_rule("static", 3).decide_offline(feats, exits), exits).tolist() == [3, 3]
    assert set(RULES) == {"consistentee", "static", "confidence-maxprob", "confidence-gap", "saturation"}


def test_config_validation():
    with pytest.raises(ValueError):
        GenerationConfig(lossless=True, do_sample=True)
    with pytest.raises(ValueError):
        GenerationConfig(kv="copy")
    with pytest.raises(ValueError):
        make_rule("entropy")
    assert make_rule("full") is None


def test_lossless_rejects_batches(tiny_model):
    ids, mask = _ids()
    with pytest.raises(ValueError, match="batch size 1"):
        generate_ids(tiny_model, ToyTokenizer(), ids, mask, GenerationConfig(lossless=True), make_rule("static", 1))
