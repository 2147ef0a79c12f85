"""Front-end processes to the one device process: framed requests over a Unix socket.

One Python process tops out near 600 single-image requests/s through KServe's HTTP stack
on an H100 host while the GPU could do ~8,000 images/s (benchmarks/results). So several
front-end processes parse HTTP and validate, and one device process batches across all
of them. What crosses is small and raw: the encoded JPEG bytes (nvJPEG decodes them in
the device process) or raw tensor bytes, and float32 logits back — framed bytes through
the kernel, never pickled objects. At 3,000 VGA JPEGs/s that is ~100 MB/s, a few percent
of one core.

Request frame: header ``<QBHfIQ`` (id, kind, n images, timeout s, meta bytes, body bytes),
then meta (kind 0: n uint32 JPEG lengths, then n start-of-frame marker bytes if the front end read
them; kind 1: one dtype code byte), then the body.
Response frame: header ``<QBHI`` (id, status, n, payload bytes), then float32 logits
``[n,1000]`` or a UTF-8 error message. Kind 2 is a control request (profiler captures):
JSON in the meta, JSON back.

The device process is one Python process for every front end, so its per-request Python
is the serving ceiling (it was GIL-bound at ~2,400 req/s on an H100 host). Both ends are
therefore :class:`asyncio.BufferedProtocol` s rather than streams: the kernel receives
into one buffer that is parsed in place, every complete frame of a read at once (a request body
of ``_DIRECT_BYTES`` or more is received into a buffer of its own instead, no copy); a
request goes to the batcher without a task of its own (``submit_nowait``) and is answered
from its future's done-callback; and the frames written in one loop turn leave in one
``write`` (one answer per request of a batch would otherwise be one syscall each).
``benchmarks/ipc_bench.py`` measures the device process's CPU per request.

Backpressure: a front end that stops reading its answers stops being read (once
``_WRITE_HIGH_WATER`` of answers wait in the device process) until it catches up; a client
whose requests cannot be sent waits in ``infer`` like a stream's ``drain``. A front end that
closes its end is answered what it already sent; once an answer cannot be written (it is
gone), its remaining requests are cancelled, and the batcher drops them before the device.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import functools
import itertools
import json
import logging
import struct
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from model_server import BadInput, DeadlineExceeded, Overloaded, PayloadTooLarge, ServerError
from model_server.batcher import DynamicBatcher
from model_server.images import JpegBatch, Payload, payload_size
from optimize.registry import CROP_SIZE, NUM_CLASSES

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

REQ = struct.Struct("<QBHfIQ")
RESP = struct.Struct("<QBHI")
KIND_JPEG, KIND_TENSOR, KIND_CONTROL = 0, 1, 2
OK, BAD_INPUT, TOO_LARGE, OVERLOADED, DEADLINE, ERROR, NOT_FOUND = range(7)
# numpy's dtypes, not torch's: a front end never imports torch (only the device side makes tensors).
_DTYPES: dict[int, np.dtype[Any]] = {0: np.dtype(np.uint8), 1: np.dtype(np.float32), 2: np.dtype(np.float16)}
_CODES = {v: k for k, v in _DTYPES.items()}
_ERRORS: dict[int, type[ServerError]] = {
    BAD_INPUT: BadInput,
    TOO_LARGE: PayloadTooLarge,
    OVERLOADED: Overloaded,
    DEADLINE: DeadlineExceeded,
    ERROR: ServerError,
}
_GONE = "the device process is gone; retry on another replica"

# The receive buffer of a connection: a read takes whatever fits (at least _MIN_READ), so a
# busy front end's frames arrive several per read; the incomplete frame at the end moves to
# the front when the free space runs low (a partial 91 KB JPEG at most every ~0.75 MB read).
# A frame larger than the buffer grows it to fit, so the frame still lands in place; a
# buffer grown past _KEEP_BYTES goes back to the usual size once it is empty.
_CHUNK = 2**20
_MIN_READ = 256 * 1024
_KEEP_BYTES = 8 * 2**20
# A request body at least this large is received straight into a buffer of its own once its header
# and meta are in: no copy out of the read buffer, which the event loop's thread made holding the GIL
# (a third of the device process's CPU per 32-JPEG request, benchmarks/ipc_bench.py --images 32).
_DIRECT_BYTES = 256 * 1024
# Answers queued in user space, per front end, before the device process stops reading
# that front end's requests (a front end that does not read its answers gets no new work
# in); about 1,000 single-image answers, far above what one batch writes at once.
_WRITE_HIGH_WATER = 4 * 2**20

Buffer = bytes | bytearray | memoryview


def _status(e: BaseException) -> int:
    if isinstance(e, PayloadTooLarge):  # before BadInput: it is one
        return TOO_LARGE
    if isinstance(e, BadInput):
        return BAD_INPUT
    if isinstance(e, Overloaded):
        return OVERLOADED
    if isinstance(e, DeadlineExceeded):
        return DEADLINE
    return ERROR


def retain_freed_memory() -> bool:
    """Keep freed heap memory in this process instead of handing it back to the kernel (process-wide).

    Every request's payload is a fresh allocation (a 91 KB JPEG, a 150 KB tensor image) freed
    once answered. With glibc's defaults the top of the heap is trimmed after such frees and
    anything over 128 KB is its own ``mmap``, so the next payloads fault their pages in again.
    Raising the trim and mmap thresholds cut the device process's CPU per request from 140 to
    103 µs (91 KB JPEGs) and from 231 to 165 µs (tensors) in ``benchmarks/ipc_bench.py``; the
    price is that the process keeps up to ~256 MB of freed memory. Called by the device
    process and the front ends at start.

    Returns:
        False where the C library is not glibc (nothing changed).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return all(
        mallopt(param, value)
        for param, value in ((m_trim_threshold, 256 * 2**20), (m_top_pad, 64 * 2**20), (m_mmap_threshold, 32 * 2**20))
    )


