"""The harness's pure parts on hand-made tables: sweeps, summaries, dev selection, FLOPs kwargs, timing
(``evaluation.sweep``, ``evaluation.summary``, ``pipeline.wallclock``), and the benchmark settings."""

from __future__ import annotations

import math

import pytest
import torch

from consistentee.evaluation.flops import EncoderShape
from consistentee.evaluation.summary import auc_x_range, oracle_gap, select_wall_points, summarize_method
from consistentee.evaluation.sweep import (
    EvalTables,
    FlopsSpec,
    PointResult,
    build_candidates,
    knob_from_json,
    knob_label,
    knob_to_json,
    order_statistics,
    rule_flops_kwargs,
    sweep,
)
from consistentee.pipeline.benchmark import BenchmarkConfig, demo_settings
from consistentee.pipeline.wallclock import measure_wall_clock

# 4 examples, 3 layers, 2 classes; labels 0, 1, 1, 0
P = torch.tensor([
    # row 0: confident and right at layer 1
    [[0.95, 0.05], [0.9, 0.1], [0.9, 0.1]],
    # row 1: wrong at 1, right and confident from 2
    [[0.6, 0.4], [0.1, 0.9], [0.05, 0.95]],
    # row 2: right only at 3
    [[0.7, 0.3], [0.55, 0.45], [0.2, 0.8]],
    # row 3: wrong everywhere
    [[0.2, 0.8], [0.3, 0.7], [0.4, 0.6]],
])
LABELS = torch.tensor([0, 1, 1, 0])
SHAPE = EncoderShape(num_layers=3, hidden_size=8, intermediate_size=16, num_heads=2, vocab_size=10, num_labels=2,
                     policy_hidden=4, has_pooler=False)


def tables(policy=None, learned=None) -> EvalTables:
    return EvalTables(P, LABELS, torch.tensor([5, 6, 7, 8]), policy, learned)


def test_static_and_oracle_sweeps_by_hand():
    t = tables()
    points = sweep(build_candidates("static", t, t), FlopsSpec(SHAPE))
    assert [p.knob for p in points] == [1, 2, 3]
    # k=1: predictions 0,0,0,1 -> right on row 0 only; k=3: 0,1,1,1 -> rows 0,1,2
    assert [p.test["accuracy"] for p in points] == [0.25, 0.5, 0.75]
    assert [p.test["layer_speedup"] for p in points] == [3.0, 1.5, 1.0]
    assert points[2].test["flops_speedup"] == pytest.approx(1.0)  # static: no intermediate heads
    assert points[0].test["flops_speedup"] > 2.9
    oracle = sweep(build_candidates("oracle", t, t), FlopsSpec(SHAPE))[0]
    assert oracle.test_exit_layers.tolist() == [1, 2, 3, 3] and oracle.test["accuracy"] == 0.75


def test_order_statistics_are_each_candidates_mean_exit_and_drop_on_the_order_rows():
    t = tables()
    # static k=1 is right on row 0 only, full depth on rows 0-2: 2 of 4 rows lost; k=3 loses nothing
    layers, losses = order_statistics(build_candidates("static", t, t), {None: t})
    assert layers.tolist() == [1.0, 2.0, 3.0]
    assert losses.tolist() == pytest.approx([50.0, 25.0, 0.0])
    # a ConsistentEE candidate reads its own model's table; the loss is against the stage-1 model's full depth
    worse = EvalTables(P.flip(-1), LABELS, torch.tensor([5, 6, 7, 8]), torch.ones(4, 3), None)
    cands = build_candidates("consistentee", t, t, policy_tables={0.1: (worse, worse)}, thresholds=[0.5])
    layers, losses = order_statistics(cands, {None: t, 0.1: worse})
    assert layers.tolist() == [1.0]  # policy 1.0 > 0.5 at layer 1: every row leaves there
    assert losses.tolist() == pytest.approx([0.0])  # flipped layer 1 is right on rows 1-3, full depth on 0-2


def test_entropy_sweep_and_knob_forms():
    t = tables()
    cands = build_candidates("entropy", t, t)
    assert len(cands) == 16 and cands[0].knob == 0.0 and cands[-1].knob == pytest.approx(math.log(2))
    points = sweep(cands)
    assert points[0].test["mean_exit_layer"] == 3.0 and points[-1].test["mean_exit_layer"] == 1.0
    assert points[0].test["flops_speedup"] is None  # no FLOPs spec given
    pcee = build_candidates("pcee", t, t)
    assert pcee[0].knob == {"t": 1, "S": pytest.approx(0.05 * math.log(2), abs=1e-6)}
    assert knob_from_json("pcee", pcee[0].knob) == (1, pcee[0].knob["S"])
    assert knob_to_json("patience", 3) == 3 and knob_to_json("confidence", 0.9) == 0.9
    assert knob_to_json("oracle", None) is None
    assert knob_label("pcee", {"t": 2, "S": 0.5}) == "t=2, S=0.5" and knob_label("entropy", 0.25) == "S=0.25"


