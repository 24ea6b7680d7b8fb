"""Registration with the transformers Auto classes, done lazily so that ``import consistentee`` stays cheap.

``import consistentee`` calls :func:`install`: if transformers is already imported the classes are registered at
once; otherwise a one-shot import hook registers them right after transformers is first imported. Either way,
after ``import consistentee``::

    AutoConfig.from_pretrained(folder)                          # -> EarlyExitConfig
    AutoModelForSequenceClassification.from_pretrained(folder)  # -> EarlyExitForSequenceClassification
    pipeline("text-classification", model=folder)

work without ``trust_remote_code``. The hook registers the config and a stand-in for the model class that loads
``consistentee.model.modeling`` (torch and the model families) only when it is used; importing that module
replaces the stand-in with the real class.
"""

from __future__ import annotations

import sys
import warnings

from consistentee.model.constants import ARCHITECTURE, MODEL_TYPE

__all__ = ["install", "register_auto_classes"]


def _real_model_class():
    from consistentee.model.modeling import EarlyExitForSequenceClassification

    return EarlyExitForSequenceClassification


class _LazyModelType(type):
    """Class attributes of the stand-in (``from_pretrained``, ``from_config``, ...) come from the real class."""

    def __getattr__(cls, name: str) -> object:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(_real_model_class(), name)

    def __call__(cls, *args: object, **kwargs: object) -> object:
        return _real_model_class()(*args, **kwargs)


def _stand_in(config_class: type) -> type:
    return _LazyModelType(ARCHITECTURE, (), {"config_class": config_class, "__module__": __name__,
                                             "__doc__": "Loads consistentee's model class on first use."})


def register_auto_classes(model_class: type | None = None) -> None:
    """Register the config and ``model_class`` (default: a lazy stand-in) with the Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from consistentee.model.configuration import EarlyExitConfig

    AutoConfig.register(MODEL_TYPE, EarlyExitConfig, exist_ok=True)
    mapping = AutoModelForSequenceClassification._model_mapping
    if model_class is None:
        if mapping._extra_content.get(EarlyExitConfig) is not None:
            return  # the real class (or a stand-in) is already there
        model_class = _stand_in(EarlyExitConfig)
    AutoModelForSequenceClassification.register(EarlyExitConfig, model_class, exist_ok=True)


def _register_quietly() -> None:
    config_module = sys.modules.get("consistentee.model.configuration")
    if config_module is not None and getattr(config_module.__spec__, "_initializing", False):
        return  # transformers was imported by that module, which registers itself once it is complete
    try:
        register_auto_classes()
    except Exception as exc:  # never break the user's `import transformers`
        warnings.warn(f"consistentee could not register its model with the transformers Auto classes: "
                      f"{type(exc).__name__}: {exc}", stacklevel=2)


class _LoaderWrapper:
    """Runs the real loader of ``transformers``, then registers; restores the real loader on the module."""

    def __init__(self, loader: object):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self.loader.exec_module(module)
        finally:
            module.__loader__ = self.loader
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader
        _register_quietly()


class _TransformersImportHook:
    """One-shot finder: wraps the loader of ``transformers`` so that registration follows its import.

    (Plain classes, not ``importlib.abc`` subclasses: that module alone costs ~10 ms at import.)"""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        _remove_hook()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _LoaderWrapper(spec.loader)
                return spec
        return None


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TransformersImportHook)]


def install() -> None:
    """Register now if transformers is loaded, else once it is (cheap: nothing heavy is imported here)."""
    if "transformers" in sys.modules:
        _register_quietly()
    elif not any(isinstance(f, _TransformersImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TransformersImportHook())
