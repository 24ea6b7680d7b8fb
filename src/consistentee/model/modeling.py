"""A multi-exit encoder classifier: an exit classifier and a policy network after every layer.

The policy of layer l outputs p_l = P(exit at l | pooled state); ConsistentEE trains it with
reinforcement learning (METHOD.md sections 2-3). The last layer has no policy: exiting there is forced.
Saved the Hugging Face way: ``config.json`` + ``model.safetensors`` (+ the tokenizer), never pickle.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import AutoConfig

from consistentee.model.backbone import EncoderState, LayerwiseBackbone
from consistentee.model.configuration import CONFIDENCE_FEATURES, EarlyExitConfig, ModelFormatError
from consistentee.model.families import backbone_from_config, load_backbone
from consistentee.resources import resolve_model_path
from consistentee.utils.io import atomic_directory

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt")


class PolicyNetwork(nn.Module):
    """d -> hidden -> 1 MLP with GELU; its sigmoid is the probability of exiting at this layer."""

    def __init__(self, hidden_size: int, policy_hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(hidden_size, policy_hidden_size), nn.GELU(), nn.Linear(policy_hidden_size, 1)
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled).squeeze(-1)


@dataclass
class MultiExitOutput:
    #: [batch, num_layers, num_labels] logits of every exit.
    exit_logits: torch.Tensor
    #: [batch, num_layers - 1] logits of the exit policies (sigmoid gives p_l).
    policy_logits: torch.Tensor
    #: [batch, num_layers, hidden] pooled state after every layer (only with ``return_pooled=True``).
    pooled: torch.Tensor | None = None


class EarlyExitForSequenceClassification(nn.Module):
    def __init__(self, config: EarlyExitConfig, backbone: LayerwiseBackbone | None = None):
        super().__init__()
        self.config = config
        if backbone is None:
            backbone = backbone_from_config(_backbone_config(config))
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
        self.reset_policies(config.policy_features, config.policy_hidden_size)

    def reset_policies(self, features: str, hidden_size: int) -> None:
        """New, untrained policies reading ``features`` (a stage-2 choice: stage 1 never trains policies).

        They keep PyTorch's default (fan-in scaled) initialisation so that their output depends on the input
        from the first step: a near-constant policy collapses to "always continue" under the strong negative
        rewards of hard inputs before it learns to tell inputs apart.
        """
        self.config = replace(self.config, policy_features=features, policy_hidden_size=hidden_size)
        inputs = {"state": self.backbone.hidden_size, "state+confidence": self.backbone.hidden_size + CONFIDENCE_FEATURES,
                  "confidence": CONFIDENCE_FEATURES}[features]
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

        Pooling defaults to what the checkpoint was trained with (METHOD.md section 2): a sentence-embedding
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

    def policy_logits(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        if index >= self.num_layers - 1:
            raise IndexError("the last layer has no policy: exiting there is forced")
        features = self.config.policy_features
        if features == "confidence":
            return self.policies[index](self.confidence_features(index, pooled))
        if features == "state+confidence":
            pooled = torch.cat([pooled, self.confidence_features(index, pooled)], dim=-1)
        return self.policies[index](pooled)

    def confidence_features(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        """[B, 3] max probability, entropy / ln C and top-2 margin of exit ``index`` (no dropout, no gradient:
        the policy reads the classifier, it does not train it)."""
        with torch.no_grad():
            probs = self.exits[index](pooled).float().softmax(-1)
            top2 = probs.topk(2, dim=-1).values
            entropy = torch.special.entr(probs).sum(-1) / math.log(probs.shape[-1])
            return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1]], dim=-1).to(pooled.dtype)

    def forward(self, input_ids, attention_mask, token_type_ids=None, return_pooled: bool = False) -> MultiExitOutput:
        """Every exit and every policy, at full depth (training and table-building)."""
        state = self.embed(input_ids, attention_mask, token_type_ids)
        logits, policies, pooled_states = [], [], []
        for i in range(self.num_layers):
            state, pooled = self.run_layer(i, state)
            if return_pooled:
                pooled_states.append(pooled)
            logits.append(self.exit_logits(i, pooled))
            if i < self.num_layers - 1:
                policies.append(self.policy_logits(i, pooled))
        policy_logits = torch.stack(policies, dim=1) if policies else logits[0].new_zeros(len(logits[0]), 0)
        return MultiExitOutput(
            exit_logits=torch.stack(logits, dim=1),
            policy_logits=policy_logits,
            pooled=torch.stack(pooled_states, dim=1) if return_pooled else None,
        )

    # -- saving and loading -------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> None:
        """Write config.json, model.safetensors (and the tokenizer) as one atomic directory swap."""
        with atomic_directory(directory) as tmp:
            (tmp / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n", encoding="utf-8")
            save_model(self, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
    ) -> EarlyExitForSequenceClassification:
        """Load from a local directory or a Hugging Face hub repository id."""
        directory = resolve_model_dir(name_or_path, revision=revision)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise ModelFormatError(f"{directory} has no {CONFIG_NAME}: not a consistentee model directory")
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{config_path} is not valid JSON ({exc})") from None
        config = EarlyExitConfig.from_dict(data, source=str(config_path))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            pickled = [name for name in PICKLE_NAMES if (directory / name).exists()]
            if pickled:
                raise ModelFormatError(
                    f"{directory / pickled[0]} is a pickle file; consistentee loads weights only from safetensors "
                    "(pickle can run arbitrary code). Convert it with safetensors first."
                )
            raise ModelFormatError(f"{directory} has no {WEIGHTS_NAME}")
        model = cls(config)
        try:
            missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
        except Exception as exc:  # safetensors raises several types for corrupt files and shape mismatches
            raise ModelFormatError(f"cannot load {weights}: {str(exc).splitlines()[0]}") from None
        if missing or unexpected:
            raise ModelFormatError(
                f"{weights} does not match {config_path}: "
                f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {sorted(unexpected)[:3]})"
            )
        return model.to(device).eval()


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


def _backbone_config(config: EarlyExitConfig):
    data = dict(config.backbone)
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ModelFormatError("the saved backbone config has no model_type")
    return AutoConfig.for_model(model_type, **data)


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a hub repository downloaded (safetensors and JSON only)."""
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
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"],
            )
        )
    except Exception as exc:  # offline, unknown repo, auth: all reported the same way
        raise ModelFormatError(
            f"{text!r} is neither a local directory nor a reachable hub repository ({type(exc).__name__})"
        ) from None
