"""Layer-wise encoders (backbones) and their loading."""

from consistentee.model import families  # noqa: F401  (registers the families)
from consistentee.model.backbone import (
    POOLING_METHODS,
    EncoderState,
    LayerwiseBackbone,
    register_backbone,
    supported_model_types,
    wrap_backbone,
)
from consistentee.model.families import backbone_from_config, load_backbone

__all__ = [
    "POOLING_METHODS",
    "EncoderState",
    "LayerwiseBackbone",
    "backbone_from_config",
    "load_backbone",
    "register_backbone",
    "supported_model_types",
    "wrap_backbone",
]
