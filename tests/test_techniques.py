"""Every technique builds a real artifact: INT8 and pruned payloads really shrink, channel pruning really
removes channels, the fidelity gate applies each variant's tolerance, runners take uint8 and float input."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_server.artifact import read_manifest
from model_server.runtimes import load_runner
from optimize import FidelityError, registry
from optimize.registry import MANIFEST_NAME, Technique

ROOT = Path(__file__).resolve().parents[1]

FAST = ("densenet121-onnx-fp32", "densenet121-onnx-int8-static", "densenet121-pruned-l1-20")
SLOW = (
    "densenet121-onnx-int8-dynamic",
    "densenet121-onnx-fp16",
    "densenet121-pruned-channels-30",
    "densenet121-torchscript-fp32",
    "densenet121-eager-fp32-cl",
    "densenet121-eager-bf16-amp",
    "densenet121-eager-bf16-cl",
)


def _build(out: Path, slugs: tuple[str, ...]) -> dict[str, object]:
    from optimize.build import build_all
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    torch.set_grad_enabled(False)
    reference, weights = load_reference("random", seed=0)
    outcomes = build_all(
        [registry.get(s) for s in slugs], reference=reference, weights=weights, images=sample_batch(),
        output_dir=out, device=torch.device("cpu"), max_batch=2,
    )  # fmt: skip
    return {o.slug: o for o in outcomes}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("techniques")
    outcomes = _build(out, FAST)
    failed = {s: o.error for s, o in outcomes.items() if not o.ok}  # type: ignore[attr-defined]
    assert not failed, failed
    return out


@pytest.fixture(scope="module")
def built_slow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("techniques-slow")
    outcomes = _build(out, SLOW)
    failed = {s: o.error for s, o in outcomes.items() if not o.ok}  # type: ignore[attr-defined]
    assert not failed, failed
    return out


def _size(d: Path) -> float:
    meta = read_manifest(d)["meta"]
    size: float = meta["file_size_mb"]
    return size


def test_every_variant_has_a_builder_and_honest_devices() -> None:
    from optimize.techniques import builder_for

    for v in registry.all_variants():
        builder_for(v)  # raises NotImplementedError where a technique has none
        if v.precision is registry.Precision.INT8:
            assert v.devices == ("cpu",) and not v.deployable  # ORT CPU kernels; no INT8 GPU runtime here
        if v.runtime is registry.Runtime.AOTI or v.technique is Technique.SEMI_STRUCTURED_SPARSE:
            assert v.devices == ("cuda",)


def test_int8_static_artifact_is_under_a_third_of_fp32(built: Path, artifacts_dir: Path) -> None:
    import onnx

    fp32 = _size(artifacts_dir / "densenet121-eager-fp32")
    d = built / "densenet121-onnx-int8-static"
    assert _size(d) <= 0.3 * fp32
    model = onnx.load(str(d / "model.onnx"))
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear") > 100
    # Convolution and classifier weights are stored as int8: at least 7.5 M of DenseNet-121's 8 M parameters.
    assert sum(int(torch.tensor(t.dims).prod()) for t in int8) > 7_500_000
    details = read_manifest(d)["meta"]["details"]
    assert details["format"] == "QDQ" and details["calibration_images"] == 8


def test_unstructured_pruned_artifact_is_compact_and_really_sparse(built: Path, artifacts_dir: Path) -> None:
    from model_server.runtimes import MASKED_FORMAT, densify_state

    d = built / "densenet121-pruned-l1-20"
    assert _size(d) <= 0.85 * _size(artifacts_dir / "densenet121-eager-fp32")
    payload = torch.load(d / "model.pt", weights_only=True)  # no pickled objects, only tensors and containers
    assert payload["__format__"] == MASKED_FORMAT
    state = densify_state(payload)
    convs = [k for k in state if k.endswith("conv1.weight") or k == "classifier.weight"]
    for k in convs:
        zeros = float((state[k] == 0).float().mean())
        assert zeros == pytest.approx(0.2, abs=0.01), k
    meta = read_manifest(d)["meta"]
    assert meta["details"]["weight_sparsity"] == pytest.approx(0.2, abs=0.005)
    assert meta["tolerance_applied"] == dataclasses.asdict(registry.get(d.name).random_tolerance)


def test_onnx_batch_axis_is_dynamic_and_input_may_be_uint8_or_float(built: Path) -> None:
    from model_server.preprocess import normalize
    from optimize.build import reference_logits
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    d = built / "densenet121-onnx-fp32"
    runner = load_runner(read_manifest(d), d, torch.device("cpu"))
    images = sample_batch(3)  # 3 > the artifact's max batch of 2: the graph's batch axis is dynamic
    reference, _ = load_reference("random", seed=0)
    ref = reference_logits(reference, images, torch.device("cpu"))
    torch.testing.assert_close(runner(images), ref, atol=1e-3, rtol=0)
    torch.testing.assert_close(runner(normalize(images)), ref, atol=1e-3, rtol=0)
    assert runner.active_providers == ["CPUExecutionProvider"]  # type: ignore[attr-defined]


def test_onnx_cuda_provider_keeps_fp32_out_of_tf32() -> None:
    """ORT's CUDA EP runs FP32 convolutions in TF32 unless told not to (on the H100 the FP32 ONNX
    variant then missed its 1e-3 gate: 2.4e-3); the FP16 variant's options stay as they were."""
    import onnxruntime as ort

    from model_server.runtimes import OnnxRuntimeRunner

    def cuda_options(precision: str) -> dict[str, object]:
        providers = OnnxRuntimeRunner._providers(ort, torch.device("cuda", 0), precision)
        return next(
            opts for name, opts in (p for p in providers if isinstance(p, tuple)) if name == "CUDAExecutionProvider"
        )

    assert cuda_options("fp32")["use_tf32"] == 0
    assert "use_tf32" not in cuda_options("fp16")
    assert cuda_options("fp16")["cudnn_conv_algo_search"] == "EXHAUSTIVE"


