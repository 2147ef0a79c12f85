"""The offline benchmark: every variant at every batch size, measured the same way, written as a CSV,
TensorBoard scalars, a profiler trace per variant, plots, and an analysis in Markdown.

Timing: a warm-up, then a timed window of whole runner calls (host uint8 batch in, host FP32
logits out, as served) timed with CUDA events on a GPU and ``perf_counter`` on a CPU; on a GPU
the device-only forward is timed too. CPU and GPU utilisation are sampled (psutil, NVML) by a
thread during the timed window, never inferred.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from optimize.registry import CROP_SIZE, REFERENCE_SLUG, Variant

log = logging.getLogger(__name__)

#: The required leading columns, in this order.
CSV_COLUMNS = (
    "model_variant",
    "batch_size",
    "device",
    "ram_usage_mb",
    "vram_usage_mb",
    "cpu_utilization_pct",
    "gpu_utilization_pct",
    "latency_ms",
    "throughput_samples_sec",
    "accuracy_top1",
    "accuracy_top5",
    "model_size_mb",
    "optimization_technique",
)
EXTRA_COLUMNS = (
    "precision",
    "runtime",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "device_latency_ms",
    "iterations",
    "vram_peak_mb",
    "top1_agreement",
    "top5_overlap",
    "max_abs_logit_err",
    "mean_abs_logit_err",
    "num_params",
    "gflops",
    "build_s",
    "weights",
    "accuracy_note",
    "note",
)
DEFAULT_BATCH_SIZES = (1, 4, 8, 16, 32)


@dataclasses.dataclass
class BenchConfig:
    """What one ``optimize bench`` run measures and where it writes.

    Attributes:
        batch_sizes: batch sizes to time.
        device: the device to run on.
        output_dir: CSV, plots, ``profiles/``, ``models/`` (artifacts) and ``analysis.md``.
        tensorboard_dir: TensorBoard event files (one run per variant).
        warmup: untimed calls before each timed window.
        min_iters, max_iters, min_time_s: the timed window runs at least ``min_iters`` calls and
            at least ``min_time_s`` seconds, at most ``max_iters`` calls.
        profile: write a torch.profiler trace per variant.
        device_note: why the device is what it is (``auto`` falling back to the CPU).
    """

    batch_sizes: Sequence[int]
    device: torch.device
    output_dir: Path
    tensorboard_dir: Path
    warmup: int = 3
    min_iters: int = 5
    max_iters: int = 200
    min_time_s: float = 2.0
    profile: bool = True
    device_note: str = ""


class UtilSampler:
    """Samples process CPU %, RSS, and (on CUDA) GPU utilisation and memory every ``interval_s``."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        import psutil

        self.device, self.interval_s = device, interval_s
        self.proc = psutil.Process()
        self.cpu: list[float] = []
        self.rss: list[float] = []
        self.gpu: list[float] = []
        self.gpu_mem: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._nvml: Any = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                self._pynvml = pynvml
            except Exception as e:  # NVML missing or not permitted: say so, do not guess
                log.warning("NVML unavailable (%s): GPU utilisation not sampled", e)

    def _run(self) -> None:
        self.proc.cpu_percent(None)
        while not self._stop.wait(self.interval_s):
            # Process CPU % over all cores, normalised to the machine (100 = every core busy).
            self.cpu.append(self.proc.cpu_percent(None) / (os.cpu_count() or 1))
            self.rss.append(self.proc.memory_info().rss / 2**20)
            if self._nvml is not None:
                util = self._pynvml.nvmlDeviceGetUtilizationRates(self._nvml)
                self.gpu.append(float(util.gpu))
                self.gpu_mem.append(self._pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used / 2**20)

    def __enter__(self) -> UtilSampler:
        self._t0, self._cpu0 = time.perf_counter(), self._cpu_s()
        self._thread.start()
        return self

    def _cpu_s(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        # A window shorter than one interval (or a sampler thread starved on a busy machine) still
        # gets one sample: RSS now, and CPU over the whole window from the process's CPU times.
        if not self.rss:
            self.rss.append(self.proc.memory_info().rss / 2**20)
        if not self.cpu:
            elapsed = max(time.perf_counter() - self._t0, 1e-6)
            self.cpu.append(100 * (self._cpu_s() - self._cpu0) / elapsed / (os.cpu_count() or 1))


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 2) if xs else None


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def time_runner(runner: Any, batch: int, cfg: BenchConfig) -> dict[str, Any]:
    """Warm up, then time whole runner calls (host in, host out) in a sampled window."""
    x = torch.randint(0, 256, (batch, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8)
    cuda = cfg.device.type == "cuda"
    for _ in range(cfg.warmup):
        runner(x)
    if cuda:
        torch.cuda.synchronize(cfg.device)
        torch.cuda.reset_peak_memory_stats(cfg.device)
    times: list[float] = []
    with UtilSampler(cfg.device) as sampler:
        t_start = time.perf_counter()
        while len(times) < cfg.max_iters and (
            len(times) < cfg.min_iters or time.perf_counter() - t_start < cfg.min_time_s
        ):
            times.append(timed_call_ms(runner, x, cuda=cuda))
    row: dict[str, Any] = {
        "latency_ms": round(statistics.fmean(times), 3),
        "p50_ms": round(_pct(times, 0.50), 3),
        "p95_ms": round(_pct(times, 0.95), 3),
        "p99_ms": round(_pct(times, 0.99), 3),
        "throughput_samples_sec": round(batch * len(times) / (sum(times) / 1000), 2),
        "iterations": len(times),
        "cpu_utilization_pct": _mean(sampler.cpu),
        "ram_usage_mb": round(max(sampler.rss), 1),
        "gpu_utilization_pct": _mean(sampler.gpu) if cuda else None,
        "vram_usage_mb": None,
        "vram_peak_mb": None,
        "device_latency_ms": None,
    }
    if cuda:
        row["vram_usage_mb"] = round(torch.cuda.memory_allocated(cfg.device) / 2**20, 1)
        row["vram_peak_mb"] = round(torch.cuda.max_memory_allocated(cfg.device) / 2**20, 1)
        row["device_latency_ms"] = round(_device_latency(runner, x, cfg), 3)
    return row


def _event() -> Any:
    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def timed_call_ms(fn: Any, x: torch.Tensor, *, cuda: bool) -> float:
    """Milliseconds of one ``fn(x)``: CUDA events on a GPU, the wall clock on a CPU."""
    if cuda:
        start, end = _event(), _event()
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t0) * 1000


