"""The routes of `dreambooth serve`: what each API's request means and how its answer looks.

Handlers validate (pydantic bodies from `dreambooth.serve.schemas`, then the limits in
`ServerState`), turn a request into a `Job` for its model's worker (`dreambooth.serve.batching`)
and encode the images the worker returns: base64 PNG (with AUTOMATIC1111 `parameters`), JPEG or
WebP, as each API wants.
`router` needs the API key when one is set; `public_router` (/healthz) never does.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from diffusers import StableDiffusionPipeline
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from PIL import Image, features
from PIL.PngImagePlugin import PngInfo
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from safetensors import SafetensorError, safe_open
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from dreambooth.formats.infotext import format_parameters, lora_hash
from dreambooth.generate import IMG2IMG_STRENGTH, INPAINT_STRENGTH, SCHEDULERS
from dreambooth.images import ImageFormatError, ImageReadError, ImageTooLargeError, read_image
from dreambooth.models import DEFAULT_GUIDANCE_SCALE, read_training_config
from dreambooth.serve.batching import BatchKey, Job, ModelWorker, QueueFull, WorkerStopped
from dreambooth.serve.metrics import ServeMetrics
from dreambooth.serve.schemas import (
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    QUALITY_STEPS,
    APIError,
    ChatCompletionRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    Txt2ImgRequest,
    parse,
)

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
_UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
_A1111_SAMPLERS = {sampler: name for name, (_, sampler) in SCHEDULERS.items()}
# create_app's default `max_work` (see `work`). SD 1.5: 512x512 x 4 images x 50 steps (67) or
# x 10 images x 30 steps (102) fit; SDXL: 1024x1024 x 1 x 50 (107) fits; 10 images of 2048x2048
# at 1 step (SD 1.5: 419) do not.
DEFAULT_MAX_WORK = 128.0
# Latent tokens at which self-attention (quadratic) costs about what the rest of a step
# (linear in tokens) costs: SD's UNet at 128x128 latents.
_ATTENTION_TOKENS = 16384


def denoising_steps(key: BatchKey) -> int:
    """The UNet steps a job of `key` runs: edits skip the first (1 - strength) of them."""
    if key.strength is None:
        return key.num_inference_steps
    return int(key.num_inference_steps * key.strength)


def work(key: BatchKey, images: int, vae_scale_factor: int) -> float:
    """A request's cost: megapixels x images x (denoising steps + 1 decode) x attention factor.

    Convolutions cost in proportion to pixels; the VAE decode about one guided UNet step (SD 1.5
    at 512 px: ~1.2 vs 2 x 0.8 TFLOP); self-attention over the latent tokens (UNet and VAE
    mid-block) grows with their square, hence the factor 1 + tokens / 16384 (1.25 for SD 1.5 at
    512 px, 5 at 2048 px; a 2048 px image on a model with 4x latents: 17).
    """
    tokens = (key.width // vae_scale_factor) * (key.height // vae_scale_factor)
    megapixels = key.width * key.height / 1e6
    return megapixels * images * (denoising_steps(key) + 1) * (1 + tokens / _ATTENTION_TOKENS)


@dataclass
class ServedModel:
    """A loaded pipeline, what /v1/models reports about it, and the worker that runs it."""

    name: str
    pipeline: StableDiffusionPipeline
    trigger_phrase: str | None  # the instance prompt of a DreamBooth model; None for a base model
    created: int
    default_sampler: str  # A1111 name of the pipeline's own scheduler
    native_size: int
    default_guidance_scale: float = DEFAULT_GUIDANCE_SCALE  # when a request names none
    min_steps: int = 1  # the fewest steps the model's own scheduler can run
    vae_scale_factor: int = 8  # pixels per latent pixel
    worker: ModelWorker | None = None
    folder: Path | None = None  # where it was loaded from (fine-tuning jobs train from it)
    lora: str | None = None  # a LoRA applied when a request names none (a LoRA job's model)


def read_trigger_phrase(folder: Path | None) -> str | None:
    """The `instance_prompt` in a trained model's training_config.yaml; None when there is none."""
    prompt = read_training_config(folder).get("instance_prompt")
    return prompt if isinstance(prompt, str) and prompt.strip() else None


