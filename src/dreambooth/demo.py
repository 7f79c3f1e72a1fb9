"""`dreambooth demo`: the whole DreamBooth job, end to end, on a laptop CPU in a few minutes.

It writes the photos of the procedural world's demo subject (a blue ball with yellow spots),
generates class images, trains DreamBooth with prior preservation, and evaluates the base and
the personalized model on the same DreamBench-style prompts and seeds with the world evaluator
(`metrics.json` with `before` and `after`, `report.html` with the grids).

Until the project's pretrained world model ships, the base model is a tiny
Stable-Diffusion-architecture pipeline with random weights built on the spot (dreambooth.tiny):
every stage runs, but its images are patterns, so the metrics show the machinery rather than
personalization.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import asdict
from pathlib import Path

from .config import parse_train_config
from .dreambench import evaluate_model
from .files import atomic_write_text
from .generate import load_pipeline, sample_images
from .images import make_grid, save_png
from .tiny import save_tiny_pipeline
from .train import train
from .world import DEMO_SUBJECT, class_prompt, dreambench_prompts, photos

log = logging.getLogger(__name__)

IDENTIFIER = "sks"
INSTANCE_PROMPT = f"a {IDENTIFIER} {DEMO_SUBJECT.cls}"
CLASS_PROMPT = class_prompt(DEMO_SUBJECT)
RESOLUTION = 32  # the tiny random base model's size
EVAL_PROMPTS = 6  # a slice of the subject's DreamBench-mini prompts, for speed


def run_demo(output_dir: Path, *, max_train_steps: int = 200) -> Path:
    """Subject photos -> class images -> DreamBooth with prior preservation -> before/after."""
    output_dir = Path(output_dir)
    base_model = output_dir / "base-model"
    if not (base_model / "model_index.json").exists():
        log.info("building a tiny random base model in %s", base_model)
        save_tiny_pipeline(base_model, seed=0)
    photo_dir = output_dir / "instance-photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    for index, photo in enumerate(photos(DEMO_SUBJECT, n=5)):
        photo.save(photo_dir / f"{DEMO_SUBJECT.name}-{index}.png")
    config = parse_train_config({
        "pretrained_model_name_or_path": str(base_model), "instance_data_dir": str(photo_dir),
        "instance_prompt": INSTANCE_PROMPT, "with_prior_preservation": True,
        "class_prompt": CLASS_PROMPT, "class_data_dir": str(output_dir / "class-images"),
        "num_class_images": 8, "class_inference_steps": 10, "resolution": RESOLUTION,
        "train_batch_size": 2, "max_train_steps": max_train_steps, "learning_rate": 1e-4,
        "lr_warmup_steps": 10, "checkpointing_steps": max(1, max_train_steps // 2),
        "checkpoints_total_limit": 1, "validation_prompt": INSTANCE_PROMPT,
        "validation_steps": max(1, max_train_steps // 4), "num_validation_images": 4,
        "validation_inference_steps": 10, "seed": 0, "accelerator": "cpu",
        "output_dir": str(output_dir / "model"), "report_to": "tensorboard",
    }, source="demo configuration")
    trained = train(config)

    prompts = dreambench_prompts(DEMO_SUBJECT, IDENTIFIER)[:EVAL_PROMPTS]
    metrics, comparisons = {}, {}
    for label, model in (("before", base_model), ("after", trained)):
        pipeline = load_pipeline(model, device="cpu")
        result = evaluate_model(pipeline, photo_dir, identifier=IDENTIFIER,
                                class_noun=DEMO_SUBJECT.cls, prompts=prompts,
                                output_dir=output_dir / "eval" / label, images_per_prompt=2,
                                num_inference_steps=10)
        metrics[label] = asdict(result)
        comparisons[label] = sample_images(pipeline, INSTANCE_PROMPT, seeds=[0, 1, 2, 3],
                                           num_inference_steps=10)
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    comparison = save_png(make_grid(comparisons["before"] + comparisons["after"], columns=4),
                          output_dir / "base-vs-trained.png",
                          text={"rows": "base model; trained model", "prompt": INSTANCE_PROMPT})
    atomic_write_text(output_dir / "report.html", _report(metrics))
    print(f"demo finished in {output_dir}:\n"
          f"  report             {output_dir / 'report.html'}\n"
          f"  metrics            {output_dir / 'metrics.json'}\n"
          f"  trained pipeline   {trained}\n"
          f"  base vs trained    {comparison}\n"
          f"  TensorBoard logs   {trained / 'logs'}")
    return output_dir


def _report(metrics: dict[str, dict]) -> str:
    keys = ("subject_fidelity", "prompt_fidelity", "pres", "div")
    rows = "".join(f"<tr><td>{key}</td><td>{metrics['before'][key]:.3f}</td>"
                   f"<td>{metrics['after'][key]:.3f}</td></tr>" for key in keys)
    return (
        "<!doctype html><meta charset='utf-8'><title>dreambooth demo</title>"
        "<style>img{image-rendering:pixelated;height:128px}</style>"
        f"<h1>DreamBooth demo: {html.escape(INSTANCE_PROMPT)}</h1>"
        "<p>The base model is a tiny random pipeline until the pretrained world model ships.</p>"
        "<h2>Metrics</h2><table border=1><tr><th></th><th>base</th><th>personalized</th></tr>"
        f"{rows}</table>"
        "<h2>Instance photos</h2><img src='eval/after/references.png'>"
        "<h2>Base (top) vs personalized (bottom), same seeds</h2><img src='base-vs-trained.png'>"
        "<h2>Recontextualization, personalized</h2>"
        + "".join(f"<img src='eval/after/prompts/{i:03d}.png'>" for i in range(EVAL_PROMPTS))
        + f"<h2>Class prompt '{html.escape(CLASS_PROMPT)}': base vs personalized (prior)</h2>"
        "<img src='eval/before/class-prompt.png'> <img src='eval/after/class-prompt.png'>\n")
