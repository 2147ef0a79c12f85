"""One builder per technique: turn the FP32 reference into a variant's payload files.

A builder gets the variant's registry record and a :class:`BuildContext`, writes its
payload into ``ctx.out_dir`` and returns a :class:`Built`. It never writes
``variant.json``: :mod:`optimize.build` does that, only after the artifact, loaded back
through ``model_server``'s runner, passes its fidelity check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from optimize.registry import Technique, Variant


@dataclasses.dataclass
class BuildContext:
    """What every builder may use.

    Attributes:
        reference: the FP32 eager model on the CPU (copy it before changing it).
        device: the device the variant is built for.
        calibration: uint8 ``[N,3,224,224]`` photos for calibration (static quantisation).
        max_batch: the largest batch the artifact must serve.
        out_dir: where payload files go.
        options: run-time overrides from the command line (``prune_amount``, ``prune_ratio``,
            ``finetune_dir``, ``finetune_steps``, ``aoti_cache_dir``, ``aoti``: inductor options).
    """

    reference: nn.Module
    device: torch.device
    calibration: torch.Tensor
    max_batch: int
    out_dir: Path
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Built:
    """What a builder produced.

    Attributes:
        payload: role -> file name inside ``out_dir``; ``model`` is required.
        devices: devices the artifact can run on.
        model: an ``nn.Module`` equivalent of the variant for counting params and FLOPs
            (``None`` where the artifact holds no such module).
        details: technique-specific facts recorded under ``meta.details``.
    """

    payload: dict[str, str]
    devices: list[str]
    model: nn.Module | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


Builder = Callable[[Variant, BuildContext], Built]


def builder_for(variant: Variant) -> Builder:
    from optimize.techniques import aoti, eager, onnx, pruning, torchscript

    builders: dict[Technique, Builder] = {
        Technique.BASELINE: eager.build,
        Technique.HALF_PRECISION: eager.build,
        Technique.CHANNELS_LAST: eager.build,
        Technique.AUTOCAST: eager.build,
        Technique.TORCHSCRIPT: torchscript.build,
        Technique.AOT_INDUCTOR: aoti.build,
        Technique.ONNX: onnx.build,
        Technique.DYNAMIC_QUANT: onnx.build,
        Technique.STATIC_QUANT: onnx.build,
        Technique.UNSTRUCTURED_PRUNE: pruning.build_unstructured,
        Technique.STRUCTURED_PRUNE: pruning.build_structured,
        Technique.SEMI_STRUCTURED_SPARSE: eager.build_sparse24,
    }
    try:
        return builders[variant.technique]
    except KeyError as e:
        raise NotImplementedError(f"no builder for technique {variant.technique.value!r}") from e
