"""Atomic writes: modes that follow the umask, nothing half-written, errors that name the output."""

from __future__ import annotations

import json
import os
import stat
import tempfile

import pytest

from consistentee.utils import io


@pytest.fixture
def umask():
    """Set a umask for one test and restore the old one."""
    saved = []

    def set_mask(mask: int) -> None:
        saved.append(os.umask(mask))

    yield set_mask
    if saved:
        os.umask(saved[0])


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                             (0o002, 0o664, 0o775)])
def test_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    assert io.current_umask() == mask
    io.write_json(tmp_path / "a.json", {"x": 1})
    io.write_text(tmp_path / "b.txt", "hi")
    io.save_with(tmp_path / "c.bin", lambda p: p.write_bytes(b"\0"))
    with io.atomic_directory(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert [_mode(tmp_path / n) for n in ("a.json", "b.txt", "c.bin")] == [file_mode] * 3
    assert _mode(tmp_path / "model") == dir_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt", "c.bin", "model"]  # no temporaries


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), io.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_an_unwritable_folder_names_the_output_not_a_temporary_file(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".out.json.abc123.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(io.OutputError) as caught:
        io.write_json(tmp_path / "out.json", {})
    assert str(caught.value.strerror) == f"cannot write {tmp_path / 'out.json'}: Permission denied (in folder {tmp_path})"
    assert ".tmp" not in str(caught.value)
    with pytest.raises(io.OutputError, match="cannot write .*model: Permission denied"):
        with io.atomic_directory(tmp_path / "model"):
            pass


def test_check_writable(tmp_path):
    io.check_writable(tmp_path / "new" / "deeper" / "out.jsonl")  # folders that will be created
    (tmp_path / "file").write_text("x")
    with pytest.raises(io.OutputError, match="is not a folder"):
        io.check_writable(tmp_path / "file" / "out.jsonl")
    with pytest.raises(io.OutputError, match="it is a directory"):
        io.check_writable(tmp_path)


def test_json_never_holds_nan(tmp_path):
    io.write_json(tmp_path / "m.json", {"loss": float("nan"), "xs": [1.0, float("inf")], "ok": 0.5})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "xs": [1.0, None], "ok": 0.5}
