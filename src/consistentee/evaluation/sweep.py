"""Operating points of every exit rule, simulated on per-layer tables (exact and cheap).

:class:`EvalTables` holds what one model gives on one split (every exit's softmax, the policies' exit
probabilities, the learned heads' scores). :func:`build_candidates` turns a rule's knob grid into
:class:`Candidate` points and :func:`sweep` simulates each on dev and test
(:func:`~consistentee.exits.rules.simulate_exits`): accuracy, macro-F1, MCC, mean exit layer, layer
speed-up and the analytic FLOPs speed-up (:class:`FlopsSpec`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from consistentee.evaluation.flops import EncoderShape, flops_speedup
from consistentee.evaluation.metrics import classification_metrics, speedup_summary
from consistentee.exits.rules import RULES, ExitRule, make_rule, simulate_exits
from consistentee.exits.tables import ExitTables

__all__ = [
    "Candidate",
    "EvalTables",
    "FlopsSpec",
    "PointResult",
    "build_candidates",
    "evaluate_exits",
    "knob_from_json",
    "knob_label",
    "knob_to_json",
    "order_statistics",
    "rule_flops_kwargs",
    "sweep",
]

class EvalTables(ExitTables):
    """Per-layer signals of one labelled split under one model, what :func:`simulate_exits` reads: an
    :class:`~consistentee.exits.tables.ExitTables` whose gold labels are required (checked here), built positionally
    as ``(probs, labels, seq_lens, policy_probs, learned_scores)``, with full-depth metrics.

    ``probs`` [N, L, C] softmax of every exit; ``labels`` [N]; ``seq_lens`` [N] real tokens per row (FLOPs);
    ``policy_probs`` [N, L-1] policy exit probabilities (ConsistentEE); ``learned_scores`` [N, L] learned exit
    head scores.
    """

    def __init__(self, probs: torch.Tensor, labels: torch.Tensor, seq_lens: torch.Tensor,
                 policy_probs: torch.Tensor | None = None, learned_scores: torch.Tensor | None = None) -> None:
        super().__init__(probs=probs, policy_probs=policy_probs, labels=labels, seq_lens=seq_lens,
                         learned_scores=learned_scores)
        if self.probs.dim() != 3:
            raise ValueError(f"probs must be [N, L, C], got {tuple(self.probs.shape)}")
        if self.labels is None or self.labels.shape != (self.probs.shape[0],):
            raise ValueError("EvalTables needs gold labels [N] (evaluation splits must be labelled)")
        if self.seq_lens.shape != (self.probs.shape[0],):
            raise ValueError(f"seq_lens must be [N] = [{self.probs.shape[0]}], got {tuple(self.seq_lens.shape)}")

    @classmethod
    def from_cache(cls, cache: ExitTables, heads=None) -> EvalTables:
        """From an :class:`~consistentee.exits.tables.ExitTables` with pooled states (+ learned heads scored on its
        states)."""
        learned = None
        if heads is not None:
            with torch.inference_mode():
                learned = heads.score_all(cache.pooled.to(next(heads.parameters()).device)).cpu()
        return cls(cache.probs, cache.labels, cache.seq_lens, cache.policy_probs, learned)

    @classmethod
    def from_exit_tables(cls, tables: ExitTables, learned_scores=None) -> EvalTables:
        return cls(tables.probs, tables.labels, tables.seq_lens, tables.policy_probs, learned_scores)

    def full_depth(self) -> dict[str, float]:
        return classification_metrics(self.labels, self.probs[:, -1].argmax(-1))


def knob_to_json(rule_name: str, knob: Any, beta: float | None = None) -> Any:
    """The JSON form of a knob (the rule's :meth:`~consistentee.exits.rules.ExitRule.knob_to_json`): a number for
    one-knob rules, ``{"t", "S"}`` for pcee, ``{"beta", "threshold"}`` for consistentee, ``None`` for the oracle."""
    return RULES[rule_name].knob_to_json(knob, beta)


def knob_label(rule_name: str, knob_json: Any) -> str:
    """Short human form: ``S=0.21``, ``t=2, S=0.21``, ``beta=0.05, threshold=0.5``, ``-``."""
    if knob_json is None:
        return "-"
    if isinstance(knob_json, Mapping):
        return ", ".join(f"{k}={v:g}" if isinstance(v, int | float) else f"{k}={v}" for k, v in knob_json.items())
    name = RULES[rule_name].knob_name if rule_name in RULES else "knob"
    return f"{name}={knob_json:g}"


def knob_from_json(rule_name: str, knob_json: Any) -> Any:
    """The ``make_rule`` knob of a JSON knob (inverse of :func:`knob_to_json`)."""
    return RULES[rule_name].knob_from_json(knob_json)


@dataclass
class FlopsSpec:
    """What the analytic FLOPs count needs: the encoder shape, whether the pooler runs, the learned heads."""

    shape: EncoderShape
    pooler_used: bool = False
    learned_head_flops: float = 0.0


def rule_flops_kwargs(rule_name: str, spec: FlopsSpec) -> dict[str, Any]:
    """Keyword arguments of :func:`flops_speedup` for a rule, from what its decision costs
    (:meth:`~consistentee.exits.rules.ExitRule.cost`).

    Rules that read exit softmaxes run every exit classifier at every executed layer; the others (``learned``,
    ``consistentee``, ``static``) run the classifier only at the exit taken. ConsistentEE counts its policies,
    ``learned`` its heads (``extra_flops_per_layer``). When the pooler is the pooling, the rules that skip
    classifiers but read the pooled state still pool at every layer: that is added per layer too, which
    overcounts one pooler at the exit (< 0.1% of a layer).
    """
    cost = RULES[rule_name].cost()
    extra = 0.0
    if cost.pooled_every_layer and spec.pooler_used:
        extra += 2.0 * spec.shape.hidden_size * spec.shape.hidden_size
    if cost.learned_head:
        extra += float(spec.learned_head_flops)
    return {
        "with_policy": cost.policy,
        "pooler_used": spec.pooler_used,
        "heads_every_layer": cost.every_classifier,
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
    #: the dev split's exit layers and predictions (what calibration and the resampling study read).
    dev_exit_layers: torch.Tensor | None = None
    dev_predictions: torch.Tensor | None = None

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
            **({"wall_invalid": self.wall["invalid"]} if self.wall and self.wall.get("invalid") else {}),
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
    grid_points: int = 0,
) -> list[Candidate]:
    """The sweep of one rule: ``grid``, else ``grid_points`` knobs at quantiles of the rule's own score on
    dev and test together (plus its default grid; :meth:`ExitRule.data_grid`), else its default grid
    (scaled to the classes and layers). The grid reads no labels.

    ``consistentee`` takes its points from ``policy_tables`` (``beta -> (dev, test)`` tables of each
    beta's model), crossed with ``thresholds`` (or a quantile grid of that model's policy probabilities).
    """
    cls = RULES[rule_name]
    if cls.model_keyed:
        if not policy_tables:
            raise ValueError(f"the {rule_name} rule needs the tables of at least one beta model")
        out = []
        for beta, (d, t) in sorted(policy_tables.items()):
            if thresholds is not None:
                values = list(thresholds)
            elif grid is not None:
                values = list(grid)
            elif grid_points > 0:
                values = cls.data_grid(*_pooled(d, t), points=grid_points)
            else:
                values = cls.default_grid()
            out.extend(Candidate(rule_name, knob_to_json(rule_name, thr, beta), make_rule(rule_name, thr), d, t,
                                 float(beta)) for thr in values)
        return out
    if grid is None and grid_points > 0:
        grid = cls.data_grid(*_pooled(dev, test), points=grid_points)
    if grid is None:
        grid = cls.default_grid(num_classes=test.num_classes, num_layers=test.num_layers)
    grid = [k for k in grid if cls.in_sweep(k, test.num_layers)]
    return [Candidate(rule_name, knob_to_json(rule_name, k), make_rule(rule_name, k), dev, test) for k in grid]


def _pooled(dev: EvalTables, test: EvalTables) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Dev and test signals stacked: what a quantile grid is built on."""
    def cat(a, b):
        return None if a is None or b is None else torch.cat([a, b])
    return cat(dev.probs, test.probs), cat(dev.policy_probs, test.policy_probs), \
        cat(dev.learned_scores, test.learned_scores)


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
            dev_exit_layers=d.exit_layer.cpu(), dev_predictions=d.predictions.cpu(),
        ))
    return points


def order_statistics(candidates: Sequence[Candidate],
                     tables: Mapping[float | None, EvalTables]) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate's mean exit layer and accuracy drop (points, against the stage-1 model's full depth)
    on rows that are neither dev nor test: ``tables[None]`` the stage-1 model's, ``tables[beta]`` each
    ConsistentEE model's (same rows). What orders calibration's single chain
    (:func:`~consistentee.evaluation.calibration.chain_on_order_split`)."""
    reference = tables[None]
    ref_correct = (reference.probs[:, -1].argmax(-1) == reference.labels).double()
    layers, losses = [], []
    for c in candidates:
        t = tables[c.model_key]
        result = _simulate(c.rule, t)
        layers.append(float(result.exit_layer.double().mean()))
        losses.append(100.0 * float((ref_correct - (result.predictions == t.labels).double()).mean()))
    return np.array(layers), np.array(losses)
