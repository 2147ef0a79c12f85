"""TorchScript variant: ``torch.jit.script`` (torchvision's DenseNet is written to be scriptable),
frozen for inference. Tracing also works for DenseNet, but scripting keeps the model's real control
flow and needs no example input, so it is what we ship."""

from __future__ import annotations

import copy
import warnings

import torch

from optimize.registry import Variant
from optimize.techniques import BuildContext, Built


def build(variant: Variant, ctx: BuildContext) -> Built:
    model = copy.deepcopy(ctx.reference).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        method = str(variant.options.get("method", "script"))
        if method == "script":
            module = torch.jit.script(model)
        else:
            module = torch.jit.trace(model, torch.zeros(1, 3, 224, 224))  # type: ignore[no-untyped-call]
        if variant.options.get("freeze", True):
            # Freezing inlines weights as constants and folds what it can; the result is device-portable.
            module = torch.jit.freeze(module.eval())
        torch.jit.save(module, str(ctx.out_dir / "model.ts"))
    return Built(
        payload={"model": "model.ts"},
        devices=list(variant.devices),
        model=ctx.reference,
        details={"method": method, "frozen": bool(variant.options.get("freeze", True))},
    )
