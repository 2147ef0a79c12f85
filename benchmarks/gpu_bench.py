"""One-process GPU benchmark of the DenseNet-121 variants against stock ``torch.compile``.

Builds each variant with ``optimize`` (checked against the FP32 reference, as always), loads it
through ``model_server``'s runner, and times, with CUDA events after a warm-up:

* stock ``torch.compile(mode="reduce-overhead")``, FP16 channels-last, at every batch size;
* every variant's device-side forward (input already normalised on the GPU, as the server's
  hot path does) and the whole runner call (host uint8 in, host logits out).

It writes ``benchmarks/results/<date>-<gpu>-<name>.json`` (keys ``name``, ``command``,
``environ``, ``metrics`` with unit-suffixed keys such as ``<slug>_b128_img_s`` and ``<slug>_b1_ms``)
and a copy under ``$OUT`` when that is set, then prints a short table.

Usage (on the GPU machine, from the repository root)::

    python benchmarks/gpu_bench.py --name issue4                 # ~6-8 min on an H100
    python benchmarks/gpu_bench.py --variants densenet121-aoti-fp16-cl --skip-autotune
    python benchmarks/gpu_bench.py --device cpu --batch-sizes 1,2 --skip-stock --name dry-run   # CPU dry run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("gpu_bench")

# AOTInductor first: it is the slowest to build, and the budget check skips what comes last.
GPU_VARIANTS = (
    "densenet121-aoti-fp16-cl",
    "densenet121-aoti-fp16-cl-dynamic",
    "densenet121-aoti-fp16-cl-dynamic-blockbuf",
    "densenet121-eager-fp32",
    "densenet121-eager-fp16-cl",
    "densenet121-eager-fp16-amp",
    "densenet121-eager-bf16-amp",
    "densenet121-torchscript-fp32",
    "densenet121-onnx-fp32",
    "densenet121-onnx-fp16",
    "densenet121-pruned-l1-20",
    "densenet121-pruned-channels-30",
    "densenet121-eager-fp16-cl-graphs",
    "densenet121-pruned-channels-30-fp16-cl-graphs",
    "densenet121-sparse24-fp16",
)
# Inductor settings to compare on the AOTInductor variant (``--aoti-configs``); keep the fastest in the registry.
AOTI_PRESETS: dict[str, dict[str, Any]] = {
    "plain": {"max_autotune": False, "conv_1x1_as_mm": False, "epilogue_fusion": True},
    "mm1x1": {"max_autotune": False, "conv_1x1_as_mm": True, "epilogue_fusion": True},
    "autotune": {"max_autotune": True, "conv_1x1_as_mm": True, "epilogue_fusion": True},
    "autotune-prologue": {
        "max_autotune": True,
        "conv_1x1_as_mm": True,
        "epilogue_fusion": True,
        "prologue_fusion": True,
    },
    "autotune-conv": {"max_autotune": True, "conv_1x1_as_mm": True, "conv_backends": "ATEN,TRITON"},
    # max-autotune whose fused epilogues are taken, not each compiled and timed per candidate.
    "autotune-quick": {
        "max_autotune": True,
        "conv_1x1_as_mm": True,
        "epilogue_fusion": True,
        "benchmark_epilogue_fusion": False,
    },
}
CPU_VARIANTS = ("densenet121-eager-fp32", "densenet121-onnx-fp32", "densenet121-onnx-int8-static")
# Each structured-pruned variant, compared with its own unpruned base (registry ``base``), served the
# same way; the suffix names its keys (``pruned_channels_b32_speedup<suffix>``).
PRUNED_PAIRS = {
    "densenet121-pruned-channels-30": "",
    "densenet121-pruned-channels-30-fp16-cl-graphs": "_graphs",
    "densenet121-pruned-channels-30-aoti-dynamic": "_aoti",
    "densenet121-pruned-channels-30-fused-mids": "_fused_mids",
}


def pruned_pairs() -> list[tuple[str, str, str]]:
    """(pruned slug, its base's slug, key suffix) for every pair of ``PRUNED_PAIRS``."""
    from optimize import registry

    return [(pr, str(registry.get(pr).base), suffix) for pr, suffix in PRUNED_PAIRS.items()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="gpu-bench", help="record name (file name part)")
    p.add_argument(
        "--variants", default="", help="comma-separated slugs (default: every GPU variant; none: only --aoti-configs)"
    )
    p.add_argument("--batch-sizes", default="1,32,128", help="default 1,32,128 (b32: pruning target)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument(
        "--weights", default="random", help="random (default; speed does not depend on values), imagenet, PATH"
    )
    p.add_argument("--skip-autotune", action="store_true", help="AOTInductor without max-autotune")
    p.add_argument(
        "--autotune-buckets", default="1", help="buckets compiled with max-autotune (default 1; 128 took >7 min)"
    )
    p.add_argument("--skip-stock", action="store_true", help="skip the stock torch.compile baseline")
    p.add_argument(
        "--aoti-configs",
        default="",
        help=f"also time the AOTI variant with these inductor presets ({', '.join(AOTI_PRESETS)}), keys slug[preset]",
    )
    p.add_argument("--cuda-graphs", action="store_true", default=True, help="also time eager FP16-CL in CUDA graphs")
    p.add_argument("--iters", type=int, default=50, help="timed iterations per measurement (default 50)")
    p.add_argument(
        "--pair-rounds", type=int, default=0,
        help="also time each pruned variant and its base (both in --variants) alternately, this many rounds "
        "per batch size, both loaded at once: the speed-up as the median of the rounds' ratios (default 0: off)",
    )  # fmt: skip
    p.add_argument("--budget-s", type=float, default=510.0, help="skip variants once this much time has passed")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--aoti-cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "densenet-aoti-cache")
    args = p.parse_args(argv)
    if args.pair_rounds < 0:
        p.error(f"--pair-rounds must be >= 0, got {args.pair_rounds}")
    return args


