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
        random_tolerance: the bound used instead when the reference has seeded random weights
            (tests, offline runs): random-init logits have std ~0.7 and top-1 margins of
            0.03-0.5, so approximations that keep ImageNet predictions flip them; ``None``
            means the same as ``tolerance``.
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
    random_tolerance: Tolerance | None = None
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
            "random_tolerance": dataclasses.asdict(self.random_tolerance) if self.random_tolerance else None,
            "options": dict(self.options),
            "description": self.description,
        }


# Tolerances are on logits of the full 1000-way classifier, checked on the eight sample
# photos (so top-1 agreement moves in steps of 1/8). Why each bound is what it is
# (the README has the numbers measured with random and ImageNet weights):
#
# * FP32 re-layouts and re-compilations (channels-last, TorchScript, ONNX FP32) change only
#   the order of floating-point sums: logits stay within ~1e-4, so 1e-3 is kept.
# * FP16 keeps ~3 decimal digits: logit error is a few 1e-2 on ImageNet weights.
# * BF16 keeps ~2: errors of a few 1e-1 on ImageNet weights are normal, and one of eight
#   photos whose top-2 logits are that close may swap.
# * INT8 (8-bit weights and activations) and pruning are approximations by design. Their
#   gate catches a broken artifact (NaN, wrong classes, a scrambled layout), not a small drift:
#   top-1 and top-5 must stay mostly intact. The seeded random weights the tests use have
#   logits of std ~1 with top-1 margins of ~0.25, far below ImageNet weights' margins, so their
#   bounds are those random weights pass too; real accuracy comes from ``--val-dir``.
# * Structured pruning without fine-tuning changes the function itself (a third of the
#   channels are gone): its gate only bounds top-5 overlap loosely; accuracy after the
#   optional BN recalibration / distillation (``--finetune-dir``) is what to read.
_FP32_TOL = Tolerance(min_top1_agreement=1.0, min_top5_overlap=1.0, max_abs_logit_err=1e-3)
_FP16_TOL = Tolerance(min_top1_agreement=1.0, min_top5_overlap=0.8, max_abs_logit_err=0.25)
_BF16_TOL = Tolerance(min_top1_agreement=0.875, min_top5_overlap=0.8, max_abs_logit_err=1.0)
_INT8_TOL = Tolerance(min_top1_agreement=0.75, min_top5_overlap=0.6, max_abs_logit_err=2.5)
_UNSTRUCTURED_TOL = Tolerance(min_top1_agreement=0.75, min_top5_overlap=0.6, max_abs_logit_err=2.5)
_STRUCTURED_TOL = Tolerance(min_top1_agreement=0.0, min_top5_overlap=0.1, max_abs_logit_err=50.0)
# With random weights: pruning must keep most of the top-5 and a logit error below the
# logits' own spread (a scrambled artifact has top-5 overlap ~0); structured pruning only
# finite logits of the right shape.
_UNSTRUCTURED_RANDOM_TOL = Tolerance(min_top1_agreement=0.0, min_top5_overlap=0.6, max_abs_logit_err=1.0)
_STRUCTURED_RANDOM_TOL = Tolerance(min_top1_agreement=0.0, min_top5_overlap=0.0, max_abs_logit_err=10.0)
_SPARSE24_TOL = Tolerance(min_top1_agreement=0.75, min_top5_overlap=0.6, max_abs_logit_err=2.5)

_FP32 = "densenet121-eager-fp32"
_FP16_CL = "densenet121-eager-fp16-cl"
_ONNX_FP32 = "densenet121-onnx-fp32"


