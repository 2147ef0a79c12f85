"""DenseNet-121 with each dense block's features written once into a block-wide buffer, against
torchvision's forward (a ``torch.cat`` of every earlier feature per layer), both under stock
``torch.compile(mode="reduce-overhead")``, FP16 channels-last, in one process.

Why: on the H100 a batch-1 call of the AOTInductor package runs 376 kernels, 105 of them
concatenation copies (``trace_summary.py --calls``). With one buffer per block, a layer reads a
view of the channels written so far and writes its 32 new channels into their place; whether the
compiler then drops the copies is what this measures (time per call, CUDA events, same weights,
same compiler settings, maximum logit difference against torchvision's forward).

    python benchmarks/blockbuf_bench.py [--batch-sizes 1,128] [--device cuda] [--name blockbuf]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,128", help="default 1,128")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--iters", type=int, default=50, help="timed calls per measurement (default 50)")
    p.add_argument("--no-compile", action="store_true", help="eager only (the equality check, for a CPU)")
    p.add_argument("--name", default="blockbuf", help="record name (file name part)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not batch_sizes or batch_sizes[0] < 1:
        p.error(f"--batch-sizes must be positive, got {args.batch_sizes!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA GPU (use --device cpu)")

    import torchvision
    from gpu_bench import time_fn
    from records import write_record

    from optimize.rewrites import BlockBufferDenseNet

    torch.manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    stock = torchvision.models.densenet121(weights=None).eval().to(device=device, dtype=dtype)
    stock = stock.to(memory_format=torch.channels_last)
    arms: dict[str, nn.Module] = {"stock": stock, "blockbuf": BlockBufferDenseNet(stock).eval()}
    metrics: dict[str, Any] = {}
    with torch.inference_mode():
        x = torch.randn(2, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        metrics["eager_max_abs_logit_diff_logits"] = float((arms["stock"](x) - arms["blockbuf"](x)).abs().max())
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
        metrics[f"b{b}_max_abs_logit_diff_logits"] = float((outs["stock"] - outs["blockbuf"]).abs().max())
        metrics[f"blockbuf_vs_stock_b{b}_ratio"] = round(metrics[f"blockbuf_b{b}_ms"] / metrics[f"stock_b{b}_ms"], 3)
    write_record(args.name, "benchmarks/blockbuf_bench.py", sys.argv[1:] if argv is None else argv, device,
                 metrics, args.results_dir)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
