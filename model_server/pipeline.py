"""Device-side batch assembly: what the single device worker does with a batch of requests.

A request reaches the batcher either as a uint8 or float tensor ``[n,3,224,224]``
(decoded on the CPU, or sent as a tensor) or as a list of JPEG bytes to decode on the
GPU. For each batch the device worker decodes every JPEG of every request in one nvJPEG
call (about 0.1 ms per VGA JPEG at batch 128 on an H100, against 8 ms with PIL on one
CPU core), resizes and crops on the GPU (one interpolation per distinct image size),
stages host tensors through pinned memory, runs the model once, and splits the logits
back per request. A JPEG nvJPEG refuses fails only its own request. Decoding batch k+1
(its own CUDA stream and thread) overlaps running batch k. A batch with nothing to overlap
(the device idle: every request at low load) runs both stages in one call on the model's
stream, and a lone JPEG is cropped straight into the runner's pixel buffer by a CUDA graph
per image size (:meth:`DevicePipeline.__call__`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch

from model_server import BadInput
from model_server import metrics as m
from model_server.config import CROP_KERNELS, DECODE_STREAM_PRIORITIES, JPEG_DECODERS, MODEL_STREAMS
from model_server.crop_kernel import resolve as resolve_crop_kernel
from model_server.images import JpegBatch, Payload
from model_server.nvjpeg import Headers, hardware_decoder
from model_server.preprocess import (
    SizeGroup,
    decode_jpeg_groups,
    normalize,
    resize_crop_groups,
    resize_crop_pixels,
    warm_gpu_decoder,
    warm_up_jpeg,
)
from model_server.profiler import ProfileCapture
from model_server.runtimes import Runner

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Staged:
    """One batch after :meth:`DevicePipeline.prepare`: decoded parts, failures, and when they are ready."""

    n: int
    parts: dict[int, torch.Tensor]
    failed: dict[int, Exception]
    ready: torch.cuda.Event | None = None
    whole: torch.Tensor | None = None  # every payload was JPEG: the batch in order, one tensor


#: Image sizes whose crop graphs are kept (least recently used dropped), and the largest image that gets one
#: (1080p; a graph keeps its float copy of the image, 12 bytes a pixel, in a pool the graphs share).
CROP_GRAPHS = 8
CROP_GRAPH_MAX_PIXELS = 1920 * 1080


@dataclasses.dataclass
class CropGraph:
    """A CUDA graph resizing and cropping ``source`` (one decoded image of its size) into pixel rows."""

    graph: torch.cuda.CUDAGraph
    source: torch.Tensor


_R = TypeVar("_R")


def _undecodable(e: RuntimeError) -> BadInput:
    """What a request whose JPEG nvJPEG refused gets (it fails alone)."""
    return BadInput(f"JPEG could not be decoded: {e}")


class DevicePipeline:
    """Turns a list of request payloads into one model batch and back into per-request logits.

    Two stages, so the server can run them on two threads: :meth:`prepare` decodes and crops the
    JPEGs of batch k+1 on a CUDA stream of its own while :meth:`execute` runs batch k on the
    device's stream; an event orders the two. Calling the pipeline runs both in turn. Several
    threads may prepare at once (``decode_bench.py --threads``; the server prepares on one): each has
    a side stream of its own.
    """

    def __init__(
        self,
        runner: Runner,
        profiler: ProfileCapture | None = None,
        *,
        model_stream: str = "side",
        decode_batch: int = 0,
        jpeg_decoder: str = "nvjpeg",
        decode_priority: str = "high",
        early_headers: bool = True,
        crop_kernel: str = "auto",
    ) -> None:
        if model_stream not in MODEL_STREAMS:
            raise ValueError(f"model_stream must be one of {', '.join(MODEL_STREAMS)}, got {model_stream!r}")
        if decode_batch < 0:
            raise ValueError(f"decode_batch must be >= 0, got {decode_batch}")
        if jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"jpeg_decoder must be one of {', '.join(JPEG_DECODERS)}, got {jpeg_decoder!r}")
        if decode_priority not in DECODE_STREAM_PRIORITIES:
            raise ValueError(f"decode_priority must be one of {', '.join(DECODE_STREAM_PRIORITIES)}, "
                             f"got {decode_priority!r}")  # fmt: skip
        if crop_kernel not in CROP_KERNELS:
            raise ValueError(f"crop_kernel must be one of {', '.join(CROP_KERNELS)}, got {crop_kernel!r}")
        #: "torch" or "triton": what ``crop_kernel`` ("auto" included) resolves to on this device.
        self.crop_kernel = resolve_crop_kernel(crop_kernel, runner.device)
        self.decode_batch = decode_batch
        self.decode_priority = decode_priority
        #: Whether :meth:`read_headers` reads a request's JPEG headers when it arrives (the hardware
        #: decoder's, on a CUDA device with ``jpeg_decoder="nvjpeg"`` and one call per batch).
        self.early_headers = early_headers and jpeg_decoder == "nvjpeg" and decode_batch == 0
        self.jpeg_decoder = jpeg_decoder
        self.runner = runner
        self.device = runner.device
        self.profiler = profiler
        self._pinned: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        cuda = self.device.type == "cuda"
        self._cuda = cuda
        self._streams = threading.local()  # each preparing thread's side stream
        # "side": batches run on a non-blocking stream of their own instead of the legacy default
        # stream, which every synchronous copy or allocation elsewhere in the process waits for.
        self._model_stream = torch.cuda.Stream(self.device) if cuda and model_stream == "side" else None  # type: ignore[no-untyped-call]
        self._crop_graphs: collections.OrderedDict[tuple[int, int], CropGraph] = collections.OrderedDict()
        self._sizes_seen: dict[tuple[int, int], int] = {}
        self._crop_failed: set[tuple[int, int]] = set()
        self._crop_pool = torch.cuda.graph_pool_handle() if cuda else None

    def __call__(self, payloads: list[Payload]) -> list[torch.Tensor | Exception]:
        """Both stages in one call, for a batch with nothing to overlap (the device idle before it).

        The decode and crop run on the model's stream itself: no side stream to enter, no event to
        record and wait for, no stream to record the crops on. At batch 1 on the H100 host each such
        Python-side CUDA call cost tens of microseconds on the request's critical path.
        """
        if self._model_stream is None:
            return self.execute(self.prepare(payloads))
        with torch.cuda.stream(self._model_stream):
            lone = payloads[0] if len(payloads) == 1 else None
            rows = self.runner.pixel_rows(1) if isinstance(lone, JpegBatch) and len(lone) == 1 else None
            if isinstance(lone, JpegBatch) and rows is not None:
                return self._profiled(lambda: self._lone_jpeg(lone, rows))
            staged = self.prepare(payloads, side_stream=False)
            return self._profiled(lambda: self._execute(staged))

    def _lone_jpeg(self, batch: JpegBatch, rows: torch.Tensor) -> list[torch.Tensor | Exception]:
        """One JPEG with the device idle (a lone request at low load): decoded, cropped straight into the
        runner's pixel ``rows`` (a CUDA graph per image size once the size has been seen twice) and run
        through the runner's input and model graphs."""
        t0 = time.perf_counter()
        try:
            ((_, pixels),) = self._decode_groups(batch.encoded, batch.frames, batch.headers)
        except RuntimeError as e:
            return [_undecodable(e)]
        image = pixels[0]
        graph = self._crop_graph(image, rows)
        if graph is None:
            rows.copy_(resize_crop_pixels(image.unsqueeze(0)))
        else:
            graph.source.copy_(image)
            graph.graph.replay()
        t1 = time.perf_counter()
        m.later_observe(m.GPU_DECODE_SECONDS, t1 - t0)
        logits = self.runner.run_filled(1)
        m.later_observe(m.DEVICE_SECONDS, time.perf_counter() - t1)
        return [logits]

    def _crop_graph(self, image: torch.Tensor, rows: torch.Tensor) -> CropGraph | None:
        """The crop graph of ``image``'s size: captured the second time a size comes (a size seen once
        is not worth it), kept for the :data:`CROP_GRAPHS` sizes used last, for images of at most
        :data:`CROP_GRAPH_MAX_PIXELS`. Replayed, it is 2 calls on the device thread instead of 6."""
        key = (int(image.shape[1]), int(image.shape[2]))
        found = self._crop_graphs.get(key)
        if found is not None:
            self._crop_graphs.move_to_end(key)
            return found
        if key[0] * key[1] > CROP_GRAPH_MAX_PIXELS or key in self._crop_failed:
            return None
        if len(self._sizes_seen) >= 4 * CROP_GRAPHS:
            self._sizes_seen.clear()
        self._sizes_seen[key] = self._sizes_seen.get(key, 0) + 1
        if self._sizes_seen[key] < 2:
            return None
        captured = self._capture_crop(image, rows)
        if isinstance(captured, RuntimeError):
            log.warning("crop graph capture failed for %dx%d images (%s); cropping them eagerly", *key, captured)
            self._crop_failed.add(key)
            return None
        self._crop_graphs[key] = captured
        if len(self._crop_graphs) > CROP_GRAPHS:
            self._crop_graphs.popitem(last=False)
        return captured

    def _capture_crop(self, image: torch.Tensor, rows: torch.Tensor) -> CropGraph | RuntimeError:
        # The graph API's own context synchronises the device, collects garbage and empties the cache,
        # a pause in a serving process: capture with the lower-level calls on a side stream instead.
        # Thread-local mode: the prepare thread may be decoding the next batch meanwhile.
        source = image.clone()
        current = torch.cuda.current_stream(self.device)
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=self._crop_pool, capture_error_mode="thread_local")
                try:
                    rows.copy_(resize_crop_pixels(source.unsqueeze(0)))
                finally:
                    graph.capture_end()
        except RuntimeError as e:
            stream.synchronize()
            return e
        current.wait_stream(stream)
        return CropGraph(graph, source)

    def prepare(self, payloads: list[Payload], *, side_stream: bool = True) -> Staged:
        """Decode every JPEG of the batch in one nvJPEG call and resize/crop them (on a side stream
        unless ``side_stream`` is false: then on the current stream, with nothing to wait for)."""
        staged = Staged(len(payloads), {}, {})
        jpeg_idx = [i for i, p in enumerate(payloads) if isinstance(p, JpegBatch)]
        for i, p in enumerate(payloads):
            if isinstance(p, torch.Tensor):
                staged.parts[i] = p
        if not jpeg_idx:
            return staged
        t0 = time.perf_counter()
        if not self._cuda or not side_stream:
            self._decode(staged, payloads, jpeg_idx)
        else:
            stream = self._side_stream()
            with torch.cuda.stream(stream):
                self._decode(staged, payloads, jpeg_idx)
            staged.ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            staged.ready.record(stream)
        m.later_observe(m.GPU_DECODE_SECONDS, time.perf_counter() - t0)
        return staged

    def _side_stream(self) -> torch.cuda.Stream:
        """The calling thread's side stream (made on its first batch): two threads preparing at once
        on one stream would each wait for the other's work queued there."""
        stream: torch.cuda.Stream | None = getattr(self._streams, "stream", None)
        if stream is None:
            # torch maps a priority beyond the GPU's range to its nearest: -1000 is the highest there is.
            priority = -1000 if self.decode_priority == "high" else 0
            stream = torch.cuda.Stream(self.device, priority=priority)  # type: ignore[no-untyped-call]
            self._streams.stream = stream
        return stream

    def execute(self, staged: Staged) -> list[torch.Tensor | Exception]:
        """Run a prepared batch on the device; one result (logits ``[n,1000]``) or exception per payload."""
        if self._model_stream is not None:
            with torch.cuda.stream(self._model_stream):
                return self._profiled(lambda: self._execute(staged))
        return self._profiled(lambda: self._execute(staged))

    def _profiled(self, run: Callable[[], _R]) -> _R:
        """``run()``, inside the in-pod profiler's window when a capture is pending or running."""
        if self.profiler is None:
            return run()
        self.profiler.before_batch()
        try:
            return run()
        finally:
            self.profiler.after_batch()

    def _execute(self, staged: Staged) -> list[torch.Tensor | Exception]:
        results: list[torch.Tensor | Exception] = [RuntimeError("no result")] * staged.n
        for i, e in staged.failed.items():
            results[i] = e
        parts = staged.parts
        order = sorted(parts)
        if not order:
            return results
        if staged.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.ready)
            # Made on the side stream, used (and freed) on this one. Views of one crop tensor share its
            # storage: when every payload was JPEG, recording the whole batch covers them all.
            for t in [staged.whole] if staged.whole is not None else parts.values():
                if t.device.type == "cuda":
                    t.record_stream(current)
        # Host-to-device timing only where something crosses (a batch of GPU-decoded JPEGs has nothing
        # to copy) and metrics record: each event pair is four more calls on the device thread's path.
        h2d: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        if self.device.type == "cuda" and m.enabled() and any(t.device.type == "cpu" for t in parts.values()):
            h2d = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))  # type: ignore[no-untyped-call]
            h2d[0].record()
        batch = staged.whole if staged.whole is not None else self._gather([parts[i] for i in order])
        if h2d is not None:
            h2d[1].record()
        t0 = time.perf_counter()
        logits = self.runner(batch)  # returns host logits: the device is done, the events too
        m.later_observe(m.DEVICE_SECONDS, time.perf_counter() - t0)
        if h2d is not None:
            m.later_observe(m.H2D_SECONDS, h2d[0].elapsed_time(h2d[1]) / 1000.0)
        start = 0
        for i in order:
            n = parts[i].shape[0]
            results[i] = logits[start : start + n]
            start += n
        return results

    def read_headers(self, payload: Payload) -> None:
        """For a request that has just reached the device process (``--nvjpeg_early_headers``): read its
        JPEGs' headers with nvJPEG now, on the caller's thread (the device process's event loop), so the
        decode stage, busy in the batched call of the batch before, does not read them on its own thread
        (:attr:`JpegBatch.headers`). Only a JpegBatch whose images lie in one buffer (what the IPC frame
        delivered) of two or more: a lone JPEG's header read is on its request's path wherever it runs
        (about 10 us). Anything else, or a header nvJPEG cannot read, is left to the decode stage. Never raises.
        """
        if not self.early_headers or not isinstance(payload, JpegBatch) or payload.buffer is None or len(payload) < 2:
            return
        hardware = hardware_decoder(self.device)
        if hardware is None:
            return
        t0 = time.perf_counter()
        try:
            base = np.frombuffer(payload.buffer, dtype=np.uint8).ctypes.data
            lengths = np.fromiter(map(len, payload.images), dtype=np.uint64, count=len(payload.images))
            offsets = np.zeros(len(lengths), dtype=np.uint64)
            np.cumsum(lengths[:-1], out=offsets[1:])
            ptrs = offsets + np.uint64(base)
            info = hardware.read_headers(ptrs, lengths)
        except Exception:  # the decode stage reads them itself, and reports any error
            log.debug("early JPEG header read failed", exc_info=True)
            return
        if info is not None:
            payload.headers = Headers(ptrs, lengths, info)
        m.later_observe(m.NVJPEG_EARLY_HEADERS_SECONDS, time.perf_counter() - t0)

    def _decode(self, staged: Staged, payloads: list[Payload], jpeg_idx: list[int]) -> None:
        """All JPEGs of all requests: one batched decode, one resize per distinct image size."""
        batches = [p for p in (payloads[i] for i in jpeg_idx) if isinstance(p, JpegBatch)]
        counts = [len(b) for b in batches]
        made: list[torch.Tensor] = []

        def encoded() -> list[torch.Tensor]:  # tensors of the JPEGs, made only when a decoder needs them
            if not made:
                made.extend(t for b in batches for t in b.encoded())
            return made

        frames = b"".join(b.frames if b.frames is not None else bytes(len(b)) for b in batches)
        read = [b.headers for b in batches]
        headers = Headers.join([h for h in read if h is not None]) if all(h is not None for h in read) else None
        total = sum(counts)
        try:
            groups = self._decode_groups(encoded, frames, headers)
        except RuntimeError:
            groups = None  # one bad stream fails the batched call: retry each request alone
        if groups is not None:
            crops = resize_crop_groups(groups, total, self.crop_kernel)
            for i, part in zip(jpeg_idx, torch.split(crops, counts), strict=True):
                staged.parts[i] = part
            if len(jpeg_idx) == staged.n:
                staged.whole = crops
            return
        start = 0
        for i, b, n in zip(jpeg_idx, batches, counts, strict=True):
            try:
                mine = encoded()[start : start + n]
                groups = self._decode_groups(lambda: mine, frames[start : start + n], b.headers)  # noqa: B023
                staged.parts[i] = resize_crop_groups(groups, n, self.crop_kernel)
            except RuntimeError as e:
                staged.failed[i] = _undecodable(e)
            start += n

    def _decode_groups(self, encoded: Callable[[], list[torch.Tensor]], frames: bytes | None,
                       headers: Headers | None = None) -> list[SizeGroup]:  # fmt: skip
        return decode_jpeg_groups(
            encoded, self.device, call_size=self.decode_batch, decoder=self.jpeg_decoder, frames=frames,
            headers=headers,
        )  # fmt: skip

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """One batch tensor on the device: host parts go through a pinned buffer and a non-blocking copy."""
        if self.device.type == "cuda":
            host = [p for p in parts if p.device.type == "cpu"]
            if host and len({p.dtype for p in host}) == 1:
                n = sum(p.shape[0] for p in host)
                staged = self._pinned_buffer(n, host[0].dtype, host[0].shape[1:])
                torch.cat(host, out=staged)
                on_device = iter(torch.split(staged.to(self.device, non_blocking=True), [p.shape[0] for p in host]))
                parts = [next(on_device) if p.device.type == "cpu" else p for p in parts]
            else:
                parts = [p.to(self.device, non_blocking=True) for p in parts]
        if len(parts) == 1:
            return parts[0]
        if len({p.dtype for p in parts}) > 1:
            parts = [normalize(p) if p.dtype == torch.uint8 else p.float() for p in parts]
        return torch.cat(parts)

    def _pinned_buffer(self, n: int, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
        cap = max(n, self.runner.max_batch)
        key = (cap, dtype)
        buf = self._pinned.get(key)
        if buf is None:
            buf = torch.empty((cap, *shape), dtype=dtype, pin_memory=True)
            self._pinned[key] = buf
        return buf[:n]

    def warm_up(self, sizes: Sequence[tuple[int, int]] = ()) -> None:
        """Initialise nvJPEG and the resize kernels so the first request pays nothing; and for each
        (width, height) of ``sizes``, send two lone JPEGs of that size through: the first decodes one
        (nvJPEG's first of a size), the second captures the size's crop graph."""
        if self.device.type != "cuda":
            return
        hardware = hardware_decoder(self.device) if self.jpeg_decoder == "nvjpeg" else None
        if hardware is not None and hardware.calls == 0:  # the early thread's warm-up did not run, or failed
            warm_gpu_decoder(self.device, self.jpeg_decoder, self.crop_kernel)
        jpeg = warm_up_jpeg()
        # nvJPEG's buffers for large photos were grown by the early thread's 12 MP decode (warm_gpu_decoder).
        for n in sorted({1, min(8, self.runner.max_batch)}):
            self._warm(jpeg, n)
        for size in sizes:
            sized = warm_up_jpeg(size)
            self._warm(sized, 1)
            self._warm(sized, 1)  # the size's second sighting: its crop graph is captured
        torch.cuda.synchronize(self.device)

    def _warm(self, jpeg: bytes, n: int) -> None:
        """``n`` copies of ``jpeg`` through both stages as one request's JPEGs arrive over IPC: back to
        back in one buffer, headers read on arrival."""
        body = bytearray(jpeg * n)
        view = memoryview(body)
        batch = JpegBatch([view[i * len(jpeg) : (i + 1) * len(jpeg)] for i in range(n)], buffer=body)
        self.read_headers(batch)
        result = self([batch])
        if isinstance(result[0], Exception):
            raise result[0]
