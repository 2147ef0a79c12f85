"""Predictor settings shared by the device process and the HTTP front ends (no heavy imports)."""

from __future__ import annotations

import dataclasses
import os
import tempfile

# Here, not in preprocess (which imports torch and PIL): the CLI parses its flags, and starts the
# front-end processes of --frontends N, before the device process spends seconds importing torch.
#: Where the device process runs the model's batches (``--model_stream``).
MODEL_STREAMS = ("default", "side")
#: 12 MP photos are normal; 50 MP is the default ceiling (a decompression bomb is far above it).
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """Predictor settings (``python -m model_server --help`` documents each)."""

    device: str = "auto"
    max_batch_size: int = 32
    max_delay_ms: float = 0.0
    max_queue_images: int = 256
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
    #: Where on-demand profiler traces go (a mounted volume in a pod).
    profile_dir: str = os.path.join(tempfile.gettempdir(), "densenet-profiles")
