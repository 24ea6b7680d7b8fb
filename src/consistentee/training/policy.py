"""ConsistentEE stages 2 and 3 (docs/method.md sections 3-5): learn where each input should exit.

Recipe, per round (``rounds`` alternations):
  stage 2 ("policy"): backbone and classifiers frozen (dropout on), the policies learn by REINFORCE with a
           group baseline over K rollouts per example, reward R = log q_e(y|x) - beta * w(x) * e;
  stage 3 ("joint"):  everything trains; the classifier loss is applied only at the exit each rollout took
           (or weighted by the detached exit distribution, ``joint_loss="expected"``), plus the policy loss,
           plus ``anchor_weight`` times the stage-1 loss on every exit (a full pass over the batch), so that the
           deep exits, which few rollouts reach, do not lose what the shallow ones gain.
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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from consistentee.data.dataset import seeded_order
from consistentee.exits.learned import cache_pooled_states
from consistentee.exits.rules import make_rule, simulate_exits
from consistentee.model.configuration import POLICY_FEATURES
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.training import memorized
from consistentee.training.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from consistentee.training.distributed import (
    all_finite,
    all_reduce_grads,
    is_main_process,
    on_main,
    process_sum,
)
from consistentee.training.rl import (
    ADVANTAGE_NORMS,
    HARDNESS,
    REWARD_QUALITIES,
    REWARDS,
    EpsilonSchedule,
    expected_reward_loss,
    group_baseline_advantage,
    make_reward,
    reward_quality,
    weight_from_hardness,
)
from consistentee.training.rollout import ActionNoise, repeat_batch, rollout
from consistentee.training.run import (
    PreparedData,
    load_run_model,
    load_run_settings,
    policy_rows,
    split_tables,
    train_subset,
)
from consistentee.training.stage1 import (
    NonFiniteLossError,
    epoch_order,
    multi_exit_loss,
    optimizer_for,
    pabee_weights,
    shard_loader,
    shard_steps,
)
from consistentee.utils.io import read_json, write_json, write_text
from consistentee.utils.runtime import default_mixed_precision, resolve_device, set_seed

JOINT_LOSSES = ("sampled", "expected")
POLICY_LOSSES = ("sampled", "expected")
JOINT_SCOPES = ("all", "exits")
LOG_FIELDS = ["unit", "epoch", "step", "loss", "reward", "mean_exit_layer", "exit_histogram", "accuracy_at_exit",
              "policy_entropy", "epsilon"]


@dataclass
class PolicyConfig:
    """Settings of ConsistentEE policy learning (every field is a CLI option)."""

    beta: float = field(default=0.05, metadata={"help": "depth cost per layer in the reward (>= 0)"})
    reward: str = field(default="hardness", metadata={"advanced": True,
        "help": "hardness: log q - beta*w(x)*e; cost: log q - beta*e; accuracy: log q", "choices": tuple(REWARDS)})
    reward_quality: str = field(default="correct", metadata={"advanced": True,
        "help": "the reward's quality term at the exit taken: log_prob (log q_e(y|x), docs/method.md) or correct "
                "(1 when the exit's argmax is the label, else 0: the accuracy the model is judged by; log q punishes "
                "a confident early mistake so hard that policies learn to avoid shallow exits)",
        "choices": REWARD_QUALITIES})
    hardness: str = field(default="memorized", metadata={"advanced": True,
        "help": "hardness signal w(x): memorized (1 - m/L) or loss (from the stage-1 final exit's loss)",
        "choices": tuple(HARDNESS)})
    advantage_norm: str = field(default="batch_std", metadata={"advanced": True,
        "help": "group_std: divide each example's advantages by the std of its K rewards (stops hard inputs from "
                "drowning easy ones); batch_std: divide all advantages by one batch-wide scale (keeps the ratio "
                "between inputs; use it with --reward-quality correct); none: the plain group-mean baseline",
        "choices": ADVANTAGE_NORMS})
    policy_features: str = field(default="confidence", metadata={"advanced": True,
        "help": "what the policies read: state (the pooled layer state), state+confidence (also max probability, "
                "entropy and top-2 margin of that layer's exit classifier), or confidence (those three alone)",
        "choices": POLICY_FEATURES})
    policy_loss: str = field(default="sampled", metadata={"advanced": True,
        "help": "policy objective: sampled (the policy gradient over the K sampled exits: the paper's) or expected "
                "(every rollout runs to full depth and the policies get the exact gradient of the expected reward "
                "over all exits, sum_l P(exit at l) R_l: the same objective without sampling noise)",
        "choices": POLICY_LOSSES})
    policy_input_scaling: bool = field(default=False, metadata={"advanced": True,
        "help": "standardise each policy's inputs by their mean and std over the stage-2 training rows, measured "
                "on the stage-1 model before training: on small training sets the policies then tell inputs apart "
                "instead of learning one exit layer for all (docs/method.md section 3)"})
    rollouts: int = field(default=8, metadata={"help": "K: rollouts per example (fresh dropout and actions)"})
    rounds: int = field(default=1, metadata={"help": "alternations of stage 2 and stage 3"})
    policy_epochs: int = field(default=3, metadata={"help": "stage-2 (policy only) epochs per round"})
    joint_epochs: int = field(default=1, metadata={"help": "stage-3 (consistent joint) epochs per round; 0 skips it"})
    policy_batch_size: int = field(default=32, metadata={"help": "examples per step (each rolled out K times)"})
    policy_learning_rate: float = field(default=1e-2, metadata={"help": "learning rate of the policies"})
    anchor_weight: float = field(default=0.0, metadata={"advanced": True,
        "help": "stage 3: weight of the stage-1 loss on every exit (one full pass per batch) next to the loss at "
                "the exits taken; keeps full-depth accuracy (0: the paper's stage 3)"})
    joint_learning_rate: float = field(default=2e-5, metadata={"advanced": True,
        "help": "stage-3 learning rate of the backbone"})
    joint_head_learning_rate: float = field(default=2e-4, metadata={"advanced": True,
        "help": "stage-3 learning rate of the classifiers and policies"})
    joint_scope: str = field(default="all", metadata={"advanced": True,
        "help": "what stage 3 trains: all (backbone, classifiers and policies: the paper's) or exits (the classifiers "
                "but the last, and the policies; the backbone and the last classifier keep their stage-1 weights, so "
                "full depth does not change)", "choices": JOINT_SCOPES})
    joint_loss: str = field(default="sampled", metadata={"advanced": True,
        "help": "stage-3 classifier loss: sampled (CE at the exit taken) or expected (CE weighted by the "
                "detached exit distribution)", "choices": JOINT_LOSSES})
    epsilon_start: float = field(default=0.0, metadata={"advanced": True,
        "help": "epsilon-greedy exploration at the first step"})
    epsilon_end: float = field(default=0.0, metadata={"advanced": True, "help": "epsilon after the decay"})
    epsilon_decay_steps: int = field(default=0, metadata={"advanced": True,
        "help": "steps of linear epsilon decay"})
    refresh_memorized: bool = field(default=False, metadata={"advanced": True,
        "help": "recompute memorized layers between rounds"})
    policy_train_examples: int | None = field(default=None, metadata={
        "help": "roll out on a seeded subset of the training split (all of it when unset)"})
    max_grad_norm: float = field(default=1.0, metadata={"advanced": True, "help": "gradient clipping norm"})
    checkpoint_every: int = field(default=50, metadata={"advanced": True,
        "help": "steps between checkpoints"})
    eval_batch_size: int = field(default=128, metadata={"advanced": True,
        "help": "batch size of the dev evaluation"})
    seed: int = field(default=0, metadata={"advanced": True,
        "help": "seed of data order, dropout and sampled actions"})
    mixed_precision: str = field(default="auto", metadata={"advanced": True,
        "help": "auto (bf16/fp16 on GPU), no, fp16, bf16", "choices": ("auto", "no", "fp16", "bf16")})

    def __post_init__(self) -> None:
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.reward not in REWARDS:
            raise ValueError(f"unknown reward {self.reward!r}; choose one of {', '.join(REWARDS)}")
        if self.reward_quality not in REWARD_QUALITIES:
            raise ValueError(f"reward_quality must be one of {', '.join(REWARD_QUALITIES)}, got {self.reward_quality!r}")
        if self.hardness not in HARDNESS:
            raise ValueError(f"unknown hardness signal {self.hardness!r}; choose one of {', '.join(HARDNESS)}")
        if self.joint_scope not in JOINT_SCOPES:
            raise ValueError(f"joint_scope must be one of {', '.join(JOINT_SCOPES)}, got {self.joint_scope!r}")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(f"policy_loss must be one of {', '.join(POLICY_LOSSES)}, got {self.policy_loss!r}")
        if self.joint_loss not in JOINT_LOSSES:
            raise ValueError(f"joint_loss must be one of {', '.join(JOINT_LOSSES)}, got {self.joint_loss!r}")
        if self.policy_features not in POLICY_FEATURES:
            raise ValueError(f"policy_features must be one of {', '.join(POLICY_FEATURES)}, got {self.policy_features!r}")
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
        for name in ("policy_learning_rate", "joint_learning_rate", "joint_head_learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.anchor_weight, int | float) and math.isfinite(self.anchor_weight)
                and self.anchor_weight >= 0):
            raise ValueError(f"anchor_weight must be a finite number >= 0, got {self.anchor_weight!r}")
        if not (math.isfinite(self.beta) and math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"beta and max_grad_norm must be finite (max_grad_norm > 0), got {self.beta!r}, "
                             f"{self.max_grad_norm!r}")


def beta_dir(run_dir: str | Path, beta: float) -> Path:
    return Path(run_dir) / "policies" / f"beta-{beta:g}"


def policy_model_dir(run_dir: str | Path, beta: float) -> Path:
    return beta_dir(run_dir, beta) / "model"


def policies_trained(model_dir: str | Path, config=None) -> bool:
    """Whether the model folder's policies were trained by stages 2/3 (recorded in its config since this
    version; older folders inside a run directory are recognised by their finished ``progress.json``)."""
    extra = getattr(config, "extra", None) or {}
    if extra.get("policy_training"):
        return True
    progress = Path(model_dir).parent / "progress.json"
    try:
        return progress.is_file() and bool(read_json(progress).get("complete"))
    except (OSError, ValueError):
        return False


def policy_complete(run_dir: str | Path, beta: float) -> bool:
    """Whether every stage of ``beta`` finished (an interrupted run also leaves a model/ behind)."""
    path = beta_dir(run_dir, beta) / "progress.json"
    return path.is_file() and bool(read_json(path).get("complete")) and policy_model_dir(run_dir, beta).is_dir()


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
        signal = memorized.lookup(table, ids)
    else:
        signal = memorized.lookup(memorized.load_final_exit_loss(run_dir, memorized_file), ids, dtype=torch.float32)
    return weight_from_hardness(cfg.hardness, signal, num_layers)


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
    changed = _changed_settings(state.get("config"), asdict(cfg))
    if changed:
        raise ValueError(f"{out} was trained with other settings ({', '.join(changed)}); "
                         "use another --run-dir or delete that directory")
    if state.get("complete"):
        if is_main_process():
            log(f"beta {cfg.beta:g}: already trained ({model_dir})")
        return model_dir
    state["config"] = asdict(cfg)

    set_seed(cfg.seed)
    torch_device = resolve_device(device)
    mixed = default_mixed_precision(torch_device) if cfg.mixed_precision == "auto" else cfg.mixed_precision
    accelerator = Accelerator(cpu=torch_device.type == "cpu", mixed_precision=mixed)
    model, data = load_run_model(run_dir, device=str(accelerator.device))
    if state["completed"]:
        model = EarlyExitForSequenceClassification.from_pretrained(model_dir, device=next(model.parameters()).device)
    elif model.config.policy_features != cfg.policy_features:
        torch.manual_seed(cfg.seed)  # stage 1 never trains the policies: choosing their inputs now loses nothing
        model.reset_policies(cfg.policy_features, model.config.policy_hidden_size)
    memorized_file = state.get("memorized_file", memorized.FILE_NAME)
    weights = hardness_weights(run_dir, data, cfg, model.num_layers, memorized_file).to(accelerator.device)
    out.mkdir(parents=True, exist_ok=True)  # only once the run, its model and memorized layers are known good

    data_cfg, _ = load_run_settings(run_dir)
    ids = data.splits.train.ids
    rows = policy_rows(data, data_cfg)
    if cfg.policy_train_examples is not None and cfg.policy_train_examples < len(rows):
        rank = {row: position for position, row in enumerate(seeded_order(ids, cfg.seed))}
        rows = sorted(sorted(rows, key=rank.__getitem__)[: cfg.policy_train_examples])
    train_set = train_subset(data, rows)
    if cfg.policy_input_scaling and not state["completed"]:  # later units load the scaling with the saved model
        fit_policy_input_scaling(model, train_set, data.collate, batch_size=cfg.eval_batch_size, progress=progress)
    reward_fn = make_reward(cfg.reward, cfg.beta)
    log_rows = _read_log(out / "log.csv")

    for unit_index, (unit, round_no, epochs) in enumerate(_units(cfg)):
        if unit in state["completed"]:
            continue
        if cfg.refresh_memorized and unit.endswith("-policy") and round_no > 1:
            memorized_file = f"memorized_layers_round{round_no}.json"
            if accelerator.is_main_process and not (out / memorized_file).is_file():
                tables = split_tables(model, data, "train", batch_size=cfg.eval_batch_size, progress=progress)
                layers = memorized.memorized_layers(tables.predictions(), tables.labels)
                memorized.save_memorized(out, data.splits.train.ids, layers, model.num_layers,
                                         memorized.final_exit_loss(tables.probs, tables.labels), memorized_file)
            accelerator.wait_for_everyone()
            weights = hardness_weights(out, data, cfg, model.num_layers, memorized_file).to(accelerator.device)
        t0 = time.perf_counter()
        log_rows = _train_unit(model, unit, unit_index, epochs, train_set, data.collate, weights, reward_fn, cfg,
                               accelerator, ckpt_dir, out / "log.csv", log_rows, progress)
        state["completed"].append(unit)
        state["timings"][unit] = time.perf_counter() - t0
        if accelerator.is_main_process:  # the others wait below
            dev = evaluate_policy(model, data, "dev", batch_size=cfg.eval_batch_size)
            state["dev"][unit] = dev
            # the saved folder says its policies were trained (readers pick rules and defaults from it)
            model.config.extra["policy_training"] = {"beta": cfg.beta, "completed": list(state["completed"])}
            model.save_pretrained(model_dir, tokenizer=_tokenizer(run_dir))
            write_json(progress_path, state)
            remove_checkpoint(ckpt_dir)
            log(f"beta {cfg.beta:g} {unit}: dev accuracy {100 * dev['accuracy']:.2f}% at mean exit layer "
                f"{dev['mean_exit_layer']:.2f} ({dev['layer_speedup']:.2f}x; full depth "
                f"{100 * dev['full_depth_accuracy']:.2f}%) in {state['timings'][unit]:.0f} s")
        accelerator.wait_for_everyone()
    state["complete"] = True
    if accelerator.is_main_process:
        write_json(progress_path, state)
    accelerator.wait_for_everyone()
    return model_dir


#: Settings that may change between a run and its resumption without changing what is trained.
_RESUMABLE = {"checkpoint_every", "eval_batch_size", "mixed_precision"}


@torch.no_grad()
def fit_policy_input_scaling(model: EarlyExitForSequenceClassification, dataset, collate, *, batch_size: int = 128,
                             progress: bool = False) -> None:
    """Set every policy's input standardisation (:meth:`PolicyNetwork.set_input_scaling`) from one eval-mode pass
    over ``dataset``: what each policy reads there, each exit's path included, under the current exits."""
    tables = cache_pooled_states(model, dataset, collate, batch_size=batch_size, progress=progress,
                                 desc="policy input scaling")
    path = None
    for index, policy in enumerate(model.policies):
        pooled = tables.pooled[:, index].to(model.exits[index].weight)
        policy.set_input_scaling(model.policy_inputs(index, pooled, path))
        if model.policies_read_path:
            path = model.advance_path(index, pooled, path)


