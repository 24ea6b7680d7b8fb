"""The evaluation harness: every exit rule on the same trained multi-exit model, one report.

Pipeline of :func:`run_benchmark` (everything in one run directory; a second run reuses what exists):

1. stage 1 (``training.run.run_stage1``: shared by all rules; resumes or skips when complete);
2. memorized layers of the training set (``run_memorize``; skipped when ``memorized_layers.json`` exists);
3. the learned exit heads (``exits.learned``; ``run_dir/learned_heads``);
4. the ConsistentEE beta sweep (``training.policy.run_beta_sweep``; ``run_dir/policies/beta-<beta>/model``);
5. per-layer tables on dev and test (every exit's softmax, every policy, every learned head score);
6. every rule's knob grid simulated on the tables (:func:`~consistentee.exits.rules.simulate_exits`: exact
   and cheap): accuracy, macro-F1, MCC, mean exit layer, layer speed-up, analytic FLOPs speed-up;
7. summaries per rule: Pareto frontier, AUC of accuracy vs saved fraction on a common x-range, best
   layer speed-up within 0.5 and 1 accuracy point of full depth (read off the **test** curve), knobs
   chosen on **dev** for each budget and what they gave on test, gap to the oracle;
8. wall-clock speed-up, measured for a bounded set of points (each rule's dev-selected points and a few
   frontier points; all others are ``null``): the batched early-exit engine against the same backbone
   at full depth, same batch size and threads, interleaved rounds, median;
9. ``report.json``, ``report.md`` and PNG plots (``evaluation.report``).

The pure parts (tables -> points -> summaries, the wall-clock timer) are separate functions, testable
on hand-made tables and stand-in callables.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from consistentee.evaluation.curves import (
    auc_saved_fraction,
    best_speedup_within,
    pareto_frontier,
    select_on_dev,
)
from consistentee.evaluation.flops import EncoderShape, flops_speedup
from consistentee.evaluation.metrics import classification_metrics, speedup_summary
from consistentee.exits.rules import RULES, ExitRule, make_rule, simulate_exits

__all__ = [
    "ALL_RULES",
    "LOSS_BUDGETS",
    "BenchmarkConfig",
    "BenchmarkSettings",
    "Candidate",
    "EvalTables",
    "FlopsSpec",
    "PointResult",
    "WallClock",
    "auc_x_range",
    "build_candidates",
    "demo_settings",
    "evaluate_exits",
    "knob_label",
    "knob_to_json",
    "measure_wall_clock",
    "oracle_gap",
    "policy_model_dir",
    "rule_flops_kwargs",
    "run_benchmark",
    "select_wall_points",
    "summarize_method",
    "sweep",
]

#: the swept rules, in report order (the oracle is reported apart: it has no knob).
ALL_RULES = ("entropy", "confidence", "patience", "pcee", "learned", "static", "consistentee")
#: accuracy-loss budgets in percentage points against full depth.
LOSS_BUDGETS = (0.5, 1.0)
#: rules that read every exit's softmax (so every exit classifier runs at every executed layer).
_PROB_RULES = frozenset({"entropy", "confidence", "patience", "pcee", "oracle"})


def budget_key(budget: float) -> str:
    """``0.5 -> "0.5pt"``, ``1.0 -> "1pt"``."""
    return f"{budget:g}pt"


# ---------------------------------------------------------------------------------------------
# settings


def _csv(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class BenchmarkConfig:
    """What the benchmark sweeps and how it times (CLI options of ``consistentee benchmark``)."""

    rules: str = field(default="all", metadata={
        "help": "comma-separated exit rules to compare, or all (" + ",".join(ALL_RULES) + "); the oracle is always "
                "reported", "metavar": "RULES"})
    betas: str = field(default="0.01,0.02,0.05,0.1", metadata={
        "help": "comma-separated ConsistentEE betas (one policy model is trained per beta)", "metavar": "BETAS"})
    thresholds: str = field(default="auto", metadata={
        "help": "comma-separated ConsistentEE policy thresholds, or auto (0, 0.05, ..., 0.95, 0.97, 0.99)",
        "metavar": "THRESHOLDS"})
    table_batch_size: int = field(default=128, metadata={"help": "batch size of the passes that build per-layer tables"})
    wall_batch_size: int = field(default=32, metadata={"help": "batch size of the wall-clock measurement"})
    wall_repeats: int = field(default=5, metadata={
        "help": "interleaved timing rounds per measured point (median is reported); 0 skips wall-clock"})
    wall_examples: int | None = field(default=512, metadata={
        "help": "test examples timed per round (a seeded subset; none = the whole test split)"})
    wall_frontier_points: int = field(default=2, metadata={
        "help": "test-frontier points timed per rule, besides its dev-selected points"})
    wall_autocast: str = field(default="none", metadata={
        "help": "autocast dtype of both timed runs (fp16/bf16 on GPU), or none", "choices": ("none", "fp16", "bf16")})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (none: leave torch's default)"})
    out_dir: str | None = field(default=None, metadata={"help": "report directory (none: RUN_DIR/report)"})

    def __post_init__(self) -> None:
        self.rules, self.betas, self.thresholds = _csv(self.rules), _csv(self.betas), _csv(self.thresholds)
        self.rule_names()
        if "consistentee" in self.rule_names():
            self.beta_values()
        self.threshold_values()
        for name in ("table_batch_size", "wall_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.wall_repeats < 0 or self.wall_frontier_points < 0:
            raise ValueError("wall_repeats and wall_frontier_points must be >= 0")
        if self.wall_examples is not None and self.wall_examples < 1:
            raise ValueError(f"wall_examples must be >= 1, got {self.wall_examples}")
        if self.wall_autocast not in ("none", "fp16", "bf16"):
            raise ValueError(f"wall_autocast must be none, fp16 or bf16, got {self.wall_autocast!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def rule_names(self) -> list[str]:
        text = self.rules.strip()
        if text in ("", "all"):
            return list(ALL_RULES)
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in ALL_RULES]
        if unknown:
            raise ValueError(f"unknown rule(s) {', '.join(unknown)}; choose from {', '.join(ALL_RULES)} "
                             "(the oracle is always reported)")
        return [n for n in ALL_RULES if n in names]

    def beta_values(self) -> list[float]:
        try:
            values = [float(b) for b in self.betas.split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"betas must be comma-separated numbers, got {self.betas!r}") from None
        if not values or any(not math.isfinite(b) or b < 0 for b in values):
            raise ValueError(f"betas must be one or more numbers >= 0, got {self.betas!r}")
        return sorted(set(values))

    def threshold_values(self) -> list[float]:
        if self.thresholds.strip() in ("", "auto"):
            return list(RULES["consistentee"].default_grid())
        try:
            values = sorted({float(t) for t in self.thresholds.split(",") if t.strip()})
        except ValueError:
            raise ValueError(f"thresholds must be comma-separated numbers, got {self.thresholds!r}") from None
        if not values or any(not 0.0 <= t <= 1.0 for t in values):
            raise ValueError(f"thresholds must lie in [0, 1], got {self.thresholds!r}")
        return values


def _policy_config_class():
    try:
        from consistentee.training.policy import PolicyConfig
    except ImportError:
        return None
    return PolicyConfig


def _run_beta_sweep(run_dir, betas, cfg, *, device="auto", progress=True, log=print):
    """Indirection so tests can stand in for ``consistentee.training.policy.run_beta_sweep``."""
    from consistentee.training.policy import run_beta_sweep

    return run_beta_sweep(run_dir, betas, cfg, device=device, progress=progress, log=log)


@dataclass
class BenchmarkSettings:
    """Everything ``consistentee benchmark`` needs: data, model, the three trainings and the sweep."""

    data: Any = None
    model: Any = None
    stage1: Any = None
    learned: Any = None
    policy: Any = None
    bench: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def __post_init__(self) -> None:
        from consistentee.exits.learned import LearnedHeadConfig
        from consistentee.training.run import DataConfig, ModelConfig
        from consistentee.training.stage1 import Stage1Config

        self.data = self.data or DataConfig()
        self.model = self.model or ModelConfig()
        self.stage1 = self.stage1 or Stage1Config()
        self.learned = self.learned or LearnedHeadConfig()
        if self.policy is None:
            cls = _policy_config_class()
            self.policy = cls() if cls is not None else None

    def to_json(self) -> dict:
        out = {}
        for name in ("data", "model", "stage1", "learned", "policy", "bench"):
            value = getattr(self, name)
            out[name] = asdict(value) if is_dataclass(value) else value
        return out


def demo_settings(**bench_overrides: Any) -> BenchmarkSettings:
    """The benchmark of ``consistentee demo`` / ``make demo``: rt-snippets, built-in MiniLM, sized for
    about 20 minutes on 2 CPU cores (a train subset, 1 epoch per training, two betas, a small wall-clock)."""
    from consistentee.exits.learned import LearnedHeadConfig
    from consistentee.training.run import DataConfig, ModelConfig
    from consistentee.training.stage1 import Stage1Config

    policy = None
    cls = _policy_config_class()
    if cls is not None:
        names = {f.name for f in fields(cls)}
        wanted = {"policy_epochs": 1, "joint_epochs": 1, "rounds": 1}
        policy = cls(**{k: v for k, v in wanted.items() if k in names})
    bench = {"betas": "0.02,0.1", "wall_repeats": 3, "wall_examples": 256, "wall_frontier_points": 1,
             **bench_overrides}
    return BenchmarkSettings(
        data=DataConfig(dataset="rt-snippets", max_train_examples=3000, max_length=64),
        model=ModelConfig(),
        stage1=Stage1Config(epochs=1),
        learned=LearnedHeadConfig(epochs=5),
        policy=policy,
        bench=BenchmarkConfig(**bench),
    )


# ---------------------------------------------------------------------------------------------
# tables, knobs, points


@dataclass
class EvalTables:
    """Per-layer signals of one split under one model: what :func:`simulate_exits` reads."""

    #: [N, L, C] softmax of every exit.
    probs: torch.Tensor
    #: [N] gold labels.
    labels: torch.Tensor
    #: [N] real tokens per row (FLOPs).
    seq_lens: torch.Tensor
    #: [N, L-1] policy exit probabilities (ConsistentEE).
    policy_probs: torch.Tensor | None = None
    #: [N, L] learned exit head scores.
    learned_scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.probs.dim() != 3:
            raise ValueError(f"probs must be [N, L, C], got {tuple(self.probs.shape)}")
        if self.labels is None or self.labels.shape != (self.probs.shape[0],):
            raise ValueError("EvalTables needs gold labels [N] (evaluation splits must be labelled)")
        if self.seq_lens.shape != (self.probs.shape[0],):
            raise ValueError(f"seq_lens must be [N] = [{self.probs.shape[0]}], got {tuple(self.seq_lens.shape)}")

    @classmethod
    def from_cache(cls, cache, heads=None) -> EvalTables:
        """From a :class:`~consistentee.evaluation.tables.ExitTables` with pooled states (+ learned heads scored on its states)."""
        learned = None
        if heads is not None:
            with torch.inference_mode():
                learned = heads.score_all(cache.pooled.to(next(heads.parameters()).device)).cpu()
        return cls(cache.probs, cache.labels, cache.seq_lens, cache.policy_probs, learned)

    @classmethod
    def from_exit_tables(cls, tables, learned_scores=None) -> EvalTables:
        return cls(tables.probs, tables.labels, tables.seq_lens, tables.policy_probs, learned_scores)

    @property
    def num_layers(self) -> int:
        return self.probs.shape[1]

    @property
    def num_classes(self) -> int:
        return self.probs.shape[2]

    def __len__(self) -> int:
        return self.probs.shape[0]

    def full_depth(self) -> dict[str, float]:
        return classification_metrics(self.labels, self.probs[:, -1].argmax(-1))

    def per_exit_accuracy(self) -> list[float]:
        return (self.probs.argmax(-1) == self.labels.unsqueeze(1)).float().mean(0).tolist()


def knob_to_json(rule_name: str, knob: Any, beta: float | None = None) -> Any:
    """The JSON form of a knob: a number for one-knob rules, ``{"t", "S"}`` for pcee,
    ``{"beta", "threshold"}`` for consistentee, ``None`` for the oracle."""
    if rule_name == "pcee":
        t, s = knob
        return {"t": int(t), "S": round(float(s), 6)}
    if rule_name == "consistentee":
        return {"beta": None if beta is None else float(beta), "threshold": round(float(knob), 6)}
    if knob is None:
        return None
    if isinstance(knob, int | np.integer) or (isinstance(knob, float) and RULES[rule_name].knob_name in ("t", "k")):
        return int(knob)
    return round(float(knob), 6)


def knob_label(rule_name: str, knob_json: Any) -> str:
    """Short human form: ``S=0.21``, ``t=2, S=0.21``, ``beta=0.05, threshold=0.5``, ``-``."""
    if knob_json is None:
        return "-"
    if isinstance(knob_json, Mapping):
        return ", ".join(f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in knob_json.items())
    name = RULES[rule_name].knob_name if rule_name in RULES else "knob"
    return f"{name}={knob_json:g}"


@dataclass
class FlopsSpec:
    """What the analytic FLOPs count needs: the encoder shape, whether the pooler runs, the learned heads."""

    shape: EncoderShape
    pooler_used: bool = False
    learned_head_flops: float = 0.0


def rule_flops_kwargs(rule_name: str, spec: FlopsSpec) -> dict[str, Any]:
    """Keyword arguments of :func:`flops_speedup` for a rule.

    Rules that read exit softmaxes run every exit classifier at every executed layer; ``learned``,
    ``consistentee`` and ``static`` run the classifier only at the exit taken. ConsistentEE counts its
    policies, ``learned`` its heads (``extra_flops_per_layer``). When the pooler is the pooling,
    the rules that skip classifiers still pool at every layer (their decision reads the pooled state):
    that is added per layer too, which overcounts one pooler at the exit (< 0.1% of a layer).
    """
    heads_every_layer = rule_name in _PROB_RULES
    extra = 0.0
    if rule_name in ("learned", "consistentee") and spec.pooler_used:
        extra += 2.0 * spec.shape.hidden_size * spec.shape.hidden_size
    if rule_name == "learned":
        extra += float(spec.learned_head_flops)
    return {
        "with_policy": rule_name == "consistentee",
        "pooler_used": spec.pooler_used,
        "heads_every_layer": heads_every_layer,
        "extra_flops_per_layer": extra,
    }


def evaluate_exits(
    rule_name: str, exit_layers: torch.Tensor, predictions: torch.Tensor, tables: EvalTables,
    flops: FlopsSpec | None,
) -> dict[str, float]:
    """Quality and speed-ups of one set of exit decisions on a split."""
    out: dict[str, float] = dict(classification_metrics(tables.labels, predictions))
    out.update(speedup_summary(exit_layers, tables.num_layers))
    if flops is not None:
        out["flops_speedup"] = flops_speedup(flops.shape, tables.seq_lens, exit_layers,
                                             **rule_flops_kwargs(rule_name, flops))
    else:
        out["flops_speedup"] = None
    return out


@dataclass
class Candidate:
    """One operating point to simulate: a rule with its knob and the tables of the model it runs on."""

    rule_name: str
    knob: Any  # JSON form
    rule: ExitRule
    dev: EvalTables
    test: EvalTables
    #: which model the point runs on: None = the stage-1 model, else the ConsistentEE beta.
    model_key: float | None = None


@dataclass
class PointResult:
    """A simulated operating point: dev and test metrics, test exit layers, measured wall-clock speed-up."""

    rule_name: str
    knob: Any
    model_key: float | None
    dev: dict[str, float]
    test: dict[str, float]
    test_exit_layers: torch.Tensor
    test_predictions: torch.Tensor
    wall_speedup: float | None = None
    wall: dict | None = None

    def to_json(self) -> dict:
        t = self.test
        return {
            "knob": self.knob,
            "accuracy": t["accuracy"],
            "macro_f1": t["macro_f1"],
            "mcc": t["mcc"],
            "mean_exit_layer": t["mean_exit_layer"],
            "layer_speedup": t["layer_speedup"],
            "saved_fraction": t["saved_fraction"],
            "flops_speedup": t["flops_speedup"],
            "wall_speedup": self.wall_speedup,
            "dev_accuracy": self.dev["accuracy"],
            "dev_layer_speedup": self.dev["layer_speedup"],
        }


def build_candidates(
    rule_name: str,
    dev: EvalTables,
    test: EvalTables,
    *,
    grid: Sequence[Any] | None = None,
    policy_tables: Mapping[float, tuple[EvalTables, EvalTables]] | None = None,
    thresholds: Sequence[float] | None = None,
) -> list[Candidate]:
    """The sweep of one rule: its default grid (scaled to the classes and layers), or ``grid``.

    ``consistentee`` takes its points from ``policy_tables`` (``beta -> (dev, test)`` tables of each
    beta's model), crossed with ``thresholds``.
    """
    cls = RULES[rule_name]
    if rule_name == "consistentee":
        if not policy_tables:
            raise ValueError("the consistentee rule needs the tables of at least one beta model")
        thresholds = list(thresholds if thresholds is not None else (grid or cls.default_grid()))
        return [
            Candidate(rule_name, knob_to_json(rule_name, thr, beta), make_rule(rule_name, thr), d, t, float(beta))
            for beta, (d, t) in sorted(policy_tables.items())
            for thr in thresholds
        ]
    if grid is None:
        grid = cls.default_grid(num_classes=test.num_classes, num_layers=test.num_layers)
    if rule_name == "static":
        grid = [k for k in grid if k <= test.num_layers]
    return [Candidate(rule_name, knob_to_json(rule_name, k), make_rule(rule_name, k), dev, test) for k in grid]


def _simulate(rule: ExitRule, tables: EvalTables):
    return simulate_exits(rule, tables.probs, tables.policy_probs, tables.learned_scores, tables.labels)


def sweep(candidates: Sequence[Candidate], flops: FlopsSpec | None = None) -> list[PointResult]:
    """Simulate every candidate on its dev and test tables."""
    points = []
    for c in candidates:
        d = _simulate(c.rule, c.dev)
        t = _simulate(c.rule, c.test)
        points.append(PointResult(
            rule_name=c.rule_name, knob=c.knob, model_key=c.model_key,
            dev=evaluate_exits(c.rule_name, d.exit_layer, d.predictions, c.dev, None),
            test=evaluate_exits(c.rule_name, t.exit_layer, t.predictions, c.test, flops),
            test_exit_layers=t.exit_layer.cpu(), test_predictions=t.predictions.cpu(),
        ))
    return points


def frontier_indices(points: Sequence[PointResult]) -> list[int]:
    """Indices of the test Pareto frontier in (layer speed-up, accuracy), by increasing speed-up."""
    frontier = pareto_frontier([(p.test["layer_speedup"], p.test["accuracy"]) for p in points])
    out = []
    for x, a in frontier:
        out.append(next(i for i, p in enumerate(points)
                        if (p.test["layer_speedup"], p.test["accuracy"]) == (x, a)))
    return out


def auc_x_range(points_by_rule: Mapping[str, Sequence[PointResult]], num_layers: int) -> tuple[float, float]:
    """Common saved-fraction range of the AUC: ``[0, min over rules of their largest saving]``.

    A rule that saves nothing anywhere does not shrink the range (it gets the fill of 0 to the right of
    its points instead); if no rule saves anything, the range is ``[0, (L-1)/L]``.
    """
    maxima = [max(p.test["saved_fraction"] for p in points) for points in points_by_rule.values() if points]
    maxima = [m for m in maxima if m > 1e-9]
    if maxima:
        return 0.0, float(min(maxima))
    return 0.0, (num_layers - 1) / num_layers if num_layers > 1 else 1.0


def summarize_method(
    points: Sequence[PointResult],
    full_test_accuracy: float,
    full_dev_accuracy: float,
    x_range: tuple[float, float],
    budgets: Sequence[float] = LOSS_BUDGETS,
) -> dict[str, Any]:
    """AUC, frontier, best layer speed-up per budget (test curve) and the dev-selected knobs per budget.

    Returns a JSON-able dict; ``"dev_selected"[budget]["index"]`` is the chosen point's index (or None).
    """
    if not points:
        raise ValueError("summarize_method needs at least one point")
    test_pairs = [(p.test["layer_speedup"], p.test["accuracy"]) for p in points]
    saved_pairs = [(p.test["saved_fraction"], p.test["accuracy"]) for p in points]
    out: dict[str, Any] = {
        "auc": auc_saved_fraction(saved_pairs, x_range),
        "frontier": [list(fp) for fp in pareto_frontier(test_pairs)],
    }
    for b in budgets:
        out[f"best_layer_speedup_at_{budget_key(b)}"] = best_speedup_within(test_pairs, full_test_accuracy, b)
    selected = {}
    for b in budgets:
        dev_points = [(i, p.dev["layer_speedup"], p.dev["accuracy"]) for i, p in enumerate(points)]
        index = select_on_dev(dev_points, full_dev_accuracy, b)
        if index is None:
            selected[budget_key(b)] = {"index": None, "knob": None, "dev_accuracy": None, "dev_layer_speedup": None,
                                       "test_accuracy": None, "test_macro_f1": None, "test_layer_speedup": None,
                                       "test_flops_speedup": None, "test_wall_speedup": None,
                                       "test_loss_points": None, "within_budget_on_test": None}
            continue
        p = points[index]
        loss = 100.0 * (full_test_accuracy - p.test["accuracy"])
        selected[budget_key(b)] = {
            "index": index,
            "knob": p.knob,
            "dev_accuracy": p.dev["accuracy"],
            "dev_layer_speedup": p.dev["layer_speedup"],
            "test_accuracy": p.test["accuracy"],
            "test_macro_f1": p.test["macro_f1"],
            "test_layer_speedup": p.test["layer_speedup"],
            "test_flops_speedup": p.test["flops_speedup"],
            "test_wall_speedup": p.wall_speedup,
            "test_loss_points": loss,
            "within_budget_on_test": bool(loss <= b + 1e-9),
        }
    out["dev_selected"] = selected
    return out


def attainable_accuracy(points: Sequence[PointResult], saved: float) -> float | None:
    """Best test accuracy of any point that saves at least ``saved`` (None: no point saves that much)."""
    accs = [p.test["accuracy"] for p in points if p.test["saved_fraction"] >= saved - 1e-12]
    return max(accs) if accs else None


def oracle_gap(points: Sequence[PointResult], oracle: PointResult, best_at_1pt: float | None) -> dict[str, Any]:
    """How far a rule is from the oracle on the same model.

    ``accuracy_at_oracle_speedup``: the rule's best test accuracy among points at least as fast as the
    oracle (None if none is); ``accuracy_gap_points`` = 100 x (oracle accuracy - that);
    ``layer_speedup_gap_at_1pt`` = oracle layer speed-up - the rule's best layer speed-up within 1 point
    (negative when the rule goes faster: the oracle maximises accuracy, not speed).
    """
    acc = attainable_accuracy(points, oracle.test["saved_fraction"])
    return {
        "accuracy_at_oracle_speedup": acc,
        "accuracy_gap_points": None if acc is None else 100.0 * (oracle.test["accuracy"] - acc),
        "layer_speedup_gap_at_1pt": None if best_at_1pt is None else oracle.test["layer_speedup"] - best_at_1pt,
    }


def best_point_index(points: Sequence[PointResult], summary: Mapping[str, Any]) -> int:
    """The rule's "best operating point" for the histograms: dev-selected at 1 pt, else 0.5 pt, else
    the most accurate point on dev (ties: the faster one)."""
    selected = summary.get("dev_selected", {})
    for key in (budget_key(1.0), budget_key(0.5)):
        index = selected.get(key, {}).get("index")
        if index is not None:
            return index
    return max(range(len(points)), key=lambda i: (points[i].dev["accuracy"], points[i].dev["layer_speedup"]))


def select_wall_points(points: Sequence[PointResult], summary: Mapping[str, Any], frontier_points: int) -> list[int]:
    """Point indices to time: the dev-selected ones, then ``frontier_points`` spread along the test frontier."""
    chosen: list[int] = []
    for sel in summary.get("dev_selected", {}).values():
        if sel.get("index") is not None and sel["index"] not in chosen:
            chosen.append(sel["index"])
    frontier = [i for i in frontier_indices(points) if i not in chosen]
    if frontier_points > 0 and frontier:
        k = min(frontier_points, len(frontier))
        picks = sorted({round(j * (len(frontier) - 1) / max(k - 1, 1)) for j in range(k)}) if k > 1 else \
            [len(frontier) // 2]
        chosen.extend(frontier[j] for j in picks)
    return chosen


# ---------------------------------------------------------------------------------------------
# wall clock


@dataclass
class WallClock:
    """Seconds per round of the full-depth baseline and of every timed callable; speed-ups of medians."""

    full_seconds: list[float]
    seconds: dict[Any, list[float]]

    @property
    def full_median(self) -> float:
        return statistics.median(self.full_seconds)

    def median(self, key: Any) -> float:
        return statistics.median(self.seconds[key])

    def speedup(self, key: Any) -> float:
        """``median(full) / median(key)`` (> 1: the early-exit run is faster)."""
        return self.full_median / self.median(key)

    def speedups(self) -> dict[Any, float]:
        return {k: self.speedup(k) for k in self.seconds}


def measure_wall_clock(
    full_fn: Callable[[], Any],
    fns: Mapping[Any, Callable[[], Any]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
    progress: bool = False,
    desc: str = "wall clock",
) -> WallClock:
    """Time ``full_fn`` (the full-depth baseline) and every ``fns[key]`` on the same work, interleaved.

    Each callable does one complete unit of work (e.g. every timed batch). After ``warmup`` untimed calls
    of each, ``repeats`` rounds run; a round times the baseline and every callable once, in an order
    rotated by one each round, so drifts of the machine (other jobs, thermal) hit all of them alike.
    Speed-ups are ratios of medians (:class:`WallClock`).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    full_key = object()
    order = [full_key, *fns]
    calls = {full_key: full_fn, **fns}
    for _ in range(max(warmup, 0)):
        for key in order:
            calls[key]()
    times: dict[Any, list[float]] = {key: [] for key in order}
    bar = tqdm(total=repeats * len(order), desc=desc, unit="run", disable=not progress, leave=False)
    for r in range(repeats):
        shift = r % len(order)
        for key in order[shift:] + order[:shift]:
            t0 = timer()
            calls[key]()
            times[key].append(timer() - t0)
            bar.update(1)
    bar.close()
    full = times.pop(full_key)
    return WallClock(full_seconds=full, seconds=times)


def _engine_api():
    """(EarlyExitEngine, full_depth_logits, name): imported lazily (the engine pulls in the inference package)."""
    from consistentee.inference.engine import EarlyExitEngine, full_depth_logits

    return EarlyExitEngine, full_depth_logits, "consistentee.inference.engine.EarlyExitEngine"


# ---------------------------------------------------------------------------------------------
# the benchmark


def policy_model_dir(run_dir: str | os.PathLike, beta: float) -> Path | None:
    """An existing ConsistentEE model of ``beta`` under ``run_dir/policies`` (``beta-<beta>/model``), or None."""
    base = Path(run_dir) / "policies"
    for name in dict.fromkeys((f"beta-{beta}", f"beta-{beta:g}", f"beta-{float(beta)!r}")):
        path = base / name / "model"
        if (path / "config.json").is_file():
            return path
    return None


def _versions() -> dict[str, str]:
    import sklearn
    import transformers

    try:
        from importlib.metadata import version

        own = version("consistentee")
    except Exception:  # not installed as a distribution: running from the source tree
        import consistentee

        own = getattr(consistentee, "__version__", None) or "source tree (not installed)"
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "scikit-learn": sklearn.__version__, "numpy": np.__version__, "consistentee": own}


