"""Atomic file writes: a crash or a full disk never leaves a half-written output behind.

Temporary files are created private (``mkstemp``: 0600, ``mkdtemp``: 0700) and get the modes a plain ``open`` or
``mkdir`` would give (0644/0755 under the usual umask 022) just before they are swapped in, so a model saved by one
user can be read by a service running as another. Failures to create the output are reported with the output's
name (:class:`OutputError`), never with the temporary name nobody asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["OutputError", "atomic_directory", "atomic_path", "check_writable", "current_umask", "read_json",
           "save_with", "write_json", "write_text"]


class OutputError(OSError):
    """An output that cannot be written (read-only or missing folder, a file in the way): names the output."""


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux: /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only where /proc is missing)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _output_error(path: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or type(exc).__name__
    return OutputError(exc.errno, f"cannot write {path}: {reason} (in folder {path.parent})")


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, naming ``path``, when its folder cannot take a new file (checked before long work starts)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(21, f"cannot write {path}: it is a directory")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(20, f"cannot write {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(13, f"cannot write {path}: permission denied (in folder {parent})")


def _mkdir_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _output_error(path, exc) from None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    _mkdir_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _output_error(path, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            _follow_umask(tmp_path, directory=False)
        try:
            os.replace(tmp_path, path)
        except OSError as exc:
            raise _output_error(path, exc) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/Infinity floats replaced by None: strict JSON has no NaN, and readers choke on it."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that never writes NaN or Infinity (they become null)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, dumps_json(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it in whole when the block succeeds.

    An existing directory at ``path`` is kept until the new one is complete.
    """
    path = Path(path)
    _mkdir_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise _output_error(path, exc) from None
    try:
        yield tmp
        _follow_umask(tmp, directory=True)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in blocks (model weights, checkpoints, shipped exits, downloads)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
