"""Runners: load an artifact by its ``runtime`` field and run uint8 or normalised batches on a device.

Every runner takes a host tensor ``[N,3,224,224]``, either uint8 RGB pixels (normalised
on the device) or float already-normalised input, and returns float32 logits ``[N,1000]``
on the host. ``optimize`` uses these same loaders to validate what it builds, so what is
checked offline is exactly what is served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from model_server import ArtifactError
from model_server.artifact import payload_path
from model_server.preprocess import normalize
from optimize.registry import CROP_SIZE, NUM_CLASSES

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ArtifactError(f"unknown device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device(device)


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch``, and ``max_batch`` itself."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch)
    return buckets


class Runner:
    """Base runner: device placement, on-device normalisation, optional padding to buckets.

    Attributes:
        device: where the model runs.
        dtype: the dtype the model takes as input.
        channels_last: whether the input is laid out NHWC.
        pad_to_bucket: pad batches to the next bucket (static-shape runtimes need it).
    """

    pad_to_bucket = False

    def __init__(self, manifest: dict[str, Any], device: torch.device) -> None:
        self.manifest = manifest
        self.device = device
        self.dtype = _DTYPES.get(manifest["precision"], torch.float32)
        self.channels_last = bool(manifest.get("channels_last", False))
        self.max_batch = int(manifest["input"].get("max_batch", 64))
        self.buckets = batch_buckets(self.max_batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model on a device tensor already in its dtype and layout."""
        raise NotImplementedError

    def prepare(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        x = normalize(x, self.dtype) if x.dtype == torch.uint8 else x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if self.pad_to_bucket:
            size = next((b for b in self.buckets if b >= n), n)
            if size > n:
                batch = torch.cat([batch, batch.new_zeros((size - n, *batch.shape[1:]))])
        out = self.forward(self.prepare(batch))
        return out[:n].float().cpu()

    def warm_up(self) -> None:
        """Run every batch bucket once so no first-call cost reaches a request."""
        for b in self.buckets:
            self(torch.zeros((b, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class TorchEagerRunner(Runner):
    """A torchvision DenseNet-121 rebuilt from a state dict loaded with ``weights_only=True``."""

    def __init__(self, manifest: dict[str, Any], artifact_dir: Path, device: torch.device) -> None:
        super().__init__(manifest, device)
        import torchvision

        state = torch.load(payload_path(artifact_dir, manifest, "model"), map_location="cpu", weights_only=True)
        model = torchvision.models.densenet121(weights=None, num_classes=NUM_CLASSES)
        model.load_state_dict(state)
        model = model.to(device=device, dtype=self.dtype).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


RunnerFactory = Callable[[dict[str, Any], Path, torch.device], Runner]

#: runtime name (``variant.json``'s ``runtime``) -> loader. Techniques register theirs here.
RUNNERS: dict[str, RunnerFactory] = {
    "torch-eager": TorchEagerRunner,
}


def load_runner(manifest: dict[str, Any], artifact_dir: Path, device: torch.device) -> Runner:
    """Load the artifact's model with the runner its ``runtime`` names.

    Raises:
        ArtifactError: unknown runtime, or an artifact built for a device this machine lacks.
    """
    runtime = manifest["runtime"]
    factory = RUNNERS.get(runtime)
    if factory is None:
        raise ArtifactError(f"artifact runtime {runtime!r} is not supported; valid: {', '.join(sorted(RUNNERS))}")
    devices = manifest.get("devices", ["cpu", "cuda"])
    if device.type not in devices:
        raise ArtifactError(
            f"artifact {manifest['slug']} runs on {', '.join(devices)}, not on {device.type}; "
            f"pick another --device or another variant"
        )
    if manifest["precision"] == "fp32":
        # An FP32 variant is checked against the FP32 reference at 1e-3: TF32 convolutions would break that.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return factory(manifest, artifact_dir, device)
