"""Learned exit heads (BERxiT-style "learning to exit"): one small head per layer predicts whether that
layer's exit classifier is right.

The heads read the same pooled state ``h_l`` as the exit classifier and the policy of layer ``l``
(:meth:`EarlyExitForSequenceClassification.run_layer`). ``score(i, pooled)`` is the sigmoid
probability that exit ``i`` (0-based, like the model's own ``exit_logits(i, ...)``) predicts the
gold label; the ``learned`` exit rule exits at the first layer whose score is ``>= tau``.

Training (:func:`train_learned_heads`) keeps the stage-1 model frozen: its pooled states and exit
predictions over the training set are computed **once**, in eval mode (dropout off), and the heads
are then fitted on that cache with binary cross-entropy (target: "exit l's argmax is the gold label")
for a few epochs. That takes seconds even on a CPU.

Saved as a directory: ``config.json`` + ``model.safetensors`` (written as one atomic directory swap).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from consistentee.exits.rules import exit_probability
from consistentee.exits.tables import ExitTables, collect_exit_tables
from consistentee.utils.io import atomic_directory

__all__ = [
    "LearnedExitHeads",
    "LearnedHeadConfig",
    "cache_pooled_states",
    "train_learned_heads",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "consistentee-learned-exit-heads"


@dataclass
class LearnedHeadConfig:
    """Settings of the learned exit heads (the ``--learned-*`` options of ``consistentee benchmark``).

    The field names carry the ``learned_`` prefix so that they never clash with stage 1's options.
    """

    learned_hidden: int = field(default=0, metadata={"advanced": True,
        "help": "hidden width of each head: 0 = Linear(d -> 1), else d -> h -> 1 MLP"})
    learned_epochs: int = field(default=5, metadata={"advanced": True,
        "help": "epochs over the cached pooled states"})
    learned_batch_size: int = field(default=256, metadata={"advanced": True,
        "help": "batch size over the cached states"})
    learned_learning_rate: float = field(default=1e-3, metadata={"advanced": True,
        "help": "Adam learning rate"})
    learned_weight_decay: float = field(default=0.0, metadata={"advanced": True,
        "help": "AdamW weight decay"})
    learned_cache_batch_size: int = field(default=128, metadata={"advanced": True,
        "help": "batch size of the pass that caches pooled states"})
    learned_seed: int = field(default=0, metadata={"advanced": True, "shorthand": "seed",
        "help": "seed of the head initialisation and data order"})

    def __post_init__(self) -> None:
        if self.learned_hidden < 0:
            raise ValueError(f"learned_hidden must be >= 0, got {self.learned_hidden}")
        for name in ("learned_epochs", "learned_batch_size", "learned_cache_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learned_learning_rate > 0:
            raise ValueError(f"learned_learning_rate must be > 0, got {self.learned_learning_rate}")
        if self.learned_weight_decay < 0:
            raise ValueError(f"learned_weight_decay must be >= 0, got {self.learned_weight_decay}")


def _head(hidden_size: int, hidden: int) -> nn.Module:
    if hidden == 0:
        return nn.Linear(hidden_size, 1)
    return nn.Sequential(nn.Linear(hidden_size, hidden), nn.GELU(), nn.Linear(hidden, 1))


class LearnedExitHeads(nn.Module):
    """``num_layers`` small heads on the pooled state; head ``i`` scores "exit ``i`` is correct"."""

    def __init__(self, hidden_size: int, num_layers: int, hidden: int = 0) -> None:
        super().__init__()
        if hidden_size < 1 or num_layers < 1 or hidden < 0:
            raise ValueError(f"invalid learned-head shape: hidden_size={hidden_size}, num_layers={num_layers}, "
                             f"hidden={hidden}")
        self.hidden_size, self.num_layers, self.hidden = int(hidden_size), int(num_layers), int(hidden)
        self.heads = nn.ModuleList(_head(self.hidden_size, self.hidden) for _ in range(self.num_layers))

    def logits(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        """[B] logit of head ``index`` (0-based) on ``pooled`` [B, d]."""
        return self.heads[index](pooled.to(self._dtype())).squeeze(-1)

    def score(self, index: int, pooled: torch.Tensor) -> torch.Tensor:
        """[B] probability that exit ``index`` (0-based) is right: the ``learned`` rule's signal."""
        return exit_probability(self.logits(index, pooled))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, L, d] pooled states of every layer -> [B, L] logits."""
        if pooled.dim() != 3 or pooled.shape[1] != self.num_layers:
            raise ValueError(f"pooled must have shape [B, {self.num_layers}, {self.hidden_size}], "
                             f"got {tuple(pooled.shape)}")
        return torch.stack([self.logits(i, pooled[:, i]) for i in range(self.num_layers)], dim=1)

    def score_all(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, L, d] -> [B, L] probabilities (the ``learned_scores`` table of :func:`simulate_exits`)."""
        return exit_probability(self.forward(pooled))

    def flops_per_layer(self) -> float:
        """FLOPs (2 x multiply-adds) of one head on one pooled vector (``extra_flops_per_layer``)."""
        d, h = float(self.hidden_size), float(self.hidden)
        return 2.0 * d if h == 0 else 2.0 * (d * h + h)

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def config_dict(self) -> dict:
        return {"format": FORMAT, "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "hidden": self.hidden}

    def save(self, directory: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write ``config.json`` (+ ``extra`` under "extra") and ``model.safetensors`` atomically."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            config = self.config_dict()
            if extra:
                config["extra"] = extra
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            save_model(self, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> LearnedExitHeads:
        directory = Path(directory)
        config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{directory} is not a learned-exit-heads directory "
                                    f"(needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path} is not a learned-exit-heads config (format {config.get('format')!r})")
        heads = cls(int(config["hidden_size"]), int(config["num_layers"]), int(config.get("hidden", 0)))
        missing, unexpected = load_model(heads, str(weights), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(f"{weights} does not match {config_path}: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        return heads.to(device).eval()

    @staticmethod
    def is_saved(directory: str | os.PathLike) -> bool:
        directory = Path(directory)
        return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


def cache_pooled_states(
    model,
    dataset: Dataset,
    collate,
    *,
    batch_size: int = 128,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "pooled states",
) -> ExitTables:
    """One eval-mode full-depth pass of ``model`` over ``dataset`` that keeps the pooled states."""
    if device is None:
        device = next(model.parameters()).device
    if len(dataset) == 0:
        raise ValueError("cannot cache pooled states of an empty dataset")
    return collect_exit_tables(model, dataset, collate, batch_size=batch_size, device=device, progress=progress,
                               desc=desc, return_pooled=True)


def train_learned_heads(
    model,
    train_dataset: Dataset | None,
    collate,
    cfg: LearnedHeadConfig | None = None,
    *,
    cache: ExitTables | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log=None,
) -> LearnedExitHeads:
    """Fit one head per layer of the frozen ``model`` on ``train_dataset`` (or a ready ``cache``).

    Targets: whether exit ``l``'s argmax is the gold label; loss: mean BCE over rows and layers. The
    model is never changed (its pooled states are computed once, in eval mode). Returns the heads in
    eval mode on ``device`` (default: the model's device); ``heads.history`` holds the mean loss per epoch.
    """
    cfg = cfg or LearnedHeadConfig()
    if device is None:
        device = next(model.parameters()).device
    if cache is None:
        if train_dataset is None:
            raise ValueError("give either train_dataset or cache")
        cache = cache_pooled_states(model, train_dataset, collate, batch_size=cfg.learned_cache_batch_size,
                                    device=device, progress=progress, desc="learned heads: caching states")
    states, targets = cache.pooled, cache.correct()
    n, num_layers, hidden_size = states.shape
    generator = torch.Generator().manual_seed(cfg.learned_seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.learned_seed)
        heads = LearnedExitHeads(hidden_size, num_layers, cfg.learned_hidden)
    heads.to(device).train()
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.learned_learning_rate,
                                  weight_decay=cfg.learned_weight_decay)
    steps = math.ceil(n / cfg.learned_batch_size)
    history: list[float] = []
    bar = tqdm(total=cfg.learned_epochs * steps, desc="learned heads", unit="step", disable=not progress,
               leave=False)
    with torch.enable_grad():
        for epoch in range(cfg.learned_epochs):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, cfg.learned_batch_size):
                rows = order[start:start + cfg.learned_batch_size]
                logits = heads(states[rows].to(device))
                loss = F.binary_cross_entropy_with_logits(logits.float(), targets[rows].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(rows)
                bar.update(1)
            history.append(total / n)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if log is not None:
                log(f"learned heads: epoch {epoch + 1}/{cfg.learned_epochs}, BCE {history[-1]:.4f}")
    bar.close()
    heads.eval()
    heads.history = history
    heads.train_config = asdict(cfg)
    return heads
