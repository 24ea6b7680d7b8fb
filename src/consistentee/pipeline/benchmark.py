"""``consistentee benchmark``: every exit rule on the same trained multi-exit model, one report.

Pipeline of :func:`run_benchmark` (everything in one run directory; a second run reuses what exists):

1. stage 1 (``training.run.run_stage1``: shared by all rules; resumes or skips when complete);
2. memorized layers of the training set (:mod:`~consistentee.pipeline.memorize`; skipped when ``memorized_layers.json`` exists);
3. the learned exit heads (``exits.learned``; ``run_dir/learned_heads``);
4. the ConsistentEE beta sweep (``training.policy.run_beta_sweep``; ``run_dir/policies/beta-<beta>/model``);
5. per-layer tables on dev and test (every exit's softmax, every policy, every learned head score);
6. every rule's knob grid simulated on the tables (:mod:`~consistentee.evaluation.sweep`, exact and
   cheap): accuracy, macro-F1, MCC, mean exit layer, layer speed-up, analytic FLOPs speed-up;
7. summaries per rule (:mod:`~consistentee.evaluation.summary`): Pareto frontier, AUC of accuracy vs
   saved fraction on a common x-range, best layer speed-up within 0.5 and 1 accuracy point of full depth
   (read off the **test** curve), knobs chosen on **dev** for each budget and what they gave on test, gap
   to the oracle;
   and calibrated operating points: per rule and budget, the fastest knob Learn-then-Test certifies on dev
   (:mod:`~consistentee.evaluation.calibration`), reported beside the naive dev choice;
8. wall-clock speed-up (:mod:`~consistentee.pipeline.wallclock`), measured for a bounded set of points
   (each rule's calibrated and dev-selected points and a few frontier points; all others are ``null``): the batched
   early-exit engine against the same backbone at full depth, same batch size and threads, interleaved
   rounds, median;
9. a resampling study: dev and test pooled and re-split at random, calibrated on one part and measured on
   the other, to show how often calibrated and naive choices break their budget;
10. ``report.json``, ``report.md`` and PNG plots (``evaluation.report``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from consistentee.evaluation.calibration import chain_on_order_split, outcomes_from_points
from consistentee.evaluation.flops import EncoderShape
from consistentee.evaluation.report import write_report
from consistentee.evaluation.summary import (
    LOSS_BUDGETS,
    auc_x_range,
    best_point_index,
    budget_key,
    calibrated_points,
    calibration_study,
    oracle_gap,
    paired_bootstrap,
    policy_sensitivity,
    routing_diagnostics,
    summarize_method,
)
from consistentee.evaluation.sweep import (
    Candidate,
    EvalTables,
    FlopsSpec,
    PointResult,
    build_candidates,
    order_statistics,
    sweep,
)
from consistentee.exits.learned import (
    LearnedExitHeads,
    LearnedHeadConfig,
    cache_pooled_states,
    train_learned_heads,
)
from consistentee.exits.rules import RULES, ExitRule, rule_names
from consistentee.exits.tables import collect_exit_tables
from consistentee.model.modeling import EarlyExitForSequenceClassification
from consistentee.pipeline.memorize import run_memorize
from consistentee.pipeline.wallclock import ENGINE_NAME, time_operating_points, timing_batches
from consistentee.training import memorized
from consistentee.training.policy import PolicyConfig, policy_complete, policy_model_dir, run_beta_sweep
from consistentee.training.run import (
    DataConfig,
    ModelConfig,
    load_run_model,
    load_run_settings,
    policy_rows,
    run_stage1,
    stage1_model_dir,
    train_subset,
)
from consistentee.training.stage1 import Stage1Config
from consistentee.utils.io import read_json
from consistentee.utils.runtime import resolve_device

__all__ = [
    "ALL_RULES",
    "BenchmarkConfig",
    "BenchmarkSettings",
    "demo_settings",
    "run_benchmark",
]

#: the swept rules, in report order: every registered rule but those that read gold labels (the oracle is
#: reported apart: it has no knob).
ALL_RULES = rule_names(without={"labels"})


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
    betas: str = field(default="0.03,0.05,0.07,0.1", metadata={
        "help": "comma-separated ConsistentEE betas (one policy model is trained per beta)", "metavar": "BETAS"})
    thresholds: str = field(default="auto", metadata={"advanced": True,
        "help": "comma-separated ConsistentEE policy thresholds, or auto (a quantile grid of each model's policy "
                "probabilities, see --grid-points)", "metavar": "THRESHOLDS"})
    grid_points: int = field(default=100, metadata={"advanced": True,
        "help": "knob candidates per rule (per ConsistentEE model) at quantiles of the rule's own score on dev and "
                "test, plus its fixed grid; 0 = the fixed grids only"})
    delta: float = field(default=0.1, metadata={
        "help": "calibrated operating points keep their accuracy budget with probability >= 1 - delta"})
    calibration_loss: str = field(default="accuracy_drop", metadata={"advanced": True,
        "help": "what calibration controls against full depth: accuracy_drop, or disagreement (label-free, stricter)",
        "choices": ("accuracy_drop", "disagreement")})
    calibration_guarantee: str = field(default="expected+unseen", metadata={"advanced": True,
        "help": "what calibrated points guarantee: expected+unseen (the expected loss, finite-sample, and the loss "
                "on as many unseen rows as the test split, normal approximation), expected, or unseen",
        "choices": ("expected+unseen", "expected", "unseen")})
    calibration_order: str = field(default="train", metadata={"advanced": True,
        "help": "how calibration orders a rule whose knobs form several sequences (ConsistentEE betas, PCEE "
                "patiences): train (one chain, ordered and pruned on --order-examples training rows, tested at the "
                "whole delta) or knobs (one chain per model and patience, delta split among them)",
        "choices": ("train", "knobs")})
    order_examples: int = field(default=2000, metadata={"advanced": True,
        "help": "training rows (a seeded subset of those the policies fit on) that order calibration's chain"})
    resplits: int = field(default=200, metadata={"advanced": True,
        "help": "random dev/test re-splits of the resampling study of calibration (0 skips it)"})
    table_batch_size: int = field(default=128, metadata={"advanced": True,
        "help": "batch size of the passes that build per-layer tables"})
    wall_batch_size: int = field(default=32, metadata={"advanced": True,
        "help": "batch size of the wall-clock measurement"})
    wall_repeats: int = field(default=5, metadata={
        "help": "interleaved timing rounds per measured point (median is reported); 0 skips wall-clock"})
    wall_examples: int | None = field(default=512, metadata={"advanced": True,
        "help": "test examples timed per round (a seeded subset; none = the whole test split)"})
    wall_frontier_points: int = field(default=2, metadata={"advanced": True,
        "help": "test-frontier points timed per rule, besides its dev-selected points"})
    wall_autocast: str = field(default="none", metadata={"advanced": True,
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
        if self.grid_points < 0 or self.resplits < 0:
            raise ValueError("grid_points and resplits must be >= 0")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        if self.calibration_guarantee not in ("expected+unseen", "expected", "unseen"):
            raise ValueError("calibration_guarantee must be expected+unseen, expected or unseen, got "
                             f"{self.calibration_guarantee!r}")
        if self.calibration_loss not in ("accuracy_drop", "disagreement"):
            raise ValueError(f"calibration_loss must be accuracy_drop or disagreement, got {self.calibration_loss!r}")
        if self.calibration_order not in ("train", "knobs"):
            raise ValueError(f"calibration_order must be train or knobs, got {self.calibration_order!r}")
        if self.order_examples < 1:
            raise ValueError(f"order_examples must be >= 1, got {self.order_examples}")
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

    def threshold_values(self) -> list[float] | None:
        """The ConsistentEE thresholds given, or None (auto: a quantile grid per model)."""
        if self.thresholds.strip() in ("", "auto"):
            return None
        try:
            values = sorted({float(t) for t in self.thresholds.split(",") if t.strip()})
        except ValueError:
            raise ValueError(f"thresholds must be comma-separated numbers, got {self.thresholds!r}") from None
        if not values or any(not 0.0 <= t <= 1.0 for t in values):
            raise ValueError(f"thresholds must lie in [0, 1], got {self.thresholds!r}")
        return values


@dataclass
class BenchmarkSettings:
    """Everything ``consistentee benchmark`` needs: data, model, the three trainings and the sweep."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    learned: LearnedHeadConfig = field(default_factory=LearnedHeadConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    bench: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def to_json(self) -> dict:
        return {f.name: asdict(getattr(self, f.name)) for f in fields(self)}


