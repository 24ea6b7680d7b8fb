"""Tiny random Llama models for the decoder logic; the real SmolLM2 (converted once) for integration tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from consistentee.generation.decoder import EarlyExitLM, ExitsConfig


class ToyTokenizer:
    """Token ids as text: enough for the generation loop (eos, stop strings, streaming)."""

    pad_token_id = 0
    chat_template = None

    def __init__(self, eos: int | None = None):
        self.eos_token_id = eos

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)

    def get_vocab(self):
        return {}


def tiny_base(layers: int = 4, seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_model() -> EarlyExitLM:
    base = tiny_base()
    model = EarlyExitLM(base, ExitsConfig(adapter_rank=4))
    with torch.no_grad():  # non-trivial heads and policies
        for p in model.trainable_modules().parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture
def toy_tokenizer() -> ToyTokenizer:
    return ToyTokenizer()


@pytest.fixture(scope="session")
def smollm():
    """The real SmolLM2-135M (GGUF converted once into the user cache, reloaded after)."""
    from consistentee.generation.loading import load_causal_lm

    return load_causal_lm("smollm2-135m")
