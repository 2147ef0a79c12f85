"""Decode worker processes: more JPEG decoders for the device process (``--decode_workers K``).

torchvision's batched nvJPEG decode is one decoder per process. On the H100 one process decoded
14,975-18,418 VGA JPEGs/s with the hardware JPEG engines 69-73 % busy, four processes 31,466/s at
100 % (``benchmarks/decode_bench.py --processes``), and several decoders in one process (one per
thread) decoded fewer (session 14). Served end to end, a batch of 126 JPEGs took 14 ms to decode
and crop against 5.8 ms on the model: requests of 32 JPEGs were bound by that one decoder.

So the device process can hand part of each large batch to K worker processes, each with its own
CUDA context and nvJPEG decoder:

- A worker is spawned while the device process loads its model, imports torch, warms its decoder
  (batch 1 and 8, and one 12 MP photo) and allocates a ring of crop buffers on the device,
  ``[SLOTS, max_batch, 3, 224, 224]`` uint8, which it hands to the device process once (CUDA IPC
  through ``torch.multiprocessing``; shared memory on a CPU). Ready does not wait for workers:
  until a worker has handed its ring over, the device process decodes its share itself.
- Per batch of at least ``min_images`` JPEGs, the device process splits the JPEGs into contiguous
  shares of about equal bytes (its own first, one per worker), sends each worker its share (one
  frame over a socketpair: slot, lengths, bytes; no pickling), decodes its own share meanwhile,
  then reads each worker's answer. A worker decodes, resizes and crops into ring slot ``s``, waits
  for its stream (so the pixels are in device memory before it answers) and answers; the device
  process concatenates the crops on its own stream, in order.
- Slots go round a ring of :data:`SLOTS`: the batcher holds at most two batches between prepare
  and the end of their run (``max_inflight_batches``), so a slot is read (the concatenation is
  ordered before the model on the device) before it is written again.
- A JPEG a worker cannot decode fails the call (``RuntimeError``, as the one-process decode does):
  the pipeline then decodes each request alone, so only the bad request fails. A worker that dies
  or stops answering (``REPLY_TIMEOUT_S``) is dropped with a warning and its share decoded here.

Each worker costs a CUDA context and nvJPEG's buffers on the GPU (hundreds of MB) and a process
with torch imported; see the README for what it measured.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

from model_server import metrics as m
from optimize.registry import CROP_SIZE

log = logging.getLogger(__name__)

#: Ring slots per worker: the batcher's two batches in flight, and one to spare.
SLOTS = 3
#: Longest wait for a worker's answer before it is dropped (128 12-MP photos decode in well under 1 s).
REPLY_TIMEOUT_S = 30.0
#: Request to a worker: slot, images, bytes of JPEG data; then ``n`` uint32 lengths and the data.
_REQ = struct.Struct("<IIQ")
#: Answer: slot, images, status (0 ok, 1 a JPEG it could not decode), message bytes; then the message.
_REP = struct.Struct("<IIII")


def split_shares(sizes: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` ranges of ``sizes`` (bytes per JPEG), ``parts`` of them (the last ones
    possibly empty), each ending where the running total first reaches its equal share of the bytes."""
    total = sum(sizes)
    bounds, start, acc = [], 0, 0
    for k in range(1, parts):
        target = total * k / parts
        stop = start
        while stop < len(sizes) and acc + sizes[stop] / 2 <= target:  # a JPEG goes where its middle falls
            acc += sizes[stop]
            stop += 1
        bounds.append((start, stop))
        start = stop
    bounds.append((start, len(sizes)))
    return bounds


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view`` from ``sock``; False when the other end closed first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


class _Worker:
    """The device process's end of one worker: its process, socket, and (once it is warm) its ring."""

    def __init__(self, index: int, process: Any, sock: socket.socket, handoff: Any) -> None:
        self.index = index
        self.process = process
        self.sock = sock
        self.handoff = handoff
        self.ring: torch.Tensor | None = None
        self.dead = False
        self.images = 0


