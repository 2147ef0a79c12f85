"""The variant registry: what each optimized DenseNet-121 variant *is* (standard library only).

This module is the single source of truth for variants. Manifests, scripts, Locust
tags, CSV rows and artifact folders all use a variant's ``slug``; nothing else
copies its settings. It is also the contract module that ``model_server`` may import,
so it must stay importable without torch.

Modelled on torchvision's weights API: one frozen record per variant inside an
``Enum`` (``Variants``), with a ``DEFAULT`` and ``base`` links for derived variants.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

ARCH = "densenet121"
#: Artifact manifest file name inside ``DIR/<slug>/``.
MANIFEST_NAME = "variant.json"
#: Bumped when the manifest's fields change incompatibly.
MANIFEST_SCHEMA_VERSION = 1

#: Input contract shared by every variant (torchvision's ImageNet eval transform).
RESIZE_SIZE = 256
CROP_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NUM_CLASSES = 1000

_SLUG_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: Knative service names are DNS-1035 labels of at most 63 characters; revision
#: suffixes take some of that, so slugs stay well below it.
MAX_SLUG_LEN = 48


class RegistryError(ValueError):
    """Raised for an unknown or malformed variant."""


class Technique(enum.StrEnum):
    """How a variant is derived from the FP32 eager baseline."""

    BASELINE = "baseline"
    HALF_PRECISION = "half-precision"
    AUTOCAST = "autocast"
    CHANNELS_LAST = "channels-last"
    TORCHSCRIPT = "torchscript"
    AOT_INDUCTOR = "aot-inductor"
    ONNX = "onnx"
    DYNAMIC_QUANT = "dynamic-quantization"
    STATIC_QUANT = "static-quantization"
    UNSTRUCTURED_PRUNE = "unstructured-pruning"
    STRUCTURED_PRUNE = "structured-pruning"
    SEMI_STRUCTURED_SPARSE = "semi-structured-sparsity"


class Precision(enum.StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"


class Runtime(enum.StrEnum):
    """How ``model_server`` loads and runs an artifact."""

    TORCH_EAGER = "torch-eager"
    TORCHSCRIPT = "torchscript"
    AOTI = "aoti"
    ONNXRUNTIME = "onnxruntime"


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Fidelity a variant must keep against the FP32 reference on the sample photos.

    Attributes:
        min_top1_agreement: fraction of images whose top-1 class equals the reference's.
        min_top5_overlap: mean fraction of the reference top-5 found in the variant's top-5.
        max_abs_logit_err: largest allowed absolute logit difference.
    """

    min_top1_agreement: float = 1.0
    min_top5_overlap: float = 0.8
    max_abs_logit_err: float = 0.05


@dataclasses.dataclass(frozen=True)
class Variant:
    """One optimized variant of DenseNet-121.

    Attributes:
        slug: DNS-1123 name used everywhere (artifact folder, image tag, service name).
        technique: how it is derived.
        precision: numeric precision of its compute.
        runtime: what ``model_server`` loads it with.
        base: slug of the variant it is derived from (``None`` for the baseline).
        channels_last: whether activations and weights use NHWC memory format.
        devices: devices the artifact can be built and run on (``cpu``, ``cuda``).
        deployable: deployed by ``deploy-knative.sh`` when no variant is named.
        tolerance: fidelity it must keep against the FP32 reference.
        options: technique-specific settings (read-only mapping).
        description: one line for ``python -m optimize list``.
    """

    slug: str
    technique: Technique
    precision: Precision
    runtime: Runtime
    base: str | None
    description: str
    channels_last: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    deployable: bool = True
    tolerance: Tolerance = Tolerance()
    options: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.options, MappingProxyType):
            object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (enums as their values)."""
        return {
            "slug": self.slug,
            "technique": self.technique.value,
            "precision": self.precision.value,
            "runtime": self.runtime.value,
            "base": self.base,
            "channels_last": self.channels_last,
            "devices": list(self.devices),
            "deployable": self.deployable,
            "tolerance": dataclasses.asdict(self.tolerance),
            "options": dict(self.options),
            "description": self.description,
        }


# Tolerances are on logits of the full 1000-way classifier; FP16 keeps ~3 decimal
# digits, so its logit error is a few 1e-2 on ImageNet weights.
_FP16_TOL = Tolerance(min_top1_agreement=1.0, min_top5_overlap=0.8, max_abs_logit_err=0.25)


class Variants(enum.Enum):
    """Every variant the product knows. Member values are unique frozen records."""

    EAGER_FP32 = Variant(
        slug="densenet121-eager-fp32",
        technique=Technique.BASELINE,
        precision=Precision.FP32,
        runtime=Runtime.TORCH_EAGER,
        base=None,
        description="torchvision DenseNet-121, eager FP32: the reference every variant is checked against",
        tolerance=Tolerance(min_top1_agreement=1.0, min_top5_overlap=1.0, max_abs_logit_err=1e-3),
    )
    EAGER_FP16_CL = Variant(
        slug="densenet121-eager-fp16-cl",
        technique=Technique.HALF_PRECISION,
        precision=Precision.FP16,
        runtime=Runtime.TORCH_EAGER,
        base="densenet121-eager-fp32",
        channels_last=True,
        description="pure FP16 weights and activations, channels-last (NHWC) memory format",
        tolerance=_FP16_TOL,
    )

    @property
    def variant(self) -> Variant:
        value: Variant = self.value
        return value


#: What a bare ``deploy-knative.sh`` or ``optimize build`` uses first.
DEFAULT = Variants.EAGER_FP32
REFERENCE_SLUG = Variants.EAGER_FP32.value.slug


def all_variants() -> list[Variant]:
    """All registered variants, in registry order."""
    return [member.variant for member in Variants]


def slugs() -> list[str]:
    return [v.slug for v in all_variants()]


def deployable_variants() -> list[Variant]:
    return [v for v in all_variants() if v.deployable]


def get(slug: str) -> Variant:
    """Look a variant up by slug.

    Raises:
        RegistryError: naming the bad slug and the valid ones.
    """
    for v in all_variants():
        if v.slug == slug:
            return v
    raise RegistryError(f"unknown variant {slug!r}; valid variants: {', '.join(slugs())}")


def is_valid_slug(slug: str) -> bool:
    """DNS-1123 label (and DNS-1035: starts with a letter) no longer than ``MAX_SLUG_LEN``."""
    return bool(_SLUG_RE.match(slug)) and slug[0].isalpha() and len(slug) <= MAX_SLUG_LEN


def lineage(slug: str) -> Iterator[Variant]:
    """The variant, then its base, and so on down to the baseline."""
    seen: set[str] = set()
    current: str | None = slug
    while current is not None:
        if current in seen:
            raise RegistryError(f"variant base cycle at {current!r}")
        seen.add(current)
        v = get(current)
        yield v
        current = v.base
