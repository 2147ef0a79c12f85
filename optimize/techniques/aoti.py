"""AOTInductor variant: ``torch.export`` + ``aoti_compile_and_package`` once per batch bucket.

Each bucket's ``.pt2`` package holds the compiled kernels (and the weights), so serving loads
and runs them without compiling anything. Tuning (``max_autotune``, 1x1 convolutions as matrix
multiplies, epilogue fusion) happens here, offline, once per bucket; finished packages are also
kept in a cache keyed by weights, options, torch version, GPU and bucket, so a rebuild of the same
thing costs a file copy (max-autotune did not finish batch 128 in 7 minutes on an H100).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimize import BuildError
from optimize.registry import Precision, Variant
from optimize.techniques import BuildContext, Built

log = logging.getLogger(__name__)

_DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
CACHE_ENV = "DENSENET_AOTI_CACHE"


def inductor_configs(options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Inductor settings for one package from the variant's options."""
    cfg: dict[str, Any] = {}
    if options.get("max_autotune") and device.type == "cuda":
        cfg["max_autotune"] = True
        # Triton GEMM templates compete with cuBLAS for every matmul (and, with conv_1x1_as_mm, every
        # 1x1 convolution); 3x3 convolutions stay with cuDNN unless conv_backends adds TRITON, which
        # multiplies tuning time for little gain on DenseNet's small 3x3 convolutions.
        cfg["max_autotune_gemm_backends"] = options.get("gemm_backends", "ATEN,TRITON")
        cfg["max_autotune_conv_backends"] = options.get("conv_backends", "ATEN")
    if options.get("conv_1x1_as_mm"):
        cfg["conv_1x1_as_mm"] = True
    if "epilogue_fusion" in options:
        cfg["epilogue_fusion"] = bool(options["epilogue_fusion"])
    if options.get("prologue_fusion"):
        cfg["prologue_fusion"] = True
    if options.get("freezing", True):
        # Weights become constants: lets inductor fold and pre-layout them (channels-last).
        cfg["freezing"] = True
    return cfg


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        # flatten().clone(): a dense 1-D copy whatever the layout (channels-last, size-1 dims), viewable as bytes
        h.update(t.detach().cpu().flatten().clone().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def compile_bucket(
    model: nn.Module,
    batch: int,
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    channels_last: bool,
    configs: dict[str, Any],
) -> float:
    """Export ``model`` at a static batch and compile it into the package ``path``; return seconds taken."""
    from torch._inductor import aoti_compile_and_package

    t0 = time.perf_counter()
    example = torch.zeros((batch, 3, 224, 224), dtype=dtype, device=device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(model, (example,))
        aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return time.perf_counter() - t0


def prepare_model(reference: nn.Module, *, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    model = copy.deepcopy(reference).to(device=device, dtype=dtype).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build(variant: Variant, ctx: BuildContext) -> Built:
    from model_server.runtimes import batch_buckets

    options = {**variant.options, **ctx.options.get("aoti", {})}
    dtype = _DTYPES[variant.precision]
    model = prepare_model(ctx.reference, device=ctx.device, dtype=dtype, channels_last=variant.channels_last)
    configs = inductor_configs(options, ctx.device)
    # max-autotune can be limited to some buckets (tuning batch 128 took over 7 minutes on an H100).
    autotune_buckets = options.get("autotune_buckets")
    plain_configs = inductor_configs({**options, "max_autotune": False}, ctx.device)
    buckets = [int(b) for b in options.get("buckets", batch_buckets(ctx.max_batch))]
    cache_root = os.environ.get(CACHE_ENV) or ctx.options.get("aoti_cache_dir")
    key_base = {
        "weights": weights_digest(model),
        "configs": configs,
        "dtype": str(dtype),
        "channels_last": variant.channels_last,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
    }
    payload: dict[str, str] = {}
    seconds: dict[str, float] = {}
    cached: list[int] = []
    configs_by_batch: dict[str, dict[str, Any]] = {}
    for b in buckets:
        cfg = configs if autotune_buckets is None or b in autotune_buckets else plain_configs
        configs_by_batch[str(b)] = cfg
        name = f"model-b{b}.pt2"
        target = ctx.out_dir / name
        hit = None
        if cache_root:
            key_doc = json.dumps({**key_base, "configs": cfg, "batch": b}, sort_keys=True)
            key = hashlib.sha256(key_doc.encode()).hexdigest()[:24]
            hit = Path(cache_root) / f"{key}.pt2"
        if hit is not None and hit.is_file():
            shutil.copyfile(hit, target)
            cached.append(b)
            seconds[str(b)] = 0.0
        else:
            log.info("AOTInductor: compiling batch %d with %s", b, cfg)
            try:
                seconds[str(b)] = round(
                    compile_bucket(
                        model, b, target, device=ctx.device, dtype=dtype, channels_last=variant.channels_last,
                        configs=cfg,
                    ),
                    1,
                )  # fmt: skip
            except Exception as e:  # inductor raises many types (BackendCompilerFailed, CppCompileError...)
                raise BuildError(f"AOTInductor compile of batch {b} failed: {e}") from e
            if hit is not None:
                hit.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(target, hit)
        payload[f"bucket_{b}"] = name
    payload["model"] = f"model-b{buckets[-1]}.pt2"
    details = {
        "buckets": buckets,
        "inductor_configs": configs_by_batch,
        "compile_s_by_batch": seconds,
        "from_cache": cached,
        "cuda_graphs": bool(options.get("cuda_graphs")),
    }
    return Built(payload=payload, devices=list(variant.devices), model=ctx.reference, details=details)
