"""Predict labels for raw texts with early exit, in the Hugging Face spirit::

    from consistentee.inference import EarlyExitPredictor

    predictor = EarlyExitPredictor.from_pretrained("runs/rt-minilm", rule="entropy", knob=0.2)
    predictor.predict(["a moving film", ("premise", "hypothesis")])
    # [{"label": "positive", "probability": 0.93, "exit_layer": 2}, ...]

Texts are tokenized once (unpadded), grouped into batches (optionally sorted by length so that
batches hold similar lengths), right-padded per batch and run through :class:`EarlyExitEngine`.
Results always come back in input order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from consistentee.data.tokenize import collate
from consistentee.exits.rules import RULES, ExitRule, make_rule
from consistentee.inference.engine import EarlyExitEngine

__all__ = ["RUN_MODEL_CANDIDATES", "EarlyExitPredictor", "parse_knob", "resolve_model_source"]

#: Model directories looked for, in order, inside a run directory.
RUN_MODEL_CANDIDATES = ("stage1/model",)

InputItem = str | tuple[str, str] | list[str]


def parse_knob(rule: str, text: str | None) -> Any:
    """A knob written as text (CLI, config) -> the value ``make_rule(rule, ...)`` expects.

    ``patience``/``static``: an integer; ``pcee``: ``"t,S"``; ``oracle``: none; others: a real number.
    ``None`` or ``""`` means the rule's default knob.
    """
    if rule not in RULES:
        raise ValueError(f"unknown exit rule {rule!r}; known rules: {', '.join(sorted(RULES))}")
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        return text
    value = text.strip()
    if rule == "oracle":
        raise ValueError(f"rule 'oracle' has no knob, got {text!r}")
    expected = {"pcee": "'t,S' (an integer and a real number)", "patience": "an integer",
                "static": "an integer"}.get(rule, "a real number")
    try:
        if rule == "pcee":
            parts = [p for p in value.replace(";", ",").split(",") if p.strip()]
            if len(parts) != 2:
                raise ValueError
            return int(parts[0]), float(parts[1])
        if rule in ("patience", "static"):
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        return float(value)
    except ValueError:
        raise ValueError(f"rule {rule!r}: knob {text!r} is not {expected}") from None


def resolve_model_source(path: str | os.PathLike, policy_model_dir: str | os.PathLike | None = None) -> Path:
    """The model directory to load: ``path`` itself, or inside a run directory.

    ``policy_model_dir`` (a model directory, absolute or relative to ``path``) wins when given.
    A run directory (``run.json`` or a ``stage1`` folder) resolves to the first of
    :data:`RUN_MODEL_CANDIDATES` that holds a ``config.json``.
    """
    base = Path(path)
    if policy_model_dir is not None:
        candidate = Path(policy_model_dir)
        if not candidate.is_absolute() and not candidate.exists() and base.is_dir():
            candidate = base / candidate
        if not (candidate / "config.json").is_file():
            raise FileNotFoundError(f"{candidate}: not a model directory (no config.json)")
        return candidate
    if not base.exists():
        raise FileNotFoundError(f"{base}: no such model or run directory")
    if not base.is_dir():
        raise NotADirectoryError(f"{base} is a file; pass a model directory or a run directory")
    if (base / "config.json").is_file():
        return base
    if (base / "run.json").is_file() or (base / "stage1").is_dir():
        for sub in RUN_MODEL_CANDIDATES:
            if (base / sub / "config.json").is_file():
                return base / sub
        raise FileNotFoundError(
            f"{base} is a run directory without a finished model ({' or '.join(RUN_MODEL_CANDIDATES)}); "
            "finish training first"
        )
    raise FileNotFoundError(f"{base}: neither a model directory (config.json) nor a run directory (run.json)")


def _max_positions(model) -> int | None:
    config = model.backbone.config
    value = getattr(config, "max_position_embeddings", None)
    if not isinstance(value, int) or value <= 0:
        return None
    if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        value -= 2  # positions start after the padding index
    return value


class EarlyExitPredictor:
    """Tokenizer + multi-exit model + exit rule: texts in, ``{"label", "probability", "exit_layer"}`` out."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        rule: str | ExitRule = "consistentee",
        knob: Any = None,
        learned_heads=None,
        max_length: int | None = None,
        trim: bool = True,
        autocast_dtype: str | torch.dtype | None = None,
    ) -> None:
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token first")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.learned_heads = learned_heads
        self.trim = trim
        self.autocast_dtype = autocast_dtype
        self.label_names = list(model.config.label_names)
        limit = _max_positions(model)
        tokenizer_limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
            limit = min(limit, tokenizer_limit) if limit else tokenizer_limit
        self.model_max_length = limit
        self.max_length = self._check_max_length(max_length) if max_length is not None else limit
        self._engines: dict[tuple[str, str], EarlyExitEngine] = {}
        self.rule = self._make_rule(rule, knob)
        #: number of engine calls so far (one per batch).
        self.engine_calls = 0

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        rule: str | ExitRule = "consistentee",
        knob: Any = None,
        device: str | torch.device = "auto",
        learned_heads_dir: str | os.PathLike | None = None,
        policy_model_dir: str | os.PathLike | None = None,
        max_length: int | None = None,
        trim: bool = True,
        autocast_dtype: str | torch.dtype | None = None,
    ) -> EarlyExitPredictor:
        """Load a saved model directory (config.json + model.safetensors + tokenizer) or a run directory."""
        from transformers import AutoTokenizer

        from consistentee.model.modeling import EarlyExitForSequenceClassification
        from consistentee.utils.runtime import resolve_device

        model_dir = resolve_model_source(path, policy_model_dir)
        resolved = device if isinstance(device, torch.device) else resolve_device(device)
        model = EarlyExitForSequenceClassification.from_pretrained(model_dir, device=resolved)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:  # missing or broken tokenizer files: several exception types
            raise ValueError(f"{model_dir}: cannot load its tokenizer ({type(exc).__name__}); "
                             "save the model with its tokenizer") from None
        heads = None
        if learned_heads_dir is not None:
            from consistentee.exits.learned import LearnedExitHeads

            heads = LearnedExitHeads.load(learned_heads_dir, device=resolved)
            if isinstance(heads, torch.nn.Module):
                heads = heads.to(resolved).eval()
        return cls(model, tokenizer, rule=rule, knob=knob, learned_heads=heads, max_length=max_length,
                   trim=trim, autocast_dtype=autocast_dtype)

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_max_length(self, max_length: int) -> int:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
        if self.model_max_length is not None and max_length > self.model_max_length:
            raise ValueError(f"max_length {max_length} exceeds what the model accepts ({self.model_max_length})")
        return max_length

    def _make_rule(self, rule: str | ExitRule, knob: Any) -> ExitRule:
        if isinstance(rule, ExitRule):
            if knob is not None:
                raise ValueError("pass the knob inside the ExitRule object, not separately")
            return rule
        if rule == "oracle":
            raise ValueError("rule 'oracle' needs gold labels; it is for evaluation, not prediction")
        built = make_rule(rule, parse_knob(rule, knob) if isinstance(knob, str) else knob)
        if "learned_score" in built.needs and self.learned_heads is None:
            raise ValueError(f"rule {rule!r} needs learned exit heads (learned_heads_dir)")
        return built

    def engine(self, rule: str | ExitRule | None = None, knob: Any = None) -> EarlyExitEngine:
        """The engine for ``rule``/``knob`` (the predictor's own rule when both are None)."""
        chosen = self.rule if rule is None and knob is None else self._make_rule(
            rule if rule is not None else self.rule.name, knob)
        key = (chosen.name, repr(chosen.knob))
        if key not in self._engines:
            self._engines[key] = EarlyExitEngine(self.model, chosen, learned_heads=self.learned_heads,
                                                 trim=self.trim, autocast_dtype=self.autocast_dtype)
        return self._engines[key]

    # -- encoding -----------------------------------------------------------------------------------

    def encode(
        self, inputs: InputItem | Sequence[InputItem], *, max_length: int | None = None, truncation: bool = False
    ) -> list[dict[str, list[int]]]:
        """Validate and tokenize (unpadded). Raises ValueError naming the first bad input."""
        items = [inputs] if isinstance(inputs, str) or (
            isinstance(inputs, tuple) and len(inputs) == 2 and all(isinstance(x, str) for x in inputs)
        ) else list(inputs)
        limit = self._check_max_length(max_length) if max_length is not None else self.max_length
        singles: list[tuple[int, str]] = []
        pairs: list[tuple[int, str, str]] = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                _check_text(item, i)
                singles.append((i, item))
            elif isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, str) for x in item):
                _check_text(item[0], i)
                _check_text(item[1], i, "text pair")
                pairs.append((i, item[0], item[1]))
            else:
                raise ValueError(f"input {i}: expected a text or a (text, text pair), got {type(item).__name__}")
        features: list[dict[str, list[int]] | None] = [None] * len(items)
        kwargs: dict[str, Any] = {"padding": False, "return_attention_mask": True, "verbose": False}
        if truncation:
            kwargs.update(truncation=True, max_length=limit)
        else:
            kwargs.update(truncation=False)
        groups = [([t for _, t in singles], None, [i for i, _ in singles]),
                  ([t for _, t, _ in pairs], [p for _, _, p in pairs], [i for i, _, _ in pairs])]
        for texts, text_pairs, indices in groups:
            if not texts:
                continue
            encoded = self.tokenizer(texts, text_pairs, **kwargs)
            names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
            for row, index in enumerate(indices):
                feature = {name: list(encoded[name][row]) for name in names}
                if limit is not None and len(feature["input_ids"]) > limit:
                    raise ValueError(
                        f"input {index} is too long: {len(feature['input_ids'])} tokens, more than max_length "
                        f"{limit}; shorten it or enable truncation"
                    )
                features[index] = feature
        return features  # type: ignore[return-value]

    # -- predicting ---------------------------------------------------------------------------------

    def predict(
        self,
        inputs: InputItem | Sequence[InputItem],
        batch_size: int = 32,
        rule: str | ExitRule | None = None,
        knob: Any = None,
        sort_by_length: bool = False,
        max_length: int | None = None,
        *,
        truncation: bool = False,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """``{"label", "probability", "exit_layer"}`` per input, in input order.

        ``inputs``: a text, a ``(text, text_pair)`` tuple, or a list of either. Empty texts and texts
        longer than ``max_length`` tokens (default: what the model accepts) raise ``ValueError``, unless
        ``truncation=True``. ``sort_by_length`` batches similar lengths together (less padding).
        """
        engine = self.engine(rule, knob)  # validate the rule before tokenizing
        features = self.encode(inputs, max_length=max_length, truncation=truncation)
        return self.predict_encoded(features, batch_size=batch_size, engine=engine,
                                    sort_by_length=sort_by_length, progress=progress)

    __call__ = predict

    def predict_encoded(
        self,
        features: Sequence[dict[str, list[int]]],
        *,
        batch_size: int = 32,
        engine: EarlyExitEngine | None = None,
        sort_by_length: bool = False,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """Predict already-encoded inputs (from :meth:`encode`), in their order."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        engine = engine or self.engine()
        n = len(features)
        order = list(range(n))
        if sort_by_length:
            order.sort(key=lambda i: len(features[i]["input_ids"]), reverse=True)
        results: list[dict[str, Any] | None] = [None] * n
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="predict", unit="batch", leave=False)
        for start in starts:
            chunk = order[start:start + batch_size]
            batch = collate([{**features[i], "index": i} for i in chunk], self.tokenizer.pad_token_id)
            out = engine(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            self.engine_calls += 1
            predictions = out.predictions.tolist()
            chosen = out.probs.gather(1, out.predictions.unsqueeze(1)).squeeze(1).tolist()
            layers = out.exit_layers.tolist()
            for row, index in enumerate(chunk):
                results[index] = {
                    "label": self.label_names[predictions[row]],
                    "probability": float(chosen[row]),
                    "exit_layer": int(layers[row]),
                }
        return results  # type: ignore[return-value]


def _check_text(text: str, index: int, what: str = "text") -> None:
    if not text.strip():
        raise ValueError(f"input {index}: empty {what}")
