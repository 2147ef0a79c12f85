"""Where the reference DenseNet-121 weights come from: ImageNet, a local file, or a seeded random init."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from optimize import WeightsError

log = logging.getLogger(__name__)

DEFAULT_SEED = 0
IMAGENET = "imagenet"
RANDOM = "random"


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where weights came from, recorded in every ``variant.json``.

    Attributes:
        kind: ``imagenet``, ``random`` or ``file``.
        name: torchvision weights enum name, the file path, or ``random``.
        seed: the seed of a random init, else ``None``.
        sha256: digest of the loaded file (``file`` and ``imagenet``), else ``None``.
    """

    kind: str
    name: str
    seed: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def categories() -> list[str]:
    """ImageNet class names from torchvision's weight metadata (no download needed)."""
    return list(torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.meta["categories"])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_reference(weights: str, *, seed: int = DEFAULT_SEED) -> tuple[nn.Module, WeightsSource]:
    """Build the FP32 eager DenseNet-121 that every variant is derived from and checked against.

    Args:
        weights: ``imagenet`` (torchvision's download and cache), ``random`` (seeded init),
            or a path to a state dict saved with ``torch.save``.
        seed: seed of the ``random`` init.

    Returns:
        The model in eval mode on the CPU, and where its weights came from.

    Raises:
        WeightsError: with what went wrong and what to do.
    """
    if weights == RANDOM:
        torch.manual_seed(seed)
        model = torchvision.models.densenet121(weights=None)
        return model.eval(), WeightsSource(kind="random", name="random", seed=seed)
    if weights == IMAGENET:
        enum = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
        try:
            model = torchvision.models.densenet121(weights=enum)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            hub = torch.hub.get_dir()
            raise WeightsError(
                f"could not download ImageNet weights {enum.url} ({e}). Offline? Put the file in "
                f"{hub}/checkpoints/, pass --weights PATH to a local state dict, or use --weights random."
            ) from e
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
        digest = _sha256(cached) if cached.is_file() else None
        return model.eval(), WeightsSource(kind="imagenet", name=f"DenseNet121_Weights.{enum.name}", sha256=digest)
    path = Path(weights)
    if not path.is_file():
        raise WeightsError(f"--weights {weights!r} is neither 'imagenet', 'random' nor an existing file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise WeightsError(f"{path} is not a loadable state dict (weights_only=True): {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    model = torchvision.models.densenet121(weights=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not match torchvision's densenet121: {e}") from e
    return model.eval(), WeightsSource(kind="file", name=str(path), sha256=_sha256(path))
