"""Processes of a launched job (``accelerate launch``), in one place for every trainer and recipe: which process is
the main one, waiting for every process, sums and means over processes, and the gradient average of models that
are not wrapped in DDP (the encoder policy stages, the decoder stages).

With one process every helper is the identity (no collective runs), so single-process numbers never depend on them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

__all__ = ["all_finite", "all_reduce_grads", "barrier", "is_main_process", "on_main", "process_mean", "process_sum"]


def is_main_process() -> bool:
    """Rank 0 of a launched job, or a plain single process (no process group needed to ask)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process of a launched job (nothing to do in a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def on_main(accelerator: Accelerator, write: Callable[[], Any]) -> None:
    """Run ``write`` on the main process only, between barriers (the others see the finished files)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write()
    accelerator.wait_for_everyone()


def process_sum(accelerator: Accelerator, x: Tensor) -> Tensor:
    """``x`` summed over processes."""
    return x if accelerator.num_processes == 1 else accelerator.reduce(x, reduction="sum")


def process_mean(accelerator: Accelerator, x: Tensor) -> Tensor:
    """``x`` averaged over processes."""
    return x if accelerator.num_processes == 1 else accelerator.reduce(x, reduction="mean")


def all_finite(accelerator: Accelerator, loss: Tensor) -> bool:
    """Whether the loss is finite on every process (so that every process stops together when one is not)."""
    return process_mean(accelerator, torch.isfinite(loss.detach()).float()).item() >= 1


def all_reduce_grads(accelerator: Accelerator, params: list[nn.Parameter]) -> None:
    """Mean of every trainable gradient over processes, in one collective with the same layout everywhere.

    Zeros stand in for a missing gradient, and a flag per parameter says whether any process has one, so that the
    collectives match and a parameter no process touched keeps no gradient, as in a single process."""
    flat = torch.cat([
        torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float(),
                   torch.ones(1, device=p.device) if p.grad is not None else torch.zeros(1, device=p.device)])
        for p in params
    ])
    flat = accelerator.reduce(flat, reduction="sum")
    offset = 0
    world = accelerator.num_processes
    for p in params:
        n = p.numel()
        if flat[offset + n].item() > 0:  # some process has a gradient for it
            p.grad = (flat[offset:offset + n] / world).view_as(p).to(p.dtype)
        else:
            p.grad = None
        offset += n + 1
