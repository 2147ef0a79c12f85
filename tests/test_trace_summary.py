"""benchmarks/trace_summary.py: busy time per CUDA stream, union and overlap, on known traces."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trace_summary", ROOT / "benchmarks" / "trace_summary.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernel(name: str, stream: int, ts: float, dur: float, cat: str = "kernel") -> dict[str, object]:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream, "device": 0}}


TRACE = {
    "traceEvents": [
        {"ph": "X", "cat": "cpu_op", "name": "aten::conv2d", "ts": 0, "dur": 5000, "tid": 1},  # host side: ignored
        _kernel("conv", 7, 1000, 2000),  # stream 7: 1000-3000 and 3500-4500 (conv twice, one relu inside)
        _kernel("relu", 7, 2000, 500),
        _kernel("conv", 7, 3500, 1000),
        _kernel("resize", 13, 2500, 1500),  # stream 13: 2500-4000, overlapping stream 7 for 1000 us
        _kernel("Memcpy DtoH", 13, 5000, 1000, "gpu_memcpy"),  # 5000-6000
    ]
}


def test_busy_time_union_and_overlap_of_two_streams() -> None:
    s = _module().summarize(TRACE, top=2)
    assert s["gpu_events"] == 5 and s["window_ms"] == 5.0  # 1000 .. 6000 us
    # union: 1000-4500 (stream 7 and 13 together) + 5000-6000 = 4.5 ms
    assert s["gpu_busy_ms"] == 4.5 and s["gpu_busy_pct"] == 90.0
    # per stream: 7 busy 3.0 ms, 13 busy 2.5 ms: 5.5 - 4.5 = 1.0 ms ran at once
    assert s["streams"]["7"]["busy_ms"] == 3.0 and s["streams"]["13"]["busy_ms"] == 2.5
    assert s["overlap_ms"] == 1.0
    assert list(s["streams"]) == ["7", "13"]  # the busiest stream first
    assert s["streams"]["7"]["longest_ms"] == {"conv": 3.0, "relu": 0.5}
    assert s["streams"]["13"]["events"] == 2


def test_a_trace_without_gpu_events_says_so() -> None:
    s = _module().summarize({"traceEvents": TRACE["traceEvents"][:1]})
    assert s["gpu_events"] == 0 and "no GPU" in s["note"]


def test_cli_reads_gzipped_traces_and_names_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "t.json.gz"
    path.write_bytes(gzip.compress(json.dumps(TRACE).encode()))
    script = str(ROOT / "benchmarks" / "trace_summary.py")
    out = subprocess.run([sys.executable, script, str(path)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["gpu_busy_ms"] == 4.5
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    out = subprocess.run([sys.executable, script, str(bad)], capture_output=True, text=True)
    assert out.returncode == 2 and "bad.json is not a Chrome-trace JSON file" in out.stderr
    out = subprocess.run([sys.executable, script, str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert out.returncode == 2 and "no such trace file" in out.stderr


def test_kernel_families_per_call_by_name() -> None:
    """Names from the H100's DenseNet traces fall into their families; counts and time read per call."""
    mod = _module()
    names = {
        "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc": "convolution",
        "nvjet_sm90_hsh_64x8_64x16_2x4_h_bz_bias_TNT": "matmul",
        "triton_mm_17": "matmul",
        "triton_poi_fused_cat_67": "concat_copy",
        "triton_poi_fused__native_batch_norm_legit_no_training_cat_convolution_relu_3": "batchnorm_relu",
        "triton_poi_fused__native_batch_norm_legit_no_training_avg_pool2d_relu_9": "batchnorm_relu",
        "void at::native::elementwise_kernel<128, 2>": "other",
        "_bn_relu_gemm": "fused_layer",  # optimize/kernels.py, not a plain matmul
        "_copy_rows": "other",
    }
    for name, family in names.items():
        assert mod.kernel_family(name) == family, name
    trace = {
        "traceEvents": [
            _kernel("triton_poi_fused_cat_1", 7, 0, 2),
            _kernel("triton_poi_fused_cat_2", 7, 10, 2),
            _kernel("sm90_xmma_fprop_implicit_gemm_x", 7, 20, 12),
            _kernel("sm90_xmma_fprop_implicit_gemm_x", 7, 40, 12),
            _kernel("Memcpy HtoD", 7, 60, 50, "gpu_memcpy"),  # a copy, not a kernel: in no family
        ]
    }
    assert mod.families(trace, calls=2) == {
        "convolution": {"count": 1.0, "us": 12.0},
        "concat_copy": {"count": 1.0, "us": 2.0},
    }


def test_cli_adds_families_and_refuses_a_zero_call_count(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps(TRACE))
    script = str(ROOT / "benchmarks" / "trace_summary.py")
    out = subprocess.run(
        [sys.executable, script, str(path), "--calls", "2"], capture_output=True, text=True, check=True
    )
    summary = json.loads(out.stdout)
    assert summary["families"]["other"] == {
        "count": 1.5,
        "us": 2250.0,
    }  # conv x2, resize and summary["families_per"] == "2 call(s)"
    out = subprocess.run([sys.executable, script, str(path), "--calls", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "--calls must be at least 1, got 0" in out.stderr
