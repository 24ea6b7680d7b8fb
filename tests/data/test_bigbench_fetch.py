"""The BIG-bench sdist: one lookup, a checked download (``python -m consistentee.resources bigbench``), errors.

A small fake archive in a temporary folder stands in for the real one, fetched from its ``file://`` address with
the pinned address, size and checksum monkeypatched: nothing here needs the network.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from consistentee import resources
from consistentee.data.builtin import VITAMINC_MEMBER, load_builtin
from consistentee.data.errors import DataError
from consistentee.generation import data as gen_data
from consistentee.resources import (
    BIGBENCH_ENV,
    BIGBENCH_SDIST,
    VERIFIED_SUFFIX,
    MissingResourceError,
    ResourceChecksumError,
    ResourceDownloadError,
    bigbench_sdist_path,
    fetch_bigbench,
)


def _fake_sdist_bytes() -> bytes:
    answers = ["True", "False", "Neither"]
    examples = [{"input": f"Evidence {i}.\nClaim: claim {i}", "target_scores": {a: int(a == answers[i % 3])
                                                                                  for a in answers}}
                for i in range(20)]
    payload = json.dumps({"examples": examples}).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/{VITAMINC_MEMBER}")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.fixture
def remote(tmp_path, monkeypatch) -> dict:
    """A fake sdist served from a ``file://`` address (pinned as the real one is), and an empty cache."""
    blob = _fake_sdist_bytes()
    source = tmp_path / "server" / BIGBENCH_SDIST
    source.parent.mkdir()
    source.write_bytes(blob)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONSISTENTEE_CACHE", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(BIGBENCH_ENV, raising=False)
    monkeypatch.setattr(resources, "BIGBENCH_URL", source.as_uri())
    monkeypatch.setattr(resources, "BIGBENCH_SHA256", hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(resources, "BIGBENCH_SIZE", len(blob))
    return {"blob": blob, "source": source, "dest": cache / BIGBENCH_SDIST, "cache": cache}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.exists() else []


def test_cli_fetches_checks_and_records_then_the_datasets_find_it(remote, capsys):
    assert resources.main(["bigbench"]) == 0
    dest = remote["dest"]
    assert capsys.readouterr().out.strip() == f"bigbench: {dest}"
    assert dest.read_bytes() == remote["blob"]
    marker = json.loads((dest.parent / (dest.name + VERIFIED_SUFFIX)).read_text())
    assert marker["sha256"] == resources.BIGBENCH_SHA256 and marker["size"] == len(remote["blob"])
    assert _leftovers(remote["cache"]) == []
    assert bigbench_sdist_path() == dest
    assert load_builtin("vitaminc").sizes() == {"train": 16, "dev": 2, "test": 2}


def test_fetch_goes_where_the_environment_variable_points(remote, tmp_path, monkeypatch):
    wanted = tmp_path / "elsewhere" / "bb.tar.gz"
    monkeypatch.setenv(BIGBENCH_ENV, str(wanted))
    assert fetch_bigbench(progress=False) == wanted and wanted.is_file()
    assert not remote["dest"].exists()
    assert bigbench_sdist_path() == wanted


def test_checksum_mismatch_names_both_and_leaves_nothing(remote, monkeypatch):
    monkeypatch.setattr(resources, "BIGBENCH_SHA256", "0" * 64)
    with pytest.raises(ResourceChecksumError) as info:
        fetch_bigbench(progress=False)
    message = str(info.value)
    assert "0" * 64 in message and hashlib.sha256(remote["blob"]).hexdigest() in message and "\n" not in message
    assert not remote["dest"].exists() and _leftovers(remote["cache"]) == []
    assert not any(p.name.endswith(VERIFIED_SUFFIX) for p in remote["cache"].iterdir())


@pytest.mark.parametrize("size_delta", [1, -1])
def test_a_size_mismatch_is_refused_without_leftovers(remote, monkeypatch, size_delta):
    monkeypatch.setattr(resources, "BIGBENCH_SIZE", len(remote["blob"]) + size_delta)
    with pytest.raises(ResourceChecksumError, match="expected .* bytes"):
        fetch_bigbench(progress=False)
    assert not remote["dest"].exists() and _leftovers(remote["cache"]) == []


def test_a_file_already_there_is_not_downloaded_and_hashed_only_once(remote, monkeypatch):
    dest = remote["dest"]
    dest.parent.mkdir(parents=True)
    dest.write_bytes(remote["blob"])
    remote["source"].unlink()  # a download would now fail
    assert fetch_bigbench(progress=False) == dest
    assert (dest.parent / (dest.name + VERIFIED_SUFFIX)).is_file()

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr(resources, "file_sha256", no_hashing)
    assert resources.main(["bigbench"]) == 0  # the marker answers


def test_a_changed_file_is_checked_again_and_refused_but_kept(remote):
    dest = remote["dest"]
    dest.parent.mkdir(parents=True)
    dest.write_bytes(remote["blob"])
    fetch_bigbench(progress=False)
    dest.write_bytes(remote["blob"][:-1] + b"x")
    os.utime(dest, ns=(1, 1))
    with pytest.raises(ResourceChecksumError, match="delete it and run `python -m consistentee.resources bigbench`"):
        fetch_bigbench(progress=False)
    assert dest.is_file()  # a file the user put there is never deleted


def test_the_old_default_location_is_still_found(remote, tmp_path):
    legacy = tmp_path / "xdg" / "consistentee" / BIGBENCH_SDIST
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(remote["blob"])
    assert bigbench_sdist_path() == legacy
    assert fetch_bigbench(progress=False) == legacy and not remote["dest"].exists()


def test_missing_sdist_says_how_to_get_it_everywhere(remote):
    with pytest.raises(MissingResourceError) as info:
        bigbench_sdist_path("vitaminc")
    message = str(info.value)
    assert "\n" not in message and message.startswith("vitaminc needs the BIG-bench 1.0.0 sdist")
    assert "`python -m consistentee.resources bigbench`" in message and "`make setup`" in message
    assert str(remote["dest"]) in message and BIGBENCH_ENV in message
    with pytest.raises(DataError, match="python -m consistentee.resources bigbench"):
        load_builtin("vitaminc")
    with pytest.raises(gen_data.DataError, match="^XSum needs .*python -m consistentee.resources bigbench"):
        gen_data.xsum_examples(3)


def test_network_failure_is_one_line_and_exit_code_2(remote, capsys, monkeypatch):
    monkeypatch.setattr(resources, "BIGBENCH_URL", (remote["source"].parent / "absent.tar.gz").as_uri())
    with pytest.raises(ResourceDownloadError, match="^cannot download file:"):
        fetch_bigbench(progress=False)
    assert resources.main(["bigbench"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("consistentee.resources: error: cannot download ")
    assert not remote["dest"].exists() and _leftovers(remote["cache"]) == []


def test_no_name_prepares_the_split_models_not_bigbench(remote, monkeypatch):
    monkeypatch.setattr(resources, "SPLIT_MODELS", {})

    def no_fetch(*args, **kwargs):
        raise AssertionError("bigbench fetched without being named")

    monkeypatch.setattr(resources, "fetch_bigbench", no_fetch)
    assert resources.main([]) == 0
    assert resources.main(["nonsense"]) == 2
