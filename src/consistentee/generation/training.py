"""Per-token ConsistentEE training for decoder-only LMs (docs/method.md section 7), backbone frozen by default.

* Stage 1: exit heads on WikiText-2 train (or the XSum training split, ``corpus``) with the weighted per-exit CE
  sum_l l * CE_l / sum_l l on the shifted targets (position t predicts token t+1); CE on ``head_positions``
  sampled positions per sequence to bound the LM-head cost, or on every position (``head_positions=0``, the
  LayerSkip early-exit loss), optionally plus ``exit_kl`` times the KL from the last layer's distribution; with
  ``layer_dropout`` > 0 each sequence skips layer l with probability p * (2^(l/(L-1)) - 1) (LayerSkip).
* Memorized layer per token (after stage 1, once): the shallowest exit l such that exits l..L all predict the
  target; L when the last exit is wrong. Kept keyed by (chunk index, position).
* Stage 2: the per-token policy with REINFORCE, K rollouts per sequence, group baseline per (sequence,
  position), the encoder's rewards (:mod:`consistentee.training.rl`, one episode per token): ``hardness``,
  quality - beta * w * e with w = f + (1 - f) * w0 and the floor f = ``hardness_floor`` (f = 0: the paper's form,
  whose cost vanishes for every token memorized only at the last layer, most tokens of a language model);
  ``cost``, quality - beta * e; ``accuracy``, the quality alone (no depth cost). The per-token hardness w0
  (``hardness``): ``memorized``, 1 - m/L with m the token's memorized layer; ``loss``, exp(-CE_L), the full
  model's probability of the token's target (computed once after stage 1, like the memorized layers). Both
  encoder forms make sense per token; the encoder's batch-relative ``minmax`` loss normalisation is not offered
  (a token's weight would depend on the other tokens of its batch).
* Stage 3: exit heads trained at the exits the policy takes.

With ``lora_rank > 0`` a LoRA on the backbone (:mod:`.lora`, peft) is trained in stage 1 only, with the exit heads
(same optimizer and learning rate); the loss then also has the last layer's term L * CE_L (the full model is no
longer fixed, and this keeps it a good LM). Stages 2 and 3 keep it fixed, so the memorized layers and the
policies see the backbone the heads were fitted to. The pretrained weights are never changed.

Exits in training follow inference: a token that exits at layer e keeps its state e for the deeper layers
(with ``kv=propagate`` the deeper layers' K/V come from it; ``full``/``recompute`` let it keep computing).
Policy and reward are indexed by the position whose hidden state decided, and that position's target is the
next token (docs/method.md section 8: the authors' code was off by one here).

Resumes at stage granularity: each finished stage is a saved exits directory in the run directory; the
memorized layers are kept in ``memorized.safetensors``. Stage 1, the long one (hours with a LoRA on CPU), also
keeps a checkpoint every ``checkpoint_every`` steps (the trained weights, optimizer and sampling state) and resumes
from it bit for bit when the same run is started again.

Runs under ``accelerate launch`` (DDP, gloo on CPU processes or NCCL): ``batch_size`` is per process, and N
processes with batch b train like one process with batch N*b (same sequences, same sampled positions and exits,
gradients of the same global mean; :class:`Shards`). With one process the numbers are the single-process loops'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from consistentee.generation.data import lm_chunks
from consistentee.generation.decoder import EXITS_CONFIG, EarlyExitLM
from consistentee.generation.lora import LoRAConfig, parse_targets
from consistentee.training.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from consistentee.training.distributed import all_reduce_grads, on_main, process_mean, process_sum
from consistentee.training.rl import (
    HARDNESS,
    REWARD_QUALITIES,
    REWARDS,
    depth_cost_reward,
    group_baseline_advantage,
    make_reward,
    masked_trajectory_log_prob,
    reward_quality,
    sample_exit_actions,
    weight_from_hardness,
)
from consistentee.training.stage1 import shard_steps
from consistentee.utils.io import read_json, save_with, write_json
from consistentee.utils.runtime import set_seed

#: Stage 1's checkpoint while it runs (removed once stage 1 is saved).
STAGE1_CHECKPOINT = "stage1.checkpoint"
#: Memorized layer per (RL chunk, position), written once after stage 1.
MEMORIZED_FILE = "memorized.safetensors"
MEMORIZED_KEY = "memorized"
#: The full model's loss per (RL chunk, position), written once after stage 1 when ``hardness="loss"``.
FINAL_LOSS_FILE = "final_exit_loss.safetensors"
FINAL_LOSS_KEY = "final_exit_loss"


@dataclass
class LMTrainConfig:
    """Decoder exit training. Fields with ``"stage1": True`` in their metadata are the settings a stage-1 checkpoint
    must share to be resumed."""

    seq_len: int = field(default=128, metadata={"stage1": True, "help": "tokens per training sequence"})
    batch_size: int = field(default=4, metadata={"stage1": True,
        "help": "sequences per step and process (under accelerate launch the global batch is N times this)"})
    stage1_steps: int = field(default=100, metadata={"stage1": True, "help": "stage-1 steps (exit heads)"})
    stage1_windows: int = field(default=0, metadata={"stage1": True, "advanced": True,
        "help": "distinct training sequences of stage 1, all processes together, cycled over in order when the "
                "steps need more (epochs over a small corpus such as XSum's 1,708 windows of 128 tokens); 0: one "
                "new sequence per sequence of the steps"})
    checkpoint_every: int = field(default=50, metadata={"advanced": True,
        "help": "stage-1 steps between checkpoints a stopped run resumes from (0: none)"})
    stage1_snapshots: str = field(default="", metadata={"advanced": True,
        "help": "comma-separated stage-1 steps at which the exits (and LoRA) are also saved, as stage1-step<N> "
                "beside stage1 (train-lm: RUN_DIR/exits/): a learning curve of one run (e.g. per-exit agreement "
                "against steps)"})
    head_positions: int = field(default=32, metadata={"stage1": True, "advanced": True,
        "help": "positions per sequence with an exit-head CE (cost bound); 0: every position (LayerSkip)"})
    corpus: str = field(default="wikitext", metadata={"stage1": True,
        "help": "training text: WikiText-2 train, or the XSum training split (BIG-bench sdist; never a test "
                "article)", "choices": ("wikitext", "xsum")})
    layer_dropout: float = field(default=0.0, metadata={"stage1": True, "advanced": True,
        "help": "stage 1: LayerSkip layer dropout, the rate of the last layer (rising exponentially from 0 at "
                "the first); each sequence skips a layer as a whole"})
    exit_kl: float = field(default=0.0, metadata={"stage1": True, "advanced": True,
        "help": "stage 1: weight of the KL from the last layer's distribution (detached) to each exit's"})
    lr_heads: float = field(default=2e-3, metadata={"stage1": True, "help": "learning rate of the exit heads"})
    memorize_chunks: int = field(default=16, metadata={"advanced": True,
        "help": "sequences used by stages 2 and 3, all processes together (memorized layers computed once)"})
    stage2_steps: int = field(default=40, metadata={"help": "stage-2 steps (policy)"})
    rollouts: int = field(default=4, metadata={"help": "rollouts per sequence (group baseline)"})
    lr_policy: float = field(default=3e-3, metadata={"help": "learning rate of the policies"})
    beta: float = field(default=0.05, metadata={"help": "depth cost per layer in the reward"})
    reward: str = field(default="hardness", metadata={"advanced": True,
        "help": "hardness: quality - beta*w*e, w = f+(1-f)*w0 (w0: --hardness); cost: quality - beta*e; accuracy: "
                "the quality alone", "choices": tuple(REWARDS)})
    hardness: str = field(default="memorized", metadata={"advanced": True,
        "help": "the per-token hardness w0 of the hardness reward: memorized (1 - m/L, m the token's memorized "
                "layer) or loss (exp(-CE), the full model's probability of the token's target)",
        "choices": tuple(HARDNESS)})
    hardness_floor: float = field(default=0.0, metadata={"advanced": True,
        "help": "floor f of the hardness weight (0: the paper's 1 - m/L, which is 0 when m = L; 1: the cost-only "
                "form)"})
    reward_quality: str = field(default="correct", metadata={"advanced": True,
        "help": "the reward's quality term at the exit: correct (1 when the exit's argmax is the target token) or "
                "log_prob (log q_e(target), docs/method.md; it punishes confident early mistakes so hard that the "
                "policies learn never to exit)", "choices": REWARD_QUALITIES})
    advantage_norm: str = field(default="batch_std", metadata={"advanced": True,
        "help": "batch_std: one advantage scale for the global batch; group_std: per (sequence, position) group "
                "of K rollouts", "choices": ("batch_std", "group_std")})
    target: str = field(default="gold", metadata={"advanced": True,
        "help": "what an exit must predict: the gold next token, or the full model's greedy token",
        "choices": ("gold", "full")})
    stage3_steps: int = field(default=20, metadata={"help": "stage-3 steps (heads at the policy's exits)"})
    train_kv: str = field(default="propagate", metadata={"advanced": True,
        "help": "how exited tokens feed deeper layers in training (match the inference --kv)",
        "choices": ("propagate", "recompute", "full")})
    lora_rank: int = field(default=0, metadata={"stage1": True,
        "help": "rank of a LoRA on the backbone, trained with the exit heads in stage 1 (0: backbone frozen)"})
    lora_alpha: float = field(default=16.0, metadata={"stage1": True, "advanced": True,
        "help": "LoRA scale numerator (update scaled by alpha/rank)"})
    lora_targets: str = field(default="q_proj,v_proj", metadata={"stage1": True, "advanced": True,
        "help": "comma-separated projections of every decoder layer that get a LoRA "
                "(q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"})
    seed: int = field(default=0, metadata={"stage1": True, "advanced": True, "help": "random seed"})

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank > 0:
            self.lora_config()  # checks alpha and the targets
        if self.rollouts < 2:
            raise ValueError(f"rollouts must be >= 2 for a group baseline, got {self.rollouts}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.head_positions < 0:
            raise ValueError(f"head_positions must be >= 0, got {self.head_positions}")
        if self.stage1_windows < 0:
            raise ValueError(f"stage1_windows must be >= 0, got {self.stage1_windows}")
        bad = [s for s in self.stage1_snapshots.split(",") if s.strip() and not s.strip().isdigit()]
        if bad:
            raise ValueError(f"stage1_snapshots must be comma-separated step numbers, got {self.stage1_snapshots!r}")
        for name in ("hardness_floor", "layer_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.exit_kl < 0:
            raise ValueError(f"exit_kl must be >= 0, got {self.exit_kl}")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; choose one of {', '.join(REWARDS)}")
        if self.hardness not in HARDNESS:
            raise ValueError(f"unknown hardness signal {self.hardness!r}; choose one of {', '.join(HARDNESS)}")

    def snapshot_steps(self) -> set[int]:
        return {int(s) for s in self.stage1_snapshots.split(",") if s.strip()}

    def lora_config(self) -> LoRAConfig | None:
        """The backbone LoRA, or None for a frozen backbone."""
        if self.lora_rank == 0:
            return None
        return LoRAConfig(self.lora_rank, self.lora_alpha, parse_targets(self.lora_targets))


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


#: Per-token reward [N, T]: quality - beta * w * e (detached), the encoder's (one implementation, training.rl).
token_rewards = depth_cost_reward


def hardness_weight(memorized: Tensor, num_layers: int, floor: float) -> Tensor:
    """w = f + (1 - f)(1 - m/L) of memorized layers: with f > 0 depth costs something for every token, hard ones
    least (:func:`~consistentee.training.rl.weight_from_hardness`)."""
    return weight_from_hardness("memorized", memorized, num_layers, floor)


def layer_dropout_rates(num_layers: int, rate: float) -> Tensor:
    """LayerSkip's per-layer skip probabilities: rate * (2^(i/(L-1)) - 1) for layer i = 0..L-1."""
    i = torch.arange(num_layers, dtype=torch.float32)
    return rate * (torch.pow(2.0, i / max(num_layers - 1, 1)) - 1.0)


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


