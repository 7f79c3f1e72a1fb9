"""`dreambooth serve` end to end: a real uvicorn server on loopback, driven by the official
`openai` client (and httpx for OpenRouter, A1111 and malformed bodies), on tiny 32x32 models
with 2 denoising steps."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from dreambooth.cli import build_parser, main, parse_named_paths
from dreambooth.formats.infotext import parse_parameters
from dreambooth.models import TRAINING_CONFIG_FILE
from dreambooth.serve.app import ServeConfigError, create_app
from dreambooth.tiny import save_tiny_pipeline
from lora_files import write_lora

uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key-0123456789"
STEPS = {"num_inference_steps": 2}
TRIGGER = "a photo of sks dog"
OWN_GUIDANCE = 4.0  # the validation scale in sks-dog's training_config.yaml
UPLOAD_LIMIT_MB = 0.05  # 52 KB: the test images are ~3 KB


class Server:
    """An app served by uvicorn in a background thread on a loopback port chosen by the OS."""

    def __init__(self, app):
        self.app = app
        # Bound and listening before uvicorn starts: clients can connect at once, no polling.
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.url = "http://127.0.0.1:%d" % self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()

    def client(self, api_key: str = KEY) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
        return httpx.post(self.url + path, headers=headers, timeout=60, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
        return httpx.get(self.url + path, headers=headers, timeout=60, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model):
    """A base model, a 'personalized' one (with training_config.yaml) and a LoRA file."""
    root = tmp_path_factory.mktemp("serve")
    personal = save_tiny_pipeline(root / "sks-dog", seed=1)
    (personal / TRAINING_CONFIG_FILE).write_text(
        f"instance_prompt: {TRIGGER}\nresolution: 32\nvalidation_guidance_scale: {OWN_GUIDANCE}\n")
    from dreambooth.models import load_pipeline

    lora = write_lora(load_pipeline(tiny_model, device="cpu"), root / "style.safetensors",
                      seed=3)
    return {"base": tiny_model, "sks-dog": personal, "lora": lora}


@pytest.fixture(scope="module")
def server(folders):
    # A long batch window makes concurrent requests share batches deterministically enough
    # for the batching tests; lone requests pay it once each (~30 requests here).
    app = create_app({"sks-dog": folders["sks-dog"], "base": folders["base"]},
                     loras={"style": folders["lora"]}, api_key=KEY, device="cpu",
                     max_queue=32, max_batch=8, batch_wait_ms=150,
                     max_upload_mb=UPLOAD_LIMIT_MB, max_image_size=256, max_steps=20,
                     max_client_requests=32)  # one key and address: all 16 clients below
    running = Server(app)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return server.client()


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate_one(client: OpenAI, seed: int, prompt: str = TRIGGER, **extra) -> np.ndarray:
    result = client.images.generate(model="sks-dog", prompt=prompt,
                                    extra_body={**STEPS, "seed": seed, **extra})
    return pixels(decode(result.data[0].b64_json))


def metric(server: Server, name: str, **labels) -> float:
    """The value of one sample of the Prometheus text at /metrics (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in server.get("/metrics").text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == (f"{name}{{{wanted}}}" if labels else name):
            return float(value)
    return 0.0


def test_images_generate_answers_openai_shape_with_parameters(client):
    result = client.images.generate(model="sks-dog", prompt=TRIGGER, n=2, size="32x32",
                                     extra_body={**STEPS, "seed": 7, "negative_prompt": "blurry",
                                                 "scheduler": "euler_a", "guidance_scale": 5})
    assert result.created > 0 and result.size == "32x32" and result.output_format == "png"
    assert [item.model_extra["seed"] for item in result.data] == [7, 8]
    for item, seed in zip(result.data, (7, 8)):
        image = decode(item.b64_json)
        assert image.format == "PNG" and image.size == (32, 32)
        params = parse_parameters(image.text["parameters"])
        assert params["prompt"] == TRIGGER and params["negative_prompt"] == "blurry"
        assert params["Seed"] == str(seed) and params["Steps"] == "2"
        assert params["Sampler"] == "Euler a" and params["CFG scale"] == "5.0"
        assert params["Model"] == "sks-dog"


def test_output_formats_data_urls_and_quality(client):
    jpeg = client.images.generate(model="base", prompt="a red ball", output_format="jpeg",
                                  extra_body={**STEPS, "seed": 1})
    assert decode(jpeg.data[0].b64_json).format == "JPEG"
    url = client.images.generate(model="base", prompt="a red ball", response_format="url",
                                 extra_body={**STEPS, "seed": 1})
    head, _, b64 = url.data[0].url.partition(",")
    assert head == "data:image/png;base64" and decode(b64).size == (32, 32)
    low = client.images.generate(model="base", prompt="a red ball", quality="low",
                                 extra_body={"seed": 1})
    assert parse_parameters(decode(low.data[0].b64_json).text["parameters"])["Steps"] == "15"


def test_same_seed_same_image_other_seed_differs(client):
    assert np.array_equal(generate_one(client, 3), generate_one(client, 3))
    assert not np.array_equal(generate_one(client, 3), generate_one(client, 4))


def test_requests_without_guidance_scale_get_the_models_own(client):
    own = generate_one(client, seed=5)  # sks-dog was validated at OWN_GUIDANCE, not SD's 7.5
    assert np.array_equal(own, generate_one(client, seed=5, guidance_scale=OWN_GUIDANCE))
    assert not np.array_equal(own, generate_one(client, seed=5, guidance_scale=7.5))


def test_lora_is_applied_on_request_and_off_without(client):
    plain = generate_one(client, 5)
    styled = client.images.generate(model="sks-dog", prompt=TRIGGER,
                                    extra_body={**STEPS, "seed": 5, "lora": "style",
                                                "lora_scale": 0.8})
    image = decode(styled.data[0].b64_json)
    params = parse_parameters(image.text["parameters"])
    assert params["prompt"].endswith("<lora:style:0.8>")  # A1111 re-applies it when pasted
    assert re.fullmatch(r'style: [0-9a-f]{12}', params["Lora hashes"])
    assert np.abs(pixels(image) - plain).max() > 10
    assert np.array_equal(generate_one(client, 5), plain)  # the next request has no LoRA


def test_models_list_reports_trigger_phrases(client):
    models = {model.id: model for model in client.models.list().data}
    assert list(models) == ["sks-dog", "base"]
    assert models["sks-dog"].trigger_phrase == TRIGGER and models["sks-dog"].personalized
    assert models["base"].trigger_phrase is None and not models["base"].personalized
    assert models["base"].owned_by == "dreambooth"
    assert [lora["id"] for lora in models["base"].loras] == ["style"]


def test_image_edit_and_inpainting(client):
    picture = Image.new("RGB", (32, 32), (200, 40, 40))
    edited = client.images.edit(model="sks-dog", image=("dog.png", png_bytes(picture),
                                                        "image/png"),
                                prompt=TRIGGER, n=2,
                                extra_body={"num_inference_steps": 4, "seed": 2})
    first = decode(edited.data[0].b64_json)
    assert first.size == (32, 32) and len(edited.data) == 2
    assert parse_parameters(first.text["parameters"])["Denoising strength"] == "0.8"
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 24, 24))  # alpha 0: the area to change
    inpainted = client.images.edit(model="sks-dog", image=("dog.png", png_bytes(picture),
                                                           "image/png"),
                                   mask=("mask.png", png_bytes(mask), "image/png"),
                                   prompt=TRIGGER, size="32x32",
                                   extra_body={"num_inference_steps": 4, "seed": 2})
    image = decode(inpainted.data[0].b64_json)
    assert parse_parameters(image.text["parameters"])["Denoising strength"] == "1.0"
    assert not np.array_equal(pixels(image), pixels(first))


