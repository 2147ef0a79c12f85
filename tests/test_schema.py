"""schemathesis against the real predictor's OpenAPI description (``--enable_docs true``).

The document is the one the server serves: our v1/v2 infer routes (with their request and
response schemas) in place of KServe's, and KServe's health, metadata and readiness routes.
Checks: no 5xx for any generated request, responses conform to their documented schema and
content type. Left out, with reasons:

- ``/metrics``: Prometheus text exposition, not JSON; FastAPI documents every route as JSON.
- repository load/unload and versioned routes: not in the document (refused: 403 / 404;
  ``tests/test_bad_input.py`` covers them).
- schemathesis' ``coverage`` phase: it crashes inside hypothesis on Python 3.11.7 (``SystemError:
  AST constructor recursion depth mismatch`` while describing a lambda); examples and fuzzing run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from server_support import Server, start_server, stop_server

TOKEN = "schema-test-admin-token-0123"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def server(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("schema") / "server.log"
    srv = start_server(
        artifacts_dir / "densenet121-eager-fp32", log, "--max_batch_size", "2", "--max_request_images", "2",
        "--max_body_bytes", str(2 * 1024 * 1024), "--enable_docs", "true", "--admin_token", TOKEN,
    )  # fmt: skip
    yield srv
    stop_server(srv)


def test_openapi_describes_what_is_served(server: Server) -> None:
    doc = requests.get(server.url + "/openapi.json", timeout=10).json()
    paths = doc["paths"]
    v1 = paths["/v1/models/{model_name}:predict"]["post"]
    assert "instances" in json.dumps(v1["requestBody"])
    assert {"400", "413", "415", "503"} <= set(v1["responses"])
    assert "inputs" in json.dumps(paths["/v2/models/{model_name}/infer"]["post"]["requestBody"])
    assert not any(p.startswith("/v2/repository") or p.startswith("/admin") for p in paths)


def test_admin_endpoint_needs_the_token(server: Server) -> None:
    url = server.url + "/admin/v1/info"
    assert requests.get(url, timeout=10).status_code == 401
    wrong = requests.get(url, headers={"Authorization": "Bearer " + "x" * len(TOKEN)}, timeout=10)
    assert wrong.status_code == 401 and wrong.headers.get("WWW-Authenticate") == "Bearer"
    assert requests.get(url, headers={"Authorization": TOKEN}, timeout=10).status_code == 401  # no scheme
    ok = requests.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert ok.status_code == 200
    info = ok.json()
    assert info["variant"] == "densenet121-eager-fp32" and info["config"]["max_batch_size"] == 2
    assert info["queue_images"] == 0 and info["draining"] is False


@pytest.mark.skipif(not SCHEMATHESIS.exists(), reason="schemathesis is not installed (dev extra)")
def test_schemathesis_finds_no_server_errors(server: Server, tmp_path: Path) -> None:
    report = tmp_path / "schemathesis.json"
    cmd = [
        str(SCHEMATHESIS), "run", server.url + "/openapi.json",
        "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
        "--exclude-path", "/metrics",
        "--max-examples", "12", "--phases", "examples,fuzzing", "--seed", "8",
        "--workers", "2", "--request-timeout", "30", "--max-response-time", "20",
        "--suppress-health-check", "all", "--warnings", "off", "--generation-database", "none",
        "--report", "ndjson", "--report-ndjson-path", str(report),
    ]  # fmt: skip
    env = {**os.environ, "NO_COLOR": "1"}
    # cwd: schemathesis keeps a crash cache in .schemathesis/ of its working directory.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert server.proc.poll() is None
    assert requests.get(server.url + "/v2/health/ready", timeout=10).status_code == 200
