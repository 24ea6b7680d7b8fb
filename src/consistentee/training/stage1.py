"""Stage 1: multi-exit fine-tuning (docs/method.md section 5).

Recipes:
- ``pabee`` (default): backbone and every exit together, loss = sum_l l * CE_l / sum_l l.
- ``deebert``: DeeBERT's two stages: fine-tune backbone + final exit, then freeze both and train the
  other exits.

Built on Hugging Face Accelerate, so the same recipe runs on CPU, one GPU (mixed precision) or under
``accelerate launch`` (DDP). Checkpoints are atomic and resume at the exact batch with the same RNG state.

Several processes: every process walks the same seeded per-epoch order; global step k covers the examples
``order[k*B:(k+1)*B]`` with ``B = batch_size * num_processes`` and process p takes the p-th slice of ``batch_size``
of them (:func:`shard_steps`), exactly the batches one process with batch ``B`` would see. Each example's loss is
weighted by ``num_processes / (examples in the global step)``, so DDP's gradient mean is the mean over the global
batch even at the short last step (Accelerate's own sharding would repeat examples from the start of the epoch
there to keep batches even). With no dropout, N processes therefore reproduce one process up to float rounding.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from consistentee.exits.tables import collect_exit_tables
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.training.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from consistentee.training.distributed import all_finite, on_main, process_mean
from consistentee.utils.io import read_json, write_json
from consistentee.utils.runtime import default_mixed_precision, resolve_device, set_seed

RECIPES = ("pabee", "deebert")


@dataclass
class Stage1Config:
    """Settings of stage 1 (every field is a CLI option of ``consistentee train``)."""

    epochs: int = field(default=2, metadata={"help": "epochs (per phase for the deebert recipe)"})
    batch_size: int = field(default=32, metadata={"help": "training batch size per process"})
    eval_batch_size: int = field(default=128, metadata={"advanced": True,
        "help": "batch size for dev evaluation"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate of the pretrained backbone"})
    head_learning_rate: float = field(default=5e-4, metadata={"advanced": True,
        "help": "peak learning rate of the new exit heads"})
    weight_decay: float = field(default=0.01, metadata={"advanced": True,
        "help": "AdamW weight decay (not on biases and norms)"})
    warmup_ratio: float = field(default=0.1, metadata={"advanced": True,
        "help": "fraction of steps with linear warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"advanced": True, "help": "gradient clipping norm"})
    recipe: str = field(default="pabee", metadata={"advanced": True,
        "help": "pabee (weighted joint CE) or deebert (two stages)", "choices": RECIPES})
    checkpoint_every: int = field(default=50, metadata={"advanced": True,
        "help": "steps between checkpoints (also at each epoch end)"})
    seed: int = field(default=0, metadata={"advanced": True,
        "help": "seed of data order, dropout and head initialisation"})
    mixed_precision: str = field(default="auto", metadata={"advanced": True,
        "help": "auto (bf16/fp16 on GPU, none on CPU), no, fp16, bf16",
                                                     "choices": ("auto", "no", "fp16", "bf16")})
    distill_weight: float = field(default=0.0, metadata={"advanced": True,
        "help": "self-distillation: weight of the KL from the last exit's distribution (detached) to every "
                "earlier exit's, added to the exits' cross-entropy (0: off)"})

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown stage-1 recipe {self.recipe!r}; choose one of {', '.join(RECIPES)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "head_learning_rate"):  # NaN passes "<= 0": ask for what is valid
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("weight_decay", "max_grad_norm", "distill_weight"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be auto, no, fp16 or bf16, got {self.mixed_precision!r}")


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite: training stops before anything more is saved."""


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