def _machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Steps:
    """Logs ``[i/n] what (elapsed, ETA from the steps so far)``."""

    def __init__(self, total: int, log) -> None:
        self.total, self.log, self.done, self.t0 = total, log, 0, time.perf_counter()
        self.durations: dict[str, float] = {}
        self._name, self._start = None, None

    def start(self, name: str) -> None:
        self._finish()
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        self._name, self._start = name, time.perf_counter()
        self.log(f"[{self.done}/{self.total}] {name} (elapsed {_fmt_seconds(elapsed)})")

    def _finish(self) -> None:
        if self._name is not None:
            self.durations[self._name] = time.perf_counter() - self._start
            self._name = None

    def close(self) -> dict[str, float]:
        self._finish()
        return self.durations


def _wall_batches(dataset, collate, examples: int | None, batch_size: int, seed: int, ids) -> list[dict]:
    from consistentee.data.dataset import seeded_order

    n = len(dataset)
    rows = list(range(n))
    if examples is not None and examples < n:
        rows = sorted(seeded_order(list(ids), seed)[:examples])
    return [collate([dataset[i] for i in rows[s:s + batch_size]]) for s in range(0, len(rows), batch_size)]


def _saved_extra(directory: Path) -> dict:
    """The ``extra`` block of a saved learned-heads config (empty when unreadable)."""
    import json

    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("extra") or {}
    except (OSError, ValueError):
        return {}


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timed call ends when its kernels end."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _to_device(batch: Mapping[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def run_benchmark(
    run_dir: str | os.PathLike,
    settings: BenchmarkSettings | None = None,
    *,
    device: str = "auto",
    progress: bool = True,
    log=print,
    command: str | None = None,
) -> dict[str, Any]:
    """Train what is missing, evaluate every rule on test (knobs chosen on dev), write the report.

    Returns the report dict (also written as ``report.json`` next to ``report.md`` and the plots in
    ``settings.bench.out_dir`` or ``run_dir/report``).
    """
    from consistentee.evaluation.report import write_report
    from consistentee.evaluation.tables import collect_exit_tables
    from consistentee.exits.learned import LearnedExitHeads, cache_pooled_states, train_learned_heads
    from consistentee.model.modeling import EarlyExitForSequenceClassification
    from consistentee.training import memorized
    from consistentee.training.run import (
        load_run_model,
        load_run_settings,
        run_memorize,
        run_stage1,
        stage1_model_dir,
    )
    from consistentee.utils.runtime import resolve_device

    settings = settings or BenchmarkSettings()
    bench = settings.bench
    rules = bench.rule_names()
    run_dir = Path(run_dir)
    out_dir = Path(bench.out_dir) if bench.out_dir else run_dir / "report"
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    torch_device = resolve_device(device)
    use_policy = "consistentee" in rules
    use_learned = "learned" in rules
    steps = _Steps(5 + use_learned + use_policy, log)

    # 1-2: stage 1 and memorized layers (both skip when done)
    steps.start("stage 1 (multi-exit fine-tuning, shared by all rules)")
    run_stage1(run_dir, settings.data, settings.model, settings.stage1, device=device, progress=progress, log=log)
    if not (run_dir / memorized.FILE_NAME).is_file():
        run_memorize(run_dir, device=device, batch_size=bench.table_batch_size, progress=progress, log=log)
    run_data_cfg, run_model_cfg = load_run_settings(run_dir)
    differ = [f"{part}.{k}: run {v!r}, asked {getattr(asked, k)!r}"
              for part, saved, asked in (("data", run_data_cfg, settings.data), ("model", run_model_cfg, settings.model))
              for k, v in asdict(saved).items() if v != getattr(asked, k)]
    if differ:
        raise ValueError(f"{run_dir} holds a run trained with other settings ({'; '.join(differ)}); "
                         "use another --run-dir or the run's own settings")
    model, data = load_run_model(run_dir, device=device)
    num_layers = model.num_layers

    # 3: learned exit heads
    heads = None
    if use_learned:
        steps.start("learned exit heads (BERxiT-style)")
        heads_dir = run_dir / "learned_heads"
        weights = stage1_model_dir(run_dir) / "model.safetensors"
        stamp = {"stage1_weights_bytes": weights.stat().st_size, "stage1_weights_mtime_ns": weights.stat().st_mtime_ns}
        if LearnedExitHeads.is_saved(heads_dir) and _saved_extra(heads_dir).get("stage1") == stamp:
            log(f"learned exit heads found in {heads_dir}; loading them")
            heads = LearnedExitHeads.load(heads_dir, device=torch_device)
        else:
            heads = train_learned_heads(model, data.encoded["train"], data.collate, settings.learned,
                                        device=torch_device, progress=progress, log=log)
            heads.save(heads_dir, extra={"stage1": stamp, "train_config": heads.train_config,
                                         "history": heads.history})
            log(f"learned exit heads written to {heads_dir}")

    # 4: ConsistentEE beta sweep
    policy_dirs: dict[float, Path] = {}
    if use_policy:
        steps.start("ConsistentEE policies (beta sweep)")
        betas = bench.beta_values()
        missing = [b for b in betas if policy_model_dir(run_dir, b) is None]
        for b in betas:
            if b not in missing:
                policy_dirs[b] = policy_model_dir(run_dir, b)
        if missing:
            if settings.policy is None:
                raise ValueError("the consistentee rule needs consistentee.training.policy (PolicyConfig), "
                                 "which is not installed; leave consistentee out of --rules")
            log(f"training ConsistentEE policies for beta {', '.join(f'{b:g}' for b in missing)}"
                + (f" (found {', '.join(f'{b:g}' for b in policy_dirs)})" if policy_dirs else ""))
            produced = _run_beta_sweep(run_dir, missing, settings.policy, device=device, progress=progress, log=log)
            for b in missing:
                path = produced.get(b) if isinstance(produced, Mapping) else None
                if path is None:
                    path = next((Path(v) for k, v in produced.items() if math.isclose(float(k), b)), None)
                if path is None:
                    raise RuntimeError(f"run_beta_sweep returned no model for beta {b:g}")
                policy_dirs[b] = Path(path)
        else:
            log(f"ConsistentEE models found for every beta ({', '.join(f'{b:g}' for b in betas)})")

    # 5: tables
    steps.start("per-layer tables on dev and test")
    caches = {split: cache_pooled_states(model, data.encoded[split], data.collate, batch_size=bench.table_batch_size,
                                         device=torch_device, progress=progress, desc=f"tables {split}")
              for split in ("dev", "test")}
    tables = {split: EvalTables.from_cache(cache, heads) for split, cache in caches.items()}
    del caches
    policy_tables: dict[float, tuple[EvalTables, EvalTables]] = {}
    policy_full: dict[str, dict[str, float]] = {}
    for beta, path in sorted(policy_dirs.items()):
        pm = EarlyExitForSequenceClassification.from_pretrained(path, device=torch_device)
        if pm.num_layers != num_layers or pm.num_labels != model.num_labels:
            raise ValueError(f"the ConsistentEE model in {path} does not match the stage-1 model's shape")
        pair = tuple(
            EvalTables.from_exit_tables(collect_exit_tables(
                pm, data.encoded[split], data.collate, batch_size=bench.table_batch_size, device=torch_device,
                progress=progress, desc=f"tables {split} beta={beta:g}"))
            for split in ("dev", "test"))
        policy_tables[beta] = pair
        policy_full[f"{beta:g}"] = {"path": str(path), "full_depth_test_accuracy": pair[1].full_depth()["accuracy"],
                                    "full_depth_dev_accuracy": pair[0].full_depth()["accuracy"]}
        del pm

    # 6-7: sweeps and summaries
    steps.start("simulating every rule's sweep on the tables")
    shape = EncoderShape.from_hf_config(model.backbone.config, num_labels=model.num_labels,
                                        policy_hidden=model.config.policy_hidden_size,
                                        has_pooler=model.backbone.has_pooler)
    spec = FlopsSpec(shape, pooler_used=model.config.pooling == "pooler",
                     learned_head_flops=heads.flops_per_layer() if heads is not None else 0.0)
    dev, test = tables["dev"], tables["test"]
    full_test, full_dev = test.full_depth(), dev.full_depth()
    points: dict[str, list[PointResult]] = {}
    for name in tqdm(rules, desc="sweeps", unit="rule", disable=not progress, leave=False):
        candidates = build_candidates(name, dev, test, policy_tables=policy_tables,
                                      thresholds=bench.threshold_values())
        points[name] = sweep(candidates, spec)
    oracle_point = sweep(build_candidates("oracle", dev, test), spec)[0]
    x_range = auc_x_range(points, num_layers)
    summaries = {name: summarize_method(pts, full_test["accuracy"], full_dev["accuracy"], x_range)
                 for name, pts in points.items()}
    oracle_saved = oracle_point.test["saved_fraction"]

    # 8: wall clock
    steps.start("wall-clock speed-up (engine vs full depth)")
    engine_cls, full_depth_fn, engine_name = _engine_api()
    wall_info: dict[str, Any] = {"engine": engine_name, "batch_size": bench.wall_batch_size,
                                 "repeats": bench.wall_repeats, "examples": None,
                                 "measured": f"each rule's dev-selected points and up to {bench.wall_frontier_points} "
                                             "test-frontier points; every other point has wall_speedup null",
                                 "threads": torch.get_num_threads(), "device": str(torch_device)}
    autocast = None if bench.wall_autocast == "none" else bench.wall_autocast
    wall_info["autocast"] = bench.wall_autocast
    if bench.wall_repeats > 0:
        test_set = data.encoded["test"]
        batches = [_to_device(b, torch_device) for b in _wall_batches(
            test_set, data.collate, bench.wall_examples, bench.wall_batch_size, settings.data.data_seed, test_set.ids)]
        timed_rows = torch.cat([b["index"].cpu() for b in batches])
        wall_info["examples"] = int(timed_rows.numel())
        policy_models = {beta: EarlyExitForSequenceClassification.from_pretrained(path, device=torch_device)
                         for beta, path in policy_dirs.items()}
        jobs: dict[tuple[str, int], Callable[[], Any]] = {}
        agreement: dict[tuple[str, int], float] = {}
        for name, pts in points.items():
            for index in select_wall_points(pts, summaries[name], bench.wall_frontier_points):
                p = pts[index]
                run_model = model if p.model_key is None else policy_models[p.model_key]
                rule = make_rule(name, _knob_value(name, p.knob))
                engine = engine_cls(run_model, rule, learned_heads=heads if name == "learned" else None, trim=True,
                                    autocast_dtype=autocast)

                def job(engine=engine):
                    with torch.inference_mode():
                        out = [engine(b["input_ids"], b["attention_mask"], b.get("token_type_ids")) for b in batches]
                    _synchronize(torch_device)
                    return out

                outputs = job()  # doubles as the warm-up call and as a check of engine vs simulation
                layers = torch.cat([o.exit_layers.cpu() for o in outputs])
                agreement[(name, index)] = float((layers == p.test_exit_layers[timed_rows]).float().mean())
                jobs[(name, index)] = job

        def full_job():
            with torch.inference_mode():
                out = [full_depth_fn(model, b["input_ids"], b["attention_mask"], b.get("token_type_ids"),
                                     autocast_dtype=autocast) for b in batches]
            _synchronize(torch_device)
            return out

        full_job()
        log(f"timing {len(jobs)} operating points against full depth on {wall_info['examples']} test examples, "
            f"batch {bench.wall_batch_size}, {bench.wall_repeats} interleaved rounds, "
            f"{torch.get_num_threads()} threads")
        clock = measure_wall_clock(full_job, jobs, repeats=bench.wall_repeats, warmup=0, progress=progress)
        for (name, index), speed in clock.speedups().items():
            p = points[name][index]
            p.wall_speedup = speed
            p.wall = {"median_seconds": clock.median((name, index)), "engine_exit_agreement": agreement[(name, index)]}
            for sel in summaries[name]["dev_selected"].values():
                if sel["index"] == index:
                    sel["test_wall_speedup"] = speed
        if clock.full_median < 0.2:
            wall_info["warning"] = (f"a full-depth round took only {clock.full_median * 1000:.0f} ms: wall-clock ratios "
                                    "this short are dominated by noise; time more examples (wall_examples)")
            log(f"warning: {wall_info['warning']}")
        wall_info["full_depth_median_seconds"] = clock.full_median
        wall_info["full_depth_seconds"] = clock.full_seconds
        wall_info["examples_per_second_full_depth"] = wall_info["examples"] / clock.full_median
        wall_info["timed_points"] = len(jobs)
        wall_info["engine_exit_agreement_min"] = min(agreement.values()) if agreement else None
        del policy_models
    else:
        wall_info["measured"] = "not measured (wall_repeats = 0): every wall_speedup is null"

    # 9: report
    steps.start("writing report.json, report.md and plots")
    methods: dict[str, Any] = {}
    histograms: dict[str, torch.Tensor] = {}
    for name, pts in points.items():
        s = summaries[name]
        best = best_point_index(pts, s)
        histograms[name] = pts[best].test_exit_layers
        for sel in s["dev_selected"].values():
            if sel["index"] is not None:
                p = pts[sel["index"]]
                sel["test_wall_clock"] = p.wall
        one = s["best_layer_speedup_at_1pt"]
        methods[name] = {
            "knob_name": RULES[name].knob_name if name != "consistentee" else "beta,threshold",
            "points": [p.to_json() for p in pts],
            "auc": s["auc"],
            "best_layer_speedup_at_0.5pt": s["best_layer_speedup_at_0.5pt"],
            "best_layer_speedup_at_1pt": one,
            "frontier": s["frontier"],
            "dev_selected": s["dev_selected"],
            "histogram_point": {"knob": pts[best].knob, "index": best},
            "oracle_gap": oracle_gap(pts, oracle_point, one),
        }
    histograms["oracle"] = oracle_point.test_exit_layers
    mem_layers = None
    mem_path = run_dir / memorized.FILE_NAME
    if mem_path.is_file():
        mem, _ = memorized.load_memorized(run_dir)
        mem_layers = np.array(list(mem.values()), dtype=np.int64)
    sizes = data.splits.sizes()
    report: dict[str, Any] = {
        "dataset": settings.data.dataset,
        "model": settings.model.model,
        "num_layers": num_layers,
        "num_labels": model.num_labels,
        "labels": list(data.labels.names),
        "pooling": model.config.pooling,
        "split_sizes": sizes,
        "full_depth": {**full_test, "dev_accuracy": full_dev["accuracy"], "per_exit_accuracy": test.per_exit_accuracy(),
                       "dev_per_exit_accuracy": dev.per_exit_accuracy()},
        "methods": methods,
        "oracle": {"accuracy": oracle_point.test["accuracy"], "macro_f1": oracle_point.test["macro_f1"],
                   "mean_exit_layer": oracle_point.test["mean_exit_layer"],
                   "layer_speedup": oracle_point.test["layer_speedup"],
                   "flops_speedup": oracle_point.test["flops_speedup"],
                   "saved_fraction": oracle_saved},
        "consistentee_models": policy_full,
        "settings": {
            "command": command,
            "run_dir": str(run_dir.resolve()),
            "device": str(torch_device),
            "machine": _machine(),
            "versions": _versions(),
            "seeds": {"data": settings.data.data_seed, "stage1": settings.stage1.seed,
                      "learned_heads": settings.learned.seed,
                      "policy": getattr(settings.policy, "seed", None)},
            "auc_x_range": list(x_range),
            "loss_budgets_points": list(LOSS_BUDGETS),
            "selection": "knobs chosen on dev (largest dev layer speed-up within the budget against dev full "
                         "depth); best_layer_speedup_at_* read off the test curve",
            "flops": {"shape": asdict(shape), "pooler_used": spec.pooler_used,
                      "learned_head_flops_per_layer": spec.learned_head_flops},
            "wall_clock": wall_info,
            **settings.to_json(),
        },
        "timing_seconds": {},
    }
    report["timing_seconds"] = {k: round(v, 2) for k, v in steps.close().items()}
    write_report(report, out_dir, exit_layers_by_rule=histograms, memorized_layers=mem_layers)
    report["out_dir"] = str(out_dir)
    log(f"report written to {out_dir} ({', '.join(report['files'].values())})")
    return report


def _knob_value(rule_name: str, knob_json: Any) -> Any:
    """The ``make_rule`` knob of a JSON knob (inverse of :func:`knob_to_json`)."""
    if rule_name == "pcee":
        return (int(knob_json["t"]), float(knob_json["S"]))
    if rule_name == "consistentee":
        return float(knob_json["threshold"])
    return knob_json

