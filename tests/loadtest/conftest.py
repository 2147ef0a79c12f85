"""Fixtures of the load-test suite: a real predictor on 127.0.0.1 and a helper that runs Locust headless.

This suite runs in its own pytest process (``pytest tests/loadtest``): it imports
locust, whose gevent monkey-patching must never meet kserve. The predictor runs in a
subprocess (``python -m model_server``) on a CPU artifact with random weights; the
artifact is cached under pytest's cache folder, keyed by the source of ``optimize/``
and ``model_server/``, so only the first run pays for the build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import gevent_first  # noqa: F401 - must precede anything that imports urllib3
import pytest
from loadtest_support import VARIANT, LocustRun, Predictor

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _source_hash() -> str:
    digest = hashlib.sha256()
    for folder in ("optimize", "model_server"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def artifact_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FP32 eager artifact with random weights (built once, reused while its sources are unchanged)."""
    if getattr(request.config, "cache", None) is not None:
        cache = Path(request.config.cache.mkdir("loadtest-artifacts"))
    else:  # -p no:cacheprovider
        cache = tmp_path_factory.mktemp("loadtest-artifacts")
    out = cache / _source_hash()
    model_dir = out / VARIANT
    if not (model_dir / "variant.json").is_file():
        shutil.rmtree(cache, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [
            sys.executable,
            "-m",
            "optimize",
            "build",
            "--variant",
            VARIANT,
            "--weights",
            "random",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--max-batch",
            "4",
        ]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.fail(f"artifact build failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-3000:]}")
    return model_dir


@pytest.fixture(scope="session")
def predictor(artifact_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Predictor]:
    """A real predictor (KServe, CPU) on 127.0.0.1, ready after its warm-up."""
    import requests

    http_port, grpc_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("predictor") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "model_server",
        "--model_dir",
        str(artifact_dir),
        "--model_name",
        "densenet121",
        "--http_port",
        str(http_port),
        "--grpc_port",
        str(grpc_port),
        "--device",
        "cpu",
        "--max_batch_size",
        "4",
        "--max_delay_ms",
        "10",
        "--log_level",
        "WARNING",
    ]
    with log.open("wb") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"predictor exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"predictor not ready in 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield Predictor(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def payload_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One payload cache for every Locust subprocess of the session (photos are generated once)."""
    return tmp_path_factory.mktemp("payloads")


@pytest.fixture
def run_locust(tmp_path: Path, payload_cache: Path):
    """Run ``python -m locust -f loadtest/ --headless`` in a subprocess; returns a :class:`LocustRun`."""

    def run(
        host: str,
        *args: str,
        users: int = 1,
        run_time: str = "4s",
        name: str = "run",
        env: dict[str, str] | None = None,
        timeout: float = 90,
    ) -> LocustRun:
        prefix = tmp_path / name / "run"
        cmd = [
            sys.executable,
            "-m",
            "locust",
            "-f",
            "loadtest/",
            "--headless",
            "-u",
            str(users),
            "-r",
            str(users),
            "-t",
            run_time,
            "--host",
            host,
            "--csv",
            str(prefix),
            "--csv-full-history",
            "--only-summary",
            "--stop-timeout",
            "10",
            *args,
        ]
        environment = {**os.environ, "LOCUST_PAYLOAD_CACHE": str(payload_cache), **(env or {})}
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment)
        return LocustRun(result.returncode, result.stdout + result.stderr, prefix)

    return run