def _changed_settings(saved: dict | None, current: dict) -> list[str]:
    if not saved:
        return []
    return [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in current.items()
            if k not in _RESUMABLE and k in saved and saved[k] != v]


def _tokenizer(run_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(run_dir) / "stage1" / "model")


def _set_trainable(model, joint: bool, scope: str = "all") -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(joint and scope == "all")
    if joint and scope == "exits":
        for head in model.exits[:-1]:
            head.requires_grad_(True)
    for p in model.policies.parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _train_unit(model, unit, unit_index, epochs, train_set, collate, weights, reward_fn, cfg: PolicyConfig,
                accelerator: Accelerator, ckpt_dir: Path, log_path: Path, log_rows: list[dict], progress: bool):
    """One stage (policy or joint) on every process.

    The model is not wrapped in DDP (the rollout calls ``embed``/``run_layer`` directly and drops exited rows, so
    processes run different layers); instead, after each backward, every process all-reduces the same flat vector
    of all trainable gradients (zeros where a process has none) and a flag per parameter, so the collectives match
    and a parameter no process touched keeps no gradient, like in a single process. An example's K rollouts stay on
    the process that loaded it (repetition happens after loading), so group baselines are exact; the action noise
    of a global step is drawn on every process from the same generator and each takes its rows, so the sampled
    actions do not depend on the number of processes; the logged metrics are summed over processes.
    """
    joint = unit.endswith("-joint")
    params = _set_trainable(model, joint, cfg.joint_scope)
    if joint:
        optimizer = optimizer_for(model, cfg.joint_learning_rate, cfg.joint_head_learning_rate, weight_decay=0.01)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.policy_learning_rate, weight_decay=0.0)
    world, rank = accelerator.num_processes, accelerator.process_index
    steps_per_epoch = math.ceil(len(train_set) / (cfg.policy_batch_size * world))
    total = steps_per_epoch * epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * total) if joint else 0, total)
    epsilon = EpsilonSchedule(cfg.epsilon_start, cfg.epsilon_end, cfg.epsilon_decay_steps)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed * 7919 + unit_index)
    start_epoch, start_step, global_step = 0, 0, 0
    found = find_checkpoint(ckpt_dir)
    if found is not None:
        saved = load_checkpoint(found, model)
        if saved.get("unit") == unit:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            generator.set_state(saved["generator"])
            start_epoch, start_step, global_step = int(saved["epoch"]), int(saved["step"]), int(saved["global_step"])
            log_rows = [r for r in log_rows if r["unit"] != unit or int(r["step"]) <= global_step]
            accelerator.print(f"resuming {unit} from {found} (epoch {start_epoch}, step {start_step})")
    num_layers = model.num_layers
    k = cfg.rollouts
    model.train()
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch + start_step, desc=f"beta {cfg.beta:g} {unit}",
               unit="step", disable=not (progress and accelerator.is_main_process), dynamic_ncols=True)
    for epoch in range(start_epoch, epochs):
        skip = start_step if epoch == start_epoch else 0
        steps = shard_steps(epoch_order(len(train_set), cfg.seed, 100 + unit_index, epoch), cfg.policy_batch_size,
                            world, rank)[skip:]
        loader = shard_loader(train_set, steps, collate, cfg.seed)
        for step, (shard, batch) in enumerate(zip(steps, loader, strict=True), start=skip):
            single = {n: v.to(accelerator.device) for n, v in batch.items()}
            batch = repeat_batch(single, k)
            eps = epsilon.value(global_step)
            noise = ActionNoise.draw(shard.global_examples * k, num_layers, generator, eps, accelerator.device)
            first = min(rank * cfg.policy_batch_size, shard.global_examples - 1) * k
            noise = noise.rows(first, first + batch["labels"].shape[0])
            # Per rollout: num_processes / (rollouts in the global step); 0 for a filler.
            row_weight = torch.tensor(shard.weights, device=accelerator.device).repeat_interleave(k) / k
            with accelerator.autocast():
                ro = rollout(model, batch, train_backbone=joint and cfg.joint_scope == "all", train_exits=joint,
                             epsilon=eps, noise=noise,
                             expected_ce=joint and cfg.joint_loss == "expected",
                             every_exit=cfg.policy_loss == "expected")
            quality = reward_quality(cfg.reward_quality, ro.log_q_exit, ro.correct)
            reward = reward_fn(quality, ro.exit_layer, weights[batch["index"]], num_layers)
            if cfg.policy_loss == "expected":
                loss = (expected_reward_loss(ro.exit_probs, _reward_per_exit(ro, weights[batch["index"]], reward_fn,
                                                                             cfg, num_layers)) * row_weight).sum()
            else:
                total = (lambda x: process_sum(accelerator, x)) if world > 1 else None
                advantage = group_baseline_advantage(reward, k, cfg.advantage_norm, weight=row_weight, total=total)
                loss = -(advantage.detach().to(ro.log_prob.dtype) * ro.log_prob * row_weight).sum()
            if joint:
                ce = ro.expected_ce if ro.expected_ce is not None else -ro.log_q_exit
                loss = loss + (ce * row_weight).sum()
                if cfg.anchor_weight > 0:
                    loss = loss + cfg.anchor_weight * _anchor_loss(model, single, shard.weights, accelerator)
            if not all_finite(accelerator, loss):  # every process stops together
                raise NonFiniteLossError(
                    f"beta {cfg.beta:g} {unit} epoch {epoch + 1} step {global_step + 1}: the loss is not finite "
                    f"({loss.item()}); stopped without saving the model (lower --policy-learning-rate / "
                    "--joint-learning-rate); the last checkpoint, if any, is kept")
            accelerator.backward(loss)
            if world > 1:
                all_reduce_grads(accelerator, params)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            row = _log_row(accelerator, unit, epoch + 1, global_step, loss, reward, ro, row_weight > 0, num_layers,
                           eps)
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


