"""Where a lone request's time goes in the device process: one JPEG, batch 1, step by step.

At concurrency 1 the serving benchmark's median sits well above the variant's own batch-1
latency (``serve_bench``: ``e2e_c1_p50_ms`` against ``ondevice_b1_ms``). This script takes the
device side of that gap apart, with the server's own code (``DevicePipeline`` and the artifact's
runner), on one VGA photo delivered as the IPC delivers it (a ``JpegBatch`` over one buffer):

* ``whole_ms``: the device thread's whole call (decode, crop, model, logits on the host), median
  of ``--reps`` calls ``--gap-ms`` apart (at concurrency 1 the device idles between requests),
  and ``whole_thread_cpu_ms``, the CPU time the calling thread spent in it;
* ``ondevice_b1_ms``: the runner alone on a batch already on the device (``serve_bench``'s figure);
* ``step_<part>_ms``: each part alone, the device synchronised after it (``encoded``, ``nvjpeg``,
  ``crop``, ``runner``), and ``step_<part>_launch_ms``, the CPU time to enqueue it;
* ``profile``: a torch.profiler pass over ``--profile-calls`` whole calls back to back: the ops
  that took the most CPU (self time per call) and how busy the GPU was within the calls
  (``gpu_busy_pct``: below 100 the device waited for the host).

Writes ``benchmarks/results/<date>-<gpu>-<name>.json`` (``name``, ``command``, ``date``,
``environ``, ``metrics``) and a copy under ``$OUT``. Runs on a CPU too (torchvision decodes
there), which is what the tests use.

    python benchmarks/request_anatomy.py --model-dir artifacts/densenet121-aoti-fp16-cl-dynamic
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

import torch  # noqa: E402
from decode_bench import median_ms  # noqa: E402
from records import write_record  # noqa: E402


def _launch_ms(fn: Callable[[], object], reps: int, sync: Callable[[], object]) -> float:
    """Median CPU ms to enqueue ``fn`` (the device synchronised before and after, outside the timing)."""
    cpus = []
    for _ in range(reps):
        sync()
        c0 = time.thread_time()
        fn()
        cpus.append((time.thread_time() - c0) * 1000)
        sync()
    return round(statistics.median(cpus), 3)


def anatomy(model_dir: Path, device: torch.device, *, reps: int, gap_ms: float, profile_calls: int) -> dict[str, Any]:
    from loadtest._payloads import photo_set
    from model_server.artifact import read_manifest
    from model_server.images import JpegBatch
    from model_server.pipeline import DevicePipeline
    from model_server.preprocess import decode_jpegs, gpu_resize_crop_many
    from model_server.runtimes import load_runner

    manifest = read_manifest(model_dir)
    runner = load_runner(manifest, model_dir, device)
    runner.warm_up()
    pipeline = DevicePipeline(runner)
    pipeline.warm_up()
    jpeg = photo_set("vga")[0].jpeg
    request = JpegBatch([jpeg], buffer=bytearray(jpeg))
    cuda = device.type == "cuda"
    sync: Callable[[], object] = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    gap_s = gap_ms / 1000
    metrics: dict[str, Any] = {"variant": manifest.get("slug"), "jpeg_kb": round(len(jpeg) / 1024, 1)}

    def whole() -> object:
        result = pipeline([request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    metrics["whole_ms"], metrics["whole_thread_cpu_ms"] = median_ms(whole, reps, device, gap_s=gap_s)
    metrics["whole_back_to_back_ms"], _ = median_ms(whole, reps, device)

    x = torch.randint(0, 255, (1, 3, 224, 224), dtype=torch.uint8, device=device)
    metrics["ondevice_b1_ms"], metrics["ondevice_b1_thread_cpu_ms"] = median_ms(
        lambda: runner(x), reps, device, gap_s=gap_s
    )

    encoded = request.encoded()
    decoded = decode_jpegs(encoded, device)
    crops = gpu_resize_crop_many(decoded)
    steps: dict[str, Callable[[], object]] = {
        "encoded": request.encoded,
        "nvjpeg": lambda: decode_jpegs(encoded, device),
        "crop": lambda: gpu_resize_crop_many(decoded),
        "runner": lambda: runner(crops),
    }
    for name, fn in steps.items():
        metrics[f"step_{name}_ms"], _ = median_ms(fn, reps, device, gap_s=gap_s)
        metrics[f"step_{name}_launch_ms"] = _launch_ms(fn, reps, sync)
    metrics["steps_sum_ms"] = round(sum(metrics[f"step_{n}_ms"] for n in steps), 3)
    if profile_calls:
        metrics["profile"] = _profile(whole, profile_calls, cuda, sync)
    return metrics


def _profile(fn: Callable[[], object], calls: int, cuda: bool, sync: Callable[[], object]) -> dict[str, Any]:
    """CPU self time per op (per call) and the GPU's busy share over ``calls`` back-to-back calls."""
    import trace_summary
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    out: dict[str, Any] = {
        "calls": calls,
        "top_self_cpu_us_per_call": {e.key[:80]: round(e.self_cpu_time_total / calls, 1) for e in ops},
        "op_calls_per_call": {e.key[:80]: round(e.count / calls, 1) for e in ops},
    }
    if cuda:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp, "trace.json")
            prof.export_chrome_trace(str(path))
            summary = trace_summary.summarize(trace_summary.load_trace(path), top=6)
        out["gpu_window_ms_per_call"] = round(summary.get("window_ms", 0.0) / calls, 3)
        out["gpu_busy_ms_per_call"] = round(summary.get("gpu_busy_ms", 0.0) / calls, 3)
        out["gpu_busy_pct"] = summary.get("gpu_busy_pct")
        out["streams"] = summary.get("streams")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True, help="a built artifact (variant.json inside)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--reps", type=int, default=200, help="timed calls per figure (median), default 200")
    p.add_argument("--gap-ms", type=float, default=3.0, help="idle time before each timed call, default 3")
    p.add_argument("--profile-calls", type=int, default=20, help="whole calls under torch.profiler (0: off)")
    p.add_argument("--name", default="request-anatomy", help="record name (file name part)")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    given = sys.argv[1:] if argv is None else argv
    args = p.parse_args(given)
    if not (args.model_dir / "variant.json").is_file():
        p.error(f"--model-dir {args.model_dir} holds no variant.json (build one with python -m optimize build)")
    if args.reps < 1 or args.gap_ms < 0 or args.profile_calls < 0:
        p.error("--reps must be >= 1, --gap-ms and --profile-calls >= 0")
    device = torch.device(args.device)
    print(f"request_anatomy on {device}: {args.model_dir.name}, {args.reps} reps", file=sys.stderr, flush=True)
    metrics = anatomy(args.model_dir, device, reps=args.reps, gap_ms=args.gap_ms, profile_calls=args.profile_calls)
    write_record(args.name, "benchmarks/request_anatomy.py", given, device, metrics, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
