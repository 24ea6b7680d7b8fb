"""A stage-1 run killed with SIGKILL mid-epoch resumes from its last checkpoint and ends like an uninterrupted run;
a corrupt or truncated checkpoint is refused by the CLI with one line naming the file (exit status 2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from consistentee.cli.main import main


def _command(run_dir: Path, data: str, model: str) -> list[str]:
    return [sys.executable, "-m", "consistentee.cli.main", "stage1", "--run-dir", str(run_dir), "--dataset", data,
            "--id-column", "id", "--model", model, "--pooling", "mean", "--max-length", "16", "--epochs", "2",
            "--batch-size", "4", "--learning-rate", "1e-3", "--head-learning-rate", "3e-3", "--stage1.checkpoint-every", "1",
            "--device", "cpu", "--no-progress"]


def _checkpoint_position(ckpt: Path) -> tuple[int, int, int] | None:
    """(epoch, step, global step) of the checkpoint on disk, or None while there is none (or it is being swapped)."""
    try:
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        return int(state["epoch"]), int(state["step"]), int(state["global_step"])
    except Exception:
        return None


def test_sigkill_mid_epoch_then_rerun_gives_the_uninterrupted_result(tiny_csv, tiny_encoder_dir, tmp_path, capsys):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "env": env, "text": True}
    reference = subprocess.Popen(_command(full, tiny_csv, tiny_encoder_dir), **quiet)
    victim = subprocess.Popen(_command(killed, tiny_csv, tiny_encoder_dir), **quiet)
    ckpt = killed / "stage1" / "checkpoint"
    try:
        first_seen, deadline = None, time.monotonic() + 120
        while time.monotonic() < deadline and victim.poll() is None:
            position = _checkpoint_position(ckpt) if (ckpt / "manifest.json").is_file() else None
            if position is not None:
                first_seen = first_seen or position
                # 12 steps per epoch: kill in the middle of epoch 2, a few steps after the first checkpoint seen.
                if position[0] == 1 and 2 <= position[1] <= 9 and position[2] >= first_seen[2] + 3:
                    os.kill(victim.pid, signal.SIGKILL)
                    break
            time.sleep(0.02)
        victim.wait(timeout=30)
        assert victim.returncode == -signal.SIGKILL, f"not killed in time: {victim.returncode}\n{victim.stderr.read()}"
        reference_err = reference.communicate(timeout=180)[1]
        assert reference.returncode == 0, reference_err[-3000:]
    finally:
        for proc in (reference, victim):
            if proc.poll() is None:
                proc.kill()

    assert (ckpt / "manifest.json").is_file()
    at_kill = _checkpoint_position(ckpt)
    assert at_kill is not None and at_kill[1] > 0, at_kill  # a mid-epoch checkpoint
    # A copy of the killed run with a damaged checkpoint, for the corruption checks below.
    damaged = tmp_path / "damaged"
    shutil.copytree(killed, damaged)

    resumed = subprocess.run(_command(killed, tiny_csv, tiny_encoder_dir), capture_output=True, text=True, env=env,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(phase 0, epoch {at_kill[0]}, step {at_kill[1]})" in resumed.stdout + resumed.stderr

    h_full = json.loads((full / "stage1" / "metrics.json").read_text())
    h_res = json.loads((killed / "stage1" / "metrics.json").read_text())
    assert h_full["complete"] and h_res["complete"]
    side_by_side = [(a["epoch"], a["train_loss"], b["train_loss"], a["dev_per_exit_accuracy"], b["dev_per_exit_accuracy"])
                    for a, b in zip(h_full["history"], h_res["history"], strict=True)]
    with capsys.disabled():  # shown with -s
        print(f"\nkilled at epoch {at_kill[0] + 1}, step {at_kill[1]} (global step {at_kill[2]})")
        for row in side_by_side:
            print("epoch {} train_loss uninterrupted {:.6f} resumed {:.6f} dev {} vs {}".format(*row))
    for a, b in zip(h_full["history"], h_res["history"], strict=True):
        assert a["steps"] == b["steps"] == 12
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["dev_per_exit_accuracy"] == b["dev_per_exit_accuracy"]
    w_full = load_file(full / "stage1" / "model" / "model.safetensors")
    w_res = load_file(killed / "stage1" / "model" / "model.safetensors")
    assert max((w_full[k] - w_res[k]).abs().max().item() for k in w_full) < 1e-6
    assert not (killed / "stage1" / "checkpoint").exists()
    assert not [p.name for p in (killed / "stage1").iterdir() if p.name.endswith((".tmp", ".old"))]

    # Corrupt, then truncated: the CLI refuses with one line naming the file, exit status 2, and never trains.
    capsys.readouterr()
    weights = damaged / "stage1" / "checkpoint" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    argv = _command(damaged, tiny_csv, tiny_encoder_dir)[3:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, repr(err)
    assert f"checkpoint file {weights} is corrupt (checksum mismatch)" in err
    weights.write_bytes(bytes(data[: len(data) // 3]))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"checkpoint file {weights} is truncated" in err, err
    assert not (damaged / "stage1" / "model").exists()


def test_a_checkpoint_left_half_swapped_by_a_kill_is_recovered(tmp_path):
    from consistentee.training.checkpoint import find_checkpoint, save_checkpoint

    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "checkpoint", model, {"step": 3})
    # Killed between "move the old checkpoint aside" and "move the new one in", with a half-written temp dir.
    os.replace(tmp_path / "checkpoint", tmp_path / ".checkpoint.old")
    (tmp_path / ".checkpoint.abc123.tmp").mkdir()
    found = find_checkpoint(tmp_path / "checkpoint")
    assert found == tmp_path / "checkpoint" and (found / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