def test_wrong_or_missing_key_is_401_but_healthz_is_open(server):
    with pytest.raises(openai.AuthenticationError) as info:
        server.client(api_key="wrong").images.generate(prompt="a dog", extra_body=STEPS)
    assert info.value.status_code == 401
    assert info.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("kwargs, status, param", [
    (dict(n=0), 400, "n"),
    (dict(n=11), 400, "n"),
    (dict(size="30x32"), 400, "size"),
    (dict(size="512x512"), 400, "size"),  # over the test server's max_image_size=256
    (dict(size="big"), 400, "size"),
    (dict(prompt="x" * 4001), 400, "prompt"),
    (dict(prompt="   "), 400, "prompt"),
    (dict(model="dall-e-3"), 404, "model"),
    (dict(extra_body={"lora": "nope"}), 404, "lora"),
    (dict(extra_body={"negative_promt": "typo"}), 400, "negative_promt"),
    (dict(extra_body={"scheduler": "heun"}), 400, "scheduler"),
    (dict(extra_body={"num_inference_steps": 21}), 400, "num_inference_steps"),
    (dict(extra_body={"guidance_scale": -1}), 400, "guidance_scale"),
    (dict(extra_body={"seed": -5}), 400, "seed"),
    (dict(output_format="gif"), 400, "output_format"),
])
def test_bad_generation_requests_get_openai_errors(client, kwargs, status, param):
    kwargs = {"prompt": "a dog", "model": "base", **kwargs}
    kwargs["extra_body"] = {**STEPS, **kwargs.get("extra_body", {})}
    with pytest.raises(openai.APIStatusError) as info:
        client.images.generate(**kwargs)
    assert info.value.status_code == status
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param


