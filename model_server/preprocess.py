"""Turning encoded images into model input: decode, resize 256, center-crop 224 (uint8 NCHW).

Normalisation (ImageNet mean/std) happens on the device, inside the runner, so the host
moves a quarter of the bytes and the same code serves images and raw UINT8 tensors.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from model_server import BadInput, PayloadTooLarge
from model_server.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from optimize.registry import CROP_SIZE, IMAGENET_MEAN, IMAGENET_STD, RESIZE_SIZE

log = logging.getLogger(__name__)

#: Resizing the shorter side of a 1x5000 image to 256 would allocate gigabytes: refuse such shapes.
MAX_ASPECT_RATIO = 64.0
#: Photo formats only: PIL would otherwise also try EPS (Ghostscript), PSD, ICO, ... on hostile bytes.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def decode_and_crop(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> torch.Tensor:
    """Decode one encoded image (JPEG, PNG, WebP, ...) to a uint8 ``[3, 224, 224]`` crop.

    Matches torchvision's ImageNet eval transform (``Resize(256)``, ``CenterCrop(224)``
    on a PIL image, bilinear). Grayscale, CMYK, palette and alpha images are converted
    to RGB. Large JPEGs are decoded at a reduced DCT scale first (PIL ``draft``), which
    keeps at least 256 pixels on the shorter side and makes 12 MP photos cheap.

    An image longer than ``max_aspect_ratio`` times its width (or the reverse) is refused:
    resizing its shorter side to 256 would allocate gigabytes (a 1x5000 PNG of 100 bytes
    becomes 256x1,280,000), a decompression bomb that passes the pixel limit.

    Raises:
        BadInput: the bytes are not a decodable image, or its aspect ratio is beyond the limit.
        PayloadTooLarge: the encoded size or the pixel count is over the limit.
    """
    if not data:
        raise BadInput("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"encoded image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise PayloadTooLarge(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
            if w < 1 or h < 1:
                raise BadInput(f"image has no pixels ({w}x{h})")
            if max(w, h) > max_aspect_ratio * min(w, h):
                raise BadInput(f"image is {w}x{h}: an aspect ratio beyond {max_aspect_ratio:g}:1 is refused")
            if isinstance(img, ImageFile.ImageFile) and img.format == "JPEG":
                img.draft("RGB", (RESIZE_SIZE, RESIZE_SIZE))
            img = _to_rgb(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput(f"bytes are not a decodable image: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt streams
        raise BadInput(f"image could not be decoded: {e}") from e
    return _resize_crop(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on white rather than on whatever colour they hide.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _resize_crop(img: Image.Image) -> torch.Tensor:
    w, h = img.size
    # torchvision's Resize(256): shorter side to 256, longer side truncated like int().
    if w <= h:
        nw, nh = RESIZE_SIZE, int(RESIZE_SIZE * h / w)
    else:
        nw, nh = int(RESIZE_SIZE * w / h), RESIZE_SIZE
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left = round((nw - CROP_SIZE) / 2.0)
    top = round((nh - CROP_SIZE) / 2.0)
    img = img.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    arr = np.asarray(img, dtype=np.uint8)  # HWC
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def normalize(batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 RGB ``[N,3,H,W]`` (any device) to ImageNet-normalised ``dtype``."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
    return ((batch.to(torch.float32) - mean) / std).to(dtype)


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


#: frame types nvJPEG decodes: baseline, extended and progressive Huffman (not lossless, not arithmetic)
_SOF_NVJPEG = frozenset({0xC0, 0xC1, 0xC2})
#: every start-of-frame marker (0xC4 DHT, 0xC8 JPG and 0xCC DAC share the range but are not frames)
_SOF_ANY = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """``(sof_marker, width, height, components)`` from a JPEG's frame header, or None.

    Walks the marker segments up to the first start-of-frame, reading a few bytes per segment
    (about 100x cheaper than opening the image with PIL, which builds its whole header state);
    anything malformed before the frame header gives None.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return None
        if marker in _SOF_ANY:
            if length < 8 or i + 10 > n:
                return None
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            return marker, width, height, data[i + 9]
        i += 2 + length
    return None