def run_with_exits(model: EarlyExitLM, ids: Tensor, mask: Tensor | None = None, decide=None,
                   freeze: bool = True, grad: bool = False,
                   skip: Tensor | None = None) -> tuple[dict[int, Tensor], Tensor]:
    """Parallel pass over ids [N, T]. ``decide(layer, h) -> bool [N, T]`` (None: no exits). ``grad``: keep the
    graph (stage 1 with a backbone LoRA); otherwise no graph is built. ``skip`` bool [N, L]: sequence n passes
    layer i unchanged (layer dropout).

    Returns ({exit layer: state [N, T, d] at that layer (frozen rows keep their exit state)}, exit layer [N, T]).
    """
    with torch.set_grad_enabled(grad):
        return _run_with_exits(model, ids, mask, decide, freeze, skip)


def _run_with_exits(model: EarlyExitLM, ids: Tensor, mask: Tensor | None, decide,
                    freeze: bool, skip: Tensor | None = None) -> tuple[dict[int, Tensor], Tensor]:
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
        if skip is not None:
            out = torch.where(skip[:, i].view(-1, 1, 1), h, out)
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
                      grad: bool = False, only: Tensor | None = None, correct: Tensor | None = None) -> Tensor:
    """log q_e(target) [N, T] with each position's head at its own exit layer (0 where ``only`` is False); when
    ``correct`` (a bool [N, T] tensor) is given, it is filled with whether that head's argmax is the target."""
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
            if correct is not None:
                correct[sel] = logits.argmax(-1) == targets[sel]
    return out


