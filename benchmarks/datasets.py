#!/usr/bin/env python
"""Real-dataset features measured on the procedural world: several concepts, aspect buckets,
captions, masks and EMA (the five measurements of the "Real datasets" issue).

Every run fine-tunes the bundled world model (`demo`) with one fixed recipe (full fine-tune,
text encoder trained, batch 2, learning rate 5e-5 for the UNet and the text encoder, prior
preservation with 50 class images, `--steps` steps per subject; the demo's recipe until its
text encoder's rate went to 7e-5, kept so that the figures in BENCHMARKS.md stay comparable)
and scores generations with the world evaluator (see `dreambooth.world.metrics`): subject
fidelity against the subject's photos, prompt fidelity (everything the prompt asks drawn), and
for recontextualization prompts ("a sks ball on the grass") the share of images whose
background is the asked one.

1. concepts: 3 DreamBench-mini subjects, each with its own identifier, in one model (3 x steps)
   vs each alone (steps each); identity bleed = subject A's prompts in the joint model scored
   against subject B's photos, minus the same score for the base model (max over pairs).
2. buckets: a wide subject (`WIDE_SUBJECT`, 4:1) photographed in 96x64 frames, trained with
   square center crops, square random crops (the default) and `--aspect_buckets` (80x48
   buckets); fidelity against photos that show it whole; grids saved.
3. captions: per-photo captions naming each photo's background vs the one instance prompt.
4. masks: object masks beside the photos (`photo.mask.png`) vs none.
5. ema: `--use_ema` vs not.

    python benchmarks/datasets.py                       # all five, seed 0 (~25 min on 2 cores)
    python benchmarks/datasets.py --only masks ema --seeds 0 1 2
    python benchmarks/datasets.py --steps 8 --quick     # smoke run: checks the script only
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
EXPERIMENTS = ("concepts", "buckets", "captions", "masks", "ema")
IDENTIFIERS = ("sks", "zwx", "qlt")


class Bench:
    def __init__(self, args):
        from dreambooth.models import WORLD_MODEL_GUIDANCE_SCALE, load_pipeline
        from dreambooth.world.evaluator import load_evaluator

        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="datasets-bench-"))
        self.evaluator = load_evaluator()
        self.guidance = WORLD_MODEL_GUIDANCE_SCALE
        self.base = load_pipeline("demo", device="cpu")

    # ------------------------------------------------------------------ data and training
    def folder(self, name: str, images, captions=None, masks=None) -> Path:
        folder = self.work / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            image.save(folder / f"{index}.png")
            if captions is not None:
                (folder / f"{index}.txt").write_text(captions[index] + "\n")
            if masks is not None:
                masks[index].save(folder / f"{index}.mask.png")
        return folder

    def train(self, name: str, seed: int, **values) -> Path:
        from dreambooth.config import parse_train_config
        from dreambooth.train.run import train

        steps = values.pop("steps", self.args.steps)
        config = {
            "pretrained_model_name_or_path": "demo", "with_prior_preservation": True,
            "num_class_images": self.args.class_images, "train_text_encoder": True,
            "class_inference_steps": self.args.sample_steps,
            "class_guidance_scale": self.guidance, "resolution": 64, "train_batch_size": 2,
            "max_train_steps": steps, "learning_rate": 5e-5, "lr_warmup_steps": 0,
            "checkpointing_steps": steps + 1, "seed": seed, "report_to": "none",
            "accelerator": "cpu", "output_dir": str(self.work / "runs" / f"{name}-{seed}"),
            **values}
        started = time.perf_counter()
        output = train(parse_train_config(config, source=f"benchmark run {name}"))
        print(f"  trained {name} seed {seed} in {time.perf_counter() - started:.0f} s",
              flush=True)
        return output

    def class_dir(self, noun: str) -> str:
        return str(self.work / "class" / noun)  # generated once per class, shared by runs

    # ------------------------------------------------------------------------ scoring
    def generate(self, model, prompts: list[str], size: int = 64) -> list[list]:
        from dreambooth.models import load_pipeline
        from dreambooth.world.dreambench import sample_prompt_set

        pipeline = self.base if model == "demo" else load_pipeline(model, device="cpu")
        return sample_prompt_set(pipeline, prompts, list(range(self.args.images_per_prompt)),
                                 batch_size=8, num_inference_steps=self.args.sample_steps,
                                 guidance_scale=self.guidance)

    def score(self, groups, prompts, references) -> dict:
        from dreambooth.world import parse_prompt
        from dreambooth.world.metrics import attribute_matches, prompt_fidelity, subject_fidelity

        images = [image for group in groups for image in group]
        per_image = [prompt for prompt, group in zip(prompts, groups) for _ in group]
        backgrounds = [(image, prompt) for image, prompt in zip(images, per_image)
                       if "background" in parse_prompt(prompt)]
        matches = attribute_matches([i for i, _ in backgrounds], [p for _, p in backgrounds],
                                    self.evaluator) if backgrounds else []
        return {
            "subject_fidelity": subject_fidelity(images, references, self.evaluator),
            "prompt_fidelity": prompt_fidelity(images, per_image, self.evaluator),
            "background_match": (statistics.mean(m["background"] for m in matches)
                                 if matches else None),
        }

    def subject_prompts(self, subject, identifier: str = "sks") -> list[str]:
        from dreambooth.world import dreambench_prompts

        return dreambench_prompts(subject, identifier)[:self.args.prompts]

    # -------------------------------------------------------------------- experiments
    def concepts(self, seed: int) -> dict:
        from dreambooth.world import SUBJECTS, class_prompt, photos

        subjects = list(SUBJECTS.values())[:3]
        folders = {s.name: self.folder(s.name, photos(s, n=5)) for s in subjects}
        references = {s.name: photos(s, n=5) for s in subjects}
        concepts = [{"instance_data_dir": str(folders[s.name]),
                     "instance_prompt": f"a {identifier} {s.cls}",
                     "class_data_dir": self.class_dir(s.cls), "class_prompt": class_prompt(s)}
                    for s, identifier in zip(subjects, IDENTIFIERS)]
        concepts_file = self.work / "data" / "concepts.json"
        concepts_file.write_text(json.dumps(concepts, indent=1))
        joint = self.train("concepts-joint", seed, concepts=str(concepts_file),
                           steps=self.args.steps * len(subjects))
        row: dict = {"alone": {}, "joint": {}, "bleed": {}}
        joint_groups = {}
        for subject, identifier in zip(subjects, IDENTIFIERS):
            prompts = self.subject_prompts(subject, identifier)
            alone = self.train(f"concepts-alone-{subject.name}", seed,
                               instance_data_dir=str(folders[subject.name]),
                               instance_prompt=f"a {identifier} {subject.cls}",
                               class_data_dir=self.class_dir(subject.cls),
                               class_prompt=class_prompt(subject))
            row["alone"][subject.name] = self.score(self.generate(alone, prompts), prompts,
                                                    references[subject.name])
            joint_groups[subject.name] = (prompts, self.generate(joint, prompts))
            row["joint"][subject.name] = self.score(joint_groups[subject.name][1], prompts,
                                                    references[subject.name])
        from dreambooth.world.metrics import subject_fidelity

        for a in subjects:
            prompts, groups = joint_groups[a.name]
            joint_images = [image for group in groups for image in group]
            base_images = [image for group in self.generate("demo", prompts) for image in group]
            for b in subjects:
                if a is b:
                    continue
                row["bleed"][f"{a.name}->{b.name}"] = {
                    "joint": subject_fidelity(joint_images, references[b.name], self.evaluator),
                    "base": subject_fidelity(base_images, references[b.name], self.evaluator)}
        return row

    def buckets(self, seed: int) -> dict:
        from dreambooth.images import make_grid, save_png
        from dreambooth.world import WIDE_SUBJECT, class_prompt, render, upright_scenes

        wide = [render(scene, (96, 64)) for scene in upright_scenes(WIDE_SUBJECT, n=5)]
        folder = self.folder("wide", wide)
        # References that show the subject whole in a square frame (smaller).
        references = [render(scene) for scene in
                      upright_scenes(WIDE_SUBJECT, n=5, seed=1, scale=(0.55, 0.6))]
        prompts = self.subject_prompts(WIDE_SUBJECT)
        common = dict(instance_data_dir=str(folder),
                      instance_prompt=f"a sks {WIDE_SUBJECT.cls}",
                      class_data_dir=self.class_dir(WIDE_SUBJECT.cls),
                      class_prompt=class_prompt(WIDE_SUBJECT))
        row = {}
        for label, values in (("center_crop", {"center_crop": True}),
                              ("random_crop", {}),  # the default: a random square each epoch
                              # The world model's latents are 1/16 of the image at its
                              # deepest UNet level: bucket sides in steps of 16 px.
                              ("aspect_buckets", {"aspect_buckets": True,
                                                  "bucket_reso_steps": 16})):
            model = self.train(f"buckets-{label}", seed, **common, **values)
            groups = self.generate(model, prompts)
            row[label] = self.score(groups, prompts, references)
            grid = make_grid([image for group in groups[:4] for image in group[:4]], columns=4)
            path = RESULTS / f"datasets-buckets-{label}.png"
            if seed == self.args.seeds[0]:
                save_png(grid, path, text={"prompts": "; ".join(prompts[:4])})
                row[label]["grid"] = str(path.relative_to(REPO))
        return row

    def compare(self, name: str, seed: int, variants, *, backgrounds_only: bool) -> dict:
        """Each DreamBench-mini subject trained once per variant (label, folder extras from the
        subject, training overrides) on the same photos; scores per variant and subject."""
        from dreambooth.world import SUBJECTS, class_prompt, photos

        row: dict = {label: {} for label, _, _ in variants}
        for subject in list(SUBJECTS.values())[:self.args.subjects]:
            images = photos(subject, n=5)
            prompts = self.subject_prompts(subject)
            if backgrounds_only:
                prompts = [p for p in prompts if " on " in p]  # recontextualization
            for label, extras, overrides in variants:
                folder = self.folder(f"{subject.name}-{name}-{label}", images, **extras(subject))
                model = self.train(f"{name}-{label}-{subject.name}", seed,
                                   instance_data_dir=str(folder),
                                   instance_prompt=f"a sks {subject.cls}",
                                   class_data_dir=self.class_dir(subject.cls),
                                   class_prompt=class_prompt(subject), **overrides)
                row[label][subject.name] = self.score(self.generate(model, prompts), prompts,
                                                      images)
        return row

    def captions(self, seed: int) -> dict:
        from dreambooth.world import photo_captions

        return self.compare("captions", seed, [
            ("instance_prompt", lambda subject: {}, {}),
            ("captions", lambda subject: {"captions": photo_captions(subject, n=5)}, {}),
        ], backgrounds_only=True)

    def masks(self, seed: int) -> dict:
        from dreambooth.world import photo_masks

        return self.compare("masks", seed, [
            ("no_masks", lambda subject: {}, {}),
            ("masks", lambda subject: {"masks": photo_masks(subject, n=5)}, {}),
        ], backgrounds_only=True)

    def ema(self, seed: int) -> dict:
        return self.compare("ema", seed, [("raw", lambda subject: {}, {}),
                                          ("ema", lambda subject: {}, {"use_ema": True})],
                            backgrounds_only=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=400, help="Training steps per subject.")
    parser.add_argument("--subjects", type=int, default=2,
                        help="DreamBench-mini subjects for captions, masks and EMA.")
    parser.add_argument("--class_images", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=16, help="Prompts per subject (max).")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--sample_steps", type=int, default=25)
    parser.add_argument("--quick", action="store_true",
                        help="Smoke run: few class images and prompts (figures mean nothing).")
    parser.add_argument("--output", type=Path, default=RESULTS / "datasets.json")
    args = parser.parse_args()
    if args.quick:
        args.class_images, args.prompts, args.images_per_prompt, args.sample_steps = 2, 2, 2, 2
    from dreambooth.cli import quiet_libraries

    quiet_libraries()
    bench = Bench(args)
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    for name in args.only:
        report["results"][name] = {}
        for seed in args.seeds:
            print(f"{name}, seed {seed}", flush=True)
            started = time.perf_counter()
            result = getattr(bench, name)(seed)
            result["seconds"] = round(time.perf_counter() - started)
            report["results"][name][str(seed)] = result
            print(json.dumps(result, indent=1), flush=True)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
