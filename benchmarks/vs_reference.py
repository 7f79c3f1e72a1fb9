#!/usr/bin/env python
"""`dreambooth train` against diffusers' reference `train_dreambooth.py`, same work, same flags.

diffusers publishes the reference trainer with its examples (examples/dreambooth/); it is not
part of this repository. Give its path and a Python that can run it (it needs accelerate and
torchvision, which this project does not depend on):

    .venv/bin/python benchmarks/vs_reference.py \\
        --reference ~/diffusers/examples/dreambooth/train_dreambooth.py \\
        --reference-python ~/refvenv/bin/python --runs 3 --steps 150

What runs: one random-weight SD-1.x-architecture model (UNet blocks 64/128/128, 64 px, CLIP
text encoder 128 wide x 3 layers, the tiny VAE of `dreambooth.tiny`), 4 instance photos, 8
class images already in the class folder (so neither trainer generates any), and for both
trainers the identical command line: prior preservation, batch 1 instance + 1 class image,
text encoder trained, constant learning rate, seed 0, default logging (TensorBoard), no
checkpoint during the run, the final model saved. After one warm-up run of each, the two run
in turn `--runs` times.

How it is timed: each trainer runs in a fresh process through a small wrapper that registers
torch's global optimizer-step hook and stamps `time.perf_counter()` after every optimizer
step, so both are timed at the same point of the same operation. Per run:
- step time: the median of the step-to-step intervals after the first 10 steps;
- start-up: process start (just before `exec`) to the end of the first optimizer step;
- wall: process start to exit (includes saving the model);
- peak memory: the process's peak resident set size (ru_maxrss).
Each figure is the median over runs; the ratios are ours / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SKIPPED_STEPS = 10  # the first steps warm up allocator and caches

# The wrapper a trainer runs under: the same clock for both, at the optimizer step.
WRAPPER = r"""
import atexit, json, resource, runpy, sys, time
import torch.optim.optimizer as optimizer_module

stamps = []
optimizer_module.register_optimizer_step_post_hook(
    lambda optimizer, args, kwargs: stamps.append(time.perf_counter()))

def report():
    with open(REPORT, "w") as file:
        json.dump({"stamps": stamps, "exit": time.perf_counter(),
                   "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
                  file)

REPORT = sys.argv[1]
atexit.register(report)
target = sys.argv[2]
if target == "-m":
    sys.argv = [sys.argv[3]] + sys.argv[4:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = [target] + sys.argv[3:]
    runpy.run_path(target, run_name="__main__")
"""


def build_model(folder: Path) -> Path:
    """The issue's model: tiny-pipeline SD 1.x layout, UNet 64/128/128, text encoder 128 x 3."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth.tiny import build_tiny_pipeline

    pipeline = build_tiny_pipeline(sample_size=64, block_channels=(64, 128, 128))
    tokenizer = pipeline.tokenizer
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=128,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_config({**pipeline.unet.config, "cross_attention_dim": 128})
    pipeline.register_modules(text_encoder=text_encoder, unet=unet)
    pipeline.save_pretrained(folder)
    return folder


def write_images(folder: Path, count: int, size: int, seed: int) -> Path:
    """`count` size x size PNGs of coloured shapes (content does not change the speed)."""
    import random

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x, y = rng.randrange(size // 2), rng.randrange(size // 2)
            draw.ellipse([x, y, x + size // 2, y + size // 2],
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        image.save(folder / f"image-{index}.png")
    return folder


def training_flags(work: Path, output: Path, steps: int) -> list[str]:
    """diffusers' flags, given unchanged to both trainers."""
    return [
        "--pretrained_model_name_or_path", str(work / "model"),
        "--instance_data_dir", str(work / "instance"), "--instance_prompt", "a photo of sks dog",
        "--with_prior_preservation", "--class_data_dir", str(work / "class"),
        "--class_prompt", "a photo of dog", "--num_class_images", "8",
        "--resolution", "64", "--train_batch_size", "1", "--train_text_encoder",
        "--learning_rate", "5e-6", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps), "--checkpointing_steps", str(steps + 1000),
        "--seed", "0", "--output_dir", str(output),
    ]


def run_once(name: str, command: list[str], work: Path, steps: int, env: dict) -> dict:
    output = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    report = output.parent / f"{output.name}.json"
    full = command[:1] + [str(work / "wrapper.py"), str(report)] + command[1:]
    full += training_flags(work, output, steps)
    started = time.perf_counter()
    process = subprocess.run(full, env=env, capture_output=True, text=True)
    ended = time.perf_counter()
    if process.returncode != 0:
        raise SystemExit(f"{name} failed (exit {process.returncode}):\n{process.stderr[-3000:]}")
    data = json.loads(report.read_text())
    stamps = data["stamps"]
    if len(stamps) != steps:
        raise SystemExit(f"{name}: saw {len(stamps)} optimizer steps, expected {steps}")
    intervals = [b - a for a, b in zip(stamps[SKIPPED_STEPS:], stamps[SKIPPED_STEPS + 1:])]
    # perf_counter is CLOCK_MONOTONIC on Linux: the child's stamps share the parent's clock.
    return {"step_s": statistics.median(intervals), "startup_s": stamps[0] - started,
            "wall_s": ended - started, "peak_rss_mib": data["peak_rss_mib"],
            "intervals": intervals}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True,
                        help="path of diffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="a Python that runs it (with accelerate and torchvision)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if not args.reference.is_file():
        parser.error(f"--reference {args.reference}: no such file")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vs-reference-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "wrapper.py").write_text(WRAPPER)
    if not (work / "model").exists():
        build_model(work / "model")
        write_images(work / "instance", 4, 64, seed=0)
        write_images(work / "class", 8, 64, seed=1)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"}
    trainers = {
        "dreambooth": [sys.executable, "-m", "dreambooth", "train"],
        "reference": [args.reference_python, str(args.reference.resolve())],
    }
    for name, command in trainers.items():  # warm-up: file caches, compiled bytecode
        run_once(name, command, work, min(args.steps, 20), env)
    results: dict[str, list[dict]] = {name: [] for name in trainers}
    for run in range(args.runs):
        for name, command in trainers.items():
            result = run_once(name, command, work, args.steps, env)
            results[name].append(result)
            print(f"run {run + 1} {name:10s} step {result['step_s'] * 1000:6.1f} ms  "
                  f"start-up {result['startup_s']:5.1f} s  wall {result['wall_s']:5.1f} s  "
                  f"peak RSS {result['peak_rss_mib']:6.0f} MiB", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"\nmedians over {args.runs} runs of {args.steps} steps "
          f"(torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}):")
    print("| figure | dreambooth | reference | ratio |\n|---|---|---|---|")
    summary = {}
    for key, label, scale, unit in (("step_s", "step time", 1000, "ms"),
                                    ("startup_s", "start-up", 1, "s"),
                                    ("wall_s", "wall time", 1, "s"),
                                    ("peak_rss_mib", "peak RSS", 1, "MiB")):
        ours, theirs = median("dreambooth", key), median("reference", key)
        summary[key] = {"dreambooth": ours, "reference": theirs, "ratio": ours / theirs}
        print(f"| {label} | {ours * scale:.1f} {unit} | {theirs * scale:.1f} {unit} "
              f"| {ours / theirs:.2f}x |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vs_reference.json").write_text(json.dumps(
        {"steps": args.steps, "runs": args.runs, "summary": summary, "results": results},
        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
