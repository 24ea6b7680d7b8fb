"""Layer-wise encoders (backbones) and the multi-exit classifier built on them."""

from consistentee.model import families  # noqa: F401  (registers the families)
from consistentee.model.backbone import (
    POOLING_METHODS,
    EncoderState,
    LayerwiseBackbone,
    register_backbone,
    supported_model_types,
    wrap_backbone,
)
from consistentee.model.configuration import EarlyExitConfig, ModelFormatError
from consistentee.model.families import backbone_from_config, load_backbone
from consistentee.model.modeling import EarlyExitForSequenceClassification, MultiExitOutput

__all__ = [
    "POOLING_METHODS",
    "EarlyExitConfig",
    "EarlyExitForSequenceClassification",
    "ModelFormatError",
    "MultiExitOutput",
    "EncoderState",
    "LayerwiseBackbone",
    "backbone_from_config",
    "load_backbone",
    "register_backbone",
    "supported_model_types",
    "wrap_backbone",
]
