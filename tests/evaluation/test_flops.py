from types import SimpleNamespace

import numpy as np
import pytest

from consistentee.evaluation import (
    EncoderShape,
    embedding_flops,
    exit_flops,
    flops_for_exits,
    flops_speedup,
    full_depth_flops,
    layer_flops,
)

# Tiny encoder: L=2, d=4, i=8, heads=2, C=2, policy hidden 32; sequences of T=3 tokens.
TINY = EncoderShape(
    num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2, vocab_size=10, num_labels=2
)
# By hand:
#   Q,K,V,O projections  4 * 2*T*d*d = 4 * 2*3*4*4 = 384
#   scores + weighted    2 * 2*T*T*d = 2 * 2*3*3*4 = 144
#   FFN up + down        2 * 2*T*d*i = 2 * 2*3*4*8 = 384
LAYER = 384 + 144 + 384  # 912
POOLER = 2 * 4 * 4  # 32
CLASSIFIER = 2 * 4 * 2  # 16
POLICY = 2 * (4 * 32 + 32)  # 320


def test_layer_and_head_flops_by_hand():
    assert layer_flops(TINY, 3) == LAYER
    assert np.allclose(layer_flops(TINY, np.array([3, 3])), [LAYER, LAYER])
    assert embedding_flops(TINY, 3) == 0.0
    assert exit_flops(TINY) == POOLER + CLASSIFIER
    assert exit_flops(TINY, pooler_used=False) == CLASSIFIER
    assert exit_flops(TINY, with_policy=True, pooler_used=True) == POOLER + CLASSIFIER + POLICY


def test_embedding_projection_counted_when_sizes_differ():
    albert = EncoderShape(2, 4, 8, 2, 10, 2, embedding_size=2)
    assert embedding_flops(albert, 3) == 2 * 3 * 2 * 4  # 48


def test_flops_for_exits_by_hand():
    # example A exits at layer 1: 912 + (32+16) + 1 policy = 1280
    # example B exits at layer 2: 2*912 + 2*(32+16) + 1 policy (none at the last layer) = 2240
    spent = flops_for_exits(TINY, [3, 3], [1, 2], with_policy=True, pooler_used=True)
    assert spent == 1280 + 2240
    full = 2 * LAYER + POOLER + CLASSIFIER  # 1872 per example
    assert full_depth_flops(TINY, [3, 3], pooler_used=True) == 2 * full
    assert flops_speedup(TINY, [3, 3], [1, 2], with_policy=True, pooler_used=True) == pytest.approx(
        2 * full / 3520
    )
    # without policies, without pooler, different lengths: T=1 -> layer = 8*16 + 4*4 + 4*32 = 272
    spent = flops_for_exits(TINY, [3, 1], [1, 1], with_policy=False, pooler_used=False)
    assert spent == (LAYER + CLASSIFIER) + (272 + CLASSIFIER)


def test_speedup_is_one_at_full_depth_without_policies():
    lens = [3, 7, 5]
    assert flops_speedup(TINY, lens, [2, 2, 2], heads_every_layer=False) == pytest.approx(1.0)
    # evaluating every intermediate exit head costs exactly the extra (L-1) heads
    spent = flops_for_exits(TINY, lens, [2, 2, 2])
    assert spent - full_depth_flops(TINY, lens) == 3 * (POOLER + CLASSIFIER)
    assert flops_speedup(TINY, lens, [2, 2, 2]) < 1.0


def test_earlier_exits_give_larger_speedup():
    shape = EncoderShape(12, 768, 3072, 12, 30522, 2)
    lens = np.full(8, 64)
    speedups = [flops_speedup(shape, lens, np.full(8, e), with_policy=True) for e in (12, 9, 6, 3, 1)]
    assert all(a < b for a, b in zip(speedups, speedups[1:], strict=False))
    mixed = flops_speedup(shape, lens, [1, 1, 1, 1, 12, 12, 12, 12], with_policy=True)
    assert speedups[0] < mixed < speedups[-1]


def test_extra_flops_per_layer():
    base = flops_for_exits(TINY, [3], [2])
    assert flops_for_exits(TINY, [3], [2], extra_flops_per_layer=10.0) == base + 20.0


def test_bad_inputs():
    with pytest.raises(ValueError):
        flops_for_exits(TINY, [3, 3], [1, 3])
    with pytest.raises(ValueError):
        flops_for_exits(TINY, [3], [1, 1])
    with pytest.raises(ValueError):
        exit_flops(EncoderShape(2, 4, 8, 2, 10, 2, has_pooler=False), pooler_used=True)
    with pytest.raises(ValueError):
        EncoderShape(2, 6, 8, 4, 10, 2)  # 6 not divisible by 4 heads


def test_from_hf_config_bert_dict_and_distilbert_names():
    bert = EncoderShape.from_hf_config(
        {
            "model_type": "bert",
            "num_hidden_layers": 6,
            "hidden_size": 384,
            "intermediate_size": 1536,
            "num_attention_heads": 12,
            "vocab_size": 30522,
            "num_labels": 3,
        }
    )
    assert bert == EncoderShape(6, 384, 1536, 12, 30522, 3, has_pooler=True)
    distil = EncoderShape.from_hf_config(
        SimpleNamespace(
            model_type="distilbert",
            n_layers=6,
            dim=768,
            hidden_dim=3072,
            n_heads=12,
            vocab_size=30522,
            num_labels=2,
        )
    )
    assert distil == EncoderShape(6, 768, 3072, 12, 30522, 2, has_pooler=False)
    albert = EncoderShape.from_hf_config(
        {
            "model_type": "albert",
            "num_hidden_layers": 12,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_attention_heads": 12,
            "vocab_size": 30000,
            "embedding_size": 128,
        },
        num_labels=5,
    )
    assert albert.embedding_size == 128 and albert.num_labels == 5
    with pytest.raises(ValueError):
        EncoderShape.from_hf_config({"hidden_size": 4})


def test_from_real_transformers_configs():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DistilBertConfig(n_layers=3, dim=64, hidden_dim=128, n_heads=4, num_labels=4)
    assert EncoderShape.from_hf_config(cfg) == EncoderShape(
        3, 64, 128, 4, cfg.vocab_size, 4, has_pooler=False
    )
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4
    )
    assert EncoderShape.from_hf_config(cfg) == EncoderShape(2, 32, 64, 4, cfg.vocab_size, 2)
