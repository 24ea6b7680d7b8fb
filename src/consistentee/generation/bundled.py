"""Trained exits shipped inside the package, so that the built-in decoder generates with early exit out of the box.

A bundle is a trained exits directory (:meth:`.decoder.EarlyExitLM.save_exits`: ``exits_config.json``,
``exits.safetensors`` and, with a LoRA, peft's ``adapter/``) with every floating tensor stored in bfloat16 (a few
MB), under ``consistentee/generation/bundled_exits/<model name>/``, plus ``bundle.json``: where it came from, how
it was trained, and the sha256 of every other file in it (``files``). ``benchmarks/lm/bundle_exits.py`` writes
it; :func:`verify_bundle` checks it before use. Loading casts the bfloat16 weights into the model's own dtype
(``load_state_dict`` copies into the existing parameters).
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path, PurePosixPath

from consistentee.resources import ResourceChecksumError
from consistentee.utils.io import file_sha256

#: package folder (inside ``consistentee.generation``) holding one bundle per built-in model name
BUNDLE_FOLDER = "bundled_exits"
#: written last into a bundle: source, training, dtype and the manifest ``files: {relpath: sha256}``
BUNDLE_META = "bundle.json"
#: the built-in decoder models a bundle may exist for (see :data:`.loading.BUILTIN_LMS`)
BUNDLE_MODELS = ("smollm2-135m",)


class CorruptBundleError(ResourceChecksumError):
    """A bundled file is missing or does not match its recorded sha256: one line naming the file."""


def bundle_root() -> Path:
    """The package folder that holds the bundles (it may not exist)."""
    root = importlib.resources.files(__package__) / BUNDLE_FOLDER
    return root if isinstance(root, Path) else Path(__file__).resolve().parent / BUNDLE_FOLDER


def bundled_exits_dir(model_name: str) -> Path | None:
    """The bundled exits of the built-in model ``model_name``; None when the package ships none for it."""
    if model_name not in BUNDLE_MODELS:
        return None
    path = bundle_root() / model_name
    return path if (path / BUNDLE_META).is_file() else None


def read_bundle_meta(path: str | Path) -> dict:
    """``bundle.json`` of the bundle at ``path`` (:class:`CorruptBundleError` when missing or unreadable)."""
    meta_path = Path(path) / BUNDLE_META
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise CorruptBundleError(f"{meta_path}: cannot read the bundle's manifest ({reason}); the installation "
                                 "is corrupt, reinstall consistentee") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or not meta["files"]:
        raise CorruptBundleError(f"{meta_path}: no 'files' manifest; the installation is corrupt, reinstall "
                                 "consistentee")
    return meta


def verify_bundle(path: str | Path) -> dict:
    """Recompute the sha256 of every file in the manifest of the bundle at ``path``; returns ``bundle.json``.

    A missing or changed file raises :class:`CorruptBundleError` (one line naming the file)."""
    path = Path(path)
    meta = read_bundle_meta(path)
    for rel, expected in meta["files"].items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise CorruptBundleError(f"{path / BUNDLE_META}: unsafe file name {rel!r} in the manifest; the "
                                     "installation is corrupt, reinstall consistentee")
        file = path.joinpath(*parts)
        if not file.is_file():
            raise CorruptBundleError(f"{file}: bundled file missing; the installation is corrupt, reinstall "
                                     "consistentee")
        got = file_sha256(file)
        if got != expected:
            raise CorruptBundleError(f"{file}: sha256 {got}, expected {expected}; the installation is corrupt, "
                                     "reinstall consistentee")
    return meta


def describe_training(meta: dict) -> str:
    """How a bundle was trained, in a few words, from its ``bundle.json``."""
    train = meta.get("train_config") or (meta.get("exits_config") or {}).get("train")
    if not isinstance(train, dict):
        return "training not recorded"
    steps = "/".join(str(train.get(f"stage{i}_steps", "?")) for i in (1, 2, 3))
    words = [f"train-lm on {train.get('corpus', '?')}", f"{steps} steps in stages 1/2/3"]
    if train.get("lora_rank"):
        words.append(f"LoRA rank {train['lora_rank']}")
    return ", ".join(words)
