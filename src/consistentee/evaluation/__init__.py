"""Evaluation math: classification metrics, speed-ups, FLOPs, trade-off curves and plots."""

import importlib

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

#: the harness and the wall-clock timer pull in torch, the exit rules and the training code (which imports this
#: package): imported on first use (``from consistentee.evaluation import ...``).
_LAZY = {
    "BenchmarkConfig": "harness",
    "BenchmarkSettings": "harness",
    "demo_settings": "harness",
    "run_benchmark": "harness",
    "measure_wall_clock": "wallclock",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BenchmarkConfig",
    "BenchmarkSettings",
    "EncoderShape",
    "as_numpy",
    "auc_saved_fraction",
    "best_speedup_within",
    "check_report_schema",
    "classification_metrics",
    "demo_settings",
    "embedding_flops",
    "exit_flops",
    "flops_for_exits",
    "flops_speedup",
    "full_depth_flops",
    "layer_counts",
    "layer_flops",
    "measure_wall_clock",
    "pareto_frontier",
    "plot_exit_histograms",
    "plot_histogram",
    "plot_tradeoff",
    "render_markdown",
    "run_benchmark",
    "save_figure",
    "saved_fraction_from_speedup",
    "select_on_dev",
    "speedup_summary",
    "summary_table",
    "write_report",
]
