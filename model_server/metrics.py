"""Prometheus metrics of the predictor (served on KServe's ``/metrics``) and the NVML/psutil sampler."""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

log = logging.getLogger(__name__)

# Sub-millisecond resolution at the low end: a batch of 1 on an H100 takes about 1 ms.
_SECONDS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUEST_SECONDS = Histogram(
    "densenet_request_seconds",
    "Time inside the predictor, request parsed to response built",
    ["protocol"],
    buckets=_SECONDS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "densenet_queue_wait_seconds", "Time a request waits in the batch queue before its batch starts", buckets=_SECONDS
)
PREPROCESS_SECONDS = Histogram(
    "densenet_preprocess_seconds", "Decode, resize and crop of one request's images", buckets=_SECONDS
)
H2D_SECONDS = Histogram(
    "densenet_h2d_seconds", "Host-to-device copy of one batch's host tensors (CUDA events)", buckets=_SECONDS
)
GPU_DECODE_SECONDS = Histogram(
    "densenet_gpu_decode_seconds", "nvJPEG decode, resize and crop of one batch's JPEGs on the GPU", buckets=_SECONDS
)
NVJPEG_HEADERS_SECONDS = Histogram(
    "densenet_nvjpeg_headers_seconds",
    "Part of densenet_gpu_decode_seconds: nvJPEG's hardware decoder reading one batch's JPEG headers (host)",
    buckets=_SECONDS,
)
NVJPEG_EARLY_HEADERS_SECONDS = Histogram(
    "densenet_nvjpeg_early_headers_seconds",
    "nvJPEG reading one request's JPEG headers as it reaches the device process (--nvjpeg_early_headers)",
    buckets=_SECONDS,
)
NVJPEG_DECODE_SECONDS = Histogram(
    "densenet_nvjpeg_decode_seconds",
    "Part of densenet_gpu_decode_seconds: nvJPEG's batched hardware decode call of one batch, returned",
    buckets=_SECONDS,
)
DEVICE_SECONDS = Histogram(
    "densenet_device_seconds", "Model compute of one batch, device synchronised", buckets=_SECONDS
)
BATCH_SIZE = Histogram("densenet_batch_size", "Images per device batch", buckets=_BATCH)
IMAGES = Counter("densenet_images_total", "Images classified")
REJECTED = Counter("densenet_requests_rejected_total", "Requests refused", ["reason"])
QUEUE_DEPTH = Gauge("densenet_queue_images", "Images waiting in the batch queue")
GPU_MEMORY = Gauge("densenet_gpu_memory_used_bytes", "GPU memory used on the serving device (NVML)")
GPU_UTIL = Gauge("densenet_gpu_utilization_ratio", "GPU utilisation over the last sample (NVML), 0..1")
RSS = Gauge("densenet_process_rss_bytes", "Resident memory of the predictor process")
CPU = Gauge("densenet_process_cpu_ratio", "CPU use of the predictor process, in cores")


def observe_many(histogram: Histogram | _Off, values: list[float]) -> None:
    """Observe several values with one write per touched bucket, as ``observe`` on each would.

    In multiprocess mode (``--frontends N``) every ``observe`` takes a lock and writes two
    doubles to an mmap file: about 5 us, which the batch loop would pay per request. Here a
    batch's queue waits cost one sum write plus one write per distinct bucket. Reads the
    histogram's own bounds and values (prometheus_client's ``_upper_bounds``/``_buckets``/
    ``_sum``, stable since 0.4); a histogram without them gets one ``observe`` per value.
    """
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for v in values:
            histogram.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bisect.bisect_left(bounds, v)  # the first bound >= v, as observe() picks
        counts[i] = counts.get(i, 0) + 1
    total.inc(sum(values))
    for i, k in counts.items():
        buckets[i].inc(k)


