"""The small set of real photographs every variant is checked on (shipped with scikit-image)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from model_server.preprocess import decode_and_crop

#: Colour photographs bundled inside scikit-image's wheel (no download at run time).
SAMPLE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)


def sample_paths() -> list[Path]:
    root = Path(str(resources.files("skimage"))) / "data"
    paths = [root / name for name in SAMPLE_PHOTOS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image does not ship {', '.join(missing)} in {root}")
    return paths


def sample_batch(count: int | None = None) -> torch.Tensor:
    """uint8 ``[N,3,224,224]`` crops of the sample photos, preprocessed as the server does."""
    paths = sample_paths()[:count] if count else sample_paths()
    return torch.stack([decode_and_crop(p.read_bytes()) for p in paths])
