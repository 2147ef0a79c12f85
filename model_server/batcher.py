"""In-process dynamic batching: a bounded queue, max batch size and max delay, one device worker.

Requests wait in one queue as opaque payloads of ``n`` images each (tensors, or JPEG bytes
the device worker decodes on the GPU); a single worker coroutine forms batches and hands
them to a single device thread. A batch leaves as soon as the device has a free slot:
while the device is busy, arrivals accumulate into the next batch, so batches grow with
load and a lone request never waits (``max_delay`` adds an optional wait when the device
is idle). Two or more batches may be in flight (``max_inflight_batches``), so forming and
preparing the next ones overlaps running the current one. A full queue refuses new work at
once (:class:`Overloaded`) instead of growing without bound, and a request whose deadline has
passed is dropped before it reaches the device.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from model_server import DeadlineExceeded, Overloaded
from model_server import metrics as m

if TYPE_CHECKING:
    import torch  # results are tensors; the batcher never touches one

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Item:
    payload: Any
    n: int
    future: asyncio.Future[torch.Tensor]
    enqueued: float
    deadline: float | None


class DynamicBatcher:
    """Groups concurrent requests into device batches.

    Args:
        run: the device function: takes the payloads of one batch (or what ``prepare`` made
            of them), returns one result (logits ``[n,...]``) or exception per payload.
        prepare: optional first stage, run on a thread of its own (decoding batch k+1 while
            ``run`` has batch k on the device); a batch with no other in flight runs both stages
            in one call on the device thread, since there is nothing to overlap: ``alone`` when
            given (a cheaper way to do both), else ``run(prepare(payloads))``.
        max_batch_size: most images in one device batch.
        max_delay_s: longest the first request of a batch waits for company.
        max_queue_images: most images waiting; more are refused with :class:`Overloaded`.
        max_inflight_batches: batches between their forming and their answers at once. 2 overlaps
            preparing batch k+1 with running batch k; 3 also lets batch k+2 be formed, and wait for
            the prepare thread, while batch k is still on the device or being answered, so the prepare
            thread goes from one batch straight to the next.
        inline_after_idle_s: when set, a request that finds nothing queued or running and the
            device idle for at least this long runs at once, ``alone``, on the event loop's own
            thread, inside :meth:`submit_nowait`: at low load nothing else needs the loop
            meanwhile, and the request skips the worker's loop turns and two thread hand-offs
            (each a wake-up of a sleeping thread). ``None``: never. Needs ``prepare`` and no
            ``max_delay_s`` (a lone request that should wait for company goes to the queue).
        inline_ok: asked before each such run (the in-pod profiler wants batches on the device thread).
    """

    def __init__(
        self,
        run: Callable[[Any], list[torch.Tensor | Exception]],
        *,
        prepare: Callable[[list[Any]], Any] | None = None,
        alone: Callable[[list[Any]], list[torch.Tensor | Exception]] | None = None,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_images: int,
        max_inflight_batches: int = 2,
        inline_after_idle_s: float | None = None,
        inline_ok: Callable[[], bool] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_images < max_batch_size:
            raise ValueError("need max_batch_size >= 1 and max_queue_images >= max_batch_size")
        if max_inflight_batches < 1:
            raise ValueError(f"max_inflight_batches must be >= 1, got {max_inflight_batches}")
        self.run = run
        self.prepare = prepare
        self.alone = alone
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_images = max_queue_images
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_images = 0
        self._wakeup: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._max_inflight = max_inflight_batches
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._prepare_executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") if prepare else None
        )
        self._worker: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Future[None]] = set()
        self._running = 0  # batches between their hand-off to a stage thread and their results
        self.inline_after_idle_s = inline_after_idle_s
        self.inline_ok = inline_ok
        self._idle_since = time.monotonic()  # when the last batch finished (the device idle since)
        #: Batches run on the event loop's thread (``inline_after_idle_s``), for tests and logs.
        self.inline_batches = 0

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def start(self) -> None:
        """Start the worker on the running event loop (idempotent)."""
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._slots = asyncio.Semaphore(self._max_inflight)
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="batcher")

    async def submit(self, payload: Any, n: int, *, deadline: float | None = None) -> torch.Tensor:
        """Queue a payload of ``n <= max_batch_size`` images and wait for its rows of the output.

        Raises:
            Overloaded: the queue holds ``max_queue_images`` already.
            DeadlineExceeded: ``deadline`` (``time.monotonic()``) passed before the batch ran.
        """
        return await self.submit_nowait(payload, n, deadline=deadline)

    def submit_nowait(self, payload: Any, n: int, *, deadline: float | None = None) -> asyncio.Future[torch.Tensor]:
        """Queue a payload like :meth:`submit`, returning its future instead of awaiting it.

        For callers that answer from the future's done-callback, with no task per request
        (the IPC server). Cancelling the future drops the request before it reaches the device.

        Raises:
            ValueError: ``n`` exceeds ``max_batch_size``.
            Overloaded: the queue holds ``max_queue_images`` already (raised here, not set on the future).
        """
        if n > self.max_batch_size:
            raise ValueError(f"{n} images exceed max_batch_size {self.max_batch_size}")
        if self._queued_images + n > self.max_queue_images:
            m.REJECTED.labels(reason="queue_full").inc()
            raise Overloaded(f"batch queue is full ({self._queued_images} images waiting); retry shortly")
        self.start()
        assert self._wakeup is not None
        fut: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        item = _Item(payload, n, fut, time.monotonic(), deadline)
        if (deadline is None or item.enqueued <= deadline) and self._idle_inline():
            self._run_inline(item)
            return fut
        self._queue.append(item)
        self._queued_images += n  # QUEUE_DEPTH is set once per batch (in _take), not per request
        self._wakeup.set()
        return fut

    async def _work(self) -> None:
        assert self._wakeup is not None and self._slots is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._slots.acquire()
            # Wait for company until the batch is full or the oldest request has waited max_delay.
            oldest = self._queue[0].enqueued
            while self._queued_images < self.max_batch_size:
                remaining = oldest + self.max_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.ensure_future(self._run_batch(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _take(self) -> list[_Item]:
        now = time.monotonic()
        batch: list[_Item] = []
        waits: list[float] = []
        size = 0
        while self._queue and size + self._queue[0].n <= self.max_batch_size:
            item = self._queue.popleft()
            self._queued_images -= item.n
            if item.future.done():  # the client went away
                continue
            if item.deadline is not None and now > item.deadline:
                m.REJECTED.labels(reason="deadline").inc()
                item.future.set_exception(DeadlineExceeded("request dropped: its deadline passed while it was queued"))
                continue
            waits.append(now - item.enqueued)
            batch.append(item)
            size += item.n
        # One metrics write per bucket, not two per request; made once the batch's answers are out (_run_batch).
        m.later_observe_many(m.QUEUE_WAIT_SECONDS, waits)
        m.later(m.QUEUE_DEPTH.set, self._queued_images)
        return batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        assert self._slots is not None
        try:
            m.later_observe(m.BATCH_SIZE, sum(it.n for it in batch))
            loop = asyncio.get_running_loop()
            alone = self._running == 0  # no other batch is being prepared or run
            self._running += 1
            try:
                payloads: Any = [it.payload for it in batch]
                if self.prepare is not None and alone:
                    # Nothing to overlap with: both stages in one hand-off to the device thread, which
                    # saves a round trip through the prepare thread (0.2-0.4 ms at concurrency 1, ipc_bench).
                    results = await loop.run_in_executor(self._executor, self._prepare_and_run, payloads)
                else:
                    if self.prepare is not None:  # stage 1 on its own thread: overlaps the batch on the device
                        payloads = await loop.run_in_executor(self._prepare_executor, self.prepare, payloads)
                    results = await loop.run_in_executor(self._executor, self.run, payloads)
            except Exception as e:  # the device failed this batch: fail its requests, keep serving
                log.exception("batch of %d requests failed on the device", len(batch))
                results = [e] * len(batch)
            finally:
                self._running -= 1
                if not self._running:
                    self._idle_since = time.monotonic()
            self._deliver(batch, results)
        finally:
            self._slots.release()
            # The answers' callbacks (an IPC reply each, or the waiting request's task) were queued on the
            # loop first: the metric writes of the batch (this one's and the device thread's) come after.
            m.flush_soon(asyncio.get_running_loop())

    def _deliver(self, batch: list[_Item], results: list[torch.Tensor | Exception]) -> None:
        served = 0
        for it, res in zip(batch, results, strict=True):
            if it.future.done():
                continue
            if isinstance(res, Exception):
                it.future.set_exception(res)
            else:
                served += it.n
                it.future.set_result(res)
        if served:
            m.later(m.IMAGES.inc, served)  # once per batch: a multiprocess write costs a lock and an mmap store

    def _idle_inline(self) -> bool:
        """Whether a request arriving now runs at once on the loop's thread: nothing queued, formed or
        running, the device idle for ``inline_after_idle_s`` (low load), and ``inline_ok``."""
        return (
            self.inline_after_idle_s is not None
            and self.prepare is not None
            and self.max_delay_s <= 0
            and not self._queue
            and not self._inflight
            and self._running == 0
            and time.monotonic() - self._idle_since >= self.inline_after_idle_s
            and (self.inline_ok is None or self.inline_ok())
        )

    def _run_inline(self, item: _Item) -> None:
        """Run one request's batch on this (the loop's) thread and answer it; the loop waits meanwhile."""
        m.later_observe(m.QUEUE_WAIT_SECONDS, 0.0)
        m.later_observe(m.BATCH_SIZE, item.n)
        self.inline_batches += 1
        # No _running count: nothing that reads it can run while this call holds the loop's thread.
        try:
            results = self._prepare_and_run([item.payload])
        except Exception as e:  # the device failed this batch: fail its request, keep serving
            log.exception("a batch of 1 request failed on the device")
            results = [e]
        self._idle_since = time.monotonic()
        self._deliver([item], results)
        m.flush_soon(asyncio.get_running_loop())  # after the answer is written

    def _prepare_and_run(self, payloads: list[Any]) -> list[torch.Tensor | Exception]:
        if self.alone is not None:
            return self.alone(payloads)
        assert self.prepare is not None
        return self.run(self.prepare(payloads))

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every accepted request has been answered (for a graceful shutdown)."""
        end = time.monotonic() + timeout_s
        while (self._queue or self._inflight) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return not (self._queue or self._inflight)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._prepare_executor is not None:
            self._prepare_executor.shutdown(wait=False, cancel_futures=True)
