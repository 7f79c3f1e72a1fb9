"""Atomic writes: a crash mid-write never leaves a half-written file or folder in place.

Every writer goes to a temporary file (or folder) beside the target, then renames it over the
target (`os.replace` is atomic on POSIX and Windows within one file system); files are flushed
to disk first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is
    removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:  # make the bytes durable before the rename
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


FOLDER_MODES = ("replace", "merge", "keep")


@contextlib.contextmanager
def atomic_folder(path: str | Path, *, existing: str = "replace") -> Iterator[Path]:
    """Yield an empty staging folder beside `path`; on success it becomes `path`, on error it is
    removed. `existing` says what happens to a folder already at `path`:

    - "replace": it is set aside by a rename and deleted once the new folder is in place, so a
      crash leaves the old or the new folder under `path`'s name or beside it, never a
      half-written one;
    - "merge": each entry of the new folder replaces the entry of that name in `path` and the
      others stay (a training output_dir that also holds checkpoints and logs);
    - "keep": unless empty it is kept and the new folder dropped (another process filled a
      cache first).
    """
    if existing not in FOLDER_MODES:
        raise ValueError(f"existing='{existing}' is not one of {', '.join(FOLDER_MODES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        if not path.exists() or existing == "keep":
            try:
                staging.rename(path)  # also over an empty folder
            except OSError:
                if existing != "keep" or not path.is_dir():
                    raise
        elif existing == "replace":
            previous = path.with_name(path.name + ".previous")
            shutil.rmtree(previous, ignore_errors=True)
            path.replace(previous)
            staging.replace(path)
            shutil.rmtree(previous)
        elif existing == "merge":
            for entry in sorted(staging.iterdir()):
                target = path / entry.name
                if target.is_dir():
                    shutil.rmtree(target)
                entry.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
