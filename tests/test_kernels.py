"""The fused DenseNet layer kernels (optimize/kernels.py) and the rewrite that calls them.

The Triton kernels themselves run here under Triton's interpreter (``TRITON_INTERPRET=1``, set
before Triton is imported, so in a child process); on a GPU they run compiled (tests/test_gpu.py).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from optimize import kernels
from optimize.rewrites import BlockBufferDenseNet

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not kernels.available(), reason="Triton is not installed")


def _operands(
    n: int, total: int, k: int, cols: int, hw: tuple[int, int], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    buf = torch.randn(n, total, *hw, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    return {
        "buf": buf,
        "w": (torch.randn(k, cols, generator=g) / k**0.5).to(dtype),
        "s1": torch.rand(k, generator=g) + 0.5, "b1": torch.randn(k, generator=g) * 0.1,
        "s2": torch.rand(cols, generator=g) + 0.5, "b2": torch.randn(cols, generator=g) * 0.1,
    }  # fmt: skip


def _conv_operands(n: int, cin: int, cout: int, hw: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, cin, *hw, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, (torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5).to(dtype)


_INTERPRETED = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[1])
    from optimize import kernels
    from tests.test_kernels import _operands
    out = {}
    # (batch, buffer channels, k, output channels, pixels, tile): k not a multiple of the channel step,
    # pixels not a multiple of the tile, a channel slice of a wider buffer, 64 output channels.
    # The last two split K (into 2 programs a tile: at least MIN_STEPS steps each; the rest exit).
    ws = (torch.zeros(2 * 64 * kernels.WORKSPACE_TILE), torch.zeros(64, dtype=torch.int32))
    for i, (n, total, k, cols, hw, cfg) in enumerate([
        (2, 96, 70, 128, (5, 7), (64, 64, 4, 3, 0)),
        (1, 160, 160, 128, (3, 3), (32, 32, 4, 4, 0)),
        (3, 48, 40, 64, (4, 4), (16, 64, 4, 3, 0)),
        (1, 96, 70, 128, (5, 7), (32, 16, 4, 3, 16)),
        (1, 300, 288, 128, (3, 3), (16, 64, 4, 3, 64)),
        (2, 160, 152, 88, (3, 3), (32, 64, 4, 3, 0)),  # a pruned layer: 88 columns in one 128-wide tile
    ]):
        o = _operands(n, total, k, cols, hw, torch.float32)
        got = kernels.launch(o["buf"], k, o["w"], o["s1"], o["b1"], o["s2"], o["b2"], *cfg, workspace=ws)
        ref = kernels.reference(o["buf"][:, :k], o["w"], o["s1"], o["b1"], o["s2"], o["b2"])
        out[f"gemm{i}"] = [float((got - ref).abs().max()), float(ref.abs().max()), list(got.shape),
                           got.is_contiguous(memory_format=torch.channels_last)]
    # A split target without a workspace does not split (nothing to hold the partial sums).
    o = _operands(1, 96, 70, 128, (5, 7), torch.float32)
    got = kernels.launch(o["buf"], 70, o["w"], o["s1"], o["b1"], o["s2"], o["b2"], 32, 16, 4, 3, 16)
    ref = kernels.reference(o["buf"][:, :70], o["w"], o["s1"], o["b1"], o["s2"], o["b2"])
    out["no_workspace"] = float((got - ref).abs().max())
    buf = torch.zeros(2, 96, 5, 7).contiguous(memory_format=torch.channels_last)
    y = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
    kernels.launch_write(buf, y, 40)
    out["write"] = [float((buf[:, 40:72] - y).abs().max()), float(buf[:, :40].abs().max()),
                    float(buf[:, 72:].abs().max())]
    # The 3x3 convolution into channels c..c+cout of a zeroed buffer: image edges (padding), pixels
    # not a multiple of the tile, input channels not a multiple of the step, 24 output channels.
    from tests.test_kernels import _conv_operands
    for i, (n, cin, cout, hw, c, cfg) in enumerate([
        (2, 128, 32, (5, 7), 64, (64, 64, 4, 3, 0)),
        (1, 40, 24, (3, 3), 8, (16, 32, 4, 3, 0)),
        (1, 128, 32, (5, 7), 64, (16, 64, 4, 3, 64)),
        (2, 40, 24, (3, 3), 8, (16, 32, 4, 3, 20)),
        (2, 88, 16, (5, 7), 152, (64, 64, 4, 3, 0)),  # a pruned layer: 88 in, 16 out
        (2, 80, 16, (4, 6), 32, (16, 64, 4, 3, 40)),  # 80 in: rows of taps (12 steps, not 18), split
        (1, 40, 24, (3, 5), 8, (16, 32, 4, 3, 0)),  # x a channel slice of a wider tensor: tap by tap
    ]):
        x, weight = _conv_operands(n, cin, cout, hw, torch.float32)
        if i == 6:
            x = torch.cat([x, torch.randn_like(x)], 1)[:, :cin]  # rows 2 * cin apart
        out[f"taps{i}"] = kernels.row_taps(x, cfg[1])
        buf = torch.zeros(n, c + cout + 8, *hw).contiguous(memory_format=torch.channels_last)
        kernels.launch_conv3x3(buf, x, kernels.conv3x3_weight(weight), c, *cfg, workspace=ws)
        ref = torch.nn.functional.conv2d(x, weight, padding=1)
        out[f"conv{i}"] = [float((buf[:, c:c + cout] - ref).abs().max()), float(ref.abs().max()),
                           float(buf[:, :c].abs().max()), float(buf[:, c + cout:].abs().max())]
    out["workspace"] = int(ws[1].abs().max())
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernels instead (test below)")
def test_triton_kernels_match_the_reference_under_the_interpreter() -> None:
    """The fused GEMM (norm + ReLU prologue, norm + ReLU epilogue) reads a channel slice of a
    channels-last buffer and matches PyTorch's arithmetic; the copy kernel writes only its channels."""
    p = subprocess.run([sys.executable, "-c", _INTERPRETED, str(ROOT)], capture_output=True, text=True,
                       env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300, cwd=ROOT)  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    shapes = ([2, 128, 5, 7], [1, 128, 3, 3], [3, 64, 4, 4], [1, 128, 5, 7], [1, 128, 3, 3], [2, 88, 3, 3])
    for i, shape in enumerate(shapes):
        diff, scale, got_shape, channels_last = out[f"gemm{i}"]
        assert got_shape == shape and channels_last
        assert scale > 0.5 and diff < 1e-4 * scale, out
    assert out["write"] == [0.0, 0.0, 0.0]
    assert out["no_workspace"] < 1e-4, out
    assert out["workspace"] == 0, out  # split-K leaves its counters zero for the next call
    for i in range(7):
        diff, scale, before, after = out[f"conv{i}"]
        assert scale > 0.5 and diff < 1e-4 * scale and before == after == 0.0, out
    # Rows of taps where x is exactly its channels wide and that takes fewer steps of the tile's channels.
    assert [out[f"taps{i}"] for i in range(7)] == [False, True, False, True, True, True, False], out


