"""Atomic writes: a crash mid-write never leaves a half-written file or folder in place.

Every writer goes to a temporary file (or folder) beside the target, then renames it over the
target (`os.replace` is atomic on POSIX and Windows within one file system); files are flushed
to disk first. Files and folders get the modes any normal write would (0666 and 0777 less the
umask), not the private 0600/0700 of temporary files, so a web UI running as another user can
read a model. A full disk is reported as DiskFullError naming the target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class DiskFullError(OSError):
    """The device of a target ran out of space; the message names the target."""


def current_umask() -> int:
    """The process's umask, read without changing it where the system says (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly racy with other threads)
    os.umask(mask)
    return mask


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC or its words, or any I/O error of a writer
    (torch's zip writer says "unexpected pos" or "file write failed") on a device with (almost)
    nothing left."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    text = str(error)
    if "No space left on device" in text or "os error 28" in text:
        return True
    try:
        nearly_full = shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False
    return nearly_full and isinstance(error, (OSError, RuntimeError))


@contextlib.contextmanager
def _reporting_full_disk(target: Path) -> Iterator[None]:
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not _is_disk_full(error, target.parent):
            raise
        free = shutil.disk_usage(target.parent).free
        raise DiskFullError(errno.ENOSPC, f"no space left on the device of '{target}' "
                            f"({free / 2**20:.0f} MiB free); free some space and run again "
                            "(nothing there was replaced)") from None


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
        with _reporting_full_disk(path):
            yield tmp_path
            with open(tmp_path, "rb+") as handle:  # make the bytes durable before the rename
                os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp made it private (0600)
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
        with _reporting_full_disk(path):
            yield staging
        _apply_umask(staging)
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


def _apply_umask(folder: Path) -> None:
    """Give a staging folder (mkdtemp: 0700) and any file in it that a writer made private the
    modes of a normal write."""
    umask = current_umask()
    os.chmod(folder, 0o777 & ~umask)
    for entry in folder.rglob("*"):
        mode = 0o777 if entry.is_dir() else 0o666
        if not entry.is_symlink():
            os.chmod(entry, mode & ~umask)
