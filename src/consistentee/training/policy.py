"""ConsistentEE stages 2 and 3 (METHOD.md sections 3-5): learn where each input should exit.

Recipe, per round (``rounds`` alternations):
  stage 2 ("policy"): backbone and classifiers frozen (dropout on), the policies learn by REINFORCE with a
           group baseline over K rollouts per example, reward R = log q_e(y|x) - beta * w(x) * e;
  stage 3 ("joint"):  everything trains; the classifier loss is applied only at the exit each rollout took
           (or weighted by the detached exit distribution, ``joint_loss="expected"``), plus the policy loss.
Optionally the memorized layers are recomputed between rounds.

Everything lands in ``run_dir/policies/beta-<beta>/``: ``model/`` (the model after the last finished
stage), ``progress.json`` (finished stages, timings, dev results), ``log.csv`` (one row per step: reward,
mean exit layer, exit histogram, accuracy at the taken exit, policy entropy) and, while a stage runs,
``checkpoint/``. A stopped run resumes at the stage it was in, from that stage's last checkpoint.
"""

from __future__ import annotations

import csv
import io
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from consistentee.data.dataset import seeded_order
from consistentee.exits.rules import make_rule, simulate_exits
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.training import memorized
from consistentee.training.checkpoint import load_checkpoint, save_checkpoint
from consistentee.training.rl import (
    ADVANTAGE_NORMS,
    HARDNESS,
    REWARDS,
    EpsilonSchedule,
    group_baseline_advantage,
    loss_hardness_weight,
    make_reward,
    memorized_hardness_weight,
    policy_gradient_loss,
)
from consistentee.training.rollout import repeat_batch, rollout
from consistentee.training.run import PreparedData, load_run_model, split_tables
from consistentee.training.stage1 import epoch_order, optimizer_for
from consistentee.utils.io import read_json, write_json, write_text
from consistentee.utils.runtime import default_mixed_precision, resolve_device, set_seed

JOINT_LOSSES = ("sampled", "expected")
LOG_FIELDS = ["unit", "epoch", "step", "loss", "reward", "mean_exit_layer", "exit_histogram", "accuracy_at_exit",
              "policy_entropy", "epsilon"]


