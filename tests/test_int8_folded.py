"""The CPU's fastest variant, ``densenet121-onnx-int8-static-folded``: its batch-norm rewrite is exact in
FP32 (both rules), the built artifact passes its gate and keeps ONNX Runtime's INT8 graph in NHWC with no
layout transposes, and a real predictor on 127.0.0.1 serves it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from server_support import start_server, stop_server

from model_server.artifact import read_manifest
from model_server.runtimes import load_runner
from optimize import registry

SLUG = "densenet121-onnx-int8-static-folded"
#: Batch norms the rewrite meets in torchvision's DenseNet-121 export: 58 ``norm1`` on the concatenations,
#: 3 transition ``norm`` and ``norm5`` (ORT folds the others into the convolution before them).
CONCAT_BNS = 62


def _ops(path: Path) -> Counter[str]:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    out: np.ndarray = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optimize.build import build_all
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    out = tmp_path_factory.mktemp("int8-folded")
    torch.set_grad_enabled(False)
    reference, weights = load_reference("random", seed=0)
    (outcome,) = build_all(
        [registry.get(SLUG)], reference=reference, weights=weights, images=sample_batch(),
        output_dir=out, device=torch.device("cpu"), max_batch=4,
    )  # fmt: skip
    assert outcome.ok, outcome.error
    return out / SLUG


def test_registry_record_is_a_cpu_int8_derivative_of_the_static_variant() -> None:
    v = registry.get(SLUG)
    assert v.precision is registry.Precision.INT8 and v.runtime is registry.Runtime.ONNXRUNTIME
    assert v.devices == ("cpu",) and v.base == "densenet121-onnx-int8-static"
    assert v.tolerance == registry.get("densenet121-onnx-int8-static").tolerance and v.random_tolerance is None
    assert v.options["fold_concat_bn"] is True


def test_batchnorm_rewrite_is_exact_in_fp32_with_both_rules(tmp_path: Path) -> None:
    """Trained-looking batch norms (random statistics), two of them with a negative scale somewhere:
    those two take the Mul+Add rule, the rest fold into their convolution; logits stay equal."""
    from optimize.techniques.onnx import export_onnx, fold_concat_batchnorms
    from optimize.weights import load_reference

    torch.set_grad_enabled(False)
    model, _ = load_reference("random", seed=0)
    g = torch.Generator().manual_seed(1)
    for name, bn in model.named_modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            c = bn.num_features
            bn.weight.copy_(0.5 + torch.rand(c, generator=g))
            bn.bias.copy_(0.2 * torch.randn(c, generator=g))
            bn.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
            if name in ("features.denseblock2.denselayer3.norm1", "features.transition2.norm"):
                bn.weight[::7] *= -1
    src, dst = tmp_path / "fp32.onnx", tmp_path / "folded.onnx"
    export_onnx(model, src)
    stats = fold_concat_batchnorms(src, dst)
    # norm5 feeds a global pooling, not a convolution: it always takes the Mul+Add rule.
    assert stats == {"folded": CONCAT_BNS - 3, "affine": 3, "kept": 0}
    ops = _ops(dst)
    assert ops["BatchNormalization"] == 0 and ops["Mul"] == 3 and ops["Add"] == CONCAT_BNS
    x = torch.randn(2, 3, 224, 224, generator=g).numpy()
    ref, got = _run(src, x), _run(dst, x)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_built_artifact_is_int8_nhwc_without_layout_transposes(built: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    manifest = read_manifest(built)
    rewrite = manifest["meta"]["details"]["batchnorm_rewrite"]
    assert (rewrite["folded"], rewrite["affine"]) == (CONCAT_BNS - 1, 1)
    fid = manifest["meta"]["fidelity"]
    assert fid["images"] == 8 and fid["top1_agreement"] >= registry.get(SLUG).tolerance.min_top1_agreement
    assert manifest["meta"]["file_size_mb"] < 0.3 * 32.5  # INT8 weights: about a quarter of the FP32 state dict
    assert _ops(built / "model.onnx")["BatchNormalization"] == 0
    # What ONNX Runtime actually runs (the same session options as the server's runner): every
    # convolution and every rewritten batch norm in INT8, and no NCHW<->NHWC transposes between them.
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(built / "model.onnx"), so, providers=["CPUExecutionProvider"])
    ops = _ops(tmp_path / "optimized.onnx")
    assert ops["QLinearConv"] == 120 and ops["QLinearAdd"] + ops["Add"] == CONCAT_BNS and ops["Add"] == 0
    assert ops["Transpose"] <= 2  # once after the input, once before the classifier's flatten
    assert ops["BatchNormalization"] == 0


def test_runner_takes_any_batch_size_and_float_input(built: Path) -> None:
    from model_server.preprocess import normalize
    from optimize.samples import sample_batch

    runner = load_runner(read_manifest(built), built, torch.device("cpu"))
    pixels = sample_batch(3)
    logits = runner(pixels)
    assert logits.shape == (3, 1000) and logits.dtype == torch.float32
    assert torch.equal(runner(normalize(pixels)), logits)


def test_served_by_a_real_predictor(built: Path, tmp_path: Path) -> None:
    import base64

    from model_server.preprocess import decode_and_crop
    from optimize.build import reference_logits
    from optimize.samples import sample_paths
    from optimize.weights import load_reference

    photo = next(p for p in sample_paths() if p.name == "chelsea.png").read_bytes()
    x = decode_and_crop(photo).unsqueeze(0)
    expected = load_runner(read_manifest(built), built, torch.device("cpu"))(x).topk(5).indices[0].tolist()
    reference, _ = load_reference("random", seed=0)
    assert expected[0] == int(reference_logits(reference, x, torch.device("cpu")).argmax())
    srv = start_server(built, tmp_path / "server.log", "--max_batch_size", "4", "--max_delay_ms", "5")
    try:
        body = {"instances": [{"image": {"b64": base64.b64encode(photo).decode()}}]}
        r = requests.post(srv.url + "/v1/models/densenet121:predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["classes"] == expected
    finally:
        stop_server(srv)
