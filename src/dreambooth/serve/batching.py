"""The batching scheduler of `dreambooth serve`: a bounded queue and one worker thread per model.

Requests wait in their model's queue, which holds at most `max_queue` of them: one more is
refused at once (the server answers 429) instead of growing an unbounded backlog. The model's
worker thread takes the oldest request and every queued request with the same `BatchKey`
(size, steps, guidance, scheduler, LoRA, task), up to `max_batch` images, waiting up to
`batch_wait_s` for more to arrive, and runs them as one denoiser batch (`max_batch` is per key:
`batch_limit(key)`, so large images share a batch with fewer others and memory stays
bounded). Prompts, negative prompts, seeds and input pictures may differ inside a batch: each
image keeps its own generator, so an image depends only on its seed, whatever it was batched
with. Inference runs in the worker thread, never on the event loop, and under the model's lock,
so a pipeline never runs two batches at once.

Work nobody waits for is not done: a job whose request was cancelled (its client went away) is
dropped before its batch runs, and a running batch is interrupted between denoising steps once
every job in it is cancelled or the server shuts down (`interrupted()`, checked by the runner).
`stop_accepting` answers every queued job with `WorkerStopped` (the server says 503) at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchKey:
    """What every image of one denoiser batch shares."""

    task: str  # "txt2img", "img2img" or "inpaint"
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None
    lora: str | None  # a LoRA name registered with the server
    lora_scale: float
    strength: float | None  # edits only


@dataclass(eq=False)
class Job:
    """One request: len(seeds) images with the same key; per image a prompt, seed, picture."""

    key: BatchKey
    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    images: list[Image.Image] | None = None  # edits: the starting picture per image
    masks: list[Image.Image] | None = None  # inpainting: white repaints
    future: asyncio.Future | None = field(default=None, repr=False)
    loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return len(self.seeds)

    def cancelled(self) -> bool:
        """The request was cancelled: its client disconnected."""
        return self.future is not None and self.future.cancelled()


class QueueFull(Exception):
    """The model's queue holds `max_queue` requests already."""


class WorkerStopped(Exception):
    """The server is shutting down; the request was not run."""


class BatchInterrupted(Exception):
    """Raised by a runner that saw `interrupted()`: nobody waits for the batch any more."""


# (key, jobs, interrupted) -> one image per seed of every job, in job order. The runner checks
# `interrupted()` between denoising steps and raises BatchInterrupted when it says True.
BatchRunner = Callable[[BatchKey, list[Job], Callable[[], bool]], list[Image.Image]]


class ModelWorker:
    """Runs the queued jobs of one model in its own thread, one batch at a time."""

    def __init__(
        self,
        name: str,
        run_batch: BatchRunner,
        *,
        max_queue: int,
        max_batch: int,
        batch_wait_s: float,
        on_queue_depth: Callable[[int], None] = lambda depth: None,
        on_batch: Callable[[int, float], None] = lambda images, seconds: None,
        on_cancelled: Callable[[int], None] = lambda jobs: None,
        batch_limit: Callable[[BatchKey], int] | None = None,
    ):
        self.name = name
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        # Held while a batch runs: whoever else touches the pipeline takes it too.
        self.lock = threading.Lock()
        self._run_batch = run_batch
        self._on_queue_depth = on_queue_depth
        self._on_batch = on_batch
        self._on_cancelled = on_cancelled
        self.batch_limit = batch_limit or (lambda key: max_batch)
        self._queue: deque[Job] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"worker-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop_accepting(self) -> None:
        """Refuse new jobs, fail every queued job with WorkerStopped and interrupt the running
        batch; returns at once (`stop` also waits for the thread)."""
        with self._changed:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._changed.notify_all()
        for job in left:
            _settle(job, error=WorkerStopped("the server is shutting down; retry on another "
                                             "replica or later"))

    def stop(self, timeout: float = 30.0) -> None:
        """`stop_accepting`, then wait up to `timeout` seconds for the worker thread to end."""
        self.stop_accepting()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch that runs)."""
        return len(self._queue)

    async def submit(self, job: Job) -> list[Image.Image]:
        """Queue `job` and wait for its images; raises QueueFull at once when the queue is full."""
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        with self._changed:
            if self._stopping:
                raise WorkerStopped("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"model '{self.name}' has {len(self._queue)} requests waiting")
            self._queue.append(job)
            depth = len(self._queue)
            self._changed.notify_all()
        self._on_queue_depth(depth)
        return await job.future

    def _take_batch(self) -> list[Job] | None:
        """Block until a job waits; return it with the compatible jobs that fit (None: stop)."""
        with self._changed:
            while not self._queue:
                if self._stopping:
                    return None
                self._changed.wait()
            first = self._queue.popleft()
            batch, images = [first], first.size
            limit = self.batch_limit(first.key)
            deadline = time.monotonic() + self.batch_wait_s
            while images < limit:
                for job in list(self._queue):
                    if job.key == first.key and images + job.size <= limit:
                        self._queue.remove(job)
                        batch.append(job)
                        images += job.size
                remaining = deadline - time.monotonic()
                if images >= limit or remaining <= 0 or self._stopping:
                    break
                self._changed.wait(remaining)  # woken by each submit
            depth = len(self._queue)
        self._on_queue_depth(depth)
        return batch

    def _live(self, batch: list[Job]) -> list[Job]:
        """The jobs of `batch` somebody still waits for (a client that went away cancelled its
        future: no denoiser batch is spent on it)."""
        live = [job for job in batch if not job.cancelled()]
        if len(live) < len(batch):
            self._on_cancelled(len(batch) - len(live))
        return live

    def _interrupted(self, batch: list[Job]) -> bool:
        return self._stopping or all(job.cancelled() for job in batch)

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            started = time.perf_counter()
            try:
                with self.lock:
                    # Checked again under the lock: a client may have left while we waited.
                    batch = self._live(batch)
                    if not batch:
                        continue
                    if self._stopping:
                        raise WorkerStopped("the server is shutting down; retry later")
                    images = self._run_batch(batch[0].key, batch,
                                             lambda batch=batch: self._interrupted(batch))
            except BatchInterrupted:
                stopped = WorkerStopped("the server shut down while this request ran; retry "
                                        "later")
                self._on_cancelled(sum(job.cancelled() for job in batch))
                for job in batch:
                    _settle(job, error=stopped)
                continue
            except Exception as error:  # noqa: BLE001 - each request gets it; the worker lives on
                for job in batch:
                    _settle(job, error=error)
                continue
            self._on_batch(len(images), time.perf_counter() - started)
            offset = 0
            for job in batch:
                _settle(job, images=images[offset : offset + job.size])
                offset += job.size


def _settle(job: Job, *, images: list[Image.Image] | None = None,
            error: BaseException | None = None) -> None:
    """Hand the result to the request's event loop (futures are not thread-safe)."""

    def settle() -> None:
        if job.future.done():  # cancelled: the client disconnected
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(images)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed: the server has stopped
        logger.debug("dropped the result of a job: its event loop is closed")
