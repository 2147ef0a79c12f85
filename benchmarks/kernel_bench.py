"""The hand-written DenseNet kernels (``optimize/kernels.py``) alone, per dense block of DenseNet-121,
for several tile configurations: which one each block should use, and how it compares with the
library call it replaces.

``--kernel layer`` (default): the fused norm + ReLU + 1x1 convolution + norm + ReLU kernel against
a plain cuBLAS matrix multiply of the same shape (which does not even normalise its input).
``--kernel conv3x3``: the 3x3 convolution writing into the block buffer against cuDNN's
convolution alone (``cudnn_conv``) and followed by the copy into the buffer it needs (``cudnn_conv_copy``);
``--tapwise`` also times each configuration that steps through rows of taps (``kernels.row_taps``)
tap by tap, as ``<config>-tapwise``.

Each measurement replays a CUDA graph of one whole dense block's kernels (every layer's shape, in
order, reading a block buffer of the real width), so launch costs are the graph's, as in a served
package; CUDA events, the median of ``--reps`` replays. FP16, random weights.

    python benchmarks/kernel_bench.py [--kernel layer|conv3x3] [--batch-sizes 1,128] [--configs 64x64w4s3,...]

A configuration ``MxKwWsS[tT]`` is ``block_m`` pixels x ``block_k`` channels, W warps, S pipeline
stages, and optionally ``tT``: split the reduction (split-K) until about T programs run (default 0:
never; the batch-1 shapes have a few tiles only).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from optimize import kernels  # noqa: E402  (after the path set-up)
from optimize.kernels import Config  # noqa: E402

# DenseNet-121: (height = width, input channels, layers) per dense block; growth 32, bottleneck 128.
# ``--network pruned-30`` sets the channel-pruned variant's (``densenet121-pruned-channels-30-fused-mids``:
# Torch-Pruning at 30 % in multiples of 16 left every layer 16 new channels and an 80-channel
# bottleneck, and the blocks 64, 80, 176 and 352 input channels).
NETWORKS = {
    "densenet121": (((56, 64, 6), (28, 128, 12), (14, 256, 24), (7, 512, 16)), 32, 128),
    "pruned-30": (((56, 64, 6), (28, 80, 12), (14, 176, 24), (7, 352, 16)), 16, 80),
}
BLOCKS, GROWTH, BOTTLENECK = NETWORKS["densenet121"]
DEFAULT_CONFIGS = {
    "layer": "32x64w4s3,64x64w4s3,64x32w4s4,32x64w4s3t128,64x64w4s3t128,64x32w4s4t128,32x64w4s3t264",
    "conv3x3": "32x64w4s3,64x64w4s3,128x64w4s3,256x64w8s3,32x64w4s3t128,64x64w4s3t128,32x64w4s3t264",
}
CONFIG = re.compile(r"^(\d+)x(\d+)w(\d+)s(\d+)(?:t(\d+))?$")


def parse_config(text: str) -> Config:
    m = CONFIG.match(text)
    if not m:
        raise ValueError(f"configuration {text!r} is not MxKwWsS[tT] (for example 64x64w4s3 or 32x64w4s3t128)")
    bm, bk, warps, stages = (int(g) for g in m.groups()[:4])
    split_target = int(m.group(5) or 0)
    for name, v in (("block_m", bm), ("block_k", bk)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"configuration {text!r}: {name} must be a power of two >= 16, got {v}")
    return bm, bk, warps, stages, split_target


def block_layers(batch: int, block: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """One dense block's layer operands: the buffer's channel slice each layer reads, and its weights."""
    hw, c0, n = BLOCKS[block]
    total = c0 + GROWTH * n
    buf = torch.randn(batch, total, hw, hw, device=device, dtype=torch.float16)
    buf = buf.contiguous(memory_format=torch.channels_last)
    layers = []
    for i in range(n):
        k = c0 + GROWTH * i
        layers.append({
            "x": buf[:, :k],
            "buf": buf,
            "k": k,
            "w": (torch.randn(k, BOTTLENECK, device=device) / k**0.5).half(),
            "s1": torch.rand(k, device=device) + 0.5, "b1": torch.randn(k, device=device) * 0.1,
            "s2": torch.rand(BOTTLENECK, device=device) + 0.5, "b2": torch.randn(BOTTLENECK, device=device) * 0.1,
            "a": torch.randn(batch * hw * hw, k, device=device, dtype=torch.float16),  # the cuBLAS arm's input
        })  # fmt: skip
    return layers


def graph_ms(fn: Any, reps: int) -> float:
    """Median milliseconds of one replay of a CUDA graph of ``fn``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_block(b: int, block: int, configs: dict[str, Config], reps: int,
               metrics: dict[str, Any]) -> list[str]:  # fmt: skip
    """Time one dense block at batch ``b``: cuBLAS, then each configuration; metrics go into ``metrics``."""
    layers = block_layers(b, block, torch.device("cuda"))
    last = layers[-1]  # the widest layer: the accuracy check
    operands = (last["w"], last["s1"], last["b1"], last["s2"], last["b2"])
    ref = kernels.reference(last["x"], *operands)

    def cublas() -> None:
        for lay in layers:
            torch.mm(lay["a"], lay["w"])

    key = f"block{block + 1}_b{b}"
    floor = graph_ms(cublas, reps)
    metrics[f"{key}_cublas_mm_ms"] = round(floor, 4)
    line = [f"b{b} block{block + 1}: cuBLAS mm only {floor:.3f} ms"]
    ws = kernels.split_workspace(torch.device("cuda"), kernels.split_target(tuple(configs.values())))

    def fused(cfg: Config) -> None:
        for lay in layers:
            kernels.launch(lay["buf"], lay["k"], lay["w"], lay["s1"], lay["b1"], lay["s2"], lay["b2"], *cfg,
                           workspace=ws)  # fmt: skip

    def widest(cfg: Config) -> torch.Tensor:
        return kernels.launch(last["buf"], last["k"], *operands, *cfg, workspace=ws)

    return line + time_configs(key, configs, fused, widest, ref, reps, metrics)


