"""Per-token ConsistentEE training for decoder-only LMs (METHOD.md section 7), backbone frozen.

* Stage 1: exit heads on WikiText-2 train with the weighted per-exit CE sum_l l * CE_l / sum_l l on the shifted
  targets (position t predicts token t+1); CE on ``head_positions`` sampled positions per sequence to bound
  the LM-head cost.
* Memorized layer per token (after stage 1, once): the shallowest exit l such that exits l..L all predict the
  target; L when the last exit is wrong. Kept keyed by (chunk index, position).
* Stage 2: the per-token policy with REINFORCE, K rollouts per sequence, group baseline per (sequence,
  position), reward log q_e(target_{t+1}) - beta * w * e (w = 1 - m/L, or 1 with ``reward=cost``).
* Stage 3: exit heads trained at the exits the policy takes.

Exits in training follow inference: a token that exits at layer e keeps its state e for the deeper layers
(with ``kv=propagate`` the deeper layers' K/V come from it; ``full``/``recompute`` let it keep computing).
Policy and reward are indexed by the position whose hidden state decided, and that position's target is the
next token (METHOD.md section 8: the authors' code was off by one here).

Resumes at stage granularity: each finished stage is a saved exits directory in the run directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from consistentee.generation.data import lm_chunks
from consistentee.generation.decoder import EarlyExitLM
from consistentee.training.rl import (
    group_baseline_advantage,
    masked_trajectory_log_prob,
    sample_exit_actions,
)
from consistentee.utils.io import write_json
from consistentee.utils.runtime import set_seed


@dataclass
class LMTrainConfig:
    seq_len: int = field(default=128, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    stage1_steps: int = field(default=100, metadata={"help": "stage-1 steps (exit heads)"})
    head_positions: int = field(default=32, metadata={"help": "positions per sequence with an exit-head CE (cost bound)"})
    lr_heads: float = field(default=2e-3, metadata={"help": "learning rate of the exit heads"})
    memorize_chunks: int = field(default=16, metadata={"help": "sequences used by stage 2 (memorized layers computed once)"})
    stage2_steps: int = field(default=40, metadata={"help": "stage-2 steps (policy)"})
    rollouts: int = field(default=4, metadata={"help": "rollouts per sequence (group baseline)"})
    lr_policy: float = field(default=3e-3, metadata={"help": "learning rate of the policies"})
    beta: float = field(default=0.05, metadata={"help": "depth cost per layer in the reward"})
    reward: str = field(default="hardness", metadata={"help": "hardness: -beta*(1-m/L)*e; cost: -beta*e",
                                                      "choices": ("hardness", "cost")})
    target: str = field(default="gold", metadata={
        "help": "what an exit must predict: the gold next token, or the full model's greedy token",
        "choices": ("gold", "full")})
    stage3_steps: int = field(default=20, metadata={"help": "stage-3 steps (heads at the policy's exits)"})
    train_kv: str = field(default="propagate", metadata={
        "help": "how exited tokens feed deeper layers in training (match the inference --kv)",
        "choices": ("propagate", "recompute", "full")})
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if self.rollouts < 2:
            raise ValueError(f"rollouts must be >= 2 for a group baseline, got {self.rollouts}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        for name in ("seq_len", "batch_size", "head_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


# --------------------------------------------------------------------------- alignment helpers


def shifted_targets(ids: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(targets [N, T], valid [N, T]): position t's target is token t+1; the last position has none."""
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = False
    if mask is not None:
        m = mask.bool()
        valid[:, :-1] &= m[:, :-1] & m[:, 1:]
        valid &= m
    return targets, valid


def token_rewards(log_q_exit: Tensor, exit_layer: Tensor, weight: Tensor, beta: float) -> Tensor:
    """Per-token reward [N, T]: log q_e(target) - beta * w * e (detached)."""
    return (log_q_exit.detach() - beta * weight.to(log_q_exit.dtype) * exit_layer.to(log_q_exit.dtype)).detach()


def memorized_layers(exit_preds: Tensor, targets: Tensor, exit_layers: list[int]) -> Tensor:
    """Token-level memorized layer [N, T] from argmax predictions [N, T, n_exits]."""
    correct = exit_preds == targets.unsqueeze(-1)
    # suffix_all[..., j] = exits j..n-1 all correct
    suffix = torch.flip(torch.cumprod(torch.flip(correct.long(), [-1]), -1), [-1]).bool()
    layers = torch.tensor(exit_layers, device=targets.device)
    idx = torch.where(suffix, torch.arange(len(exit_layers), device=targets.device), len(exit_layers))
    first = idx.min(-1).values
    return torch.where(first < len(exit_layers), layers[first.clamp(max=len(exit_layers) - 1)],
                       torch.full_like(first, exit_layers[-1]))


# --------------------------------------------------------------------------- layer loop with exits


