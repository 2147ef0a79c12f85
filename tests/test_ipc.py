"""The front-end/device socket (``--frontends N``): a real DeviceServer and batcher on a real Unix socket.

The device function is the one stand-in (no GPU here): it answers each request with rows
that identify it (an image's length, a tensor's first value), so a test sees whose answer
came back. Raw-socket tests write frames exactly as a front end does, to control how they
are cut into reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import logging
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from PIL import Image

from model_server import BadInput, DeadlineExceeded, Overloaded, ServerError
from model_server.batcher import DynamicBatcher
from model_server.images import JpegBatch
from model_server.ipc import (
    BAD_INPUT,
    DEADLINE,
    ERROR,
    KIND_JPEG,
    KIND_TENSOR,
    OK,
    REQ,
    RESP,
    DeviceClient,
    DeviceServer,
    decode_request,
    encode_request,
)
from optimize.registry import CROP_SIZE, NUM_CLASSES

T = TypeVar("T")


class Device:
    """The device function: each request's rows carry its identity; ``gate`` holds batches in flight."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.requests = 0

    def __call__(self, payloads: list[Any]) -> list[torch.Tensor | Exception]:
        self.started.set()
        self.gate.wait(30)
        self.requests += len(payloads)
        out: list[torch.Tensor | Exception] = []
        for p in payloads:
            if isinstance(p, JpegBatch):
                images = [bytes(t.numpy()) for t in p.encoded()]  # what the decode stage hands nvJPEG
                if any(img.startswith(b"bad") for img in images):
                    out.append(BadInput("JPEG could not be decoded"))
                    continue
                if any(img.startswith(b"boom") for img in images):
                    out.append(RuntimeError("device fault"))
                    continue
                ident = torch.tensor([float(len(img)) for img in images])
            else:
                ident = p.reshape(p.shape[0], -1)[:, 0].float()
            out.append(ident[:, None].expand(-1, NUM_CLASSES))  # not contiguous, like some runtimes' outputs
        return out


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


@contextlib.asynccontextmanager
async def device_server(
    device: Device | None = None,
    *,
    control: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    max_batch: int = 8,
    max_queue: int = 256,
    body_pool_bytes: int = 0,
    admit: Callable[[Any], None] | None = None,
    inline: bool = False,
) -> AsyncIterator[DeviceServer]:
    """``inline``: the batcher runs a request that finds it idle at once on the loop's thread."""
    device = device or Device()
    folder = tempfile.mkdtemp(prefix="ipc-test-")  # short: a Unix socket path holds ~100 bytes
    idle_path: dict[str, Any] = {"prepare": lambda payloads: payloads, "inline_after_idle_s": 0.0} if inline else {}
    batcher = DynamicBatcher(device, max_batch_size=max_batch, max_delay_s=0.0, max_queue_images=max_queue, **idle_path)
    server = DeviceServer(
        batcher, os.path.join(folder, "device.sock"), control=control, body_pool_bytes=body_pool_bytes, admit=admit
    )
    await server.start()
    try:
        yield server
    finally:
        device.gate.set()
        await server.close()
        batcher.close()
        shutil.rmtree(folder)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, int, int, bytes]:
    req_id, status, n, length = RESP.unpack(await reader.readexactly(RESP.size))
    return req_id, status, n, await reader.readexactly(length)


def logits(n: int, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).reshape(n, NUM_CLASSES)


async def wait_until(cond: Callable[[], bool]) -> None:
    while not cond():
        await asyncio.sleep(0.005)


