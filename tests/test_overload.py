"""Overload against a real predictor with a small queue: the excess is refused quickly with 503 +
Retry-After (never queued without bound, never another 5xx), the server recovers when the load
falls, a request that can no longer meet its deadline never reaches the device (504), and a slow
client does not hold up anyone else. Timings here are generous bounds, not benchmarks
(``benchmarks/overload_bench.py`` measures them)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from server_support import Server, start_server, stop_server

V1 = "/v1/models/densenet121:predict"


def small_jpeg() -> bytes:
    from optimize.samples import sample_paths

    img = Image.open(next(p for p in sample_paths() if p.name == "chelsea.png")).convert("RGB").resize((256, 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


BODY = {"instances": [{"image": {"b64": base64.b64encode(small_jpeg()).decode()}}]}


def metric(server: Server, name: str, labels: str = "") -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def server(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("overload") / "server.log"
    srv = start_server(
        artifacts_dir / "densenet121-eager-fp32", log, "--max_batch_size", "2", "--max_delay_ms", "5",
        "--max_queue_images", "4", "--max_request_images", "2",
    )  # fmt: skip
    yield srv
    stop_server(srv)


def _flood(server: Server, clients: int, seconds: float) -> list[tuple[int, float, str | None, str]]:
    """``clients`` threads sending back to back for ``seconds``: (status, latency, Retry-After, error)."""
    stop = time.monotonic() + seconds
    out: list[tuple[int, float, str | None, str]] = []
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as s:
            while time.monotonic() < stop:
                t0 = time.monotonic()
                r = s.post(server.url + V1, json=BODY, timeout=60)
                row = (r.status_code, time.monotonic() - t0, r.headers.get("Retry-After"), r.text[:200])
                with lock:
                    out.append(row)
                if r.status_code == 503:
                    time.sleep(0.05)  # a polite client would honour Retry-After; a flood barely does

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return out


def test_overload_is_refused_quickly_and_the_server_recovers(server: Server) -> None:
    refused_before = metric(server, "densenet_requests_rejected_total", '{reason="queue_full"}')
    rows = _flood(server, clients=16, seconds=8)
    statuses = {s for s, *_ in rows}
    ok = [r for r in rows if r[0] == 200]
    refused = [r for r in rows if r[0] == 503]
    assert statuses <= {200, 503}, f"unexpected statuses under overload: {statuses - {200, 503}}"
    assert ok, "nothing was served under overload"
    assert refused, "16 clients against a queue of 4 images were never refused"
    assert all(r[2] for r in refused), "a 503 came without Retry-After"
    assert all("retry" in r[3] for r in refused)
    refusal_p99 = float(np.percentile([r[1] for r in refused], 99))
    served_max = max(r[1] for r in ok)
    assert refusal_p99 < 2.0, f"refusals took up to {refusal_p99:.2f}s (p99)"
    # The queue holds 4 images: an accepted request waits for at most a few batches, never for the flood.
    assert served_max < 30, f"an accepted request took {served_max:.1f}s"
    assert metric(server, "densenet_requests_rejected_total", '{reason="queue_full"}') > refused_before
    # Recovery: once the flood stops, requests are served again, one after another.
    time.sleep(1)
    for _ in range(3):
        r = requests.post(server.url + V1, json=BODY, timeout=60)
        assert r.status_code == 200, r.text
    assert requests.get(server.url + "/v2/health/ready", timeout=10).status_code == 200


def test_grpc_overload_gets_resource_exhausted(server: Server) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    image = np.array([small_jpeg()], dtype=np.object_)

    def call() -> str:
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
        inp = grpcclient.InferInput("image", [1], "BYTES")
        inp.set_data_from_numpy(image)
        try:
            client.infer("densenet121", [inp], client_timeout=60)
            return "OK"
        except InferenceServerException as e:
            return f"{e.status()} {e.message()}"

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: call(), range(16)))
    assert "OK" in results
    assert all(r == "OK" or ("RESOURCE_EXHAUSTED" in r and "queue is full" in r) for r in results), results
    assert any(r != "OK" for r in results), "16 concurrent gRPC calls against a queue of 4 were never refused"


def test_slow_client_does_not_block_others(server: Server) -> None:
    """A client trickling its body holds only its own connection: the batcher and other clients go on."""
    body = b'{"instances": [{"image": {"b64": "' + BODY["instances"][0]["image"]["b64"].encode() + b'"}}]}'
    stop = threading.Event()
    slow_reply: list[bytes] = []

    def trickle() -> None:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as s:
            s.sendall(
                f"POST {V1} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            for i in range(0, len(body), 64):
                if stop.is_set():
                    s.sendall(body[i:])
                    break
                s.sendall(body[i : i + 64])
                time.sleep(0.05)
            slow_reply.append(s.recv(4096))

    slow = threading.Thread(target=trickle)
    slow.start()
    try:
        time.sleep(0.5)
        for _ in range(3):
            t0 = time.monotonic()
            r = requests.post(server.url + V1, json=BODY, timeout=60)
            assert r.status_code == 200
            assert time.monotonic() - t0 < 15
        assert slow.is_alive(), "the slow client finished too early to prove anything"
    finally:
        stop.set()
        slow.join(60)
    assert slow_reply and slow_reply[0].startswith(b"HTTP/1.1 200"), slow_reply


@pytest.fixture(scope="module")
def deadline_server(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("deadline") / "server.log"
    srv = start_server(
        artifacts_dir / "densenet121-eager-fp32", log, "--max_batch_size", "1", "--max_delay_ms", "0",
        "--max_queue_images", "32", "--request_timeout_s", "0.2",
    )  # fmt: skip
    yield srv
    stop_server(srv)


def test_expired_requests_are_dropped_before_the_device(deadline_server: Server) -> None:
    server = deadline_server
    images_before = metric(server, "densenet_images_total")
    dropped_before = metric(server, "densenet_requests_rejected_total", '{reason="deadline"}')
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results: list[Any] = list(pool.map(lambda _: requests.post(server.url + V1, json=BODY, timeout=60), range(10)))
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 504}, statuses
    assert 504 in statuses, f"a 0.2s deadline behind 10 batches of one never expired: {statuses}"
    assert all("deadline" in r.json()["error"] for r in results if r.status_code == 504)
    ran = metric(server, "densenet_images_total") - images_before
    assert ran == statuses.count(200), "an expired request still reached the device"
    dropped = metric(server, "densenet_requests_rejected_total", '{reason="deadline"}') - dropped_before
    assert dropped == statuses.count(504)
