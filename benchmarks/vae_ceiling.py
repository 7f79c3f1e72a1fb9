"""What a VAE lets a world model show of each subject: the ceilings of DreamBench-mini.

For every DreamBench-mini and held-out subject: its 5 training photos encoded and decoded by
the VAE, scored against the photos by the world evaluator (subject fidelity; no generation of a
model on this VAE can score higher), and every prompt of the subject rendered as a perfect model
would draw it, through the VAE (`world.dreambench.prompt_set_ceiling`). Takes seconds, so a
pretraining run's VAE (`OUTPUT_DIR/vae`, written after stage 1b) can be judged before its stage 2
is spent on it (BENCHMARKS.md, issue 18's fourth pass).

    python benchmarks/vae_ceiling.py --vae runs/world-model/vae --output ceiling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="",
                        help="An AutoencoderKL folder (default: the bundled model's).")
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from diffusers import AutoencoderKL

    from dreambooth.models import resolve_model_path
    from dreambooth.world import SUBJECTS, dreambench_prompts, held_out_subjects, photos
    from dreambooth.world.dreambench import subject_ceilings
    from dreambooth.world.evaluator import load_evaluator

    vae_dir = Path(args.vae) if args.vae else resolve_model_path("demo") / "vae"
    if not (vae_dir / "config.json").is_file():
        parser.error(f"--vae {vae_dir}: no config.json there; pass an AutoencoderKL folder "
                     "(a pretraining run's OUTPUT_DIR/vae or a model's vae/)")
    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    evaluator = load_evaluator()
    report = {"vae": str(vae_dir), "subjects": {}}
    print("| subject | photos through the VAE | ceiling: all / recontext / recolor |")
    print("|---|---|---|")
    for subject_set, pool in (("dreambench_mini", list(SUBJECTS.values())),
                              ("held_out", held_out_subjects())):
        rows = []
        for subject in pool:
            row = subject_ceilings(vae, subject, photos(subject, n=5),
                                   dreambench_prompts(subject)[:25], evaluator=evaluator)
            report["subjects"][subject.name] = {"set": subject_set, **row}
            rows.append(row)
            print(f"| {subject.name} | {_cells(row)} |")
        report[f"mean_{subject_set}"] = mean_row = {
            "vae_subject_fidelity": mean(row["vae_subject_fidelity"] for row in rows),
            "ceiling": {key: mean(row["ceiling"][key] for row in rows) for key in CEILING_KEYS}}
        print(f"| **mean, {subject_set}** | {_cells(mean_row)} |")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")


CEILING_KEYS = ("subject_fidelity", "recontextualization_subject_fidelity",
                "property_subject_fidelity")


def _cells(row: dict) -> str:
    return f"{row['vae_subject_fidelity']:.3f} | " + " / ".join(
        f"{row['ceiling'][key]:.3f}" for key in CEILING_KEYS)


if __name__ == "__main__":
    main()
