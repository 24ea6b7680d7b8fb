"""Evaluation math: classification metrics, speed-ups, FLOPs, trade-off curves and plots."""

from .curves import (
    auc_saved_fraction,
    best_speedup_within,
    pareto_frontier,
    saved_fraction_from_speedup,
    select_on_dev,
)
from .flops import (
    EncoderShape,
    embedding_flops,
    exit_flops,
    flops_for_exits,
    flops_speedup,
    full_depth_flops,
    layer_flops,
)
from .metrics import as_numpy, classification_metrics, speedup_summary
from .plots import layer_counts, plot_exit_histograms, plot_histogram, plot_tradeoff, save_figure

__all__ = [
    "EncoderShape",
    "as_numpy",
    "auc_saved_fraction",
    "best_speedup_within",
    "classification_metrics",
    "embedding_flops",
    "exit_flops",
    "flops_for_exits",
    "flops_speedup",
    "full_depth_flops",
    "layer_counts",
    "layer_flops",
    "pareto_frontier",
    "plot_exit_histograms",
    "plot_histogram",
    "plot_tradeoff",
    "save_figure",
    "saved_fraction_from_speedup",
    "select_on_dev",
    "speedup_summary",
]