def request_parts(req_id: int, payload: Payload, timeout_s: float) -> list[Buffer]:
    """One request frame as buffers to write back to back (the body is not copied)."""
    if isinstance(payload, JpegBatch):
        images = payload.images
        meta = struct.pack(f"<{len(images)}I", *map(len, images))
        if payload.frames is not None and len(payload.frames) == len(images):
            meta += payload.frames
        head = REQ.pack(req_id, KIND_JPEG, len(images), timeout_s, len(meta), sum(map(len, images)))
        return [head + meta, *images]
    # A numpy array from a front end; a tensor where a caller has torch (tests, benchmarks).
    arr = np.ascontiguousarray(payload.numpy() if hasattr(payload, "numpy") else payload)
    body = arr.data.cast("B")
    head = REQ.pack(req_id, KIND_TENSOR, payload_size(payload), timeout_s, 1, body.nbytes)
    return [head + bytes([_CODES[arr.dtype]]), body]


def encode_request(req_id: int, payload: Payload, timeout_s: float) -> bytes:
    return b"".join(request_parts(req_id, payload, timeout_s))


def decode_request(kind: int, n: int, meta: bytes, body: Buffer) -> Payload:
    """A request frame's payload; ``body`` is used in place when writable (a bytearray, or a
    writable memoryview such as :class:`BodyPool` hands out), else copied once."""
    if kind == KIND_JPEG:
        buffer = _writable(body)
        if len(meta) not in (4 * n, 5 * n):
            raise BadInput(f"a frame of {n} JPEGs carries {len(meta)} bytes of meta; expected {4 * n} or {5 * n}")
        frames = meta[4 * n :] or None
        if n == 1:
            return JpegBatch([buffer], buffer=buffer, frames=frames)
        lengths = struct.unpack(f"<{n}I", meta[: 4 * n])
        if sum(lengths) != len(body):
            raise BadInput(f"JPEG lengths add up to {sum(lengths)} bytes, the frame carries {len(body)}")
        # Views, not copies: the decode stage makes one tensor of the whole (writable) body.
        view = memoryview(buffer)
        images, start = [], 0
        for length in lengths:
            images.append(view[start : start + length])
            start += length
        return JpegBatch(images, buffer=buffer, frames=frames)
    import torch  # the device side: loaded already

    dtype = _DTYPES[meta[0]]
    writable = _writable(body)
    t = torch.from_numpy(np.frombuffer(writable, dtype=dtype).reshape(n, 3, CROP_SIZE, CROP_SIZE))
    return t if t.dtype == torch.uint8 else t.float()


