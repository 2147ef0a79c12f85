"""Shared fixtures: a built random-weights artifact and a real predictor on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # get_closest_marker, not ``in item.keywords``: keywords also hold folder names (tests/cluster/...).
    has_cuda = False
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        has_cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; torch sees none on this machine"))
        if item.get_closest_marker("slow") and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow on 2 CPU cores; run with --runslow"))
        if item.get_closest_marker("cluster") and os.environ.get("DENSENET_CLUSTER_TESTS") != "1":
            item.add_marker(pytest.mark.skip(reason="needs a live Kind cluster; set DENSENET_CLUSTER_TESTS=1"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_artifacts(out: Path, *variants: str) -> None:
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
        "cpu",
    ]
    cmd += [a for v in variants for a in ("--variant", v)]
    cmd += ["--max-batch", "8"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP32 and FP16 channels-last artifacts built once per session with seeded random weights."""
    out = tmp_path_factory.mktemp("artifacts")
    build_artifacts(out, "densenet121-eager-fp32", "densenet121-eager-fp16-cl")
    return out


class Server:
    def __init__(self, proc: subprocess.Popen[bytes], http_port: int, grpc_port: int, log: Path) -> None:
        self.proc, self.http_port, self.grpc_port, self.log = proc, http_port, grpc_port, log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


def start_server(model_dir: Path, log: Path, *extra: str, timeout_s: float = 120.0) -> Server:
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
                return Server(proc, http_port, grpc_port, log)
        except requests.RequestException:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError(f"server not ready in {timeout_s}s:\n{log.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="module")
def server(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real predictor on 127.0.0.1 serving the FP32 artifact, batches up to 4."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(
        artifacts_dir / "densenet121-eager-fp32", log, "--max_batch_size", "4", "--max_delay_ms", "20",
        "--max_request_images", "4", "--max_body_bytes", str(8 * 1024 * 1024),
    )  # fmt: skip
    yield srv
    stop_server(srv)