# --------------------------------------------------------------------------- processes


def lm_accelerator(device: torch.device | str) -> Accelerator:
    """The Accelerator of decoder exit training: CPU processes (gloo) when ``device`` is the CPU; float32 always
    (the frozen backbone runs in its own dtype, no autocast), whatever the launcher's config says."""
    return Accelerator(cpu=torch.device(device).type == "cpu", mixed_precision="no")


@dataclass
class Shards:
    """This process's part of each global step, and the collectives that make N processes train like one.

    Global step k covers the ``batch_size * N`` sequences one process with that batch would see (a cyclic window
    of the seeded chunks); process p takes the p-th slice of ``batch_size`` of them, and a sequence's K rollouts
    stay on its process. Random draws (stage-1 positions, sampled exits) are made for the whole global step on
    every process with the same generator and each keeps its rows (:meth:`pad`, :meth:`mine`), so they do not
    depend on N. The model is not wrapped in DDP (the layer loop calls the layers one by one and the heads a
    token reaches differ between processes); gradients are averaged with the encoder's one-collective all-reduce
    (:func:`consistentee.training.distributed.all_reduce_grads`).
    With one process every helper is the identity: the numbers are those of the single-process loops.
    """

    accelerator: Accelerator

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def step_rows(self, step: int, batch_size: int, num_chunks: int) -> Tensor:
        """Chunk indices this process trains on at global step ``step`` (``batch_size`` per process)."""
        size = batch_size * self.world
        return self.mine((step * size + torch.arange(size)) % num_chunks)

    def mine(self, rows: Tensor) -> Tensor:
        """This process's equal slice of a tensor whose rows cover the global step."""
        if self.world == 1:
            return rows
        n = rows.shape[0] // self.world
        return rows[self.rank * n:(self.rank + 1) * n]

    def pad(self, local: Tensor) -> Tensor:
        """A global-step-sized tensor with ``local`` at this process's rows (zeros elsewhere)."""
        if self.world == 1:
            return local
        out = local.new_zeros((local.shape[0] * self.world, *local.shape[1:]))
        out[self.rank * local.shape[0]:(self.rank + 1) * local.shape[0]] = local
        return out

    def total(self, x: Tensor) -> Tensor:
        """Sum over processes."""
        return process_sum(self.accelerator, x)

    def mean_value(self, loss: Tensor) -> float:
        """The global step's loss for the log: the mean over processes of their losses (each is N times its
        share of the global mean)."""
        return process_mean(self.accelerator, loss.detach()).item()

    def mean_of(self, values: Tensor) -> float:
        """Mean of ``values`` over all processes' elements (a logged metric)."""
        if self.world == 1:
            return float(values.mean())
        sums = self.total(torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)]))
        return float(sums[0] / sums[1])

    def sync_grads(self, params: list[nn.Parameter]) -> None:
        """Average the gradients over processes (after the backward, before the optimizer step)."""
        if self.world > 1:
            all_reduce_grads(self.accelerator, params)

    def broadcast_exits(self, model: EarlyExitLM) -> None:
        """Every process starts from the main process's exit heads, policies and LoRA."""
        if self.world > 1:
            with torch.no_grad():
                for tensor in [*model.trainable_modules().state_dict().values(), *model.lora_params.values()]:
                    broadcast(tensor, from_process=0)

    def on_main(self, write: Callable[[], None]) -> None:
        """Run ``write`` on the main process only, between barriers (the others see the finished file)."""
        on_main(self.accelerator, write)

    def log(self, progress: bool, msg: str) -> None:
        if progress and self.is_main:
            print(msg, flush=True)


