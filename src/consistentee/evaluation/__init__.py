"""Evaluation math: classification metrics, speed-ups, FLOPs, trade-off curves and plots.

Math only: it reads tables and exit decisions and never trains, loads or times a model (the benchmark recipe
and the wall-clock timer live in :mod:`consistentee.pipeline`)."""

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
from .report import check_report_schema, render_markdown, summary_table, write_report

__all__ = [
    "EncoderShape",
    "as_numpy",
    "auc_saved_fraction",
    "best_speedup_within",
    "check_report_schema",
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
    "render_markdown",
    "save_figure",
    "saved_fraction_from_speedup",
    "select_on_dev",
    "speedup_summary",
    "summary_table",
    "write_report",
]
