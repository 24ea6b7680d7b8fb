"""``consistentee calibrate``: choose a model's operating point for an accuracy budget, with a guarantee.

Recipe: load the model folder -> per-layer tables of a held-out labelled split -> the rule's knob
candidates at quantiles of its own score -> Learn-then-Test (:mod:`consistentee.evaluation.calibration`)
-> ``operating_point.json`` in the model folder, which predict, serve and the Python API then use when no
knob is given.

The guarantee (``guarantee``, default ``expected+unseen``): with probability at least ``1 - delta`` over the
draw of the calibration split, the chosen knob's expected loss against the model's own full depth is at most
the budget (finite-sample), and so is its mean loss on ``unseen_rows`` new inputs (normal approximation),
for inputs drawn like that split. It says nothing about inputs from another distribution.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from consistentee.evaluation.calibration import (
    DEFAULT_DELTA,
    DEFAULT_METHOD,
    LOSS_DEFINITIONS,
    LOSSES,
    METHOD_DEFINITIONS,
    METHODS,
    calibrate,
    chain_on_order_split,
    outcomes_from_points,
)
from consistentee.evaluation.sweep import EvalTables, build_candidates, order_statistics, sweep
from consistentee.exits.operating_point import OperatingPoint, save_operating_point
from consistentee.exits.rules import CALIBRATION_RULES, RULES
from consistentee.exits.tables import collect_exit_tables

__all__ = ["AUTO_RULE", "CALIBRATION_RULES", "CalibrationConfig", "calibrate_model", "model_folder",
           "tables_for_split"]


ORDERS = ("train", "knobs")
#: The rule ``--rule auto`` certifies, whatever trained the model: on ConsistentEE models a confidence threshold
#: certifies a faster point than the model's own policy, both within the guarantee (docs/calibration.md, "Which
#: rule": ``benchmarks/calibration_rules.py``); ``--rule consistentee`` still certifies the policy.
AUTO_RULE = "confidence"


@dataclass
class CalibrationConfig:
    """What to calibrate for: the budget, the confidence, the rule and how finely its knob is searched."""

    #: largest accuracy loss against full depth, in percentage points.
    max_loss: float = 1.0
    #: the budget holds with probability at least 1 - delta.
    delta: float = DEFAULT_DELTA
    #: exit rule, or "auto": AUTO_RULE (confidence) on every model.
    rule: str = "auto"
    #: what is controlled: accuracy_drop (default) or disagreement with full depth (label-free, stricter).
    loss: str = "accuracy_drop"
    #: knob candidates at quantiles of the rule's score on the split.
    grid_points: int = 200
    #: seed of the example order the WSR p-value reads.
    seed: int = 0
    #: what is guaranteed: expected+unseen (default), expected, or unseen (see evaluation.calibration).
    guarantee: str = DEFAULT_METHOD
    #: how many unseen inputs the budget must hold on (tests with "unseen"); None: the calibration split's size.
    unseen_rows: int | None = None
    #: a rule whose knobs form several sequences (PCEE's patiences): train tests one chain at the whole delta,
    #: ordered and pruned on training rows (never the calibration split); knobs splits delta among the sequences.
    order: str = "train"
    #: training rows (a seeded subset) that order that chain.
    order_examples: int = 2000

    def __post_init__(self) -> None:
        if not 0.0 < self.max_loss < 100.0:
            raise ValueError(f"--max-loss must lie in (0, 100) accuracy points, got {self.max_loss}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"--delta must lie in (0, 1), got {self.delta}")
        if self.rule != "auto" and self.rule not in CALIBRATION_RULES:
            raise ValueError(f"--rule {self.rule!r} cannot be calibrated on a model folder; choose auto or one of "
                             f"{', '.join(CALIBRATION_RULES)}")
        if self.guarantee not in METHODS:
            raise ValueError(f"--guarantee must be one of {', '.join(METHODS)}, got {self.guarantee!r}")
        if self.unseen_rows is not None and self.unseen_rows < 1:
            raise ValueError(f"--unseen-rows must be >= 1, got {self.unseen_rows}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.grid_points < 2:
            raise ValueError(f"--grid-points must be >= 2, got {self.grid_points}")
        if self.order not in ORDERS:
            raise ValueError(f"--calibration-order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.order_examples < 1:
            raise ValueError(f"--order-examples must be >= 1, got {self.order_examples}")


def calibrate_model(
    model, model_dir: str | os.PathLike, tables: EvalTables, cfg: CalibrationConfig, *,
    source: dict[str, Any] | None = None, write: bool = True,
    order_tables: Callable[[], EvalTables] | None = None,
) -> tuple[OperatingPoint, dict[str, Any]]:
    """Calibrate ``model`` (loaded from ``model_dir``) on the labelled ``tables`` of a held-out split.

    ``order_tables`` gives the tables of training rows, asked for only when the rule's knobs form several
    sequences and ``cfg.order`` is train; without it those sequences split delta. Returns the operating point
    (written to ``model_dir/operating_point.json`` when ``write``) and a summary of what was measured on the
    calibration split. Nothing certified: the point is full depth (static k=L).
    """
    rule = AUTO_RULE if cfg.rule == "auto" else cfg.rule
    n = len(tables)
    policy_tables = {0.0: (tables, tables)} if RULES[rule].model_keyed else None
    candidates = build_candidates(rule, tables, tables, policy_tables=policy_tables, grid_points=cfg.grid_points)
    points = sweep(candidates)
    outcomes = outcomes_from_points(rule, points, tables, tables)
    sequences = len(outcomes.sequences)
    order, order_rows = ("knobs" if sequences > 1 else "single sequence"), None
    if sequences > 1 and cfg.order == "train" and order_tables is not None:
        train = order_tables()
        outcomes.sequences = chain_on_order_split(outcomes.sequences,
                                                  *order_statistics(candidates, {None: train, 0.0: train}))
        order_rows = len(train)
        order = f"train ({order_rows} training rows)"
    rows = np.arange(n)  # the dev half of the pooled outcomes is the calibration split
    unseen = cfg.unseen_rows or n
    choice = calibrate(outcomes, rows, max_loss_points=cfg.max_loss, delta=cfg.delta, loss=cfg.loss,
                       order_seed=cfg.seed, method=cfg.guarantee, test_size=unseen)
    full = float(tables.full_depth()["accuracy"])
    if choice.index is None:
        chosen_rule, knob, acc, speed = "static", tables.num_layers, full, 1.0
    else:
        p = points[choice.index]
        chosen_rule, knob = rule, RULES[rule].knob_from_json(p.knob)  # the knob without the model key
        acc, speed = float(p.dev["accuracy"]), float(p.dev["layer_speedup"])
    summary = {
        "method": "learn-then-test (fixed-sequence testing, "
                  + {"expected": "", "unseen": "normal-approximation ",
                     "expected+unseen": "normal-approximation and "}[cfg.guarantee]
                  + ("" if cfg.guarantee == "unseen" else
                     "WSR " if cfg.loss == "accuracy_drop" else "Hoeffding-Bentkus ") + "p-values)",
        "guarantee": cfg.guarantee, "guarantee_definition": METHOD_DEFINITIONS[cfg.guarantee],
        "unseen_rows": None if cfg.guarantee == "expected" else unseen,
        "rule_searched": rule, "max_loss_points": cfg.max_loss, "delta": cfg.delta, "loss": cfg.loss,
        "loss_definition": LOSS_DEFINITIONS[cfg.loss], "calibration_examples": n, "candidates": len(points),
        "certified": choice.certified, "seed": cfg.seed,
        "order": order, "order_rows": order_rows, "sequences_tested": len(outcomes.sequences),
        "calibration_split": {"full_depth_accuracy": full, "accuracy": acc, "layer_speedup": speed,
                              "loss_points": 100.0 * (full - acc)},
        **(source or {}),
    }
    if choice.index is None:
        summary["note"] = "no knob was certified for this budget: the model runs at full depth"
    point = OperatingPoint(rule=chosen_rule, knob=knob, calibration=summary)
    if write:
        save_operating_point(model_dir, point)
    return point, summary


def tables_for_split(model, dataset, collate, *, batch_size: int, device: torch.device, progress: bool) -> EvalTables:
    """Per-layer tables of a labelled split under ``model`` (one full-depth pass)."""
    cache = collect_exit_tables(model, dataset, collate, batch_size=batch_size, device=device, progress=progress,
                                desc="calibration tables")
    if cache.labels is None:
        raise ValueError("calibration needs a labelled split")
    return EvalTables.from_exit_tables(cache)


def model_folder(path: str | os.PathLike) -> Path:
    """The model folder to calibrate: ``path`` itself (it must hold config.json)."""
    folder = Path(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json); calibrate a saved model, e.g. "
                                "RUN_DIR/policies/beta-0.05/model")
    return folder

