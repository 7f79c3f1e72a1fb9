#!/usr/bin/env python
"""Soak test of exact resume: kill `dreambooth train` with SIGKILL at random moments, resume
each time with `--resume_from_checkpoint latest`, and compare the final weights with an
uninterrupted run. Reports how many kills (and how many during a checkpoint write) the run
survived with bit-identical weights, for the README's reliability figures.

    .venv/bin/python benchmarks/kill_resume.py --kills 10 --steps 16

Runs on the tiny random model of `dreambooth.tiny` on the CPU; measure on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train_command(model: Path, photos: Path, output: Path, steps: int, resume: bool) -> list[str]:
    command = [sys.executable, "-m", "dreambooth", "train", "--pretrained_model_name_or_path",
               str(model), "--instance_data_dir", str(photos), "--instance_prompt", "a sks dog",
               "--output_dir", str(output), "--resolution", "32", "--train_batch_size", "2",
               "--max_train_steps", str(steps), "--learning_rate", "1e-3",
               "--lr_warmup_steps", "0", "--checkpointing_steps", "1", "--seed", "7",
               "--accelerator", "cpu", "--report_to", "none", "--use_ema",
               # The count is kept on resume, but the uninterrupted run picks its own: fixed,
               # so that the comparison measures resume, not the machine's load.
               "--num_threads", "1"]
    return command + (["--resume_from_checkpoint", "latest"] if resume else [])


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="SIGKILLs to survive in all.")
    parser.add_argument("--steps", type=int, default=16, help="Optimizer steps of the run.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/kill_resume.json"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import write_subject_photos
    from dreambooth.tiny import save_tiny_pipeline

    chooser = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    model = save_tiny_pipeline(root / "model")
    photos = write_subject_photos(root / "photos")
    started = time.monotonic()
    subprocess.run(train_command(model, photos, root / "reference", args.steps, False),
                   check=True, capture_output=True)
    output = root / "killed"
    kills, during_write, runs = 0, 0, 0
    while not (output / "model_index.json").exists():
        runs += 1
        process = subprocess.Popen(train_command(model, photos, output, args.steps, runs > 1),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kills < args.kills:
            # Half the kills hit a checkpoint write under way, half a random moment (up to half
            # a second) after a new checkpoint is complete: both before the run can finish.
            target_write = chooser.random() < 0.5
            delay = chooser.uniform(0.0, 0.5)
            checkpoints = output / "checkpoints"
            done_before = {p.name for p in checkpoints.glob("checkpoint-*.ckpt")}
            new_since = None
            while process.poll() is None and not (output / "model_index.json").exists():
                names = {p.name for p in checkpoints.iterdir()} if checkpoints.is_dir() else set()
                writing = any(name.endswith(".tmp") for name in names)
                if new_since is None and {n for n in names if n.endswith(".ckpt")} - done_before:
                    new_since = time.monotonic()
                if (target_write and writing) or (
                        not target_write and new_since is not None
                        and time.monotonic() - new_since > delay):
                    os.kill(process.pid, signal.SIGKILL)
                    kills += 1
                    during_write += writing
                    break
                time.sleep(0.002)
        process.wait()
    reference, resumed = weights(root / "reference"), weights(output)
    identical = all((reference[k] == resumed[k]).all().item() for k in reference)
    leftovers = [p.name for p in (output / "checkpoints").iterdir() if p.suffix == ".tmp"]
    result = {"kills": kills, "kills_during_checkpoint_write": during_write, "runs": runs,
              "steps": args.steps, "bit_identical": identical, "temp_files_left": leftovers,
              "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(result, indent=2))
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if identical and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
