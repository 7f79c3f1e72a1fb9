"""`dreambooth serve` in a child process on a free loopback port, for tests that need a real
server process (the web UI in a browser, a server killed with SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SRC = str(Path(__file__).resolve().parents[1] / "src")


class ServeProcess:
    """`python -m dreambooth serve ARGS --port P`, started and waited for; requests carry `key`
    (which the server gets through DREAMBOOTH_API_KEY); its output is appended to `log_path`."""

    def __init__(self, args: list[str], log_path: Path, *, key: str, timeout: float = 120):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.key, self.log_path = key, log_path
        self.log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dreambooth", "serve", *args, "--port", str(port)],
            env={**os.environ, "DREAMBOOTH_API_KEY": key, "PYTHONPATH": os.pathsep.join(
                filter(None, [SRC, os.environ.get("PYTHONPATH")]))},
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"dreambooth serve exited:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"dreambooth serve did not start:\n{log_path.read_text()[-3000:]}")

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {self.key}"},
                         timeout=60, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers={"Authorization": f"Bearer {self.key}"},
                          timeout=60, **kwargs)

    def stop(self) -> None:
        """SIGTERM, as a user's Ctrl-C or a service manager stops it (SIGKILL after 30 s)."""
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to stop its training process."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()
