"""Exit-rule knobs written as text (CLI, config files): parsed and range-checked without importing torch.

The command line validates ``--rule``/``--knob`` before it loads a model, so a typo fails in well under a
second; the rules themselves (``consistentee.exits.rules``) check the same ranges again when they are built.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["PREDICT_RULES", "RULE_NAMES", "check_knob_for_depth", "check_knob_range", "parse_knob"]

#: Every exit rule of ``consistentee.exits.rules.RULES`` (a test keeps the two in step).
RULE_NAMES = ("confidence", "consistentee", "entropy", "learned", "oracle", "patience", "pcee", "static")
#: The rules that need no gold labels: what ``predict`` and ``serve`` can run.
PREDICT_RULES = tuple(name for name in RULE_NAMES if name != "oracle")

_EXPECTED = {"pcee": "'t,S' (an integer and a real number)", "patience": "an integer", "static": "an integer"}


def _finite(value: float, rule: str, text: Any) -> float:
    if not math.isfinite(value):
        raise ValueError(f"rule {rule!r}: knob {text!r} must be a finite number")
    return value


_UNIT = {"confidence": "tau", "learned": "tau", "consistentee": "threshold"}


def check_knob_range(rule: str, knob: Any) -> None:
    """The ranges ``consistentee.exits.rules`` enforces, checked without importing it (same messages)."""
    if knob is None:
        return
    if rule in _UNIT and isinstance(knob, int | float) and not 0.0 <= knob <= 1.0:
        raise ValueError(f"rule {rule!r}: threshold {_UNIT[rule]!r} must lie in [0, 1], got {knob!r}")
    if rule == "entropy" and isinstance(knob, int | float) and knob < 0:
        raise ValueError(f"rule 'entropy': 'S' must be >= 0, got {knob!r}")
    if rule in ("patience", "static") and isinstance(knob, int) and knob < 1:
        raise ValueError(f"rule {rule!r}: {'t' if rule == 'patience' else 'k'!r} must be an integer >= 1, got {knob!r}")
    if rule == "pcee" and isinstance(knob, tuple) and len(knob) == 2:
        if knob[0] < 1:
            raise ValueError(f"rule 'pcee': 't' must be an integer >= 1, got {knob[0]!r}")
        if knob[1] < 0:
            raise ValueError(f"rule 'pcee': 'S' must be >= 0, got {knob[1]!r}")


def parse_knob(rule: str, text: Any) -> Any:
    """A knob written as text -> the value ``make_rule(rule, ...)`` expects.

    ``patience``/``static``: an integer; ``pcee``: ``"t,S"``; ``oracle``: none; others: a real number.
    ``None`` or ``""`` means the rule's default knob. NaN and infinities are refused.
    """
    if rule not in RULE_NAMES:
        raise ValueError(f"unknown exit rule {rule!r}; known rules: {', '.join(RULE_NAMES)}")
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        if isinstance(text, float):
            _finite(text, rule, text)
        return text
    parsed = _parse_text(rule, text)
    check_knob_range(rule, parsed)
    return parsed


def _parse_text(rule: str, text: str) -> Any:
    value = text.strip()
    if rule == "oracle":
        raise ValueError(f"rule 'oracle' has no knob, got {text!r}")
    expected = _EXPECTED.get(rule, "a real number")
    try:
        if rule == "pcee":
            parts = [p for p in value.replace(";", ",").split(",") if p.strip()]
            if len(parts) != 2:
                raise ValueError
            return int(parts[0]), _finite(float(parts[1]), rule, text)
        if rule in ("patience", "static"):
            number = float(value)
            if not math.isfinite(number) or not number.is_integer():
                raise ValueError
            return int(number)
        return _finite(float(value), rule, text)
    except ValueError as exc:
        if "finite" in str(exc):
            raise
        raise ValueError(f"rule {rule!r}: knob {text!r} is not {expected}") from None


def check_knob_for_depth(rule: str, knob: Any, num_layers: int) -> None:
    """Refuse a layer-count knob beyond the model's depth (``--rule static --knob 99`` on a 6-layer model):
    such a knob silently means "never exit early"."""
    if rule in ("static", "patience"):
        layers = knob
    elif rule == "pcee" and isinstance(knob, tuple | list) and knob:
        layers = knob[0]
    else:
        return
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > num_layers:
        what = "exit layer" if rule == "static" else "patience"
        raise ValueError(f"rule {rule!r}: knob {layers} ({what}) is beyond the model's {num_layers} layers; "
                         f"use 1..{num_layers}")
