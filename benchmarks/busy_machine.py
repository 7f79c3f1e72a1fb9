#!/usr/bin/env python
"""How sampling slows down when other processes compete for the cores, per thread setting.

Times the bundled world model (`demo`) generating 8 images (10 steps, batch 4, guidance 3, as
class-image generation does) in a fresh process, idle and beside N busy-looping processes, for
torch's default (one intra-op thread per core, OpenMP threads spinning while they wait),
OMP_WAIT_POLICY=PASSIVE (waiting threads sleep) and one thread. The measurements behind the
busy-machine part of the speed issue; run it on an otherwise idle machine.

    .venv/bin/python benchmarks/busy_machine.py --loads 0 1 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {  # name: (environment, torch threads or 0 for torch's default)
    "default": ({}, 0),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, 0),
    "one thread": ({}, 1),
}
CHILD = """
import sys, time, torch
threads = int(sys.argv[1])
if threads:
    torch.set_num_threads(threads)
from dreambooth.generate import sample_images
from dreambooth.models import load_pipeline
pipeline = load_pipeline("demo", device="cpu")
sample_images(pipeline, "a ball", seeds=[0, 1], num_inference_steps=2, guidance_scale=3)
start = time.perf_counter()
sample_images(pipeline, "a ball", seeds=list(range(8)), num_inference_steps=10,
              guidance_scale=3, batch_size=4)
print(time.perf_counter() - start)
"""


def measure(setting: str, load: int) -> float:
    environment, threads = SETTINGS[setting]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(threads)], check=True,
                              capture_output=True, text=True, env={**os.environ, **environment})
        return float(done.stdout.split()[-1])
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 4],
                        help="Busy processes beside the measured one.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per cell (median kept).")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/busy_machine.json"))
    args = parser.parse_args()
    results = {}
    for load in args.loads:
        for setting in SETTINGS:
            times = [measure(setting, load) for _ in range(args.repeats)]
            results[f"{setting}, {load} busy"] = round(statistics.median(times), 2)
            print(f"{setting:>10}, {load} busy: {statistics.median(times):6.2f} s  "
                  f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    report = {"cores": os.cpu_count(), "seconds (median)": results}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