def test_fidelity_gate_is_fatal_for_that_variant_only(tmp_path: Path) -> None:
    """Held to its ImageNet tolerance, the unstructured-pruned variant fails on random weights (whose
    top-1 margins are ~0.1 logits) and leaves no variant.json; the variant built next still succeeds."""
    from optimize.build import build_all
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    reference, weights = load_reference("random", seed=0)
    strict = dataclasses.replace(registry.get("densenet121-pruned-l1-20"), random_tolerance=None)
    outcomes = build_all(
        [strict, registry.get("densenet121-onnx-fp32")], reference=reference, weights=weights,
        images=sample_batch(), output_dir=tmp_path, device=torch.device("cpu"), max_batch=1,
    )  # fmt: skip
    assert not outcomes[0].ok and "fidelity" in (outcomes[0].error or "")
    assert not (tmp_path / strict.slug).exists()
    assert outcomes[1].ok and (tmp_path / "densenet121-onnx-fp32" / MANIFEST_NAME).is_file()


def test_check_names_every_missed_bound() -> None:
    from optimize.validate import Fidelity, check

    fid = Fidelity(images=8, top1_agreement=0.5, top5_overlap=0.5, max_abs_logit_err=3.0, mean_abs_logit_err=1.0)
    with pytest.raises(FidelityError, match=r"top-1 agreement.*top-5 overlap.*logit error"):
        check(fid, registry.get("densenet121-onnx-int8-static").tolerance, slug="x")
    check(fid, registry.get("densenet121-pruned-channels-30").random_tolerance, slug="x")  # type: ignore[arg-type]


def test_accuracy_on_a_labelled_folder(tmp_path: Path, artifacts_dir: Path) -> None:
    import shutil

    from optimize import OptimizeError
    from optimize.samples import sample_paths
    from optimize.validate import accuracy

    (tmp_path / "281").mkdir()  # folders named by class index
    for p in sample_paths()[:3]:
        shutil.copy(p, tmp_path / "281" / p.name)
    d = artifacts_dir / "densenet121-eager-fp32"
    runner = load_runner(read_manifest(d), d, torch.device("cpu"))
    acc = accuracy(runner, tmp_path, batch=2)
    assert acc["images"] == 3 and 0.0 <= acc["top1"] <= acc["top5"] <= 1.0
    (tmp_path / "n01440764").mkdir()
    with pytest.raises(OptimizeError, match="1000 synset folders"):
        accuracy(runner, tmp_path)


