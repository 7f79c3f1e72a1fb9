"""The jobs' rows in any SQL database (`dreambooth serve --jobs_database URL`): the JobStore
contract on the default SQLite and on a real PostgreSQL (a throwaway cluster this file starts),
and a server that trains a job with its rows in PostgreSQL and a restarted one that lists it."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from dreambooth.serve.app import ServeConfigError, create_app
from dreambooth.serve.jobs import JobDatabaseError, JobError, JobStore

POSTGRES_MISSING = ("PostgreSQL is needed by tests/test_jobs_database.py and was not found "
                    "(/usr/lib/postgresql/*/bin/initdb): run scripts/bootstrap.sh or "
                    "apt-get install postgresql")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port: (admin URL, database maker)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail(POSTGRES_MISSING)
    try:
        import psycopg
    except ImportError:
        pytest.fail("psycopg (psycopg 3) is needed: pip install 'psycopg[binary]' (the test "
                    "extra)")
    bin_dir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="dreambooth-pg-", dir="/tmp"))
    root.chmod(0o755)
    data, sockets = root / "data", root / "sockets"
    data.mkdir()
    sockets.mkdir()
    as_postgres = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.fail("runuser is needed to run PostgreSQL as the postgres user")
        shutil.chown(data, "postgres")
        shutil.chown(sockets, "postgres")
        shutil.chown(root, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = _free_port()

    def run(*args):
        result = subprocess.run([*as_postgres, *args], capture_output=True, text=True,
                                timeout=60)
        if result.returncode != 0:
            pytest.fail(f"PostgreSQL could not be started ({Path(args[0]).name}): "
                        f"{(result.stderr or result.stdout).strip()[-800:]}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
        "-E", "UTF8", "--no-sync")
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "30",
        "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {sockets} -c fsync=off "
        "-c full_page_writes=off", "start")
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    names = itertools.count()

    def database() -> str:
        name = f"jobs_{next(names)}"
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres:secret-pw@127.0.0.1:{port}/{name}"

    try:
        yield database
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m",
                        "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = request.getfixturevalue("postgres")() if request.param == "postgresql" else None
    made = JobStore(tmp_path / "state", url)
    yield made
    made.close()


PARAMS = {"values": {"max_train_steps": 2}, "identifier": "sks", "class_noun": "dog"}


def test_jobs_list_newest_first_in_pages(store):
    ids = [f"ftjob-{i:024x}" for i in range(5)]
    for job_id in ids:
        store.create(job_id, "base", PARAMS)
    job = store.get(ids[0])
    assert job["status"] == "queued" and job["params"] == PARAMS and job["error"] is None
    assert isinstance(job["created_at"], int) and job["finished_at"] is None
    page, more = store.list(limit=2)
    assert [j["id"] for j in page] == ids[:2:-1][:2] == [ids[4], ids[3]] and more
    page, more = store.list(limit=2, after=ids[3])
    assert [j["id"] for j in page] == [ids[2], ids[1]] and more
    page, more = store.list(limit=2, after=ids[1])
    assert [j["id"] for j in page] == [ids[0]] and not more
    assert store.next_queued() == ids[0]
    assert store.ids() == set(ids) and store.count_active() == 5
    assert store.get("ftjob-missing") is None
    store.set_status(ids[2], "running")
    assert [j["id"] for j in store.list(limit=10, status="running")[0]] == [ids[2]]
    with pytest.raises(Exception):  # ids are unique
        store.create(ids[0], "base", PARAMS)


def test_events_unique_events_and_status_transitions(store):
    store.create("ftjob-a", "base", PARAMS)
    assert store.add_event("ftjob-a", "metrics", "Step 1/2", {"step": 1})
    data = {"step": 2, "url": "x.png"}
    assert store.add_event("ftjob-a", "validation", "v", data, unique=True)
    assert not store.add_event("ftjob-a", "validation", "again", data, unique=True)
    assert store.add_event("ftjob-a", "validation", "v3", {"step": 3}, unique=True)
    events = store.events("ftjob-a")
    assert [e["type"] for e in events] == ["status", "metrics", "validation", "validation"]
    assert events[0]["data"] == {"status": "queued"} and events[2]["data"] == data
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert [e["message"] for e in store.events("ftjob-a", after_seq=events[1]["seq"])] == [
        "v", "v3"]
    newest = store.events("ftjob-a", limit=2, newest_first=True)
    assert [e["message"] for e in newest] == ["v3", "v"]

    assert not store.set_status("ftjob-a", "succeeded", only_from=("running",))
    assert store.set_status("ftjob-a", "running", only_from=("queued",))
    assert store.set_status("ftjob-a", "failed", only_from=("running",),
                            error={"message": "boom", "code": "training_failed"})
    job = store.get("ftjob-a")
    assert job["status"] == "failed" and job["error"]["message"] == "boom"
    assert job["finished_at"] is not None
    assert store.events("ftjob-a", newest_first=True, limit=1)[0]["level"] == "error"
    assert store.set_status("ftjob-a", "succeeded", fine_tuned_model="m1")
    assert store.set_status("ftjob-a", "succeeded")  # keeps its model (COALESCE)
    assert store.get("ftjob-a")["fine_tuned_model"] == "m1"
    assert not store.set_status("ftjob-missing", "queued")


def test_the_active_limit_holds_under_concurrent_requests(store):
    results, barrier = [], threading.Barrier(8)

    def request(n):
        barrier.wait()
        try:
            store.create(f"ftjob-{n}", "base", PARAMS, max_active=3)
            results.append("ok")
        except JobError as error:
            results.append(error.code)

    threads = [threading.Thread(target=request, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == ["ok"] * 3 + ["rate_limit_exceeded"] * 5
    assert store.count_active() == 3

    # Concurrent unique events: one wins.
    added, barrier = [], threading.Barrier(6)

    def event():
        barrier.wait()
        added.append(store.add_event("ftjob-0", "validation", "v", {"step": 9}, unique=True))

    threads = [threading.Thread(target=event) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(added) == [False] * 5 + [True]


def test_requeue_interrupted_and_delete(store):
    for job_id in ("ftjob-r", "ftjob-q", "ftjob-s"):
        store.create(job_id, "base", PARAMS)
    store.set_status("ftjob-r", "running")
    store.set_status("ftjob-s", "succeeded")
    assert store.requeue_interrupted() == ["ftjob-r"]
    assert store.get("ftjob-r")["status"] == "queued"
    assert "server restarted" in store.events("ftjob-r", newest_first=True)[0]["message"]
    assert store.finished_before(int(time.time()) + 10) == ["ftjob-s"]
    assert store.finished_before(int(time.time()) - 10) == []
    with pytest.raises(JobError) as refused:
        store.delete("ftjob-q")
    assert refused.value.code == "job_not_finished"
    assert store.delete("ftjob-s")["id"] == "ftjob-s"
    assert store.get("ftjob-s") is None and store.events("ftjob-s") == []
    assert store.delete("ftjob-s") is None


@pytest.mark.parametrize("url, shown", [
    ("not a url", "not a database URL"),
    ("nosuchdb://user:secret-pw@host/db", "no driver"),
    ("postgresql+psycopg://user:secret-pw@127.0.0.1:1/db", "cannot use it"),
])
def test_a_bad_database_is_one_error_line_without_its_password(tmp_path, tiny_model, url,
                                                              shown):
    with pytest.raises(JobDatabaseError) as error:
        JobStore(tmp_path / "state", url)
    message = str(error.value)
    assert shown in message and "secret-pw" not in message and "\n" not in message
    with pytest.raises(ServeConfigError) as served:
        create_app({"base": tiny_model}, device="cpu", state_dir=tmp_path / "s2",
                   jobs_database=url)
    assert "secret-pw" not in str(served.value) and shown in str(served.value)
    assert error.value.__cause__ is None and served.value.__cause__ is None
    with pytest.raises(ServeConfigError, match="needs --state_dir"):
        create_app({"base": tiny_model}, device="cpu", jobs_database="sqlite:///x.db")


def test_a_server_on_postgresql_trains_and_a_restarted_one_lists_it(
        tiny_model, tmp_path, postgres, caplog):
    caplog.set_level(logging.INFO)
    from test_jobs import FAST, JOBS, UPLOAD_LIMIT_MB, create, photo_files, wait_for
    from test_serve import KEY, Server

    url = postgres()

    def start():
        return Server(create_app({"base": tiny_model}, api_key=KEY, device="cpu",
                                 max_upload_mb=UPLOAD_LIMIT_MB, max_steps=20,
                                 state_dir=tmp_path / "state", jobs_database=url))

    first = start()
    try:
        job = create(first, photo_files(tmp_path), hyperparameters=FAST).json()
        done = wait_for(first, job["id"], timeout=120)
        assert done["status"] == "succeeded", done["error"]
    finally:
        first.stop()
    assert not (tmp_path / "state" / "jobs.sqlite3").exists()  # the rows are in PostgreSQL
    with closing(JobStore(tmp_path / "elsewhere", url)) as other:
        assert other.get(job["id"])["status"] == "succeeded"
    second = start()
    try:
        listed = second.get(JOBS).json()["data"]
        assert [j["id"] for j in listed] == [job["id"]] and listed[0]["status"] == "succeeded"
        names = [m["id"] for m in second.get("/v1/models").json()["data"]]
        assert done["fine_tuned_model"] in names
    finally:
        second.stop()
    assert "secret-pw" not in caplog.text


def test_a_state_dir_of_the_sqlite3_version_is_read_and_continued(tmp_path):
    """jobs.sqlite3 as the standard library's sqlite3 wrote it (before SQLAlchemy): its jobs
    are read, new ones continue its sequence, and the file stays SQLite in WAL mode."""
    import json
    import sqlite3

    state = tmp_path / "state"
    state.mkdir()
    with sqlite3.connect(state / "jobs.sqlite3") as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript("""
            CREATE TABLE jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL,
                model TEXT NOT NULL, status TEXT NOT NULL, params TEXT NOT NULL,
                created_at INTEGER NOT NULL, finished_at INTEGER, error TEXT,
                fine_tuned_model TEXT);
            CREATE TABLE events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL,
                created_at INTEGER NOT NULL, level TEXT NOT NULL, type TEXT NOT NULL,
                message TEXT NOT NULL, data TEXT);
            CREATE INDEX events_job ON events (job_id, seq);
        """)
        db.execute("INSERT INTO jobs (id, model, status, params, created_at, finished_at, "
                   "fine_tuned_model) VALUES ('ftjob-old', 'base', 'succeeded', ?, 1, 2, "
                   "'base:ft-1')", (json.dumps(PARAMS),))
    store = JobStore(state)
    try:
        assert store.database.startswith("sqlite:///")
        old = store.get("ftjob-old")
        assert old["params"] == PARAMS and old["fine_tuned_model"] == "base:ft-1"
        store.create("ftjob-new", "base", PARAMS)
        assert [j["id"] for j in store.list(limit=5)[0]] == ["ftjob-new", "ftjob-old"]
        assert store.get("ftjob-new")["seq"] == old["seq"] + 1
    finally:
        store.close()
    with sqlite3.connect(state / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1


def test_the_default_database_is_the_state_dirs_file_whatever_its_name(tmp_path):
    state = tmp_path / "odd?name#x%20y"  # no URL syntax in a folder name
    store = JobStore(state)
    try:
        store.create("ftjob-a", "base", PARAMS)
    finally:
        store.close()
    assert (state / "jobs.sqlite3").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        state.name]
