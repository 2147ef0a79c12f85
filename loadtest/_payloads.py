"""Payload photographs for the load test: real photos at several sizes, JPEG-encoded and cached.

The photos are scikit-image's bundled samples (files inside the installed package,
never fetched with pooch), cropped to the target aspect ratio and resized. A little
sensor-like grain is added after upscaling so that a 12 MP JPEG weighs what a camera's
does (a few MB) instead of compressing to a smooth blur. Each size is generated only
when asked for and cached on disk, keyed by its settings, so workers started by
``--processes`` share one copy; writes are atomic.

This module never imports locust, kserve or model_server.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import io
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from optimize.registry import CROP_SIZE, IMAGENET_MEAN, IMAGENET_STD, RESIZE_SIZE

logger = logging.getLogger(__name__)

#: Named sizes (width, height), landscape. VGA up to a 12 MP camera frame.
SIZES: dict[str, tuple[int, int]] = {
    "vga": (640, 480),
    "hd": (1280, 720),
    "fhd": (1920, 1080),
    "5mp": (2592, 1944),
    "4k": (3840, 2160),
    "12mp": (4000, 3000),
}
#: scikit-image sample photographs shipped inside the wheel (not the pooch-fetched ones).
BUNDLED_PHOTOS: tuple[str, ...] = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
JPEG_QUALITY = 90
#: Bumped whenever generation changes, so stale cache entries are never reused.
_GENERATOR_VERSION = 2
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


class PayloadError(ValueError):
    """Raised for an unknown size or when no source photo can be loaded."""


@dataclasses.dataclass(frozen=True)
class Photo:
    """One encoded photo of the payload set.

    Attributes:
        source: The sample it was made from (file name).
        size: Its size label (``vga``, ``12mp`` or ``WxH``).
        width: Pixel width.
        height: Pixel height.
        jpeg: The JPEG bytes sent on the wire.
    """

    source: str
    size: str
    width: int
    height: int
    jpeg: bytes

    @functools.cached_property
    def b64(self) -> str:
        """Base64 text of the JPEG, for v1 and v2 JSON BYTES bodies."""
        return base64.b64encode(self.jpeg).decode("ascii")

    def tensor(self, dtype: str = "uint8") -> np.ndarray:
        """Client-side preprocessing for tensor requests: resize 256, center-crop 224, CHW.

        Args:
            dtype: ``uint8`` (RGB 0-255, the server normalises) or ``fp32``/``fp16``
                (ImageNet mean/std normalised model input).

        Returns:
            An array of shape ``[3, 224, 224]``.
        """
        return _tensor(self.jpeg, dtype)


def parse_size(label: str) -> tuple[str, tuple[int, int]]:
    """Return ``(label, (width, height))`` for a size name (``vga``) or ``WxH``.

    Raises:
        PayloadError: For an unknown name or a malformed ``WxH``.
    """
    key = label.strip().lower()
    if key in SIZES:
        return key, SIZES[key]
    if match := _SIZE_RE.match(key):
        width, height = int(match.group(1)), int(match.group(2))
        if width >= 32 and height >= 32:
            return key, (width, height)
    raise PayloadError(f"unknown image size {label!r}: use one of {', '.join(SIZES)} or WxH (at least 32x32)")


def parse_sizes(text: str) -> list[str]:
    """Split a comma-separated list of sizes and validate each; returns the labels."""
    labels = [parse_size(part)[0] for part in text.split(",") if part.strip()]
    if not labels:
        raise PayloadError("no image size given")
    return labels


def cache_dir() -> Path:
    """Folder of generated JPEGs (``$LOCUST_PAYLOAD_CACHE`` or the system temp dir)."""
    root = os.environ.get("LOCUST_PAYLOAD_CACHE") or os.path.join(tempfile.gettempdir(), "densenet-loadtest-payloads")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_source(name: str) -> Image.Image:
    try:
        with resources.as_file(resources.files("skimage.data") / name) as path:
            with Image.open(path) as image:
                return image.convert("RGB")
    except (ModuleNotFoundError, FileNotFoundError, OSError) as e:
        logger.debug("sample %s unavailable (%s), using a synthetic photo", name, e)
    return _synthetic_source(name)


def _synthetic_source(name: str) -> Image.Image:
    """A deterministic photo-like stand-in (smooth shapes plus texture) when scikit-image is absent."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    height, width = 480, 640
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for channel in range(3):
        fx, fy = rng.uniform(0.005, 0.03, 2).tolist()
        phase = rng.uniform(0, 6.28)
        image[..., channel] = 127 + 100 * np.sin(xx * fx + phase) * np.cos(yy * fy)
    for _ in range(12):
        cx, cy, radius = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < radius**2
        image[mask] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _render(source: Image.Image, width: int, height: int, seed: int) -> Image.Image:
    # Crop to the target aspect ratio first, so nothing is stretched.
    src_w, src_h = source.size
    target_ratio = width / height
    if src_w / src_h > target_ratio:
        crop_w, crop_h = round(src_h * target_ratio), src_h
    else:
        crop_w, crop_h = src_w, round(src_w / target_ratio)
    left, top = (src_w - crop_w) // 2, (src_h - crop_h) // 2
    image = source.crop((left, top, left + crop_w, top + crop_h)).resize((width, height), Image.Resampling.BICUBIC)
    if width * height > src_w * src_h:
        # Grain: an upscaled sample would compress far better than a real photo of that size.
        rng = np.random.default_rng(seed)
        pixels = np.asarray(image, dtype=np.int16)
        pixels += rng.integers(-10, 11, size=pixels.shape, dtype=np.int16)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def _cache_path(source: str, width: int, height: int) -> Path:
    stem = Path(source).stem
    return cache_dir() / f"v{_GENERATOR_VERSION}-{stem}-{width}x{height}-q{JPEG_QUALITY}.jpg"


