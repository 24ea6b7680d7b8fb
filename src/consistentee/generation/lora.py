"""Optional LoRA on the decoder's backbone, through peft.

Exit heads alone cannot make a shallow hidden state predict the next token well when the backbone is frozen
(LayerSkip: the backbone must be trained for its exits); a low-rank update of chosen projections in every
decoder layer lets stage 1 adapt it while the pretrained weights stay untouched (peft starts B at zero, so the
wrapped model starts as the original one). Adapters are saved in peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained``) and merged into the weights for
inference, so that generation pays nothing for them.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

#: projections a target may name, in the attention block or the MLP of a Llama-family decoder layer
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: peft's weights file inside an adapter directory
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets),
                          lora_dropout=0.0, bias="none")


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q_proj,v_proj"`` -> ("q_proj", "v_proj"), checked."""
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    check_targets(targets)
    return targets


def check_targets(targets: tuple[str, ...]) -> None:
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown:
        raise ValueError(f"LoRA targets must be a non-empty subset of {sorted(TARGETS)}, got {list(targets)}")


def has_lora(base_model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in base_model.modules())


def add_lora(base_model: nn.Module, cfg: LoRAConfig):
    """peft adapters on ``base_model`` (modified in place; its own weights stay frozen and unchanged).

    Returns the ``PeftModel`` wrapper (needed to save and merge) and the adapter parameters by name."""
    from peft import get_peft_model

    if has_lora(base_model):
        raise ValueError("the base model already carries a LoRA (load the exits onto a fresh base model)")
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        wrapper = get_peft_model(base_model, cfg.peft_config())
    params = {name: p for name, p in base_model.named_parameters() if "lora_" in name}
    for p in params.values():
        p.requires_grad_(True)
    return wrapper, params


def save_lora(wrapper, directory: str | Path) -> None:
    """peft's format: ``directory/adapter_config.json`` and ``adapter_model.safetensors``."""
    wrapper.save_pretrained(str(directory))


def load_lora_weights(wrapper, directory: str | Path) -> None:
    """Adapter weights saved by :func:`save_lora` into an adapter of the same configuration."""
    from peft import set_peft_model_state_dict

    state = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(wrapper, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: adapter does not match the model's LoRA (missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]})")
