"""``consistentee memorize``: the memorized layer of every training example of a run, as JSON and a histogram.

Reads the stage-1 model of a run directory (:mod:`consistentee.training.run`), writes
``memorized_layers.json`` (:mod:`consistentee.training.memorized`) and ``memorized_layers.png``
(:func:`consistentee.evaluation.plots.plot_histogram`) into it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from consistentee.evaluation.plots import plot_histogram
from consistentee.training import memorized
from consistentee.training.distributed import barrier, is_main_process
from consistentee.training.run import load_run_model, split_tables

__all__ = ["run_memorize"]


def run_memorize(run_dir: str | Path, *, device: str = "auto", batch_size: int = 128, progress: bool = True,
                 log=print) -> torch.Tensor:
    """Memorized layers of the training set under the stage-1 model; writes JSON, PNG and prints a histogram.

    Single-process work: under ``accelerate launch`` rank 0 computes and writes, the other ranks wait and then
    read the saved layers."""
    run_dir = Path(run_dir)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not is_main_process():
        barrier()
        table, _ = memorized.load_memorized(run_dir)
        _, data = load_run_model(run_dir, "cpu")
        return memorized.lookup(table, data.splits.train.ids)
    try:
        return _memorize(run_dir, device, batch_size, progress, log)
    finally:
        barrier()


def _memorize(run_dir: Path, device, batch_size, progress, log) -> torch.Tensor:
    model, data = load_run_model(run_dir, device)
    tables = split_tables(model, data, "train", batch_size=batch_size, progress=progress)
    layers = memorized.memorized_layers(tables.predictions(), tables.labels)
    losses = memorized.final_exit_loss(tables.probs, tables.labels)
    path = memorized.save_memorized(run_dir, data.splits.train.ids, layers, model.num_layers, losses)
    plot_histogram(layers.numpy(), model.num_layers, "memorized layer of training examples",
                   run_dir / "memorized_layers.png")
    log(memorized.histogram_text(layers, model.num_layers))
    log(f"memorized layers written to {path} and {run_dir / 'memorized_layers.png'}")
    return layers