def demo_settings(**bench_overrides: Any) -> BenchmarkSettings:
    """The benchmark of ``consistentee demo`` / ``make demo``: rt-snippets, built-in MiniLM, sized to finish
    within 20 minutes on 2 CPU cores: a 3,000-example train subset of which 20% is held out from stage 1 for
    the policies and learned-exit heads, 1 stage-1 epoch, three betas (3 policy epochs and 1 joint epoch on
    the 600 held-out examples), a small wall-clock measurement."""
    bench = {"betas": "0.03,0.05,0.07", "wall_repeats": 3, "wall_examples": 256, "wall_frontier_points": 1,
             **bench_overrides}
    return BenchmarkSettings(
        data=DataConfig(dataset="rt-snippets", max_train_examples=3000, max_length=64, policy_holdout=0.2),
        model=ModelConfig(),
        stage1=Stage1Config(epochs=1),
        learned=LearnedHeadConfig(learned_epochs=5),
        policy=PolicyConfig(policy_epochs=3, joint_epochs=1, rounds=1),
        bench=BenchmarkConfig(**bench),
    )


# ---------------------------------------------------------------------------------------------
# the benchmark


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
    run = _BenchmarkRun.start(run_dir, settings or BenchmarkSettings(), device=device, progress=progress, log=log)
    model, data = _train_stage1_and_memorize(run)
    heads = _learned_exit_heads(run, model, data)
    policy_dirs = _consistentee_policies(run)
    tables = _per_layer_tables(run, model, data, heads, policy_dirs)
    sweeps = _simulate_every_rule(run, model, heads, tables)
    wall_info = _measure_wall_clock(run, model, data, heads, policy_dirs, sweeps)
    same_weights = _same_weights_study(run, tables, sweeps)
    calibration = _resampling_study(run, tables, sweeps)
    return _write_benchmark_report(run, model, data, tables, sweeps, policy_dirs, wall_info=wall_info,
                                   same_weights=same_weights, calibration=calibration, command=command)


