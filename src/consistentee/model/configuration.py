"""Configuration of a multi-exit encoder classifier, saved as ``config.json`` beside its weights.

It is a ``transformers.PretrainedConfig`` (``model_type`` ``consistentee-early-exit``) so that ``AutoConfig``,
``AutoModelForSequenceClassification`` and ``pipeline`` read a saved folder after ``import consistentee``.

Format history (``format_version`` in config.json) and how older folders load:

* **1** (before the transformers classes): ``kind``, ``format_version``, ``backbone``, ``label_names``,
  ``pooling``, ``policy_hidden_size``, ``policy_features`` (absent in the first releases), ``classifier_dropout``,
  ``extra``. Loads with these defaults for what it lacks: ``policy_features`` ``"state"`` (the only input policies
  read before the option existed); ``id2label``/``label2id`` from ``label_names``; no weights checksum (the weights
  are still checked to be finite). ``AutoConfig`` cannot read it (it has no ``model_type``): load it with
  ``EarlyExitForSequenceClassification.from_pretrained`` and save it again to upgrade it.
* **2**: adds ``model_type``, ``architectures``, ``id2label``/``label2id`` (from ``label_names``),
  ``consistentee_version``, ``min_reader_format`` and ``weights_sha256`` (sha256 of model.safetensors).
* **3**: the same config keys; model.safetensors also holds each policy's ``input_shift`` and ``input_scale``
  (``--policy-input-scaling``, docs/method.md section 3), so ``min_reader_format`` is 3. Format-2 weights load
  with the identity in their place.

Forward compatibility: a folder written by a newer consistentee loads when its ``min_reader_format`` is at most
:data:`FORMAT_VERSION`; keys this version does not know are ignored with a :class:`ModelFormatWarning` naming them.
Keys that the folder's own format defines must be present and well typed: a missing or mistyped one is a one-line
:class:`ModelFormatError` (a ``ValueError``) naming the file and the field, never a silent default.

``extra`` records what training knew; these keys are read (all optional): ``base_model``, ``dataset``,
``command`` (the training command line), ``metrics`` (name -> number, e.g. accuracy and speed-ups),
``policies_trained`` (whether stage 2/3 trained the exit policies: it picks the default operating point).
"""

from __future__ import annotations

import math
import numbers
import warnings
from functools import lru_cache
from typing import Any

from transformers import PretrainedConfig

from consistentee.model.constants import (
    ARCHITECTURE,
    CONFIDENCE_FEATURES,
    FORMAT_VERSION,
    MIN_READER_FORMAT,
    MODEL_KIND,
    MODEL_TYPE,
    POLICY_FEATURES,
    POOLING_METHODS,
    ModelFormatError,
    ModelFormatWarning,
)

__all__ = [
    "CONFIDENCE_FEATURES",
    "FORMAT_VERSION",
    "MODEL_KIND",
    "MODEL_TYPE",
    "POLICY_FEATURES",
    "EarlyExitConfig",
    "ModelFormatError",
    "ModelFormatWarning",
]

#: Keys of config.json that describe the file, not the model (never kept as attributes).
FILE_KEYS = ("kind", "format_version", "min_reader_format", "consistentee_version", "weights_sha256")
#: The model's own settings and the format that introduced each.
MODEL_KEYS = {"backbone": 1, "label_names": 1, "pooling": 1, "policy_hidden_size": 1, "policy_features": 2,
              "classifier_dropout": 1, "extra": 1}
#: Keys a format-1 folder may lack, with the value the code of that time used.
FORMAT1_DEFAULTS = {"policy_features": "state"}
#: Integer fields of the backbone config checked here (the layer-wise code indexes with them).
BACKBONE_INTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings")


def package_version() -> str:
    """The installed consistentee version (written into config.json)."""
    import consistentee

    return consistentee.__version__


