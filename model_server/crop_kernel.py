# mypy: disable-error-code="no-untyped-def,untyped-decorator"
# (a Triton kernel's parameters take no Python annotations but tl.constexpr: Triton reads them)
"""``Resize(256)`` + ``CenterCrop(224)`` of uint8 images in one Triton kernel (``--crop_kernel triton``).

The server's crop (:func:`model_server.preprocess.resize_crop_pixels`) converts each decoded image
to float32, resizes all of it with torch's antialiased bilinear filter, and keeps the centre
224 x 224: on the H100 1.45 ms of GPU time per 128 VGA images (README, sessions 21 and 22). Part of
that is writing and reading the float copy, part computing output pixels the crop throws away (43 %
of a VGA image's); how much each was not measured. This kernel reads the uint8 pixels where they are
and computes only the crop's pixels, with the same filter: each output pixel's weights as torch
computes them (a triangle filter stretched by the scale when shrinking, the weights normalised per
pixel), the rows' sums first, then the column's, in float32, rounded half to even and clamped, as
the reference's ``round_().clamp_(0, 255)``.

Where the sums run in another order, or the GPU contracts a multiply and an add into one, a pixel
can round the other way: the tests allow a difference of one step of 255 in a few pixels (in
Triton's CPU interpreter, at most 5 of 150,528 differ from torch's CPU crop). Triton compiles the
kernel the first time it runs (the decoder's warm-up), once for all image sizes: the taps are a loop
bound, not a compile-time constant, and no size is specialised on.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
from typing import Any

import numpy as np
import torch

from optimize.registry import CROP_SIZE, RESIZE_SIZE

#: Output pixels one program computes (of one image's one channel).
BLOCK = 256


def triton_needs() -> None:
    """Raise ValueError naming what the kernel needs and this machine lacks: Triton, and the C compiler
    Triton builds its launcher with the first time it runs (``CC``, else gcc or clang on PATH)."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("crop_kernel 'triton' needs Triton (pip install triton), which is not installed")
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        raise ValueError("crop_kernel 'triton' needs a C compiler (CC, gcc or clang) for Triton's launcher: "
                         "none found (the slim container image has none)")  # fmt: skip


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, defined on first use: importing Triton costs the start-up of a server that
    never uses it, and ``TRITON_INTERPRET=1`` (the CPU tests) must be set before it is defined."""
    import triton
    import triton.language as tl

    # Sizes and offsets are not specialised on (Triton would compile again for every value that is 1, or a
    # multiple of 16, or not): one compiled kernel for every image size, none on a request's path.
    @triton.jit(do_not_specialize=["height", "width", "top", "left", "taps_h", "taps_w"])
    def crop_kernel(src, dst, height, width, scale_h, scale_w, top, left, taps_h, taps_w,
                    OUT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        plane = tl.program_id(0)  # image * 3 + channel
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < OUT * OUT
        oy = offs // OUT + top  # the pixel's row and column in the whole resized image
        ox = offs % OUT + left
        # torch's antialiased weights: support = scale when shrinking (else 1), centre = scale * (i + 0.5)
        support_h = tl.where(scale_h >= 1.0, scale_h, 1.0)
        support_w = tl.where(scale_w >= 1.0, scale_w, 1.0)
        inv_h = tl.where(scale_h >= 1.0, 1.0 / scale_h, 1.0)
        inv_w = tl.where(scale_w >= 1.0, 1.0 / scale_w, 1.0)
        cy = scale_h * (oy.to(tl.float32) + 0.5)
        cx = scale_w * (ox.to(tl.float32) + 0.5)
        ymin = tl.maximum((cy - support_h + 0.5).to(tl.int32), 0)  # truncation, as static_cast<int64_t>
        ysize = tl.minimum((cy + support_h + 0.5).to(tl.int32), height) - ymin
        xmin = tl.maximum((cx - support_w + 0.5).to(tl.int32), 0)
        xsize = tl.minimum((cx + support_w + 0.5).to(tl.int32), width) - xmin
        total_h = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(0, taps_h):
            w = tl.maximum(1.0 - tl.abs((j + ymin - cy + 0.5) * inv_h), 0.0)
            total_h += tl.where(j < ysize, w, 0.0)
        total_w = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, taps_w):
            w = tl.maximum(1.0 - tl.abs((k + xmin - cx + 0.5) * inv_w), 0.0)
            total_w += tl.where(k < xsize, w, 0.0)
        total_h = tl.where(total_h != 0.0, total_h, 1.0)
        total_w = tl.where(total_w != 0.0, total_w, 1.0)
        base = src + plane.to(tl.int64) * height * width
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(0, taps_h):
            wy = tl.maximum(1.0 - tl.abs((j + ymin - cy + 0.5) * inv_h), 0.0) / total_h
            row = tl.zeros([BLOCK], dtype=tl.float32)
            at = base + (ymin + j).to(tl.int64) * width + xmin
            for k in range(0, taps_w):
                wx = tl.maximum(1.0 - tl.abs((k + xmin - cx + 0.5) * inv_w), 0.0) / total_w
                v = tl.load(at + k, mask=mask & (j < ysize) & (k < xsize), other=0).to(tl.float32)
                row += tl.where(k < xsize, wx * v, 0.0)
            acc += tl.where(j < ysize, wy * row, 0.0)
        # round half to even, then clamp (torch's round_() and clamp_(0, 255))
        r = tl.floor(acc + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        r = tl.where(((r - acc) == 0.5) & odd, r - 1.0, r)
        r = tl.minimum(tl.maximum(r, 0.0), 255.0)
        tl.store(dst + plane.to(tl.int64) * OUT * OUT + offs, r.to(tl.uint8), mask=mask)

    return crop_kernel


#: The kernel's argument types, for compiling it ahead of a launch (``triton.compile``).
SIGNATURE = {
    "src": "*u8", "dst": "*u8", "height": "i32", "width": "i32", "scale_h": "fp32", "scale_w": "fp32",
    "top": "i32", "left": "i32", "taps_h": "i32", "taps_w": "i32", "OUT": "constexpr", "BLOCK": "constexpr",
}  # fmt: skip


def compile_for(arch: int, block: int = BLOCK) -> Any:
    """The kernel compiled for CUDA compute capability ``arch`` (90: Hopper) without a GPU, by the
    compiler and ``ptxas`` Triton ships: what a launch would compile first."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=_kernel(), signature=SIGNATURE, constexprs={"OUT": CROP_SIZE, "BLOCK": block})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32))


