"""LabelList: ordering, normalisation, encode/decode, atomic save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest

from consistentee.data import DataError, LabelList, UnknownLabelError, normalize_label


def test_numeric_labels_sort_by_value_not_text():
    labels = LabelList.from_labels([10, 2, 1, 2, 10])
    assert labels.names == ("1", "2", "10")
    assert len(labels) == 3


def test_text_labels_sort_lexicographically():
    assert LabelList.from_labels(["spam", "ham", "spam"]).names == ("ham", "spam")


def test_mixed_numbers_and_words_sort_as_text():
    assert LabelList.from_labels(["b", 10, 2]).names == ("10", "2", "b")


def test_int_str_and_float_spellings_are_one_label():
    labels = LabelList.from_labels([1, "1", 1.0, np.int64(1), np.float64(1.0), "1.0", 0])
    assert labels.names == ("0", "1")
    assert labels.encode([1.0, "1", np.int64(0)]) == [1, 1, 0]


@pytest.mark.parametrize("value", [None, float("nan"), np.nan, "", "   "])
def test_missing_labels_are_errors(value):
    with pytest.raises(DataError):
        normalize_label(value)


def test_encode_decode_round_trip():
    labels = LabelList.from_labels(["neg", "pos"])
    ids = labels.encode(["pos", "neg", "pos"])
    assert ids == [1, 0, 1]
    assert labels.decode(ids) == ["pos", "neg", "pos"]


def test_unknown_label_error_names_unseen_and_known():
    labels = LabelList.from_labels(["neg", "pos"])
    with pytest.raises(UnknownLabelError) as info:
        labels.encode(["pos", "neutral", "mixed", "neutral"])
    message = str(info.value)
    assert "'neutral'" in message and "'mixed'" in message
    assert "neg" in message and "pos" in message
    assert isinstance(info.value, DataError)


def test_decode_out_of_range():
    with pytest.raises(DataError, match="out of range"):
        LabelList.from_labels(["a", "b"]).decode([2])


def test_save_load_round_trip(tmp_path):
    labels = LabelList.from_labels(["ENTY", "ABBR", "HUM", "é✓"])
    path = labels.save(tmp_path / "model")
    assert path.name == "labels.json"
    assert json.loads(path.read_text(encoding="utf-8")) == {"labels": list(labels.names)}
    assert LabelList.load(tmp_path / "model") == labels
    # atomic write leaves no temp files behind
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["labels.json"]


def test_save_overwrites(tmp_path):
    LabelList.from_labels(["a"]).save(tmp_path)
    LabelList.from_labels(["x", "y"]).save(tmp_path)
    assert LabelList.load(tmp_path).names == ("x", "y")


def test_load_missing_or_bad_file(tmp_path):
    with pytest.raises(DataError, match="labels.json"):
        LabelList.load(tmp_path)
    (tmp_path / "labels.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="labels.json"):
        LabelList.load(tmp_path)


def test_duplicates_and_empty_rejected():
    with pytest.raises(DataError, match="duplicate"):
        LabelList(("a", "a"))
    with pytest.raises(DataError):
        LabelList.from_labels([])
