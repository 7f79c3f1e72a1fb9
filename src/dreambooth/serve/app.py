"""`dreambooth serve`: personalized models behind the image APIs clients already speak.

One FastAPI app serves OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`,
`/v1/models`), OpenRouter's image-output chat completions (`/api/v1/chat/completions`, also at
`/v1/chat/completions`) and AUTOMATIC1111's `/sdapi/v1/txt2img`, plus `/healthz` and Prometheus
`/metrics`, and a web UI at `/` (`dreambooth.serve.ui`). A client written for OpenAI or
OpenRouter switches by changing `base_url`.

The server validates a request, calls the generation API of `dreambooth.generate`
(`sampling_settings`, `sample_images`, `edit_images`: the functions the CLI uses) through the
batching scheduler of `dreambooth.serve.batching`, and encodes the answer; it holds no model
logic. Every error is OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`. The
routes are in `dreambooth.serve.routes`, the served models and limits they consult in
`dreambooth.serve.state`, the Prometheus metrics in `dreambooth.serve.metrics`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

from diffusers import StableDiffusionPipeline
from PIL import Image

from dreambooth.formats.lora_files import LoraFileError, lora_file
from dreambooth.generate import (
    TEXT_TO_IMAGE_PIPELINES,
    GenerationError,
    default_guidance,
    default_size,
    denoiser,
    edit_images,
    min_steps,
    sample_images,
    sampling_settings,
    set_scheduler,
)
from dreambooth.models import load_pipeline, resolve_model_path
from dreambooth.serve.batching import BatchInterrupted, BatchKey, Job, ModelWorker

try:
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from dreambooth.serve.job_guard import JobLocked
    from dreambooth.serve.job_routes import JOBS_PATH, Jobs, jobs_router
    from dreambooth.serve.jobs import MAX_PHOTOS, JobDatabaseError
    from dreambooth.serve.metrics import RequestMetrics, ServeMetrics
    from dreambooth.serve.routes import public_router, router
    from dreambooth.serve.schemas import APIError, validation_error
    from dreambooth.serve.state import (
        DEFAULT_MAX_WORK,
        ServedModel,
        ServerState,
        read_trigger_phrase,
    )
    from dreambooth.serve.ui import ui_router
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"`dreambooth serve` needs the `serve` extra ({error.name} is missing): "
        "pip install 'dreambooth[serve]'") from error

logger = logging.getLogger(__name__)

API_KEY_ENV = "DREAMBOOTH_API_KEY"
_NAME = re.compile(r"[\w.:/-]{1,128}")
# A web origin: scheme, host (name, IPv4 or [IPv6]) and port; no path, no trailing slash.
_ORIGIN = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")


class ServeConfigError(ValueError):
    """Server settings that cannot be used; the message lists every problem."""


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class BodySizeLimit:
    """ASGI middleware: answer 413 to a body over `max_bytes`, declared or streamed.

    A declared Content-Length is refused before anything is read; a chunked body is cut off
    as soon as it passes the limit (the app then sees a disconnect and its answer is dropped).
    """

    def __init__(self, app, max_bytes: int, path_limits: Mapping[str, int] | None = None):
        self.app, self.default_max_bytes = app, max_bytes
        self.path_limits = dict(path_limits or {})

    def _too_large(self, max_bytes: int) -> APIError:
        return APIError(413, f"Request body is larger than the server's limit of "
                             f"{max_bytes} bytes (--max_upload_mb).",
                        code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.path_limits.get(scope["path"], self.default_max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
            error = self._too_large(max_bytes) if declared.isdigit() else APIError(
                400, "Content-Length is not a number.", code="invalid_body")
            return await _error_response(error)(scope, receive, send)
        received, too_large, answered = 0, False, False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            nonlocal answered
            if too_large:
                return  # the 413 below answers instead
            answered = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not answered:
            await _error_response(self._too_large(max_bytes))(scope, receive, send)


class ClientLimit:
    """ASGI middleware: at most `max_requests` POST requests in flight per client (its API key
    and address); one more is answered 429 at once."""

    def __init__(self, app, max_requests: int):
        self.app, self.max_requests = app, max_requests
        self.in_flight: dict[tuple[str, str], int] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        # The server has one API key, shared by its clients: a client is a key from an address.
        headers = dict(scope["headers"])
        client = (headers.get(b"authorization", b"").decode("latin-1"),
                  str((scope.get("client") or ("unknown",))[0]))
        if self.in_flight.get(client, 0) >= self.max_requests:
            error = APIError(429, f"This client already has {self.max_requests} requests in "
                                  "flight (the limit, --max_client_requests); wait for one to "
                                  "finish.", type="rate_limit_error",
                             code="too_many_requests", headers={"Retry-After": "1"})
            return await _error_response(error)(scope, receive, send)
        self.in_flight[client] = self.in_flight.get(client, 0) + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[client] -= 1
            if not self.in_flight[client]:
                del self.in_flight[client]


def _batch_runner(pipeline: StableDiffusionPipeline, state: ServerState):
    """Run one batch of jobs through the generation API (the functions the CLI calls)."""
    batch_limit = state.batch_limit

    def run(key: BatchKey, jobs: list[Job], interrupted) -> list[Image.Image]:
        lora = state.loras[key.lora] if key.lora is not None else None
        per_image = dict(
            seeds=[seed for job in jobs for seed in job.seeds],
            negative_prompt=[text for job in jobs for text in job.negative_prompts],
            num_inference_steps=key.num_inference_steps, guidance_scale=key.guidance_scale,
            height=key.height, width=key.width, batch_size=batch_limit(key))
        prompts = [text for job in jobs for text in job.prompts]

        def stop_if_interrupted(module, args):
            # Before every UNet call (one per denoising step): nobody waits for this batch.
            if interrupted():
                raise BatchInterrupted

        # A forward pre-hook reaches every pipeline built over this UNet or transformer
        # (img2img, inpaint).
        hook = denoiser(pipeline).register_forward_pre_hook(stop_if_interrupted)
        try:
            with sampling_settings(pipeline, scheduler=key.scheduler, lora=lora,
                                   lora_scale=key.lora_scale):
                if key.task == "txt2img":
                    return sample_images(pipeline, prompts, **per_image)
                masks = ([mask for job in jobs for mask in job.masks]
                         if key.task == "inpaint" else None)
                return edit_images(pipeline, prompts,
                                   image=[i for job in jobs for i in job.images],
                                   mask=masks, strength=key.strength, **per_image)
        finally:
            hook.remove()

    return run


def _load_model(name: str, source: str | Path | StableDiffusionPipeline, *,
                device: str | None, dtype: str) -> ServedModel:
    if isinstance(source, TEXT_TO_IMAGE_PIPELINES):
        pipeline = source
        folder = Path(pipeline.name_or_path) if pipeline.name_or_path else None
    else:
        folder = resolve_model_path(source)
        pipeline = load_pipeline(folder, device=device, dtype=dtype)
    return ServedModel(name=name, pipeline=pipeline, trigger_phrase=read_trigger_phrase(folder),
                       created=int(time.time()), default_sampler=set_scheduler(pipeline, None),
                       native_size=default_size(pipeline),
                       default_guidance_scale=default_guidance(pipeline),
                       min_steps=min_steps(pipeline.scheduler),
                       vae_scale_factor=pipeline.vae_scale_factor, folder=folder)


def _check_settings(models: Mapping, loras: Mapping, *, max_queue: int, max_batch: int,
                    batch_wait_ms: float, max_upload_mb: float, max_image_size: int,
                    max_steps: int, max_work: float, max_batch_megapixels: float,
                    max_client_requests: int, shutdown_timeout_s: float,
                    max_queued_jobs: int = 8, job_retention_days: float | None = None,
                    cors_origins: Sequence[str] | None = None) -> dict[str, Path]:
    """Every problem with the settings at once; returns the LoRA files by name."""
    problems = []
    if not models:
        problems.append("no model to serve: pass --model NAME=PATH at least once")
    for name in [*models, *loras]:
        if not _NAME.fullmatch(name):
            problems.append(f"name '{name}' must be 1-128 letters, digits or . _ : / -")
    for name, value, low in (("max_queue", max_queue, 1), ("max_batch", max_batch, 1),
                             ("batch_wait_ms", batch_wait_ms, 0),
                             ("max_upload_mb", max_upload_mb, 0.001),
                             ("max_image_size", max_image_size, 8), ("max_steps", max_steps, 1),
                             ("max_work", max_work, 0.001),
                             ("max_batch_megapixels", max_batch_megapixels, 0.001),
                             ("max_client_requests", max_client_requests, 1),
                             ("shutdown_timeout_s", shutdown_timeout_s, 0),
                             ("max_queued_jobs", max_queued_jobs, 1),
                             *([("job_retention_days", job_retention_days, 0.001)]
                               if job_retention_days is not None else [])):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
            problems.append(f"{name}={value} must be at least {low}")
    for origin in cors_origins or ():
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            problems.append(f"--cors_origin '{origin}' must be an origin like "
                            "https://app.example.com or http://localhost:3000 (scheme, host "
                            "and port only), or *")
    lora_files = {}
    for name, path in loras.items():
        try:
            lora_files[name] = lora_file(path)
        except LoraFileError as error:
            problems.append(f"--lora {name}: {error}")
    if problems:
        raise ServeConfigError("cannot serve:\n  " + "\n  ".join(problems))
    return lora_files


def create_app(
    models: Mapping[str, str | Path | StableDiffusionPipeline],
    *,
    loras: Mapping[str, str | Path] | None = None,
    api_key: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    max_queue: int = 64,
    max_batch: int = 8,
    batch_wait_ms: float = 10.0,
    max_upload_mb: float = 20.0,
    max_image_size: int = 2048,
    max_steps: int = 150,
    max_work: float = DEFAULT_MAX_WORK,
    max_batch_megapixels: float = 4.2,
    max_client_requests: int = 8,
    shutdown_timeout_s: float = 2.0,
    state_dir: str | Path | None = None,
    max_queued_jobs: int = 8,
    job_retention_days: float | None = None,
    jobs_database: str | None = None,
    cors_origins: Sequence[str] | None = None,
) -> FastAPI:
    """The app serving `models` (name -> pipeline folder, cached hub id or loaded pipeline).

    `loras` (name -> LoRA file or folder) are what requests may name in `lora`; clients never
    pass server paths. With `api_key`, every route but /healthz and the web UI's assets needs
    `Authorization: Bearer KEY`. Per model, at most `max_queue` requests wait (one more gets
    429) and a batch holds at most `max_batch` images, gathered for up to `batch_wait_ms`.
    Bodies over `max_upload_mb` get 413; image sides are multiples of 8 up to
    `max_image_size`; at most `max_steps` steps.
    A request's work (`dreambooth.serve.state.work`: megapixels x images x (steps + 1) x an
    attention factor) is at most `max_work`; a UNet batch holds at most `max_batch_megapixels`
    of images (fewer large images per batch). Each client (API key, or address) has at most
    `max_client_requests` POSTs in flight. On shutdown, queued requests get 503 and a running
    batch is interrupted; `run_server` waits `shutdown_timeout_s` for answers to be sent.
    The pipelines are loaded here, before the app answers anything.

    With `state_dir`, the fine-tuning jobs API (`dreambooth.serve.job_routes`) trains models
    on uploaded photos and serves them; its jobs and their files are kept there across
    restarts. Without it, those routes answer 404. At most `max_queued_jobs` jobs are queued
    or running (one more gets 429); finished jobs are deleted after `job_retention_days`.
    Their rows live in SQLite at `state_dir/jobs.sqlite3`, or in the SQL database at the
    SQLAlchemy URL `jobs_database` (its files stay in `state_dir`).
    Browsers on `cors_origins` (e.g. "https://app.example.com", or "*") may call the API.
    """
    lora_files = _check_settings(
        models, loras or {}, max_queue=max_queue, max_batch=max_batch,
        batch_wait_ms=batch_wait_ms, max_upload_mb=max_upload_mb,
        max_image_size=max_image_size, max_steps=max_steps, max_work=max_work,
        max_batch_megapixels=max_batch_megapixels, max_client_requests=max_client_requests,
        shutdown_timeout_s=shutdown_timeout_s, max_queued_jobs=max_queued_jobs,
        job_retention_days=job_retention_days, cors_origins=cors_origins)
    metrics = ServeMetrics()
    max_upload_bytes = int(max_upload_mb * 1024 * 1024)
    served_models = {}
    state = ServerState(served_models, lora_files, metrics, max_image_size=max_image_size,
                        max_steps=max_steps, max_work=max_work, max_batch=max_batch,
                        max_batch_megapixels=max_batch_megapixels,
                        shutdown_timeout_s=shutdown_timeout_s)

    def serve_model(name: str, source) -> ServedModel:
        served = _load_model(name, source, device=device, dtype=dtype)
        served.worker = ModelWorker(
            name, _batch_runner(served.pipeline, state),
            max_queue=max_queue, max_batch=max_batch, batch_wait_s=batch_wait_ms / 1000,
            batch_limit=state.batch_limit,
            on_queue_depth=metrics.queue_depth.labels(name).set,
            on_batch=lambda images, seconds, name=name: metrics.batch_done(name, images, seconds),
            on_cancelled=metrics.cancelled.labels(name).inc)
        return served

    for name, source in models.items():
        served_models[name] = serve_model(name, source)
    state.load_model = serve_model
    if jobs_database is not None and state_dir is None:
        raise ServeConfigError("cannot serve: --jobs_database needs --state_dir (the folder of "
                               "the jobs' uploads and results)")
    if state_dir is not None:
        try:
            state.jobs = Jobs(state, state_dir, device=device, max_photo_bytes=max_upload_bytes,
                              max_active=max_queued_jobs, retention_days=job_retention_days,
                              database_url=jobs_database)
        except (JobLocked, JobDatabaseError) as error:
            raise ServeConfigError(f"cannot serve: {error}") from None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        with state._registering:
            for worker in state.workers():
                worker.start()
            state.started = True
        if state.jobs is not None:
            state.jobs.start()
        try:
            yield
        finally:
            if state.jobs is not None:
                await run_in_threadpool(state.jobs.stop)
            for worker in state.workers():
                await run_in_threadpool(worker.stop, shutdown_timeout_s)

    app = FastAPI(title="dreambooth serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    app.include_router(public_router)
    app.include_router(ui_router)  # the web UI's assets: no data in them, no key
    needs_key = [Depends(_require_key(api_key))] if api_key else []
    app.include_router(router, dependencies=needs_key)
    app.include_router(jobs_router, dependencies=needs_key)
    _add_error_handlers(app)
    # A job uploads up to MAX_PHOTOS photos of max_upload_mb each (each photo checked apart).
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes,
                       path_limits={JOBS_PATH: max_upload_bytes * MAX_PHOTOS + 2**20})
    app.add_middleware(ClientLimit, max_requests=max_client_requests)
    app.add_middleware(RequestMetrics, metrics=metrics)  # sees 413s too
    if cors_origins:  # outermost: errors and preflights carry the CORS headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                           max_age=600)
    return app


def _require_key(api_key: str):
    expected = api_key.encode()

    async def require_key(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                    expected):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                "<key>' with the key the server was started with.",
                           code="invalid_api_key")

    return require_key


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; 500 only for failures of the server itself."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return _error_response(validation_error(list(error.errors())))

    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, error: GenerationError):
        return _error_response(APIError(400, str(error), code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return _error_response(APIError(error.status_code, str(error.detail), type=kind,
                                        headers=getattr(error, "headers", None)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        logger.error("internal error on %s", request.url.path, exc_info=error)
        return _error_response(APIError(500, "The server failed to answer this request; the "
                                             "error is in its log.", type="server_error"))


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_server(models: Mapping[str, str | Path], *, host: str = "127.0.0.1", port: int = 8000,
               **app_options) -> None:
    """Load `models`, then serve them with uvicorn until interrupted.

    `app_options` are `create_app`'s keyword arguments, listed here with run_server's own.

    Args:
        models: Models to serve, {name: path}: a training output_dir, a diffusers folder, a
            cached hub id or 'demo' (the bundled world model). On the command line
            `--model NAME=PATH` (repeatable); without NAME=, the folder's name (or the hub id)
            is the name. The first is the default model.
        host: Address to bind: loopback keeps the server local; 0.0.0.0 exposes it.
        port: TCP port to listen on.
        loras: LoRA files or folders requests may name in `lora`, {name: path}; on the command
            line `--lora NAME=PATH` (repeatable).
        api_key: Require 'Authorization: Bearer KEY' on every route but /healthz and the web
            UI's page (which asks for the key; on the command line the default is the
            DREAMBOOTH_API_KEY environment variable, which keeps the key out of the process
            list).
        device: cuda, cpu, ... (default: cuda if available).
        dtype: auto = fp16 on CUDA, fp32 elsewhere.
        max_queue: Requests that may wait per model; one more gets 429.
        max_batch: Images per UNet batch.
        batch_wait_ms: How long a worker waits for compatible requests to fill a batch.
        max_upload_mb: Largest request body (uploads); larger gets 413.
        max_image_size: Largest image side in pixels.
        max_steps: Most denoising steps a request may ask for.
        max_work: Most work one request may ask for: megapixels x images x (steps + 1, the 1
            for decoding) x (1 + latent pixels / 16384, for self-attention); more gets 400.
            The default takes SD 1.5 512x512 x 4 images x 50 steps or SDXL 1024x1024 x 1 x 50,
            and refuses 10 images of 2048x2048 even at 1 step.
        max_batch_megapixels: Most pixels of images one UNet batch holds (memory grows with
            them): large images run in smaller batches; an image larger than this gets 400.
        max_client_requests: Requests one client (API key and address) may have in flight;
            one more gets 429.
        shutdown_timeout_s: On SIGTERM/Ctrl-C, queued requests get 503 and the running batch
            is interrupted; the server waits at most this long for answers to be sent.
        state_dir: Folder of the fine-tuning jobs API (/v1/fine_tuning/jobs): its SQLite
            database, uploaded photos and trained models, kept across restarts (a job that was
            training resumes from its last checkpoint). Without it the jobs API is off (404).
            One server at a time uses a state_dir.
        max_queued_jobs: Fine-tuning jobs that may be queued or running at once; one more
            gets 429 rate_limit_exceeded.
        job_retention_days: Delete finished fine-tuning jobs (their files, and their models
            from the server) this many days after they finished (default: keep them until
            DELETE /v1/fine_tuning/jobs/{id}).
        jobs_database: SQLAlchemy URL of the database that keeps the fine-tuning jobs and
            their events, e.g. postgresql+psycopg://user:password@host/db (default: SQLite
            at STATE_DIR/jobs.sqlite3). Uploads and results stay in --state_dir; one server
            at a time uses a database. Needs --state_dir.
        cors_origins: Web origins whose pages may call this server from a browser (CORS),
            e.g. https://app.example.com, or * for any; on the command line `--cors_origin
            ORIGIN` (repeatable). Default: none, only pages served by this server.
    """
    import uvicorn

    if not _is_loopback(host) and not app_options.get("api_key"):
        logger.warning("listening on %s without an API key: anyone who can reach port %d can "
                       "generate; pass --api_key or set %s", host, port, API_KEY_ENV)
    app = create_app(models, **app_options)
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=app.state.server.shutdown_timeout_s)
    _graceful_server(config, app.state.server).run()


def _graceful_server(config, state: ServerState):
    """uvicorn's server, told to stop the model workers as soon as its shutdown begins.

    uvicorn answers SIGTERM by waiting for every open request, and only then runs the app's
    lifespan shutdown (where the workers stop): queued requests would wait for batches that
    never come. Stopping the workers first answers them with 503 at once and interrupts the
    running batch; `timeout_graceful_shutdown` bounds the rest.
    """
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            state.stop_accepting()
            await super().shutdown(sockets)

    return GracefulServer(config)
