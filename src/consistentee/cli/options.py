"""Command-line options generated from configuration dataclasses.

A dataclass field is the single place where an option, its type, its default and its help live; the
CLI and the Python API can't drift apart. The field's metadata steers its option:

- ``help`` (a field without it gets no option), ``choices``, ``metavar``;
- ``advanced``: an ablation switch or optimiser internal. Its option works, on the command line and from
  ``--config``, but only ``--help-all`` lists it, so that ``--help`` shows the knobs users need;
- ``shorthand``: the plain option (``seed``) whose value the field takes when its own option is not given.

A field name that two configurations of a verb family share (``seed`` of stage 1 and of the policy stages) gets
one namespaced option per configuration, ``--stage1.seed`` and ``--policy.seed``: no option silently sets two
configurations. The plain spelling is a documented shorthand for the names in :data:`SHORTHANDS` (``--seed``
sets every training seed) and otherwise a hidden alias, kept for one release, that sets all of them and says it
is deprecated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from consistentee.utils.runtime import DEVICE_CHOICES

T = TypeVar("T")

#: Field metadata key of the options that only ``--help-all`` lists.
ADVANCED = "advanced"
#: Plain spellings of a shared field that set it in every configuration of the command, on purpose (their help
#: says so). Any other shared field's plain spelling is a deprecated alias.
SHORTHANDS = ("seed",)


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


class Default:
    """The default of an option that a shorthand can set: ``--help`` shows the value, and a value the user gave
    (on the command line or in a config file) is told apart from it and wins over the shorthand."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return str(self.value)


def unwrap(value: Any) -> Any:
    """An option's value, with a :class:`Default` replaced by the value it stands for."""
    return value.value if isinstance(value, Default) else value


@dataclasses.dataclass(frozen=True)
class Section:
    """One configuration dataclass of a verb: its namespace (``stage1``: ``--stage1.seed`` for a shared field,
    ``[stage1]`` in a config file), the title of its group in ``--help``, and the fields left out."""

    name: str
    cls: type
    title: str
    skip: tuple[str, ...] = ()

    def fields(self) -> list[dataclasses.Field]:
        return [f for f in documented_fields(self.cls) if f.name not in self.skip]

    def from_args(self, args: argparse.Namespace, **overrides: Any) -> Any:
        """The configuration that the parsed ``args`` describe."""
        return dataclass_from_args(self.cls, args, namespace=self.name, **overrides)