def test_ops_run_on_the_cpu_and_refuse_a_buffer_that_is_not_channels_last() -> None:
    o = _operands(2, 96, 70, 128, (5, 7), torch.float32)
    ref = kernels.reference(o["buf"][:, :70], o["w"], o["s1"], o["b1"], o["s2"], o["b2"])
    none = torch.empty(0)
    got = torch.ops.densenet.bn_relu_conv1x1(o["buf"], 70, o["w"], o["s1"], o["b1"], o["s2"], o["b2"], none, none, 64,
                                             64, 4, 3, 0)  # fmt: skip
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(kernels.bn_relu_conv1x1(o["buf"], 70, o["w"], o["s1"], o["b1"], o["s2"], o["b2"]), ref)
    y = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
    buf = o["buf"].clone()
    torch.ops.densenet.write_channels(buf, y, 64)
    torch.testing.assert_close(buf[:, 64:], y)
    torch.testing.assert_close(buf[:, :64], o["buf"][:, :64])
    with pytest.raises(ValueError, match="dense channels-last buffer"):
        kernels.bn_relu_conv1x1(o["buf"].contiguous(), 70, o["w"], o["s1"], o["b1"], o["s2"], o["b2"])
    # Into a tensor it is given: the op, and the function into a channel slice of a wider tensor.
    got = torch.full_like(ref, 7.0)
    torch.ops.densenet.bn_relu_conv1x1_into(o["buf"], 70, o["w"], o["s1"], o["b1"], o["s2"], o["b2"], got, none,
                                            none, 64, 64, 4, 3, 0)  # fmt: skip
    torch.testing.assert_close(got, ref)
    wide = torch.zeros(2, 160, 5, 7).contiguous(memory_format=torch.channels_last)
    into = kernels.bn_relu_conv1x1(o["buf"], 70, o["w"], o["s1"], o["b1"], o["s2"], o["b2"], out=wide[:, :128])
    assert into.data_ptr() == wide.data_ptr()
    torch.testing.assert_close(wide[:, :128], ref)
    assert not wide[:, 128:].any()
    with pytest.raises(ValueError, match="channels-last out"):
        kernels.bn_relu_conv1x1(o["buf"], 70, o["w"], o["s1"], o["b1"], o["s2"], o["b2"], out=torch.zeros(2, 128, 5, 7))
    x, weight = _conv_operands(2, 40, 24, (5, 7), torch.float32)
    w = kernels.conv3x3_weight(weight)
    assert w.shape == (360, 24)
    torch.testing.assert_close(kernels.conv3x3_reference(x, w), torch.nn.functional.conv2d(x, weight, padding=1))
    for conv in (lambda b: torch.ops.densenet.conv3x3_into(b, x, w, 30, none, none, 64, 64, 4, 3, 0),
                 lambda b: kernels.conv3x3_into(b, x, w, 30)):  # fmt: skip
        buf = o["buf"].clone()
        conv(buf)
        torch.testing.assert_close(buf[:, 30:54], torch.nn.functional.conv2d(x, weight, padding=1))
        torch.testing.assert_close(buf[:, :30], o["buf"][:, :30])
        torch.testing.assert_close(buf[:, 54:], o["buf"][:, 54:])
    with pytest.raises(ValueError, match="dense channels-last tensors"):
        kernels.conv3x3_into(o["buf"], x.contiguous(), w, 30)


