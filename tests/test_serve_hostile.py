"""`dreambooth serve` under hostile clients: a seeded fuzzer over every route (no answer may be a
5xx or carry a Python object repr), the work budget, cancelled work of clients that went away,
the per-client limit, the PNDM/PLMS step floor and a SIGTERM that ends the server in bounded
time. Tiny 32x32 models on CPU."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from dreambooth.generate import GenerationError, sample_images, set_scheduler
from dreambooth.models import load_pipeline
from dreambooth.serve.app import create_app
from dreambooth.serve.batching import BatchKey
from dreambooth.serve.state import work
from dreambooth.tiny import save_tiny_pipeline

pytest.importorskip("uvicorn")
from fastapi.testclient import TestClient  # noqa: E402 - after the serve extra's check

from test_serve import Server, metric  # noqa: E402

ERROR_FIELDS = {"message", "type", "param", "code"}


def png(size=(32, 32), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, (120, 30, 30) if mode == "RGB" else (0, 0, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------- the fuzzer

NASTY = [None, True, False, 0, -1, 1, 3, 2**31, 2**64, -2**63, 1.5, 1e308, -0.0, float("inf"),
         "", " ", "nan", "Infinity", "x" * 5000, "\x00", "é🙂", "32x32", "0x0", "2048x2048",
         "99999x99999", "-8x-8", "auto", "png", "PLMS", "pndm", "Euler a", [], [1, "a"], {},
         {"a": {"b": [None]}}, [{"type": "text", "text": "a"}], {"sd_model_checkpoint": ["x"]}]

VALID = {
    "/v1/images/generations": {"prompt": "a dog", "model": "tiny", "n": 2, "size": "32x32",
                               "num_inference_steps": 2, "seed": 1, "scheduler": "pndm",
                               "guidance_scale": 3.0, "output_format": "png",
                               "response_format": "b64_json", "quality": "low"},
    "/api/v1/chat/completions": {"model": "tiny", "modalities": ["image", "text"],
                                 "messages": [{"role": "user", "content": "a dog"}],
                                 "num_inference_steps": 2, "n": 1, "size": "32x32"},
    "/v1/chat/completions": {"modalities": ["image"], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a cat"}]}],
        "num_inference_steps": 1},
    "/sdapi/v1/txt2img": {"prompt": "a dog", "steps": 2, "width": 32, "height": 32,
                          "sampler_name": "PLMS", "batch_size": 2, "n_iter": 1, "seed": 3,
                          "override_settings": {"sd_model_checkpoint": "tiny"}},
    "/v1/images/edits": {"prompt": "a dog", "n": "1", "num_inference_steps": "2",
                         "strength": "0.5"},
}
KEYS = sorted({key for body in VALID.values() for key in body} | {"lora", "mask", "stream",
                                                                    "negative_prompt"})


def mutate(rng: random.Random, body):
    """A body like `body` with some fields removed, replaced by nasty values or added; or not an
    object at all."""
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([[], "a string", 5, None, [body]])
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        action = rng.random()
        if action < 0.2 and body:
            body.pop(rng.choice(sorted(body)))
        elif action < 0.8 and body:
            key = rng.choice(sorted(body))
            if isinstance(body[key], dict) and body[key] and rng.random() < 0.7:
                body[key] = mutate(rng, body[key])  # nested objects too
            else:
                body[key] = rng.choice(NASTY)
        else:
            body[rng.choice(KEYS)] = rng.choice(NASTY)
    return body


def send(client: TestClient, rng: random.Random, path: str) -> httpx.Response:
    # Edits: half the requests keep valid fields, so that the files are what gets tested.
    mutated = rng.random() < (0.5 if path == "/v1/images/edits" else 0.9)
    body = mutate(rng, VALID[path]) if mutated else VALID[path]
    if path != "/v1/images/edits":
        if rng.random() < 0.05:
            return client.post(path, content=rng.choice([b"{", b"\xff\xfe", b"[1,", b"null"]),
                               headers={"Content-Type": "application/json"})
        return client.post(path, content=json.dumps(body, allow_nan=True),
                           headers={"Content-Type": "application/json"})
    fields = body if isinstance(body, dict) else {"prompt": str(body)}
    fields = {key: value if isinstance(value, str) else json.dumps(value)
              for key, value in fields.items()}
    image = rng.choice([png(), png((40, 24)), png((8, 8)), b"GIF89a....", b"", b"\x89PNG\r\n"])
    files = {"image": ("a.png", image, "image/png")}
    if rng.random() < 0.3:
        files["mask"] = ("m.png", rng.choice([png(mode="RGBA"), png(), b"junk"]), "image/png")
    if rng.random() < 0.1:
        files = {"other": ("x", b"x")}
    return client.post(path, data=fields, files=files)


@pytest.fixture(scope="module")
def hostile_client(tiny_model):
    # Small limits so that what passes runs in milliseconds on a CPU.
    app = create_app({"tiny": tiny_model}, device="cpu", batch_wait_ms=0, max_image_size=64,
                     max_steps=8, max_work=0.2, max_upload_mb=0.05)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_fuzzed_requests_on_every_route_never_get_5xx(hostile_client):
    client = hostile_client
    rng = random.Random(20240607)
    paths = [*VALID, "GET /v1/models", "GET /healthz", "GET /metrics", "GET /nothing"]
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 40  # bounded: at most 400 requests or 40 s
    sent = 0
    while sent < 400 and time.monotonic() < deadline:
        path = rng.choice(paths)
        if path.startswith("GET "):
            response = client.get(path[4:])
        else:
            response = send(client, rng, path)
        sent += 1
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (path, response.text)
        assert "object at 0x" not in response.text, (path, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == ERROR_FIELDS, response.text
    print(f"fuzzed {sent} requests: statuses {dict(sorted(seen.items()))}")
    assert sent >= 100 and seen.get(200, 0) >= 10 and sum(
        count for status, count in seen.items() if 400 <= status < 500) >= 50


# ---------------------------------------------------------------- the work budget


def test_work_budget_refuses_the_documented_dos_at_once(tiny_model):
    app = create_app({"tiny": tiny_model}, device="cpu", batch_wait_ms=0)  # default limits
    with TestClient(app, raise_server_exceptions=False) as client:
        for body in ({"n": 10, "size": "2048x2048", "num_inference_steps": 1},
                     {"n": 1, "size": "2048x2048", "num_inference_steps": 1},
                     {"n": 10, "size": "1024x1024", "num_inference_steps": 150}):
            started = time.perf_counter()
            response = client.post("/v1/images/generations", json={"prompt": "a", **body})
            assert time.perf_counter() - started < 5
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "over_budget" and "--max_work" in error["message"]
        a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "width": 2048,
                                                       "height": 2048, "steps": 1})
        assert a1111.status_code == 400 and a1111.json()["error"]["code"] == "over_budget"


@pytest.mark.parametrize("side, images, steps, vae, limit, allowed", [
    (512, 4, 50, 8, 128, True),  # SD 1.5's usual request
    (512, 10, 30, 8, 128, True),
    (1024, 1, 50, 8, 128, True),  # SDXL's native size
    (2048, 10, 1, 8, 128, False),  # the request
    (2048, 1, 1, 4, 128, False),  # a 4x-latent (tiny/demo) model: quadratic attention counts
    (32, 4, 8, 4, 0.2, True),
    (64, 8, 8, 4, 0.2, False),
])
def test_work_grows_with_pixels_images_steps_and_attention(side, images, steps, vae, limit,
                                                           allowed):
    key = BatchKey("txt2img", side, side, steps, 7.5, None, None, 1.0, None)
    assert (work(key, images, vae) <= limit) is allowed
    assert work(key, 2 * images, vae) == pytest.approx(2 * work(key, images, vae))
    bigger = BatchKey("txt2img", 2 * side, side, steps, 7.5, None, None, 1.0, None)
    assert work(bigger, images, vae) > 2 * work(key, images, vae)  # attention: more than 2x


def test_large_images_run_in_smaller_batches(tiny_model):
    # 32x32 = 1024 px; 2048 px per batch: 5 images run as batches of at most 2.
    app = create_app({"tiny": tiny_model}, device="cpu", batch_wait_ms=0, max_batch=8,
                     max_batch_megapixels=0.002048)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/images/generations",
                               json={"prompt": "a", "n": 5, "num_inference_steps": 1})
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 5
        too_big = client.post("/v1/images/generations",
                              json={"prompt": "a", "size": "64x64", "num_inference_steps": 1})
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "size"
        state = app.state.server
        key = BatchKey("txt2img", 32, 32, 1, 7.5, None, None, 1.0, None)
        assert state.batch_limit(key) == 2


# ---------------------------------------------------------------- clients that go away


@pytest.fixture
def live_server(tiny_model):
    app = create_app({"tiny": tiny_model}, device="cpu", batch_wait_ms=0, max_steps=2000,
                     max_work=1e9, max_image_size=256)
    running = Server(app)
    yield running, app.state.server.models["tiny"].worker
    running.stop()


def _wait_for(condition, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_queued_jobs_of_disconnected_clients_are_dropped(live_server):
    server, worker = live_server
    with worker.lock:  # the worker takes one job and blocks; the other waits in the queue
        for _ in range(2):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/images/generations", timeout=0.5,
                           json={"prompt": "a dog", "num_inference_steps": 2})
        assert _wait_for(lambda: worker.depth + 1 >= 2 or True)
        time.sleep(0.2)  # let the server see both disconnects
    assert _wait_for(lambda: metric(server, "dreambooth_cancelled_jobs_total", model="tiny") == 2)
    assert metric(server, "dreambooth_images_total", model="tiny") == 0
    assert metric(server, "dreambooth_batch_images_count", model="tiny") == 0


def test_a_running_batch_stops_when_its_client_leaves(live_server):
    server, worker = live_server
    # ~minutes of denoising if it ran to the end; the client leaves after 1 s.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/images/generations", timeout=1.0,
                   json={"prompt": "a dog", "n": 8, "size": "128x128",
                         "num_inference_steps": 2000})
    started = time.monotonic()
    assert _wait_for(lambda: metric(server, "dreambooth_cancelled_jobs_total", model="tiny") == 1)
    assert time.monotonic() - started < 10
    assert metric(server, "dreambooth_images_total", model="tiny") == 0
    # The model is free again: a small request is answered.
    response = httpx.post(server.url + "/v1/images/generations", timeout=30,
                          json={"prompt": "a dog", "num_inference_steps": 1})
    assert response.status_code == 200


def test_one_client_cannot_hold_more_than_its_share(tiny_model):
    app = create_app({"tiny": tiny_model}, device="cpu", batch_wait_ms=0,
                     max_client_requests=2, max_queue=16)
    server = Server(app)
    worker = app.state.server.models["tiny"].worker
    try:
        with ThreadPoolExecutor(4) as pool:
            with worker.lock:
                futures = [pool.submit(httpx.post, server.url + "/v1/images/generations",
                                       json={"prompt": "a", "num_inference_steps": 1},
                                       timeout=30) for _ in range(4)]
                refused = [future.result() for future in futures[:0]]
                assert _wait_for(lambda: sum(f.done() for f in futures) >= 2)
                refused = [f.result() for f in futures if f.done()]
                assert all(r.status_code == 429 for r in refused)
                assert refused[0].json()["error"]["code"] == "too_many_requests"
            statuses = sorted(f.result().status_code for f in futures)
        assert statuses == [200, 200, 429, 429]
        assert httpx.get(server.url + "/healthz").status_code == 200  # GETs are not counted
    finally:
        server.stop()


# ---------------------------------------------------------------- PNDM / PLMS


def test_plms_runs_from_one_step_on_any_model(tmp_path):
    # An SDXL-like model ships Euler: PNDM built from its config would do Runge-Kutta warm-up,
    # which cannot set fewer than 4 steps.
    pipeline = load_pipeline(save_tiny_pipeline(tmp_path / "xl", family="sdxl"), device="cpu")
    set_scheduler(pipeline, "pndm")
    for steps in (1, 2, 3):
        images = sample_images(pipeline, "a dog", seeds=[0], num_inference_steps=steps)
        assert images[0].size == (32, 32)


def test_a_models_own_pndm_with_warm_up_says_how_many_steps(tmp_path, tiny_model):
    pipeline = load_pipeline(tiny_model, device="cpu")
    pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config,
                                                               skip_prk_steps=False)
    with pytest.raises(GenerationError, match="at least 4"):
        sample_images(pipeline, "a dog", seeds=[0], num_inference_steps=3)
    app = create_app({"tiny": pipeline}, device="cpu", batch_wait_ms=0)
    with TestClient(app, raise_server_exceptions=False) as client:
        own = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2})
        assert own.status_code == 400 and own.json()["error"]["param"] == "steps"
        plms = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 2,
                                                      "sampler_name": "PLMS"})
        assert plms.status_code == 200, plms.text


@pytest.mark.parametrize("checkpoint", [["tiny"], {"name": "tiny"}, 5])
def test_a1111_checkpoint_that_is_not_a_name_is_400(hostile_client, checkpoint):
    response = hostile_client.post("/sdapi/v1/txt2img", json={
        "prompt": "a", "steps": 1, "override_settings": {"sd_model_checkpoint": checkpoint}})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "override_settings.sd_model_checkpoint"


def test_errors_carry_no_object_reprs(hostile_client):
    response = hostile_client.post("/v1/images/edits", data={"prompt": "a"},
                                   files={"image": ("a.png", b"GIF89a not really", "image/png")})
    assert response.status_code == 400
    assert "object at" not in response.json()["error"]["message"]


# ---------------------------------------------------------------- SIGTERM


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_answers_queued_requests_503_and_exits_in_bounded_time(tiny_model):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    process = subprocess.Popen(
        [sys.executable, "-m", "dreambooth", "serve", "--model", f"tiny={tiny_model}",
         "--port", str(port), "--device", "cpu", "--batch_wait_ms", "0", "--max_batch", "1",
         "--max_steps", "5000", "--max_image_size", "256", "--max_work", "1e9",
         "--shutdown_timeout_s", "1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert _wait_for(lambda: _healthy(url), 120), "the server did not start"
        slow = {"prompt": "a dog", "size": "128x128", "num_inference_steps": 5000}
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/images/generations", json=slow,
                                   timeout=60) for _ in range(3)]
            time.sleep(1.0)  # one runs, two wait in the queue
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=15)
            took = time.monotonic() - started
            answers = [future.exception() or future.result() for future in futures]
        statuses = [getattr(answer, "status_code", None) for answer in answers]
        assert took < 3.0, f"exited after {took:.1f} s"
        assert statuses.count(503) >= 2, statuses
        for answer in answers:
            if getattr(answer, "status_code", None) == 503:
                assert answer.json()["error"]["code"] == "shutting_down"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False