def documented_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are options: set by ``__init__`` and with a help text."""
    return [f for f in dataclasses.fields(cls) if f.init and "help" in f.metadata]


def shared_names(classes: Iterable[type]) -> set[str]:
    """Option names that more than one of ``classes`` has: each gets a namespaced option."""
    counts: dict[str, int] = {}
    for cls in dict.fromkeys(classes):
        for f in documented_fields(cls):
            counts[f.name] = counts.get(f.name, 0) + 1
    return {name for name, count in counts.items() if count > 1}


def hide(action: argparse.Action) -> argparse.Action:
    """Leave ``action`` out of ``--help`` (``--help-all`` shows it); it still parses."""
    action.full_help = action.help  # type: ignore[attr-defined]
    action.help = argparse.SUPPRESS
    return action


def _add_field(group, f: dataclasses.Field, hint: Any, namespace: str | None) -> argparse.Action:
    kind, optional = _base_type(hint)
    parse: Any = finite_float if kind is float else kind
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    name = f.name.replace("_", "-")
    flag, dest = (f"--{namespace}.{name}", f"{namespace}.{f.name}") if namespace else (f"--{name}", f.name)
    if namespace or "shorthand" in f.metadata:
        default = Default(default)
    extra: dict[str, Any] = {}
    if "choices" in f.metadata:
        extra["choices"] = f.metadata["choices"]
    if kind is bool:
        action = group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                    help=f.metadata["help"])
    else:
        action = group.add_argument(flag, dest=dest, type=_none_or(parse) if optional else parse, default=default,
                                    metavar=f.metadata.get("metavar", kind.__name__.upper()),
                                    help=f.metadata["help"], **extra)
    return hide(action) if f.metadata.get(ADVANCED) else action


def add_dataclass_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *, skip: tuple[str, ...] = (),
    namespace: str | None = None, shared: set[str] | frozenset[str] = frozenset(),
) -> list[argparse.Action]:
    """One option per documented field of ``cls``: ``--name``, or ``--NAMESPACE.name`` for the ``shared`` names.
    A flag that already exists is an error (argparse's): two configurations never share an option silently."""
    hints = typing.get_type_hints(cls)
    return [_add_field(parser, f, hints[f.name], namespace if f.name in shared else None)
            for f in documented_fields(cls) if f.name not in skip]


def add_sections(parser: argparse.ArgumentParser, sections: Sequence[Section], *,
                 family: Iterable[type] = ()) -> dict[str, argparse._ArgumentGroup]:
    """The options of every section, each section in its own ``--help`` group (returned by section name).

    A field name that two of the sections, or a section and a class of ``family`` (the configurations of the
    verb's siblings, so that every verb spells an option the same way), share is namespaced. Its plain spelling
    becomes the shorthand of :data:`SHORTHANDS` or a deprecated alias that sets every namespaced copy."""
    shared = shared_names([*(s.cls for s in sections), *family])
    groups: dict[str, argparse._ArgumentGroup] = {}
    copies: dict[str, list[argparse.Action]] = {}
    followers: dict[str, list[argparse.Action]] = {}
    for section in sections:
        groups[section.name] = group = parser.add_argument_group(section.title)
        actions = add_dataclass_options(group, section.cls, skip=section.skip, namespace=section.name, shared=shared)
        for action, f in zip(actions, section.fields(), strict=True):
            action.section = section.name  # type: ignore[attr-defined]  # where a config file may set it
            if f.name in shared:
                copies.setdefault(f.name, []).append(action)
            elif "shorthand" in f.metadata:
                followers.setdefault(f.metadata["shorthand"], []).append(action)
    for name, actions in copies.items():
        flags = " and ".join(a.option_strings[0] for a in actions + followers.get(name, []))
        like = {"type": actions[0].type, "choices": actions[0].choices, "metavar": actions[0].metavar}
        if name in SHORTHANDS:
            apart = [f for f in parser._option_string_actions if f.startswith("--") and f.endswith(f"-{name}")
                     and f not in flags.split(" and ")]  # e.g. --data-seed: the dev/test split stays put
            plain = parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **like,
                                        help=f"shorthand that sets {flags} at once (each of them, when given too, "
                                             f"wins){'; not ' + ', '.join(apart) if apart else ''}%(default).0s")
        else:
            plain = deprecated_alias(parser, "--" + name.replace("_", "-"), flags, dest=name, **like)
        plain.fans_out = True  # type: ignore[attr-defined]  # sets several sections: not inside one in a config
    return groups


def warn_deprecated(old: str, new: str) -> None:
    print(f"consistentee: warning: {old} is deprecated and goes away in the next release; use {new}",
          file=sys.stderr)


