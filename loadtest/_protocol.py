"""Request bodies and response checks for the predictor's v1 and v2 (Open Inference) REST protocols.

Pure functions on bytes, free of Locust, so they are unit-tested on their own and
the users only send and check. Bodies are built once and reused; checks are strict:
a 200 whose body does not hold one well-formed top-k result per image is an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from loadtest._payloads import Photo

INFERENCE_HEADER = "Inference-Header-Content-Length"
NUM_CLASSES = 1000
_V2_DTYPES = {"uint8": ("UINT8", "<u1"), "fp32": ("FP32", "<f4"), "fp16": ("FP16", "<f2")}
_NUMPY_BY_DATATYPE = {"FP32": "<f4", "FP16": "<f2", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "UINT8": "<u1"}


class ResponseError(ValueError):
    """A response body that does not match the protocol (reported as a Locust failure)."""


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One ready-to-send request body.

    Attributes:
        path: URL path on the predictor.
        body: The exact bytes to POST.
        headers: Content type and, for the binary extension, the JSON header length.
        images: How many images the body carries (checked in the response).
    """

    path: str
    body: bytes
    headers: Mapping[str, str]
    images: int


def _params(top_k: int) -> dict[str, Any]:
    return {"top_k": top_k}


def v1_request(model: str, photos: Sequence[Photo], *, top_k: int = 5) -> Prepared:
    """KServe v1 ``:predict`` with base64 JPEGs."""
    payload = {"instances": [{"image": {"b64": photo.b64}} for photo in photos], "parameters": _params(top_k)}
    return Prepared(
        f"/v1/models/{model}:predict", json.dumps(payload).encode(), {"Content-Type": "application/json"}, len(photos)
    )


def v2_bytes_request(model: str, photos: Sequence[Photo], *, top_k: int = 5) -> Prepared:
    """v2 ``infer`` with a BYTES input of base64 JPEGs in JSON."""
    payload = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(photos)], "data": [p.b64 for p in photos]}],
        "parameters": _params(top_k),
    }
    return Prepared(
        f"/v2/models/{model}/infer", json.dumps(payload).encode(), {"Content-Type": "application/json"}, len(photos)
    )


