"""Hostile and malformed requests against a real predictor: v1, v2 JSON, v2 binary and gRPC.

Every case must get its 4xx (gRPC: INVALID_ARGUMENT / RESOURCE_EXHAUSTED / NOT_FOUND) with a
message naming the problem, quickly, without growing the server's memory; odd but valid images
(CMYK, grayscale, alpha, palette, 16-bit, 1x1, 12 MP) are converted and served; and the server
still answers correctly afterwards.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image
from server_support import Server, start_server, stop_server

V1 = "/v1/models/densenet121:predict"
V2 = "/v2/models/densenet121/infer"
MAX_BODY = 8 * 1024 * 1024
#: A refusal must come back within this, even on 2 contended CPU cores.
REFUSAL_S = 10.0


@pytest.fixture(scope="module")
def server(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("bad-input") / "server.log"
    srv = start_server(
        artifacts_dir / "densenet121-eager-fp32", log, "--max_batch_size", "4", "--max_request_images", "4",
        "--max_body_bytes", str(MAX_BODY), "--max_image_pixels", str(20_000_000),
    )  # fmt: skip
    yield srv
    stop_server(srv)


def photo() -> Image.Image:
    from optimize.samples import sample_paths

    path = next(p for p in sample_paths() if p.name == "chelsea.png")
    return Image.open(path).convert("RGB")


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(size: tuple[int, int] = (320, 240), mode: str = "RGB") -> bytes:
    return encode(photo().resize(size).convert(mode), "JPEG", quality=90)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1_body(*images: bytes, **params: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"instances": [{"image": {"b64": b64(d)}} for d in images]}
    if params:
        body["parameters"] = params
    return body


def v2_bytes(*images: bytes) -> dict[str, Any]:
    return {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": [b64(d) for d in images]}]
    }


def tensor(datatype: str = "FP32", shape: list[int] | None = None, data: list[Any] | None = None) -> dict[str, Any]:
    return {"name": "input", "datatype": datatype, "shape": shape or [1, 3, 224, 224], "data": data or [0.0] * 10}


def binary(header: dict[str, Any], *blobs: bytes, header_length: int | str | None = None) -> dict[str, Any]:
    """requests kwargs of a binary-tensor-extension body: JSON header, then raw tensors."""
    head = json.dumps(header).encode()
    length = str(len(head) if header_length is None else header_length)
    return {"data": head + b"".join(blobs), "headers": {"inference-header-content-length": length}}


def bytes_element(data: bytes) -> bytes:
    """One BYTES element in the binary extension: 4-byte little-endian length, then the bytes."""
    return struct.pack("<I", len(data)) + data


def bin_tensor(datatype: str, shape: list[int], raw: bytes) -> dict[str, Any]:
    head = {
        "inputs": [
            {"name": "input", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(raw)}}
        ]
    }
    return binary(head, raw)


def bomb_png() -> bytes:
    return encode(Image.new("L", (8000, 8000)), "PNG")  # 64 MP in about 60 KB


def sliver_png() -> bytes:
    return encode(Image.new("RGB", (1, 5000)), "PNG")  # would be resized to 256 x 1,280,000


FP32_NAN = np.full((1, 3, 224, 224), np.nan, dtype=np.float32).tobytes()
FP32_INF = np.full((1, 3, 224, 224), np.inf, dtype=np.float32).tobytes()
BYTES_HEAD = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 0}}]}

# (id, path, requests kwargs or a factory of them, expected status, words the message must contain)
HttpCase = tuple[str, str, Callable[[], dict[str, Any]], int, tuple[str, ...]]


def _http_cases() -> list[HttpCase]:
    js = "application/json"
    return [
        # -- v1 ---------------------------------------------------------------------------------
        ("v1-malformed-json", V1, lambda: {"data": b"{not json", "headers": {"content-type": js}}, 400, ("JSON",)),
        ("v1-empty-body", V1, lambda: {"data": b"", "headers": {"content-type": js}}, 400, ("JSON",)),
        ("v1-invalid-utf8", V1, lambda: {"data": b'{"instances": ["\xff\xfe"]}', "headers": {"content-type": js}}, 400, ("JSON",)),
        ("v1-deeply-nested-json", V1, lambda: {"data": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": js}}, 400, ("JSON",)),
        ("v1-json-array", V1, lambda: {"json": [1, 2]}, 400, ("object",)),
        ("v1-json-null", V1, lambda: {"json": None, "data": b"null", "headers": {"content-type": js}}, 400, ("object",)),
        ("v1-no-instances", V1, lambda: {"json": {"inputs": []}}, 400, ("instances",)),
        ("v1-instances-not-list", V1, lambda: {"json": {"instances": {"image": "x"}}}, 400, ("instances",)),
        ("v1-empty-batch", V1, lambda: {"json": {"instances": []}}, 400, ("empty",)),
        ("v1-instance-number", V1, lambda: {"json": {"instances": [42]}}, 400, ("instance 0",)),
        ("v1-b64-not-string", V1, lambda: {"json": {"instances": [{"image": {"b64": 5}}]}}, 400, ("instance 0",)),
        ("v1-bad-base64", V1, lambda: {"json": {"instances": [{"image": {"b64": "@@@@"}}]}}, 400, ("base64",)),
        ("v1-empty-image", V1, lambda: {"json": {"instances": [{"image": {"b64": ""}}]}}, 400, ("empty",)),
        ("v1-not-an-image", V1, lambda: {"json": v1_body(b"hello, world")}, 400, ("image",)),
        ("v1-truncated-jpeg", V1, lambda: {"json": v1_body(jpeg()[:1500])}, 400, ("image",)),
        ("v1-truncated-png", V1, lambda: {"json": v1_body(encode(photo(), "PNG")[:3000])}, 400, ("image",)),
        ("v1-jpeg-header-only", V1, lambda: {"json": v1_body(b"\xff\xd8\xff\xe0" + b"\0" * 16)}, 400, ("image",)),
        ("v1-decompression-bomb", V1, lambda: {"json": v1_body(bomb_png())}, 413, ("pixels",)),
        ("v1-extreme-aspect-ratio", V1, lambda: {"json": v1_body(sliver_png())}, 400, ("aspect",)),
        ("v1-too-many-images", V1, lambda: {"json": {"instances": [{"image": {"b64": "AAAA"}}] * 5}}, 413, ("limit",)),
        ("v1-top-k-zero", V1, lambda: {"json": v1_body(jpeg(), top_k=0)}, 400, ("top_k",)),
        ("v1-top-k-too-big", V1, lambda: {"json": v1_body(jpeg(), top_k=1001)}, 400, ("top_k",)),
        ("v1-top-k-string", V1, lambda: {"json": v1_body(jpeg(), top_k="5")}, 400, ("top_k",)),
        ("v1-return-logits-string", V1, lambda: {"json": v1_body(jpeg(), return_logits="yes")}, 400, ("return_logits",)),
        ("v1-parameters-not-object", V1, lambda: {"json": {"instances": [], "parameters": [1]}}, 400, ("parameters",)),
        ("v1-content-type-text", V1, lambda: {"data": b'{"instances": []}', "headers": {"content-type": "text/plain"}}, 415, ("content-type", "text/plain")),
        ("v1-content-type-raw-jpeg", V1, lambda: {"data": jpeg(), "headers": {"content-type": "image/jpeg"}}, 415, ("content-type", "image/jpeg")),
        ("v1-unknown-model", "/v1/models/resnet50:predict", lambda: {"json": v1_body(jpeg())}, 404, ("resnet50",)),
        ("v1-body-over-limit", V1, lambda: {"data": b" " * (MAX_BODY + 1), "headers": {"content-type": js}}, 413, ("limit",)),
        # -- v2 JSON ----------------------------------------------------------------------------
        ("v2-malformed-json", V2, lambda: {"data": b'{"inputs": [', "headers": {"content-type": js}}, 400, ("JSON",)),
        ("v2-no-inputs", V2, lambda: {"json": {"instances": []}}, 400, ("inputs",)),
        ("v2-input-not-object", V2, lambda: {"json": {"inputs": ["image"]}}, 400, ("inputs[0]",)),
        ("v2-two-inputs", V2, lambda: {"json": {"inputs": [tensor(), tensor()]}}, 400, ("exactly 1",)),
        ("v2-wrong-datatype", V2, lambda: {"json": {"inputs": [tensor("INT32")]}}, 400, ("datatype", "INT32")),
        ("v2-shape-not-list", V2, lambda: {"json": {"inputs": [{**tensor(), "shape": "1,3,224,224"}]}}, 400, ("shape",)),
        ("v2-negative-shape", V2, lambda: {"json": {"inputs": [tensor(shape=[-1, 3, 224, 224])]}}, 400, ("negative",)),
        ("v2-wrong-image-size", V2, lambda: {"json": {"inputs": [tensor(shape=[1, 3, 32, 32])]}}, 400, ("shape",)),
        ("v2-data-shorter-than-shape", V2, lambda: {"json": {"inputs": [tensor()]}}, 400, ("shape",)),
        ("v2-string-in-fp32", V2, lambda: {"json": {"inputs": [tensor(shape=[1, 3, 224, 224], data=["x"] * 150528)]}}, 400, ("FP32",)),
        ("v2-uint8-out-of-range", V2, lambda: {"json": {"inputs": [tensor("UINT8", data=[300] * 150528)]}}, 400, ("UINT8",)),
        ("v2-fp16-overflows-to-inf", V2, lambda: {"json": {"inputs": [tensor("FP16", data=[1e6] * 150528)]}}, 400, ("NaN or Inf",)),
        ("v2-too-many-images", V2, lambda: {"json": {"inputs": [tensor(shape=[5, 3, 224, 224], data=[0.0])]}}, 413, ("limit",)),
        ("v2-empty-batch", V2, lambda: {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "data": []}]}}, 400, ("empty",)),
        ("v2-bytes-element-number", V2, lambda: {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [7]}]}}, 400, ("element 0",)),
        ("v2-unknown-output", V2, lambda: {"json": {**v2_bytes(jpeg()), "outputs": [{"name": "embedding"}]}}, 400, ("embedding",)),
        ("v2-top-k-negative", V2, lambda: {"json": {**v2_bytes(jpeg()), "parameters": {"top_k": -3}}}, 400, ("top_k",)),
        ("v2-no-data", V2, lambda: {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}}, 400, ("binary_data_size",)),
        ("v2-content-type-xml", V2, lambda: {"data": b"<inputs/>", "headers": {"content-type": "application/xml"}}, 415, ("content-type",)),
        ("v2-unknown-model", "/v2/models/resnet50/infer", lambda: {"json": v2_bytes(jpeg())}, 404, ("resnet50",)),
        ("v2-versioned-infer", "/v2/models/densenet121/versions/7/infer", lambda: {"json": v2_bytes(jpeg())}, 404, ("version",)),
        # -- v2 binary-tensor extension ---------------------------------------------------------
        ("bin-header-length-not-number", V2, lambda: binary(BYTES_HEAD, header_length="ten"), 400, ("not a number",)),
        ("bin-header-length-past-body", V2, lambda: binary(BYTES_HEAD, header_length=10_000), 400, ("inference-header-content-length",)),
        ("bin-sizes-exceed-body", V2, lambda: binary({"inputs": [{**BYTES_HEAD["inputs"][0], "parameters": {"binary_data_size": 100}}]}, b"\0" * 10), 400, ("binary",)),
        ("bin-trailing-bytes", V2, lambda: binary({"inputs": [{**BYTES_HEAD["inputs"][0], "parameters": {"binary_data_size": 4}}]}, bytes_element(b""), b"junk"), 400, ("binary",)),
        ("bin-negative-size", V2, lambda: binary({"inputs": [{**BYTES_HEAD["inputs"][0], "parameters": {"binary_data_size": -4}}]}), 400, ("binary_data_size",)),
        ("bin-bytes-length-prefix-lies", V2, lambda: binary({"inputs": [{**BYTES_HEAD["inputs"][0], "parameters": {"binary_data_size": 14}}]}, struct.pack("<I", 1000) + b"0123456789"), 400, ("BYTES",)),
        ("bin-truncated-jpeg", V2, lambda: binary({"inputs": [{**BYTES_HEAD["inputs"][0], "parameters": {"binary_data_size": 1504}}]}, bytes_element(jpeg()[:1500])), 400, ("image",)),
        ("bin-fp32-nan", V2, lambda: bin_tensor("FP32", [1, 3, 224, 224], FP32_NAN), 400, ("NaN",)),
        ("bin-fp32-inf", V2, lambda: bin_tensor("FP32", [1, 3, 224, 224], FP32_INF), 400, ("Inf",)),
        ("bin-fp32-byte-count-wrong", V2, lambda: bin_tensor("FP32", [1, 3, 224, 224], b"\0" * 12), 400, ("FP32",)),
        ("bin-uint8-wrong-shape", V2, lambda: bin_tensor("UINT8", [1, 224, 224, 3], b"\0" * 150528), 400, ("shape",)),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _http_cases(), ids=lambda c: c[0])
def test_bad_http_request_gets_4xx_naming_the_problem(server: Server, case: HttpCase) -> None:
    _, path, kwargs, status, words = case
    t0 = time.monotonic()
    r = requests.post(server.url + path, timeout=60, **kwargs())
    elapsed = time.monotonic() - t0
    assert r.status_code == status, r.text[:500]
    message = r.json()["error"]
    for word in words:
        assert word.lower() in message.lower(), message
    assert elapsed < REFUSAL_S, f"refusal took {elapsed:.1f}s"


def test_declared_huge_body_is_refused_before_it_is_sent(server: Server) -> None:
    """A Content-Length of 500 MB gets 413 at once: the server does not wait for (or buffer) the body."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as s:
        s.sendall(
            f"POST {V2} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {500 * 1024 * 1024}\r\n\r\n".encode()
            + b'{"inputs": ['
        )
        reply = _read_response(s)
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "limit" in reply


