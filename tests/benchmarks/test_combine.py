"""benchmarks/seeds.py combine (one summary over the per-dataset summaries) and benchmarks/readme_table.py --summary
(the README's table from it). The fake reports are those of test_seeds.py, summarised by seeds.summarize."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fakes = _load("benchmark_seeds_fakes", HERE / "test_seeds.py")  # make_report, SPEED, AUC and its `seeds`
seeds = fakes.seeds
readme_table = _load("benchmark_readme_table", ROOT / "benchmarks" / "readme_table.py")

PNG = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"auc_mean", "auc_std", "best_speedup_1pt_mean", "best_speedup_1pt_std", "best_speedup_05pt_mean",
            "best_speedup_05pt_std", "calibrated_speedup_1pt_mean", "calibrated_speedup_1pt_std", "n_seeds"}
#: the one-seed dataset: entropy ahead of consistentee on speed-up @1pt (1.8 against 1.7) and AUC (81 against 79).
ONE_SEED = {"speed": (1.7, 1.8), "auc": (0.79, 0.81)}


def write_summary(folder: Path, dataset: str, speed: dict, auc: dict, model: str = "minilm") -> Path:
    """``folder/summary.json`` as ``seeds.py aggregate`` would write it for these fake reports."""
    runs = [seeds.Run(str(seed), seed, folder / f"seed-{seed}" / "report.json",
                      fakes.make_report(seed, speed[seed], auc[seed], dataset=dataset, model=model))
            for seed in speed]
    summary = seeds.summarize(runs, command=f"python benchmarks/seeds.py aggregate --out-dir {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    seeds.write_json(folder / "summary.json", summary)
    return folder / "summary.json"


@pytest.fixture
def two_datasets(tmp_path) -> tuple[Path, Path]:
    """toy: 3 seeds (consistentee leads both metrics); tiny: 1 seed (entropy leads)."""
    toy = write_summary(tmp_path / "results" / "toy-seeds", "toy", fakes.SPEED, fakes.AUC)
    tiny = write_summary(tmp_path / "results" / "tiny-seeds", "tiny", {0: ONE_SEED["speed"]}, {0: ONE_SEED["auc"]})
    return toy, tiny


def _combine(tmp_path: Path, *summaries: Path | str) -> dict:
    out = tmp_path / "combined"
    assert seeds.main(["combine", "--summaries", *map(str, summaries), "--out-dir", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


def test_combine_schema_and_values_equal_the_per_dataset_ones(tmp_path, two_datasets):
    toy, tiny = two_datasets
    combined = _combine(tmp_path, toy.parent, tiny)  # a folder stands for its summary.json
    assert combined["generated_by"] == "benchmarks/seeds.py combine"
    assert "seeds.py combine --summaries" in combined["command"]
    assert combined["units"]["auc"].startswith("percent")
    assert list(combined["datasets"]) == ["toy", "tiny"]

    per_dataset = json.loads(toy.read_text())
    entry = combined["datasets"]["toy"]
    assert entry["seeds"] == ["0", "1", "2"]
    assert entry["source"] == str(toy)
    assert entry["model"] == "minilm"
    assert entry["verdicts"] == per_dataset["verdicts"]
    assert entry["reference"] == per_dataset["reference"]
    for setting in ("standard", "same_weights"):
        rules = entry["settings"][setting]["rules"]
        assert set(rules) == set(per_dataset["settings"][setting])
        for rule, row in rules.items():
            assert ROW_KEYS <= set(row)
            stats = per_dataset["settings"][setting][rule]
            assert row["auc_mean"] == pytest.approx(100 * stats["auc"]["mean"])  # percent, like the tables
            assert row["auc_std"] == pytest.approx(100 * stats["auc"]["std"])
            for key, metric in (("best_speedup_1pt", "best_layer_speedup_at_1pt"),
                                ("best_speedup_05pt", "best_layer_speedup_at_0.5pt")):
                assert row[f"{key}_mean"] == stats[metric]["mean"]
                assert row[f"{key}_std"] == stats[metric]["std"]
            calibrated = per_dataset["settings"]["calibrated"][rule]["median_speedup_at_1pt"]
            assert row["calibrated_speedup_1pt_mean"] == calibrated["mean"]  # the same in both settings
            assert row["calibrated_speedup_1pt_std"] == calibrated["std"]
            assert row["n_seeds"] == 3
    cons = entry["settings"]["standard"]["rules"]["consistentee"]
    assert cons["best_speedup_1pt_mean"] == pytest.approx(2.1) and cons["best_speedup_1pt_std"] == pytest.approx(0.1)
    assert cons["auc_mean"] == pytest.approx(80.0) and cons["auc_std"] == pytest.approx(2.0)
    assert cons["calibrated_speedup_1pt_mean"] == pytest.approx(0.9 * 2.1)

    one = combined["datasets"]["tiny"]
    for setting in ("standard", "same_weights"):
        for row in one["settings"][setting]["rules"].values():
            assert row["n_seeds"] == 1
            assert row["auc_std"] is None and row["best_speedup_1pt_std"] is None  # null, not 0
            assert row["best_speedup_05pt_std"] is None and row["calibrated_speedup_1pt_std"] is None
    assert one["settings"]["standard"]["rules"]["entropy"]["best_speedup_1pt_mean"] == pytest.approx(1.8)


def test_combine_names_another_models_dataset_after_the_model(tmp_path, two_datasets):
    toy, _ = two_datasets
    big = write_summary(tmp_path / "results" / "toy-mpnet", "toy", {0: ONE_SEED["speed"]}, {0: ONE_SEED["auc"]},
                        model="mpnet")
    local = write_summary(tmp_path / "results" / "toy-local", "toy", {0: ONE_SEED["speed"]}, {0: ONE_SEED["auc"]},
                          model="/models/my-bert/")
    combined = _combine(tmp_path, toy, big, local)
    assert list(combined["datasets"]) == ["toy", "toy-mpnet", "toy-my-bert"]  # side by side, not a clash
    assert combined["datasets"]["toy-mpnet"]["model"] == "mpnet"
    assert combined["datasets"]["toy-mpnet"]["settings"]["standard"]["rules"]["entropy"]["n_seeds"] == 1


def _variant_study(folder, settings_key: str, value: dict):
    """A two-seed summary of the toy dataset whose reports set ``settings[settings_key] = value``."""
    reports = {seed: fakes.make_report(seed, ONE_SEED["speed"], ONE_SEED["auc"]) for seed in (0, 1)}
    for report in reports.values():
        report["settings"][settings_key] = value
    runs = [seeds.Run(str(seed), seed, folder / f"seed-{seed}" / "report.json", r) for seed, r in reports.items()]
    folder.mkdir(parents=True)
    seeds.write_json(folder / "summary.json", seeds.summarize(runs))
    return folder


def test_combine_names_another_stage3_scope_after_it(tmp_path, two_datasets):
    toy, _ = two_datasets
    folder = _variant_study(tmp_path / "results" / "toy-exits-seeds", "policy", {"joint_scope": "exits"})
    combined = _combine(tmp_path, toy, folder)
    assert list(combined["datasets"]) == ["toy", "toy-joint-exits"]  # an ablation beside its dataset, not a clash
    assert combined["datasets"]["toy-joint-exits"]["joint_scope"] == "exits"
    assert combined["datasets"]["toy"]["joint_scope"] is None  # the fake reports predate the setting
    assert "Stage 3 trained `exits`" in (tmp_path / "combined" / "summary.md").read_text()


def test_combine_lead_table_says_no_when_another_rule_is_ahead(tmp_path, two_datasets):
    combined = _combine(tmp_path, *two_datasets)
    toy, tiny = combined["datasets"]["toy"]["lead"], combined["datasets"]["tiny"]["lead"]
    assert toy["standard"]["best_speedup_1pt"]["leads"] is True
    assert toy["standard"]["best_speedup_1pt"]["gap"] == pytest.approx(0.25)  # 2.1 against entropy's 1.85
    assert toy["standard"]["auc"]["leads"] is True  # 80.00 against 79.67
    for setting in ("standard", "same_weights"):
        speed = tiny[setting]["best_speedup_1pt"]
        assert (speed["leads"], speed["leader"]) == (False, "entropy")
        assert speed["gap"] == pytest.approx(-0.1)
        assert (tiny[setting]["auc"]["leads"], tiny[setting]["auc"]["leader"]) == (False, "entropy")

    md = (tmp_path / "combined" / "summary.md").read_text()
    assert "## toy" in md and "## tiny" in md
    assert "1 seed: no spread" in md
    assert "| consistentee | 80.00 ± 2.00 | 2.00x ± 0.10 | 2.10x ± 0.10 | 1.89x ± 0.09 | 3 |" in md
    assert "| consistentee | 79.00 | 1.60x | 1.70x | 1.53x | 1 |" in md  # one seed: the value alone
    assert "**consistentee ahead**" in md and "one seed: no spread" in md  # the per-dataset verdicts
    lead_table = md[md.index("## Does consistentee lead?"):]
    assert "| toy | standard | 3 | yes, +0.33 pt over entropy | yes, +0.25x over entropy |" in lead_table
    assert "| tiny | same weights | 1 | no: entropy leads by 2.00 pt | no: entropy leads by 0.10x |" in lead_table
    png = (tmp_path / "combined" / "summary.png").read_bytes()
    assert png[:8] == PNG and len(png) > 1000
    assert not [p.name for p in (tmp_path / "combined").iterdir() if p.name.startswith(".")]


def test_combine_default_reads_every_results_summary_but_its_own(tmp_path, two_datasets, monkeypatch):
    monkeypatch.setattr(seeds, "RESULTS_DIR", tmp_path / "results")
    out = tmp_path / "results" / "all"
    for _ in range(2):  # the second time, results/all/summary.json (its own) is there and left out
        assert seeds.main(["combine", "--out-dir", str(out)]) == 0
        combined = json.loads((out / "summary.json").read_text())
        assert sorted(combined["datasets"]) == ["tiny", "toy"]
    other = tmp_path / "elsewhere"  # another combined summary under results/ is no dataset either
    assert seeds.main(["combine", "--out-dir", str(other)]) == 0
    assert sorted(json.loads((other / "summary.json").read_text())["datasets"]) == ["tiny", "toy"]


def test_combine_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, two_datasets):
    toy, tiny = two_datasets
    again = write_summary(tmp_path / "results" / "toy-again", "toy", {0: (2.0, 1.9)}, {0: (0.8, 0.79)})
    report = tmp_path / "report.json"
    report.write_text(json.dumps(fakes.make_report(0, (2.0, 1.9), (0.8, 0.79))))
    cases = [([toy, tiny, again], "both summarise dataset toy"),
             ([toy, tmp_path / "missing" / "summary.json"], "no such file"),
             ([toy, report], "not a summary.json of seeds.py")]
    for summaries, message in cases:
        out = tmp_path / "out"
        result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "seeds.py"), "combine", "--summaries",
                                 *map(str, summaries), "--out-dir", str(out)],
                                capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
        assert not out.exists()


# ----------------------------------------------------------------------------------------- readme_table.py


README = """# project

