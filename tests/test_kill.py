"""Fault injection with real processes: `dreambooth train` killed with SIGKILL (no handler runs,
as when a machine loses power or the OOM killer strikes), including in the middle of a
checkpoint write, then resumed with `--resume_from_checkpoint latest`, ends with the weights
of an uninterrupted run, and leaves no temporary file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_resume import assert_same_weights, trained_weights

STEPS = 10


def train_command(model: Path, photos: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dreambooth", "train", "--pretrained_model_name_or_path",
            str(model), "--instance_data_dir", str(photos), "--instance_prompt", "a sks dog",
            "--output_dir", str(output), "--resolution", "32", "--train_batch_size", "2",
            "--max_train_steps", str(STEPS), "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--checkpointing_steps", "1", "--seed", "7", "--accelerator", "cpu",
            "--report_to", "none", *extra]


def kill_when(command: list[str], ready, timeout: float = 120.0) -> bool:
    """Start `command`, SIGKILL it as soon as `ready()` is true; False if it finished first."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if ready():
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.002)
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model):
    from conftest import write_subject_photos

    root = tmp_path_factory.mktemp("kill")
    photos = write_subject_photos(root / "photos")
    subprocess.run(train_command(tiny_model, photos, root / "reference"), check=True,
                   capture_output=True)
    return root, photos


@pytest.mark.parametrize("moment", ["checkpoint write", "after step 3"])
def test_sigkill_then_resume_latest_matches_uninterrupted(reference, tiny_model, tmp_path,
                                                          moment):
    root, photos = reference
    output = tmp_path / "killed"
    checkpoints = output / "checkpoints"

    def writing() -> bool:  # a checkpoint's temporary file exists: the write is under way
        return checkpoints.is_dir() and any(p.suffix == ".tmp" for p in checkpoints.iterdir())

    def after_step_3() -> bool:
        return (checkpoints / "checkpoint-3.ckpt").exists()

    killed = kill_when(train_command(tiny_model, photos, output),
                       writing if moment == "checkpoint write" else after_step_3)
    assert killed, "the run finished before it could be killed"
    assert not (output / "model_index.json").exists()
    resumed = subprocess.run(train_command(tiny_model, photos, output, "--resume_from_checkpoint",
                                           "latest"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(trained_weights(root / "reference"), trained_weights(output), atol=0)
    assert not [p for p in checkpoints.iterdir() if p.suffix == ".tmp"]
