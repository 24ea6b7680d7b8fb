"""Optional LoRA on the decoder's backbone (no dependency on peft).

Exit heads alone cannot make a shallow hidden state predict the next token well when the backbone is frozen;
a low-rank update of chosen projections in every decoder layer lets stage 1 adapt the backbone a little while
its pretrained weights stay untouched (B starts at zero, so the wrapped model starts as the original one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

#: projections a target may name, in the attention block or the MLP of a Llama-family decoder layer
_BLOCKS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        object.__setattr__(self, "targets", tuple(self.targets))
        check_targets(self.targets)

    def to_json(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` -> ("q_proj", "v_proj"), checked."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    check_targets(targets)
    return targets


def check_targets(targets: tuple[str, ...]) -> None:
    unknown = [t for t in targets if t not in _BLOCKS]
    if not targets or unknown:
        raise ValueError(f"LoRA targets must be a non-empty subset of {sorted(_BLOCKS)}, got {list(targets)}")


class LoRALinear(nn.Module):
    """``base(x) + (x A^T B^T) * alpha / r`` with the base linear frozen; B = 0 at the start (exact base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.normal_(self.lora_A, std=base.in_features ** -0.5)
        base.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        """The base weight (HF code and our layer loop sometimes read ``.weight``, e.g. for its dtype)."""
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale


def decoder_layers(base_model: nn.Module) -> nn.ModuleList:
    return base_model.model.layers


def add_lora(base_model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] | list[str],
             ) -> dict[str, nn.Parameter]:
    """Wrap the ``targets`` projections of every decoder layer of an HF causal LM in :class:`LoRALinear`.

    Returns the LoRA parameters by a stable name (``"{layer}_{target}_A"`` / ``_B``). A projection that already
    carries an adapter with the same rank and alpha is kept (reloading exits onto the base they were trained on);
    a different one is an error.
    """
    cfg = LoRAConfig(rank, alpha, tuple(targets))
    params: dict[str, nn.Parameter] = {}
    for i, layer in enumerate(decoder_layers(base_model)):
        for target in cfg.targets:
            block = getattr(layer, _BLOCKS[target])
            module = getattr(block, target)
            if isinstance(module, LoRALinear):
                if (module.rank, module.alpha) != (cfg.rank, cfg.alpha):
                    raise ValueError(f"layer {i} {target} already has a LoRA of rank {module.rank}, alpha "
                                     f"{module.alpha}; asked for rank {cfg.rank}, alpha {cfg.alpha}")
            elif isinstance(module, nn.Linear):
                module = LoRALinear(module, cfg.rank, cfg.alpha)
                setattr(block, target, module)
            else:
                raise ValueError(f"layer {i} {target} is a {type(module).__name__}, not a linear layer")
            params[f"{i}_{target}_A"], params[f"{i}_{target}_B"] = module.lora_A, module.lora_B
    return params


def has_lora(base_model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in base_model.modules())
