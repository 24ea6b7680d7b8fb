"""The ordered list of class names shared by training, evaluation and saved models.

Class ids are positions in this list, so the order must not depend on the order rows happened to
arrive in: it is sorted (numerically when every name is a number, else lexicographically) and saved
next to a model as ``labels.json`` so predictions decode to the same names later.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

from consistentee.data.errors import DataError, UnknownLabelError

LABELS_FILE = "labels.json"

_INTEGRAL_FLOAT = re.compile(r"^([+-]?\d+)\.0*$")


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, Real) and not isinstance(value, Integral):
        return math.isnan(float(value))
    try:  # pandas.NA / NaT without importing pandas here
        return bool(value != value)
    except (TypeError, ValueError):
        return False


def normalize_label(value: object) -> str:
    """One canonical string per label so that 1, "1", 1.0 and "1.0" are the same class "1".

    Pandas turns an int column into floats as soon as one cell is missing, and JSON/CSV writers
    differ in how they spell numbers; normalising here keeps the label set stable across formats.
    Raises DataError for a missing (None/NaN) or empty label.
    """
    if isinstance(value, list | tuple | dict | set | frozenset | bytes | bytearray):
        raise DataError(f"label of the wrong type ({type(value).__name__}: {_short(value)}); a label must be a "
                        "string or an integer")
    if _is_missing(value):
        raise DataError("missing label (None/NaN)")
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, Real):
        number = float(value)
        if math.isinf(number):
            raise DataError(f"invalid label {value!r}")
        if not number.is_integer():
            raise DataError(f"label of the wrong type (the non-integer number {number!r}); a label must be a string "
                            "or an integer (consistentee classifies, it does not regress)")
        return str(int(number))
    text = str(value).strip()
    if not text:
        raise DataError("empty label")
    match = _INTEGRAL_FLOAT.match(text)
    if match:
        return str(int(match.group(1)))
    return text


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_number(name: str) -> float | None:
    try:
        number = float(name)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _sorted_names(names: Iterable[str]) -> list[str]:
    unique = set(names)
    numbers = {name: _as_number(name) for name in unique}
    if unique and all(number is not None for number in numbers.values()):
        return sorted(unique, key=lambda name: (numbers[name], name))
    return sorted(unique)


@dataclass(frozen=True)
class LabelList:
    """Ordered, unique label names; the index of a name is its class id."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        names = tuple(str(name) for name in self.names)
        object.__setattr__(self, "names", names)
        if not names:
            raise DataError("a label list needs at least one label")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise DataError(f"duplicate label names: {', '.join(duplicates)}")
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(names)})

    @classmethod
    def from_labels(cls, values: Iterable[object]) -> LabelList:
        """Build the list from training labels: unique values, sorted so the ids are reproducible."""
        names = [normalize_label(value) for value in values]
        if not names:
            raise DataError("cannot build a label list from no labels")
        return cls(tuple(_sorted_names(names)))

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, value: object) -> bool:
        try:
            return normalize_label(value) in self._index  # type: ignore[attr-defined]
        except DataError:
            return False

    def index(self, value: object) -> int:
        """Class id of one label."""
        return self.encode([value])[0]

    def encode(self, values: Iterable[object]) -> list[int]:
        """Label values -> class ids; unseen labels raise UnknownLabelError naming them all."""
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        names = [normalize_label(value) for value in values]
        unknown = list(dict.fromkeys(name for name in names if name not in index))
        if unknown:
            shown = ", ".join(repr(name) for name in unknown[:10])
            more = f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""
            raise UnknownLabelError(f"unknown label(s) {shown}{more}; known labels: {', '.join(self.names)}")
        return [index[name] for name in names]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Class ids -> label names."""
        out = []
        for class_id in ids:
            i = int(class_id)
            if not 0 <= i < len(self.names):
                raise DataError(f"class id {i} out of range for {len(self.names)} labels")
            out.append(self.names[i])
        return out

    def to_json(self) -> dict[str, list[str]]:
        return {"labels": list(self.names)}

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``labels.json`` atomically (temp file + rename) so a crash never leaves half a file."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / LABELS_FILE
        fd, tmp = tempfile.mkstemp(prefix=".labels.", suffix=".json.tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self.to_json(), handle, ensure_ascii=False, indent=2)
                handle.write("\n")
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> LabelList:
        """Read the ``labels.json`` written by :meth:`save`."""
        path = Path(directory) / LABELS_FILE
        if not path.is_file():
            raise DataError(f"{path}: label file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not a valid labels.json ({exc})") from None
        names: Sequence[object] | None = data.get("labels") if isinstance(data, dict) else data
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise DataError(f'{path}: expected {{"labels": [names...]}}')
        return cls(tuple(names))
