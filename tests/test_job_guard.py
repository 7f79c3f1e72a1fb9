"""A job's training process dies with its server, one process trains a job, one server uses a
state_dir (dreambooth.serve.job_guard), with real processes killed by SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dreambooth.serve import job_guard
from dreambooth.serve.job_guard import JobLocked, job_lock

SRC = str(Path(__file__).resolve().parents[1] / "src")


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_dead(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


# The "server": starts a "training process" that guards itself as job_process does, prints
# the child's pid, then waits to be killed.
SERVER = textwrap.dedent("""
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())],
                             start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(120)
""")
CHILD = textwrap.dedent("""
    import sys, time
    {patch}
    from dreambooth.serve.job_guard import die_with_parent
    die_with_parent(int(sys.argv[1]))
    time.sleep(120)
""")


@pytest.mark.parametrize("mechanism", ["prctl", "parent watcher"])
def test_the_training_process_dies_with_a_sigkilled_server(mechanism):
    # "parent watcher": no prctl (as on macOS); the thread polling the parent must do it.
    patch = "sys.platform = 'darwin'" if mechanism == "parent watcher" else ""
    env = {**os.environ, "PYTHONPATH": SRC}
    server = subprocess.Popen([sys.executable, "-c", SERVER, CHILD.format(patch=patch)],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        child = int(server.stdout.readline())
        time.sleep(1.0)  # the child has guarded itself
        assert alive(child), "the guarded child must live while its server does"
        server.send_signal(signal.SIGKILL)
        server.wait()
        assert wait_dead(child, 3.0), "the training process outlived its SIGKILLed server"
    finally:
        server.kill()
        server.wait()


def test_a_process_whose_server_is_already_gone_dies_at_once():
    env = {**os.environ, "PYTHONPATH": SRC}
    # The pid given is not its parent: as if the server died before the guard ran.
    code = ("import os; from dreambooth.serve.job_guard import die_with_parent; "
            "die_with_parent(os.getppid() + 1); import time; time.sleep(60)")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert result.returncode == -signal.SIGKILL and time.monotonic() - started < 30


def test_one_process_holds_a_jobs_lock(tmp_path):
    first = job_lock(tmp_path)
    try:
        assert (tmp_path / "train.lock").read_text() == str(os.getpid())
        started = time.monotonic()
        with pytest.raises(JobLocked, match=f"already training this job.*{os.getpid()}"):
            job_lock(tmp_path, wait_s=0.3)
        assert time.monotonic() - started >= 0.3  # it waited for the holder
        # Another process (a second server's training process) is refused too.
        code = ("import sys; from dreambooth.serve.job_guard import job_lock, JobLocked\n"
                "try: job_lock(sys.argv[1], wait_s=0.2)\n"
                "except JobLocked: sys.exit(3)")
        assert subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                              env={**os.environ, "PYTHONPATH": SRC}).returncode == 3
    finally:
        first.close()
    job_lock(tmp_path, wait_s=0).close()  # free once its holder closed it


def test_a_lock_is_freed_when_its_holder_is_killed(tmp_path):
    code = ("import sys, time; from dreambooth.serve.job_guard import job_lock\n"
            "lock = job_lock(sys.argv[1]); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": SRC})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(JobLocked, match=str(holder.pid)):
            job_lock(tmp_path, wait_s=0)
        holder.kill()
        holder.wait()
        job_lock(tmp_path, wait_s=0).close()
    finally:
        holder.kill()
        holder.wait()


def test_a_second_training_process_for_a_job_refuses_to_train(tmp_path, monkeypatch):
    from dreambooth.serve import job_process

    monkeypatch.setattr(job_guard, "LOCK_WAIT_S", 0.2)
    (tmp_path / "config.json").write_text("{}")  # never read: the lock comes first
    held = job_lock(tmp_path)
    try:
        assert job_process.main(str(tmp_path)) == job_process.EXIT_LOCKED
    finally:
        held.close()
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert lines == [{"type": "error", "message": lines[0]["message"]}]
    assert "already training this job" in lines[0]["message"]
    assert not (tmp_path / "trained.json").exists()


def test_two_servers_cannot_share_a_state_dir(tiny_model, tmp_path):
    from dreambooth.serve.app import ServeConfigError, create_app

    first = create_app({"base": tiny_model}, device="cpu", state_dir=tmp_path / "state")
    with pytest.raises(ServeConfigError, match="another server is running on --state_dir"):
        create_app({"base": tiny_model}, device="cpu", state_dir=tmp_path / "state")
    first.state.server.jobs.stop()  # a stopped server frees it
    second = create_app({"base": tiny_model}, device="cpu", state_dir=tmp_path / "state")
    second.state.server.jobs.stop()