def _device_latency(runner: Any, x: torch.Tensor, cfg: BenchConfig, reps: int = 20) -> float:
    """Mean device-only forward time (input already on the GPU), CUDA events."""
    prepared = runner.prepare(x)
    with torch.inference_mode():
        runner.run_device(prepared)
        start, end = _event(), _event()
        start.record()
        for _ in range(reps):
            runner.run_device(prepared)
        end.record()
        end.synchronize()
    return float(start.elapsed_time(end)) / reps


def profile_runner(runner: Any, batch: int, out_dir: Path, device: torch.device) -> Path | None:
    """A torch.profiler trace of a few calls, in the layout TensorBoard's profiler plugin reads
    (``*.pt.trace.json``, also openable in Perfetto)."""
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    out_dir.mkdir(parents=True, exist_ok=True)
    # One trace per variant: a rerun into the same results folder replaces the last run's trace
    # (the handler names each file by host, pid and time, so they would pile up otherwise).
    for old in out_dir.glob("*.pt.trace.json"):
        old.unlink()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    x = torch.randint(0, 256, (batch, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8)
    with profile(
        activities=activities,
        schedule=schedule(wait=0, warmup=1, active=2, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(out_dir)),
        record_shapes=True,
    ) as prof:
        for _ in range(3):
            runner(x)
            prof.step()
    traces = sorted(out_dir.glob("*.pt.trace.json"), key=lambda p: p.stat().st_mtime)
    return traces[-1] if traces else None


def bench_variant(
    manifest: dict[str, Any],
    artifact_dir: Path,
    cfg: BenchConfig,
    *,
    writer: Any = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Time one artifact at every batch size; return its CSV rows."""
    from model_server.runtimes import load_runner

    runner = load_runner(manifest, artifact_dir, cfg.device)
    if getattr(runner, "cuda_graphs", False):
        # What the server does before it reports ready: capture one CUDA graph per batch bucket.
        # Without it a graph variant would be timed as plain kernel launches (5x slower at batch 1).
        runner.warm_up()
    meta = manifest.get("meta", {})
    fid = meta.get("fidelity") or {}
    acc = meta.get("accuracy") or {}
    rows = []
    for b in cfg.batch_sizes:
        note = cfg.device_note
        row: dict[str, Any] = {
            "model_variant": manifest["slug"],
            "batch_size": b,
            "device": cfg.device.type,
            "accuracy_top1": acc.get("top1"),
            "accuracy_top5": acc.get("top5"),
            "model_size_mb": meta.get("file_size_mb"),
            "optimization_technique": manifest["technique"],
            "precision": manifest["precision"],
            "runtime": manifest["runtime"],
            "top1_agreement": fid.get("top1_agreement"),
            "top5_overlap": fid.get("top5_overlap"),
            "max_abs_logit_err": fid.get("max_abs_logit_err"),
            "mean_abs_logit_err": fid.get("mean_abs_logit_err"),
            "num_params": meta.get("num_params"),
            "gflops": meta.get("gflops"),
            "build_s": meta.get("build_s"),
            "weights": (manifest.get("weights") or {}).get("name"),
            "accuracy_note": "" if acc else meta.get("accuracy_note", "no labelled --val-dir given"),
        }
        try:
            row.update(time_runner(runner, b, cfg))
        except (RuntimeError, ValueError) as e:  # e.g. out of memory at a large batch
            log.error("%s batch %d: %s", manifest["slug"], b, e)
            note = f"{note}; failed: {e}".strip("; ")
        row["note"] = note
        rows.append(row)
        if writer is not None and "latency_ms" in row:
            writer.add_scalar("latency_ms", row["latency_ms"], b)
            writer.add_scalar("throughput_samples_sec", row["throughput_samples_sec"], b)
            writer.add_scalar("p95_ms", row["p95_ms"], b)
            if row.get("cpu_utilization_pct") is not None:
                writer.add_scalar("cpu_utilization_pct", row["cpu_utilization_pct"], b)
            if row.get("gpu_utilization_pct") is not None:
                writer.add_scalar("gpu_utilization_pct", row["gpu_utilization_pct"], b)
        if on_row is not None:
            on_row(row)
    if cfg.profile:
        profile_runner(runner, min(cfg.batch_sizes), cfg.output_dir / "profiles" / manifest["slug"], cfg.device)
    del runner
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*CSV_COLUMNS, *EXTRA_COLUMNS], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in (*CSV_COLUMNS, *EXTRA_COLUMNS)})


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Latency and throughput by batch size; size and speed against fidelity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("latency_ms") is not None]
    variants = list(dict.fromkeys(r["model_variant"] for r in ok))
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for v in variants:
        vr = sorted((r for r in ok if r["model_variant"] == v), key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in vr]
        axes[0].plot(bs, [r["latency_ms"] for r in vr], marker="o", label=v)
        axes[1].plot(bs, [r["throughput_samples_sec"] for r in vr], marker="o", label=v)
    device = ok[0]["device"] if ok else "?"
    for ax, title, ylabel in (
        (axes[0], f"latency per batch ({device})", "latency_ms (mean)"),
        (axes[1], f"throughput ({device})", "images / s"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths.append(out_dir / "latency_throughput_by_batch.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ref_batch = max((r["batch_size"] for r in ok), default=1)
    for v in variants:
        r = next((r for r in ok if r["model_variant"] == v and r["batch_size"] == ref_batch), None)
        if r is None or r.get("mean_abs_logit_err") is None:
            continue
        err = max(float(r["mean_abs_logit_err"]), 1e-7)
        axes[0].scatter(err, r["model_size_mb"])
        axes[0].annotate(v.removeprefix("densenet121-"), (err, r["model_size_mb"]), fontsize=7)
        axes[1].scatter(err, r["throughput_samples_sec"])
        axes[1].annotate(v.removeprefix("densenet121-"), (err, r["throughput_samples_sec"]), fontsize=7)
    for ax, ylabel in ((axes[0], "artifact size (MB)"), (axes[1], f"images / s at batch {ref_batch}")):
        ax.set_xscale("log")
        ax.set_xlabel("mean |logit error| vs FP32 reference (lower = more faithful)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("size against fidelity")
    axes[1].set_title("speed against fidelity")
    fig.tight_layout()
    paths.append(out_dir / "size_speed_vs_fidelity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def summary_rows(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for r in rows:
        out.append(
            (
                r["model_variant"].removeprefix("densenet121-"),
                str(r["batch_size"]),
                r["device"],
                f"{r['latency_ms']:.2f}" if r.get("latency_ms") is not None else "failed",
                f"{r['p95_ms']:.2f}" if r.get("p95_ms") is not None else "-",
                f"{r['throughput_samples_sec']:.1f}" if r.get("throughput_samples_sec") is not None else "-",
                f"{r['model_size_mb']:.1f}" if r.get("model_size_mb") is not None else "-",
                f"{r['top1_agreement']:.3f}" if r.get("top1_agreement") is not None else "-",
                f"{r['mean_abs_logit_err']:.2e}" if r.get("mean_abs_logit_err") is not None else "-",
            )
        )
    return out


SUMMARY_HEADER = ("variant", "batch", "device", "latency_ms", "p95_ms", "img/s", "size_mb", "top1_agree", "mean_err")


def analysis_markdown(rows: list[dict[str, Any]], *, weights: str, device_note: str = "") -> str:
    """The results part of the README analysis, written from the measured rows."""
    ok = [r for r in rows if r.get("latency_ms") is not None]
    if not ok:
        return "No variant was measured.\n"
    device = ok[0]["device"]
    lines = [
        f"Measured on **{device}** with weights `{weights}`"
        + (f" ({device_note})" if device_note else "")
        + f"; {len({r['model_variant'] for r in ok})} variants, batch sizes "
        + ", ".join(str(b) for b in sorted({r["batch_size"] for r in ok}))
        + ".",
        "",
        "| variant | technique | size MB | size × FP32 | "
        + " | ".join(f"b{b} ms" for b in sorted({r["batch_size"] for r in ok}))
        + " | best img/s | speed-up × FP32 eager (largest batch) | top-1 agree | mean logit err |",
        "|---" * (8 + len({r["batch_size"] for r in ok})) + "|",
    ]
    batches = sorted({r["batch_size"] for r in ok})
    by = {(r["model_variant"], r["batch_size"]): r for r in ok}
    ref_size = next((r["model_size_mb"] for r in ok if r["model_variant"] == REFERENCE_SLUG), None)
    top = batches[-1]
    ref_top = by.get((REFERENCE_SLUG, top))
    for v in dict.fromkeys(r["model_variant"] for r in ok):
        vr = [by[(v, b)] for b in batches if (v, b) in by]
        first = vr[0]
        size = first.get("model_size_mb")
        cells = [f"{by[(v, b)]['latency_ms']:.2f}" if (v, b) in by else "-" for b in batches]
        speed = (
            f"{ref_top['latency_ms'] / by[(v, top)]['latency_ms']:.2f}"
            if ref_top is not None and (v, top) in by
            else "-"
        )
        size_x = f"{size / ref_size:.2f}" if size and ref_size else "-"
        lines.append(
            f"| `{v}` | {first['optimization_technique']} | {size if size is not None else '-'} | {size_x} | "
            + " | ".join(cells)
            + f" | {max(r['throughput_samples_sec'] for r in vr):.1f} | {speed} | "
            f"{first.get('top1_agreement', '-')} | "
            + (f"{first['mean_abs_logit_err']:.2e}" if first.get("mean_abs_logit_err") is not None else "-")
            + " |"
        )
    lines.append("")
    for b in batches:
        at = [r for r in ok if r["batch_size"] == b]
        best = max(at, key=lambda r: r["throughput_samples_sec"])
        ref = by.get((REFERENCE_SLUG, b))
        rel = f", {ref['latency_ms'] / best['latency_ms']:.2f}× FP32 eager" if ref else ""
        lines.append(
            f"- batch {b}: fastest `{best['model_variant']}` at {best['latency_ms']:.2f} ms "
            f"({best['throughput_samples_sec']:.1f} img/s{rel}; top-1 agreement {best.get('top1_agreement')})."
        )
    acc = [r for r in ok if r.get("accuracy_top1") is not None]
    if not acc:
        lines += ["", f"Accuracy columns are empty: {ok[0].get('accuracy_note') or 'no labelled --val-dir given'}."]
    return "\n".join(lines) + "\n"


def record_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The rows as a benchmark record's unit-suffixed metrics: ``<slug>_b<batch>_ms`` (whole call,
    host in and out), ``_device_ms`` (forward only, CUDA), ``_p99_ms``, ``_img_s``, ``_vram_peak_mb``."""
    metrics: dict[str, float] = {}
    units = {"latency_ms": "ms", "p99_ms": "p99_ms", "device_latency_ms": "device_ms",
             "throughput_samples_sec": "img_s", "vram_peak_mb": "vram_peak_mb"}  # fmt: skip
    for r in rows:
        for col, unit in units.items():
            if r.get(col) is not None:
                metrics[f"{r['model_variant']}_b{r['batch_size']}_{unit}"] = r[col]
    return metrics


def write_record(rows: list[dict[str, Any]], cfg: BenchConfig, *, weights: str) -> Path:
    """``bench_record.json`` beside the CSV: the run as a record comparable with ``benchmarks/results``
    (``name``, ``command``, ``environ``, ``metrics``), so a report from another machine can be committed as is."""
    import datetime as dt
    import shlex

    from optimize.build import environment

    record = {
        "name": "optimize-bench",
        "command": shlex.join(["python", "-m", "optimize", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environ": environment(cfg.device),
        "weights": weights,
        "batch_sizes": list(cfg.batch_sizes),
        "metrics": record_metrics(rows),
    }
    path = cfg.output_dir / "bench_record.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def update_readme_section(path: Path, body: str, *, marker: str = "bench-results") -> None:
    """Replace the text between the lines ``<!-- marker:start -->`` and ``<!-- marker:end -->`` (append
    the block if absent). Only markers alone on their line count: prose that quotes them is left alone."""
    import re

    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{body}{end}"
    found = re.search(rf"^{re.escape(start)}[ \t]*\n.*?^{re.escape(end)}[ \t]*$", text, flags=re.M | re.S)
    if found:
        text = text[: found.start()] + block + text[found.end() :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def ensure_artifacts(
    variants: Sequence[Variant],
    *,
    models_dir: Path,
    weights: str,
    seed: int,
    device: torch.device,
    max_batch: int,
    val_dir: Path | None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Path], dict[str, str], str]:
    """Reuse ``models_dir/<slug>`` where it was built with these weights and a large enough max batch;
    build the rest. Returns ready artifacts, failures, and the weights' name."""
    from model_server import ArtifactError
    from model_server.artifact import read_manifest
    from optimize.build import build_all
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    ready: dict[str, Path] = {}
    todo: list[Variant] = []
    weights_name = ""
    for v in variants:
        d = models_dir / v.slug
        try:
            m = read_manifest(d)
        except ArtifactError:
            todo.append(v)
            continue
        w = m.get("weights", {})
        same = (w.get("kind") == "random" and weights == "random" and w.get("seed") == seed) or (
            w.get("kind") != "random"
            and weights != "random"
            and (weights == "imagenet") == (w.get("kind") == "imagenet")
        )
        if same and int(m["input"]["max_batch"]) >= max_batch and (val_dir is None or m["meta"].get("accuracy")):
            ready[v.slug] = d
            weights_name = w.get("name", weights_name)
        else:
            todo.append(v)
    failures: dict[str, str] = {}
    if todo:
        reference, source = load_reference(weights, seed=seed)
        weights_name = source.name
        outcomes = build_all(
            todo,
            reference=reference,
            weights=source,
            images=sample_batch(),
            output_dir=models_dir,
            device=device,
            max_batch=max_batch,
            progress=progress,
            val_dir=val_dir,
        )
        for o in outcomes:
            if o.ok and o.path is not None:
                ready[o.slug] = o.path
            else:
                failures[o.slug] = o.error or "failed"
    ordered = {v.slug: ready[v.slug] for v in variants if v.slug in ready}
    return ordered, failures, weights_name


def run_bench(
    variants: Sequence[Variant],
    cfg: BenchConfig,
    *,
    weights: str = "imagenet",
    seed: int = 0,
    val_dir: Path | None = None,
    readme: Path | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Build (or reuse) each variant's artifact under ``output_dir/models``, time it, write every output."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
    from torch.utils.tensorboard import SummaryWriter

    from model_server.artifact import read_manifest

    err = Console(stderr=True)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    models_dir = cfg.output_dir / "models"
    err.print(f"[bold]optimize bench[/]: {len(variants)} variant(s) on {cfg.device} {cfg.device_note}".rstrip())
    artifacts, failures, weights_name = ensure_artifacts(
        variants,
        models_dir=models_dir,
        weights=weights,
        seed=seed,
        device=cfg.device,
        max_batch=max(cfg.batch_sizes),
        val_dir=val_dir,
        progress=lambda slug: err.print(f"building {slug} ..."),
    )
    rows: list[dict[str, Any]] = []
    total = len(artifacts) * len(cfg.batch_sizes)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err, transient=False,
    ) as progress:  # fmt: skip
        task = progress.add_task("timing", total=total)
        for slug, d in artifacts.items():
            progress.update(task, description=f"timing {slug}")
            writer = SummaryWriter(log_dir=str(cfg.tensorboard_dir / slug))
            try:
                rows += bench_variant(read_manifest(d), d, cfg, writer=writer, on_row=lambda _r: progress.advance(task))
            except Exception as e:  # one variant failing to load must not end the run
                log.error("%s: %s", slug, e)
                failures[slug] = f"bench: {e}"
            finally:
                writer.close()
    write_csv(rows, cfg.output_dir / "benchmark_results.csv")
    plot(rows, cfg.output_dir)
    body = analysis_markdown(rows, weights=weights_name, device_note=cfg.device_note)
    if failures:
        body += "\nNot measured:\n\n" + "".join(f"- `{slug}`: {why}\n" for slug, why in failures.items())
    (cfg.output_dir / "analysis.md").write_text(body)
    write_record(rows, cfg, weights=weights_name)
    (cfg.output_dir / "failures.json").write_text(json.dumps(failures, indent=2) + "\n")
    if readme is not None:
        update_readme_section(readme, body)
    table = Table(title=f"DenseNet-121 variants on {cfg.device.type} (weights: {weights_name})")
    for h in SUMMARY_HEADER:
        table.add_column(h, justify="left" if h in ("variant", "device") else "right")
    for r in summary_rows(rows):
        table.add_row(*r)
    Console(file=sys.stdout, width=160).print(table)
    for slug, why in failures.items():
        err.print(f"[red]{slug}[/]: {why}")
    return rows, failures
