"""Offline optimization of torchvision DenseNet-121 into checked, servable variants."""

from __future__ import annotations


class OptimizeError(Exception):
    """Base class of every error the optimize stage raises on purpose."""


class WeightsError(OptimizeError):
    """Weights could not be obtained (offline, a bad path, a bad state dict)."""


class FidelityError(OptimizeError):
    """A built variant strays from the FP32 reference beyond its tolerance."""


class BuildError(OptimizeError):
    """A variant could not be built on this machine."""
