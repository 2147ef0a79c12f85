"""Eager PyTorch variants: FP32 baseline, pure FP16/BF16 weights, channels-last. Payload: a state dict."""

from __future__ import annotations

import copy

import torch

from optimize.registry import Precision, Variant
from optimize.techniques import BuildContext, Built

_DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}


def build(variant: Variant, ctx: BuildContext) -> Built:
    model = copy.deepcopy(ctx.reference).to(_DTYPES[variant.precision])
    # Channels-last is a runtime layout; a state dict is layout-free, the runner applies it.
    torch.save(model.state_dict(), ctx.out_dir / "model.pt")
    return Built(payload={"model": "model.pt"}, devices=list(variant.devices), model=ctx.reference)