def _writable(body: Buffer) -> bytearray | memoryview:
    """``body`` itself when writable (what torch.frombuffer needs), else a copy."""
    if isinstance(body, bytearray) or (isinstance(body, memoryview) and not body.readonly):
        return body
    return bytearray(body)


@dataclasses.dataclass(slots=True)
class _DirectBody:
    """A request whose header and meta are parsed and whose large body is being read into ``body``."""

    req_id: int
    kind: int
    n: int
    timeout_s: float
    meta: bytes
    body: memoryview | bytearray
    filled: int


class BodyPool:
    """Buffers of large request bodies, reused once every view of a body is gone.

    A 32-JPEG request's body (1–3 MB of VGA JPEGs) was a fresh ``bytearray`` each: allocated
    and zero-filled on the event loop's thread, holding the GIL, before the socket filled it. py-spy
    on the H100 host (16 users x 32 JPEGs, README session 18) found that line holding the GIL 12 %
    of the time, about 0.4 ms per request, while the decode stage's thread needs the GIL between its
    nvJPEG calls. :meth:`take` hands out a writable view of exactly the asked size on a buffer of the
    next multiple of ``STEP`` bytes, reused when one is free (nothing to allocate or fill); when the
    last view of it dies (the request answered and the decode stage done with its JPEGs), the buffer
    goes back to the pool, up to ``max_bytes`` of them kept (0: no pool, a fresh buffer each time).

    ``alloc(size)`` makes a new buffer (default ``bytearray``): the device process passes
    :func:`model_server.nvjpeg.pinned_bytes` where nvJPEG's hardware decoder reads the JPEGs in place,
    so they sit in page-locked memory its copies to the device need not stage (README, session 19).
    """

    STEP = 256 * 1024

    def __init__(self, max_bytes: int, alloc: Callable[[int], Any] | None = None) -> None:
        self.max_bytes = max(0, max_bytes)
        self._alloc: Callable[[int], Any] = alloc if alloc is not None else bytearray
        self._free: dict[int, list[Any]] = {}
        self._kept = 0
        self._lock = threading.Lock()  # views die on the decode and device threads too
        self.reused = 0

    def take(self, n: int) -> memoryview | bytearray:
        """A writable buffer of exactly ``n`` bytes (its contents undefined)."""
        if self.max_bytes == 0:
            return bytearray(n)
        size = -(-n // self.STEP) * self.STEP
        with self._lock:
            free = self._free.get(size)
            buf = free.pop() if free else None
            if buf is not None:
                self._kept -= size
                self.reused += 1
        if buf is None:
            buf = self._new(size)
        view = memoryview(buf)[:n]
        weakref.finalize(view, self._give_back, buf)
        return view

    def _new(self, size: int) -> Any:
        """A new buffer from ``alloc``; should it fail (page-locked memory can run out where pageable
        does not), a ``bytearray``, and ``alloc`` is not tried again: the request is served anyway."""
        if self._alloc is not bytearray:
            try:
                return self._alloc(size)
            except (RuntimeError, MemoryError) as e:
                log.warning("request body buffers: %s failed (%s); plain bytearrays from now on", self._alloc, e)
                self._alloc = bytearray
        return bytearray(size)

    def _give_back(self, buf: Any) -> None:
        size = len(buf)
        with self._lock:
            if self._kept + size <= self.max_bytes:
                self._free.setdefault(size, []).append(buf)
                self._kept += size

    @property
    def kept_bytes(self) -> int:
        """Bytes of free buffers held for reuse."""
        return self._kept


class _Framed(asyncio.BufferedProtocol):
    """Frames both ways on one stream: reads parsed in place, writes of one loop turn sent together."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray(_CHUNK)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of the bytes received
        self._out: list[Buffer] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the Transport methods without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buf) - self._end < _MIN_READ:
            self._make_room()
        return memoryview(self._buf)[self._end :]

    def _make_room(self) -> None:
        # Called with no view of the buffer alive (the transport dropped the last one), so it may
        # be replaced; the partial frame moves to the front, and the buffer grows to hold it whole.
        pending = self._end - self._start
        need = pending + _MIN_READ
        if pending >= self._head_size():
            need = max(need, self._frame_size(self._start))
        if need > len(self._buf):
            grown = bytearray(max(need, _CHUNK))
            grown[:pending] = memoryview(self._buf)[self._start : self._end]
            self._buf = grown
        else:
            with memoryview(self._buf) as view:
                view[:pending] = view[self._start : self._end]
        self._start, self._end = 0, pending

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        # The transport still holds a view of the buffer: parse without resizing it.
        with memoryview(self._buf) as view:
            self._start = self._parse(view, self._start, self._end)
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buf) > _KEEP_BYTES:
                self._buf = bytearray(_CHUNK)

    def _head_size(self) -> int:
        raise NotImplementedError

    def _frame_size(self, at: int) -> int:
        """Header plus payload bytes of the frame whose header starts at ``at``."""
        raise NotImplementedError

    def _parse(self, view: memoryview, pos: int, end: int) -> int:
        """Handle every complete frame in ``view[pos:end]``; return where the first incomplete one starts."""
        raise NotImplementedError

    def send(self, *parts: Buffer) -> None:
        """Queue a frame; everything queued in this loop turn goes out in one write."""
        if not self._out:
            self.loop.call_soon(self.flush)
        self._out.extend(parts)

    def flush(self) -> None:
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))


class _DeviceConnection(_Framed):
    """The device process's end of one front end's connection."""

    def __init__(self, server: DeviceServer) -> None:
        super().__init__()
        self.server = server
        self.inflight: set[asyncio.Future[torch.Tensor]] = set()
        self._eof = False
        self._direct: _DirectBody | None = None  # a large body being received into its own buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.server.connections += 1

    def _head_size(self) -> int:
        return REQ.size

    def _frame_size(self, at: int) -> int:
        """Bytes of the frame at ``at`` that must be in the read buffer: all of it, or, for a body of at
        least ``_DIRECT_BYTES``, the header and meta (the body then goes to a buffer of its own)."""
        fields = REQ.unpack_from(self._buf, at)
        return int(REQ.size + fields[4] + (fields[5] if fields[5] < _DIRECT_BYTES else 0))

    def get_buffer(self, sizehint: int) -> memoryview:
        direct = self._direct
        if direct is not None:
            return memoryview(direct.body)[direct.filled :]
        return super().get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        direct = self._direct
        if direct is None:
            super().buffer_updated(nbytes)
            return
        direct.filled += nbytes
        if direct.filled == len(direct.body):
            self._direct = None
            self._dispatch(direct.req_id, direct.kind, direct.n, direct.timeout_s, direct.meta, direct.body)

    def _parse(self, view: memoryview, pos: int, end: int) -> int:
        size = REQ.size
        while end - pos >= size:
            req_id, kind, n, timeout_s, meta_len, body_len = REQ.unpack_from(view, pos)
            body_at = pos + size + meta_len
            stop = body_at + body_len
            if stop > end:
                if body_len >= _DIRECT_BYTES and body_at <= end:
                    # The rest of a large body is read straight into its own buffer (get_buffer).
                    body = self.server.bodies.take(body_len)
                    body[: end - body_at] = view[body_at:end]
                    meta = bytes(view[pos + size : body_at])
                    self._direct = _DirectBody(req_id, kind, n, timeout_s, meta, body, end - body_at)
                    return end
                break
            meta = bytes(view[pos + size : body_at])
            # The body becomes a bytearray at once (one copy out of the read buffer): torch.frombuffer
            # wants it writable, for a tensor and for the JPEGs the decode stage reads in place.
            body = bytearray(view[body_at:stop])
            pos = stop
            self._dispatch(req_id, kind, n, timeout_s, meta, body)
        return pos

    def _dispatch(self, req_id: int, kind: int, n: int, timeout_s: float, meta: bytes, body: Buffer) -> None:
        if kind == KIND_CONTROL:
            self.send(*self.server.control_answer(req_id, meta))
        else:
            self._request(req_id, kind, n, timeout_s, meta, body)

    def _request(self, req_id: int, kind: int, n: int, timeout_s: float, meta: bytes, body: Buffer) -> None:
        try:
            payload = decode_request(kind, n, meta, body)
            if self.server.admit is not None:
                self.server.admit(payload)
            fut = self.server.batcher.submit_nowait(payload, n, deadline=time.monotonic() + timeout_s)
        except Exception as e:
            self._fail(req_id, n, e)
            return
        if fut.done():  # run inline (the batcher's idle path): answered now, not a loop turn later
            self._answer(req_id, n, fut)
            return
        self.inflight.add(fut)
        fut.add_done_callback(functools.partial(self._answer, req_id, n))

    def _answer(self, req_id: int, n: int, fut: asyncio.Future[torch.Tensor]) -> None:
        self.inflight.discard(fut)
        if fut.cancelled():  # its front end is gone (connection_lost)
            return
        e = fut.exception()
        if e is None:
            try:
                data = np.ascontiguousarray(fut.result().numpy(), dtype=np.float32).data.cast("B")
            except Exception as conv:
                self._fail(req_id, n, conv)
            else:
                self.send(RESP.pack(req_id, OK, n, data.nbytes), data)
        else:
            self._fail(req_id, n, e)
        if self._eof and not self.inflight:
            self._close()

    def _fail(self, req_id: int, n: int, e: BaseException) -> None:
        """Every failure goes back to its own request, typed."""
        if not isinstance(e, ServerError):
            log.error("request %d failed in the device process", req_id, exc_info=e)
        msg = str(e).encode()
        self.send(RESP.pack(req_id, _status(e), n, len(msg)), msg)

    def eof_received(self) -> bool:
        # The front end sends no more: answer what it already sent, then close. A Unix socket shows
        # a front end that is gone the same way; the first answer it cannot take ends the connection.
        self._eof = True
        if not self.inflight:
            self._close()
        return True

    def _close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()  # after the transport's own buffer is written

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self._eof:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections -= 1
        self.transport = None
        self._out.clear()
        # Nobody is left to read the answers: the batcher skips a done future before the device.
        for fut in self.inflight:
            fut.cancel()
        self.inflight.clear()


class DeviceServer:
    """Runs in the device process: reads request frames from every front end into one batcher."""

    def __init__(
        self,
        batcher: DynamicBatcher,
        path: str,
        control: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        *,
        body_pool_bytes: int = 0,
        body_alloc: Callable[[int], Any] | None = None,
        admit: Callable[[Payload], None] | None = None,
    ) -> None:
        self.batcher = batcher
        #: Called with each request's payload before it is queued (the device side's early header reads).
        self.admit = admit
        self.path = path
        self.control = control
        self.bodies = BodyPool(body_pool_bytes, body_alloc)
        self._server: asyncio.base_events.Server | None = None
        self.connections = 0

    async def start(self) -> None:
        self.batcher.start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _DeviceConnection(self), path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def control_answer(self, req_id: int, meta: bytes) -> tuple[bytes, bytes]:
        """The response frame (header, payload) of a control request."""
        try:
            if self.control is None:
                raise BadInput("this device process takes no control requests")
            data = json.dumps(self.control(json.loads(meta))).encode()
            return RESP.pack(req_id, OK, 0, len(data)), data
        except Exception as e:
            status = (
                NOT_FOUND if isinstance(e, KeyError) else BAD_INPUT if isinstance(e, ValueError | BadInput) else ERROR
            )
            msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e).encode()
            return RESP.pack(req_id, status, 0, len(msg)), msg


class _FrontConnection(_Framed):
    """A front end's end of its connection to the device process."""

    def __init__(self, client: DeviceClient) -> None:
        super().__init__()
        self.client = client
        self._drained: asyncio.Future[None] | None = None

    def _head_size(self) -> int:
        return RESP.size

    def _frame_size(self, at: int) -> int:
        return int(RESP.size + RESP.unpack_from(self._buf, at)[3])

    def _parse(self, view: memoryview, pos: int, end: int) -> int:
        size = RESP.size
        pending = self.client.pending
        while end - pos >= size:
            req_id, status, n, length = RESP.unpack_from(view, pos)
            stop = pos + size + length
            if stop > end:
                break
            data = view[pos + size : stop]
            pos = stop
            fut = pending.get(req_id)
            if fut is None or fut.done():
                continue
            if status == OK and req_id in self.client.control_ids:
                fut.set_result(json.loads(bytes(data)))
            elif status == OK:
                # A bytearray: the copy out of the read buffer is writable, as torch.from_numpy wants it.
                fut.set_result(np.frombuffer(bytearray(data), dtype=np.float32).reshape(n, NUM_CLASSES))
            elif status == NOT_FOUND:
                fut.set_exception(KeyError(bytes(data).decode(errors="replace")))
            else:
                fut.set_exception(_ERRORS.get(status, ServerError)(bytes(data).decode(errors="replace")))
        return pos

    async def drained(self) -> None:
        """Wait while the transport holds more than its high-water mark of unsent requests."""
        if self._drained is not None:
            await asyncio.shield(self._drained)

    def pause_writing(self) -> None:
        self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def eof_received(self) -> bool:
        return False  # the device process closed: close our end too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._out.clear()
        self.resume_writing()
        if not self.client.closing:
            log.error("lost the device process: %s", exc or "it closed the connection")
        self.client.lost()


class DeviceClient:
    """Runs in a front end: sends payloads to the device process, one connection, many in flight."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.control_ids: set[int] = set()
        self._conn: _FrontConnection | None = None
        self._lock: asyncio.Lock | None = None
        self.closed = False
        self.closing = False

    async def _connect(self) -> _FrontConnection:
        if self._conn is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._conn is None:
                    loop = asyncio.get_running_loop()
                    _, self._conn = await loop.create_unix_connection(lambda: _FrontConnection(self), self.path)
        return self._conn

    async def _call(self, req_id: int, parts: list[Buffer]) -> Any:
        if self.closed:
            raise Overloaded(_GONE)
        conn = self._conn if self._conn is not None else await self._connect()
        if self.closed:  # lost while connecting
            raise Overloaded(_GONE)
        fut: asyncio.Future[Any] = conn.loop.create_future()
        self.pending[req_id] = fut
        try:
            conn.send(*parts)
            await conn.drained()
            return await fut
        finally:
            self.pending.pop(req_id, None)

    async def infer(self, payload: Payload, timeout_s: float) -> np.ndarray:
        req_id = next(self._ids)
        result: np.ndarray = await self._call(req_id, request_parts(req_id, payload, timeout_s))
        return result

    async def control(self, op: dict[str, Any]) -> dict[str, Any]:
        """Send a control request (e.g. a profiler capture) to the device process."""
        req_id = next(self._ids)
        meta = json.dumps(op).encode()
        self.control_ids.add(req_id)
        try:
            result: dict[str, Any] = await self._call(
                req_id, [REQ.pack(req_id, KIND_CONTROL, 0, 0.0, len(meta), 0), meta]
            )
            return result
        finally:
            self.control_ids.discard(req_id)

    def lost(self) -> None:
        """The connection is gone: every request in flight fails, and so does every later one."""
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(Overloaded(_GONE))

    def close(self) -> None:
        """Close the connection; requests in flight fail with :class:`Overloaded`."""
        self.closing = True
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.abort()
        else:
            self.lost()
