"""The training process of one fine-tuning job: `python -m dreambooth.serve.job_process JOB_DIR
SERVER_PID`.

It first ties itself to the server (`dreambooth.serve.job_guard`: it dies with SERVER_PID, and
holds the job's lock, so two processes never train one job). Then it reads
`JOB_DIR/config.json` (flat config keys, written by `dreambooth.serve.jobs.JobRunner`), runs
`train`, and appends one JSON line per event to `JOB_DIR/events.jsonl`: `metrics` after every
optimizer step (step, max_steps, loss, lr, eta_seconds), `validation` when a validation grid
was written (step, image: its file name in `output/validation`), `message` notes, and `error`
(the exception's message) when training fails. Once `train` has returned (every output
written), `JOB_DIR/trained.json` is written atomically: from then on the job never trains
again, and its checkpoints may go. Exit code 0 means that file is written.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import lightning as L

from dreambooth.serve.job_guard import JobLocked, die_with_parent, job_lock
from dreambooth.serve.jobs import TRAINED_FILE

EXIT_LOCKED = 75  # another process trains this job


class _EventLog:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **event) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(event) + "\n")


class ProgressEvents(L.Callback):
    """A `metrics` line after every optimizer step, with an ETA from this process's pace."""

    def __init__(self, events: _EventLog, max_steps: int):
        self.events, self.max_steps = events, max_steps
        self._start: tuple[float, int] | None = None
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.monotonic(), trainer.global_step)
        if trainer.global_step:
            self.events.write(type="message", message=f"Resumed from step {trainer.global_step}.")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # mid gradient accumulation
        self._last_step = step
        started, first_step = self._start
        done = step - first_step
        eta = (time.monotonic() - started) / done * (self.max_steps - step) if done else None
        metrics = trainer.callback_metrics
        loss = metrics.get("loss")
        self.events.write(type="metrics", step=step, max_steps=self.max_steps,
                          loss=None if loss is None else float(loss),
                          lr=trainer.optimizers[0].param_groups[0]["lr"],
                          eta_seconds=None if eta is None else round(eta, 1))


class ValidationEvents(L.Callback):
    """A `validation` line for each grid `ValidationSamples` writes in this process (it runs
    after that callback: the user's callbacks come last)."""

    def __init__(self, events: _EventLog, folder: Path):
        self.events, self.folder = events, folder
        self._since = time.time()
        self._reported: set[str] = set()

    def _report(self, step: int) -> None:
        name = f"step-{step:06d}.png"
        path = self.folder / name
        # Written by this process (a resumed run finds the grids of the run before it).
        if name not in self._reported and path.is_file() and path.stat().st_mtime >= self._since:
            self._reported.add(name)
            self.events.write(type="validation", step=step, image=name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._report(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self._report(trainer.global_step)


def main(job_dir: str, server_pid: int | None = None) -> int:
    folder = Path(job_dir)
    events = _EventLog(folder / "events.jsonl")
    if server_pid is not None:
        die_with_parent(server_pid)
    try:
        lock = job_lock(folder)  # held until this process ends
    except JobLocked as error:
        events.write(type="error", message=str(error))
        return EXIT_LOCKED
    try:
        from dreambooth.config import parse_train_config
        from dreambooth.files import atomic_write_text
        from dreambooth.train.run import resolve_config, train

        config = parse_train_config(json.loads((folder / "config.json").read_text()),
                                    source="job configuration")
        max_steps = resolve_config(config).optim.max_train_steps
        validation = Path(config.checkpoint.output_dir) / "validation"
        train(config, callbacks=[ProgressEvents(events, max_steps),
                                 ValidationEvents(events, validation)])
        atomic_write_text(folder / TRAINED_FILE, json.dumps({"max_train_steps": max_steps}))
    except (KeyboardInterrupt, SystemExit):
        # The server is stopping (SIGINT; Lightning turns it into SystemExit after writing the
        # interrupt checkpoint): not the job's failure, it resumes on the next start.
        return 130
    except BaseException as error:  # every failure is the job's error message
        events.write(type="error", message=f"{type(error).__name__}: {error}")
        raise
    finally:
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
