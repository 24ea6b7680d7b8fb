"""Read labelled text files and Hugging Face datasets into :class:`TextSplit`.

Formats are chosen by suffix: ``.csv``, ``.tsv``, ``.json`` (a list of records or anything
``pandas.read_json`` reads), ``.jsonl`` and ``.parquet``. CSV/TSV cells are read as strings with no
NA guessing, so a text such as "NA", "null" or "007" stays exactly as written. Bytes must be UTF-8:
silently replacing bad bytes would change texts without telling anyone.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consistentee.data.dataset import TextSplit
from consistentee.data.errors import DataError
from consistentee.data.labels import _is_missing, normalize_label

if TYPE_CHECKING:  # pandas is imported where a file is read: the command line stays fast without it
    import pandas as pd

SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 (bad byte at offset {exc.start}); re-save the file as UTF-8"
        ) from None


def parse_jsonl(text: str, source: str) -> list[dict]:
    """The objects of a JSON Lines text (blank lines skipped); a bad line is a DataError naming it."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{source}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{source}: line {number} is not a JSON object")
        records.append(record)
    return records


def _allow_field(size: int) -> None:
    """The csv module refuses fields over 128 KiB by default; a file's own size bounds its fields."""
    if csv.field_size_limit() <= size:
        csv.field_size_limit(min(size + 1, 2**31 - 1))


def check_csv_quoting(text: str, source: str, delimiter: str = ",") -> None:
    """Raise a DataError naming the line where a quoted field opens and never closes.

    Without this check Python's csv module reads everything after such a quote as one field: three rows come in,
    one comes out, and nothing says so."""
    _allow_field(len(text))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    start = 1
    try:
        for _ in reader:
            start = reader.line_num + 1
    except csv.Error as exc:
        if "end of data" in str(exc) or "EOF" in str(exc):
            raise DataError(f"{source}: line {start}: a quoted field is never closed (unterminated '\"'); "
                            "close it, or double a quote inside a quoted field") from None
        raise DataError(f"{source}: line {reader.line_num}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} "
                        f"({exc})") from None


def read_csv_records(text: str, source: str, delimiter: str = ",") -> list[dict[str, Any]]:
    """The rows of a CSV/TSV text as dicts (header first); bad quoting and ragged rows are errors naming the line."""
    check_csv_quoting(text, source, delimiter)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return []
    records = []
    start = reader.line_num + 1
    for row in reader:
        if row:
            if len(row) > len(header):
                raise DataError(f"{source}: line {start} has {len(row)} fields, the header has {len(header)}")
            records.append({name: (row[i] if i < len(row) else None) for i, name in enumerate(header)})
        start = reader.line_num + 1
    return records


def _read_frame(path: Path) -> pd.DataFrame:
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        text = _read_text(path)
        if not text.strip():
            raise DataError(f"{path}: file is empty")
        check_csv_quoting(text, str(path), "\t" if suffix == ".tsv" else ",")
        try:
            return pd.read_csv(
                io.StringIO(text),
                sep="\t" if suffix == ".tsv" else ",",
                dtype=str,
                keep_default_na=False,
                na_filter=False,
            )
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
            raise DataError(f"{path}: cannot parse {suffix[1:].upper()} ({_one_line(exc)})") from None
    if suffix == ".jsonl":
        records = parse_jsonl(_read_text(path), str(path))
        if not records:
            raise DataError(f"{path}: file is empty")
        return pd.DataFrame.from_records(records)
    if suffix == ".json":
        text = _read_text(path)
        if not text.strip():
            raise DataError(f"{path}: file is empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, list):
            if not data:
                raise DataError(f"{path}: file is empty (an empty JSON list)")
            if not all(isinstance(record, dict) for record in data):
                raise DataError(f"{path}: a JSON list must hold one object per row")
            return pd.DataFrame.from_records(data)
        try:  # column-oriented and other layouts pandas understands
            return pd.read_json(io.StringIO(text), dtype=False)
        except ValueError as exc:
            raise DataError(f"{path}: unsupported JSON layout ({_one_line(exc)})") from None
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several unrelated types
            raise DataError(f"{path}: cannot read Parquet ({_one_line(exc)})") from None
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _check_columns(source: str, available: Sequence[str], wanted: dict[str, str | None]) -> None:
    for role, column in wanted.items():
        if column is not None and column not in available:
            raise DataError(
                f"{source}: no {role} column {column!r}; available columns: "
                f"{', '.join(map(str, available)) or '(none)'}"
            )


def _cell_text(value: Any, source: str, column: str, row_id: str) -> str:
    if _is_missing(value):
        raise DataError(f"{source}: missing text in column {column!r} at row {row_id}")
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        raise DataError(f"{source}: empty text in column {column!r} at row {row_id}")
    return text


def _cell_id(value: Any, source: str, column: str, row: int) -> str:
    try:
        return normalize_label(value)
    except DataError:
        raise DataError(f"{source}: missing id in column {column!r} at row {row}") from None


def build_split(
    columns: dict[str, list[Any]],
    *,
    source: str,
    id_prefix: str,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    id_column: str | None = None,
) -> TextSplit:
    """Validate raw column values and turn them into a TextSplit (shared by files and HF datasets)."""
    _check_columns(
        source,
        list(columns),
        {"text": text_column, "label": label_column, "text pair": text_pair_column, "id": id_column},
    )
    n = len(columns[text_column])
    if n == 0:
        raise DataError(f"{source}: no rows")
    if id_column is not None:
        ids = [_cell_id(value, source, id_column, row) for row, value in enumerate(columns[id_column])]
        duplicates = [i for i, count in Counter(ids).items() if count > 1]
        if duplicates:
            raise DataError(f"{source}: duplicate id {duplicates[0]!r} in column {id_column!r}")
    else:
        ids = [f"{id_prefix}-{row}" for row in range(n)]
    texts = [
        _cell_text(value, source, text_column, ids[row]) for row, value in enumerate(columns[text_column])
    ]
    pairs = None
    if text_pair_column is not None:
        pairs = [
            _cell_text(value, source, text_pair_column, ids[row])
            for row, value in enumerate(columns[text_pair_column])
        ]
    labels = []
    for row, value in enumerate(columns[label_column]):
        try:
            labels.append(normalize_label(value))
        except DataError as exc:
            raise DataError(f"{source}: {exc} in column {label_column!r} at row {ids[row]}") from None
    return TextSplit(ids=ids, texts=texts, text_pairs=pairs, labels=labels)


def load_file(
    path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    id_column: str | None = None,
) -> TextSplit:
    """Load one labelled file; ids come from ``id_column`` or are ``"<file stem>-<row index>"``."""
    file = Path(path)
    if not file.exists():
        raise DataError(f"{file}: file not found")
    if file.is_dir():
        raise DataError(f"{file}: is a directory, expected a data file")
    if file.suffix.lower() not in SUFFIXES:
        raise DataError(f"{file}: unsupported file type {file.suffix!r}; use one of {', '.join(SUFFIXES)}")
    frame = _read_frame(file)
    if frame.shape[1] == 0 or frame.shape[0] == 0:
        if frame.shape[1] == 0:
            raise DataError(f"{file}: file is empty")
        _check_columns(
            str(file), [str(c) for c in frame.columns], {"text": text_column, "label": label_column}
        )
        raise DataError(f"{file}: no rows")
    columns = {str(name): frame[name].tolist() for name in frame.columns}
    return build_split(
        columns,
        source=str(file),
        id_prefix=file.stem,
        text_column=text_column,
        label_column=label_column,
        text_pair_column=text_pair_column,
        id_column=id_column,
    )


# --------------------------------------------------------------------------- Hugging Face datasets


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json")
    )


