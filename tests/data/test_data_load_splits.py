"""load_splits from built-in names, files (with and without dev/test files) and saved HF datasets."""

from __future__ import annotations

import datasets
import pandas as pd
import pytest

from consistentee.data import DataError, load_splits


def write_csv(path, n, start=0, labels=("pos", "neg")):
    pd.DataFrame(
        {
            "text": [f"text {i}" for i in range(start, start + n)],
            "label": [labels[i % len(labels)] for i in range(start, start + n)],
        }
    ).to_csv(path, index=False)
    return path


def test_from_single_file_carves_dev_and_test(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", 100)
    ds = load_splits(path, seed=5)
    assert ds.name == "reviews"
    assert ds.sizes() == {"train": 80, "dev": 10, "test": 10}
    assert ds.labels.names == ("neg", "pos")
    assert not set(ds.train.ids) & set(ds.test.ids)
    again = load_splits(str(path), seed=5)
    assert again.test.ids == ds.test.ids
    assert "seed 5" in ds.description


def test_from_file_with_test_file_carves_only_dev(tmp_path):
    train = write_csv(tmp_path / "train.csv", 50)
    test = write_csv(tmp_path / "test.csv", 7, start=50)
    ds = load_splits(train, test_file=test, dev_fraction=0.2)
    assert ds.sizes() == {"train": 40, "dev": 10, "test": 7}
    assert ds.test.ids == [f"test-{i}" for i in range(7)]


def test_from_files_all_given(tmp_path):
    train = write_csv(tmp_path / "train.csv", 20)
    dev = write_csv(tmp_path / "dev.csv", 3)
    test = write_csv(tmp_path / "test.csv", 4)
    ds = load_splits(train, dev_file=dev, test_file=test)
    assert ds.sizes() == {"train": 20, "dev": 3, "test": 4}


def test_saved_hf_dataset_dict_with_class_labels(tmp_path):
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    train = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(40)], "label": [i % 2 for i in range(40)]}, features=features
    )
    valid = datasets.Dataset.from_dict({"sentence": ["v0", "v1"], "label": [1, 0]}, features=features)
    hidden = datasets.Dataset.from_dict({"sentence": ["t0", "t1"], "label": [-1, -1]}, features=features)
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": train, "validation": valid, "test": hidden}).save_to_disk(str(folder))

    ds = load_splits(f"hf:{folder}", text_column="sentence", seed=0)
    assert ds.dev.texts == ["v0", "v1"]
    assert ds.dev.labels == ["pos", "neg"]
    assert ds.labels.names == ("neg", "pos")
    # the unlabelled test split is replaced by 10% carved from train
    assert ds.sizes() == {"train": 36, "dev": 2, "test": 4}
    assert "unlabelled" in ds.description
    # a saved folder is recognised without the prefix too
    assert load_splits(folder, text_column="sentence").test.ids == ds.test.ids


def test_saved_single_hf_dataset_pairs(tmp_path):
    data = datasets.Dataset.from_dict(
        {
            "premise": [f"p{i}" for i in range(30)],
            "hypothesis": [f"h{i}" for i in range(30)],
            "label": [0, 1, 2] * 10,
        }
    )
    data.save_to_disk(str(tmp_path / "nli"))
    ds = load_splits(f"hf:{tmp_path / 'nli'}", text_column="premise", text_pair_column="hypothesis")
    assert ds.sizes() == {"train": 24, "dev": 3, "test": 3}
    assert ds.train.is_pair
    assert ds.labels.names == ("0", "1", "2")


def test_hf_unknown_column(tmp_path):
    datasets.Dataset.from_dict({"text": ["a"], "label": [0]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match="'sentence'.*available columns: text, label"):
        load_splits(f"hf:{tmp_path / 'd'}", text_column="sentence")


def test_builtin_name_and_unknown_source(tmp_path):
    assert load_splits("trec6").sizes()["test"] == 500
    with pytest.raises(DataError, match="not a built-in dataset"):
        load_splits(tmp_path / "missing.csv")