@dataclass
class PolicyConfig:
    """Settings of ConsistentEE policy learning (every field is a CLI option)."""

    beta: float = field(default=0.05, metadata={"help": "depth cost per layer in the reward (>= 0)"})
    reward: str = field(default="hardness", metadata={
        "help": "hardness: log q - beta*w(x)*e; cost: log q - beta*e; accuracy: log q", "choices": tuple(REWARDS)})
    hardness: str = field(default="memorized", metadata={
        "help": "hardness signal w(x): memorized (1 - m/L) or loss (from the stage-1 final exit's loss)",
        "choices": tuple(HARDNESS)})
    advantage_norm: str = field(default="group_std", metadata={
        "help": "group_std: divide each example's advantages by the std of its K rewards (stops hard inputs from "
                "drowning easy ones); none: the plain group-mean baseline", "choices": ADVANTAGE_NORMS})
    rollouts: int = field(default=8, metadata={"help": "K: rollouts per example (fresh dropout and actions)"})
    rounds: int = field(default=1, metadata={"help": "alternations of stage 2 and stage 3"})
    policy_epochs: int = field(default=1, metadata={"help": "stage-2 (policy only) epochs per round"})
    joint_epochs: int = field(default=1, metadata={"help": "stage-3 (consistent joint) epochs per round; 0 skips it"})
    policy_batch_size: int = field(default=32, metadata={"help": "examples per step (each rolled out K times)"})
    policy_learning_rate: float = field(default=1e-3, metadata={"help": "learning rate of the policies"})
    joint_learning_rate: float = field(default=2e-5, metadata={"help": "stage-3 learning rate of the backbone"})
    joint_head_learning_rate: float = field(default=2e-4, metadata={
        "help": "stage-3 learning rate of the classifiers and policies"})
    joint_loss: str = field(default="sampled", metadata={
        "help": "stage-3 classifier loss: sampled (CE at the exit taken) or expected (CE weighted by the "
                "detached exit distribution)", "choices": JOINT_LOSSES})
    epsilon_start: float = field(default=0.0, metadata={"help": "epsilon-greedy exploration at the first step"})
    epsilon_end: float = field(default=0.0, metadata={"help": "epsilon after the decay"})
    epsilon_decay_steps: int = field(default=0, metadata={"help": "steps of linear epsilon decay"})
    refresh_memorized: bool = field(default=False, metadata={"help": "recompute memorized layers between rounds"})
    policy_train_examples: int | None = field(default=None, metadata={
        "help": "roll out on a seeded subset of the training split (all of it when unset)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    checkpoint_every: int = field(default=50, metadata={"help": "steps between checkpoints"})
    eval_batch_size: int = field(default=128, metadata={"help": "batch size of the dev evaluation"})
    seed: int = field(default=0, metadata={"help": "seed of data order, dropout and sampled actions"})
    mixed_precision: str = field(default="auto", metadata={
        "help": "auto (bf16/fp16 on GPU), no, fp16, bf16", "choices": ("auto", "no", "fp16", "bf16")})

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; choose one of {', '.join(REWARDS)}")
        if self.hardness not in HARDNESS:
            raise ValueError(f"unknown hardness signal {self.hardness!r}; choose one of {', '.join(HARDNESS)}")
        if self.joint_loss not in JOINT_LOSSES:
            raise ValueError(f"joint_loss must be one of {', '.join(JOINT_LOSSES)}, got {self.joint_loss!r}")
        if self.advantage_norm not in ADVANTAGE_NORMS:
            raise ValueError(f"advantage_norm must be one of {', '.join(ADVANTAGE_NORMS)}, got {self.advantage_norm!r}")
        if self.rollouts < 2:
            raise ValueError(f"rollouts (K) must be >= 2 for the group baseline, got {self.rollouts}")
        for name in ("rounds", "policy_batch_size", "checkpoint_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.policy_epochs < 0 or self.joint_epochs < 0 or self.policy_epochs + self.joint_epochs == 0:
            raise ValueError("policy_epochs and joint_epochs must be >= 0 and not both 0")
        for name in ("epsilon_start", "epsilon_end"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.policy_train_examples is not None and self.policy_train_examples < 1:
            raise ValueError(f"policy_train_examples must be >= 1, got {self.policy_train_examples}")


def beta_dir(run_dir: str | Path, beta: float) -> Path:
    return Path(run_dir) / "policies" / f"beta-{beta:g}"


def policy_model_dir(run_dir: str | Path, beta: float) -> Path:
    return beta_dir(run_dir, beta) / "model"


def _units(cfg: PolicyConfig) -> list[tuple[str, int, int]]:
    """(name, round, epochs) of every stage in order, e.g. r1-policy, r1-joint, r2-policy, ..."""
    units = []
    for r in range(1, cfg.rounds + 1):
        if cfg.policy_epochs:
            units.append((f"r{r}-policy", r, cfg.policy_epochs))
        if cfg.joint_epochs:
            units.append((f"r{r}-joint", r, cfg.joint_epochs))
    return units


def hardness_weights(run_dir: Path, data: PreparedData, cfg: PolicyConfig, num_layers: int,
                     memorized_file: str = memorized.FILE_NAME) -> torch.Tensor:
    """w(x) for every training example, indexed like the encoded train split."""
    ids = data.splits.train.ids
    if cfg.hardness == "memorized":
        table, saved_layers = memorized.load_memorized(run_dir, memorized_file)
        if saved_layers != num_layers:
            raise ValueError(f"memorized layers were computed for {saved_layers} layers, the model has {num_layers}")
        return memorized_hardness_weight(memorized.lookup(table, ids), num_layers)
    losses = memorized.lookup(memorized.load_final_exit_loss(run_dir, memorized_file), ids, dtype=torch.float32)
    return loss_hardness_weight(losses)


def evaluate_policy(model, data: PreparedData, split: str = "dev", threshold: float = 0.5, *, batch_size: int = 128,
                    progress: bool = False) -> dict[str, float]:
    """Accuracy and mean exit layer of the policy rule at ``threshold`` on a split (exact, from tables)."""
    tables = split_tables(model, data, split, batch_size=batch_size, progress=progress)
    result = simulate_exits(make_rule("consistentee", threshold), tables.probs, policy_probs=tables.policy_probs)
    accuracy = (result.predictions == tables.labels).float().mean().item()
    mean_exit = result.exit_layer.float().mean().item()
    return {"accuracy": accuracy, "mean_exit_layer": mean_exit, "layer_speedup": model.num_layers / mean_exit,
            "full_depth_accuracy": tables.per_exit_accuracy()[-1]}


def train_policy(
    run_dir: str | Path,
    cfg: PolicyConfig,
    *,
    device: str = "auto",
    progress: bool = True,
    log=print,
) -> Path:
    """Stages 2/3 from the run's stage-1 model for one beta; returns the saved model directory."""
    run_dir = Path(run_dir)
    out = beta_dir(run_dir, cfg.beta)
    progress_path, model_dir, ckpt_dir = out / "progress.json", out / "model", out / "checkpoint"
    state = read_json(progress_path) if progress_path.is_file() else {"completed": [], "timings": {}, "dev": {}}
    if state.get("complete"):
        log(f"beta {cfg.beta:g}: already trained ({model_dir})")
        return model_dir
    out.mkdir(parents=True, exist_ok=True)
    state["config"] = asdict(cfg)

    set_seed(cfg.seed)
    torch_device = resolve_device(device)
    mixed = default_mixed_precision(torch_device) if cfg.mixed_precision == "auto" else cfg.mixed_precision
    accelerator = Accelerator(cpu=torch_device.type == "cpu", mixed_precision=mixed)
    model, data = load_run_model(run_dir, device=str(accelerator.device))
    if state["completed"]:
        model = EarlyExitForSequenceClassification.from_pretrained(model_dir, device=accelerator.device)
    memorized_file = state.get("memorized_file", memorized.FILE_NAME)
    weights = hardness_weights(run_dir, data, cfg, model.num_layers, memorized_file).to(accelerator.device)

    train_set = data.encoded["train"]
    if cfg.policy_train_examples is not None and cfg.policy_train_examples < len(train_set):
        subset = seeded_order(data.splits.train.ids, cfg.seed)[: cfg.policy_train_examples]
        train_set = Subset(train_set, sorted(subset))
    reward_fn = make_reward(cfg.reward, cfg.beta)
    log_rows = _read_log(out / "log.csv")

    for unit_index, (unit, round_no, epochs) in enumerate(_units(cfg)):
        if unit in state["completed"]:
            continue
        if cfg.refresh_memorized and unit.endswith("-policy") and round_no > 1:
            memorized_file = f"memorized_layers_round{round_no}.json"
            if not (out / memorized_file).is_file():
                tables = split_tables(model, data, "train", batch_size=cfg.eval_batch_size, progress=progress)
                layers = memorized.memorized_layers(tables.predictions(), tables.labels)
                memorized.save_memorized(out, data.splits.train.ids, layers, model.num_layers,
                                         memorized.final_exit_loss(tables.probs, tables.labels), memorized_file)
            weights = hardness_weights(out, data, cfg, model.num_layers, memorized_file).to(accelerator.device)
        t0 = time.perf_counter()
        log_rows = _train_unit(model, unit, unit_index, epochs, train_set, data.collate, weights, reward_fn, cfg,
                               accelerator, ckpt_dir, out / "log.csv", log_rows, progress)
        dev = evaluate_policy(model, data, "dev", batch_size=cfg.eval_batch_size)
        if accelerator.is_main_process:
            model.save_pretrained(model_dir, tokenizer=_tokenizer(run_dir))
            state["completed"].append(unit)
            state["timings"][unit] = time.perf_counter() - t0
            state["dev"][unit] = dev
            write_json(progress_path, state)
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        log(f"beta {cfg.beta:g} {unit}: dev accuracy {100 * dev['accuracy']:.2f}% at mean exit layer "
            f"{dev['mean_exit_layer']:.2f} ({dev['layer_speedup']:.2f}x; full depth "
            f"{100 * dev['full_depth_accuracy']:.2f}%) in {state['timings'][unit]:.0f} s")
    state["complete"] = True
    if accelerator.is_main_process:
        write_json(progress_path, state)
    return model_dir


def _tokenizer(run_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(run_dir) / "stage1" / "model")


def _set_trainable(model, joint: bool) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(joint)
    for p in model.policies.parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _train_unit(model, unit, unit_index, epochs, train_set, collate, weights, reward_fn, cfg: PolicyConfig,
                accelerator: Accelerator, ckpt_dir: Path, log_path: Path, log_rows: list[dict], progress: bool):
    joint = unit.endswith("-joint")
    params = _set_trainable(model, joint)
    if joint:
        optimizer = optimizer_for(model, cfg.joint_learning_rate, cfg.joint_head_learning_rate, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.policy_learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_set) / (cfg.policy_batch_size * accelerator.num_processes))
    total = steps_per_epoch * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * total) if joint else 0, total)
    epsilon = EpsilonSchedule(cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_decay_steps)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 7919 + unit_index)
    start_epoch, start_step, global_step = 0, 0, 0
    if ckpt_dir.is_dir():
        saved = load_checkpoint(ckpt_dir, model)
        if saved.get("unit") == unit:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            generator.set_state(saved["generator"])
            start_epoch, start_step, global_step = int(saved["epoch"]), int(saved["step"]), int(saved["global_step"])
            log_rows = [r for r in log_rows if r["unit"] != unit or int(r["step"]) <= global_step]
            accelerator.print(f"resuming {unit} from {ckpt_dir} (epoch {start_epoch}, step {start_step})")
    num_layers = model.num_layers
    model.train()
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch + start_step, desc=f"beta {cfg.beta:g} {unit}",
               unit="step", disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    for epoch in range(start_epoch, epochs):
        skip = start_step if epoch == start_epoch else 0
        loader = DataLoader(train_set, batch_size=cfg.policy_batch_size, collate_fn=collate,
                            sampler=epoch_order(len(train_set), cfg.seed, 100 + unit_index, epoch),
                            generator=torch.Generator().manual_seed(cfg.seed))
        loader = accelerator.prepare_data_loader(loader, device_placement=True)
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)
        for step, batch in enumerate(loader, start=skip):
            batch = repeat_batch(batch, cfg.rollouts)
            eps = epsilon.value(global_step)
            with accelerator.autocast():
                ro = rollout(model, batch, train_backbone=joint, generator=generator, epsilon=eps,
                             expected_ce=joint and cfg.joint_loss == "expected")
            reward = reward_fn(ro.log_q_exit.detach(), ro.exit_layer, weights[batch["index"]], num_layers)
            advantage = group_baseline_advantage(reward, cfg.rollouts, cfg.advantage_norm)
            loss = policy_gradient_loss(ro.log_prob, advantage)
            if joint:
                loss = loss + (ro.expected_ce.mean() if ro.expected_ce is not None else -ro.log_q_exit.mean())
            accelerator.backward(loss)
            if accelerator.num_processes > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            row = _log_row(unit, epoch + 1, global_step, loss, reward, ro, num_layers, eps)
            log_rows.append(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.3f}", exit=f"{row['mean_exit_layer']:.2f}",
                            acc=f"{row['accuracy_at_exit']:.2f}")
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < steps_per_epoch:
                _checkpoint(accelerator, ckpt_dir, model, optimizer, scheduler, generator, unit, epoch, done,
                            global_step, log_path, log_rows)
        next_epoch = epoch + 1
        if next_epoch < epochs:
            _checkpoint(accelerator, ckpt_dir, model, optimizer, scheduler, generator, unit, next_epoch, 0,
                        global_step, log_path, log_rows)
    bar.close()
    if accelerator.is_main_process:
        _write_log(log_path, log_rows)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return log_rows


