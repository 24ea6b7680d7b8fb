"""Names and limits of the saved model format, importable without torch or transformers (the CLI reads them)."""

from __future__ import annotations

#: ``kind`` written into config.json so that a directory of another kind is recognised and refused.
MODEL_KIND = "consistentee-early-exit-encoder"
#: ``model_type`` under which the config and model are registered with the transformers Auto classes.
MODEL_TYPE = "consistentee-early-exit"
#: Class name written into ``architectures``.
ARCHITECTURE = "EarlyExitForSequenceClassification"
#: Format this code writes. 1: the pre-transformers layout; 2: a transformers ``PretrainedConfig`` with a
#: weights checksum; 3: the policies' input-scaling buffers in the weights (see ``consistentee.model.configuration``
#: for the history and the defaults of old folders).
FORMAT_VERSION = 3
#: A folder whose ``min_reader_format`` exceeds ``FORMAT_VERSION`` needs a newer consistentee (format-2 readers
#: cannot load the format-3 weights: they would refuse the buffers they do not know as a mismatch).
MIN_READER_FORMAT = 3

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt")

POOLING_METHODS = ("pooler", "cls", "mean")
POLICY_FEATURES = ("state", "state+confidence", "confidence", "path")
#: Number of classifier-derived features read by ``state+confidence`` and ``confidence``.
CONFIDENCE_FEATURES = 3
#: ``path`` reads the current exit's three plus: how many exits in a row agree with the current one (/ L),
#: the previous exit's max probability, its change, and the layer's depth (/ L).
PATH_FEATURES = CONFIDENCE_FEATURES + 4


class ModelFormatError(ValueError):
    """A model directory is missing, of the wrong kind, corrupted, or does not match its weights."""


class ModelFormatWarning(UserWarning):
    """A model directory that loads, but not exactly as written (e.g. keys from a newer format are ignored)."""
