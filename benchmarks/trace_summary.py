"""What a torch.profiler trace says about the GPU: busy time per CUDA stream and how they overlap.

The in-pod profiler (``POST /admin/v1/profile``) writes Chrome-trace JSON; a trace of 20 batches
under load is ~18 MB, too big to read by eye or to carry back from a lent GPU machine. This
prints (and ``serve_bench.py --trace-batches`` stores in its record) a small summary:

* ``window_ms``: first GPU event to last;
* ``gpu_busy_ms`` / ``gpu_busy_pct``: time at least one kernel, copy or memset ran (union);
* ``overlap_ms``: time two or more streams ran at once (sum of per-stream busy minus the union);
* ``streams``: per stream, its busy time, event count and the kernels that took longest in total
  (the model's stream shows DenseNet's convolutions, the decode stage's stream the resize and
  crop kernels and nvJPEG's colour conversion, if any);
* ``families``: kernels grouped by what they do (convolution, matrix product, concatenation copy,
  batch norm / ReLU, other), with count and time, divided by ``--calls`` (the forward passes the
  trace holds, 2 in an ``optimize bench`` trace) to read per call: what bounds a batch-1 forward
  is then visible as a kernel count, not only as time.

    python benchmarks/trace_summary.py trace.json[.gz] [--top 5] [--calls 2]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: Chrome-trace categories of device-side activity in torch.profiler (Kineto) traces.
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_trace(path: Path) -> dict[str, Any]:
    """A Chrome-trace file, plain or gzipped (``.gz``)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    data: dict[str, Any] = json.loads(raw)
    return data


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total


#: Kernel families by name, first match wins: cuDNN/CUTLASS convolutions ("fprop", implicit GEMM),
#: matrix products (cuBLAS's nvjet/gemm kernels, Triton's mm templates), inductor's concatenation
#: copies (``triton_poi_fused_cat_N``), fused pointwise batch norm / ReLU, everything else.
KERNEL_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("fused_layer", re.compile(r"bn_relu_gemm")),  # optimize/kernels.py: norm + ReLU + 1x1 conv + norm + ReLU
    ("convolution", re.compile(r"fprop|implicit_gemm|conv2d|convolution_kernel|dgrad|wgrad", re.I)),
    ("matmul", re.compile(r"nvjet|gemm|cutlass|triton_mm|triton_tem|matmul", re.I)),
    ("concat_copy", re.compile(r"^triton_\w+_fused_cat_\d+$")),
    ("batchnorm_relu", re.compile(r"batch_norm|relu", re.I)),
)


def kernel_family(name: str) -> str:
    """The family of a kernel by its name (``other`` when no rule matches)."""
    return next((fam for fam, rule in KERNEL_FAMILIES if rule.search(name)), "other")


def families(trace: dict[str, Any], calls: int = 1) -> dict[str, dict[str, float]]:
    """Kernels per family: ``count`` and ``us`` (total duration), each divided by ``calls``."""
    out: dict[str, dict[str, float]] = {}
    for e in trace.get("traceEvents", []):
        if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") == "kernel" and "dur" in e:
            fam = out.setdefault(kernel_family(str(e.get("name", ""))), {"count": 0.0, "us": 0.0})
            fam["count"] += 1
            fam["us"] += float(e["dur"])
    return {
        k: {"count": round(v["count"] / calls, 1), "us": round(v["us"] / calls, 1)}
        for k, v in sorted(out.items(), key=lambda kv: -kv[1]["us"])
    }


def summarize(trace: dict[str, Any], top: int = 5) -> dict[str, Any]:
    """Busy time per CUDA stream, their union and overlap, and each stream's longest kernels (ms)."""
    events = [
        e
        for e in trace.get("traceEvents", [])
        if isinstance(e, dict) and e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES and "dur" in e
    ]
    if not events:
        return {"gpu_events": 0, "note": "no GPU kernels, copies or memsets in the trace (a CPU run?)"}
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        stream = str((e.get("args") or {}).get("stream", e.get("tid", "?")))
        by_stream.setdefault(stream, []).append(e)
    spans = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events]
    window = max(end for _, end in spans) - min(start for start, _ in spans)
    union = _union_us(spans)
    streams: dict[str, Any] = {}
    busy_sum = 0.0
    for stream, evs in sorted(by_stream.items(), key=lambda kv: -sum(float(e["dur"]) for e in kv[1])):
        busy = _union_us((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs)
        busy_sum += busy
        per_name: dict[str, float] = {}
        for e in evs:
            name = str(e.get("name", "?"))[:80]
            per_name[name] = per_name.get(name, 0.0) + float(e["dur"])
        longest = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
        streams[stream] = {
            "busy_ms": round(busy / 1000, 3),
            "busy_pct": round(100 * busy / window, 1) if window else 0.0,
            "events": len(evs),
            "longest_ms": {name: round(us / 1000, 3) for name, us in longest},
        }
    return {
        "gpu_events": len(events),
        "window_ms": round(window / 1000, 3),
        "gpu_busy_ms": round(union / 1000, 3),
        "gpu_busy_pct": round(100 * union / window, 1) if window else 0.0,
        "overlap_ms": round((busy_sum - union) / 1000, 3),
        "streams": streams,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="Chrome-trace JSON from torch.profiler (.json or .json.gz)")
    p.add_argument("--top", type=int, default=5, help="kernels listed per stream, default 5")
    p.add_argument("--calls", type=int, default=1, help="forward passes in the trace, to read families per call")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error(f"--calls must be at least 1, got {args.calls}")
    if not args.trace.is_file():
        p.error(f"no such trace file: {args.trace}")
    try:
        trace = load_trace(args.trace)
    except (OSError, ValueError) as e:
        p.error(f"{args.trace} is not a Chrome-trace JSON file: {e}")
    summary = summarize(trace, args.top)
    if summary.get("gpu_events"):
        summary["families"] = families(trace, args.calls)
        summary["families_per"] = f"{args.calls} call(s)"
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
