"""`dreambooth demo`: the whole DreamBooth job, end to end, on a laptop CPU in a few minutes.

It writes the photos of the procedural world's demo subject (a blue ball with yellow spots),
generates class images with the bundled base model (`demo`, pretrained on the world), trains
DreamBooth with prior preservation, and evaluates the base and the personalized model on the
same DreamBench-style prompts and seeds with the world evaluator (`metrics.json` with `before`
and `after`, `report.html` with the grids).
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from dreambooth.config import parse_train_config
from dreambooth.files import atomic_write_text
from dreambooth.generate import sample_images
from dreambooth.images import make_grid, save_png
from dreambooth.models import WORLD_MODEL_GUIDANCE_SCALE, load_pipeline
from dreambooth.train.run import train
from dreambooth.world import DEMO_SUBJECT, IMAGE_SIZE, class_prompt, dreambench_prompts, photos
from dreambooth.world.dreambench import evaluate_model
from dreambooth.world.metrics import shows_look

log = logging.getLogger(__name__)

BASE_MODEL = "demo"  # the bundled world model (dreambooth.models.BUNDLED_MODELS)
IDENTIFIER = "sks"
INSTANCE_PROMPT = f"a {IDENTIFIER} {DEMO_SUBJECT.cls}"
CLASS_PROMPT = class_prompt(DEMO_SUBJECT)


@dataclass(frozen=True)
class DemoSettings:
    """How much the demo does; the defaults are the README's run (a few minutes on 2 cores)."""

    max_train_steps: int = 400
    learning_rate: float = 5e-5  # the UNet's; 1e-4 draws less of the subject (BENCHMARKS)
    # The text encoder learns the identifier faster than the UNet may: 7e-5 gave more subject
    # fidelity at the same prompt fidelity on DreamBench-mini, 1e-4 lost prompt fidelity.
    text_encoder_lr: float = 7e-5
    train_batch_size: int = 2
    train_text_encoder: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 50
    eval_prompts: int = 0  # 0: every DreamBench-mini prompt of the demo subject
    images_per_prompt: int = 4
    inference_steps: int = 25
    guidance_scale: float = WORLD_MODEL_GUIDANCE_SCALE


# `dreambooth demo --fast`: every stage and file, minimal work (tests, smoke runs).
FAST = DemoSettings(max_train_steps=4, num_class_images=4, eval_prompts=3, images_per_prompt=2,
                    inference_steps=4)


