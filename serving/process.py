"""`python -m serving` as a child process on a free loopback port, for tests and benchmarks.

    with ServerProcess(["--preset", "debug", ...], env, log_path) as server:
        urllib.request.urlopen(f"{server.url}/v1/models/onerec")
The server's output goes to a file (an unread pipe fills and stalls the server); `tail()` shows
it when something fails.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from onerec.config import PROJECT_ROOT
from onerec.stack import free_port


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str], log_path: str | Path, model_name: str = "onerec",
                 ready_timeout_s: float = 120.0):
        self.args, self.env, self.log_path = args, env, Path(log_path)
        self.model_name, self.ready_timeout_s = model_name, ready_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Start and wait until the model reports ready; raises (with the log's tail) otherwise."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving", "--model_name", self.model_name, *self.args,
             "--http_port", str(self.port), "--grpc_port", str(free_port()), "--enable_grpc", "false"],
            cwd=PROJECT_ROOT, env={"PYTHONPATH": str(PROJECT_ROOT), **self.env},
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the predictor exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the predictor was not ready in {self.ready_timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v1/models/{self.model_name}", timeout=2) as resp:
                return bool(json.loads(resp.read()).get("ready"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""