def process_share(total: Tensor, global_count: Tensor, world: int) -> Tensor:
    """This process's part of a mean over the global step: its sum / the global count, times N, so that the
    processes' averaged gradients are those of the global mean (with one process: ``total / count``)."""
    return total / global_count * world


def _shards(model: EarlyExitLM, accelerator: Accelerator | None) -> Shards:
    return Shards(accelerator if accelerator is not None else lm_accelerator(model.device))


def _sampled_exits(model: EarlyExitLM, gen: torch.Generator, shards: Shards) -> Callable[[int, Tensor], Tensor]:
    """``decide`` for :func:`run_with_exits`: exit actions sampled from the policies, the noise drawn for the
    global step (see :class:`Shards`)."""

    def decide(layer: int, h: Tensor) -> Tensor:
        return shards.mine(sample_exit_actions(shards.pad(model.policy_prob(layer, h)), gen))

    return decide


# --------------------------------------------------------------------------- stages


class _Trained(nn.Module):
    """The parameters stage 1 trains (exit heads, LoRA) as one module, so a checkpoint holds them alone."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


def _stage1_signature(cfg: LMTrainConfig) -> str:
    """What a stage-1 checkpoint must have been trained with to be resumed (not the later stages' settings)."""
    return json.dumps({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("stage1")},
                      sort_keys=True)


def stage1(model: EarlyExitLM, chunks: Tensor, cfg: LMTrainConfig, progress: bool = True,
           accelerator: Accelerator | None = None, checkpoint_dir: Path | None = None,
           snapshot_dir: Path | None = None) -> list[float]:
    """Exit heads on the weighted per-exit CE; returns the global step losses.

    With ``checkpoint_dir`` a checkpoint is written every ``cfg.checkpoint_every`` steps and a run started again
    continues from it exactly (same batches, layer dropout and positions as an uninterrupted run). With
    ``snapshot_dir`` the exits are saved there as ``stage1-step<N>`` at each of ``cfg.snapshot_steps()``."""
    shards = _shards(model, accelerator)
    lora = list(model.lora_params.values())
    # the last exit is the model itself: it only has a gradient (through the LoRA) when there is a LoRA
    heads = list(model.exit_layers) if lora else model.exit_layers[:-1]
    params = list(model.heads.parameters()) + lora
    opt = torch.optim.Adam(params, lr=cfg.lr_heads)
    weights = torch.tensor(heads, dtype=torch.float32)
    weights = weights / weights.sum()
    gen = torch.Generator().manual_seed(cfg.seed)
    drop = layer_dropout_rates(model.num_layers, cfg.layer_dropout)
    losses: list[float] = []
    trained = _Trained(params)
    snapshots = cfg.snapshot_steps()
    start = 0
    if checkpoint_dir is not None and find_checkpoint(checkpoint_dir) is not None:
        state = load_checkpoint(checkpoint_dir, trained)
        if state["config"] != _stage1_signature(cfg):
            raise ValueError(f"{checkpoint_dir}: a stage-1 checkpoint of other settings ({state['config']}); "
                             "use the same settings or another run directory")
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start, losses = int(state["step"]), state["losses"].tolist()
        shards.log(progress, f"stage 1: resuming at step {start + 1}/{cfg.stage1_steps} from {checkpoint_dir}")
    for step in range(start, cfg.stage1_steps):
        batch = chunks[shards.step_rows(step, cfg.batch_size, len(chunks))].to(model.device)
        n, t = batch.shape
        skip = None
        if cfg.layer_dropout > 0:  # drawn for the global step, like the positions
            skip = shards.mine(torch.rand(n * shards.world, model.num_layers, generator=gen) < drop).to(model.device)
        states, _ = run_with_exits(model, batch, grad=bool(lora), skip=skip)
        targets, valid = shifted_targets(batch)
        if cfg.head_positions == 0:  # every position with a target
            pos = torch.arange(t - 1).expand(n, t - 1)
        else:  # positions of every sequence of the global step, drawn in order; this process keeps its rows
            pos = shards.mine(torch.stack([torch.randperm(t - 1, generator=gen)[: cfg.head_positions]
                                           for _ in range(n * shards.world)]))
        rows = torch.arange(n).unsqueeze(1).expand_as(pos)
        tgt = targets[rows, pos]
        teacher = None
        if cfg.exit_kl > 0:
            with torch.no_grad():
                teacher = F.log_softmax(model.head_logits(model.num_layers, states[model.num_layers][rows, pos])
                                        .float(), -1).flatten(0, 1)
        # every process has the same number of positions: the mean of the processes' means is the global mean
        loss = 0.0
        for w, layer in zip(weights.tolist(), heads, strict=True):
            logits = model.head_logits(layer, states[layer][rows, pos]).float().flatten(0, 1)
            loss = loss + w * F.cross_entropy(logits, tgt.flatten())
            if teacher is not None and layer < model.num_layers:
                kl = F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="batchmean")
                loss = loss + cfg.exit_kl * w * kl
        opt.zero_grad()
        loss.backward()
        shards.sync_grads(params)
        opt.step()
        losses.append(shards.mean_value(loss))
        if step % 10 == 0 or step == cfg.stage1_steps - 1:
            shards.log(progress, f"stage 1 step {step + 1}/{cfg.stage1_steps}: weighted exit CE {losses[-1]:.3f}")
        done = step + 1
        if snapshot_dir is not None and done in snapshots:
            shards.on_main(lambda done=done: model.save_exits(snapshot_dir / f"stage1-step{done}",
                                                              {"train": asdict(cfg), "stage1_step": done}))
        if checkpoint_dir is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                and done < cfg.stage1_steps:
            state = {"step": done, "optimizer": opt.state_dict(), "generator": gen.get_state(),
                     "losses": torch.tensor(losses, dtype=torch.float64), "config": _stage1_signature(cfg)}
            shards.on_main(lambda state=state: save_checkpoint(checkpoint_dir, trained, state))
    return losses