def test_bn_affine_is_the_eval_batch_norm() -> None:
    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    x = torch.randn(2, 6, 3, 3)
    scale, shift = kernels.bn_affine(bn)
    torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x))


@torch.library.custom_op("densenet_test::copy_into", mutates_args=("out",))
def _copy_into(out: torch.Tensor, x: torch.Tensor) -> None:
    """A mutating op like the kernels' ``*_into`` ops: writes ``x`` into the ``out`` it is given."""
    out.copy_(x)


def _compiled_source(allocate: str, x: torch.Tensor) -> str:
    """Inductor's generated code (CPU, dynamic shapes) for: allocate a channels-last tensor ``allocate``'s
    way, write ``x`` into it through the mutating op, return it (checked equal to ``x``)."""
    from torch._inductor.utils import run_and_get_code

    def f(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if allocate == "helper":
            out = kernels.empty_channels_last(n, c, h, w, dtype=x.dtype, device=x.device)
        else:
            out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
        _copy_into(out, x)
        return out

    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(f, dynamic=True), x)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out, x)
    return "\n".join(code)


def test_empty_channels_last_needs_no_kernel_where_torch_empty_is_filled_with_nan() -> None:
    """The fused package stored NaN over every new layer output and block buffer before its kernel
    wrote it (record ``fused-package-trace-s12``): inductor lowers ``torch.empty(memory_format=
    channels_last)`` as a contiguous empty plus a copy into channels-last strides, and the copy of
    uninitialised memory is a NaN fill. The same lowering on the CPU shows it; ``empty_channels_last``
    (explicit strides) compiles to an allocation only."""
    x = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    buf = kernels.empty_channels_last(3, 8, 4, 5, dtype=torch.float16, device=torch.device("cpu"))
    assert buf.shape == (3, 8, 4, 5) and buf.dtype == torch.float16
    assert buf.is_contiguous(memory_format=torch.channels_last)
    nan_store = "quiet_NaN"
    if nan_store not in _compiled_source("torch.empty", x):
        pytest.skip("this torch no longer fills torch.empty(memory_format=channels_last): nothing to tell apart")
    assert nan_store not in _compiled_source("helper", x)


