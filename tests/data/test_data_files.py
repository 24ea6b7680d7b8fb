"""load_file for every format, ids, and the DataError messages for bad input."""

from __future__ import annotations

import csv
import json
import string

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consistentee.data import DataError, load_file

ROWS = [
    {"id": "a1", "text": "good film", "pair": "really", "label": 1},
    {"id": "a2", "text": 'bad, "awful" film', "pair": "no\tway", "label": 0},
    {"id": "a3", "text": "héllo ✓ naïve", "pair": "line\nbreak", "label": 1},
]
FORMATS = ["csv", "tsv", "json", "jsonl", "parquet"]


def write(frame: pd.DataFrame, path, fmt: str) -> None:
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif fmt == "json":
        path.write_text(json.dumps(frame.to_dict(orient="records"), ensure_ascii=False), encoding="utf-8")
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == "parquet":
        frame.to_parquet(path, index=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_single_text_every_format(tmp_path, fmt):
    path = tmp_path / f"reviews.{fmt}"
    write(pd.DataFrame(ROWS), path, fmt)
    split = load_file(path)
    assert split.ids == ["reviews-0", "reviews-1", "reviews-2"]
    assert split.texts == [r["text"] for r in ROWS]
    assert split.labels == ["1", "0", "1"]
    assert split.text_pairs is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_pairs_and_id_column_every_format(tmp_path, fmt):
    path = tmp_path / f"pairs.{fmt}"
    write(pd.DataFrame(ROWS), path, fmt)
    split = load_file(path, text_pair_column="pair", id_column="id")
    assert split.ids == ["a1", "a2", "a3"]
    assert split.text_pairs == [r["pair"] for r in ROWS]
    assert split.is_pair


def test_json_column_layout(tmp_path):
    path = tmp_path / "cols.json"
    path.write_text(
        json.dumps({"text": {"0": "x", "1": "y"}, "label": {"0": "a", "1": "b"}}), encoding="utf-8"
    )
    split = load_file(path)
    assert split.texts == ["x", "y"] and split.labels == ["a", "b"]


def test_custom_columns_and_integer_ids(tmp_path):
    path = tmp_path / "custom.csv"
    pd.DataFrame({"n": [7, 8], "sentence": ["one", "two"], "y": ["pos", "neg"]}).to_csv(path, index=False)
    split = load_file(path, text_column="sentence", label_column="y", id_column="n")
    assert split.ids == ["7", "8"]
    assert split.labels == ["pos", "neg"]


def test_csv_keeps_na_like_and_numeric_texts(tmp_path):
    path = tmp_path / "tricky.csv"
    path.write_text("text,label\nNA,1\nnull,2\n007,3\n", encoding="utf-8")
    assert load_file(path).texts == ["NA", "null", "007"]


def test_float_labels_from_parquet_become_int_strings(tmp_path):
    path = tmp_path / "floats.parquet"
    pd.DataFrame({"text": ["a", "b"], "label": [1.0, 2.0]}).to_parquet(path)
    assert load_file(path).labels == ["1", "2"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv.*not found"):
        load_file(tmp_path / "nope.csv")


def test_unknown_suffix(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"data\.xlsx.*unsupported.*\.xlsx"):
        load_file(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_unknown_column_lists_available(tmp_path, fmt):
    path = tmp_path / f"cols.{fmt}"
    write(pd.DataFrame(ROWS), path, fmt)
    with pytest.raises(DataError) as info:
        load_file(path, text_column="sentence")
    message = str(info.value)
    assert "'sentence'" in message and "available columns" in message
    assert "text" in message and "label" in message and f"cols.{fmt}" in message


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl"])
def test_empty_file(tmp_path, fmt):
    path = tmp_path / f"empty.{fmt}"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=f"empty.{fmt}.*empty"):
        load_file(path)


def test_header_only_csv(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_file(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_label(tmp_path, fmt):
    path = tmp_path / f"nan.{fmt}"
    frame = pd.DataFrame({"text": ["a", "b", "c"], "label": [1, None, 0]})
    write(frame, path, fmt)
    with pytest.raises(DataError) as info:
        load_file(path)
    message = str(info.value)
    assert "label" in message and "nan-1" in message and f"nan.{fmt}" in message


def test_empty_text_names_row(tmp_path):
    path = tmp_path / "blank.csv"
    path.write_text('text,label\nok,1\n"   ",0\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"empty text.*'text'.*blank-1"):
        load_file(path)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.csv.*UTF-8"):
        load_file(path)


def test_bad_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a", "label": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match="line 2"):
        load_file(path)


def test_duplicate_ids(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("id,text,label\nx,a,1\nx,b,0\n", encoding="utf-8")
    with pytest.raises(DataError, match="duplicate id 'x'"):
        load_file(path, id_column="id")


def test_utf8_bom_is_ignored(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftext,label\nx,1\n".encode())
    assert load_file(path).texts == ["x"]


# Texts: any unicode except surrogates (category Cs: they cannot be encoded as UTF-8 at all) and a
# lone "\r": pandas' CSV writer leaves a field holding "\r" unquoted under QUOTE_MINIMAL and the
# reader then sees a line break, so such a file is already corrupt before load_file reads it.
# Texts blank after strip are rejected by design.
_ALPHABET = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r")
_TEXTS = st.text(alphabet=_ALPHABET, min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(_TEXTS, min_size=1, max_size=6),
    quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
)
def test_csv_round_trip_keeps_unicode_texts(tmp_path, texts, quoting):
    path = tmp_path / "prop.csv"
    pd.DataFrame({"text": texts, "label": ["x"] * len(texts)}).to_csv(path, index=False, quoting=quoting)
    assert load_file(path).texts == texts


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    labels=st.lists(
        st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=5), min_size=1, max_size=5
    )
)
def test_csv_round_trip_labels(tmp_path, labels):
    path = tmp_path / "labels.csv"
    pd.DataFrame({"text": ["t"] * len(labels), "label": labels}).to_csv(path, index=False)
    loaded = load_file(path).labels
    # ASCII labels survive except integral-float spellings, which normalise like numbers do
    assert len(loaded) == len(labels)
    assert all(a == b or a == str(int(float(b))) for a, b in zip(loaded, labels, strict=True))
