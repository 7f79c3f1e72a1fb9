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
from statistics import mean

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", default="src/dreambooth/assets/world_model/vae",
                        help="An AutoencoderKL folder (default: the bundled model's).")
    parser.add_argument("--output", default=None, help="Write the figures as JSON here.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from diffusers import AutoencoderKL

    from dreambooth.world import SUBJECTS, dreambench_prompts, held_out_subjects, photos
    from dreambooth.world.dreambench import prompt_set_ceiling, vae_round_trip
    from dreambooth.world.evaluator import load_evaluator
    from dreambooth.world.metrics import subject_fidelity

    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    evaluator = load_evaluator()
    report = {"vae": args.vae, "subjects": {}}
    for subject_set, pool in (("dreambench_mini", list(SUBJECTS.values())),
                              ("held_out", held_out_subjects())):
        for subject in pool:
            subject_photos = photos(subject, n=5)
            with torch.no_grad():
                through_vae = subject_fidelity(vae_round_trip(vae, subject_photos),
                                               subject_photos, evaluator)
                ceiling = prompt_set_ceiling(vae, subject, dreambench_prompts(subject)[:25],
                                             subject_photos, evaluator=evaluator)
            report["subjects"][subject.name] = {"set": subject_set,
                                                "vae_subject_fidelity": through_vae, **ceiling}
    print("| subject | photos through the VAE | ceiling: all / recontext / recolor |")
    print("|---|---|---|")
    for name, row in report["subjects"].items():
        print(f"| {name} | {row['vae_subject_fidelity']:.3f} | {row['subject_fidelity']:.3f} / "
              f"{row['recontextualization_subject_fidelity']:.3f} / "
              f"{row['property_subject_fidelity']:.3f} |")
    for subject_set in ("dreambench_mini", "held_out"):
        rows = [row for row in report["subjects"].values() if row["set"] == subject_set]
        keys = ("vae_subject_fidelity", "subject_fidelity",
                "recontextualization_subject_fidelity", "property_subject_fidelity")
        report[f"mean_{subject_set}"] = {key: mean(row[key] for row in rows) for key in keys}
        print(f"| **mean, {subject_set}** | "
              + " | ".join(f"{report[f'mean_{subject_set}'][key]:.3f}" for key in keys[:1])
              + " | " + " / ".join(f"{report[f'mean_{subject_set}'][key]:.3f}"
                                   for key in keys[1:]) + " |")
    if args.output:
        with open(args.output, "w") as file:
            json.dump(report, file, indent=1)


if __name__ == "__main__":
    main()
