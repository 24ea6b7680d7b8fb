"""Shared pieces of the inference and serving tests: a tiny multi-exit model with spread-out exits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

TEXTS = [
    "a great and moving film",
    "dull",
    "wonderful acting, loved it from the first scene to the very last one, truly",
    "a disaster",
    "one of the best this year and maybe the best of the decade, says everybody who saw it twice",
    "flat lifeless and long",
    "ok",
    "sharp witty and true, with a cast that never hits a false note",
    "painfully bad",
    "charming and smart but a little too long in the middle section",
    "tiresome and ugly",
    "bright funny and warm",
    "the plot goes nowhere and the characters are cardboard cutouts of people we have seen before",
    "beautifully made",
    "clumsy",
    "a triumph of craft over a thin script",
    "boring, I walked out",
    "it is what it is",
    "an overlong, self-indulgent exercise that mistakes noise for feeling and length for depth",
    "fine",
    "surprisingly tender",
    "the worst",
    "a small gem",
    "neither here nor there, but pleasant enough for a rainy afternoon",
]


class StandInLearnedHeads(nn.Module):
    """Same interface as consistentee.exits.learned.LearnedExitHeads: score(i, pooled) -> [B] in [0, 1]."""

    def __init__(self, hidden: int, num_layers: int, scale: float = 8.0):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(num_layers))
        with torch.no_grad():
            for head in self.heads:
                head.weight.mul_(scale)
        self.calls: list[tuple[int, int]] = []

    def score(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        self.calls.append((index, pooled.shape[0]))
        return torch.sigmoid(self.heads[index](pooled.float())).squeeze(-1)


def build_tiny_model(tiny_encoder_dir: str, seed: int = 1):
    """Random heads, sharpened, with every exit's bias centred on TEXTS: exits disagree across rows and layers."""
    from transformers import AutoTokenizer

    from consistentee.data.tokenize import collate
    from consistentee.model.modeling import EarlyExitForSequenceClassification

    torch.manual_seed(seed)
    model = EarlyExitForSequenceClassification.from_backbone(tiny_encoder_dir, ["a", "b"], pooling="mean").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    encoded = tokenizer(TEXTS)
    batch = collate([{k: encoded[k][i] for k in ("input_ids", "attention_mask", "token_type_ids")} | {"index": i}
                     for i in range(len(TEXTS))], tokenizer.pad_token_id)
    with torch.no_grad():  # random heads are near-uniform and agree on every input: sharpen and centre them
        pooled = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], return_pooled=True).pooled
        for i, head in enumerate(model.exits):
            head.weight.mul_(60.0)
            margin = (pooled[:, i] @ (head.weight[1] - head.weight[0])).sort().values
            k = len(margin) // 2 - (1 + i % 3)  # the split point moves with the layer
            head.bias.zero_()
            head.bias[1] = -float(margin[k - 1] + margin[k]) / 2  # halfway between two rows: no ties
        for policy in model.policies:
            policy.net[-1].weight.mul_(30.0)
    return model


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors gain nothing from intra-op threads, and on a shared 2-core machine they spin:
    these tests run single-threaded and restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tiny_encoder_dir):
    return build_tiny_model(tiny_encoder_dir)


@pytest.fixture(scope="session")
def deep_tiny_model(tmp_path_factory, tiny_encoder_dir):
    """Six random layers: enough depth for stateful rules (patience, pcee) to gather state mid-way."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("deep-tiny-bert")
    torch.manual_seed(4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return build_tiny_model(str(path), seed=6)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_encoder_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_encoder_dir)


@pytest.fixture(scope="session")
def tiny_heads(tiny_model):
    torch.manual_seed(2)
    return StandInLearnedHeads(tiny_model.backbone.hidden_size, tiny_model.num_layers).eval()


@pytest.fixture(scope="session")
def helpers():
    """The helpers above, for test modules (pytest's importlib mode lets them not import conftest)."""
    import types

    return types.SimpleNamespace(TEXTS=TEXTS, StandInLearnedHeads=StandInLearnedHeads,
                                 build_tiny_model=build_tiny_model)
