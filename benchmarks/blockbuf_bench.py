"""DenseNet-121 with each dense block's features written once into a block-wide buffer, against
torchvision's forward (a ``torch.cat`` of every earlier feature per layer), all under stock
``torch.compile(mode="reduce-overhead")``, FP16 channels-last, in one process. Arms (``--arms``):

    stock      torchvision's forward
    blockbuf   the block-buffer rewrite (``optimize/rewrites.py``)
    pool       the same, transitions pooling before their 1x1 convolution (``pool_first``)
    fused      the same with each layer's norm + ReLU + 1x1 convolution + norm + ReLU in one Triton
               kernel (``optimize/kernels.py``, tiles per block tuned at batch 128); ``fused32``:
               32-pixel tiles in every block (the fastest kernel at batch 1)
    fusedconv  fused, and each 3x3 convolution by a Triton kernel writing into the buffer
               (``kernels.conv3x3_into``) instead of cuDNN + a copy; ``fusedconv32``: 32-pixel tiles
               and no split-K; ``fusedconv0``: the default tiles without split-K
    fusedmids  fusedconv with one bottleneck tensor per block (``shared_bottleneck``)

Why: on the H100 a batch-1 call of the AOTInductor package runs 376 kernels, 105 of them
concatenation copies (``trace_summary.py --calls``). With one buffer per block, a layer reads a
view of the channels written so far and writes its 32 new channels into their place; whether the
compiler then drops the copies is what this measures (time per call, CUDA events, same weights,
same compiler settings, maximum logit difference against torchvision's forward).

    python benchmarks/blockbuf_bench.py [--batch-sizes 1,128] [--arms stock,blockbuf,pool,fused] [--name blockbuf]
    python benchmarks/blockbuf_bench.py --device cpu --batch-sizes 1 --no-compile   # the equality check only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from optimize import kernels  # noqa: E402  (after the path set-up)

ARMS: dict[str, dict[str, Any]] = {
    "stock": {},
    "blockbuf": {},
    "pool": {"pool_first": True},
    "fused": {"fused": True, "pool_first": True},
    "fused32": {"fused": True, "pool_first": True, "configs": ((32, 64, 4, 3, 0),)},
    "fusedconv": {"fused": True, "pool_first": True, "fused_conv": True},
    "fusedmids": {"fused": True, "pool_first": True, "fused_conv": True, "shared_bottleneck": True},
    "fusedconv0": {
        "fused": True,
        "pool_first": True,
        "fused_conv": True,
        "configs": tuple((*c[:4], 0) for c in kernels.BLOCK_CONFIGS),
        "conv_configs": tuple((*c[:4], 0) for c in kernels.CONV_CONFIGS),
    },
    "fusedconv32": {
        "fused": True,
        "pool_first": True,
        "fused_conv": True,
        "configs": ((32, 64, 4, 3, 0),),
        "conv_configs": ((32, 64, 4, 3, 0),),
    },
}


def profile_families(fn: Any, x: torch.Tensor, path: Path, calls: int = 2) -> dict[str, dict[str, float]]:
    """Trace ``calls`` calls of ``fn`` into ``path``; the kernels per family and call."""
    from torch.profiler import ProfilerActivity, profile
    from trace_summary import families, kernel_family, load_trace

    path.parent.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        for _ in range(calls):
            fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    trace = load_trace(path)
    other: dict[str, float] = {}
    for e in trace.get("traceEvents", []):
        if isinstance(e, dict) and e.get("cat") == "kernel" and kernel_family(str(e.get("name"))) == "other":
            other[str(e["name"])] = other.get(str(e["name"]), 0.0) + float(e.get("dur", 0)) / calls
    top = sorted(other.items(), key=lambda kv: -kv[1])[:4]
    print(f"  {path.stem}: 'other' kernels taking longest per call: {[(n[:60], round(us)) for n, us in top]}",
          file=sys.stderr)  # fmt: skip
    return families(trace, calls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,128", help="default 1,128")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--arms", default="stock,blockbuf,pool,fused", help=f"comma-separated, from {','.join(ARMS)}")
    p.add_argument("--iters", type=int, default=50, help="timed calls per measurement (default 50)")
    p.add_argument("--no-compile", action="store_true", help="eager only (the equality check, for a CPU)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN time its convolution algorithms (cudnn.benchmark), every arm")  # fmt: skip
    p.add_argument("--name", default="blockbuf", help="record name (file name part)")
    p.add_argument("--profile-dir", type=Path, default=None,
                   help="also trace 2 calls of each arm and batch size with torch.profiler into this folder; the "
                   "record gets each trace's kernels per family and call (trace_summary.py)")  # fmt: skip
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not batch_sizes or batch_sizes[0] < 1:
        p.error(f"--batch-sizes must be positive, got {args.batch_sizes!r}")
    arm_names = sorted({a for a in args.arms.split(",") if a}, key=lambda a: a != "stock")  # stock first
    bad = [a for a in arm_names if a not in ARMS]
    if bad or "stock" not in arm_names:
        p.error(f"--arms: unknown {bad} or no 'stock' (choose from {', '.join(ARMS)}), got {args.arms!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU (use --device cpu)")

    import torchvision
    from gpu_bench import time_fn
    from records import write_record

    from optimize.rewrites import BlockBufferDenseNet

    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    stock = torchvision.models.densenet121(weights=None).eval().to(device=device, dtype=dtype)
    stock = stock.to(memory_format=torch.channels_last)
    arms: dict[str, nn.Module] = {
        a: stock if a == "stock" else BlockBufferDenseNet(stock, **ARMS[a]).eval() for a in arm_names
    }
    metrics: dict[str, Any] = {"cudnn_benchmark": args.cudnn_benchmark}
    with torch.inference_mode():
        x = torch.randn(2, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        ref = arms["stock"](x)
        for arm in arm_names[1:]:
            key = "eager_max_abs_logit_diff_logits" if arm == "blockbuf" else f"{arm}_eager_max_abs_logit_diff_logits"
            metrics[key] = float((ref - arms[arm](x)).abs().max())
    for b in batch_sizes:
        x = torch.randn(b, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        outs = {}
        for arm, model in arms.items():
            fn: Any = model
            if not args.no_compile:
                torch._dynamo.reset()
                fn = torch.compile(model, mode="reduce-overhead", dynamic=False)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    fn(x)
                    fn(x)
                metrics[f"{arm}_b{b}_compile_s"] = round(time.perf_counter() - t0, 1)
            with torch.inference_mode():
                outs[arm] = fn(x).float().clone()
            ms = time_fn(fn, x, device, args.iters)
            metrics[f"{arm}_b{b}_ms"] = round(ms, 4)
            metrics[f"{arm}_b{b}_img_s"] = round(b * 1000 / ms, 1)
            print(f"{arm} b{b}: {ms:.3f} ms", file=sys.stderr)
            if args.profile_dir is not None:
                for fam, v in profile_families(fn, x, args.profile_dir / f"{arm}_b{b}.pt.trace.json").items():
                    metrics[f"{arm}_b{b}_{fam}_kernels_count"] = v["count"]
                    metrics[f"{arm}_b{b}_{fam}_us"] = v["us"]
        for arm in arm_names[1:]:
            key = f"b{b}_max_abs_logit_diff_logits" if arm == "blockbuf" else f"{arm}_b{b}_max_abs_logit_diff_logits"
            metrics[key] = float((outs["stock"] - outs[arm]).abs().max())
            metrics[f"{arm}_vs_stock_b{b}_ratio"] = round(metrics[f"{arm}_b{b}_ms"] / metrics[f"stock_b{b}_ms"], 3)
    write_record(args.name, "benchmarks/blockbuf_bench.py", sys.argv[1:] if argv is None else argv, device,
                 metrics, args.results_dir)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