def open_hf_dataset(name_or_path: str) -> dict[str, Any]:
    """All splits of a hub dataset or a ``save_to_disk`` folder, as ``{split name: datasets.Dataset}``.

    A hub name with one slash that is not a repository (e.g. ``glue/sst2``) is retried as
    dataset ``glue`` with configuration ``sst2``.
    """
    import datasets

    path = Path(name_or_path).expanduser()
    try:
        if path.exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            try:
                loaded = datasets.load_dataset(name_or_path)
            except Exception:
                parts = name_or_path.split("/")
                if len(parts) != 2:
                    raise
                loaded = datasets.load_dataset(parts[0], parts[1])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot load Hugging Face dataset {name_or_path!r}: {_one_line(exc)}") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded.items())
    raise DataError(f"{name_or_path!r} is not a Dataset or DatasetDict (got {type(loaded).__name__})")


def _label_names(dataset: Any, label_column: str) -> list[str] | None:
    import datasets

    feature = dataset.features.get(label_column)
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def hf_is_unlabelled(dataset: Any, label_column: str) -> bool:
    """True when every label is missing (hidden test sets store -1 or None)."""
    if label_column not in dataset.column_names or len(dataset) == 0:
        return False
    values = list(dataset[label_column])
    names = _label_names(dataset, label_column)
    return all(_is_missing(v) or (names is not None and isinstance(v, int) and v < 0) for v in values)


def hf_to_split(
    dataset: Any,
    *,
    source: str,
    id_prefix: str,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    id_column: str | None = None,
) -> TextSplit:
    """Convert one ``datasets.Dataset``; ClassLabel ints become their names."""
    available = list(dataset.column_names)
    _check_columns(
        source,
        available,
        {"text": text_column, "label": label_column, "text pair": text_pair_column, "id": id_column},
    )
    wanted = [c for c in (text_column, label_column, text_pair_column, id_column) if c is not None]
    columns = {c: list(dataset[c]) for c in dict.fromkeys(wanted)}
    names = _label_names(dataset, label_column)
    if names is not None:
        mapped: list[Any] = []
        for value in columns[label_column]:
            if _is_missing(value) or not 0 <= int(value) < len(names):
                mapped.append(None)  # reported as a missing label with its row below
            else:
                mapped.append(names[int(value)])
        columns[label_column] = mapped
    return build_split(
        columns,
        source=source,
        id_prefix=id_prefix,
        text_column=text_column,
        label_column=label_column,
        text_pair_column=text_pair_column,
        id_column=id_column,
    )


def hf_id_prefix(name_or_path: str) -> str:
    """Short, readable id prefix for a hub name or a local folder."""
    path = Path(name_or_path)
    base = path.name if path.exists() else name_or_path.replace("/", "-")
    return base or "hf"


def load_hf_dataset(
    name_or_path: str,
    split: str,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    id_column: str | None = None,
) -> TextSplit:
    """One split of a hub dataset (``datasets.load_dataset``) or a saved folder (``load_from_disk``)."""
    splits = open_hf_dataset(name_or_path)
    if split not in splits:
        raise DataError(
            f"Hugging Face dataset {name_or_path!r} has no split {split!r}; available: {', '.join(splits)}"
        )
    return hf_to_split(
        splits[split],
        source=f"{name_or_path}[{split}]",
        id_prefix=f"{hf_id_prefix(name_or_path)}-{split}",
        text_column=text_column,
        label_column=label_column,
        text_pair_column=text_pair_column,
        id_column=id_column,
    )
