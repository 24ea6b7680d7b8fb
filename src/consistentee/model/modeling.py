"""A multi-exit encoder classifier: an exit classifier and a policy network after every layer.

The policy of layer l outputs p_l = P(exit at l | pooled state); ConsistentEE trains it with
reinforcement learning (docs/method.md sections 2-3). The last layer has no policy: exiting there is forced.

It is a ``transformers.PreTrainedModel`` registered with ``AutoModelForSequenceClassification`` (see
:mod:`consistentee.model.auto`), saved the Hugging Face way: ``config.json`` (with the sha256 of the weights) +
``model.safetensors`` (+ the tokenizer, ``operating_point.json`` and a model card ``README.md``). Weights are only
ever read from safetensors, never pickle, and no remote code is needed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from consistentee.exits.rules import ExitRule, LayerSignals, exit_probability, exit_softmax, make_rule
from consistentee.model.backbone import EncoderState, LayerwiseBackbone
from consistentee.model.configuration import EarlyExitConfig
from consistentee.model.constants import (
    CARD_NAME,
    CONFIDENCE_FEATURES,
    CONFIG_NAME,
    PATH_FEATURES,
    PICKLE_NAMES,
    POLICY_FEATURES,
    WEIGHTS_NAME,
    ModelFormatError,
    ModelFormatWarning,
)
from consistentee.model.families import backbone_from_config, load_backbone
from consistentee.resources import resolve_model_path
from consistentee.utils.io import atomic_directory
from consistentee.utils.io import file_sha256 as sha256_file

__all__ = ["CONFIG_NAME", "OPTIONAL_POLICY_BUFFERS", "WEIGHTS_NAME", "EarlyExitForSequenceClassification",
           "MultiExitOutput", "PolicyNetwork", "PolicyPath", "required_missing", "resolve_model_dir",
           "sentence_embedding_pooling", "sha256_file"]

#: Threshold of the ConsistentEE policy when a folder with trained policies stores no operating point.
DEFAULT_POLICY_THRESHOLD = 0.5
#: ``from_pretrained`` keyword arguments of transformers that have no meaning here (safely ignored).
_IGNORED_LOAD_KWARGS = frozenset({
    "trust_remote_code", "adapter_kwargs", "_from_auto", "_from_pipeline", "code_revision", "proxies",
    "_commit_hash", "low_cpu_mem_usage", "attn_implementation", "resume_download", "use_safetensors",
    "subfolder", "key_mapping", "tp_plan", "gguf_file",
})
#: ``save_pretrained`` keyword arguments of transformers that have no meaning here (one safetensors file).
_IGNORED_SAVE_KWARGS = frozenset({
    "max_shard_size", "variant", "token", "save_peft_format", "save_original_format", "distributed_checkpoint",
    "state_dict", "save_function",
})


#: Policy buffers that models saved before they existed lack; such models load with the identity in their place.
OPTIONAL_POLICY_BUFFERS = ("input_shift", "input_scale")


def required_missing(missing: list[str]) -> list[str]:
    """The keys of ``missing`` (from a non-strict load) that a model cannot do without: all but the
    :data:`OPTIONAL_POLICY_BUFFERS`, which keep their identity values."""
    return [key for key in missing if key.rsplit(".", 1)[-1] not in OPTIONAL_POLICY_BUFFERS]


class PolicyNetwork(nn.Module):
    """d -> hidden -> 1 MLP with GELU; its sigmoid is the probability of exiting at this layer.

    Its inputs are standardised by ``input_shift`` and ``input_scale`` (the identity until
    :meth:`set_input_scaling`): confidence features vary over a fraction of their range, so without it the
    per-layer bias learns far faster than the weights that tell inputs apart (docs/method.md section 3)."""

    def __init__(self, hidden_size: int, policy_hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, policy_hidden_size), nn.GELU(), nn.Linear(policy_hidden_size, 1)
        )
        self.register_buffer("input_shift", torch.zeros(hidden_size))
        self.register_buffer("input_scale", torch.ones(hidden_size))

    def set_input_scaling(self, inputs: torch.Tensor, min_scale: float = 1e-3) -> None:
        """Standardise future inputs by the mean and std of ``inputs`` [N, d] (a std below ``min_scale`` counts
        as ``min_scale``, so a constant input stays finite)."""
        inputs = inputs.float()
        self.input_shift.copy_(inputs.mean(0))
        self.input_scale.copy_(inputs.std(0, unbiased=False).clamp_min(min_scale))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net((pooled - self.input_shift) / self.input_scale).squeeze(-1)


@dataclass
class PolicyPath:
    """What ``path`` policies remember of the exits a row has already passed (PABEE's agreement counter and
    the previous exit's confidence), so a policy can tell a settled prediction from a lucky confident one."""

    #: [B] argmax of the latest exit.
    prediction: torch.Tensor
    #: [B] how many exits in a row, up to the latest, predict the same class (>= 1).
    agree: torch.Tensor
    #: [B] max probability of the latest exit.
    max_prob: torch.Tensor

    def select(self, rows: torch.Tensor) -> PolicyPath:
        """The rows still running (``rows``: indices or a boolean mask)."""
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        return PolicyPath(self.prediction.index_select(0, rows), self.agree.index_select(0, rows),
                          self.max_prob.index_select(0, rows))


@dataclass
class MultiExitOutput(ModelOutput):
    """What ``forward`` returns; ``logits`` is what a transformers pipeline reads."""

    #: mean over exits of the cross-entropy of every exit (only with ``labels``).
    loss: torch.Tensor | None = None
    #: [batch, num_labels] logits of the exit each row takes under the operating point.
    logits: torch.Tensor | None = None
    #: [batch, num_layers, num_labels] logits of every exit.
    exit_logits: torch.Tensor | None = None
    #: [batch, num_layers - 1] logits of the exit policies (sigmoid gives p_l).
    policy_logits: torch.Tensor | None = None
    #: [batch, num_layers - 1] p_l, the policies' exit probabilities (float32).
    policy_probs: torch.Tensor | None = None
    #: [batch] 1-based layer each row exits at under the operating point.
    exit_layer: torch.Tensor | None = None
    #: [batch, num_layers, hidden] pooled state after every layer (only with ``return_pooled=True``).
    pooled: torch.Tensor | None = None


class EarlyExitForSequenceClassification(PreTrainedModel):
    """A layer-wise encoder with one exit classifier per layer and one exit policy per layer but the last.

    ``forward`` computes every exit (full depth) and reports the exit the operating point takes; batched early
    exit that skips the deeper layers is :class:`consistentee.inference.EarlyExitPredictor`. The operating point,
    when ``forward`` gets no ``exit_rule``: the one in the folder's ``operating_point.json``; else the
    ConsistentEE policy at threshold 0.5 when the policies were trained (``config.extra["policy_training"]``);
    else full depth (untrained policies would exit at random).
    """

    config_class = EarlyExitConfig
    main_input_name = "input_ids"

    def __init__(self, config: EarlyExitConfig, backbone: LayerwiseBackbone | None = None):
        super().__init__(config)
        if backbone is None:
            backbone = backbone_from_config(config.backbone_config())
        self.backbone = backbone
        d, n = backbone.hidden_size, backbone.num_layers
        if config.pooling == "pooler" and not backbone.has_pooler:
            raise ModelFormatError(f"pooling 'pooler' needs a backbone with a pooler; {backbone.config.model_type} has none")
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.exits = nn.ModuleList(nn.Linear(d, config.num_labels) for _ in range(n))
        std = float(getattr(self.backbone.config, "initializer_range", 0.02))
        for module in self.exits:  # like the backbone's own classification heads
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        #: the stored operating point (``operating_point.json``), set by ``from_pretrained``; None: see the class doc.
        self.operating_point = None
        #: whether stage 2/3 trained the policies (from ``config.extra`` or, for older run folders, progress.json).
        self.policies_trained = bool(config.extra.get("policy_training"))
        self._reset_policies(config.policy_features, config.policy_hidden_size)
        self.post_init()

    def init_weights(self) -> None:
        """No-op: the backbone keeps its checkpoint's weights and the heads are initialised in ``__init__``
        (transformers' default would re-initialise the wrapped backbone)."""

    def _init_weights(self, module: nn.Module) -> None:
        """No-op, see :meth:`init_weights`."""

    def reset_policies(self, features: str, hidden_size: int) -> None:
        """New, untrained policies reading ``features`` (a stage-2 choice: stage 1 never trains policies).

        They keep PyTorch's default (fan-in scaled) initialisation so that their output depends on the input
        from the first step: a near-constant policy collapses to "always continue" under the strong negative
        rewards of hard inputs before it learns to tell inputs apart.
        """
        self._reset_policies(features, hidden_size)
        self.config.extra.pop("policy_training", None)
        self.policies_trained = False

    def _reset_policies(self, features: str, hidden_size: int) -> None:
        if features not in POLICY_FEATURES:
            raise ModelFormatError(f"unknown policy features {features!r}; choose one of {', '.join(POLICY_FEATURES)}")
        self.config.policy_features, self.config.policy_hidden_size = features, hidden_size
        inputs = {"state": self.backbone.hidden_size, "state+confidence": self.backbone.hidden_size + CONFIDENCE_FEATURES,
                  "confidence": CONFIDENCE_FEATURES, "path": PATH_FEATURES}[features]
        device = self.exits[0].weight.device
        self.policies = nn.ModuleList(
            PolicyNetwork(inputs, hidden_size) for _ in range(self.backbone.num_layers - 1)
        ).to(device)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str,
        label_names: list[str],
        *,
        pooling: str | None = None,
        policy_hidden_size: int = 32,
        classifier_dropout: float = 0.1,
        trust_remote_code: bool = False,
    ) -> EarlyExitForSequenceClassification:
        """New exits and policies on a pretrained encoder.

        Pooling defaults to what the checkpoint was trained with (docs/method.md section 2): a sentence-embedding
        checkpoint declares its pooling (its pooler weights, if any, were never trained by it); otherwise the
        trained pooler when the checkpoint has one, else the mask-aware mean.
        """
        backbone, pooler_trained = load_backbone(name_or_path, trust_remote_code=trust_remote_code)
        declared = sentence_embedding_pooling(resolve_model_path(str(name_or_path)))
        if declared is not None:
            pooler_trained = False
        if pooling is None:
            pooling = declared or ("pooler" if pooler_trained else "mean")
        config = EarlyExitConfig(
            backbone=backbone.config.to_dict(),
            label_names=list(label_names),
            pooling=pooling,
            policy_hidden_size=policy_hidden_size,
            classifier_dropout=classifier_dropout,
            extra={"base_model": str(name_or_path), "pooler_trained": pooler_trained},
        )
        return cls(config, backbone)

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    def head_parameters(self) -> list[nn.Parameter]:
        """The new, randomly initialised parts (they get their own, larger learning rate)."""
        return [*self.exits.parameters(), *self.policies.parameters()]

    # -- running ------------------------------------------------------------------------------

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> EncoderState:
        return self.backbone.embed(input_ids, attention_mask, token_type_ids)

    def run_layer(self, index: int, state: EncoderState) -> tuple[EncoderState, torch.Tensor]:
        """Layer ``index`` (0-based) and its pooled state."""
        state = self.backbone.forward_layer(index, state)
        return state, self.backbone.pool(state, self.config.pooling)

    def exit_logits(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        return self.exits[index](self.dropout(pooled))

    @property
    def policies_read_path(self) -> bool:
        """Whether the policies read a :class:`PolicyPath` (callers then keep one with :meth:`advance_path`)."""
        return self.config.policy_features == "path"

    def policy_logits(self, index: int, pooled: torch.Tensor, path: PolicyPath | None = None) -> torch.Tensor:
        """Logit of exiting after layer ``index``; ``path`` policies also read ``path``, the summary of the
        exits before this one (None at the first layer)."""
        if index >= self.num_layers - 1:
            raise IndexError("the last layer has no policy: exiting there is forced")
        return self.policies[index](self.policy_inputs(index, pooled, path))

    def policy_inputs(self, index: int, pooled: torch.Tensor, path: PolicyPath | None = None) -> torch.Tensor:
        """[B, inputs]: what policy ``index`` reads (``config.policy_features``), before its standardisation."""
        features = self.config.policy_features
        if features == "confidence":
            return self.confidence_features(index, pooled)
        if features == "path":
            return self.path_features(index, pooled, path)
        if features == "state+confidence":
            return torch.cat([pooled, self.confidence_features(index, pooled)], dim=-1)
        return pooled

    def advance_path(self, index: int, pooled: torch.Tensor, path: PolicyPath | None) -> PolicyPath:
        """``path`` after exit ``index`` (no gradient: the policy reads the classifiers, it does not train them)."""
        with torch.no_grad():
            max_prob, prediction = self.exits[index](pooled).float().softmax(-1).max(-1)
            if path is None:
                agree = torch.ones_like(max_prob)
            else:
                agree = torch.where(prediction == path.prediction, path.agree + 1, torch.ones_like(path.agree))
        return PolicyPath(prediction, agree, max_prob)

    def path_features(self, index: int, pooled: torch.Tensor, path: PolicyPath | None) -> torch.Tensor:
        """[B, PATH_FEATURES]: the current exit's confidence features, then the agreement run including it,
        the previous max probability, the change in max probability (both 0 at the first layer) and the
        depth, the counts scaled by the number of layers."""
        current = self.confidence_features(index, pooled)
        now = self.advance_path(index, pooled, path)
        prev = torch.zeros_like(now.max_prob) if path is None else path.max_prob
        delta = torch.zeros_like(prev) if path is None else now.max_prob - prev
        depth = torch.full_like(prev, (index + 1) / self.num_layers)
        extra = torch.stack([now.agree / self.num_layers, prev, delta, depth], dim=-1)
        return torch.cat([current, extra.to(current.dtype)], dim=-1)

    def confidence_features(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        """[B, 3] max probability, entropy / ln C and top-2 margin of exit ``index`` (no dropout, no gradient:
        the policy reads the classifier, it does not train it)."""
        with torch.no_grad():
            probs = self.exits[index](pooled).float().softmax(-1)
            top2 = probs.topk(2, dim=-1).values
            entropy = torch.special.entr(probs).sum(-1) / math.log(probs.shape[-1])
            return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1]], dim=-1).to(pooled.dtype)

    def exit_rule(self, rule: str | ExitRule | None = None, knob: Any = None) -> ExitRule:
        """The rule ``forward`` applies: ``rule``/``knob`` when given, else the model's operating point (see the
        class docstring); full depth is the ``static`` rule at the last layer."""
        if isinstance(rule, ExitRule):
            return rule
        if rule is not None:
            return make_rule(rule, knob)
        if self.operating_point is not None:
            return make_rule(self.operating_point.rule, self.operating_point.rule_knob())
        if self.policies_trained:
            return make_rule("consistentee", DEFAULT_POLICY_THRESHOLD)
        return make_rule("static", self.num_layers)

    def describe_operating_point(self) -> str:
        """One line saying which exit rule ``forward`` applies by default and why."""
        if self.operating_point is not None:
            return f"stored operating point: {self.operating_point.describe()}"
        if self.policies_trained:
            return f"ConsistentEE policy at threshold {DEFAULT_POLICY_THRESHOLD:g} (trained policies, no stored operating point)"
        return "full depth (the policies were not trained and no operating point is stored)"

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_pooled: bool = False,
        exit_rule: str | ExitRule | None = None,
        exit_knob: Any = None,
        return_dict: bool | None = None,
    ) -> MultiExitOutput | tuple:
        """Every exit and every policy at full depth, plus the exit the operating point takes.

        ``labels`` [B]: ``loss`` is the mean over exits of each exit's mean cross-entropy (stage 1's objective
        without its layer weights). ``logits``/``exit_layer`` follow :meth:`exit_rule` (``exit_rule`` and
        ``exit_knob`` override the operating point); computing them costs a few small ops, no sync.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        state = self.embed(input_ids, attention_mask, token_type_ids)
        logits, policies, pooled_states = [], [], []
        path = None
        for i in range(self.num_layers):
            state, pooled = self.run_layer(i, state)
            if return_pooled:
                pooled_states.append(pooled)
            logits.append(self.exit_logits(i, pooled))
            if i < self.num_layers - 1:
                policies.append(self.policy_logits(i, pooled, path))
                if self.policies_read_path:
                    path = self.advance_path(i, pooled, path)
        exit_logits = torch.stack(logits, dim=1)
        policy_logits = torch.stack(policies, dim=1) if policies else logits[0].new_zeros(len(logits[0]), 0)
        policy_probs = exit_probability(policy_logits)
        loss = None
        if labels is not None:
            labels = labels.to(exit_logits.device).long()
            flat = exit_logits.float().flatten(0, 1)
            loss = F.cross_entropy(flat, labels.repeat_interleave(self.num_layers))
        exit_layer = self._exit_layers(exit_logits, policy_probs, labels, exit_rule, exit_knob)
        chosen = exit_logits[torch.arange(len(exit_layer), device=exit_logits.device), exit_layer - 1]
        out = MultiExitOutput(
            loss=loss,
            logits=chosen,
            exit_logits=exit_logits,
            policy_logits=policy_logits,
            policy_probs=policy_probs,
            exit_layer=exit_layer,
            pooled=torch.stack(pooled_states, dim=1) if return_pooled else None,
        )
        return out.to_tuple() if return_dict is False else out

    def _exit_layers(self, exit_logits, policy_probs, labels, rule, knob) -> torch.Tensor:
        """1-based exit layer per row under the rule: ``simulate_exits``' semantics without its gathers.

        Rules decide row by row (their state is per row), so showing every row every layer and keeping each
        row's first exit gives what the engine and ``simulate_exits`` give, with no device-to-host sync.
        """
        explicit = rule is not None
        rule = self.exit_rule(rule, knob)
        if "learned_score" in rule.needs:
            message = (f"rule {rule.name!r} needs learned exit heads, which the model does not hold; use "
                       "consistentee.inference.EarlyExitPredictor with learned_heads_dir")
            if explicit:
                raise ValueError(message)
            if not getattr(self, "_warned_learned", False):
                warnings.warn(ModelFormatWarning(f"the stored operating point: {message}; forward reports full "
                                                 "depth instead"), stacklevel=3)
                self._warned_learned = True
            rule = make_rule("static", self.num_layers)
        if "labels" in rule.needs and labels is None:
            raise ValueError(f"rule {rule.name!r} needs the gold labels: pass labels")
        n, num_layers = exit_logits.shape[:2]
        device = exit_logits.device
        exit_layer = torch.full((n,), num_layers, dtype=torch.long, device=device)
        with torch.no_grad():
            probs = exit_softmax(exit_logits.detach())
            exited = torch.zeros(n, dtype=torch.bool, device=device)
            state = rule.init_state(n, device)
            for layer in range(1, num_layers):
                signals = LayerSignals(
                    probs=probs[:, layer - 1],
                    policy_prob=policy_probs[:, layer - 1].detach() if "policy_prob" in rule.needs else None,
                    labels=labels if "labels" in rule.needs else None,
                )
                decision, state = rule.decide(layer, signals, state)
                first = decision.to(torch.bool) & ~exited
                exit_layer = torch.where(first, torch.full_like(exit_layer, layer), exit_layer)
                exited |= first
        return exit_layer

    # -- saving and loading -------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        tokenizer=None,
        *,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Write config.json (with the weights' sha256), model.safetensors, the operating point, the tokenizer
        (when given) and a model card README.md, as one atomic directory swap.

        Takes the keyword arguments transformers passes (``push_to_hub()`` calls this), ignoring sharding: the
        weights are always one safetensors file. To publish with the tokenizer and this model card, save here
        and upload the folder (``huggingface_hub.upload_folder``); the inherited ``push_to_hub`` uploads the
        weights and config only and writes the hub's own model card.
        """
        if not safe_serialization:
            raise ValueError("consistentee saves weights only as safetensors (pickle can run arbitrary code)")
        if push_to_hub:
            raise ValueError("use model.push_to_hub(repo_id) or upload the saved folder with huggingface_hub")
        unknown = sorted(set(kwargs) - _IGNORED_SAVE_KWARGS)
        if unknown:
            raise TypeError(f"save_pretrained() got unexpected keyword argument(s): {', '.join(unknown)}")
        if not is_main_process:
            return
        from consistentee.model.card import model_card

        self.config.validate_settings()
        with atomic_directory(save_directory) as tmp:
            save_model(self, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            data = self.config.to_dict()
            if self.policies_trained and not data["extra"].get("policy_training"):
                # known from an older run folder's progress.json: say it in the folder itself from now on
                data["extra"] = {**data["extra"], "policy_training": {"source": "progress.json of the run"}}
            data["weights_sha256"] = sha256_file(tmp / WEIGHTS_NAME)
            (tmp / CONFIG_NAME).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            if self.operating_point is not None:
                from consistentee.exits.operating_point import save_operating_point

                save_operating_point(tmp, self.operating_point)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            (tmp / CARD_NAME).write_text(model_card(self, with_tokenizer=tokenizer is not None), encoding="utf-8")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: EarlyExitConfig | None = None,
        revision: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device_map: Any = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        **kwargs: Any,
    ) -> EarlyExitForSequenceClassification:
        """Load from a local directory or a Hugging Face hub repository id (safetensors only, checksum checked).

        Also the entry point of ``AutoModelForSequenceClassification.from_pretrained`` and ``pipeline``:
        ``device_map`` may name one device; transformers' loading options without meaning here are ignored.
        """
        if model_args:
            raise TypeError("from_pretrained() takes no positional model arguments")
        unknown = sorted(set(kwargs) - _IGNORED_LOAD_KWARGS)
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword argument(s): {', '.join(unknown)}")
        if kwargs.get("use_safetensors") is False:
            raise ValueError("consistentee loads weights only from safetensors (pickle can run arbitrary code)")
        if kwargs.get("subfolder"):
            raise ValueError("subfolder is not supported: pass the model directory itself")
        target = _load_device(device, device_map)
        directory = resolve_model_dir(pretrained_model_name_or_path, revision=revision, token=token,
                                      cache_dir=cache_dir, local_files_only=local_files_only,
                                      force_download=force_download)
        config_path = directory / CONFIG_NAME
        raw = _read_config(directory)
        if not isinstance(config, EarlyExitConfig):
            config = EarlyExitConfig.from_dict(raw, source=str(config_path))
        config._name_or_path = str(pretrained_model_name_or_path)
        model = cls(config, backbone_from_config(config.backbone_config(str(config_path))))
        _load_weights(model, directory, raw, target)
        from consistentee.exits.operating_point import load_operating_point

        model.operating_point = load_operating_point(directory)
        model.policies_trained = model.policies_trained or _finished_policy_run(directory)
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, str) and dtype != "auto":
            resolved = getattr(torch, dtype, None)
            if not isinstance(resolved, torch.dtype):
                raise ValueError(f"unknown dtype {dtype!r}")
            dtype = resolved
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.to(target).eval()