def time_configs(key: str, configs: dict[str, Config], block: Any, widest: Any, ref: torch.Tensor, reps: int,
                 metrics: dict[str, Any]) -> list[str]:  # fmt: skip
    """Per configuration: ``widest(cfg)`` (the block's widest layer) against ``ref``, then a CUDA graph
    of ``block(cfg)`` (every layer of the block) timed; a configuration Triton cannot compile is noted."""
    line = []
    for name, cfg in configs.items():
        try:
            out = widest(cfg)
            ms = graph_ms(lambda cfg=cfg: block(cfg), reps)
        except Exception as e:  # a configuration Triton cannot compile (shared memory, registers)
            metrics[f"{key}_{name}_error"] = str(e)[:200]
            line.append(f"{name} failed")
            continue
        metrics[f"{key}_{name}_ms"] = round(ms, 4)
        metrics[f"{key}_{name}_max_abs_diff_logits"] = float((out.float() - ref.float()).abs().max())
        line.append(f"{name} {ms:.3f}")
    return line


def time_conv_block(b: int, block: int, configs: dict[str, Config], reps: int,
                    metrics: dict[str, Any], tapwise: bool = False) -> list[str]:  # fmt: skip
    """Time one dense block's 3x3 convolutions at batch ``b``: cuDNN (alone, then with the copy into the
    buffer), then the Triton kernel in each configuration (``tapwise``: also tap by tap where it would
    step through rows of taps, as ``<config>-tapwise``); metrics go into ``metrics``."""
    hw, c0, n = BLOCKS[block]
    dev = torch.device("cuda")
    buf = torch.zeros(b, c0 + GROWTH * n, hw, hw, device=dev, dtype=torch.float16)
    buf = buf.contiguous(memory_format=torch.channels_last)
    layers = []
    for i in range(n):
        x = torch.randn(b, BOTTLENECK, hw, hw, device=dev, dtype=torch.float16)
        weight = (torch.randn(GROWTH, BOTTLENECK, 3, 3, device=dev) / (9 * BOTTLENECK) ** 0.5).half()
        layers.append({"x": x.contiguous(memory_format=torch.channels_last), "weight": weight,
                       "w": kernels.conv3x3_weight(weight), "c": c0 + GROWTH * i})  # fmt: skip
    last = layers[-1]
    ref = torch.nn.functional.conv2d(last["x"], last["weight"], padding=1)

    def cudnn() -> None:
        for lay in layers:
            torch.nn.functional.conv2d(lay["x"], lay["weight"], padding=1)

    def cudnn_copy() -> None:
        for lay in layers:
            buf[:, lay["c"] : lay["c"] + GROWTH] = torch.nn.functional.conv2d(lay["x"], lay["weight"], padding=1)

    key = f"block{block + 1}_b{b}"
    line = [f"b{b} block{block + 1}:"]
    for name, fn in (("cudnn_conv", cudnn), ("cudnn_conv_copy", cudnn_copy)):
        ms = graph_ms(fn, reps)
        metrics[f"{key}_{name}_ms"] = round(ms, 4)
        line.append(f"{name} {ms:.3f}")
    ws = kernels.split_workspace(dev, kernels.split_target(tuple(configs.values())))

    def triton_conv(cfg: Config, taps: bool | None = None) -> None:
        for lay in layers:
            kernels.launch_conv3x3(buf, lay["x"], lay["w"], lay["c"], *cfg, workspace=ws, taps=taps)

    def widest(cfg: Config, taps: bool | None = None) -> torch.Tensor:
        kernels.launch_conv3x3(buf, last["x"], last["w"], last["c"], *cfg, workspace=ws, taps=taps)
        return buf[:, last["c"] : last["c"] + GROWTH].clone()

    line += time_configs(key, configs, triton_conv, widest, ref, reps, metrics)
    if tapwise:  # the same configurations tap by tap where rows of taps (their default) apply: the A/B in one run
        rows = {f"{name}-tapwise": cfg for name, cfg in configs.items() if kernels.row_taps(last["x"], cfg[1])}
        line += time_configs(key, rows, lambda cfg: triton_conv(cfg, False), lambda cfg: widest(cfg, False), ref,
                             reps, metrics)  # fmt: skip
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", default="layer", choices=tuple(DEFAULT_CONFIGS), help="default layer")
    p.add_argument("--batch-sizes", default="1,128", help="default 1,128")
    p.add_argument("--configs", default=None, help=f"default (per kernel) {DEFAULT_CONFIGS}")
    p.add_argument("--network", default="densenet121", choices=tuple(NETWORKS),
                   help="the channel counts timed (default densenet121)")  # fmt: skip
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms (conv3x3)")
    p.add_argument(
        "--tapwise",
        action="store_true",
        help="conv3x3: also time configurations tap by tap where they step through rows of taps",
    )
    p.add_argument("--reps", type=int, default=30, help="graph replays per measurement (default 30)")
    p.add_argument("--name", default="kernels", help="record name (file name part)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
        config_text = args.configs if args.configs is not None else DEFAULT_CONFIGS[args.kernel]
        configs = {c: parse_config(c) for c in config_text.split(",") if c}
    except ValueError as e:
        p.error(f"--batch-sizes / --configs: {e}")
    if not batch_sizes or batch_sizes[0] < 1 or not configs:
        p.error(f"--batch-sizes must be positive and --configs non-empty, got {args.batch_sizes!r} {config_text!r}")
    if not torch.cuda.is_available():
        p.error("no CUDA GPU: the fused kernel is timed on one (its arithmetic is tested on the CPU)")

    from records import write_record

    global BLOCKS, GROWTH, BOTTLENECK
    BLOCKS, GROWTH, BOTTLENECK = NETWORKS[args.network]
    device = torch.device("cuda")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    metrics: dict[str, Any] = {"kernel": args.kernel, "cudnn_benchmark": args.cudnn_benchmark, "network": args.network}
    for b in batch_sizes:
        for block in range(len(BLOCKS)):
            if args.kernel == "conv3x3":
                line = time_conv_block(b, block, configs, args.reps, metrics, args.tapwise)
            else:
                line = time_block(b, block, configs, args.reps, metrics)
            print(", ".join(line), file=sys.stderr, flush=True)
    names = [*configs, *(f"{n}-tapwise" for n in configs)]
    for b in batch_sizes:
        for block in range(1, len(BLOCKS) + 1):
            timed = {n: metrics[f"block{block}_b{b}_{n}_ms"] for n in names if f"block{block}_b{b}_{n}_ms" in metrics}

            if timed:
                best = min(timed, key=lambda n: timed[n])
                metrics[f"block{block}_b{b}_best_config"] = best
                print(f"batch {b} block {block}: best {best} {timed[best]:.3f} ms", file=sys.stderr)
    write_record(args.name, "benchmarks/kernel_bench.py", sys.argv[1:] if argv is None else argv, device, metrics,
                 args.results_dir)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