@torch.no_grad()
def run_with_exits(model: EarlyExitLM, ids: Tensor, mask: Tensor | None = None, decide=None,
                   freeze: bool = True) -> tuple[dict[int, Tensor], Tensor]:
    """Parallel pass over ids [N, T]. ``decide(layer, h) -> bool [N, T]`` (None: no exits).

    Returns ({exit layer: state [N, T, d] at that layer (frozen rows keep their exit state)}, exit layer [N, T]).
    """
    mask = torch.ones_like(ids) if mask is None else mask
    L = model.num_layers
    h = model.embed(ids)
    cos, sin = model.rope(h, model.position_ids(mask))
    attn_mask = model.causal_mask(mask)
    exited = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    exit_layer = torch.full(ids.shape, L, dtype=torch.long, device=ids.device)
    states: dict[int, Tensor] = {}
    for i in range(L):
        out = model.layer(i, h, cos, sin, attn_mask)
        h = torch.where(exited.unsqueeze(-1), h, out) if freeze else out
        layer = i + 1
        if layer in model.exit_set:
            states[layer] = h
            if decide is not None and layer < L:
                new = decide(layer, h) & ~exited
                exit_layer = torch.where(new, torch.full_like(exit_layer, layer), exit_layer)
                exited |= new
    return states, exit_layer


def exit_log_probs_at(model: EarlyExitLM, states: dict[int, Tensor], exit_layer: Tensor, targets: Tensor,
                      grad: bool = False, only: Tensor | None = None) -> Tensor:
    """log q_e(target) [N, T] with each position's head at its own exit layer (0 where ``only`` is False)."""
    out = torch.zeros(exit_layer.shape, dtype=torch.float32, device=exit_layer.device)
    for layer in model.exit_layers:
        sel = exit_layer == layer
        if only is not None:
            sel = sel & only
        if not bool(sel.any()):
            continue
        with torch.set_grad_enabled(grad):
            logits = model.head_logits(layer, states[layer][sel])
            lp = F.log_softmax(logits.float(), -1).gather(-1, targets[sel].unsqueeze(-1)).squeeze(-1)
            out = out.index_put(sel.nonzero(as_tuple=True), lp)
    return out


# --------------------------------------------------------------------------- stages


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def stage1(model: EarlyExitLM, chunks: Tensor, cfg: LMTrainConfig, progress: bool = True) -> list[float]:
    heads = [layer for layer in model.exit_layers[:-1]]
    opt = torch.optim.Adam(model.heads.parameters(), lr=cfg.lr_heads)
    weights = torch.tensor(heads, dtype=torch.float32)
    weights = weights / weights.sum()
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for step in range(cfg.stage1_steps):
        batch = chunks[(step * cfg.batch_size + torch.arange(cfg.batch_size)) % len(chunks)].to(model.device)
        states, _ = run_with_exits(model, batch)
        targets, valid = shifted_targets(batch)
        n, t = batch.shape
        pos = torch.stack([torch.randperm(t - 1, generator=gen)[: cfg.head_positions] for _ in range(n)])
        rows = torch.arange(n).unsqueeze(1).expand_as(pos)
        tgt = targets[rows, pos]
        loss = 0.0
        for w, layer in zip(weights.tolist(), heads, strict=True):
            logits = model.head_logits(layer, states[layer][rows, pos])
            loss = loss + w * F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == cfg.stage1_steps - 1:
            _log(progress, f"stage 1 step {step + 1}/{cfg.stage1_steps}: weighted exit CE {loss.item():.3f}")
    return losses


@torch.no_grad()
def full_targets(model: EarlyExitLM, states: dict[int, Tensor]) -> Tensor:
    """The full model's greedy token at every position [N, T]."""
    return model.head_logits(model.num_layers, states[model.num_layers]).argmax(-1)


@torch.no_grad()
def compute_memorized(model: EarlyExitLM, chunks: Tensor, cfg: LMTrainConfig) -> Tensor:
    out = []
    for start in range(0, len(chunks), cfg.batch_size):
        batch = chunks[start:start + cfg.batch_size].to(model.device)
        states, _ = run_with_exits(model, batch)
        targets = full_targets(model, states) if cfg.target == "full" else shifted_targets(batch)[0]
        preds = torch.stack([model.head_logits(layer, states[layer]).argmax(-1) for layer in model.exit_layers], -1)
        out.append(memorized_layers(preds, targets, model.exit_layers))
    return torch.cat(out)