def test_jpeg_and_tensor_payloads_round_trip_to_their_own_request() -> None:
    async def main() -> None:
        async with device_server() as server:
            client = DeviceClient(server.path)
            out = await client.infer(JpegBatch([b"x" * 10, b"y" * 20]), 5.0)
            assert out.shape == (2, NUM_CLASSES) and out.dtype == np.float32
            assert (out[0] == 10).all() and (out[1] == 20).all()
            for dtype, value in ((torch.uint8, 7), (torch.float16, 0.5), (torch.float32, -3.25)):
                t = torch.full((1, 3, CROP_SIZE, CROP_SIZE), value, dtype=dtype)
                assert (await client.infer(t, 5.0) == value).all()
            # Many in flight on one connection: written together, read together, answered apart.
            sizes = list(range(1, 101))
            results = await asyncio.gather(*(client.infer(JpegBatch([b"z" * k]), 5.0) for k in sizes))
            assert [int(r[0, 0]) for r in results] == sizes
            client.close()

    run(main())


@pytest.mark.parametrize("inline", [False, True], ids=["device-thread", "inline"])
def test_an_answer_is_written_before_its_batchs_metrics(monkeypatch: pytest.MonkeyPatch, inline: bool) -> None:
    """The batch's metric writes (locked shared-memory stores) come after its answers are on the
    socket, so a lone request does not wait for them (metrics.flush_soon), also when the batcher runs it
    inline, inside ``submit_nowait``: the answer is then written a loop turn earlier still."""
    from model_server import ipc, metrics

    order: list[str] = []
    real_write, real_flush = ipc._Framed.flush, metrics.flush

    def write(self: Any) -> None:
        if self._out and isinstance(self, ipc._DeviceConnection):
            order.append("answer")
        real_write(self)

    monkeypatch.setattr(ipc._Framed, "flush", write)
    monkeypatch.setattr(metrics, "flush", lambda: (order.append("metrics"), real_flush())[1])

    async def main() -> int:
        async with device_server(inline=inline) as server:
            client = DeviceClient(server.path)
            for k in (3, 5):
                assert int((await client.infer(JpegBatch([b"x" * k]), 5.0))[0, 0]) == k
                await wait_until(lambda: order.count("metrics") == order.count("answer"))
            client.close()
            return server.batcher.inline_batches

    assert run(main()) == (2 if inline else 0)
    assert order == ["answer", "metrics"] * 2


def test_several_frames_in_one_write_are_all_answered() -> None:
    async def main() -> None:
        async with device_server() as server:
            reader, writer = await asyncio.open_unix_connection(server.path)
            writer.write(b"".join(encode_request(i, JpegBatch([b"j" * i]), 5.0) for i in range(1, 6)))
            answers = {}
            for _ in range(5):
                req_id, status, n, data = await read_response(reader)
                assert status == OK and n == 1
                answers[req_id] = int(logits(n, data)[0, 0])
            assert answers == {i: i for i in range(1, 6)}
            writer.close()

    run(main())


def test_a_frame_split_across_reads_and_a_frame_larger_than_the_buffer() -> None:
    async def main() -> None:
        async with device_server() as server:
            reader, writer = await asyncio.open_unix_connection(server.path)
            frame = encode_request(1, JpegBatch([b"a" * 300, b"b" * 5000]), 5.0)
            cuts = [0, 5, REQ.size + 3, REQ.size + 8, 1000, 4000, len(frame)]  # inside header, meta, body
            for lo, hi in itertools.pairwise(cuts):
                writer.write(frame[lo:hi])
                await writer.drain()
                await asyncio.sleep(0.02)  # each piece its own read
            req_id, status, n, data = await read_response(reader)
            assert (req_id, status, n) == (1, OK, 2)
            assert logits(n, data)[:, 0].tolist() == [300.0, 5000.0]
            # A 3 MB image between two small frames, the lot in one write: its body is read into a
            # buffer of its own (test below), and the frame after it is still found.
            writer.write(
                encode_request(2, JpegBatch([b"s" * 7]), 5.0)
                + encode_request(3, JpegBatch([b"L" * 3_000_000]), 5.0)
                + encode_request(4, JpegBatch([b"t" * 9]), 5.0)
            )
            got = {}
            for _ in range(3):
                req_id, status, n, data = await read_response(reader)
                assert status == OK
                got[req_id] = int(logits(n, data)[0, 0])
            assert got == {2: 7, 3: 3_000_000, 4: 9}
            writer.close()

    run(main())