class _Deprecated(argparse.Action):
    """An old spelling, accepted for one release with a one-line warning that names what replaces it."""

    def __init__(self, option_strings, dest, *, replacement: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warn_deprecated(option_string or self.option_strings[0], self.replacement)
        setattr(namespace, self.dest, values)


def deprecated_alias(parser, old: str, replacement: str, *, dest: str, **kwargs: Any) -> argparse.Action:
    """Accept ``old`` (not shown in any help) for one release; its value goes to ``dest``. ``replacement``: the
    flag(s) to use instead, for the warning."""
    return parser.add_argument(old, dest=dest, action=_Deprecated, replacement=replacement,
                               default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for action in parser._actions:
            if hasattr(action, "full_help"):
                action.help = action.full_help
        parser.print_help()
        parser.exit()


def help_all_option(parser: argparse.ArgumentParser) -> None:
    """``--help-all``: the help with the advanced options too."""
    parser.add_argument("--help-all", action=_HelpAll,
                        help="show every option, the advanced ones too (ablation switches, optimiser and timing "
                             "internals), and exit; an option that --help leaves out works all the same, on the "
                             "command line and in --config")


def dataclass_from_args(cls: type[T], args: argparse.Namespace, *, namespace: str | None = None,
                        **overrides: Any) -> T:
    """``cls`` from parsed options: ``--NAMESPACE.name`` for a namespaced field, else ``--name``. An option left
    at its default takes the value of its shorthand (or deprecated plain alias) when that was given."""
    given = vars(args)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        key = f"{namespace}.{f.name}" if namespace and f"{namespace}.{f.name}" in given else f.name
        if key not in given:
            continue
        value = given[key]
        if isinstance(value, Default):
            plain = f.metadata.get("shorthand") or (f.name if key != f.name else None)
            value = given.get(plain) if plain else None
            if value is None or isinstance(value, Default):
                continue  # the dataclass's own default, which the option showed
        values[f.name] = value
    values.update(overrides)
    return cls(**values)  # type: ignore[call-arg]


# -- shared by every verb (the verb modules import these; ``main`` imports the verbs lazily, never the reverse) --

class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                        help="where to run: auto picks CUDA when available, else the CPU")
    # "%(default).0s" prints nothing and keeps the formatter from adding a confusing "(default: True)".
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="hide the progress bars (shown by default)%(default).0s")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML, TOML or JSON file with option values, the advanced ones too: flat keys named "
                             "like the options with underscores, or sections named like the option groups "
                             "([stage1] seed = 1 is --stage1.seed); flags given on the command line win")



def section_verb(verbs, name: str, help_text: str, description: str | None, sections: Sequence[Section], *,
                 run_dir_help: str, family: Iterable[type] = ()):
    """(parser, option groups by section name) of a verb with ``--help-all``, ``--run-dir``, ``--config`` and
    the options of ``sections`` (see :func:`add_sections` for ``family``); the caller adds its own options,
    then :func:`common_options`."""
    parser = verbs.add_parser(name, formatter_class=_Formatter, help=help_text, description=description)
    help_all_option(parser)
    parser.add_argument("--run-dir", required=True, help=run_dir_help)
    _config_option(parser)
    return parser, add_sections(parser, sections, family=family)

def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an error message (library messages can span many lines)."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    if isinstance(exc, OSError) and exc.strerror and not exc.filename:
        message = exc.strerror
    return next((line.strip() for line in str(message).splitlines() if line.strip()), type(exc).__name__)


# -- config files (``--config FILE``): YAML, TOML or JSON, each value checked like its option's text --------------


def _yaml_loader():
    """PyYAML's safe loader, reading ``1e-4`` as a number (YAML 1.1 wants ``1.0e-4``) and only true/false as
    booleans (``mixed_precision: no`` stays the string "no")."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    bool_tag, float_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
    Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
                                      for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    Loader.add_implicit_resolver(float_tag, re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))
    return Loader, yaml.YAMLError


def load_config_file(path: Path) -> dict:
    """The option values of a config file: ``.yaml``/``.yml``, ``.toml``, else JSON. Errors name the file, in one
    line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} cannot be read ({exc})") from None
    suffix = path.suffix.lower()
    kind = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml"}.get(suffix, "json")
    try:
        if kind == "toml":
            import tomllib

            data = tomllib.loads(text)
        elif kind == "yaml":
            loader, yaml_error = _yaml_loader()
            try:
                data = loader(text).get_single_data()
            except yaml_error as exc:
                raise ValueError(" ".join(str(exc).split())) from None
        else:
            data = json.loads(text)
    except ValueError as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors too
        raise ValueError(f"config file {path} is not valid {kind}: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a table/object of option values")
    return data


def _type_name(action: argparse.Action) -> str:
    return getattr(action.type, "__name__", "text") if action.type is not None else "text"