def load_photo(source: str, size: str) -> Photo:
    """Return one sample photo at one size, generating and caching it on first use."""
    label, (width, height) = parse_size(size)
    path = _cache_path(source, width, height)
    if path.is_file():
        jpeg = path.read_bytes()
    else:
        seed = int(hashlib.sha256(f"{source}{width}x{height}".encode()).hexdigest()[:8], 16)
        image = _render(_load_source(source), width, height, seed)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        jpeg = buffer.getvalue()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
        with os.fdopen(fd, "wb") as handle:
            handle.write(jpeg)
        os.replace(tmp, path)  # atomic: concurrent workers never read a half-written file
        logger.info("generated payload %s (%s bytes)", path.name, len(jpeg))
    return Photo(source=source, size=label, width=width, height=height, jpeg=jpeg)


@functools.cache
def photo_set(size: str, sources: Sequence[str] = BUNDLED_PHOTOS) -> tuple[Photo, ...]:
    """All sample photos at one size (cached per process)."""
    return tuple(load_photo(source, size) for source in sources)


@functools.lru_cache(maxsize=64)
def _tensor(jpeg: bytes, dtype: str) -> np.ndarray:
    with Image.open(io.BytesIO(jpeg)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    scale = RESIZE_SIZE / min(width, height)
    image = image.resize(
        (max(RESIZE_SIZE, round(width * scale)), max(RESIZE_SIZE, round(height * scale))), Image.Resampling.BILINEAR
    )
    width, height = image.size
    left, top = (width - CROP_SIZE) // 2, (height - CROP_SIZE) // 2
    image = image.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    if dtype == "uint8":
        return np.ascontiguousarray(pixels)
    if dtype not in ("fp32", "fp16"):
        raise PayloadError(f"unknown tensor dtype {dtype!r}: use uint8, fp32 or fp16")
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
    normalised = (pixels.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(normalised.astype(np.float16 if dtype == "fp16" else np.float32))
