"""KServe predictor for DenseNet-121 artifacts built by ``optimize``: load, warm up, decode, batch, run."""

from __future__ import annotations


class ServerError(Exception):
    """Base class of every error the predictor raises on purpose."""


class ArtifactError(ServerError):
    """An artifact folder is missing, malformed, or fails its checksum."""


class BadInput(ServerError):
    """A request the predictor cannot serve as sent; mapped to HTTP 400 / gRPC INVALID_ARGUMENT."""


class PayloadTooLarge(BadInput):
    """A request, image or batch over the configured limits; HTTP 413 / gRPC RESOURCE_EXHAUSTED."""


class Overloaded(ServerError):
    """The batch queue is full; HTTP 503 with Retry-After / gRPC RESOURCE_EXHAUSTED."""


class DeadlineExceeded(ServerError):
    """A request could no longer meet its deadline and was dropped before reaching the device."""