# ---------------------------------------------------------------------------------------------
# the steps of run_benchmark, in order


@dataclass
class _BenchmarkRun:
    """What every step of :func:`run_benchmark` reads: the run directory, the settings, where and how to run."""

    run_dir: Path
    out_dir: Path
    settings: BenchmarkSettings
    rules: list[str]
    device: str
    torch_device: torch.device
    progress: bool
    log: Any
    steps: _Steps

    @classmethod
    def start(cls, run_dir: str | os.PathLike, settings: BenchmarkSettings, *, device: str, progress: bool,
              log) -> _BenchmarkRun:
        """Set the torch threads, resolve the device and count the steps to come."""
        bench = settings.bench
        rules = bench.rule_names()
        run_dir = Path(run_dir)
        if bench.threads is not None:
            torch.set_num_threads(bench.threads)
        torch_device = resolve_device(device)
        total = 5 + ("learned" in rules) + ("consistentee" in rules) + (bench.resplits > 0)
        return cls(run_dir=run_dir, out_dir=Path(bench.out_dir) if bench.out_dir else run_dir / "report",
                   settings=settings, rules=rules, device=device, torch_device=torch_device, progress=progress,
                   log=log, steps=_Steps(total, log))

    @property
    def bench(self) -> BenchmarkConfig:
        return self.settings.bench


@dataclass
class _Tables:
    """Per-layer tables on dev and test: the stage-1 model's, and each ConsistentEE beta's model's."""

    dev: EvalTables
    test: EvalTables
    policy: dict[float, tuple[EvalTables, EvalTables]]
    #: the same tables on training rows that order calibration's chain (None: the stage-1 model; beta: each
    #: ConsistentEE model); empty with ``calibration_order`` knobs.
    order: dict[float | None, EvalTables] = field(default_factory=dict)


@dataclass
class _Sweeps:
    """Every rule's simulated points with their summaries, the oracle, and the FLOPs count they used."""

    spec: FlopsSpec
    full_dev: dict[str, float]
    full_test: dict[str, float]
    points: dict[str, list[PointResult]]
    oracle: PointResult
    x_range: tuple[float, float]
    summaries: dict[str, dict[str, Any]]
    outcomes: dict[str, Any]
    #: the per-model / per-patience sequences of the rules calibrated as one chain (what ``knobs`` would test).
    separate_sequences: dict[str, list[list[int]]] = field(default_factory=dict)


def _train_stage1_and_memorize(run: _BenchmarkRun):
    """Steps 1-2: stage 1 and the memorized layers (both skip when done); then the run's stage-1 model and data."""
    run.steps.start("stage 1 (multi-exit fine-tuning, shared by all rules)")
    settings = run.settings
    run_stage1(run.run_dir, settings.data, settings.model, settings.stage1, device=run.device,
               progress=run.progress, log=run.log)
    if not (run.run_dir / memorized.FILE_NAME).is_file():
        run_memorize(run.run_dir, device=run.device, batch_size=run.bench.table_batch_size, progress=run.progress,
                     log=run.log)
    _check_run_settings(run.run_dir, settings)
    return load_run_model(run.run_dir, device=run.device)


