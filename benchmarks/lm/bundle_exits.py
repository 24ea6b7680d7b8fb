"""Ship a trained exits directory inside the package: ``consistentee generate`` then needs no ``--exits-dir``.

    python benchmarks/lm/bundle_exits.py runs/lm/exits/stage3                  # -> bundled_exits/smollm2-135m
    python benchmarks/lm/bundle_exits.py runs/lm/exits/stage3 --force          # replace the bundle already there

EXITS_DIR is what ``consistentee train-lm`` writes (``RUN_DIR/exits/stage3``: ``exits_config.json``,
``exits.safetensors`` and, with a LoRA, peft's ``adapter/``). Every floating tensor of its safetensors files is
cast to bfloat16, the JSON files are kept (other files, such as peft's README.md, are left out), and
``bundle.json`` records the source, its exits config, its training (``train_config.json`` and ``command.sh`` of
the run directory above it, when there) and the sha256 of every shipped file, which ``generate`` checks before
use. The bundle is built in a temporary folder beside DEST and renamed into place when complete; an existing
``DEST/NAME`` is replaced only with ``--force``. The script is not a package module.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from consistentee.generation.bundled import BUNDLE_FOLDER, BUNDLE_META, BUNDLE_MODELS, file_sha256
from consistentee.generation.decoder import EXITS_CONFIG, EXITS_WEIGHTS, LORA_DIR
from consistentee.generation.lora import ADAPTER_WEIGHTS
from consistentee.utils.io import atomic_directory, current_umask

EXIT_USAGE = 2
ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = ROOT / "src" / "consistentee" / "generation" / BUNDLE_FOLDER
#: file kinds that are shipped; anything else in the exits directory is left out
SHIPPED_SUFFIXES = (".json", ".safetensors")
#: files of the run directory (the exits directory's parent, or the one above) that say how it was trained
TRAIN_CONFIG, COMMAND = "train_config.json", "command.sh"
BUNDLE_DTYPE = torch.bfloat16


class BundleError(ValueError):
    """The source is not a trained exits directory, or the destination is taken: one line."""


def check_exits_dir(source: Path) -> dict:
    """The exits config of ``source``; :class:`BundleError` unless it is a complete trained exits directory."""
    if not source.is_dir():
        raise BundleError(f"{source}: not a directory")
    try:
        config = json.loads((source / EXITS_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{source}: no {EXITS_CONFIG} (not a trained exits directory, e.g. RUN_DIR/exits/stage3)"
                          ) from None
    except ValueError as exc:
        raise BundleError(f"{source / EXITS_CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "exits" not in config or "num_layers" not in config:
        raise BundleError(f"{source / EXITS_CONFIG}: not an exits config (no 'exits' or 'num_layers')")
    needed = [EXITS_WEIGHTS]
    if config.get("lora"):
        needed += [f"{LORA_DIR}/adapter_config.json", f"{LORA_DIR}/{ADAPTER_WEIGHTS}"]
    missing = [name for name in needed if not (source / name).is_file()]
    if missing:
        raise BundleError(f"{source}: incomplete exits directory, missing {', '.join(missing)}")
    return config


def shipped_files(source: Path) -> tuple[list[str], list[str]]:
    """(files to ship, files left out) of ``source``, as sorted POSIX paths relative to it."""
    keep, skip = [], []
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_dir() or any(part.startswith(".") for part in rel.parts):
            continue
        (keep if path.suffix in SHIPPED_SUFFIXES else skip).append(rel.as_posix())
    return keep, skip


def cast_safetensors(src: Path, dst: Path, dtype: torch.dtype = BUNDLE_DTYPE) -> None:
    """``src`` with every floating tensor cast to ``dtype`` (others as they are), metadata kept."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
    cast = {key: (t.to(dtype) if t.is_floating_point() else t).contiguous() for key, t in tensors.items()}
    save_file(cast, str(dst), metadata=metadata)


def training_record(source: Path) -> dict:
    """``train_config.json`` (its content) and ``command.sh`` (its text) of the run directory above ``source``."""
    record: dict = {}
    for folder in (source.parent, source.parent.parent):
        config, command = folder / TRAIN_CONFIG, folder / COMMAND
        if "train_config" not in record and config.is_file():
            record["train_config"] = json.loads(config.read_text(encoding="utf-8"))
        if "command" not in record and command.is_file():
            record["command"] = command.read_text(encoding="utf-8")
    return record


def write_adapter_config(src: Path, dst: Path, name: str) -> None:
    """peft's adapter config with the base model named by its built-in name, not the trainer's cache path."""
    config = json.loads(src.read_text(encoding="utf-8"))
    if "base_model_name_or_path" in config:
        config["base_model_name_or_path"] = name
    dst.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (the bundle ships no machine's absolute paths)."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(ROOT).as_posix()
    except ValueError:
        return str(resolved)


def bundle(source: str | os.PathLike, name: str = BUNDLE_MODELS[0], dest: str | os.PathLike = DEFAULT_DEST,
           force: bool = False) -> Path:
    """Write the bundle of ``source`` to ``dest/name`` (atomic); its path."""
    source, target = Path(source), Path(dest) / name
    if name not in BUNDLE_MODELS:
        raise BundleError(f"--name {name!r}: bundles are for the built-in decoder models only "
                          f"({', '.join(BUNDLE_MODELS)})")
    exits_config = check_exits_dir(source)
    if target.exists() and not force:
        raise BundleError(f"{target} exists; pass --force to replace it")
    files, skipped = shipped_files(source)
    file_mode = 0o666 & ~current_umask()
    with atomic_directory(target) as tmp:
        digests = {}
        for rel in files:
            src, dst = source / rel, tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".safetensors":
                cast_safetensors(src, dst)
            elif src.name == "adapter_config.json":
                write_adapter_config(src, dst, name)
            else:
                shutil.copyfile(src, dst)
            os.chmod(dst, file_mode)
            digests[rel] = file_sha256(dst)
        meta = {"model": name, "source": _shown(source), "dtype": str(BUNDLE_DTYPE).removeprefix("torch."),
                "exits_config": exits_config, **training_record(source), "files": digests}
        (tmp / BUNDLE_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp / BUNDLE_META, file_mode)
    size = sum((target / rel).stat().st_size for rel in files)
    before = sum((source / rel).stat().st_size for rel in files)
    print(f"bundled {_shown(source)} -> {_shown(target)}: {len(files)} files, {size / 1e6:.1f} MB "
          f"({before / 1e6:.1f} MB before the cast to {meta['dtype']})"
          + (f"; left out {', '.join(skipped)}" if skipped else ""))
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exits_dir", help="trained exits directory (RUN_DIR/exits/stage3 of `consistentee train-lm`)")
    parser.add_argument("--name", default=BUNDLE_MODELS[0], help="built-in model the exits were trained on")
    parser.add_argument("--dest", default=str(DEFAULT_DEST), help="folder of the bundles (one sub-folder a name)")
    parser.add_argument("--force", action="store_true", help="replace an existing DEST/NAME")
    args = parser.parse_args(argv)
    try:
        bundle(args.exits_dir, args.name, args.dest, args.force)
    except (BundleError, OSError, SafetensorError) as exc:
        print(f"bundle_exits.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