def _reward_per_exit(ro, weight: torch.Tensor, reward_fn, cfg: PolicyConfig, num_layers: int) -> torch.Tensor:
    """[R, L]: the reward each row would get at each exit (the reward of the exit taken, for every exit).

    ``group_std`` divides each row's rewards by their spread over the exits (hard rows, whose shallow exits are
    wrong by several nats, would otherwise drown the easy rows' depth cost); the batch-wide scales leave them as
    they are (a common factor, which Adam's step does not see)."""
    quality = reward_quality(cfg.reward_quality, ro.layer_log_q, ro.layer_correct)
    layers = torch.arange(1, num_layers + 1, device=quality.device).expand_as(quality)
    reward = reward_fn(quality, layers, weight.unsqueeze(1).expand_as(quality), num_layers)
    if cfg.advantage_norm == "group_std":  # each row's rewards on one scale, as group_std does for sampled exits
        reward = reward / reward.std(dim=1, keepdim=True).clamp_min(1e-2)
    return reward


def _anchor_loss(model, batch: dict[str, torch.Tensor], weights: list[float], accelerator: Accelerator) -> torch.Tensor:
    """Stage 1's loss (every exit, deeper exits weighted more) on the batch once, without rollouts."""
    with accelerator.autocast():
        out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    example_weights = torch.tensor(weights, device=accelerator.device)
    return multi_exit_loss(out.exit_logits, batch["labels"], pabee_weights(model.num_layers), example_weights)


