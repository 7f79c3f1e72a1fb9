// The web UI of `dreambooth serve`: plain JavaScript over the server's own API, no build step.
//
// Every request carries the API key as an `Authorization: Bearer` header: the key lives in this
// tab's sessionStorage and never goes into a URL. So job events (Server-Sent Events) are read
// with fetch() and a ReadableStream rather than EventSource (which cannot send headers), and
// images and downloads are fetched as blobs and shown through object URLs. Server text is put
// into the page with textContent only.
"use strict";

(() => {
  const KEY_STORAGE = "dreambooth.apiKey";
  const JOBS = "/v1/fine_tuning/jobs";
  const FINISHED = ["succeeded", "failed", "cancelled"];
  const MIN_PHOTOS = 3, MAX_PHOTOS = 50;  // dreambooth.serve.jobs.MIN_PHOTOS, MAX_PHOTOS
  const PHOTO_TYPES = ["image/png", "image/jpeg", "image/webp"];
  // Trigger-word suggestions: each is one token of Stable Diffusion's CLIP vocabulary, a late
  // (rare) merge with no meaning of its own, as the DreamBooth paper advises
  // (tests/test_webui.py checks them against the bundled tokenizer).
  const IDENTIFIERS = ["sks", "ohwx", "phol", "bnha", "mowx", "wiwx", "nmwx", "wawx", "nlwx",
                       "ygk", "kprs", "httr"];
  const DOWNLOADS = {
    lora_kohya: "LoRA for AUTOMATIC1111, ComfyUI and kohya (.safetensors)",
    lora_diffusers: "LoRA for diffusers' load_lora_weights (.safetensors)",
    model_zip: "The whole diffusers pipeline folder (.zip)",
    single_file: "One checkpoint for AUTOMATIC1111 and ComfyUI (.safetensors)",
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else if (value !== null && value !== undefined && value !== false) {
        node.setAttribute(name, value === true ? "" : value);
      }
    }
    node.append(...children);
    return node;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    const h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
    const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(s).padStart(2, "0");
    return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
  }

  const when = (unixSeconds) => unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : "";

  // ---- The key and the requests ------------------------------------------------------------

  // null: not signed in; "": this server needs no key; else the key.
  let apiKey = sessionStorage.getItem(KEY_STORAGE);
  let jobsEnabled = true;

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path, options = {}, key = apiKey) {
    const headers = new Headers(options.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers, cache: "no-store",
                                          credentials: "omit" });
    if (!response.ok) {
      let message = `The server answered ${response.status} ${response.statusText}.`;
      let code = null;
      try {
        const body = await response.json();
        if (body && body.error) ({ message = message, code = null } = body.error);
      } catch (ignored) { /* not JSON: keep the status line */ }
      throw new ApiError(response.status, message, code);
    }
    return response;
  }

  const apiJSON = async (path, options) => (await api(path, options)).json();

  // Only this server's own paths get the key.
  const ownPath = (url) => typeof url === "string" && url.startsWith("/") && !url.startsWith("//");

  // An error from a view: a refused key signs out, anything else is shown in `target`.
  function report(error, target) {
    if (error.name === "AbortError") return;
    if (error instanceof ApiError && error.status === 401) {
      signOut(`The server refused the key: ${error.message}`);
      return;
    }
    const text = error instanceof ApiError ? error.message
      : `Cannot reach the server (${error.message}).`;
    if (target) target.textContent = text;
    else showNotice(text);
  }

  function showNotice(text) {
    $("notice").textContent = text;
    $("notice").hidden = !text;
  }

  // ---- Object URLs of fetched blobs, released when their view is left ----------------------

  const objectURLs = new Set();

  function blobURL(blob) {
    const url = URL.createObjectURL(blob);
    objectURLs.add(url);
    return url;
  }

  function releaseURLs() {
    for (const url of objectURLs) URL.revokeObjectURL(url);
    objectURLs.clear();
  }

  function markSmall(img) {
    img.addEventListener("load", () => img.classList.toggle("small", img.naturalWidth < 256));
  }

  // ---- Views and routing -------------------------------------------------------------------

  const views = {};
  let current = null;

  function route() {
    const hash = location.hash || "#/new";
    if (apiKey === null) {
      show("key", {});
      return;
    }
    const job = hash.match(/^#\/jobs\/(ftjob-[\w-]+)$/);
    if (job) show("job", { id: job[1] });
    else if (hash === "#/jobs") show("jobs", {});
    else show("new", {});
  }

  function show(name, params) {
    if (current && views[current].leave) views[current].leave();
    releaseURLs();
    current = name;
    for (const key of Object.keys(views)) $(`view-${key}`).hidden = key !== name;
    $("nav").hidden = apiKey === null;
    $("sign-out").hidden = !apiKey;
    for (const link of document.querySelectorAll("#nav a")) {
      const active = link.dataset.view === name || (name === "job" && link.dataset.view === "jobs");
      if (active) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    views[name].enter(params);
  }

  function signOut(reason) {
    sessionStorage.removeItem(KEY_STORAGE);
    apiKey = null;
    if (current && views[current].leave) views[current].leave();
    current = null;
    for (const view of Object.values(views)) if (view.clear) view.clear();
    showNotice("");
    show("key", {});
    $("key-error").textContent = reason || "";
  }

  // ---- Sign in -----------------------------------------------------------------------------

  views.key = {
    enter() {
      $("key-input").focus();
    },
  };

  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    const button = event.submitter || $("key-form").querySelector("button");
    if (!key) {
      $("key-error").textContent = "Enter the server's API key.";
      return;
    }
    button.disabled = true;
    $("key-error").textContent = "";
    try {
      await api("/v1/models", {}, key);
      sessionStorage.setItem(KEY_STORAGE, key);
      apiKey = key;
      $("key-input").value = "";
      await checkJobs();
      route();
    } catch (error) {
      $("key-error").textContent = error instanceof ApiError && error.status === 401
        ? "This is not the key the server was started with." : (error instanceof ApiError
          ? error.message : `Cannot reach the server (${error.message}).`);
    } finally {
      button.disabled = false;
    }
  });

  $("sign-out").addEventListener("click", () => signOut(""));

  async function checkJobs() {
    try {
      await api(`${JOBS}?limit=1`);
      jobsEnabled = true;
      showNotice("");
    } catch (error) {
      if (error instanceof ApiError && error.code === "jobs_disabled") {
        jobsEnabled = false;
        showNotice(error.message);
      } else throw error;
    }
  }

  // ---- New job -----------------------------------------------------------------------------

  let photos = [];  // {file, url}

  function addPhotos(files) {
    const refused = [];
    for (const file of files) {
      if (!PHOTO_TYPES.includes(file.type)) {
        refused.push(`${file.name} is not a PNG, JPEG or WebP`);
        continue;
      }
      if (photos.some((p) => p.file.name === file.name && p.file.size === file.size
                             && p.file.lastModified === file.lastModified)) continue;
      if (photos.length >= MAX_PHOTOS) {
        refused.push(`at most ${MAX_PHOTOS} photos`);
        break;
      }
      photos.push({ file, url: URL.createObjectURL(file) });
    }
    $("job-error").textContent = refused.length ? `Left out: ${refused.join("; ")}.` : "";
    renderPhotos();
  }

  function removePhoto(index) {
    URL.revokeObjectURL(photos[index].url);
    photos.splice(index, 1);
    renderPhotos();
  }

  function renderPhotos() {
    const list = $("thumbs");
    list.replaceChildren(...photos.map((photo, index) => el("li", {},
      el("img", { src: photo.url, alt: `Photo ${index + 1}: ${photo.file.name}` }),
      el("button", { type: "button", "aria-label": `Remove ${photo.file.name}`,
                     title: "Remove", "data-index": index, text: "\u00d7" }))));
    const n = photos.length;
    $("photo-count").textContent = n === 0 ? `No photos yet (${MIN_PHOTOS} to ${MAX_PHOTOS}).`
      : `${n} photo${n === 1 ? "" : "s"}` + (n < MIN_PHOTOS
        ? `: add at least ${MIN_PHOTOS - n} more.` : ".");
  }

  $("thumbs").addEventListener("click", (event) => {
    const button = event.target.closest("button[data-index]");
    if (button) removePhoto(Number(button.dataset.index));
  });
  $("photo-input").addEventListener("change", (event) => {
    addPhotos(event.target.files);
    event.target.value = "";  // choosing the same file again fires change again
  });
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    addPhotos(event.dataTransfer.files);
  });
  // A photo dropped beside the zone must not make the browser leave the page for the file.
  for (const name of ["dragover", "drop"]) {
    window.addEventListener(name, (event) => event.preventDefault());
  }

  function updatePromptPreview() {
    const identifier = $("identifier-input").value.trim() || "sks";
    const noun = $("class-input").value.trim() || "dog";
    $("prompt-preview").textContent = `a photo of ${identifier} ${noun}`;
  }

  $("suggest").addEventListener("click", () => {
    const now = $("identifier-input").value.trim();
    const others = IDENTIFIERS.filter((word) => word !== now);
    $("identifier-input").value = others[Math.floor(Math.random() * others.length)];
    updatePromptPreview();
  });
  $("identifier-input").addEventListener("input", updatePromptPreview);
  $("class-input").addEventListener("input", updatePromptPreview);

  // The advanced panel as the `hyperparameters` object; throws Error naming the field at fault.
  function hyperparameters() {
    const values = {};
    const steps = $("hp-steps").value.trim();
    if (steps) {
      if (!/^\d+$/.test(steps) || Number(steps) < 1) {
        throw new Error("Training steps must be a whole number of at least 1.");
      }
      values.max_train_steps = Number(steps);
    }
    const rate = $("hp-lr").value.trim();
    if (rate) {
      const number = Number(rate);
      if (!Number.isFinite(number) || number <= 0) {
        throw new Error(`Learning rate '${rate}' must be a positive number, e.g. 1e-4.`);
      }
      values.learning_rate = number;
    }
    if ($("hp-lora").checked) {
      values.use_lora = true;
      const rank = $("hp-rank").value.trim();
      if (rank) {
        if (!/^\d+$/.test(rank) || Number(rank) < 1) {
          throw new Error("LoRA rank must be a whole number of at least 1.");
        }
        values.rank = Number(rank);
      }
    }
    for (const [id, key] of [["hp-te", "train_text_encoder"],
                             ["hp-prior", "with_prior_preservation"]]) {
      if ($(id).value) values[key] = $(id).value === "true";
    }
    const extraText = $("hp-extra").value.trim();
    if (extraText) {
      let extra;
      try {
        extra = JSON.parse(extraText);
      } catch (error) {
        throw new Error(`More keys: not JSON (${error.message}).`);
      }
      if (!extra || typeof extra !== "object" || Array.isArray(extra)) {
        throw new Error('More keys: write a JSON object, e.g. {"seed": 0}.');
      }
      for (const key of Object.keys(extra)) {
        if (key in values) throw new Error(`More keys: '${key}' is set above already.`);
      }
      Object.assign(values, extra);
    }
    return values;
  }

  function updateHyperparameters() {
    $("hp-rank").disabled = !$("hp-lora").checked;
    try {
      $("hp-preview").textContent = JSON.stringify(hyperparameters());
    } catch (error) {
      $("hp-preview").textContent = error.message;
    }
  }

  $("advanced").addEventListener("input", updateHyperparameters);
  $("advanced").addEventListener("change", updateHyperparameters);

  async function loadModels() {
    const select = $("model-select");
    const chosen = select.value;
    const { data } = await apiJSON("/v1/models");
    const base = data.filter((m) => !m.personalized);
    const personal = data.filter((m) => m.personalized);
    const option = (m) => el("option", { value: m.id, text: m.id });
    select.replaceChildren(...base.map(option));
    if (personal.length) {
      select.append(el("optgroup", { label: "Personalized models" }, ...personal.map(option)));
    }
    if (data.some((m) => m.id === chosen)) select.value = chosen;
  }

  views.new = {
    enter() {
      updatePromptPreview();
      updateHyperparameters();
      loadModels().catch((error) => report(error, $("job-error")));
    },
    clear() {
      for (const photo of photos) URL.revokeObjectURL(photo.url);
      photos = [];
      renderPhotos();
      $("model-select").replaceChildren();
      $("job-error").textContent = "";
    },
  };

  $("job-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const error = $("job-error");
    error.textContent = "";
    let values;
    try {
      values = hyperparameters();
    } catch (problem) {
      error.textContent = problem.message;
      $("advanced").open = true;
      return;
    }
    const noun = $("class-input").value.trim();
    if (photos.length < MIN_PHOTOS) {
      error.textContent = `Add at least ${MIN_PHOTOS} photos of the subject.`;
      return;
    }
    if (!noun) {
      error.textContent = "Name the class of the subject (a dog, a ball, a person).";
      $("class-input").focus();
      return;
    }
    if (!$("model-select").value) {
      error.textContent = "The server serves no model to fine-tune.";
      return;
    }
    const form = new FormData();
    form.append("model", $("model-select").value);
    form.append("class_noun", noun);
    form.append("identifier", $("identifier-input").value.trim() || "sks");
    form.append("preset", document.querySelector('input[name="preset"]:checked').value);
    form.append("hyperparameters", JSON.stringify(values));
    for (const photo of photos) form.append("files", photo.file, photo.file.name);
    const button = $("create");
    button.disabled = true;
    button.textContent = "Uploading\u2026";
    try {
      const job = await apiJSON(JOBS, { method: "POST", body: form });
      views.new.clear();
      location.hash = `#/jobs/${job.id}`;
    } catch (problem) {
      report(problem, error);
    } finally {
      button.disabled = false;
      button.textContent = "Start training";
    }
  });

  // ---- The job list ------------------------------------------------------------------------

  let listTimer = null;

  async function loadJobs() {
    clearTimeout(listTimer);
    const { data, has_more: more } = await apiJSON(`${JOBS}?limit=100`);
    if (current !== "jobs") return;
    $("jobs-empty").hidden = data.length > 0;
    $("jobs-more").hidden = !more;
    $("jobs-list").replaceChildren(...data.map((job) => el("li", {},
      el("a", { href: `#/jobs/${job.id}` },
        el("span", { text: `${job.identifier} ${job.class_noun} on ${job.model}` }),
        el("span", { class: `badge ${job.status}`, text: job.status.replace("_", " ") }),
        el("span", { class: "meta" },
          el("span", { class: "id", text: job.id }),
          ` \u00b7 ${job.trained_photos} photos \u00b7 ${job.preset} \u00b7 ${when(job.created_at)}`)))));
    if (data.some((job) => !FINISHED.includes(job.status))) {
      listTimer = setTimeout(() => loadJobs().catch((e) => report(e)), 3000);
    }
  }

  views.jobs = {
    enter() {
      if (!jobsEnabled) return;
      loadJobs().catch((error) => report(error));
    },
    leave() {
      clearTimeout(listTimer);
    },
    clear() {
      $("jobs-list").replaceChildren();
    },
  };
  $("jobs-refresh").addEventListener("click", () => loadJobs().catch((e) => report(e)));

  // ---- One job -----------------------------------------------------------------------------

  let job = null;         // the job object (GET .../jobs/{id})
  let abort = null;       // stops this view's requests when it is left
  let steps = [];         // [{step, loss}] of the metrics events
  let lastMetrics = null;
  let progressShownAt = 0;

  // Server-Sent Events over fetch(): calls onEvent(event) per `data:` block; resolves when the
  // server ends the stream, reconnecting (from the last event id) after a network failure.
  async function readEvents(jobId, signal, onEvent, state) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (state.lastId) headers["Last-Event-ID"] = state.lastId;
        const response = await api(`${JOBS}/${jobId}/events`, { headers, signal });
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;
          // Joined first, so a CRLF split between two chunks still reads as one line end.
          buffer = (buffer + value).replace(/\r\n/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("id:")) state.lastId = line.slice(3).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            }
            let event = null;
            try {
              event = data.length ? JSON.parse(data.join("\n")) : null;
            } catch (ignored) { /* not an event of ours: skipped */ }
            if (event) onEvent(event);
          }
          attempt = 0;
        }
      } catch (error) {
        if (signal.aborted || error instanceof ApiError) throw error;
        await sleep(Math.min(1000 * 2 ** attempt, 10000));
      }
    }
  }

  function setStatus(status) {
    const badge = $("job-status");
    badge.textContent = status.replace("_", " ");
    badge.className = `badge ${status}`;
    $("job-cancel").hidden = FINISHED.includes(status);
    $("job-delete").hidden = !FINISHED.includes(status);
    if (job) job.status = status;
    showProgress(true);
  }

  function showProgress(force) {
    const bar = $("job-progress"), text = $("job-progress-text");
    const status = job ? job.status : "queued";
    if (lastMetrics) {
      bar.max = lastMetrics.max_steps;
      bar.value = lastMetrics.step;
    }
    const now = performance.now();
    // The bar follows every step; the live region speaks each change of its text, so that
    // changes at most once a second and a half.
    if (!force && now - progressShownAt < 1500) return;
    progressShownAt = now;
    if (status === "queued" || status === "validating_files") {
      bar.removeAttribute("value");  // indeterminate
      text.textContent = "Queued: it starts when the jobs before it finish.";
    } else if (status === "running" && !lastMetrics) {
      bar.removeAttribute("value");
      text.textContent = "Starting: loading the model and the photos\u2026";
    } else if (status === "running") {
      const eta = lastMetrics.eta_seconds;
      text.textContent = `Step ${lastMetrics.step} of ${lastMetrics.max_steps}`
        + (eta === null || eta === undefined ? "" : ` \u00b7 about ${duration(eta)} left`);
    } else if (status === "succeeded") {
      bar.max = 1;
      bar.value = 1;
      const took = job.finished_at && job.created_at ? ` in ${duration(job.finished_at - job.created_at)}` : "";
      text.textContent = `Done: ${lastMetrics ? lastMetrics.step : "all"} steps${took}.`;
    } else if (status === "failed") {
      text.textContent = `Failed${lastMetrics ? ` at step ${lastMetrics.step}` : ""}.`;
    } else if (status === "cancelled") {
      text.textContent = "Cancelled.";
    }
  }

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    return node;
  }

  let chartQueued = false;

  function drawChart() {
    if (chartQueued) return;
    chartQueued = true;
    requestAnimationFrame(() => {
      chartQueued = false;
      const chart = $("loss-chart"), width = 600, height = 160, pad = 8;
      const points = steps.filter((s) => Number.isFinite(s.loss));
      chart.replaceChildren();
      if (!points.length) return;
      const maxStep = Math.max(lastMetrics ? lastMetrics.max_steps : 1, ...points.map((p) => p.step));
      const maxLoss = Math.max(...points.map((p) => p.loss)) * 1.05 || 1;
      const x = (step) => (step / maxStep) * width;
      const y = (loss) => height - pad - (loss / maxLoss) * (height - 2 * pad);
      for (const fraction of [0.25, 0.5, 0.75]) {
        const level = y(maxLoss * fraction);
        chart.append(svg("line", { class: "grid", x1: 0, x2: width, y1: level, y2: level }));
      }
      // The per-step loss of diffusion training is noisy: a faint line of it, and its
      // exponential moving average (0.9) in full.
      let smooth = null;
      const raw = [], average = [];
      for (const p of points) {
        smooth = smooth === null ? p.loss : 0.9 * smooth + 0.1 * p.loss;
        raw.push(`${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`);
        average.push(`${x(p.step).toFixed(1)},${y(smooth).toFixed(1)}`);
      }
      const last = points[points.length - 1];
      chart.append(svg("polyline", { points: raw.join(" "), opacity: 0.3 }),
                   svg("polyline", { points: average.join(" "), "data-points": points.length }),
                   svg("circle", { cx: x(last.step), cy: y(smooth), r: 4 }));
      $("loss-caption").textContent = `Loss at step ${last.step}: ${last.loss.toFixed(4)} `
        + `(moving average ${smooth.toFixed(4)}); highest ${(maxLoss / 1.05).toFixed(4)}, `
        + `lowest ${Math.min(...points.map((p) => p.loss)).toFixed(4)}.`;
    });
  }

  async function addValidation(data, signal) {
    if (!data || !ownPath(data.url)) return;
    $("validation-empty").hidden = true;
    const img = el("img", { alt: `Validation images at step ${data.step}: the subject as it is, `
                                 + "on the beach and in the snow" });
    markSmall(img);
    const item = el("li", { "data-step": data.step },
      el("figure", {}, img, el("figcaption", { text: `Step ${data.step}` })));
    $("validation").append(item);
    try {
      const blob = await (await api(data.url, { signal })).blob();
      img.src = blobURL(blob);
    } catch (error) {
      if (error.name === "AbortError") return;
      item.querySelector("figcaption").textContent = `Step ${data.step}: ${error.message}`;
      report(error, null);
    }
  }

  function logEvent(event) {
    const time = new Date(event.created_at * 1000).toLocaleTimeString();
    $("job-log").append(el("li", { text: `${time} ${event.message}` }));
  }

  function onEvent(event, signal) {
    if (event.type === "metrics" && event.data) {
      lastMetrics = event.data;
      steps.push({ step: event.data.step, loss: event.data.loss });
      showProgress(false);
      drawChart();
      return;  // one a step: kept out of the log
    }
    logEvent(event);
    if (event.type === "status" && event.data) setStatus(event.data.status);
    else if (event.type === "validation") addValidation(event.data, signal);
  }

  function filename(response, fallback) {
    const header = response.headers.get("content-disposition") || "";
    const encoded = header.match(/filename\*=(?:UTF-8|utf-8)''([^;]+)/);
    if (encoded) return decodeURIComponent(encoded[1]);
    const plain = header.match(/filename="?([^";]+)"?/);
    return plain ? plain[1] : fallback;
  }

  async function download(url, button, signal) {
    button.disabled = true;
    const label = button.textContent;
    button.textContent = "Downloading\u2026";
    try {
      const response = await api(url, { signal });
      const name = filename(response, url.split("/").pop());
      const link = el("a", { href: blobURL(await response.blob()), download: name });
      document.body.append(link);
      link.click();
      link.remove();
    } catch (error) {
      report(error, $("job-error-text"));
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  }

  function renderJob() {
    $("job-title").textContent = job.fine_tuned_model || `${job.identifier} ${job.class_noun}`;
    const facts = [
      ["Job", job.id], ["Base model", job.model], ["Fine-tuned model", job.fine_tuned_model],
      ["Prompt", job.instance_prompt], ["Preset", job.preset], ["Photos", job.trained_photos],
      ["Settings", Object.entries(job.hyperparameters).map(([k, v]) => `${k} ${v}`).join(", ")],
      ["Created", when(job.created_at)],
      ["Finished", when(job.finished_at)],
    ].filter(([, value]) => value !== null && value !== undefined && value !== "");
    $("job-facts").replaceChildren(...facts.flatMap(([name, value]) =>
      [el("dt", { text: name }), el("dd", { text: String(value) })]));
    $("job-error-text").textContent = job.error ? job.error.message : "";
    const done = job.status === "succeeded";
    $("job-results").hidden = !(done && job.result_files.length);
    $("downloads").replaceChildren(...job.result_files.map((url) => {
      const kind = url.split("/").pop();
      const button = el("button", { type: "button", "data-url": url, "data-kind": kind,
                                    text: `Download ${kind}` });
      button.addEventListener("click", () => download(url, button, abort.signal));
      return el("li", {}, button, " ", el("span", { class: "hint", text: DOWNLOADS[kind] || "" }));
    }));
    const tryBox = $("try");
    const wasHidden = tryBox.hidden;
    tryBox.hidden = !(done && job.fine_tuned_model);
    if (!tryBox.hidden && wasHidden) $("try-prompt").value = job.instance_prompt;
  }

  async function followJob(id, signal) {
    const state = { lastId: null };
    for (;;) {
      await readEvents(id, signal, (event) => onEvent(event, signal), state);
      job = await apiJSON(`${JOBS}/${id}`, { signal });
      renderJob();
      showProgress(true);
      if (FINISHED.includes(job.status)) return;
      await sleep(1000);  // the stream ended early (a restarting server): read on
    }
  }

  views.job = {
    enter({ id }) {
      abort = new AbortController();
      const signal = abort.signal;
      job = null;
      steps = [];
      lastMetrics = null;
      this.clear();
      $("job-title").textContent = id;
      apiJSON(`${JOBS}/${id}`, { signal }).then((found) => {
        job = found;
        renderJob();
        setStatus(job.status);
        return followJob(id, signal);
      }).catch((error) => report(error, $("job-error-text")));
    },
    leave() {
      if (abort) abort.abort();
    },
    clear() {
      for (const id of ["job-facts", "validation", "job-log", "downloads", "try-out",
                        "loss-chart"]) $(id).replaceChildren();
      for (const id of ["job-error-text", "try-error", "try-status", "job-progress-text"]) {
        $(id).textContent = "";
      }
      $("job-title").textContent = "Job";
      $("job-status").textContent = "";
      $("job-status").className = "badge";
      $("job-progress").value = 0;
      $("loss-caption").textContent = "No steps yet.";
      $("validation-empty").hidden = false;
      $("job-results").hidden = true;
      $("try").hidden = true;
      $("job-cancel").hidden = true;
      $("job-delete").hidden = true;
    },
  };

  $("job-cancel").addEventListener("click", async () => {
    const button = $("job-cancel");
    button.disabled = true;
    try {
      job = await apiJSON(`${JOBS}/${job.id}/cancel`, { method: "POST" });
      renderJob();
    } catch (error) {
      report(error, $("job-error-text"));
    } finally {
      button.disabled = false;
    }
  });

  $("job-delete").addEventListener("click", async () => {
    if (!window.confirm("Delete this job and its files? Downloads of it stop working.")) return;
    const button = $("job-delete");
    button.disabled = true;
    try {
      await api(`${JOBS}/${job.id}`, { method: "DELETE" });
      location.hash = "#/jobs";
    } catch (error) {
      report(error, $("job-error-text"));
    } finally {
      button.disabled = false;
    }
  });

  // ---- Try it: POST /v1/images/generations with the job's model (and its base) --------------

  function base64Blob(text, type) {
    const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type });
  }

  async function generate(model, prompt, seed, stepCount, signal) {
    const body = { model, prompt, n: 1, response_format: "b64_json",
                   num_inference_steps: stepCount };
    if (seed !== null) body.seed = seed;
    const answer = await apiJSON("/v1/images/generations", {
      method: "POST", signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    return { model, seed: answer.data[0].seed, url: blobURL(base64Blob(answer.data[0].b64_json, "image/png")) };
  }

  $("try-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompt = $("try-prompt").value.trim();
    const error = $("try-error"), status = $("try-status"), button = $("try-go");
    error.textContent = "";
    if (!prompt) {
      error.textContent = "Write a prompt; name the subject as the job's prompt does.";
      return;
    }
    const seedText = $("try-seed").value.trim();
    const seed = seedText === "" ? null : Number(seedText);
    const stepCount = Number($("try-steps").value) || 25;
    const models = [job.fine_tuned_model, ...($("try-compare").checked ? [job.model] : [])];
    button.disabled = true;
    status.textContent = "Generating\u2026";
    const started = performance.now();
    try {
      const images = await Promise.all(models.map(
        (model) => generate(model, prompt, seed, stepCount, abort.signal)));
      $("try-out").replaceChildren(...images.map((image, index) => {
        const which = index === 0 ? "Fine-tuned" : "Base model";
        const img = el("img", { src: image.url, alt: `${which} (${image.model}): ${prompt}`,
                                "data-model": image.model });
        markSmall(img);
        return el("figure", {}, img,
          el("figcaption", { text: `${which}: ${image.model}, seed ${image.seed}` }));
      }));
      status.textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`;
    } catch (problem) {
      status.textContent = "";
      report(problem, error);
    } finally {
      button.disabled = false;
    }
  });

  // ---- Start -------------------------------------------------------------------------------

  window.addEventListener("hashchange", route);

  async function start() {
    if (apiKey === null) {
      // A server started without --api_key answers without one: no sign-in then.
      try {
        await api("/v1/models", {}, null);
        apiKey = "";
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 401)) report(error);
      }
    }
    if (apiKey !== null) {
      try {
        await checkJobs();
      } catch (error) {
        report(error);
      }
    }
    route();
  }

  start();
})();