def _learned_exit_heads(run: _BenchmarkRun, model, data) -> LearnedExitHeads | None:
    """Step 3: the learned exit heads, when the ``learned`` rule is compared."""
    if "learned" not in run.rules:
        return None
    run.steps.start("learned exit heads (BERxiT-style)")
    return _learned_heads(run.run_dir, model, data, run.settings.data, run.settings.learned,
                          device=run.torch_device, progress=run.progress, log=run.log)


def _consistentee_policies(run: _BenchmarkRun) -> dict[float, Path]:
    """Step 4: the ConsistentEE model of every beta, when the ``consistentee`` rule is compared."""
    if "consistentee" not in run.rules:
        return {}
    run.steps.start("ConsistentEE policies (beta sweep)")
    return _policy_models(run.run_dir, run.bench.beta_values(), run.settings.policy, device=run.device,
                          progress=run.progress, log=run.log)


def _per_layer_tables(run: _BenchmarkRun, model, data, heads: LearnedExitHeads | None,
                      policy_dirs: dict[float, Path]) -> _Tables:
    """Step 5: every exit's softmax, every policy and every learned head score on dev and test."""
    run.steps.start("per-layer tables on dev and test")
    batch_size = run.bench.table_batch_size
    splits = {"dev": data.encoded["dev"], "test": data.encoded["test"]}
    order_rows = _order_rows(run, data)
    if order_rows is not None:
        splits["order"] = train_subset(data, order_rows)
    tables: dict[str, EvalTables] = {}
    for split, dataset in splits.items():
        cache = cache_pooled_states(model, dataset, data.collate, batch_size=batch_size,
                                    device=run.torch_device, progress=run.progress, desc=f"tables {split}")
        tables[split] = EvalTables.from_cache(cache, heads)
    policy_tables = {beta: _policy_tables(path, model, data.collate, splits, beta, batch_size=batch_size,
                                          device=run.torch_device, progress=run.progress)
                     for beta, path in sorted(policy_dirs.items())}
    order = {} if order_rows is None else {None: tables["order"], **{b: t["order"] for b, t in policy_tables.items()}}
    return _Tables(tables["dev"], tables["test"], {b: (t["dev"], t["test"]) for b, t in policy_tables.items()},
                   order)


def _order_rows(run: _BenchmarkRun, data) -> list[int] | None:
    """Training rows that order calibration's chain: a seeded subset of those the policies fit on (None when
    calibration keeps one chain per model, or no rule has several: neither several models nor sequence keys)."""
    bench = run.bench
    several = any((RULES[n].model_keyed and len(bench.beta_values()) > 1)
                  or RULES[n].sequence_key.__func__ is not ExitRule.sequence_key.__func__ for n in run.rules)
    if bench.calibration_order != "train" or not several:
        return None
    rows = policy_rows(data, run.settings.data)
    if len(rows) > bench.order_examples:
        rng = np.random.default_rng(run.settings.data.data_seed)
        rows = sorted(int(i) for i in rng.choice(rows, size=bench.order_examples, replace=False))
    return list(rows)


def _simulate_every_rule(run: _BenchmarkRun, model, heads: LearnedExitHeads | None, tables: _Tables) -> _Sweeps:
    """Steps 6-7: every rule's knob grid simulated on the tables, summarized, with its calibrated points."""
    run.steps.start("simulating every rule's sweep on the tables")
    bench, dev, test = run.bench, tables.dev, tables.test
    spec = _flops_spec(model, heads)
    full_test, full_dev = test.full_depth(), dev.full_depth()
    points: dict[str, list[PointResult]] = {}
    candidates: dict[str, list[Candidate]] = {}
    for name in tqdm(run.rules, desc="sweeps", unit="rule", disable=not run.progress, leave=False):
        candidates[name] = build_candidates(name, dev, test, policy_tables=tables.policy,
                                            thresholds=bench.threshold_values(), grid_points=bench.grid_points)
        points[name] = sweep(candidates[name], spec)
    oracle_point = sweep(build_candidates("oracle", dev, test), spec)[0]
    x_range = auc_x_range(points, model.num_layers)
    summaries = {name: summarize_method(pts, full_test["accuracy"], full_dev["accuracy"], x_range)
                 for name, pts in points.items()}
    outcomes = {name: outcomes_from_points(name, pts, dev, test) for name, pts in points.items()}
    separate: dict[str, list[list[int]]] = {}
    for name, out in outcomes.items():
        if tables.order and len(out.sequences) > 1:
            separate[name] = out.sequences
            out.sequences = chain_on_order_split(out.sequences, *order_statistics(candidates[name], tables.order))
    for name, pts in points.items():
        summaries[name]["calibrated"] = calibrated_points(pts, outcomes[name], len(dev), full_test["accuracy"],
                                                          delta=bench.delta, loss=bench.calibration_loss,
                                                          seed=run.settings.data.data_seed,
                                                          method=bench.calibration_guarantee)
    return _Sweeps(spec, full_dev, full_test, points, oracle_point, x_range, summaries, outcomes, separate)