## Results

Intro line.

<!-- results-table:start -->
(run `python benchmarks/seeds.py combine` ...)
<!-- results-table:end -->

| data | rule | AUC % |
| rt | entropy | 81.21 |
"""


def test_readme_table_prints_and_writes_between_the_markers(tmp_path, two_datasets, capsys):
    _combine(tmp_path, *two_datasets)
    summary = str(tmp_path / "combined" / "summary.json")
    capsys.readouterr()
    assert readme_table.main(["--summary", summary]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| data | setting | rule | AUC % | best x @0.5pt | best x @1pt | calibrated x @1pt |")
    assert "| toy | standard | consistentee | 80.00 ± 2.00 | 2.00x ± 0.10 | 2.10x ± 0.10 | 1.89x ± 0.09 | 3 |" in table
    assert "| tiny | same weights | entropy | 81.00 | 1.70x | 1.80x | 1.62x | 1 |" in table
    assert "tiny: 1 seed: no spread" in table

    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert readme_table.main(["--summary", summary, "--write", str(readme)]) == 0
    text = readme.read_text()
    head, rest = text.split("<!-- results-table:start -->\n")
    between, tail = rest.split("<!-- results-table:end -->")
    assert head == README.split("<!-- results-table:start -->")[0]
    assert tail == README.split("<!-- results-table:end -->")[1]
    assert between == table  # what it prints, line for line
    assert readme_table.main(["--summary", summary, "--write", str(readme)]) == 0
    assert readme.read_text() == text  # a second write changes nothing
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("content", [
    "# no markers\n",
    "<!-- results-table:start -->\nonly the start\n",
    "<!-- results-table:end -->\n<!-- results-table:start -->\n",
])
def test_readme_table_refuses_a_readme_without_its_markers(tmp_path, two_datasets, capsys, content):
    _combine(tmp_path, *two_datasets)
    readme = tmp_path / "README.md"
    readme.write_text(content)
    assert readme_table.main(["--summary", str(tmp_path / "combined" / "summary.json"), "--write", str(readme)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "results-table:start" in err
    assert readme.read_text() == content


def test_readme_table_refuses_a_per_dataset_summary(tmp_path, two_datasets, capsys):
    assert readme_table.main(["--summary", str(two_datasets[0])]) == 2
    assert "not a summary.json of `python benchmarks/seeds.py combine`" in capsys.readouterr().err


def test_readme_table_per_report_mode_still_prints_the_committed_tables(capsys):
    assert readme_table.main([str(ROOT / "benchmarks" / "results" / "rt-snippets")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| data | rule | AUC % | best @0.5pt | best @1pt |")
    assert "| rt-snippets | consistentee |" in out and "| rt-snippets | oracle |" in out


def test_combine_names_a_beta_sweep_after_its_number_of_models(tmp_path, two_datasets):
    toy, _ = two_datasets
    folder = _variant_study(tmp_path / "results" / "toy-betas-seeds", "bench", {"betas": "0.02,0.05,0.1,0.2"})
    combined = _combine(tmp_path, toy, folder)
    assert list(combined["datasets"]) == ["toy", "toy-4betas"]  # the sweep beside the one-beta study
