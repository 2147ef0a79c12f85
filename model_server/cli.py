"""Command line of the predictor: flags, then ``DENSENET_*`` environment variables, then defaults."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_server import ServerError
from model_server.config import (
    CROP_KERNELS,
    DECODE_STREAM_PRIORITIES,
    DEFAULT_BODY_POOL_MB,
    DEFAULT_WARMUP_IMAGE_SIZES,
    EVENT_LOOPS,
    JPEG_DECODERS,
    MIN_QUEUE_IMAGES,
    MODEL_STREAMS,
    QUEUE_BATCHES,
    ServingConfig,
    parse_image_sizes,
    queue_images,
)
from model_server.tuning import EarlyStart, start_before_torch

if TYPE_CHECKING:
    from model_server.frontend import FrontEnds
    from model_server.runtimes import Runner

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: Under Knative the pod's terminationGracePeriodSeconds is the revision's timeoutSeconds (300 s by
#: default); plain Kubernetes gives 30 s. 25 s fits both, with time left to exit.
DEFAULT_GRACE_PERIOD_S = 25.0
MIN_ADMIN_TOKEN_CHARS = 16


def _env(name: str, default: str) -> str:
    return os.environ.get(f"DENSENET_{name}", default)


def _parser() -> argparse.ArgumentParser:
    d = ServingConfig()
    p = argparse.ArgumentParser(
        prog="python -m model_server",
        description="Serve one DenseNet-121 artifact over KServe v1, v2 (REST) and gRPC v2. "
        "Every flag falls back to the DENSENET_<FLAG> environment variable.",
    )
    p.add_argument("--model_dir", default=_env("MODEL_DIR", ""), help="artifact folder holding variant.json")
    p.add_argument(
        "--model_name", default=_env("MODEL_NAME", "densenet121"), help="name in the URL (default: densenet121)"
    )
    p.add_argument("--http_port", type=int, default=int(_env("HTTP_PORT", "8080")))
    p.add_argument("--grpc_port", type=int, default=int(_env("GRPC_PORT", "8081")))
    p.add_argument("--device", default=_env("DEVICE", d.device), help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--max_batch_size", type=int, default=int(_env("MAX_BATCH_SIZE", str(d.max_batch_size))))
    p.add_argument("--max_delay_ms", type=float, default=float(_env("MAX_DELAY_MS", str(d.max_delay_ms))))
    p.add_argument(
        "--max_queue_images", type=int, default=int(_env("MAX_QUEUE_IMAGES", "0")),
        help="images allowed to wait for the device; beyond it requests get 503 + Retry-After (default 0: "
        f"{QUEUE_BATCHES} x --max_batch_size, at least {MIN_QUEUE_IMAGES})",
    )  # fmt: skip
    p.add_argument(
        "--max_inflight_batches", type=int, default=int(_env("MAX_INFLIGHT_BATCHES", str(d.max_inflight_batches))),
        help="batches between their forming and their answers at once: 2 overlaps decoding batch k+1 with "
        "running batch k; 3 also forms batch k+2 while batch k is answered (on the H100: no gain, README "
        "session 21) (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--max_request_images", type=int, default=int(_env("MAX_REQUEST_IMAGES", str(d.max_request_images))))
    p.add_argument("--max_body_bytes", type=int, default=int(_env("MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES))))
    p.add_argument("--max_image_pixels", type=int, default=int(_env("MAX_IMAGE_PIXELS", str(d.max_image_pixels))))
    p.add_argument(
        "--request_timeout_s", type=float, default=float(_env("REQUEST_TIMEOUT_S", str(d.request_timeout_s)))
    )
    p.add_argument(
        "--inline_idle_ms", type=float, default=float(_env("INLINE_IDLE_MS", str(d.inline_idle_ms))),
        help="a request that finds the GPU idle (nothing queued or running) at least this many ms runs at once "
        "on the device process's event loop thread, not via the batch worker and the device thread: two thread "
        f"wake-ups fewer at low load (default {d.inline_idle_ms:g}; 0: never)",
    )  # fmt: skip
    p.add_argument(
        "--gpu_decode", default=_env("GPU_DECODE", "true"), choices=("true", "false"),
        help="decode JPEGs with nvJPEG on the serving GPU (default: true; ignored on the CPU)",
    )  # fmt: skip
    p.add_argument(
        "--cpu_decode_share", type=float, default=float(_env("CPU_DECODE_SHARE", "0")),
        help="share (0..1) of GPU-decodable JPEGs decoded with PIL in the front ends instead, to unload the "
        "GPU decode stage when it limits throughput; skipped while the CPU pool is busy (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--model_stream", default=_env("MODEL_STREAM", d.model_stream), choices=MODEL_STREAMS,
        help="CUDA stream the model runs on: the legacy default stream, or a non-blocking side stream that "
        "decoding does not wait for (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--decode_batch", type=int, default=int(_env("DECODE_BATCH", str(d.decode_batch))),
        help="JPEGs per nvJPEG call: a batch is decoded in calls of exactly this many, the last padded with a "
        "tiny JPEG, so nvJPEG's batched decoder always sees one size (default 0: one call per batch)",
    )  # fmt: skip
    p.add_argument(
        "--jpeg_decoder", default=_env("JPEG_DECODER", d.jpeg_decoder), choices=JPEG_DECODERS,
        help="GPU JPEG decoder: nvjpeg (the hardware decoder called directly, one tensor per image size; "
        "torchvision's decoder for JPEGs it does not take) or torchvision (its batched decode for all) "
        "(default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--nvjpeg_early_headers", default=_env("NVJPEG_EARLY_HEADERS", "true"), choices=("true", "false"),
        help="with --frontends N and --jpeg_decoder nvjpeg: the device process reads a request's JPEG headers "
        "(two or more JPEGs) as it arrives, on its event loop, while the decode stage is in the batched "
        "call of the batch before, instead of on the decode stage's thread (default: true)",
    )  # fmt: skip
    p.add_argument(
        "--decode_stream_priority", default=_env("DECODE_STREAM_PRIORITY", d.decode_stream_priority),
        choices=DECODE_STREAM_PRIORITIES,
        help="priority of the GPU decode stage's CUDA stream: high (the GPU's highest: the decoder's and crop's "
        "kernels are scheduled ahead of the model's) or normal (the model's) (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--crop_kernel", default=_env("CROP_KERNEL", d.crop_kernel), choices=CROP_KERNELS,
        help="how the GPU decode stage resizes and crops a batch: torch (torch's antialiased interpolation of "
        "each whole image, then the 224 crop), triton (one kernel computing only the crop's pixels from the "
        "uint8 ones: its binary for the GPU from DENSENET_CROP_KERNEL_DIR or the user cache, else compiled by "
        "Triton at warm-up and kept there; refuses to start if it cannot be found, compiled or loaded) or auto "
        "(triton where it can run, else torch) (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--warmup_image_sizes",
        default=_env("WARMUP_IMAGE_SIZES", ",".join(f"{w}x{h}" for w, h in DEFAULT_WARMUP_IMAGE_SIZES)),
        help="with GPU decode: image sizes (WIDTHxHEIGHT, comma-separated, or none) whose lone-JPEG path is "
        "warmed before ready, so the first request of each size pays no first-time decode or crop-graph "
        "capture; list the sizes your clients send (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--ipc_pinned_bodies", default=_env("IPC_PINNED_BODIES", "true"), choices=("true", "false"),
        help="with --frontends N: the reused buffers of large request bodies are page-locked where nvJPEG's "
        "hardware decoder reads their JPEGs (--jpeg_decoder nvjpeg on a GPU that has one), so its copies "
        "to the device need no staging (default: true)",
    )  # fmt: skip
    p.add_argument(
        "--max_inflight_requests", type=int, default=int(_env("MAX_INFLIGHT_REQUESTS", "0")),
        help="HTTP inference requests handled at once (bodies in memory); more get 503 + Retry-After before "
        "their body is read (default 0: max_queue_images + max_inflight_batches * max_batch_size)",
    )  # fmt: skip
    p.add_argument(
        "--grace_period_s", type=float, default=float(_env("GRACE_PERIOD_S", str(DEFAULT_GRACE_PERIOD_S))),
        help="on SIGTERM, the longest to wait for accepted requests before exiting (default: %(default)s; keep it "
        "below the pod's terminationGracePeriodSeconds)",
    )  # fmt: skip
    p.add_argument(
        "--admin_token", default=_env("ADMIN_TOKEN", ""),
        help="bearer token of the /admin/ endpoints (profiler capture, info); empty (default) turns them off. "
        "Prefer DENSENET_ADMIN_TOKEN from a Secret: a flag is visible in the process list",
    )  # fmt: skip
    p.add_argument(
        "--enable_docs", default=_env("ENABLE_DOCS", "false"), choices=("true", "false"),
        help="serve the OpenAPI description on /openapi.json (default: false)",
    )  # fmt: skip
    p.add_argument(
        "--frontends", type=int, default=int(_env("FRONTENDS", "1")),
        help="HTTP/gRPC front-end processes feeding this device process (default: 1, all in one process); "
        "beyond ~600 single-image requests/s one Python process is the bottleneck",
    )  # fmt: skip
    p.add_argument(
        "--balance_connections", default=_env("BALANCE_CONNECTIONS", "true"), choices=("true", "false"),
        help="with --frontends N > 1: a front end holding more than its share of the keep-alive connections "
        "ends a response with 'Connection: close' (at most one per 50 ms) so the client reconnects and the "
        "kernel hashes it again (default: true)",
    )  # fmt: skip
    p.add_argument(
        "--metrics", default=_env("METRICS", "true"), choices=("true", "false"),
        help="request-path Prometheus metrics (default: true; false only to measure their overhead)",
    )  # fmt: skip
    p.add_argument(
        "--gil_switch_interval_ms", type=float, default=float(_env("GIL_SWITCH_INTERVAL_MS", "1")),
        help="sys.setswitchinterval of this process, in ms (default 1; 0 keeps Python's 5 ms). The decode and "
        "device threads win the GIL back after every tensor call; a busy event loop keeps it up to this long "
        "(H100, 128 users: 1 ms served 1.058x the throughput of 5 ms, p99 40-44 vs 49-57 ms)",
    )  # fmt: skip
    p.add_argument(
        "--event_loop", default=_env("EVENT_LOOP", "auto"), choices=EVENT_LOOPS,
        help="event loop of the front ends and the device process: uvloop, asyncio, or auto (default: uvloop "
        "when installed). KServe accepts its own --event_loop but serves on asyncio whatever it says",
    )  # fmt: skip
    p.add_argument(
        "--ipc_body_pool_mb", type=int, default=int(_env("IPC_BODY_POOL_MB", str(DEFAULT_BODY_POOL_MB))),
        help="with --frontends N: MB of large request bodies' buffers (many JPEGs per request) the device process "
        "keeps to reuse instead of allocating and zero-filling one per request (default %(default)s; 0: off)",
    )  # fmt: skip
    p.add_argument("--log_level", default=_env("LOG_LEVEL", "INFO"))
    return p


def process_start() -> float:
    """This process's start on the ``time.perf_counter`` clock (Linux: from ``/proc/self/stat``), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
        return time.perf_counter() - max(age, 0.0)
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


