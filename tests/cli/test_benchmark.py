"""``consistentee benchmark`` end to end on a tiny random model and a tiny file dataset (smoke run)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from consistentee.cli import benchmark
from consistentee.evaluation.report import PLOT_FILES, check_report_schema
from consistentee.pipeline import benchmark as recipe


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consistentee")
    verbs = parser.add_subparsers(dest="verb")
    benchmark.add_parser(verbs)
    return parser


def _stand_in_sweep(calls: list):
    """Stands in for training.policy.run_beta_sweep: the stage-1 model with random policies per beta."""
    from transformers import AutoTokenizer

    from consistentee.model.modeling import EarlyExitForSequenceClassification

    def sweep(run_dir, betas, cfg, *, device="auto", progress=True, log=print):
        calls.append(list(betas))
        stage1 = Path(run_dir) / "stage1" / "model"
        out = {}
        for beta in betas:
            model = EarlyExitForSequenceClassification.from_pretrained(stage1)
            g = torch.Generator().manual_seed(int(beta * 1000))
            for p in model.policies.parameters():
                p.data = torch.randn(p.shape, generator=g)
            out[beta] = Path(run_dir) / "policies" / f"beta-{beta:g}" / "model"
            model.save_pretrained(out[beta], tokenizer=AutoTokenizer.from_pretrained(stage1))
            (out[beta].parent / "progress.json").write_text('{"complete": true}')
        return out

    return sweep


def test_options_are_generated_from_the_configs_without_clashes():
    args = _parser().parse_args(["benchmark", "--run-dir", "r", "--epochs", "3", "--learned-epochs", "7",
                                 "--betas", "0.1,0.2", "--wall-examples", "none", "--rules", "entropy"])
    settings = benchmark.settings_from_args(args)
    assert settings.stage1.epochs == 3 and settings.learned.learned_epochs == 7
    assert settings.bench.beta_values() == [0.1, 0.2] and settings.bench.wall_examples is None
    # policy options are those of `consistentee train`: their own names, a namespaced option for a setting that
    # stage 1 has too (--stage1.seed, --policy.seed), and --seed, the documented shorthand for every training seed
    args = _parser().parse_args(["benchmark", "--run-dir", "r", "--rollouts", "4", "--seed", "5",
                                 "--learned-seed", "6"])
    settings = benchmark.settings_from_args(args)
    assert settings.policy.rollouts == 4 and settings.policy.seed == 5 and settings.stage1.seed == 5
    assert settings.learned.learned_seed == 6 and settings.data.data_seed == 0


def test_training_options_are_the_same_as_train():
    from consistentee.cli.main import build_parser

    def options(parser: argparse.ArgumentParser, verb: str) -> set[str]:
        verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {flag for action in verbs.choices[verb]._actions for flag in action.option_strings}

    train = options(build_parser(), "train") - {"--beta", "--betas"}
    assert train <= options(_parser(), "benchmark")
    assert {"--stage1.seed", "--policy.seed", "--seed"} <= train
    assert "--policy-seed" not in options(_parser(), "benchmark")
    for verb in ("stage1", "policy"):  # a flag means the same in every training verb
        assert options(build_parser(), verb) <= options(build_parser(), "train")


def test_demo_verb_runs_the_demo_settings(monkeypatch):
    parser = argparse.ArgumentParser(prog="consistentee")
    benchmark.add_demo_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["demo", "--run-dir", "somewhere", "--max-train-examples", "100", "--device", "cpu"])
    seen = {}
    monkeypatch.setattr(benchmark, "run_settings", lambda run_dir, settings, **kw: seen.update(
        run_dir=run_dir, settings=settings, **kw) or 0)
    assert benchmark.run_demo(args) == 0
    assert seen["run_dir"] == "somewhere" and seen["device"] == "cpu"
    assert seen["settings"].data.dataset == "rt-snippets" and seen["settings"].data.max_train_examples == 100


def test_benchmark_smoke_run_and_reuse(tiny_csv, tiny_encoder_dir, tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(recipe, "run_beta_sweep", _stand_in_sweep(calls))
    run_dir = tmp_path / "run"
    common = ["benchmark", "--run-dir", str(run_dir), "--dataset", tiny_csv, "--id-column", "id",
              "--max-length", "16", "--model", tiny_encoder_dir, "--pooling", "mean", "--epochs", "1",
              "--batch-size", "8", "--learning-rate", "1e-3", "--head-learning-rate", "3e-3",
              "--learned-epochs", "3", "--betas", "0.01,0.05", "--thresholds", "0,0.3,0.5,0.7",
              "--grid-points", "10", "--resplits", "20",
              "--device", "cpu", "--no-progress"]
    args = _parser().parse_args([*common, "--wall-repeats", "2", "--wall-batch-size", "4", "--wall-examples", "none"])
    assert benchmark.run(args) == 0
    printed = capsys.readouterr().out
    for rule in (*recipe.ALL_RULES, "oracle"):
        assert f"\n{rule} " in printed
    assert "report:" in printed and "report.md" in printed

    out = run_dir / "report"
    report = json.loads((out / "report.json").read_text())
    check_report_schema(report)
    assert list(report["methods"]) == list(recipe.ALL_RULES)
    assert report["num_layers"] == 3 and report["split_sizes"] == {"train": 48, "dev": 6, "test": 6}
    for name, method in report["methods"].items():
        # a timed point has a speed-up, or is marked invalid with the reason (a tiny model times mostly noise)
        timed = [p for p in method["points"] if p["wall_speedup"] is not None or p.get("wall_invalid")]
        assert timed, name  # its dev-selected point was timed
        assert all((p["wall_speedup"] or 0) > 0 or "FLOPs" in p["wall_invalid"] or "noisy" in p["wall_invalid"]
                   for p in timed)
        assert len(timed) <= 2 + 2 + 2  # only a bounded set: dev-selected, calibrated, frontier
        assert set(method["calibrated"]) == {"0.5pt", "1pt"}
        assert method["routing"], name
    cee = report["methods"]["consistentee"]["points"]
    assert {p["knob"]["beta"] for p in cee} == {0.01, 0.05} and len(cee) == 8
    wall = report["settings"]["wall_clock"]
    assert wall["examples"] == 6 and wall["batch_size"] == 4
    assert wall["engine_exit_agreement_min"] >= 0.8  # the engine reproduces the simulated exits
    assert report["oracle"]["accuracy"] >= report["full_depth"]["accuracy"]
    study = report["calibration"]["budgets"]
    assert set(study) >= {"0.5", "1.0"} and set(study["1.0"]) == set(recipe.ALL_RULES)
    assert all(0.0 <= e["violation_rate"] <= 1.0 for e in study["1.0"].values())
    assert report["calibration"]["order"] == "train"  # two betas and PCEE's patiences: one chain per rule
    # what the chain changed is shown beside it: the separate sequences on the same re-splits
    assert set(study["1.0"]["consistentee"]["by_order"]) == {"knobs"}
    assert "by_order" in study["1.0"]["pcee"] and "by_order" not in study["1.0"]["confidence"]
    assert report["settings"]["bench"]["order_examples"] == 2000
    assert set(report["same_weights"]) == {"0.01", "0.05"}
    for beta, model in report["consistentee_models"].items():  # one entry per policy, layers 1..L-1
        assert [r["layer"] for r in model["policy_sensitivity"]] == [1, 2], beta
    timed_ok = any(p["wall_speedup"] is not None for m in report["methods"].values() for p in m["points"])
    for key, name in PLOT_FILES.items():  # the wall-clock plot needs a valid timing (a tiny model times noise)
        assert (out / name).is_file() == (key != "tradeoff_wall" or timed_ok), name
    md = (out / "report.md").read_text()
    assert "## Summary" in md and "## How it was run" in md and "## Does the policy read its input?" in md
    assert calls == [[0.01, 0.05]]

    # a second run reuses stage 1, the memorized layers, the learned heads and the policy models
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "stage1" / "model" / "model.safetensors",
                                                run_dir / "memorized_layers.json",
                                                run_dir / "learned_heads" / "model.safetensors")}
    args = _parser().parse_args([*common, "--rules", "entropy,consistentee", "--wall-repeats", "0",
                                 "--calibration-order", "knobs", "--out-dir", str(tmp_path / "second")])
    assert benchmark.run(args) == 0
    assert calls == [[0.01, 0.05]]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    second = json.loads((tmp_path / "second" / "report.json").read_text())
    assert list(second["methods"]) == ["entropy", "consistentee"]
    assert second["calibration"]["order"] == "knobs"
    assert all(p["wall_speedup"] is None for m in second["methods"].values() for p in m["points"])
    assert "tradeoff_wall" not in second["files"]
    # the same run directory with other data settings is refused, not silently mixed
    with pytest.raises(ValueError, match="other settings.*max_length"):
        benchmark.run(_parser().parse_args([*common, "--max-length", "20", "--rules", "entropy"]))
