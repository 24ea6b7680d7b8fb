"""Shared fixtures: a tiny random BERT with the real MiniLM tokenizer, and a tiny labelled file."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from consistentee.resources import builtin_model_path  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

POSITIVE = ["a great and moving film", "wonderful acting, loved it", "bright funny and warm", "a triumph",
            "sharp witty and true", "beautifully made", "one of the best this year", "charming and smart"]
NEGATIVE = ["a dull and tedious mess", "boring, I walked out", "flat lifeless and long", "a disaster",
            "clumsy and stupid", "painfully bad", "one of the worst this year", "tiresome and ugly"]


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> str:
    """A 3-layer, 32-wide random BERT saved like a hub checkpoint, with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_path("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> str:
    """60 labelled sentences (positive/negative), enough for seeded 80/10/10 splits."""
    rows = []
    for i in range(30):
        rows.append({"id": f"p{i}", "text": f"{POSITIVE[i % len(POSITIVE)]} {i}", "label": "positive"})
        rows.append({"id": f"n{i}", "text": f"{NEGATIVE[i % len(NEGATIVE)]} {i}", "label": "negative"})
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)
