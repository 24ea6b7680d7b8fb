"""Layer-wise encoders (backbones) and the multi-exit classifier built on them.

Names are imported on first use (PEP 562) so that ``import consistentee.model.constants`` (and the Auto-class
registration hook) cost nothing; any name from this package loads the model families first.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "POOLING_METHODS": "consistentee.model.constants",
    "ModelFormatError": "consistentee.model.constants",
    "ModelFormatWarning": "consistentee.model.constants",
    "EncoderState": "consistentee.model.backbone",
    "LayerwiseBackbone": "consistentee.model.backbone",
    "register_backbone": "consistentee.model.backbone",
    "supported_model_types": "consistentee.model.backbone",
    "wrap_backbone": "consistentee.model.backbone",
    "EarlyExitConfig": "consistentee.model.configuration",
    "backbone_from_config": "consistentee.model.families",
    "load_backbone": "consistentee.model.families",
    "EarlyExitForSequenceClassification": "consistentee.model.modeling",
    "MultiExitOutput": "consistentee.model.modeling",
    "register_auto_classes": "consistentee.model.auto",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _EXPORTS[name] not in ("consistentee.model.constants", "consistentee.model.auto"):
        importlib.import_module("consistentee.model.families")  # registers the families
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
