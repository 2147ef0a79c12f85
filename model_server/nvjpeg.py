"""Several nvJPEG hardware decoders at once (ctypes), for batches of JPEGs on a CUDA device.

torchvision's batched GPU decode (``torch.ops.image.decode_jpegs_cuda``) keeps one decoder per
process behind a lock, and each call waits for its own stream before it returns. On the H100 host
one process decoded 14,975 VGA JPEGs/s that way with the JPEG engines 69 % busy, and four
processes together 31,466/s with them 100 % busy (``benchmarks/decode_bench.py --processes``,
record ``decode-processes``): the engines had room, the one decoder did not. The 32-JPEG requests
of the fastest variant were bound by it (8,933 img/s served against 25,735 on the device).

:class:`DecoderPool` holds ``n`` decoders (an nvJPEG handle with the hardware backend, its state
and a CUDA stream each) and decodes a batch in ``n`` parts on ``n`` threads; ctypes releases the
GIL for every call into the library, so the parts run at once. It loads the nvJPEG library
torchvision ships (``torchvision.libs``), else one from the NVIDIA wheels or the system. Streams
the hardware decoder does not take (progressive JPEGs, some subsamplings) are left to the caller,
which decodes them with torchvision. :func:`pool_for` returns None where there is no library, no
GPU or no hardware decoder (``NVJPEG_STATUS_ARCH_MISMATCH`` before the A100): torchvision then
decodes everything, as before.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_BACKEND_HARDWARE = 3  # nvjpegBackend_t
_OUTPUT_RGB = 3  # nvjpegOutputFormat_t: planar R, G, B
_STATUS_ARCH_MISMATCH = 7
_MAX_COMPONENT = 4


class _Image(ctypes.Structure):
    """``nvjpegImage_t``: one pointer and one pitch per output plane."""

    _fields_ = [("channel", ctypes.c_void_p * _MAX_COMPONENT), ("pitch", ctypes.c_size_t * _MAX_COMPONENT)]


class NvJpegError(RuntimeError):
    """An nvJPEG call failed (``status``: its ``nvjpegStatus_t``)."""

    def __init__(self, call: str, status: int) -> None:
        super().__init__(f"{call} failed with nvjpegStatus {status}")
        self.status = status


def library_path() -> str | None:
    """The nvJPEG shared library: torchvision's own copy first (the one its decoder uses), then the
    NVIDIA wheels' (``nvidia/*/lib``), then the system's."""
    candidates: list[str] = []
    spec = importlib.util.find_spec("torchvision")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        site = Path(root).parent
        candidates += sorted(glob.glob(str(site / "torchvision.libs" / "libnvjpeg*.so*")))
        candidates += sorted(glob.glob(str(site / "nvidia" / "*" / "lib" / "libnvjpeg.so*")))
    import ctypes.util

    system = ctypes.util.find_library("nvjpeg")
    return next((c for c in candidates if os.path.isfile(c)), system)


@functools.cache
def _lib() -> Any:
    path = library_path()
    if path is None:
        raise OSError("no nvJPEG library (torchvision.libs, nvidia/*/lib or the system's)")
    lib = ctypes.CDLL(path)
    p, i, u, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t
    ip = ctypes.POINTER(ctypes.c_int)
    signatures: dict[str, list[Any]] = {
        "nvjpegCreateEx": [i, p, p, u, ctypes.POINTER(p)],
        "nvjpegJpegStateCreate": [p, ctypes.POINTER(p)],
        "nvjpegJpegStreamCreate": [p, ctypes.POINTER(p)],
        "nvjpegGetImageInfo": [p, p, sz, ip, ip, ip, ip],
        "nvjpegJpegStreamParseHeader": [p, p, sz, p],
        "nvjpegDecodeBatchedSupported": [p, p, ip],
        "nvjpegDecodeBatchedInitialize": [p, p, i, i, i],
        "nvjpegDecodeBatched": [p, p, ctypes.POINTER(p), ctypes.POINTER(sz), ctypes.POINTER(_Image), p],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _check(call: str, status: int) -> None:
    if status != 0:
        raise NvJpegError(call, status)


class _Decoder:
    """One nvJPEG handle with the hardware backend, its decode state, a parsed-stream object and a
    CUDA stream; used by one thread at a time (its lock)."""

    def __init__(self, device: torch.device) -> None:
        lib = _lib()
        self.device = device
        self.handle, self.state, self.jpeg = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        created = lib.nvjpegCreateEx(_BACKEND_HARDWARE, None, None, 0, ctypes.byref(self.handle))
        _check("nvjpegCreateEx(hardware)", created)
        _check("nvjpegJpegStateCreate", lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.state)))
        _check("nvjpegJpegStreamCreate", lib.nvjpegJpegStreamCreate(self.handle, ctypes.byref(self.jpeg)))
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self.lock = threading.Lock()

    def decode(self, items: list[tuple[int, torch.Tensor]], caller: torch.cuda.Stream) -> dict[int, torch.Tensor]:
        """Decode ``(index, encoded bytes)`` pairs the hardware takes into new ``[3, H, W]`` uint8
        tensors, by index; the others are left out (the caller decodes them another way).

        Raises:
            NvJpegError: a stream's header could not be read, or the batched decode failed.
        """
        lib = _lib()
        out: dict[int, torch.Tensor] = {}
        with self.lock, torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # Outputs are allocated on this stream: it first waits for the caller's earlier work.
            self.stream.wait_stream(caller)
            channels, sub = ctypes.c_int(), ctypes.c_int()
            widths, heights = (ctypes.c_int * _MAX_COMPONENT)(), (ctypes.c_int * _MAX_COMPONENT)()
            supported = ctypes.c_int()
            keep: list[tuple[int, torch.Tensor]] = []
            for index, data in items:
                ptr, n = data.data_ptr(), data.numel()
                _check(f"nvjpegGetImageInfo (image {index})",
                       lib.nvjpegGetImageInfo(self.handle, ptr, n, ctypes.byref(channels), ctypes.byref(sub),
                                              widths, heights))  # fmt: skip
                _check(f"nvjpegJpegStreamParseHeader (image {index})",
                       lib.nvjpegJpegStreamParseHeader(self.handle, ptr, n, self.jpeg))  # fmt: skip
                _check("nvjpegDecodeBatchedSupported",
                       lib.nvjpegDecodeBatchedSupported(self.handle, self.jpeg, ctypes.byref(supported)))  # fmt: skip
                if supported.value != 0:  # 0 means supported
                    continue
                h, w = heights[0], widths[0]
                out[index] = torch.empty((3, h, w), dtype=torch.uint8, device=self.device)
                keep.append((index, data))
            if not keep:
                return out
            k = len(keep)
            images = (_Image * k)()
            for j, (index, _) in enumerate(keep):
                t = out[index]
                h, w = t.shape[1], t.shape[2]
                for c in range(3):
                    images[j].channel[c] = t.data_ptr() + c * h * w
                    images[j].pitch[c] = w
            data_ptrs = (ctypes.c_void_p * k)(*[d.data_ptr() for _, d in keep])
            lengths = (ctypes.c_size_t * k)(*[d.numel() for _, d in keep])
            _check("nvjpegDecodeBatchedInitialize",
                   lib.nvjpegDecodeBatchedInitialize(self.handle, self.state, k, 1, _OUTPUT_RGB))  # fmt: skip
            _check("nvjpegDecodeBatched",
                   lib.nvjpegDecodeBatched(self.handle, self.state, data_ptrs, lengths, images,
                                           ctypes.c_void_p(self.stream.cuda_stream)))  # fmt: skip
            self.stream.synchronize()
            for t in out.values():
                t.record_stream(caller)  # freed later: not reused before the caller's work on it
        return out


class DecoderPool:
    """``n`` hardware decoders on ``device``, each batch split between them by encoded bytes."""

    def __init__(self, device: torch.device, n: int) -> None:
        if n < 1:
            raise ValueError(f"decoders must be >= 1, got {n}")
        self.device = device
        self.decoders = [_Decoder(device) for _ in range(n)]
        self._threads = ThreadPoolExecutor(max_workers=n, thread_name_prefix="nvjpeg")

    def __len__(self) -> int:
        return len(self.decoders)

    def decode(self, encoded: list[torch.Tensor]) -> tuple[list[torch.Tensor | None], list[int]]:
        """Decode ``encoded`` (uint8 byte tensors on the CPU) into ``[3, H, W]`` RGB on the device;
        returns the images (None where the hardware decoder does not take the stream) and the
        indices of those left out. The caller's current stream may use the images at once.

        Raises:
            NvJpegError: an image could not be read, or a decoder failed (the whole call fails).
        """
        caller = torch.cuda.current_stream(self.device)
        parts = split_by_bytes([e.numel() for e in encoded], len(self.decoders))
        jobs = [[(i, encoded[i]) for i in part] for part in parts]
        if len(jobs) == 1:
            done = [self.decoders[0].decode(jobs[0], caller)]
        else:
            futures = [self._threads.submit(d.decode, job, caller) for d, job in zip(self.decoders, jobs, strict=False)]
            done = [f.result() for f in futures]
        images: list[torch.Tensor | None] = [None] * len(encoded)
        for part in done:
            for i, t in part.items():
                images[i] = t
        return images, [i for i, t in enumerate(images) if t is None]


def split_by_bytes(sizes: list[int], n: int) -> list[list[int]]:
    """Indices ``0..len(sizes)-1`` in at most ``n`` contiguous, non-empty parts of about equal total
    size (a decoder's time follows the bytes it reads more than the image count)."""
    if not sizes:
        return []
    n = max(1, min(n, len(sizes)))
    total = sum(sizes)
    parts: list[list[int]] = [[] for _ in range(n)]
    acc = 0
    for i, s in enumerate(sizes):
        k = min(n - 1, acc * n // total) if total else i * n // len(sizes)
        # Never leave a later part empty: keep at least as many images as parts still to fill.
        k = max(k, n - (len(sizes) - i))
        parts[k].append(i)
        acc += s
    return [p for p in parts if p]


@functools.cache
def pool_for(device: torch.device, n: int) -> DecoderPool | None:
    """The process's pool of ``n`` decoders on ``device`` (made once), or None where it cannot be:
    no nvJPEG library, no GPU, or a GPU without the hardware JPEG decoder (torchvision's own
    decoder is used then)."""
    if device.type != "cuda" or n < 2:
        return None
    try:
        pool = DecoderPool(device, n)
    except NvJpegError as e:
        reason = "no hardware JPEG decoder on this GPU" if e.status == _STATUS_ARCH_MISMATCH else str(e)
        log.warning("nvJPEG decoder pool unavailable (%s): torchvision's single decoder decodes", reason)
        return None
    except (OSError, AttributeError, RuntimeError) as e:  # no library, an old one, no CUDA
        log.warning("nvJPEG decoder pool unavailable (%s): torchvision's single decoder decodes", e)
        return None
    log.info("nvJPEG: %d hardware decoders on %s", n, device)
    return pool