class Variants(enum.Enum):
    """Every variant the product knows. Member values are unique frozen records."""

    EAGER_FP32 = Variant(
        slug=_FP32,
        technique=Technique.BASELINE,
        precision=Precision.FP32,
        runtime=Runtime.TORCH_EAGER,
        base=None,
        description="torchvision DenseNet-121, eager FP32: the reference every variant is checked against",
        tolerance=_FP32_TOL,
    )
    EAGER_FP16_CL = Variant(
        slug=_FP16_CL,
        technique=Technique.HALF_PRECISION,
        precision=Precision.FP16,
        runtime=Runtime.TORCH_EAGER,
        base=_FP32,
        channels_last=True,
        description="pure FP16 weights and activations, channels-last (NHWC) memory format",
        tolerance=_FP16_TOL,
    )
    EAGER_FP16_CL_GRAPHS = Variant(
        slug="densenet121-eager-fp16-cl-graphs",
        technique=Technique.HALF_PRECISION,
        precision=Precision.FP16,
        runtime=Runtime.TORCH_EAGER,
        base=_FP16_CL,
        channels_last=True,
        devices=("cuda",),
        description="FP16 channels-last eager, one CUDA graph captured per batch bucket at start-up: "
        "no compiler, no per-kernel launch cost (batch 1: 2.1 ms vs 13 ms eager on an H100)",
        tolerance=_FP16_TOL,
        options={"cuda_graphs": True},
    )
    EAGER_FP32_CL = Variant(
        slug="densenet121-eager-fp32-cl",
        technique=Technique.CHANNELS_LAST,
        precision=Precision.FP32,
        runtime=Runtime.TORCH_EAGER,
        base=_FP32,
        channels_last=True,
        description="FP32 with channels-last (NHWC) weights and activations",
        tolerance=_FP32_TOL,
    )
    EAGER_BF16_CL = Variant(
        slug="densenet121-eager-bf16-cl",
        technique=Technique.HALF_PRECISION,
        precision=Precision.BF16,
        runtime=Runtime.TORCH_EAGER,
        base=_FP32,
        channels_last=True,
        description="pure BF16 weights and activations, channels-last (slow on CPUs without AVX512-BF16/AMX)",
        tolerance=_BF16_TOL,
    )
    EAGER_FP16_AMP = Variant(
        slug="densenet121-eager-fp16-amp",
        technique=Technique.AUTOCAST,
        precision=Precision.FP16,
        runtime=Runtime.TORCH_EAGER,
        base=_FP32,
        channels_last=True,
        devices=("cuda",),
        description="FP32 weights, torch.autocast(float16) on the GPU (AMP), channels-last",
        tolerance=_FP16_TOL,
        options={"autocast": True},
    )
    EAGER_BF16_AMP = Variant(
        slug="densenet121-eager-bf16-amp",
        technique=Technique.AUTOCAST,
        precision=Precision.BF16,
        runtime=Runtime.TORCH_EAGER,
        base=_FP32,
        channels_last=True,
        description="FP32 weights, torch.autocast(bfloat16) (AMP), channels-last",
        tolerance=_BF16_TOL,
        options={"autocast": True},
    )
    TORCHSCRIPT_FP32 = Variant(
        slug="densenet121-torchscript-fp32",
        technique=Technique.TORCHSCRIPT,
        precision=Precision.FP32,
        runtime=Runtime.TORCHSCRIPT,
        base=_FP32,
        description="torch.jit.script (scripting works for torchvision's DenseNet), frozen for inference",
        tolerance=_FP32_TOL,
        options={"method": "script", "freeze": True},
    )
    ONNX_FP32 = Variant(
        slug=_ONNX_FP32,
        technique=Technique.ONNX,
        precision=Precision.FP32,
        runtime=Runtime.ONNXRUNTIME,
        base=_FP32,
        description="ONNX (dynamic batch) on ONNX Runtime: CUDA EP (TensorRT EP if present) on a GPU, else CPU EP",
        tolerance=_FP32_TOL,
        options={"opset": 17},
    )
    ONNX_FP16 = Variant(
        slug="densenet121-onnx-fp16",
        technique=Technique.ONNX,
        precision=Precision.FP16,
        runtime=Runtime.ONNXRUNTIME,
        base=_ONNX_FP32,
        description="ONNX exported from the FP16 model (FP16 weights and I/O) on ONNX Runtime",
        tolerance=_FP16_TOL,
        options={"opset": 17},
    )
    ONNX_INT8_DYNAMIC = Variant(
        slug="densenet121-onnx-int8-dynamic",
        technique=Technique.DYNAMIC_QUANT,
        precision=Precision.INT8,
        runtime=Runtime.ONNXRUNTIME,
        base=_ONNX_FP32,
        devices=("cpu",),
        deployable=False,
        description="ONNX Runtime dynamic quantisation: INT8 weights, activations quantised per call (CPU)",
        tolerance=_INT8_TOL,
        options={"opset": 17, "per_channel": True},
    )
    ONNX_INT8_STATIC = Variant(
        slug="densenet121-onnx-int8-static",
        technique=Technique.STATIC_QUANT,
        precision=Precision.INT8,
        runtime=Runtime.ONNXRUNTIME,
        base=_ONNX_FP32,
        devices=("cpu",),
        deployable=False,
        description="ONNX Runtime static post-training quantisation (QDQ, per-channel, calibrated) for the CPU EP",
        tolerance=_INT8_TOL,
        options={"opset": 17, "per_channel": True, "calibration": "minmax"},
    )
    ONNX_INT8_STATIC_FOLDED = Variant(
        slug="densenet121-onnx-int8-static-folded",
        technique=Technique.STATIC_QUANT,
        precision=Precision.INT8,
        runtime=Runtime.ONNXRUNTIME,
        base="densenet121-onnx-int8-static",
        devices=("cpu",),
        deployable=False,
        description="static INT8 QDQ after rewriting the batch norms on DenseNet's concatenations (scale folded "
        "into the next conv, shift a quantised Add): NHWC INT8 end to end on ORT's CPU EP, no layout transposes",
        tolerance=_INT8_TOL,
        options={"opset": 17, "per_channel": True, "calibration": "minmax", "fold_concat_bn": True},
    )
    PRUNED_L1_20 = Variant(
        slug="densenet121-pruned-l1-20",
        technique=Technique.UNSTRUCTURED_PRUNE,
        precision=Precision.FP32,
        runtime=Runtime.TORCH_EAGER,
        base=_FP32,
        deployable=False,
        description="global L1 unstructured pruning of conv and linear weights, stored as bitmask + values",
        tolerance=_UNSTRUCTURED_TOL,
        random_tolerance=_UNSTRUCTURED_RANDOM_TOL,
        options={"amount": 0.2},
    )
    PRUNED_CHANNELS_30 = Variant(
        slug="densenet121-pruned-channels-30",
        technique=Technique.STRUCTURED_PRUNE,
        precision=Precision.FP32,
        runtime=Runtime.TORCH_EAGER,
        base=_FP32,
        deployable=False,
        description="structured channel pruning (Torch-Pruning dependency graph, through the concatenations)",
        tolerance=_STRUCTURED_TOL,
        random_tolerance=_STRUCTURED_RANDOM_TOL,
        options={"ratio": 0.3, "round_to": 8},
    )
    PRUNED_CHANNELS_30_FP16_CL_GRAPHS = Variant(
        slug="densenet121-pruned-channels-30-fp16-cl-graphs",
        technique=Technique.STRUCTURED_PRUNE,
        precision=Precision.FP16,
        runtime=Runtime.TORCH_EAGER,
        base="densenet121-eager-fp16-cl-graphs",
        channels_last=True,
        devices=("cuda",),
        deployable=False,
        description="the channel-pruned network served like its unpruned base on a GPU: FP16 channels-last, "
        "one CUDA graph per bucket (with launches gone, the removed FLOPs show at batch 32)",
        tolerance=_STRUCTURED_TOL,
        random_tolerance=_STRUCTURED_RANDOM_TOL,
        options={"ratio": 0.3, "round_to": 8, "cuda_graphs": True},
    )
    AOTI_FP16_CL = Variant(
        slug="densenet121-aoti-fp16-cl",
        technique=Technique.AOT_INDUCTOR,
        precision=Precision.FP16,
        runtime=Runtime.AOTI,
        base=_FP16_CL,
        channels_last=True,
        devices=("cuda",),
        description="torch.export + AOTInductor package per batch bucket (kernels inside), CUDA graphs per bucket",
        tolerance=_FP16_TOL,
        options={"max_autotune": True, "conv_1x1_as_mm": True, "epilogue_fusion": True, "cuda_graphs": True},
    )
    AOTI_FP16_CL_DYNAMIC = Variant(
        slug="densenet121-aoti-fp16-cl-dynamic",
        technique=Technique.AOT_INDUCTOR,
        precision=Precision.FP16,
        runtime=Runtime.AOTI,
        base=_FP16_CL,
        channels_last=True,
        devices=("cuda",),
        description="one AOTInductor package with a dynamic batch dimension for every bucket: one compile "
        "instead of one per bucket (no max-autotune), CUDA graphs per bucket at start-up",
        tolerance=_FP16_TOL,
        options={"dynamic_batch": True, "conv_1x1_as_mm": True, "epilogue_fusion": True, "cuda_graphs": True},
    )
    # The same package of an exact rewrite (``optimize/rewrites.py``): everything else as above.
    AOTI_FP16_CL_DYNAMIC_BLOCKBUF = dataclasses.replace(
        AOTI_FP16_CL_DYNAMIC,
        slug="densenet121-aoti-fp16-cl-dynamic-blockbuf",
        deployable=False,
        description="the dynamic AOTInductor package of an exact rewrite: each dense block's features written "
        "once into a block-wide buffer instead of concatenated per layer (fewer copy kernels)",
        options={**AOTI_FP16_CL_DYNAMIC.options, "block_buffer": True},
    )
    # The block-buffer rewrite with hand-written kernels (``optimize/kernels.py``): each layer's
    # norm + ReLU + 1x1 convolution + norm + ReLU in one Triton kernel reading the buffer once, its
    # 3x3 convolution in another writing straight into the buffer, and transitions pooling before
    # their convolution.
    AOTI_FP16_CL_DYNAMIC_FUSED = dataclasses.replace(
        AOTI_FP16_CL_DYNAMIC_BLOCKBUF,
        slug="densenet121-aoti-fp16-cl-dynamic-fused",
        description="the block-buffer rewrite's dynamic AOTInductor package with each layer's batch norm, ReLU, "
        "1x1 convolution, batch norm and ReLU fused into one Triton kernel and its 3x3 convolution in another "
        "writing into the block buffer (user-defined kernels exported in the package), and transitions pooling "
        "before their 1x1 convolution",
        options={
            **AOTI_FP16_CL_DYNAMIC_BLOCKBUF.options,
            "fused_bottleneck": True,
            "fused_conv": True,
            "pool_first": True,
            # Served with cuDNN timing its convolution algorithms at warm-up. H100, separate runs:
            # under stock compile this network's batch 128 read 5.51 ms without it and 5.25 with
            # it (stock's own 8.27 and 8.48); the package 1.048 / 22,621 img/s without, 1.006 ms /
            # 22,380 img/s with it (batch 1 / 128): kept for batch 1, within noise at 128.
            "cudnn_benchmark": True,
        },
    )
    # The channel-pruned network compiled like the dynamic AOTInductor package it is compared with
    # (its ``base``): launches and the compiler's epilogues the same on both sides, so what is left
    # between them is the removed channels. H100 (record ``issue4-pruned-aoti-s13``): 1.088x its
    # base at batch 32, 1.195x at batch 128, with 0.41x the GFLOPs.
    PRUNED_CHANNELS_30_AOTI = dataclasses.replace(
        PRUNED_CHANNELS_30_FP16_CL_GRAPHS,
        slug="densenet121-pruned-channels-30-aoti-dynamic",
        runtime=Runtime.AOTI,
        base="densenet121-aoti-fp16-cl-dynamic",
        description="the channel-pruned network as a dynamic AOTInductor package, compiled like its unpruned base "
        "(FP16 channels-last, CUDA graphs per bucket)",
        options={**PRUNED_CHANNELS_30_FP16_CL_GRAPHS.options, **AOTI_FP16_CL_DYNAMIC.options},
    )
    # The same with one bottleneck tensor per dense block that every layer's fused kernel writes
    # into (the 3x3 kernel reads it): the fastest GPU variant, and the deployed one of this family.
    # H100, one run with stock compile (record ``issue4-nofill-mids-s13``): batch 1 0.778 ms
    # (0.73x stock's), batch 128 28,402 img/s (1.86x) against the fused variant's 0.811 ms /
    # 25,738 img/s. No cuDNN timing at warm-up: every 3x3 convolution is the Triton kernel's, so
    # only the stem's 7x7 convolution would be timed, at a cost in start-up (#5's ``ready_s``).
    AOTI_FP16_CL_DYNAMIC_FUSED_MIDS = dataclasses.replace(
        AOTI_FP16_CL_DYNAMIC_FUSED,
        slug="densenet121-aoti-fp16-cl-dynamic-fused-mids",
        deployable=True,
        description="the fused variant with one bottleneck tensor per dense block, written by each layer's first "
        "kernel and read by its 3x3 kernel, instead of a new one per layer",
        options={**AOTI_FP16_CL_DYNAMIC_FUSED.options, "shared_bottleneck": True, "cudnn_benchmark": False},
    )
    # The channel-pruned network through the same rewrite and kernels as the fastest variant (its
    # base): two kernels a layer that read and write each channel once, so fewer channels are less
    # of what the forward spends its time on. The kernels take any channel count (masked tiles; each
    # layer's growth and bottleneck width its own). H100, paired rounds against its base at batch 32
    # (record ``issue4-final-s14``, both with tiles for batch 32): 1.201x (1.186-1.215); batch 128
    # 1.245x, 35,078 img/s = 2.31x stock. Session 14's records (all measured before the rename) name it
    # ``densenet121-pruned-channels-30-aoti-dynamic-fused-mids`` (54 characters: over ``MAX_SLUG_LEN``).
    PRUNED_CHANNELS_30_AOTI_FUSED_MIDS = dataclasses.replace(
        PRUNED_CHANNELS_30_AOTI,
        slug="densenet121-pruned-channels-30-fused-mids",
        base=AOTI_FP16_CL_DYNAMIC_FUSED_MIDS.slug,
        description="the channel-pruned network as the fused-mids package (block buffer, a fused Triton kernel "
        "pair per layer, one bottleneck tensor per block), compiled like its unpruned base",
        # Channel counts in multiples of 16, not 8: Triton assumes 16-byte-aligned rows only for
        # integer arguments divisible by 16 (its specialisation); with multiples of 8 (block 2's
        # buffer of 280 channels, layers of 88 input channels) the package ran 0.54x its unpruned
        # base at batch 32 (record ``issue4-pruned-fused-pairs-s14``).
        options={
            **PRUNED_CHANNELS_30_FP16_CL_GRAPHS.options,
            **AOTI_FP16_CL_DYNAMIC_FUSED_MIDS.options,
            "round_to": 16,
            # Tiles for its own channel counts (16 new channels a layer, 80-channel bottlenecks), from
            # ``benchmarks/kernel_bench.py --network pruned-30`` on the H100 (records ``layer-pruned-s14``,
            # ``conv3x3-pruned-s14``), picked at batch 32 and 128 as the base's were for its own:
            # 128x32 tiles in blocks 1 and 2, no split-K in block 4's layer kernel (block 3's layer
            # kernel: the base's, target 96). The 3x3 kernel steps through rows of taps on its 80
            # channels (``kernels.row_taps``): 64x64 tiles with split target 96 in every block, the
            # fastest or within 4 % of it at batch 1, 32 and 128 (``conv3x3-rowtaps-s16``: the four
            # blocks at batch 32 in 0.467 ms against 0.570 tap by tap in the tiles used before).
            "layer_configs": [[128, 32, 4, 3, 0], [128, 32, 4, 3, 0], [64, 64, 4, 3, 96], [64, 64, 4, 3, 0]],
            "conv_configs": [[64, 64, 4, 3, 96]] * 4,
        },
    )
    SPARSE24_FP16 = Variant(
        slug="densenet121-sparse24-fp16",
        technique=Technique.SEMI_STRUCTURED_SPARSE,
        precision=Precision.FP16,
        runtime=Runtime.TORCH_EAGER,
        base=_FP16_CL,
        channels_last=True,
        devices=("cuda",),
        deployable=False,
        description="2:4 semi-structured sparsity on the layers sparse kernels cover (1x1 convs, classifier)",
        tolerance=_SPARSE24_TOL,
        random_tolerance=_STRUCTURED_RANDOM_TOL,
        options={"sparse24": True},
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
