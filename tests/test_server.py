"""A real predictor in a subprocess on 127.0.0.1: v1, v2 JSON, v2 binary, gRPC, bad input, batching."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from server_support import Server

ROOT = Path(__file__).resolve().parents[1]
V1 = "/v1/models/densenet121:predict"
V2 = "/v2/models/densenet121/infer"


def photo_bytes(name: str = "chelsea.png") -> bytes:
    from optimize.samples import sample_paths

    return next(p for p in sample_paths() if p.name == name).read_bytes()


def jpeg_bytes(size: tuple[int, int] = (640, 480), mode: str = "RGB") -> bytes:
    img = Image.open(io.BytesIO(photo_bytes())).convert("RGB").resize(size)
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def expected_top5() -> list[int]:
    """Top-5 of the seed-0 reference on the cat photo, computed here without the server."""
    from model_server.preprocess import decode_and_crop
    from optimize.build import reference_logits
    from optimize.weights import load_reference

    model, _ = load_reference("random", seed=0)
    x = decode_and_crop(photo_bytes()).unsqueeze(0)
    return reference_logits(model, x, torch.device("cpu")).topk(5).indices[0].tolist()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_v1_predict_returns_correct_top5(server: Server, expected_top5: list[int]) -> None:
    r = requests.post(server.url + V1, json={"instances": [{"image": {"b64": b64(photo_bytes())}}]}, timeout=60)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert pred["classes"] == expected_top5
    assert len(pred["labels"]) == 5 and all(isinstance(s, str) and s for s in pred["labels"])
    assert pred["probabilities"] == sorted(pred["probabilities"], reverse=True)
    assert "logits" not in pred


def test_v1_top_k_and_logits_on_request(server: Server, expected_top5: list[int]) -> None:
    body = {"instances": [{"image": {"b64": b64(photo_bytes())}}, {"image": {"b64": b64(jpeg_bytes())}}],
            "parameters": {"top_k": 3, "return_logits": True}}  # fmt: skip
    r = requests.post(server.url + V1, json=body, timeout=60)
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2
    assert preds[0]["classes"] == expected_top5[:3]
    assert len(preds[0]["logits"]) == 1000
    assert int(np.argmax(preds[0]["logits"])) == expected_top5[0]


def test_v2_json_bytes_input(server: Server, expected_top5: list[int]) -> None:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(photo_bytes())]}]}
    r = requests.post(server.url + V2, json=body, timeout=60)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert set(outputs) == {"probabilities", "classes", "labels"}
    assert outputs["classes"]["shape"] == [1, 5]
    assert outputs["classes"]["data"] == expected_top5


def test_v2_standard_client_binary_bytes_and_tensors(server: Server, expected_top5: list[int]) -> None:
    """tritonclient (a standard Open Inference Protocol client) with the binary-tensor extension."""
    import tritonclient.http as httpclient

    from model_server.preprocess import decode_and_crop, normalize

    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.http_port}")
    assert client.is_model_ready("densenet121")
    images = np.array([photo_bytes(), jpeg_bytes()], dtype=np.object_)
    inp = httpclient.InferInput("image", [2], "BYTES")
    inp.set_data_from_numpy(images, binary_data=True)
    outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("classes", "probabilities", "logits")]
    res = client.infer("densenet121", [inp], outputs=outs)
    assert res.as_numpy("classes")[0].tolist() == expected_top5
    assert res.as_numpy("logits").shape == (2, 1000)

    crop = decode_and_crop(photo_bytes()).unsqueeze(0)
    for datatype, arr in (
        ("UINT8", crop.numpy()),
        ("FP32", normalize(crop).numpy()),
        ("FP16", normalize(crop).half().numpy()),
    ):
        t = httpclient.InferInput("input", list(arr.shape), datatype)
        t.set_data_from_numpy(arr, binary_data=True)
        res = client.infer("densenet121", [t], outputs=[httpclient.InferRequestedOutput("classes", binary_data=True)])
        assert res.as_numpy("classes")[0].tolist()[0] == expected_top5[0], datatype
    # FP32 tensor as plain JSON numbers.
    t = httpclient.InferInput("input", [1, 3, 224, 224], "FP32")
    t.set_data_from_numpy(normalize(crop).numpy(), binary_data=False)
    res = client.infer("densenet121", [t])
    assert res.as_numpy("classes")[0].tolist() == expected_top5


def test_grpc_standard_client(server: Server, expected_top5: list[int]) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")
    assert client.is_model_ready("densenet121")
    inp = grpcclient.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([photo_bytes()], dtype=np.object_))
    res = client.infer("densenet121", [inp])
    assert res.as_numpy("classes")[0].tolist() == expected_top5
    labels = res.as_numpy("labels")[0]
    assert all(isinstance(x, bytes) for x in labels)

    bad = grpcclient.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as ei:
        client.infer("densenet121", [bad])
    assert "INVALID_ARGUMENT" in str(ei.value.status()) and "image" in ei.value.message()


def _bad_requests() -> list[tuple[str, str, dict[str, object], int, str]]:
    """(id, path, requests kwargs, expected status, a word the message must contain)."""
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 3, 224, 224], "data": [0.0] * 10}
    return [
        ("malformed-json", V1, {"data": b"{not json", "headers": {"content-type": "application/json"}}, 400, ""),
        ("v2-malformed-json", V2, {"data": b"{not json", "headers": {"content-type": "application/json"}}, 400, "JSON"),
        ("bad-base64", V1, {"json": {"instances": [{"image": {"b64": "@@@"}}]}}, 400, "base64"),
        ("not-an-image", V1, {"json": {"instances": [{"image": {"b64": b64(b"hello world")}}]}}, 400, "image"),
        ("truncated-jpeg", V1, {"json": {"instances": [{"image": {"b64": b64(jpeg_bytes()[:2000])}}]}}, 400, "image"),
        ("no-instances", V1, {"json": {"foo": 1}}, 400, "instances"),
        ("empty-batch-v1", V1, {"json": {"instances": []}}, 400, "empty"),
        ("empty-batch-v2", V2, {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [0], "data": []}]}}, 400, "empty"),
        ("too-many-instances", V1, {"json": {"instances": [{"image": {"b64": "AAAA"}}] * 5}}, 413, "limit"),
        ("wrong-shape", V2, {"json": {"inputs": [{**tensor, "shape": [1, 3, 32, 32]}]}}, 400, "shape"),
        ("shape-vs-data", V2, {"json": {"inputs": [tensor]}}, 400, "shape"),
        ("wrong-datatype", V2, {"json": {"inputs": [{**tensor, "datatype": "INT32"}]}}, 400, "datatype"),
        ("bad-top-k", V1, {"json": {"instances": [{"image": {"b64": b64(jpeg_bytes())}}], "parameters": {"top_k": 0}}}, 400, "top_k"),
        ("unknown-output", V2, {"json": {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(jpeg_bytes())]}], "outputs": [{"name": "nope"}]}}, 400, "nope"),
        ("oversized-body", V1, {"data": b"x" * (9 * 1024 * 1024), "headers": {"content-type": "application/json"}}, 413, "limit"),
        ("binary-size-mismatch", V2, {"data": b'{"inputs":[{"name":"image","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":100}}]}' + b"\0" * 10,
                                      "headers": {"inference-header-content-length": "98"}}, 400, "binary"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_input_gets_4xx_with_a_message(server: Server, case: tuple[str, str, dict[str, object], int, str]) -> None:
    _, path, kwargs, status, word = case
    r = requests.post(server.url + path, timeout=60, **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status, r.text
    message = r.json()["error"]
    assert message and word.lower() in message.lower()


def test_too_many_pixels_is_refused(server: Server) -> None:
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, format="PNG")  # 64 MP, a few hundred KB: a decompression bomb
    r = requests.post(server.url + V1, json={"instances": [{"image": {"b64": b64(buf.getvalue())}}]}, timeout=60)
    assert r.status_code == 413 and "pixels" in r.json()["error"]


def test_unknown_model_is_404(server: Server) -> None:
    r = requests.post(server.url + "/v2/models/resnet50/infer", json={"inputs": []}, timeout=10)
    assert r.status_code == 404


def test_server_still_correct_after_bad_input(server: Server, expected_top5: list[int]) -> None:
    requests.post(server.url + V1, data=b"garbage", timeout=10)
    r = requests.post(server.url + V1, json={"instances": [{"image": {"b64": b64(photo_bytes())}}]}, timeout=60)
    assert r.status_code == 200 and r.json()["predictions"][0]["classes"] == expected_top5


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def test_concurrent_requests_share_batches(server: Server) -> None:
    before = requests.get(server.url + "/metrics", timeout=10).text
    body = {"instances": [{"image": {"b64": b64(jpeg_bytes())}}]}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: requests.post(server.url + V1, json=body, timeout=120), range(8)))
    assert all(r.status_code == 200 for r in results)
    after = requests.get(server.url + "/metrics", timeout=10).text
    batches = _metric(after, "densenet_batch_size_count") - _metric(before, "densenet_batch_size_count")
    images = _metric(after, "densenet_batch_size_sum") - _metric(before, "densenet_batch_size_sum")
    assert images == 8
    assert batches < 8, "8 concurrent requests never shared a batch"
    for name in (
        "densenet_queue_wait_seconds_bucket",
        "densenet_device_seconds_bucket",
        "densenet_preprocess_seconds_bucket",
    ):
        assert name in after


def test_model_metadata_and_readiness(server: Server) -> None:
    assert requests.get(server.url + "/v2/models/densenet121/ready", timeout=10).status_code == 200
    meta = requests.get(server.url + "/v2/models/densenet121", timeout=10).json()
    assert {i["datatype"] for i in meta["inputs"]} == {"BYTES", "FP32"}
    assert json.dumps(meta)
