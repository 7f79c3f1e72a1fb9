"""Fine-tuning jobs of `dreambooth serve`: durable state, the queue and the training processes.

A job is a DreamBooth run on photos uploaded to the server. Its state lives under `state_dir`:

- `jobs.sqlite3` (SQLite through SQLAlchemy Core), or the SQL database at `--jobs_database
  URL` (PostgreSQL, ...): a `jobs` table (id, status, parameters as JSON, timestamps, error,
  fine_tuned_model), an `events` table (status changes, progress) and `jobs_lock`, one row
  every writing transaction locks (SQLite: `BEGIN IMMEDIATE`) so checks and writes are atomic;
- `jobs/<job id>/photos/NN.<ext>`: the uploads, named by their index (never by client names);
- `jobs/<job id>/output/`: the training's output_dir (checkpoints while it runs, then the
  diffusers pipeline or the LoRA files; `validation/step-NNNNNN.png`, the validation grids);
- `jobs/<job id>/validation_prompts.txt`: the prompts of those grids (`validation_prompts`);
- `jobs/<job id>/events.jsonl` and `train.log`: what the training process reports and prints.

`JobRunner` trains one job at a time, each in its own process (`python -m
dreambooth.serve.job_process JOB_DIR`), so a crash, an out-of-memory kill or an exception fails
that job and never the server. The process appends progress lines to `events.jsonl`; the
runner's thread tails the file into the `events` table. Every run passes
`resume_from_checkpoint="latest"`, so a job found `running` when the server starts (it died)
is queued again and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    MetaData,
    Row,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy import delete as sql_delete
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, NoSuchModuleError

from dreambooth.config import ConfigError, parse_train_config

logger = logging.getLogger(__name__)

STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
MIN_PHOTOS, MAX_PHOTOS = 3, 50

# Starting points of a job's configuration; `hyperparameters` override them.
# quick: a LoRA-free full fine-tune of a few minutes on 2 CPU cores for the `demo` world model
# (64 px): 200 steps at the demo's learning rate, no prior preservation, no text encoder.
# quality: the `dreambooth demo` recipe (400 steps, text encoder, prior preservation with 50
# class images generated first); on SD 1.5 this wants a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"max_train_steps": 200, "learning_rate": 5e-5, "train_batch_size": 2,
              "lr_warmup_steps": 0, "checkpointing_steps": 50, "checkpoints_total_limit": 1},
    "quality": {"max_train_steps": 400, "learning_rate": 5e-5, "train_batch_size": 2,
                "lr_warmup_steps": 0, "train_text_encoder": True,
                "with_prior_preservation": True, "num_class_images": 50,
                "checkpointing_steps": 100, "checkpoints_total_limit": 1},
}
# Config keys a client may not set: they name server paths or machines, or are set from the
# job's own fields (model, identifier, class_noun).
SERVER_KEYS = frozenset({
    "pretrained_model_name_or_path", "revision", "variant", "pretrained_vae_model_name_or_path",
    "single_file_config",
    "instance_data_dir", "instance_prompt", "class_data_dir", "concepts", "mask_dir",
    "caption_extension",
    "validation_data_dir", "validation_prompt", "validation_prompts", "validation_steps",
    "num_validation_images", "validation_inference_steps", "output_dir", "output_name",
    "resume_from_checkpoint", "logging_dir", "report_to", "tracker_project_name",
    "accelerator", "devices", "num_nodes", "strategy",
})
# The most a client may ask of one job (training and class-image generation share the device
# with the requests the server answers; the config's own limits are far higher).
MAX_JOB_STEPS = 10_000
CLIENT_LIMITS = {"num_class_images": 200, "train_batch_size": 32,
                 "gradient_accumulation_steps": 64, "sample_batch_size": 16,
                 "class_inference_steps": 100, "repeats": 100, "rank": 256,
                 "dataloader_num_workers": 4, "num_threads": os.cpu_count() or 1}
# Bucket sides at most this many times the model's own (memory grows with their square).
MAX_SIZE_FACTOR = 2
RESULT_KINDS = ("lora_kohya", "lora_diffusers", "model_zip", "single_file")
JOBS_PATH = "/v1/fine_tuning/jobs"
# Validation while a job trains: these scenes of the subject (one image each, fixed seeds, the
# model's own size and guidance) about 4 times a run and at its end, one grid per time in
# output/validation/step-NNNNNN.png (dreambooth.train.callbacks.ValidationSamples).
VALIDATION_SCENES = ("", " on the beach", " in the snow")
VALIDATIONS_PER_JOB = 4
VALIDATION_INFERENCE_STEPS = 20
VALIDATION_IMAGE = re.compile(r"step-[0-9]{6}\.png")  # the only names the images route serves
# What a model zip leaves out of the output folder: resumable state, tracker logs and the
# validation grids (the images route serves those).
_NOT_ZIPPED = ("checkpoints", "logs", "lightning_logs", "validation")
# Written by the training process once every output is (dreambooth.serve.job_process).
TRAINED_FILE = "trained.json"
_POLL_S = 0.2
_IDLE_EVERY_S = 3600.0  # how often an idle runner calls on_idle (expired jobs go)
_STOP_GRACE_S = 10.0  # on shutdown: how long a training may take to write its interrupt checkpoint


class JobError(ValueError):
    """A job request that cannot run: `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


def check_active(active: int, max_active: int) -> None:
    """JobError `rate_limit_exceeded` when `active` jobs leave no room for one more."""
    if active >= max_active:
        raise JobError(f"{active} fine-tuning jobs are queued or running, the server's limit "
                       f"(--max_queued_jobs {max_active}); wait for one to finish or cancel "
                       "one.", None, "rate_limit_exceeded")


def job_values(*, preset: str, hyperparameters: dict[str, Any], identifier: str,
               class_noun: str, resolution: int) -> dict[str, Any]:
    """The flat config keys a job chooses (preset, then the client's hyperparameters); raises
    JobError naming a refused key or listing every invalid value (`parse_train_config`)."""
    if preset not in PRESETS:
        raise JobError(f"Invalid value for 'preset': '{preset[:64]}'; use one of "
                       f"{', '.join(PRESETS)}.", "preset")
    for key in hyperparameters:
        if key in SERVER_KEYS:
            raise JobError(f"hyperparameters.{key} cannot be set by a client: the server "
                           "chooses paths, devices and prompts (set 'identifier' and "
                           "'class_noun' for the prompt).", f"hyperparameters.{key}",
                           "forbidden_parameter")
    values = {"resolution": resolution, **PRESETS[preset], **hyperparameters}
    steps = values["max_train_steps"]  # a job trains a fixed number of steps (never epochs)
    if not (isinstance(steps, int) and not isinstance(steps, bool)
            and 1 <= steps <= MAX_JOB_STEPS):
        raise JobError(f"Invalid value for 'hyperparameters.max_train_steps': {steps!r:.64}; "
                       f"use a whole number from 1 to {MAX_JOB_STEPS}.",
                       "hyperparameters.max_train_steps")
    # (`resolution` itself: training refuses more than twice the model's own.)
    limits = {**CLIENT_LIMITS, "max_bucket_reso": MAX_SIZE_FACTOR * resolution}
    for key, most in limits.items():
        value = values.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > most:
            raise JobError(f"Invalid value for 'hyperparameters.{key}': {value}; a job may use "
                           f"at most {most} on this server.", f"hyperparameters.{key}")
    # Validated with stand-ins for the server's paths; the run gets the real ones.
    probe = {**values, **_server_values(Path("job"), "model", identifier, class_noun,
                                        values, accelerator="cpu")}
    try:
        parse_train_config(probe, source="hyperparameters")
    except ConfigError as error:
        raise JobError("Invalid 'hyperparameters': " + "; ".join(error.problems),
                       "hyperparameters") from error
    return values


def validation_prompts(identifier: str, class_noun: str) -> list[str]:
    """The prompts a job's validation grids show, one row each."""
    return [f"a photo of {identifier} {class_noun}{scene}" for scene in VALIDATION_SCENES]


def validation_every(max_train_steps: int) -> int:
    """Steps between two validations: about VALIDATIONS_PER_JOB per run (the last at its end)."""
    return max(1, math.ceil(max_train_steps / VALIDATIONS_PER_JOB))


def validation_image(job_dir: Path, name: str) -> Path | None:
    """The validation grid `name` of a job, if the name is one and the grid exists."""
    if not VALIDATION_IMAGE.fullmatch(name):
        return None
    path = job_dir / "output" / "validation" / name
    return path if path.is_file() else None


def _server_values(job_dir: Path, base_model: str, identifier: str, class_noun: str,
                   values: dict[str, Any], *, accelerator: str) -> dict[str, Any]:
    prior = bool(values.get("with_prior_preservation"))
    return {
        "pretrained_model_name_or_path": base_model,
        "instance_data_dir": str(job_dir / "photos"),
        "instance_prompt": f"a photo of {identifier} {class_noun}",
        "validation_prompts": str(job_dir / "validation_prompts.txt"),
        "validation_steps": validation_every(int(values.get("max_train_steps", 1))),
        "num_validation_images": 1, "validation_inference_steps": VALIDATION_INFERENCE_STEPS,
        **({"class_data_dir": str(job_dir / "class_images"),
            "class_prompt": f"a photo of {class_noun}"} if prior else {}),
        "output_dir": str(job_dir / "output"), "output_name": job_dir.name,
        "resume_from_checkpoint": "latest", "report_to": "none", "accelerator": accelerator,
    }


JOB_ID = re.compile(r"ftjob-[0-9a-f]{24}")  # what new_job_id makes; nothing else names a job


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


class JobDatabaseError(ValueError):
    """The jobs database cannot be used (a bad URL, a missing driver, an unreachable server);
    the message names the database with its password hidden."""


_METADATA = MetaData()
# Portable types: on SQLite these are exactly the tables `jobs.sqlite3` has always had.
_JOBS = Table(
    "jobs", _METADATA,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", Text, unique=True, nullable=False),
    Column("model", Text, nullable=False), Column("status", Text, nullable=False),
    Column("params", Text, nullable=False), Column("created_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger), Column("error", Text), Column("fine_tuned_model", Text),
    sqlite_autoincrement=True)
_EVENTS = Table(
    "events", _METADATA,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Text, nullable=False), Column("created_at", BigInteger, nullable=False),
    Column("level", Text, nullable=False), Column("type", Text, nullable=False),
    Column("message", Text, nullable=False), Column("data", Text),
    Index("events_job", "job_id", "seq"),
    sqlite_autoincrement=True)
# One row; every writing transaction locks it first (SELECT ... FOR UPDATE) on databases other
# than SQLite, where BEGIN IMMEDIATE serialises writers already.
_LOCK = Table("jobs_lock", _METADATA, Column("id", Integer, primary_key=True,
                                              autoincrement=False))


def _engine(url: str | URL) -> Engine:
    try:
        parsed = make_url(url)
    except Exception:
        raise JobDatabaseError(
            "--jobs_database is not a database URL; use e.g. "
            "sqlite:///path/jobs.sqlite3 or postgresql+psycopg://user:password@host/db") from None
    shown = parsed.render_as_string(hide_password=True)
    sqlite = parsed.get_backend_name() == "sqlite"
    try:
        engine = create_engine(parsed, connect_args={"timeout": 30} if sqlite else {},
                               **({} if sqlite else {"pool_pre_ping": True}))
    except (ImportError, NoSuchModuleError) as error:
        raise JobDatabaseError(
            f"--jobs_database {shown}: no driver for it ({type(error).__name__}: "
            f"{_first_line(error, parsed)}); install the driver the URL names (e.g. pip install "
            "'psycopg[binary]' for postgresql+psycopg://)") from None
    except Exception as error:
        raise JobDatabaseError(f"--jobs_database {shown}: {_first_line(error, parsed)}") \
            from None
    if sqlite:
        # pysqlite's own transactions are off and SQLAlchemy begins them (its documented
        # recipe): a writing one with BEGIN IMMEDIATE, so one that counts and inserts holds the
        # write lock from its start; reads see a WAL snapshot and wait for nothing.
        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, record):
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin(connection):
            write = connection.get_execution_options().get("jobs_write")
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
    return engine


def _first_line(error: BaseException, url: URL) -> str:
    """An error's first line, without the URL's password should a driver repeat it."""
    text = str(getattr(error, "orig", None) or error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    if url.password:
        line = line.replace(str(url.password), "***")
    return line


class JobStore:
    """The jobs and their events in an SQL database (SQLAlchemy Core): SQLite at
    `state_dir/jobs.sqlite3` by default, or the database at `database_url`; safe to use from
    several threads (a pooled connection per call)."""

    def __init__(self, state_dir: str | Path, database_url: str | None = None):
        self.state_dir = Path(state_dir)
        self.jobs_dir = self.state_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / "jobs.sqlite3"
        self.engine = _engine(database_url or URL.create("sqlite", database=str(self.path)))
        self.database = self.engine.url.render_as_string(hide_password=True)
        self._sqlite = self.engine.dialect.name == "sqlite"
        try:
            with self._write(lock=False) as db:
                _METADATA.create_all(db)
            with self._write(lock=False) as db:
                if db.execute(select(_LOCK.c.id)).first() is None:
                    db.execute(insert(_LOCK).values(id=1))
        except IntegrityError:
            pass  # another server inserted the lock row meanwhile
        except Exception as error:
            self.engine.dispose()
            raise JobDatabaseError(f"--jobs_database {self.database}: cannot use it: "
                                   f"{_first_line(error, self.engine.url)}") from None

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self, *, lock: bool = True) -> Iterator[Connection]:
        """A transaction that holds the store's write lock until it ends."""
        with self.engine.connect() as db:
            db.execution_options(jobs_write=True)
            with db.begin():
                if lock and not self._sqlite:
                    db.execute(select(_LOCK.c.id).where(_LOCK.c.id == 1).with_for_update())
                yield db

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def count_active(self) -> int:
        """Jobs queued or running."""
        with self.engine.connect() as db:
            return self._count_active(db)

    @staticmethod
    def _count_active(db: Connection) -> int:
        return db.execute(select(func.count()).select_from(_JOBS)
                          .where(_JOBS.c.status.in_(ACTIVE))).scalar_one()

    def create(self, job_id: str, model: str, params: dict[str, Any], *,
               max_active: int | None = None) -> None:
        """A new queued job; JobError `rate_limit_exceeded` when `max_active` jobs are already
        queued or running (counted in the same transaction: two requests cannot both pass)."""
        with self._write() as db:
            if max_active is not None:
                check_active(self._count_active(db), max_active)
            db.execute(insert(_JOBS).values(id=job_id, model=model, status="queued",
                                            params=json.dumps(params),
                                            created_at=int(time.time())))
            self._event(db, job_id, "status", "Job queued.", {"status": "queued"})

    @staticmethod
    def _event(db: Connection, job_id: str, type: str, message: str, data: dict | None = None,
               level: str = "info") -> None:
        db.execute(insert(_EVENTS).values(
            job_id=job_id, created_at=int(time.time()), level=level, type=type,
            message=message, data=json.dumps(data) if data is not None else None))

    def add_event(self, job_id: str, type: str, message: str, data: dict | None = None,
                  level: str = "info", *, unique: bool = False) -> bool:
        """Append an event; with `unique`, only if the job has no event of this type and data
        yet (a resumed run validates a step again: one event per image). True if added."""
        with self._write() as db:
            if unique and db.execute(select(literal(1)).where(
                    _EVENTS.c.job_id == job_id, _EVENTS.c.type == type,
                    _EVENTS.c.data == json.dumps(data))).first():
                return False
            self._event(db, job_id, type, message, data, level)
            return True

    def set_status(self, job_id: str, status: str, *, only_from: tuple[str, ...] | None = None,
                   message: str | None = None, error: dict | None = None,
                   fine_tuned_model: str | None = None) -> bool:
        """Move the job to `status` (only from `only_from` when given) with its status event,
        in one transaction; False when the job was not in `only_from`."""
        with self._write() as db:
            current = db.execute(select(_JOBS.c.status).where(_JOBS.c.id == job_id)).first()
            if current is None or (only_from is not None and current.status not in only_from):
                return False
            finished = int(time.time()) if status in FINISHED else None
            db.execute(update(_JOBS).where(_JOBS.c.id == job_id).values(
                status=status, finished_at=finished,
                error=json.dumps(error) if error else None,
                fine_tuned_model=func.coalesce(fine_tuned_model, _JOBS.c.fine_tuned_model)))
            self._event(db, job_id, "status", message or f"Job {status}.", {"status": status},
                        level="error" if status == "failed" else "info")
            return True

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as db:
            row = db.execute(select(_JOBS).where(_JOBS.c.id == job_id)).first()
        return _job_row(row) if row else None

    def list(self, *, limit: int, after: str | None = None,
             status: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """Jobs newest first, those older than job `after`; (jobs, has_more)."""
        query = select(_JOBS)
        if after is not None:
            query = query.where(_JOBS.c.seq < select(_JOBS.c.seq).where(_JOBS.c.id == after)
                                .scalar_subquery())
        if status is not None:
            query = query.where(_JOBS.c.status == status)
        with self.engine.connect() as db:
            rows = db.execute(query.order_by(_JOBS.c.seq.desc()).limit(limit + 1)).all()
        return [_job_row(row) for row in rows[:limit]], len(rows) > limit

    def next_queued(self) -> str | None:
        with self.engine.connect() as db:
            return db.execute(select(_JOBS.c.id).where(_JOBS.c.status == "queued")
                              .order_by(_JOBS.c.seq).limit(1)).scalar()

    def events(self, job_id: str, *, after_seq: int = 0, limit: int | None = None,
               newest_first: bool = False) -> list[dict[str, Any]]:
        query = (select(_EVENTS).where(_EVENTS.c.job_id == job_id, _EVENTS.c.seq > after_seq)
                 .order_by(_EVENTS.c.seq.desc() if newest_first else _EVENTS.c.seq))
        if limit is not None:
            query = query.limit(limit)
        with self.engine.connect() as db:
            rows = db.execute(query).all()
        return [_event_row(row) for row in rows]

    def delete(self, job_id: str) -> dict[str, Any] | None:
        """Forget a finished job and its events (its files are the caller's); returns the job
        as it was, None if there is none. JobError `job_not_finished` if it is active."""
        with self._write() as db:
            row = db.execute(select(_JOBS).where(_JOBS.c.id == job_id)).first()
            if row is None:
                return None
            if row.status not in FINISHED:
                raise JobError(f"The job is {row.status}; cancel it first (POST "
                               f"{JOBS_PATH}/{job_id}/cancel), then delete it.",
                               "fine_tuning_job_id", "job_not_finished")
            db.execute(sql_delete(_EVENTS).where(_EVENTS.c.job_id == job_id))
            db.execute(sql_delete(_JOBS).where(_JOBS.c.id == job_id))
        return _job_row(row)

    def finished_before(self, timestamp: int) -> list[str]:
        """Jobs that finished before `timestamp` (seconds since the epoch), oldest first."""
        with self.engine.connect() as db:
            return list(db.execute(
                select(_JOBS.c.id).where(_JOBS.c.status.in_(FINISHED),
                                         _JOBS.c.finished_at < timestamp)
                .order_by(_JOBS.c.seq)).scalars())

    def ids(self) -> set[str]:
        with self.engine.connect() as db:
            return set(db.execute(select(_JOBS.c.id)).scalars())

    def requeue_interrupted(self) -> list[str]:
        """Jobs left `running` by a server that died: queued again (they resume from their last
        checkpoint). Returns their ids."""
        with self.engine.connect() as db:
            ids = list(db.execute(select(_JOBS.c.id).where(_JOBS.c.status == "running")
                                  .order_by(_JOBS.c.seq)).scalars())
        for job_id in ids:
            self.set_status(job_id, "queued", only_from=("running",),
                            message="The server restarted; the job is queued again and "
                                    "resumes from its last checkpoint.")
        return ids


def _job_row(row: Row) -> dict[str, Any]:
    job = dict(row._mapping)
    job["params"] = json.loads(job["params"])
    job["error"] = json.loads(job["error"]) if job["error"] else None
    return job


def _event_row(row: Row) -> dict[str, Any]:
    event = dict(row._mapping)
    event["data"] = json.loads(event["data"]) if event["data"] else None
    return event


class JobRunner:
    """One thread that trains the queued jobs in order, each in a child process.

    `base_model(name)` gives the folder of a served model (None if the server no longer serves
    it); `on_success(job)` registers the trained model and returns its name; `on_idle()` runs
    at most hourly while no job waits.
    """

    def __init__(self, store: JobStore, *, base_model: Callable[[str], Path | None],
                 on_success: Callable[[dict[str, Any]], str],
                 on_idle: Callable[[], None] | None = None, accelerator: str = "auto"):
        self.store, self.base_model, self.on_success = store, base_model, on_success
        self.on_idle, self._idle_at = on_idle, time.monotonic()
        self.accelerator = accelerator
        self._wake = threading.Condition()
        self._stopping = False
        self._cancel: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="fine-tuning-jobs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def cancel(self, job_id: str) -> None:
        """Stop the job if it runs: its process is killed and its output removed."""
        with self._wake:
            self._cancel.add(job_id)
            self._wake.notify_all()

    def stop(self, timeout: float = _STOP_GRACE_S + 5) -> None:
        """Interrupt the running training (it writes a checkpoint and stays `running`, to
        resume when a server starts on this state_dir again) and end the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._wake:
                if self._stopping:
                    return
            job_id = self.store.next_queued()
            if job_id is None and self.on_idle is not None and (
                    time.monotonic() - self._idle_at > _IDLE_EVERY_S):
                self._idle_at = time.monotonic()
                try:
                    self.on_idle()
                except Exception:
                    logger.exception("fine-tuning jobs: the idle task failed")
            if job_id is None:
                with self._wake:
                    if not self._stopping:
                        self._wake.wait(1.0)
                continue
            try:
                self._run(job_id)
            except Exception as error:  # a bug here must not end the queue
                logger.exception("fine-tuning job %s", job_id)
                self.store.set_status(job_id, "failed", only_from=("running", "queued"), error={
                    "message": scrub(f"internal error: {error}", self.store.job_dir(job_id),
                                     None), "code": "server_error", "param": None})

    def _run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        params = job["params"]
        base = self.base_model(job["model"])
        if base is None:
            self.store.set_status(job_id, "failed", only_from=("queued",), error={
                "message": f"The model '{job['model']}' is no longer served.",
                "code": "model_not_found", "param": "model"})
            return
        job_dir = self.store.job_dir(job_id)
        trained = (job_dir / TRAINED_FILE).is_file()  # a server stopped while it finished
        if not self.store.set_status(
                job_id, "running", only_from=("queued",),
                message="Training had finished; saving the results." if trained else
                "Training started."):
            return  # cancelled meanwhile
        if not trained and not self._train(job_id, job_dir, params, base):
            return
        self._finish(job_id, job_dir, base)

    def _train(self, job_id: str, job_dir: Path, params: dict[str, Any], base: Path) -> bool:
        """Run the training process to its end; True when it wrote its outputs, else the job
        is failed, cancelled or (the server stops) left `running` to resume."""
        values = {**params["values"], **_server_values(
            job_dir, str(base), params["identifier"], params["class_noun"], params["values"],
            accelerator=self.accelerator)}
        (job_dir / "config.json").write_text(json.dumps(values))
        (job_dir / "validation_prompts.txt").write_text(
            "\n".join(validation_prompts(params["identifier"], params["class_noun"])) + "\n")
        events_path = job_dir / "events.jsonl"
        offset = events_path.stat().st_size if events_path.exists() else 0
        with open(job_dir / "train.log", "ab") as log:
            # Its own process group (killed as a whole); it dies with this server
            # (dreambooth.serve.job_guard) and holds the job's lock while it lives.
            process = subprocess.Popen(
                [sys.executable, "-m", "dreambooth.serve.job_process", str(job_dir),
                 str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        start = offset
        outcome, offset = self._watch(job_id, process, events_path, offset, base)
        lines, offset = _read_lines(events_path, offset)
        self._store_progress(job_id, lines, job_dir, base)
        lines, _ = _read_lines(events_path, start)  # this run's lines, for its error
        if outcome == "cancelled":
            remove_outputs(job_dir)
            self.store.set_status(job_id, "cancelled", only_from=("running",),
                                  message="Job cancelled; its outputs were removed.")
            return False
        if outcome == "stopped":
            return False  # stays `running`: requeued and resumed by the next server
        errors = [line for line in lines if line.get("type") == "error"]
        if process.returncode != 0 or errors or not (job_dir / TRAINED_FILE).is_file():
            message = (errors[-1]["message"] if errors else
                       _exit_message(process.returncode))
            self.store.set_status(job_id, "failed", only_from=("running",), error={
                "message": scrub(message, job_dir, base), "code": "training_failed",
                "param": None}, message="Training failed.")
            return False
        return True

    def _finish(self, job_id: str, job_dir: Path, base: Path) -> None:
        """A trained job's last phase; every step may be done again (a server stopped in the
        middle starts here): its checkpoints go, its model is served, it succeeds."""
        shutil.rmtree(job_dir / "output" / "checkpoints", ignore_errors=True)
        try:
            name = self.on_success(self.store.get(job_id))
        except Exception as error:
            logger.exception("registering the model of job %s", job_id)
            self.store.set_status(job_id, "failed", only_from=("running",), error={
                "message": scrub(f"the trained model could not be loaded: {error}", job_dir,
                                  base), "code": "server_error", "param": None})
            return
        self.store.set_status(job_id, "succeeded", only_from=("running",), fine_tuned_model=name,
                              message=f"Job succeeded: the model '{name}' is served.")

    def _watch(self, job_id: str, process: subprocess.Popen, events_path: Path,
               offset: int, base: Path) -> tuple[str, int]:
        """Tail the process's events until it ends: 'ended', 'cancelled' or 'stopped'."""
        job_dir = events_path.parent
        while True:
            try:
                process.wait(_POLL_S)
                return "ended", offset
            except subprocess.TimeoutExpired:
                pass
            lines, offset = _read_lines(events_path, offset)
            self._store_progress(job_id, lines, job_dir, base)
            with self._wake:
                cancelled, stopping = job_id in self._cancel, self._stopping
                self._cancel.discard(job_id)
            if cancelled:
                _kill(process, signal.SIGKILL)
                return "cancelled", offset
            if stopping:
                _kill(process, signal.SIGINT)  # Lightning writes an interrupt checkpoint
                try:
                    process.wait(_STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    _kill(process, signal.SIGKILL)
                    process.wait()
                return "stopped", offset

    def _store_progress(self, job_id: str, lines: list[dict], job_dir: Path,
                        base: Path | None) -> None:
        for line in lines:
            kind = line.get("type")
            if kind == "metrics":
                data = {key: line.get(key) for key in
                        ("step", "max_steps", "loss", "lr", "eta_seconds")}
                loss = "nan" if data["loss"] is None else f"{data['loss']:.4f}"
                self.store.add_event(job_id, "metrics",
                                     f"Step {data['step']}/{data['max_steps']}: "
                                     f"training loss={loss}", data)
            elif kind == "validation" and VALIDATION_IMAGE.fullmatch(str(line.get("image"))):
                step = int(line.get("step", 0))
                self.store.add_event(
                    job_id, "validation", f"Validation images at step {step}.",
                    {"step": step, "url": f"{JOBS_PATH}/{job_id}/images/{line['image']}"},
                    unique=True)
            elif kind == "message":
                self.store.add_event(job_id, "message",
                                     scrub(str(line.get("message", "")), job_dir, base))


def _read_lines(path: Path, offset: int) -> tuple[list[dict], int]:
    """Whole JSON lines appended to `path` after byte `offset`; (lines, new offset)."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as file:
        file.seek(offset)
        data = file.read()
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    lines = []
    for raw in data[:end].splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            logger.warning("unreadable progress line in %s", path)
    return lines, offset + end


def _kill(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass
    if sig == signal.SIGKILL:
        process.wait()


def _exit_message(returncode: int) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (e.g. out of memory)" if returncode == -signal.SIGKILL else ""
        return f"the training process was killed by {name}{hint}"
    return f"the training process exited with code {returncode}"


# An absolute path left in a message (a library's file, a cache): POSIX or Windows, not part of
# a URL or of a relative path ("a/b").
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"`,;:()\[\]{}<>]+|\b[A-Za-z]:\\[^\s'\"`,;]+")


def scrub(message: str, job_dir: Path, base: Path | None) -> str:
    """A message without server paths: the job folder's files by their names in it, the base
    model's folder as "the base model", any other absolute path as "<server path>"."""
    message = message.replace(str(job_dir) + os.sep, "").replace(str(job_dir), "job")
    if base is not None:
        message = message.replace(str(base), "the base model")
    return _ABSOLUTE_PATH.sub("<server path>", message)


def remove_outputs(job_dir: Path) -> None:
    """What a job trained or generated (its photos and records stay)."""
    for name in ("output", "class_images"):
        shutil.rmtree(job_dir / name, ignore_errors=True)
    for name in (TRAINED_FILE, "model.zip"):
        (job_dir / name).unlink(missing_ok=True)


def result_files(job: dict[str, Any], job_dir: Path) -> dict[str, Path]:
    """The downloadable results of a succeeded job, {kind: path} (model_zip and single_file:
    their source folder; the zip and the single file are built on first download)."""
    if job["status"] != "succeeded":
        return {}
    output = job_dir / "output"
    if job["params"]["values"].get("use_lora"):
        return {"lora_kohya": output / f"{job_dir.name}.safetensors",
                "lora_diffusers": output / "pytorch_lora_weights.safetensors"}
    return {"model_zip": output, "single_file": output}


def single_file(job_dir: Path, base: Path | None) -> Path:
    """The trained pipeline as one A1111/ComfyUI checkpoint, `model.safetensors` beside the
    output (made once, atomically, by `dreambooth export --format single-file`), its metadata
    without server paths (the export records where it read the model from)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dreambooth.files import atomic_path
    from dreambooth.formats.export import export_model

    target = job_dir / "model.safetensors"
    if not target.exists():
        staging = export_model(job_dir / "output", "single-file",
                               job_dir / "model.staging.safetensors")
        with safe_open(str(staging), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = {key: scrub(value, job_dir, base)
                        for key, value in (handle.metadata() or {}).items()}
        with atomic_path(target) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        staging.unlink()
    return target


def model_zip(job_dir: Path, model: str, base: Path | None) -> Path:
    """The trained pipeline folder as `model.zip` beside it (made once, atomically); its
    training_config.yaml names the job's files relative to the job and the base model by its
    served name `model`, never by a server path."""
    from dreambooth.files import atomic_path
    from dreambooth.models import TRAINING_CONFIG_FILE

    target = job_dir / "model.zip"
    if not target.exists():
        import zipfile

        output = job_dir / "output"
        with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for path in sorted(output.rglob("*")):
                relative = path.relative_to(output)
                if not path.is_file() or relative.parts[0] in _NOT_ZIPPED:
                    continue
                if relative.as_posix() == TRAINING_CONFIG_FILE:
                    zf.writestr(TRAINING_CONFIG_FILE,
                                public_config(path.read_text(), job_dir, model, base))
                else:
                    zf.write(path, relative.as_posix())
    return target


def public_config(text: str, job_dir: Path, model: str, base: Path | None) -> str:
    """A job's training_config.yaml without server paths (see model_zip)."""
    import yaml

    values = yaml.safe_load(text) or {}
    for key, value in values.items():
        if not isinstance(value, str):
            continue
        if key == "pretrained_model_name_or_path":
            values[key] = model
        elif value == str(job_dir) or value.startswith(str(job_dir) + os.sep):
            values[key] = Path(value).relative_to(job_dir).as_posix()
        else:
            values[key] = scrub(value, job_dir, base)
    return yaml.safe_dump(values, sort_keys=False)