def test_each_failure_goes_back_to_its_own_request_typed(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with device_server(max_batch=4) as server:
            client = DeviceClient(server.path)
            good, bad, boom, big, late = await asyncio.gather(
                client.infer(JpegBatch([b"g" * 3]), 5.0),
                client.infer(JpegBatch([b"bad jpeg"]), 5.0),
                client.infer(JpegBatch([b"boom"]), 5.0),
                client.infer(JpegBatch([b"x"] * 5), 5.0),  # over max_batch_size
                client.infer(JpegBatch([b"x"]), -1.0),  # its deadline passed before it was sent
                return_exceptions=True,
            )
            assert isinstance(good, np.ndarray) and good[0, 0] == 3
            assert isinstance(bad, BadInput) and "could not be decoded" in str(bad)
            assert type(boom) is ServerError and "device fault" in str(boom)
            assert type(big) is ServerError and "exceed max_batch_size" in str(big)
            assert isinstance(late, DeadlineExceeded)
            # A malformed frame (unknown dtype code) fails its request; the connection goes on.
            reader, writer = await asyncio.open_unix_connection(server.path)
            writer.write(REQ.pack(9, KIND_TENSOR, 1, 5.0, 1, 0) + bytes([99]))
            writer.write(encode_request(10, JpegBatch([b"ok"]), 5.0))
            assert (await read_response(reader))[:2] == (9, ERROR)
            req_id, status, _, data = await read_response(reader)
            assert (req_id, status, logits(1, data)[0, 0]) == (10, OK, 2.0)
            writer.close()
            client.close()

    caplog.set_level(logging.ERROR, logger="model_server.ipc")
    run(main())
    logged = [r.getMessage() for r in caplog.records if r.name == "model_server.ipc"]
    assert len(logged) == 3, logged  # unexpected faults are logged (boom, max_batch, dtype); typed ones are not


def test_a_full_queue_answers_overloaded_at_once() -> None:
    async def main() -> None:
        device = Device()
        device.gate.clear()
        async with device_server(device, max_batch=2, max_queue=2) as server:
            client = DeviceClient(server.path)
            sent = []
            while server.batcher.queued_images < 2:  # both device slots busy, then the queue full
                sent.append(asyncio.ensure_future(client.infer(JpegBatch([b"q"]), 5.0)))
                await asyncio.sleep(0.02)
            with pytest.raises(Overloaded, match="queue is full"):
                await client.infer(JpegBatch([b"o"]), 5.0)
            device.gate.set()
            assert all(isinstance(r, np.ndarray) for r in await asyncio.gather(*sent))
            client.close()

    run(main())


def test_a_front_end_that_disconnects_mid_flight_costs_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        device = Device()
        device.gate.clear()
        async with device_server(device, max_batch=1) as server:
            _, writer = await asyncio.open_unix_connection(server.path)
            writer.write(b"".join(encode_request(i, JpegBatch([b"d"]), 5.0) for i in range(1, 21)))
            await writer.drain()
            await wait_until(device.started.is_set)  # the first is on the device, the others queued
            writer.transport.abort()
            await asyncio.sleep(0.05)
            device.gate.set()
            # A Unix socket shows a closed peer as EOF, like a half-close: the device process goes on
            # with what was sent until its first answer cannot be written, then drops the rest.
            await wait_until(lambda: server.connections == 0)
            other = DeviceClient(server.path)
            assert (await other.infer(JpegBatch([b"o" * 4]), 5.0))[0, 0] == 4
            assert device.requests < 10, "the gone front end's queued requests still reached the device"
            other.close()

    caplog.set_level(logging.WARNING)
    run(main())
    assert not [r for r in caplog.records if r.name.startswith(("model_server", "asyncio"))], caplog.text


def test_a_front_end_that_stops_sending_still_gets_every_answer() -> None:
    async def main() -> None:
        device = Device()
        device.gate.clear()
        async with device_server(device) as server:
            reader, writer = await asyncio.open_unix_connection(server.path)
            writer.write(b"".join(encode_request(i, JpegBatch([b"e" * i]), 5.0) for i in range(1, 4)))
            writer.write_eof()  # half-close: no more requests, answers still welcome
            await asyncio.sleep(0.05)
            device.gate.set()
            got = sorted([(await read_response(reader))[0] for _ in range(3)])
            assert got == [1, 2, 3]
            assert await reader.read() == b""  # then the device process closes its end
            writer.close()

    run(main())


def test_a_front_end_that_does_not_read_is_answered_once_it_does() -> None:
    async def main() -> None:
        async with device_server(max_batch=64, max_queue=4096) as server:
            reader, writer = await asyncio.open_unix_connection(server.path)
            count = 3000  # ~12 MB of answers: more than the socket and the write high-water mark hold
            writer.write(b"".join(encode_request(i, JpegBatch([b"p"]), 30.0) for i in range(count)))
            await writer.drain()
            await asyncio.sleep(0.5)
            ids = set()
            for _ in range(count):
                req_id, status, _, _ = await read_response(reader)
                assert status == OK
                ids.add(req_id)
            assert ids == set(range(count))
            writer.close()

    run(main())


def test_control_frames() -> None:
    def control(op: dict[str, Any]) -> dict[str, Any]:
        if op.get("op") == "get":
            raise KeyError(f"no profiler capture {op.get('id')!r}")
        if op.get("op") != "start":
            raise ValueError("unknown profiler operation")
        return {"id": "c1", "state": "pending"}

    async def main() -> None:
        async with device_server(control=control) as server:
            client = DeviceClient(server.path)
            assert await client.control({"op": "start"}) == {"id": "c1", "state": "pending"}
            with pytest.raises(KeyError, match="no profiler capture 'zz'"):
                await client.control({"op": "get", "id": "zz"})
            with pytest.raises(BadInput, match="unknown profiler operation"):
                await client.control({"op": "nope"})
            # Control and inference requests interleave on one connection.
            out, ctl = await asyncio.gather(client.infer(JpegBatch([b"i" * 5]), 5.0), client.control({"op": "start"}))
            assert out[0, 0] == 5 and ctl["id"] == "c1"
            client.close()
        async with device_server() as server:
            client = DeviceClient(server.path)
            with pytest.raises(BadInput, match="no control requests"):
                await client.control({"op": "start"})
            client.close()

    run(main())


def test_the_client_fails_over_when_the_device_process_goes(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        folder = tempfile.mkdtemp(prefix="ipc-test-")
        path = os.path.join(folder, "device.sock")

        async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(REQ.size)
            writer.write(RESP.pack(1, OK, 1, 100))  # half an answer, then the process is gone
            writer.transport.abort()

        server = await asyncio.start_unix_server(dying, path=path)
        try:
            client = DeviceClient(path)
            with pytest.raises(Overloaded, match="device process is gone"):
                await client.infer(JpegBatch([b"x"]), 5.0)
            with pytest.raises(Overloaded):
                await client.infer(JpegBatch([b"x"]), 5.0)
        finally:
            server.close()
            shutil.rmtree(folder)

    caplog.set_level(logging.ERROR, logger="model_server.ipc")
    run(main())
    assert "lost the device process" in caplog.text


def test_the_request_frame_format_is_unchanged() -> None:
    frame = encode_request(7, JpegBatch([b"ab", b"cde"]), 1.5)
    assert frame == REQ.pack(7, 0, 2, 1.5, 8, 5) + struct.pack("<2I", 2, 3) + b"abcde"
    t = torch.arange(3 * CROP_SIZE * CROP_SIZE, dtype=torch.float32).reshape(1, 3, CROP_SIZE, CROP_SIZE)
    frame = encode_request(8, t, 2.0)
    assert frame == REQ.pack(8, 1, 1, 2.0, 1, t.numel() * 4) + bytes([1]) + t.numpy().tobytes()
    assert (BAD_INPUT, DEADLINE) == (1, 4)


def test_a_decoded_jpeg_frame_hands_nvjpeg_views_of_one_buffer() -> None:
    images = [b"\xff\xd8first", b"\xff\xd8second!", b"\xff\xd8x"]
    frame = encode_request(3, JpegBatch(images), 1.0)
    meta = frame[REQ.size : REQ.size + 4 * len(images)]
    body = bytearray(frame[REQ.size + len(meta) :])
    batch = decode_request(KIND_JPEG, len(images), meta, body)
    assert isinstance(batch, JpegBatch)
    assert [bytes(d) for d in batch.images] == images
    tensors = batch.encoded()
    assert [bytes(t.numpy()) for t in tensors] == images
    assert all(t.is_contiguous() and t.dtype == torch.uint8 for t in tensors)
    body[0] = 0  # the tensors are views of the frame's body, not copies of it
    assert tensors[0][0].item() == 0


def test_the_body_pool_reuses_a_buffer_only_once_every_view_of_it_is_gone() -> None:
    """BodyPool: a writable view of exactly the size asked, on a buffer rounded up to its step; the
    buffer is handed out again only after the view and every tensor made from it are gone; no more
    than ``max_bytes`` are kept; 0 gives a fresh bytearray each time."""
    from model_server.ipc import BodyPool

    pool = BodyPool(2 * BodyPool.STEP)
    a = pool.take(300_000)
    assert isinstance(a, memoryview) and len(a) == 300_000 and not a.readonly and a.obj is not None
    base = a.obj
    assert len(base) == 2 * BodyPool.STEP  # type: ignore[arg-type]
    a[:3] = b"abc"
    parts = torch.split(torch.frombuffer(a, dtype=torch.uint8), [100_000, 200_000])  # as the decode stage does
    del a
    b = pool.take(300_000)
    assert b.obj is not base and pool.reused == 0, "a tensor still reads the first buffer"  # type: ignore[union-attr]
    assert bytes(parts[0][:3].numpy()) == b"abc"
    del parts
    assert pool.kept_bytes == 2 * BodyPool.STEP
    c = pool.take(400_000)  # same step: the first buffer again, nothing allocated
    assert c.obj is base and pool.reused == 1 and pool.kept_bytes == 0  # type: ignore[union-attr]
    d = pool.take(10)
    del b, c, d  # 2 + 2 + 1 steps come back; 2 fit
    assert pool.kept_bytes <= 2 * BodyPool.STEP
    off = BodyPool(0)
    fresh = off.take(1000)
    assert isinstance(fresh, bytearray) and len(fresh) == 1000


def test_the_body_pool_makes_its_buffers_with_the_allocator_it_is_given() -> None:
    """``alloc`` (the device process passes nvjpeg.pinned_bytes, page-locked): buffers of whole steps made
    by it, handed out as writable views the decode stage's tensors read, reused like bytearrays."""
    from model_server.ipc import BodyPool

    made: list[int] = []

    def alloc(size: int) -> np.ndarray:
        made.append(size)
        return np.zeros(size, dtype=np.uint8)

    pool = BodyPool(4 * BodyPool.STEP, alloc)
    a = pool.take(300_000)
    assert isinstance(a, memoryview) and len(a) == 300_000 and not a.readonly and made == [2 * BodyPool.STEP]
    a[:4] = b"jpeg"
    assert bytes(torch.frombuffer(a, dtype=torch.uint8)[:4].numpy()) == b"jpeg"
    base = a.obj
    del a
    b = pool.take(400_000)
    assert b.obj is base and made == [2 * BodyPool.STEP] and pool.reused == 1


def test_a_body_pool_whose_allocator_fails_hands_out_bytearrays_instead(caplog: pytest.LogCaptureFixture) -> None:
    """Page-locked memory can run out: the allocator's error is logged once, the request still gets a
    writable buffer (a bytearray), and the allocator is not asked again."""
    from model_server.ipc import BodyPool

    calls: list[int] = []

    def alloc(size: int) -> np.ndarray:
        calls.append(size)
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    pool = BodyPool(4 * BodyPool.STEP, alloc)
    with caplog.at_level(logging.WARNING, logger="model_server.ipc"):
        a = pool.take(300_000)
        b = pool.take(600_000)
    assert isinstance(a.obj, bytearray) and isinstance(b.obj, bytearray) and not a.readonly  # type: ignore[union-attr]
    assert calls == [2 * BodyPool.STEP], "not asked again after failing"
    assert sum("plain bytearrays from now on" in r.getMessage() for r in caplog.records) == 1


def test_a_jpeg_frame_whose_lengths_do_not_match_its_body_is_refused() -> None:
    with pytest.raises(BadInput, match="add up to 7 bytes"):
        decode_request(KIND_JPEG, 2, struct.pack("<2I", 3, 4), bytearray(b"abcdefgh"))


@pytest.mark.parametrize("pool_mb", [0, 64])
def test_a_large_body_is_read_into_its_own_buffer_byte_for_byte(monkeypatch: pytest.MonkeyPatch, pool_mb: int) -> None:
    """A body of at least ``_DIRECT_BYTES`` goes straight from the socket into a buffer of its own once
    its header and meta are parsed (no copy out of the read buffer); whatever the cuts between reads,
    every byte arrives in order and the frames around it are still found. With a body pool
    (``--ipc_body_pool_mb``), the buffers come back once answered and the same request sent again
    is read into a reused one, every byte right again."""
    import random

    from model_server import ipc

    direct: list[int] = []

    class Counted(ipc._DirectBody):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            direct.append(len(self.body))

    monkeypatch.setattr(ipc, "_DirectBody", Counted)

    class Recording(Device):
        def __init__(self) -> None:
            super().__init__()
            self.seen: dict[int, list[bytes]] = {}

        def __call__(self, payloads: list[Any]) -> list[torch.Tensor | Exception]:
            for p in payloads:
                if isinstance(p, JpegBatch):
                    images = [bytes(t.numpy()) for t in p.encoded()]
                    self.seen[len(images)] = images
            return super().__call__(payloads)

    rng = random.Random(0)
    images = [rng.randbytes(91_000) for _ in range(32)]  # a 32-JPEG request of VGA photos: 2.9 MB
    exact = [rng.randbytes(ipc._DIRECT_BYTES // 2)] * 2  # a body of exactly the threshold
    pixels = torch.randint(0, 255, (2, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8)  # 301 KB, a tensor body
    device = Recording()

    reused: list[int] = []

    async def main() -> None:
        async with device_server(device, max_batch=64, body_pool_bytes=pool_mb * 2**20) as server:
            reader, writer = await asyncio.open_unix_connection(server.path)
            big = encode_request(1, JpegBatch(images), 5.0)
            body_at = REQ.size + 4 * len(images)
            pieces = [
                big[: REQ.size],  # the header alone
                big[REQ.size : body_at + 100],  # the meta and the body's first bytes
                big[body_at + 100 : 1_500_000],
                big[1_500_000:]
                + encode_request(2, JpegBatch([b"s" * 7]), 5.0)
                + encode_request(3, pixels, 5.0)
                + encode_request(4, JpegBatch([b"t" * 9]), 5.0),
            ]
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)  # each piece its own read
            ex = encode_request(5, JpegBatch(exact), 5.0)
            writer.write(ex[: REQ.size + 8])  # header and meta: the body starts in the next read
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(ex[REQ.size + 8 :])
            got = {}
            for _ in range(5):
                req_id, status, n, data = await read_response(reader)
                assert status == OK, data
                got[req_id] = logits(n, data)[:, 0].tolist()
            assert (
                got[1] == [91_000.0] * 32
                and got[2] == [7.0]
                and got[4] == [9.0]
                and got[5] == [float(ipc._DIRECT_BYTES // 2)] * 2
            )
            assert got[3] == pixels.reshape(2, -1)[:, 0].float().tolist()
            assert device.seen[32] == images and device.seen[2] == exact, "every byte, in order"
            device.seen.clear()
            kept = server.bodies.kept_bytes
            writer.write(big[:1_000_000])  # the same request again, its body cut across reads
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(big[1_000_000:])
            req_id, status, n, data = await read_response(reader)
            assert (req_id, status) == (1, OK) and logits(n, data)[:, 0].tolist() == [91_000.0] * 32
            assert device.seen[32] == images, "a reused buffer holds the new body, every byte"
            reused.append(server.bodies.reused)
            if pool_mb:
                assert kept >= len(big) - body_at, "the answered requests' buffers came back to the pool"
            writer.close()

    run(main())
    assert reused == [1 if pool_mb else 0]
    assert sorted(direct) == sorted([len(big_body) for big_body in (b"".join(images), pixels.numpy().tobytes(),
                                                                     b"".join(exact), b"".join(images))])  # fmt: skip


def test_a_jpeg_frame_carries_each_images_start_of_frame_marker_when_known() -> None:
    """The front end's start-of-frame markers (JpegBatch.frames) cross the IPC after the lengths, and a
    frame without them still decodes (frames None); a meta of any other size is refused as bad input."""
    from model_server.images import gpu_frame

    baseline, progressive = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(baseline, format="JPEG")
    Image.new("RGB", (64, 48), (1, 2, 3)).save(progressive, format="JPEG", progressive=True)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    limits = {"max_pixels": 10**6, "max_bytes": 10**6}
    assert gpu_frame(baseline.getvalue(), **limits) == 0xC0 and gpu_frame(progressive.getvalue(), **limits) == 0xC2
    assert gpu_frame(png.getvalue(), **limits) is None
    assert gpu_frame(baseline.getvalue(), max_pixels=100, max_bytes=10**6) is None
    for images, frames in (([b"a" * 5, b"bb"], b"\xc0\xc2"), ([b"one"], b"\xc0"), ([b"x", b"yy"], None)):
        frame = encode_request(7, JpegBatch(images, frames=frames), 5.0)
        _, kind, n, _, meta_len, body_len = REQ.unpack_from(frame)
        meta = frame[REQ.size : REQ.size + meta_len]
        got = decode_request(kind, n, meta, bytearray(frame[REQ.size + meta_len :]))
        assert isinstance(got, JpegBatch) and got.frames == frames
        assert [bytes(i) for i in got.images] == images and body_len == sum(map(len, images))
    with pytest.raises(BadInput, match="a frame of 2 JPEGs carries 9 bytes of meta; expected 8 or 10"):
        decode_request(KIND_JPEG, 2, b"\0" * 9, bytearray(b"abc"))


def test_admit_sees_each_request_before_the_batcher_does() -> None:
    """``DeviceServer(admit=...)`` (the device process's early JPEG header reads) is called with each
    request's payload, on the event loop, before the payload is queued: what it sets the device sees."""
    seen: list[int] = []

    def admit(payload: Any) -> None:
        seen.append(len(payload))
        if isinstance(payload, JpegBatch):
            payload.frames = bytes([0xC0] * len(payload))  # a mark the device function can check

    marked: list[bool] = []

    class Marking(Device):
        def __call__(self, payloads: list[Any]) -> list[torch.Tensor | Exception]:
            marked.extend(isinstance(p, JpegBatch) and p.frames == bytes([0xC0] * len(p)) for p in payloads)
            return super().__call__(payloads)

    async def main() -> None:
        async with device_server(Marking(), admit=admit) as server:
            client = DeviceClient(server.path)
            out = await client.infer(JpegBatch([b"x" * 10, b"y" * 20, b"z" * 5]), 5.0)
            assert out.shape == (3, NUM_CLASSES) and (out[:, 0] == np.array([10, 20, 5])).all()
            await client.infer(JpegBatch([b"w" * 7]), 5.0)
            client.close()

    run(main())
    assert seen == [3, 1] and marked == [True, True]
