"""Exits shipped inside the package: benchmarks/lm/bundle_exits.py (bf16 + sha256 manifest, atomic), their check,
their loading into the fp32 model, and ``consistentee generate`` using them when no --exits-dir is given."""

from __future__ import annotations

import importlib.util
import json
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from consistentee.cli.main import main as cli_main
from consistentee.generation import bundled, loading
from consistentee.generation.decoder import EarlyExitLM, ExitsConfig
from consistentee.generation.generate import GenerationConfig, generate_ids
from consistentee.generation.lora import LoRAConfig
from consistentee.generation.rules import make_rule
from consistentee.utils.io import write_json

from .conftest import ToyTokenizer, tiny_base

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lm" / "bundle_exits.py"

_spec = importlib.util.spec_from_file_location("bundle_exits_script", SCRIPT)
bundle_exits = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bundle_exits
_spec.loader.exec_module(bundle_exits)

NAME = "smollm2-135m"
TRAIN = {"corpus": "wikitext", "stage1_steps": 3, "stage2_steps": 2, "stage3_steps": 1, "lora_rank": 2}


class CharTokenizer(ToyTokenizer):
    """ToyTokenizer that also encodes text (one token a character, left padding), as the CLI needs."""

    def __call__(self, texts, return_tensors="pt", padding=True, add_special_tokens=False):
        rows = [[3 + ord(c) % 60 for c in text] for text in texts]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def tiny_run(tmp_path) -> tuple[EarlyExitLM, Path]:
    """A trained-looking exits dir with a LoRA (RUN/exits/stage3, train_config.json and command.sh above it)."""
    model = EarlyExitLM(tiny_base(layers=4), ExitsConfig(adapter_rank=2))
    model.add_lora(LoRAConfig(2, 8.0, ("q_proj", "v_proj")))
    with torch.no_grad():
        for p in [*model.trainable_modules().parameters(), *model.lora_params.values()]:
            p.add_(0.3 * torch.randn_like(p))
    run = tmp_path / "run"
    exits = run / "exits" / "stage3"
    model.save_exits(exits, {"train": TRAIN})
    write_json(run / "exits" / "train_config.json", TRAIN)
    (run / "command.sh").write_text("consistentee train-lm --run-dir run --lora-rank 2\n", encoding="utf-8")
    return model, exits


@pytest.fixture
def tiny_bundle(tiny_run, tmp_path) -> Path:
    return bundle_exits.bundle(tiny_run[1], NAME, tmp_path / "bundles")


def _floating_dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118


