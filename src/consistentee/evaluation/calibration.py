"""Risk-controlled operating points: the fastest knob whose accuracy loss against full depth stays within a
budget with probability at least ``1 - delta`` (Learn-then-Test, :mod:`~consistentee.evaluation.risk`).

Everything here reads per-row outcomes of simulated operating points (:class:`Outcomes`: exit layer, whether
the prediction is right, whether it agrees with full depth), so calibrating, and resampling it hundreds of
times, costs seconds.

Losses (``LOSSES``), per example, against the full-depth prediction of the reference model:

* ``accuracy_drop`` (default): ``full_correct - exit_correct`` in ``{-1, 0, 1}``. Its mean *is* the accuracy
  drop the user budgets for; early exits that fix a full-depth mistake count in their favour. Tested with the
  variance-adaptive WSR p-value (most examples have loss 0).
* ``disagreement``: ``exit_prediction != full_prediction`` in ``{0, 1}``, with the Hoeffding-Bentkus
  p-value. It needs no labels and bounds the accuracy drop from above (a drop needs a disagreement), so it
  is stricter: it buys the guarantee with speed.

What is guaranteed (``METHODS``):

* ``expected``: with probability at least ``1 - delta`` the chosen knob's *expected* loss is within the
  budget (finite-sample, from the p-values above). A user never sees the expected loss: they see the mean
  loss on their own finite set of inputs, which scatters around it. A knob whose expected loss sits just
  under the budget breaks it on about half of all unseen sets; on rt-snippets this made 10.5% of 200
  re-splits break a 0.5-point budget at delta 0.1.
* ``expected+unseen`` (default): a knob must also pass a test of the loss on ``test_size`` unseen rows
  (:func:`unseen_pvalues`): the difference between the calibration mean and the mean on unseen rows has
  variance ``sigma^2 (1/n + 1/m)``, so the p-value is a normal tail (a central-limit approximation, so
  asymptotic). A knob is certified only when both tests reject: the finite-sample guarantee on the
  expected loss keeps holding, and the loss on ``m`` unseen rows is controlled too.
* ``unseen``: the unseen-rows test alone (faster knobs, asymptotic only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import norm

from consistentee.evaluation.curves import select_on_dev
from consistentee.evaluation.risk import hoeffding_bentkus_pvalue, learn_then_test, shift_to_unit, wsr_pvalue
from consistentee.evaluation.sweep import EvalTables, PointResult, knob_from_json
from consistentee.exits.rules import RULES

__all__ = [
    "DEFAULT_DELTA",
    "LOSSES",
    "LOSS_DEFINITIONS",
    "DEFAULT_METHOD",
    "METHODS",
    "METHOD_DEFINITIONS",
    "CalibrationChoice",
    "Outcomes",
    "calibrate",
    "candidate_sequences",
    "chain_on_order_split",
    "outcomes_from_points",
    "pvalues",
    "realised",
    "resampling_study",
    "unseen_pvalues",
]

LOSSES = ("accuracy_drop", "disagreement")
LOSS_DEFINITIONS = {
    "accuracy_drop": "per example: full-depth correct minus early-exit correct (in -1, 0, 1); its mean is the "
                     "accuracy drop against full depth",
    "disagreement": "per example: early-exit prediction differs from the full-depth prediction (0/1); it needs "
                    "no labels and bounds the accuracy drop from above",
}
DEFAULT_DELTA = 0.1
METHODS = ("expected+unseen", "expected", "unseen")
DEFAULT_METHOD = "expected+unseen"
METHOD_DEFINITIONS = {
    "expected": "the expected loss is within the budget with probability >= 1 - delta (finite-sample)",
    "expected+unseen": "the expected loss (finite-sample) and the mean loss on test_size unseen rows (normal "
                       "approximation) are both within the budget with probability >= 1 - delta",
    "unseen": "the mean loss on test_size unseen rows is within the budget with probability >= 1 - delta "
              "(normal approximation only)",
}


@dataclass
class Outcomes:
    """Per-row outcomes of K candidate operating points on N rows."""

    #: [K, N] 1-based exit layers.
    exit_layers: np.ndarray
    #: [K, N] whether each candidate's prediction is right.
    correct: np.ndarray
    #: [K, N] whether each candidate's prediction equals the reference model's full-depth prediction.
    agree: np.ndarray
    #: [N] whether the reference model at full depth is right.
    ref_correct: np.ndarray
    #: candidate indices from conservative to aggressive, one list per sequence.
    sequences: list[list[int]]
    num_layers: int

    def __post_init__(self) -> None:
        k, n = self.exit_layers.shape
        for name in ("correct", "agree"):
            if getattr(self, name).shape != (k, n):
                raise ValueError(f"{name} must be [{k}, {n}], got {getattr(self, name).shape}")
        if self.ref_correct.shape != (n,):
            raise ValueError(f"ref_correct must be [{n}], got {self.ref_correct.shape}")

    @classmethod
    def from_predictions(cls, exit_layers: np.ndarray, predictions: np.ndarray, labels: np.ndarray,
                         full_predictions: np.ndarray, sequences: list[list[int]], num_layers: int) -> Outcomes:
        labels = np.asarray(labels)
        predictions = np.asarray(predictions)
        full_predictions = np.asarray(full_predictions)
        return cls(np.asarray(exit_layers, dtype=np.int64), predictions == labels[None, :],
                   predictions == full_predictions[None, :], full_predictions == labels, sequences, num_layers)

    @property
    def num_candidates(self) -> int:
        return self.exit_layers.shape[0]

    @property
    def num_rows(self) -> int:
        return self.exit_layers.shape[1]


def candidate_sequences(rule_name: str, knobs: Sequence[Any], model_keys: Sequence[Any] | None = None) -> list[list[int]]:
    """Candidate indices grouped into fixed-sequence chains (one per model and per
    :meth:`~consistentee.exits.rules.ExitRule.sequence_key`), each from conservative to aggressive.

    ``knobs`` are in ``make_rule`` form. The order comes from the knobs alone, never from data.
    """
    cls = RULES[rule_name]
    keys = list(model_keys) if model_keys is not None else [None] * len(knobs)
    groups: dict[Any, list[int]] = {}
    for i, (knob, model) in enumerate(zip(knobs, keys, strict=True)):
        groups.setdefault((model, cls.sequence_key(knob)), []).append(i)
    return [sorted(idx, key=lambda i: cls.aggressiveness(knobs[i])) for _, idx in sorted(
        groups.items(), key=lambda kv: tuple(str(x) for x in kv[0]))]


def chain_on_order_split(sequences: Sequence[Sequence[int]], order_layers: np.ndarray,
                         order_losses: np.ndarray) -> list[list[int]]:
    """One fixed sequence through the candidates of several, ordered on rows calibration never reads.

    Several sequences split delta (Bonferroni): four ConsistentEE models are each tested at delta / 4, and a
    few hundred calibration rows then certify little. One chain keeps the whole delta, but its order must not
    come from the calibration rows, so it comes from another split (rows of the training split):
    ``order_layers`` and ``order_losses`` are every candidate's mean exit layer and accuracy drop there.
    A candidate that another one beats there (at least as fast, strictly smaller loss) is left out, so the
    chain follows that split's frontier from the slowest candidate to the fastest. Losses below zero count as
    zero: every budget holds them alike, and on rows the exits were trained on a knob that fixes a full-depth
    mistake or two is noise; otherwise it would push every conservative knob out and start the chain at a
    risky one. Equal losses (common on those rows) leave both in.
    """
    members = np.array(sorted({int(i) for s in sequences for i in s}), dtype=np.int64)
    if len(members) == 0:
        return []
    layers = np.asarray(order_layers, dtype=np.float64)[members]
    losses = np.maximum(np.asarray(order_losses, dtype=np.float64)[members], 0.0)
    beaten = ((layers[None, :] <= layers[:, None]) & (losses[None, :] < losses[:, None])).any(axis=1)
    kept = np.flatnonzero(~beaten)  # members is sorted, so the last key breaks ties by candidate index
    return [[int(members[k]) for k in sorted(kept, key=lambda k: (-layers[k], losses[k], k))]]


def _alpha(max_loss_points: float) -> float:
    alpha = float(max_loss_points) / 100.0
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"max loss must lie in (0, 100) points, got {max_loss_points}")
    return alpha


def _row_losses(outcomes: Outcomes, rows: np.ndarray, index: np.ndarray, loss: str) -> np.ndarray:
    """[len(index), len(rows)] per-example losses in their own scale (accuracy drop in {-1, 0, 1})."""
    if loss == "disagreement":
        return 1 - outcomes.agree[np.ix_(index, rows)].astype(np.int8)
    return outcomes.ref_correct[rows][None, :].astype(np.int8) - outcomes.correct[np.ix_(index, rows)].astype(np.int8)


def expected_pvalues(outcomes: Outcomes, rows: np.ndarray, loss: str, max_loss_points: float, delta: float,
                     order_seed: int = 0, candidates: Sequence[int] | None = None) -> np.ndarray:
    """Finite-sample p-values of H: E[loss] > budget: Hoeffding-Bentkus for the disagreement, WSR (in a
    seeded example order, betting at the per-sequence level ``delta / number of sequences``) for the drop."""
    alpha = _alpha(max_loss_points)
    rows = np.asarray(rows)
    index = np.arange(outcomes.num_candidates) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if loss == "disagreement":
        return hoeffding_bentkus_pvalue(_row_losses(outcomes, rows, index, loss).mean(axis=1), len(rows), alpha)
    order = rows[np.random.default_rng(order_seed).permutation(len(rows))]
    unit, unit_alpha = shift_to_unit(_row_losses(outcomes, order, index, loss), alpha)
    level = delta / max(1, len(outcomes.sequences))
    return wsr_pvalue(unit, unit_alpha, level)


def unseen_pvalues(outcomes: Outcomes, rows: np.ndarray, loss: str, max_loss_points: float, test_size: int,
                   candidates: Sequence[int] | None = None) -> np.ndarray:
    """P-values of H: the mean loss on ``test_size`` unseen rows exceeds the budget.

    The calibration mean and the unseen mean are independent means of the same per-example loss, so their
    difference is about normal with variance ``sigma^2 (1/n + 1/m)``: ``p = Phi((mean - budget) / sd)``.
    ``sigma^2`` is the sample variance with one pseudo-example at each end of the loss range, so a knob with
    no disagreement in the calibration rows still counts as uncertain.
    """
    if test_size < 1:
        raise ValueError(f"test_size must be >= 1, got {test_size}")
    alpha = _alpha(max_loss_points)
    rows = np.asarray(rows)
    index = np.arange(outcomes.num_candidates) if candidates is None else np.asarray(candidates, dtype=np.int64)
    x = _row_losses(outcomes, rows, index, loss).astype(np.float64)
    n = x.shape[1]
    if n == 0:
        return np.ones(len(index))
    mean = x.mean(axis=1)
    low, high = (0.0, 1.0) if loss == "disagreement" else (-1.0, 1.0)
    pseudo = (low - mean) ** 2 + (high - mean) ** 2
    var = (((x - mean[:, None]) ** 2).sum(axis=1) + pseudo) / (n + 2)
    sd = np.sqrt(var * (1.0 / n + 1.0 / test_size))
    return norm.cdf((mean - alpha) / sd)


def pvalues(outcomes: Outcomes, rows: np.ndarray, loss: str, max_loss_points: float, delta: float,
            order_seed: int = 0, candidates: Sequence[int] | None = None, *, method: str = "expected",
            test_size: int | None = None) -> np.ndarray:
    """P-values of ``candidates`` (default: all) for ``method`` (``METHODS``); with two tests, the larger
    p-value (a knob is certified only when both reject)."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if method != "expected" and test_size is None:
        raise ValueError(f"method {method!r} needs test_size (the number of unseen rows the budget must hold on)")
    p = None
    if method in ("expected", "expected+unseen"):
        p = expected_pvalues(outcomes, rows, loss, max_loss_points, delta, order_seed, candidates)
    if method in ("unseen", "expected+unseen"):
        q = unseen_pvalues(outcomes, rows, loss, max_loss_points, test_size, candidates)
        p = q if p is None else np.maximum(p, q)
    return p