def test_2_4_mask_keeps_two_of_every_four() -> None:
    from model_server.runtimes import prune_2_4, sparse24_eligible

    w = torch.randn(128, 256, 1, 1)
    p = prune_2_4(w).reshape(128, -1, 4)
    assert bool(((p != 0).sum(-1) == 2).all())
    kept = w.reshape(128, -1, 4).abs().topk(2, dim=-1).values.sum()
    assert float(p.abs().sum()) == pytest.approx(float(kept), rel=1e-5)  # the two largest are the ones kept
    assert sparse24_eligible(torch.nn.Conv2d(128, 32, 1, bias=False))
    assert not sparse24_eligible(torch.nn.Conv2d(128, 32, 3, padding=1, bias=False))
    assert not sparse24_eligible(torch.nn.Conv2d(96, 32, 1, bias=False))


def test_aoti_inductor_settings_from_variant_options() -> None:
    """Each option becomes inductor's own setting; max-autotune only where a GPU tunes it; gpu_bench's
    autotune-quick preset turns per-candidate epilogue benchmarking off."""
    import importlib.util

    from optimize.techniques.aoti import inductor_configs

    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    assert spec is not None and spec.loader is not None
    gpu_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_bench)
    quick = inductor_configs(gpu_bench.AOTI_PRESETS["autotune-quick"], torch.device("cuda"))
    assert quick["max_autotune"] is True and quick["benchmark_epilogue_fusion"] is False
    assert quick["conv_1x1_as_mm"] is True and quick["max_autotune_conv_backends"] == "ATEN"
    on_cpu = inductor_configs(gpu_bench.AOTI_PRESETS["autotune-quick"], torch.device("cpu"))
    assert "max_autotune" not in on_cpu and on_cpu["freezing"] is True
    assert "benchmark_epilogue_fusion" not in inductor_configs({"max_autotune": True}, torch.device("cuda"))
    assert gpu_bench.parse_args(["--variants", "none"]).variants == "none"


def test_kernel_tiles_from_variant_options() -> None:
    """``layer_configs`` / ``conv_configs`` (the pruned fused variant's own tiles) become the rewrite's
    per-block configurations; a malformed one is a build error naming the option."""
    from optimize.techniques.aoti import BuildError, kernel_configs

    variant = registry.get("densenet121-pruned-channels-30-fused-mids")
    tiles = kernel_configs(variant.options)
    assert set(tiles) == {"configs", "conv_configs"} and len(tiles["configs"]) == len(tiles["conv_configs"]) == 4
    assert all(len(c) == 5 and all(isinstance(v, int) for v in c) for c in tiles["configs"])
    assert kernel_configs(registry.get("densenet121-aoti-fp16-cl-dynamic-fused-mids").options) == {}  # kernels' own
    with pytest.raises(BuildError, match="layer_configs must be"):
        kernel_configs({"layer_configs": [[64, 64, 4, 3]]})


