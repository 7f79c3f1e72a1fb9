"""DreamBench-mini: every subject of the procedural world, with and without prior preservation.

For each subject: its photos -> DreamBooth (full fine-tune, the demo's settings: 400 steps,
batch 2, learning rate 5e-5, text encoder trained) on the base model -> the subject's
DreamBench-style prompts -> the world evaluator's metrics. Prints tables in the shape of the
paper's Table 1 (subject fidelity ~ DINO, prompt fidelity ~ CLIP-T; real photos, the photos
encoded and decoded by the base model's VAE (the most any generation of it can show) and the
base model as references) and Table 3 (PRES, DIV, subject fidelity with and without the prior
loss), and writes every figure as JSON.

Usage:
    python benchmarks/dreambench_mini.py                        # the bundled world model, `demo`
    python benchmarks/dreambench_mini.py --base_model runs/world-model/model
    python benchmarks/dreambench_mini.py --base_model tiny --steps 4 --quick   # smoke run only

`--base_model tiny` builds a tiny random pipeline: it checks that the benchmark runs, its
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from statistics import mean


def run(args) -> dict:
    from dreambooth import seeding
    from dreambooth.config import parse_train_config
    from dreambooth.models import load_pipeline, resolve_model_path
    from dreambooth.tiny import save_tiny_pipeline
    from dreambooth.train.run import train
    from dreambooth.world import SUBJECTS, class_prompt, dreambench_prompts, photos
    from dreambooth.world.dreambench import evaluate_model, vae_round_trip
    from dreambooth.world.evaluator import load_evaluator
    from dreambooth.world.metrics import subject_fidelity

    work = Path(tempfile.mkdtemp(prefix="dreambench-mini-"))
    try:
        if args.base_model == "tiny":
            base = save_tiny_pipeline(work / "tiny-base", sample_size=args.resolution)
        else:
            base = resolve_model_path(args.base_model)
        subjects = list(SUBJECTS.values())[:args.subjects]
        results = []
        evaluator = load_evaluator()
        for subject in subjects:
            photo_dir = work / subject.name / "photos"
            photo_dir.mkdir(parents=True)
            subject_photos = photos(subject, n=5)
            for index, photo in enumerate(subject_photos):
                photo.save(photo_dir / f"{index}.png")
            # Real-photo reference row: new photos of the subject vs the training photos.
            held_out = photos(subject, n=5, seed=seeding.HELD_OUT_PHOTOS)
            prompts = dreambench_prompts(subject)[:args.prompts]
            base_pipeline = load_pipeline(base, device=args.device)
            round_trip = vae_round_trip(base_pipeline.vae, subject_photos)
            row = {"subject": subject.name, "class": subject.cls,
                   "real_subject_fidelity": subject_fidelity(held_out, subject_photos, evaluator),
                   # the photos through the base model's VAE: the ceiling of what it can draw
                   "vae_subject_fidelity": subject_fidelity(round_trip, subject_photos,
                                                            evaluator)}
            base_eval = evaluate_model(
                base_pipeline, photo_dir, identifier="sks",
                class_noun=subject.cls, prompts=prompts, output_dir=work / subject.name / "base",
                images_per_prompt=args.images_per_prompt, num_inference_steps=args.sample_steps,
                guidance_scale=args.guidance_scale, device=args.device)
            row["base"] = asdict(base_eval)
            for prior in (True, False):
                label = "with_prior" if prior else "without_prior"
                started = time.perf_counter()
                output = train(parse_train_config({
                    "pretrained_model_name_or_path": str(base),
                    "instance_data_dir": str(photo_dir),
                    "instance_prompt": f"a sks {subject.cls}",
                    "with_prior_preservation": prior, "class_prompt": class_prompt(subject),
                    "class_data_dir": str(work / subject.name / "class"),
                    "num_class_images": args.class_images,
                    "class_inference_steps": args.sample_steps,
                    "resolution": args.resolution, "train_batch_size": args.train_batch_size,
                    "max_train_steps": args.steps, "learning_rate": args.learning_rate,
                    "lr_warmup_steps": 0, "train_text_encoder": args.train_text_encoder,
                    "class_guidance_scale": args.guidance_scale, "seed": 0,
                    "checkpointing_steps": args.steps + 1, "report_to": "none",
                    "accelerator": "auto" if args.device is None else args.device.split(":")[0]
                    .replace("cuda", "gpu"),
                    "output_dir": str(work / subject.name / label),
                }))
                train_s = time.perf_counter() - started
                evaluation = evaluate_model(
                    load_pipeline(output, device=args.device), photo_dir, identifier="sks",
                    class_noun=subject.cls, prompts=prompts,
                    output_dir=work / subject.name / f"{label}-eval",
                    images_per_prompt=args.images_per_prompt,
                    num_inference_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                    device=args.device)
                row[label] = {**asdict(evaluation), "train_s": train_s}
                shutil.rmtree(output, ignore_errors=True)
            results.append(row)
            print(json.dumps(row), flush=True)
        return {"base_model": str(args.base_model), "settings": vars(args), "subjects": results,
                "machine": {"python": platform.python_version(), "processor": platform.processor(),
                            "node": platform.node()}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def tables(report: dict) -> str:
    rows = report["subjects"]

    def avg(path: tuple[str, ...]) -> float:
        values = []
        for row in rows:
            value = row
            for key in path:
                value = value[key]
            values.append(value)
        return mean(values)

    table1 = ["| method | subject fidelity (DINO-like) | prompt fidelity (CLIP-T-like) |",
              "|---|---|---|",
              f"| real photos | {avg(('real_subject_fidelity',)):.3f} | - |",
              f"| photos through the base model's VAE (ceiling) | "
              f"{avg(('vae_subject_fidelity',)):.3f} | - |",
              f"| base model (no training) | {avg(('base', 'subject_fidelity')):.3f} | "
              f"{avg(('base', 'prompt_fidelity')):.3f} |",
              f"| DreamBooth (ours, with prior) | {avg(('with_prior', 'subject_fidelity')):.3f} | "
              f"{avg(('with_prior', 'prompt_fidelity')):.3f} |"]
    table3 = ["| method | PRES (lower is better) | DIV (higher is better) | subject fidelity |",
              "|---|---|---|---|"]
    for label, name in (("with_prior", "with prior preservation"),
                        ("without_prior", "without prior preservation")):
        table3.append(f"| {name} | {avg((label, 'pres')):.3f} | {avg((label, 'div')):.3f} | "
                      f"{avg((label, 'subject_fidelity')):.3f} |")
    return "\n".join(["Table 1 (shape of the paper's)", *table1, "",
                      "Table 3 (shape of the paper's)", *table3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="demo",
                        help="A world model ('demo': the bundled one), or 'tiny' for a smoke run.")
    parser.add_argument("--subjects", type=int, default=6, help="How many subjects (max 6).")
    parser.add_argument("--steps", type=int, default=400, help="DreamBooth steps per run.")
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--class_images", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=25, help="Prompts per subject (max ~17).")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--sample_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=3.0,
                        help="The world model's own scale (models.WORLD_MODEL_GUIDANCE_SCALE).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="Smoke settings: 1 subject, 2 prompts, 2 images, 4 class images.")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/).")
    args = parser.parse_args()
    if args.quick:
        args.subjects, args.prompts, args.images_per_prompt = 1, 2, 2
        args.class_images, args.sample_steps = 4, 2
        if args.base_model == "tiny":
            args.resolution = 32
    report = run(args)
    text = tables(report)
    print(text)
    output = Path(args.output or Path(__file__).parent / "results" /
                  f"dreambench_mini-{platform.node()}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({**report, "tables": text}, indent=2) + "\n")
    print(f"results written to {output}")


if __name__ == "__main__":
    main()
