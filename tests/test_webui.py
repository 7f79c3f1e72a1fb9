"""The web UI of `dreambooth serve` in a real browser: a `dreambooth serve --model demo=demo
--state_dir DIR --api_key KEY` process driven by headless Chromium through Playwright.

The main flow signs in, uploads the demo subject's photos (file input and drag-and-drop),
trains a small LoRA job on `demo`, follows it to the end, generates with the trained model in
the "try it" box and downloads the LoRA, which diffusers then loads. Screenshots of each step
(desktop and phone width) go to tests/artifacts/webui/ (or $DREAMBOOTH_WEBUI_ARTIFACTS).

Needs Playwright for Python (the `test` extra) and Chromium (`apt-get install chromium`; the
path from $DREAMBOOTH_CHROMIUM, default /usr/bin/chromium): without them these tests fail,
they do not skip.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import dreambooth
from dreambooth.serve.jobs import PRESETS, VALIDATION_SCENES
from dreambooth.serve.ui import STATIC
from dreambooth.world import DEMO_SUBJECT, photos
from serve_process import ServeProcess

KEY = "webui-test-key"
CHROMIUM = (os.environ.get("DREAMBOOTH_CHROMIUM") or shutil.which("chromium")
            or "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("DREAMBOOTH_WEBUI_ARTIFACTS",
                                Path(__file__).parent / "artifacts" / "webui"))
# Headless, and nothing that reaches out to the network on its own.
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync"]
STEPS = 30  # the job's training steps: a few seconds on 2 cores at 64 px
TIMEOUT_MS = 120_000
CURVE = "#loss-chart polyline[data-points]"  # the loss curve, with its number of points
SHOWN_GRIDS = ("[...document.querySelectorAll('#validation img')]"
               ".filter((img) => img.naturalWidth).length")  # validation grids shown


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui")
    running = ServeProcess(["--model", "demo=demo", "--state_dir", str(root / "state"),
                            "--device", "cpu"], root / "serve.log", key=KEY, timeout=90)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("tests/test_webui.py needs Playwright for Python: "
                    "pip install -e '.[test]' (or pip install playwright)", pytrace=False)
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"tests/test_webui.py needs Chromium at {CHROMIUM}: apt-get install "
                    "chromium, or set DREAMBOOTH_CHROMIUM to its path", pytrace=False)
    playwright = sync_playwright().start()
    launched = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
    yield launched
    launched.close()
    playwright.stop()


class Watched:
    """A page with its requests and its errors recorded."""

    def __init__(self, browser, **context_options):
        self.context = browser.new_context(**context_options)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.requests, self.errors = [], []
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", lambda message: self.errors.append(message.text)
                     if message.type == "error"
                     and not message.text.startswith("Failed to load resource") else None)

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def sign_in(self, url: str, key: str = KEY) -> None:
        self.page.goto(url)
        self.page.locator("#view-key").wait_for()
        self.page.fill("#key-input", key)
        self.page.click("#key-form button[type=submit]")

    def no_overflow(self) -> None:
        """Nothing sticks out sideways (no horizontal scrolling at this width)."""
        width, widest = self.page.evaluate("""() => {
            let widest = null, right = 0;
            for (const node of document.querySelectorAll("body *")) {
                const box = node.getBoundingClientRect();
                if (box.width && box.right > right) [widest, right] = [node, box.right];
            }
            return [document.documentElement.scrollWidth,
                    widest && `${widest.tagName}#${widest.id}.${widest.className}`];
        }""")
        assert width <= self.page.viewport_size["width"], f"the page is {width} px wide: {widest}"

    def close(self) -> None:
        assert self.errors == [], self.errors
        self.context.close()


def image_pixels(page, selector: str) -> np.ndarray:
    """The RGB pixels an <img> of the page shows, read back through a canvas."""
    width, height, data = page.evaluate("""(selector) => {
        const img = document.querySelector(selector);
        const canvas = document.createElement("canvas");
        canvas.width = img.naturalWidth;
        canvas.height = img.naturalHeight;
        const context = canvas.getContext("2d");
        context.drawImage(img, 0, 0);
        const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
        return [canvas.width, canvas.height, Array.from(pixels)];
    }""", selector)
    return np.array(data, dtype=np.uint8).reshape(height, width, 4)[..., :3]


def write_demo_photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, photo in enumerate(photos(DEMO_SUBJECT, n=count)):
        paths.append(folder / f"{DEMO_SUBJECT.name}-{index}.png")
        photo.save(paths[-1])
    return paths


def test_the_page_needs_no_key_and_holds_no_data(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css"),
                       ("icon.svg", "image/svg+xml")):
        asset = httpx.get(f"{server.url}/ui/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.content == (STATIC / name).read_bytes()
    for name in ("index.html", "..%2Fui.py", "%2e%2e%2fapp.py", "app.js.map", "missing.js"):
        assert httpx.get(f"{server.url}/ui/{name}").status_code == 404, name
    # The data itself still needs the key.
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/fine_tuning/jobs").status_code == 401
    # The page describes the presets and the validation grids as the server defines them.
    for preset in PRESETS.values():
        assert f"{preset['max_train_steps']} steps" in page.text
    for scene in VALIDATION_SCENES:
        assert scene.strip() in page.text


def test_trigger_word_suggestions_are_rare_single_clip_tokens():
    from transformers import CLIPTokenizer

    script = (STATIC / "app.js").read_text()
    words = json.loads(re.search(r"const IDENTIFIERS = (\[[^\]]*\])", script).group(1))
    tokenizer = CLIPTokenizer.from_pretrained(Path(dreambooth.__file__).parent / "assets"
                                              / "clip_tokenizer")
    assert len(words) >= 8 and len(set(words)) == len(words)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        # One token, and one of the last BPE merges learned (the rarest); 49408 in all.
        assert len(ids) == 1 and ids[0] > 44_000, (word, ids)
        assert re.fullmatch(r"[a-z]{3,4}", word)


def test_train_follow_try_and_download_in_the_browser(server, browser, tmp_path):
    from diffusers import StableDiffusionPipeline

    desktop = Watched(browser, viewport={"width": 1024, "height": 800})
    page = desktop.page
    page.goto(server.url + "/")
    page.locator("#view-key").wait_for()
    assert page.locator("#nav").is_hidden() and page.locator("#view-new").is_hidden()
    assert page.locator("#model-select option").count() == 0  # nothing shown without the key
    desktop.shot("01-sign-in")

    page.fill("#key-input", "not-the-key")
    page.click("#key-form button[type=submit]")
    page.get_by_text("This is not the key the server was started with.").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    page.locator("#view-new").wait_for()
    page.locator("#model-select option[value=demo]").wait_for(state="attached")
    assert page.evaluate("sessionStorage.getItem('dreambooth.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0
    unlabelled = page.evaluate("""() => [...document.querySelectorAll("input, select, textarea")]
        .filter((field) => !field.labels.length && !field.getAttribute("aria-label"))
        .map((field) => field.id || field.name)""")
    assert unlabelled == []  # every field has a label a screen reader reads
    assert page.evaluate("""() => new Set([...document.querySelectorAll("[id]")].map((e) => e.id))
        .size == document.querySelectorAll("[id]").length""")  # ids are unique

    # Four photos through the file input, a fifth and a sixth dropped on the zone, one removed.
    paths = write_demo_photos(tmp_path / "photos", 6)
    page.set_input_files("#photo-input", [str(p) for p in paths[:4]])
    dropped = [base64.b64encode(p.read_bytes()).decode() for p in paths[4:]]
    page.evaluate("""(files) => {
        const transfer = new DataTransfer();
        files.forEach((data, i) => transfer.items.add(new File(
            [Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], `dropped-${i}.png`,
            {type: "image/png"})));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", dropped)
    assert page.locator("#thumbs li").count() == 6
    page.click("#thumbs button[aria-label='Remove dropped-1.png']")
    assert page.locator("#thumbs li").count() == 5
    assert page.locator("#photo-count").inner_text() == "5 photos."
    page.wait_for_function("() => [...document.querySelectorAll('#thumbs img')]"
                           ".every((img) => img.complete && img.naturalWidth === 64)")

    page.fill("#class-input", DEMO_SUBJECT.cls)
    page.click("#suggest")
    assert page.input_value("#identifier-input") != "sks"
    page.fill("#identifier-input", "sks")
    assert page.inner_text("#prompt-preview") == f"a photo of sks {DEMO_SUBJECT.cls}"
    page.click("#advanced summary")
    assert page.is_disabled("#hp-rank")  # a full fine-tune unless LoRA is asked for
    page.check("#hp-lora")
    page.fill("#hp-steps", str(STEPS))
    page.fill("#hp-lr", "1e-3")
    page.fill("#hp-extra", '{"seed": 0, "num_threads": 1}')
    sent = {"max_train_steps": STEPS, "learning_rate": 1e-3, "use_lora": True, "rank": 4,
            "seed": 0, "num_threads": 1}
    assert json.loads(page.inner_text("#hp-preview")) == sent
    desktop.shot("02-new-job")

    # Mistakes are named before anything is sent, or by the server's own message.
    page.fill("#hp-extra", "{oops")
    page.click("#create")
    assert page.inner_text("#job-error").startswith("More keys: not JSON")
    page.fill("#hp-extra", '{"output_dir": "/tmp/elsewhere"}')
    page.click("#create")
    page.get_by_text("hyperparameters.output_dir cannot be set by a client").wait_for()
    assert server.get("/v1/fine_tuning/jobs").json()["data"] == []
    page.fill("#hp-extra", '{"seed": 0, "num_threads": 1}')
    page.click("#create")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-[0-9a-f]+$"))
    job_id = page.url.rsplit("/", 1)[1]
    job = server.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["trained_photos"] == 5 and job["hyperparameters"] == {
        **job["hyperparameters"], **sent}
    assert job["instance_prompt"] == f"a photo of sks {DEMO_SUBJECT.cls}"
    page.wait_for_function(f"() => document.querySelector('{CURVE}') && {SHOWN_GRIDS} > 0")
    desktop.shot("03-training")
    page.locator("#job-status.succeeded").wait_for()
    page.wait_for_function(f"() => document.querySelector('{CURVE}').dataset.points == {STEPS}")
    assert page.inner_text("#job-progress-text").startswith(f"Done: {STEPS} steps")
    assert page.evaluate("[document.getElementById('job-progress').value,"
                         " document.getElementById('job-progress').max]") == [1, 1]
    assert page.locator("#job-cancel").is_hidden()
    # Every validation grid of the job's events shows, as the server's PNG is.
    listed = server.get(f"/v1/fine_tuning/jobs/{job_id}/events?limit=100").json()["data"]
    grids = sorted((e["data"] for e in listed if e["type"] == "validation"),
                   key=lambda data: data["step"])
    assert len(grids) >= 2 and grids[-1]["step"] == STEPS
    page.wait_for_function(f"() => {SHOWN_GRIDS} == {len(grids)}")
    assert page.locator("#validation li").evaluate_all(
        "(items) => items.map((item) => Number(item.dataset.step))") == [
            grid["step"] for grid in grids]
    last = Image.open(io.BytesIO(server.get(grids[-1]["url"]).content))
    assert np.array_equal(image_pixels(page, f"#validation li[data-step='{STEPS}'] img"),
                          np.asarray(last.convert("RGB")))
    assert page.locator("#downloads button").evaluate_all(
        "(buttons) => buttons.map((b) => b.dataset.kind)") == ["lora_kohya", "lora_diffusers"]

    # Try it: the page shows exactly what the API answers for this model, prompt and seed.
    model = server.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]
    assert page.input_value("#try-prompt") == job["instance_prompt"]
    page.fill("#try-steps", "10")
    page.click("#try-go")
    page.wait_for_function("() => [...document.querySelectorAll('#try-out img')]"
                           ".filter((img) => img.naturalWidth).length == 2")
    desktop.shot("04-try-it")
    shown = image_pixels(page, f"#try-out img[data-model='{model}']")
    base_shown = image_pixels(page, "#try-out img[data-model='demo']")
    answer = server.post("/v1/images/generations", json={
        "model": model, "prompt": job["instance_prompt"], "n": 1, "seed": 0,
        "num_inference_steps": 10, "response_format": "b64_json"}).json()
    expected = Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"])))
    assert np.array_equal(shown, np.asarray(expected.convert("RGB")))
    assert np.abs(shown.astype(int) - base_shown).max() > 10

    # The LoRA download, loaded by diffusers on the demo pipeline, changes what it draws.
    with page.expect_download() as info:
        page.click("#downloads button[data-kind=lora_diffusers]")
    lora_path = tmp_path / info.value.suggested_filename
    info.value.save_as(lora_path)
    assert lora_path.name.endswith("-diffusers.safetensors")
    assert lora_path.read_bytes() == server.get(
        f"/v1/fine_tuning/jobs/{job_id}/files/lora_diffusers").content
    pipe = StableDiffusionPipeline.from_pretrained(
        Path(dreambooth.__file__).parent / "assets" / "world_model", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def draw() -> np.ndarray:
        return pipe(job["instance_prompt"], num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    before = draw()
    pipe.load_lora_weights(str(lora_path))
    after = draw()
    assert np.abs(after - before).max() > 0.02

    # The key went only into headers: never into a URL, and the events came over fetch().
    assert not any(KEY in request.url for request in desktop.requests)
    events = [r for r in desktop.requests if r.url.endswith(f"/{job_id}/events")]
    assert events and all(r.headers.get("authorization") == f"Bearer {KEY}"
                          and r.headers.get("accept") == "text/event-stream" for r in events)
    page.click("#sign-out")
    page.locator("#view-key").wait_for()
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator("#jobs-list li, #job-facts dd, #try-out img").count() == 0
    desktop.close()

    # At phone width (in dark mode): the job page after signing in (the link kept), then the
    # form and the list.
    phone = Watched(browser, viewport={"width": 390, "height": 844}, is_mobile=True,
                    has_touch=True, device_scale_factor=2, color_scheme="dark")
    phone.sign_in(f"{server.url}/#/jobs/{job_id}")
    phone.page.locator("#job-status.succeeded").wait_for()
    phone.page.wait_for_function(f"() => document.querySelector('{CURVE}')")
    phone.shot("05-phone-job")
    phone.no_overflow()
    phone.page.click("#nav a[data-view=new]")
    phone.page.locator("#model-select option[value=demo]").wait_for(state="attached")
    phone.page.set_input_files("#photo-input", [str(p) for p in paths[:3]])
    phone.page.click("#advanced summary")
    phone.shot("06-phone-new-job")
    phone.no_overflow()
    phone.page.click("#nav a[data-view=jobs]")
    phone.page.locator(f"#jobs-list a[href='#/jobs/{job_id}'] .badge.succeeded").wait_for()
    phone.shot("07-phone-jobs")
    phone.no_overflow()
    phone.close()


def test_cancel_from_the_job_page(server, browser, tmp_path):
    files = [("files", (p.name, p.read_bytes(), "image/png"))
             for p in write_demo_photos(tmp_path / "photos", 3)]
    job = server.post("/v1/fine_tuning/jobs", files=files, data={
        "model": "demo", "class_noun": DEMO_SUBJECT.cls, "hyperparameters": json.dumps(
            {"max_train_steps": 5000, "use_lora": True, "num_threads": 1})}).json()
    watched = Watched(browser, viewport={"width": 1024, "height": 800})
    watched.sign_in(f"{server.url}/#/jobs/{job['id']}")
    page = watched.page
    page.locator("#job-status.running").wait_for()
    page.get_by_text(re.compile(r"^Step \d+ of 5000")).wait_for()
    page.click("#job-cancel")
    page.locator("#job-status.cancelled").wait_for()
    assert page.inner_text("#job-progress-text") == "Cancelled."
    watched.shot("08-cancelled")
    assert page.locator("#job-cancel").is_hidden() and page.locator("#try").is_hidden()
    assert server.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] == "cancelled"
    # A finished job can be deleted (after a confirmation); the list no longer has it.
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#job-delete")
    page.wait_for_url(re.compile(r"#/jobs$"))
    page.locator("#jobs-list li").first.wait_for()
    assert page.locator(f"#jobs-list a[href='#/jobs/{job['id']}']").count() == 0
    assert server.get(f"/v1/fine_tuning/jobs/{job['id']}").status_code == 404
    watched.close()


def test_a_server_without_key_or_jobs_opens_at_once_and_says_jobs_are_off(browser, tiny_model):
    from dreambooth.serve.app import create_app
    from test_serve import Server

    server = Server(create_app({"base": tiny_model}, device="cpu"))
    try:
        watched = Watched(browser, viewport={"width": 1024, "height": 800})
        page = watched.page
        page.goto(server.url + "/")
        page.locator("#model-select option[value=base]").wait_for(state="attached")
        assert page.locator("#view-key").is_hidden() and page.locator("#sign-out").is_hidden()
        assert "start it with --state_dir" in page.inner_text("#notice")
        page.click("#nav a[data-view=jobs]")
        assert page.locator("#jobs-list li").count() == 0
        assert not any("authorization" in r.headers for r in watched.requests)
        watched.close()
    finally:
        server.stop()


def sse(*events: tuple[int, dict]) -> bytes:
    """A Server-Sent Events body with CRLF line ends, a comment and `event:` lines."""
    lines = [": a comment line, ignored"]
    for seq, event in events:
        lines += [f"id: {seq}", f"event: {event['type']}", f"data: {json.dumps(event)}", ""]
    return ("\r\n".join(lines) + "\r\n").encode()


def test_events_resume_after_a_dropped_stream_and_foreign_urls_get_no_key(server, browser):
    """A stream that ends before the job does is read on from its last event id; a
    validation URL off this server is never fetched (it would get the key)."""
    job_id = "ftjob-" + "ab" * 12
    job = {"id": job_id, "object": "fine_tuning.job", "model": "demo", "status": "running",
           "fine_tuned_model": None, "identifier": "sks", "class_noun": "ball",
           "instance_prompt": "a photo of sks ball", "preset": "quick", "trained_photos": 3,
           "hyperparameters": {"max_train_steps": 4}, "created_at": 1, "finished_at": None,
           "error": None, "result_files": []}

    def event(type: str, data: dict, message: str = "") -> dict:
        return {"object": "fine_tuning.job.event", "created_at": 1, "level": "info",
                "type": type, "message": message or type, "data": data}

    def metrics(step: int) -> dict:
        return event("metrics", {"step": step, "max_steps": 4, "loss": 0.1 * step, "lr": 1e-4,
                                 "eta_seconds": 4 - step})

    grid = io.BytesIO()
    Image.new("RGB", (16, 48), (200, 30, 30)).save(grid, "PNG")
    streams = [sse((1, event("status", {"status": "queued"})),
                   (2, event("status", {"status": "running"})), (3, metrics(1)), (4, metrics(2))),
               sse((5, metrics(3)), (6, metrics(4)),
                   (7, event("validation", {"step": 4, "url": "https://elsewhere.example/a.png"})),
                   (8, event("validation", {"step": 4, "url": f"/v1/fine_tuning/jobs/{job_id}"
                                                           "/images/step-000004.png"})),
                   (9, event("status", {"status": "succeeded"})))]
    seen = []

    def answer_events(route):
        seen.append(route.request.headers)
        body = streams[min(len(seen), len(streams)) - 1]
        if len(seen) > 1:
            job.update(status="succeeded", finished_at=3)
        route.fulfill(status=200, body=body, headers={"Content-Type": "text/event-stream"})

    watched = Watched(browser, viewport={"width": 1024, "height": 800})
    page = watched.page
    page.route(f"**/v1/fine_tuning/jobs/{job_id}", lambda route: route.fulfill(json=job))
    page.route(f"**/v1/fine_tuning/jobs/{job_id}/events", answer_events)
    page.route("**/images/step-000004.png", lambda route: route.fulfill(
        body=grid.getvalue(), headers={"Content-Type": "image/png"}))
    page.route("https://elsewhere.example/**", lambda route: route.abort())
    watched.sign_in(f"{server.url}/#/jobs/{job_id}")
    page.locator("#job-status.succeeded").wait_for()
    page.wait_for_function(f"() => {SHOWN_GRIDS} == 1")
    assert len(seen) == 2 and "last-event-id" not in seen[0]
    assert seen[1]["last-event-id"] == "4" and seen[1]["authorization"] == f"Bearer {KEY}"
    page.wait_for_function(f"() => document.querySelector('{CURVE}').dataset.points == 4")
    assert page.inner_text("#job-progress-text").startswith("Done: 4 steps")
    # Each event once: the statuses and the validations are logged, the metrics are not.
    assert page.locator("#job-log li").count() == 5
    assert not any("elsewhere.example" in r.url for r in watched.requests)
    watched.close()
