"""What `dreambooth serve` holds while it runs: the served models and LoRAs, the limits that bound
every request (`work`, sizes, steps) and the hand-off of a request to its model's worker.

The route handlers (`dreambooth.serve.routes`, `job_routes`) consult a `ServerState`;
`create_app` (`dreambooth.serve.app`) builds it.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import Request
from PIL import Image

from dreambooth.formats.infotext import lora_hash
from dreambooth.generate import (
    GenerationError,
    check_family_arguments,
    check_scheduler,
    denoiser,
    traits,
)
from dreambooth.models import DEFAULT_GUIDANCE_SCALE, read_training_config
from dreambooth.serve.batching import BatchKey, Job, ModelWorker, QueueFull, WorkerStopped
from dreambooth.serve.metrics import ServeMetrics
from dreambooth.serve.schemas import QUALITY_STEP_FRACTIONS, APIError

_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
# create_app's default `max_work` (see `work`). SD 1.5: 512x512 x 4 images x 50 steps (67) or
# x 10 images x 30 steps (102) fit; SDXL: 1024x1024 x 1 x 50 (107) fits; 10 images of 2048x2048
# at 1 step (SD 1.5: 419) do not.
DEFAULT_MAX_WORK = 128.0
# Latent tokens at which self-attention (quadratic) costs about what the rest of a step
# (linear in tokens) costs: SD's UNet at 128x128 latents.
_ATTENTION_TOKENS = 16384
# The unit of a transformer step's cost: SDXL's UNet (2.57e9 parameters) run for both CFG
# halves. A transformer step costs its parameters x forward passes in these units (FLUX.1-dev,
# 11.9e9 x 1 pass: 2.3; SD 3.5 Large, 8.1e9 x 2: 3.2), at least 1 (SD 3 Medium, 2e9 x 2: 0.8).
_UNIT_PARAMETERS = 2 * 2.57e9


def denoising_steps(key: BatchKey) -> int:
    """The denoising steps a job of `key` runs: edits skip the first (1 - strength) of them."""
    if key.strength is None:
        return key.num_inference_steps
    return int(key.num_inference_steps * key.strength)


def work(key: BatchKey, images: int, vae_scale_factor: int, denoiser_traits: Any = None,
         parameters: int = 0) -> float:
    """A request's cost: megapixels x images x (denoising steps + 1 decode) x attention factor
    x step scale.

    Convolutions cost in proportion to pixels; the VAE decode about one guided UNet step (SD 1.5
    at 512 px: ~1.2 vs 2 x 0.8 TFLOP); self-attention over the latent tokens (UNet and VAE
    mid-block) grows with their square, hence the factor 1 + tokens / 16384 (1.25 for SD 1.5 at
    512 px, 5 at 2048 px; a 2048 px image on a model with 4x latents: 17). UNets have step
    scale 1. A diffusion transformer (`denoiser_traits`: its `pipelines.Traits`; `parameters`:
    its size) attends over its image tokens (2x2 latent pixels each) and the prompt's text
    tokens, and its step scale is its size (see _UNIT_PARAMETERS): FLUX.1-dev at 1024 px, 28
    steps costs 90, as SDXL's 50 steps cost 107.
    """
    megapixels = key.width * key.height / 1e6
    if denoiser_traits is None or not denoiser_traits.flow_matching:
        tokens = (key.width // vae_scale_factor) * (key.height // vae_scale_factor)
        scale = 1.0
    else:
        side = denoiser_traits.patch_pixels
        tokens = (key.width // side) * (key.height // side) + denoiser_traits.text_tokens
        passes = denoiser_traits.denoiser_calls(key.guidance_scale)
        scale = max(1.0, parameters * passes / _UNIT_PARAMETERS)
    return (megapixels * images * (denoising_steps(key) + 1) * (1 + tokens / _ATTENTION_TOKENS)
            * scale)


@dataclass
class ServedModel:
    """A loaded pipeline, what /v1/models reports about it, and the worker that runs it."""

    name: str
    pipeline: Any  # a text-to-image pipeline of any family (generate.TEXT_TO_IMAGE_PIPELINES)
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
    # Read from the pipeline when not given: what its family means for sampling (size multiple,
    # default steps, guidance kind) and its denoiser's parameter count (for `work`).
    traits: Any = field(default=None, repr=False)
    parameters: int = field(default=0, repr=False)

    def __post_init__(self):
        if self.traits is None:
            self.traits = traits(self.pipeline)
            self.parameters = sum(p.numel() for p in denoiser(self.pipeline).parameters())


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
        """Images of `key` one denoiser batch may hold: `max_batch`, fewer when they are large
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

    def check_size(self, width: int, height: int, param: str,
                   served: ServedModel | None = None) -> tuple[int, int]:
        """(width, height) when both are multiples of the model's size multiple (8; 16 for
        SD 3.x and FLUX.1: one image token) up to `max_image_size`, else a 400 naming `param`."""
        multiple = served.traits.size_multiple if served is not None else 8
        if not all(multiple <= side <= self.max_image_size and side % multiple == 0
                   for side in (width, height)):
            model = f" for {served.traits.label} models" if multiple != 8 else ""
            raise APIError(400, f"Invalid value for '{param}': {width}x{height}; width and "
                                f"height must be multiples of {multiple}{model} from {multiple} "
                                f"to {self.max_image_size}.", param=param, code="invalid_size")
        return width, height

    def size(self, text: str | None, served: ServedModel, param: str = "size") -> tuple[int, int]:
        """'WxH' (or None/'auto': the model's native size) as (width, height)."""
        if text is None or text == "auto":
            return served.native_size, served.native_size
        match = _SIZE.fullmatch(text.strip())
        if match is None:
            raise APIError(400, f"Invalid value for '{param}': '{text}' is not WIDTHxHEIGHT "
                                "(e.g. '512x512') or 'auto'.", param=param, code="invalid_size")
        return self.check_size(int(match[1]), int(match[2]), param, served)

    def steps(self, served: ServedModel, num_inference_steps: int | None, quality: str | None,
              param: str = "num_inference_steps") -> int:
        """The steps asked for, else `quality`'s share of the model's own steps."""
        fraction = QUALITY_STEP_FRACTIONS[quality or "auto"]
        steps = num_inference_steps or max(1, round(served.traits.default_steps * fraction))
        if steps > self.max_steps:
            raise APIError(400, f"Invalid value for '{param}': {steps} steps is more than this "
                                f"server's limit of {self.max_steps}.", param=param,
                           code="invalid_value")
        return steps

    def batch_key(self, served: ServedModel, task: str, size: tuple[int, int], steps: int, *,
                  guidance_scale: float | None, scheduler: str | None, lora: str | None,
                  lora_scale: float, strength: float | None = None,
                  steps_param: str = "num_inference_steps") -> BatchKey:
        """What a request's images share with the others of their denoiser batch.

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

    def check_family(self, served: ServedModel, job: Job,
                     params: Mapping[str, str] | None = None) -> None:
        """400 for what the model's family cannot run (`generate.check_family_arguments`: a
        sampler of the other kind, a negative prompt or guidance FLUX.1 does not take), checked
        before queueing: a failing request must not fail the batch it would share. `params`
        renames our argument names to the request's fields (A1111's `sampler_name`, ...)."""
        key = job.key
        try:
            check_scheduler(served.pipeline, key.scheduler)
            check_family_arguments(served.pipeline, negative_prompts=job.negative_prompts,
                                   guidance_scale=key.guidance_scale, height=key.height,
                                   width=key.width)
        except GenerationError as error:
            param = (params or {}).get(error.param, error.param)
            raise APIError(400, f"Invalid value for '{param}': {error}", param=param,
                           code="invalid_value") from error

    def check_cost(self, served: ServedModel, job: Job) -> None:
        """400 for a request over the work budget, or with an image over the batch memory."""
        key = job.key
        if key.width * key.height > self.max_batch_pixels:
            raise APIError(400, f"A {key.width}x{key.height} image is more than this server's "
                                f"{self.max_batch_pixels / 1e6:g} megapixels per batch "
                                "(--max_batch_megapixels); ask for a smaller size.",
                           param="size", code="over_budget")
        cost = work(key, job.size, served.vae_scale_factor, served.traits, served.parameters)
        if cost > self.max_work:
            raise APIError(400, f"This request asks for {cost:.0f} units of work ({job.size} "
                                f"image(s) of {key.width}x{key.height}, {denoising_steps(key)} "
                                f"denoising steps); this server's limit is "
                                f"{self.max_work:g} (--max_work): ask for fewer or smaller "
                                "images or fewer steps.", param="n", code="over_budget")

    async def run(self, served: ServedModel, job: Job, request: Request,
                  params: Mapping[str, str] | None = None) -> list[Image.Image]:
        """The job's images from its model's worker; the job is cancelled (dropped from the
        queue, or its batch interrupted) if the client disconnects first. `params`: see
        `check_family`."""
        self.check_family(served, job, params)
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
