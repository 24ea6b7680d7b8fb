import os

import numpy as np
import pytest
from matplotlib.figure import Figure

from consistentee.evaluation import layer_counts, plot_exit_histograms, plot_histogram, plot_tradeoff

PNG = b"\x89PNG\r\n\x1a\n"


def assert_png_alone(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temp files left behind


def test_plot_tradeoff(tmp_path):
    path = tmp_path / "new" / "dir" / "tradeoff.png"
    curves = {"entropy": [(1.5, 0.85), (1.0, 0.86), (2.0, 0.80)], "patience": [(1.2, 0.855)], "empty": []}
    out = plot_tradeoff(curves, "layer speed-up", path, full_accuracy=0.86, oracle=(3.2, 0.93))
    assert out == path
    assert_png_alone(path)


def test_plot_exit_histograms_and_histogram(tmp_path):
    path = tmp_path / "exits.png"
    plot_exit_histograms(
        {"entropy": np.array([1, 1, 2, 6]), "static": [3, 3, 3], "oracle": [1, 2], "x": [6]}, 6, path
    )
    assert_png_alone(path)
    path2 = tmp_path / "sub" / "memorized.png"
    plot_histogram([1, 1, 4, 6, 6, 6], 6, "memorized layer", path2)
    assert_png_alone(path2)


def test_layer_counts():
    assert layer_counts([1, 1, 3], 4).tolist() == [2, 0, 1, 0]
    assert layer_counts([], 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        layer_counts([0, 1], 3)


def test_overwrite_and_failed_write_leave_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "h.png"
    plot_histogram([1, 2], 2, "a", path)
    before = path.read_bytes()
    plot_histogram([2, 2, 2], 2, "b", path)  # overwrite in place
    assert_png_alone(path)
    assert path.read_bytes() != before
    kept = path.read_bytes()

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", boom)
    with pytest.raises(RuntimeError):
        plot_histogram([1], 2, "c", path)
    assert path.read_bytes() == kept  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["h.png"]
