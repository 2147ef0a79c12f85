"""Predictor settings shared by the device process and the HTTP front ends (no heavy imports)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import os
import re
import tempfile

# Here, not in preprocess (which imports torch and PIL): the CLI parses its flags, and starts the
# front-end processes of --frontends N, before the device process spends seconds importing torch.
#: MB of large request bodies' buffers the device process keeps for reuse (``--ipc_body_pool_mb``).
DEFAULT_BODY_POOL_MB = 256
#: Where the device process runs the model's batches (``--model_stream``).
MODEL_STREAMS = ("default", "side")
#: JPEG decoders of the GPU decode stage (``--jpeg_decoder``): nvJPEG's hardware decoder called
#: directly (torchvision's for what it does not take), or torchvision's batched decode for all.
JPEG_DECODERS = ("nvjpeg", "torchvision")
#: How the GPU decode stage resizes and crops a batch (``--crop_kernel``): "torch", torch's antialiased
#: interpolation of each whole image, then the crop; "triton", one kernel computing only the crop's
#: pixels from the uint8 ones (:mod:`model_server.crop_kernel`); "auto", "triton" where its binary for
#: the GPU can be found or compiled, and loaded, else "torch".
CROP_KERNELS = ("auto", "torch", "triton")
#: Priorities of the decode stage's CUDA stream (``--decode_stream_priority``): "high", the GPU's
#: highest, so the decode's and crop's kernels are scheduled ahead of the model's; "normal", the model's.
DECODE_STREAM_PRIORITIES = ("high", "normal")
#: Event loops of the HTTP front ends and the device process (``--event_loop``).
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
#: ``--max_queue_images 0`` (the default): the batch queue holds this many batches of ``--max_batch_size``,
#: and at least MIN_QUEUE_IMAGES images.
QUEUE_BATCHES = 8
MIN_QUEUE_IMAGES = 256
#: 12 MP photos are normal; 50 MP is the default ceiling (a decompression bomb is far above it).
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


#: Image sizes (width, height) whose lone-JPEG path is warmed before ready (``--warmup_image_sizes``):
#: common camera and video frame sizes. A lone JPEG of a size not seen before is cropped eagerly and
#: its crop graph captured on the next one; the H100's first VGA request spent 1.14 ms in the decode
#: stage against 0.52 for the ones after it (session 24, ``serve-fused-mids-metrics-s24``).
DEFAULT_WARMUP_IMAGE_SIZES: tuple[tuple[int, int], ...] = ((640, 480), (1280, 720), (1920, 1080))
#: The largest warm-up image side: a warm-up size is encoded and decoded at start-up.
MAX_WARMUP_SIDE = 8192


def parse_image_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"640x480,1280x720"`` as ((640, 480), (1280, 720)); ``"none"`` or ``""``: no size.

    Raises:
        ValueError: naming the bad entry and the form expected.
    """
    if text.strip().lower() in ("", "none"):
        return ()
    sizes: list[tuple[int, int]] = []
    for entry in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)", entry.strip().lower())
        size = (int(match[1]), int(match[2])) if match else (0, 0)
        if not all(0 < side <= MAX_WARMUP_SIDE for side in size):
            raise ValueError(
                f"image size {entry.strip()!r} is not WIDTHxHEIGHT with sides 1..{MAX_WARMUP_SIDE} "
                "(e.g. 640x480,1920x1080, or none)"
            )
        if size not in sizes:
            sizes.append(size)
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """Predictor settings (``python -m model_server --help`` documents each)."""

    device: str = "auto"
    max_batch_size: int = 32
    max_delay_ms: float = 0.0
    max_queue_images: int = 256
    #: Batches between their forming and their answers at once (``--max_inflight_batches``): 2 lets
    #: the decode stage prepare batch k+1 while the device runs batch k; 3 also lets batch k+2 be formed
    #: and wait for the decode stage while batch k is still answered.
    max_inflight_batches: int = 2
    max_request_images: int = 32
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    default_top_k: int = 5
    preprocess_threads: int = max(2, min(8, os.cpu_count() or 2))
    request_timeout_s: float = 30.0
    #: Decode JPEGs with nvJPEG on the serving GPU, batched across requests by the device
    #: worker; other formats, and every image on a CPU-only machine, are decoded by PIL.
    gpu_decode: bool = True
    #: Share (0..1) of GPU-decodable images the front ends decode with PIL anyway, to take load
    #: off the decode stage when it, not the model, limits throughput. Skipped while the CPU
    #: pool is busy, so it never queues behind itself. 0 (default): nvJPEG takes every JPEG.
    cpu_decode_share: float = 0.0
    #: CUDA stream the model's batches run on, one of MODEL_STREAMS: "default" (the legacy default
    #: stream) or "side" (a non-blocking stream of their own, so nvJPEG's synchronous work does not
    #: wait for them).
    model_stream: str = "side"
    #: Images per nvJPEG call (``--decode_batch``): a batch is decoded in calls of exactly this many
    #: JPEGs, the last padded with a tiny one, so nvJPEG sees one batch size; 0 (default): one call
    #: per batch, whatever its size (32 served 0.89x on the H100).
    decode_batch: int = 0
    #: One of JPEG_DECODERS (``--jpeg_decoder``).
    jpeg_decoder: str = "nvjpeg"
    #: With ``--frontends N``, the device process reads a request's JPEG headers as it arrives, beside
    #: the decode stage's batched call, not on the decode stage's thread (``--nvjpeg_early_headers``).
    early_headers: bool = True
    #: One of DECODE_STREAM_PRIORITIES (``--decode_stream_priority``).
    decode_stream_priority: str = "high"
    #: One of CROP_KERNELS (``--crop_kernel``).
    crop_kernel: str = "auto"
    #: With ``--frontends N``, the reused buffers of large request bodies (``--ipc_body_pool_mb``) are
    #: page-locked where nvJPEG's hardware decoder reads their JPEGs (``--ipc_pinned_bodies``).
    pinned_bodies: bool = True
    #: A request that finds the device idle (nothing queued or running) for at least this many ms runs
    #: at once on the device process's event loop thread, not via the batch worker and the device
    #: thread (two thread wake-ups and a few loop turns fewer at low load); 0: never.
    inline_idle_ms: float = 1.0
    #: Image sizes (width, height) whose lone-JPEG path (decode, crop graph) is warmed before ready
    #: (``--warmup_image_sizes``); GPU decode only.
    warmup_image_sizes: tuple[tuple[int, int], ...] = DEFAULT_WARMUP_IMAGE_SIZES
    #: Where on-demand profiler traces go (a mounted volume in a pod).
    profile_dir: str = os.path.join(tempfile.gettempdir(), "densenet-profiles")


