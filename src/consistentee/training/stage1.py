"""Stage 1: multi-exit fine-tuning (METHOD.md section 5.1).

Recipes:
- ``pabee`` (default): backbone and every exit together, loss = sum_l l * CE_l / sum_l l.
- ``deebert``: DeeBERT's two stages: fine-tune backbone + final exit, then freeze both and train the
  other exits.

Built on Hugging Face Accelerate, so the same recipe runs on CPU, one GPU (mixed precision) or under
``accelerate launch``. Checkpoints are atomic and resume at the exact batch with the same RNG state.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from consistentee.evaluation.tables import collect_exit_tables
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.training.checkpoint import load_checkpoint, save_checkpoint
from consistentee.utils.io import read_json, write_json
from consistentee.utils.runtime import default_mixed_precision, resolve_device, set_seed

RECIPES = ("pabee", "deebert")


@dataclass
class Stage1Config:
    """Settings of stage 1 (every field is a CLI option of ``consistentee train``)."""

    epochs: int = field(default=2, metadata={"help": "epochs (per phase for the deebert recipe)"})
    batch_size: int = field(default=32, metadata={"help": "training batch size per process"})
    eval_batch_size: int = field(default=128, metadata={"help": "batch size for dev evaluation"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate of the pretrained backbone"})
    head_learning_rate: float = field(default=5e-4, metadata={"help": "peak learning rate of the new exit heads"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps with linear warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    recipe: str = field(default="pabee", metadata={"help": "pabee (weighted joint CE) or deebert (two stages)", "choices": RECIPES})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between checkpoints (also at each epoch end)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, dropout and head initialisation"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16/fp16 on GPU, none on CPU), no, fp16, bf16",
                                                     "choices": ("auto", "no", "fp16", "bf16")})

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown stage-1 recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or self.head_learning_rate <= 0:
            raise ValueError("learning rates must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")


@dataclass
class Phase:
    name: str
    #: [L] weight of each exit's CE in the loss (normalised to sum 1).
    exit_weights: torch.Tensor
    train_backbone: bool
    #: 0-based exits that are trained in this phase.
    trained_exits: list[int]


def pabee_weights(num_layers: int) -> torch.Tensor:
    w = torch.arange(1, num_layers + 1, dtype=torch.float32)
    return w / w.sum()


def phases_for(recipe: str, num_layers: int) -> list[Phase]:
    if recipe == "pabee":
        return [Phase("joint", pabee_weights(num_layers), True, list(range(num_layers)))]
    last = torch.zeros(num_layers)
    last[-1] = 1.0
    others = torch.ones(num_layers)
    others[-1] = 0.0
    return [
        Phase("final", last, True, [num_layers - 1]),
        Phase("exits", others / others.sum(), False, list(range(num_layers - 1))),
    ]


def multi_exit_loss(exit_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum over exits of the mean cross-entropy of each exit. ``exit_logits``: [B, L, C]."""
    b, n, c = exit_logits.shape
    ce = F.cross_entropy(exit_logits.float().reshape(b * n, c), labels.repeat_interleave(n), reduction="none")
    return (ce.view(b, n).mean(0) * weights.to(ce.device)).sum()