def config_value(action: argparse.Action, key: str, value: Any, path: Path) -> Any:
    """``value`` from a config file, checked and converted like the option ``action`` would convert its text.

    argparse applies ``type`` only to string defaults, so without this ``epochs = 1.5`` would slip through to
    the training code and fail there with a TypeError that names no file."""
    where = f"config file {path}: {key} = {json.dumps(value) if not isinstance(value, str) else repr(value)}"
    if isinstance(action, argparse.BooleanOptionalAction) or isinstance(
            action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false")
        return value
    if value is None:
        if unwrap(action.default) is None:
            return None
        raise ValueError(f"{where}: this option cannot be null")
    kind = _type_name(action)
    if isinstance(value, bool) or isinstance(value, dict):
        raise ValueError(f"{where} must be {'a number' if kind in ('int', 'float') else 'a string'}")
    if isinstance(value, list):
        if key.rsplit(".", 1)[-1] != "betas" or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                                        for v in value):
            raise ValueError(f"{where}: a list is not a valid value here")
        text = ",".join(str(v) for v in value)
    elif kind in ("int", "float"):
        if isinstance(value, str):
            raise ValueError(f"{where} must be a number, not a string")
        if kind == "int" and isinstance(value, float):
            raise ValueError(f"{where} must be an integer")
        text = str(value)
    else:
        if kind in ("text", "str") and not isinstance(value, str):
            raise ValueError(f"{where} must be a string")
        text = str(value)
    try:
        converted = action.type(text) if action.type is not None else text
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        detail = str(exc) if isinstance(exc, argparse.ArgumentTypeError) else f"not a valid {kind}"
        raise ValueError(f"{where}: {detail}") from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"{where}: choose one of {', '.join(map(str, action.choices))}")
    return converted


def _config_action(actions: dict[str, argparse.Action], section: str | None, key: str) -> argparse.Action | None:
    """The option that ``key`` (in ``[section]``, or flat when None) of a config file sets; None when none does.
    A key in a section named like an option group must be one of that group's options (or one of the verb's own,
    like ``betas``): ``[policy] epochs`` is refused instead of setting stage 1's epochs."""
    if section is None:
        return actions.get(key)
    action = actions.get(f"{section}.{key}") or actions.get(key)
    known = {getattr(a, "section", None) for a in actions.values()}
    if action is None or getattr(action, "fans_out", False):
        return None
    if section in known and getattr(action, "section", section) != section:
        return None
    return action


def config_defaults(verb_parser: argparse.ArgumentParser, data: dict, path: Path) -> dict[str, Any]:
    """The defaults (option dest -> value) that a config file's ``data`` gives the options of ``verb_parser``."""
    actions = {a.dest: a for a in verb_parser._actions if a.dest != argparse.SUPPRESS}
    entries: list[tuple[str | None, str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            entries += [(str(key), str(sub).replace("-", "_"), v) for sub, v in value.items()]
        elif "." in str(key):  # "policy.seed": the key seed of section policy
            section, sub = str(key).split(".", 1)
            entries.append((section, sub.replace("-", "_"), value))
        else:
            entries.append((None, str(key).replace("-", "_"), value))
    found = {(section, key): _config_action(actions, section, key) for section, key, _ in entries}
    unknown = [key if section is None else f"{section}.{key}" for (section, key), a in found.items() if a is None]
    if unknown:
        raise ValueError(f"config file {path} has unknown option(s): {', '.join(unknown)}")
    defaults: dict[str, Any] = {}
    for section, key, value in entries:
        action = found[section, key]
        name = key if section is None else f"{section}.{key}"
        if isinstance(action, _Deprecated):
            warn_deprecated(f"{name} (in {path})", action.replacement)
        defaults[action.dest] = config_value(action, name, value, path)
    return defaults


def _verb_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for word in argv:
                if word in action.choices:
                    return action.choices[word]
    raise ValueError("--config needs a verb (e.g. `consistentee train --config run.yaml`)")


def apply_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Values from ``--config FILE`` in ``argv`` become the defaults of the chosen verb's options (type-checked,
    errors naming the file): flags on the command line still win."""
    if "--config" not in argv:
        return
    index = list(argv).index("--config")
    if index + 1 >= len(argv):
        raise ValueError("--config needs a file name")
    path = Path(argv[index + 1])
    verb_parser = _verb_parser(parser, argv)
    verb_parser.set_defaults(**config_defaults(verb_parser, load_config_file(path), path))
