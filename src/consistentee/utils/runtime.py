"""Seeds and devices: a seed makes a run repeatable; the device is picked automatically.

torch and numpy are imported inside the functions: the command line imports this module for
:data:`DEVICE_CHOICES` and must stay fast for ``--help`` and input errors.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present, then Apple MPS, else the CPU."""
    import torch

    if choice not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {choice!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available on this machine")
    return torch.device(choice)


def default_mixed_precision(device: torch.device) -> str:
    """Mixed precision on GPU (bf16 where supported), full precision on CPU."""
    import torch

    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"
