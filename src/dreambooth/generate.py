"""Text-to-image generation with classifier-free guidance via diffusers' StableDiffusionPipeline.

This is the one generation API: the `dreambooth generate` CLI and the HTTP server are thin
adapters over `generate(...)`. Every image depends only on its own seed (one CPU generator per
image), so a seed reproduces its image whatever the batch size, and every PNG written carries an
AUTOMATIC1111-style `parameters` text chunk describing how it was made.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils import deprecation_utils
from PIL import Image

from dreambooth.images import make_grid, save_png
from dreambooth.models import resolve_model_path

logger = logging.getLogger(__name__)

# Our name -> (diffusers scheduler class, AUTOMATIC1111 sampler name).
SCHEDULERS: dict[str, tuple[type, str]] = {
    "ddim": (DDIMScheduler, "DDIM"),
    "pndm": (PNDMScheduler, "PLMS"),
    "euler": (EulerDiscreteScheduler, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, "Euler a"),
    "dpm++": (DPMSolverMultistepScheduler, "DPM++ 2M"),
}
_SCHEDULER_EXTRA: dict[str, dict] = {"dpm++": {"algorithm_type": "dpmsolver++"}}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# diffusers renamed from_pretrained's `torch_dtype` to `dtype` (PR #14205); older releases
# only know `torch_dtype`.
_DTYPE_KEYWORD = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
_IMAGE_NAME = re.compile(r"^(\d+)-.*\.png$")


class GenerationError(ValueError):
    """A generation argument that cannot be used; the message names the argument and its value."""


@dataclass
class GenerationResult:
    """What `generate` made: images in seed order, their seeds, and the files written (if any)."""

    images: list[Image.Image]
    seeds: list[int]
    paths: list[Path]
    grid_path: Path | None


def load_pipeline(
    model: str | Path, *, device: str | None = None, dtype: str = "auto"
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline from a local folder or cached hub id, on `device`.

    `device` None picks cuda when available, else cpu; `dtype` "auto" is fp16 on cuda and fp32
    elsewhere, otherwise one of "fp32", "fp16", "bf16".
    """
    if dtype != "auto" and dtype not in _DTYPES:
        raise GenerationError(f"dtype='{dtype}' is not one of: auto, {', '.join(_DTYPES)}")
    path = resolve_model_path(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "fp16" if torch.device(device).type == "cuda" else "fp32"
    logger.info("loading %s on %s as %s", path, device, dtype)
    pipeline = StableDiffusionPipeline.from_pretrained(
        path, safety_checker=None, local_files_only=True, **{_DTYPE_KEYWORD: _DTYPES[dtype]}
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def set_scheduler(pipeline: StableDiffusionPipeline, name: str | None) -> str:
    """Swap in scheduler `name` (keeping the model's noise schedule); return its A1111 sampler name.

    With `name` None the pipeline's scheduler is kept and its sampler name is returned.
    """
    if name is None:
        for cls, sampler in SCHEDULERS.values():
            if type(pipeline.scheduler) is cls:
                return sampler
        return type(pipeline.scheduler).__name__
    if name not in SCHEDULERS:
        valid = ", ".join(SCHEDULERS)
        raise GenerationError(f"scheduler='{name}' is unknown; valid names: {valid}")
    cls, sampler = SCHEDULERS[name]
    extra = _SCHEDULER_EXTRA.get(name, {})
    pipeline.scheduler = cls.from_config(pipeline.scheduler.config, **extra)
    return sampler


def _check_arguments(
    prompt: str,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
) -> None:
    if not prompt.strip():
        raise GenerationError("prompt is empty; describe the image to generate")
    if num_inference_steps < 1:
        raise GenerationError(f"num_inference_steps={num_inference_steps} must be at least 1")
    if guidance_scale < 0:
        raise GenerationError(f"guidance_scale={guidance_scale} must be >= 0 (<= 1 disables CFG)")
    for key, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % 8):
            raise GenerationError(f"{key}={value} is not a positive multiple of 8")


def default_size(pipeline: StableDiffusionPipeline) -> int:
    """The image side the UNet was trained for, in pixels."""
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor


def sample_images(
    pipeline: StableDiffusionPipeline,
    prompt: str,
    *,
    seeds: list[int],
    negative_prompt: str = "",
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
) -> list[Image.Image]:
    """Generate one image per seed, `batch_size` at a time (default: all at once)."""
    _check_arguments(prompt, num_inference_steps, guidance_scale, height, width)
    if not seeds:
        raise GenerationError("seeds is empty; pass at least one seed")
    batch_size = batch_size or len(seeds)
    if batch_size < 1:
        raise GenerationError(f"batch_size={batch_size} must be at least 1")
    height = height or default_size(pipeline)
    width = width or default_size(pipeline)
    images: list[Image.Image] = []
    with torch.inference_mode():
        for start in range(0, len(seeds), batch_size):
            chunk = seeds[start : start + batch_size]
            # One CPU generator per image: its initial latents and any ancestral noise come
            # from its own stream, so the image does not depend on its batch neighbours.
            generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in chunk]
            output = pipeline(
                prompt=[prompt] * len(chunk),
                negative_prompt=[negative_prompt] * len(chunk),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                generator=generators,
                output_type="pil",
            )
            images.extend(output.images)
    return images


