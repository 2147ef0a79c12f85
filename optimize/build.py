"""Build variants: run a technique's builder, load the result back through the server's runner,
check it against the FP32 reference, and only then write ``variant.json``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_server import ServerError
from model_server.artifact import file_record
from model_server.runtimes import load_runner
from optimize import BuildError, FidelityError, OptimizeError
from optimize.registry import (
    ARCH,
    CROP_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MANIFEST_NAME,
    MANIFEST_SCHEMA_VERSION,
    RESIZE_SIZE,
    Variant,
)
from optimize.techniques import BuildContext, builder_for
from optimize.validate import Fidelity, check, compare
from optimize.weights import WeightsSource, categories

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32


@dataclasses.dataclass
class BuildOutcome:
    """One variant's result in a build run (a failure is recorded, not raised, so the run goes on)."""

    slug: str
    ok: bool
    path: Path | None = None
    manifest: dict[str, Any] | None = None
    error: str | None = None


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gflops(model: nn.Module) -> float:
    """FLOPs of one 224x224 image (multiply and add counted separately), in GFLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    m = model.float().eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        m(torch.zeros(1, 3, CROP_SIZE, CROP_SIZE))
    return float(counter.get_total_flops()) / 1e9


def _cpu_model() -> str | None:
    """The host CPU's model name (Linux's ``/proc/cpuinfo``), else ``platform.processor()`` or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(device: torch.device, *, packages: tuple[str, ...] = ("torchvision", "onnxruntime")) -> dict[str, Any]:
    """Versions, host and device: what ``variant.json`` and every benchmark record carry.

    Args:
        device: the device built or measured on.
        packages: distributions whose installed versions are recorded (``None`` if absent).
    """
    from importlib import metadata

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "driver": None,
        "host_cpus": os.cpu_count(),
        # hosts of one GPU kind differ in their CPUs, which the serving figures depend on
        "host_cpu_model": _cpu_model(),
    }
    if device.type == "cuda":
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            env["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        except Exception as e:  # record why, not a guess
            env["driver"] = f"unknown ({e})"
    for name in packages:
        # onnxruntime ships as onnxruntime-gpu on Linux x86_64 and as onnxruntime elsewhere.
        for dist in (f"{name}-gpu", name) if name == "onnxruntime" else (name,):
            try:
                env[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                env[name] = None
    return env


def reference_logits(reference: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """FP32 logits of the reference, TF32 off, on ``device``."""
    from model_server.preprocess import normalize

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    model = reference.to(device).eval()
    with torch.inference_mode():
        out: torch.Tensor = model(normalize(images.to(device))).float().cpu()
    reference.to("cpu")
    return out


def time_batch(runner: Any, batch: int, *, reps: int = 3) -> float:
    """Median wall time of one batch, in ms, after a warm-up call (a quick build-time figure;
    ``optimize bench`` measures properly)."""
    x = torch.zeros((batch, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8)
    runner(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner(x)  # returns host tensors, so the device has finished
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def build_variant(
    variant: Variant,
    *,
    reference: nn.Module,
    weights: WeightsSource,
    images: torch.Tensor,
    ref_logits: torch.Tensor,
    output_dir: Path,
    device: torch.device,
    max_batch: int = DEFAULT_MAX_BATCH,
    options: dict[str, Any] | None = None,
    val_dir: Path | None = None,
) -> dict[str, Any]:
    """Build, validate and write one artifact; return its manifest.

    ``options`` are command-line overrides handed to the builder (see ``BuildContext.options``);
    ``val_dir`` is a labelled image folder for real top-1/top-5 accuracy.

    Raises:
        FidelityError: outside tolerance; nothing is left in ``output_dir/<slug>``.
        BuildError: the technique cannot be built here.
    """
    if device.type not in variant.devices:
        raise BuildError(f"{variant.slug} builds for {', '.join(variant.devices)}, not {device.type}")
    final = output_dir / variant.slug
    tmp = output_dir / f".{variant.slug}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        ctx = BuildContext(
            reference=reference,
            device=device,
            calibration=images,
            max_batch=max_batch,
            out_dir=tmp,
            options=dict(options or {}),
        )
        built = builder_for(variant)(variant, ctx)
        (tmp / "labels.json").write_text(json.dumps(categories()))
        payload = {**built.payload, "labels": "labels.json"}
        manifest: dict[str, Any] = {
            "schema_version": MANIFEST_SCHEMA_VERSION,
            "arch": ARCH,
            **variant.to_dict(),
            "devices": built.devices,
            "payload": payload,
            "files": {name: file_record(tmp / name) for name in sorted(set(payload.values()))},
            "input": {
                "layout": "NCHW",
                "dtypes": ["uint8", "float32", "float16"],
                "min_batch": 1,
                "max_batch": max_batch,
                "preprocessing": {
                    "resize": RESIZE_SIZE,
                    "crop": CROP_SIZE,
                    "interpolation": "bilinear",
                    "mean": list(IMAGENET_MEAN),
                    "std": list(IMAGENET_STD),
                },
            },
            "weights": weights.to_dict(),
            "built_with": environment(device),
            "meta": {},
        }
        runner = load_runner(manifest, tmp, device)
        # In chunks no larger than the artifact's largest batch (an AOTInductor build may stop at 1).
        step = max(1, min(len(images), int(manifest["input"]["max_batch"])))
        logits = torch.cat([runner(images[i : i + step]) for i in range(0, len(images), step)])
        fidelity: Fidelity = compare(ref_logits, logits)
        tolerance = variant.tolerance
        if weights.kind == "random" and variant.random_tolerance is not None:
            tolerance = variant.random_tolerance
        check(fidelity, tolerance, slug=variant.slug)
        model_bytes = sum(manifest["files"][name]["bytes"] for name in set(built.payload.values()))
        manifest["meta"] = {
            "num_params": count_params(built.model) if built.model is not None else None,
            "gflops": round(count_gflops(built.model), 3) if built.model is not None else None,
            "file_size_mb": round(model_bytes / 1e6, 3),
            "fidelity": fidelity.to_dict(),
            "tolerance_applied": dataclasses.asdict(tolerance),
            "accuracy": None,
            "accuracy_note": "no labelled --val-dir given; fidelity against the FP32 reference is reported instead",
            "weights": weights.name,
            "latency_ms_by_batch": {"1": round(time_batch(runner, 1), 3)},
            "build_s": round(time.perf_counter() - t0, 2),
            "details": built.details,
        }
        if val_dir is not None:
            from optimize.validate import accuracy

            acc = accuracy(runner, val_dir, batch=min(max_batch, 32))
            manifest["meta"]["accuracy"] = acc
            manifest["meta"]["accuracy_note"] = f"{acc['images']} labelled images from {val_dir}"
        manifest["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_all(
    variants: Iterable[Variant],
    *,
    reference: nn.Module,
    weights: WeightsSource,
    images: torch.Tensor,
    output_dir: Path,
    device: torch.device,
    max_batch: int = DEFAULT_MAX_BATCH,
    progress: Any = None,
    options: dict[str, Any] | None = None,
    val_dir: Path | None = None,
) -> list[BuildOutcome]:
    """Build each variant in turn; a failing variant is reported and the rest go on."""
    output_dir.mkdir(parents=True, exist_ok=True)
    ref_logits = reference_logits(reference, images, device)
    outcomes = []
    for variant in variants:
        if progress is not None:
            progress(variant.slug)
        try:
            manifest = build_variant(
                variant,
                reference=reference,
                weights=weights,
                images=images,
                ref_logits=ref_logits,
                output_dir=output_dir,
                device=device,
                max_batch=max_batch,
                options=options,
                val_dir=val_dir,
            )
        except (OptimizeError, ServerError, NotImplementedError, RuntimeError) as e:
            kind = "fidelity" if isinstance(e, FidelityError) else type(e).__name__
            log.error("%s: %s: %s", variant.slug, kind, e)
            outcomes.append(BuildOutcome(slug=variant.slug, ok=False, error=f"{kind}: {e}"))
        else:
            outcomes.append(BuildOutcome(slug=variant.slug, ok=True, path=output_dir / variant.slug, manifest=manifest))
    return outcomes
