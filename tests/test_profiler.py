"""On-demand profiler capture: off without a token, refused with a wrong one, a real trace with the right one."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from server_support import Server, start_server, stop_server

TOKEN = "profiler-test-token-0123456789"


@pytest.fixture(scope="module")
def admin_server(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("profiler")
    srv = start_server(
        artifacts_dir / "densenet121-eager-fp32", d / "server.log", "--max_batch_size", "2",
        "--admin_token", TOKEN,
    )  # fmt: skip
    yield srv
    stop_server(srv)


def _infer(srv: Server) -> None:
    from optimize.samples import sample_paths

    img = base64.b64encode(sample_paths()[3].read_bytes()).decode()
    r = requests.post(
        srv.url + "/v1/models/densenet121:predict", json={"instances": [{"image": {"b64": img}}]}, timeout=60
    )
    assert r.status_code == 200, r.text


def test_profile_needs_the_token(admin_server: Server) -> None:
    r = requests.post(admin_server.url + "/admin/v1/profile", json={"batches": 1}, timeout=10)
    assert r.status_code == 401
    r = requests.post(
        admin_server.url + "/admin/v1/profile", json={"batches": 1}, timeout=10,
        headers={"Authorization": "Bearer wrong-token-wrong-token"},
    )  # fmt: skip
    assert r.status_code == 401


def test_profile_bad_request_is_400(admin_server: Server) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for body in ({"batches": 0}, {"seconds": 1, "batches": 1}, {"frames": 3}):
        r = requests.post(admin_server.url + "/admin/v1/profile", json=body, headers=auth, timeout=10)
        assert r.status_code == 400, (body, r.text)
    assert requests.get(admin_server.url + "/admin/v1/profile/nope", headers=auth, timeout=10).status_code == 404


def test_profile_captures_the_next_batches(admin_server: Server) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.post(admin_server.url + "/admin/v1/profile", json={"batches": 2}, headers=auth, timeout=10)
    assert r.status_code == 202, r.text
    cap = r.json()
    assert cap["state"] == "pending"
    for _ in range(2):
        _infer(admin_server)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = requests.get(admin_server.url + cap["status_url"], headers=auth, timeout=10).json()
        if status["state"] in ("done", "failed"):
            break
        time.sleep(0.2)
    assert status["state"] == "done", status
    assert status["batches_seen"] == 2
    trace = requests.get(admin_server.url + cap["trace_url"], headers=auth, timeout=30)
    assert trace.status_code == 200
    events = json.loads(trace.content)["traceEvents"]
    assert any("densenet" in str(e.get("name", "")).lower() or "conv" in str(e.get("name", "")).lower() for e in events)
