"""Memorized layers: how hard each training example is for the stage-1 model (docs/method.md section 4).

m(x) is the shallowest layer l such that exits l, l+1, ..., L all predict the gold label; m(x) = L when
the last exit is wrong. It is stored keyed by example id (never by row order).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from consistentee.utils.io import read_json, write_json

FILE_NAME = "memorized_layers.json"


def memorized_layers(predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``predictions`` [N, L] argmax of every exit, ``labels`` [N] -> m [N] in 1..L."""
    correct = predictions == labels.unsqueeze(1)
    num_layers = predictions.shape[1]
    # suffix_all[:, l] is True when exits l..L are all correct.
    suffix_all = correct.flip(1).cumprod(dim=1).flip(1).bool()
    count = suffix_all.sum(dim=1)  # how many trailing exits are all correct
    return torch.where(count > 0, num_layers - count + 1, torch.full_like(count, num_layers))


def save_memorized(
    run_dir: str | Path,
    ids: list[str],
    layers: torch.Tensor,
    num_layers: int,
    final_exit_loss: torch.Tensor | None = None,
    file_name: str = FILE_NAME,
) -> Path:
    """Write m(x) (and the final exit's loss, the other hardness signal) keyed by example id."""
    path = Path(run_dir) / file_name
    data = {"num_layers": num_layers, "layers": {i: int(m) for i, m in zip(ids, layers.tolist(), strict=True)}}
    if final_exit_loss is not None:
        data["final_exit_loss"] = {i: float(v) for i, v in zip(ids, final_exit_loss.tolist(), strict=True)}
    write_json(path, data)
    return path


def final_exit_loss(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the last exit per example, from a [N, L, C] probability table."""
    return -probs[:, -1].gather(1, labels.unsqueeze(1)).squeeze(1).clamp_min(1e-12).log()


def load_final_exit_loss(run_dir: str | Path, file_name: str = FILE_NAME) -> dict[str, float]:
    data = read_json(Path(run_dir) / file_name)
    if "final_exit_loss" not in data:
        raise KeyError(f"{Path(run_dir) / file_name} has no final-exit losses; recompute memorized layers")
    return {k: float(v) for k, v in data["final_exit_loss"].items()}


def load_memorized(run_dir: str | Path, file_name: str = FILE_NAME) -> tuple[dict[str, int], int]:
    path = Path(run_dir) / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: compute memorized layers first (`consistentee memorize`)")
    data = read_json(path)
    return {k: int(v) for k, v in data["layers"].items()}, int(data["num_layers"])


def lookup(memorized: dict, ids: list[str], dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Values of ``ids`` in their order; an id without one is an error, not a silent default."""
    missing = [i for i in ids if i not in memorized]
    if missing:
        raise KeyError(f"{len(missing)} example ids have no memorized layer (e.g. {missing[:3]}); recompute them")
    return torch.tensor([memorized[i] for i in ids], dtype=dtype)


def histogram_text(layers: torch.Tensor, num_layers: int, width: int = 40) -> str:
    counts = Counter(int(m) for m in layers.tolist())
    total = max(len(layers), 1)
    peak = max(counts.values(), default=1)
    lines = [f"memorized layer histogram ({total} training examples)"]
    for layer in range(1, num_layers + 1):
        c = counts.get(layer, 0)
        lines.append(f"  layer {layer:>2}: {c:>6} ({100 * c / total:5.1f}%) {'#' * round(width * c / peak)}")
    return "\n".join(lines)
