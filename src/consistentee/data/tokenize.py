"""Tokenize a split once, unpadded, and pad per batch.

Rows are stored unpadded and padded to the longest row of each batch: early-exit inference is
measured in per-example compute, and padding every batch to ``max_length`` would waste most of it.
Every item carries its row ``index`` so predictions can be mapped back to ids after shuffling.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from consistentee.data.dataset import TextSplit
from consistentee.data.errors import DataError, DataWarning
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
    *,
    name: str = "split",
) -> EncodedSplit:
    """Tokenize (pairs with the tokenizer's pair encoding), truncate to ``max_length``, no padding.

    With ``labels`` the raw label strings are encoded to class ids (unknown ones raise
    UnknownLabelError); without, items carry no "labels" (unlabelled inference). Rows that were longer
    than ``max_length`` tokens are truncated with one :class:`DataWarning` per split naming how many.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise DataError(f"max_length must be an integer >= 2, got {max_length!r}")
    label_ids = labels.encode(split.labels) if labels is not None else None  # fail fast, before tokenizing
    special = getattr(tokenizer, "num_special_tokens_to_add", None)
    if callable(special):
        needed = int(special(pair=split.is_pair)) + (2 if split.is_pair else 1)
        if max_length < needed:
            raise DataError(f"max_length={max_length} is too small: the tokenizer adds {needed - (2 if split.is_pair else 1)} "
                            f"special tokens to each {'sentence pair' if split.is_pair else 'text'}, so at least "
                            f"{needed} tokens are needed")
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
        features = {field: [list(row) for row in encoded[field]] for field in _PADDED_FIELDS if field in encoded}
        _warn_truncated(split, tokenizer, features["input_ids"], max_length, name)
    return EncodedSplit(list(split.ids), features, label_ids)


def _warn_truncated(split: TextSplit, tokenizer: Any, rows: list[list[int]], max_length: int, name: str) -> None:
    """Warn about rows cut to ``max_length``: only rows that reached the limit are measured again."""
    full = [i for i, row in enumerate(rows) if len(row) >= max_length]
    if not full:
        return
    texts = [split.texts[i] for i in full]
    pairs = [split.text_pairs[i] for i in full] if split.text_pairs is not None else None
    lengths = [len(r) for r in tokenizer(texts, pairs, truncation=False, padding=False, verbose=False)["input_ids"]]
    cut = [(split.ids[i], n) for i, n in zip(full, lengths, strict=True) if n > max_length]
    if cut:
        longest = max(cut, key=lambda item: item[1])
        warnings.warn(DataWarning(
            f"{name}: {len(cut)} of {len(rows)} text(s) longer than max_length={max_length} tokens were truncated "
            f"(longest: id {longest[0]!r}, {longest[1]} tokens)"), stacklevel=3)


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
