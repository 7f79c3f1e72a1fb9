"""The fine-tuning jobs API of `dreambooth serve`, shaped like OpenAI's fine-tuning jobs.

- `POST /v1/fine_tuning/jobs` (multipart): `files` (3-50 photos, repeated field), `model` (a
  served model), `class_noun` (required), `identifier` (default "sks"), `preset` ("quick" or
  "quality", see `dreambooth.serve.jobs.PRESETS`) and `hyperparameters` (a JSON object of
  `dreambooth train` config keys; keys naming server paths or devices are refused). The photos
  are validated before the job exists, so jobs start `queued` (`validating_files` never shows).
- `GET /v1/fine_tuning/jobs?limit=&after=`: newest first, with `has_more`.
- `GET /v1/fine_tuning/jobs/{id}`, `POST /v1/fine_tuning/jobs/{id}/cancel`.
- `GET /v1/fine_tuning/jobs/{id}/events`: with `Accept: text/event-stream`, Server-Sent Events
  (one `data:` JSON event object each, from the first, ending after the job's last status);
  otherwise OpenAI's list (newest first, `limit`, `after`, `has_more`).
- `GET /v1/fine_tuning/jobs/{id}/files/{kind}`: lora_kohya, lora_diffusers (LoRA jobs) or
  model_zip and single_file (full fine-tunes) of a succeeded job.
- `GET /v1/fine_tuning/jobs/{id}/images/{name}`: a validation grid (`image/png`), as named by
  the job's `validation` events (`data`: step, url); names are `step-NNNNNN.png`, nothing else.

A succeeded job's model is served at once as its `fine_tuned_model` (`MODEL:ft-<hex>`). No
answer holds a server path.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from dreambooth.files import atomic_folder
from dreambooth.images import ImageFormatError, ImageReadError, read_image
from dreambooth.serve.job_guard import state_lock
from dreambooth.serve.jobs import (
    FINISHED,
    JOB_ID,
    JOBS_PATH,
    MAX_PHOTOS,
    MIN_PHOTOS,
    PRESETS,
    RESULT_KINDS,
    STATUSES,
    JobDatabaseError,
    JobError,
    JobRunner,
    JobStore,
    check_active,
    job_values,
    model_zip,
    new_job_id,
    result_files,
    single_file,
    validation_image,
)
from dreambooth.serve.schemas import APIError
from dreambooth.serve.state import ServerState

logger = logging.getLogger(__name__)

_PHOTO_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
_FIELDS = ("model", "identifier", "class_noun", "preset", "hyperparameters")
_MAX_LIST = 100
_SSE_POLL_S = 0.25
MAX_EVENT_STREAMS = 64  # Server-Sent Events streams open at once, all jobs together
_NUMBER = re.compile(r"[0-9]{1,15}")  # ASCII digits only ('²'.isdigit() is True), SQLite-sized


class Jobs:
    """The jobs of one app: the store, the runner and what a finished job registers."""

    def __init__(self, state: ServerState, state_dir: str | Path, *, device: str | None,
                 max_photo_bytes: int, max_active: int = 8,
                 retention_days: float | None = None, database_url: str | None = None):
        self.state, self.max_photo_bytes = state, max_photo_bytes
        self.max_active, self.retention_days = max_active, retention_days
        self.streams = 0  # open Server-Sent Events streams
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        self._lock = state_lock(Path(state_dir))  # JobLocked: another server uses it
        try:
            self.store = JobStore(state_dir, database_url)
        except JobDatabaseError:
            self._lock.close()
            raise
        for job_id in self.store.requeue_interrupted():
            logger.info("fine-tuning job %s was running: queued again, to resume", job_id)
        self._remove_leftovers()
        self.delete_expired()
        self.runner = JobRunner(self.store, base_model=self.base_folder,
                                on_success=self.register, on_idle=self.delete_expired,
                                accelerator="cpu" if device == "cpu" else "auto")
        self._register_succeeded()

    def start(self) -> None:
        self.runner.start()

    def stop(self) -> None:
        self.runner.stop()
        self.store.close()
        self._lock.close()

    def base_folder(self, name: str) -> Path | None:
        served = self.state.models.get(name)
        return served.folder if served is not None else None

    def register(self, job: dict[str, Any]) -> str:
        """Serve a succeeded job's model; returns its name."""
        name = job["fine_tuned_model"] or f"{job['model']}:ft-{job['id'].removeprefix('ftjob-')}"
        if name in self.state.models:
            return name
        params, output = job["params"], self.store.job_dir(job["id"]) / "output"
        if params["values"].get("use_lora"):
            trigger = f"a photo of {params['identifier']} {params['class_noun']}"
            self.state.register_lora_model(name, job["model"],
                                           output / "pytorch_lora_weights.safetensors", trigger)
        else:
            self.state.register_model(name, output)
        return name

    def delete(self, job_id: str) -> bool:
        """Forget a finished job: its model is no longer served, its files are removed.
        False if there is no such job; JobError `job_not_finished` if it is active."""
        job = self.store.delete(job_id)
        if job is None:
            return False
        if job["fine_tuned_model"]:
            self.state.unregister_model(job["fine_tuned_model"])
        shutil.rmtree(self.store.job_dir(job_id), ignore_errors=True)
        logger.info("fine-tuning job %s deleted", job_id)
        return True

    def delete_expired(self) -> None:
        """Delete the jobs that finished more than `retention_days` ago (none without it)."""
        if self.retention_days is None:
            return
        cutoff = int(time.time() - self.retention_days * 86400)
        for job_id in self.store.finished_before(cutoff):
            self.delete(job_id)

    def _remove_leftovers(self) -> None:
        """Job folders the database does not know (a delete or an upload cut short by a
        stopped server); only at start, when no upload is being saved."""
        known = self.store.ids()
        for folder in self.store.jobs_dir.iterdir():
            if JOB_ID.fullmatch(folder.name) and folder.name not in known:
                logger.info("removing %s: no job of that id", folder.name)
                shutil.rmtree(folder, ignore_errors=True)

    def _register_succeeded(self) -> None:
        after = None
        while True:
            jobs, more = self.store.list(limit=_MAX_LIST, after=after, status="succeeded")
            for job in jobs:
                if job["model"] not in self.state.models:
                    logger.warning("job %s: its base model '%s' is not served; its model is "
                                   "not served either", job["id"], job["model"])
                    continue
                try:
                    self.register(job)
                except Exception:
                    logger.exception("job %s: cannot serve its model", job["id"])
            if not more:
                return
            after = jobs[-1]["id"]


