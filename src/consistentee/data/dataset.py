"""In-memory text classification splits and the seeded recipe that carves them.

Splits are assigned from the row *ids*, not from row positions: every id gets a rank from
``sha256(f"{seed}:{id}")`` and the rows are taken in rank order. The same seed therefore puts the
same ids in the same split on every load, machine, Python/NumPy version and row order of the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from consistentee.data.errors import DataError
from consistentee.data.labels import LabelList

SPLIT_NAMES = ("train", "dev", "test")


@dataclass
class TextSplit:
    """Rows of one split: parallel lists of ids, texts, optional second texts and raw label strings."""

    ids: list[str]
    texts: list[str]
    text_pairs: list[str] | None
    labels: list[str]

    def __post_init__(self) -> None:
        n = len(self.ids)
        lengths = {"texts": len(self.texts), "labels": len(self.labels)}
        if self.text_pairs is not None:
            lengths["text_pairs"] = len(self.text_pairs)
        bad = {name: size for name, size in lengths.items() if size != n}
        if bad:
            raise DataError(f"split columns differ in length: ids={n}, {bad}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair data (the tokenizer then uses its pair encoding)."""
        return self.text_pairs is not None

    def select(self, indices: Sequence[int]) -> TextSplit:
        """A new split with the given rows, in the given order."""
        rows = [int(i) for i in indices]
        return TextSplit(
            ids=[self.ids[i] for i in rows],
            texts=[self.texts[i] for i in rows],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in rows],
            labels=[self.labels[i] for i in rows],
        )

    @classmethod
    def concat(cls, parts: Sequence[TextSplit]) -> TextSplit:
        """Rows of several splits one after the other (all single texts or all pairs)."""
        if not parts:
            return cls([], [], None, [])
        pairs = {part.is_pair for part in parts}
        if len(pairs) > 1:
            raise DataError("cannot concatenate single-text and sentence-pair splits")
        return cls(
            ids=[i for part in parts for i in part.ids],
            texts=[t for part in parts for t in part.texts],
            text_pairs=[t for part in parts for t in part.text_pairs] if pairs == {True} else None,  # type: ignore[union-attr]
            labels=[label for part in parts for label in part.labels],
        )


@dataclass
class DatasetSplits:
    """A named dataset's train/dev/test splits, the label list built from train, and how they were made."""

    name: str
    train: TextSplit
    dev: TextSplit
    test: TextSplit
    labels: LabelList = field(default=None)  # type: ignore[assignment]
    description: str = ""

    def __post_init__(self) -> None:
        if self.labels is None:
            self.labels = LabelList.from_labels(self.train.labels)

    def splits(self) -> dict[str, TextSplit]:
        return {"train": self.train, "dev": self.dev, "test": self.test}

    def __iter__(self) -> Iterator[tuple[str, TextSplit]]:
        return iter(self.splits().items())

    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits().items()}


def seeded_order(ids: Sequence[str], seed: int) -> list[int]:
    """Row positions sorted by a seeded hash of their id: a shuffle that ignores the row order."""
    salt = f"{int(seed)}:".encode()

    def key(i: int) -> tuple[bytes, int]:
        return hashlib.sha256(salt + str(ids[i]).encode("utf-8", "surrogatepass")).digest(), i

    return sorted(range(len(ids)), key=key)


def split_by_counts(
    split: TextSplit, n_train: int, n_dev: int, seed: int, *, keep_order: bool = True
) -> tuple[TextSplit, TextSplit, TextSplit]:
    """Shuffle by :func:`seeded_order`, then take ``n_train`` rows, ``n_dev`` rows and the rest.

    With ``keep_order`` each split lists its rows in the original file order (easier to read and
    diff); membership is decided by the seeded order either way.
    """
    if n_train < 0 or n_dev < 0 or n_train + n_dev > len(split):
        raise DataError(f"cannot take {n_train} train + {n_dev} dev rows from {len(split)} rows")
    order = seeded_order(split.ids, seed)
    chunks = [order[:n_train], order[n_train : n_train + n_dev], order[n_train + n_dev :]]
    if keep_order:
        chunks = [sorted(chunk) for chunk in chunks]
    train, dev, test = (split.select(chunk) for chunk in chunks)
    return train, dev, test


def fraction_count(n: int, fraction: float) -> int:
    """Rows for a fraction of ``n``, rounded half up (Python's round() would round 0.5 to 0)."""
    return int(n * fraction + 0.5)


def split_seeded(
    split: TextSplit, dev_fraction: float, test_fraction: float, seed: int
) -> tuple[TextSplit, TextSplit, TextSplit]:
    """Deterministic train/dev/test split by fractions; the same seed gives the same ids everywhere."""
    for name, fraction in (("dev_fraction", dev_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise DataError(f"{name} must be in [0, 1), got {fraction}")
    if dev_fraction + test_fraction >= 1.0:
        raise DataError(f"dev_fraction + test_fraction must be < 1, got {dev_fraction + test_fraction}")
    n = len(split)
    n_dev = fraction_count(n, dev_fraction)
    n_test = fraction_count(n, test_fraction)
    n_train = n - n_dev - n_test
    if n_train <= 0:
        raise DataError(f"{n} rows are too few to split into train/dev/test")
    return split_by_counts(split, n_train, n_dev, seed)