def test_lowering_probe_finds_the_nan_fills_of_torch_empty_and_none_now(tmp_path: Path) -> None:
    """``benchmarks/lowering_probe.py`` lowers the fused network for an H100 on fake tensors (no GPU):
    with the allocation the package had in session 12 it lists a NaN fill per layer output and per
    block buffer; with ``kernels.empty_channels_last`` none. It patches torch's CUDA queries, so
    it runs as its own process."""
    reports = {}
    for name, extra in (("now", []), ("naive", ["--naive-empty"])):
        out = tmp_path / f"{name}.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "lowering_probe.py"), "--options", "fused,pool_first,fused_conv",
               "--json", str(out), *extra]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-2000:]
        reports[name] = json.loads(out.read_text())
        assert reports[name]["operations"]["UserDefinedTritonKernel"] == 2 * 58 + 4  # two kernels a layer, 4 writes
    assert reports["now"]["nan_fills"] == []
    fills = reports["naive"]["nan_fills"]
    assert len(fills) == 58 + 4  # each layer's new output, each block buffer
    assert all(f["source"] and f["source"][0].startswith("optimize/rewrites.py:") for f in fills)
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lowering_probe.py"), "--options", "fused,nope"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert bad.returncode != 0 and "unknown option(s) nope; valid: fused, pool_first" in bad.stderr


