"""`dreambooth demo`: the whole DreamBooth job, end to end, on a laptop CPU in about a minute.

Until the project's pretrained world model ships, the base model here is a tiny
Stable-Diffusion-architecture pipeline with random weights built on the spot (dreambooth.tiny):
the demo exercises every stage (class-image generation, training with prior preservation,
checkpoints, validation samples, export, generation) but its images are noise-like patterns,
not a personalized subject.
"""

from __future__ import annotations

import logging
from pathlib import Path

from PIL import Image, ImageDraw

from .config import parse_train_config
from .generate import generate
from .images import make_grid, save_png
from .tiny import save_tiny_pipeline
from .train import train

log = logging.getLogger(__name__)

INSTANCE_PROMPT = "a photo of sks toy"
CLASS_PROMPT = "a photo of toy"


def write_subject_photos(folder: Path, count: int = 4, size: int = 40) -> Path:
    """`count` photos of one made-up subject: a blue disc with a yellow stripe, moving around."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (size, size), (200, 60 + 30 * index, 50))
        draw = ImageDraw.Draw(image)
        offset = 3 * index
        draw.ellipse([offset, offset, offset + 26, offset + 26], fill=(20, 40, 220))
        draw.rectangle([offset + 4, offset + 11, offset + 22, offset + 15], fill=(250, 220, 0))
        image.save(folder / f"photo-{index}.png")
    return folder


def run_demo(output_dir: Path, *, max_train_steps: int = 200) -> Path:
    """Build a tiny base model, write subject photos, train with prior preservation, sample."""
    output_dir = Path(output_dir)
    base_model = output_dir / "base-model"
    if not (base_model / "model_index.json").exists():
        log.info("building a tiny random base model in %s", base_model)
        save_tiny_pipeline(base_model, seed=0)
    photos = write_subject_photos(output_dir / "instance-photos")
    config = parse_train_config({
        "pretrained_model_name_or_path": str(base_model), "instance_data_dir": str(photos),
        "instance_prompt": INSTANCE_PROMPT, "with_prior_preservation": True,
        "class_prompt": CLASS_PROMPT, "class_data_dir": str(output_dir / "class-images"),
        "num_class_images": 8, "class_inference_steps": 10, "resolution": 32,
        "train_batch_size": 2, "max_train_steps": max_train_steps, "learning_rate": 1e-4,
        "lr_warmup_steps": 10, "checkpointing_steps": max(1, max_train_steps // 2),
        "checkpoints_total_limit": 1, "validation_prompt": INSTANCE_PROMPT,
        "validation_steps": max(1, max_train_steps // 4), "num_validation_images": 4,
        "validation_inference_steps": 10, "seed": 0, "accelerator": "cpu",
        "output_dir": str(output_dir / "model"), "report_to": "tensorboard",
    }, source="demo configuration")
    trained = train(config)
    rows = []
    for model in (base_model, trained):
        result = generate(model, INSTANCE_PROMPT, num_images=4, num_inference_steps=10, seed=0,
                          output_dir=output_dir / "samples" / model.name, device="cpu")
        rows.extend(result.images)
    comparison = save_png(make_grid(rows, columns=4), output_dir / "base-vs-trained.png",
                          text={"rows": "base model; trained model", "prompt": INSTANCE_PROMPT})
    print(f"demo finished in {output_dir}:\n"
          f"  trained pipeline   {trained}\n"
          f"  class images       {output_dir / 'class-images'}\n"
          f"  validation grids   {trained / 'validation'}\n"
          f"  base vs trained    {comparison}\n"
          f"  TensorBoard logs   {trained / 'logs'}")
    return output_dir