def _log_row(accelerator, unit, epoch, step, loss, reward, ro, real, num_layers, eps) -> dict:
    """One log.csv row for a global step: sums over the real rollouts of every process."""
    real_f = real.float()
    hist = torch.bincount(ro.exit_layer[real].cpu(), minlength=num_layers + 1)[1:].float()
    stats = torch.cat([
        torch.stack([real_f.sum(), (reward.detach().float() * real_f).sum(), (ro.exit_layer.float() * real_f).sum(),
                     (ro.correct.float() * real_f).sum(), (ro.entropy_sum.float() * real_f).sum(),
                     (ro.decisions.float() * real_f).sum(), loss.detach().float()]).cpu(),
        hist,
    ]).to(accelerator.device)
    stats = process_sum(accelerator, stats).cpu()
    count, reward_sum, exit_sum, correct_sum, entropy_sum, decisions, loss_sum = stats[:7].tolist()
    return {"unit": unit, "epoch": epoch, "step": step, "loss": round(loss_sum / accelerator.num_processes, 6),
            "reward": round(reward_sum / count, 6), "mean_exit_layer": round(exit_sum / count, 4),
            "exit_histogram": " ".join(str(int(round(v))) for v in stats[7:].tolist()),
            "accuracy_at_exit": round(correct_sum / count, 4),
            "policy_entropy": round(entropy_sum / max(decisions, 1.0), 6), "epsilon": eps}


def _checkpoint(accelerator, ckpt_dir, model, optimizer, scheduler, generator, unit, epoch, step, global_step,
                log_path, log_rows) -> None:
    def write() -> None:
        save_checkpoint(ckpt_dir, model, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "unit": unit, "epoch": epoch, "step": step,
            "global_step": global_step,
        })
        _write_log(log_path, log_rows)

    on_main(accelerator, write)


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
