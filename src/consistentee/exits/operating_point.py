"""The operating point stored in a model folder: which exit rule and knob to run when the user names none.

``consistentee calibrate`` writes ``operating_point.json`` next to ``config.json``; the predictor, ``predict``,
``serve`` and the Hugging Face model classes read it when no rule or knob is given, and say so. The file also
records how the point was chosen (budget, delta, loss, calibration size), so a model folder documents the
guarantee that comes with it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from consistentee.exits.rules import RULES, make_rule, rule_names
from consistentee.utils.io import read_json, write_json

__all__ = ["FILE_NAME", "FORMAT_VERSION", "OperatingPoint", "load_operating_point", "save_operating_point"]

FILE_NAME = "operating_point.json"
FORMAT_VERSION = 1


@dataclass
class OperatingPoint:
    """An exit rule with its knob, and the record of how it was chosen."""

    #: exit rule name (a key of ``consistentee.exits.rules.RULES``).
    rule: str
    #: the knob in JSON form: a number, ``[t, S]`` for pcee, the policy threshold for consistentee.
    knob: Any
    #: how the point was chosen: ``{"method", "max_loss_points", "delta", "loss", "calibration_examples", ...}``.
    calibration: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.rule not in RULES or "labels" in RULES[self.rule].needs:
            known = ", ".join(sorted(rule_names(without={"labels"})))
            raise ValueError(f"operating point: unknown exit rule {self.rule!r}; known rules: {known}")
        make_rule(self.rule, self.rule_knob())  # range-checks the knob

    def rule_knob(self) -> Any:
        """The knob as ``make_rule`` takes it."""
        return RULES[self.rule].knob_from_json(self.knob)

    def describe(self) -> str:
        """One line for start-up messages."""
        c = self.calibration
        text = f"rule {self.rule} with knob {self.knob}"
        if c.get("max_loss_points") is not None:
            text += (f", calibrated to lose at most {c['max_loss_points']:g} accuracy point(s) against full depth "
                     f"({c.get('loss', 'accuracy_drop')}) with probability >= {1 - float(c.get('delta', 0)):.2f}, "
                     f"on {c.get('calibration_examples', '?')} {c.get('dataset', '')} {c.get('split', '')} examples")
            text = " ".join(text.split())
        return text

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def save_operating_point(model_dir: str | os.PathLike, point: OperatingPoint) -> Path:
    """Write ``operating_point.json`` into ``model_dir`` (atomically) and return its path."""
    path = Path(model_dir) / FILE_NAME
    knob = point.knob
    if isinstance(knob, float) and not math.isfinite(knob):
        raise ValueError(f"operating point knob must be finite, got {knob!r}")
    write_json(path, point.to_json())
    return path


def load_operating_point(model_dir: str | os.PathLike) -> OperatingPoint | None:
    """The operating point stored in ``model_dir``, or ``None`` when there is none.

    A file from a newer format, or one that does not name a valid rule and knob, is an error naming the file.
    """
    path = Path(model_dir) / FILE_NAME
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "rule" not in data or "knob" not in data:
        raise ValueError(f"{path} must be a JSON object with 'rule' and 'knob'")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this consistentee reads up to {FORMAT_VERSION}: "
                         "upgrade consistentee")
    calibration = data.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise ValueError(f"{path}: 'calibration' must be an object")
    try:
        return OperatingPoint(rule=data["rule"], knob=data["knob"], calibration=calibration, format_version=version)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
