"""Classification quality and layer speed-up of a set of exit decisions."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

__all__ = ["as_numpy", "classification_metrics", "speedup_summary"]


def as_numpy(values: Any) -> np.ndarray:
    """A 1-D numpy array from a list, numpy array or torch tensor (any device)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values).reshape(-1)


def classification_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation (all as fractions / coefficients, not percent).

    Computed from one confusion matrix (the sweeps call this for thousands of points); the definitions are
    scikit-learn's (macro-F1 over the labels present in either array, ``zero_division=0``; multiclass MCC).
    """
    t, p = as_numpy(y_true), as_numpy(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.shape[0]} vs {p.shape[0]}")
    if t.size == 0:
        raise ValueError("classification_metrics needs at least one example")
    if not (np.issubdtype(t.dtype, np.integer) and np.issubdtype(p.dtype, np.integer)) or min(t.min(), p.min()) < 0:
        return {"accuracy": float(accuracy_score(t, p)),
                "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)),
                "mcc": float(matthews_corrcoef(t, p))}
    k = int(max(t.max(), p.max())) + 1
    cm = np.bincount(t.astype(np.int64) * k + p.astype(np.int64), minlength=k * k).reshape(k, k).astype(np.float64)
    tp = np.diag(cm)
    denom = cm.sum(axis=0) + cm.sum(axis=1)
    present = denom > 0  # labels in either array (scikit-learn's macro average)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=present)
    n, correct = cm.sum(), tp.sum()
    true_counts, pred_counts = cm.sum(axis=1), cm.sum(axis=0)
    cov_ytyp = correct * n - true_counts @ pred_counts
    cov_ypyp = n * n - pred_counts @ pred_counts
    cov_ytyt = n * n - true_counts @ true_counts
    mcc = 0.0 if cov_ypyp * cov_ytyt == 0 else float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))
    return {"accuracy": float(correct / n), "macro_f1": float(f1[present].mean()), "mcc": mcc}


def speedup_summary(exit_layers: Any, num_layers: int) -> dict[str, float]:
    """Layer speed-up of 1-based exit layers: ``L / mean``, saved fraction ``1 - mean / L``."""
    e = as_numpy(exit_layers).astype(np.float64)
    if e.size == 0:
        raise ValueError("speedup_summary needs at least one exit layer")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if e.min() < 1 or e.max() > num_layers:
        raise ValueError(f"exit layers must lie in [1, {num_layers}], got [{e.min():g}, {e.max():g}]")
    mean = float(e.mean())
    return {
        "mean_exit_layer": mean,
        "layer_speedup": num_layers / mean,
        "saved_fraction": 1.0 - mean / num_layers,
    }
