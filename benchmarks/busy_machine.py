#!/usr/bin/env python
"""How sampling and the demo slow down when other processes compete for the cores.

`--job sampling` times the bundled world model (`demo`) generating 8 images (10 steps, batch 4,
guidance 3, as class-image generation does) in a fresh process; `--job demo` times the whole
`dreambooth demo` (class images, training, evaluation) as a user runs it. Each runs idle and
beside N processes that loop on the CPU, per thread setting:
- "adaptive": this tool's default (dreambooth.cpu: one torch thread per core other processes
  leave idle; training measures once at its start, sampling before every batch);
- "spinning": torch's own default, one thread per core whatever the load (OMP_NUM_THREADS set
  to the core count, which also turns the adaptation off);
- "passive": the same with OMP_WAIT_POLICY=PASSIVE (waiting threads sleep);
- "one thread": OMP_NUM_THREADS=1.
Run it on an otherwise idle machine:

    .venv/bin/python benchmarks/busy_machine.py --job sampling --loads 0 1 4 --repeats 3
    .venv/bin/python benchmarks/busy_machine.py --job demo --loads 0 1 --settings adaptive spinning
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
CORES = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
SETTINGS = {  # name: environment of the measured process
    "adaptive": {},
    "spinning": {"OMP_NUM_THREADS": CORES},
    "passive": {"OMP_NUM_THREADS": CORES, "OMP_WAIT_POLICY": "PASSIVE"},
    "one thread": {"OMP_NUM_THREADS": "1"},
}
SAMPLING = """
import time
from dreambooth.generate import sample_images
from dreambooth.models import load_pipeline
pipeline = load_pipeline("demo", device="cpu")
sample_images(pipeline, "a ball", seeds=[0, 1], num_inference_steps=2, guidance_scale=3)
start = time.perf_counter()
sample_images(pipeline, "a ball", seeds=list(range(8)), num_inference_steps=10,
              guidance_scale=3, batch_size=4)
print(time.perf_counter() - start)
"""


def measure(job: str, setting: str, load: int) -> float:
    environment = {**os.environ, **SETTINGS[setting]}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        if job == "sampling":
            done = subprocess.run([sys.executable, "-c", SAMPLING], check=True,
                                  capture_output=True, text=True, env=environment)
            return float(done.stdout.split()[-1])
        with tempfile.TemporaryDirectory() as output:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dreambooth", "demo", "--output_dir", output],
                           check=True, capture_output=True, env=environment)
            return time.perf_counter() - start
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=["sampling", "demo"], default="sampling")
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 4],
                        help="Busy processes beside the measured one.")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3, help="Runs per cell (median kept).")
    parser.add_argument("--output", default=None,
                        help="JSON file (default: benchmarks/results/busy_machine-JOB.json)")
    args = parser.parse_args()
    args.output = args.output or str(REPO / f"benchmarks/results/busy_machine-{args.job}.json")
    results = {}
    for load in args.loads:
        for setting in args.settings:
            times = [measure(args.job, setting, load) for _ in range(args.repeats)]
            results[f"{setting}, {load} busy"] = round(statistics.median(times), 2)
            print(f"{setting:>10}, {load} busy: {statistics.median(times):6.2f} s  "
                  f"({', '.join(f'{t:.2f}' for t in times)})", flush=True)
    report = {"job": args.job, "cores": os.cpu_count(), "seconds (median)": results}
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
