"""Payload photos: real samples at the sizes asked for, generated lazily, cached, decodable."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loadtest import _payloads


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LOCUST_PAYLOAD_CACHE", str(tmp_path))
    _payloads.photo_set.cache_clear()
    return tmp_path


def test_sizes_parse_by_name_or_wxh() -> None:
    assert _payloads.parse_size("VGA") == ("vga", (640, 480))
    assert _payloads.parse_size("12mp") == ("12mp", (4000, 3000))
    assert _payloads.parse_size("800x600") == ("800x600", (800, 600))
    assert _payloads.parse_sizes("vga, 12mp") == ["vga", "12mp"]
    for bad in ("huge", "10x10", "640x", ""):
        with pytest.raises(_payloads.PayloadError):
            _payloads.parse_sizes(bad)


def test_photos_are_bundled_samples_not_downloads() -> None:
    from importlib import resources

    for name in _payloads.BUNDLED_PHOTOS:
        assert (resources.files("skimage.data") / name).is_file(), f"{name} is not inside the scikit-image wheel"


def test_only_the_sizes_asked_for_are_generated_and_then_reused(cache: Path) -> None:
    photos = _payloads.photo_set("vga")
    assert len(photos) == len(_payloads.BUNDLED_PHOTOS)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == len(photos) and all("640x480" in name for name in files)
    for photo in photos:
        with Image.open(io.BytesIO(photo.jpeg)) as image:
            assert image.format == "JPEG" and image.size == (640, 480)
        assert len(set(np.asarray(Image.open(io.BytesIO(photo.jpeg))).ravel()[:5000].tolist())) > 50  # a photo
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    _payloads.photo_set.cache_clear()
    assert _payloads.photo_set("vga") == photos
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes


def test_twelve_megapixels_weigh_like_a_camera_jpeg(cache: Path) -> None:
    photo = _payloads.load_photo("astronaut.png", "12mp")
    with Image.open(io.BytesIO(photo.jpeg)) as image:
        assert image.size == (4000, 3000)
    assert 1_500_000 < len(photo.jpeg) < 8_000_000


def test_tensor_preprocessing_matches_the_input_contract(cache: Path) -> None:
    photo = _payloads.load_photo("chelsea.png", "hd")
    pixels = photo.tensor("uint8")
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.uint8
    normalised = photo.tensor("fp32")
    assert normalised.dtype == np.float32
    expected = (pixels[0].astype(np.float32) / 255 - 0.485) / 0.229
    np.testing.assert_allclose(normalised[0], expected, rtol=1e-5, atol=1e-5)
    assert photo.tensor("fp16").dtype == np.float16


def test_synthetic_stand_in_when_a_sample_is_missing(cache: Path) -> None:
    photo = _payloads.load_photo("not-a-sample.png", "vga")
    with Image.open(io.BytesIO(photo.jpeg)) as image:
        assert image.size == (640, 480)
