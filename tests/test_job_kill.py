"""`dreambooth serve --state_dir` killed with SIGKILL while a job trains, then started again on
the same state_dir: the training process died with the server (no second process ever trains
the job), and the job resumes from its last checkpoint to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import write_subject_photos
from serve_process import ServeProcess
from test_job_guard import alive, wait_dead

KEY = "kill-test-key"
JOBS = "/v1/fine_tuning/jobs"
HYPERPARAMETERS = {"max_train_steps": 24, "checkpointing_steps": 4, "num_threads": 1, "seed": 7,
                   "learning_rate": 1e-3}


def start_server(model: Path, state_dir: Path, log: Path) -> ServeProcess:
    return ServeProcess(["--model", f"base={model}", "--state_dir", str(state_dir),
                         "--device", "cpu", "--max_upload_mb", "0.05"], log, key=KEY)


def wait_for(server: ServeProcess, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = server.get(f"{JOBS}/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']}")


# Two servers and three trainings in processes: ~25 s idle, ~65 s on a busy 2-core CPU. In the
# default run: issue 16 asks for this test in .ci/run.
def test_sigkilled_server_restarts_and_the_job_resumes_to_the_same_weights(tiny_model,
                                                                            tmp_path):
    state_dir = tmp_path / "state"
    photos = write_subject_photos(tmp_path / "photos", count=3)
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in sorted(photos.iterdir())]
    first = start_server(tiny_model, state_dir, tmp_path / "first.log")
    try:
        answer = first.post(JOBS, files=files, data={
            "model": "base", "class_noun": "dog", "hyperparameters": json.dumps(HYPERPARAMETERS)})
        assert answer.status_code == 200, answer.text
        job_id = answer.json()["id"]
        job_dir = state_dir / "jobs" / job_id
        checkpoints = job_dir / "output" / "checkpoints"
        deadline = time.monotonic() + 240
        while not list(checkpoints.glob("checkpoint-*.ckpt")):
            assert time.monotonic() < deadline and first.process.poll() is None
            time.sleep(0.01)
        trainer = int((job_dir / "train.lock").read_text())  # the training process
        assert alive(trainer)
    finally:
        first.kill()
    assert not (job_dir / "trained.json").exists(), "the job ended before the kill"
    assert wait_dead(trainer, 3.0), "the training process outlived its SIGKILLed server"
    checkpoint_steps = [int(p.stem.split("-")[1]) for p in checkpoints.glob("checkpoint-*.ckpt")]
    assert checkpoint_steps and max(checkpoint_steps) < HYPERPARAMETERS["max_train_steps"]

    second = start_server(tiny_model, state_dir, tmp_path / "second.log")
    try:
        job = wait_for(second, job_id)
        assert job["status"] == "succeeded", job["error"]
        events = second.get(f"{JOBS}/{job_id}/events", params={"limit": 100}).json()["data"]
        messages = [event["message"] for event in reversed(events)]
        assert any("server restarted" in m for m in messages)
        resumed = [m for m in messages if m.startswith("Resumed from step")]
        assert resumed == [f"Resumed from step {max(checkpoint_steps)}."], messages
        assert second.get(f"{JOBS}/{job_id}/files/model_zip").status_code == 200
    finally:
        second.kill()

    # The uninterrupted run: the job's own configuration, trained in one go.
    from dreambooth.config import parse_train_config
    from dreambooth.train.run import train

    values = json.loads((job_dir / "config.json").read_text())
    values["output_dir"] = str(tmp_path / "uninterrupted")
    (tmp_path / "uninterrupted").mkdir()
    train(parse_train_config(values, source="test"))
    weights = "unet/diffusion_pytorch_model.safetensors"
    resumed_weights = load_file(job_dir / "output" / weights)
    reference = load_file(tmp_path / "uninterrupted" / weights)
    assert resumed_weights.keys() == reference.keys()
    # Bit for bit: a resumed run replays the same batches, noise and optimizer state.
    assert all(torch.equal(resumed_weights[k], reference[k]) for k in reference)
