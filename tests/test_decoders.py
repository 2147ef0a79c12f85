"""Decode worker processes (``--decode_workers``): real spawned workers, real sockets and shared memory.

On the CPU here (the workers decode with torchvision's CPU decoder into a shared-memory ring);
tests/test_gpu.py runs the same on CUDA (nvJPEG in each worker, the ring through CUDA IPC).
"""

from __future__ import annotations

import io
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from server_support import build_artifacts

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), colour)
    img.paste((255 - colour[0], 40, 200), (w // 4, h // 4, w // 2, h // 2))
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _encoded(datas: list[bytes]) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]


def _local(encoded: list[torch.Tensor]) -> torch.Tensor:
    from model_server.preprocess import decode_jpegs, gpu_resize_crop_many

    return gpu_resize_crop_many(decode_jpegs(encoded, torch.device("cpu")))


JPEGS = [_jpeg(320 + 16 * (i % 3), 240, (30 * i % 256, 90, 160)) for i in range(7)] + [_jpeg(240, 320, (9, 9, 9))]


@pytest.fixture(scope="module")
def workers() -> Iterator:  # type: ignore[type-arg]
    from model_server.decoders import DecodeWorkers

    pool = DecodeWorkers(2, torch.device("cpu"), max_batch=16, min_images=4)
    try:
        assert pool.wait_ready(120) == 2, pool.stats()
        yield pool
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("sizes", "parts", "want"),
    [
        ([10] * 6, 3, [(0, 2), (2, 4), (4, 6)]),
        ([10, 10, 100, 10], 2, [(0, 2), (2, 4)]),  # the big one's middle is past half the bytes: second share
        ([5, 5], 3, [(0, 1), (1, 1), (1, 2)]),  # fewer JPEGs than shares: one share is empty
        ([], 2, [(0, 0), (0, 0)]),
    ],
)
def test_shares_are_contiguous_and_about_equal_in_bytes(sizes: list[int], parts: int, want: list) -> None:  # type: ignore[type-arg]
    from model_server.decoders import split_shares

    got = split_shares(sizes, parts)
    assert got == want
    assert got[0][0] == 0 and got[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(got))


def test_workers_decode_their_shares_to_the_same_crops_in_order(workers) -> None:  # type: ignore[no-untyped-def]
    encoded = _encoded(JPEGS)
    before = workers.stats()
    for _ in range(4):  # more batches than ring slots: each slot comes round again
        crops = workers.decode(encoded, _local)
        assert crops is not None and crops.shape == (8, 3, 224, 224) and crops.dtype == torch.uint8
        assert torch.equal(crops, _local(encoded))
    after = workers.stats()
    # Three shares of about equal bytes: this process and each worker decoded part of every batch.
    by_worker = [a - b for a, b in zip(after["worker_images"], before["worker_images"], strict=True)]
    here = after["local_images"] - before["local_images"]
    assert all(n >= 4 for n in by_worker) and here >= 4 and sum(by_worker) + here == 4 * 8


def test_small_batches_stay_in_the_device_process(workers) -> None:  # type: ignore[no-untyped-def]
    before = workers.stats()
    assert workers.decode(_encoded(JPEGS[:3]), _local) is None  # below min_images: the caller decodes
    assert workers.stats() == before


def test_a_jpeg_a_worker_cannot_decode_fails_the_call_and_the_workers_keep_serving(workers) -> None:  # type: ignore[no-untyped-def]
    bad = [*JPEGS[:6], b"\xff\xd8\xff" + b"\0" * 200, JPEGS[7]]  # in the last worker's share
    with pytest.raises(RuntimeError, match="could not be decoded"):
        workers.decode(_encoded(bad), _local)
    encoded = _encoded(JPEGS)
    crops = workers.decode(encoded, _local)
    assert crops is not None and torch.equal(crops, _local(encoded))
    assert workers.stats()["ready"] == [True, True]


def test_the_pipeline_shares_a_large_batch_and_fails_only_the_bad_request(workers, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from model_server import BadInput
    from model_server.artifact import read_manifest
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp32")
    d = tmp_path / "densenet121-eager-fp32"
    runner = load_runner(read_manifest(d), d, torch.device("cpu"))
    alone, shared = DevicePipeline(runner), DevicePipeline(runner, decoders=workers)
    payloads = [JpegBatch(JPEGS[:3]), JpegBatch(JPEGS[3:8])]
    before = workers.stats()["worker_images"]
    want, got = alone.prepare(payloads), shared.prepare(payloads)
    assert got.whole is not None and want.whole is not None and torch.equal(got.whole, want.whole)
    assert sum(workers.stats()["worker_images"]) > sum(before)
    corrupt = JpegBatch([b"\xff\xd8\xff" + b"\0" * 100])
    staged = shared.prepare([JpegBatch(JPEGS[:4]), corrupt, JpegBatch(JPEGS[4:])])
    assert isinstance(staged.failed.get(1), BadInput), "a corrupt JPEG fails only its own request"
    assert torch.equal(staged.parts[0], want.whole[:4]) and torch.equal(staged.parts[2], want.whole[4:])


def test_a_worker_that_dies_is_dropped_and_its_share_decoded_here() -> None:
    from model_server.decoders import DecodeWorkers

    pool = DecodeWorkers(2, torch.device("cpu"), max_batch=16, min_images=2)
    try:
        assert pool.wait_ready(120) == 2
        os.kill(pool.workers[1].process.pid, signal.SIGKILL)
        pool.workers[1].process.join(10)
        encoded = _encoded(JPEGS)
        crops = pool.decode(encoded, _local)
        assert crops is not None and torch.equal(crops, _local(encoded))
        assert pool.stats()["ready"] == [True, False]
        crops = pool.decode(encoded, _local)  # next batch: shared between this process and the live worker
        assert crops is not None and torch.equal(crops, _local(encoded))
    finally:
        pool.close()
    assert not any(w.process.is_alive() for w in pool.workers)


def test_a_worker_that_cannot_start_is_dropped() -> None:
    from model_server.decoders import DecodeWorkers

    pool = DecodeWorkers(1, torch.device("cuda:99"), 4)  # no such device: the worker's start-up fails
    try:
        assert pool.wait_ready(120) == 0
        assert pool.decode(_encoded(JPEGS[:4] * 4), _local) is None  # nobody to share with: decoded here
    finally:
        pool.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--decode_workers", "-1"], "--decode_workers must be >= 0"),
        (["--decode_workers_min_images", "0"], "--decode_workers_min_images >= 1"),
    ],
)
def test_bad_decode_worker_flags_are_refused(flags: list[str], message: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "model_server", "--model_dir", str(tmp_path), *flags],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and message in out.stderr, out.stderr
