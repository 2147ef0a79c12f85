"""Helpers shared by the load-test suite: a recorded Kubernetes API server on 127.0.0.1 and run results."""

from __future__ import annotations

import csv
import json
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

VARIANT = "densenet121-eager-fp32"
USER_CLASSES = ("V1Base64User", "V2BytesUser", "V2BinaryBytesUser", "V2JsonTensorUser", "V2BinaryTensorUser")
RECORDING: dict[str, Any] = json.loads((Path(__file__).parent / "data" / "knative_pod_events.json").read_text())
SERVICE = RECORDING["service"]["metadata"]["name"]


@dataclass
class Predictor:
    url: str
    log: Path


@dataclass
class LocustRun:
    returncode: int
    output: str
    prefix: Path

    def stats(self) -> list[dict[str, str]]:
        with open(f"{self.prefix}_stats.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    def aggregated(self) -> dict[str, str]:
        return next(row for row in self.stats() if row["Name"] == "Aggregated")

    def side(self) -> dict[str, Any]:
        return json.loads(Path(f"{self.prefix}_loadtest.json").read_text())


class FakeKubeApi:
    """Just enough of a Kubernetes API server for the pod watcher, answered from the recording.

    Serves the Knative Service, a pod list, then the recorded watch events (after
    ``events_delay_s``, as a revision scaled to zero takes a while to get a ready pod),
    and the pods' ``/metrics`` through the pod proxy path: from ``metrics_text``, or
    forwarded to ``metrics_upstream`` (a real predictor) when set.
    """

    def __init__(self, *, events_delay_s: float = 0.0, metrics_text: str = "", metrics_upstream: str = "") -> None:
        self.events_delay_s = events_delay_s
        self.metrics_text = metrics_text
        self.metrics_upstream = metrics_upstream
        self.watches = 0
        self.paths: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "fake",
                    "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                    "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
                    "contexts": [
                        {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "default"}}
                    ],
                }
            )
        )
        return path

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, body: bytes, status: int = 200, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urlsplit(unquote(self.path))
                query = parse_qs(url.query)
                api.paths.append(unquote(self.path))
                if url.path == f"/apis/serving.knative.dev/v1/namespaces/default/services/{SERVICE}":
                    return self._send(json.dumps(RECORDING["service"]).encode())
                if url.path.endswith(":8080/proxy/metrics"):
                    text = api.metrics_text
                    if api.metrics_upstream:
                        with urllib.request.urlopen(f"{api.metrics_upstream}/metrics", timeout=10) as response:
                            text = response.read().decode()
                    return self._send(text.encode(), content_type="text/plain")
                if url.path != "/api/v1/namespaces/default/pods":
                    return self._send(b'{"kind": "Status", "code": 404}', 404)
                assert query["labelSelector"] == [f"serving.knative.dev/service in ({SERVICE})"]
                if query.get("watch", [""])[0].lower() != "true":
                    listing = dict(RECORDING["list"])
                    if api.watches:  # a re-list after the recorded events sees the state they left
                        listing["items"] = [RECORDING["events"][3]["object"]]
                    return self._send(json.dumps(listing).encode())
                api.watches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()  # no length: the stream ends when the connection closes, like a watch timeout
                if api.watches == 1:
                    time.sleep(api.events_delay_s)
                    for event in RECORDING["events"]:
                        self.wfile.write(json.dumps(event).encode() + b"\n")
                        self.wfile.flush()
                        time.sleep(0.05)
                else:
                    time.sleep(0.3)
                self.close_connection = True
                return None

        return Handler
