"""Text-to-image, image-to-image and inpainting with classifier-free guidance via diffusers.

This is the one generation API: the `dreambooth generate` CLI and the HTTP server
(`dreambooth serve`) are thin adapters over it. Every image depends only on its own seed (one
CPU generator per image), so a seed reproduces its image whatever the batch size and whatever
else shares the batch, and every PNG written carries an AUTOMATIC1111-style `parameters` text
chunk describing how it was made. LoRA files (diffusers/peft or kohya format) are loaded once
per pipeline and switched on per call (`apply_lora`, `sampling_settings`).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import secrets
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from dreambooth import cpu
from dreambooth.formats.infotext import format_parameters, lora_hash, model_hash
from dreambooth.formats.lora_files import LoraFileError, lora_file
from dreambooth.images import make_grid, save_png
from dreambooth.models import default_guidance_scale, load_pipeline

logger = logging.getLogger(__name__)

# Our name -> (diffusers scheduler class, AUTOMATIC1111 sampler name).
SCHEDULERS: dict[str, tuple[type, str]] = {
    "ddim": (DDIMScheduler, "DDIM"),
    "pndm": (PNDMScheduler, "PLMS"),
    "euler": (EulerDiscreteScheduler, "Euler"),
    "euler_a": (EulerAncestralDiscreteScheduler, "Euler a"),
    "dpm++": (DPMSolverMultistepScheduler, "DPM++ 2M"),
}
# "pndm" is A1111's PLMS: linear multistep from the first step (crowsonkb's PLMS), without
# PNDM's Runge-Kutta warm-up, which costs 3 extra UNet calls per step and cannot run fewer than
# 4 steps; SD's own scheduler configs say skip_prk_steps true.
_SCHEDULER_EXTRA: dict[str, dict] = {"dpm++": {"algorithm_type": "dpmsolver++"},
                                     "pndm": {"skip_prk_steps": True}}
_IMAGE_NAME = re.compile(r"^(\d+)-.*\.png$")
# edit_images' default strengths: img2img keeps some of the picture; inpainting regenerates the
# masked area from noise (the rest comes from the picture either way).
IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0

TEXT_TO_IMAGE_PIPELINES = (StableDiffusionPipeline, StableDiffusionXLPipeline)


class GenerationError(ValueError):
    """A generation argument that cannot be used; the message names the argument and its value."""


@dataclass
class GenerationResult:
    """What `generate` made: images in seed order, their seeds, and the files written (if any)."""

    images: list[Image.Image]
    seeds: list[int]
    paths: list[Path]
    grid_path: Path | None


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
    extra = dict(_SCHEDULER_EXTRA.get(name, {}))
    if "clip_sample" not in pipeline.scheduler.config:
        # DDIM/DDPM default to clipping x0 to [-1, 1], right for pixels but not for latents
        # (SD's configs say clip_sample false); a latent model's config that is silent means no.
        extra["clip_sample"] = False
    pipeline.scheduler = cls.from_config(pipeline.scheduler.config, **extra)
    return sampler


def min_steps(scheduler) -> int:
    """The fewest denoising steps `scheduler` (an instance) can run: PNDM with its Runge-Kutta
    warm-up (`skip_prk_steps` false) needs `pndm_order` (4); every other sampler here needs 1."""
    if isinstance(scheduler, PNDMScheduler) and not scheduler.config.get("skip_prk_steps"):
        return scheduler.pndm_order
    return 1


def _check_steps(pipeline: StableDiffusionPipeline, num_inference_steps: int) -> None:
    needed = min_steps(pipeline.scheduler)
    if num_inference_steps < needed:
        raise GenerationError(
            f"num_inference_steps={num_inference_steps} is too few for this model's scheduler "
            f"({type(pipeline.scheduler).__name__} with Runge-Kutta warm-up needs at least "
            f"{needed}); raise it or pass scheduler='pndm' (PLMS) or another sampler")


def _check_arguments(
    prompt: str | Sequence[str],
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
) -> None:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not text.strip() for text in prompts):
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


def _per_seed(name: str, value, seeds: list[int]) -> list:
    """`value` repeated for every seed, or `value` itself when it is already one entry per seed."""
    if isinstance(value, (str, Image.Image)):
        return [value] * len(seeds)
    values = list(value)
    if len(values) != len(seeds):
        raise GenerationError(
            f"{name} has {len(values)} entries for {len(seeds)} seeds; pass one {name} for all "
            "seeds or exactly one per seed"
        )
    return values


def _check_batching(seeds: list[int], batch_size: int | None) -> int:
    if not seeds:
        raise GenerationError("seeds is empty; pass at least one seed")
    batch_size = batch_size or len(seeds)
    if batch_size < 1:
        raise GenerationError(f"batch_size={batch_size} must be at least 1")
    return batch_size


def _run_in_chunks(
    pipeline_call, *, seeds: list[int], batch_size: int, per_image: dict[str, list], **shared
) -> list[Image.Image]:
    """Call `pipeline_call` on `batch_size` seeds at a time, slicing every per-image argument."""
    images: list[Image.Image] = []
    # Sampling stays on oneDNN's convolutions even where training takes ATen's native ones
    # (dreambooth.cpu.conv_backend_for): the native kernels sum a batch of two in another order
    # than a batch of one, and an image must not depend on its batch neighbours.
    with torch.inference_mode(), cpu.adaptive_threads() as threads:
        for start in range(0, len(seeds), batch_size):
            stop = start + batch_size
            # One CPU generator per image: its initial latents, its VAE posterior sample (edits)
            # and any ancestral noise come from its own stream, so the image does not depend on
            # its batch neighbours.
            generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[start:stop]]
            chunk = {name: values[start:stop] for name, values in per_image.items()}
            threads.before_batch()
            output = pipeline_call(**chunk, **shared, generator=generators, output_type="pil")
            images.extend(output.images)
    return images


def sample_images(
    pipeline: StableDiffusionPipeline,
    prompt: str | Sequence[str],
    *,
    seeds: list[int],
    negative_prompt: str | Sequence[str] = "",
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
) -> list[Image.Image]:
    """Generate one image per seed, `batch_size` at a time (default: all at once).

    `prompt` and `negative_prompt` are one string for every seed or a list with one per seed, so
    requests with different prompts can share a UNet batch.
    """
    _check_arguments(prompt, num_inference_steps, guidance_scale, height, width)
    _check_steps(pipeline, num_inference_steps)
    batch_size = _check_batching(seeds, batch_size)
    per_image = _prompt_inputs(prompt, negative_prompt, seeds)
    return _run_in_chunks(
        pipeline, seeds=seeds, batch_size=batch_size, per_image=per_image,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        height=height or default_size(pipeline), width=width or default_size(pipeline),
    )


def _prompt_inputs(prompt, negative_prompt, seeds: list[int]) -> dict[str, list[str]]:
    """Per-image prompts, and negative prompts only when one is not empty: SD 1.x/2.x encode ""
    either way, while SDXL then uses zero embeddings (`force_zeros_for_empty_prompt`), as
    diffusers' own calls (and SDXL's training) do."""
    inputs = {"prompt": _per_seed("prompt", prompt, seeds)}
    negative_prompts = _per_seed("negative_prompt", negative_prompt, seeds)
    if any(negative_prompts):
        inputs["negative_prompt"] = negative_prompts
    return inputs


def _edit_pipeline(pipeline: StableDiffusionPipeline, *, inpaint: bool):
    """An img2img or inpainting pipeline over the same modules (no copy): weights, LoRA adapters
    and the current scheduler are shared with `pipeline`."""
    if isinstance(pipeline, StableDiffusionXLPipeline):
        cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLImg2ImgPipeline
        edit_pipeline = cls(**pipeline.components)
    else:
        cls = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
        edit_pipeline = cls(**pipeline.components, requires_safety_checker=False)
    edit_pipeline.set_progress_bar_config(disable=True)
    return edit_pipeline


def edit_images(
    pipeline: StableDiffusionPipeline,
    prompt: str | Sequence[str],
    *,
    image: Image.Image | Sequence[Image.Image],
    mask: Image.Image | Sequence[Image.Image] | None = None,
    strength: float | None = None,
    seeds: list[int],
    negative_prompt: str | Sequence[str] = "",
    num_inference_steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
) -> list[Image.Image]:
    """Image-to-image from `image`, or inpainting inside `mask`; one result per seed.

    `image` (RGB) and `mask` are one for every seed or one per seed. The mask follows diffusers:
    white repaints, black keeps (the server converts OpenAI's alpha masks). `strength` in
    (0, 1] is how far the picture is noised before denoising, so int(steps * strength) steps run;
    default 0.8 for image-to-image and 1.0 for inpainting. The output is `height` x `width`
    (default: the first image's size, which must then be a multiple of 8); pictures and masks
    are resized to it (bicubic; masks nearest), without keeping the aspect ratio.

    Inpainting runs diffusers' StableDiffusionInpaintPipeline on the text-to-image modules. With
    the usual 4-channel UNet it works in diffusers' blending mode: after each denoising step the
    latents outside the mask are replaced by the picture's latents noised to the next step's
    level, so only the masked area is generated (Lugmayr et al. 2022, "RePaint", without
    resampling). A 9-channel inpainting UNet would instead take mask and masked picture as input.
    """
    images = _per_seed("image", image, seeds)
    masks = None if mask is None else _per_seed("mask", mask, seeds)
    if not images:
        raise GenerationError("seeds is empty; pass at least one seed")
    if height is None or width is None:
        if images[0].width % 8 or images[0].height % 8:
            raise GenerationError(
                f"image is {images[0].width}x{images[0].height}, not a multiple of 8 on both "
                "sides; pass height and width (multiples of 8) to resize it"
            )
        width, height = width or images[0].width, height or images[0].height
    _check_arguments(prompt, num_inference_steps, guidance_scale, height, width)
    _check_steps(pipeline, num_inference_steps)
    batch_size = _check_batching(seeds, batch_size)
    if masks is not None:
        for index, (picture, picture_mask) in enumerate(zip(images, masks)):
            if picture_mask.size != picture.size:
                raise GenerationError(
                    f"mask {index} is {picture_mask.width}x{picture_mask.height} but its image is "
                    f"{picture.width}x{picture.height}; the mask must have the image's size"
                )
    if strength is None:
        strength = IMG2IMG_STRENGTH if masks is None else INPAINT_STRENGTH
    if not 0 < strength <= 1:
        raise GenerationError(f"strength={strength} must be in (0, 1]")
    if int(num_inference_steps * strength) < 1:
        raise GenerationError(
            f"num_inference_steps={num_inference_steps} with strength={strength} leaves no "
            "denoising step (int(steps * strength) = 0); raise either"
        )
    # Resized here, not by the pipelines: diffusers' img2img pipeline takes no height/width.
    size = (width, height)
    per_image = {
        **_prompt_inputs(prompt, negative_prompt, seeds),
        "image": [_resized(picture.convert("RGB"), size, Image.Resampling.BICUBIC)
                  for picture in images],
    }
    if masks is not None:
        # NEAREST keeps the mask binary.
        per_image["mask_image"] = [_resized(picture_mask.convert("L"), size,
                                            Image.Resampling.NEAREST) for picture_mask in masks]
    edit_pipeline = _edit_pipeline(pipeline, inpaint=masks is not None)
    return _run_in_chunks(
        edit_pipeline, seeds=seeds, batch_size=batch_size, per_image=per_image,
        strength=strength, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
    )


def _resized(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    return image if image.size == size else image.resize(size, resample=resample)


# LoRA adapters loaded per UNet (the module LoRA layers live in, shared by every pipeline built
# over it): resolved file -> ((mtime_ns, size) when loaded, peft adapter name).
_LORA_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ADAPTER_IDS = itertools.count()


def apply_lora(
    pipeline: StableDiffusionPipeline, lora: str | Path | None, scale: float = 1.0
) -> None:
    """Switch LoRA `lora` on at `scale` (on UNet and text encoder), or every LoRA off for None.

    A file is loaded into a pipeline once, with diffusers' `load_lora_weights` (which reads
    diffusers/peft and kohya files), and kept as a peft adapter; later calls only activate it,
    so switching LoRA or scale reads nothing from disk. A file changed on disk is loaded again.
    """
    adapters = _LORA_ADAPTERS.setdefault(pipeline.unet, {})
    if lora is None:
        if adapters:
            pipeline.disable_lora()
        return
    if not math.isfinite(scale):
        raise GenerationError(f"lora_scale={scale} must be a finite number")
    try:
        path = lora_file(lora)
    except LoraFileError as error:
        raise GenerationError(str(error)) from None
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    loaded = adapters.get(path)
    if loaded is None or loaded[0] != stamp:
        if loaded is not None:
            pipeline.delete_adapters(loaded[1])
            del adapters[path]
        name = f"lora{next(_ADAPTER_IDS)}"
        logger.info("loading LoRA %s as adapter %s", path, name)
        try:
            with warnings.catch_warnings():
                # peft warns that a model gets a second adapter: keeping several is the point.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipeline.load_lora_weights(str(path), adapter_name=name, local_files_only=True)
        except (ValueError, KeyError, RuntimeError, OSError) as error:
            _delete_partial_adapter(pipeline, name)
            # torch lists every mismatched tensor; the first lines say enough.
            reason = "\n".join(str(error).splitlines()[:3])
            raise GenerationError(
                f"lora '{lora}' cannot be applied to this model: {reason}") from error
        if not any(name in names for names in pipeline.get_list_adapters().values()):
            # diffusers loads a file whose keys match no module (or an empty one) silently.
            raise GenerationError(
                f"lora '{lora}' holds no LoRA weights for this model's UNet or text encoder; "
                "is it a LoRA for another model family?")
        adapters[path] = (stamp, name)
    pipeline.enable_lora()
    pipeline.set_adapters([adapters[path][1]], adapter_weights=[scale])


def _delete_partial_adapter(pipeline: StableDiffusionPipeline, name: str) -> None:
    # A load that failed half-way may have injected layers into the UNet only.
    if any(name in names for names in pipeline.get_list_adapters().values()):
        pipeline.delete_adapters(name)


@contextmanager
def sampling_settings(
    pipeline: StableDiffusionPipeline,
    *,
    scheduler: str | None = None,
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> Iterator[str]:
    """Use `scheduler` and `lora` inside the block, then restore the pipeline's scheduler and
    switch LoRA off. Yields the AUTOMATIC1111 sampler name."""
    original_scheduler = pipeline.scheduler
    try:
        sampler = set_scheduler(pipeline, scheduler)
        apply_lora(pipeline, lora, lora_scale)
        yield sampler
    finally:
        pipeline.scheduler = original_scheduler
        if lora is not None:
            apply_lora(pipeline, None)


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
    guidance_scale: float | None = None,
    seed: int | None = 0,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    output_dir: str | Path | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    lora: str | Path | None = None,
    lora_scale: float = 1.0,
) -> GenerationResult:
    """Generate `num_images` images with seeds `seed, seed+1, ...` and optionally save them.

    `model` is a pipeline folder, a cached hub id, or a loaded pipeline (then `device`/`dtype`
    are ignored, and its scheduler is restored and LoRA switched off afterwards). `lora` is a
    LoRA .safetensors file (diffusers/peft or kohya format) or a folder holding one, applied at
    `lora_scale`. With `output_dir`, images go to `{index:05d}-{seed}.png` plus
    `grid-{first index:05d}.png` when there are several. `guidance_scale` None: the model's
    own (`models.default_guidance_scale`: 3 for `demo` and models trained from it, else 7.5).

    Args:
        model: A training output_dir, a diffusers folder, a cached hub id, a single-file
            checkpoint or 'demo' (the bundled world model).
        prompt: What to draw.
        negative_prompt: What to steer away from (classifier-free guidance's negative).
        num_images: Images to generate.
        num_inference_steps: Denoising steps.
        guidance_scale: Classifier-free guidance scale (1 disables guidance; default: the
            model's own, 3 for 'demo' and models trained from it, else 7.5).
        seed: Image i uses seed + i (None: a random base seed).
        height: Image height in pixels (default: the model's resolution).
        width: Image width in pixels (default: the model's resolution).
        scheduler: Sampler (default: the model's own scheduler).
        output_dir: Folder the PNGs (and a grid) are written to.
        batch_size: Images per UNet batch (default: all at once).
        device: cuda, cpu, ... (default: cuda if available).
        dtype: auto = fp16 on CUDA, fp32 elsewhere.
        lora: LoRA .safetensors (diffusers/peft or kohya format) or a folder holding
            pytorch_lora_weights.safetensors.
        lora_scale: LoRA strength (0 = off, 1 = as trained).
    """
    if num_images < 1:
        raise GenerationError(f"num_images={num_images} must be at least 1")
    if guidance_scale is None:
        guidance_scale = default_guidance_scale(model)
    _check_arguments(prompt, num_inference_steps, guidance_scale, height, width)
    if isinstance(model, TEXT_TO_IMAGE_PIPELINES):
        pipeline = model
        model_path = pipeline.name_or_path or None
        model_name = Path(model_path or "unknown").name
    else:
        pipeline = load_pipeline(model, device=device, dtype=dtype)
        model_path = model
        model_name = Path(model).name  # a hub id 'org/name' gives 'name', not a snapshot hash
    if seed is None:
        seed = secrets.randbelow(2**32 - num_images)
        logger.info("random base seed %d", seed)
    seeds = [seed + offset for offset in range(num_images)]
    height = height or default_size(pipeline)
    width = width or default_size(pipeline)

    with sampling_settings(
        pipeline, scheduler=scheduler, lora=lora, lora_scale=lora_scale
    ) as sampler:
        images = sample_images(
            pipeline, prompt, seeds=seeds, negative_prompt=negative_prompt,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            height=height, width=width, batch_size=batch_size,
        )

    result = GenerationResult(images=images, seeds=seeds, paths=[], grid_path=None)
    if output_dir is None:
        return result
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    first_index = _next_index(output_dir)
    loras = None
    if lora is not None:
        # A1111 names a LoRA by its file's stem: a run's folder by its kohya file, the one
        # A1111 loads.
        a1111_file = lora_file(lora, kohya=True)
        loras = [(a1111_file.stem, float(lora_scale), lora_hash(a1111_file))]
    hash_of_model = model_hash(model_path) if model_path is not None else None
    texts = [
        format_parameters(
            prompt=prompt, negative_prompt=negative_prompt, steps=num_inference_steps,
            sampler=sampler, cfg_scale=guidance_scale, seed=image_seed, width=width,
            height=height, model_name=model_name, model_hash=hash_of_model, loras=loras,
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
