"""Property tests (hypothesis) of the data and tokenisation path."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consistentee.data import (
    DataCollator,
    DataError,
    LabelList,
    TextSplit,
    encode_split,
    load_file,
    normalize_label,
    seeded_order,
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Texts as users write them: any printable unicode, at least one non-space character, no surrogates.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60).filter(str.strip)
LABEL = st.one_of(st.integers(-5, 5), st.sampled_from(["pos", "neg", "neutral", "1", "2.0", " spam "]))


@pytest.fixture(scope="module")
def tokenizer(tiny_encoder_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_encoder_dir)


@SETTINGS
@given(LABEL)
def test_normalize_label_is_idempotent_and_spelling_independent(value):
    name = normalize_label(value)
    assert normalize_label(name) == name
    assert name == name.strip() and name
    if isinstance(value, int):
        assert normalize_label(str(value)) == normalize_label(float(value)) == name


@SETTINGS
@given(st.lists(LABEL, min_size=1, max_size=20), st.randoms())
def test_label_ids_do_not_depend_on_row_order_and_round_trip(values, rnd):
    labels = LabelList.from_labels(values)
    shuffled = list(values)
    rnd.shuffle(shuffled)
    assert LabelList.from_labels(shuffled) == labels
    ids = labels.encode(values)
    assert labels.decode(ids) == [normalize_label(v) for v in values]
    assert all(0 <= i < len(labels) for i in ids)


@SETTINGS
@given(st.one_of(st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                 st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not float(x).is_integer()),
                 st.just(float("nan")), st.none(), st.just("  ")))
def test_labels_of_the_wrong_type_or_missing_are_refused(value):
    with pytest.raises(DataError):
        normalize_label(value)


@SETTINGS
@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=30, unique=True), st.integers(0, 10**6))
def test_seeded_order_is_a_permutation_that_ignores_row_order(ids, seed):
    order = seeded_order(ids, seed)
    assert sorted(order) == list(range(len(ids)))
    reversed_ids = ids[::-1]
    assert [reversed_ids[i] for i in seeded_order(reversed_ids, seed)] == [ids[i] for i in order]


@SETTINGS
@given(st.lists(st.tuples(TEXT, st.sampled_from(["pos", "neg"])), min_size=1, max_size=8),
       st.sampled_from(["csv", "tsv", "jsonl"]))
def test_files_give_back_exactly_the_texts_and_labels_written(tmp_path_factory, rows, fmt):
    path = tmp_path_factory.mktemp("prop") / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows), encoding="utf-8")
    else:
        pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    split = load_file(path)
    assert split.texts == [t for t, _ in rows]
    assert split.labels == [y for _, y in rows]
    assert len(set(split.ids)) == len(rows)


@SETTINGS
@given(st.lists(st.one_of(TEXT, st.text(st.sampled_from("ab \u00e9\u4e2d!"), min_size=1, max_size=400).filter(str.strip)),
                min_size=1, max_size=6), st.integers(2, 24), st.booleans())
def test_encoding_never_exceeds_max_length_and_collates_to_masked_rectangles(tokenizer, texts, max_length, pairs):
    split = TextSplit([f"r{i}" for i in range(len(texts))], texts, list(reversed(texts)) if pairs else None,
                      ["a" if i % 2 else "b" for i in range(len(texts))])
    minimum = tokenizer.num_special_tokens_to_add(pair=pairs) + (2 if pairs else 1)
    if max_length < minimum:  # room for the special tokens and one token per text, or a clear refusal
        with pytest.raises(DataError, match="max_length=.* is too small"):
            encode_split(split, tokenizer, LabelList(("a", "b")), max_length)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = encode_split(split, tokenizer, LabelList(("a", "b")), max_length)
    assert len(encoded) == len(texts)
    assert all(1 <= n <= max_length for n in encoded.lengths)
    batch = DataCollator.for_tokenizer(tokenizer)([encoded[i] for i in range(len(encoded))])
    width = max(encoded.lengths)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (len(texts), width)
    assert batch["attention_mask"].sum(1).tolist() == encoded.lengths
    padded = batch["input_ids"][batch["attention_mask"] == 0]
    assert torch.all(padded == tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1 if i % 2 == 0 else 0 for i in range(len(texts))]


@SETTINGS
@given(st.integers(1, 3), st.integers(0, 40))
def test_truncation_warns_exactly_when_a_text_is_cut(tokenizer, max_words, extra_words):
    words = max_words + extra_words
    split = TextSplit(["x"], [" ".join(["word"] * words)], None, ["a"])
    max_length = max_words + 2  # [CLS] + words + [SEP] fit exactly when extra_words == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = encode_split(split, tokenizer, LabelList(("a",)), max_length)
    cut = [w for w in caught if "truncated" in str(w.message)]
    assert len(cut) == (1 if extra_words else 0)
    assert encoded.lengths == [min(words + 2, max_length)]
