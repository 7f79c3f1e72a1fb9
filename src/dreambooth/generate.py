"""Text-to-image, image-to-image and inpainting for every model family via diffusers.

This is the one generation API: the `dreambooth generate` CLI and the HTTP server
(`dreambooth serve`) are thin adapters over it. SD 1.x/2.x/SDXL (UNets, classifier-free
guidance) and SD 3.x/FLUX.1 (flow-matching transformers) run through their diffusers pipelines;
what each family takes (samplers, default steps and guidance, negative prompts, image sizes)
is in `dreambooth.pipelines` and checked here before anything runs. Every image depends only on
its own seed (one CPU generator per image), so a seed reproduces its image whatever the batch
size and whatever else shares the batch, and every PNG written carries an AUTOMATIC1111-style
`parameters` text chunk describing how it was made. LoRA files are loaded once per pipeline
and switched on per call (`apply_lora`, `sampling_settings`).
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
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusion3Pipeline,
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
from dreambooth.formats.lora_files import LoraFileError, lora_file, lora_for_diffusers
from dreambooth.images import make_grid, save_png
from dreambooth.models import load_pipeline
from dreambooth.pipelines import (  # noqa: F401 - re-exported: the generation API's names
    FLOW_SCHEDULERS,
    SCHEDULERS,
    GenerationError,
    check_family_arguments,
    check_scheduler,
    default_guidance,
    denoiser,
    min_steps,
    sampler_name,
    schedulers_for,
    set_scheduler,
    traits,
)

logger = logging.getLogger(__name__)

_IMAGE_NAME = re.compile(r"^(\d+)-.*\.png$")
# edit_images' default strengths: img2img keeps some of the picture; inpainting regenerates the
# masked area from noise (the rest comes from the picture either way).
IMG2IMG_STRENGTH = 0.8
INPAINT_STRENGTH = 1.0

# Each family's text-to-image pipeline -> its (img2img, inpainting) pipelines, which diffusers
# builds over the same modules.
EDIT_PIPELINES = {
    StableDiffusionPipeline: (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline),
    StableDiffusionXLPipeline: (StableDiffusionXLImg2ImgPipeline,
                                StableDiffusionXLInpaintPipeline),
    StableDiffusion3Pipeline: (StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline),
    FluxPipeline: (FluxImg2ImgPipeline, FluxInpaintPipeline),
}
TEXT_TO_IMAGE_PIPELINES = tuple(EDIT_PIPELINES)


@dataclass
class GenerationResult:
    """What `generate` made: images in seed order, their seeds, and the files written (if any)."""

    images: list[Image.Image]
    seeds: list[int]
    paths: list[Path]
    grid_path: Path | None


def _check_steps(pipeline, num_inference_steps: int) -> None:
    needed = min_steps(pipeline.scheduler)
    if num_inference_steps < needed:
        raise GenerationError(
            f"num_inference_steps={num_inference_steps} is too few for this model's scheduler "
            f"({type(pipeline.scheduler).__name__} with Runge-Kutta warm-up needs at least "
            f"{needed}); raise it or pass scheduler='pndm' (PLMS) or another sampler",
            param="num_inference_steps")


def _check_arguments(
    prompt: str | Sequence[str],
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
) -> None:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not text.strip() for text in prompts):
        raise GenerationError("prompt is empty; describe the image to generate", param="prompt")
    if num_inference_steps < 1:
        raise GenerationError(f"num_inference_steps={num_inference_steps} must be at least 1",
                              param="num_inference_steps")
    if guidance_scale < 0:
        raise GenerationError(f"guidance_scale={guidance_scale} must be >= 0 (<= 1 disables CFG)",
                              param="guidance_scale")
    for key, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % 8):
            raise GenerationError(f"{key}={value} is not a positive multiple of 8", param=key)


def default_size(pipeline) -> int:
    """The image side the model was made for, in pixels (FLUX.1 does not say: diffusers' 1024
    for a VAE of 8x, i.e. 128 latent pixels)."""
    return traits(pipeline).native_size


def default_steps(pipeline) -> int:
    """The model's usual number of denoising steps: 30 for UNets, 28 for SD 3.x and FLUX.1-dev,
    4 for FLUX.1-schnell."""
    return traits(pipeline).default_steps


def _per_seed(name: str, value, seeds: list[int]) -> list:
    """`value` repeated for every seed, or `value` itself when it is already one entry per seed."""
    if isinstance(value, (str, Image.Image)):
        return [value] * len(seeds)
    values = list(value)
    if len(values) != len(seeds):
        raise GenerationError(
            f"{name} has {len(values)} entries for {len(seeds)} seeds; pass one {name} for all "
            "seeds or exactly one per seed", param=name)
    return values


def _check_batching(seeds: list[int], batch_size: int | None) -> int:
    if not seeds:
        raise GenerationError("seeds is empty; pass at least one seed", param="seeds")
    batch_size = batch_size or len(seeds)
    if batch_size < 1:
        raise GenerationError(f"batch_size={batch_size} must be at least 1", param="batch_size")
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
    pipeline,
    prompt: str | Sequence[str],
    *,
    seeds: list[int],
    negative_prompt: str | Sequence[str] = "",
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
) -> list[Image.Image]:
    """Generate one image per seed, `batch_size` at a time (default: all at once).

    `pipeline` is any family's text-to-image pipeline (TEXT_TO_IMAGE_PIPELINES). `prompt` and
    `negative_prompt` are one string for every seed or a list with one per seed, so requests
    with different prompts can share a denoiser batch. `num_inference_steps` and
    `guidance_scale` None are the model's own (`default_steps`, `pipelines.default_guidance`);
    on FLUX.1-dev `guidance_scale` is the distilled guidance its transformer takes as input,
    and FLUX.1 takes no negative prompt.
    """
    if num_inference_steps is None:
        num_inference_steps = default_steps(pipeline)
    if guidance_scale is None:
        guidance_scale = default_guidance(pipeline)
    _check_arguments(prompt, num_inference_steps, guidance_scale, height, width)
    _check_steps(pipeline, num_inference_steps)
    batch_size = _check_batching(seeds, batch_size)
    height, width = height or default_size(pipeline), width or default_size(pipeline)
    per_image = _prompt_inputs(pipeline, prompt, negative_prompt, seeds)
    check_family_arguments(pipeline, negative_prompts=per_image.get("negative_prompt", []),
                           guidance_scale=guidance_scale, height=height, width=width)
    return _run_in_chunks(
        pipeline, seeds=seeds, batch_size=batch_size, per_image=per_image,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        height=height, width=width, **_text_length(pipeline),
    )


def _prompt_inputs(pipeline, prompt, negative_prompt, seeds: list[int]) -> dict[str, list[str]]:
    """Per-image prompts, and negative prompts only when one is not empty: SD 1.x/2.x and SD 3
    encode "" either way, while SDXL then uses zero embeddings (`force_zeros_for_empty_prompt`),
    as diffusers' own calls (and SDXL's training) do."""
    inputs = {"prompt": _per_seed("prompt", prompt, seeds)}
    negative_prompts = _per_seed("negative_prompt", negative_prompt, seeds)
    if any(negative_prompts):
        inputs["negative_prompt"] = negative_prompts
    return inputs


def _edit_pipeline(pipeline, *, inpaint: bool):
    """An img2img or inpainting pipeline over the same modules (no copy): weights, LoRA adapters
    and the current scheduler are shared with `pipeline`."""
    base = next((cls for cls in EDIT_PIPELINES if isinstance(pipeline, cls)), None)
    if base is None:
        raise GenerationError(f"{type(pipeline).__name__} has no image-to-image or inpainting "
                              "pipeline here; pass one of "
                              f"{', '.join(cls.__name__ for cls in EDIT_PIPELINES)}")
    cls = EDIT_PIPELINES[base][1 if inpaint else 0]
    extra = ({"requires_safety_checker": False} if base is StableDiffusionPipeline else {})
    edit_pipeline = cls(**pipeline.components, **extra)
    edit_pipeline.set_progress_bar_config(disable=True)
    return edit_pipeline


def edit_images(
    pipeline,
    prompt: str | Sequence[str],
    *,
    image: Image.Image | Sequence[Image.Image],
    mask: Image.Image | Sequence[Image.Image] | None = None,
    strength: float | None = None,
    seeds: list[int],
    negative_prompt: str | Sequence[str] = "",
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
) -> list[Image.Image]:
    """Image-to-image from `image`, or inpainting inside `mask`; one result per seed.

    `image` (RGB) and `mask` are one for every seed or one per seed. The mask follows diffusers:
    white repaints, black keeps (the server converts OpenAI's alpha masks). `strength` in
    (0, 1] is how far the picture is noised before denoising, so int(steps * strength) steps run;
    default 0.8 for image-to-image and 1.0 for inpainting. The output is `height` x `width`
    (default: the first image's size, which must then be a multiple of 8, or of the model's
    token size: 16 for SD 3.x and FLUX.1); pictures and masks are resized to it (bicubic; masks
    nearest), without keeping the aspect ratio.

    Inpainting runs diffusers' inpainting pipeline of the family (EDIT_PIPELINES) on the
    text-to-image modules. With the usual denoiser (latent channels in, no mask input) it works
    in diffusers' blending mode: after each denoising step the latents outside the mask are
    replaced by the picture's latents noised to the next step's level, so only the masked area
    is generated (Lugmayr et al. 2022, "RePaint", without resampling). A 9-channel inpainting
    UNet would instead take mask and masked picture as input. With a flow-matching model at
    strength 1 the start is pure noise, x_1 = noise: the picture then shapes only what the
    mask keeps.
    """
    images = _per_seed("image", image, seeds)
    masks = None if mask is None else _per_seed("mask", mask, seeds)
    if not images:
        raise GenerationError("seeds is empty; pass at least one seed", param="seeds")
    if height is None or width is None:
        multiple = traits(pipeline).size_multiple
        if images[0].width % multiple or images[0].height % multiple:
            raise GenerationError(
                f"image is {images[0].width}x{images[0].height}, not a multiple of {multiple} "
                f"on both sides; pass height and width (multiples of {multiple}) to resize it",
                param="image")
        width, height = width or images[0].width, height or images[0].height
    if num_inference_steps is None:
        num_inference_steps = default_steps(pipeline)
    if guidance_scale is None:
        guidance_scale = default_guidance(pipeline)
    _check_arguments(prompt, num_inference_steps, guidance_scale, height, width)
    _check_steps(pipeline, num_inference_steps)
    batch_size = _check_batching(seeds, batch_size)
    if masks is not None:
        for index, (picture, picture_mask) in enumerate(zip(images, masks)):
            if picture_mask.size != picture.size:
                raise GenerationError(
                    f"mask {index} is {picture_mask.width}x{picture_mask.height} but its image is "
                    f"{picture.width}x{picture.height}; the mask must have the image's size",
                    param="mask")
    if strength is None:
        strength = IMG2IMG_STRENGTH if masks is None else INPAINT_STRENGTH
    if not 0 < strength <= 1:
        raise GenerationError(f"strength={strength} must be in (0, 1]", param="strength")
    if int(num_inference_steps * strength) < 1:
        raise GenerationError(
            f"num_inference_steps={num_inference_steps} with strength={strength} leaves no "
            "denoising step (int(steps * strength) = 0); raise either", param="strength")
    # Resized here, not by the pipelines: diffusers' SD img2img pipeline takes no height/width.
    size = (width, height)
    per_image = {
        **_prompt_inputs(pipeline, prompt, negative_prompt, seeds),
        "image": [_resized(picture.convert("RGB"), size, Image.Resampling.BICUBIC)
                  for picture in images],
    }
    check_family_arguments(pipeline, negative_prompts=per_image.get("negative_prompt", []),
                           guidance_scale=guidance_scale, height=height, width=width)
    if masks is not None:
        # NEAREST keeps the mask binary.
        per_image["mask_image"] = [_resized(picture_mask.convert("L"), size,
                                            Image.Resampling.NEAREST) for picture_mask in masks]
    edit_pipeline = _edit_pipeline(pipeline, inpaint=masks is not None)
    # The flow families' edit pipelines would otherwise make their default size, not the
    # picture's.
    sizes = dict(height=height, width=width) if traits(pipeline).flow_matching else {}
    return _run_in_chunks(
        edit_pipeline, seeds=seeds, batch_size=batch_size, per_image=per_image,
        strength=strength, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, **sizes, **_text_length(pipeline),
    )


def _text_length(pipeline) -> dict[str, int]:
    """SD 3.x and FLUX.1: the T5 tokens per prompt (`Traits.max_sequence_length`), as the
    keyword their pipelines take; nothing for the UNet families."""
    length = traits(pipeline).max_sequence_length
    return {} if length is None else {"max_sequence_length": length}


def _resized(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    return image if image.size == size else image.resize(size, resample=resample)


# LoRA adapters loaded per denoiser (the UNet or transformer LoRA layers live in, shared by
# every pipeline built over it): resolved file -> ((mtime_ns, size) when loaded, adapter name).
_LORA_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ADAPTER_IDS = itertools.count()


def apply_lora(pipeline, lora: str | Path | None, scale: float = 1.0) -> None:
    """Switch LoRA `lora` on at `scale` (on the UNet or transformer and the text encoders),
    or every LoRA off for None.

    A file is loaded into a pipeline once, with diffusers' `load_lora_weights` (which reads
    diffusers/peft files for every family, kohya files for SD 1.x/2.x/SDXL, and BFL/XLabs
    FLUX.1 files, through diffusers' converters; kohya/ComfyUI SD 3.x and FLUX.1 files are
    converted by `formats.lora_files.lora_for_diffusers`), and kept as a peft adapter; later
    calls only activate it, so switching LoRA or scale reads nothing from disk. A file changed
    on disk is loaded again.
    """
    adapters = _LORA_ADAPTERS.setdefault(denoiser(pipeline), {})
    if lora is None:
        if adapters:
            pipeline.disable_lora()
        return
    if not math.isfinite(scale):
        raise GenerationError(f"lora_scale={scale} must be a finite number", param="lora_scale")
    try:
        path = lora_file(lora)
    except LoraFileError as error:
        raise GenerationError(str(error), param="lora") from None
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
            weights = lora_for_diffusers(path, pipeline, traits(pipeline).family)
            with warnings.catch_warnings():
                # peft warns that a model gets a second adapter: keeping several is the point.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipeline.load_lora_weights(weights, adapter_name=name, local_files_only=True)
        except (ValueError, KeyError, RuntimeError, OSError, LoraFileError) as error:
            _delete_partial_adapter(pipeline, name)
            # torch lists every mismatched tensor; the first lines say enough.
            reason = "\n".join(str(error).splitlines()[:3])
            raise GenerationError(
                f"lora '{lora}' cannot be applied to this model: {reason}",
                param="lora") from error
        if not any(name in names for names in pipeline.get_list_adapters().values()):
            # diffusers loads a file whose keys match no module (or an empty one) silently.
            raise GenerationError(_no_weights_message(pipeline, lora, path), param="lora")
        adapters[path] = (stamp, name)
    pipeline.enable_lora()
    pipeline.set_adapters([adapters[path][1]], adapter_weights=[scale])


def _no_weights_message(pipeline, lora, path: Path) -> str:
    model_traits = traits(pipeline)
    part = "transformer" if model_traits.flow_matching else "UNet"
    return (f"lora '{lora}' holds no LoRA weights for this model's {part} or text encoders; "
            "is it a LoRA for another model family?")


def _delete_partial_adapter(pipeline, name: str) -> None:
    # A load that failed half-way may have injected layers into the denoiser only.
    if any(name in names for names in pipeline.get_list_adapters().values()):
        pipeline.delete_adapters(name)


@contextmanager
def sampling_settings(
    pipeline,
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
    model,
    prompt: str,
    *,
    negative_prompt: str = "",
    num_images: int = 4,
    num_inference_steps: int | None = None,
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

    `model` is a pipeline folder, a cached hub id, or a loaded pipeline of any family
    (TEXT_TO_IMAGE_PIPELINES; then `device`/`dtype` are ignored, and its scheduler is restored
    and LoRA switched off afterwards). `lora` is a LoRA .safetensors file or a folder holding
    one, applied at `lora_scale` (see `apply_lora` for the layouts each family reads). With
    `output_dir`, images go to `{index:05d}-{seed}.png` plus `grid-{first index:05d}.png` when
    there are several. Steps and guidance None are the model's own (`default_steps`,
    `pipelines.default_guidance`).

    Args:
        model: A training output_dir, a diffusers folder (SD 1.x/2.x, SDXL, SD 3.x, FLUX.1), a
            cached hub id, a single-file checkpoint or 'demo' (the bundled world model).
        prompt: What to draw.
        negative_prompt: What to steer away from (classifier-free guidance's negative; FLUX.1,
            guidance-distilled, takes none).
        num_images: Images to generate.
        num_inference_steps: Denoising steps (default: the model's own: 30; SD 3.x and
            FLUX.1-dev 28; FLUX.1-schnell 4).
        guidance_scale: Classifier-free guidance scale, 1 disables it (default: the model's
            own: 3 for 'demo' and models trained from it, 7.5 for SD, 7 for SD 3.x); on
            FLUX.1-dev the distilled guidance its transformer takes (default 3.5);
            FLUX.1-schnell has none.
        seed: Image i uses seed + i (None: a random base seed).
        height: Image height in pixels (default: the model's resolution; a multiple of 8, of
            16 for SD 3.x and FLUX.1).
        width: Image width in pixels (default: the model's resolution).
        scheduler: Sampler (default: the model's own scheduler; SD 3.x and FLUX.1 run euler or
            dpm++ only).
        output_dir: Folder the PNGs (and a grid) are written to.
        batch_size: Images per denoiser batch (default: all at once).
        device: cuda, cpu, ... (default: cuda if available).
        dtype: auto = fp16 on CUDA, fp32 elsewhere.
        lora: LoRA .safetensors (diffusers/peft or kohya format) or a folder holding
            pytorch_lora_weights.safetensors.
        lora_scale: LoRA strength (0 = off, 1 = as trained).
    """
    if num_images < 1:
        raise GenerationError(f"num_images={num_images} must be at least 1", param="num_images")
    # What needs no model is checked before one is loaded.
    _check_arguments(prompt, 1 if num_inference_steps is None else num_inference_steps,
                     0.0 if guidance_scale is None else guidance_scale, height, width)
    if isinstance(model, TEXT_TO_IMAGE_PIPELINES):
        pipeline = model
        model_path = pipeline.name_or_path or None
        model_name = Path(model_path or "unknown").name
    else:
        pipeline = load_pipeline(model, device=device, dtype=dtype)
        model_path = model
        model_name = Path(model).name  # a hub id 'org/name' gives 'name', not a snapshot hash
    if num_inference_steps is None:
        num_inference_steps = default_steps(pipeline)
    if guidance_scale is None:
        guidance_scale = default_guidance(pipeline)
    check_scheduler(pipeline, scheduler)
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
    cfg_scale, guidance_fields = a1111_guidance(pipeline, guidance_scale)
    texts = [
        format_parameters(
            prompt=prompt, negative_prompt=negative_prompt, steps=num_inference_steps,
            sampler=sampler, cfg_scale=cfg_scale, seed=image_seed, width=width,
            height=height, model_name=model_name, model_hash=hash_of_model, loras=loras,
            extra=guidance_fields,
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


def a1111_guidance(pipeline, guidance_scale: float) -> tuple[float, dict[str, object]]:
    """`CFG scale` and extra fields of the A1111 `parameters` text for `guidance_scale`.

    FLUX.1 runs no classifier-free guidance, so its `CFG scale` is 1, and FLUX.1-dev's distilled
    guidance goes to `Distilled CFG Scale`, as Stable Diffusion WebUI Forge (A1111's fork that
    runs FLUX.1) writes and reads it.
    """
    kind = traits(pipeline).guidance
    if kind == "cfg":
        return guidance_scale, {}
    if kind == "distilled":
        return 1.0, {"Distilled CFG Scale": float(guidance_scale)}
    return 1.0, {}
