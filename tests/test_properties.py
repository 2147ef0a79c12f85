"""Property-based tests (hypothesis) of the decoding path: whatever the bytes or JSON, the result
is either a well-formed model input or a typed ``BadInput`` naming the problem, never another
exception (which the server would turn into a 500).

The v2 parser tests import kserve, whose Open Inference Protocol protobufs clash with
tritonclient's copy (the same symbols registered twice in one process): they run in a child
pytest process of their own (``test_v2_parser_properties``) so the tritonclient gRPC tests of
the other modules keep working in this one.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from model_server import BadInput
from model_server.preprocess import decode_and_crop

# Modest: the CPU is shared with the other suites.
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODES = ("RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16", "I", "F")
FORMATS = {  # format: modes PIL can write in it
    "JPEG": ("RGB", "L", "CMYK"),
    "PNG": ("RGB", "RGBA", "L", "LA", "P", "1", "I;16"),
    "GIF": ("P", "L"),
    "BMP": ("RGB", "L", "P", "1"),
    "TIFF": ("RGB", "RGBA", "L", "CMYK", "1", "I;16", "F"),
    "WEBP": ("RGB", "RGBA"),
}


def _image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        out = rgb.convert("RGBA")
        out.putalpha(Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L"))
        return out
    if mode == "LA":
        return _image("RGBA", size, seed).convert("LA")
    if mode == "I;16":
        return rgb.convert("L").convert("I;16")
    return rgb.convert(mode)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@st.composite
def valid_images(draw: st.DrawFn) -> tuple[bytes, tuple[int, int]]:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    w = draw(st.integers(1, 600))
    h = draw(st.integers(max(1, w // 64 + (w % 64 > 0)), min(600, w * 64)))
    return _encode(_image(mode, (w, h), draw(st.integers(0, 2**16))), fmt), (w, h)


def _bases() -> list[bytes]:
    img = _image("RGB", (64, 48), 0)
    return [_encode(img.convert(m), f) for f, modes in FORMATS.items() for m in modes[:2]]


BASES = _bases()


@st.composite
def corrupted_images(draw: st.DrawFn) -> bytes:
    """A valid image with bytes flipped, inserted or cut: reaches deep into the decoders."""
    data = bytearray(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(("flip", "insert", "delete", "max")))
        if op == "flip":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 64))]
        else:  # a size or length field set to its maximum
            data[i : i + 2] = b"\xff\xff"
        if not data:
            data = bytearray(b"\x00")
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


def _check_decode(data: bytes) -> None:
    try:
        out = decode_and_crop(data, max_pixels=4_000_000)
    except BadInput as e:
        assert str(e)
        return
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8


@FEW
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_bad_input(data: bytes) -> None:
    _check_decode(data)


@SOME
@given(corrupted_images())
def test_corrupted_images_decode_or_bad_input(data: bytes) -> None:
    _check_decode(data)


@FEW
@given(valid_images())
def test_valid_images_of_any_size_and_mode_give_a_224_crop(case: tuple[bytes, tuple[int, int]]) -> None:
    data, _ = case
    out = decode_and_crop(data)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8


@FEW
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
def test_flat_colour_survives_decode(w: int, h: int, r: int, g: int, b: int) -> None:
    """Any size (1x1 included, resized up) of a flat colour stays that colour: no channel swap, no shift."""
    assume(max(w, h) <= 64 * min(w, h))
    out = decode_and_crop(_encode(Image.new("RGB", (w, h), (r, g, b)), "PNG"))
    assert out[:, 112, 112].tolist() == [r, g, b]


# -- v2 bodies (in a child process: they import kserve) ---------------------------------------------

CHILD_ENV = "DENSENET_KSERVE_PROPERTIES"
in_child = pytest.mark.skipif(os.environ.get(CHILD_ENV) != "1", reason="runs in the child of test_v2_parser_properties")


def test_v2_parser_properties() -> None:
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "v2_ and not parser"]
    proc = subprocess.run(
        cmd,
        cwd=Path(__file__).parents[1],
        env={**os.environ, CHILD_ENV: "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-500:]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
DATATYPES = ("BYTES", "FP32", "FP16", "UINT8", "INT32", "fp32", "", "BOOL")


@st.composite
def v2_docs(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-shaped v2 requests with hostile values in every field."""
    spec: dict[str, Any] = {}
    for key, strategy in (
        ("name", st.sampled_from(["image", "input"]) | json_values),
        ("datatype", st.sampled_from(DATATYPES) | json_values),
        ("shape", st.lists(st.integers(-2, 300_000), max_size=5) | json_values),
        ("data", st.lists(json_values, max_size=8) | json_values),
        ("parameters", st.fixed_dictionaries({}, optional={"binary_data_size": json_values}) | json_values),
    ):
        if draw(st.integers(0, 9)) > 0:
            spec[key] = draw(strategy)
    doc: dict[str, Any] = {"inputs": draw(st.lists(st.just(spec), min_size=0, max_size=2) | json_values)}
    for key in ("outputs", "parameters", "id"):
        if draw(st.booleans()):
            doc[key] = draw(json_values | st.lists(st.fixed_dictionaries({"name": json_values}), max_size=3))
    return doc


