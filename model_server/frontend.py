"""Several HTTP/gRPC front-end processes feeding one device process (``--frontends N``).

The device process starts N front ends first thing (they import torch and KServe while it
imports torch and loads the model; it never imports KServe itself), then loads the model,
warms it up, and serves a Unix socket (:mod:`model_server.ipc`). Each front end is a full
KServe ``ModelServer`` (v1, v2, gRPC, health, metadata) whose model forwards validated
payloads to the device process instead of running them, so the device batches across
every front end. All front ends listen on the same HTTP and gRPC ports (``SO_REUSEPORT``:
the kernel spreads connections). Metrics from every process are merged by
``prometheus_client``'s multiprocess mode, so ``/metrics`` on any front end shows the
device's histograms too.

Ready means every front end is warm: each sends its warm-up requests through its own app
(and so through the IPC connection and the device) before it listens, and none listens before
all of them are warm. A readiness probe, and the first request, can reach any of them; a
front end still warming would slow the first requests, its warm-up batches sharing the device.

On SIGTERM the device process forwards it to the front ends (each stops accepting and
finishes its requests, which the device still serves), then drains and exits.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    import numpy as np

    from model_server.device import LoadedModel
    from model_server.images import Payload


log = logging.getLogger(__name__)
#: :data:`model_server.metrics.PAUSE_SIGNAL` and ``RESUME_SIGNAL`` (tests/test_metrics.py checks they agree).
TOGGLE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def enable_multiprocess_metrics() -> str:
    """Point prometheus_client at a shared folder; must run before it is first imported.

    Unless ``PROMETHEUS_MULTIPROC_DIR`` names one, the folder is made in memory (``/dev/shm``) where
    there is one: every metric write stores into an mmap of a file there, and a file on a disk-backed
    ``/tmp`` gets its dirty pages written back under load, when a store can fault or wait for the
    write-back. A folder made here is removed when this process exits.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        shm = Path("/dev/shm")
        base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
        path = tempfile.mkdtemp(prefix="densenet-metrics-", dir=base)
        atexit.register(shutil.rmtree, path, True)
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
    """Entry point of one front-end process (spawned).

    Everything that needs no device (imports, routes, KServe's app and servers) is done while the
    device process still loads; once it listens, the app's start-up connects, sends its warm-up
    requests (``rest.warm_http_path``) and waits for the other front ends; then HTTP and gRPC listen.
    :class:`FrontEnds` puts what that wait shares in ``spec`` (``warm``, ``abort``, ``frontends``);
    a front end started without them (a benchmark harness) waits for none.
    """
    logging.basicConfig(
        level=spec["log_level"], format=f"%(asctime)s %(levelname)s fe{spec['index']} %(name)s: %(message)s"
    )
    import kserve.model_server as kserve_server
    import numpy as np
    from kserve.protocol.grpc import server as kserve_grpc
    from kserve.protocol.rest import server as kserve_rest
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from model_server import rest
    from model_server.predictor import DenseNetPredictor
    from model_server.tuning import freeze_so_far

    class RemotePredictor(DenseNetPredictor):
        """The predictor's request path, with the device in another process."""

        def load(self) -> bool:
            """What needs no device; :meth:`connect` adds the device's side before anything listens."""
            from model_server.artifact import read_labels, read_manifest
            from model_server.ipc import retain_freed_memory

            retain_freed_memory()  # request bodies of ~100 KB each: no page faults per request
            # No torch here (tests/test_frontends.py checks). With it, the slowest of 6 front ends on the
            # H100 host registered at 7.4 s, after the device process was warm (torch's import alone took
            # the device process ~5 s there); without it they register at ~2 s. A front end's memory went
            # from 618 to 144 MB (startup_bench.py, VM), and torch's default intra-op pool (an OpenMP
            # thread per core, spinning after each op) in 6 front ends had kept 13 of the host's 16 cores
            # busy for 90 requests/s of 32 JPEGs (benchmarks/results, batched trace).
            self.manifest = read_manifest(self.artifact_dir, verify=False)  # the device process verifies it
            self.labels = np.array([s.encode() for s in read_labels(self.artifact_dir, self.manifest)], dtype=object)
            # KServe registers only a ready model; nothing listens before connect() and the warm-up.
            self.ready = True
            return True

        async def connect(self) -> None:
            """Wait for the device process to be warm, then take its facts and open the IPC client."""
            from model_server.ipc import DeviceClient

            device = await wait_for_device(spec["ipc_path"], parent=spec["parent_pid"])
            self._gpu_decode = bool(device["gpu_decode"])
            self._max_batch = int(device["max_batch"])
            self.client = DeviceClient(spec["ipc_path"])

        def max_batch(self) -> int:
            return int(self._max_batch)

        async def _infer(self, payload: Payload) -> np.ndarray:
            return await self.client.infer(payload, self.config.request_timeout_s)

        async def profile_control(self, op: dict[str, Any]) -> dict[str, Any]:
            return await self.client.control(op)

    from model_server import metrics

    if not spec["metrics"]:
        metrics.disable()
    metrics.install_toggle_signals()
    model = RemotePredictor(spec["model_name"], Path(spec["model_dir"]), spec["config"])
    model.load()
    _watch_parent(spec["parent_pid"], grace_s=spec["grace_period_s"])
    app = kserve_server.app

    async def merged_metrics(request: Request) -> Response:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    app.add_api_route("/metrics", merged_metrics, methods=["GET"])  # before KServe's own
    sock = _reuseport_socket(spec["http_port"])
    all_warm = asyncio.Event()

    async def start_up() -> None:  # the app's own start-up (the warm-up requests) runs in between
        await model.connect()

    async def started_up() -> None:
        if spec.get("warm") is not None:
            await wait_for_siblings(spec["warm"], spec["abort"], index=spec["index"], frontends=spec["frontends"])
        all_warm.set()

    original_serve = kserve_rest._RefreshingServer.serve

    async def serve_shared(self: Any, sockets: list[socket.socket] | None = None) -> None:
        if not self.config.loaded:
            self.config.load()
        self.config.lifespan_class = _lifespan_around(self.config.lifespan_class, before=start_up, after=started_up)
        publisher = None
        if spec.get("conn_counts") is not None:
            state = self.server_state
            balancer = ConnectionBalancer(spec["conn_counts"], spec["index"], lambda: len(state.connections))
            self.config.loaded_app = BalanceMiddleware(self.config.loaded_app, balancer)
            publisher = asyncio.get_running_loop().create_task(balancer.publish_every(0.1))
        try:
            await original_serve(self, sockets=[sock])  # the HTTP port is shared with the other front ends
        finally:
            if publisher is not None:
                publisher.cancel()

    original_grpc_start = kserve_grpc.GRPCServer.start

    async def grpc_start_when_warm(self: Any, max_workers: int) -> None:
        await all_warm.wait()  # gRPC's readiness and first calls mean what HTTP's do
        await original_grpc_start(self, max_workers)

    kserve_rest._RefreshingServer.serve = serve_shared
    kserve_grpc.GRPCServer.start = grpc_start_when_warm
    freeze_so_far()
    sys.exit(0 if rest.serve_http(model, spec) else 1)


