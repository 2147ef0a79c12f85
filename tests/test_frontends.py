"""``--frontends 2``: two HTTP/gRPC front-end processes feeding one device process that batches across both."""

from __future__ import annotations

import base64
import concurrent.futures
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from server_support import Server, start_server

V1 = "/v1/models/densenet121:predict"


@pytest.fixture(scope="module")
def multi(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("multi") / "server.log"
    srv = start_server(
        artifacts_dir / "densenet121-eager-fp32", log, "--frontends", "2", "--max_batch_size", "8",
        "--max_request_images", "4", timeout_s=180, poll_s=0.01,
    )  # fmt: skip
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()


def _jpeg() -> bytes:
    from optimize.samples import sample_paths

    return next(p for p in sample_paths() if p.name == "rocket.jpg").read_bytes()


def test_ready_only_once_every_front_end_is_warm(multi: Server) -> None:
    """A readiness probe (and the first request) may reach either front end: both must have sent
    their warm-up requests through their own app to the device before either answers."""
    for index in (0, 1):
        assert re.search(rf"fe{index} \S+: front end {index} warm: its warm-up requests", multi.log_at_ready), (
            f"front end {index} was not warm when the server answered ready:\n{multi.log_at_ready[-3000:]}"
        )
    assert not re.search(r"WARNING .*(warm-up request|HTTP warm-up failed)", multi.log_at_ready), multi.log_at_ready


def test_device_process_never_imports_kserve(multi: Server) -> None:
    """The device process only loads the model and serves the front ends over a Unix socket: it
    must not spend start-up seconds importing KServe, FastAPI and grpc (their native modules would
    be mapped into it); the front ends do import them."""

    def native(pid: int) -> set[str]:
        paths = {m.path for m in psutil.Process(pid).memory_maps()}
        return {name for name in ("grpc", "pydantic_core") if any(f"/{name}/" in path for path in paths)}

    assert native(multi.proc.pid) == set()
    children = psutil.Process(multi.proc.pid).children()
    front_ends = [c.pid for c in children if "--multiprocessing-fork" in c.cmdline()]  # not the resource tracker
    assert len(front_ends) == 2 and all(native(pid) == {"grpc", "pydantic_core"} for pid in front_ends)


def test_two_frontend_processes_share_the_port(multi: Server) -> None:
    deadline = time.monotonic() + 60  # every front end is warm at ready; each listens a moment later
    while True:
        children = psutil.Process(multi.proc.pid).children()
        listeners = {
            c.pid for c in children for conn in c.connections("tcp")
            if conn.laddr.port == multi.http_port and conn.status == psutil.CONN_LISTEN
        }  # fmt: skip
        if len(listeners) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(listeners) == 2, f"expected two front ends listening on {multi.http_port}, found {len(listeners)}"


def test_keep_alive_connections_even_out_over_the_front_ends(multi: Server) -> None:
    """Eight keep-alive clients: whatever split the kernel's hash gives, a front end over its share
    closes connections until none holds more than its share plus one (4 + 1 here)."""
    sessions = [requests.Session() for _ in range(8)]
    try:
        closes = 0
        for _ in range(40):
            for s in sessions:
                r = s.get(multi.url + "/v2/health/live", timeout=10)
                assert r.status_code == 200
                closes += r.headers.get("connection", "").lower() == "close"
            time.sleep(0.01)
        children = psutil.Process(multi.proc.pid).children()
        split = sorted(
            (sum(1 for c in p.connections("tcp") if c.laddr.port == multi.http_port and c.status == psutil.CONN_ESTABLISHED)
             for p in children if "--multiprocessing-fork" in p.cmdline()),
            reverse=True,
        )  # fmt: skip
        assert sum(split) == 8 and split[0] <= 5, (split, closes)
    finally:
        for s in sessions:
            s.close()


def test_requests_across_frontends_are_batched_by_one_device(multi: Server) -> None:
    body = {"instances": [{"image": {"b64": base64.b64encode(_jpeg()).decode()}}]}
    first = requests.post(multi.url + V1, json=body, timeout=120)
    assert first.status_code == 200, first.text
    expected = first.json()["predictions"][0]["classes"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        # A new connection per request: the kernel spreads them over both front ends.
        results = list(pool.map(lambda _: requests.post(multi.url + V1, json=body, timeout=120), range(12)))
    assert all(r.status_code == 200 and r.json()["predictions"][0]["classes"] == expected for r in results)
    text = requests.get(multi.url + "/metrics", timeout=10).text
    count = float(re.search(r"^densenet_batch_size_count ([0-9.e+]+)$", text, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"^densenet_batch_size_sum ([0-9.e+]+)$", text, re.M).group(1))  # type: ignore[union-attr]
    assert total >= 13, "the merged /metrics must include the device process's histograms"
    assert count < total, "concurrent requests from both front ends never shared a device batch"


def _counter(url: str, name: str) -> float:
    """The sum over every label set of ``name`` in the merged ``/metrics``."""
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def test_metrics_pause_and_resume_in_every_process_on_signals(multi: Server) -> None:
    """kill -USR1 on the device process pauses the request-path metrics there and in both front ends
    (it forwards the signal); kill -USR2 resumes them. Requests are served throughout."""
    body = {"instances": [{"image": {"b64": base64.b64encode(_jpeg()).decode()}}]}

    def switch(sig: int, word: str) -> None:
        before = multi.log.read_text().count(f"request-path metrics {word}")
        multi.proc.send_signal(sig)
        deadline = time.monotonic() + 30
        while multi.log.read_text().count(f"request-path metrics {word}") < before + 3:  # device + 2 front ends
            assert time.monotonic() < deadline, multi.log.read_text()[-3000:]
            time.sleep(0.05)

    def four_requests() -> None:  # new connections: the kernel spreads them over both front ends
        for _ in range(4):
            assert requests.post(multi.url + V1, json=body, timeout=120).status_code == 200

    try:
        switch(signal.SIGUSR1, "paused")
        images = _counter(multi.url, "densenet_images_total")  # written by the device process
        handled = _counter(multi.url, "densenet_request_seconds_count")  # written by the front ends
        four_requests()
        assert _counter(multi.url, "densenet_images_total") == images
        assert _counter(multi.url, "densenet_request_seconds_count") == handled
    finally:
        switch(signal.SIGUSR2, "on")
    four_requests()
    assert _counter(multi.url, "densenet_images_total") == images + 4
    assert _counter(multi.url, "densenet_request_seconds_count") == handled + 4
    assert multi.proc.poll() is None


def test_bad_input_and_grpc_through_a_frontend(multi: Server) -> None:
    import tritonclient.grpc as grpcclient

    r = requests.post(multi.url + V1, json={"instances": [{"image": {"b64": "@@"}}]}, timeout=30)
    assert r.status_code == 400 and "base64" in r.json()["error"]
    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{multi.grpc_port}")
    inp = grpcclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([_jpeg()], dtype=np.object_))
    assert client.infer("densenet121", [inp]).as_numpy("classes").shape == (1, 5)


def test_front_ends_never_load_torch(multi: Server) -> None:
    """Front ends parse, check and forward; the device process owns torch. A front end that loaded
    torch would pay its import at start-up (seconds on the H100 host, where the slowest front end
    then set ready) and ~470 MB of memory, so the paths that could reach it run first: a PNG (decoded by PIL
    in the front end), a UINT8 and an FP32 tensor, a JPEG, top-k and all outputs."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, format="PNG")
    tensor = np.zeros((1, 3, 224, 224), dtype=np.uint8)
    bodies = [
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(buf.getvalue()).decode()]}]},
        {"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1, 3, 224, 224], "data": tensor.ravel().tolist()}]},
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": tensor.ravel().astype(float).tolist()}],
         "outputs": [{"name": "logits"}, {"name": "classes"}], "parameters": {"top_k": 3}},
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(_jpeg()).decode()]}]},
    ]  # fmt: skip
    for _ in range(3):  # a new connection per request: the kernel spreads them over both front ends
        for body in bodies:
            r = requests.post(f"{multi.url}/v2/models/densenet121/infer", json=body, timeout=60)
            assert r.status_code == 200, r.text

    def has_torch(pid: int) -> bool:
        return any("libtorch" in m.path for m in psutil.Process(pid).memory_maps())

    children = psutil.Process(multi.proc.pid).children()
    front_ends = [c.pid for c in children if "--multiprocessing-fork" in c.cmdline()]
    assert len(front_ends) == 2
    assert has_torch(multi.proc.pid)  # the check sees torch where it is
    assert not any(has_torch(pid) for pid in front_ends)


def test_frontends_exit_when_the_device_process_is_killed(artifacts_dir: Path, tmp_path: Path) -> None:
    srv = start_server(artifacts_dir / "densenet121-eager-fp32", tmp_path / "log", "--frontends", "2",
                       "--max_batch_size", "2", "--grace_period_s", "2", timeout_s=180)  # fmt: skip
    children = psutil.Process(srv.proc.pid).children()
    srv.proc.kill()  # no chance to stop its front ends
    srv.proc.wait(30)
    _gone, alive = psutil.wait_procs(children, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, "front ends outlived a killed device process"


def test_sigterm_stops_every_process(multi: Server) -> None:
    children = psutil.Process(multi.proc.pid).children()
    multi.proc.send_signal(signal.SIGTERM)
    try:
        assert multi.proc.wait(timeout=60) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("device process did not exit within 60 s of SIGTERM")
    _gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


def test_connection_balancer_closes_only_above_its_share() -> None:
    from model_server.frontend import ConnectionBalancer

    counts = [0, 0, 0]
    held = {"n": 9}
    balancer = ConnectionBalancer(counts, 0, lambda: held["n"], slack=1, min_interval_s=0.05)
    counts[1:] = [2, 1]  # 12 connections over 3 front ends: a share of 4, 5 with the slack
    assert balancer.should_close(10.0) and counts[0] == 9 and balancer.closed == 1
    assert not balancer.should_close(10.01)  # at most one close per interval
    assert balancer.should_close(10.06)
    held["n"] = 4
    assert not balancer.should_close(11.0)  # 4 of 7: a share of 3, within it plus the slack
    counts[1:] = [0, 0]
    held["n"] = 3
    assert not balancer.should_close(12.0)  # as few connections as front ends: nothing to even out
    assert balancer.closed == 2


def test_balance_middleware_adds_connection_close_when_the_balancer_says_so() -> None:
    import asyncio

    from model_server.frontend import BalanceMiddleware, ConnectionBalancer

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    async def call(held: int) -> list[dict]:  # type: ignore[type-arg]
        sent: list[dict] = []  # type: ignore[type-arg]

        async def send(message: dict) -> None:  # type: ignore[type-arg]
            sent.append(message)

        balancer = ConnectionBalancer([0, 0], 0, lambda: held)
        await BalanceMiddleware(app, balancer)({"type": "http"}, None, send)
        return sent

    crowded = asyncio.run(call(held=6))  # 6 of 6 on this front end: over a share of 3 (+1)
    assert (b"connection", b"close") in crowded[0]["headers"] and crowded[1]["body"] == b"ok"
    fair = asyncio.run(call(held=1))
    assert (b"connection", b"close") not in fair[0]["headers"]
