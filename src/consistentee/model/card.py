"""The model card (README.md) written beside a saved model: what it is, how it exits, how well, and how to use it.

Everything comes from the model's config (``extra`` records what training knew: ``base_model``, ``dataset``,
``command``, ``metrics``, ``policy_training``) and its operating point; sections with nothing to say are left out
rather than filled with placeholders.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

from consistentee.model.constants import FORMAT_VERSION, WEIGHTS_NAME

#: Hub ids of the built-in short model names (a local path is never written as ``base_model``).
BUILTIN_HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                   "mpnet": "sentence-transformers/all-mpnet-base-v2"}


def _hub_id(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    name = BUILTIN_HUB_IDS.get(name, name)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and " " not in name:
        return name
    return None


def _value(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return str(v)
    return f"{v:.4g}"


def _flatten(prefix: str, value: Any, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, rows)
    else:
        rows.append((prefix, _value(value)))


def model_card(model, *, with_tokenizer: bool) -> str:
    """Markdown with a YAML header (valid hub metadata) for ``model``."""
    from consistentee.model.configuration import package_version

    config = model.config
    extra = config.extra or {}
    base = extra.get("base_model")
    hub_base = _hub_id(base)
    meta = {"library_name": "transformers", "pipeline_tag": "text-classification",
            "tags": ["consistentee", "early-exit", "text-classification"]}
    if hub_base:
        meta["base_model"] = hub_base
    header = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items())
    backbone_type = config.backbone.get("model_type", "encoder")
    lines = [
        "---", header, "---", "",
        "# Early-exit text classifier (consistentee)", "",
        f"A {model.num_layers}-layer {backbone_type} encoder with an exit classifier after every layer and an exit "
        f"policy after every layer but the last (ConsistentEE). Pooling: `{config.pooling}`; the policies read "
        f"`{config.policy_features}`. Saved by consistentee {package_version()} (model format {FORMAT_VERSION}); "
        f"`config.json` records the sha256 of `{WEIGHTS_NAME}`, checked when the model loads.", "",
        "## Labels", "", "| id | label |", "|---|---|",
        *[f"| {i} | {name} |" for i, name in enumerate(config.label_names)], "",
    ]
    if base:
        lines += ["## Base model", "", f"`{hub_base or base}`", ""]
    if extra.get("dataset"):
        lines += ["## Data", "", f"{extra['dataset']}", ""]
    lines += ["## Operating point", "", f"`forward` exits by: {model.describe_operating_point()}."]
    point = getattr(model, "operating_point", None)
    if point is not None and point.calibration:
        rows: list[tuple[str, str]] = []
        _flatten("", point.calibration, rows)
        lines += ["", "| calibration | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    lines += ["", "A pipeline or `model(**inputs)` computes every exit and reports the exit taken "
              "(`outputs.exit_layer`); `EarlyExitPredictor` skips the deeper layers for the speed-up.", ""]
    results: list[tuple[str, str]] = []
    if isinstance(extra.get("metrics"), dict):
        _flatten("", extra["metrics"], results)
    training = extra.get("policy_training")
    if isinstance(training, dict):
        _flatten("policy_training", training, results)
    if results:
        lines += ["## Results", "", "| measure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in results], ""]
    if extra.get("command"):
        lines += ["## Training command", "", "```", str(extra["command"]), "```", ""]
    tokenizer_note = "" if with_tokenizer else (
        "\n\nThis folder was saved without a tokenizer: save the model with `tokenizer=` (or add the base "
        "model's tokenizer files) before using a pipeline.")
    lines += [
        "## Use", "",
        "```python",
        "import consistentee  # registers the model with the transformers Auto classes",
        "from transformers import pipeline",
        "",
        'classifier = pipeline("text-classification", model="MODEL_DIR_OR_HUB_ID")',
        'classifier("a moving film")',
        "",
        "from consistentee.inference import EarlyExitPredictor  # batched early exit: the speed-up",
        "",
        'EarlyExitPredictor.from_pretrained("MODEL_DIR_OR_HUB_ID").predict(["a moving film"])',
        "```" + tokenizer_note, "",
    ]
    return "\n".join(lines)