class ServerState:
    """Loaded models, registered LoRAs and limits; what the route handlers consult."""

    def __init__(self, models: dict[str, ServedModel], loras: dict[str, Path],
                 metrics: ServeMetrics, *, max_image_size: int, max_steps: int,
                 max_work: float = DEFAULT_MAX_WORK, max_batch: int = 8,
                 max_batch_megapixels: float = 4.2, shutdown_timeout_s: float = 2.0):
        # Replaced, never changed in place, when a model is registered at runtime: a request
        # iterating them meanwhile sees the old or the new dict.
        self.models, self.loras, self.metrics = models, loras, metrics
        self.lora_hashes = {name: lora_hash(path) for name, path in loras.items()}
        self._registering = threading.Lock()
        self.started = False
        # Set by create_app: loads a pipeline folder as a ServedModel with its worker.
        self.load_model: Callable[[str, Path], ServedModel] | None = None
        self.jobs = None  # the fine-tuning jobs (dreambooth.serve.job_routes.Jobs), if enabled
        self.max_image_size, self.max_steps = max_image_size, max_steps
        self.max_work, self.max_batch = max_work, max_batch
        self.max_batch_pixels = max_batch_megapixels * 1e6
        self.shutdown_timeout_s = shutdown_timeout_s

    def batch_limit(self, key: BatchKey) -> int:
        """Images of `key` one UNet batch may hold: `max_batch`, fewer when they are large
        (memory grows with pixels x batch)."""
        return max(1, min(self.max_batch, int(self.max_batch_pixels // (key.width * key.height))))

    def workers(self) -> list[ModelWorker]:
        """Every model worker once (a LoRA job's model shares its base model's worker)."""
        return list({id(served.worker): served.worker for served in self.models.values()}
                    .values())

    def stop_accepting(self) -> None:
        """Shutdown begins: queued requests get 503, running batches are interrupted."""
        for worker in self.workers():
            worker.stop_accepting()

    def register_model(self, name: str, folder: Path) -> ServedModel:
        """Load the pipeline at `folder` and serve it as `name` from now on."""
        served = self.load_model(name, folder)
        with self._registering:
            if self.started:
                served.worker.start()
            self.models = {**self.models, name: served}
        return served

    def register_lora_model(self, name: str, base: str, lora: Path,
                            trigger_phrase: str | None) -> ServedModel:
        """Serve `base` with the LoRA file `lora` applied as the model `name` (the LoRA is also
        listed under that name); it shares the base model's pipeline and worker."""
        with self._registering:
            base_model = self.models[base]
            served = replace(base_model, name=name, trigger_phrase=trigger_phrase,
                             created=int(time.time()), folder=None, lora=name)
            self.lora_hashes = {**self.lora_hashes, name: lora_hash(lora)}
            self.loras = {**self.loras, name: lora}
            self.models = {**self.models, name: served}
        return served

    def unregister_model(self, name: str) -> None:
        """Stop serving `name` (a deleted fine-tuning job's model): requests for it get 404 from
        now on; its worker stops unless another model shares it (a LoRA job's base)."""
        with self._registering:
            served = self.models.get(name)
            if served is None:
                return
            self.models = {key: value for key, value in self.models.items() if key != name}
            if served.lora == name:
                self.loras = {key: value for key, value in self.loras.items() if key != name}
                self.lora_hashes = {key: value for key, value in self.lora_hashes.items()
                                    if key != name}
            shared = any(other.worker is served.worker for other in self.models.values())
        if served.worker is not None and not shared:
            served.worker.stop(self.shutdown_timeout_s)

    def model(self, name: str | None, param: str = "model") -> ServedModel:
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise APIError(404, f"The model '{name}' does not exist; this server serves: "
                                f"{', '.join(self.models)}.", param=param, code="model_not_found")
        return self.models[name]

    def lora(self, name: str | None) -> str | None:
        """A registered LoRA name (the batch runner maps it to its file), or None."""
        if name is not None and name not in self.loras:
            known = ", ".join(self.loras) or "none (start the server with --lora NAME=PATH)"
            raise APIError(404, f"The LoRA '{name}' does not exist; this server has: {known}.",
                           param="lora", code="lora_not_found")
        return name

    def check_size(self, width: int, height: int, param: str) -> tuple[int, int]:
        if not all(8 <= side <= self.max_image_size and side % 8 == 0 for side in (width, height)):
            raise APIError(400, f"Invalid value for '{param}': {width}x{height}; width and "
                                f"height must be multiples of 8 from 8 to {self.max_image_size}.",
                           param=param, code="invalid_size")
        return width, height

    def size(self, text: str | None, served: ServedModel, param: str = "size") -> tuple[int, int]:
        """'WxH' (or None/'auto': the model's native size) as (width, height)."""
        if text is None or text == "auto":
            return served.native_size, served.native_size
        match = _SIZE.fullmatch(text.strip())
        if match is None:
            raise APIError(400, f"Invalid value for '{param}': '{text}' is not WIDTHxHEIGHT "
                                "(e.g. '512x512') or 'auto'.", param=param, code="invalid_size")
        return self.check_size(int(match[1]), int(match[2]), param)

    def steps(self, num_inference_steps: int | None, quality: str | None,
              param: str = "num_inference_steps") -> int:
        steps = num_inference_steps or QUALITY_STEPS[quality or "auto"]
        if steps > self.max_steps:
            raise APIError(400, f"Invalid value for '{param}': {steps} steps is more than this "
                                f"server's limit of {self.max_steps}.", param=param,
                           code="invalid_value")
        return steps

    def batch_key(self, served: ServedModel, task: str, size: tuple[int, int], steps: int, *,
                  guidance_scale: float | None, scheduler: str | None, lora: str | None,
                  lora_scale: float, strength: float | None = None,
                  steps_param: str = "num_inference_steps") -> BatchKey:
        """What a request's images share with the others of their UNet batch.

        `guidance_scale` None is the model's own; `lora` must be registered (else 404).
        """
        if guidance_scale is None:
            guidance_scale = served.default_guidance_scale
        # Every sampler we name runs from 1 step; a model's own PNDM with warm-up needs more.
        needed = 1 if scheduler is not None else served.min_steps
        if steps < needed:
            raise APIError(400, f"Invalid value for '{steps_param}': {steps}; this model's own "
                                f"sampler needs at least {needed} steps. Ask for more, or pass "
                                "another scheduler (e.g. 'pndm', A1111 'PLMS').",
                           param=steps_param, code="invalid_value")
        return BatchKey(task, *size, steps, guidance_scale, scheduler,
                        self.lora(lora) if lora is not None else served.lora, lora_scale, strength)

    def check_cost(self, served: ServedModel, job: Job) -> None:
        """400 for a request over the work budget, or with an image over the batch memory."""
        key = job.key
        if key.width * key.height > self.max_batch_pixels:
            raise APIError(400, f"A {key.width}x{key.height} image is more than this server's "
                                f"{self.max_batch_pixels / 1e6:g} megapixels per batch "
                                "(--max_batch_megapixels); ask for a smaller size.",
                           param="size", code="over_budget")
        cost = work(key, job.size, served.vae_scale_factor)
        if cost > self.max_work:
            raise APIError(400, f"This request asks for {cost:.0f} units of work ({job.size} "
                                f"image(s) of {key.width}x{key.height}, {denoising_steps(key)} "
                                f"denoising steps); this server's limit is "
                                f"{self.max_work:g} (--max_work): ask for fewer or smaller "
                                "images or fewer steps.", param="n", code="over_budget")

    async def run(self, served: ServedModel, job: Job, request: Request) -> list[Image.Image]:
        """The job's images from its model's worker; the job is cancelled (dropped from the
        queue, or its batch interrupted) if the client disconnects first."""
        self.check_cost(served, job)
        answer = asyncio.ensure_future(served.worker.submit(job))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():
                answer.cancel()  # also when this handler itself is cancelled
        if not answer.done() or answer.cancelled():
            raise APIError(499, "The client closed the request.", code="client_closed")
        try:
            return answer.result()
        except QueueFull as error:
            raise APIError(429, f"{error} (the limit, --max_queue); retry shortly.",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from error
        except WorkerStopped as error:
            raise APIError(503, str(error), type="server_error", code="shutting_down") from error


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body was read: what comes next is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _seeds(seed: int | None, n: int) -> list[int]:
    """Image i gets seed + i, as with `dreambooth generate`; no seed: a random base seed."""
    base = secrets.randbelow(MAX_SEED + 2 - n) if seed is None else seed
    return [base + offset for offset in range(n)]


def _parameters(served: ServedModel, job: Job, seed_index: int,
                lora_hashes: Mapping[str, str]) -> str:
    """The A1111 `parameters` text a PNG answer carries: a LoRA as `<lora:NAME:W>` in the
    prompt and its hash in `Lora hashes`, so pasting the text into A1111 applies it again."""
    key = job.key
    sampler = SCHEDULERS[key.scheduler][1] if key.scheduler else served.default_sampler
    extra: dict[str, object] = {}
    if key.strength is not None:
        extra["Denoising strength"] = key.strength
    loras = None
    if key.lora is not None:
        loras = [(key.lora, key.lora_scale, lora_hashes.get(key.lora))]
    return format_parameters(
        prompt=job.prompts[seed_index], negative_prompt=job.negative_prompts[seed_index],
        steps=key.num_inference_steps, sampler=sampler, cfg_scale=key.guidance_scale,
        seed=job.seeds[seed_index], width=key.width, height=key.height,
        model_name=served.name, extra=extra, loras=loras)


def encode_image(image: Image.Image, output_format: str, quality: int | None,
                 parameters: str) -> bytes:
    """PNG (with the A1111 `parameters` text chunk), JPEG or WebP bytes."""
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngInfo()
        info.add_text("parameters", parameters)
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        image.convert("RGB").save(buffer, format=output_format.upper(),
                                  quality=95 if quality is None else quality)
    return buffer.getvalue()


async def _encode_all(state: ServerState, served: ServedModel, job: Job,
                      images: list[Image.Image], output_format: str,
                      quality: int | None) -> list[str]:
    """Base64 of every image, encoded off the event loop."""

    def encode() -> list[str]:
        return [base64.b64encode(encode_image(
            image, output_format, quality,
            _parameters(served, job, index, state.lora_hashes))).decode("ascii")
            for index, image in enumerate(images)]

    return await run_in_threadpool(encode)


async def _images_answer(state: ServerState, served: ServedModel, job: Job,
                         body: ImageGenerationRequest, request: Request) -> dict:
    output_format = body.output_format or "png"
    if output_format == "webp" and not features.check("webp"):
        raise APIError(400, "output_format 'webp' needs Pillow built with libwebp; ask for png "
                            "or jpeg.", param="output_format", code="unsupported_format")
    images = await state.run(served, job, request)
    encoded = await _encode_all(state, served, job, images, output_format, body.output_compression)
    # response_format "url" is answered with data: URLs; this server hosts no files.
    if body.response_format == "url":
        data = [{"url": f"data:image/{output_format};base64,{b64}"} for b64 in encoded]
    else:
        data = [{"b64_json": b64} for b64 in encoded]
    for item, seed in zip(data, job.seeds):
        item["seed"] = seed  # our extra: reproduce an image with extra_body={"seed": ...}
    return {"created": int(time.time()), "data": data, "background": "opaque",
            "output_format": output_format, "quality": body.quality or "auto",
            "size": f"{job.key.width}x{job.key.height}"}


router = APIRouter()
public_router = APIRouter()


@public_router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(state: ServerState = Depends(_state)) -> Response:
    for worker in state.workers():
        state.metrics.queue_depth.labels(worker.name).set(worker.depth)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def lora_trigger_phrase(path: Path) -> str | None:
    """The ModelSpec `modelspec.trigger_phrase` our LoRA files carry in their metadata."""
    try:
        with safe_open(str(path), framework="pt") as weights:
            metadata = weights.metadata() or {}
    except (OSError, SafetensorError) as error:
        logger.warning("cannot read the metadata of %s (%s): no trigger phrase", path, error)
        return None
    return metadata.get("modelspec.trigger_phrase") or None


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(_state)) -> dict:
    loras = [{"id": name, "trigger_phrase": lora_trigger_phrase(path)}
             for name, path in state.loras.items()]
    data = [{"id": served.name, "object": "model", "created": served.created,
             "owned_by": "dreambooth", "personalized": served.trigger_phrase is not None,
             "trigger_phrase": served.trigger_phrase, "loras": loras}
            for served in state.models.values()]
    return {"object": "list", "data": data}


@router.post("/v1/images/generations")
async def images_generations(body: ImageGenerationRequest, request: Request,
                             state: ServerState = Depends(_state)) -> dict:
    served = state.model(body.model)
    key = state.batch_key(served, "txt2img", state.size(body.size, served),
                          state.steps(body.num_inference_steps, body.quality),
                          guidance_scale=body.guidance_scale, scheduler=body.scheduler,
                          lora=body.lora, lora_scale=body.lora_scale)
    job = Job(key, [body.prompt] * body.n, [body.negative_prompt] * body.n,
              _seeds(body.seed, body.n))
    return await _images_answer(state, served, job, body, request)


def decode_upload(data: bytes, param: str, max_side: int, *, upright: bool) -> Image.Image:
    """A PNG, JPEG or WebP upload, fully decoded; anything else is a 400 naming `param`.

    `upright` turns it by its EXIF orientation (see `dreambooth.images.read_image`).
    """
    try:
        return read_image(data, formats=_UPLOAD_FORMATS, max_side=max_side, upright=upright)
    except ImageFormatError as error:
        raise APIError(400, f"'{param}' is a {error.format} file; send PNG, JPEG or WebP.",
                       param=param, code="invalid_image_format") from error
    except ImageTooLargeError as error:
        width, height = error.size
        raise APIError(400, f"'{param}' is {width}x{height}; the largest accepted side is "
                            f"{max_side} pixels.", param=param, code="image_too_large") from error
    except ImageReadError as error:
        raise APIError(400, f"'{param}' is not a readable image: {error.reason}", param=param,
                       code="invalid_image") from error


def inpaint_mask(mask: Image.Image, image_size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (alpha 0 marks the area to change) as diffusers' (white repaints)."""
    if mask.size != image_size:
        raise APIError(400, f"'mask' is {mask.width}x{mask.height} but 'image' is "
                            f"{image_size[0]}x{image_size[1]}; they must have the same size.",
                       param="mask", code="invalid_mask")
    if "A" not in mask.getbands() and "transparency" not in mask.info:
        raise APIError(400, "'mask' has no alpha channel: send a PNG whose fully transparent "
                            "pixels (alpha 0) mark the area to change.", param="mask",
                       code="invalid_mask")
    alpha = mask.convert("RGBA").getchannel("A")
    repaint = alpha.point(lambda value: 255 if value == 0 else 0)
    if repaint.getbbox() is None:
        raise APIError(400, "'mask' has no fully transparent pixel, so there is nothing to "
                            "change.", param="mask", code="invalid_mask")
    return repaint


async def _read_edit_form(request: Request) -> tuple[dict[str, str], list[UploadFile],
                                                     list[UploadFile]]:
    """(text fields, image uploads, mask uploads) of a multipart edit request."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "Send the edit as multipart/form-data with an 'image' file (as the "
                            "openai client does).", param="image", code="invalid_content_type")
    fields: dict[str, str] = {}
    files: dict[str, list[UploadFile]] = {}
    form = await request.form(max_files=4, max_fields=64)
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.setdefault(name, []).append(value)
        else:
            fields[name] = value
    images = files.pop("image", []) + files.pop("image[]", [])
    masks = files.pop("mask", [])
    if files:
        raise APIError(400, f"Unrecognized file field: {', '.join(files)}; send 'image' and "
                            "optionally 'mask'.", param=next(iter(files)),
                       code="unknown_parameter")
    if not images:
        raise APIError(400, "Missing required parameter: 'image'.", param="image",
                       code="missing_required_parameter")
    if len(images) > 1 or len(masks) > 1:
        raise APIError(400, "Send one 'image' (and at most one 'mask'): this server edits one "
                            "picture per request.", param="image", code="invalid_value")
    return fields, images, masks


@router.post("/v1/images/edits")
async def images_edits(request: Request, state: ServerState = Depends(_state)) -> dict:
    fields, images, masks = await _read_edit_form(request)
    body = parse(ImageEditRequest, fields)
    served = state.model(body.model)
    limit = 2 * state.max_image_size
    # Phone photos store their rotation in EXIF; the mask is read as stored.
    image = decode_upload(await images[0].read(), "image", limit, upright=True).convert("RGB")
    mask = None
    if masks:
        mask = inpaint_mask(decode_upload(await masks[0].read(), "mask", limit, upright=False),
                            image.size)
    if body.size is None or body.size == "auto":
        size = state.check_size(image.width, image.height, "image")
    else:
        size = state.size(body.size, served)
    strength = body.strength
    if strength is None:
        strength = INPAINT_STRENGTH if mask else IMG2IMG_STRENGTH
    key = state.batch_key(served, "inpaint" if mask else "img2img", size,
                          state.steps(body.num_inference_steps, body.quality),
                          guidance_scale=body.guidance_scale, scheduler=body.scheduler,
                          lora=body.lora, lora_scale=body.lora_scale, strength=strength)
    # Checked here, not left to edit_images: one failing request would fail its whole batch.
    if int(key.num_inference_steps * strength) < 1:
        raise APIError(400, f"num_inference_steps={key.num_inference_steps} with strength="
                            f"{strength} leaves no denoising step; raise either.",
                       param="strength", code="invalid_value")
    job = Job(key, [body.prompt] * body.n, [body.negative_prompt] * body.n,
              _seeds(body.seed, body.n), images=[image] * body.n,
              masks=[mask] * body.n if mask else None)
    return await _images_answer(state, served, job, body, request)


def _chat_prompt(body: ChatCompletionRequest) -> str:
    """The text of the last user message."""
    user_messages = [message for message in body.messages if message.role == "user"]
    if not user_messages:
        raise APIError(400, "Invalid value for 'messages': no message with role 'user' holds "
                            "the prompt.", param="messages", code="invalid_value")
    content = user_messages[-1].content
    if isinstance(content, list):
        if any(part.type != "text" for part in content):
            raise APIError(400, "Only text parts are read here; to edit a picture, send it to "
                                "/v1/images/edits.", param="messages", code="invalid_value")
        content = "\n".join(part.text or "" for part in content)
    if not content or not content.strip():
        raise APIError(400, "The last user message has no text to draw.", param="messages",
                       code="invalid_value")
    if len(content) > MAX_PROMPT_CHARS:
        raise APIError(400, f"The prompt has {len(content)} characters; the limit is "
                            f"{MAX_PROMPT_CHARS}.", param="messages", code="invalid_value")
    return content


@router.post("/v1/chat/completions")
@router.post("/api/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: ServerState = Depends(_state)) -> dict:
    if body.modalities is None or "image" not in body.modalities:
        raise APIError(400, "This server generates images only: pass \"modalities\": "
                            "[\"image\", \"text\"].", param="modalities", code="invalid_value")
    if body.stream:
        raise APIError(400, "Streaming is not supported; send \"stream\": false.",
                       param="stream", code="invalid_value")
    prompt = _chat_prompt(body)
    served = state.model(body.model)
    key = state.batch_key(served, "txt2img", state.size(body.size, served),
                          state.steps(body.num_inference_steps, None),
                          guidance_scale=body.guidance_scale, scheduler=body.scheduler,
                          lora=body.lora, lora_scale=body.lora_scale)
    job = Job(key, [prompt] * body.n, [body.negative_prompt] * body.n, _seeds(body.seed, body.n))
    images = await state.run(served, job, request)
    encoded = await _encode_all(state, served, job, images, "png", None)
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}
             for b64 in encoded]
    message = {"role": "assistant", "content": "", "images": parts}
    return {"id": f"gen-{secrets.token_hex(12)}", "object": "chat.completion",
            "created": int(time.time()), "model": served.name,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}


@router.post("/sdapi/v1/txt2img")
async def a1111_txt2img(body: Txt2ImgRequest, request: Request,
                        state: ServerState = Depends(_state)) -> dict:
    served = state.model(body.override_settings.sd_model_checkpoint,
                         param="override_settings.sd_model_checkpoint")
    scheduler = None
    if body.sampler_name is not None:
        if body.sampler_name not in _A1111_SAMPLERS:
            raise APIError(400, f"Invalid value for 'sampler_name': '{body.sampler_name}'; "
                                f"valid: {', '.join(_A1111_SAMPLERS)}.", param="sampler_name",
                           code="invalid_value")
        scheduler = _A1111_SAMPLERS[body.sampler_name]
    count = body.batch_size * body.n_iter
    if count > MAX_IMAGES:
        raise APIError(400, f"batch_size * n_iter = {count} images; the limit is "
                            f"{MAX_IMAGES}.",
                       param="batch_size", code="invalid_value")
    width, height = state.check_size(body.width or served.native_size,
                                     body.height or served.native_size, "width")
    key = state.batch_key(served, "txt2img", (width, height),
                          state.steps(body.steps, None, param="steps"),
                          guidance_scale=body.cfg_scale, scheduler=scheduler, lora=body.lora,
                          lora_scale=body.lora_scale, steps_param="steps")
    job = Job(key, [body.prompt] * count, [body.negative_prompt] * count,
              _seeds(None if body.seed == -1 else body.seed, count))
    images = await state.run(served, job, request)
    encoded = await _encode_all(state, served, job, images, "png", None)
    infotexts = [_parameters(served, job, index, state.lora_hashes)
                 for index in range(count)]
    info = {"prompt": body.prompt, "negative_prompt": body.negative_prompt,
            "seed": job.seeds[0], "all_seeds": job.seeds, "steps": key.num_inference_steps,
            "cfg_scale": body.cfg_scale, "width": width, "height": height,
            "sampler_name": SCHEDULERS[scheduler][1] if scheduler else served.default_sampler,
            "sd_model_name": served.name, "infotexts": infotexts}
    return {"images": encoded, "parameters": body.model_dump(), "info": json.dumps(info)}