def test_bundle_is_bf16_with_a_manifest_that_verifies(tiny_run, tiny_bundle):
    _, source = tiny_run
    assert tiny_bundle.name == NAME
    shipped = sorted(p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*") if p.is_file())
    assert shipped == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "bundle.json",
                       "exits.safetensors", "exits_config.json"]  # peft's README.md left out
    assert (source / "adapter" / "README.md").is_file()
    for rel in ("exits.safetensors", "adapter/adapter_model.safetensors"):
        assert _floating_dtypes(tiny_bundle / rel) == {torch.bfloat16}
        assert (tiny_bundle / rel).stat().st_size < (source / rel).stat().st_size
    assert (tiny_bundle / "exits_config.json").read_bytes() == (source / "exits_config.json").read_bytes()
    adapter = json.loads((tiny_bundle / "adapter" / "adapter_config.json").read_text())
    trained = json.loads((source / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == NAME  # no path of the training machine ships
    assert {k: v for k, v in adapter.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in trained.items() if k != "base_model_name_or_path"}
    meta = bundled.verify_bundle(tiny_bundle)
    assert set(meta["files"]) == set(shipped) - {"bundle.json"}
    assert meta["model"] == NAME and meta["dtype"] == "bfloat16" and meta["source"].endswith("run/exits/stage3")
    assert meta["exits_config"] == json.loads((source / "exits_config.json").read_text())
    assert meta["train_config"] == TRAIN and meta["command"].startswith("consistentee train-lm")
    assert bundled.describe_training(meta) == "train-lm on wikitext, 3/2/1 steps in stages 1/2/3, LoRA rank 2"
    assert not [p for p in tiny_bundle.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_bf16_bundle_loads_into_the_fp32_model_and_generates_the_same(tiny_run, tiny_bundle):
    model, _ = tiny_run
    loaded = EarlyExitLM.load_exits(tiny_bundle, tiny_base(layers=4))
    mine = {**dict(loaded.trainable_modules().named_parameters()), **loaded.lora_params}
    theirs = {**dict(model.trainable_modules().named_parameters()), **model.lora_params}
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():  # cast on load: fp32 parameters holding the bf16-rounded values
        assert p.dtype == torch.float32, name
        assert torch.equal(p, theirs[name].to(torch.bfloat16).float()), name
    merged = EarlyExitLM.load_exits(tiny_bundle, tiny_base(layers=4), merge=True)  # as `generate` loads it
    reference = EarlyExitLM.load_exits(tiny_run[1], tiny_base(layers=4), merge=True)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    cfg = GenerationConfig(max_new_tokens=8)
    for rule, knob in (("static", 2), ("consistentee", 0.5)):
        a = generate_ids(merged, ToyTokenizer(), ids, mask, cfg, make_rule(rule, knob))
        b = generate_ids(reference, ToyTokenizer(), ids, mask, cfg, make_rule(rule, knob))
        assert a.token_ids == b.token_ids and a.exit_layers == b.exit_layers, rule
        assert min(min(row) for row in a.exit_layers) < 4, rule  # the exits were used
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    for layer in merged.exit_layers[:-1]:
        with torch.no_grad():
            got, want = merged.head_logits(layer, h), reference.head_logits(layer, h)
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.parametrize("rel", ["exits.safetensors", "adapter/adapter_model.safetensors", "exits_config.json"])
def test_a_flipped_byte_is_one_line_naming_the_file(tiny_bundle, rel):
    path = tiny_bundle / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(bundled.CorruptBundleError) as err:
        bundled.verify_bundle(tiny_bundle)
    message = str(err.value)
    assert str(path) in message and "corrupt" in message and "\n" not in message
    assert isinstance(err.value, ValueError)  # the CLI prints it as one line, exit status 2


def test_a_missing_file_or_manifest_is_corrupt(tiny_bundle):
    (tiny_bundle / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(bundled.CorruptBundleError, match=r"adapter_config\.json: bundled file missing.*corrupt"):
        bundled.verify_bundle(tiny_bundle)
    (tiny_bundle / bundled.BUNDLE_META).write_text("{not json", encoding="utf-8")
    with pytest.raises(bundled.CorruptBundleError, match="bundle.json: cannot read"):
        bundled.verify_bundle(tiny_bundle)


def test_bundled_exits_dir_finds_only_a_complete_bundle_of_a_builtin_model(tiny_bundle, monkeypatch):
    monkeypatch.setattr(bundled, "bundle_root", lambda: tiny_bundle.parent)
    assert bundled.bundled_exits_dir(NAME) == tiny_bundle
    assert bundled.bundled_exits_dir("some/local-model") is None
    (tiny_bundle / bundled.BUNDLE_META).unlink()
    assert bundled.bundled_exits_dir(NAME) is None
    monkeypatch.undo()
    assert bundled.bundle_root() == Path(bundled.__file__).resolve().parent / bundled.BUNDLE_FOLDER


def test_package_data_ships_the_bundles():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "bundled_exits/**/*" in config["tool"]["setuptools"]["package-data"]["consistentee.generation"]


# --------------------------------------------------------------------------- consistentee generate


def _fake_model(monkeypatch, calls: list | None = None) -> None:
    def load(name, device="cpu", dtype=torch.float32):
        if calls is not None:
            calls.append(name)
        return tiny_base(layers=4), CharTokenizer()

    monkeypatch.setattr(loading, "load_causal_lm", load)


def test_generate_without_exits_dir_uses_the_verified_bundle(tiny_bundle, monkeypatch, capsys):
    _fake_model(monkeypatch)
    monkeypatch.setattr(bundled, "bundled_exits_dir", lambda name: tiny_bundle if name == NAME else None)
    rc = cli_main(["generate", "--rule", "static", "--knob", "2", "--max-new-tokens", "3", "--json", "--device",
                   "cpu", "--no-progress", "ab", "cde"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err.strip().splitlines() == [f"consistentee: using the bundled exits for {NAME} (trained with train-lm "
                                        "on wikitext, 3/2/1 steps in stages 1/2/3, LoRA rank 2)"]
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["tokens"] for r in rows] == [3, 3] and {r["mean_exit_layer"] for r in rows} == {2.0}


def test_generate_checks_the_rule_at_the_given_exits_only(tiny_bundle, monkeypatch, capsys):
    _fake_model(monkeypatch)
    monkeypatch.setattr(bundled, "bundled_exits_dir", lambda name: tiny_bundle if name == NAME else None)
    rc = cli_main(["generate", "--rule", "static", "--knob", "1", "--check-layers", "3", "--max-new-tokens", "3",
                   "--json", "--device", "cpu", "--no-progress", "ab"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["mean_exit_layer"] == 3.0  # static 1 would exit at the first exit; asked at 3 only
    rc = cli_main(["generate", "--rule", "static", "--check-layers", "4", "--device", "cpu", "--no-progress", "ab"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[-1].startswith("consistentee: error: check layers [4] are not exit")
    assert err.count("error") == 1


def test_generate_refuses_a_corrupt_bundle(tiny_bundle, monkeypatch, capsys):
    calls: list = []
    _fake_model(monkeypatch, calls)
    monkeypatch.setattr(bundled, "bundled_exits_dir", lambda name: tiny_bundle)
    with open(tiny_bundle / "exits.safetensors", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    rc = cli_main(["generate", "--device", "cpu", "--no-progress", "ab"])
    err = capsys.readouterr().err
    assert rc == 2 and not calls
    assert err.startswith("consistentee: error: ") and "exits.safetensors" in err and "corrupt" in err
    assert len(err.strip().splitlines()) == 1


def test_generate_without_a_bundle_keeps_the_clear_error(monkeypatch, capsys):
    calls: list = []
    _fake_model(monkeypatch, calls)
    monkeypatch.setattr(bundled, "bundled_exits_dir", lambda name: None)
    rc = cli_main(["generate", "--rule", "consistentee", "--device", "cpu", "--no-progress", "ab"])
    err = capsys.readouterr().err
    assert rc == 2 and not calls
    assert "rule 'consistentee' needs trained exits: pass --exits-dir" in err and len(err.strip().splitlines()) == 1
    assert cli_main(["generate", "--rule", "full", "--max-new-tokens", "2", "--device", "cpu", "--no-progress",
                     "ab"]) == 0  # full depth needs no exits
    assert calls == [NAME]


def test_exits_dir_always_wins_over_the_bundle(tiny_run, monkeypatch, capsys):
    _fake_model(monkeypatch)

    def no_bundle(name):
        raise AssertionError("the bundle was looked up although --exits-dir was given")

    monkeypatch.setattr(bundled, "bundled_exits_dir", no_bundle)
    rc = cli_main(["generate", "--exits-dir", str(tiny_run[1]), "--rule", "static", "--knob", "2",
                   "--max-new-tokens", "2", "--device", "cpu", "--no-progress", "ab"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "bundled" not in err and out.strip()


# --------------------------------------------------------------------------- bundle_exits.py


def test_script_refuses_an_existing_destination_without_force(tiny_run, tmp_path, capsys):
    dest = tmp_path / "bundles"
    argv = [str(tiny_run[1]), "--dest", str(dest)]
    assert bundle_exits.main(argv) == 0
    out = capsys.readouterr().out
    assert "4 files" in out and "left out adapter/README.md" in out
    before = (dest / NAME / bundled.BUNDLE_META).read_text()
    (dest / NAME / "marker").write_text("old")
    assert bundle_exits.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("bundle_exits.py: error: ") and "exists; pass --force" in err
    assert (dest / NAME / "marker").is_file()  # untouched
    assert bundle_exits.main([*argv, "--force"]) == 0
    assert not (dest / NAME / "marker").exists() and (dest / NAME / bundled.BUNDLE_META).read_text() == before
    bundled.verify_bundle(dest / NAME)
    assert sorted(p.name for p in dest.iterdir()) == [NAME]


def test_script_writes_nothing_when_the_source_is_not_an_exits_dir(tiny_run, tmp_path, capsys):
    dest = tmp_path / "bundles"
    not_exits = tmp_path / "run" / "exits"  # the run directory, not its stage3
    assert bundle_exits.main([str(not_exits), "--dest", str(dest)]) == 2
    assert "no exits_config.json (not a trained exits directory" in capsys.readouterr().err
    assert not dest.exists()
    (tiny_run[1] / "adapter" / "adapter_model.safetensors").unlink()  # the config says LoRA: incomplete
    assert bundle_exits.main([str(tiny_run[1]), "--dest", str(dest)]) == 2
    assert "missing adapter/adapter_model.safetensors" in capsys.readouterr().err
    assert not dest.exists()
    assert bundle_exits.main([str(tiny_run[1]), "--dest", str(dest), "--name", "tiny"]) == 2
    assert "built-in decoder models only" in capsys.readouterr().err


def test_script_failing_midway_leaves_the_old_bundle_and_no_temporary(tiny_run, tmp_path, capsys):
    dest = tmp_path / "bundles"
    assert bundle_exits.main([str(tiny_run[1]), "--dest", str(dest)]) == 0
    old = bundled.verify_bundle(dest / NAME)
    (tiny_run[1] / "exits.safetensors").write_bytes(b"not a safetensors file")
    assert bundle_exits.main([str(tiny_run[1]), "--dest", str(dest), "--force"]) == 2
    assert "bundle_exits.py: error: " in capsys.readouterr().err
    assert bundled.verify_bundle(dest / NAME) == old
    assert sorted(p.name for p in dest.iterdir()) == [NAME]
