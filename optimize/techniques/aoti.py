"""AOTInductor variant: ``torch.export`` + ``aoti_compile_and_package`` once per batch bucket.

Each bucket's ``.pt2`` package holds the compiled kernels (and the weights), so serving loads
and runs them without compiling anything. With the ``dynamic_batch`` option one package with a
symbolic batch dimension serves every bucket instead: one compile (not one per bucket) and one
copy of the weights, for kernels that cannot specialise on the batch size. Tuning
(``max_autotune``, 1x1 convolutions as matrix multiplies, epilogue fusion) happens here, offline,
once per bucket; finished packages are also kept in a cache keyed by weights, options, torch
version, GPU and bucket, so a rebuild of the same thing costs a file copy (max-autotune did not
finish batch 128 in 7 minutes on an H100).

Every build loads its first package in a *fresh* process before anything else touches it: on the
H100 machine, packages built with the image's ``CXX`` (``/opt/gcc/bin/g++``, a wrapper that links
its own copy of libstdc++'s locale/regex code into the wrapper ``.so``) segfaulted at load inside
``std::regex`` (``benchmarks/aoti_probe.py``: native backtrace under cuda-gdb). When that check
dies on a signal, the build switches to the ``g++`` on ``PATH`` (or ``DENSENET_AOTI_CXX``) and
compiles again, and the artifact records which compiler made it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
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
#: Options that rewrite the network before export (``optimize/rewrites.py``): ``fused_bottleneck``,
#: ``pool_first``, ``fused_conv`` and ``shared_bottleneck`` apply inside ``block_buffer``.
_REWRITES = ("block_buffer", "fused_bottleneck", "pool_first", "fused_conv", "shared_bottleneck")
CXX_ENV = "DENSENET_AOTI_CXX"

_FRESH_LOAD = r"""
import json, os, sys, time, torch
from torch._inductor import aoti_load_package
path, device, dtype, channels_last, batch = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5])
if device == "cuda":
    torch.empty(1, device="cuda")
t0 = time.perf_counter()
fn = aoti_load_package(path)
load_s = time.perf_counter() - t0
x = torch.zeros((batch, 3, 224, 224), dtype=getattr(torch, dtype), device=device)
if channels_last:
    x = x.contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    out = fn(x)
ok = bool(torch.isfinite(out.float()).all())
from torch._dynamo.utils import counters
print(json.dumps({"load_s": round(load_s, 2), "finite": ok, "inductor_compiles": sum(counters["inductor"].values())}))
"""


def default_cxx() -> str:
    """The C++ compiler inductor would use: ``DENSENET_AOTI_CXX``, else inductor's own choice (``CXX`` or g++)."""
    from torch._inductor import config

    return os.environ.get(CXX_ENV) or str(config.cpp.cxx[-1])


def fallback_cxx(current: str) -> str | None:
    """Another compiler to try when ``current`` made a package that crashes at load: the g++ on PATH."""
    for name in ("g++", "/usr/bin/g++", "c++"):
        found = shutil.which(name)
        if found and os.path.realpath(found) != os.path.realpath(shutil.which(current) or current):
            return found
    return None