def _set_trainable(model: EarlyExitForSequenceClassification, phase: Phase) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.backbone.parameters():
        p.requires_grad_(phase.train_backbone)
    for i in phase.trained_exits:
        for p in model.exits[i].parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def optimizer_for(
    model: EarlyExitForSequenceClassification, learning_rate: float, head_learning_rate: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the new heads get their own (larger) learning rate; biases and
    norms get no weight decay."""
    heads = {id(p) for p in model.head_parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "norm" in name.lower()
        groups.setdefault((id(p) in heads, no_decay), []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": head_learning_rate if is_head else learning_rate,
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
            for (is_head, no_decay), params in groups.items()
        ]
    )


def epoch_order(n: int, seed: int, phase: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + phase * 1_009 + epoch)
    return torch.randperm(n, generator=g).tolist()


@dataclass
class Stage1Result:
    model_dir: Path
    history: list[dict]


def train_stage1(
    model: EarlyExitForSequenceClassification,
    tokenizer,
    train_set: Dataset,
    dev_set: Dataset | None,
    collate,
    cfg: Stage1Config,
    out_dir: str | Path,
    *,
    device: str = "auto",
    progress: bool = True,
    resume: bool = True,
) -> Stage1Result:
    """Train ``model`` in place; the final model is saved to ``out_dir/model`` (with the tokenizer)."""
    out_dir = Path(out_dir)
    ckpt_dir, model_dir, metrics_path = out_dir / "checkpoint", out_dir / "model", out_dir / "metrics.json"
    set_seed(cfg.seed)
    torch_device = resolve_device(device)
    mixed = default_mixed_precision(torch_device) if cfg.mixed_precision == "auto" else cfg.mixed_precision
    accelerator = Accelerator(
        cpu=torch_device.type == "cpu",
        mixed_precision=mixed,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    phases = phases_for(cfg.recipe, model.num_layers)
    steps_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * accelerator.num_processes))

    start = {"phase": 0, "epoch": 0, "step": 0, "global_step": 0}
    history: list[dict] = []
    saved_state = None
    if resume and ckpt_dir.is_dir():
        saved_state = load_checkpoint(ckpt_dir, model)
        start = {k: int(saved_state[k]) for k in start}
        history = read_json(metrics_path)["history"] if metrics_path.is_file() else []
        accelerator.print(f"resuming stage 1 from {ckpt_dir} (phase {start['phase']}, epoch {start['epoch']}, "
                          f"step {start['step']})")

    global_step = start["global_step"]
    for phase_index, phase in enumerate(phases):
        if phase_index < start["phase"]:
            continue
        _set_trainable(model, phase)
        optimizer = optimizer_for(model, cfg.learning_rate, cfg.head_learning_rate, cfg.weight_decay)
        total = steps_per_epoch * cfg.epochs
        scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
        if saved_state is not None and phase_index == start["phase"]:
            optimizer.load_state_dict(saved_state["optimizer"])
            scheduler.load_state_dict(saved_state["scheduler"])
        prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        trainable = [p for p in model.parameters() if p.requires_grad]

        first_epoch = start["epoch"] if phase_index == start["phase"] else 0
        bar = tqdm(total=total, initial=first_epoch * steps_per_epoch, desc=f"stage 1 [{phase.name}]",
                   unit="step", disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
        for epoch in range(first_epoch, cfg.epochs):
            skip = start["step"] if (phase_index == start["phase"] and epoch == start["epoch"]) else 0
            bar.update(skip)
            order = epoch_order(len(train_set), cfg.seed, phase_index, epoch)
            loader = accelerator.prepare_data_loader(
                # Its own generator: creating an iterator must not consume the global RNG that dropout uses,
                # or a resumed run would diverge from an uninterrupted one.
                DataLoader(train_set, batch_size=cfg.batch_size, sampler=order, collate_fn=collate,
                           generator=torch.Generator().manual_seed(cfg.seed)),
                device_placement=True,
            )
            if skip:
                loader = accelerator.skip_first_batches(loader, skip)
            prepared.train()
            t0, loss_sum, loss_count = time.perf_counter(), 0.0, 0
            for step, batch in enumerate(loader, start=skip):
                out = prepared(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
                loss = multi_exit_loss(out.exit_logits, batch["labels"], phase.exit_weights)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}")
                done = step + 1
                if done % cfg.checkpoint_every == 0 and done < steps_per_epoch:
                    _save(accelerator, ckpt_dir, model, optimizer, scheduler, phase_index, epoch, done, global_step)
            epoch_seconds = time.perf_counter() - t0
            record = {"phase": phase.name, "epoch": epoch + 1, "train_loss": loss_sum / max(loss_count, 1),
                      "epoch_seconds": epoch_seconds, "steps": loss_count}
            if dev_set is not None and accelerator.is_main_process:
                tables = collect_exit_tables(model, dev_set, collate, batch_size=cfg.eval_batch_size,
                                             device=accelerator.device, progress=progress, desc="dev")
                record["dev_per_exit_accuracy"] = tables.per_exit_accuracy()
                accs = " ".join(f"{100 * a:.1f}" for a in record["dev_per_exit_accuracy"])
                bar.write(f"[{phase.name}] epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}, "
                          f"dev accuracy per exit (%): {accs}  ({epoch_seconds:.0f} s)")
            history.append(record)
            if accelerator.is_main_process:
                write_json(metrics_path, {"config": asdict(cfg), "history": history, "complete": False})
            next_phase, next_epoch = (phase_index, epoch + 1) if epoch + 1 < cfg.epochs else (phase_index + 1, 0)
            _save(accelerator, ckpt_dir, model, optimizer, scheduler, next_phase, next_epoch, 0, global_step)
        bar.close()
        saved_state = None

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(model_dir, tokenizer=tokenizer)
        write_json(metrics_path, {"config": asdict(cfg), "history": history, "complete": True})
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    for p in model.parameters():
        p.requires_grad_(True)
    return Stage1Result(model_dir=model_dir, history=history)


def _save(accelerator, ckpt_dir, model, optimizer, scheduler, phase, epoch, step, global_step) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(ckpt_dir, model, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "phase": phase, "epoch": epoch, "step": step, "global_step": global_step,
        })


def stage1_complete(out_dir: str | Path) -> bool:
    path = Path(out_dir) / "metrics.json"
    return path.is_file() and bool(read_json(path).get("complete")) and (Path(out_dir) / "model").is_dir()