@dataclass
class CalibrationChoice:
    """What calibration chose: a candidate index (None: nothing certified, so run at full depth)."""

    index: int | None
    certified: int
    layer_speedup: float
    loss_points: float


def calibrate(outcomes: Outcomes, rows: np.ndarray, *, max_loss_points: float, delta: float = DEFAULT_DELTA,
              loss: str = "accuracy_drop", order_seed: int = 0, method: str = "expected",
              test_size: int | None = None) -> CalibrationChoice:
    """The fastest candidate (layer speed-up on ``rows``) among those Learn-then-Test certifies.

    ``method`` and ``test_size``: see the module docstring (``expected`` needs no test size)."""
    rows = np.asarray(rows)
    certified = learn_then_test(
        lambda idx: pvalues(outcomes, rows, loss, max_loss_points, delta, order_seed, candidates=idx,
                            method=method, test_size=test_size),
        outcomes.sequences, delta)
    if not certified:
        return CalibrationChoice(None, 0, 1.0, 0.0)
    mean_layers = outcomes.exit_layers[:, rows].mean(axis=1)
    acc = outcomes.correct[:, rows].mean(axis=1)
    best = min(certified, key=lambda i: (mean_layers[i], -acc[i], i))
    drop = 100.0 * (outcomes.ref_correct[rows].mean() - acc[best])
    return CalibrationChoice(int(best), len(certified), outcomes.num_layers / float(mean_layers[best]), float(drop))