def _quote(value: str) -> str:
    # A1111 quotes values that would break the "key: value, ..." line.
    return json.dumps(value) if any(c in value for c in ",:\n\"") else value


def format_parameters(
    *, prompt: str, negative_prompt: str, steps: int, sampler: str, cfg_scale: float, seed: int,
    width: int, height: int, model_name: str,
) -> str:
    """The AUTOMATIC1111 `parameters` text for one image."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = {
        "Steps": steps, "Sampler": sampler, "CFG scale": float(cfg_scale), "Seed": seed,
        "Size": f"{width}x{height}", "Model": model_name,
    }
    lines.append(", ".join(f"{key}: {_quote(str(value))}" for key, value in fields.items()))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Read `format_parameters` (or A1111) text back: prompt, negative_prompt and every field."""
    *head, last = text.strip("\n").split("\n")
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in head:
        if negative_lines:
            negative_lines.append(line)
        elif line.startswith("Negative prompt:"):
            negative_lines.append(line.removeprefix("Negative prompt:").lstrip())
        else:
            prompt_lines.append(line)
    result = {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines)}
    for key, value in _FIELD.findall(last):
        result[key] = json.loads(value) if value.startswith('"') else value.strip()
    return result


def _next_index(output_dir: Path) -> int:
    """One past the highest `NNNNN-seed.png` index in `output_dir`, so reruns never overwrite."""
    indices = [int(m.group(1)) for p in output_dir.iterdir() if (m := _IMAGE_NAME.match(p.name))]
    return max(indices, default=-1) + 1


def generate(
    model: str | Path | StableDiffusionPipeline,
    prompt: str,
    *,
    negative_prompt: str = "",
    num_images: int = 4,
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int | None = 0,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    output_dir: str | Path | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
) -> GenerationResult:
    """Generate `num_images` images with seeds `seed, seed+1, ...` and optionally save them.

    `model` is a pipeline folder, a cached hub id, or a loaded pipeline (then `device`/`dtype`
    are ignored and its scheduler is restored afterwards). With `output_dir`, images go to
    `{index:05d}-{seed}.png` plus `grid-{first index:05d}.png` when there are several.
    """
    if num_images < 1:
        raise GenerationError(f"num_images={num_images} must be at least 1")
    _check_arguments(prompt, num_inference_steps, guidance_scale, height, width)
    if isinstance(model, StableDiffusionPipeline):
        pipeline = model
        model_name = Path(pipeline.name_or_path or "unknown").name
    else:
        pipeline = load_pipeline(model, device=device, dtype=dtype)
        model_name = Path(model).name  # a hub id 'org/name' gives 'name', not a snapshot hash
    if seed is None:
        seed = secrets.randbelow(2**32 - num_images)
        logger.info("random base seed %d", seed)
    seeds = [seed + offset for offset in range(num_images)]
    height = height or default_size(pipeline)
    width = width or default_size(pipeline)

    original_scheduler = pipeline.scheduler
    try:
        sampler = set_scheduler(pipeline, scheduler)
        images = sample_images(
            pipeline, prompt, seeds=seeds, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            height=height, width=width, batch_size=batch_size,
        )
    finally:
        pipeline.scheduler = original_scheduler

    result = GenerationResult(images=images, seeds=seeds, paths=[], grid_path=None)
    if output_dir is None:
        return result
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    first_index = _next_index(output_dir)
    texts = [
        format_parameters(
            prompt=prompt, negative_prompt=negative_prompt, steps=num_inference_steps,
            sampler=sampler, cfg_scale=guidance_scale, seed=image_seed, width=width,
            height=height, model_name=model_name,
        )
        for image_seed in seeds
    ]
    for offset, (image, image_seed, text) in enumerate(zip(images, seeds, texts)):
        path = output_dir / f"{first_index + offset:05d}-{image_seed}.png"
        result.paths.append(save_png(image, path, {"parameters": text}))
    if num_images > 1:
        grid_path = output_dir / f"grid-{first_index:05d}.png"
        result.grid_path = save_png(make_grid(images), grid_path, {"parameters": texts[0]})
    return result
