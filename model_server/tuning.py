"""Start-up helpers of the device process and the front ends, torch-free: the threads the CLI
starts early, and the garbage collector's state after start-up.

Torch-free because a front end never imports torch and the CLI imports this before torch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib.util
import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EarlyStart:
    """What the CLI starts before its imports finish: a thread that creates the CUDA context and
    loads cuDNN/cuBLAS (``libraries``) and, started by it once the context exists, nvJPEG's warm-up
    (``decoder``, None until then or without GPU decode)."""

    libraries: threading.Thread
    decoder: threading.Thread | None = None

    def join(self) -> None:
        self.libraries.join()
        if self.decoder is not None:
            self.decoder.join()


#: The CUDA driver library (the driver's own, not the toolkit's: present wherever a GPU is usable).
CUDA_DRIVER_LIB = "libcuda.so.1"
#: nvJPEG where torchvision's image library does not bring its own (``torchvision.libs/libnvjpeg*``).
NVJPEG_LIBS = ("libnvjpeg.so.13", "libnvjpeg.so.12")
#: ``nvjpegBackend_t``: the hardware decoder (A100, H100), else the default.
NVJPEG_BACKEND_HARDWARE, NVJPEG_BACKEND_DEFAULT = 3, 0
#: What start_before_torch made and keeps for the process's life (a context handle, an nvJPEG handle).
_KEPT: list[object] = []


@dataclasses.dataclass
class EarlyNvJpeg:
    """The nvJPEG handle and decode state :func:`start_before_torch` made (kept for the process's
    life), for the device's decoder to use (:mod:`model_server.nvjpeg`)."""

    lib: ctypes.CDLL
    path: str
    handle: ctypes.c_void_p
    state: ctypes.c_void_p
    backend: int  # NVJPEG_BACKEND_HARDWARE or NVJPEG_BACKEND_DEFAULT
    ordinal: int  # the CUDA device it was made on


_EARLY_NVJPEG: list[EarlyNvJpeg] = []


def early_nvjpeg() -> EarlyNvJpeg | None:
    """What :func:`start_before_torch` made for nvJPEG, once made; None before that, or without it."""
    return _EARLY_NVJPEG[0] if _EARLY_NVJPEG else None


def device_ordinal(device: str) -> int | None:
    """The CUDA device number a ``--device`` value names (``auto`` and ``cuda``: 0), None for the CPU."""
    if device == "cpu":
        return None
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return None  # not a device the predictor accepts; load_model says so


def torchvision_dirs() -> list[Path]:
    """torchvision's package folders, located without importing it (``import torchvision`` pulls in
    its models and ``torch._dynamo``); empty where it is not installed."""
    spec = importlib.util.find_spec("torchvision")
    return [Path(r) for r in (spec.submodule_search_locations or [])] if spec is not None else []


def nvjpeg_candidates() -> list[str]:
    """nvJPEG libraries to try, torchvision's own first (its wheel's ``torchvision.libs``): the handle
    made there must be in the same library the decode later uses, for its start-up to count."""
    bundled = sorted(
        str(p) for d in torchvision_dirs() for p in d.parent.joinpath("torchvision.libs").glob("libnvjpeg*.so*")
    )
    return [*bundled, *NVJPEG_LIBS]


def start_before_torch(device: str, *, gpu_decode: bool, took: dict[str, float]) -> threading.Thread | None:
    """Start, in a daemon thread, before the device process imports torch (3-5 s on the H100 host, the
    floor's first step too), the device-side start-up that needs no torch (None for the CPU):

    - the CUDA driver and the device's primary context, through the driver library: torch's first CUDA
      call then finds the context made (``CUDA context`` in the start-up log: 0.27-0.34 s on the H100
      host before, 0.03 s after);
    - with GPU decoding, an nvJPEG handle (hardware backend) in the nvJPEG library torchvision's decode
      uses: nvJPEG's one-time start-up in the process is then done, and the decoder's warm-up took
      0.30 s instead of 0.78-0.98 s on the H100 host (the ``*-s15-server.log`` files next to the
      records). The handle is kept (never destroyed) for the process's life.

    The driver and nvJPEG calls release the GIL. Each step fails silently: without a driver, a GPU or
    nvJPEG (a CPU machine) it stops there, torch decides, and torch's own calls report errors.
    ``took`` gets the seconds of each step done (``driver``, ``nvjpeg``).
    """
    ordinal = device_ordinal(device)
    if ordinal is None:
        return None

    def run() -> None:
        t0 = time.perf_counter()
        try:
            lib = ctypes.CDLL(CUDA_DRIVER_LIB)
            dev, ctx = ctypes.c_int(0), ctypes.c_void_p()
            if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(dev), ordinal) != 0:
                return
            # Retained for the process's life: torch's runtime uses this same primary context.
            if lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0 or lib.cuCtxSetCurrent(ctx) != 0:
                return
        except (OSError, AttributeError) as e:  # no driver library here
            log.debug("early CUDA driver start skipped: %s", e)
            return
        _KEPT.append(ctx)
        t1 = time.perf_counter()
        took["driver"] = t1 - t0
        if gpu_decode and _create_nvjpeg_handle(ordinal):
            took["nvjpeg"] = time.perf_counter() - t1

    thread = threading.Thread(target=run, name="before-torch", daemon=True)
    thread.start()
    return thread


def _create_nvjpeg_handle(ordinal: int) -> bool:
    """An nvJPEG handle and decode state in the first loadable candidate library, made on device
    ``ordinal``'s context (kept, and offered by :func:`early_nvjpeg`); False if none."""
    for name in nvjpeg_candidates():
        try:
            nvjpeg = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        handle, state = ctypes.c_void_p(), ctypes.c_void_p()
        try:
            backend = next((b for b in (NVJPEG_BACKEND_HARDWARE, NVJPEG_BACKEND_DEFAULT)
                            if nvjpeg.nvjpegCreateEx(b, None, None, 0, ctypes.byref(handle)) == 0), None)  # fmt: skip
            if backend is not None and nvjpeg.nvjpegJpegStateCreate(handle, ctypes.byref(state)) == 0:
                _KEPT.extend([nvjpeg, handle, state])
                _EARLY_NVJPEG.append(EarlyNvJpeg(nvjpeg, name, handle, state, backend, ordinal))
                return True
        except AttributeError:  # not nvJPEG after all
            continue
        log.debug("nvJPEG handle not created in %s", name)
        return False
    return False


def freeze_so_far() -> None:
    """Move every object alive now out of the garbage collector's reach (``gc.freeze``) without a
    collection first, so that :func:`settle_after_startup`'s full collection, on the path to ready,
    walks only what came after (85-190 ms less a process on the CPU here).

    Only where start-up leaves (almost) no cyclic garbage behind: after the imports (about 20
    unreachable objects measured) and after :func:`load_model` (none measured).
    """
    gc.freeze()


def settle_after_startup() -> None:
    """Collect once, then move every object alive after start-up (modules, the model, KServe's app)
    out of the garbage collector's reach (``gc.freeze``): later collections walk only what requests
    allocate, so no multi-millisecond full collection lands in a request's latency."""
    gc.collect()
    gc.freeze()
    log.debug("gc: %d start-up objects frozen", gc.get_freeze_count())