def _jobs(request: Request) -> Jobs:
    jobs = request.app.state.server.jobs
    if jobs is None:
        raise APIError(404, "Fine-tuning jobs are off on this server: start it with "
                            "--state_dir FOLDER to turn them on.", code="jobs_disabled")
    return jobs


def job_object(job: dict[str, Any], jobs: Jobs) -> dict[str, Any]:
    """A job as OpenAI's `fine_tuning.job` object, with our fields beside."""
    params = job["params"]
    files = result_files(job, jobs.store.job_dir(job["id"]))
    return {
        "id": job["id"], "object": "fine_tuning.job", "model": job["model"],
        "created_at": job["created_at"], "finished_at": job["finished_at"],
        "status": job["status"], "fine_tuned_model": job["fine_tuned_model"],
        "hyperparameters": params["values"], "error": job["error"],
        "training_file": None, "validation_file": None, "organization_id": "dreambooth",
        "result_files": [f"{JOBS_PATH}/{job['id']}/files/{kind}" for kind in files],
        "trained_photos": params["photos"], "method": {"type": "dreambooth"},
        "preset": params["preset"], "identifier": params["identifier"],
        "class_noun": params["class_noun"],
        "instance_prompt": f"a photo of {params['identifier']} {params['class_noun']}",
    }


def event_object(event: dict[str, Any]) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{event['seq']}",
            "created_at": event["created_at"], "level": event["level"], "type": event["type"],
            "message": event["message"], "data": event["data"]}


def _get_job(jobs: Jobs, job_id: str) -> dict[str, Any]:
    job = jobs.store.get(job_id) if JOB_ID.fullmatch(job_id) else None
    if job is None:
        raise APIError(404, f"No fine-tuning job '{_shown(job_id)}'.",
                       param="fine_tuning_job_id",
                       code="job_not_found")
    return job


