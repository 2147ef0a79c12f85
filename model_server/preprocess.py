"""Images on the device: nvJPEG's batched decode, the GPU resize and crop, normalisation.

The device-side half of turning encoded images into model input (resize 256, center-crop 224,
uint8 NCHW); the request-side half, torch-free, is :mod:`model_server.images`. Normalisation
(ImageNet mean/std) happens on the device, inside the runner, so the host moves a quarter of
the bytes and the same code serves images and raw UINT8 tensors.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from model_server.crop_kernel import crop_geometry, cubin_crop
from model_server.crop_kernel import resolve as resolve_crop_kernel
from model_server.images import decode_and_crop as _decode_and_crop_array
from model_server.nvjpeg import Headers, hardware_decoder
from model_server.tuning import torchvision_dirs
from optimize.registry import CROP_SIZE, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger(__name__)


def decode_and_crop(data: bytes, **limits: Any) -> torch.Tensor:
    """:func:`model_server.images.decode_and_crop` as a uint8 ``[3, 224, 224]`` tensor (same limits)."""
    return torch.from_numpy(_decode_and_crop_array(data, **limits))


def normalize(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RGB pixels ``[N,3,H,W]`` (uint8, or float in 0..255; any device) to ImageNet-normalised ``dtype``."""
    mean, std = _mean_std(batch.device)
    return ((batch.to(torch.float32) - mean) / std).to(dtype)


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std in pixel units, made once per device: made per call, each was a
    synchronous copy from pageable host memory (two per batch on the device thread)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return mean, std


#: most decoded pixels resized in one interpolation call (x 12 bytes of float scratch: about 0.6 GB)
RESIZE_CHUNK_PIXELS = 48_000_000


#: A batch's decoded images of one size: their indices in the batch, and their pixels, ``[k,3,H,W]``
#: uint8 on the device (nvJPEG's hardware decoder writes them so) or the ``k`` images ``[3,H,W]`` apart.
SizeGroup = tuple[list[int], "torch.Tensor | list[torch.Tensor]"]