@lru_cache(maxsize=1)
def _transformers_keys() -> frozenset[str]:
    """Keys any ``PretrainedConfig`` may write: kept as they are, never reported as unknown."""
    base = set(PretrainedConfig().to_dict())
    return frozenset(base | {"model_type", "architectures", "transformers_version", "id2label", "label2id",
                             "_name_or_path", "name_or_path", "dtype", "torch_dtype", "problem_type",
                             "tokenizer_class", "num_labels", "_commit_hash", "attn_implementation"})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_error(source: str, name: str, expected: str, value: Any) -> ModelFormatError:
    return ModelFormatError(f"{source}: field {name!r} must be {expected}, got {_short(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_labels(names: Any, source: str, name: str = "label_names") -> list[str]:
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) and n for n in names):
        raise _field_error(source, name, "a list of non-empty strings", names)
    if len(names) < 2:
        raise ModelFormatError(f"{source}: field {name!r}: a classifier needs at least 2 labels, got {list(names)!r}")
    seen, dupes = set(), []
    for n in names:
        if n in seen and n not in dupes:
            dupes.append(n)
        seen.add(n)
    if dupes:
        raise ModelFormatError(f"{source}: field {name!r} has duplicate label(s) "
                               f"{', '.join(repr(d) for d in dupes)}: every label must be unique")
    return list(names)


def _check_settings(values: dict[str, Any], source: str) -> None:
    """Type and range checks of the model's own settings (those present in ``values``)."""
    if "backbone" in values:
        backbone = values["backbone"]
        if not isinstance(backbone, dict):
            raise _field_error(source, "backbone", "an object (the backbone's transformers config)", backbone)
        if backbone and not (isinstance(backbone.get("model_type"), str) and backbone["model_type"]):
            raise _field_error(source, "backbone.model_type", "a model type string", backbone.get("model_type"))
        for key in BACKBONE_INTS:
            if key in backbone and not (_is_int(backbone[key]) and backbone[key] >= 1):
                raise _field_error(source, f"backbone.{key}", "an integer >= 1", backbone[key])
    if "label_names" in values:
        _check_labels(values["label_names"], source)
    if "pooling" in values and values["pooling"] not in POOLING_METHODS:
        raise ModelFormatError(f"{source}: field 'pooling': unknown pooling {_short(values['pooling'])}; "
                               f"choose one of {', '.join(POOLING_METHODS)}")
    if "policy_features" in values and values["policy_features"] not in POLICY_FEATURES:
        raise ModelFormatError(f"{source}: field 'policy_features': unknown policy features "
                               f"{_short(values['policy_features'])}; choose one of {', '.join(POLICY_FEATURES)}")
    if "policy_hidden_size" in values:
        size = values["policy_hidden_size"]
        if not (_is_int(size) and size >= 1):
            raise _field_error(source, "policy_hidden_size", "an integer >= 1", size)
    if "classifier_dropout" in values:
        p = values["classifier_dropout"]
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (math.isfinite(p) and 0 <= p < 1):
            raise _field_error(source, "classifier_dropout", "a number in [0, 1)", p)
    if "extra" in values and not isinstance(values["extra"], dict):
        raise _field_error(source, "extra", "an object", values["extra"])