def test_consistentee_points_cross_betas_with_thresholds_and_learned_needs_scores():
    policy_a = torch.tensor([[0.9, 0.9], [0.1, 0.9], [0.1, 0.1], [0.1, 0.1]])
    policy_b = torch.zeros(4, 2)
    ta, tb = tables(policy=policy_a), tables(policy=policy_b)
    cands = build_candidates("consistentee", ta, ta, policy_tables={0.05: (ta, ta), 0.01: (tb, tb)},
                             thresholds=[0.5, 0.95])
    assert [c.knob for c in cands] == [{"beta": 0.01, "threshold": 0.5}, {"beta": 0.01, "threshold": 0.95},
                                       {"beta": 0.05, "threshold": 0.5}, {"beta": 0.05, "threshold": 0.95}]
    assert [c.model_key for c in cands] == [0.01, 0.01, 0.05, 0.05]
    points = sweep(cands, FlopsSpec(SHAPE))
    assert points[2].test_exit_layers.tolist() == [1, 2, 3, 3]
    assert points[0].test_exit_layers.tolist() == [3, 3, 3, 3]
    # policies are counted: full depth with policies costs more than the plain full depth
    assert points[0].test["flops_speedup"] < 1.0
    with pytest.raises(ValueError, match="beta"):
        build_candidates("consistentee", ta, ta)
    with pytest.raises(ValueError, match="learned_score"):
        sweep(build_candidates("learned", ta, ta))
    scores = torch.tensor([[0.9, 0.9, 0.9], [0.2, 0.8, 0.9], [0.1, 0.1, 0.9], [0.1, 0.1, 0.9]])
    learned = sweep(build_candidates("learned", tables(learned=scores), tables(learned=scores), grid=[0.5]))
    assert learned[0].test_exit_layers.tolist() == [1, 2, 3, 3]


def test_flops_kwargs_per_rule():
    spec = FlopsSpec(SHAPE, pooler_used=False, learned_head_flops=16.0)
    assert rule_flops_kwargs("entropy", spec)["heads_every_layer"] is True
    cee = rule_flops_kwargs("consistentee", spec)
    assert cee["with_policy"] and not cee["heads_every_layer"] and cee["extra_flops_per_layer"] == 0
    assert rule_flops_kwargs("learned", spec)["extra_flops_per_layer"] == 16.0
    assert rule_flops_kwargs("static", spec) == {"with_policy": False, "pooler_used": False,
                                                 "heads_every_layer": False, "extra_flops_per_layer": 0.0}
    pooled = FlopsSpec(EncoderShape(3, 8, 16, 2, 10, 2, has_pooler=True), pooler_used=True)
    assert rule_flops_kwargs("consistentee", pooled)["extra_flops_per_layer"] == 2 * 8 * 8


def point(knob, dev_speed, dev_acc, test_speed, test_acc, num_layers=4) -> PointResult:
    def m(speed, acc):
        mean = num_layers / speed
        return {"accuracy": acc, "macro_f1": acc, "mcc": 0.0, "mean_exit_layer": mean, "layer_speedup": speed,
                "saved_fraction": 1 - mean / num_layers, "flops_speedup": speed * 0.9}

    return PointResult("entropy", knob, None, m(dev_speed, dev_acc), m(test_speed, test_acc),
                       torch.full((3,), round(num_layers / test_speed)), torch.zeros(3, dtype=torch.long))


def test_summary_reads_best_speedups_off_test_and_selects_on_dev():
    # full depth: dev 0.90, test 0.88
    points = [point(0.1, 1.0, 0.90, 1.0, 0.88), point(0.2, 1.5, 0.897, 1.6, 0.876),
              point(0.3, 2.0, 0.893, 2.0, 0.865), point(0.4, 4.0, 0.70, 4.0, 0.70)]
    s = summarize_method(points, full_test_accuracy=0.88, full_dev_accuracy=0.90, x_range=(0.0, 0.5))
    assert s["best_layer_speedup_at_0.5pt"] == 1.6  # 0.876 >= 0.875
    assert s["best_layer_speedup_at_1pt"] == 1.6  # 0.865 < 0.87
    assert s["frontier"] == [[1.0, 0.88], [1.6, 0.876], [2.0, 0.865], [4.0, 0.70]]
    # AUC over saved 0..0.5: 0.876 on [0, 0.375], 0.865 on (0.375, 0.5]
    assert s["auc"] == pytest.approx((0.375 * 0.876 + 0.125 * 0.865) / 0.5)
    half, one = s["dev_selected"]["0.5pt"], s["dev_selected"]["1pt"]
    assert half["knob"] == 0.2 and half["within_budget_on_test"] is True
    # dev chooses 0.3 for 1 pt (0.893 >= 0.89) but on test it loses 1.5 points: reported, flagged
    assert one["knob"] == 0.3 and one["index"] == 2 and one["test_layer_speedup"] == 2.0
    assert one["test_loss_points"] == pytest.approx(1.5) and one["within_budget_on_test"] is False
    assert one["test_wall_speedup"] is None and one["test_flops_speedup"] == pytest.approx(1.8)
    none = summarize_method(points, 0.99, 0.99, (0.0, 0.5))["dev_selected"]["1pt"]
    assert none["knob"] is None and none["test_accuracy"] is None
    assert select_wall_points(points, s, 0) == [1, 2]
    assert select_wall_points(points, s, 1) == [1, 2, 3]  # frontier points not chosen yet: 0, 3; the middle one
    assert select_wall_points(points, s, 5) == [1, 2, 0, 3]


