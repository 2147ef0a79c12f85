"""The device side of the predictor without KServe: load, verify and warm an artifact, its batcher and profiler.

What the device process of ``--frontends N`` runs (it never serves HTTP, so it never imports
KServe, FastAPI or grpc: about 2 s less between process start and the model load), and what
:class:`~model_server.predictor.DenseNetPredictor` attaches to in a single process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model_server.artifact import read_labels, read_manifest
from model_server.batcher import DynamicBatcher
from model_server.config import ServingConfig
from model_server.images import Payload
from model_server.nvjpeg import hardware_decoder
from model_server.pipeline import DevicePipeline
from model_server.profiler import ProfileCapture
from model_server.runtimes import Runner, load_runner, resolve_device
from model_server.tuning import EarlyStart

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedModel:
    """An artifact loaded on its device, every batch bucket (and nvJPEG) warm, behind its batcher."""

    manifest: dict[str, Any]
    labels: np.ndarray
    runner: Runner
    batcher: DynamicBatcher
    profiler: ProfileCapture
    #: JPEGs go to the device worker for nvJPEG (CUDA device and ``gpu_decode`` on).
    gpu_decode: bool
    load_seconds: float
    #: Request bodies belong in page-locked memory: nvJPEG's hardware decoder reads their JPEGs in place
    #: (``gpu_decode``, ``--jpeg_decoder nvjpeg`` with a hardware decoder, ``--ipc_pinned_bodies true``).
    pinned_bodies: bool = False
    #: Called with each request's payload as it reaches the device process, before the batcher: reads
    #: its JPEG headers there (``--nvjpeg_early_headers``, with the hardware decoder); None: nothing.
    admit: Callable[[Payload], None] | None = None

    def max_batch(self) -> int:
        """Largest device batch (the artifact's and the flag's minimum)."""
        return self.batcher.max_batch_size

    def stop(self) -> None:
        self.batcher.close()


def load_model(artifact_dir: Path, config: ServingConfig, *, early: EarlyStart | None = None) -> LoadedModel:
    """Read and verify the artifact, load it on ``config.device``, warm every batch bucket and the decoder.

    ``early``: the CLI's early device start. Its CUDA context and libraries are joined before the
    first warm-up; the CUDA graphs are captured while its nvJPEG warm-up may still run (in the
    capture mode that forbids unsafe calls in the capturing thread only), which is joined before
    the pipeline's own decoder warm-up.

    Raises:
        ArtifactError: the artifact is missing, malformed or fails its checksum.
        ServerError: the device or runtime cannot serve it.
    """
    t0 = time.perf_counter()
    manifest = read_manifest(artifact_dir)
    device = resolve_device(config.device)
    runner = load_runner(manifest, artifact_dir, device)
    t_loaded = time.perf_counter()
    max_batch = min(config.max_batch_size, runner.max_batch)
    if max_batch < config.max_batch_size:
        log.warning("artifact serves batches up to %d; --max_batch_size lowered to it", max_batch)
    runner.max_batch = max_batch
    runner.buckets = [b for b in runner.buckets if b < max_batch] + [max_batch]
    labels = np.array([s.encode() for s in read_labels(artifact_dir, manifest)], dtype=object)
    if early is not None:
        early.libraries.join()
    runner.warm_up(beside=early.decoder if early is not None else None)
    if early is not None:
        early.join()
    t_warm = time.perf_counter()
    profiler = ProfileCapture(Path(config.profile_dir), device)
    pipeline = DevicePipeline(runner, profiler, model_stream=config.model_stream, decode_batch=config.decode_batch,
                              jpeg_decoder=config.jpeg_decoder,
                              decode_priority=config.decode_stream_priority,
                              early_headers=config.early_headers, crop_kernel=config.crop_kernel)  # fmt: skip
    gpu_decode = config.gpu_decode and device.type == "cuda"
    if gpu_decode:
        pipeline.warm_up(config.warmup_image_sizes)
    log.info("start-up: weights loaded %.2fs, buckets warmed %.2fs, decoder warmed %.2fs",
             t_loaded - t0, t_warm - t_loaded, time.perf_counter() - t_warm)  # fmt: skip
    two_stage = device.type == "cuda"  # decoding batch k+1 (own thread and stream) overlaps running batch k
    batcher = DynamicBatcher(
        pipeline.execute if two_stage else pipeline,
        prepare=pipeline.prepare if two_stage else None,
        alone=pipeline if two_stage else None,
        max_batch_size=max_batch,
        max_delay_s=config.max_delay_ms / 1000.0,
        max_queue_images=max(config.max_queue_images, max_batch),
        max_inflight_batches=config.max_inflight_batches,
        inline_after_idle_s=config.inline_idle_ms / 1000.0 if two_stage and config.inline_idle_ms > 0 else None,
        inline_ok=lambda: not profiler.active,  # a capture's batches stay on the device thread it starts on
    )
    load_seconds = time.perf_counter() - t0
    log.info(
        "loaded %s (%s, %s) on %s, warmed batches %s in %.2fs",
        manifest["slug"], manifest["runtime"], manifest["precision"], device, runner.buckets, load_seconds,
    )  # fmt: skip
    direct = gpu_decode and config.jpeg_decoder == "nvjpeg" and hardware_decoder(device) is not None
    pinned = direct and config.pinned_bodies
    admit = pipeline.read_headers if direct and pipeline.early_headers else None
    return LoadedModel(manifest, labels, runner, batcher, profiler, gpu_decode, load_seconds, pinned, admit)


def profile_op(profiler: ProfileCapture | None, op: dict[str, Any]) -> dict[str, Any]:
    """Run a profiler control operation (also reached over IPC from front-end processes).

    Raises:
        ValueError: unknown operation or bad bounds (HTTP 400).
        KeyError: unknown capture id (HTTP 404).
    """
    if profiler is None:
        raise ValueError("the model is not loaded")
    if op.get("op") == "start":
        return profiler.request(batches=op.get("batches"), seconds=op.get("seconds")).to_dict()
    if op.get("op") == "get":
        cap = profiler.get(str(op.get("id")))
        if cap is None:
            raise KeyError(f"no profiler capture {op.get('id')!r}")
        return cap.to_dict()
    raise ValueError(f"unknown profiler operation {op.get('op')!r}; valid: start, get")


__all__ = ["LoadedModel", "load_model", "profile_op"]
