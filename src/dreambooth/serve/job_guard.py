"""One training process per fine-tuning job, and none without its server.

A job's training process (`dreambooth.serve.job_process`) calls both of these first:

- `die_with_parent(server_pid)`: the process ends when the server does, even when the server
  is killed with SIGKILL and cannot stop it. On Linux the kernel sends it SIGKILL
  (`prctl(PR_SET_PDEATHSIG)`); everywhere a thread also checks twice a second that its parent
  is still the server (it catches a server that died before the prctl call, too).
- `job_lock(job_dir)`: an exclusive `fcntl.flock` on `JOB_DIR/train.lock`, held while the
  process lives (the kernel releases it when the process ends, however it ends). A second
  process for the same job waits for it, then gives up with `JobLocked`.

And the server holds `state_lock(state_dir)` while it runs: two servers on one state_dir would
both requeue and train its jobs.

This module imports nothing heavy: the training process calls it before torch is loaded.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO

PARENT_POLL_S = 0.5
LOCK_WAIT_S = 30.0  # an orphan that is dying (its server was killed) frees the lock in ~0.5 s
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class JobLocked(RuntimeError):
    """Another process holds the lock of this job (or of this state_dir)."""


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process as soon as `parent_pid` (the server) is no longer its parent."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the server ended before the kernel was told
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-server",
                     daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:  # reparented: the server is gone
            os.kill(os.getpid(), signal.SIGKILL)


def _lock(path: Path, wait_s: float, what: str) -> IO[str]:
    """`path` opened and exclusively flock'ed (waiting up to `wait_s`), with our pid in it."""
    file = open(path, "a+", encoding="utf-8")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                file.seek(0)
                holder = file.read().strip() or "unknown"
                file.close()
                raise JobLocked(f"{what} (process {holder} holds its lock)") from None
            time.sleep(0.1)
    file.seek(0)
    file.truncate()
    file.write(str(os.getpid()))
    file.flush()
    return file


def job_lock(job_dir: Path, wait_s: float | None = None) -> IO[str]:
    """Hold the job's training lock until the returned file is closed (or the process ends);
    waits up to `wait_s` (default LOCK_WAIT_S) for another holder to end."""
    return _lock(Path(job_dir) / "train.lock", LOCK_WAIT_S if wait_s is None else wait_s,
                 "another process is already training this job")


def state_lock(state_dir: Path) -> IO[str]:
    """Hold the state_dir's server lock until the returned file is closed."""
    return _lock(Path(state_dir) / "server.lock", 0,
                 f"another server is running on --state_dir {state_dir}")
