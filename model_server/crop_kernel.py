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
Triton's CPU interpreter, at most 5 of 150,528 differ from torch's CPU crop; on the H100, 180 of
19.3 M, session 23). One compiled kernel serves every image size: the taps are a loop bound, not a
compile-time constant, and no size is specialised on.

The server does not run Triton: it launches the kernel's compiled binary (a cubin for the GPU's
compute capability) through the CUDA driver (:class:`CubinCrop`, ctypes, no C compiler, no JIT on
the start-up path). ``python -m model_server.crop_kernel --arch 90 ...`` compiles the binaries ahead
of time (the container image does, for the usual GPUs) into ``DENSENET_CROP_KERNEL_DIR``; a server
that finds none for its GPU compiles one with Triton at warm-up (about 2 s) and keeps it in the user
cache for the next start. A binary's file name carries a hash of this file, so an edited kernel is
never served from an old binary.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from optimize.registry import CROP_SIZE, RESIZE_SIZE

#: Output pixels one program computes (of one image's one channel).
BLOCK = 256


log = logging.getLogger(__name__)


def triton_needs(arch: int) -> None:
    """Raise ValueError unless the kernel can run for compute capability ``arch`` (``major * 10 +
    minor``): a compiled binary for it in :func:`kernel_dirs`, or Triton to compile one."""
    if any(_binary_path(d, arch).with_suffix(".json").is_file() for d in kernel_dirs()):
        return
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"crop_kernel 'triton' needs a compiled binary for sm_{arch} (none in "
                         f"{', '.join(map(str, kernel_dirs()))}) or Triton (pip install triton) to compile one, "
                         "and Triton is not installed")  # fmt: skip


_fell_back: list[str] = []


def resolve(kernel: str, device: torch.device) -> str:
    """The crop a pipeline on ``device`` runs for ``--crop_kernel kernel``, the kernel's binary loaded
    (:func:`cubin_crop`) if it is "triton": "auto" (the default) is "triton" on a CUDA device where the
    binary can be found or compiled and loaded, else "torch", with one warning saying why; "triton" where
    it cannot raises ValueError saying why; "torch" is "torch". On the CPU every name crops with torch's."""
    if kernel == "torch" or device.type != "cuda":
        return "torch" if kernel == "auto" else kernel
    try:
        cubin_crop(device)  # found or compiled, and loaded: once a process
    except Exception as e:
        if kernel == "triton":
            if isinstance(e, ValueError):
                raise
            raise ValueError(f"crop_kernel 'triton' cannot run on {device}: {e}") from e
        if not _fell_back:  # once a process: the early warm-up and the pipeline both resolve
            log.warning("crop kernel: torch's (%s)", e)
            _fell_back.append(str(e))
        return "torch"
    return "triton"


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
#: The same parameters as the compiled binary takes them (PTX types; the constexprs are compiled in),
#: before any that Triton appends (pointers to scratch memory this kernel does not use: passed as null).
PARAMS = tuple({"*u8": "u64", "i32": "u32", "fp32": "f32"}[t] for t in SIGNATURE.values() if t != "constexpr")


def compile_for(arch: int, block: int = BLOCK) -> Any:
    """The kernel compiled for CUDA compute capability ``arch`` (90: Hopper) without a GPU, by the
    compiler and ``ptxas`` Triton ships (:func:`build_binary` reads the binary and its launch from it)."""
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
    images, out, sizes = _launch_args(images)
    if images.shape[0]:
        grid = (images.shape[0] * 3, math.ceil(CROP_SIZE * CROP_SIZE / block))
        _kernel()[grid](images, out, *sizes, OUT=CROP_SIZE, BLOCK=block)
    return out


#: The kernel's arguments after its two pointers: height, width, both scales, the crop's top and left, both taps.
SizeArgs = tuple[int, int, float, float, int, int, int, int]