@pytest.mark.parametrize(
    "options",
    [
        {"pool_first": True},
        {"fused": True},
        {"fused": True, "pool_first": True},
        {"fused": True, "fused_conv": True},
        {"fused": True, "fused_conv": True, "shared_bottleneck": True},
    ],
)
def test_fused_and_pool_first_rewrites_give_torchvisions_outputs(options: dict[str, bool]) -> None:
    """DenseNet-121 with batch norm statistics that matter (random ones): the rewrite's fused layer
    path (PyTorch's arithmetic on a CPU) and transitions pooling first agree with torchvision's forward."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.densenet121(weights=None).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    net = net.to(memory_format=torch.channels_last)
    rewritten = BlockBufferDenseNet(net, **options).eval()
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), net(x), atol=2e-5, rtol=1e-5)
    # Derived parameters are not saved with the weights.
    assert set(rewritten.state_dict()) == {f"net.{k}" for k in net.state_dict()}
    assert rewritten.layers == (58 if options.get("fused") else 0)
    if options.get("fused_conv"):
        assert rewritten.fused57_w2.shape == (9 * 128, 32)


def test_a_channel_pruned_densenet_through_the_fused_mids_rewrite_gives_its_own_outputs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The pruned fused-mids variant's network: each layer's growth and bottleneck width are
    Torch-Pruning's (multiples of 8, not 32 and 128), the block buffers and the shared bottleneck
    sized from them; the rewrite (PyTorch's arithmetic for the kernels on a CPU) matches the pruned
    network's own forward."""
    import torchvision

    from optimize.techniques.pruning import channel_prune

    torch.manual_seed(0)
    with torch.no_grad():
        pruned = channel_prune(torchvision.models.densenet121(weights=None).eval(), 0.3, round_to=8).eval()
    layers = [m for m in pruned.modules() if type(m).__name__ == "_DenseLayer"]
    assert {m.conv2.out_channels for m in layers} != {32} and {m.conv1.out_channels for m in layers} != {128}
    assert all(m.conv1.out_channels % 8 == 0 and m.conv2.out_channels % 8 == 0 for m in layers)
    net = pruned.to(memory_format=torch.channels_last)
    options = {"fused": True, "fused_conv": True, "shared_bottleneck": True, "pool_first": True}
    with caplog.at_level(logging.WARNING, logger="optimize.rewrites"):
        rewritten = BlockBufferDenseNet(net, **options).eval()
    # Multiples of 8 are not 16: the kernels run, slowly (0.54x on the H100), and the rewrite says so.
    from optimize.rewrites import unaligned_channels

    odd = unaligned_channels(net)
    assert "denseblock2.buffer=280" in odd and "denseblock1.denselayer1.bottleneck=88" in odd
    assert f"fused kernels on {len(odd)} channel counts not divisible by 16" in caplog.text

    with torch.no_grad():
        by16 = channel_prune(torchvision.models.densenet121(weights=None).eval(), 0.3, round_to=16)
    assert unaligned_channels(by16) == [] and unaligned_channels(torchvision.models.densenet121()) == []
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), net(x), atol=2e-5, rtol=1e-5)
    assert rewritten.layers == 58
    assert rewritten.fused57_w2.shape == (9 * layers[-1].conv1.out_channels, layers[-1].conv2.out_channels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_pruned_network_through_the_triton_kernels_on_a_gpu_gives_its_own_outputs() -> None:
    """The pruned fused-mids variant's network and tiles (its registry options), the Triton kernels
    launched on the GPU (rows of taps in every 3x3 convolution: 80 channels), against the pruned
    network's own forward in FP16 channels-last, at batch 2 and 32."""
    import torchvision

    from optimize import registry
    from optimize.techniques.aoti import kernel_configs
    from optimize.techniques.pruning import channel_prune

    options = registry.get("densenet121-pruned-channels-30-fused-mids").options
    torch.manual_seed(0)
    with torch.no_grad():
        pruned = channel_prune(torchvision.models.densenet121(weights=None).eval(), 0.3, round_to=16).eval()
    net = pruned.cuda().half().to(memory_format=torch.channels_last)
    mids = {m.conv1.out_channels for m in net.modules() if type(m).__name__ == "_DenseLayer"}
    assert mids == {80}
    mid = kernels.empty_channels_last(2, 80, 7, 7, dtype=torch.float16, device=torch.device("cuda"))
    assert all(kernels.row_taps(mid, c[1]) for c in kernel_configs(options)["conv_configs"])
    assert all(options.get(k) for k in ("block_buffer", "fused_bottleneck", "pool_first", "fused_conv",
                                        "shared_bottleneck"))  # fmt: skip
    rewritten = BlockBufferDenseNet(net, fused=True, fused_conv=True, shared_bottleneck=True, pool_first=True,
                                    **kernel_configs(options)).eval()  # fmt: skip
    for n in (2, 32):
        x = torch.randn(n, 3, 224, 224, device="cuda").half().contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            got, ref = rewritten(x).float(), net(x).float()
        scale = float(ref.abs().max())
        assert scale > 0 and float((got - ref).abs().max()) < 0.02 * scale, (n, float((got - ref).abs().max()), scale)


def test_fused_conv_and_shared_bottleneck_need_the_fused_layer_kernel() -> None:
    import torchvision

    with pytest.raises(ValueError, match="fused_conv=True needs fused=True"):
        BlockBufferDenseNet(torchvision.models.densenet121(weights=None), fused_conv=True)
    with pytest.raises(ValueError, match="shared_bottleneck=True needs fused=True"):
        BlockBufferDenseNet(torchvision.models.densenet121(weights=None), shared_bottleneck=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_kernels_compiled_on_a_gpu_match_the_reference() -> None:
    """FP16 on the GPU, every configuration of ``BLOCK_CONFIGS`` / ``CONV_CONFIGS`` with and without
    split-K, at batch 2 (few tiles: the split path) and 64 (many: one program a tile), against
    PyTorch's arithmetic; the split-K counters are left zero for the next call."""
    for n in (2, 64):
        o = {k: v.cuda() for k, v in _operands(n, 352, 320, 128, (14, 14), torch.float16).items()}
        ref = kernels.reference(o["buf"][:, :320], o["w"], o["s1"], o["b1"], o["s2"], o["b2"])
        layer = {*kernels.BLOCK_CONFIGS, *((*c[:4], 0) for c in kernels.BLOCK_CONFIGS), (32, 64, 4, 3, 264)}
        ws = kernels.split_workspace(torch.device("cuda"), kernels.split_target(tuple(layer)))
        assert ws is not None
        for cfg in sorted(layer):
            got = kernels.bn_relu_conv1x1(o["buf"], 320, o["w"], o["s1"], o["b1"], o["s2"], o["b2"], cfg, ws)
            torch.testing.assert_close(got, ref, atol=2e-2, rtol=1e-2, msg=f"{n} {cfg}")
            assert not ws[1].any()
            # The same into a channel slice of a wider tensor (the shared bottleneck's op).
            wide = torch.zeros(n, 160, 14, 14, device="cuda", dtype=torch.float16)
            wide = wide.contiguous(memory_format=torch.channels_last)
            kernels.bn_relu_conv1x1(o["buf"], 320, o["w"], o["s1"], o["b1"], o["s2"], o["b2"], cfg, ws, wide[:, :128])
            torch.testing.assert_close(wide[:, :128], ref, atol=2e-2, rtol=1e-2, msg=f"into {n} {cfg}")
            assert not wide[:, 128:].any()
        y = torch.randn(n, 32, 14, 14, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
        kernels.write_channels(o["buf"], y, 320)
        assert torch.equal(o["buf"][:, 320:], y)
        # The 3x3 convolution into the buffer against cuDNN's.
        x, weight = (t.cuda() for t in _conv_operands(n, 128, 32, (14, 14), torch.float16))
        ref = torch.nn.functional.conv2d(x, weight, padding=1)
        conv = {*kernels.CONV_CONFIGS, *((*c[:4], 0) for c in kernels.CONV_CONFIGS), (32, 64, 4, 3, 264)}
        ws = kernels.split_workspace(torch.device("cuda"), kernels.split_target(tuple(conv)))
        assert ws is not None
        for cfg in sorted(conv):
            buf = o["buf"].clone()
            kernels.conv3x3_into(buf, x, kernels.conv3x3_weight(weight), 288, cfg, ws)
            torch.testing.assert_close(buf[:, 288:320], ref, atol=2e-2, rtol=1e-2, msg=f"{n} {cfg}")
            assert torch.equal(buf[:, :288], o["buf"][:, :288]) and torch.equal(buf[:, 320:], o["buf"][:, 320:])
            assert not ws[1].any()
        # A pruned layer's 80 channels in, 16 out: rows of taps (the default there) and tap by tap.
        x, weight = (t.cuda() for t in _conv_operands(n, 80, 16, (14, 14), torch.float16))
        ref = torch.nn.functional.conv2d(x, weight, padding=1)
        for cfg in ((64, 64, 4, 3, 96), (64, 128, 4, 3, 132), (128, 128, 8, 3, 0), (64, 32, 4, 3, 264)):
            ws = kernels.split_workspace(torch.device("cuda"), 264)
            for taps in (None, False):
                buf = o["buf"].clone()
                kernels.launch_conv3x3(buf, x, kernels.conv3x3_weight(weight), 96, *cfg, workspace=ws, taps=taps)
                torch.testing.assert_close(buf[:, 96:112], ref, atol=2e-2, rtol=1e-2, msg=f"{n} {cfg} {taps}")
                assert torch.equal(buf[:, :96], o["buf"][:, :96]) and torch.equal(buf[:, 112:], o["buf"][:, 112:])
                assert ws is not None and not ws[1].any()


def test_runner_turns_cudnn_benchmark_on_only_on_cuda_and_only_when_asked() -> None:
    from model_server.runtimes import Runner

    manifest = {"slug": "x", "precision": "fp16", "input": {"max_batch": 2}, "options": {"cudnn_benchmark": True}}
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        Runner(manifest, torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False  # a CPU runner leaves the process setting alone
        if torch.cuda.is_available():
            Runner({**manifest, "options": {}}, torch.device("cuda"))
            assert torch.backends.cudnn.benchmark is False
            Runner(manifest, torch.device("cuda"))
            assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before
    from optimize import registry

    assert registry.get("densenet121-aoti-fp16-cl-dynamic-fused").options["cudnn_benchmark"] is True
