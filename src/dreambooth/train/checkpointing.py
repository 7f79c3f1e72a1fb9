"""Full-state checkpoints: atomic files, finding the newest, a save on Ctrl-C, and whether a
run may resume one (the same models, data and noise streams).

Lightning writes the checkpoint (trainable weights, optimizer, LR scheduler, loop progress,
callbacks); the module adds the RNG states. These pieces make the writes atomic and name the
files `checkpoint-{step}.ckpt` in `output_dir/checkpoints`.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dreambooth.files import DiskFullError, atomic_path
from dreambooth.train.module import NonFiniteError

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)\.ckpt$")
# files.atomic_path's temporary file of a checkpoint write: `.checkpoint-N.ckpt.<random>.tmp`.
PARTIAL_PATTERN = re.compile(r"^\.checkpoint-\d+\.ckpt\..+\.tmp$")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place.

    A crash mid-write leaves the previous checkpoint (and any older one) intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_path(path) as tmp:  # a full disk: files.DiskFullError naming the path
            torch.save(checkpoint, tmp)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be resumed from; the message names it and says why."""


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents (tensors memory-mapped), or CheckpointError naming the file:
    truncated or corrupt (a write that was killed, a disk that filled up), or holding Python
    objects that would need code to load (never run here)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint '{path}' holds Python objects beyond tensors, which would run code to "
            f"load; it was not written by this tool ({str(error).splitlines()[0][:200]})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"checkpoint '{path}' is truncated or corrupt "
                              f"({str(error).splitlines()[0][:200]})") from None


def remove_partial_writes(checkpoint_dir: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were killed (`.NAME.ckpt.*.tmp`)."""
    if not checkpoint_dir.is_dir():
        return []
    leftovers = [path for path in checkpoint_dir.iterdir() if PARTIAL_PATTERN.match(path.name)]
    for path in leftovers:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by a checkpoint write that did not finish", path)
    return leftovers


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}.ckpt"


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the folder, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir()
             if (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def resolve_resume_path(resume_from_checkpoint: str | None, checkpoint_dir: Path) -> Path | None:
    """'latest' -> newest checkpoint (None with a warning if there is none); a name such as
    'checkpoint-500' or a path -> that file, or a clear error if it does not exist."""
    if not resume_from_checkpoint:
        return None
    remove_partial_writes(checkpoint_dir)
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(checkpoint_dir)
        if not found:
            log.warning("resume_from_checkpoint=latest: no checkpoint in '%s'; starting a new run",
                        checkpoint_dir)
            return None
        problems = []
        for _, path in reversed(found):  # the newest that loads
            try:
                read_checkpoint(path)
            except CheckpointError as error:
                log.warning("resume_from_checkpoint=latest: skipping %s", error)
                problems.append(str(error))
                continue
            return path
        raise CheckpointError("resume_from_checkpoint=latest: no checkpoint in "
                              f"'{checkpoint_dir}' loads: " + "; ".join(problems))
    candidates = [Path(resume_from_checkpoint), checkpoint_dir / resume_from_checkpoint,
                  checkpoint_dir / f"{resume_from_checkpoint}.ckpt"]
    for candidate in candidates:
        if candidate.is_file():
            read_checkpoint(candidate)  # a clear error now rather than deep inside Lightning
            return candidate
    available = ", ".join(p.name for _, p in list_checkpoints(checkpoint_dir)) or "none"
    raise FileNotFoundError(
        f"resume_from_checkpoint={resume_from_checkpoint!r}: no such checkpoint file (looked in "
        f"'{checkpoint_dir}'; available: {available}). Pass 'latest' or a .ckpt path.")


def saved_config(checkpoint_path: Path, key: str) -> dict[str, Any]:
    """The configuration a run stored under `key` in its checkpoint ({} when there is none)."""
    return read_checkpoint(checkpoint_path).get(key, {})


def check_resume(checkpoint_path: Path, saved: Mapping[str, Any], values: Mapping[str, Any],
                 invariants: Iterable[str], advice: str) -> None:
    """Refuse to resume a run whose `invariants` (keys of the models, data and noise streams)
    differ from the checkpoint's `saved` configuration; the error lists every difference and
    ends with `advice`. Keys the checkpoint does not hold are not compared."""
    mismatched = [f"{key}: checkpoint has {saved[key]!r}, this run has {values[key]!r}"
                  for key in invariants if key in saved and saved[key] != values[key]]
    if mismatched:
        raise ValueError(f"cannot resume exactly from '{checkpoint_path}': "
                         + "; ".join(mismatched) + f". {advice}")


def periodic_checkpoints(checkpoint_dir: Path, every_n_steps: int,
                         keep: int | None) -> ModelCheckpoint:
    """Lightning's ModelCheckpoint keeping the newest `keep` checkpoints (all when None)."""
    return ModelCheckpoint(
        dirpath=checkpoint_dir, filename="checkpoint-{step}", auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps, save_top_k=keep if keep else -1,
        monitor="step", mode="max", save_last=False, save_on_train_epoch_end=False)


class InterruptCheckpoint(Callback):
    """On Ctrl-C (or any exception) write `checkpoint-{step}.ckpt` so the run can resume.

    The weights and optimizer are those of the last completed optimizer step even when the
    interrupt came mid-accumulation (parameters only change at a step), so the loop progress
    saved is rounded back to that step boundary; resuming redoes the partial step exactly.
    """

    def __init__(self, checkpoint_dir: Path, accumulation_steps: int,
                 resume_hint: str = "resume with --resume_from_checkpoint latest"):
        self.checkpoint_dir = checkpoint_dir
        self.accumulation_steps = accumulation_steps
        self.resume_hint = resume_hint
        self._saving = False

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if trainer.global_step == 0 or trainer.state.fn != "fit":
            return
        if isinstance(exception, (NonFiniteError, DiskFullError)):
            return  # NaN weights are not worth resuming; a full disk cannot take them
        path = self.checkpoint_dir / checkpoint_name(trainer.global_step)
        self._saving = True
        try:
            trainer.save_checkpoint(path)
        finally:
            self._saving = False
        log.warning("%s: wrote %s; %s", type(exception).__name__, path, self.resume_hint)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if not self._saving:
            return
        boundary = trainer.global_step * self.accumulation_steps
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        for scope in ("total", "current"):
            progress[scope].update(ready=boundary, started=boundary, processed=boundary,
                                   completed=boundary)
