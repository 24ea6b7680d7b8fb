"""A saved tiny early-exit model whose exits disagree across texts and layers, so the operating point matters."""

from __future__ import annotations

import pytest
import torch

TEXTS = ["a great and moving film", "wonderful acting, loved it", "bright funny and warm", "a triumph",
         "sharp witty and true", "beautifully made", "one of the best this year", "charming and smart",
         "a dull and tedious mess", "boring, I walked out", "flat lifeless and long", "a disaster",
         "clumsy and stupid", "painfully bad", "one of the worst this year", "tiresome and ugly"]
LABELS = ["negative", "positive"]


def sharpened_model(tiny_encoder_dir: str, seed: int = 1):
    """Random heads, sharpened and centred on TEXTS (random heads are near-uniform and agree on every input)."""
    from transformers import AutoTokenizer

    from consistentee.model.modeling import EarlyExitForSequenceClassification

    torch.manual_seed(seed)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, LABELS, pooling="mean").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model(**batch, return_pooled=True).pooled
        for i, head in enumerate(model.exits):
            head.weight.mul_(60.0)
            margin = (pooled[:, i] @ (head.weight[1] - head.weight[0])).sort().values
            k = len(margin) // 2 - (1 + i % 3)  # the split point moves with the layer
            head.bias.zero_()
            head.bias[1] = -float(margin[k - 1] + margin[k]) / 2  # halfway between two rows: no ties
        for i, policy in enumerate(model.policies):
            policy.net[-1].weight.mul_(30.0)
            logits = policy(pooled[:, i]).sort().values
            k = len(logits) // 3
            policy.net[-1].bias.sub_(float(logits[k - 1] + logits[k]) / 2)  # a third of the rows stay
    return model, tokenizer


@pytest.fixture(scope="session")
def hf_model_dir(tiny_encoder_dir, tmp_path_factory) -> str:
    """A saved folder (weights, config, tokenizer, card) with no operating point and untrained policies."""
    model, tokenizer = sharpened_model(tiny_encoder_dir)
    path = tmp_path_factory.mktemp("hf-model") / "model"
    model.save_pretrained(path, tokenizer=tokenizer)
    return str(path)