def queue_images(max_queue_images: int, max_batch_size: int) -> int:
    """Images the batch queue holds: ``max_queue_images``, or for 0 (the flag's default) QUEUE_BATCHES
    batches of ``max_batch_size``, at least MIN_QUEUE_IMAGES (256 up to batches of 32; 1,024 for 128).

    A queue of two batches starves the two-stage device pipeline once requests carry many images:
    on the H100 host, 24 users of 32 JPEGs at ``--max_batch_size 128`` served 0.927x with 256
    images against 1,024, and 256 refused about 1 % of 16 users' requests (README, session 20).
    """
    return max_queue_images if max_queue_images > 0 else max(MIN_QUEUE_IMAGES, QUEUE_BATCHES * max_batch_size)


def install_event_loop(choice: str) -> str:
    """Make the next ``asyncio.run`` of this process use ``choice``'s loop; returns the loop used.

    KServe 0.21 takes ``--event_loop`` (default "auto": uvloop when installed) but hands it only
    to uvicorn's config, which applies it in ``uvicorn.run``; ``ModelServer.start`` runs the server
    with ``asyncio.run`` instead, so KServe always serves on asyncio's pure-Python loop. "auto"
    here means uvloop when it imports (KServe's own dependency), asyncio otherwise.
    """
    if choice not in EVENT_LOOPS:
        raise ValueError(f"event loop must be one of {', '.join(EVENT_LOOPS)}, got {choice!r}")
    if choice == "asyncio" or (choice == "auto" and importlib.util.find_spec("uvloop") is None):
        asyncio.set_event_loop_policy(None)
        return "asyncio"
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # KServe's ModelServer.start calls asyncio.get_event_loop() before asyncio.run, which uvloop's
    # policy answers with an error instead of a new loop when none is set.
    asyncio.set_event_loop(asyncio.new_event_loop())
    return "uvloop"