def stage2(model: EarlyExitLM, chunks: Tensor, memorized: Tensor, cfg: LMTrainConfig,
           progress: bool = True) -> list[dict]:
    L = model.num_layers
    exits = model.exit_layers
    opt = torch.optim.Adam(model.policies.parameters(), lr=cfg.lr_policy)
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed + 1)
    freeze = cfg.train_kv == "propagate"
    k = cfg.rollouts
    history = []
    for step in range(cfg.stage2_steps):
        idx = (step * cfg.batch_size + torch.arange(cfg.batch_size)) % len(chunks)
        batch = chunks[idx].to(model.device).repeat_interleave(k, 0)  # rollouts of a sequence are consecutive
        mem = memorized[idx].to(model.device).repeat_interleave(k, 0)

        def decide(layer, h):
            return sample_exit_actions(model.policy_prob(layer, h), gen)

        states, exit_layer = run_with_exits(model, batch, decide=decide, freeze=freeze)
        if cfg.target == "full":
            with torch.no_grad():
                full_states, _ = run_with_exits(model, batch[::k])
                targets = full_targets(model, full_states).repeat_interleave(k, 0)
            valid = shifted_targets(batch)[1]
        else:
            targets, valid = shifted_targets(batch)
        log_q = exit_log_probs_at(model, states, exit_layer, targets, only=valid)
        weight = (1.0 - mem.float() / L) if cfg.reward == "hardness" else torch.ones_like(mem, dtype=torch.float32)
        reward = token_rewards(log_q, exit_layer, weight, cfg.beta)  # [N*K, T]
        # group baseline per (sequence, position): groups of K consecutive values
        n = batch.shape[0] // k
        r = reward.view(n, k, -1).transpose(1, 2).reshape(-1)
        adv = group_baseline_advantage(r, k, normalize="group_std").view(n, -1, k).transpose(1, 2).reshape(reward.shape)
        # log pi of each token's trajectory, with gradient through the policies at the states they saw
        p = torch.stack([model.policy_prob(layer, states[layer]) for layer in exits[:-1]], -1)  # [N*K, T, n-1]
        exit_index = torch.searchsorted(torch.tensor(exits, device=batch.device), exit_layer) + 1
        logpi = masked_trajectory_log_prob(p.flatten(0, 1), exit_index.flatten()).view(exit_layer.shape)
        v = valid.float()
        loss = -(adv * logpi * v).sum() / v.sum().clamp(min=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = {"step": step + 1, "loss": loss.item(), "mean_exit": float(exit_layer[valid].float().mean()),
               "log_q": float(log_q[valid].mean())}
        history.append(rec)
        if step % 5 == 0 or step == cfg.stage2_steps - 1:
            _log(progress, f"stage 2 step {step + 1}/{cfg.stage2_steps}: mean exit {rec['mean_exit']:.2f}, "
                           f"log q {rec['log_q']:.3f}")
    return history


def stage3(model: EarlyExitLM, chunks: Tensor, cfg: LMTrainConfig, progress: bool = True) -> list[float]:
    opt = torch.optim.Adam(model.heads.parameters(), lr=cfg.lr_heads / 2)
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed + 2)
    freeze = cfg.train_kv == "propagate"
    losses = []
    for step in range(cfg.stage3_steps):
        idx = (step * cfg.batch_size + torch.arange(cfg.batch_size)) % len(chunks)
        batch = chunks[idx].to(model.device)

        def decide(layer, h):
            return sample_exit_actions(model.policy_prob(layer, h), gen)

        states, exit_layer = run_with_exits(model, batch, decide=decide, freeze=freeze)
        targets, valid = shifted_targets(batch)
        trainable = valid & (exit_layer < model.num_layers)
        if not bool(trainable.any()):
            continue
        lp = exit_log_probs_at(model, states, exit_layer, targets, grad=True, only=trainable)
        loss = -(lp * trainable).sum() / trainable.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == cfg.stage3_steps - 1:
            _log(progress, f"stage 3 step {step + 1}/{cfg.stage3_steps}: CE at the policy's exits {loss.item():.3f}")
    return losses


def train_exits(model: EarlyExitLM, tokenizer, run_dir: str | Path, cfg: LMTrainConfig,
                progress: bool = True) -> Path:
    """Stages 1 -> memorized -> 2 -> 3 into ``run_dir`` (each stage skipped when already saved)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    model.base.requires_grad_(False)
    write_json(run_dir / "train_config.json", asdict(cfg))
    s1_chunks = lm_chunks(tokenizer, "train", cfg.seq_len, cfg.stage1_steps * cfg.batch_size, cfg.seed)
    rl_chunks = lm_chunks(tokenizer, "train", cfg.seq_len, cfg.memorize_chunks, cfg.seed,
                          offset=cfg.stage1_steps * cfg.batch_size)
    timings = {}
    for name in ("stage1", "stage2", "stage3"):
        if (run_dir / name / "exits_config.json").is_file():
            loaded = EarlyExitLM.load_exits(run_dir / name, model.base)
            model.trainable_modules().load_state_dict(loaded.trainable_modules().state_dict())
            _log(progress, f"{name}: already done, loaded")
            continue
        start = time.perf_counter()
        if name == "stage1":
            stage1(model, s1_chunks, cfg, progress)
        elif name == "stage2":
            mem_path = run_dir / "memorized.pt"
            if mem_path.is_file():
                memorized = torch.load(mem_path, weights_only=True)
            else:
                memorized = compute_memorized(model, rl_chunks, cfg)
                torch.save(memorized, mem_path)
            _log(progress, f"memorized layers: mean {memorized.float().mean():.2f}")
            stage2(model, rl_chunks, memorized, cfg, progress)
        else:
            stage3(model, rl_chunks, cfg, progress)
        timings[name] = time.perf_counter() - start
        model.save_exits(run_dir / name, {"train": asdict(cfg)})
    (run_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n", encoding="utf-8")
    return run_dir / "stage3"