def test_block_buffer_rewrite_is_exact_and_its_aoti_package_serves_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block-buffer DenseNet (each block's features written once into one buffer) gives
    torchvision's outputs, and the AOTInductor builder exports and compiles it with a dynamic batch
    (a small DenseNet here: DenseNet-121 takes minutes to compile on these cores)."""
    import torchvision

    from model_server.preprocess import normalize
    from model_server.runtimes import AotiRunner
    from optimize.rewrites import BlockBufferDenseNet
    from optimize.techniques import BuildContext, aoti
    from optimize.techniques.aoti import build

    torch.manual_seed(0)
    big = torchvision.models.densenet121(weights=None).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(BlockBufferDenseNet(big)(x), big(x), atol=0, rtol=0)
        cl = big.to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(BlockBufferDenseNet(cl)(xcl), cl(xcl), atol=1e-5, rtol=1e-5)
        # A channel-pruned DenseNet (each layer's growth its own) through the same rewrite; pruning
        # works inside no_grad too (Torch-Pruning traces with autograd: channel_prune switches it on).
        from optimize.techniques.pruning import channel_prune

        pruned = channel_prune(big, 0.3, round_to=8).eval()
        torch.testing.assert_close(BlockBufferDenseNet(pruned)(xcl[:1]), pruned(xcl[:1]), atol=1e-5, rtol=1e-5)

    net = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, bn_size=2,
                                      num_classes=10).eval()  # fmt: skip
    # The fused variant too: on a CPU its layer op is PyTorch's arithmetic, so this checks the
    # builder's options (fused layers, transitions pooling first) and the package, not the Triton kernel.
    for slug in ("densenet121-aoti-fp16-cl-dynamic-blockbuf", "densenet121-aoti-fp16-cl-dynamic-fused",
                 "densenet121-aoti-fp16-cl-dynamic-fused-mids"):  # fmt: skip
        variant = dataclasses.replace(registry.get(slug), precision=registry.Precision.FP32)
        out_dir = tmp_path / slug
        out_dir.mkdir()
        options = {"aoti": {"buckets": [1, 2, 4]}, "aoti_cache_dir": str(tmp_path / "cache")}
        ctx = BuildContext(reference=net, device=torch.device("cpu"), calibration=torch.zeros(0), max_batch=4,
                           out_dir=out_dir, options=options)  # fmt: skip
        built = build(variant, ctx)
        assert built.details["block_buffer"] and built.details["fresh_process_check"]["rc"] == 0
        fused = "-fused" in slug
        assert built.details["fused_bottleneck"] == built.details["pool_first"] == built.details["fused_conv"] == fused
        assert built.details["shared_bottleneck"] == slug.endswith("-mids")
        manifest = {"slug": "tiny", "precision": "fp32", "channels_last": True, "input": {"max_batch": 4},
                    "payload": {k: v for k, v in built.payload.items() if k.startswith("bucket_")}}  # fmt: skip
        runner = AotiRunner(manifest, out_dir, torch.device("cpu"))
        for n in (1, 3):
            pixels = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
            with torch.no_grad():
                torch.testing.assert_close(runner(pixels), net(normalize(pixels)), atol=1e-4, rtol=1e-4)
    # The package cache: the same build again is a copy; with other kernel or rewrite source (their
    # tile tables are not options) it is another program, compiled afresh.
    again = dataclasses.replace(ctx, out_dir=tmp_path / "again")
    again.out_dir.mkdir()
    assert build(variant, again).details["from_cache"] == [4]
    monkeypatch.setattr(aoti, "_rewrite_source_digest", lambda: "another-kernels-py")
    assert build(variant, again).details["from_cache"] == []


def test_aoti_package_compiles_and_loads_on_cpu(tmp_path: Path) -> None:
    """The AOTInductor code path (export, compile with our inductor options, package, load) on a tiny
    network; DenseNet-121 itself takes minutes to compile on these cores (a slow test below)."""
    from torch._inductor import aoti_load_package

    from optimize.techniques.aoti import compile_bucket, inductor_configs

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 1), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()  # fmt: skip
    cfg = inductor_configs({"conv_1x1_as_mm": True, "epilogue_fusion": True}, torch.device("cpu"))
    path = tmp_path / "tiny-b2.pt2"
    compile_bucket(net, 2, path, device=torch.device("cpu"), dtype=torch.float32, channels_last=False, configs=cfg)
    x = torch.randn(2, 3, 224, 224)
    # Loaded first in a fresh process (the build's guard against packages that crash at load).
    from optimize.techniques.aoti import load_in_fresh_process

    fresh = load_in_fresh_process(path, device=torch.device("cpu"), dtype=torch.float32, channels_last=False, batch=2)
    assert fresh["rc"] == 0 and fresh["finite"], fresh
    with torch.no_grad():
        torch.testing.assert_close(aoti_load_package(str(path))(x), net(x), atol=1e-4, rtol=1e-4)
    # The server's runner: bucket packages named in the manifest, uint8 input padded to the bucket.
    from model_server.preprocess import normalize
    from model_server.runtimes import AotiRunner

    manifest = {"slug": "tiny", "precision": "fp32", "input": {"max_batch": 2}, "payload": {"bucket_2": path.name}}
    runner = AotiRunner(manifest, tmp_path, torch.device("cpu"))
    pixels = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(runner(pixels), net(normalize(pixels)), atol=1e-4, rtol=1e-4)


def test_a_dynamic_batch_package_serves_every_bucket_from_one_file(tmp_path: Path) -> None:
    """``dynamic_batch``: one export with a symbolic batch (1..4), one compile, one load for buckets 1, 2, 4."""
    from optimize.techniques.aoti import compile_bucket, inductor_configs, load_in_fresh_process

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
    ).eval()  # fmt: skip
    cfg = inductor_configs({"conv_1x1_as_mm": True, "epilogue_fusion": True}, torch.device("cpu"))
    path = tmp_path / "tiny-b1-4.pt2"
    compile_bucket(net, 4, path, device=torch.device("cpu"), dtype=torch.float32, channels_last=True, configs=cfg,
                   dynamic=True)  # fmt: skip
    fresh = load_in_fresh_process(path, device=torch.device("cpu"), dtype=torch.float32, channels_last=True, batch=1)
    assert fresh["rc"] == 0 and fresh["finite"] and fresh["inductor_compiles"] == 0, fresh
    from model_server.preprocess import normalize
    from model_server.runtimes import AotiRunner

    # The builder with the option: one package named by every bucket, compiled once.
    from optimize.techniques import BuildContext
    from optimize.techniques.aoti import build

    variant = dataclasses.replace(registry.get("densenet121-aoti-fp16-cl-dynamic"), precision=registry.Precision.FP32)
    out = tmp_path / "built"
    out.mkdir()
    ctx = BuildContext(reference=net, device=torch.device("cpu"), calibration=torch.zeros(0), max_batch=4, out_dir=out,
                       options={"aoti": {"buckets": [1, 2, 4]}})  # fmt: skip
    built = build(variant, ctx)
    assert {k: v for k, v in built.payload.items() if k.startswith("bucket_")} == {
        "bucket_1": "model-b1-4.pt2", "bucket_2": "model-b1-4.pt2", "bucket_4": "model-b1-4.pt2"
    }  # fmt: skip
    assert [p.name for p in out.glob("*.pt2")] == ["model-b1-4.pt2"]
    assert built.details["dynamic_batch"] and list(built.details["compile_s_by_batch"]) == ["4"]
    manifest = {"slug": "tiny", "precision": "fp32", "channels_last": True, "input": {"max_batch": 4},
                "payload": {f"bucket_{b}": path.name for b in (1, 2, 4)}}  # fmt: skip
    runner = AotiRunner(manifest, tmp_path, torch.device("cpu"))
    assert len({id(p) for p in runner.packages.values()}) == 1  # loaded once, not once per bucket
    for n in (1, 3, 4):  # 3 runs padded to the bucket of 4
        pixels = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
        with torch.no_grad():
            out = runner(pixels)
            torch.testing.assert_close(out, net(normalize(pixels)), atol=1e-4, rtol=1e-4)
    # benchmarks/aoti_load_time.py times each phase of loading this artifact in a fresh process.
    (tmp_path / "variant.json").write_text(json.dumps({**manifest, "runtime": "aoti"}))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "aoti_load_time.py"), str(tmp_path), "--device", "cpu",
         "--torch-loader", "--json-out", str(tmp_path / "load.json")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    timing = json.loads((tmp_path / "load.json").read_text())
    assert {"import_torch_s", "runner_load_s", "runner_warm_up_s", "runner_first_call_b1_s",
            "torch_loader_import_inductor_s", "torch_loader_load_tiny-b1-4.pt2_s"} <= set(timing["metrics"])  # fmt: skip
    assert all(v >= 0 for v in timing["metrics"].values()) and timing["logits_shape"] == [1, 10]
    assert timing["name"] == "aoti-load-time" and "torch" in timing["environ"]
    # The server's loader: the C++ package loader, without importing inductor (or probing the CPU's ISA).
    assert timing["runner_imported_torch_inductor"] is False
    assert timing["packages"]["tiny-b1-4.pt2"][".so"]["files"] == 1


def test_aoti_fresh_process_check_reports_a_broken_package(tmp_path: Path) -> None:
    """A package that cannot load gives a non-zero exit and the loader's message, not a crash of the caller."""
    from optimize.techniques.aoti import fallback_cxx, load_in_fresh_process

    bogus = tmp_path / "broken.pt2"
    bogus.write_bytes(b"not a zip archive")
    check = load_in_fresh_process(bogus, device=torch.device("cpu"), dtype=torch.float32, channels_last=False, batch=1)
    assert check["rc"] != 0 and check["stderr_tail"]
    # The fallback compiler is another one than the compiler that failed (here: the g++ on PATH, if any).
    import shutil

    gxx = shutil.which("g++")
    if gxx:
        assert fallback_cxx("/nonexistent/wrapper/g++") == gxx
        assert fallback_cxx(gxx) != gxx


@pytest.mark.slow
def test_aoti_densenet_builds_on_cpu(tmp_path: Path) -> None:
    """The real builder on DenseNet-121 (one bucket, CPU, minutes with gcc), loaded by the server's runner."""
    from optimize.techniques import BuildContext
    from optimize.techniques.aoti import build
    from optimize.weights import load_reference

    reference, _ = load_reference("random", seed=0)
    variant = dataclasses.replace(registry.get("densenet121-aoti-fp16-cl"), precision=registry.Precision.FP32)
    ctx = BuildContext(
        reference=reference, device=torch.device("cpu"), calibration=torch.zeros(0), max_batch=1, out_dir=tmp_path,
        options={"aoti": {"buckets": [1], "max_autotune": False}},
    )  # fmt: skip
    built = build(variant, ctx)
    assert built.payload["bucket_1"] == "model-b1.pt2"
    from model_server.runtimes import AotiRunner

    manifest = {"slug": variant.slug, "precision": "fp32", "channels_last": True, "input": {"max_batch": 1},
                "payload": built.payload}  # fmt: skip
    out = AotiRunner(manifest, tmp_path, torch.device("cpu"))(torch.zeros((1, 3, 224, 224), dtype=torch.uint8))
    assert out.shape == (1, 1000) and bool(torch.isfinite(out).all())


@pytest.mark.slow
@pytest.mark.parametrize("slug", SLOW)
def test_slow_variants_build_and_pass_their_gate(slug: str, built_slow: Path) -> None:
    manifest = read_manifest(built_slow / slug)
    assert manifest["slug"] == slug and manifest["meta"]["fidelity"]["images"] == 8


@pytest.mark.slow
def test_channel_pruning_really_removes_channels(built_slow: Path, artifacts_dir: Path) -> None:
    d = built_slow / "densenet121-pruned-channels-30"
    meta = read_manifest(d)["meta"]
    ref = read_manifest(artifacts_dir / "densenet121-eager-fp32")["meta"]
    assert meta["num_params"] <= 0.7 * ref["num_params"]
    assert meta["gflops"] <= 0.7 * ref["gflops"]
    assert _size(d) <= 0.7 * _size(artifacts_dir / "densenet121-eager-fp32")
    state = torch.load(d / "model.pt", weights_only=True)
    assert state["features.denseblock1.denselayer1.conv2.weight"].shape[0] < 32  # growth channels really gone
    runner = load_runner(read_manifest(d), d, torch.device("cpu"))
    assert runner(torch.zeros((1, 3, 224, 224), dtype=torch.uint8)).shape == (1, 1000)


def test_pruned_aoti_variant_compiles_the_pruned_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The structured-pruning builder hands the *pruned* network to the AOTInductor builder (which
    compiles for minutes and only on a GPU here: captured instead) and keeps the pruning details."""
    from optimize.build import count_params
    from optimize.techniques import BuildContext, Built, aoti, pruning
    from optimize.weights import load_reference

    seen: dict[str, object] = {}

    def fake_aoti_build(variant: registry.Variant, ctx: BuildContext) -> Built:
        seen["variant"], seen["reference"] = variant, ctx.reference
        return Built(payload={"bucket_1": "model-b1-128.pt2"}, devices=["cuda"], model=ctx.reference,
                     details={"dynamic_batch": True})  # fmt: skip

    monkeypatch.setattr(aoti, "build", fake_aoti_build)
    reference, _ = load_reference("random", seed=0)
    variant = registry.get("densenet121-pruned-channels-30-aoti-dynamic")
    assert variant.runtime is registry.Runtime.AOTI and variant.base == "densenet121-aoti-fp16-cl-dynamic"
    assert variant.options["dynamic_batch"] and variant.options["cuda_graphs"]  # compiled like its base
    ctx = BuildContext(reference=reference, device=torch.device("cpu"), calibration=torch.zeros(0), max_batch=4,
                       out_dir=tmp_path)  # fmt: skip
    built = pruning.build_structured(variant, ctx)
    pruned = seen["reference"]
    assert isinstance(pruned, torch.nn.Module) and pruned is not reference
    assert count_params(pruned) <= 0.7 * count_params(reference)
    assert built.model is pruned and built.payload == {"bucket_1": "model-b1-128.pt2"}
    assert built.details["ratio"] == 0.3 and built.details["params_ratio"] <= 0.7 and built.details["dynamic_batch"]
    assert not (tmp_path / "model.pt").exists()  # a package, not a state dict


@pytest.mark.slow
def test_int8_dynamic_is_small(built_slow: Path, artifacts_dir: Path) -> None:
    assert _size(built_slow / "densenet121-onnx-int8-dynamic") <= 0.3 * _size(artifacts_dir / "densenet121-eager-fp32")
    assert json.loads((built_slow / "densenet121-onnx-int8-dynamic" / MANIFEST_NAME).read_text())["devices"] == ["cpu"]


@pytest.mark.slow
def test_channel_pruning_finetune_hook_runs_on_an_image_folder(tmp_path: Path) -> None:
    import shutil

    from optimize.build import build_variant, reference_logits
    from optimize.samples import sample_batch, sample_paths
    from optimize.weights import load_reference

    folder = tmp_path / "images"
    folder.mkdir()
    for p in sample_paths()[:4]:
        shutil.copy(p, folder / p.name)
    reference, weights = load_reference("random", seed=0)
    images = sample_batch()
    manifest = build_variant(
        registry.get("densenet121-pruned-channels-30"), reference=reference, weights=weights, images=images,
        ref_logits=reference_logits(reference, images, torch.device("cpu")), output_dir=tmp_path / "out",
        device=torch.device("cpu"), max_batch=1, options={"finetune_dir": str(folder), "finetune_steps": 1},
    )  # fmt: skip
    ft = manifest["meta"]["details"]["finetune"]
    assert ft["bn_recalibration_images"] == 4 and ft["distillation_steps"] == 1 and ft["final_kl"] is not None


def _build_cuda(out: Path, slug: str, options: dict[str, object] | None = None) -> dict[str, object]:
    from optimize.build import build_variant, reference_logits
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    reference, weights = load_reference("random", seed=0)
    images = sample_batch()
    cuda = torch.device("cuda")
    return build_variant(
        registry.get(slug), reference=reference, weights=weights, images=images,
        ref_logits=reference_logits(reference, images, cuda), output_dir=out, device=cuda, max_batch=2,
        options=options or {},
    )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "slug",
    [
        "densenet121-aoti-fp16-cl",
        "densenet121-aoti-fp16-cl-dynamic",
        "densenet121-aoti-fp16-cl-dynamic-blockbuf",
        "densenet121-aoti-fp16-cl-dynamic-fused",
        "densenet121-aoti-fp16-cl-dynamic-fused-mids",
        "densenet121-pruned-channels-30-aoti-dynamic",
        "densenet121-pruned-channels-30-fused-mids",
    ],
)
def test_aoti_variant_on_cuda_serves_without_compiling(tmp_path: Path, slug: str) -> None:
    manifest = _build_cuda(tmp_path, slug, {"aoti": {"max_autotune": False}})
    d = tmp_path / slug
    assert {"bucket_1", "bucket_2"} <= set(manifest["payload"])  # type: ignore[operator]
    code = (
        "import sys, torch; from pathlib import Path; from model_server.artifact import read_manifest;"
        "from model_server.runtimes import load_runner; d = Path(sys.argv[1]);"
        "r = load_runner(read_manifest(d), d, torch.device('cuda')); r.warm_up();"
        "from torch._dynamo.utils import counters; assert not sum(counters['inductor'].values());"
        "print(r(torch.zeros((1, 3, 224, 224), dtype=torch.uint8)).shape, torch.backends.cudnn.benchmark)"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code, str(d)], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]  # a fresh process: loads, captures CUDA graphs, runs
    # the fused variant's runner lets cuDNN time its algorithms (options.cudnn_benchmark), the others do not
    assert f"torch.Size([1, 1000]) {slug.endswith('-fused')}" in out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize(
    "slug",
    [
        "densenet121-onnx-fp16",
        "densenet121-eager-fp16-amp",
        "densenet121-sparse24-fp16",
        "densenet121-pruned-channels-30-fp16-cl-graphs",
    ],
)
def test_gpu_variants_build_on_cuda(tmp_path: Path, slug: str) -> None:
    manifest = _build_cuda(tmp_path, slug)
    assert manifest["devices"] == ["cuda"] or "cuda" in manifest["devices"]  # type: ignore[operator]