def _read_response(s: socket.socket) -> str:
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(rest) < length:
        rest += s.recv(65536)
    return (head + b"\r\n\r\n" + rest).decode(errors="replace")


def test_streamed_body_over_the_limit_is_cut_off(server: Server) -> None:
    """A chunked body (no Content-Length) is counted as it streams and refused past the limit,
    without the server holding hundreds of MB."""
    proc = psutil.Process(server.proc.pid)
    rss_before = proc.memory_info().rss
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"instances": [{"image": {"b64": "'
        block = b"A" * 65536
        while sent < 64 * 1024 * 1024:  # stops early once the server answers and closes
            sent += len(block)
            yield block

    t0 = time.monotonic()
    try:
        r = requests.post(server.url + V1, data=chunks(), headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413, r.text[:300]
        assert "limit" in r.json()["error"]
    except requests.ConnectionError:
        pass  # the server answered 413 and closed while we were still sending: also a refusal
    assert time.monotonic() - t0 < 30
    assert proc.memory_info().rss - rss_before < 200 * 1024 * 1024


# -- gRPC ------------------------------------------------------------------------------------------
# Raw messages from tritonclient's copy of the Open Inference Protocol: importing KServe's copy
# too would register the same proto symbols twice in this process.


def _grpc_request(datatype: str, shape: list[int], raw: bytes, name: str = "input", model: str = "densenet121") -> Any:
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.append(raw)
    return req


def _grpc_bytes(*images: bytes) -> Any:
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name="densenet121")
    inp = req.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    inp.contents.bytes_contents.extend(images)
    return req


def _grpc_mismatched_raw() -> Any:
    req = _grpc_request("FP32", [1, 3, 224, 224], FP32_NAN)
    req.raw_input_contents.append(b"extra")
    return req


GrpcCase = tuple[str, Callable[[], Any], str, tuple[str, ...]]


def _grpc_cases() -> list[GrpcCase]:
    zeros = np.zeros((1, 3, 224, 224), dtype=np.float32).tobytes()
    return [
        ("grpc-not-an-image", lambda: _grpc_bytes(b"not an image"), "INVALID_ARGUMENT", ("image",)),
        ("grpc-truncated-jpeg", lambda: _grpc_bytes(jpeg()[:1500]), "INVALID_ARGUMENT", ("image",)),
        ("grpc-decompression-bomb", lambda: _grpc_bytes(bomb_png()), "RESOURCE_EXHAUSTED", ("pixels",)),
        ("grpc-too-many-images", lambda: _grpc_bytes(*[jpeg()] * 5), "RESOURCE_EXHAUSTED", ("limit",)),
        ("grpc-empty-batch", lambda: _grpc_bytes(), "INVALID_ARGUMENT", ("empty",)),
        ("grpc-wrong-datatype", lambda: _grpc_request("INT32", [1, 3, 224, 224], zeros), "INVALID_ARGUMENT", ("datatype",)),
        ("grpc-wrong-shape", lambda: _grpc_request("FP32", [1, 3, 32, 32], zeros), "INVALID_ARGUMENT", ("shape",)),
        ("grpc-raw-size-mismatch", lambda: _grpc_request("FP32", [1, 3, 224, 224], b"\0" * 12), "INVALID_ARGUMENT", ("FP32",)),
        ("grpc-nan", lambda: _grpc_request("FP32", [1, 3, 224, 224], FP32_NAN), "INVALID_ARGUMENT", ("NaN",)),
        ("grpc-raw-count-mismatch", _grpc_mismatched_raw, "INVALID_ARGUMENT", ("raw input contents",)),
        ("grpc-unknown-model", lambda: _grpc_request("FP32", [1, 3, 224, 224], zeros, model="resnet50"), "NOT_FOUND", ("resnet50",)),
        ("grpc-message-over-limit", lambda: _grpc_request("FP32", [3, 3, 224, 224], b"\0" * (9 * 1024 * 1024)), "RESOURCE_EXHAUSTED", ("message",)),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def grpc_stub(server: Server) -> Iterator[Any]:
    import grpc
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    opts = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}", options=opts) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("case", _grpc_cases(), ids=lambda c: c[0])
def test_bad_grpc_request_gets_its_status(grpc_stub: Any, case: GrpcCase) -> None:
    import grpc

    _, make, code, words = case
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        grpc_stub.ModelInfer(make(), timeout=60)
    assert ei.value.code().name == code, ei.value.details()
    for word in words:
        assert word.lower() in (ei.value.details() or "").lower(), ei.value.details()
    assert time.monotonic() - t0 < REFUSAL_S


def test_grpc_bytes_length_prefix_lies(grpc_stub: Any) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    req = pb.ModelInferRequest(model_name="densenet121")
    req.inputs.add(name="image", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", 1000) + b"0123456789")
    with pytest.raises(grpc.RpcError) as ei:
        grpc_stub.ModelInfer(req, timeout=60)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, ei.value.details()


def test_grpc_repository_unload_is_refused(grpc_stub: Any) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    with pytest.raises(grpc.RpcError) as ei:
        grpc_stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="densenet121"), timeout=10)
    assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert grpc_stub.ModelReady(pb.ModelReadyRequest(name="densenet121"), timeout=10).ready


def test_http_repository_unload_is_refused(server: Server) -> None:
    r = requests.post(server.url + "/v2/repository/models/densenet121/unload", json={}, timeout=10)
    assert r.status_code == 403 and "disabled" in r.json()["error"]
    assert requests.get(server.url + "/v2/models/densenet121/ready", timeout=10).status_code == 200


def test_admin_and_docs_are_off_by_default(server: Server) -> None:
    """No admin token configured: admin endpoints look like paths that do not exist, even with a token."""
    for headers in ({}, {"Authorization": "Bearer anything-at-all-0123456789"}):
        r = requests.get(server.url + "/admin/v1/info", headers=headers, timeout=10)
        assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    assert requests.post(server.url + "/admin/v1/profile", timeout=10).status_code == 404
    assert requests.get(server.url + "/openapi.json", timeout=10).status_code == 404
    assert requests.get(server.url + "/docs", timeout=10).status_code == 404


# -- odd but valid images are served ---------------------------------------------------------------


def _served_images() -> dict[str, bytes]:
    img = photo().resize((300, 200))
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(img.size))
    palette_t = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette_t.info["transparency"] = 0
    return {
        "jpeg-cmyk": encode(img.convert("CMYK"), "JPEG", quality=90),
        "jpeg-grayscale": encode(img.convert("L"), "JPEG", quality=90),
        "jpeg-progressive": encode(img, "JPEG", quality=80, progressive=True),
        "png-rgba": encode(rgba, "PNG"),
        "png-grayscale-alpha": encode(rgba.convert("LA"), "PNG"),
        "png-palette-transparent": encode(palette_t, "PNG"),
        "png-16-bit-grayscale": encode(img.convert("L").convert("I;16"), "PNG"),
        "png-1-bit": encode(img.convert("1"), "PNG"),
        "png-1x1": encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"),
        "gif-palette": encode(img.convert("P"), "GIF"),
        "webp": encode(img, "WEBP", quality=80),
        "bmp": encode(img, "BMP"),
        "tiff": encode(img, "TIFF"),
        "jpeg-12mp": encode(photo().resize((4000, 3000)), "JPEG", quality=85),
    }


@pytest.fixture(scope="module")
def served_images() -> dict[str, bytes]:
    return _served_images()


@pytest.fixture(scope="module")
def reference_top5(served_images: dict[str, bytes]) -> dict[str, list[int]]:
    """Top-5 of the seed-0 reference on each image, decoded the way the server decodes it."""
    from model_server.preprocess import decode_and_crop
    from optimize.build import reference_logits
    from optimize.weights import load_reference

    model, _ = load_reference("random", seed=0)
    names = sorted(served_images)
    x = torch.stack([decode_and_crop(served_images[n]) for n in names])
    top5 = reference_logits(model, x, torch.device("cpu")).topk(5).indices.tolist()
    return dict(zip(names, top5, strict=True))


@pytest.mark.parametrize("name", sorted(_served_images()))
def test_odd_images_are_converted_and_served(
    server: Server, served_images: dict[str, bytes], reference_top5: dict[str, list[int]], name: str
) -> None:
    r = requests.post(server.url + V1, json=v1_body(served_images[name]), timeout=60)
    assert r.status_code == 200, r.text[:300]
    pred = r.json()["predictions"][0]
    assert pred["classes"] == reference_top5[name]
    assert pred["probabilities"] == sorted(pred["probabilities"], reverse=True)
    assert 0 < sum(pred["probabilities"]) <= 1.0001


# -- afterwards ------------------------------------------------------------------------------------


def test_server_is_healthy_and_correct_afterwards(
    server: Server, served_images: dict[str, bytes], reference_top5: dict[str, list[int]]
) -> None:
    """Runs last in this module: every hostile request above left the server serving, correctly,
    with its memory bounded (peak RSS, VmHWM: one unguarded 1x5000 sliver alone costs 1.5 GB more)."""
    assert server.proc.poll() is None, "the server died"
    r = requests.post(server.url + V1, json=v1_body(served_images["jpeg-progressive"]), timeout=60)
    assert r.status_code == 200 and r.json()["predictions"][0]["classes"] == reference_top5["jpeg-progressive"]
    assert requests.get(server.url + "/v2/health/ready", timeout=10).status_code == 200
    peak_kib = next(
        int(line.split()[1]) for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )  # fmt: skip
    assert peak_kib * 1024 < 3 * 1024**3, f"server peak RSS {peak_kib / 1024:.0f} MiB"
    # KServe logs the tracebacks of errors it maps to statuses; an exception nobody handled reads:
    assert "Exception in ASGI application" not in server.log.read_text()