class ConnectionBalancer:
    """Evens out keep-alive connections over the front ends.

    Each front end listens on its own ``SO_REUSEPORT`` socket and the kernel hashes every new
    connection to one of them, so a few long-lived connections (load-test users, Knative's
    queue-proxy) land unevenly: 16 over 2 front ends split 11/5 or 6/10 as often as 8/8, and the
    busiest front end sets the pace and the tail. Every front end publishes how many connections
    it holds in a shared array; one holding more than its share (the ceiling of the mean, plus
    ``slack``) ends one response with ``Connection: close`` (at most one per ``min_interval_s``),
    and the client's next connection is hashed again, most likely elsewhere.
    """

    def __init__(
        self, counts: Any, index: int, connections: Callable[[], int], *, slack: int = 1, min_interval_s: float = 0.05
    ) -> None:
        self.counts = counts
        self.index = index
        self.connections = connections
        self.slack = slack
        self.min_interval_s = min_interval_s
        self.closed = 0
        self._last = float("-inf")

    def should_close(self, now: float) -> bool:
        """Whether the response being started should close its connection (counted when it does)."""
        mine = self.connections()
        self.counts[self.index] = mine
        if now - self._last < self.min_interval_s:
            return False
        total = sum(self.counts)
        n = len(self.counts)
        if total <= n or mine <= -(-total // n) + self.slack:
            return False
        self._last = now
        self.closed += 1
        return True

    async def publish_every(self, seconds: float) -> None:
        """Keep this front end's count fresh while it answers nothing (its connections may have gone)."""
        while True:
            self.counts[self.index] = self.connections()
            await asyncio.sleep(seconds)


class BalanceMiddleware:
    """ASGI wrapper: adds ``Connection: close`` to a response when the :class:`ConnectionBalancer` says so."""

    def __init__(self, app: Any, balancer: ConnectionBalancer) -> None:
        self.app = app
        self.balancer = balancer

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.balancer.should_close(time.monotonic()):
            await self.app(scope, receive, send)
            return

        async def send_closing(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


def _lifespan_around(
    lifespan_class: type[Any], *, before: Callable[[], Awaitable[None]], after: Callable[[], Awaitable[None]]
) -> type[Any]:
    """uvicorn's lifespan with ``before`` run ahead of the app's start-up handlers and ``after`` once
    they succeeded; uvicorn listens only when both are done."""

    class Around(lifespan_class):  # type: ignore[misc]
        async def startup(self) -> None:
            await before()
            await super().startup()
            if not self.should_exit:  # a failed start-up exits at once
                await after()

    return Around


async def wait_for_siblings(warm: Any, abort: Any, *, index: int, frontends: int) -> None:
    """Count this front end as warm, then wait until all ``frontends`` are (or the device process stops them)."""
    # Logged before it counts: once any front end listens, every front end's line is in the log.
    log.info("front end %d warm: its warm-up requests went through its app and the device", index)
    with warm.get_lock():
        warm.value += 1
    t0 = time.perf_counter()
    while warm.value < frontends and not abort.is_set():
        await asyncio.sleep(0.002)
    if warm.value >= frontends:
        log.info("front end %d listening: all %d front ends warm (waited %.3fs for the others)",
                 index, frontends, time.perf_counter() - t0)  # fmt: skip


def _watch_parent(parent: int, *, grace_s: float) -> None:
    """A front end must not outlive its device process (killed, OOM): drain, then exit."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("the device process %d is gone; front end %d stopping", parent, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s + 5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


async def wait_for_device(ipc_path: str, *, parent: int) -> dict[str, Any]:
    """Wait until the device process has loaded and warmed the model (it then creates the socket).

    The device writes ``device.json`` (what front ends must know) before it listens, so the
    socket's existence means both are there. Exits if the device process is gone.
    """
    import json

    while not os.path.exists(ipc_path):
        if os.getppid() != parent:
            log.error("the device process exited before it was ready; front end exiting")
            sys.exit(1)
        await asyncio.sleep(0.005)
    info: dict[str, Any] = json.loads(Path(ipc_path).with_name("device.json").read_text())
    return info


class FrontEnds:
    """Front-end processes, started before the device loads so both start-ups overlap."""

    def __init__(self, n: int, spec: dict[str, Any]) -> None:
        self.dir = tempfile.mkdtemp(prefix="densenet-ipc-")
        self.ipc_path = os.path.join(self.dir, "device.sock")
        ctx = multiprocessing.get_context("spawn")
        #: Front ends done warming up (none listens before all are), and the device's "stop waiting".
        self.warm = ctx.Value("i", 0)
        self.stopping = ctx.Event()
        shared = {"ipc_path": self.ipc_path, "parent_pid": os.getpid(), "frontends": n, "warm": self.warm,
                  "abort": self.stopping}  # fmt: skip
        if spec.get("balance_connections", True) and n > 1:
            #: Connections each front end holds, published by each for the others (ConnectionBalancer).
            shared["conn_counts"] = ctx.Array("i", n, lock=False)
        self.procs = [
            ctx.Process(target=frontend_main, args=({**spec, **shared, "index": i},), name=f"frontend-{i}")
            for i in range(n)
        ]
        # The metrics' pause/resume signals (metrics.PAUSE_SIGNAL, RESUME_SIGNAL; that module is not
        # imported yet, to start the front ends sooner) would kill a process without a handler. Ignored
        # here, they stay ignored in the front ends across exec until each installs its handler, and in
        # this process until the device installs its own (cli._serve_device).
        for sig in TOGGLE_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        for p in self.procs:
            p.start()

    def forward_signal(self, sig: int) -> None:
        """Send ``sig`` on to every front end still running."""
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, sig)

    def abort(self) -> None:
        """The device failed to load: stop the front ends that are waiting for it."""
        self.stopping.set()
        for p in self.procs:
            p.kill()
            p.join(5)
        self._cleanup()

    def _cleanup(self) -> None:
        for name in ("device.sock", "device.json"):
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass

    def serve(
        self, model: LoadedModel, *, grace_period_s: float, event_loop: str = "auto", body_pool_mb: int = 0
    ) -> int:
        """Serve the loaded ``model``'s device side to the front ends until SIGTERM, then drain.

        ``event_loop`` (``--event_loop``) is the loop that reads the front ends' frames and answers
        them; :func:`~model_server.config.install_event_loop` says what each choice means.
        ``body_pool_mb`` (``--ipc_body_pool_mb``): MB of large request bodies' buffers kept for reuse
        (:class:`~model_server.ipc.BodyPool`; 0: a fresh buffer per request), page-locked when
        ``model.pinned_bodies``.
        """
        import json

        from model_server.config import install_event_loop
        from model_server.device import profile_op
        from model_server.ipc import DeviceServer, retain_freed_memory
        from model_server.nvjpeg import pinned_bytes
        from model_server.tuning import settle_after_startup

        retain_freed_memory()  # a payload allocated and freed per request: no page faults per request

        Path(self.dir, "device.json").write_text(
            json.dumps({"gpu_decode": model.gpu_decode, "max_batch": model.max_batch()})
        )
        procs = self.procs

        async def run() -> int:
            device = DeviceServer(
                model.batcher,
                self.ipc_path,
                control=lambda op: profile_op(model.profiler, op),
                body_pool_bytes=body_pool_mb * 2**20,
                body_alloc=pinned_bytes if model.pinned_bodies else None,
                admit=model.admit,
            )
            await device.start()  # creates the socket: the front ends' signal to finish loading
            settle_after_startup()
            log.info("device process %d serving %d front ends on %s", os.getpid(), len(procs), self.ipc_path)
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
            self.stopping.set()  # a front end still waiting for its siblings to warm up stops waiting
            for p in procs:  # front ends stop accepting and finish their requests, which we still serve
                if p.is_alive() and p.pid is not None:
                    os.kill(p.pid, signal.SIGTERM)
            deadline = loop.time() + grace_period_s
            while any(p.is_alive() for p in procs) and loop.time() < deadline:
                await asyncio.sleep(0.05)
            for p in procs:
                if p.is_alive():
                    p.kill()
                    code = 1
            await model.batcher.drain(max(0.0, deadline - loop.time()))
            await device.close()
            return code

        log.info("device process: %s event loop", install_event_loop(event_loop))
        try:
            return asyncio.run(run())
        finally:
            self._cleanup()


__all__ = [
    "BalanceMiddleware",
    "ConnectionBalancer",
    "FrontEnds",
    "enable_multiprocess_metrics",
    "frontend_main",
    "wait_for_device",
    "wait_for_siblings",
]