def _measure_wall_clock(run: _BenchmarkRun, model, data, heads: LearnedExitHeads | None,
                        policy_dirs: dict[float, Path], sweeps: _Sweeps) -> dict[str, Any]:
    """Step 8: the engine against full depth for a bounded set of points (sets their ``wall_speedup``)."""
    run.steps.start("wall-clock speed-up (engine vs full depth)")
    bench = run.bench
    wall_info: dict[str, Any] = {"engine": ENGINE_NAME, "batch_size": bench.wall_batch_size,
                                 "repeats": bench.wall_repeats, "examples": None,
                                 "measured": f"each rule's dev-selected points and up to {bench.wall_frontier_points} "
                                             "test-frontier points; every other point has wall_speedup null",
                                 "threads": torch.get_num_threads(), "device": str(run.torch_device),
                                 "autocast": bench.wall_autocast}
    if bench.wall_repeats > 0:
        batches = timing_batches(data.encoded["test"], data.collate, bench.wall_examples, bench.wall_batch_size,
                                 run.settings.data.data_seed, run.torch_device)
        wall_info.update(time_operating_points(
            model, sweeps.points, sweeps.summaries, batches, policy_dirs=policy_dirs, heads=heads,
            frontier_points=bench.wall_frontier_points, repeats=bench.wall_repeats,
            autocast=None if bench.wall_autocast == "none" else bench.wall_autocast, device=run.torch_device,
            progress=run.progress, log=run.log))
    else:
        wall_info["measured"] = "not measured (wall_repeats = 0): every wall_speedup is null"
    return wall_info


def _same_weights_study(run: _BenchmarkRun, tables: _Tables, sweeps: _Sweeps) -> dict[str, Any] | None:
    """Every rule on each ConsistentEE model's own weights (None without ConsistentEE models)."""
    if not tables.policy:
        return None
    return _same_weights(run.rules, tables.policy, sweeps.spec, sweeps.full_test["accuracy"], run.bench.grid_points,
                         run.bench.threshold_values())


def _resampling_study(run: _BenchmarkRun, tables: _Tables, sweeps: _Sweeps) -> dict[str, Any] | None:
    """Step 9: how often calibrated and naive choices break their budget on unseen data (None when skipped)."""
    bench = run.bench
    if bench.resplits <= 0:
        return None
    run.steps.start(f"resampling study of calibration ({bench.resplits} dev/test re-splits)")
    return calibration_study(sweeps.outcomes, sweeps.summaries, sweeps.points, len(tables.dev), len(tables.test),
                             sweeps.full_test["accuracy"], delta=bench.delta, loss=bench.calibration_loss,
                             resplits=bench.resplits, seed=run.settings.data.data_seed,
                             method=bench.calibration_guarantee, separate_sequences=sweeps.separate_sequences)


def _write_benchmark_report(run: _BenchmarkRun, model, data, tables: _Tables, sweeps: _Sweeps,
                            policy_dirs: dict[float, Path], *, wall_info: dict[str, Any],
                            same_weights: dict[str, Any] | None, calibration: dict[str, Any] | None,
                            command: str | None) -> dict[str, Any]:
    """Step 10: ``report.json``, ``report.md`` and the plots; returns the report."""
    run.steps.start("writing report.json, report.md and plots")
    methods = _methods_report(sweeps, tables.test.labels, model.num_layers)
    histograms = {name: pts[methods[name]["histogram_point"]["index"]].test_exit_layers
                  for name, pts in sweeps.points.items()}
    histograms["oracle"] = sweeps.oracle.test_exit_layers
    report = _report(run, model, data, tables, sweeps, policy_dirs, methods=methods, wall_info=wall_info,
                     same_weights=same_weights, calibration=calibration, command=command)
    report["timing_seconds"] = {k: round(v, 2) for k, v in run.steps.close().items()}
    write_report(report, run.out_dir, exit_layers_by_rule=histograms, memorized_layers=_memorized_layers(run.run_dir))
    report["out_dir"] = str(run.out_dir)
    run.log(f"report written to {run.out_dir} ({', '.join(report['files'].values())})")
    return report