#: Histogram values queued by :func:`later_observe` until :func:`flush`, by (histogram, label values):
#: a flush writes each histogram once (:func:`observe_many`), however many requests it ended.
_OBSERVED: dict[tuple[Any, tuple[str, ...]], list[float]] = {}
_OBSERVED_LOCK = threading.Lock()
#: A histogram's values are written at once when this many are queued (a caller that never flushes).
_OBSERVED_MAX = 4096


def later_observe(histogram: Histogram | _Off, value: float, *label_values: str) -> None:
    """Queue ``histogram.observe(value)`` (of its child ``labels(*label_values)`` if given) for :func:`flush`.

    The front ends answer requests in bursts (a batch's answers arrive together) and a flush after
    the burst writes each histogram's values in one :func:`observe_many`: one sum write and one per
    touched bucket, where an ``observe`` per request made two multiprocess writes each (a lock and an
    mmap store apiece). Before, the request-path metrics cost +3.4 % of the throughput of 128 users on
    one H100 host; after, −0.6 % on another (session 24). A value queued while metrics are paused is
    dropped. Safe from any thread.
    """
    later_observe_many(histogram, (value,), *label_values)


def later_observe_many(histogram: Histogram | _Off, values: Sequence[float], *label_values: str) -> None:
    """:func:`later_observe` for several values of one histogram (child)."""
    if histogram is _OFF or not values:
        return
    key = (histogram, label_values)
    with _OBSERVED_LOCK:
        queued = _OBSERVED.setdefault(key, [])
        queued.extend(values)
        if len(queued) < _OBSERVED_MAX:
            return
        del _OBSERVED[key]
    _write_observed(key, queued)


def _write_observed(key: tuple[Any, tuple[str, ...]], values: list[float]) -> None:
    histogram, label_values = key
    observe_many(histogram.labels(*label_values) if label_values else histogram, values)


#: Metric writes queued by :func:`later` until :func:`flush`. Bounded: a caller that never flushes
#: (a benchmark driving the pipeline directly) loses old writes instead of growing without end.
_PENDING: collections.deque[tuple[Callable[..., Any], tuple[Any, ...]]] = collections.deque(maxlen=65536)


def later(write: Callable[..., Any], *args: Any) -> None:
    """Queue a metric write, e.g. ``later(m.DEVICE_SECONDS.observe, seconds)``, for :func:`flush`.

    The request path queues its writes and the event loop flushes them once the answers are on
    their way: with ``--frontends N`` each write takes a lock and stores into an mmap file, and a
    lone request's dozen writes had cost it 4.5 % of its latency on the H100 host (serve_bench's
    metrics-toggle phase at concurrency 1). The metric is bound when queued, so a write queued
    while metrics are paused stays a no-op. Safe from any thread (``deque.append``).
    """
    _PENDING.append((write, args))


def flush() -> None:
    """Make every queued write: the histograms' values (:func:`later_observe`), one write per histogram
    and touched bucket, then the other writes (:func:`later`) in the order queued."""
    global _OBSERVED, _flush_on
    _flush_on = None
    if _OBSERVED:
        with _OBSERVED_LOCK:
            observed, _OBSERVED = _OBSERVED, {}
        for key, values in observed.items():
            _write_observed(key, values)
    while _PENDING:
        try:
            write, args = _PENDING.popleft()
        except IndexError:  # another thread flushed the last one
            return
        write(*args)


_flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is scheduled on, until it runs


def flush_soon(loop: asyncio.AbstractEventLoop) -> None:
    """Schedule one :func:`flush` on ``loop`` (its thread only) two loop turns from now: after the
    callbacks already queued and after those they queue in turn. An answer is written that late:
    a future's result reaches its callback one turn after ``set_result`` (the device process's
    IPC answer), and that callback queues the write for the turn after (one write per burst). A flush
    one turn away ran before the write and added its locked shared-memory stores to every lone
    request: the metrics' p50 cost at concurrency 1 went from +2.7..+2.9 % to +0.9 % on the H100
    hosts (serve_bench's metrics-toggle, session 25; ``ipc`` also answers an inline request at once).
    A flush already scheduled on ``loop`` is not scheduled again."""
    global _flush_on
    if _flush_on is not loop:
        _flush_on = loop
        loop.call_soon(loop.call_soon, flush)