def multi_exit_loss(exit_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                    example_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum over exits of the mean cross-entropy of each exit. ``exit_logits``: [B, L, C].

    ``example_weights`` ([B]) replaces the mean over the batch by a weighted sum (see :func:`shard_steps`)."""
    b, n, c = exit_logits.shape
    ce = F.cross_entropy(exit_logits.float().reshape(b * n, c), labels.repeat_interleave(n), reduction="none")
    if example_weights is None:
        per_exit = ce.view(b, n).mean(0)
    else:
        per_exit = (ce.view(b, n) * example_weights.to(ce.device, ce.dtype).unsqueeze(1)).sum(0)
    return (per_exit * weights.to(ce.device)).sum()


def self_distillation_loss(exit_logits: torch.Tensor, weights: torch.Tensor,
                           example_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum over the exits below the last of KL(last exit || exit), the last exit detached.

    The teacher is the model's own final layer, so the shallow exits learn its full distribution (which classes it
    finds close), not only the gold label, without pulling the final layer towards them. ``weights`` are the
    exits' loss weights ([L]; the last one is ignored and the rest renormalised); 0 when no earlier exit has weight.
    """
    b, n, c = exit_logits.shape
    logits = exit_logits.float()
    teacher = F.log_softmax(logits[:, -1].detach(), dim=-1).unsqueeze(1)  # [B, 1, C]
    student = F.log_softmax(logits[:, :-1], dim=-1)  # [B, L-1, C]
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # [B, L-1]
    if example_weights is None:
        per_exit = kl.mean(0)
    else:
        per_exit = (kl * example_weights.to(kl.device, kl.dtype).unsqueeze(1)).sum(0)
    w = weights[:-1].to(kl.device, kl.dtype)
    if float(w.sum()) <= 0:
        return kl.sum() * 0.0
    return (per_exit * w / w.sum()).sum()


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
class ShardStep:
    """One global step as seen by one process."""

    #: Dataset indices this process runs (never empty: a process without examples at the short last step runs
    #: one with weight 0, so that every process takes part in the step's collectives).
    indices: list[int]
    #: Loss weight of each: num_processes / (examples in the global step), 0 for a filler.
    weights: list[float]
    #: Examples in the global step (over all processes).
    global_examples: int


def shard_steps(order: list[int], batch_size: int, num_processes: int = 1, process_index: int = 0) -> list[ShardStep]:
    """Split a per-epoch order into global steps of ``batch_size * num_processes`` examples and give process
    ``process_index`` its contiguous slice of each (the batches Accelerate's ``BatchSamplerShard`` hands out, without
    repeating examples at the end). Summing each process's weighted losses and averaging over processes (what DDP
    does to gradients) gives the mean over the global step, whatever the number of processes."""
    if batch_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"bad sharding: batch_size={batch_size}, process {process_index} of {num_processes}")
    step_size = batch_size * num_processes
    steps = []
    for start in range(0, len(order), step_size):
        chunk = order[start:start + step_size]
        mine = chunk[process_index * batch_size:(process_index + 1) * batch_size]
        if mine:
            steps.append(ShardStep(mine, [num_processes / len(chunk)] * len(mine), len(chunk)))
        else:
            steps.append(ShardStep(chunk[:1], [0.0], len(chunk)))
    return steps


