"""Configuration of a multi-exit encoder classifier, saved as ``config.json`` beside its weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from consistentee.model.backbone import POOLING_METHODS

#: Written into config.json so a directory of another kind is recognised and refused.
MODEL_KIND = "consistentee-early-exit-encoder"
FORMAT_VERSION = 1
POLICY_FEATURES = ("state", "state+confidence", "confidence")
#: Number of classifier-derived features read by ``state+confidence`` and ``confidence``.
CONFIDENCE_FEATURES = 3


class ModelFormatError(ValueError):
    """A model directory is missing, of the wrong kind, or does not match its weights."""


@dataclass
class EarlyExitConfig:
    """Everything needed to rebuild an ``EarlyExitForSequenceClassification`` without its weights."""

    #: The Hugging Face config of the backbone, as ``PretrainedConfig.to_dict()`` gives it.
    backbone: dict[str, Any]
    #: Label names in id order (id i predicts ``label_names[i]``).
    label_names: list[str]
    #: How the state after each layer becomes one vector: ``pooler`` ([CLS] through the backbone's trained
    #: pooler), ``cls`` or ``mean`` (mask-aware mean over tokens; the default when the checkpoint's pooler
    #: was never trained, see METHOD.md section 2).
    pooling: str = "mean"
    #: Hidden width of each layer's policy MLP (inputs -> policy_hidden_size -> 1).
    policy_hidden_size: int = 32
    #: What each policy reads: ``state`` (the pooled state, METHOD.md section 2), ``state+confidence``
    #: (also the max probability, normalised entropy and top-2 margin of that layer's exit classifier) or
    #: ``confidence`` (those three alone: a per-layer learned exit function of the classifier's confidence).
    policy_features: str = "state"
    #: Dropout on the pooled state before each exit classifier.
    classifier_dropout: float = 0.1
    #: Extra settings recorded by training (never needed to run the model).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.policy_features not in POLICY_FEATURES:
            raise ModelFormatError(
                f"unknown policy features {self.policy_features!r}; choose one of {', '.join(POLICY_FEATURES)}")
        if self.pooling not in POOLING_METHODS:
            raise ModelFormatError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLING_METHODS)}")
        if len(self.label_names) < 2:
            raise ModelFormatError(f"a classifier needs at least 2 labels, got {self.label_names!r}")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": MODEL_KIND, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config.json") -> EarlyExitConfig:
        if data.get("kind") != MODEL_KIND:
            raise ModelFormatError(
                f"{source} is not a consistentee early-exit model (kind={data.get('kind')!r}); "
                "train one with `consistentee train` or pass the run's model directory"
            )
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ModelFormatError(f"{source} was written by a newer consistentee (format {data['format_version']})")
        fields = {k: v for k, v in data.items() if k not in ("kind", "format_version")}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ModelFormatError(f"{source} is malformed: {exc}") from None
