"""Quality of a base model of the procedural world on caption combinations it never trained on.

Every held-out (class, color, background) combination of `dreambooth.world` is generated with
`--images_per_prompt` seeds; the shipped world evaluator judges each image. Prints the share of
images with the asked class, color and background (each, and all three: the issue's >= 90%
target), the VAE's reconstruction PSNR from the model's pretraining report, and writes a grid.

Usage:
    python benchmarks/world_model_quality.py                 # the bundled model, `demo`
    python benchmarks/world_model_quality.py --model runs/world-model/model
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=3.0,
                        help="The world model's own scale (models.WORLD_MODEL_GUIDANCE_SCALE).")
    parser.add_argument("--grid", default=None, help="Where to save the grid of every image.")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/).")
    args = parser.parse_args()

    import torch

    from dreambooth.models import resolve_model_path
    from dreambooth.world.dreambench import held_out_quality

    started = time.perf_counter()
    quality = held_out_quality(args.model, images_per_prompt=args.images_per_prompt,
                               num_inference_steps=args.num_inference_steps,
                               guidance_scale=args.guidance_scale, grid_path=args.grid)
    elapsed = time.perf_counter() - started
    folder = resolve_model_path(args.model)
    vae_report = folder / "vae" / "report.json"
    report = {"model": args.model, "settings": vars(args), "held_out": quality,
              "vae": json.loads(vae_report.read_text()) if vae_report.is_file() else None,
              "seconds": round(elapsed, 1),
              "machine": {"processor": platform.processor() or platform.machine(),
                          "threads": torch.get_num_threads()}}
    print(f"held-out combinations: {quality['num_prompts']} x {args.images_per_prompt} images")
    for key in ("cls", "color", "background", "all"):
        print(f"  {key:<10} {quality[key]:.3f}")
    if report["vae"]:
        print(f"VAE reconstruction PSNR {report['vae']['psnr_db']:.2f} dB")
    output = Path(args.output or Path(__file__).parent / "results" /
                  f"world_model_quality-{platform.node()}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
