"""What a rule's simulated points add up to: frontier, AUC, dev-selected knobs, gap to the oracle.

Every number is read off the **test** curve except the knob choice, which uses **dev** only
(:func:`summarize_method`); :func:`select_wall_points` picks the few points worth timing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from consistentee.evaluation.calibration import (
    DEFAULT_METHOD,
    LOSS_DEFINITIONS,
    METHOD_DEFINITIONS,
    METHODS,
    Outcomes,
    calibrate,
    resampling_study,
)
from consistentee.evaluation.curves import (
    auc_saved_fraction,
    best_speedup_within,
    pareto_frontier,
    select_on_dev,
)
from consistentee.evaluation.sweep import PointResult

__all__ = [
    "LOSS_BUDGETS",
    "STUDY_BUDGETS",
    "attainable_accuracy",
    "auc_x_range",
    "best_point_index",
    "budget_key",
    "calibrated_points",
    "calibration_study",
    "paired_bootstrap",
    "policy_sensitivity",
    "frontier_indices",
    "oracle_gap",
    "routing_diagnostics",
    "select_wall_points",
    "summarize_method",
]

#: accuracy-loss budgets in percentage points against full depth.
LOSS_BUDGETS = (0.5, 1.0)


def budget_key(budget: float) -> str:
    """``0.5 -> "0.5pt"``, ``1.0 -> "1pt"``."""
    return f"{budget:g}pt"


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


def calibrated_points(
    points: Sequence[PointResult], outcomes: Outcomes, num_dev: int, full_test_accuracy: float,
    budgets: Sequence[float] = LOSS_BUDGETS, *, delta: float, loss: str, seed: int = 0,
    method: str = DEFAULT_METHOD,
) -> dict[str, dict[str, Any]]:
    """Per budget: the point Learn-then-Test certifies on dev (``outcomes`` rows ``0..num_dev-1``) and
    what it gave on test (the unseen rows of ``method``: the test split). ``index`` None means nothing was
    certified: the model runs at full depth."""
    out = {}
    dev_rows = np.arange(num_dev)
    for b in budgets:
        choice = calibrate(outcomes, dev_rows, max_loss_points=b, delta=delta, loss=loss, order_seed=seed,
                           method=method, test_size=outcomes.num_rows - num_dev)
        if choice.index is None:
            out[budget_key(b)] = {"index": None, "knob": None, "certified": 0, "dev_layer_speedup": 1.0,
                                  "test_accuracy": full_test_accuracy, "test_layer_speedup": 1.0,
                                  "test_flops_speedup": 1.0, "test_wall_speedup": None, "test_loss_points": 0.0,
                                  "within_budget_on_test": True, "note": "nothing certified: full depth"}
            continue
        p = points[choice.index]
        test_loss = 100.0 * (full_test_accuracy - p.test["accuracy"])
        out[budget_key(b)] = {
            "index": choice.index, "knob": p.knob, "certified": choice.certified,
            "dev_accuracy": p.dev["accuracy"], "dev_layer_speedup": p.dev["layer_speedup"],
            "test_accuracy": p.test["accuracy"], "test_macro_f1": p.test["macro_f1"],
            "test_layer_speedup": p.test["layer_speedup"], "test_flops_speedup": p.test["flops_speedup"],
            "test_wall_speedup": p.wall_speedup, "test_loss_points": test_loss,
            "within_budget_on_test": bool(test_loss <= b + 1e-9),
        }
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
    """Point indices to time: the calibrated and dev-selected ones, then ``frontier_points`` spread along the test frontier."""
    chosen: list[int] = []
    for part in ("calibrated", "dev_selected"):
        for sel in summary.get(part, {}).values():
            if sel.get("index") is not None and sel["index"] not in chosen:
                chosen.append(sel["index"])
    frontier = [i for i in frontier_indices(points) if i not in chosen]
    if frontier_points > 0 and frontier:
        k = min(frontier_points, len(frontier))
        picks = sorted({round(j * (len(frontier) - 1) / max(k - 1, 1)) for j in range(k)}) if k > 1 else \
            [len(frontier) // 2]
        chosen.extend(frontier[j] for j in picks)
    return chosen


#: budgets (accuracy points) of the resampling study; the report's JSON keys are ``str(float(budget))``.
STUDY_BUDGETS = (0.25, 0.5, 1.0, 1.5, 2.0)


def calibration_study(
    outcomes: Mapping[str, Outcomes], summaries: Mapping[str, Mapping[str, Any]],
    points: Mapping[str, Sequence[PointResult]], num_dev: int, num_test: int, full_test_accuracy: float, *,
    delta: float, loss: str, resplits: int, seed: int = 0, budgets: Sequence[float] = STUDY_BUDGETS,
    method: str = DEFAULT_METHOD, separate_sequences: Mapping[str, list[list[int]]] | None = None,
) -> dict[str, Any]:
    """The report's ``"calibration"`` block: per budget and rule, the resampling study
    (:func:`~consistentee.evaluation.calibration.resampling_study`) beside the best layer speed-up read off
    the test curve, and their ratio. ``separate_sequences``: for the rules calibrated as one chain, their
    separate sequences, studied on the same re-splits (``by_order.knobs``) to show what the chain changed; none
    (no rule chained) is ``order`` knobs."""
    order = "train" if separate_sequences else "knobs"
    by_budget: dict[str, dict[str, Any]] = {str(float(b)): {} for b in budgets}
    for name, out in outcomes.items():
        study = resampling_study(out, calibration_size=num_dev, test_size=num_test, budgets=budgets, delta=delta,
                                 loss=loss, resplits=resplits, seed=seed, method=method,
                                 compare_methods=METHODS)
        if separate_sequences and name in separate_sequences:
            knobs = resampling_study(replace(out, sequences=separate_sequences[name]), calibration_size=num_dev,
                                     test_size=num_test, budgets=budgets, delta=delta, loss=loss,
                                     resplits=resplits, seed=seed, method=method)
            for b, entry in knobs.items():
                study[b]["by_order"] = {"knobs": {k: entry[k] for k in ("violation_rate", "median_speedup",
                                                                         "none_certified_rate")}}
        pairs = [(p.test["layer_speedup"], p.test["accuracy"]) for p in points[name]]
        for b in budgets:
            entry = dict(study[str(float(b))])
            best = best_speedup_within(pairs, full_test_accuracy, b)
            entry["best_test_speedup"] = best
            entry["ratio_to_best"] = None if not best else entry["median_speedup"] / best
            by_budget[str(float(b))][name] = entry
    return {"delta": delta, "resplits": resplits, "loss": loss, "loss_definition": LOSS_DEFINITIONS[loss],
            "calibration_size": num_dev, "test_size": num_test,
            "guarantee": method, "guarantee_definition": METHOD_DEFINITIONS[method],
            "order": order,
            "by_order": "for a rule calibrated as one chain, by_order.knobs is its separate sequences (delta split "
                        "among them) on the same re-splits",
            "method": "Learn-then-Test, fixed-sequence testing from conservative to aggressive knobs ("
                      + ("one chain per rule; a rule with several models or patiences is ordered and pruned on "
                         "training rows, never on the calibration rows" if order == "train" else
                         "Bonferroni over sequences: one per ConsistentEE model and per PCEE patience") + "), "
                      + ("WSR betting p-values" if loss == "accuracy_drop" else "Hoeffding-Bentkus p-values")
                      + (" and the normal-approximation test of the loss on test_size unseen rows (both must "
                         "reject)" if method == "expected+unseen" else "")
                      + "; the fastest certified knob; nothing certified = full depth; by_method: the other "
                        "guarantees on the same re-splits",
            "resampling": "dev and test pooled and split at random (same sizes) resplits times; calibrated on the "
                          "first part, measured on the second; a violation is a realised accuracy loss against "
                          "full depth above the budget; naive = fastest knob within the budget on the first part",
            "budgets": by_budget}


def routing_diagnostics(exit_layers: Any, predictions: Any, labels: Any, oracle_exit_layers: Any,
                        num_layers: int) -> dict[str, Any]:
    """Does a rule route by input? The exit-layer histogram, how the exit taken tracks the input's hardness
    (Spearman correlation with the oracle's earliest correct exit), and the accuracy of the inputs sent to
    each layer. A rule that sends every input to one layer has one bin and no correlation."""
    from scipy.stats import spearmanr

    e = np.asarray(exit_layers).reshape(-1)
    right = np.asarray(predictions).reshape(-1) == np.asarray(labels).reshape(-1)
    oracle = np.asarray(oracle_exit_layers).reshape(-1)
    counts = np.bincount(e - 1, minlength=num_layers)[:num_layers]
    if len(np.unique(e)) > 1 and len(np.unique(oracle)) > 1:
        rho = float(spearmanr(e, oracle).statistic)
    else:
        rho = None
    return {
        "exit_layer_counts": counts.tolist(),
        "layers_used": int((counts > 0).sum()),
        "largest_layer_share": float(counts.max() / max(counts.sum(), 1)),
        "spearman_with_oracle_exit": rho,
        "accuracy_by_exit_layer": [float(right[e == layer].mean()) if (e == layer).any() else None
                                   for layer in range(1, num_layers + 1)],
    }


def policy_sensitivity(policy_probs: Any, probs: Any, labels: Any) -> list[dict[str, Any]]:
    """Does each layer's policy read its input, or only know its layer? Per policy (layer 1..L-1): the spread of
    its logit over the inputs, its Spearman correlation with the exit's max probability and with the exit being
    right, and the max probability's own correlation with being right (what a confidence threshold ranks by).
    A policy whose logit barely moves, or moves against the exit's confidence, exits by layer: sweeping its
    threshold moves whole layers of inputs at once instead of the confident ones first."""
    from scipy.stats import spearmanr

    p = np.clip(np.asarray(policy_probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    logits = np.log(p) - np.log1p(-p)
    probs = np.asarray(probs, dtype=np.float64)
    max_prob = probs.max(-1)
    right = (probs.argmax(-1) == np.asarray(labels).reshape(-1, 1)).astype(np.float64)

    def rho(a: np.ndarray, b: np.ndarray) -> float | None:
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            return None
        return float(spearmanr(a, b).statistic)

    return [{"layer": layer + 1, "logit_mean": float(logits[:, layer].mean()), "logit_std": float(logits[:, layer].std()),
             "spearman_with_max_prob": rho(logits[:, layer], max_prob[:, layer]),
             "spearman_with_correct": rho(logits[:, layer], right[:, layer]),
             "max_prob_spearman_with_correct": rho(max_prob[:, layer], right[:, layer])}
            for layer in range(logits.shape[1])]


def paired_bootstrap(
    outcomes: Mapping[str, Outcomes], rows: np.ndarray, x_range: tuple[float, float], *,
    reference: str = "consistentee", budgets: Sequence[float] = LOSS_BUDGETS, resamples: int = 1000, seed: int = 0,
) -> dict[str, Any]:
    """Are the differences between rules larger than the test split's noise? Paired bootstrap over ``rows``.

    Every resample draws the rows with replacement once and scores every rule on that same draw (paired:
    the rows that are hard for one rule are hard for all), recomputing each rule's AUC (as in the summary)
    and best layer speed-up within each budget of its whole candidate curve. Returns per rule the 2.5 / 50
    / 97.5 percentiles and, against ``reference``, the same for the difference (reference minus rule) and
    the share of resamples in which the reference is ahead. The knobs stay fixed: only the test rows vary,
    so this is the noise of the test split, not of training (seeds measure that).
    """
    rows = np.asarray(rows)
    rng = np.random.default_rng(seed)
    n = len(rows)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(resamples)]).astype(np.float64)
    first = next(iter(outcomes.values()))
    full = counts @ first.ref_correct[rows].astype(np.float64) / n  # [B]
    stats: dict[str, dict[str, np.ndarray]] = {}
    for name, out in outcomes.items():
        acc = counts @ out.correct[:, rows].T.astype(np.float64) / n  # [B, K]
        layers = counts @ out.exit_layers[:, rows].T.astype(np.float64) / n
        speed = out.num_layers / layers
        saved = 1.0 - layers / out.num_layers
        per = {"auc": np.array([auc_saved_fraction(list(zip(saved[b], acc[b], strict=True)), x_range)
                                for b in range(resamples)])}
        for budget in budgets:
            ok = acc >= full[:, None] - budget / 100.0 - 1e-12
            per[f"best_layer_speedup_at_{budget_key(budget)}"] = np.where(ok, speed, 1.0).max(axis=1).clip(min=1.0)
        stats[name] = per

    def interval(x: np.ndarray) -> list[float]:
        return [float(v) for v in np.percentile(x, [2.5, 50, 97.5])]

    result: dict[str, Any] = {"resamples": resamples, "rows": n, "reference": reference, "seed": seed,
                              "percentiles": [2.5, 50, 97.5], "rules": {}}
    ref = stats.get(reference)
    for name, per in stats.items():
        entry: dict[str, Any] = {k: interval(v) for k, v in per.items()}
        if ref is not None and name != reference:
            entry["reference_minus_rule"] = {k: interval(ref[k] - v) for k, v in per.items()}
            entry["reference_ahead_share"] = {k: float(np.mean(ref[k] > v)) for k, v in per.items()}
        result["rules"][name] = entry
    return result