def _shown(text: str) -> str:
    """A client's string as an error message quotes it: at most 64 characters."""
    return text if len(text) <= 64 else text[:61] + "..."


def _limit(value: str | None) -> int:
    if value is None:
        return 20
    if not _NUMBER.fullmatch(value) or not 1 <= int(value) <= _MAX_LIST:
        raise APIError(400, f"Invalid value for 'limit': '{value}'; use 1 to {_MAX_LIST}.",
                       param="limit", code="invalid_value")
    return int(value)


jobs_router = APIRouter()


async def _read_job_form(request: Request) -> tuple[dict[str, str], list[UploadFile]]:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "Send the job as multipart/form-data: the photos as repeated "
                            "'files' fields and the other fields as text.", param="files",
                       code="invalid_content_type")
    form = await request.form(max_files=MAX_PHOTOS + 1, max_fields=len(_FIELDS) + 8)
    fields: dict[str, str] = {}
    photos: list[UploadFile] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in ("files", "files[]"):
                raise APIError(400, f"Unrecognized file field '{name}'; send the photos as "
                                    "'files'.", param=name, code="unknown_parameter")
            photos.append(value)
        elif name not in _FIELDS:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unknown_parameter")
        else:
            fields[name] = value
    return fields, photos


def _check_photos(photos: list[UploadFile], max_bytes: int) -> list[tuple[bytes, str]]:
    """(bytes, extension) of every photo, each decoded fully as training will read it."""
    if not MIN_PHOTOS <= len(photos) <= MAX_PHOTOS:
        raise APIError(400, f"Send {MIN_PHOTOS} to {MAX_PHOTOS} photos of the subject as "
                            f"'files'; got {len(photos)}.", param="files",
                       code="invalid_file_count")
    checked = []
    for index, upload in enumerate(photos):
        param = f"files[{index}]"
        data = upload.file.read()
        if len(data) > max_bytes:
            raise APIError(400, f"'{param}' has {len(data)} bytes; the limit per photo is "
                                f"{max_bytes} (--max_upload_mb).", param=param,
                           code="file_too_large")
        try:
            read_image(data, formats=tuple(_PHOTO_FORMATS))
        except ImageFormatError as error:
            raise APIError(400, f"'{param}' is a {error.format} file; send PNG, JPEG or WebP.",
                           param=param, code="invalid_image_format") from error
        except ImageReadError as error:
            raise APIError(400, f"'{param}' is not a readable image: {error.reason}",
                           param=param, code="invalid_image") from error
        checked.append((data, _PHOTO_FORMATS[_format(data)]))
    return checked


