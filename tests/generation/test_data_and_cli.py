from __future__ import annotations

import argparse
import io
import json
import tarfile

import pytest

from consistentee.generation import data
from consistentee.generation.loading import builtin_cache_dir, cache_root


def _fake_sdist(path, examples):
    payload = json.dumps({"examples": examples}).encode()
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/gem/xsum/task.json")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    return path


def test_xsum_parser_on_fake_tarball(tmp_path):
    examples = [{"input": f"article {i}", "target": f"summary {i}"} for i in range(5)]
    examples.append({"input": "list target", "target": ["first", "second"]})
    examples.append({"input": 3, "target": "bad input skipped"})
    sdist = _fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz", examples)
    got = data.xsum_examples(10, seed=0, path=sdist)
    assert len(got) == 6
    assert {e.summary for e in got} >= {"first", "summary 0"}
    assert [e.id for e in data.xsum_examples(3, seed=0, path=sdist)] == [e.id for e in got[:3]]  # fixed subset


def test_xsum_missing_sdist_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CONSISTENTEE_BIGBENCH_SDIST", str(tmp_path / "nope.tar.gz"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CONSISTENTEE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(data.DataError) as err:
        data.xsum_examples(3)
    assert "python -m consistentee.resources bigbench" in str(err.value) and "\n" not in str(err.value)


def test_xsum_wrong_tarball(tmp_path):
    bad = tmp_path / "x.tar.gz"
    with tarfile.open(bad, "w:gz"):
        pass
    with pytest.raises(data.DataError, match="no \\*/benchmark_tasks/gem/xsum/task.json"):
        data.xsum_examples(3, path=bad)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("CONSISTENTEE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert builtin_cache_dir("smollm2-135m") == tmp_path / "models" / "smollm2-135m"


def test_cli_parsers_build_and_validate(monkeypatch):
    from consistentee.cli import benchmark_lm, generate
    from consistentee.generation import bundled

    monkeypatch.setattr(bundled, "bundled_exits_dir", lambda name: None)  # whether or not the package ships exits

    parser = argparse.ArgumentParser()
    verbs = parser.add_subparsers(dest="verb")
    generate.add_parser(verbs)
    benchmark_lm.add_parser(verbs)
    args = parser.parse_args(["generate", "hi", "--rule", "static", "--knob", "12", "--kv", "recompute",
                              "--lossless", "--stop", "\n", "--no-progress"])
    assert args.rule == "static" and args.knob == 12 and args.kv == "recompute" and args.lossless
    assert args.stop == ["\n"] and args.device == "auto"
    with pytest.raises(ValueError, match="--exits-dir"):
        generate.run(args)
    args = parser.parse_args(["benchmark-lm", "--run-dir", "x", "--xsum-examples", "3", "--beta", "0.1"])
    assert args.xsum_examples == 3 and args.beta == 0.1 and args.exits_dir is None


@pytest.mark.integration
def test_wikitext_chunks(smollm):
    _, tok = smollm
    a = data.lm_chunks(tok, "train", 32, 4, seed=0)
    b = data.lm_chunks(tok, "train", 32, 4, seed=0, offset=4)
    assert a.shape == (4, 32) and not (a == b).all()
    w = data.perplexity_windows(tok, 64, 200)
    assert w.shape == (3, 64)


def test_top_tokens_are_the_most_frequent_training_tokens_plus_the_stop_ids(monkeypatch):
    from transformers import AutoTokenizer

    from consistentee.resources import builtin_model_path

    monkeypatch.setattr(data, "TOP_TOKENS_CHARS", 50_000)
    monkeypatch.setattr(data, "_TOP_TOKENS", {})
    tok = AutoTokenizer.from_pretrained(builtin_model_path("minilm"))
    top = data.top_tokens(tok, 50).tolist()
    assert len(top) == len(set(top)) == 50
    assert tok.convert_tokens_to_ids("the") in top and tok.eos_token_id in (None, *top)
    assert data.top_tokens(tok, 10).tolist() == top[:10]  # nested: a smaller set is a prefix
