"""Predict labels for raw texts with early exit, in the Hugging Face spirit::

    from consistentee.inference import EarlyExitPredictor

    predictor = EarlyExitPredictor.from_pretrained("runs/rt-minilm", rule="entropy", knob=0.2)
    predictor.predict(["a moving film", ("premise", "hypothesis")])
    # [{"label": "positive", "probability": 0.93, "exit_layer": 2}, ...]

Texts are tokenized once (unpadded), grouped into batches (optionally sorted by length so that
batches hold similar lengths), right-padded per batch and run through :class:`EarlyExitEngine`.
Results always come back in input order.

With no rule and no knob, :meth:`EarlyExitPredictor.from_pretrained` runs the operating point stored in the
model folder (``operating_point.json``, written by ``consistentee calibrate``) and logs that it does; explicit
arguments win. A run directory resolves to its trained ConsistentEE policy model, never silently to
``stage1/model`` (whose policies were never trained); when that is ambiguous the error lists what exists.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from consistentee.data.tokenize import collate
from consistentee.exits.rules import ExitRule, make_rule, parse_knob, rule_class
from consistentee.inference.engine import EarlyExitEngine

__all__ = ["RUN_MODEL_CANDIDATES", "EarlyExitPredictor", "parse_knob", "resolve_model_source"]

logger = logging.getLogger("consistentee")

#: Model directories looked for inside a run directory: trained policy models first, then stage 1.
RUN_MODEL_CANDIDATES = ("policies/beta-*/model", "stage1/model")

#: The rule used when neither a rule nor a knob is given and the model folder stores no operating point.
DEFAULT_RULE = "consistentee"

InputItem = str | tuple[str, str] | list[str]


def _is_run_dir(path: Path) -> bool:
    return (path / "run.json").is_file() or (path / "stage1").is_dir()


def _trained_policy_models(run: Path) -> tuple[list[Path], list[Path]]:
    """(complete, unfinished) policy model directories of a run, sorted by beta."""
    import json

    complete, unfinished = [], []
    for model_dir in sorted((run / "policies").glob("beta-*/model")):
        if not (model_dir / "config.json").is_file():
            continue
        try:
            done = bool(json.loads((model_dir.parent / "progress.json").read_text(encoding="utf-8")).get("complete"))
        except (OSError, ValueError, AttributeError):
            done = False
        (complete if done else unfinished).append(model_dir)
    return complete, unfinished


def _stage1_of_run(model_dir: Path) -> Path | None:
    """The run directory when ``model_dir`` is a run's ``stage1/model`` (policies never trained), else None."""
    parent = model_dir.resolve().parent
    if model_dir.resolve().name == "model" and parent.name == "stage1" and _is_run_dir(parent.parent):
        return parent.parent
    return None


def _untrained_policy_error(model_dir: Path, run: Path) -> ValueError:
    complete, unfinished = _trained_policy_models(run)
    found = complete or unfinished
    if found:
        options = ", ".join(str(p) for p in found)
        hint = f"use a trained policy model ({options})"
    else:
        hint = f"train one (consistentee policy --run-dir {run})"
    return ValueError(f"{model_dir} is the stage-1 model of run {run}: its ConsistentEE policies were never trained; "
                      f"{hint}, or pick another --rule (e.g. entropy) to use its exits")


