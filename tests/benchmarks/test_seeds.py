"""benchmarks/seeds.py: the statistics over seeds, the verdicts, ``run`` with a stand-in benchmark command and
its usage errors. The script is not a package module: it is loaded from its path."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "seeds.py"

_spec = importlib.util.spec_from_file_location("benchmark_seeds", SCRIPT)
seeds = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = seeds  # dataclasses look their module up there
_spec.loader.exec_module(seeds)

PNG = b"\x89PNG\r\n\x1a\n"

#: per seed: (consistentee, entropy) best layer x @1pt and AUC. The speed-ups agree (consistentee ahead by
#: 0.2, 0.3, 0.25); the AUCs disagree (+1, -2, +2 points).
SPEED = {0: (2.0, 1.8), 1: (2.2, 1.9), 2: (2.1, 1.85)}
AUC = {0: (0.80, 0.79), 1: (0.78, 0.80), 2: (0.82, 0.80)}


def make_report(seed: int, speed: tuple[float, float], auc: tuple[float, float], *, dataset: str = "toy",
                model: str = "minilm") -> dict:
    """A report.json with what seeds.py reads: three rules, two betas of same weights, calibration at 0.5/1pt."""
    def method(s: float, a: float) -> dict:
        return {"knob_name": "k", "auc": a, "best_layer_speedup_at_0.5pt": s - 0.1, "best_layer_speedup_at_1pt": s}

    cons, ent = speed
    methods = {"entropy": method(ent, auc[1]), "static": method(1.5, 0.75), "consistentee": method(cons, auc[0])}
    same = {beta: {"full_depth_test_accuracy": 0.85, "rules": {
        "entropy": method(ent + shift, auc[1]), "consistentee": method(cons + shift, auc[0])}}
        for beta, shift in (("0.03", -0.2), ("0.05", 0.2))}  # averaged over betas: the standard values again
    budgets = {key: {rule: {"median_speedup": s * factor, "violation_rate": v}
                     for rule, s, v in (("entropy", ent, 0.05), ("static", 1.5, 0.0), ("consistentee", cons, 0.12))}
               for key, factor in (("0.5", 0.8), ("1.0", 0.9))}
    # consistentee was calibrated as one chain; with its sequences apart it would have stayed at full depth
    budgets["1.0"]["consistentee"]["by_order"] = {"knobs": {"median_speedup": 1.0, "violation_rate": 0.0}}
    return {
        "dataset": dataset, "model": model, "split_sizes": {"train": 80, "dev": 10, "test": 10},
        "full_depth": {"accuracy": 0.85}, "methods": methods,
        "oracle": {"accuracy": 0.95, "layer_speedup": 3.0 + seed, "flops_speedup": 2.9},
        "calibration": {"delta": 0.1, "budgets": budgets}, "same_weights": same,
        "settings": {"command": f"consistentee benchmark --run-dir runs/toy-{seed} --seed {seed}",
                     "device": "cpu", "machine": {"cpu_count": 2, "processor": "x86_64"},
                     "seeds": {"data": 0, "stage1": seed, "learned_heads": seed, "policy": seed},
                     "stage1": {"epochs": 2, "seed": seed}},
        "timing_seconds": {"stage 1": 60.0, "tables": 30.0},
    }


def write_seed_dirs(out: Path, speed=SPEED, auc=AUC) -> None:
    for seed in speed:
        path = out / f"seed-{seed}" / "report.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(make_report(seed, speed[seed], auc[seed])))


def test_aggregate_means_std_and_verdicts(tmp_path, capsys):
    write_seed_dirs(tmp_path)
    assert seeds.main(["aggregate", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == ["0", "1", "2"]
    assert summary["datasets"] == ["toy"]

    speed = summary["settings"]["standard"]["consistentee"]["best_layer_speedup_at_1pt"]
    assert speed["n"] == 3
    assert speed["mean"] == pytest.approx(2.1)
    assert speed["std"] == pytest.approx(0.1)
    assert (speed["min"], speed["max"]) == (pytest.approx(2.0), pytest.approx(2.2))
    assert speed["per_seed"] == {"0": 2.0, "1": 2.2, "2": 2.1}
    # same weights: each seed averages its two betas (-0.2 and +0.2 around the standard value)
    same = summary["settings"]["same_weights"]["consistentee"]["best_layer_speedup_at_1pt"]
    assert same["per_seed"] == pytest.approx({"0": 2.0, "1": 2.2, "2": 2.1})
    cal = summary["settings"]["calibrated"]["consistentee"]
    assert cal["median_speedup_at_1pt"]["mean"] == pytest.approx(0.9 * 2.1)
    assert cal["violation_rate_at_0.5pt"]["mean"] == pytest.approx(0.12)
    assert cal["separate_median_speedup_at_1pt"]["per_seed"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    assert summary["settings"]["calibrated"]["entropy"]["separate_median_speedup_at_1pt"] is None
    assert summary["reference"]["oracle_layer_speedup"]["mean"] == pytest.approx(4.0)

    # speed-up: consistentee ahead of entropy by 0.25 +- 0.05 over 3 seeds: t(0.975, 2) = 4.303
    v = summary["verdicts"]["standard"]["best_layer_speedup_at_1pt"]
    assert (v["best_rule"], v["other_rule"], v["verdict"]) == ("consistentee", "entropy", "consistentee ahead")
    assert v["gap"]["mean"] == pytest.approx(0.25)
    assert v["gap"]["std"] == pytest.approx(0.05)
    half = 4.302653 * 0.05 / math.sqrt(3)
    assert v["gap"]["interval"] == pytest.approx([0.25 - half, 0.25 + half], abs=1e-5)
    # AUC: the seeds disagree on the sign of the gap
    assert summary["verdicts"]["standard"]["auc"]["verdict"] == "not separable"
    assert summary["verdicts"]["same_weights"]["best_layer_speedup_at_1pt"]["verdict"] == "consistentee ahead"
    assert set(summary["verdicts"]["calibrated"]) == {"median_speedup_at_0.5pt", "median_speedup_at_1pt"}
    assert summary["total_seconds"] == pytest.approx(270.0)
    assert summary["commands"]["per_seed"]["1"] == "consistentee benchmark --run-dir runs/toy-1 --seed 1"
    assert summary["warnings"] == []

    md = (tmp_path / "summary.md").read_text()
    assert "2.10x ± 0.10 (2.00x–2.20x)" in md
    assert "**consistentee ahead**" in md and "**not separable**" in md
    assert "averaged over the betas** (0.03, 0.05)" in md
    assert "12.0% ± 0.0 (12.0%–12.0%) (> delta)" in md
    assert "consistentee benchmark --run-dir runs/toy-2 --seed 2" in md
    png = (tmp_path / "summary.png").read_bytes()
    assert png[:8] == PNG and len(png) > 1000
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_verdict_not_separable_when_seeds_disagree(tmp_path):
    # consistentee ahead on seeds 0 and 2, behind on seed 1: a higher mean than entropy, but no separation
    speed = {0: (2.0, 1.8), 1: (1.6, 1.9), 2: (2.1, 1.85)}
    paths = []
    for seed, pair in speed.items():
        path = tmp_path / f"report-{seed}" / "report.json"
        path.parent.mkdir()
        path.write_text(json.dumps(make_report(seed, pair, AUC[seed])))
        paths.append(str(path))
    out = tmp_path / "out"
    assert seeds.main(["aggregate", "--reports", *paths, "--out-dir", str(out)]) == 0
    v = json.loads((out / "summary.json").read_text())["verdicts"]["standard"]["best_layer_speedup_at_1pt"]
    assert v["best_rule"] == "consistentee"  # 1.9 against 1.85 on average
    assert v["gap"]["mean"] == pytest.approx(0.05)
    assert v["gap"]["interval"][0] < 0 < v["gap"]["interval"][1]
    assert v["verdict"] == "not separable"


def test_one_seed_has_no_spread_and_behind_is_possible(tmp_path):
    one = tmp_path / "one"
    write_seed_dirs(one, speed={0: (1.7, 1.8)}, auc={0: (0.8, 0.79)})
    summary = seeds.aggregate(one)
    stats = summary["settings"]["standard"]["consistentee"]["best_layer_speedup_at_1pt"]
    assert stats["n"] == 1 and stats["std"] is None
    v = summary["verdicts"]["standard"]["best_layer_speedup_at_1pt"]
    assert (v["best_rule"], v["verdict"]) == ("entropy", "one seed: no spread")
    assert v["gap"]["mean"] == pytest.approx(-0.1) and v["gap"]["interval"] is None
    assert "one seed: no spread" in (one / "summary.md").read_text()

    behind = tmp_path / "behind"
    write_seed_dirs(behind, speed={0: (1.6, 1.8), 1: (1.7, 1.85), 2: (1.65, 1.9)})
    v = seeds.aggregate(behind)["verdicts"]["standard"]["best_layer_speedup_at_1pt"]
    assert (v["best_rule"], v["verdict"]) == ("entropy", "consistentee behind")


def test_settings_that_differ_between_seeds_are_warned(tmp_path):
    write_seed_dirs(tmp_path)
    path = tmp_path / "seed-2" / "report.json"
    report = json.loads(path.read_text())
    report["settings"]["stage1"]["epochs"] = 3
    path.write_text(json.dumps(report))
    summary = seeds.aggregate(tmp_path)
    assert len(summary["warnings"]) == 1 and "stage1.epochs: 2 vs 3" in summary["warnings"][0]
    assert "stage1.epochs: 2 vs 3" in (tmp_path / "summary.md").read_text()


FAKE_BENCHMARK = """
import argparse, json, pathlib, sys
p = argparse.ArgumentParser()
for name in ("--log", "--templates", "--run-dir", "--out-dir"):
    p.add_argument(name)