def _load_device(device: Any, device_map: Any) -> torch.device:
    """One device from ``device`` or a transformers-style ``device_map`` ("auto", "cpu", "cuda:0", 0)."""
    if device is None and device_map is not None:
        if isinstance(device_map, dict):
            places = set(device_map.values())
            if len(places) != 1:
                raise ValueError("device_map must place the whole model on one device")
            device_map = places.pop()
        if device_map == "auto":
            device_map = "cuda" if torch.cuda.is_available() else "cpu"
        device = f"cuda:{device_map}" if isinstance(device_map, int) else device_map
    return torch.device(device if device is not None else "cpu")


def _read_config(directory: Path) -> dict[str, Any]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ModelFormatError(f"{directory} has no {CONFIG_NAME}: not a consistentee model directory")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{config_path} must hold a JSON object, got {type(data).__name__}")
    return data


def _load_weights(model: EarlyExitForSequenceClassification, directory: Path, raw: dict[str, Any],
                  device: torch.device) -> None:
    """Load model.safetensors into ``model``: structure, then checksum, then finiteness, each a clear error."""
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    if not weights.is_file():
        pickled = [name for name in PICKLE_NAMES if (directory / name).exists()]
        if pickled:
            raise ModelFormatError(
                f"{directory / pickled[0]} is a pickle file; consistentee loads weights only from safetensors "
                "(pickle can run arbitrary code). Convert it with safetensors first."
            )
        raise ModelFormatError(f"{directory} has no {WEIGHTS_NAME}")
    recorded = raw.get("weights_sha256")
    if recorded is not None and not (isinstance(recorded, str) and len(recorded) == 64
                                     and all(c in "0123456789abcdef" for c in recorded)):
        raise ModelFormatError(f"{config_path}: field 'weights_sha256' must be a hex sha256, got {recorded!r}")
    try:
        missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    except Exception as exc:  # safetensors raises several types for corrupt files and shape mismatches
        raise ModelFormatError(f"cannot load {weights}: {str(exc).splitlines()[0]}") from None
    missing = required_missing(missing)
    if missing or unexpected:
        raise ModelFormatError(
            f"{weights} does not match {config_path}: "
            f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {sorted(unexpected)[:3]})"
        )
    if recorded is not None:
        actual = sha256_file(weights)
        if actual != recorded:
            raise ModelFormatError(
                f"{weights} is corrupted: its sha256 {actual[:16]}... differs from {recorded[:16]}... recorded in "
                f"{config_path} when it was saved; download or save the model again"
            )
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelFormatError(f"{weights}: tensor {name!r} holds NaN or infinite values; the file is corrupted "
                                   "or was saved from a diverged model")


def _finished_policy_run(directory: Path) -> bool:
    """A folder from before ``extra["policy_training"]``: its run's ``progress.json`` says the policies finished."""
    progress = directory.parent / "progress.json"
    if directory.name != "model" or not progress.is_file():
        return False
    try:
        return bool(json.loads(progress.read_text(encoding="utf-8")).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def sentence_embedding_pooling(directory: str | os.PathLike) -> str | None:
    """``mean`` or ``cls`` when ``directory`` is a sentence-transformers checkpoint that declares it."""
    path = Path(directory) / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    try:
        modes = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    return None


def resolve_model_dir(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> Path:
    """A local directory as is; otherwise a hub repository downloaded (safetensors, JSON and tokenizer files)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ModelFormatError(f"{path} is a file; pass the model directory")
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or not text:
        raise ModelFormatError(f"model directory {text!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                text,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
            )
        )
    except Exception as exc:  # offline, unknown repo, auth: all reported the same way
        raise ModelFormatError(
            f"{text!r} is neither a local directory nor a reachable hub repository ({type(exc).__name__})"
        ) from None


def _register() -> None:
    from consistentee.model.auto import register_auto_classes

    register_auto_classes(EarlyExitForSequenceClassification)


_register()