def load_in_fresh_process(
    path: Path, *, device: torch.device, dtype: torch.dtype, channels_last: bool, batch: int
) -> dict[str, Any]:
    """Load and run a package in a new Python process; ``{"rc": 0, "load_s": ...}`` or the crash (``rc`` < 0)."""
    cmd = [sys.executable, "-c", _FRESH_LOAD, str(path), device.type, str(dtype).split(".")[-1],
           "1" if channels_last else "0", str(batch)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="aoti-fresh-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        except subprocess.TimeoutExpired:
            return {"rc": "timeout"}
    result: dict[str, Any] = {"rc": p.returncode}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode == 0 and lines:
        result.update(json.loads(lines[-1]))
    else:
        result["stderr_tail"] = p.stderr[-800:]
    return result


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
    if "benchmark_epilogue_fusion" in options:
        # Off: a Triton template takes its epilogue without compiling and timing the fused kernel
        # against the unfused pair for every candidate (most of max-autotune's compile time).
        cfg["benchmark_epilogue_fusion"] = bool(options["benchmark_epilogue_fusion"])
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
    cxx: str | None = None,
    dynamic: bool = False,
) -> float:
    """Export ``model`` and compile it into the package ``path``; return seconds taken.

    The batch dimension is ``batch`` exactly, or, with ``dynamic``, any size from 1 to ``batch``
    (traced at 2: export would specialise an example of 1).
    """
    from torch._inductor import aoti_compile_and_package

    if cxx is not None:
        configs = {**configs, "cpp.cxx": (None, cxx)}

    t0 = time.perf_counter()
    example = torch.zeros((min(batch, 2) if dynamic else batch, 3, 224, 224), dtype=dtype, device=device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    shapes = ({0: torch.export.Dim("batch", min=1, max=batch)},) if dynamic and batch > 1 else None
    with torch.inference_mode(False), torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
        aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return time.perf_counter() - t0


def _compile_or_copy(
    model: nn.Module,
    batch: int,
    target: Path,
    cache_root: str | None,
    key: dict[str, Any],
    **compile_args: Any,
) -> tuple[float, bool]:
    """Compile one bucket's package into ``target``, or copy it from the cache; (seconds, from cache)."""
    hit = None
    if cache_root:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        hit = Path(cache_root) / f"{digest}.pt2"
        if hit.is_file():
            shutil.copyfile(hit, target)
            return 0.0, True
    log.info("AOTInductor: compiling batch %s%d with %s (%s)", "1..." if compile_args.get("dynamic") else "", batch,
             compile_args["configs"], compile_args["cxx"])  # fmt: skip
    try:
        took = round(compile_bucket(model, batch, target, **compile_args), 1)
    except Exception as e:  # inductor raises many types (BackendCompilerFailed, CppCompileError...)
        raise BuildError(f"AOTInductor compile of batch {batch} failed: {e}") from e
    if hit is not None:
        hit.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, hit)
    return took, False


#: Options with the Triton kernels' tiles per dense block (``optimize/kernels.py``: ``[block_m,
#: block_k, warps, stages, split target]`` each) for a network whose channel counts differ from
#: DenseNet-121's (a channel-pruned one); unset, the kernels' own tables.
_KERNEL_CONFIGS = {"layer_configs": "configs", "conv_configs": "conv_configs"}


def kernel_configs(options: dict[str, Any]) -> dict[str, tuple[tuple[int, int, int, int, int], ...]]:
    """``BlockBufferDenseNet``'s tile arguments from a variant's options (lists, as JSON keeps them).

    Raises:
        BuildError: a configuration is not five integers.
    """
    out = {}
    for option, arg in _KERNEL_CONFIGS.items():
        given = options.get(option)
        if not given:
            continue
        if not all(isinstance(c, list | tuple) and len(c) == 5 and all(isinstance(v, int) for v in c) for c in given):
            raise BuildError(f"{option} must be [block_m, block_k, warps, stages, split_target] per block, got {given}")
        out[arg] = tuple((c[0], c[1], c[2], c[3], c[4]) for c in given)
    return out


