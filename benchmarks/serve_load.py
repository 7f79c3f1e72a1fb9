"""Load test of `dreambooth serve`: images/s and latency at 1, 4 and 16 concurrent clients.

Usage (from the repository root, with the package and the `serve` extra installed):

    python benchmarks/serve_load.py                      # 1, 4, 16 clients, 48 requests each
    python benchmarks/serve_load.py --concurrency 1 8 --requests 32 --steps 20

What it does: starts `python -m dreambooth serve` on `--model` (default the bundled world
model `demo`, 64x64 images; `tiny` saves the random-weight 32x32 pipeline of `dreambooth.tiny`
to a temporary folder) in a child process bound to 127.0.0.1 on a free port (with
a random API key), and drives it with the official `openai` client, one client per thread.
Per concurrency level, `c` threads share `--requests` requests (n=1, the model's native size,
`--steps` denoising steps, a distinct seed each) after `c` warm-up requests; the level's
images/s is images / wall time, and p50/p95 are over the per-request latencies seen by the
clients. The mean batch size comes from the server's own Prometheus histogram. The loop is
bounded (a fixed number of requests, each with a timeout) and the server is stopped at the
end; nothing leaves loopback.

On a small CPU the clients, the server's event loop and its inference thread share the cores,
so the figures measure the whole loop on one machine. CPU time other processes used during a
level is reported: compare levels of one run, and runs only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from train_speed import describe_machine, machine_busy_s, machine_line, own_cpu_s

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROMPT = "a red star on a blue background"
MODEL_NAME = "demo"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (/proc/<pid>/stat), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(model_dir: Path, port: int, api_key: str, args, log_path: Path):
    command = [sys.executable, "-m", "dreambooth", "serve", "--model", f"{MODEL_NAME}={model_dir}",
               "--host", "127.0.0.1", "--port", str(port), "--device", args.device,
               "--max_queue", str(args.max_queue), "--max_batch", str(args.max_batch),
               "--batch_wait_ms", str(args.batch_wait_ms),
               # the clients share one API key and address, which the server counts as one
               # client: allow each level's concurrency in flight, not 429s
               "--max_client_requests", str(max(args.concurrency))]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "DREAMBOOTH_API_KEY": api_key})
    return process, log


def wait_until_healthy(process, url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} while starting")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /healthz within {timeout_s:.0f} s")


def batch_histogram(url: str, api_key: str) -> tuple[float, float]:
    """(sum, count) of the server's images-per-batch histogram."""
    import httpx

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {api_key}"},
                     timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("dreambooth_batch_images_sum", "dreambooth_batch_images_count"):
            if line.startswith(name + "{"):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values.get("dreambooth_batch_images_sum", 0.0), values.get(
        "dreambooth_batch_images_count", 0.0)


def run_level(url: str, api_key: str, concurrency: int, requests: int, steps: int,
              server_pid: int, first_seed: int) -> dict:
    from openai import OpenAI

    clients = [OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=600)
               for _ in range(concurrency)]

    def one(client: OpenAI, seed: int) -> float:
        started = time.perf_counter()
        result = client.images.generate(model=MODEL_NAME, prompt=PROMPT,
                                        extra_body={"num_inference_steps": steps, "seed": seed})
        if len(result.data) != 1:
            raise RuntimeError(f"expected one image, got {len(result.data)}")
        return time.perf_counter() - started

    def client_loop(index: int, count: int, seed: int) -> list[float]:
        return [one(clients[index], seed + k) for k in range(count)]

    with ThreadPoolExecutor(concurrency) as pool:  # warm-up: one request per client
        list(pool.map(lambda i: one(clients[i], first_seed + i), range(concurrency)))
    per_client = [requests // concurrency + (i < requests % concurrency)
                  for i in range(concurrency)]
    sum0, count0 = batch_histogram(url, api_key)
    busy0, own0, server0 = machine_busy_s(), own_cpu_s(), process_cpu_s(server_pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client_loop, i, per_client[i], first_seed + 1000 * (i + 1))
                   for i in range(concurrency)]
        latencies = [latency for future in futures for latency in future.result()]
    wall = time.perf_counter() - started
    busy1, own1, server1 = machine_busy_s(), own_cpu_s(), process_cpu_s(server_pid)
    sum1, count1 = batch_histogram(url, api_key)
    foreign = None
    if None not in (busy0, busy1, server0, server1):
        foreign = max(0.0, (busy1 - busy0) - (own1 - own0) - (server1 - server0)) / wall
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "concurrency": concurrency, "requests": len(latencies), "images": len(latencies),
        "wall_s": wall, "images_per_s": len(latencies) / wall,
        "latency_p50_s": statistics.median(latencies), "latency_p95_s": cuts[94],
        "latency_mean_s": statistics.fmean(latencies), "latency_max_s": max(latencies),
        "mean_batch_images": (sum1 - sum0) / (count1 - count0) if count1 > count0 else None,
        "batches": count1 - count0, "server_cpu_cores": (server1 - server0) / wall
        if None not in (server0, server1) else None,
        "foreign_cpu_cores": foreign, "latencies_s": latencies,
    }