def _launch_args(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, SizeArgs]:
    """A launch's checked input (made contiguous), its empty output, and its :data:`SizeArgs`."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a uint8 [N,3,H,W] batch, got {images.dtype} {list(images.shape)}")
    images = images.contiguous()
    n, _, h, w = images.shape
    nh, nw, top, left = crop_geometry(h, w)
    out = torch.empty((n, 3, CROP_SIZE, CROP_SIZE), dtype=torch.uint8, device=images.device)
    scale_h, scale_w = _scale(h, nh), _scale(w, nw)
    return images, out, (h, w, scale_h, scale_w, top, left, _taps(scale_h), _taps(scale_w))


# ---- the compiled kernel, launched through the CUDA driver ------------------------------------


@functools.cache
def source_key() -> str:
    """A hash of this file: part of a compiled binary's name, so an edited kernel is never served
    from a binary compiled before the edit."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def kernel_dirs() -> list[Path]:
    """Where compiled binaries are looked for, in order: ``DENSENET_CROP_KERNEL_DIR`` (the container
    image's, compiled when it was built) if set, then the user cache (``XDG_CACHE_HOME`` or
    ``~/.cache``), where a server keeps the one it compiled."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "densenet-knative" / "crop-kernels"
    given = os.environ.get("DENSENET_CROP_KERNEL_DIR")
    return [Path(given), cache] if given else [cache]


def _binary_path(directory: Path, arch: int, block: int = BLOCK) -> Path:
    return directory / f"crop-sm{arch}-b{block}-{source_key()}.cubin"


@dataclass(frozen=True)
class CropBinary:
    """The kernel compiled for one compute capability: the cubin and what a launch needs to know."""

    arch: int
    name: str
    num_warps: int
    shared: int
    block: int
    #: The binary's parameters (PTX types): :data:`PARAMS`, then null scratch pointers.
    params: tuple[str, ...]
    cubin: bytes

    def save(self, directory: Path) -> Path:
        """Write ``<name>.cubin`` and its ``.json`` into ``directory`` (made if missing); the path."""
        path = _binary_path(directory, self.arch, self.block)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(self.cubin)
        tmp.replace(path)  # whole or not at all: another server may read it meanwhile
        meta = {"arch": self.arch, "name": self.name, "num_warps": self.num_warps, "shared": self.shared,
                "block": self.block, "params": list(self.params), "source_key": source_key()}  # fmt: skip
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
        tmp.replace(path.with_suffix(".json"))  # written last: a .json means its .cubin is whole
        return path

    @classmethod
    def load(cls, directory: Path, arch: int, block: int = BLOCK) -> CropBinary | None:
        """The binary for ``arch`` in ``directory``, or None if there is none for this kernel's source."""
        path = _binary_path(directory, arch, block)
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            cubin = path.read_bytes()
        except (OSError, ValueError):
            return None
        return cls(arch, meta["name"], int(meta["num_warps"]), int(meta["shared"]), int(meta["block"]),
                   tuple(meta["params"]), cubin)  # fmt: skip


def build_binary(arch: int, block: int = BLOCK) -> CropBinary:
    """Compile the kernel for ``arch`` with Triton (no GPU needed) and read what a launch needs from
    Triton's metadata and the PTX's entry. Refuses a binary this launcher cannot run: one that needs
    scratch memory, or more than one CTA, or whose parameters are not :data:`PARAMS` then pointers."""
    compiled = compile_for(arch, block)
    meta = compiled.metadata
    for field in ("global_scratch_size", "profile_scratch_size"):
        if getattr(meta, field, 0):
            raise RuntimeError(f"the compiled crop kernel needs {field}={getattr(meta, field)}: not supported")
    if getattr(meta, "num_ctas", 1) != 1:
        raise RuntimeError(f"the compiled crop kernel needs num_ctas={meta.num_ctas}: not supported")
    params = entry_params(compiled.asm["ptx"], meta.name)
    if params[: len(PARAMS)] != PARAMS or any(p != "u64" for p in params[len(PARAMS) :]):
        raise RuntimeError(f"the compiled crop kernel takes {params}, expected {PARAMS} then scratch pointers")
    return CropBinary(arch, meta.name, int(meta.num_warps), int(meta.shared), block, params, compiled.asm["cubin"])


def entry_params(ptx: str, name: str) -> tuple[str, ...]:
    """The PTX types of the parameters of kernel ``name`` (``.entry name(...)``) in ``ptx``."""
    found = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    if found is None:
        raise RuntimeError(f"no .entry {name} in the compiled kernel's PTX")
    return tuple(re.findall(r"\.param\s+\.(\w+)", found.group(1)))


