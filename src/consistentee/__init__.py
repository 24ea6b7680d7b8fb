"""consistentee: early-exit inference for Hugging Face encoders (ConsistentEE and its peers in one harness).

Importing the package is cheap (the CLI starts from it): it imports neither torch nor transformers. It
registers the model with the transformers Auto classes as soon as transformers is imported (see
:mod:`consistentee.model.auto`), so ``AutoModelForSequenceClassification.from_pretrained(folder)`` and
``pipeline("text-classification", model=folder)`` work after ``import consistentee``.
"""

from __future__ import annotations

from consistentee.model import auto as _auto

__all__ = ["__version__"]

_auto.install()


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("consistentee")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> object:
    # ``__version__`` reads the package metadata on first use only (it costs a few ms at import).
    if name == "__version__":
        value = _package_version()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