def realised(outcomes: Outcomes, index: int | None, rows: np.ndarray) -> tuple[float, float]:
    """(layer speed-up, accuracy loss in points) of a choice measured on ``rows`` (held out from its
    calibration); None = full depth."""
    if index is None:
        return 1.0, 0.0
    speed = outcomes.num_layers / float(outcomes.exit_layers[index, rows].mean())
    loss = 100.0 * float(outcomes.ref_correct[rows].mean() - outcomes.correct[index, rows].mean())
    return speed, loss


def _naive_choice(outcomes: Outcomes, rows: np.ndarray, budget: float) -> int | None:
    """The fastest candidate whose accuracy on ``rows`` is within the budget (the uncalibrated dev choice)."""
    speed = outcomes.num_layers / outcomes.exit_layers[:, rows].mean(axis=1)
    acc = outcomes.correct[:, rows].mean(axis=1)
    return select_on_dev([(i, speed[i], acc[i]) for i in range(outcomes.num_candidates)],
                         float(outcomes.ref_correct[rows].mean()), budget)


def resampling_study(outcomes: Outcomes, *, calibration_size: int, test_size: int, budgets: Sequence[float],
                     delta: float = DEFAULT_DELTA, loss: str = "accuracy_drop", resplits: int = 200,
                     seed: int = 0, method: str = DEFAULT_METHOD,
                     compare_methods: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Split the pooled rows at random ``resplits`` times, calibrate on one part, measure on the other.

    Per budget (key ``str(float(budget))``): the violation rate (share of splits whose realised accuracy
    loss on the held-out part exceeds the budget), median / 10th / 90th percentile of the realised layer
    speed-up, how often nothing was certified, and the same for the naive choice (fastest knob within the
    budget on the calibration part) for contrast. Methods with unseen-row tests use ``test_size`` rows, the
    size of the part the loss is measured on. ``compare_methods`` adds ``by_method`` (violation rate and
    median speed-up of each other method on the same splits).
    """
    n = outcomes.num_rows
    if calibration_size < 1 or test_size < 1 or calibration_size + test_size > n:
        raise ValueError(f"cannot split {n} rows into {calibration_size} + {test_size}")
    rng = np.random.default_rng(seed)
    splits = [rng.permutation(n) for _ in range(resplits)]

    def held_out(choose) -> tuple[np.ndarray, np.ndarray, int]:
        """Layer speed-ups and losses on the held-out part of every split, and how often nothing was chosen;
        ``choose(calibration_rows, split_index)`` returns a candidate index or None (full depth)."""
        pairs, empty = [], 0
        for r, perm in enumerate(splits):
            index = choose(perm[:calibration_size], r)
            empty += index is None
            pairs.append(realised(outcomes, index, perm[calibration_size:calibration_size + test_size]))
        speeds, losses = (np.array(x) for x in zip(*pairs, strict=True))
        return speeds, losses, empty

    def calibrated(budget: float, how: str):
        return lambda cal, r: calibrate(outcomes, cal, max_loss_points=budget, delta=delta, loss=loss,
                                        order_seed=seed + r, method=how, test_size=test_size).index

    out: dict[str, dict[str, Any]] = {}
    for budget in budgets:
        speeds, losses, empty = held_out(calibrated(budget, method))
        naive_speeds, naive_losses, _ = held_out(lambda cal, r, b=budget: _naive_choice(outcomes, cal, b))
        entry = {
            "violation_rate": float(np.mean(losses > budget + 1e-9)),
            "median_speedup": float(np.median(speeds)),
            "speedup_p10": float(np.percentile(speeds, 10)),
            "speedup_p90": float(np.percentile(speeds, 90)),
            "median_loss_points": float(np.median(losses)),
            "none_certified_rate": empty / len(splits),
            "naive_violation_rate": float(np.mean(naive_losses > budget + 1e-9)),
            "naive_median_speedup": float(np.median(naive_speeds)),
        }
        by_method = {}
        for other in compare_methods:
            if other != method:
                other_speeds, other_losses, _ = held_out(calibrated(budget, other))
                by_method[other] = {"violation_rate": float(np.mean(other_losses > budget + 1e-9)),
                                    "median_speedup": float(np.median(other_speeds))}
        if by_method:
            entry["by_method"] = by_method
        out[str(float(budget))] = entry
    return out


def outcomes_from_points(rule_name: str, points: Sequence[PointResult], dev: EvalTables, test: EvalTables) -> Outcomes:
    """Outcomes of a rule's swept points on dev rows (first) and test rows (after them), against the full
    depth of the model whose tables ``dev``/``test`` are (the benchmark's reference: the stage-1 model)."""
    if any(p.dev_exit_layers is None for p in points):
        raise ValueError("calibration needs the dev exit layers of every point (sweep keeps them)")
    exit_layers = np.stack([np.concatenate([p.dev_exit_layers.numpy(), p.test_exit_layers.numpy()]) for p in points])
    predictions = np.stack([np.concatenate([p.dev_predictions.numpy(), p.test_predictions.numpy()]) for p in points])
    labels = np.concatenate([dev.labels.numpy(), test.labels.numpy()])
    full = np.concatenate([dev.probs[:, -1].argmax(-1).numpy(), test.probs[:, -1].argmax(-1).numpy()])
    knobs = [knob_from_json(rule_name, p.knob) for p in points]
    sequences = candidate_sequences(rule_name, knobs, [p.model_key for p in points])
    return Outcomes.from_predictions(exit_layers, predictions, labels, full, sequences, dev.num_layers)
