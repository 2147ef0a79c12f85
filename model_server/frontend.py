"""Several HTTP/gRPC front-end processes feeding one device process (``--frontends N``).

The device process loads the model, warms it up, and serves a Unix socket
(:mod:`model_server.ipc`); only then it starts N front ends. Each front end is a full
KServe ``ModelServer`` (v1, v2, gRPC, health, metadata) whose model forwards validated
payloads to the device process instead of running them, so the device batches across
every front end. All front ends listen on the same HTTP and gRPC ports (``SO_REUSEPORT``:
the kernel spreads connections). Metrics from every process are merged by
``prometheus_client``'s multiprocess mode, so ``/metrics`` on any front end shows the
device's histograms too.

On SIGTERM the device process forwards it to the front ends (each stops accepting and
finishes its requests, which the device still serves), then drains and exits.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from model_server.pipeline import Payload


log = logging.getLogger(__name__)


def enable_multiprocess_metrics() -> str:
    """Point prometheus_client at a shared folder; must run before it is first imported."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="densenet-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    for f in Path(path).glob("*.db"):  # stale files of an earlier run would be summed in
        f.unlink()
    return path


def _reuseport_socket(port: int) -> socket.socket:
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when the
    # socket's proto says TCP; with proto 0 Nagle stays on and small responses wait ~40 ms
    # for the client's delayed ACK (measured: 48 ms p50 at concurrency 1 instead of 5 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    sock.set_inheritable(True)
    return sock


def frontend_main(spec: dict[str, Any]) -> None:
    """Entry point of one front-end process (spawned)."""
    logging.basicConfig(
        level=spec["log_level"], format=f"%(asctime)s %(levelname)s fe{spec['index']} %(name)s: %(message)s"
    )
    import kserve.model_server as kserve_server
    from kserve.protocol.rest import server as kserve_rest
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from model_server import rest
    from model_server.lifecycle import DrainingModelServer, ServingState
    from model_server.predictor import DenseNetPredictor

    class RemotePredictor(DenseNetPredictor):
        """The predictor's request path, with the device in another process."""

        def load(self) -> bool:
            from model_server.artifact import read_labels, read_manifest
            from model_server.ipc import DeviceClient

            self.manifest = read_manifest(self.artifact_dir, verify=False)  # the device process verified it
            self.labels = np.array([s.encode() for s in read_labels(self.artifact_dir, self.manifest)], dtype=object)
            self._gpu_decode = spec["gpu_decode"]
            self._max_batch = spec["max_batch"]
            self.client = DeviceClient(spec["ipc_path"])
            self.ready = True
            return True

        def max_batch(self) -> int:
            return int(self._max_batch)

        async def _infer(self, payload: Payload) -> np.ndarray:
            return await self.client.infer(payload, self.config.request_timeout_s)

        async def profile_control(self, op: dict[str, Any]) -> dict[str, Any]:
            return await self.client.control(op)

    if not spec["metrics"]:
        from model_server import metrics

        metrics.disable()
    model = RemotePredictor(spec["model_name"], Path(spec["model_dir"]), spec["config"])
    model.load()
    app = kserve_server.app

    async def merged_metrics(request: Request) -> Response:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    app.add_api_route("/metrics", merged_metrics, methods=["GET"])
    state = ServingState(max_inflight=spec["max_inflight"])
    rest.install(
        app, model, max_body_bytes=spec["max_body_bytes"], state=state,
        admin_token=spec["admin_token"], enable_docs=spec["enable_docs"],
    )  # fmt: skip

    sock = _reuseport_socket(spec["http_port"])
    original_serve = kserve_rest._RefreshingServer.serve

    async def serve_shared(self: Any, sockets: list[socket.socket] | None = None) -> None:
        await original_serve(self, sockets=[sock])

    kserve_rest._RefreshingServer.serve = serve_shared  # share the HTTP port with the other front ends
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server = DrainingModelServer(
        model=model,
        state=state,
        grace_period_s=spec["grace_period_s"],
        http_port=spec["http_port"],
        grpc_port=spec["grpc_port"],
        enable_docs_url=False,
        enable_latency_logging=False,
    )
    server.start([model])
    sys.exit(0 if server.clean_exit else 1)


def serve(model: Any, *, frontends: int, spec: dict[str, Any], grace_period_s: float) -> int:
    """Run the device side of ``model`` (already loaded) and ``frontends`` front-end processes."""
    from model_server.ipc import DeviceServer
    from model_server.predictor import profile_op

    ipc_dir = tempfile.mkdtemp(prefix="densenet-ipc-")
    ipc_path = os.path.join(ipc_dir, "device.sock")
    ctx = multiprocessing.get_context("spawn")

    async def run() -> int:
        device = DeviceServer(model.batcher, ipc_path, control=lambda op: profile_op(model.profiler, op))
        await device.start()
        procs = []
        for i in range(frontends):
            p = ctx.Process(
                target=frontend_main,
                args=({**spec, "index": i, "ipc_path": ipc_path, "max_batch": model.batcher.max_batch_size},),
                name=f"frontend-{i}",
                daemon=False,
            )
            p.start()
            procs.append(p)
        log.info("device process %d serving %d front ends on %s", os.getpid(), frontends, ipc_path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        code = 0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                dead = [p for p in procs if not p.is_alive()]
                if dead:
                    log.error("front end %s exited with %s; stopping", dead[0].name, dead[0].exitcode)
                    code = 1
                    break
        for p in procs:  # front ends stop accepting and finish their requests, which we still serve
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        deadline = loop.time() + grace_period_s
        while any(p.is_alive() for p in procs) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for p in procs:
            if p.is_alive():
                p.kill()
        await model.batcher.drain(max(0.0, deadline - loop.time()))
        await device.close()
        return code

    try:
        return asyncio.run(run())
    finally:
        try:
            os.unlink(ipc_path)
            os.rmdir(ipc_dir)
        except OSError:
            pass


__all__ = ["enable_multiprocess_metrics", "frontend_main", "serve"]
