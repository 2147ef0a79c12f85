"""Fidelity of a variant against the FP32 reference: top-1 agreement, top-5 overlap, logit error."""

from __future__ import annotations

import dataclasses
from pathlib import Path
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


def labelled_images(folder: Path) -> list[tuple[Path, int]]:
    """(image, class index) pairs of an ImageNet-validation-style folder: one sub-folder per class.

    Sub-folders named by class index (``0`` ... ``999``) are taken as is; otherwise the folder
    must hold all 1000 synset folders (``n01440764`` ...), whose sorted order is the class
    index order of torchvision's ImageNet weights (torchvision's ``ImageFolder`` convention).

    Raises:
        OptimizeError: the layout is neither.
    """
    from optimize import OptimizeError

    suffixes = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
    classes = sorted(d for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    if not classes:
        raise OptimizeError(f"--val-dir {folder} holds no class folders (expected one folder per synset)")
    if all(d.name.isdigit() for d in classes):
        index = {d: int(d.name) for d in classes}
    elif len(classes) == 1000:
        index = {d: i for i, d in enumerate(classes)}
    else:
        raise OptimizeError(
            f"--val-dir {folder} has {len(classes)} class folders: name them by class index (0..999) "
            "or give all 1000 synset folders (sorted synset order is the class order)"
        )
    pairs = [(p, index[d]) for d in classes for p in sorted(d.iterdir()) if p.suffix.lower() in suffixes]
    if not pairs:
        raise OptimizeError(f"--val-dir {folder} holds no images")
    return pairs


def accuracy(runner: Any, folder: Path, *, batch: int = 32, limit: int | None = None) -> dict[str, Any]:
    """Real top-1 / top-5 accuracy of ``runner`` on a labelled folder (see :func:`labelled_images`)."""
    from model_server.preprocess import decode_and_crop

    pairs = labelled_images(folder)[:limit] if limit else labelled_images(folder)
    top1 = top5 = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        x = torch.stack([decode_and_crop(p.read_bytes()) for p, _ in chunk])
        logits = runner(x)
        labels = torch.tensor([c for _, c in chunk])
        top = logits.topk(5, dim=1).indices
        top1 += int((top[:, 0] == labels).sum())
        top5 += int((top == labels[:, None]).any(dim=1).sum())
    n = len(pairs)
    return {"images": n, "top1": round(top1 / n, 4), "top5": round(top5 / n, 4), "folder": str(folder)}
