"""DreamBench-mini: every subject of the procedural world, with and without prior preservation.

For each subject: its photos -> DreamBooth (full fine-tune, the demo's settings,
`world.demo.DemoSettings`: 400 steps, batch 2, UNet learning rate 5e-5, text encoder trained at
7e-5, prior preservation with 50 class images) on the base model -> the subject's
DreamBench-style prompts -> the world evaluator's metrics: subject fidelity ~ DINO, prompt
fidelity ~ CLIP-T, PRES and DIV (the paper's Tables 1 and 3), with real photos, the ceiling and
the base model as references. Prints one table of means over the subjects and one per subject,
and writes every figure as JSON.

Subject fidelity is also given per kind of prompt (recontextualization "a sks ball on the
grass", property modification "a red sks ball") beside its ceiling: every prompt rendered as a
perfect model would draw it, through the VAE (`world.dreambench.prompt_set_ceiling`). Settings
are chosen on the 6 DreamBench-mini subjects; `--subject_set held_out` scores the 8 subjects of
`world.held_out_subjects`, which no setting was chosen on.

Usage:
    python benchmarks/dreambench_mini.py                        # the bundled world model, `demo`
    python benchmarks/dreambench_mini.py --arms with_prior --seeds 0 1 2 --steps 800
    python benchmarks/dreambench_mini.py --subject_set held_out --arms with_prior --seeds 0 1 2
    python benchmarks/dreambench_mini.py --merge a.json b.json  # runs side by side, one table
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
    from dreambooth.world import (
        SUBJECTS,
        class_prompt,
        dreambench_prompts,
        held_out_subjects,
        photo_captions,
        photos,
    )
    from dreambooth.world.dreambench import evaluate_model, subject_ceilings
    from dreambooth.world.evaluator import load_evaluator
    from dreambooth.world.metrics import subject_fidelity

    work = Path(tempfile.mkdtemp(prefix="dreambench-mini-"))
    try:
        if args.base_model == "tiny":
            base = save_tiny_pipeline(work / "tiny-base", sample_size=args.resolution)
        else:
            base = resolve_model_path(args.base_model)
        pool = held_out_subjects() if args.subject_set == "held_out" else list(SUBJECTS.values())
        subjects = pool[args.first_subject:args.subjects]
        results = []
        evaluator = load_evaluator()
        for subject in subjects:
            photo_dir = work / subject.name / "photos"
            photo_dir.mkdir(parents=True)
            subject_photos = photos(subject, n=5)
            for index, photo in enumerate(subject_photos):
                photo.save(photo_dir / f"{index}.png")
            if args.captions:  # "a sks ball on the grass": the photo's background named
                for index, text in enumerate(photo_captions(subject, n=5)):
                    (photo_dir / f"{index}.txt").write_text(text + "\n")
            # Real-photo reference row: new photos of the subject vs the training photos.
            held_out = photos(subject, n=5, seed=seeding.HELD_OUT_PHOTOS)
            prompts = dreambench_prompts(subject)[:args.prompts]
            base_pipeline = load_pipeline(base, device=args.device)
            row = {"subject": subject.name, "class": subject.cls,
                   "real_subject_fidelity": subject_fidelity(held_out, subject_photos, evaluator),
                   # the photos, and what each prompt asks, through the base model's VAE
                   **subject_ceilings(base_pipeline.vae, subject, subject_photos, prompts,
                                      evaluator=evaluator)}
            if args.base_eval:
                row["base"] = asdict(evaluate_model(
                    base_pipeline, photo_dir, identifier="sks", class_noun=subject.cls,
                    prompts=prompts, output_dir=work / subject.name / "base",
                    images_per_prompt=args.images_per_prompt,
                    num_inference_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                    device=args.device))
            for seed in args.seeds:
                for label in args.arms:
                    started = time.perf_counter()
                    output = train(parse_train_config({
                        "pretrained_model_name_or_path": str(base),
                        "instance_data_dir": str(photo_dir),
                        "instance_prompt": f"a sks {subject.cls}",
                        "with_prior_preservation": label == "with_prior",
                        "prior_loss_weight": args.prior_loss_weight,
                        "class_prompt": class_prompt(subject),
                        # one class-image set per subject, drawn once (at the first seed)
                        "class_data_dir": str(work / subject.name / "class"),
                        "num_class_images": args.class_images,
                        "class_inference_steps": args.sample_steps,
                        "resolution": args.resolution, "train_batch_size": args.train_batch_size,
                        "max_train_steps": args.steps, "learning_rate": args.learning_rate,
                        "text_encoder_lr": args.text_encoder_lr,
                        "lr_scheduler": args.lr_scheduler,
                        "lr_warmup_steps": 0, "train_text_encoder": args.train_text_encoder,
                        "class_guidance_scale": args.guidance_scale, "seed": seed,
                        "checkpointing_steps": args.steps + 1, "report_to": "none",
                        "accelerator": "auto" if args.device is None else args.device.split(":")[0]
                        .replace("cuda", "gpu"),
                        "output_dir": str(work / subject.name / f"{label}-{seed}"),
                    }))
                    train_s = time.perf_counter() - started
                    # the same evaluation seeds for every training seed: the spread over seeds
                    # is the training run's
                    evaluation = evaluate_model(
                        load_pipeline(output, device=args.device), photo_dir, identifier="sks",
                        class_noun=subject.cls, prompts=prompts,
                        output_dir=work / subject.name / f"{label}-{seed}-eval",
                        images_per_prompt=args.images_per_prompt,
                        num_inference_steps=args.sample_steps, guidance_scale=args.guidance_scale,
                        device=args.device)
                    row.setdefault(label, {})[str(seed)] = {**asdict(evaluation),
                                                            "train_s": train_s}
                    if args.grids:  # the report and its grids, to look at
                        shutil.copytree(work / subject.name / f"{label}-{seed}-eval",
                                        Path(args.grids) / subject.name / f"{label}-{seed}",
                                        dirs_exist_ok=True)
                    shutil.rmtree(output, ignore_errors=True)
            results.append(row)
            print(json.dumps(row), flush=True)
        return {"base_model": str(args.base_model), "settings": vars(args), "subjects": results,
                "machine": {"python": platform.python_version(), "processor": platform.processor(),
                            "node": platform.node()}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


METRICS = (("subject_fidelity", "SF"), ("recontextualization_subject_fidelity", "SF recontext"),
           ("property_subject_fidelity", "SF recolor"), ("prompt_fidelity", "PF"),
           ("recontextualization_prompt_fidelity", "PF recontext"),
           ("property_prompt_fidelity", "PF recolor"),
           ("pres", "PRES"), ("div", "DIV"))


def mean_or_none(values) -> float | None:
    """The mean, or None if any value is None (a prompt set without that kind of prompt)."""
    values = list(values)
    return None if any(value is None for value in values) else mean(values)


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def seed_means(report: dict, label: str, key: str) -> list[float | None]:
    """The mean over subjects of `key`, one value per training seed."""
    rows = report["subjects"]
    seeds = rows[0][label].keys()
    return [mean_or_none(row[label][seed].get(key) for row in rows) for seed in seeds]


def spread(values: list[float | None]) -> str:
    """'mean [min, max]' over seeds, or the one value."""
    if len(values) == 1 or None in values:
        return number(mean_or_none(values))
    return f"{mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def tables(report: dict) -> str:
    rows = report["subjects"]
    arms = [label for label in ("with_prior", "without_prior") if label in rows[0]]
    header = "| | " + " | ".join(name for _, name in METRICS) + " |"
    lines = [f"Mean of {len(rows)} subjects; several training seeds: mean [min, max] over seeds",
             header, "|---" * (len(METRICS) + 1) + "|"]
    lines.append("| real photos | " + f"{mean(r['real_subject_fidelity'] for r in rows):.3f}"
                 + " |" * len(METRICS))
    ceiling = [mean_or_none(r["ceiling"][key] for r in rows) if key in rows[0]["ceiling"]
               else None for key, _ in METRICS]
    lines.append("| ceiling (each prompt rendered, through the VAE) | " + " | ".join(
        number(value) for value in ceiling) + " |")
    if "base" in rows[0]:
        lines.append("| base model | " + " | ".join(
            number(mean_or_none(r['base'].get(key) for r in rows)) for key, _ in METRICS) + " |")
    for label in arms:
        lines.append(f"| DreamBooth {label.replace('_', ' ')} | " + " | ".join(
            spread(seed_means(report, label, key)) for key, _ in METRICS) + " |")
    lines += ["", "Per subject (mean over seeds): SF / SF recontext / SF recolor / PF",
              "| subject | ceiling | " + " | ".join(arms) + " |", "|---" * (len(arms) + 2) + "|"]
    for row in rows:
        cells = [" / ".join(number(row["ceiling"][key]) for key in (
            "subject_fidelity", "recontextualization_subject_fidelity",
            "property_subject_fidelity"))]
        for label in arms:
            runs = row[label].values()
            cells.append(" / ".join(number(mean_or_none(run.get(key) for run in runs)) for key in (
                "subject_fidelity", "recontextualization_subject_fidelity",
                "property_subject_fidelity", "prompt_fidelity")))
        lines.append(f"| {row['subject']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(reports: list[dict]) -> dict:
    """One report from runs of the same settings on other seeds, arms or subjects of the set
    (e.g. processes side by side, one seed each)."""
    merged = json.loads(json.dumps(reports[0]))
    by_name = {row["subject"]: row for row in merged["subjects"]}
    for report in reports[1:]:
        for row in report["subjects"]:
            if row["subject"] not in by_name:  # a run of the set's other subjects
                by_name[row["subject"]] = row
                merged["subjects"].append(row)
                continue
            target = by_name[row["subject"]]
            for key in ("base", "ceiling"):
                if key in row and key not in target:
                    target[key] = row[key]
            for label in ("with_prior", "without_prior"):
                if label in row:
                    target.setdefault(label, {}).update(row[label])
    seeds = sorted({int(seed) for row in merged["subjects"] for label in ("with_prior",
                    "without_prior") for seed in row.get(label, {})})
    merged["settings"]["seeds"] = seeds
    return merged


def main() -> None:
    from dreambooth.world.demo import DemoSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base_model", default="demo",
                        help="A world model ('demo': the bundled one), or 'tiny' for a smoke run.")
    parser.add_argument("--subject_set", choices=("dreambench", "held_out"),
                        default="dreambench",
                        help="DreamBench-mini's 6 subjects (settings are chosen on these) or the "
                        "8 held-out ones (world.held_out_subjects: never used to choose).")
    parser.add_argument("--subjects", type=int, default=8,
                        help="Use the set's subjects before this index (default: all).")
    parser.add_argument("--first_subject", type=int, default=0,
                        help="Skip the set's first N subjects (to split a run in two).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="Training seeds; figures are given as the mean and range over them.")
    parser.add_argument("--arms", nargs="+", choices=("with_prior", "without_prior"),
                        default=["with_prior", "without_prior"])
    parser.add_argument("--base_eval", action=argparse.BooleanOptionalAction, default=True,
                        help="Also evaluate the untrained base model.")
    recipe = DemoSettings()  # the demo's recipe is the default of every training flag
    parser.add_argument("--steps", type=int, default=recipe.max_train_steps,
                        help="DreamBooth steps per run.")
    parser.add_argument("--learning_rate", type=float, default=recipe.learning_rate)
    parser.add_argument("--text_encoder_lr", type=float, default=recipe.text_encoder_lr,
                        help="The text encoder's learning rate (the demo's by default).")
    parser.add_argument("--lr_scheduler", default="constant")
    parser.add_argument("--prior_loss_weight", type=float, default=recipe.prior_loss_weight)
    parser.add_argument("--captions", action="store_true",
                        help="A caption per photo naming its background (world.photo_captions) "
                        "instead of the one instance prompt.")
    parser.add_argument("--train_batch_size", type=int, default=recipe.train_batch_size)
    parser.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction,
                        default=recipe.train_text_encoder)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--class_images", type=int, default=recipe.num_class_images)
    parser.add_argument("--prompts", type=int, default=25, help="Prompts per subject (max ~17).")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--sample_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=3.0,
                        help="The world model's own scale (models.WORLD_MODEL_GUIDANCE_SCALE).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="Smoke settings: 1 subject, 3 prompts, 2 images, 4 class images.")
    parser.add_argument("--grids", default=None,
                        help="Keep each evaluation's report.html and grids under this folder.")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/).")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="Print the tables of these result files merged (the same settings; "
                        "other seeds, arms or subjects) and write them to --output; trains "
                        "nothing.")
    args = parser.parse_args()
    if args.merge:
        report = merge([json.loads(Path(path).read_text()) for path in args.merge])
        text = tables(report)
        print(text)
        if args.output:
            Path(args.output).write_text(json.dumps({**report, "tables": text}, indent=2) + "\n")
        return
    if args.quick:
        args.subjects, args.prompts, args.images_per_prompt = 1, 3, 2
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