def _methods_report(sweeps: _Sweeps, labels: torch.Tensor, num_layers: int) -> dict[str, dict[str, Any]]:
    """``report["methods"]``: every rule's points, summaries and routing diagnostics."""
    methods = {name: _method_report(name, pts, sweeps.summaries[name], sweeps.oracle)
               for name, pts in sweeps.points.items()}
    for name, pts in sweeps.points.items():
        methods[name]["routing"] = _routing(pts, sweeps.summaries[name], sweeps.oracle, labels, num_layers)
    return methods


def _report(run: _BenchmarkRun, model, data, tables: _Tables, sweeps: _Sweeps, policy_dirs: dict[float, Path], *,
            methods: dict[str, Any], wall_info: dict[str, Any], same_weights: dict[str, Any] | None,
            calibration: dict[str, Any] | None, command: str | None) -> dict[str, Any]:
    """The report dict, before its timings and files are added."""
    settings, dev, test, oracle_point, spec = run.settings, tables.dev, tables.test, sweeps.oracle, sweeps.spec
    return {
        "dataset": settings.data.dataset,
        "model": settings.model.model,
        "num_layers": model.num_layers,
        "num_labels": model.num_labels,
        "labels": list(data.labels.names),
        "pooling": model.config.pooling,
        "split_sizes": data.splits.sizes(),
        "full_depth": {**sweeps.full_test, "dev_accuracy": sweeps.full_dev["accuracy"],
                       "per_exit_accuracy": test.per_exit_accuracy(), "dev_per_exit_accuracy": dev.per_exit_accuracy()},
        "methods": methods,
        "oracle": {"accuracy": oracle_point.test["accuracy"], "macro_f1": oracle_point.test["macro_f1"],
                   "mean_exit_layer": oracle_point.test["mean_exit_layer"],
                   "layer_speedup": oracle_point.test["layer_speedup"],
                   "flops_speedup": oracle_point.test["flops_speedup"],
                   "saved_fraction": oracle_point.test["saved_fraction"]},
        "calibration": calibration,
        "same_weights": same_weights,
        "significance": paired_bootstrap(sweeps.outcomes, np.arange(len(dev), len(dev) + len(test)), sweeps.x_range,
                                         seed=settings.data.data_seed),
        "consistentee_models": {f"{beta:g}": {"path": str(policy_dirs[beta]),
                                              "full_depth_test_accuracy": t.full_depth()["accuracy"],
                                              "full_depth_dev_accuracy": d.full_depth()["accuracy"],
                                              "full_depth_test_change_points": 100.0 * (
                                                  t.full_depth()["accuracy"] - sweeps.full_test["accuracy"]),
                                              "policy_sensitivity": policy_sensitivity(t.policy_probs, t.probs,
                                                                                       t.labels)}
                                for beta, (d, t) in tables.policy.items()},
        "settings": {
            "command": command,
            "run_dir": str(run.run_dir.resolve()),
            "device": str(run.torch_device),
            "machine": _machine(),
            "versions": _versions(),
            "seeds": {"data": settings.data.data_seed, "stage1": settings.stage1.seed,
                      "learned_heads": settings.learned.learned_seed, "policy": settings.policy.seed},
            "auc_x_range": list(sweeps.x_range),
            "loss_budgets_points": list(LOSS_BUDGETS),
            "selection": "dev_selected: the largest dev layer speed-up within the budget against dev full depth "
                         "(naive); calibrated: the fastest knob Learn-then-Test certifies on dev for the budget "
                         "with probability >= 1 - delta; best_layer_speedup_at_* read off the test curve",
            "flops": {"shape": asdict(spec.shape), "pooler_used": spec.pooler_used,
                      "learned_head_flops_per_layer": spec.learned_head_flops},
            "wall_clock": wall_info,
            **settings.to_json(),
        },
        "timing_seconds": {},
    }


def _check_run_settings(run_dir: Path, settings: BenchmarkSettings) -> None:
    """Refuse a run directory trained with other data or model settings (never mix two runs)."""
    run_data_cfg, run_model_cfg = load_run_settings(run_dir)
    differ = [f"{part}.{k}: run {v!r}, asked {getattr(asked, k)!r}"
              for part, saved, asked in (("data", run_data_cfg, settings.data), ("model", run_model_cfg, settings.model))
              for k, v in asdict(saved).items() if v != getattr(asked, k)]
    differ += _seed_mismatches(run_dir, settings)
    if differ:
        raise ValueError(f"{run_dir} holds a run trained with other settings ({'; '.join(differ)}); "
                         "use another --run-dir or the run's own settings")