def crop_geometry(height: int, width: int) -> tuple[int, int, int, int]:
    """``(resized height, resized width, top, left)`` of ``Resize(256)`` + ``CenterCrop(224)``, as
    :func:`model_server.preprocess.resize_crop_pixels` computes them."""
    if width <= height:
        nw, nh = RESIZE_SIZE, int(RESIZE_SIZE * height / width)
    else:
        nw, nh = int(RESIZE_SIZE * width / height), RESIZE_SIZE
    return nh, nw, round((nh - CROP_SIZE) / 2.0), round((nw - CROP_SIZE) / 2.0)


def _scale(size: int, out: int) -> float:
    """torch's ``area_pixel_compute_scale`` without align_corners: ``size / out`` in float32."""
    return float(np.float32(size) / np.float32(out))  # no tensors made on the request path


def _taps(scale: float) -> int:
    """The most input pixels one output pixel's filter covers along a dimension, plus one for the
    truncations at its ends."""
    support = scale if scale >= 1.0 else 1.0
    return math.ceil(2 * support) + 1


def triton_resize_crop(images: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``Resize(256)`` + ``CenterCrop(224)`` of a uint8 ``[N,3,H,W]`` batch of one size, on its device,
    as uint8 ``[N,3,224,224]`` (what ``resize_crop_pixels(images).to(torch.uint8)`` gives). ``block``:
    output pixels per program (a power of two; Triton's CPU interpreter runs fewer, larger ones faster)."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 [N,3,H,W] batch, got {images.dtype} {list(images.shape)}")
    images = images.contiguous()
    n, _, h, w = images.shape
    nh, nw, top, left = crop_geometry(h, w)
    out = torch.empty((n, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8, device=images.device)
    if n == 0:
        return out
    scale_h, scale_w = _scale(h, nh), _scale(w, nw)
    grid = (n * 3, math.ceil(CROP_SIZE * CROP_SIZE / block))
    _kernel()[grid](images, out, h, w, scale_h, scale_w, top, left, _taps(scale_h), _taps(scale_w),
                    OUT=CROP_SIZE, BLOCK=block)  # fmt: skip
    return out