def _check_v2(body: bytes, header_length: str | None) -> None:
    from model_server.predictor import TENSOR_DTYPES, _bytes_items, _tensor_input
    from model_server.rest import parse_v2_body

    try:
        request = parse_v2_body(body, header_length, "densenet121")
        for inp in request.inputs:
            if inp.datatype == "BYTES":
                _bytes_items(inp)
            elif inp.datatype in TENSOR_DTYPES:
                _tensor_input(inp, 4)
    except BadInput as e:
        assert str(e)


@in_child
@SOME
@given(v2_docs())
def test_v2_json_bodies_parse_or_bad_input(doc: dict[str, Any]) -> None:
    try:
        body = json.dumps(doc).encode()
    except (ValueError, OverflowError):
        return
    _check_v2(body, None)


@in_child
@SOME
@given(v2_docs(), st.binary(max_size=64), st.one_of(st.none(), st.integers(-5, 400).map(str), st.text(max_size=5)))
def test_v2_binary_bodies_parse_or_bad_input(doc: dict[str, Any], tail: bytes, header_length: str | None) -> None:
    head = json.dumps(doc).encode()
    if header_length is None:
        header_length = str(len(head))
    _check_v2(head + tail, header_length)


@in_child
@FEW
@given(st.binary(max_size=512), st.one_of(st.none(), st.integers(-5, 600).map(str)))
def test_v2_random_bytes_parse_or_bad_input(body: bytes, header_length: str | None) -> None:
    _check_v2(body, header_length)


@in_child
@pytest.mark.parametrize("n", [1, 3])
def test_v2_binary_bytes_round_trip(n: int) -> None:
    """The property's positive side: a well-formed binary BYTES body yields the exact images."""
    from model_server.predictor import _bytes_items
    from model_server.rest import parse_v2_body

    images = [bytes([i]) * (10 + i) for i in range(n)]
    blob = b"".join(struct.pack("<I", len(d)) + d for d in images)
    head = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": len(blob)}}
            ]
        }
    ).encode()
    request = parse_v2_body(head + blob, str(len(head)), "densenet121")
    assert _bytes_items(request.inputs[0]) == images


@in_child
@SOME
@given(st.integers(0, 4), st.binary(max_size=80))
def test_v2_binary_bytes_framing_parse_or_bad_input(n: int, blob: bytes) -> None:
    """BYTES elements whose 4-byte length prefixes lie about the rest of the tensor."""
    head = json.dumps(
        {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [n], "parameters": {"binary_data_size": len(blob)}}
            ]
        }
    ).encode()
    _check_v2(head + blob, str(len(head)))


def _pil_gpu_rule(data: bytes) -> bool:
    """The rule gpu_decodable used to apply by opening the image with PIL (the reference here)."""
    from model_server.images import MAX_ASPECT_RATIO

    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            w, h = img.size
            return img.mode in ("RGB", "L") and 0 < w * h <= 4_000_000 and max(w, h) <= MAX_ASPECT_RATIO * min(w, h)
    except Exception:
        return False


@SOME
@given(valid_images())
def test_jpeg_frame_header_agrees_with_pil(case: tuple[bytes, tuple[int, int]]) -> None:
    """The marker walk reads the same size as PIL, and sends to nvJPEG exactly what the PIL rule sent."""
    from model_server.images import gpu_decodable, jpeg_frame

    data, (w, h) = case
    frame = jpeg_frame(data)
    if data[:2] == b"\xff\xd8":
        assert frame is not None and frame[1:3] == (w, h)
    else:
        assert frame is None
    assert gpu_decodable(data, max_pixels=4_000_000, max_bytes=10**8) == _pil_gpu_rule(data)


@SOME
@given(corrupted_images())
def test_jpeg_frame_header_never_raises_on_corrupt_input(data: bytes) -> None:
    from model_server.images import gpu_decodable

    accepted = gpu_decodable(data, max_pixels=4_000_000, max_bytes=10**8)
    if accepted:  # whatever the walk accepts, PIL reads as a JPEG frame of that size too (or fails decoding later)
        assert data[:2] == b"\xff\xd8"


def test_numpy_top_k_matches_torch() -> None:
    """The front ends' softmax/top-k is numpy (no torch there): the same probabilities and classes
    as torch's, largest first. In a fresh process: KServe's protobuf modules, which the predictor
    module imports, may be imported only once per process."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import numpy as np, torch
from model_server.predictor import _topk
for k in (1, 5, 999, 1000):
    logits = (np.random.default_rng(k).standard_normal((3, 1000)) * 4).astype(np.float32)
    probs, classes = _topk(logits, k)
    want_p, want_c = torch.softmax(torch.from_numpy(logits), dim=1).topk(k, dim=1)
    assert probs.dtype == np.float32 and classes.dtype == np.int64 and probs.shape == classes.shape == (3, k)
    np.testing.assert_array_equal(classes, want_c.numpy())
    np.testing.assert_allclose(probs, want_p.numpy(), rtol=1e-5, atol=1e-7)
print("OK")
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]