def _multipart(fields: dict, files: dict) -> dict:
    return {"data": fields, "files": files}


@pytest.mark.parametrize("path, request_kwargs, status", [
    ("/v1/images/generations", dict(content=b"{not json",
                                    headers={"Content-Type": "application/json"}), 400),
    ("/v1/images/generations", dict(json=["a", "list"]), 400),
    ("/v1/images/generations", dict(json={"prompt": 5}), 400),
    ("/v1/images/generations", dict(json={"prompt": "a", "n": "many"}), 400),
    ("/v1/images/generations", dict(json={"prompt": "a", "n": 1.5}), 400),
    ("/v1/images/generations", dict(json={"prompt": "a", "n": True}), 400),
    ("/v1/images/generations", dict(content=b"", headers={"Content-Type": "application/json"}),
     400),
    ("/v1/images/generations", dict(json={"prompt": "a", "guidance_scale": "nan"}), 400),
    ("/v1/images/generations", dict(json={"prompt": "a", "seed": 2**40}), 400),
    ("/v1/images/edits", dict(json={"prompt": "a"}), 400),
    ("/v1/images/edits", _multipart({"prompt": "a"}, {}), 400),
    ("/v1/images/edits", _multipart({"prompt": "a"}, {"image": ("a.png", b"not an image")}), 400),
    ("/v1/images/edits", _multipart({"prompt": "a"},
                                    {"image": ("a.png", png_bytes(Image.new("RGB", (30, 30))))}),
     400),  # not a multiple of 8 and no size given
    ("/v1/images/edits", _multipart({"prompt": "a"},
                                    {"image": ("a.png", png_bytes(Image.new("RGB", (32, 32)))),
                                     "mask": ("m.png", png_bytes(Image.new("RGB", (32, 32))))}),
     400),  # a mask without alpha
    ("/v1/images/edits", _multipart({"prompt": "a"},
                                    {"image": ("a.png", png_bytes(Image.new("RGB", (32, 32)))),
                                     "mask": ("m.png", png_bytes(Image.new("RGBA", (16, 16))))}),
     400),  # a mask of another size
    ("/v1/images/edits", _multipart({"prompt": "a", "strength": "2"},
                                    {"image": ("a.png", png_bytes(Image.new("RGB", (32, 32))))}),
     400),
    ("/api/v1/chat/completions", dict(json={"messages": [{"role": "user", "content": "a"}]}),
     400),  # no "modalities"
    ("/api/v1/chat/completions", dict(json={"modalities": ["image"], "messages": []}), 400),
    ("/api/v1/chat/completions", dict(json={"modalities": ["image"],
                                            "messages": [{"role": "system", "content": "x"}]}),
     400),
    ("/api/v1/chat/completions", dict(json={"modalities": ["image"], "messages": "hi"}), 400),
    ("/sdapi/v1/txt2img", dict(json={"prompt": "a", "sampler_name": "Heun"}), 400),
    ("/sdapi/v1/txt2img", dict(json={"prompt": "a", "batch_size": 5, "n_iter": 5}), 400),
    ("/sdapi/v1/txt2img", dict(json={"prompt": "a", "width": 33}), 400),
    ("/v1/nothing-here", dict(json={}), 404),
])
def test_malformed_requests_never_get_500(server, path, request_kwargs, status):
    response = server.post(path, **request_kwargs)
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_upload_over_limit_is_413_declared_or_streamed(server):
    big = b"x" * int(UPLOAD_LIMIT_MB * 1024 * 1024 * 2)
    declared = server.post("/v1/images/edits", data={"prompt": "a"},
                           files={"image": ("big.png", big)})
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"

    def chunks():
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    streamed = server.post("/v1/images/generations", content=chunks(),
                           headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413


def test_sixteen_concurrent_requests_are_all_answered_in_shared_batches(server):
    batches_before = metric(server, "dreambooth_batch_images_count", model="sks-dog")
    clients = [server.client() for _ in range(16)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(
            lambda index: clients[index].images.generate(
                model="sks-dog", prompt=f"{TRIGGER} {index}",
                extra_body={**STEPS, "seed": 100 + index}),
            range(16)))
    assert [result.data[0].model_extra["seed"] for result in results] == list(range(100, 116))
    batches = metric(server, "dreambooth_batch_images_count", model="sks-dog") - batches_before
    assert batches < 16  # requests with different prompts shared UNet batches


def test_seed_gives_the_same_image_batched_or_alone(server, client):
    alone = {seed: generate_one(client, seed) for seed in (11, 12)}
    batches_before = metric(server, "dreambooth_batch_images_count", model="sks-dog")
    requests = [(11, TRIGGER), (12, TRIGGER), (13, "a blue star"), (14, "a red ring")] * 2
    clients = [server.client() for _ in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda pair: generate_one(pair[0], *pair[1]),
                                 zip(clients, requests)))
    assert metric(server, "dreambooth_batch_images_count", model="sks-dog") - batches_before < 8
    for (seed, _), image in zip(requests, together):
        if seed in alone:  # batched with other prompts and seeds, still the same image
            assert np.abs(image - alone[seed]).max() <= 1