def group_by_size(images: list[torch.Tensor]) -> list[SizeGroup]:
    """Decoded images ``[3,H,W]`` as size groups (first appearance first), the images left apart."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    return [(idx, [images[i] for i in idx]) for idx in groups.values()]


def gpu_resize_crop_many(images: list[torch.Tensor]) -> torch.Tensor:
    """``Resize(256)`` + ``CenterCrop(224)`` of decoded images, one interpolation per distinct size."""
    return resize_crop_groups(group_by_size(images), len(images))


def resize_crop_groups(groups: list[SizeGroup], n: int, kernel: str = "torch") -> torch.Tensor:
    """``Resize(256)`` + ``CenterCrop(224)`` of a batch's ``n`` decoded images given as size groups:
    one interpolation per group, the crops ``[n,3,224,224]`` uint8 in batch order. ``kernel`` "triton":
    a group on a CUDA device is cropped by the compiled kernel of :mod:`model_server.crop_kernel`
    instead (``--crop_kernel``); elsewhere, and with "torch", by :func:`resize_crop_pixels`."""
    out: list[torch.Tensor | None] = [None] * n
    for idx, pixels in groups:
        if kernel == "triton" and pixels[0].device.type == "cuda":
            stacked = pixels if isinstance(pixels, torch.Tensor) else torch.stack(pixels)
            chunks = [cubin_crop(stacked.device)(stacked)]  # reads the uint8 pixels as they are: no float copy
        else:
            # The float copy the interpolation needs is 12 bytes per pixel: resize a size group in chunks of
            # at most RESIZE_CHUNK_PIXELS (a batch of 128 12-MP photos would otherwise take 18 GB at once).
            h, w = pixels[0].shape[-2:]
            step = max(1, RESIZE_CHUNK_PIXELS // (h * w))
            chunks = []
            for k in range(0, len(idx), step):
                part = pixels[k : k + step]
                if isinstance(part, list):  # images apart: one op fewer alone
                    part = part[0].unsqueeze(0) if len(part) == 1 else torch.stack(part)
                chunks.append(resize_crop_pixels(part).to(torch.uint8))
        crops = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        if len(groups) == 1 and idx == list(range(n)):
            return crops  # one size (the common case under load): already in order
        for j, i in enumerate(idx):
            out[i] = crops[j]
    return torch.stack([c for c in out if c is not None])


def resize_crop_pixels(images: torch.Tensor) -> torch.Tensor:
    """``Resize(256)`` + ``CenterCrop(224)`` of a uint8 ``[N,3,H,W]`` batch of one size, as float32
    pixels already rounded and clamped to 0..255 (what the uint8 crop holds, before the cast)."""
    nh, nw, top, left = crop_geometry(*images.shape[-2:])
    x = torch.nn.functional.interpolate(
        images.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
    )
    return x[:, :, top : top + CROP_SIZE, left : left + CROP_SIZE].round_().clamp_(0, 255)


#: The large warm-up image: a 12 MP photo, so nvJPEG's buffers and the allocator's blocks are already
#: grown for the largest common camera size when the first real request comes (else it pays for them).
WARM_UP_LARGE = (4032, 3024)


#: ``torchvision.io.ImageReadMode.RGB``: what the image ops take as ``mode``.
READ_MODE_RGB = 3
#: torchvision's image-ops library: ``image.so`` up to 0.28, ``image_stable.so`` from 0.29.
_IMAGE_LIBS = ("image.so", "image_stable.so")
#: The batched decode's argument and return types, ``(Tensor[] encoded_images, int mode, Device device)
#: -> Tensor[]``; names are not compared: up to 0.28 the schema is inferred from C++ (``_0, _1, _2``).
_BATCHED_TYPES = (["List[Tensor]", "int", "Device"], ["List[Tensor]"])


def batched_decode_schema_ok(schema: Any) -> bool:
    """Whether an op schema takes and returns what the batched decode is called with (names aside)."""
    types = ([str(a.type) for a in schema.arguments], [str(r.type) for r in schema.returns])
    return types == _BATCHED_TYPES


@functools.cache
def image_ops() -> Any | None:
    """torchvision's image ops (``torch.ops.image``: nvJPEG's batched decode), loaded without
    importing torchvision; None where the library or the expected signature is missing.

    ``import torchvision`` imports its models, datasets and ops, and with them ``torch._dynamo``:
    1.9 s on a 2-core VM, more where no bytecode is cached, on the path from process start to
    ready of every runner that does not build a torchvision model (AOTInductor, ONNX Runtime,
    TorchScript). The decode needs only the op library, which links nvJPEG itself.
    """
    try:
        lib = next((d / n for d in torchvision_dirs() for n in _IMAGE_LIBS if (d / n).is_file()), None)
        if lib is None:
            return None
        # torchvision's own import (an eager runner's) later loads the same file: a no-op then.
        torch.ops.load_library(str(lib))  # type: ignore[no-untyped-call]
        ops = torch.ops.image
        schema = ops.decode_jpegs_cuda.default._schema
        if not batched_decode_schema_ok(schema):
            log.info("torchvision's decode_jpegs_cuda is %s: decoding through torchvision.io", schema)
            return None
        return ops
    except Exception as e:  # any surprise: torchvision.io's own wrapper below still works
        log.info("torchvision's image ops did not load on their own (%s): decoding through torchvision.io", e)
        return None


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device, *, call_size: int = 0) -> list[torch.Tensor]:
    """Decode JPEG byte tensors (uint8, on the CPU) to RGB ``[3,H,W]`` uint8 on ``device``: on a CUDA
    device in one batched nvJPEG call (:func:`image_ops`), else with torchvision's decoder.

    ``call_size`` > 0 decodes on CUDA in calls of exactly that many JPEGs, the last call padded with
    :func:`padding_jpeg` s (their images dropped), so nvJPEG's batched decoder, initialised for each
    call's batch size, always sees one size. On the H100 it did not pay: batch sizes that vary cost
    1.02-1.12x a fixed one, and serving in calls of 32 gave 0.89x (README, session 6); off by default.

    Raises:
        RuntimeError: the decoder refused a stream (the whole call fails).
    """
    if device.type == "cuda":
        ops = image_ops()
        if ops is not None:
            if call_size <= 0:
                return list(ops.decode_jpegs_cuda(encoded, READ_MODE_RGB, device))
            out: list[torch.Tensor] = []
            for k in range(0, len(encoded), call_size):
                part = encoded[k : k + call_size]
                n = len(part)
                part = part + [padding_jpeg()] * (call_size - n)
                out.extend(ops.decode_jpegs_cuda(part, READ_MODE_RGB, device)[:n])
            return out
    from torchvision.io import ImageReadMode, decode_jpeg

    return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))


def decode_jpeg_groups(
    encoded: list[torch.Tensor] | Callable[[], list[torch.Tensor]],
    device: torch.device,
    *,
    call_size: int = 0,
    decoder: str = "nvjpeg",
    frames: bytes | None = None,
    headers: Headers | None = None,
) -> list[SizeGroup]:
    """Decode JPEG byte tensors (uint8, on the CPU) to RGB on ``device``, as size groups.

    On a CUDA device with ``decoder="nvjpeg"`` (and no ``call_size``) nvJPEG's hardware decoder,
    called directly (:mod:`model_server.nvjpeg`), writes each size's images into one tensor; the
    JPEGs it does not take, and every JPEG where there is no hardware decoder, go through
    :func:`decode_jpegs` (torchvision's decoder), as they all do with ``decoder="torchvision"``.
    ``frames``: each JPEG's start-of-frame marker, when known (:attr:`~model_server.images.JpegBatch.frames`).
    ``headers``: the JPEGs' headers as read when their requests arrived; the hardware decoder then
    reads the JPEGs where they say, and ``encoded`` may be a function that makes the tensors, called
    only when another decoder needs them.

    Raises:
        RuntimeError: a decoder refused a stream (the whole call fails).
    """
    made: list[list[torch.Tensor]] = []

    def tensors() -> list[torch.Tensor]:
        if not made:
            made.append(encoded() if callable(encoded) else encoded)
        return made[0]

    if device.type == "cuda" and decoder == "nvjpeg" and call_size <= 0:
        hardware = hardware_decoder(device)
        if hardware is not None:
            if headers is not None:
                found, rest = hardware.decode_headers(headers, frames)
            else:
                found, rest = hardware.decode(tensors(), frames)
            groups: list[SizeGroup] = list(found)
            if rest:
                all_encoded = tensors()
                others = decode_jpegs([all_encoded[i] for i in rest], device)
                groups += [([rest[j] for j in idx], pixels) for idx, pixels in group_by_size(others)]
            return groups
    return group_by_size(decode_jpegs(tensors(), device, call_size=call_size))


@functools.cache
def padding_jpeg() -> torch.Tensor:
    """The smallest baseline JPEG (one 16x16 MCU), as a byte tensor: filler for fixed-size nvJPEG calls."""
    return torch.frombuffer(bytearray(warm_up_jpeg((16, 16))), dtype=torch.uint8)


@functools.lru_cache(maxsize=4)
def warm_up_jpeg(size: tuple[int, int] = (320, 240)) -> bytes:
    """A baseline JPEG of ``size`` (default 320x240), RGB 120/60/30, for decoder warm-ups (encoded once)."""
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def warm_gpu_decoder(device: torch.device, decoder: str = "nvjpeg", crop_kernel: str = "auto") -> torch.Tensor:
    """Initialise nvJPEG (handles, buffers, the hardware decoder) and the crop kernels on ``device``
    with a small JPEG at batch 1 and 8 and one 12 MP JPEG, so neither the warm-up nor a request pays
    for it; returns the crops of the batch of 8. ``decoder`` as in :func:`decode_jpeg_groups`,
    ``crop_kernel`` as ``--crop_kernel`` ("auto" resolved here; "triton": its binary is loaded here, or
    compiled)."""
    crop_kernel = resolve_crop_kernel(crop_kernel, device)
    data = torch.frombuffer(bytearray(warm_up_jpeg()), dtype=torch.uint8)
    crops = torch.empty(0)
    for n in (1, 8):
        crops = resize_crop_groups(decode_jpeg_groups([data] * n, device, decoder=decoder), n, crop_kernel)
    if device.type == "cuda":
        large = torch.frombuffer(bytearray(warm_up_jpeg(WARM_UP_LARGE)), dtype=torch.uint8)
        resize_crop_groups(decode_jpeg_groups([large], device, decoder=decoder), 1, crop_kernel)
        # Its own stream only: the early warm-up may run beside a CUDA-graph capture.
        torch.cuda.current_stream(device).synchronize()
    return crops
