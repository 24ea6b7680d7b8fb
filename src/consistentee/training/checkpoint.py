"""Training checkpoints that resume exactly and are never half-written or silently corrupt.

A checkpoint is a directory swapped in atomically, holding the model weights (safetensors), the trainer
state (optimizer, scheduler, RNG states, data position; a tensors-only ``torch.save`` file read back with
``weights_only=True``, so no arbitrary pickle is ever executed) and a manifest with the SHA-256 of each file.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from consistentee.model.modeling import required_missing
from consistentee.utils.io import atomic_directory, file_sha256

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing a file, truncated, or does not match its manifest."""


def capture_rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": json.dumps(random.getstate()),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    pos, has_gauss, gauss = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, model: nn.Module, trainer_state: dict[str, Any]) -> None:
    """Write model + trainer state + manifest into ``directory`` in one atomic swap."""
    with atomic_directory(directory) as tmp:
        save_model(model, str(tmp / MODEL_FILE))
        torch.save({**trainer_state, "rng": capture_rng_state()}, tmp / STATE_FILE)
        manifest = {name: {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                    for name in (MODEL_FILE, STATE_FILE)}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def find_checkpoint(directory: str | Path) -> Path | None:
    """The checkpoint to resume from, or None; leftovers of a killed process are cleaned up.

    A process killed while swapping a new checkpoint in can leave the previous one as ``.<name>.old`` (the
    new one then never made it) and half-written ``.<name>.*.tmp`` directories; both are handled here.
    """
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return None
    for tmp in parent.glob(f".{directory.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    old = parent / f".{directory.name}.old"
    if old.is_dir():
        if directory.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(directory)
    return directory if directory.is_dir() else None


def remove_checkpoint(directory: str | Path) -> None:
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(directory.parent / f".{directory.name}.old", ignore_errors=True)


def verify_checkpoint(directory: str | Path) -> None:
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory} has no {MANIFEST_FILE}; delete the directory to start over"
                              ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt") from None
    if not isinstance(manifest, dict) or set(manifest) != {MODEL_FILE, STATE_FILE} or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
            for e in manifest.values()):
        raise CheckpointError(f"checkpoint manifest {manifest_path} is corrupt (unexpected content)")
    for name, entry in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"checkpoint file {path} is truncated ({path.stat().st_size} of {entry['bytes']} bytes)")
        if file_sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is corrupt (checksum mismatch)")


def load_checkpoint(directory: str | Path, model: nn.Module, restore_rng: bool = True) -> dict[str, Any]:
    """Verify, load the weights into ``model`` and return the trainer state (RNG restored)."""
    directory = Path(directory)
    verify_checkpoint(directory)
    try:
        missing, unexpected = load_model(model, str(directory / MODEL_FILE), strict=False)
    except Exception as exc:  # shape mismatches and unreadable files, however safetensors spells them
        raise CheckpointError(f"checkpoint file {directory / MODEL_FILE} cannot be loaded into this model "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    missing = required_missing(missing)  # checkpoints written before the policies' input scaling existed
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {directory / MODEL_FILE} does not fit this model ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected weights)")
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a file that passed the checksum but holds more than tensors and plain values
        raise CheckpointError(f"checkpoint file {directory / STATE_FILE} cannot be read safely "
                              f"({type(exc).__name__})") from None
    if restore_rng:
        restore_rng_state(state.pop("rng"))
    return state
