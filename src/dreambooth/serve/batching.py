"""The batching scheduler of `dreambooth serve`: a bounded queue and one worker thread per model.

Requests wait in their model's queue, which holds at most `max_queue` of them: one more is
refused at once (the server answers 429) instead of growing an unbounded backlog. The model's
worker thread takes the oldest request and every queued request with the same `BatchKey`
(size, steps, guidance, scheduler, LoRA, task), up to `max_batch` images, waiting up to
`batch_wait_s` for more to arrive, and runs them as one UNet batch. Prompts, negative prompts,
seeds and input pictures may differ inside a batch: each image keeps its own generator, so an
image depends only on its seed, whatever it was batched with. Inference runs in the worker
thread, never on the event loop, and under the model's lock, so a pipeline never runs two
batches at once.
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
    """What every image of one UNet batch shares."""

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


class QueueFull(Exception):
    """The model's queue holds `max_queue` requests already."""


class WorkerStopped(Exception):
    """The server is shutting down; the request was not run."""


# (key, jobs) -> one image per seed of every job, in job order.
BatchRunner = Callable[[BatchKey, list[Job]], list[Image.Image]]


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
        self._queue: deque[Job] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"worker-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, then fail every queued job with WorkerStopped."""
        with self._changed:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._changed.notify_all()
        for job in left:
            _settle(job, error=WorkerStopped("the server is shutting down"))
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
            deadline = time.monotonic() + self.batch_wait_s
            while images < self.max_batch:
                for job in list(self._queue):
                    if job.key == first.key and images + job.size <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        images += job.size
                remaining = deadline - time.monotonic()
                if images >= self.max_batch or remaining <= 0 or self._stopping:
                    break
                self._changed.wait(remaining)  # woken by each submit
            depth = len(self._queue)
        self._on_queue_depth(depth)
        # A client that went away cancelled its future: do not spend a UNet batch on it.
        return [job for job in batch if not job.future.cancelled()]

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            if not batch:
                continue
            started = time.perf_counter()
            try:
                with self.lock:
                    images = self._run_batch(batch[0].key, batch)
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