def _seed_mismatches(run_dir: Path, settings: BenchmarkSettings) -> list[str]:
    """Seeds of what the run directory already trained that differ from the ones asked: reusing those models
    under another seed would report one seed's models as another's."""
    def saved(path: Path, *keys: str) -> Any:
        try:
            value = read_json(path)
        except (OSError, ValueError):
            return None
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    found = [("stage1.seed", saved(run_dir / "stage1" / "metrics.json", "config", "seed"), settings.stage1.seed),
             ("learned_seed", saved(run_dir / "learned_heads" / "config.json", "extra", "train_config", "learned_seed"),
              settings.learned.learned_seed)]
    found += [(f"policy.seed ({d.name})", saved(d / "progress.json", "config", "seed"), settings.policy.seed)
              for d in sorted((run_dir / "policies").glob("beta-*"))]
    return [f"{name}: run {have!r}, asked {asked!r}" for name, have, asked in found if have is not None and have != asked]


def _learned_heads(run_dir: Path, model, data, data_cfg: DataConfig, cfg: LearnedHeadConfig, *,
                   device: torch.device, progress: bool, log) -> LearnedExitHeads:
    """The heads saved in ``run_dir/learned_heads`` when they were trained on the current stage-1 weights, else
    freshly trained (and saved)."""
    heads_dir = run_dir / "learned_heads"
    weights = stage1_model_dir(run_dir) / "model.safetensors"
    rows = policy_rows(data, data_cfg)  # the same examples the ConsistentEE policies see
    stamp = {"stage1_weights_bytes": weights.stat().st_size, "stage1_weights_mtime_ns": weights.stat().st_mtime_ns,
             "train_rows": len(rows)}
    if LearnedExitHeads.is_saved(heads_dir) and _saved_extra(heads_dir).get("stage1") == stamp:
        log(f"learned exit heads found in {heads_dir}; loading them")
        return LearnedExitHeads.load(heads_dir, device=device)
    heads = train_learned_heads(model, train_subset(data, rows), data.collate, cfg, device=device,
                                progress=progress, log=log)
    heads.save(heads_dir, extra={"stage1": stamp, "train_config": heads.train_config, "history": heads.history})
    log(f"learned exit heads written to {heads_dir}")
    return heads


def _saved_extra(directory: Path) -> dict:
    """The ``extra`` block of a saved learned-heads config (empty when unreadable)."""
    try:
        return json.loads((directory / "config.json").read_text(encoding="utf-8")).get("extra") or {}
    except (OSError, ValueError):
        return {}


def _policy_models(run_dir: Path, betas: list[float], cfg: PolicyConfig, *, device: str, progress: bool,
                   log) -> dict[float, Path]:
    """The ConsistentEE model directory of every beta; betas not finished yet are trained (or resumed) first."""
    found = {beta: policy_model_dir(run_dir, beta) for beta in betas if policy_complete(run_dir, beta)}
    missing = [b for b in betas if b not in found]
    if not missing:
        log(f"ConsistentEE models found for every beta ({', '.join(f'{b:g}' for b in betas)})")
        return found
    log(f"training ConsistentEE policies for beta {', '.join(f'{b:g}' for b in missing)}"
        + (f" (found {', '.join(f'{b:g}' for b in found)})" if found else ""))
    trained = run_beta_sweep(run_dir, missing, cfg, device=device, progress=progress, log=log)
    return {**found, **{b: Path(trained[b]) for b in missing}}


def _policy_tables(path: Path, stage1_model, collate, splits: dict[str, Any], beta: float, *, batch_size: int,
                   device: torch.device, progress: bool) -> dict[str, EvalTables]:
    """The tables of the ConsistentEE model in ``path`` on each of ``splits`` (name -> dataset)."""
    model = EarlyExitForSequenceClassification.from_pretrained(path, device=device)
    if model.num_layers != stage1_model.num_layers or model.num_labels != stage1_model.num_labels:
        raise ValueError(f"the ConsistentEE model in {path} does not match the stage-1 model's shape")
    return {name: EvalTables.from_exit_tables(collect_exit_tables(
        model, dataset, collate, batch_size=batch_size, device=device, progress=progress,
        desc=f"tables {name} beta={beta:g}")) for name, dataset in splits.items()}


