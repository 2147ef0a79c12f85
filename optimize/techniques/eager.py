"""Eager PyTorch variants: FP32 baseline, pure FP16/BF16 weights, channels-last, autocast (AMP), 2:4 sparsity.

Payload: a state dict (``torch.save``, loaded back with ``weights_only=True``).
"""

from __future__ import annotations

import copy

import torch

from optimize.registry import Precision, Variant
from optimize.techniques import BuildContext, Built

_DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}


def build(variant: Variant, ctx: BuildContext) -> Built:
    # AMP keeps FP32 weights: torch.autocast casts per op at run time.
    dtype = torch.float32 if variant.options.get("autocast") else _DTYPES[variant.precision]
    model = copy.deepcopy(ctx.reference).to(dtype)
    # Channels-last is a runtime layout; a state dict is layout-free, the runner applies it.
    torch.save(model.state_dict(), ctx.out_dir / "model.pt")
    details = {"autocast": bool(variant.options.get("autocast")), "weights_dtype": str(dtype).removeprefix("torch.")}
    return Built(payload={"model": "model.pt"}, devices=list(variant.devices), model=ctx.reference, details=details)


def build_sparse24(variant: Variant, ctx: BuildContext) -> Built:
    """2:4 magnitude pruning of every layer the sparse kernels can run (1x1 convs, the classifier).

    The payload is the FP16 state dict with the zeros in place; the runner compresses eligible
    layers into semi-structured sparse tensors on the GPU (there are no such kernels on a CPU).
    """
    from model_server.runtimes import prune_2_4, sparse24_eligible

    model = copy.deepcopy(ctx.reference)
    pruned = []
    total = sparse_params = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name and sparse24_eligible(module):
                weight = module.weight
                assert isinstance(weight, torch.Tensor)
                weight.copy_(prune_2_4(weight))
                pruned.append(name)
                sparse_params += weight.numel()
    total = sum(p.numel() for p in model.parameters())
    model = model.to(_DTYPES[variant.precision])
    torch.save(model.state_dict(), ctx.out_dir / "model.pt")
    details = {
        "sparse_layers": len(pruned),
        "sparse_fraction_of_params": round(sparse_params / total, 4),
        "note": "3x3 convolutions (half of DenseNet's FLOPs) have no 2:4 kernels in torch; they stay dense",
    }
    return Built(payload={"model": "model.pt"}, devices=list(variant.devices), model=model.float(), details=details)