def time_fn(fn: Any, x: Any, device: Any, iters: int, warmup: int = 5) -> float:
    """Mean ms per call: CUDA events on a GPU, perf_counter on a CPU."""
    import torch

    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn(x)
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end)) / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(x)
        return (time.perf_counter() - t0) * 1000 / iters


def record(metrics: dict[str, Any], key: str, batch: int, ms: float) -> None:
    metrics[f"{key}_b{batch}_ms"] = round(ms, 4)
    metrics[f"{key}_b{batch}_img_s"] = round(batch * 1000 / ms, 2)


def stock_compile(reference: Any, batch_sizes: list[int], device: Any, iters: int, metrics: dict[str, Any]) -> None:
    """Stock torch.compile(mode="reduce-overhead"), FP16 channels-last: the baseline of the targets."""
    import copy

    import torch

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = copy.deepcopy(reference).to(device=device, dtype=dtype).eval().to(memory_format=torch.channels_last)
    for b in batch_sizes:
        # One static compile per batch size: a second shape would otherwise recompile with dynamic
        # shapes ("automatic dynamic"), which is slower than what a user compiling for one batch gets.
        compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
        x = torch.randn(b, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(x)
            compiled(x)
        metrics[f"stock_compile_fp16_cl_b{b}_compile_s"] = round(time.perf_counter() - t0, 1)
        record(metrics, "stock_compile_fp16_cl", b, time_fn(compiled, x, device, iters))
        log.info("stock compile b%d: %.3f ms", b, metrics[f"stock_compile_fp16_cl_b{b}_ms"])


def bench_variant(
    slug: str,
    args: argparse.Namespace,
    ctx: dict[str, Any],
    batch_sizes: list[int],
    metrics: dict[str, Any],
    notes: dict[str, str],
    preset: str | None = None,
    keep: dict[str, Any] | None = None,
) -> None:
    """Build ``slug``, load it through the server's runner and time it; ``keep``: leave the runner
    loaded there (under its key) for the paired rounds instead of freeing it."""
    import torch

    from model_server.runtimes import load_runner
    from optimize import registry
    from optimize.build import build_variant

    variant = registry.get(slug)
    device = ctx["device"]
    options: dict[str, Any] = {"aoti_cache_dir": str(args.aoti_cache_dir)}
    if variant.runtime is registry.Runtime.AOTI:
        options["aoti"] = {
            "buckets": batch_sizes,
            # A dynamic-batch package is tuned for no batch size in particular: never max-autotune.
            "max_autotune": not args.skip_autotune and not variant.options.get("dynamic_batch"),
            "autotune_buckets": [int(b) for b in args.autotune_buckets.split(",") if b],
        }
        if preset is not None:
            options["aoti"].update(AOTI_PRESETS[preset])
    out_dir = ctx["artifacts"] / (preset or "registry")
    key = slug if preset is None else f"{slug}[{preset}]"
    t0 = time.perf_counter()
    manifest = build_variant(
        variant, reference=ctx["reference"], weights=ctx["weights"], images=ctx["images"],
        ref_logits=ctx["ref_logits"], output_dir=out_dir, device=device, max_batch=max(batch_sizes),
        options=options,
    )  # fmt: skip
    metrics[f"{key}_build_s"] = round(time.perf_counter() - t0, 1)
    if preset is not None:
        metrics[f"{key}_compile_s_by_batch"] = manifest["meta"]["details"].get("compile_s_by_batch")
    meta = manifest["meta"]
    metrics[f"{key}_size_mb"] = meta["file_size_mb"]
    metrics[f"{key}_top1_agreement_ratio"] = meta["fidelity"]["top1_agreement"]
    metrics[f"{key}_max_abs_logit_err_logits"] = round(meta["fidelity"]["max_abs_logit_err"], 5)
    if meta.get("num_params"):
        metrics[f"{key}_params_count"] = meta["num_params"]
        metrics[f"{key}_gflops"] = meta["gflops"]
    runs = [(key, manifest)]
    if args.cuda_graphs and device.type == "cuda" and slug == "densenet121-eager-fp16-cl":
        runs.append((f"{slug}+cudagraphs", {**manifest, "options": {**manifest["options"], "cuda_graphs": True}}))
    for key, man in runs:
        runner = load_runner(man, out_dir / slug, device)
        runner.buckets = sorted(set(batch_sizes))
        t_warm = time.perf_counter()
        runner.warm_up()
        metrics[f"{key}_warmup_s"] = round(time.perf_counter() - t_warm, 2)
        for b in batch_sizes:
            x8 = torch.randint(0, 256, (b, 3, 224, 224), dtype=torch.uint8)
            prepared = runner.prepare(x8)
            record(metrics, key, b, time_fn(runner.run_device, prepared, device, args.iters))
            # The whole served call: host uint8 in, H2D, normalise, forward, D2H logits.
            metrics[f"{key}_b{b}_e2e_ms"] = round(time_fn(runner, x8, device, max(5, args.iters // 5)), 4)
        if hasattr(runner, "active_providers"):
            notes[key] = f"onnxruntime providers: {runner.active_providers}"
        if keep is not None:
            keep[key] = runner
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()


def table(metrics: dict[str, Any], keys: list[str], batch_sizes: list[int]) -> str:
    lo, hi = min(batch_sizes), max(batch_sizes)
    stock_hi = metrics.get(f"stock_compile_fp16_cl_b{hi}_img_s")
    stock_lo = metrics.get(f"stock_compile_fp16_cl_b{lo}_ms")
    lines = [f"{'variant':44} {'b' + str(lo) + ' ms':>10} {'b' + str(hi) + ' img/s':>12} {'x stock':>8} {'size MB':>8}"]
    for k in ["stock_compile_fp16_cl", *keys]:
        ms, ips = metrics.get(f"{k}_b{lo}_ms"), metrics.get(f"{k}_b{hi}_img_s")
        if ms is None:
            continue
        ratio = f"{ips / stock_hi:.2f}" if stock_hi and ips else "-"
        lat = f"{ms:.3f}" + (f" ({ms / stock_lo:.2f}x)" if stock_lo else "")
        lines.append(f"{k:44} {lat:>10} {ips:>12.1f} {ratio:>8} {metrics.get(k + '_size_mb', '-')!s:>8}")
    return "\n".join(lines)


def target_checks(metrics: dict[str, Any], done: list[str], batch_sizes: list[int]) -> dict[str, Any]:
    """The issue's GPU targets, computed from this run's metrics (None where not measured)."""
    lo, hi = batch_sizes[0], batch_sizes[-1]
    out: dict[str, Any] = {}
    stock_hi = metrics.get(f"stock_compile_fp16_cl_b{hi}_img_s")
    stock_lo = metrics.get(f"stock_compile_fp16_cl_b{lo}_ms")
    keys = [k for k in (*done, *(f"{s}+cudagraphs" for s in done)) if f"{k}_b{hi}_img_s" in metrics]
    if keys and stock_hi:
        best = max(keys, key=lambda k: metrics[f"{k}_b{hi}_img_s"])
        out["fastest_b_max"] = {"variant": best, "x_stock_img_s": round(metrics[f"{best}_b{hi}_img_s"] / stock_hi, 3)}
        out["fastest_b_max"]["meets_1_5x"] = out["fastest_b_max"]["x_stock_img_s"] >= 1.5
    if keys and stock_lo:
        best = min(keys, key=lambda k: metrics.get(f"{k}_b{lo}_ms", float("inf")))
        ratio = round(metrics[f"{best}_b{lo}_ms"] / stock_lo, 3)
        out["fastest_b1"] = {"variant": best, "x_stock_ms": ratio, "meets_0_8x": ratio <= 0.8}
    # Each pruned variant against its own unpruned base, served the same way (registry ``base``):
    # from the paired rounds when they ran (both loaded, timed alternately), else from the two
    # variants' own timings, one after the other.
    for pr, base, suffix in pruned_pairs():
        if 32 not in batch_sizes or f"{pr}_b32_img_s" not in metrics or f"{base}_b32_img_s" not in metrics:
            continue
        ratio = round(metrics[f"{pr}_b32_img_s"] / metrics[f"{base}_b32_img_s"], 3)
        key = "pruned_channels_b32_speedup" + suffix
        out[key] = {"variant": pr, "base": base, "x_base": ratio, "meets_1_2x": ratio >= 1.2}
        rounds = metrics.get(f"pruned_channels{suffix}_b32_paired_speedups")
        if rounds:
            median = metrics[f"pruned_channels{suffix}_b32_paired_speedup_median"]
            out[key].update(x_base_sequential=ratio, x_base=median, rounds=len(rounds), min=min(rounds),
                            max=max(rounds), meets_1_2x=median >= 1.2)  # fmt: skip
    return out


def paired_rounds(
    runners: dict[str, Any], rounds: int, batch_sizes: list[int], device: Any, iters: int, metrics: dict[str, Any]
) -> None:
    """Each pruned variant and its base, both loaded, timed in alternating order ``rounds`` times per
    batch size: one speed-up (base ms / pruned ms) per round, and their median. Two variants timed
    one after the other drift apart with the machine (1.18-1.21x in three runs of the same pair);
    adjacent timings share the drift."""
    import statistics

    import torch

    for pr, base, suffix in pruned_pairs():
        if pr not in runners or base not in runners:
            continue
        for b in batch_sizes:
            x8 = torch.randint(0, 256, (b, 3, 224, 224), dtype=torch.uint8)
            inputs = {k: runners[k].prepare(x8) for k in (base, pr)}
            ratios = []
            for r in range(rounds):
                ms = {}
                for k in (base, pr) if r % 2 == 0 else (pr, base):
                    ms[k] = time_fn(runners[k].run_device, inputs[k], device, iters)
                ratios.append(round(ms[base] / ms[pr], 4))
            metrics[f"pruned_channels{suffix}_b{b}_paired_speedups"] = ratios
            metrics[f"pruned_channels{suffix}_b{b}_paired_speedup_median"] = round(statistics.median(ratios), 4)
            log.info("paired %s vs %s, batch %d: median %.3fx over %d rounds (%.3f-%.3f)", pr, base, b,
                     statistics.median(ratios), rounds, min(ratios), max(ratios))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from optimize.build import reference_logits
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",") if b})
    default = GPU_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    slugs = [] if args.variants == "none" else [s for s in args.variants.split(",") if s] or list(default)
    torch.set_grad_enabled(False)
    torch.backends.cudnn.benchmark = True
    reference, weights = load_reference(args.weights)
    images = sample_batch()
    metrics: dict[str, Any] = {}
    notes: dict[str, str] = {}
    if not args.skip_stock:
        try:
            # b1 and the largest batch only: each batch size is another compile.
            stock_compile(reference, sorted({batch_sizes[0], batch_sizes[-1]}), device, args.iters, metrics)
        except Exception as e:  # still measure the variants; the record says why the baseline is missing
            log.exception("stock torch.compile failed")
            notes["stock_compile_fp16_cl"] = f"failed: {e}"
    ref_logits = reference_logits(reference, images, device)
    done: list[str] = []
    # Runners the paired rounds time (a pruned variant and its base, both in this run) stay loaded.
    paired = {s for pr, base, _ in pruned_pairs() if pr in slugs and base in slugs
              for s in (pr, base)} if args.pair_rounds > 0 else set()  # fmt: skip
    runners: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        ctx = {
            "device": device, "reference": reference, "weights": weights, "images": images,
            "ref_logits": ref_logits, "artifacts": Path(tmp),
        }  # fmt: skip
        for slug in slugs:
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                notes[slug] = f"skipped: time budget {args.budget_s:.0f} s spent ({elapsed:.0f} s)"
                continue
            log.info("[%.0f s] %s", elapsed, slug)
            cudnn_benchmark = torch.backends.cudnn.benchmark
            try:
                bench_variant(slug, args, ctx, batch_sizes, metrics, notes, keep=runners if slug in paired else None)
                done.append(slug)
            except Exception as e:  # one variant failing (fidelity, a missing kernel) must not end the run
                log.exception("%s failed", slug)
                notes[slug] = f"failed: {type(e).__name__}: {str(e)[:400]}"
            finally:
                # A variant's runner may turn cuDNN's algorithm timing on (options.cudnn_benchmark):
                # the variants after it, like stock before it, run with the default.
                torch.backends.cudnn.benchmark = cudnn_benchmark
        aoti = "densenet121-aoti-fp16-cl"
        for preset in (p for p in args.aoti_configs.split(",") if p):
            key = f"{aoti}[{preset}]"
            elapsed = time.perf_counter() - started
            if preset not in AOTI_PRESETS or elapsed > args.budget_s:
                notes[key] = "unknown preset" if preset not in AOTI_PRESETS else "skipped: time budget spent"
                continue
            log.info("[%.0f s] %s", elapsed, key)
            try:
                bench_variant(aoti, args, ctx, batch_sizes, metrics, notes, preset=preset)
                done.append(key)
            except Exception as e:
                log.exception("%s failed", key)
                notes[key] = f"failed: {type(e).__name__}: {str(e)[:400]}"
        if runners:
            log.info("[%.0f s] paired rounds: %s", time.perf_counter() - started, sorted(runners))
            paired_rounds(runners, args.pair_rounds, batch_sizes, device, args.iters, metrics)
            runners.clear()
    metrics["total_s"] = round(time.perf_counter() - started, 1)
    targets = target_checks(metrics, done, batch_sizes)
    from optimize.build import environment

    env = environment(device)
    rec = {
        "name": args.name,
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "environ": env,
        "metrics": metrics,
        "notes": notes,
        "targets": targets,
        "weights": weights.name,
        "batch_sizes": batch_sizes,
        "variants": slugs,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    gpu = re.sub(r"[^a-z0-9]+", "-", str(env["gpu"] if device.type == "cuda" else "cpu").lower()).strip("-")
    fname = f"{dt.date.today().isoformat()}-{gpu}-{re.sub(r'[^a-zA-Z0-9_.-]+', '-', args.name)}.json"
    text = json.dumps(rec, indent=2) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / fname).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / fname).write_text(text)
    for k, v in notes.items():
        print(f"note: {k}: {v}")
    print(f"record: {args.out_dir / fname}")
    print(f"targets: {json.dumps(targets)}")
    print(table(metrics, [*done, *(f"{s}+cudagraphs" for s in done)], batch_sizes))
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
