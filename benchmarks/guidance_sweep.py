"""Which classifier-free guidance scale a world model samples best at, chosen without held-out data.

For each scale: the share of images with every asked attribute (class, color, background) on
`--training_combinations` caption combinations the model trained on (a fixed random sample of
`world.TRAIN_COMBINATIONS`: what the scale is picked on) and on every held-out combination (what
it is then reported on), `--images_per_prompt` seeds each. `models.WORLD_MODEL_GUIDANCE_SCALE`
was picked with this script (BENCHMARKS.md, "The world model").

Usage:
    python benchmarks/guidance_sweep.py                                  # the bundled model
    python benchmarks/guidance_sweep.py --model runs/world-model/model --scales 2 3 4
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2, 2.5, 3, 3.5, 4, 5])
    parser.add_argument("--training_combinations", type=int, default=30)
    parser.add_argument("--images_per_prompt", type=int, default=2)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/).")
    args = parser.parse_args()

    import torch

    from dreambooth import seeding
    from dreambooth.models import load_pipeline
    from dreambooth.world import TRAIN_COMBINATIONS, Scene, caption
    from dreambooth.world.dreambench import held_out_quality

    sampler = random.Random(seeding.GUIDANCE_SWEEP_CAPTIONS)  # which combinations are scored
    training = [caption(Scene(*triple)) for triple in sampler.sample(
        sorted(TRAIN_COMBINATIONS), args.training_combinations)]
    pipeline = load_pipeline(args.model)
    started = time.perf_counter()
    rows = []
    for scale in args.scales:
        settings = dict(images_per_prompt=args.images_per_prompt, guidance_scale=scale,
                        num_inference_steps=args.num_inference_steps)
        row = {"guidance_scale": scale,
               "training": held_out_quality(pipeline, captions=training, **settings),
               "held_out": held_out_quality(pipeline, **settings)}
        rows.append(row)
        print(f"guidance {scale:<4g} all three right: training combinations "
              f"{row['training']['all']:.3f}, held-out {row['held_out']['all']:.3f}", flush=True)
    best = max(rows, key=lambda row: row["training"]["all"])
    print(f"best on training combinations: guidance {best['guidance_scale']:g} "
          f"(held-out {best['held_out']['all']:.3f})")
    report = {"model": args.model, "settings": vars(args), "rows": rows,
              "best_on_training": best["guidance_scale"],
              "seconds": round(time.perf_counter() - started, 1),
              "machine": {"processor": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads()}}
    output = Path(args.output or Path(__file__).parent / "results" /
                  f"guidance_sweep-{platform.node()}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
