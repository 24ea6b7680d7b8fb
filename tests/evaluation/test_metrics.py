import math

import numpy as np
import pytest
import torch

from consistentee.evaluation import classification_metrics, speedup_summary


def test_classification_metrics_by_hand():
    # TP=2 (class 1), TN=1, FP=1, FN=0
    m = classification_metrics([0, 0, 1, 1], torch.tensor([0, 1, 1, 1]))
    assert m["accuracy"] == pytest.approx(0.75)
    # F1 class 0: P=1, R=1/2 -> 2/3; class 1: P=2/3, R=1 -> 4/5
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 2 / sqrt(3*2*2*1)
    assert m["mcc"] == pytest.approx(2 / math.sqrt(12))


def test_classification_metrics_perfect_and_errors():
    m = classification_metrics(np.array([2, 0, 1]), np.array([2, 0, 1]))
    assert m == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError):
        classification_metrics([], [])


def test_speedup_summary():
    s = speedup_summary(torch.tensor([1, 2, 3, 6]), 6)
    assert s["mean_exit_layer"] == pytest.approx(3.0)
    assert s["layer_speedup"] == pytest.approx(2.0)
    assert s["saved_fraction"] == pytest.approx(0.5)
    full = speedup_summary([12, 12], 12)
    assert full["layer_speedup"] == 1.0 and full["saved_fraction"] == 0.0


@pytest.mark.parametrize("layers", [[0, 1], [1, 7], []])
def test_speedup_summary_rejects_bad_layers(layers):
    with pytest.raises(ValueError):
        speedup_summary(layers, 6)


def test_metrics_from_the_confusion_matrix_equal_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    for classes, n in ((2, 50), (6, 300), (3, 7)):
        t = rng.integers(0, classes, n)
        p = np.where(rng.random(n) < 0.7, t, rng.integers(0, classes, n))
        p[:2] = classes  # a predicted class absent from the labels
        got = classification_metrics(t, p)
        assert got["accuracy"] == pytest.approx(accuracy_score(t, p))
        assert got["macro_f1"] == pytest.approx(f1_score(t, p, average="macro", zero_division=0))
        assert got["mcc"] == pytest.approx(matthews_corrcoef(t, p))
    constant = classification_metrics(np.array([0, 1, 1]), np.array([1, 1, 1]))
    assert constant["mcc"] == 0.0