def _binary(model: str, tensor_json: dict[str, Any], raw: bytes, *, top_k: int, images: int) -> Prepared:
    tensor_json["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor_json], "parameters": {**_params(top_k), "binary_data_output": True}})
    header_bytes = header.encode()
    headers = {"Content-Type": "application/octet-stream", INFERENCE_HEADER: str(len(header_bytes))}
    return Prepared(f"/v2/models/{model}/infer", header_bytes + raw, headers, images)


def v2_binary_bytes_request(model: str, photos: Sequence[Photo], *, top_k: int = 5) -> Prepared:
    """v2 ``infer`` with raw JPEG bytes through the binary-tensor extension (no base64)."""
    raw = b"".join(struct.pack("<I", len(p.jpeg)) + p.jpeg for p in photos)
    tensor = {"name": "image", "datatype": "BYTES", "shape": [len(photos)]}
    return _binary(model, tensor, raw, top_k=top_k, images=len(photos))


def _stack(photos: Sequence[Photo], dtype: str) -> np.ndarray:
    if dtype not in _V2_DTYPES:
        raise ValueError(f"unknown tensor dtype {dtype!r}: use {', '.join(_V2_DTYPES)}")
    return np.stack([p.tensor(dtype) for p in photos])


def v2_tensor_request(model: str, photos: Sequence[Photo], *, dtype: str = "uint8", top_k: int = 5) -> Prepared:
    """v2 ``infer`` with a preprocessed ``[N,3,224,224]`` tensor as JSON numbers."""
    if dtype == "fp16":
        raise ValueError("FP16 cannot travel as JSON numbers in the v2 protocol; use the binary-tensor user")
    array = _stack(photos, dtype)
    datatype = _V2_DTYPES[dtype][0]
    payload = {
        "inputs": [{"name": "input", "datatype": datatype, "shape": list(array.shape), "data": array.ravel().tolist()}],
        "parameters": _params(top_k),
    }
    return Prepared(
        f"/v2/models/{model}/infer", json.dumps(payload).encode(), {"Content-Type": "application/json"}, len(photos)
    )


def v2_binary_tensor_request(model: str, photos: Sequence[Photo], *, dtype: str = "uint8", top_k: int = 5) -> Prepared:
    """v2 ``infer`` with a preprocessed tensor as raw little-endian bytes (binary-tensor extension)."""
    array = _stack(photos, dtype)
    datatype, numpy_dtype = _V2_DTYPES[dtype]
    tensor = {"name": "input", "datatype": datatype, "shape": list(array.shape)}
    return _binary(model, tensor, array.astype(numpy_dtype, copy=False).tobytes(), top_k=top_k, images=len(photos))


# --- response checks -------------------------------------------------------------------------------


def _check_rows(
    classes: Sequence[Sequence[Any]],
    probabilities: Sequence[Sequence[Any]],
    labels: Sequence[Sequence[Any]] | None,
    *,
    images: int,
    top_k: int,
) -> None:
    if len(classes) != images or len(probabilities) != images:
        raise ResponseError(f"expected {images} results, got {len(classes)} classes / {len(probabilities)} rows")
    for row, (cls, prob) in enumerate(zip(classes, probabilities, strict=True)):
        if len(cls) != top_k or len(prob) != top_k:
            raise ResponseError(
                f"result {row}: expected top-{top_k}, got {len(cls)} classes, {len(prob)} probabilities"
            )
        if not all(isinstance(c, int | np.integer) and 0 <= c < NUM_CLASSES for c in cls):
            raise ResponseError(f"result {row}: class ids out of range: {list(cls)[:5]}")
        values = [float(p) for p in prob]
        if not all(math.isfinite(v) and -1e-6 <= v <= 1 + 1e-6 for v in values):
            raise ResponseError(f"result {row}: probabilities outside [0, 1]: {values[:5]}")
        if any(a < b - 1e-6 for a, b in itertools.pairwise(values)):
            raise ResponseError(f"result {row}: probabilities not sorted descending")
        if sum(values) > 1 + 1e-3:
            raise ResponseError(f"result {row}: top-{top_k} probabilities sum to {sum(values):.4f} > 1")
    if labels is not None:
        if len(labels) != images or any(len(row) != top_k for row in labels):
            raise ResponseError("labels do not match the classes' shape")
        if not all(isinstance(label, str) and label for row in labels for label in row):
            raise ResponseError("empty or non-text label")


def check_v1_response(body: bytes, *, images: int, top_k: int = 5) -> None:
    """Check a v1 ``{"predictions": [...]}`` body; raises :class:`ResponseError`."""
    try:
        document = json.loads(body)
        predictions = document["predictions"]
        classes = [p["classes"] for p in predictions]
        probabilities = [p["probabilities"] for p in predictions]
        labels = [p["labels"] for p in predictions]
    except (ValueError, KeyError, TypeError) as e:
        raise ResponseError(f"not a v1 prediction body: {e!r}: {body[:200]!r}") from e
    _check_rows(classes, probabilities, labels, images=images, top_k=top_k)


def _decode_binary_output(output: Mapping[str, Any], raw: bytes) -> list[Any]:
    datatype = output["datatype"]
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            values.append(raw[offset + 4 : offset + 4 + length].decode("utf-8"))
            offset += 4 + length
        return values
    return np.frombuffer(raw, dtype=_NUMPY_BY_DATATYPE[datatype]).tolist()


def parse_v2_outputs(body: bytes, headers: Mapping[str, str] | None = None) -> dict[str, tuple[list[int], list[Any]]]:
    """Return ``{output name: (shape, flat data)}`` from a v2 JSON or binary-extension response."""
    header_length = None
    for key, value in (headers or {}).items():
        if key.lower() == INFERENCE_HEADER.lower():
            header_length = int(value)
    try:
        if header_length is None:
            document, raw = json.loads(body), b""
        else:
            document, raw = json.loads(body[:header_length]), body[header_length:]
        outputs: dict[str, tuple[list[int], list[Any]]] = {}
        offset = 0
        for output in document["outputs"]:
            size = (output.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                data = _decode_binary_output(output, raw[offset : offset + int(size)])
                offset += int(size)
            else:
                data = output["data"]
            outputs[output["name"]] = (list(output["shape"]), list(data))
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise ResponseError(f"not a v2 inference body: {e!r}: {body[:200]!r}") from e
    return outputs


def _rows(output: tuple[list[int], list[Any]], name: str, *, images: int, top_k: int) -> list[list[Any]]:
    shape, flat = output
    if shape != [images, top_k] or len(flat) != images * top_k:
        raise ResponseError(f"output {name!r}: shape {shape} with {len(flat)} values, expected [{images}, {top_k}]")
    return [flat[i * top_k : (i + 1) * top_k] for i in range(images)]


def check_v2_response(body: bytes, headers: Mapping[str, str] | None = None, *, images: int, top_k: int = 5) -> None:
    """Check a v2 body holding ``probabilities``, ``classes`` and ``labels`` ``[N, k]``; raises ResponseError."""
    outputs = parse_v2_outputs(body, headers)
    missing = {"probabilities", "classes", "labels"} - outputs.keys()
    if missing:
        raise ResponseError(f"v2 response lacks output(s) {sorted(missing)}; has {sorted(outputs)}")
    probabilities = _rows(outputs["probabilities"], "probabilities", images=images, top_k=top_k)
    classes = _rows(outputs["classes"], "classes", images=images, top_k=top_k)
    labels = _rows(outputs["labels"], "labels", images=images, top_k=top_k)
    _check_rows(classes, probabilities, labels, images=images, top_k=top_k)
