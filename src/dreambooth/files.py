"""Atomic file writes: a crash mid-write never leaves a half-written file in place.

Every writer goes to a temporary file in the target's folder, flushes it to disk, then renames
it over the target (`os.replace` is atomic on POSIX and Windows within one file system).
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
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
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


def replace_folder(staging: str | Path, path: str | Path) -> None:
    """Move the finished folder `staging` to `path`, replacing what is there. The old folder is
    set aside by a rename first, so a crash leaves the old or the new folder under `path`'s
    name or beside it, never a half-written one."""
    staging, path = Path(staging), Path(path)
    if not path.exists():
        staging.replace(path)
        return
    previous = path.with_name(path.name + ".previous")
    shutil.rmtree(previous, ignore_errors=True)
    path.replace(previous)
    staging.replace(path)
    shutil.rmtree(previous)
