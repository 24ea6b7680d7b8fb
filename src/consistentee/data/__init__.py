"""Data for early-exit classifiers: files, Hugging Face datasets and built-ins as seeded splits.

``load_splits(source)`` is the one entry point: ``source`` is a built-in name (see
:data:`BUILTIN_DATASETS`), a data file (.csv/.tsv/.json/.jsonl/.parquet), or a Hugging Face dataset
written ``hf:<hub name>`` or ``hf:<folder saved with save_to_disk>``. Splits that the source does
not provide are carved with a seeded, id-based shuffle so they are the same on every run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from consistentee.data.builtin import BUILTIN_DATASETS, BuiltinDataset, load_builtin
from consistentee.data.dataset import (
    DatasetSplits,
    TextSplit,
    fraction_count,
    seeded_order,
    split_by_counts,
    split_seeded,
)
from consistentee.data.errors import DataError, DataWarning, UnknownLabelError
from consistentee.data.files import (
    _is_saved_dataset,
    hf_id_prefix,
    hf_is_unlabelled,
    hf_to_split,
    load_file,
    load_hf_dataset,
    open_hf_dataset,
)
from consistentee.data.labels import LabelList, normalize_label

#: Names that need torch, imported on first use (the command line imports this package and must stay fast).
_TOKENIZE = ("DataCollator", "EncodedSplit", "collate", "encode_split")


def __getattr__(name: str):
    if name in _TOKENIZE:
        from consistentee.data import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILTIN_DATASETS",
    "BuiltinDataset",
    "DataCollator",
    "DataError",
    "DataWarning",
    "DatasetSplits",
    "EncodedSplit",
    "LabelList",
    "TextSplit",
    "UnknownLabelError",
    "collate",
    "encode_split",
    "load_builtin",
    "load_file",
    "load_hf_dataset",
    "load_splits",
    "normalize_label",
    "seeded_order",
    "split_by_counts",
    "split_seeded",
]


def _carve(
    train: TextSplit,
    dev: TextSplit | None,
    test: TextSplit | None,
    dev_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[TextSplit, TextSplit, TextSplit, str]:
    """Fill in missing dev/test splits from train with the seeded shuffle; say what was done."""
    if dev is not None and test is not None:
        return train, dev, test, "dev and test as given"
    if dev is None and test is None:
        new_train, new_dev, new_test = split_seeded(train, dev_fraction, test_fraction, seed)
        return (
            new_train,
            new_dev,
            new_test,
            (
                f"dev ({dev_fraction:g}) and test ({test_fraction:g}) carved from train by sha256 shuffle with seed {seed}"
            ),
        )
    # One of them is missing: carve only that one.
    missing, fraction = ("dev", dev_fraction) if dev is None else ("test", test_fraction)
    n_carved = fraction_count(len(train), fraction)
    if n_carved == 0 or n_carved >= len(train):
        raise DataError(
            f"cannot carve a {missing} split of fraction {fraction} from {len(train)} training rows"
        )
    new_train, carved, _ = split_by_counts(train, len(train) - n_carved, n_carved, seed)
    note = f"{missing} ({fraction:g}) carved from train by sha256 shuffle with seed {seed}"
    if dev is None:
        return new_train, carved, test, note  # type: ignore[return-value]
    return new_train, dev, carved, note


def _load_hf_splits(
    name_or_path: str,
    *,
    text_column: str,
    label_column: str,
    text_pair_column: str | None,
    id_column: str | None,
    hf_split_names: Sequence[str],
    dev_fraction: float,
    test_fraction: float,
    seed: int,
) -> DatasetSplits:
    if len(hf_split_names) != 3:
        raise DataError(f"hf_split_names must name (train, dev, test) splits, got {tuple(hf_split_names)}")
    available = open_hf_dataset(name_or_path)
    prefix = hf_id_prefix(name_or_path)
    converted: list[TextSplit | None] = []
    notes = []
    for role, split_name in zip(("train", "dev", "test"), hf_split_names, strict=True):
        dataset = available.get(split_name)
        if dataset is not None and role != "train" and hf_is_unlabelled(dataset, label_column):
            notes.append(f"{split_name!r} is unlabelled, ignored")
            dataset = None
        if dataset is None:
            if role == "train":
                raise DataError(
                    f"Hugging Face dataset {name_or_path!r} has no split {split_name!r}; "
                    f"available: {', '.join(available)}"
                )
            converted.append(None)
            continue
        converted.append(
            hf_to_split(
                dataset,
                source=f"{name_or_path}[{split_name}]",
                id_prefix=f"{prefix}-{split_name}",
                text_column=text_column,
                label_column=label_column,
                text_pair_column=text_pair_column,
                id_column=id_column,
            )
        )
    train, dev, test, how = _carve(
        converted[0], converted[1], converted[2], dev_fraction, test_fraction, seed
    )  # type: ignore[arg-type]
    splits_used = ", ".join(
        f"{role}={name}" for role, name in zip(("train", "dev", "test"), hf_split_names, strict=True)
    )
    description = f"Hugging Face dataset {name_or_path} ({splits_used}); {how}"
    if notes:
        description += "; " + "; ".join(notes)
    return DatasetSplits(
        name=prefix,
        train=train,
        dev=dev,
        test=test,
        labels=LabelList.from_labels(train.labels),
        description=description,
    )


def load_splits(
    source: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    id_column: str | None = None,
    dev_file: str | os.PathLike[str] | None = None,
    test_file: str | os.PathLike[str] | None = None,
    hf_split_names: Sequence[str] = ("train", "validation", "test"),
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> DatasetSplits:
    """Train/dev/test splits from a built-in name, a data file or an ``hf:`` dataset.

    Built-ins ignore the column and fraction arguments (their recipes are fixed). A file gives the
    training rows; ``dev_file``/``test_file`` supply the other splits, and missing ones are carved
    from it with ``seed``. A Hugging Face dataset's splits are used when present and labelled.
    """
    text = os.fspath(source)
    if text in BUILTIN_DATASETS:
        return load_builtin(text, seed=seed)
    columns = dict(
        text_column=text_column,
        label_column=label_column,
        text_pair_column=text_pair_column,
        id_column=id_column,
    )
    path = Path(text)
    if text.startswith("hf:") or _is_saved_dataset(path):
        if dev_file is not None or test_file is not None:
            raise DataError("dev_file/test_file apply to file sources, not Hugging Face datasets")
        name = text[3:] if text.startswith("hf:") else text
        if not name:
            raise DataError("empty Hugging Face dataset name after 'hf:'")
        return _load_hf_splits(
            name,
            **columns,
            hf_split_names=hf_split_names,
            dev_fraction=dev_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
    if not path.is_file():
        raise DataError(
            f"{text!r} is not a built-in dataset ({', '.join(BUILTIN_DATASETS)}), an existing data file, "
            f"or a Hugging Face dataset written 'hf:<name or saved folder>'"
        )
    train = load_file(path, **columns)
    dev = load_file(dev_file, **columns) if dev_file is not None else None
    test = load_file(test_file, **columns) if test_file is not None else None
    for name, split in (("dev", dev), ("test", test)):
        if split is not None and split.is_pair != train.is_pair:
            raise DataError(f"{name} file and training file disagree on sentence pairs")
    train, dev, test, how = _carve(train, dev, test, dev_fraction, test_fraction, seed)
    files = (
        f"train={path}"
        + (f", dev={dev_file}" if dev_file else "")
        + (f", test={test_file}" if test_file else "")
    )
    return DatasetSplits(
        name=path.stem,
        train=train,
        dev=dev,
        test=test,
        labels=LabelList.from_labels(train.labels),
        description=f"files ({files}); {how}",
    )