class ResourceSampler:
    """Samples RSS/CPU (psutil) and GPU memory/utilisation (NVML) every ``interval_s`` in a daemon thread."""

    def __init__(self, interval_s: float = 2.0, gpu_index: int | None = None) -> None:
        self.interval_s = interval_s
        self.gpu_index = gpu_index
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        import psutil

        proc = psutil.Process(os.getpid())
        proc.cpu_percent(None)
        handle = None
        if self.gpu_index is not None:
            try:
                import pynvml

                pynvml.nvmlInit()
                handle = pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
            except Exception as e:  # NVML missing or no permission: keep the CPU gauges
                log.warning("NVML unavailable, GPU gauges stay empty: %s", e)
        while not self._stop.wait(self.interval_s):
            RSS.set(proc.memory_info().rss)
            CPU.set(proc.cpu_percent(None) / 100.0)
            if handle is not None:
                import pynvml

                GPU_MEMORY.set(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
                GPU_UTIL.set(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)


class _Off:
    """Stands in for every metric when metrics are off (``--metrics false``), to measure their cost."""

    def labels(self, *args: object, **kwargs: object) -> _Off:
        return self

    def observe(self, value: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass


#: The metrics written on the request path; ``--metrics false`` and the toggle signals replace them by no-ops.
REQUEST_PATH = (
    "REQUEST_SECONDS", "QUEUE_WAIT_SECONDS", "PREPROCESS_SECONDS", "H2D_SECONDS", "GPU_DECODE_SECONDS",
    "NVJPEG_HEADERS_SECONDS", "NVJPEG_EARLY_HEADERS_SECONDS", "NVJPEG_DECODE_SECONDS", "DEVICE_SECONDS",
    "BATCH_SIZE", "IMAGES", "REJECTED", "QUEUE_DEPTH",
)  # fmt: skip
#: ``kill -USR1 <server pid>`` pauses the request-path metrics, ``kill -USR2`` resumes them, in every
#: process of the server (the device process forwards both to its front ends). For measuring what
#: the metrics cost inside one running server, and for pausing them without a restart.
PAUSE_SIGNAL, RESUME_SIGNAL = signal.SIGUSR1, signal.SIGUSR2
_LIVE: dict[str, object] = {}  # the real metrics, filled on the first switch
_OFF = _Off()


def set_enabled(on: bool) -> None:
    """Point the request-path metrics at the real ones (``on``) or at no-ops. Callers read
    ``metrics.NAME`` at each use, so the switch takes effect at their next write."""
    g = globals()
    if not _LIVE:
        _LIVE.update({name: g[name] for name in REQUEST_PATH})
    for name in REQUEST_PATH:
        g[name] = _LIVE[name] if on else _OFF


def enabled() -> bool:
    """Whether the request-path metrics record (they do unless switched off)."""
    return globals()["REQUEST_SECONDS"] is not _OFF


def disable() -> None:
    """Replace the request-path metrics with no-ops (``--metrics false``, the overhead benchmark's control arm)."""
    set_enabled(False)


def install_toggle_signals(forward: Callable[[int], None] | None = None) -> None:
    """Switch the request-path metrics off on :data:`PAUSE_SIGNAL` and on on :data:`RESUME_SIGNAL`
    (main thread only). ``forward`` passes each signal on (the device process to its front ends)."""

    def on_signal(sig: int, frame: FrameType | None) -> None:
        set_enabled(sig == RESUME_SIGNAL)
        log.info("request-path metrics %s (%s)", "on" if sig == RESUME_SIGNAL else "paused", signal.Signals(sig).name)
        if forward is not None:
            forward(sig)

    for sig in (PAUSE_SIGNAL, RESUME_SIGNAL):
        signal.signal(sig, on_signal)
