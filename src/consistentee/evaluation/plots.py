"""Figures for the reports (matplotlib's Agg canvas, no pyplot global state).

Every PNG is written atomically: rendered into a temporary file in the target directory, then moved
into place with ``os.replace``; on failure the temporary file is removed.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import as_numpy

__all__ = ["layer_counts", "plot_budget_curves", "plot_exit_histograms", "plot_histogram", "plot_tradeoff", "save_figure"]


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def layer_counts(values: Any, num_layers: int) -> np.ndarray:
    """Counts of each layer 1..L in ``values`` (1-based layers); values outside raise ValueError."""
    v = as_numpy(values).astype(np.int64)
    if v.size and (v.min() < 1 or v.max() > num_layers):
        raise ValueError(f"layers must lie in [1, {num_layers}], got [{v.min()}, {v.max()}]")
    return np.bincount(v - 1, minlength=num_layers)[:num_layers] if v.size else np.zeros(num_layers, int)


def plot_tradeoff(
    curves: Mapping[str, Sequence[Sequence[float]]],
    xlabel: str,
    path: str | os.PathLike,
    full_accuracy: float | None = None,
    oracle: Sequence[float] | None = None,
    *,
    title: str | None = None,
    ylabel: str = "accuracy",
    steps: bool = False,
    x_max: float | None = None,
) -> Path:
    """One line per rule through its ``(x, accuracy)`` points (sorted by x); a dashed line at the
    full-depth accuracy and a star at the oracle's ``(x, accuracy)`` when given.

    ``steps``: draw each frontier as the attainable-accuracy step function (a speed-up between two points is
    only delivered at the accuracy of the faster one), never as straight lines no knob reaches. ``x_max``
    cuts the x axis (from 1) so the region users operate in stays readable."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for name, points in curves.items():
        pts = sorted((float(x), float(a)) for x, a in points)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", markersize=2.5, linewidth=1.2, label=name,
                drawstyle="steps-pre" if steps else "default")
    if full_accuracy is not None:
        ax.axhline(float(full_accuracy), color="black", linestyle="--", linewidth=0.9, label="full depth")
    if oracle is not None:
        ax.plot(
            [float(oracle[0])],
            [float(oracle[1])],
            marker="*",
            markersize=12,
            color="gold",
            markeredgecolor="black",
            linestyle="none",
            label="oracle",
        )
    if x_max is not None:
        ax.set_xlim(1.0, x_max)
        ys_in = [float(a) for pts in curves.values() for x, a in pts if float(x) <= x_max]
        if full_accuracy is not None:
            ys_in.append(float(full_accuracy))
        if ys_in:
            lo, hi = min(ys_in), max(ys_in)
            ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
    return _finish(fig, ax, xlabel, ylabel, title, path)


def _finish(fig: Figure, ax, xlabel: str, ylabel: str, title: str | None, path: str | os.PathLike) -> Path:
    """Labels, grid and legend of a one-panel line plot, then the atomic PNG write."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_budget_curves(
    series: Mapping[str, Sequence[Sequence[float]]], ylabel: str, path: str | os.PathLike, *,
    hline: float | None = None, hline_label: str | None = None, title: str | None = None,
) -> Path:
    """One line per rule through ``(budget, value)`` pairs (e.g. violation rate or median speed-up against the
    accuracy budget), with an optional horizontal reference line (e.g. delta)."""
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for name, pts in series.items():
        pts = sorted((float(b), float(v)) for b, v in pts if v is not None)
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=name)
    if hline is not None:
        ax.axhline(hline, color="black", linestyle="--", linewidth=0.9, label=hline_label)
    return _finish(fig, ax, "accuracy budget (points below full depth)", ylabel, title, path)


def _bar_panel(ax, counts: np.ndarray, title: str) -> None:
    layers = np.arange(1, counts.size + 1)
    ax.bar(layers, counts, color="tab:blue")
    ax.set_xticks(layers)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel("count")


def plot_exit_histograms(
    exit_layers_by_rule: Mapping[str, Any], num_layers: int, path: str | os.PathLike
) -> Path:
    """One small bar chart of exit-layer counts (layers 1..L) per rule."""
    names = list(exit_layers_by_rule)
    if not names:
        raise ValueError("plot_exit_histograms needs at least one rule")
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(3.2 * ncols, 2.6 * nrows))
    for i, name in enumerate(names):
        counts = layer_counts(exit_layers_by_rule[name], num_layers)
        mean = (counts * np.arange(1, num_layers + 1)).sum() / max(counts.sum(), 1)
        _bar_panel(fig.add_subplot(nrows, ncols, i + 1), counts, f"{name} (mean {mean:.2f})")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_histogram(values: Any, num_layers: int, title: str, path: str | os.PathLike) -> Path:
    """Bar chart of counts per layer 1..L (e.g. the memorized-layer histogram)."""
    fig = Figure(figsize=(5.0, 3.4))
    _bar_panel(fig.add_subplot(1, 1, 1), layer_counts(values, num_layers), title)
    fig.tight_layout()
    return save_figure(fig, path)