def resolve_model(
    path: str | os.PathLike,
    policy_model_dir: str | os.PathLike | None = None,
    rule: str | None = None,
) -> tuple[Path, str | None]:
    """(the model directory to load, a one-line note saying how a run directory was resolved, or None).

    ``policy_model_dir`` (absolute or relative to ``path``) wins. A run directory resolves, for the
    ``consistentee`` rule (and when no rule is named), to its one trained policy model
    (``policies/beta-*/model``); several are an error that lists them, none is an error saying how to train one.
    Other rules use ``stage1/model``. A hub id ("org/name") is downloaded.
    """
    base = Path(path)
    if policy_model_dir is not None:
        candidate = Path(policy_model_dir)
        if not candidate.is_absolute() and not candidate.exists() and base.is_dir():
            candidate = base / candidate
        if not (candidate / "config.json").is_file():
            raise FileNotFoundError(f"{candidate}: not a model directory (no config.json)")
        return candidate, None
    if not base.exists():
        text = os.fspath(path)
        if text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
            from consistentee.model.modeling import resolve_model_dir

            return resolve_model_dir(text), None
        raise FileNotFoundError(f"{base}: no such model or run directory")
    if not base.is_dir():
        raise NotADirectoryError(f"{base} is a file; pass a model directory or a run directory")
    if (base / "config.json").is_file():
        return base, None
    if not _is_run_dir(base):
        raise FileNotFoundError(f"{base}: neither a model directory (config.json) nor a run directory (run.json)")
    stage1 = base / "stage1" / "model"
    has_stage1 = (stage1 / "config.json").is_file()
    if rule not in (None, "consistentee"):
        if has_stage1:
            return stage1, f"run directory {base}: using {stage1} (its multi-exit model) for rule {rule!r}"
        raise FileNotFoundError(f"{base} is a run directory without a finished stage 1 ({stage1}); finish training first")
    complete, unfinished = _trained_policy_models(base)
    if len(complete) == 1:
        return complete[0], f"run directory {base}: using {complete[0]}, its trained ConsistentEE policy model"
    if len(complete) > 1:
        names = ", ".join(str(p.relative_to(base)) for p in complete)
        raise ValueError(f"{base} holds {len(complete)} trained ConsistentEE policy models ({names}); choose one with "
                         f"--policy-model-dir (e.g. --policy-model-dir {complete[0].relative_to(base)})")
    if rule is None and has_stage1 and (stage1 / "operating_point.json").is_file():
        return stage1, f"run directory {base}: using {stage1} and its stored operating point"
    if unfinished:
        names = ", ".join(str(p.relative_to(base)) for p in unfinished)
        raise ValueError(f"{base}: policy training is not finished ({names}); finish it "
                         f"(consistentee policy --run-dir {base}) or pass --policy-model-dir explicitly")
    if has_stage1:
        raise ValueError(f"{base} has no trained ConsistentEE policy (policies/beta-*/model), and the policies of "
                         f"{stage1} were never trained; train one (consistentee policy --run-dir {base}) or pick "
                         "another --rule (e.g. entropy) to use the stage-1 exits")
    raise FileNotFoundError(f"{base} is a run directory without a finished model (stage1/model or "
                            "policies/beta-*/model); finish training first")


