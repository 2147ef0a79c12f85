"""Helpers for tests that build artifacts and start a real predictor on 127.0.0.1.

A module of its own, not ``conftest``: ``from conftest import ...`` is ambiguous once
``tests/cluster/conftest.py`` and ``tests/loadtest/conftest.py`` are collected in one run.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_artifacts(out: Path, *variants: str, device: str = "cpu") -> None:
    cmd = [
        sys.executable,
        "-m",
        "optimize",
        "build",
        "--weights",
        "random",
        "--output-dir",
        str(out),
        "--device",
        device,
    ]
    cmd += [a for v in variants for a in ("--variant", v)]
    cmd += ["--max-batch", "8"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)


class Server:
    def __init__(
        self, proc: subprocess.Popen[bytes], http_port: int, grpc_port: int, log: Path, log_at_ready: str = ""
    ) -> None:
        self.proc, self.http_port, self.grpc_port, self.log = proc, http_port, grpc_port, log
        #: The server's log as it was when ``/v2/health/ready`` first answered 200.
        self.log_at_ready = log_at_ready

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def start_server(model_dir: Path, log: Path, *extra: str, timeout_s: float = 120.0, poll_s: float = 0.25) -> Server:
    import requests

    http_port, grpc_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "model_server", "--model_dir", str(model_dir), "--model_name", "densenet121",
        "--http_port", str(http_port), "--grpc_port", str(grpc_port), "--device", "cpu", *extra,
    ]  # fmt: skip
    logf = log.open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1).status_code == 200:
                return Server(proc, http_port, grpc_port, log, log.read_text())
        except requests.RequestException:
            pass
        time.sleep(poll_s)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s}s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
