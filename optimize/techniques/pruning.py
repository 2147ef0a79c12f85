"""Pruning variants.

* Unstructured L1 (``pruned-l1-*``): the smallest ``amount`` of each conv and linear weight is
  zeroed (``torch.nn.utils.prune``), the reparametrisation made permanent, and the result stored
  compactly: each pruned weight as a 1-bit-per-element mask plus its kept values, so a 20 % pruned
  artifact is ~0.83x the FP32 one. The runner densifies at load; dense kernels run it at dense
  speed (reported as measured, not claimed faster).
* Structured channel pruning (``pruned-channels-*``): Torch-Pruning's dependency graph removes
  whole channels through DenseNet's concatenations, so convolutions really shrink (fewer
  parameters, fewer FLOPs). Optional BN recalibration and a short distillation from the FP32
  reference on an unlabelled image folder (``--finetune-dir``) win back accuracy. A variant whose
  ``runtime`` is AOTInductor compiles the pruned network into a package (``techniques/aoti.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_server.runtimes import MASKED_FORMAT
from optimize import BuildError
from optimize.registry import Runtime, Variant
from optimize.techniques import BuildContext, Built

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG"}


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def l1_unstructured(model: nn.Module, amount: float) -> nn.Module:
    """Zero the ``amount`` smallest-|w| of every conv and linear weight, per layer, permanently.

    Per layer rather than global: layers of DenseNet differ in scale, and a global threshold
    empties some of them.
    """
    from torch.nn.utils import prune

    model = copy.deepcopy(model)
    for _, module in prunable(model):
        prune.l1_unstructured(module, name="weight", amount=amount)  # type: ignore[no-untyped-call]
        prune.remove(module, "weight")  # type: ignore[no-untyped-call]
    return model


def masked_payload(state: dict[str, torch.Tensor], names: set[str]) -> dict[str, Any]:
    """Store the weights in ``names`` as a bit-packed non-zero mask plus their non-zero values."""
    dense: dict[str, torch.Tensor] = {}
    masked: dict[str, Any] = {}
    for key, t in state.items():
        if key not in names:
            dense[key] = t
            continue
        flat = t.reshape(-1)
        mask = flat.ne(0)
        bits = torch.from_numpy(np.packbits(mask.numpy()))
        masked[key] = {"shape": list(t.shape), "mask": bits, "values": flat[mask].clone()}
    return {"__format__": MASKED_FORMAT, "dense": dense, "masked": masked}


def sparsity(model: nn.Module) -> float:
    weights: list[torch.Tensor] = [getattr(m, "weight") for _, m in prunable(model)]  # noqa: B009
    zeros = sum(int(torch.count_nonzero(w == 0)) for w in weights)
    return zeros / sum(int(w.numel()) for w in weights)


def build_unstructured(variant: Variant, ctx: BuildContext) -> Built:
    amount = float(ctx.options.get("prune_amount", variant.options.get("amount", 0.2)))
    if not 0.0 < amount < 1.0:
        raise BuildError(f"pruning amount must be in (0, 1), got {amount}")
    model = l1_unstructured(ctx.reference, amount)
    names = {f"{n}.weight" for n, _ in prunable(model)}
    torch.save(masked_payload(model.state_dict(), names), ctx.out_dir / "model.pt")
    details = {
        "amount": amount,
        "scope": "per-layer L1 (conv and linear weights)",
        "weight_sparsity": round(sparsity(model), 4),
        "storage": "bit-packed mask + kept values (torch.save, loaded with weights_only=True, densified at load)",
        "nonzero_params": int(sum(int(p.count_nonzero()) for p in model.parameters())),
    }
    return Built(payload={"model": "model.pt"}, devices=list(variant.devices), model=model, details=details)


def iter_image_folder(folder: Path, *, batch: int, limit: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 ``[B,3,224,224]`` batches of every image under ``folder`` (recursively), preprocessed as served."""
    from model_server.preprocess import decode_and_crop

    paths = sorted(p for p in folder.rglob("*") if p.suffix in IMAGE_SUFFIXES or p.suffix.lower() in IMAGE_SUFFIXES)
    if limit:
        paths = paths[:limit]
    if not paths:
        raise BuildError(f"no images under {folder}")
    for i in range(0, len(paths), batch):
        yield torch.stack([decode_and_crop(p.read_bytes()) for p in paths[i : i + batch]])