@torch.no_grad()
def full_targets(model: EarlyExitLM, states: dict[int, Tensor]) -> Tensor:
    """The full model's greedy token at every position [N, T]."""
    return model.head_logits(model.num_layers, states[model.num_layers]).argmax(-1)


def _per_token(model: EarlyExitLM, chunks: Tensor, cfg: LMTrainConfig, accelerator: Accelerator | None,
               dtype: torch.dtype, table: Callable[[dict[int, Tensor], Tensor], Tensor]) -> Tensor:
    """``table(states, targets)`` of every chunk and position [len(chunks), T] after a full-depth pass, on every
    process: each process computes its slices of batches of ``batch_size * N`` chunks, and the rows are summed over
    processes in their order."""
    shards = _shards(model, accelerator)
    out = torch.zeros(chunks.shape, dtype=dtype, device=model.device)
    for shard in shard_steps(list(range(len(chunks))), cfg.batch_size, shards.world, shards.rank):
        if not any(shard.weights):  # a filler: this process has no chunk in the short last batch
            continue
        batch = chunks[shard.indices].to(model.device)
        states, _ = run_with_exits(model, batch)
        targets = full_targets(model, states) if cfg.target == "full" else shifted_targets(batch)[0]
        out[shard.indices] = table(states, targets)
    return shards.total(out)


