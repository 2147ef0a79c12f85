"""Images on the request path, without torch: the JPEG checks, the CPU decode, the payloads.

What a front end does with an image before the device process sees it. A JPEG nvJPEG can take
is only *checked* here (its frame header, against the limits) and travels as bytes in a
:class:`JpegBatch`; anything else is decoded and cropped by PIL to a uint8 ``[3, 224, 224]``
numpy array. Nothing here imports torch: an HTTP front end of ``--frontends N`` never loads it
(seconds of start-up and hundreds of MB of memory per process), and the device side
(``model_server.preprocess``, ``model_server.pipeline``) turns payloads into tensors.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from model_server import BadInput, PayloadTooLarge
from model_server.config import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from optimize.registry import CROP_SIZE, RESIZE_SIZE

if TYPE_CHECKING:
    import torch

    from model_server.nvjpeg import Headers

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
) -> np.ndarray:
    """Decode one encoded image (JPEG, PNG, WebP, ...) to a uint8 ``[3, 224, 224]`` crop (a numpy array).

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


def _resize_crop(img: Image.Image) -> np.ndarray:
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
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # CHW, as the model takes it


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


def gpu_frame(data: bytes, *, max_pixels: int, max_bytes: int) -> int | None:
    """The start-of-frame marker (0xC0 baseline, 0xC1 extended, 0xC2 progressive) of an image nvJPEG
    should take: a Huffman-coded JPEG, RGB or grayscale, within the limits; None for any other.

    Only the frame header is read (:func:`jpeg_frame`), so the pixel limit is enforced before
    any GPU memory is spent. Anything else (CMYK, lossless or arithmetic-coded JPEG, PNG,
    corrupt headers) goes to :func:`decode_and_crop`, which decodes it or raises the precise error.
    The marker travels with the JPEG (:attr:`JpegBatch.frames`): the device's hardware decoder then
    asks nvJPEG whether it takes a baseline JPEG once per kind of image, not once per image.
    """
    if len(data) > max_bytes:
        return None
    frame = jpeg_frame(data)
    if frame is None:
        return None
    sof, w, h, components = frame
    ok = (
        sof in _SOF_NVJPEG
        and components in (1, 3)
        and 0 < w * h <= max_pixels
        and max(w, h) <= MAX_ASPECT_RATIO * min(w, h)
    )
    return sof if ok else None


def gpu_decodable(data: bytes, *, max_pixels: int, max_bytes: int) -> bool:
    """Whether nvJPEG should take this image (:func:`gpu_frame`)."""
    return gpu_frame(data, max_pixels=max_pixels, max_bytes=max_bytes) is not None


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


@dataclasses.dataclass
class JpegBatch:
    """A request's JPEGs, checked (size, pixels, mode) but not yet decoded.

    ``buffer``, when set, is the images back to back in one writable buffer (what the IPC
    frame delivered: a bytearray, or a view of a reused one): the decode stage then makes one
    tensor of it and splits it into views instead of copying every image into a bytearray of its own.
    ``frames``, when set, holds each image's start-of-frame marker as the front end read it
    (:func:`gpu_frame`; 0: not known).
    ``headers``, when set, is what nvJPEG read of the images' headers when the request reached the
    device process (``--nvjpeg_early_headers``), and where in ``buffer`` each image lies.
    """

    images: Sequence[bytes | bytearray | memoryview]
    buffer: bytearray | memoryview | None = None
    frames: bytes | None = None
    headers: Headers | None = None

    def __len__(self) -> int:
        return len(self.images)

    def encoded(self) -> list[torch.Tensor]:
        """The images as 1-D uint8 CPU tensors, as nvJPEG takes them (views of ``buffer`` when set).

        Called by the device side only, which has torch loaded already.
        """
        import torch

        if self.buffer is not None:
            whole = torch.frombuffer(self.buffer, dtype=torch.uint8)
            if len(self.images) == 1:
                return [whole]
            return list(torch.split(whole, [len(d) for d in self.images]))
        # torch.frombuffer wants a writable buffer (bytes would warn): one copy each.
        return [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in self.images]


#: What a request hands the batcher: pixels (a uint8 or float ``[n,3,224,224]`` array; a tensor on
#: the device side) or JPEGs for nvJPEG.
Payload = Union["np.ndarray", "torch.Tensor", JpegBatch]


def payload_size(p: Payload) -> int:
    """Images in a payload."""
    return len(p) if isinstance(p, JpegBatch) else int(p.shape[0])