def run_demo(output_dir: Path, settings: DemoSettings = DemoSettings(), *,
             base_model: str | Path = BASE_MODEL) -> Path:
    """Subject photos -> class images -> DreamBooth with prior preservation -> before/after."""
    output_dir = Path(output_dir)
    photo_dir = output_dir / "instance-photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    for index, photo in enumerate(photos(DEMO_SUBJECT, n=5)):
        photo.save(photo_dir / f"{DEMO_SUBJECT.name}-{index}.png")
    steps = settings.max_train_steps
    config = parse_train_config({
        "pretrained_model_name_or_path": str(base_model), "instance_data_dir": str(photo_dir),
        "instance_prompt": INSTANCE_PROMPT, "with_prior_preservation": True,
        "prior_loss_weight": settings.prior_loss_weight,
        "train_text_encoder": settings.train_text_encoder,
        "class_prompt": CLASS_PROMPT, "class_data_dir": str(output_dir / "class-images"),
        "num_class_images": settings.num_class_images,
        "class_inference_steps": settings.inference_steps,
        "class_guidance_scale": settings.guidance_scale, "resolution": IMAGE_SIZE,
        "train_batch_size": settings.train_batch_size, "max_train_steps": steps,
        "learning_rate": settings.learning_rate, "text_encoder_lr": settings.text_encoder_lr,
        "lr_warmup_steps": 0,
        "checkpointing_steps": max(1, steps // 2), "checkpoints_total_limit": 1,
        "validation_prompt": INSTANCE_PROMPT, "validation_steps": max(1, steps // 4),
        "num_validation_images": 4, "validation_inference_steps": settings.inference_steps,
        "validation_guidance_scale": settings.guidance_scale,
        "seed": 0, "accelerator": "cpu", "output_dir": str(output_dir / "model"),
        "report_to": "tensorboard",
    }, source="demo configuration")
    trained = train(config)

    prompts = dreambench_prompts(DEMO_SUBJECT, IDENTIFIER)
    prompts = prompts[:settings.eval_prompts] if settings.eval_prompts else prompts
    metrics, comparisons = {}, {}
    for label, model in (("before", base_model), ("after", trained)):
        log.info("evaluating the %s model on %d prompts x %d images", label, len(prompts),
                 settings.images_per_prompt)
        pipeline = load_pipeline(model, device="cpu")
        result = evaluate_model(pipeline, photo_dir, identifier=IDENTIFIER,
                                class_noun=DEMO_SUBJECT.cls, prompts=prompts,
                                output_dir=output_dir / "eval" / label,
                                images_per_prompt=settings.images_per_prompt,
                                num_inference_steps=settings.inference_steps,
                                guidance_scale=settings.guidance_scale)
        metrics[label] = asdict(result)
        comparisons[label] = sample_images(pipeline, INSTANCE_PROMPT, seeds=[0, 1, 2, 3],
                                           num_inference_steps=settings.inference_steps,
                                           guidance_scale=settings.guidance_scale)
    # The person's glance at base-vs-trained.png, by the evaluator: how many of the 4 images of
    # the instance prompt show the subject's class, color and pattern
    look = (DEMO_SUBJECT.cls, DEMO_SUBJECT.color, DEMO_SUBJECT.look.pattern)
    for label in ("before", "after"):
        metrics[label]["images_showing_subject"] = sum(shows_look(comparisons[label], *look))
    metrics["settings"] = asdict(settings)
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    comparison = save_png(make_grid(comparisons["before"] + comparisons["after"], columns=4),
                          output_dir / "base-vs-trained.png",
                          text={"rows": "base model; trained model", "prompt": INSTANCE_PROMPT})
    atomic_write_text(output_dir / "report.html", _report(metrics, prompts, base_model))
    print(f"demo finished in {output_dir}:\n"
          f"  subject fidelity   {metrics['before']['subject_fidelity']:.3f} -> "
          f"{metrics['after']['subject_fidelity']:.3f} (recontextualization prompts "
          f"{_number(metrics['before']['recontextualization_subject_fidelity'])} -> "
          f"{_number(metrics['after']['recontextualization_subject_fidelity'])})\n"
          f"  prompt fidelity    {metrics['before']['prompt_fidelity']:.3f} -> "
          f"{metrics['after']['prompt_fidelity']:.3f}\n"
          f"  '{INSTANCE_PROMPT}' shows the subject in "
          f"{metrics['before']['images_showing_subject']} -> "
          f"{metrics['after']['images_showing_subject']} of 4 images\n"
          f"  report             {output_dir / 'report.html'}\n"
          f"  metrics            {output_dir / 'metrics.json'}\n"
          f"  trained pipeline   {trained}\n"
          f"  base vs trained    {comparison}\n"
          f"  TensorBoard logs   {trained / 'logs'}")
    return output_dir


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _report(metrics: dict[str, dict], prompts: list[str], base_model: str | Path) -> str:
    keys = ("subject_fidelity", "recontextualization_subject_fidelity",
            "property_subject_fidelity", "prompt_fidelity", "pres", "div")
    rows = "".join(f"<tr><td>{key.replace('_', ' ')}</td><td>{_number(metrics['before'][key])}"
                   f"</td><td>{_number(metrics['after'][key])}</td></tr>" for key in keys)
    return (
        "<!doctype html><meta charset='utf-8'><title>dreambooth demo</title>"
        "<style>img{image-rendering:pixelated;height:128px}</style>"
        f"<h1>DreamBooth demo: {html.escape(INSTANCE_PROMPT)}</h1>"
        f"<p>Base model: {html.escape(str(base_model))}. Subject fidelity ~ DINO, "
        "prompt fidelity ~ CLIP-T, PRES (lower is better), DIV (higher is better), scored by "
        "the world evaluator on the same prompts and seeds before and after training.</p>"
        "<h2>Metrics</h2><table border=1><tr><th></th><th>base</th><th>personalized</th></tr>"
        f"{rows}</table>"
        "<h2>Instance photos</h2><img src='eval/after/references.png'>"
        "<h2>Base (top) vs personalized (bottom), same seeds</h2><img src='base-vs-trained.png'>"
        "<h2>Recontextualization and property modification, personalized</h2>"
        + "".join(f"<figure><img src='eval/after/prompts/{i:03d}.png'><figcaption>"
                  f"{html.escape(prompt)}</figcaption></figure>"
                  for i, prompt in enumerate(prompts))
        + f"<h2>Class prompt '{html.escape(CLASS_PROMPT)}': base vs personalized (prior)</h2>"
        "<img src='eval/before/class-prompt.png'> <img src='eval/after/class-prompt.png'>\n")


def run_demo_preset(output_dir: str | Path = "runs/demo", *, fast: bool = False,
                    max_train_steps: int | None = None) -> Path:
    """`dreambooth demo`: run_demo with the README's settings (DemoSettings) or FAST's.

    Args:
        output_dir: Folder for the photos, class images, trained model, metrics and report.
        fast: Every stage and file with minimal work (a smoke run).
        max_train_steps: DreamBooth steps instead of the settings' own (DemoSettings, or
            FAST with `fast`).
    """
    from dataclasses import replace

    settings = FAST if fast else DemoSettings()
    if max_train_steps is not None:
        settings = replace(settings, max_train_steps=max_train_steps)
    return run_demo(Path(output_dir), settings)