def _format(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as opened:
        return opened.format


def _hyperparameters(text: str | None) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise APIError(400, f"Invalid value for 'hyperparameters': not JSON ({error}).",
                       param="hyperparameters", code="invalid_value") from error
    except RecursionError as error:
        raise APIError(400, "Invalid value for 'hyperparameters': nested too deeply.",
                       param="hyperparameters", code="invalid_value") from error
    if not isinstance(value, dict):
        raise APIError(400, "Invalid value for 'hyperparameters': send a JSON object of "
                            "training config keys, e.g. {\"max_train_steps\": 400}.",
                       param="hyperparameters", code="invalid_value")
    return value


def _word(fields: dict[str, str], name: str, default: str | None) -> str:
    value = fields.get(name, default)
    if value is None:
        raise APIError(400, f"Missing required parameter: '{name}'.", param=name,
                       code="missing_required_parameter")
    value = value.strip()
    if not value or len(value) > 64 or any(not (c.isalnum() or c in " -'") for c in value):
        raise APIError(400, f"Invalid value for '{name}': use 1-64 letters, digits, spaces, "
                            "hyphens or apostrophes.", param=name, code="invalid_value")
    return value


def _limit_error(error: JobError) -> APIError:
    return APIError(429, str(error), code=error.code, type="rate_limit_error",
                    headers={"Retry-After": "60"})


@jobs_router.post(JOBS_PATH)
async def create_job(request: Request, jobs: Jobs = Depends(_jobs)) -> dict:
    try:  # before the upload is read; checked again when the job is stored
        check_active(await run_in_threadpool(jobs.store.count_active), jobs.max_active)
    except JobError as error:
        raise _limit_error(error) from error
    fields, photos = await _read_job_form(request)
    model = fields.get("model")
    if model is None:
        raise APIError(400, "Missing required parameter: 'model'.", param="model",
                       code="missing_required_parameter")
    served = jobs.state.model(model)
    if served.folder is None or served.lora is not None:
        raise APIError(400, f"The model '{model}' cannot be fine-tuned here (it was not "
                            "loaded from a folder, or it is a LoRA job's model).",
                       param="model", code="invalid_value")
    identifier = _word(fields, "identifier", "sks")
    class_noun = _word(fields, "class_noun", None)
    try:
        values = job_values(preset=fields.get("preset", "quick"),
                            hyperparameters=_hyperparameters(fields.get("hyperparameters")),
                            identifier=identifier, class_noun=class_noun,
                            resolution=served.native_size)
    except JobError as error:
        raise APIError(400, str(error), param=error.param, code=error.code) from error
    checked = await run_in_threadpool(_check_photos, photos, jobs.max_photo_bytes)
    job_id = new_job_id()

    def save() -> None:
        job_dir = jobs.store.job_dir(job_id)
        with atomic_folder(job_dir / "photos") as folder:
            for index, (data, extension) in enumerate(checked):
                (folder / f"{index:02d}.{extension}").write_bytes(data)
        try:
            jobs.store.create(job_id, served.name, {
                "values": values, "identifier": identifier, "class_noun": class_noun,
                "preset": fields.get("preset", "quick"), "photos": len(checked)},
                max_active=jobs.max_active)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise

    try:
        await run_in_threadpool(save)
    except JobError as error:
        raise _limit_error(error) from error
    jobs.runner.wake()
    return job_object(jobs.store.get(job_id), jobs)


@jobs_router.get(JOBS_PATH)
async def list_jobs(request: Request, jobs: Jobs = Depends(_jobs)) -> dict:
    limit = _limit(request.query_params.get("limit"))
    after = request.query_params.get("after")
    if after is not None:
        _get_job(jobs, after)
    found, more = await run_in_threadpool(jobs.store.list, limit=limit, after=after)
    return {"object": "list", "data": [job_object(job, jobs) for job in found],
            "has_more": more}


@jobs_router.get(JOBS_PATH + "/{job_id}")
async def get_job(job_id: str, jobs: Jobs = Depends(_jobs)) -> dict:
    return job_object(_get_job(jobs, job_id), jobs)


@jobs_router.delete(JOBS_PATH + "/{job_id}")
async def delete_job(job_id: str, jobs: Jobs = Depends(_jobs)) -> dict:
    _get_job(jobs, job_id)
    try:
        deleted = await run_in_threadpool(jobs.delete, job_id)
    except JobError as error:
        raise APIError(409, str(error), param=error.param, code=error.code) from error
    if not deleted:  # deleted meanwhile
        _get_job(jobs, job_id)
    return {"id": job_id, "object": "fine_tuning.job", "deleted": True}


@jobs_router.post(JOBS_PATH + "/{job_id}/cancel")
async def cancel_job(job_id: str, jobs: Jobs = Depends(_jobs)) -> dict:
    job = _get_job(jobs, job_id)
    if job["status"] in FINISHED:
        raise APIError(400, f"The job is already {job['status']}.", param="fine_tuning_job_id",
                       code="job_finished")
    if not jobs.store.set_status(job_id, "cancelled", only_from=("queued",),
                                 message="Job cancelled before it started."):
        jobs.runner.cancel(job_id)
        for _ in range(100):  # the runner kills the process and removes the outputs
            job = _get_job(jobs, job_id)
            if job["status"] in FINISHED:
                break
            await asyncio.sleep(0.1)
    return job_object(_get_job(jobs, job_id), jobs)


@jobs_router.get(JOBS_PATH + "/{job_id}/events")
async def job_events(job_id: str, request: Request, jobs: Jobs = Depends(_jobs)):
    _get_job(jobs, job_id)
    if "text/event-stream" not in request.headers.get("accept", ""):
        limit = _limit(request.query_params.get("limit"))
        after = request.query_params.get("after")
        events = jobs.store.events(job_id, newest_first=True)
        if after is not None:
            seqs = [f"ftevent-{event['seq']}" for event in events]
            if after not in seqs:
                raise APIError(400, f"Invalid value for 'after': no event '{after}' in this "
                                    "job.", param="after", code="invalid_value")
            events = events[seqs.index(after) + 1:]
        return {"object": "list", "data": [event_object(e) for e in events[:limit]],
                "has_more": len(events) > limit}
    if jobs.streams >= MAX_EVENT_STREAMS:  # each one polls the database
        raise APIError(429, f"{jobs.streams} event streams are open, the server's limit; close "
                            "one, or poll the JSON list instead.", type="rate_limit_error",
                       code="rate_limit_exceeded", headers={"Retry-After": "5"})
    last = request.headers.get("last-event-id", "")
    after_seq = int(last) if _NUMBER.fullmatch(last) else 0

    async def stream():
        jobs.streams += 1  # (the event loop's thread only)
        try:
            async for chunk in events_from(after_seq):
                yield chunk
        finally:
            jobs.streams -= 1

    async def events_from(after_seq: int):
        while True:
            events = await run_in_threadpool(jobs.store.events, job_id, after_seq=after_seq)
            for event in events:
                after_seq = event["seq"]
                yield (f"id: {event['seq']}\nevent: {event['type']}\n"
                       f"data: {json.dumps(event_object(event))}\n\n")
            if any(event["type"] == "status" and (event["data"] or {}).get("status")
                   in FINISHED for event in events):
                return
            if not events:
                job = await run_in_threadpool(jobs.store.get, job_id)
                if job is None:  # deleted meanwhile
                    return
                if job["status"] in FINISHED and not await run_in_threadpool(
                        jobs.store.events, job_id, after_seq=after_seq):
                    return
                await asyncio.sleep(_SSE_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@jobs_router.get(JOBS_PATH + "/{job_id}/files/{kind}")
async def job_file(job_id: str, kind: str, jobs: Jobs = Depends(_jobs)):
    job = _get_job(jobs, job_id)
    if kind not in RESULT_KINDS:
        raise APIError(404, f"Unknown file kind '{_shown(kind)}'; use one of "
                            f"{', '.join(RESULT_KINDS)}.", param="kind", code="file_not_found")
    files = result_files(job, jobs.store.job_dir(job_id))
    if kind not in files:
        available = ", ".join(files) or "none (the job has not succeeded)"
        raise APIError(404, f"This job has no '{kind}' file; it has: {available}.",
                       param="kind", code="file_not_found")
    stem = (job["fine_tuned_model"] or job_id).replace(":", "-").replace("/", "-")
    if kind == "model_zip":
        path = await run_in_threadpool(model_zip, jobs.store.job_dir(job_id), job["model"],
                                       jobs.base_folder(job["model"]))
        return FileResponse(path, media_type="application/zip", filename=f"{stem}.zip")
    if kind == "single_file":
        path = await run_in_threadpool(single_file, jobs.store.job_dir(job_id),
                                       jobs.base_folder(job["model"]))
        return FileResponse(path, media_type="application/octet-stream",
                            filename=f"{stem}.safetensors")
    suffix = "-diffusers" if kind == "lora_diffusers" else ""
    return FileResponse(files[kind], media_type="application/octet-stream",
                        filename=f"{stem}{suffix}.safetensors")


@jobs_router.get(JOBS_PATH + "/{job_id}/images/{name}")
async def job_image(job_id: str, name: str, jobs: Jobs = Depends(_jobs)):
    _get_job(jobs, job_id)
    path = validation_image(jobs.store.job_dir(job_id), name)
    if path is None:
        raise APIError(404, f"This job has no validation image '{_shown(name)}'; its "
                            "`validation` events name those it has.", param="name",
                       code="image_not_found")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache"})


__all__ = ["JOBS_PATH", "Jobs", "jobs_router", "PRESETS", "STATUSES"]