def recalibrate_bn(model: nn.Module, batches: Iterator[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (cumulative average)."""
    from model_server.preprocess import normalize

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    seen = 0
    with torch.no_grad():
        for x in batches:
            model(normalize(x))
            seen += x.shape[0]
    model.eval()
    return seen


def distill(
    model: nn.Module, teacher: nn.Module, batches: list[torch.Tensor], *, steps: int, lr: float = 1e-4
) -> list[float]:
    """A short fine-tune of ``model`` towards the FP32 teacher's logits (KL divergence): no labels needed."""
    from model_server.preprocess import normalize

    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    teacher.eval()
    losses = []
    model.train()
    for step in range(steps):
        x = normalize(batches[step % len(batches)])
        with torch.no_grad():
            target = torch.log_softmax(teacher(x), dim=1)
        with torch.enable_grad():
            loss = torch.nn.functional.kl_div(
                torch.log_softmax(model(x), dim=1), target, log_target=True, reduction="batchmean"
            )
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        losses.append(float(loss))
    model.eval()
    return losses


def channel_prune(model: nn.Module, ratio: float, *, round_to: int = 8) -> nn.Module:
    """Remove ``ratio`` of the channels of every prunable layer (L1 importance), through DenseNet's
    concatenations, with Torch-Pruning's dependency graph. The classifier's outputs are kept."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    example = torch.zeros(1, 3, 224, 224)
    classifier = model.get_submodule("classifier")
    stem = model.get_submodule("features.conv0")
    # Torch-Pruning traces the dependency graph through autograd: a caller inside no_grad (or with
    # grad switched off for the process, as the benchmarks do) would stop it with an assertion.
    with torch.enable_grad():
        pruner = tp.pruner.MagnitudePruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[classifier, stem],
            round_to=round_to,
            global_pruning=False,
        )
        pruner.step()
    return model


def build_structured(variant: Variant, ctx: BuildContext) -> Built:
    from optimize.build import count_gflops, count_params

    ratio = float(ctx.options.get("prune_ratio", variant.options.get("ratio", 0.3)))
    round_to = int(variant.options.get("round_to", 8))
    t0 = time.perf_counter()
    model = channel_prune(ctx.reference, ratio, round_to=round_to)
    details: dict[str, Any] = {
        "ratio": ratio,
        "round_to": round_to,
        "importance": "L1 magnitude, per layer, through the concatenations (Torch-Pruning DependencyGraph)",
        "params_ratio": round(count_params(model) / count_params(ctx.reference), 4),
        "gflops_ratio": round(count_gflops(copy.deepcopy(model)) / count_gflops(copy.deepcopy(ctx.reference)), 4),
        "prune_s": round(time.perf_counter() - t0, 2),
        "finetune": None,
    }
    finetune_dir = ctx.options.get("finetune_dir")
    if finetune_dir:
        folder = Path(str(finetune_dir))
        limit = int(ctx.options.get("finetune_images", 512))
        seen = recalibrate_bn(model, iter_image_folder(folder, batch=16, limit=limit))
        steps = int(ctx.options.get("finetune_steps", 0))
        losses: list[float] = []
        if steps:
            batches = list(iter_image_folder(folder, batch=16, limit=limit))
            losses = distill(model, ctx.reference, batches, steps=steps)
            recalibrate_bn(model, iter(batches))
        details["finetune"] = {
            "folder": str(folder),
            "bn_recalibration_images": seen,
            "distillation_steps": steps,
            "final_kl": round(losses[-1], 4) if losses else None,
        }
    if variant.runtime is Runtime.AOTI:
        # The pruned network compiled like its unpruned AOTInductor base: the builder of that
        # runtime on the pruned network (a package holds its own kernels and shapes, no state dict).
        from optimize.techniques import aoti

        built = aoti.build(variant, dataclasses.replace(ctx, reference=model))
        built.details = {**details, **built.details}
        return built
    # The payload is a plain state dict; its tensor shapes are the channel configuration, from
    # which the runner rebuilds the pruned modules (no pickled module objects).
    torch.save(model.state_dict(), ctx.out_dir / "model.pt")
    return Built(payload={"model": "model.pt"}, devices=list(variant.devices), model=model, details=details)