class EarlyExitConfig(PretrainedConfig):
    """Everything needed to rebuild an ``EarlyExitForSequenceClassification`` without its weights.

    Labels live in ``id2label`` (the transformers convention); ``label_names`` is the same list in id order.
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        label_names: list[str] | None = None,
        pooling: str = "mean",
        policy_hidden_size: int = 32,
        policy_features: str = "state",
        classifier_dropout: float = 0.1,
        extra: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        for key in FILE_KEYS:
            kwargs.pop(key, None)
        #: The transformers config of the backbone, as ``PretrainedConfig.to_dict()`` gives it (less its
        #: ``id2label``/``label2id``: the encoder's LABEL_0/LABEL_1 placeholders, never this model's labels).
        self.backbone = {k: v for k, v in (backbone or {}).items() if k not in ("id2label", "label2id")}
        #: How the state after each layer becomes one vector: ``pooler`` ([CLS] through the backbone's trained
        #: pooler), ``cls`` or ``mean`` (mask-aware mean over tokens; the default when the checkpoint's pooler
        #: was never trained, see docs/method.md section 2).
        self.pooling = pooling
        #: Hidden width of each layer's policy MLP (inputs -> policy_hidden_size -> 1).
        self.policy_hidden_size = policy_hidden_size
        #: What each policy reads: ``state`` (the pooled state, docs/method.md section 2), ``state+confidence``
        #: (also the max probability, normalised entropy and top-2 margin of that layer's exit classifier) or
        #: ``confidence`` (those three alone: a per-layer learned exit function of the classifier's confidence).
        self.policy_features = policy_features
        #: Dropout on the pooled state before each exit classifier.
        self.classifier_dropout = classifier_dropout
        #: Settings and results recorded by training (never needed to run the model; see the module docstring).
        self.extra = dict(extra or {})
        if label_names is not None:
            labels = _check_labels(label_names, "EarlyExitConfig")
            kwargs["id2label"] = dict(enumerate(labels))
            kwargs["label2id"] = {name: i for i, name in enumerate(labels)}
            kwargs.pop("num_labels", None)
        kwargs.setdefault("architectures", [ARCHITECTURE])
        super().__init__(**kwargs)
        _check_settings(self._settings(), "EarlyExitConfig")

    # -- labels -----------------------------------------------------------------------------------

    @property
    def label_names(self) -> list[str]:
        """Label names in id order (id i predicts ``label_names[i]``)."""
        id2label = {int(k): v for k, v in (self.id2label or {}).items()}
        return [id2label[i] for i in range(len(id2label))]

    @label_names.setter
    def label_names(self, names: list[str]) -> None:
        labels = _check_labels(names, "EarlyExitConfig")
        self.id2label = dict(enumerate(labels))
        self.label2id = {name: i for i, name in enumerate(labels)}

    def _settings(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "label_names": self.label_names, "pooling": self.pooling,
                "policy_hidden_size": self.policy_hidden_size, "policy_features": self.policy_features,
                "classifier_dropout": self.classifier_dropout, "extra": self.extra}

    def validate_settings(self, source: str = "EarlyExitConfig") -> None:
        """Raise :class:`ModelFormatError` when a setting has the wrong type or value (e.g. after editing)."""
        _check_settings(self._settings(), source)

    def backbone_config(self, source: str = "config.json") -> PretrainedConfig:
        """The backbone's transformers config; a wrong field is a :class:`ModelFormatError` naming it."""
        from transformers import AutoConfig

        data = dict(self.backbone)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ModelFormatError(f"{source}: field 'backbone.model_type' is missing")
        try:
            return AutoConfig.for_model(model_type, **data)
        except Exception as exc:  # strict dataclass validation, unknown type, bad values: one line each
            text = str(exc).strip()
            field = None
            if "field '" in text:
                field = text.split("field '", 1)[1].split("'", 1)[0]
            if field:
                detail = text.splitlines()[-1].strip()
                raise ModelFormatError(f"{source}: field 'backbone.{field}': {detail}") from None
            if "Unrecognized model identifier" in text:
                raise ModelFormatError(f"{source}: field 'backbone.model_type': {model_type!r} is not a model type "
                                       "this version of transformers knows") from None
            first = text.splitlines()[0] if text else type(exc).__name__
            raise ModelFormatError(f"{source}: field 'backbone' is not a valid {model_type} config: {first}") from None

    # -- serialisation ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("label_names", None)
        head = {"kind": MODEL_KIND, "format_version": FORMAT_VERSION, "min_reader_format": MIN_READER_FORMAT,
                "consistentee_version": package_version(), "model_type": MODEL_TYPE,
                "architectures": out.pop("architectures", None) or [ARCHITECTURE]}
        for key in head:
            out.pop(key, None)
        out["label_names"] = self.label_names
        return {**head, **out}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EarlyExitConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, like every PretrainedConfig

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], source: str | None = None, **kwargs: Any):
        """Read a config.json dict, checking kind, format and types (see the module docstring).

        Also the entry point of ``AutoConfig``: extra keyword arguments follow transformers' rules (existing
        attributes are overridden; ``return_unused_kwargs=True`` returns the others).
        """
        return_unused = kwargs.pop("return_unused_kwargs", False)
        name_or_path = kwargs.pop("name_or_path", None)
        if source is None:
            source = f"{str(name_or_path).rstrip('/')}/config.json" if name_or_path else "config.json"
        config = cls(**parse_config_dict(config_dict, source))
        if name_or_path is not None:
            config._name_or_path = str(name_or_path)
        unused = {}
        for key, value in kwargs.items():
            if key in ("_from_auto", "_from_pipeline"):
                continue
            if key in ("dtype", "torch_dtype"):
                if value != "auto" and value is not None:
                    config.dtype = value
                continue
            if key == "label_names" or hasattr(config, key):
                setattr(config, key, value)
            else:
                unused[key] = value
        config.validate_settings(source)
        return (config, unused) if return_unused else config