def binary_for(arch: int, block: int = BLOCK) -> CropBinary:
    """The binary for ``arch`` from the first of :func:`kernel_dirs` holding one; else compiled now
    (Triton) and kept in the first directory that can be written, for the next start."""
    dirs = kernel_dirs()
    for directory in dirs:
        found = CropBinary.load(directory, arch, block)
        if found is not None:
            log.info("crop kernel: the fused kernel's binary for sm_%d from %s", arch, directory)
            return found
    triton_needs(arch)
    binary = build_binary(arch, block)
    for directory in reversed(dirs):  # the user cache first: the image's directory is read-only
        try:
            log.info("crop kernel: the fused kernel compiled for sm_%d, kept in %s", arch, binary.save(directory))
            break
        except OSError as e:
            log.debug("cannot keep the crop kernel in %s: %s", directory, e)
    else:
        log.info("crop kernel: the fused kernel compiled for sm_%d, not kept (no directory can be written)", arch)
    return binary


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed."""


class _Driver:
    """The few CUDA driver calls a launch needs (``libcuda.so.1``, through ctypes)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        vp, u = ctypes.c_void_p, ctypes.c_uint
        lib.cuCtxGetCurrent.argtypes = [ctypes.POINTER(vp)]
        lib.cuCtxSetCurrent.argtypes = [vp]
        lib.cuDeviceGet.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(vp), ctypes.c_int]
        lib.cuModuleLoadData.argtypes = [ctypes.POINTER(vp), ctypes.c_char_p]
        lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_char_p]
        lib.cuFuncSetAttribute.argtypes = [vp, ctypes.c_int, ctypes.c_int]
        lib.cuLaunchKernel.argtypes = [vp, u, u, u, u, u, u, u, vp, ctypes.POINTER(vp), ctypes.POINTER(vp)]
        lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        self.lib = lib

    def check(self, call: str, status: int) -> None:
        if status != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(status, ctypes.byref(name))
            raise CudaDriverError(f"{call} failed: {(name.value or b'?').decode()} ({status})")

    def use_primary_context(self, index: int) -> None:
        """Make device ``index``'s primary context (torch's) current on this thread if none is."""
        ctx = ctypes.c_void_p()
        self.check("cuCtxGetCurrent", self.lib.cuCtxGetCurrent(ctypes.byref(ctx)))
        if ctx.value:
            return
        dev = ctypes.c_int()
        self.check("cuDeviceGet", self.lib.cuDeviceGet(ctypes.byref(dev), index))
        self.check("cuDevicePrimaryCtxRetain", self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
        self.check("cuCtxSetCurrent", self.lib.cuCtxSetCurrent(ctx))


#: CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
_MAX_DYNAMIC_SHARED = 8


class CubinCrop:
    """:func:`triton_resize_crop` by the compiled binary: loaded once into ``device``'s primary
    context, launched on the current stream. No Triton, no JIT, no C compiler."""

    def __init__(self, binary: CropBinary, device: torch.device) -> None:
        self.binary = binary
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.driver = _Driver()
        self.driver.use_primary_context(self.index)
        module, func = ctypes.c_void_p(), ctypes.c_void_p()
        lib, check = self.driver.lib, self.driver.check
        check("cuModuleLoadData", lib.cuModuleLoadData(ctypes.byref(module), binary.cubin))
        check("cuModuleGetFunction", lib.cuModuleGetFunction(ctypes.byref(func), module, binary.name.encode()))
        if binary.shared > 48 * 1024:
            check("cuFuncSetAttribute", lib.cuFuncSetAttribute(func, _MAX_DYNAMIC_SHARED, binary.shared))
        self.module, self.func = module, func
        self.scratch = len(binary.params) - len(PARAMS)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """As :func:`triton_resize_crop` (same checks, same result), on ``images``' current stream."""
        images, out, (h, w, scale_h, scale_w, top, left, taps_h, taps_w) = _launch_args(images)
        n = images.shape[0]
        if n == 0:
            return out
        i32, f32, ptr = ctypes.c_int32, ctypes.c_float, ctypes.c_uint64
        values: list[ctypes._SimpleCData[Any]] = [
            ptr(images.data_ptr()), ptr(out.data_ptr()), i32(h), i32(w), f32(scale_h), f32(scale_w), i32(top),
            i32(left), i32(taps_h), i32(taps_w),
        ]  # fmt: skip
        args = values + [ptr(0) for _ in range(self.scratch)]
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        stream = torch.cuda.current_stream(images.device).cuda_stream
        self.driver.use_primary_context(self.index)
        b = self.binary
        self.driver.check("cuLaunchKernel", self.driver.lib.cuLaunchKernel(
            self.func, n * 3, math.ceil(CROP_SIZE * CROP_SIZE / b.block), 1, 32 * b.num_warps, 1, 1, b.shared,
            stream, params, None))  # fmt: skip
        return out


_loaded: dict[int, CubinCrop] = {}
_loading = threading.Lock()


def cubin_crop(device: torch.device) -> CubinCrop:
    """The crop for ``device``, its binary found or compiled (:func:`binary_for`) and loaded the first
    time (the decoder's warm-up), once per process and device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    crop = _loaded.get(index)
    if crop is None:
        with _loading:
            crop = _loaded.get(index)
            if crop is None:
                major, minor = torch.cuda.get_device_capability(index)
                crop = _loaded[index] = CubinCrop(binary_for(major * 10 + minor), torch.device("cuda", index))
    return crop


def main(argv: list[str] | None = None) -> int:
    """``python -m model_server.crop_kernel --arch 90 [--arch 80 ...] [--out DIR]``: compile the
    crop kernel's binaries ahead of time (no GPU needed), as the container image's build does."""
    ap = argparse.ArgumentParser(prog="python -m model_server.crop_kernel", description=main.__doc__)
    ap.add_argument("--arch", type=int, action="append", required=True,
                    help="CUDA compute capability as major*10+minor (80 A100, 86/89 RTX, 90 H100/H200, 100 B200); "
                    "repeat for several")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write (default: DENSENET_CROP_KERNEL_DIR, else the user cache)")  # fmt: skip
    args = ap.parse_args(argv)
    out = args.out or kernel_dirs()[0]
    for arch in args.arch:
        if arch < 50 or arch > 200:
            ap.error(f"argument --arch: {arch} is not a compute capability such as 80, 86, 89, 90 or 100")
        try:
            binary = build_binary(arch)
        except Exception as e:  # Triton refuses an arch it does not support: say which
            print(f"sm_{arch}: not compiled: {e}", file=sys.stderr)
            return 1
        print(f"sm_{arch}: {binary.save(out)} ({len(binary.cubin)} bytes, {binary.num_warps} warps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
