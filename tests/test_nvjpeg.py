"""The nvJPEG decoder pool (``model_server/nvjpeg.py``): how a batch is split, what happens where it
cannot run (here: no GPU), and on a GPU that it decodes what torchvision's decoder does."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model_server import nvjpeg
from model_server.preprocess import decode_jpegs

ROOT = Path(__file__).resolve().parents[1]


def test_a_batch_is_split_in_contiguous_parts_of_about_equal_bytes() -> None:
    assert nvjpeg.split_by_bytes([10] * 8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert nvjpeg.split_by_bytes([1, 1, 100], 2) == [[0, 1], [2]]  # the large one alone
    assert nvjpeg.split_by_bytes([5], 4) == [[0]]  # never more parts than images
    assert nvjpeg.split_by_bytes([], 4) == []
    for sizes, n in (([3, 1, 4, 1, 5, 9, 2, 6], 3), ([100, 1, 1, 1], 4), ([7] * 5, 5)):
        parts = nvjpeg.split_by_bytes(sizes, n)
        assert [i for p in parts for i in p] == list(range(len(sizes))) and all(parts) and len(parts) <= n


def test_without_a_gpu_there_is_no_pool_and_torchvision_decodes(caplog: pytest.LogCaptureFixture) -> None:
    assert nvjpeg.pool_for(torch.device("cpu"), 4) is None
    assert nvjpeg.pool_for(torch.device("cuda"), 1) is None  # one decoder: torchvision's
    if torch.cuda.is_available():
        return
    nvjpeg.pool_for.cache_clear()
    with caplog.at_level(logging.WARNING, logger="model_server.nvjpeg"):
        assert nvjpeg.pool_for(torch.device("cuda"), 4) is None
    assert "decoder pool unavailable" in caplog.text and "torchvision's single decoder decodes" in caplog.text
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 100, 50)).save(buf, format="JPEG")
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    (image,) = decode_jpegs([data], torch.device("cpu"), decoders=4)  # the CPU path ignores the pool
    assert image.shape == (3, 30, 40)


def test_decoders_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="decoders must be >= 1, got 0"):
        nvjpeg.DecoderPool(torch.device("cuda"), 0)
    proc = subprocess.run([sys.executable, "-m", "model_server", "--model_dir", "x", "--decoders", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--decoders must be >= 1" in proc.stderr


def _photos() -> list[bytes]:
    from loadtest._payloads import photo_set

    return [p.jpeg for p in photo_set("vga")] + [p.jpeg for p in photo_set("fhd")][:2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with nvJPEG")
def test_the_pool_decodes_what_torchvisions_decoder_does() -> None:
    """Hardware-decoded by four decoders at once, byte for byte torchvision's (the same hardware),
    a progressive JPEG among them left to torchvision, and a broken stream fails the call."""
    device = torch.device("cuda")
    photos = _photos()
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="JPEG", progressive=True)
    datas = [*photos, buf.getvalue(), *photos]
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    pool = nvjpeg.pool_for(device, 4)
    assert pool is not None and len(pool) == 4
    images, rest = pool.decode(encoded)
    assert rest == [len(photos)]  # the progressive one
    mine = decode_jpegs(encoded, device, decoders=4)
    theirs = decode_jpegs(encoded, device)
    assert len(mine) == len(theirs) == len(datas)
    for a, b, img in zip(mine, theirs, images, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)
        assert img is None or torch.equal(img, a)
    with pytest.raises(RuntimeError):
        decode_jpegs([encoded[0], torch.frombuffer(bytearray(b"\xff\xd8\xff" + b"\0" * 100), dtype=torch.uint8)],
                     device, decoders=4)  # fmt: skip