def shard_loader(dataset: Dataset, steps: list[ShardStep], collate, seed: int) -> DataLoader:
    """Batches of the given steps, in order (zip it with ``steps`` for the weights)."""
    # Its own generator: creating an iterator must not consume the global RNG that dropout uses, or a resumed
    # run would diverge from an uninterrupted one.
    return DataLoader(dataset, batch_sampler=[s.indices for s in steps], collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


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
    found = find_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        saved_state = load_checkpoint(found, model)
        start = {k: int(saved_state[k]) for k in start}
        history = read_json(metrics_path)["history"] if metrics_path.is_file() else []
        # A run killed after writing an epoch's metrics but before its next checkpoint redoes that epoch.
        names = [p.name for p in phases]
        history = [h for h in history if (names.index(h["phase"]), int(h["epoch"]) - 1) < (start["phase"], start["epoch"])]
        accelerator.print(f"resuming stage 1 from {found} (phase {start['phase']}, epoch {start['epoch']}, "
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
        # The scheduler is not prepared: Accelerate would step it once per process at every step, while
        # ``total`` already counts global steps.
        prepared, optimizer = accelerator.prepare(model, optimizer)
        trainable = [p for p in model.parameters() if p.requires_grad]

        first_epoch = start["epoch"] if phase_index == start["phase"] else 0
        bar = tqdm(total=total, initial=first_epoch * steps_per_epoch, desc=f"stage 1 [{phase.name}]",
                   unit="step", disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
        for epoch in range(first_epoch, cfg.epochs):
            resumed = saved_state is not None and phase_index == start["phase"] and epoch == start["epoch"]
            skip = start["step"] if resumed else 0
            bar.update(skip)
            steps = shard_steps(epoch_order(len(train_set), cfg.seed, phase_index, epoch), cfg.batch_size,
                                accelerator.num_processes, accelerator.process_index)[skip:]
            loader = shard_loader(train_set, steps, collate, cfg.seed)
            prepared.train()
            t0 = time.perf_counter()
            loss_sum, loss_count = 0.0, 0
            if resumed and skip:
                loss_sum, loss_count = float(saved_state.get("loss_sum", 0.0)), int(saved_state.get("loss_count", 0))
            for step, (shard, batch) in enumerate(zip(steps, loader, strict=True), start=skip):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                example_weights = torch.tensor(shard.weights, device=accelerator.device)
                out = prepared(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
                loss = multi_exit_loss(out.exit_logits, batch["labels"], phase.exit_weights, example_weights)
                if cfg.distill_weight > 0:
                    loss = loss + cfg.distill_weight * self_distillation_loss(out.exit_logits, phase.exit_weights,
                                                                              example_weights)
                if not all_finite(accelerator, loss):  # every process stops together
                    raise NonFiniteLossError(
                        f"stage 1 [{phase.name}] epoch {epoch + 1} step {step + 1}: the loss is not finite "
                        f"({loss.item()}); stopped without saving the model (lower --learning-rate / "
                        f"--head-learning-rate, or check the data); the last checkpoint, if any, is kept")
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                step_loss = process_mean(accelerator, loss.detach())  # the global step's mean loss
                loss_sum, loss_count = loss_sum + step_loss.item(), loss_count + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / loss_count:.4f}")
                done = step + 1
                if done % cfg.checkpoint_every == 0 and done < steps_per_epoch:
                    _save(accelerator, ckpt_dir, model, optimizer, scheduler, phase_index, epoch, done, global_step,
                          loss_sum, loss_count)
            epoch_seconds = time.perf_counter() - t0
            record = {"phase": phase.name, "epoch": epoch + 1, "train_loss": loss_sum / max(loss_count, 1),
                      "epoch_seconds": epoch_seconds, "steps": loss_count}
            if dev_set is not None and accelerator.is_main_process:
                # Main process only; the others wait in the checkpoint's barrier below.
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

    def finish() -> None:
        model.save_pretrained(model_dir, tokenizer=tokenizer)
        write_json(metrics_path, {"config": asdict(cfg), "history": history, "complete": True})
        remove_checkpoint(ckpt_dir)

    on_main(accelerator, finish)
    for p in model.parameters():
        p.requires_grad_(True)
    return Stage1Result(model_dir=model_dir, history=history)


def _save(accelerator, ckpt_dir, model, optimizer, scheduler, phase, epoch, step, global_step,
          loss_sum: float = 0.0, loss_count: int = 0) -> None:
    on_main(accelerator, lambda: save_checkpoint(ckpt_dir, model, {
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "phase": phase, "epoch": epoch, "step": step, "global_step": global_step,
        "loss_sum": torch.tensor(loss_sum, dtype=torch.float64), "loss_count": loss_count,
    }))


def stage1_complete(out_dir: str | Path) -> bool:
    path = Path(out_dir) / "metrics.json"
    return path.is_file() and bool(read_json(path).get("complete")) and (Path(out_dir) / "model").is_dir()
