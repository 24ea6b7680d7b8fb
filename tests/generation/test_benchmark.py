"""benchmark-lm end to end on a tiny random Llama and a fake BIG-bench sdist: report fields, honest counters."""

from __future__ import annotations

import pytest
import torch

from consistentee.generation import benchmark as B
from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.training import LMTrainConfig
from consistentee.pipeline.benchmark_lm import BenchmarkLMConfig, run_benchmark

from .conftest import tiny_base
from .test_data_and_cli import _fake_sdist


def test_bootstrap_interval_of_paired_differences():
    a, b = [3.0, 5.0, 4.0, 6.0], [2.0, 4.0, 3.0, 5.0]
    assert B.bootstrap_diff(a, b) == {"mean": 1.0, "low": 1.0, "high": 1.0}  # constant difference
    noisy = B.bootstrap_diff([float(i % 7) for i in range(100)], [3.0] * 100, reps=500)
    assert noisy["low"] < noisy["mean"] < noisy["high"] and noisy["high"] - noisy["low"] < 2.0


def test_cost_model_in_layer_equivalents():
    model = EarlyExitLM(tiny_base(layers=3), ExitsConfig(exit_layers=[1], adapter_rank=2))
    costs = B.measure_costs(model, context=16, repeats=5, vocab_sizes=(8, 32))
    assert set(costs["layer_equivalents"]) == {"layer", "full_head", "head_8", "head_32", "policy"}
    assert costs["layer_equivalents"]["layer"] == 1.0 and all(v > 0 for v in costs["seconds"].values())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Llama with the MiniLM tokenizer saved like a checkpoint, random exits, a 4-example fake sdist."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from consistentee.resources import builtin_model_path

    root = tmp_path_factory.mktemp("bench")
    tok = AutoTokenizer.from_pretrained(builtin_model_path("minilm"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    exits = EarlyExitLM(base, ExitsConfig(exit_layers=[1, 2, 3], adapter_rank=2))
    with torch.no_grad():
        for p in exits.trainable_modules().parameters():
            p.add_(0.5 * torch.randn_like(p))
    exits.save_exits(root / "exits")
    sdist = _fake_sdist(root / "bigbench-1.0.0.tar.gz", [
        {"input": f"the article number {i} tells of rivers and hills and a town", "target": f"town {i}"}
        for i in range(4)])
    return root, sdist


def test_exit_agreement_compares_each_exit_with_the_last():
    top = torch.tensor([[5, 7, 7], [1, 2, 3], [4, 4, 4], [9, 8, 8]])
    features = {"top": top, "draft_top": torch.tensor([[7, 7, 7], [3, 3, 3], [0, 4, 4], [8, 8, 8]])}
    assert B.exit_agreement(features, [1, 2, 3]) == {"1": 0.25, "2": 0.75, "3": 1.0}
    assert B.exit_agreement(features, [1, 2, 3], "draft_top") == {"1": 0.75, "2": 1.0, "3": 1.0}


def test_benchmark_report_on_a_tiny_model(tiny_run, tmp_path, monkeypatch):
    root, sdist = tiny_run
    monkeypatch.setenv("CONSISTENTEE_BIGBENCH_SDIST", str(sdist))
    cfg = BenchmarkLMConfig(model=str(root / "model"), exits_dir=str(root / "exits"), xsum_examples=3,
                            max_new_tokens=6, ppl_tokens=256, ppl_seq_len=64, consistentee_knobs="0.5",
                            static_knobs="2", maxprob_knobs="0.01", gap_knobs="0.5", saturation_knobs="0.9",
                            lossless_rule="static", lossless_knob=1, draft_tokens=3, draft_vocab=500,
                            bootstrap=50, threads=1)
    report = run_benchmark(tmp_path, cfg, LMTrainConfig(), device="cpu", progress=False)
    assert report["num_test_examples"] == 3
    rows = {r["name"]: r for r in report["xsum"]["results"]}
    assert rows["full"]["identical_to_full"] and rows["full"]["rougeL_diff_vs_full"]["mean"] == 0.0
    lossless = report["lossless"]
    assert lossless["identical_outputs"] is True and 0.0 <= lossless["acceptance"] <= 1.0
    # verification is counted: 4 layers for every position + full-head rows; never cheaper than drafting alone
    assert 0.3 < lossless["flops_ratio"] <= 1.0 + 1e-9
    # its layer speed-up counts the layers it ran (drafts + verification): a number, never nan
    assert 0.2 < rows[lossless["config"]]["layer_speedup"] < 2.0
    assert rows["full"]["layer_speedup"] == 1.0
    assert set(report["goal"]) >= {"speedup_vs_full", "rougeL_loss", "config", "target_met"}
    assert report["cost_model"]["layer_equivalents"]["head_500"] > 0
    for name in ("report.md", "report.json", "quality_vs_speed.png"):
        assert (tmp_path / name).is_file()
    assert "R-L diff [95% CI]" in (tmp_path / "report.md").read_text()
    agreement = report["perplexity"]["per_exit_agreement"]
    assert set(agreement) == {"full_head", "draft_head"}
    assert agreement["full_head"][str(report["num_layers"])] == 1.0  # the last exit is the full model
    assert all(0.0 <= v <= 1.0 for head in agreement.values() for v in head.values())


def test_a_lossless_drafter_that_never_drafts_shallow_costs_exactly_full_depth(tiny_run, tmp_path, monkeypatch):
    """Drafts at the last layer are the full model's tokens: lossless mode then runs every slot and head row that
    full depth runs, so its layer and FLOPs ratios, both counted against full depth's work, are exactly 1."""
    root, sdist = tiny_run
    monkeypatch.setenv("CONSISTENTEE_BIGBENCH_SDIST", str(sdist))
    cfg = BenchmarkLMConfig(model=str(root / "model"), exits_dir=str(root / "exits"), xsum_examples=3,
                            max_new_tokens=6, ppl_tokens=128, ppl_seq_len=64, consistentee_knobs="", static_knobs="",
                            maxprob_knobs="", gap_knobs="", saturation_knobs="", lossless_rule="static",
                            lossless_knob=4, draft_tokens=2, bootstrap=20, threads=1)
    report = run_benchmark(tmp_path, cfg, LMTrainConfig(), device="cpu", progress=False)
    row = {r["name"]: r for r in report["xsum"]["results"]}[report["lossless"]["config"]]
    assert report["lossless"]["identical_outputs"] is True
    assert row["layer_speedup"] == 1.0 and row["flops_ratio"] == pytest.approx(1.0)


def test_a_rule_asked_only_at_some_exits_never_exits_elsewhere_offline_either():
    from consistentee.generation.rules import make_rule, parse_check_layers

    features = {"max_prob": torch.tensor([[0.99, 0.99, 0.99], [0.1, 0.99, 0.99]])}
    exits = [2, 4, 6, 8]
    rule = make_rule("confidence-maxprob", 0.9, [4])
    assert rule.label == "confidence-maxprob(lambda=0.9)@4"
    assert rule.offline_decisions(features, exits).tolist() == [[False, True, False], [False, True, False]]
    assert B.first_exit(rule.offline_decisions(features, exits), exits).tolist() == [4, 4]
    everywhere = make_rule("confidence-maxprob", 0.9)
    assert B.first_exit(everywhere.offline_decisions(features, exits), exits).tolist() == [2, 4]
    assert parse_check_layers("", exits) is None and parse_check_layers("2,6", exits) == [2, 6]
    for bad in ("8", "3"):  # the last exit is always full depth; 3 is no exit
        with pytest.raises(ValueError, match="not exit layers"):
            parse_check_layers(bad, exits)