@torch.no_grad()
def compute_memorized(model: EarlyExitLM, chunks: Tensor, cfg: LMTrainConfig,
                      accelerator: Accelerator | None = None) -> Tensor:
    """Memorized layer of every chunk and position [len(chunks), T] (on every process, see :func:`_per_token`)."""

    def table(states: dict[int, Tensor], targets: Tensor) -> Tensor:
        preds = torch.stack([model.head_logits(layer, states[layer]).argmax(-1) for layer in model.exit_layers], -1)
        return memorized_layers(preds, targets, model.exit_layers)

    return _per_token(model, chunks, cfg, accelerator, torch.long, table)


@torch.no_grad()
def compute_final_exit_loss(model: EarlyExitLM, chunks: Tensor, cfg: LMTrainConfig,
                            accelerator: Accelerator | None = None) -> Tensor:
    """The full model's loss -log q_L(target) of every chunk and position [len(chunks), T] (0 at the last position,
    which has no target): the signal of the ``loss`` hardness (on every process, see :func:`_per_token`)."""

    def table(states: dict[int, Tensor], targets: Tensor) -> Tensor:
        logits = model.head_logits(model.num_layers, states[model.num_layers]).float()
        loss = -F.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss[:, -1] = 0.0
        return loss

    return _per_token(model, chunks, cfg, accelerator, torch.float32, table)


def _by_position(x: Tensor, k: int) -> Tensor:
    """[N*K, T] (the K rollouts of a sequence consecutive) -> flat, each (sequence, position)'s K values
    consecutive: the groups of the group baseline."""
    return x.view(-1, k, x.shape[-1]).transpose(1, 2).reshape(-1)