class DecodeWorkers:
    """K decode worker processes and the split of a batch's JPEGs between them and this process.

    Args:
        count: worker processes (each its own CUDA context and nvJPEG decoder).
        device: the serving device; the workers decode on it (a CPU works too: tests).
        max_batch: most JPEGs in one batch (a worker's ring holds that many crops per slot).
        min_images: batches with fewer JPEGs are decoded by the device process alone.
    """

    def __init__(self, count: int, device: torch.device, max_batch: int, *, min_images: int = 16) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        if max_batch < 1 or min_images < 1:
            raise ValueError(f"max_batch and min_images must be >= 1, got {max_batch} and {min_images}")
        import torch.multiprocessing as tmp

        self.device = device
        self.max_batch = max_batch
        self.min_images = min_images
        self.local_images = 0
        self._slot = 0
        self._started = time.perf_counter()
        self._lock = threading.Lock()  # decode() runs on one thread at a time; close() may come from another
        ctx = tmp.get_context("spawn")
        self.workers: list[_Worker] = []
        for i in range(count):
            mine, theirs = socket.socketpair()
            handoff = ctx.SimpleQueue()
            proc = ctx.Process(
                target=worker_main, args=(theirs, handoff, str(device), max_batch), name=f"decode-{i}", daemon=True
            )
            proc.start()
            theirs.close()
            mine.settimeout(REPLY_TIMEOUT_S)
            self.workers.append(_Worker(i, proc, mine, handoff))

    def ready(self) -> list[_Worker]:
        """The workers that are warm and alive (a worker's ring is taken over the first time it is there)."""
        out = []
        for w in self.workers:
            if w.dead:
                continue
            if w.ring is None and w.handoff.empty():
                if not w.process.is_alive():
                    log.warning("decode worker %d exited (code %s) before it was ready; decoding without it",
                                w.index, w.process.exitcode)  # fmt: skip
                    self._drop(w)
                continue
            if w.ring is None:
                got = w.handoff.get()
                if isinstance(got, str):  # the worker failed to start: its traceback
                    log.warning("decode worker %d failed to start; decoding without it:\n%s", w.index, got)
                    self._drop(w)
                    continue
                w.ring = got
                log.info("decode worker %d ready %.2fs after it was started", w.index,
                         time.perf_counter() - self._started)  # fmt: skip
            if w.ring is not None:
                out.append(w)
        return out

    def wait_ready(self, timeout_s: float) -> int:
        """Wait until every worker is warm (or gone) or ``timeout_s`` passes; returns how many are ready."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            ready = self.ready()
            if len(ready) == sum(not w.dead for w in self.workers):
                return len(ready)
            time.sleep(0.05)
        return len(self.ready())

    def decode(
        self, encoded: list[torch.Tensor], local: Callable[[list[torch.Tensor]], torch.Tensor]
    ) -> torch.Tensor | None:
        """Crops ``[n,3,224,224]`` uint8 of ``encoded`` (JPEG bytes as uint8 CPU tensors) in order, shared
        between this process (``local``: decode and crop a list here) and the ready workers; None when
        the batch is below ``min_images`` or no worker is ready (the caller decodes it alone).

        Raises:
            RuntimeError: a JPEG could not be decoded (here or in a worker).
        """
        if len(encoded) < self.min_images or len(encoded) > self.max_batch:
            return None
        with self._lock:
            workers = self.ready()
            if not workers:
                return None
            slot = self._slot
            self._slot = (slot + 1) % SLOTS
            shares = split_shares([int(t.numel()) for t in encoded], len(workers) + 1)
            sent: list[tuple[_Worker, tuple[int, int]]] = []
            for w, (a, b) in zip(workers, shares[1:], strict=True):
                if b > a and self._send(w, slot, encoded[a:b]):
                    sent.append((w, (a, b)))
            a0, b0 = shares[0]
            pieces: list[torch.Tensor | None] = [None] * len(shares)
            failure: str | None = None
            if b0 > a0:
                try:
                    pieces[0] = local(encoded[a0:b0])
                except RuntimeError as e:
                    failure = str(e)  # still read every answer: the workers' slots and sockets stay in step
            self.local_images += b0 - a0
            done = {w.index: self._answer(w, slot, b - a) for w, (a, b) in sent}
            by_workers = 0
            for k, (w, (a, b)) in enumerate(zip(workers, shares[1:], strict=True), start=1):
                if b == a:
                    continue
                got = done.get(w.index)
                if isinstance(got, torch.Tensor):
                    pieces[k] = got
                    w.images += b - a
                    by_workers += b - a
                elif isinstance(got, str):
                    failure = failure or got
                elif failure is None:  # gone: its share here
                    try:
                        pieces[k] = local(encoded[a:b])
                    except RuntimeError as e:
                        failure = str(e)
                    self.local_images += b - a
            if failure is not None:
                raise RuntimeError(failure)
            m.later(m.DECODED_IMAGES.labels(decoder="workers").inc, by_workers)
            m.later(m.DECODED_IMAGES.labels(decoder="device_process").inc, len(encoded) - by_workers)
            return torch.cat([p for p in pieces if p is not None])

    def _send(self, w: _Worker, slot: int, share: list[torch.Tensor]) -> bool:
        lengths = struct.pack(f"<{len(share)}I", *(int(t.numel()) for t in share))
        data = b"".join([t.numpy().data for t in share])
        try:
            w.sock.sendall(_REQ.pack(slot, len(share), len(data)) + lengths)
            w.sock.sendall(data)
            return True
        except OSError as e:
            log.warning("decode worker %d cannot be reached (%s); decoding without it", w.index, e)
            self._drop(w)
            return False

    def _answer(self, w: _Worker, slot: int, n: int) -> torch.Tensor | str | None:
        """The worker's crops (a view of its ring), a decode error's message, or None: it is gone."""
        head = bytearray(_REP.size)
        try:
            if not _recv_exact(w.sock, memoryview(head)):
                raise ConnectionError("it closed its socket")
            r_slot, r_n, status, msg_len = _REP.unpack(head)
            msg = bytearray(msg_len)
            if msg_len and not _recv_exact(w.sock, memoryview(msg)):
                raise ConnectionError("it closed its socket")
        except OSError as e:  # includes the timeout
            log.warning("decode worker %d did not answer (%s); decoding without it", w.index, e)
            self._drop(w)
            return None
        if (r_slot, r_n) != (slot, n):
            log.warning("decode worker %d answered slot %d of %d, not %d of %d; dropped", w.index, r_slot, r_n, slot, n)
            self._drop(w)
            return None
        if status:
            return msg.decode(errors="replace")
        assert w.ring is not None
        return w.ring[slot, :n]

    def _drop(self, w: _Worker) -> None:
        w.dead = True
        w.ring = None
        with contextlib.suppress(OSError):
            w.sock.close()
        if w.process.is_alive():
            w.process.terminate()

    def stats(self) -> dict[str, Any]:
        """Images decoded here and by each worker, and which workers are ready."""
        return {
            "local_images": self.local_images,
            "worker_images": [w.images for w in self.workers],
            "ready": [w.ring is not None and not w.dead for w in self.workers],
        }

    def close(self) -> None:
        """Stop every worker (each also exits when its socket closes, e.g. when this process dies)."""
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.sock.close()
            w.ring = None
        for w in self.workers:
            w.process.join(timeout=5)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(timeout=5)
            w.handoff.close()


def worker_main(sock: socket.socket, handoff: Any, device_name: str, max_batch: int) -> None:
    """A decode worker's process: warm up, hand the ring over, then decode shares until the socket closes."""
    try:
        torch.set_num_threads(1)
        from model_server.preprocess import decode_jpegs, gpu_resize_crop_many, image_ops, warm_gpu_decoder

        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            image_ops()
            stream: torch.cuda.Stream | None = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        else:
            stream = None
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            warm_gpu_decoder(device)
            ring = torch.empty((SLOTS, max_batch, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8, device=device)
        if device.type == "cpu":
            ring.share_memory_()  # type: ignore[no-untyped-call]
        else:
            torch.cuda.synchronize(device)
    except Exception:
        handoff.put(traceback.format_exc())
        return
    handoff.put(ring)
    head = bytearray(_REQ.size)
    buf = bytearray(1 << 20)
    while True:
        if not _recv_exact(sock, memoryview(head)):
            return  # the device process closed its end (or died)
        slot, n, nbytes = _REQ.unpack(head)
        lengths_raw = bytearray(4 * n)
        if not _recv_exact(sock, memoryview(lengths_raw)):
            return
        if nbytes > len(buf):
            buf = bytearray(nbytes)
        if not _recv_exact(sock, memoryview(buf)[:nbytes]):
            return
        lengths = struct.unpack(f"<{n}I", lengths_raw)
        encoded, off = [], 0
        for length in lengths:
            encoded.append(torch.frombuffer(buf, dtype=torch.uint8, count=length, offset=off))
            off += length
        status, msg = 0, b""
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                ring[slot, :n].copy_(gpu_resize_crop_many(decode_jpegs(encoded, device)))
            if stream is not None:
                stream.synchronize()  # the pixels are in device memory before the device process reads them
        except RuntimeError as e:
            status, msg = 1, f"JPEG could not be decoded: {e}".encode()
        try:
            sock.sendall(_REP.pack(slot, n, status, len(msg)) + msg)
        except OSError:
            return


__all__ = ["SLOTS", "DecodeWorkers", "split_shares", "worker_main"]