def gpu_decodable(data: bytes, *, max_pixels: int, max_bytes: int) -> bool:
    """Whether nvJPEG should take this image: a baseline/progressive JPEG, RGB or grayscale, within the limits.

    Only the frame header is read (:func:`jpeg_frame`), so the pixel limit is enforced before
    any GPU memory is spent. Anything else (CMYK, lossless or arithmetic-coded JPEG, PNG,
    corrupt headers) goes to :func:`decode_and_crop`, which decodes it or raises the precise error.
    """
    if len(data) > max_bytes:
        return False
    frame = jpeg_frame(data)
    if frame is None:
        return False
    sof, w, h, components = frame
    return (
        sof in _SOF_NVJPEG
        and components in (1, 3)
        and 0 < w * h <= max_pixels
        and max(w, h) <= MAX_ASPECT_RATIO * min(w, h)
    )


#: most decoded pixels resized in one interpolation call (x 12 bytes of float scratch: about 0.6 GB)
RESIZE_CHUNK_PIXELS = 48_000_000


def gpu_resize_crop_many(images: list[torch.Tensor]) -> torch.Tensor:
    """``Resize(256)`` + ``CenterCrop(224)`` of decoded images, one interpolation per distinct size."""
    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(i)
    for shape, idx in groups.items():
        _, h, w = shape
        if w <= h:
            nw, nh = RESIZE_SIZE, int(RESIZE_SIZE * h / w)
        else:
            nw, nh = int(RESIZE_SIZE * w / h), RESIZE_SIZE
        # The float copy the interpolation needs is 12 bytes per pixel: resize a size group in chunks of
        # at most RESIZE_CHUNK_PIXELS (a batch of 128 12-MP photos would otherwise take 18 GB at once).
        step = max(1, RESIZE_CHUNK_PIXELS // (h * w))
        top, left = round((nh - CROP_SIZE) / 2.0), round((nw - CROP_SIZE) / 2.0)
        chunks = []
        for k in range(0, len(idx), step):
            x = torch.stack([images[i] for i in idx[k : k + step]]).float()
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            x = x[:, :, top : top + CROP_SIZE, left : left + CROP_SIZE]
            chunks.append(x.round_().clamp_(0, 255).to(torch.uint8))
        crops = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        if len(groups) == 1:
            return crops  # one size (the common case under load): already in order
        for j, i in enumerate(idx):
            out[i] = crops[j]
    return torch.stack([c for c in out if c is not None])


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
        spec = importlib.util.find_spec("torchvision")  # locates the package without running it
        roots = list(spec.submodule_search_locations or []) if spec is not None else []
        lib = next((Path(r, n) for r in roots for n in _IMAGE_LIBS if Path(r, n).is_file()), None)
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


def warm_gpu_decoder(device: torch.device) -> torch.Tensor:
    """Initialise nvJPEG (handles, buffers, the hardware decoder) and the crop kernels on ``device``
    with a small JPEG at batch 1 and 8 and one 12 MP JPEG, so neither the warm-up nor a request pays
    for it; returns the crops of the batch of 8."""
    data = torch.frombuffer(bytearray(warm_up_jpeg()), dtype=torch.uint8)
    crops = torch.empty(0)
    for n in (1, 8):
        crops = gpu_resize_crop_many(decode_jpegs([data] * n, device))
    if device.type == "cuda":
        large = torch.frombuffer(bytearray(warm_up_jpeg(WARM_UP_LARGE)), dtype=torch.uint8)
        gpu_resize_crop_many(decode_jpegs([large], device))
        torch.cuda.synchronize(device)
    return crops


class CpuDecodeShare:
    """Which GPU-decodable requests the CPU decodes anyway (``--cpu_decode_share``).

    A credit counter spreads ``share`` of the images evenly over requests; a request never goes
    to a CPU pool whose ``threads`` all have a decode running or queued (the GPU takes it then),
    so the share cannot build a queue behind itself. ``decoding`` is kept by the caller.
    """

    def __init__(self, share: float, *, threads: int) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"cpu_decode_share must be from 0 to 1, got {share}")
        self.share = share
        self.threads = threads
        self.decoding = 0  # images being decoded (or queued) in the CPU pool
        self._credit = 0.0  # images owed to the CPU

    def take(self, n: int) -> bool:
        """Whether a request of ``n`` GPU-decodable images is decoded on the CPU."""
        if self.share <= 0.0:
            return False
        self._credit = min(self._credit + self.share * n, float(max(n, 1)))  # no unbounded banking
        if self._credit < n or self.decoding + n > self.threads:
            return False
        self._credit -= n
        return True


def decode_batch_gpu(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """Decode JPEGs with nvJPEG in one batched call and resize/crop them on ``device``.

    Raises:
        RuntimeError: nvJPEG refused the batch (the caller falls back to the CPU path,
            which names the offending image).
    """
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return list(gpu_resize_crop_many(decode_jpegs(encoded, device)))