def stage2(model: EarlyExitLM, chunks: Tensor, hardness: Tensor, cfg: LMTrainConfig,
           progress: bool = True, accelerator: Accelerator | None = None) -> list[dict]:
    """The per-token policies by REINFORCE with a group baseline; returns one record per global step. ``hardness``
    is the per-token signal of ``cfg.hardness`` [len(chunks), T]: the memorized layers, or the full model's loss."""
    shards = _shards(model, accelerator)
    reward_fn = make_reward(cfg.reward, cfg.beta)
    L = model.num_layers
    exits = model.exit_layers
    opt = torch.optim.Adam(model.policies.parameters(), lr=cfg.lr_policy)
    params = list(model.policies.parameters())
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed + 1)
    decide = _sampled_exits(model, gen, shards)
    freeze = cfg.train_kv == "propagate"
    k = cfg.rollouts
    history = []
    for step in range(cfg.stage2_steps):
        idx = shards.step_rows(step, cfg.batch_size, len(chunks))
        batch = chunks[idx].to(model.device).repeat_interleave(k, 0)  # rollouts of a sequence are consecutive
        signal = hardness[idx].to(model.device).repeat_interleave(k, 0)
        states, exit_layer = run_with_exits(model, batch, decide=decide, freeze=freeze)
        if cfg.target == "full":
            with torch.no_grad():
                full_states, _ = run_with_exits(model, batch[::k])
                targets = full_targets(model, full_states).repeat_interleave(k, 0)
            valid = shifted_targets(batch)[1]
        else:
            targets, valid = shifted_targets(batch)
        right = torch.zeros_like(valid)
        log_q = exit_log_probs_at(model, states, exit_layer, targets, only=valid, correct=right)
        quality = reward_quality(cfg.reward_quality, log_q, right)
        weight = weight_from_hardness(cfg.hardness, signal, L, cfg.hardness_floor) if cfg.reward == "hardness" \
            else None
        reward = reward_fn(quality, exit_layer, weight, L)  # [N*K, T]
        # group baseline per (sequence, position); batch_std scales by every process's valid tokens
        adv = group_baseline_advantage(_by_position(reward, k), k, cfg.advantage_norm,
                                       weight=_by_position(valid.float(), k), total=shards.total)
        n = batch.shape[0] // k
        adv = adv.view(n, -1, k).transpose(1, 2).reshape(reward.shape)
        # log pi of each token's trajectory, with gradient through the policies at the states they saw
        p = torch.stack([model.policy_prob(layer, states[layer]) for layer in exits[:-1]], -1)  # [N*K, T, n-1]
        exit_index = torch.searchsorted(torch.tensor(exits, device=batch.device), exit_layer) + 1
        logpi = masked_trajectory_log_prob(p.flatten(0, 1), exit_index.flatten()).view(exit_layer.shape)
        v = valid.float()
        loss = process_share(-(adv * logpi * v).sum(), shards.total(v.sum()).clamp(min=1), shards.world)
        opt.zero_grad()
        loss.backward()
        shards.sync_grads(params)
        opt.step()
        rec = {"step": step + 1, "loss": shards.mean_value(loss),
               "mean_exit": shards.mean_of(exit_layer[valid].float()), "log_q": shards.mean_of(log_q[valid])}
        history.append(rec)
        if step % 5 == 0 or step == cfg.stage2_steps - 1:
            shards.log(progress, f"stage 2 step {step + 1}/{cfg.stage2_steps}: mean exit {rec['mean_exit']:.2f}, "
                                 f"log q {rec['log_q']:.3f}")
    return history


def stage3(model: EarlyExitLM, chunks: Tensor, cfg: LMTrainConfig, progress: bool = True,
           accelerator: Accelerator | None = None) -> list[float]:
    """Exit heads trained at the exits the policies take; returns the losses of the steps that trained."""
    shards = _shards(model, accelerator)
    opt = torch.optim.Adam(model.heads.parameters(), lr=cfg.lr_heads / 2)
    params = list(model.heads.parameters())
    gen = torch.Generator(device=model.device).manual_seed(cfg.seed + 2)
    decide = _sampled_exits(model, gen, shards)
    freeze = cfg.train_kv == "propagate"
    losses = []
    for step in range(cfg.stage3_steps):
        batch = chunks[shards.step_rows(step, cfg.batch_size, len(chunks))].to(model.device)
        states, exit_layer = run_with_exits(model, batch, decide=decide, freeze=freeze)
        targets, valid = shifted_targets(batch)
        trainable = valid & (exit_layer < model.num_layers)
        count = shards.total(trainable.sum())
        if not bool(count > 0):  # no process has a token that exited early
            continue
        lp = exit_log_probs_at(model, states, exit_layer, targets, grad=True, only=trainable)
        loss = process_share(-(lp * trainable).sum(), count, shards.world)
        opt.zero_grad()
        if loss.requires_grad:  # False on a process none of whose tokens exited early
            loss.backward()
        shards.sync_grads(params)
        opt.step()
        losses.append(shards.mean_value(loss))
        if step % 5 == 0 or step == cfg.stage3_steps - 1:
            shards.log(progress, f"stage 3 step {step + 1}/{cfg.stage3_steps}: CE at the policy's exits "
                                 f"{losses[-1]:.3f}")
    return losses


