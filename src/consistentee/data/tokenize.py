"""Tokenize a split once, unpadded, and pad per batch.

Rows are stored unpadded and padded to the longest row of each batch: early-exit inference is
measured in per-example compute, and padding every batch to ``max_length`` would waste most of it.
Every item carries its row ``index`` so predictions can be mapped back to ids after shuffling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from consistentee.data.dataset import TextSplit
from consistentee.data.errors import DataError
from consistentee.data.labels import LabelList

_PADDED_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


class EncodedSplit(Dataset):
    """Tokenized rows of a TextSplit: item ``i`` is a dict of unpadded int lists plus label and index."""

    def __init__(
        self,
        ids: list[str],
        features: dict[str, list[list[int]]],
        labels: list[int] | None,
    ) -> None:
        self.ids = ids
        self.features = features
        self.label_ids = labels
        n = len(ids)
        if any(len(values) != n for values in features.values()) or (labels is not None and len(labels) != n):
            raise DataError("encoded columns differ in length")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {name: values[index] for name, values in self.features.items()}
        if self.label_ids is not None:
            item["labels"] = self.label_ids[index]
        item["index"] = index
        return item

    @property
    def lengths(self) -> list[int]:
        """Token count of every row (useful for length-bucketed batching)."""
        return [len(row) for row in self.features["input_ids"]]


def encode_split(
    split: TextSplit,
    tokenizer: Any,
    labels: LabelList | None,
    max_length: int,
) -> EncodedSplit:
    """Tokenize (pairs with the tokenizer's pair encoding), truncate to ``max_length``, no padding.

    With ``labels`` the raw label strings are encoded to class ids (unknown ones raise
    UnknownLabelError); without, items carry no "labels" (unlabelled inference).
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    if len(split) == 0:
        features: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": []}
    else:
        encoded = tokenizer(
            list(split.texts),
            list(split.text_pairs) if split.text_pairs is not None else None,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=True,
        )
        features = {name: [list(row) for row in encoded[name]] for name in _PADDED_FIELDS if name in encoded}
    label_ids = labels.encode(split.labels) if labels is not None else None
    return EncodedSplit(list(split.ids), features, label_ids)


def collate(batch: Sequence[Mapping[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of items to the longest in the batch; every value becomes a long tensor."""
    if not batch:
        raise DataError("cannot collate an empty batch")
    width = max(len(item["input_ids"]) for item in batch)
    out: dict[str, torch.Tensor] = {}
    for name in _PADDED_FIELDS:
        if name not in batch[0]:
            continue
        pad = pad_token_id if name == "input_ids" else 0
        tensor = torch.full((len(batch), width), pad, dtype=torch.long)
        for row, item in enumerate(batch):
            values = item[name]
            tensor[row, : len(values)] = torch.as_tensor(values, dtype=torch.long)
        out[name] = tensor
    if "labels" in batch[0]:
        out["labels"] = torch.tensor([int(item["labels"]) for item in batch], dtype=torch.long)
    out["index"] = torch.tensor([int(item["index"]) for item in batch], dtype=torch.long)
    return out


class DataCollator:
    """``collate`` bound to a pad token id, for ``DataLoader(collate_fn=...)``."""

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise DataError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.pad_token_id = int(pad_token_id)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> DataCollator:
        return cls(tokenizer.pad_token_id)

    def __call__(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        return collate(batch, self.pad_token_id)
