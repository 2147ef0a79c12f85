"""Process lifecycle: admission of HTTP requests, draining on SIGTERM, and the KServe server that drains.

Knative scales a revision down by sending SIGTERM to its pods (after its queue-proxy has
stopped routing to them), so a predictor must stop taking work, finish every request it
has accepted, and exit within the pod's grace period. KServe 0.21 does not do that by
itself: uvicorn catches SIGTERM and drains HTTP, but KServe then unloads the model while
gRPC calls may still be running, and its ``DataPlane.get_model`` *reloads* a model whose
``ready`` flag is false, so flipping ``ready`` to refuse work would reload the model
inside the event loop. :class:`DrainingModelServer` owns the signals instead and drains
in order:

1. :class:`ServingState` switches to *draining*: the HTTP gate (``rest.GateMiddleware``)
   answers readiness probes and new requests with 503, liveness keeps answering 200;
2. gRPC stops taking new calls and lets the running ones finish (grpc's ``stop(grace)``); an
   inference call that still reaches the predictor is refused there with UNAVAILABLE (the
   predictor counts gRPC calls in :class:`ServingState` too);
3. the HTTP and gRPC requests in flight and the batch queue are waited for;
4. uvicorn is told to exit, then the model is stopped. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import time
from typing import Any

import kserve
from grpc_interceptor import exceptions as grpc_exc
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

# Shared with the device process of --frontends N, which imports neither KServe nor this module.
from model_server.tuning import settle_after_startup as settle_after_startup

log = logging.getLogger(__name__)


class ServingState:
    """What the HTTP gate, the predictor's gRPC path and the shutdown share: requests in flight and
    whether the process drains.

    Args:
        max_inflight: most HTTP requests handled at once (bodies held in memory, images
            decoding or queued); more are refused with 503 before their body is read.
    """

    def __init__(self, *, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.max_inflight = max_inflight
        self.inflight = 0
        self.draining = False
        self.drain_started: float | None = None

    def try_enter(self) -> bool:
        """Admit one request unless the process drains or ``max_inflight`` are being handled."""
        if self.draining or self.inflight >= self.max_inflight:
            return False
        self.inflight += 1
        return True

    def enter(self) -> None:
        """Count a request that is not subject to admission (admin, metadata) so draining waits for it."""
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1

    def begin_drain(self) -> None:
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()

    async def wait_idle(self, deadline: float) -> bool:
        """Wait until no request is in flight or ``deadline`` (``time.monotonic()``) passes."""
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.inflight == 0


class RepositoryDisabled(grpc_exc.PermissionDenied):
    """Load/unload through the model repository extension: refused (HTTP 403, gRPC PERMISSION_DENIED)."""

    def __init__(self, model_name: str) -> None:
        super().__init__(
            f"model repository load/unload of {model_name!r} is disabled: this predictor serves one "
            "artifact baked into its image; deploy a new revision instead"
        )
        self.args = (self.details,)  # BaseException keeps the constructor's arguments otherwise


class SealedRepositoryExtension(ModelRepositoryExtension):  # type: ignore[misc]
    """KServe's repository extension without load/unload.

    KServe exposes ``POST /v2/repository/models/<name>/unload`` (and the gRPC
    ``RepositoryModelUnload``) to anyone who can reach the port: one anonymous call takes the
    model out of service while the readiness probe still says ready. The index stays readable.
    """

    async def load(self, model_name: str) -> None:
        raise RepositoryDisabled(model_name)

    async def unload(self, model_name: str) -> None:
        raise RepositoryDisabled(model_name)


class DrainingModelServer(kserve.ModelServer):  # type: ignore[misc]
    """``kserve.ModelServer`` that drains on SIGTERM/SIGINT (see the module docstring).

    Args:
        model: the served model; its ``batcher`` (if any) is drained and ``stop()`` is called at exit.
        state: shared with the HTTP gate.
        grace_period_s: the longest the drain may take; requests still running then are cancelled.
        **kwargs: passed to ``kserve.ModelServer``.
    """

    def __init__(self, *, model: Any, state: ServingState, grace_period_s: float, **kwargs: Any) -> None:
        super().__init__(grace_period=max(1, math.ceil(grace_period_s)), **kwargs)
        self.model_repository_extension = SealedRepositoryExtension(model_registry=self.registered_models)
        self.model = model
        self.state = state
        self.grace_period_s = grace_period_s
        #: False when the grace period ran out with work unfinished (or a second signal cut it short).
        self.clean_exit = True
        self._signals = 0
        self._drain_task: asyncio.Task[None] | None = None

    def register_signal_handler(self) -> None:
        # Called by ``start`` just before ``asyncio.run``. uvicorn would install its own SIGTERM
        # handler inside ``serve`` (and later re-raise the signal into KServe's, which unloads the
        # model under running gRPC calls): keep the signals ours. Handlers go on in ``_serve``.
        if self._rest_server is not None:
            self._rest_server._server.capture_signals = contextlib.nullcontext

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await asyncio.gather(*self.servers)
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(sig), name="drain")
            return
        log.warning(
            "%s again: exiting without waiting for %d request(s)", signal.Signals(sig).name, self.state.inflight
        )
        self.clean_exit = False
        if self._drain_task is not None:
            self._drain_task.cancel()
        self._exit_now(force=True)

    async def _drain(self, sig: int) -> None:
        t0 = time.monotonic()
        deadline = t0 + self.grace_period_s
        self.state.begin_drain()
        log.warning(
            "%s: draining (not ready, new requests refused); %d request(s) in flight, grace %.0fs",
            signal.Signals(sig).name, self.state.inflight, self.grace_period_s,
        )  # fmt: skip
        grpc_done = asyncio.ensure_future(self._stop_grpc(deadline))
        http_idle = await self.state.wait_idle(deadline)
        batcher = getattr(self.model, "batcher", None)
        queue_empty = True
        if batcher is not None:
            queue_empty = await batcher.drain(max(0.0, deadline - time.monotonic()))
        await grpc_done
        self.clean_exit = http_idle and queue_empty and time.monotonic() <= deadline + 0.5
        if self.clean_exit:
            log.info("drained in %.2fs; exiting", time.monotonic() - t0)
        else:
            log.error(
                "grace period of %.0fs ran out: %d request(s) still in flight, queue empty: %s",
                self.grace_period_s, self.state.inflight, queue_empty,
            )  # fmt: skip
        self._exit_now(force=not self.clean_exit)

    async def _stop_grpc(self, deadline: float) -> None:
        server = getattr(self._grpc_server, "_server", None)
        if server is not None:
            # Refuses new calls at once (UNAVAILABLE) and waits for the running ones.
            await server.stop(grace=max(0.0, deadline - time.monotonic()))

    def _exit_now(self, *, force: bool) -> None:
        if self._rest_server is not None:
            uvicorn_server = self._rest_server._server
            uvicorn_server.should_exit = True
            uvicorn_server.force_exit = force
        server = getattr(self._grpc_server, "_server", None)
        if force and server is not None:
            asyncio.get_running_loop().create_task(server.stop(grace=None))