def _log_row(unit, epoch, step, loss, reward, ro, num_layers, eps) -> dict:
    hist = torch.bincount(ro.exit_layer.cpu(), minlength=num_layers + 1)[1:].tolist()
    entropy = (ro.entropy_sum.sum() / ro.decisions.sum().clamp_min(1)).item()
    return {"unit": unit, "epoch": epoch, "step": step, "loss": round(loss.item(), 6),
            "reward": round(reward.mean().item(), 6),
            "mean_exit_layer": round(ro.exit_layer.float().mean().item(), 4), "exit_histogram": " ".join(map(str, hist)),
            "accuracy_at_exit": round(ro.correct.float().mean().item(), 4), "policy_entropy": round(entropy, 6),
            "epsilon": eps}


def _checkpoint(accelerator, ckpt_dir, model, optimizer, scheduler, generator, unit, epoch, step, global_step,
                log_path, log_rows) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(ckpt_dir, model, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "unit": unit, "epoch": epoch, "step": step,
            "global_step": global_step,
        })
        _write_log(log_path, log_rows)


def _write_log(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def run_beta_sweep(
    run_dir: str | Path,
    betas: list[float],
    cfg: PolicyConfig,
    *,
    device: str = "auto",
    progress: bool = True,
    log=print,
) -> dict[float, Path]:
    """One policy per beta, each trained from the same stage-1 model (ConsistentEE's trade-off curve)."""
    if not betas:
        raise ValueError("the beta sweep needs at least one beta")
    results = {}
    for beta in betas:
        results[beta] = train_policy(run_dir, _with_beta(cfg, beta), device=device, progress=progress, log=log)
    return results


def _with_beta(cfg: PolicyConfig, beta: float) -> PolicyConfig:
    values = asdict(cfg)
    values["beta"] = beta
    return PolicyConfig(**values)
