"""encode_split and collation with the real built-in MiniLM tokenizer."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from consistentee.data import DataCollator, LabelList, TextSplit, UnknownLabelError, collate, encode_split
from consistentee.resources import builtin_model_path


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(builtin_model_path("minilm")))


SINGLE = TextSplit(
    ids=["a", "b", "c"],
    texts=["short", "a somewhat longer sentence with more words", "mid length text"],
    text_pairs=None,
    labels=["pos", "neg", "pos"],
)
PAIRS = TextSplit(
    ids=["p", "q"],
    texts=["the evidence", "other evidence here"],
    text_pairs=["a claim", "another claim"],
    labels=["1", "0"],
)


def test_items_are_unpadded_with_labels_and_index(tokenizer):
    labels = LabelList.from_labels(SINGLE.labels)
    enc = encode_split(SINGLE, tokenizer, labels, max_length=64)
    assert len(enc) == 3 and enc.ids == ["a", "b", "c"]
    item = enc[1]
    assert item["labels"] == 0 and item["index"] == 1
    assert len(item["input_ids"]) == len(item["attention_mask"]) > len(enc[0]["input_ids"])
    assert set(item["attention_mask"]) == {1}
    assert item["input_ids"][0] == tokenizer.cls_token_id and item["input_ids"][-1] == tokenizer.sep_token_id


def test_collate_right_pads_to_longest(tokenizer):
    enc = encode_split(SINGLE, tokenizer, LabelList.from_labels(SINGLE.labels), max_length=64)
    batch = collate([enc[0], enc[1]], tokenizer.pad_token_id)
    lengths = [len(enc[0]["input_ids"]), len(enc[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert all(t.dtype == torch.long for t in batch.values())
    short = lengths[0]
    assert (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()
    assert (batch["attention_mask"][0, short:] == 0).all() and (batch["attention_mask"][0, :short] == 1).all()
    assert batch["index"].tolist() == [0, 1]
    assert batch["labels"].tolist() == [1, 0]


def test_dataloader_with_collator_and_no_labels(tokenizer):
    enc = encode_split(SINGLE, tokenizer, None, max_length=64)
    assert "labels" not in enc[0]
    loader = DataLoader(enc, batch_size=2, collate_fn=DataCollator.for_tokenizer(tokenizer))
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    assert "labels" not in batches[0]


def test_pairs_have_segment_ids(tokenizer):
    enc = encode_split(PAIRS, tokenizer, LabelList.from_labels(PAIRS.labels), max_length=64)
    item = enc[0]
    assert 1 in item["token_type_ids"] and item["token_type_ids"][0] == 0
    assert item["input_ids"].count(tokenizer.sep_token_id) == 2
    batch = collate([enc[0], enc[1]], tokenizer.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    assert (batch["token_type_ids"] == 1).any()


def test_truncation(tokenizer):
    long = TextSplit(ids=["x", "y"], texts=["word " * 200, "hi"], text_pairs=None, labels=["a", "a"])
    enc = encode_split(long, tokenizer, None, max_length=16)
    assert len(enc[0]["input_ids"]) == 16 and enc[0]["input_ids"][-1] == tokenizer.sep_token_id
    pairs = TextSplit(ids=["x"], texts=["word " * 100], text_pairs=["claim " * 100], labels=["a"])
    item = encode_split(pairs, tokenizer, None, max_length=20)[0]
    assert len(item["input_ids"]) == 20 and 1 in item["token_type_ids"]


def test_unknown_label_raises(tokenizer):
    with pytest.raises(UnknownLabelError):
        encode_split(SINGLE, tokenizer, LabelList.from_labels(["pos"]), max_length=16)