def table(results: list[dict]) -> str:
    lines = ["| clients | requests | images/s | p50 latency (s) | p95 latency (s) "
             "| mean batch (images) | server CPU | other CPU load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        batch = "-" if r["mean_batch_images"] is None else f"{r['mean_batch_images']:.2f}"
        server = "?" if r["server_cpu_cores"] is None else f"{r['server_cpu_cores']:.2f} cores"
        other = "?" if r["foreign_cpu_cores"] is None else f"{r['foreign_cpu_cores']:.2f} cores"
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['images_per_s']:.2f} "
                     f"| {r['latency_p50_s']:.3f} | {r['latency_p95_s']:.3f} | {batch} "
                     f"| {server} | {other} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16],
                        help="Concurrent clients per level.")
    parser.add_argument("--requests", type=int, default=48,
                        help="Timed requests per level (shared by its clients).")
    parser.add_argument("--steps", type=int, default=30,
                        help="Denoising steps per image (30 = quality 'auto').")
    parser.add_argument("--model", default="demo",
                        help="A model the server takes ('demo': the bundled world model), or "
                             "'tiny' for dreambooth.tiny's random 32x32 pipeline.")
    parser.add_argument("--device", default="cpu", help="Server --device (cpu, cuda).")
    parser.add_argument("--max_batch", type=int, default=8, help="Server --max_batch.")
    parser.add_argument("--batch_wait_ms", type=float, default=10.0,
                        help="Server --batch_wait_ms.")
    parser.add_argument("--max_queue", type=int, default=64, help="Server --max_queue.")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default: benchmarks/results/serve_load-<host>.json).")
    args = parser.parse_args(argv)
    if min(args.concurrency) < 1 or args.requests < max(args.concurrency):
        parser.error("need concurrency >= 1 and --requests >= the largest concurrency")
    if max(args.concurrency) > args.max_queue:
        parser.error("a concurrency above --max_queue would be answered with 429s")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from dreambooth.tiny import save_tiny_pipeline

    machine = describe_machine()
    output = args.output or RESULTS_DIR / f"serve_load-{machine['host']}.json"
    command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"machine: {machine_line(machine)}")
    print(f"command: {command}")
    model_label = "dreambooth.tiny 32x32" if args.model == "tiny" else args.model
    print(f"model: {model_label}, {args.steps} steps, n=1; server "
          f"--device {args.device} --max_batch {args.max_batch} "
          f"--batch_wait_ms {args.batch_wait_ms:g}\n")
    api_key = secrets.token_urlsafe(16)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results = []
    with tempfile.TemporaryDirectory(prefix="serve-load-") as scratch:
        model_dir = (save_tiny_pipeline(Path(scratch) / "tiny") if args.model == "tiny"
                     else args.model)
        log_path = Path(scratch) / "server.log"
        process, log = start_server(model_dir, port, api_key, args, log_path)
        try:
            wait_until_healthy(process, url, timeout_s=180)
            for index, concurrency in enumerate(args.concurrency):
                result = run_level(url, api_key, concurrency, args.requests, args.steps,
                                   process.pid, first_seed=100_000 * (index + 1))
                results.append(result)
                print(f"{concurrency:>3} clients: {result['images_per_s']:.2f} images/s, "
                      f"p50 {result['latency_p50_s']:.3f} s, p95 {result['latency_p95_s']:.3f} s",
                      flush=True)
        except Exception:
            print(f"server log:\n{log_path.read_text()[-4000:]}", file=sys.stderr)
            raise
        finally:
            process.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
    print()
    print(table(results))
    report = {"machine": machine, "command": command, "model": model_label,
              "settings": {key: value for key, value in vars(args).items() if key != "output"},
              "results": results}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nresults written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
