"""Fidelity of a variant against the FP32 reference: top-1 agreement, top-5 overlap, logit error."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from optimize import FidelityError
from optimize.registry import Tolerance


@dataclasses.dataclass(frozen=True)
class Fidelity:
    images: int
    top1_agreement: float
    top5_overlap: float
    max_abs_logit_err: float
    mean_abs_logit_err: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> Fidelity:
    """Compare logits ``[N,1000]`` of a variant with the reference's on the same images."""
    if reference.shape != candidate.shape:
        raise FidelityError(
            f"logits shape {tuple(candidate.shape)} differs from the reference's {tuple(reference.shape)}"
        )
    ref, cand = reference.float(), candidate.float()
    if not torch.isfinite(cand).all():
        raise FidelityError("variant produced NaN or Inf logits")
    err = (cand - ref).abs()
    top5_ref = ref.topk(5, dim=1).indices
    top5_cand = cand.topk(5, dim=1).indices
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5.0 for a, b in zip(top5_ref, top5_cand, strict=True)]
    return Fidelity(
        images=ref.shape[0],
        top1_agreement=float((ref.argmax(1) == cand.argmax(1)).float().mean()),
        top5_overlap=float(sum(overlap) / len(overlap)),
        max_abs_logit_err=float(err.max()),
        mean_abs_logit_err=float(err.mean()),
    )


def check(fidelity: Fidelity, tolerance: Tolerance, *, slug: str) -> None:
    """Raise :class:`FidelityError` naming every bound the variant misses."""
    misses = []
    if fidelity.top1_agreement < tolerance.min_top1_agreement:
        misses.append(f"top-1 agreement {fidelity.top1_agreement:.3f} < {tolerance.min_top1_agreement}")
    if fidelity.top5_overlap < tolerance.min_top5_overlap:
        misses.append(f"top-5 overlap {fidelity.top5_overlap:.3f} < {tolerance.min_top5_overlap}")
    if fidelity.max_abs_logit_err > tolerance.max_abs_logit_err:
        misses.append(f"max |logit error| {fidelity.max_abs_logit_err:.4g} > {tolerance.max_abs_logit_err}")
    if misses:
        raise FidelityError(f"{slug} fails its fidelity check against the FP32 reference: {'; '.join(misses)}")