p.add_argument("--seed", type=int)
p.add_argument("--fail-seed", type=int, default=-1)
p.add_argument("--other-seeds-py", help="runs.json that another seeds.py records a seed 9 in meanwhile")
args, _ = p.parse_known_args()
with open(args.log, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if args.other_seeds_py:
    pathlib.Path(args.other_seeds_py).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.other_seeds_py).write_text(json.dumps({"seeds": {"9": {"exit_code": 0}}}))
print(f"fake benchmark, seed {args.seed}")
if args.seed == args.fail_seed:
    sys.exit(3)
out = pathlib.Path(args.out_dir)
out.mkdir(parents=True, exist_ok=True)
report = pathlib.Path(args.templates, f"{args.seed}.json").read_text()
(out / "report.json").write_text(report)
"""


@pytest.fixture
def fake(tmp_path):
    """A benchmark command that logs its arguments and copies templates/SEED.json to OUT/report.json."""
    script = tmp_path / "fake_benchmark.py"
    script.write_text(FAKE_BENCHMARK)
    templates = tmp_path / "templates"
    templates.mkdir()
    for seed in range(4):
        (templates / f"{seed}.json").write_text(json.dumps(make_report(seed, SPEED.get(seed, (2.0, 1.9)),
                                                                       AUC.get(seed, (0.8, 0.79)))))
    log = tmp_path / "calls.jsonl"

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    cmd = f"{sys.executable} {script} --log {log} --templates {templates}"
    return cmd, calls


def test_run_skips_existing_seeds_and_runs_the_rest_in_order(tmp_path, fake, capfd):
    cmd, calls = fake
    out = tmp_path / "out"
    (out / "seed-1").mkdir(parents=True)
    (out / "seed-1" / "report.json").write_text(json.dumps(make_report(1, SPEED[1], AUC[1])))
    run_dir = str(tmp_path / "runs" / "toy-seed{seed}")
    argv = ["run", "--seeds", "2,0,1", "--run-dir", run_dir, "--out-dir", str(out), "--benchmark-cmd", cmd,
            "--", "--dataset", "toy", "--epochs", "1"]
    assert seeds.main(argv) == 0
    made = calls()
    assert [c[c.index("--seed") + 1] for c in made] == ["2", "0"]  # seed 1 skipped, the others in the order given
    assert made[0][-10:] == ["--run-dir", run_dir.replace("{seed}", "2"), "--seed", "2",
                             "--out-dir", str(out / "seed-2"), "--dataset", "toy", "--epochs", "1"]
    printed = capfd.readouterr().out  # the benchmark's own output streams through
    assert printed.index("== seed 2 (1/3)") < printed.index("fake benchmark, seed 2") < printed.index("== seed 0")
    assert "seed-1/report.json exists, skipped" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == ["0", "1", "2"]
    log = json.loads((out / "runs.json").read_text())
    assert set(log["seeds"]) == {"0", "2"}
    assert log["seeds"]["2"]["command"].endswith(f"--seed 2 --out-dir {out / 'seed-2'} --dataset toy --epochs 1")
    assert log["seeds"]["2"]["exit_code"] == 0
    assert summary["commands"]["seeds_py"] == [log["seeds"]["0"]["seeds_py"]]
    assert "benchmarks/seeds.py run --seeds 2,0,1" in summary["commands"]["seeds_py"][0]
    assert "benchmarks/seeds.py run --seeds 2,0,1" in (out / "summary.md").read_text()

    assert seeds.main(argv) == 0  # everything there: nothing runs
    assert len(calls()) == 2
    assert seeds.main([*argv[:1], "--force", *argv[1:]]) == 0  # --force reruns every seed
    assert [c[c.index("--seed") + 1] for c in calls()[2:]] == ["2", "0", "1"]


def test_run_keeps_the_seeds_another_seeds_py_recorded_meanwhile(tmp_path, fake):
    # two seeds.py processes may share an --out-dir (different seeds on different cores): neither drops the other's
    cmd, _ = fake
    out = tmp_path / "out"
    code = seeds.main(["run", "--seeds", "0", "--run-dir", str(tmp_path / "r{seed}"), "--out-dir", str(out),
                       "--benchmark-cmd", f"{cmd} --other-seeds-py {out / 'runs.json'}"])
    assert code == 0
    assert set(json.loads((out / "runs.json").read_text())["seeds"]) == {"0", "9"}


def test_run_stops_at_a_failed_seed(tmp_path, fake, capsys):
    cmd, calls = fake
    out = tmp_path / "out"
    code = seeds.main(["run", "--seeds", "0,1,2", "--run-dir", str(tmp_path / "r{seed}"), "--out-dir", str(out),
                       "--benchmark-cmd", f"{cmd} --fail-seed 1"])
    assert code == 3
    assert [c[c.index("--seed") + 1] for c in calls()] == ["0", "1"]
    assert not (out / "summary.json").exists()
    assert json.loads((out / "runs.json").read_text())["seeds"]["1"]["exit_code"] == 3
    assert "seed 1 failed (exit status 3)" in capsys.readouterr().err


def _script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("value", ["0,x", "", "3-1", "1,1", "-1", "0;1"])
def test_bad_seeds_value_is_one_line_and_exit_2(tmp_path, value):
    # --dry-run and a stand-in command: nothing may train even if the value were (wrongly) taken
    result = _script("run", "--seeds", value, "--run-dir", "r{seed}", "--out-dir", str(tmp_path), "--dry-run",
                     "--benchmark-cmd", "false", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--seeds" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("extra", "message"), [
    (["--run-dir", "runs/same"], "has no {seed}"),
    (["--run-dir", "r{seed}", "--", "--seed", "4"], "--seed is set by seeds.py"),
    (["--run-dir", "r{seed}", "--", "--out-dir=x"], "--out-dir is set by seeds.py"),
    (["--run-dir", "r{seed}", "--dataset", "toy"], "benchmark options go after --"),
])
def test_run_usage_errors(tmp_path, capsys, extra, message):
    safe = ["--dry-run", "--benchmark-cmd", "false"]  # nothing may train even if the error were missed
    assert _exit_code(["run", "--seeds", "0", "--out-dir", str(tmp_path / "out"), *safe, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _exit_code(argv: list[str]) -> int:
    """What main returns, or the status of the SystemExit argparse raises for a usage error."""
    try:
        return seeds.main(argv)
    except SystemExit as exc:
        return exc.code


def test_run_refuses_a_run_dir_trained_with_another_seed(tmp_path, fake, capsys):
    cmd, calls = fake
    metrics = tmp_path / "r1" / "stage1" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"config": {"seed": 0}}))
    code = seeds.main(["run", "--seeds", "0,1", "--run-dir", str(tmp_path / "r{seed}"),
                       "--out-dir", str(tmp_path / "out"), "--benchmark-cmd", cmd])
    assert code == 2
    assert "trained with seed 0, not 1" in capsys.readouterr().err
    assert calls() == []  # checked before any seed runs


def test_aggregate_errors_are_one_line(tmp_path):
    result = _script("aggregate", "--out-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "no " in result.stderr and "seed-*/report.json" in result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "x"}))
    result = _script("aggregate", "--reports", str(bad), "--out-dir", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2 and "not a report.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_dry_run_prints_the_commands_and_runs_nothing(tmp_path, fake, capsys):
    cmd, calls = fake
    out = tmp_path / "out"
    (out / "seed-0").mkdir(parents=True)
    (out / "seed-0" / "report.json").write_text("{}")
    assert seeds.main(["run", "--seeds", "0-1", "--run-dir", "runs/t{seed}", "--out-dir", str(out), "--dry-run",
                       "--benchmark-cmd", cmd, "--", "--dataset", "toy"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "seed 0: skip (report.json exists)"
    assert printed[1].startswith("seed 1: ") and printed[1].endswith(
        f"--run-dir runs/t1 --seed 1 --out-dir {out / 'seed-1'} --dataset toy")
    assert calls() == [] and not (out / "runs.json").exists()


def test_settings_that_differ_are_named_and_a_setting_one_report_lacks_says_so(tmp_path):
    reports = [make_report(seed, SPEED[seed], AUC[seed]) for seed in (0, 1)]
    reports[0]["settings"]["policy"] = {"beta": 0.05}
    reports[1]["settings"]["policy"] = {"beta": 0.1, "joint_scope": "all"}
    runs = [seeds.Run(str(i), i, tmp_path / f"seed-{i}" / "report.json", r) for i, r in enumerate(reports)]
    [warning] = seeds.settings_warnings(runs)
    assert "policy.beta: 0.05 vs 0.1" in warning
    assert "policy.joint_scope: not recorded (an older version) vs 'all'" in warning


def test_recorded_command_names_the_repositorys_script_even_when_a_copy_ran(tmp_path, monkeypatch):
    copy = tmp_path / "snapshot" / "benchmarks" / "seeds.py"  # a long run kept apart from edits of the checkout
    copy.parent.mkdir(parents=True)
    copy.write_text(SCRIPT.read_text())
    spec = importlib.util.spec_from_file_location("benchmark_seeds_copy", copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    assert module.this_command(["aggregate", "--out-dir", "a b"]) == "python benchmarks/seeds.py aggregate --out-dir 'a b'"
