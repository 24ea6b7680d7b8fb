"""Command-line options generated from configuration dataclasses.

A dataclass field is the single place where an option, its type, its default and its help live; the
CLI and the Python API can't drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the plain type, whether None is allowed) of ``int``, ``int | None``, ``Optional[int]``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def finite_float(text: str) -> float:
    """A float option that refuses NaN and infinities: ``--learning-rate nan`` would train and save a NaN model."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


finite_float.__name__ = "float"


def _none_or(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_dataclass_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *, skip: tuple[str, ...] = ()
) -> None:
    """One option per documented field. A field whose option already exists (``--seed`` of two stages) shares
    it: both configurations then get the same value, so their defaults must agree."""
    hints = typing.get_type_hints(cls)
    existing = parser._option_string_actions  # shared between a parser and its argument groups
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init or "help" not in f.metadata:
            continue
        kind, optional = _base_type(hints[f.name])
        parse: Any = finite_float if kind is float else kind
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        if flag in existing:
            if existing[flag].default != default:
                raise ValueError(f"option {flag} is shared by two configurations with different defaults")
            continue
        extra: dict[str, Any] = {}
        if "choices" in f.metadata:
            extra["choices"] = f.metadata["choices"]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=f.name, type=_none_or(parse) if optional else parse, default=default,
                                metavar=f.metadata.get("metavar", kind.__name__.upper()), help=f.metadata["help"],
                                **extra)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)