def parse_config_dict(data: Any, source: str = "config.json") -> dict[str, Any]:
    """Checked keyword arguments for :class:`EarlyExitConfig` from a config.json dict (any format)."""
    if not isinstance(data, dict):
        raise ModelFormatError(f"{source} must hold a JSON object, got {type(data).__name__}")
    kind, model_type = data.get("kind"), data.get("model_type")
    if kind != MODEL_KIND and not (kind is None and model_type == MODEL_TYPE):
        shown = kind if kind is not None else model_type
        raise ModelFormatError(
            f"{source} is not a consistentee early-exit model (kind={shown!r}); "
            "train one with `consistentee train` or pass the run's model directory"
        )
    version = data.get("format_version", 1 if kind is not None and "model_type" not in data else FORMAT_VERSION)
    if not (_is_int(version) and version >= 1):
        raise _field_error(source, "format_version", "an integer >= 1", version)
    reader = data.get("min_reader_format", 1)
    if not (_is_int(reader) and reader >= 1):
        raise _field_error(source, "min_reader_format", "an integer >= 1", reader)
    if reader > FORMAT_VERSION:
        raise ModelFormatError(
            f"{source} was written by a newer consistentee (format {version}, readable from format {reader}); "
            f"this one reads format {FORMAT_VERSION}: upgrade consistentee"
        )
    ours = {k: data[k] for k in MODEL_KEYS if k in data}
    if "label_names" not in ours and isinstance(data.get("id2label"), dict) and version >= 2:
        ours["label_names"] = _labels_from_id2label(data["id2label"], source)
    missing = [k for k, since in MODEL_KEYS.items()
               if k not in ours and since <= version and not (version == 1 and k in FORMAT1_DEFAULTS)]
    if missing:
        raise ModelFormatError(f"{source}: missing field(s) {', '.join(repr(k) for k in missing)} "
                               f"(format {version} always writes them)")
    for key, value in FORMAT1_DEFAULTS.items():
        ours.setdefault(key, value)
    _check_settings(ours, source)
    if "id2label" in data and version >= 2:
        from_ids = _labels_from_id2label(data["id2label"], source)
        if from_ids != list(ours["label_names"]):
            raise ModelFormatError(f"{source}: field 'id2label' {_short(data['id2label'])} disagrees with "
                                   f"'label_names' {_short(ours['label_names'])}")
    known = set(MODEL_KEYS) | set(FILE_KEYS) | _transformers_keys()
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        newer = f" written by a newer consistentee (format {version})" if version > FORMAT_VERSION else ""
        warnings.warn(ModelFormatWarning(
            f"{source}{newer}: ignoring unknown key(s) {', '.join(repr(k) for k in unknown)}"), stacklevel=3)
    hf = {k: v for k, v in data.items()
          if k in _transformers_keys() and k not in ("id2label", "label2id", "num_labels", "model_type",
                                                      "transformers_version", "_commit_hash")}
    return {**hf, **ours}


def _labels_from_id2label(id2label: Any, source: str) -> list[str]:
    try:
        pairs = sorted((int(k), v) for k, v in id2label.items())
    except (AttributeError, TypeError, ValueError):
        raise _field_error(source, "id2label", "an object mapping ids 0..n-1 to label names", id2label) from None
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise _field_error(source, "id2label", "an object mapping ids 0..n-1 to label names", id2label)
    return _check_labels([v for _, v in pairs], source, "id2label")


def _register() -> None:
    from consistentee.model.auto import register_auto_classes

    register_auto_classes()


_register()