def warm_decoder_timed(device: Any, took: dict[str, float], decoder: str = "nvjpeg", crop_kernel: str = "auto") -> None:
    """nvJPEG and the crop kernels warmed on ``device`` (an early-start thread), its seconds in ``took``.

    On a CUDA device it runs on a stream of its own and waits for that stream only: a device-wide
    synchronisation could meet the CUDA-graph capture that ``load_model`` may run meanwhile.
    """
    import torch

    from model_server.preprocess import warm_gpu_decoder

    t0 = time.perf_counter()
    try:
        if isinstance(device, torch.device) and device.type == "cuda":
            with torch.cuda.stream(torch.cuda.Stream(device)):  # type: ignore[no-untyped-call]
                warm_gpu_decoder(device, decoder, crop_kernel)
        else:
            warm_gpu_decoder(device, decoder, crop_kernel)
    except Exception as e:  # the server's own warm-up decodes again and reports a failure properly
        log.debug("early nvJPEG warm-up failed: %s", e)
    took["decoder"] = time.perf_counter() - t0
    if took["decoder"] > 0.01:
        log.info("early nvJPEG + crop warm-up %.2fs, done %.2fs after process start", took["decoder"],
                 time.perf_counter() - process_start())  # fmt: skip


def _start_device_early(
    device: str,
    *,
    warm_decoder: bool,
    before: dict[str, float] | None = None,
    jpeg_decoder: str = "nvjpeg",
    crop_kernel: str = "auto",
) -> EarlyStart:
    """Create the CUDA context (or find it made: :func:`~model_server.tuning.start_before_torch`), then
    load cuDNN and cuBLAS and, on a thread of its own beside them, initialise nvJPEG and the crop
    kernels (0.5 and 0.9 s on the H100 host), in threads while this one imports KServe or reads the
    weights: all of it runs in the driver and the libraries, mostly without the GIL. ``load_model``
    joins the libraries before its first warm-up and captures the CUDA graphs while nvJPEG may still
    be warming (the capture only forbids its own thread's unsafe calls); it joins the decoder before
    the pipeline's warm-up. Errors surface later, in ``load_model``."""
    import torch

    def init() -> None:
        try:
            if device != "cpu" and torch.cuda.is_available():
                t0 = time.perf_counter()
                dev = torch.device(device if device.startswith("cuda") else "cuda")
                torch.zeros(1, device=dev)
                t_context = time.perf_counter()
                if warm_decoder:  # beside the libraries: on the H100 host 0.9 s and 0.5 s, one after the other before
                    decoder = threading.Thread(
                        target=warm_decoder_timed, args=(dev, {}, jpeg_decoder, crop_kernel), name="nvjpeg-init"
                    )
                    decoder.start()
                    early.decoder = decoder
                from model_server.runtimes import warm_device_libraries

                warm_device_libraries(dev)
                # Where process start to ready goes (the floor pays the context only).
                log.info("early device start: %.2fs after process start; CUDA context %.2fs, then cuDNN/cuBLAS "
                         "%.2fs (nvJPEG warming beside them); before torch: %s", t0 - process_start(), t_context - t0,
                         time.perf_counter() - t_context,
                         ", ".join(f"{k} {v:.2f}s" for k, v in (before or {}).items()) or "nothing")  # fmt: skip
        except Exception as e:  # load() reports device problems with a proper message
            log.debug("early CUDA initialisation failed: %s", e)

    early = EarlyStart(libraries=threading.Thread(target=init, name="cuda-init", daemon=True))
    early.libraries.start()
    return early


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.model_dir:
        print("error: --model_dir (or DENSENET_MODEL_DIR) is required", file=sys.stderr)
        return 2
    if args.max_queue_images < 0:
        print(f"error: --max_queue_images must be >= 0 (0: {QUEUE_BATCHES} x --max_batch_size, at least "
              f"{MIN_QUEUE_IMAGES}), got {args.max_queue_images}", file=sys.stderr)  # fmt: skip
        return 2
    for name in ("max_batch_size", "max_inflight_batches", "max_request_images", "max_body_bytes", "max_image_pixels"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if not 0.0 <= args.cpu_decode_share <= 1.0:
        print(f"error: --cpu_decode_share must be from 0 to 1, got {args.cpu_decode_share}", file=sys.stderr)
        return 2
    if args.gil_switch_interval_ms < 0:
        print(f"error: --gil_switch_interval_ms must be >= 0, got {args.gil_switch_interval_ms}", file=sys.stderr)
        return 2
    if args.gil_switch_interval_ms:
        sys.setswitchinterval(args.gil_switch_interval_ms / 1000.0)
    if args.max_inflight_requests < 0 or args.grace_period_s <= 0:
        print("error: --max_inflight_requests must be >= 0 and --grace_period_s > 0", file=sys.stderr)
        return 2
    if args.admin_token and len(args.admin_token) < MIN_ADMIN_TOKEN_CHARS:
        print(f"error: --admin_token must have at least {MIN_ADMIN_TOKEN_CHARS} characters", file=sys.stderr)
        return 2
    try:
        warmup_sizes = parse_image_sizes(args.warmup_image_sizes)
    except ValueError as e:
        print(f"error: --warmup_image_sizes: {e}", file=sys.stderr)
        return 2
    config = ServingConfig(
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        max_queue_images=queue_images(args.max_queue_images, args.max_batch_size),
        max_inflight_batches=args.max_inflight_batches,
        max_request_images=args.max_request_images,
        max_image_pixels=args.max_image_pixels,
        request_timeout_s=args.request_timeout_s,
        gpu_decode=args.gpu_decode == "true",
        cpu_decode_share=args.cpu_decode_share,
        model_stream=args.model_stream,
        decode_batch=args.decode_batch,
        jpeg_decoder=args.jpeg_decoder,
        decode_stream_priority=args.decode_stream_priority,
        crop_kernel=args.crop_kernel,
        early_headers=args.nvjpeg_early_headers == "true",
        pinned_bodies=args.ipc_pinned_bodies == "true",
        inline_idle_ms=args.inline_idle_ms,
        warmup_image_sizes=warmup_sizes,
    )
    if args.inline_idle_ms < 0:
        print(f"error: --inline_idle_ms must be >= 0 (0: never), got {args.inline_idle_ms:g}", file=sys.stderr)
        return 2
    if args.decode_batch < 0:
        print(f"error: --decode_batch must be >= 0 (0: one nvJPEG call per batch), got {args.decode_batch}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.frontends < 1:
        print(f"error: --frontends must be >= 1, got {args.frontends}", file=sys.stderr)
        return 2
    if args.ipc_body_pool_mb < 0:
        print(f"error: --ipc_body_pool_mb must be >= 0 (0: off), got {args.ipc_body_pool_mb}", file=sys.stderr)
        return 2
    spec = {
        "model_name": args.model_name, "model_dir": args.model_dir, "config": config,
        "http_port": args.http_port, "grpc_port": args.grpc_port, "max_body_bytes": args.max_body_bytes,
        "log_level": args.log_level.upper(), "admin_token": args.admin_token or None,
        "enable_docs": args.enable_docs == "true", "grace_period_s": args.grace_period_s,
        "metrics": args.metrics == "true", "balance_connections": args.balance_connections == "true",
        "max_inflight": args.max_inflight_requests
        or config.max_queue_images + config.max_inflight_batches * config.max_batch_size,
        "event_loop": args.event_loop,
    }  # fmt: skip
    # The CUDA driver, the context and nvJPEG's start-up, in a thread beside the front ends' spawn and torch's import.
    before_torch: dict[str, float] = {}
    start_before_torch(config.device, gpu_decode=config.gpu_decode, took=before_torch)
    if args.frontends > 1:
        from model_server.frontend import FrontEnds, enable_multiprocess_metrics

        enable_multiprocess_metrics()  # before prometheus_client is first imported, here and in the front ends
        # Spawned before this process imports torch: they import torch and KServe while it loads the model.
        fronts = FrontEnds(args.frontends, spec)
        return _serve_device(args, config, fronts, before_torch)
    return _serve_single(args, config, spec, before_torch)


def _serve_device(
    args: argparse.Namespace, config: ServingConfig, fronts: FrontEnds, before_torch: dict[str, float]
) -> int:
    """The device process of ``--frontends N``: loads and warms the model, then serves the front ends.
    It never imports KServe, FastAPI or grpc (about 2 s of start-up it would spend before the load)."""
    early = _start_device_early(
        config.device,
        warm_decoder=config.gpu_decode,
        before=before_torch,
        jpeg_decoder=config.jpeg_decoder,
        crop_kernel=config.crop_kernel,
    )
    from model_server import metrics
    from model_server.device import load_model
    from model_server.tuning import freeze_so_far

    if args.metrics == "false":
        metrics.disable()
    metrics.install_toggle_signals(forward=fronts.forward_signal)
    freeze_so_far()  # the imports
    log.info("device process: imports done %.2fs after process start", time.perf_counter() - process_start())
    try:
        model = load_model(Path(args.model_dir), config, early=early)
    except ServerError as e:
        log.error("cannot serve %s: %s", args.model_dir, e)
        fronts.abort()
        return 1
    log.info("device process: loaded and warm %.2fs after process start", time.perf_counter() - process_start())
    freeze_so_far()  # torchvision (imported by the load) and the model
    sampler = metrics.ResourceSampler(gpu_index=_gpu_index(model.runner))
    sampler.start()
    try:
        code: int = fronts.serve(
            model, grace_period_s=args.grace_period_s, event_loop=args.event_loop, body_pool_mb=args.ipc_body_pool_mb
        )
        return code
    finally:
        sampler.stop()
        model.stop()


def _serve_single(
    args: argparse.Namespace, config: ServingConfig, spec: dict[str, Any], before_torch: dict[str, float]
) -> int:
    """One process: the model loads and warms in a thread while this one imports KServe, which so
    overlaps the parts of the load that release the GIL (file reads, the CUDA driver, torch's kernels)."""
    import concurrent.futures

    early = _start_device_early(
        config.device,
        warm_decoder=config.gpu_decode,
        before=before_torch,
        jpeg_decoder=config.jpeg_decoder,
        crop_kernel=config.crop_kernel,
    )
    from model_server import metrics
    from model_server.device import load_model

    if args.metrics == "false":
        metrics.disable()
    metrics.install_toggle_signals()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="load") as pool:
        loading = pool.submit(load_model, Path(args.model_dir), config, early=early)
        # rest imports kserve, which parses sys.argv when imported: only once our own flags are parsed.
        from model_server import rest
        from model_server.predictor import DenseNetPredictor
        from model_server.tuning import freeze_so_far

        freeze_so_far()  # the imports (and what the load made so far)
        model = DenseNetPredictor(args.model_name, Path(args.model_dir), config)
        try:
            model.attach(loading.result())
        except ServerError as e:
            log.error("cannot serve %s: %s", args.model_dir, e)
            return 1
    freeze_so_far()  # the rest of the load
    sampler = metrics.ResourceSampler(gpu_index=_gpu_index(model.runner))
    sampler.start()
    try:
        return 0 if rest.serve_http(model, spec) else 1
    finally:
        sampler.stop()
        model.stop()


def _gpu_index(runner: Runner | None) -> int | None:
    if runner is None or runner.device.type != "cuda":
        return None
    index: int = runner.device.index or 0
    return index