def _flops_spec(model, heads: LearnedExitHeads | None) -> FlopsSpec:
    shape = EncoderShape.from_hf_config(model.backbone.config, num_labels=model.num_labels,
                                        policy_hidden=model.config.policy_hidden_size,
                                        has_pooler=model.backbone.has_pooler)
    return FlopsSpec(shape, pooler_used=model.config.pooling == "pooler",
                     learned_head_flops=heads.flops_per_layer() if heads is not None else 0.0)


def _routing(points: list[PointResult], summary: dict[str, Any], oracle_point: PointResult,
             labels: torch.Tensor, num_layers: int) -> dict[str, Any]:
    """Routing diagnostics on test at the rule's calibrated and dev-selected 1-point settings (when neither
    exists: at its most accurate dev point)."""
    chosen = {f"{part}_1pt": summary[part][budget_key(1.0)]["index"] for part in ("calibrated", "dev_selected")}
    chosen = {k: i for k, i in chosen.items() if i is not None} or {"best_dev": best_point_index(points, summary)}
    return {where: {"knob": points[i].knob, **routing_diagnostics(
        points[i].test_exit_layers, points[i].test_predictions, labels, oracle_point.test_exit_layers, num_layers)}
        for where, i in chosen.items()}


def _same_weights(rules: list[str], policy_tables: dict[float, tuple[EvalTables, EvalTables]], spec: FlopsSpec,
                  reference_accuracy: float, grid_points: int, thresholds) -> dict[str, Any]:
    """Every rule on each ConsistentEE model's own weights: how much of ConsistentEE's gain is the policy's
    decision and how much its training. Budgets are against the stage-1 model's full depth, as everywhere."""
    out: dict[str, Any] = {}
    for beta, (d, t) in sorted(policy_tables.items()):
        points = {}
        for name in rules:
            if "learned_score" in RULES[name].needs:  # learned heads read stage-1 states: not defined on these weights
                continue
            tables = {beta: (d, t)} if RULES[name].model_keyed else None
            points[name] = sweep(build_candidates(name, d, t, policy_tables=tables, thresholds=thresholds,
                                                  grid_points=grid_points), spec)
        x_range = auc_x_range(points, t.num_layers)
        rows = {}
        for name, pts in points.items():
            s = summarize_method(pts, reference_accuracy, d.full_depth()["accuracy"], x_range)
            rows[name] = {"auc": s["auc"], "best_layer_speedup_at_0.5pt": s["best_layer_speedup_at_0.5pt"],
                          "best_layer_speedup_at_1pt": s["best_layer_speedup_at_1pt"]}
        out[f"{beta:g}"] = {"full_depth_test_accuracy": t.full_depth()["accuracy"], "auc_x_range": list(x_range),
                            "rules": rows}
    return out


def _method_report(name: str, points: list[PointResult], summary: dict[str, Any],
                   oracle_point: PointResult) -> dict[str, Any]:
    """A rule's entry of ``report["methods"]``."""
    for sel in [*summary["dev_selected"].values(), *summary["calibrated"].values()]:
        if sel["index"] is not None:
            sel["test_wall_clock"] = points[sel["index"]].wall
    best = best_point_index(points, summary)
    one = summary["best_layer_speedup_at_1pt"]
    return {
        "knob_name": RULES[name].knob_name if name != "consistentee" else "beta,threshold",
        "points": [p.to_json() for p in points],
        "auc": summary["auc"],
        "best_layer_speedup_at_0.5pt": summary["best_layer_speedup_at_0.5pt"],
        "best_layer_speedup_at_1pt": one,
        "frontier": summary["frontier"],
        "dev_selected": summary["dev_selected"],
        "calibrated": summary["calibrated"],
        "histogram_point": {"knob": points[best].knob, "index": best},
        "oracle_gap": oracle_gap(points, oracle_point, one),
    }


def _memorized_layers(run_dir: Path) -> np.ndarray | None:
    if not (run_dir / memorized.FILE_NAME).is_file():
        return None
    mem, _ = memorized.load_memorized(run_dir)
    return np.array(list(mem.values()), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# how the run went: progress lines and the machine


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Steps:
    """Logs ``[i/n] what (elapsed so far)`` as each step starts and keeps every step's duration."""

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
        """Every step's duration; logs the whole run's (``make demo`` prints its own duration this way)."""
        self._finish()
        self.log(f"all {self.total} steps done in {_fmt_seconds(time.perf_counter() - self.t0)}")
        return self.durations


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