def _hardness_signal(model: EarlyExitLM, chunks: Tensor, cfg: LMTrainConfig, run_dir: Path, shards: Shards,
                     progress: bool) -> Tensor:
    """Stage 2's per-token hardness signal of the RL chunks: the memorized layers (``MEMORIZED_FILE``) or, with
    ``hardness="loss"``, the full model's loss (``FINAL_LOSS_FILE``); computed once (sharded over processes) and kept
    in the run directory."""
    if cfg.hardness == "loss":
        path, key, what, compute = run_dir / FINAL_LOSS_FILE, FINAL_LOSS_KEY, "final exit losses", compute_final_exit_loss
    else:
        path, key, what, compute = run_dir / MEMORIZED_FILE, MEMORIZED_KEY, "memorized layers", compute_memorized
    if path.is_file():
        signal = load_file(str(path))[key]
        if signal.shape != chunks.shape:
            raise ValueError(f"{path}: {what} of shape {tuple(signal.shape)}, the run's chunks are "
                             f"{tuple(chunks.shape)}; delete the file or use another run directory")
    else:
        signal = compute(model, chunks, cfg, shards.accelerator)
        tensors = {key: signal.cpu().contiguous()}
        shards.on_main(lambda: save_with(path, lambda tmp: save_file(tensors, str(tmp))))
    shards.log(progress, f"{what}: mean {signal.float().mean():.{3 if cfg.hardness == 'loss' else 2}f}")
    return signal


def train_exits(model: EarlyExitLM, tokenizer, run_dir: str | Path, cfg: LMTrainConfig,
                progress: bool = True, accelerator: Accelerator | None = None) -> Path:
    """Stages 1 -> memorized -> 2 -> 3 into ``run_dir`` (each stage skipped when already saved).

    Under ``accelerate launch`` every process calls this; ``cfg.batch_size`` is per process (global batch
    ``batch_size * N``), ``memorize_chunks`` counts all processes' sequences, and only the main process writes."""
    shards = _shards(model, accelerator)
    model.to(shards.accelerator.device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    model.base.requires_grad_(False)
    lora = cfg.lora_config()
    if lora is not None:
        model.add_lora(lora)
    elif model.lora is not None:
        raise ValueError("the model has a backbone LoRA but lora_rank is 0")
    shards.broadcast_exits(model)
    shards.on_main(lambda: write_json(run_dir / "train_config.json", asdict(cfg)))
    global_batch = cfg.batch_size * shards.world
    s1_windows = cfg.stage1_windows or cfg.stage1_steps * global_batch
    s1_chunks = lm_chunks(tokenizer, "train", cfg.seq_len, s1_windows, cfg.seed, corpus=cfg.corpus)
    rl_chunks = lm_chunks(tokenizer, "train", cfg.seq_len, cfg.memorize_chunks, cfg.seed, offset=s1_windows,
                          corpus=cfg.corpus)
    shards.log(progress, f"stage 1: {s1_windows} sequences, {cfg.stage1_steps * global_batch / s1_windows:.2f} epochs")
    timings = {}
    for name in ("stage1", "stage2", "stage3"):
        if (run_dir / name / EXITS_CONFIG).is_file():
            saved = read_json(run_dir / name / EXITS_CONFIG).get("lora")
            if saved != (lora.to_json() if lora else None):
                raise ValueError(f"{run_dir / name}: saved with LoRA {saved}, the run asks for "
                                 f"{lora.to_json() if lora else None}; use another run directory")
            model.load_exit_weights(run_dir / name)
            shards.log(progress, f"{name}: already done, loaded")
            continue
        start = time.perf_counter()
        if name == "stage1":
            stage1(model, s1_chunks, cfg, progress, shards.accelerator, run_dir / STAGE1_CHECKPOINT, run_dir)
        elif name == "stage2":
            signal = _hardness_signal(model, rl_chunks, cfg, run_dir, shards, progress)
            stage2(model, rl_chunks, signal, cfg, progress, shards.accelerator)
        else:
            stage3(model, rl_chunks, cfg, progress, shards.accelerator)
        timings[name] = time.perf_counter() - start
        shards.on_main(lambda name=name: model.save_exits(run_dir / name, {"train": asdict(cfg)}))
        if name == "stage1":
            shards.on_main(lambda: remove_checkpoint(run_dir / STAGE1_CHECKPOINT))
    shards.on_main(lambda: write_json(run_dir / "timings.json", timings))
    return run_dir / "stage3"
