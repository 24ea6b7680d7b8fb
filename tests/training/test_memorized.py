"""Memorized layers (docs/method.md section 4) on hand-made prediction tables."""

from __future__ import annotations

import pytest
import torch

from consistentee.training.memorized import (
    histogram_text,
    load_memorized,
    lookup,
    memorized_layers,
    save_memorized,
)


def test_memorized_layer_semantics():
    labels = torch.tensor([1, 1, 0, 2, 1, 0])
    predictions = torch.tensor([
        [1, 1, 1, 1],  # all correct -> 1 (easiest)
        [1, 1, 1, 0],  # last exit wrong -> L
        [1, 0, 1, 0],  # correct at 2, 'forgotten' at 3, correct at 4 -> 4
        [2, 0, 2, 2],  # correct at 1, forgotten at 2, correct again from 3 -> 3
        [0, 0, 0, 1],  # only the last exit is right -> L
        [1, 1, 1, 1],  # never correct -> L
    ])
    assert memorized_layers(predictions, labels).tolist() == [1, 4, 4, 3, 4, 4]


def test_saved_by_example_id_not_by_row(tmp_path):
    ids = ["b-7", "a-1", "c-3"]
    save_memorized(tmp_path, ids, torch.tensor([2, 1, 3]), 3)
    table, num_layers = load_memorized(tmp_path)
    assert num_layers == 3
    assert lookup(table, ["c-3", "b-7", "a-1"]).tolist() == [3, 2, 1]
    with pytest.raises(KeyError, match="no memorized layer"):
        lookup(table, ["zzz"])


def test_histogram_text_counts_every_layer():
    text = histogram_text(torch.tensor([1, 1, 3]), 3)
    assert "layer  1:      2" in text and "layer  2:      0" in text and "layer  3:      1" in text
