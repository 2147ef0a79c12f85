"""Request bodies and strict response checks: a 200 with a wrong body must be an error."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from loadtest import _protocol
from loadtest._payloads import Photo


@pytest.fixture(scope="module")
def photos() -> list[Photo]:
    from loadtest._payloads import load_photo

    return [load_photo("astronaut.png", "vga"), load_photo("coffee.png", "vga")]


def _v1(n: int, k: int = 5) -> dict:
    return {
        "predictions": [
            {
                "classes": list(range(k)),
                "labels": [f"l{i}" for i in range(k)],
                "probabilities": [0.4 / 2**i for i in range(k)],
            }
            for _ in range(n)
        ]
    }


def _v2(n: int, k: int = 5) -> dict:
    probabilities = [0.4 / 2**i for i in range(k)] * n
    return {
        "model_name": "densenet121",
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [n, k], "data": probabilities},
            {"name": "classes", "datatype": "INT64", "shape": [n, k], "data": list(range(k)) * n},
            {"name": "labels", "datatype": "BYTES", "shape": [n, k], "data": [f"l{i}" for i in range(k)] * n},
        ],
    }


def test_v1_body_carries_base64_jpegs(photos: list[Photo]) -> None:
    prepared = _protocol.v1_request("densenet121", photos, top_k=3)
    body = json.loads(prepared.body)
    assert prepared.path == "/v1/models/densenet121:predict" and prepared.images == 2
    assert body["parameters"] == {"top_k": 3}
    assert [i["image"]["b64"] for i in body["instances"]] == [p.b64 for p in photos]


def test_binary_bytes_body_follows_the_binary_tensor_extension(photos: list[Photo]) -> None:
    prepared = _protocol.v2_binary_bytes_request("densenet121", photos)
    length = int(prepared.headers[_protocol.INFERENCE_HEADER])
    header = json.loads(prepared.body[:length])
    raw = prepared.body[length:]
    assert header["inputs"][0]["datatype"] == "BYTES" and header["inputs"][0]["shape"] == [2]
    assert header["inputs"][0]["parameters"]["binary_data_size"] == len(raw)
    (first,) = struct.unpack_from("<I", raw)
    assert raw[4 : 4 + first] == photos[0].jpeg


def test_tensor_bodies_json_and_binary_carry_the_same_pixels(photos: list[Photo]) -> None:
    as_json = json.loads(_protocol.v2_tensor_request("m", photos).body)["inputs"][0]
    binary = _protocol.v2_binary_tensor_request("m", photos)
    length = int(binary.headers[_protocol.INFERENCE_HEADER])
    raw = np.frombuffer(binary.body[length:], dtype=np.uint8)
    assert as_json["shape"] == [2, 3, 224, 224] and as_json["datatype"] == "UINT8"
    assert raw.tolist() == as_json["data"]
    with pytest.raises(ValueError, match="FP16"):
        _protocol.v2_tensor_request("m", photos, dtype="fp16")
    fp16 = _protocol.v2_binary_tensor_request("m", photos, dtype="fp16")
    assert json.loads(fp16.body[: int(fp16.headers[_protocol.INFERENCE_HEADER])])["inputs"][0]["datatype"] == "FP16"


def test_good_responses_pass() -> None:
    _protocol.check_v1_response(json.dumps(_v1(2)).encode(), images=2)
    _protocol.check_v2_response(json.dumps(_v2(3)).encode(), images=3)


def test_binary_response_is_decoded() -> None:
    n, k = 2, 5
    probabilities = np.tile(np.array([0.4, 0.2, 0.1, 0.05, 0.01], "<f4"), n).tobytes()
    classes = np.tile(np.arange(k, dtype="<i8"), n).tobytes()
    labels = b"".join(struct.pack("<I", 3) + b"cat" for _ in range(n * k))
    header = json.dumps(
        {
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [n, k], "parameters": {"binary_data_size": 40}},
                {"name": "classes", "datatype": "INT64", "shape": [n, k], "parameters": {"binary_data_size": 80}},
                {
                    "name": "labels",
                    "datatype": "BYTES",
                    "shape": [n, k],
                    "parameters": {"binary_data_size": len(labels)},
                },
            ]
        }
    ).encode()
    body = header + probabilities + classes + labels
    _protocol.check_v2_response(body, {"inference-header-content-length": str(len(header))}, images=n)


@pytest.mark.parametrize("breakage", ["count", "unsorted", "range", "topk", "missing", "label", "garbage"])
def test_wrong_bodies_are_errors(breakage: str) -> None:
    v1, v2 = _v1(2), _v2(2)
    if breakage == "count":
        v1["predictions"].pop()
        v2["outputs"][0]["shape"] = [1, 5]
    elif breakage == "unsorted":
        v1["predictions"][0]["probabilities"].reverse()
        v2["outputs"][0]["data"][:5] = reversed(v2["outputs"][0]["data"][:5])
    elif breakage == "range":
        v1["predictions"][1]["classes"][0] = 1000
        v2["outputs"][1]["data"][0] = -1
    elif breakage == "topk":
        v1["predictions"][0]["classes"].pop()
        v2["outputs"][1]["shape"] = [2, 4]
    elif breakage == "missing":
        del v1["predictions"][0]["labels"]
        v2["outputs"].pop()
    elif breakage == "label":
        v1["predictions"][0]["labels"][0] = ""
        v2["outputs"][2]["data"][0] = 7
    bodies = (
        (b"<html>oops</html>", b"{}") if breakage == "garbage" else (json.dumps(v1).encode(), json.dumps(v2).encode())
    )
    with pytest.raises(_protocol.ResponseError):
        _protocol.check_v1_response(bodies[0], images=2)
    with pytest.raises(_protocol.ResponseError):
        _protocol.check_v2_response(bodies[1], images=2)
