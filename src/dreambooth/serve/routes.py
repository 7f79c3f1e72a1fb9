"""The routes of `dreambooth serve`: what each API's request means and how its answer looks.

Handlers validate (pydantic bodies from `dreambooth.serve.schemas`, then the limits in
`ServerState`), turn a request into a `Job` for its model's worker (`dreambooth.serve.batching`)
and encode the images the worker returns: base64 PNG (with AUTOMATIC1111 `parameters`), JPEG or
WebP, as each API wants.
`router` needs the API key when one is set; `public_router` (/healthz) never does.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from PIL import Image, features
from PIL.PngImagePlugin import PngInfo
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from safetensors import SafetensorError, safe_open
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from dreambooth.formats.infotext import format_parameters
from dreambooth.generate import (
    IMG2IMG_STRENGTH,
    INPAINT_STRENGTH,
    SCHEDULERS,
    a1111_guidance,
    sampler_name,
    schedulers_for,
)
from dreambooth.images import ImageFormatError, ImageReadError, ImageTooLargeError, read_image
from dreambooth.serve.batching import Job
from dreambooth.serve.schemas import (
    MAX_IMAGES,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    APIError,
    ChatCompletionRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    Txt2ImgRequest,
    parse,
)
from dreambooth.serve.state import (
    ServedModel,
    ServerState,
)

logger = logging.getLogger(__name__)

_UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
_A1111_SAMPLERS = {sampler: name for name, (_, sampler) in SCHEDULERS.items()}  # UNets'


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _seeds(seed: int | None, n: int) -> list[int]:
    """Image i gets seed + i, as with `dreambooth generate`; no seed: a random base seed."""
    base = secrets.randbelow(MAX_SEED + 2 - n) if seed is None else seed
    return [base + offset for offset in range(n)]


def _sampler(served: ServedModel, scheduler: str | None) -> str:
    """The A1111 sampler name of `scheduler` on the model (None: its own scheduler's)."""
    return sampler_name(served.pipeline, scheduler) if scheduler else served.default_sampler


def _parameters(served: ServedModel, job: Job, seed_index: int,
                lora_hashes: Mapping[str, str]) -> str:
    """The A1111 `parameters` text a PNG answer carries: a LoRA as `<lora:NAME:W>` in the
    prompt and its hash in `Lora hashes`, so pasting the text into A1111 applies it again."""
    key = job.key
    sampler = _sampler(served, key.scheduler)
    cfg_scale, extra = a1111_guidance(served.pipeline, key.guidance_scale)
    if key.strength is not None:
        extra["Denoising strength"] = key.strength
    loras = None
    if key.lora is not None:
        loras = [(key.lora, key.lora_scale, lora_hashes.get(key.lora))]
    return format_parameters(
        prompt=job.prompts[seed_index], negative_prompt=job.negative_prompts[seed_index],
        steps=key.num_inference_steps, sampler=sampler, cfg_scale=cfg_scale,
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
    images = await state.run(served, job, request, params=_SIZE_PARAMS)
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
                          state.steps(served, body.num_inference_steps, body.quality),
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
        size = state.check_size(image.width, image.height, "image", served)
    else:
        size = state.size(body.size, served)
    strength = body.strength
    if strength is None:
        strength = INPAINT_STRENGTH if mask else IMG2IMG_STRENGTH
    key = state.batch_key(served, "inpaint" if mask else "img2img", size,
                          state.steps(served, body.num_inference_steps, body.quality),
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
                          state.steps(served, body.num_inference_steps, None),
                          guidance_scale=body.guidance_scale, scheduler=body.scheduler,
                          lora=body.lora, lora_scale=body.lora_scale)
    job = Job(key, [prompt] * body.n, [body.negative_prompt] * body.n, _seeds(body.seed, body.n))
    images = await state.run(served, job, request, params=_SIZE_PARAMS)
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
        valid = {sampler: name for name, (_, sampler) in schedulers_for(served.pipeline).items()}
        if body.sampler_name not in valid:
            kind = (f" on {served.traits.label} models" if body.sampler_name in _A1111_SAMPLERS
                    else "")
            raise APIError(400, f"Invalid value for 'sampler_name': '{body.sampler_name}'"
                                f"{kind}; valid: {', '.join(valid)}.", param="sampler_name",
                           code="invalid_value")
        scheduler = valid[body.sampler_name]
    guidance_scale = _a1111_guidance_scale(body, served)
    count = body.batch_size * body.n_iter
    if count > MAX_IMAGES:
        raise APIError(400, f"batch_size * n_iter = {count} images; the limit is "
                            f"{MAX_IMAGES}.",
                       param="batch_size", code="invalid_value")
    width, height = state.check_size(body.width or served.native_size,
                                     body.height or served.native_size, "width", served)
    key = state.batch_key(served, "txt2img", (width, height),
                          state.steps(served, body.steps, None, param="steps"),
                          guidance_scale=guidance_scale, scheduler=scheduler, lora=body.lora,
                          lora_scale=body.lora_scale, steps_param="steps")
    job = Job(key, [body.prompt] * count, [body.negative_prompt] * count,
              _seeds(None if body.seed == -1 else body.seed, count))
    images = await state.run(served, job, request, params=_A1111_PARAMS)
    encoded = await _encode_all(state, served, job, images, "png", None)
    infotexts = [_parameters(served, job, index, state.lora_hashes)
                 for index in range(count)]
    cfg_scale, fields = a1111_guidance(served.pipeline, key.guidance_scale)
    info = {"prompt": body.prompt, "negative_prompt": body.negative_prompt,
            "seed": job.seeds[0], "all_seeds": job.seeds, "steps": key.num_inference_steps,
            "cfg_scale": cfg_scale, "width": width, "height": height,
            "sampler_name": _sampler(served, scheduler),
            "sd_model_name": served.name, "infotexts": infotexts}
    if "Distilled CFG Scale" in fields:
        info["distilled_cfg_scale"] = fields["Distilled CFG Scale"]
    return {"images": encoded, "parameters": body.model_dump(), "info": json.dumps(info)}


# Our argument names -> A1111's request fields, for the errors of `check_family`.
_A1111_PARAMS = {"guidance_scale": "cfg_scale", "height": "height", "width": "width"}
# ... and the OpenAI and OpenRouter requests' (`size`).
_SIZE_PARAMS = {"height": "size", "width": "size"}


def _a1111_guidance_scale(body: Txt2ImgRequest, served: ServedModel) -> float | None:
    """The guidance of an A1111 request: `cfg_scale` (classifier-free guidance), or on FLUX.1
    Forge's `distilled_cfg_scale` (None: the model's own), where `cfg_scale` would be true CFG,
    which this server does not run: sent, it must be 1. `distilled_cfg_scale` is ignored by
    models without distilled guidance, as Forge ignores it."""
    kind = served.traits.guidance
    if kind == "cfg":
        return body.cfg_scale
    if "cfg_scale" in body.model_fields_set and body.cfg_scale != 1:
        raise APIError(400, f"Invalid value for 'cfg_scale': {body.cfg_scale:g}; "
                            f"{served.traits.label} models run without classifier-free "
                            "guidance here: send cfg_scale 1 (or none) and "
                            + ("distilled_cfg_scale for their guidance." if kind == "distilled"
                               else "no guidance."), param="cfg_scale", code="invalid_value")
    return body.distilled_cfg_scale if kind == "distilled" else None
