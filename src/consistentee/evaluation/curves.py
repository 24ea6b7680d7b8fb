"""Accuracy vs speed-up curves: Pareto frontiers, an area-under-curve summary, knob selection.

Accuracies are fractions in [0, 1]; accuracy budgets (``max_loss_points``) are in percentage points.

AUC (:func:`auc_saved_fraction`) -- one rule for every method:

* x = saved fraction ``1 - mean_exit_layer / L`` (``= 1 - 1/layer_speedup``), y = accuracy;
* the method's curve is its **attainable-accuracy step function** over its operating points::

      f(x) = max { accuracy_j : saved_j >= x }

  i.e. the best accuracy of any operating point that saves at least ``x``. Only Pareto-optimal points
  matter; left of the first frontier point the curve is flat at that point's accuracy (it is the
  best accuracy overall); right of the last point (savings no operating point reaches) it is
  ``fill_right`` (default 0: no operating point, no credit). No interpolation between points: a
  saving between two operating points is delivered only by the one to its right.
* the area under ``f`` over the common range ``[x_lo, x_hi]`` is divided by ``x_hi - x_lo``, so the
  result is in accuracy units (the mean attainable accuracy over the range). Compare methods only on
  the same range; choose ``x_hi`` no larger than the smallest maximum saving among them to avoid
  penalising a method for a sweep that stopped early.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "auc_saved_fraction",
    "best_speedup_within",
    "pareto_frontier",
    "saved_fraction_from_speedup",
    "select_on_dev",
]

_EPS = 1e-12


def _pairs(points: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
    out = []
    for p in points:
        if len(p) != 2:
            raise ValueError(f"points must be (x, accuracy) pairs, got {p!r}")
        x, a = float(p[0]), float(p[1])
        if math.isnan(x) or math.isnan(a):
            raise ValueError(f"NaN in point {p!r}")
        out.append((x, a))
    return out


def saved_fraction_from_speedup(speedup: float) -> float:
    """``1 - 1/speedup`` (layer speed-up -> saved fraction of layers)."""
    if speedup <= 0:
        raise ValueError(f"speed-up must be > 0, got {speedup}")
    return 1.0 - 1.0 / speedup


def pareto_frontier(points: Iterable[Sequence[float]]) -> list[tuple[float, float]]:
    """Non-dominated ``(x, accuracy)`` points (both larger-is-better), sorted by increasing x.

    A point is dominated when another has x >= and accuracy >= with at least one strictly greater.
    Duplicates collapse to one point. Along the result x increases and accuracy strictly decreases.
    Works for x = speed-up or x = saved fraction alike.
    """
    pts = sorted(set(_pairs(points)), key=lambda p: (-p[0], -p[1]))
    frontier: list[tuple[float, float]] = []
    best_acc = -math.inf
    for x, a in pts:
        if a > best_acc:
            frontier.append((x, a))
            best_acc = a
    frontier.reverse()
    return frontier


def auc_saved_fraction(
    points_saved_acc: Iterable[Sequence[float]],
    x_range: tuple[float, float],
    *,
    fill_right: float = 0.0,
) -> float:
    """Mean attainable accuracy over ``x_range`` of saved fraction (see the module docstring)."""
    lo, hi = float(x_range[0]), float(x_range[1])
    if not hi > lo:
        raise ValueError(f"x_range must satisfy lo < hi, got {x_range!r}")
    frontier = pareto_frontier(points_saved_acc)
    if not frontier:
        raise ValueError("auc_saved_fraction needs at least one point")
    breaks = sorted({lo, hi, *(x for x, _ in frontier if lo < x < hi)})
    area = 0.0
    for a, b in zip(breaks[:-1], breaks[1:], strict=True):
        # on (a, b) no point has saved strictly inside, so {saved >= x} == {saved >= b}
        reachable = [acc for x, acc in frontier if x >= b]
        area += (b - a) * (max(reachable) if reachable else fill_right)
    return area / (hi - lo)


def best_speedup_within(
    points: Iterable[Sequence[float]], full_accuracy: float, max_loss_points: float
) -> float | None:
    """Largest speed-up among ``(speedup, accuracy)`` points with accuracy >= full - max_loss/100.

    ``None`` when no point is within the budget.
    """
    floor = float(full_accuracy) - float(max_loss_points) / 100.0 - _EPS
    ok = [s for s, a in _pairs(points) if a >= floor]
    return max(ok) if ok else None


def select_on_dev(
    dev_points: Mapping[Any, Sequence[float]] | Iterable[Sequence[Any]],
    full_dev_accuracy: float,
    max_loss_points: float,
) -> Any:
    """The knob with the largest dev speed-up whose dev accuracy is within the budget.

    ``dev_points``: a mapping ``knob -> (speedup, accuracy)`` or a sequence of
    ``(knob, speedup, accuracy)``. Ties in speed-up go to the more accurate knob, then to the first
    one given. Returns ``None`` when no knob is within ``full_dev_accuracy - max_loss_points/100``.
    """
    if isinstance(dev_points, Mapping):
        items = [(k, *v) for k, v in dev_points.items()]
    else:
        items = [tuple(p) for p in dev_points]
    floor = float(full_dev_accuracy) - float(max_loss_points) / 100.0 - _EPS
    best_key: tuple[float, float] | None = None
    best_knob = None
    for item in items:
        if len(item) != 3:
            raise ValueError(f"dev points must be (knob, speedup, accuracy), got {item!r}")
        knob, speedup, acc = item[0], float(item[1]), float(item[2])
        if acc < floor:
            continue
        key = (speedup, acc)
        if best_key is None or key > best_key:
            best_key, best_knob = key, knob
    return best_knob
