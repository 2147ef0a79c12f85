"""Front-end processes to the one device process: framed requests over a Unix socket.

One Python process tops out near 600 single-image requests/s through KServe's HTTP stack
on an H100 host while the GPU could do ~8,000 images/s (benchmarks/results). So several
front-end processes parse HTTP and validate, and one device process batches across all
of them. What crosses is small and raw: the encoded JPEG bytes (nvJPEG decodes them in
the device process) or raw tensor bytes, and float32 logits back — framed bytes through
the kernel, never pickled objects. At 3,000 VGA JPEGs/s that is ~100 MB/s, a few percent
of one core.

Request frame: header ``<QBHfIQ`` (id, kind, n images, timeout s, meta bytes, body bytes),
then meta (kind 0: n uint32 JPEG lengths; kind 1: one dtype code byte), then the body.
Response frame: header ``<QBHI`` (id, status, n, payload bytes), then float32 logits
``[n,1000]`` or a UTF-8 error message. Kind 2 is a control request (profiler captures):
JSON in the meta, JSON back.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from model_server import BadInput, DeadlineExceeded, Overloaded, PayloadTooLarge, ServerError
from model_server.batcher import DynamicBatcher
from model_server.pipeline import JpegBatch, Payload, payload_size
from optimize.registry import CROP_SIZE, NUM_CLASSES

log = logging.getLogger(__name__)

REQ = struct.Struct("<QBHfIQ")
RESP = struct.Struct("<QBHI")
KIND_JPEG, KIND_TENSOR, KIND_CONTROL = 0, 1, 2
OK, BAD_INPUT, TOO_LARGE, OVERLOADED, DEADLINE, ERROR, NOT_FOUND = range(7)
_DTYPES = {0: torch.uint8, 1: torch.float32, 2: torch.float16}
_CODES = {v: k for k, v in _DTYPES.items()}
_ERRORS: dict[int, type[ServerError]] = {
    BAD_INPUT: BadInput,
    TOO_LARGE: PayloadTooLarge,
    OVERLOADED: Overloaded,
    DEADLINE: DeadlineExceeded,
    ERROR: ServerError,
}


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


def encode_request(req_id: int, payload: Payload, timeout_s: float) -> bytes:
    if isinstance(payload, JpegBatch):
        meta = struct.pack(f"<{len(payload)}I", *(len(d) for d in payload.images))
        body = b"".join(payload.images)
        kind = KIND_JPEG
    else:
        t = payload.contiguous()
        meta = bytes([_CODES[t.dtype]])
        body = t.numpy().tobytes()
        kind = KIND_TENSOR
    return REQ.pack(req_id, kind, payload_size(payload), timeout_s, len(meta), len(body)) + meta + body


def decode_request(kind: int, n: int, meta: bytes, body: bytes) -> Payload:
    if kind == KIND_JPEG:
        lengths = struct.unpack(f"<{n}I", meta)
        images, start = [], 0
        for length in lengths:
            images.append(body[start : start + length])
            start += length
        return JpegBatch(images)
    dtype = _DTYPES[meta[0]]
    t = torch.frombuffer(bytearray(body), dtype=dtype).reshape(n, 3, CROP_SIZE, CROP_SIZE)
    return t if dtype == torch.uint8 else t.float()


class DeviceServer:
    """Runs in the device process: reads request frames from every front end into one batcher."""

    def __init__(
        self, batcher: DynamicBatcher, path: str, control: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    ) -> None:
        self.batcher = batcher
        self.path = path
        self.control = control
        self._server: asyncio.base_events.Server | None = None
        self.connections = 0

    async def start(self) -> None:
        self.batcher.start()
        self._server = await asyncio.start_unix_server(self._handle, path=self.path, limit=2**20)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    header = await reader.readexactly(REQ.size)
                except asyncio.IncompleteReadError:
                    break
                req_id, kind, n, timeout_s, meta_len, body_len = REQ.unpack(header)
                meta = await reader.readexactly(meta_len)
                body = await reader.readexactly(body_len)
                task = asyncio.ensure_future(self._serve(writer, req_id, kind, n, timeout_s, meta, body))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            self.connections -= 1

    async def _serve(
        self, writer: asyncio.StreamWriter, req_id: int, kind: int, n: int, timeout_s: float, meta: bytes, body: bytes
    ) -> None:
        if kind == KIND_CONTROL:
            try:
                if self.control is None:
                    raise BadInput("this device process takes no control requests")
                data = json.dumps(self.control(json.loads(meta))).encode()
                writer.write(RESP.pack(req_id, OK, 0, len(data)) + data)
            except Exception as e:
                status = (
                    NOT_FOUND
                    if isinstance(e, KeyError)
                    else BAD_INPUT
                    if isinstance(e, ValueError | BadInput)
                    else ERROR
                )
                msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e).encode()
                writer.write(RESP.pack(req_id, status, 0, len(msg)) + msg)
            return
        try:
            payload = decode_request(kind, n, meta, body)
            out = await self.batcher.submit(payload, n, deadline=time.monotonic() + timeout_s)
            data = out.numpy().astype(np.float32, copy=False).tobytes()
            writer.write(RESP.pack(req_id, OK, n, len(data)) + data)
        except Exception as e:  # every failure goes back to its request, typed
            if not isinstance(e, ServerError):
                log.exception("request %d failed in the device process", req_id)
            msg = str(e).encode()
            writer.write(RESP.pack(req_id, _status(e), n, len(msg)) + msg)
        try:
            await writer.drain()
        except ConnectionError:
            pass


class DeviceClient:
    """Runs in a front end: sends payloads to the device process, one connection, many in flight."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._control_ids: set[int] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None
        self.closed = False

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is None:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self._writer is None:
                    reader, writer = await asyncio.open_unix_connection(self.path, limit=2**20)
                    self._reader_task = asyncio.ensure_future(self._read(reader))
                    self._writer = writer
        return self._writer

    async def infer(self, payload: Payload, timeout_s: float) -> np.ndarray:
        if self.closed:
            raise Overloaded("the device process is gone; retry on another replica")
        writer = await self._connect()
        req_id = next(self._ids)
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        writer.write(encode_request(req_id, payload, timeout_s))
        await writer.drain()
        try:
            return await fut
        finally:
            self._pending.pop(req_id, None)

    async def control(self, op: dict[str, Any]) -> dict[str, Any]:
        """Send a control request (e.g. a profiler capture) to the device process."""
        writer = await self._connect()
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        self._control_ids.add(req_id)
        meta = json.dumps(op).encode()
        writer.write(REQ.pack(req_id, KIND_CONTROL, 0, 0.0, len(meta), 0) + meta)
        await writer.drain()
        try:
            result: dict[str, Any] = await fut
            return result
        finally:
            self._pending.pop(req_id, None)
            self._control_ids.discard(req_id)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                req_id, status, n, length = RESP.unpack(await reader.readexactly(RESP.size))
                data = await reader.readexactly(length)
                fut = self._pending.get(req_id)
                if fut is None or fut.done():
                    continue
                if status == OK and req_id in self._control_ids:
                    fut.set_result(json.loads(data))
                elif status == OK:
                    fut.set_result(np.frombuffer(data, dtype=np.float32).reshape(n, NUM_CLASSES))
                elif status == NOT_FOUND:
                    fut.set_exception(KeyError(data.decode(errors="replace")))
                else:
                    fut.set_exception(_ERRORS.get(status, ServerError)(data.decode(errors="replace")))
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            log.error("lost the device process: %s", e)
        finally:
            self.closed = True
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(Overloaded("the device process is gone; retry on another replica"))