def test_auc_range_and_oracle_gap():
    a = [point(1, 1, 0.9, 1.0, 0.9), point(2, 2, 0.8, 2.0, 0.8)]
    b = [point(1, 1, 0.9, 1.0, 0.9), point(2, 4, 0.8, 4.0, 0.6)]
    none = [point(1, 1, 0.9, 1.0, 0.9)]
    assert auc_x_range({"a": a, "b": b, "none": none}, 4) == (0.0, 0.5)
    assert auc_x_range({"none": none}, 4) == (0.0, 0.75)
    oracle = point(None, 2.5, 0.95, 2.5, 0.95)
    gap = oracle_gap(b, oracle, best_at_1pt=1.0)
    assert gap["accuracy_at_oracle_speedup"] == 0.6 and gap["accuracy_gap_points"] == pytest.approx(35.0)
    assert gap["layer_speedup_gap_at_1pt"] == 1.5
    assert oracle_gap(a, oracle, None) == {"accuracy_at_oracle_speedup": None, "accuracy_gap_points": None,
                                           "layer_speedup_gap_at_1pt": None}


def test_wall_clock_is_interleaved_and_uses_medians():
    clock = [0.0]
    calls = []

    def work(name, seconds):
        def run():
            calls.append(name)
            clock[0] += seconds
        return run

    durations = iter([4.0, 4.0, 100.0, 4.0, 4.0])  # one outlier round of the baseline
    full = work("full", 0)

    def full_fn():
        full()
        clock[0] += next(durations)

    result = measure_wall_clock(full_fn, {"a": work("a", 2.0), "b": work("b", 1.0)}, repeats=4, warmup=1,
                                timer=lambda: clock[0])
    assert calls[:3] == ["full", "a", "b"]  # warm-up
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["full", "a", "b"], ["a", "b", "full"], ["b", "full", "a"], ["full", "a", "b"]]
    assert result.full_seconds == [4.0, 100.0, 4.0, 4.0] and result.full_median == 4.0
    assert result.speedups() == {"a": 2.0, "b": 4.0}
    with pytest.raises(ValueError):
        measure_wall_clock(full_fn, {}, repeats=0)


def test_benchmark_config_validation_and_demo_settings():
    cfg = BenchmarkConfig(rules="static, entropy", betas=[0.1, 0.01], thresholds="0.5,0.2")
    assert cfg.rule_names() == ["entropy", "static"] and cfg.beta_values() == [0.01, 0.1]
    assert cfg.threshold_values() == [0.2, 0.5] and cfg.betas == "0.1,0.01"
    assert BenchmarkConfig().rule_names()[-1] == "consistentee"
    with pytest.raises(ValueError, match="unknown rule"):
        BenchmarkConfig(rules="entropy,magic")
    with pytest.raises(ValueError, match="betas"):
        BenchmarkConfig(betas="a,b")
    with pytest.raises(ValueError, match="thresholds"):
        BenchmarkConfig(thresholds="1.5")
    assert BenchmarkConfig().calibration_order == "train"
    with pytest.raises(ValueError, match="calibration_order must be train or knobs"):
        BenchmarkConfig(calibration_order="data")
    with pytest.raises(ValueError, match="order_examples"):
        BenchmarkConfig(order_examples=0)
    demo = demo_settings()
    assert demo.data.dataset == "rt-snippets" and demo.model.model == "minilm"
    assert demo.stage1.epochs == 1 and demo.bench.beta_values() == [0.03, 0.05, 0.07]
    assert demo.policy.joint_epochs == 1 and demo.data.max_train_examples == 3000
    assert demo.data.policy_holdout == 0.2  # policies never learn from examples stage 1 fitted
    assert demo.to_json()["bench"]["wall_batch_size"] == 32


def test_a_run_directory_trained_with_other_seeds_is_refused(tmp_path):
    # --seed 1 on a run directory trained with seed 0 must not report seed 0's models as seed 1's
    import json

    from consistentee.pipeline.benchmark import BenchmarkSettings, _seed_mismatches

    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "metrics.json").write_text(json.dumps({"config": {"seed": 0}}))
    (tmp_path / "policies" / "beta-0.05").mkdir(parents=True)
    (tmp_path / "policies" / "beta-0.05" / "progress.json").write_text(json.dumps({"config": {"seed": 0}}))
    settings = BenchmarkSettings()
    assert _seed_mismatches(tmp_path, settings) == []
    settings.stage1.seed = 1
    settings.policy.seed = 1
    problems = _seed_mismatches(tmp_path, settings)
    assert problems == ["stage1.seed: run 0, asked 1", "policy.seed (beta-0.05): run 0, asked 1"]