def test_openrouter_chat_completions_with_httpx(server):
    for path in ("/api/v1/chat/completions", "/v1/chat/completions"):
        response = server.post(path, json={
            "model": "sks-dog", "modalities": ["image", "text"], "temperature": 0.7,
            "messages": [{"role": "system", "content": "You draw."},
                         {"role": "user", "content": [{"type": "text", "text": TRIGGER}]}],
            "seed": 9, **STEPS})
        assert response.status_code == 200, response.text
        message = response.json()["choices"][0]["message"]
        assert message["role"] == "assistant"
        url = message["images"][0]["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        image = decode(url.partition(",")[2])
        assert parse_parameters(image.text["parameters"])["Seed"] == "9"


def test_a1111_txt2img(server):
    response = server.post("/sdapi/v1/txt2img", json={
        "prompt": TRIGGER, "negative_prompt": "blurry", "steps": 2, "cfg_scale": 6,
        "seed": 21, "sampler_name": "DDIM", "batch_size": 2, "n_iter": 1,
        "override_settings": {"sd_model_checkpoint": "sks-dog"}, "restore_faces": False})
    assert response.status_code == 200, response.text
    answer = response.json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [21, 22] and info["sampler_name"] == "DDIM"
    assert len(answer["images"]) == 2
    params = parse_parameters(decode(answer["images"][1]).text["parameters"])
    assert params["Seed"] == "22" and params["Sampler"] == "DDIM"


def test_metrics_count_and_time_each_request(tiny_model):
    # A server of its own: every count starts at zero, whatever other tests sent before.
    running = Server(create_app({"tiny": tiny_model}, device="cpu", batch_wait_ms=0))
    route = "/v1/images/generations"
    try:
        with pytest.raises(openai.BadRequestError):  # refused requests are counted too
            running.client().images.generate(model="tiny", prompt="a dog", size="big")
        refused = metric(running, "dreambooth_request_latency_seconds_sum", route=route)
        started = time.perf_counter()
        running.client().images.generate(model="tiny", prompt="a dog", n=3, extra_body=STEPS)
        waited = time.perf_counter() - started
        assert metric(running, "dreambooth_requests_total", route=route, status="400") == 1
        assert metric(running, "dreambooth_requests_total", route=route, status="200") == 1
        assert metric(running, "dreambooth_request_latency_seconds_count", route=route) == 2
        assert metric(running, "dreambooth_images_total", model="tiny") == 3
        assert metric(running, "dreambooth_batch_images_count", model="tiny") == 1
        assert metric(running, "dreambooth_batch_images_sum", model="tiny") == 3
        assert metric(running, "dreambooth_queue_depth", model="tiny") == 0
        # The answered request's latency holds its batch's run and no more than the client saw.
        latency = metric(running, "dreambooth_request_latency_seconds_sum", route=route) - refused
        batch = metric(running, "dreambooth_batch_seconds_sum", model="tiny")
        assert 0 < batch <= latency <= waited
    finally:
        running.stop()


def test_full_queue_answers_429_and_never_backlogs(folders):
    app = create_app({"tiny": folders["base"]}, device="cpu", max_queue=1, batch_wait_ms=0)
    running = Server(app)
    worker = app.state.server.models["tiny"].worker
    try:
        # Hold the pipeline's lock: the worker takes at most one job and blocks on it, one more
        # waits in the queue, so of four requests at least one must be refused at once.
        with ThreadPoolExecutor(4) as pool:
            with worker.lock:
                futures = [pool.submit(running.post, "/v1/images/generations",
                                       json={"prompt": "a dog", **STEPS}) for _ in range(4)]
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                first = next(iter(done)).result()
                assert first.status_code == 429
                assert first.json()["error"]["code"] == "queue_full"
                assert first.headers["retry-after"] == "1"
            statuses = sorted(future.result().status_code for future in futures)
        assert set(statuses) <= {200, 429} and statuses.count(200) >= 1
    finally:
        running.stop()


def test_bad_settings_are_reported_together(folders, tmp_path):
    with pytest.raises(ServeConfigError) as info:
        create_app({}, loras={"x": tmp_path / "missing.safetensors"}, max_queue=0, max_batch=0)
    message = str(info.value)
    for expected in ("no model to serve", "max_queue=0", "max_batch=0", "--lora x"):
        assert expected in message


def test_serve_command_line(tmp_path, capsys):
    args = build_parser().parse_args(["serve", "--model", f"dog={tmp_path}", "--model",
                                      str(tmp_path), "--port", "0", "--lora", "s=x.safetensors"])
    assert args.host == "127.0.0.1" and args.port == 0 and args.api_key is None
    assert parse_named_paths(args.model[:1], "--model") == {"dog": str(tmp_path)}
    assert parse_named_paths(args.model[1:], "--model") == {tmp_path.name: str(tmp_path)}
    with pytest.raises(ValueError, match="twice"):
        parse_named_paths(["a=x", "a=y"], "--model")
    # A folder that is not a model fails before anything binds, with the reason.
    assert main(["serve", "--model", f"dog={tmp_path}", "--port", "0"]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_serve_load_benchmark_answers_more_clients_than_the_per_client_limit(tmp_path):
    """benchmarks/serve_load.py: its clients share one API key and address, which the server
    counts as one client (8 requests in flight by default); 16 clients must all be served, not
    turned into 429s (the benchmark once died on its 16-client level)."""
    output = tmp_path / "serve_load.json"
    script = Path(__file__).parent.parent / "benchmarks" / "serve_load.py"
    done = subprocess.run([sys.executable, str(script), "--model", "tiny", "--concurrency", "1",
                           "16", "--requests", "16", "--steps", "2", "--output", str(output)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    levels = {row["concurrency"]: row for row in json.loads(output.read_text())["results"]}
    assert set(levels) == {1, 16}
    assert levels[16]["images"] == 16 and len(levels[16]["latencies_s"]) == 16
    assert levels[16]["mean_batch_images"] > 1  # 16 clients at once are batched together