def resolve_model_source(
    path: str | os.PathLike, policy_model_dir: str | os.PathLike | None = None, rule: str | None = None
) -> Path:
    """The model directory to load (see :func:`resolve_model`)."""
    return resolve_model(path, policy_model_dir, rule)[0]


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
        rule: str | ExitRule = DEFAULT_RULE,
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
        #: the stored operating point in use (set by :meth:`from_pretrained` when no rule or knob was given).
        self.operating_point = None
        #: one-line notes on what was chosen for the caller (run directory resolution, operating point).
        self.notes: list[str] = []

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        rule: str | ExitRule | None = None,
        knob: Any = None,
        device: str | torch.device = "auto",
        learned_heads_dir: str | os.PathLike | None = None,
        policy_model_dir: str | os.PathLike | None = None,
        max_length: int | None = None,
        trim: bool = True,
        autocast_dtype: str | torch.dtype | None = None,
    ) -> EarlyExitPredictor:
        """Load a saved model directory (config.json + model.safetensors + tokenizer), a run directory or a hub id.

        ``rule`` and ``knob`` both None: the operating point stored in the folder (logged), else ``consistentee``
        at its default threshold. A run's ``stage1/model`` with the ``consistentee`` rule is refused: its
        policies were never trained.
        """
        from transformers import AutoTokenizer

        from consistentee.exits.operating_point import load_operating_point
        from consistentee.model.modeling import EarlyExitForSequenceClassification
        from consistentee.utils.runtime import resolve_device

        rule_name = rule.name if isinstance(rule, ExitRule) else rule
        if rule_name is None and knob is not None:
            rule_name = DEFAULT_RULE
        if isinstance(rule_name, str) and not isinstance(rule, ExitRule):
            knob = parse_knob(rule_name, knob)  # a bad knob fails before the model is loaded
        model_dir, note = resolve_model(path, policy_model_dir, rule_name)
        notes = [note] if note else []
        point = load_operating_point(model_dir) if rule is None and knob is None else None
        if point is not None:
            rule, knob = point.rule, point.rule_knob()
            notes.append(f"using the calibrated operating point: {point.describe()}")
        elif rule is None:
            rule = DEFAULT_RULE
            notes.append(f"{model_dir} stores no calibrated operating point: using rule {DEFAULT_RULE} at its "
                         f"default knob {rule_class(DEFAULT_RULE).default_knob}, which guarantees no accuracy; "
                         "`consistentee calibrate` chooses one for a budget")
        rule_name = rule.name if isinstance(rule, ExitRule) else rule
        if rule_name == "consistentee" and policy_model_dir is None and (run := _stage1_of_run(model_dir)):
            raise _untrained_policy_error(model_dir, run)
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
        predictor = cls(model, tokenizer, rule=rule, knob=knob, learned_heads=heads, max_length=max_length,
                        trim=trim, autocast_dtype=autocast_dtype)
        predictor.operating_point = point
        predictor.model_dir = model_dir
        predictor.notes = notes
        for line in notes:
            logger.info(line)
        return predictor

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
            rule.check_depth(self.num_layers)
            return rule
        if "labels" in rule_class(rule).needs:
            raise ValueError(f"rule {rule!r} needs gold labels; it is for evaluation, not prediction")
        built = make_rule(rule, parse_knob(rule, knob) if isinstance(knob, str | float) else knob)
        built.check_depth(self.num_layers)
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
        top_k: int | str | None = None,
    ) -> list[dict[str, Any]]:
        """``{"label", "probability", "exit_layer"}`` per input, in input order.

        ``inputs``: a text, a ``(text, text_pair)`` tuple, or a list of either. Empty texts and texts
        longer than ``max_length`` tokens (default: what the model accepts) raise ``ValueError``, unless
        ``truncation=True``. ``sort_by_length`` batches similar lengths together (less padding).
        ``top_k`` (an integer >= 1, or ``"all"``) adds ``"scores"``: the ``top_k`` most likely labels at the exit
        taken, ``[{"label", "probability"}, ...]`` from the most likely down.
        """
        return list(self.iter_predict(inputs, batch_size=batch_size, rule=rule, knob=knob,
                                      sort_by_length=sort_by_length, max_length=max_length, truncation=truncation,
                                      progress=progress, top_k=top_k))

    __call__ = predict

    def iter_predict(
        self,
        inputs: InputItem | Sequence[InputItem],
        *,
        batch_size: int = 32,
        rule: str | ExitRule | None = None,
        knob: Any = None,
        sort_by_length: bool = False,
        max_length: int | None = None,
        truncation: bool = False,
        progress: bool = False,
        top_k: int | str | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Like :meth:`predict`, but yields each result, in input order, as soon as its batch is done (streaming).

        Every input is validated and tokenized before the first result is yielded."""
        engine = self.engine(rule, knob)  # validate the rule before tokenizing
        k = self._check_top_k(top_k)
        _check_batch_size(batch_size)
        features = self.encode(inputs, max_length=max_length, truncation=truncation)
        return self._iter_encoded(features, batch_size=batch_size, engine=engine, sort_by_length=sort_by_length,
                                  progress=progress, top_k=k)

    def _check_top_k(self, top_k: int | str | None) -> int | None:
        if top_k is None:
            return None
        if top_k == "all":
            return len(self.label_names)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1 or 'all', got {top_k!r}")
        return min(top_k, len(self.label_names))

    def predict_encoded(
        self,
        features: Sequence[dict[str, list[int]]],
        *,
        batch_size: int = 32,
        engine: EarlyExitEngine | None = None,
        sort_by_length: bool = False,
        progress: bool = False,
        top_k: int | str | None = None,
    ) -> list[dict[str, Any]]:
        """Predict already-encoded inputs (from :meth:`encode`), in their order."""
        _check_batch_size(batch_size)
        return list(self._iter_encoded(features, batch_size=batch_size, engine=engine or self.engine(),
                                       sort_by_length=sort_by_length, progress=progress,
                                       top_k=self._check_top_k(top_k)))

    def _iter_encoded(self, features, *, batch_size: int, engine: EarlyExitEngine, sort_by_length: bool,
                      progress: bool, top_k: int | None) -> Iterator[dict[str, Any]]:
        n = len(features)
        order = list(range(n))
        if sort_by_length:
            order.sort(key=lambda i: len(features[i]["input_ids"]), reverse=True)
        results: list[dict[str, Any] | None] = [None] * n
        next_out = 0
        starts = range(0, n, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="predict", unit="batch", leave=False)
        for start in starts:
            chunk = order[start:start + batch_size]
            batch = collate([{**features[i], "index": i} for i in chunk], self.tokenizer.pad_token_id)
            out = engine(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            self.engine_calls += 1
            probs = out.probs.float()
            if not bool(torch.isfinite(probs).all()):
                bad = chunk[int((~torch.isfinite(probs)).any(1).nonzero()[0, 0])]
                raise ValueError(f"the model gave non-finite scores (NaN or infinity) for input {bad}: its weights "
                                 "are probably damaged; re-save or re-download the model")
            predictions = out.predictions.tolist()
            chosen = probs.gather(1, out.predictions.unsqueeze(1)).squeeze(1).tolist()
            layers = out.exit_layers.tolist()
            ranked = probs.topk(top_k, dim=1) if top_k else None
            for row, index in enumerate(chunk):
                result: dict[str, Any] = {
                    "label": self.label_names[predictions[row]],
                    "probability": float(chosen[row]),
                    "exit_layer": int(layers[row]),
                }
                if ranked is not None:
                    result["scores"] = [{"label": self.label_names[c], "probability": float(p)}
                                        for p, c in zip(ranked.values[row].tolist(), ranked.indices[row].tolist(),
                                                        strict=True)]
                results[index] = result
            while next_out < n and results[next_out] is not None:
                yield results[next_out]  # type: ignore[misc]
                results[next_out] = None  # streamed: nothing held twice
                next_out += 1


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _check_text(text: str, index: int, what: str = "text") -> None:
    if not text.strip():
        raise ValueError(f"input {index}: empty {what}")