def _rewrite_source_digest() -> str:
    """A digest of ``optimize/rewrites.py`` and ``optimize/kernels.py`` as they are on disk."""
    from optimize import kernels, rewrites

    h = hashlib.sha256()
    for module in (rewrites, kernels):
        h.update(Path(str(module.__file__)).read_bytes())
    return h.hexdigest()[:16]


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
    rewrites = {k: True for k in _REWRITES if options.get(k)}  # the network's exact rewrites, as set
    if rewrites.get("block_buffer"):
        from optimize.rewrites import BlockBufferDenseNet

        model = BlockBufferDenseNet(model, fused="fused_bottleneck" in rewrites, pool_first="pool_first" in rewrites,
                                    fused_conv="fused_conv" in rewrites,
                                    shared_bottleneck="shared_bottleneck" in rewrites,
                                    **kernel_configs(options)).eval()  # fmt: skip
    configs = inductor_configs(options, ctx.device)
    # max-autotune can be limited to some buckets (tuning batch 128 took over 7 minutes on an H100).
    autotune_buckets = options.get("autotune_buckets")
    plain_configs = inductor_configs({**options, "max_autotune": False}, ctx.device)
    buckets = [int(b) for b in options.get("buckets", batch_buckets(ctx.max_batch))]
    dynamic = bool(options.get("dynamic_batch"))
    if dynamic:
        autotune_buckets = None  # one package: tuned (or not) as a whole
    cache_root = os.environ.get(CACHE_ENV) or ctx.options.get("aoti_cache_dir")
    key_base = {
        "weights": weights_digest(model),
        "configs": configs,
        "dtype": str(dtype),
        "channels_last": variant.channels_last,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu",
        # A rewritten network is another program with the same weights: never the plain one's package
        # (added only when set, so the keys of packages cached before the option existed still match).
        **rewrites,
        **{k: options[k] for k in _KERNEL_CONFIGS if options.get(k)},
        # The rewrite's and the kernels' source (their tile tables too): a package of an older one is
        # another program (session 14 changed a split-K target without changing any option).
        **({"rewrite_source": _rewrite_source_digest()} if rewrites else {}),
    }
    payload: dict[str, str] = {}
    seconds: dict[str, float] = {}
    cached: list[int] = []
    configs_by_batch: dict[str, dict[str, Any]] = {}
    cxx = default_cxx()
    fresh: dict[str, Any] = {}

    def compile_one(b: int, cfg: dict[str, Any], target: Path) -> bool:
        key = {**key_base, "configs": cfg, "batch": b, "cxx": cxx, **({"dynamic": True} if dynamic else {})}
        seconds[str(b)], from_cache = _compile_or_copy(
            model, b, target, cache_root, key,
            device=ctx.device, dtype=dtype, channels_last=variant.channels_last, configs=cfg, cxx=cxx,
            dynamic=dynamic,
        )  # fmt: skip
        return from_cache

    def check(b: int, target: Path) -> dict[str, Any]:
        loaded = load_in_fresh_process(target, device=ctx.device, dtype=dtype, channels_last=variant.channels_last,
                                       batch=1 if dynamic else b)  # fmt: skip
        return {"batch": b, "cxx": cxx, **loaded}

    # A dynamic package is compiled once, at the largest bucket, and named by every bucket.
    for i, b in enumerate([buckets[-1]] if dynamic else buckets):
        cfg = configs if autotune_buckets is None or b in autotune_buckets else plain_configs
        configs_by_batch[str(b)] = cfg
        name = f"model-b1-{b}.pt2" if dynamic else f"model-b{b}.pt2"
        target = ctx.out_dir / name
        from_cache = compile_one(b, cfg, target)
        if i == 0:
            # The first package is loaded in a fresh process before this one ever loads it: a crash
            # there must not take the build (or later the server) down with it.
            fresh = check(b, target)
            crashed = isinstance(fresh["rc"], int) and fresh["rc"] < 0
            other = fallback_cxx(cxx) if crashed else None
            if other is not None:
                log.warning("AOTInductor: a package built with %s crashes at load (exit %s); rebuilding with %s",
                            cxx, fresh["rc"], other)  # fmt: skip
                cxx = other
                from_cache = compile_one(b, cfg, target)
                fresh = check(b, target)
            if fresh["rc"] != 0:
                raise BuildError(
                    f"AOTInductor package for batch {b} (compiled with {cxx}) fails to load in a fresh process "
                    f"(exit {fresh['rc']}): {fresh.get('stderr_tail', '')[-300:]}; set {CXX_ENV} to another compiler"
                )
        if from_cache:
            cached.append(b)
        for bucket in buckets if dynamic else [b]:
            payload[f"bucket_{bucket}"] = name
    payload["model"] = payload[f"bucket_{buckets[-1]}"]
    details = {
        "buckets": buckets,
        "dynamic_batch": dynamic,
        "inductor_configs": configs_by_batch,
        "compile_s_by_batch": seconds,
        "from_cache": cached,
        "cxx": cxx,
        "fresh_process_check": fresh,
        "cuda_graphs": bool(options.get("cuda_graphs")),
        **{k: k in rewrites for k in _REWRITES},
    }
    return Built(payload=payload, devices=list(variant.devices), model=ctx.reference, details=details)
