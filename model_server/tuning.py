"""Start-up helpers of the device process and the front ends, torch-free: the threads the CLI
starts early, and the garbage collector's state after start-up.

Torch-free because a front end never imports torch and the CLI imports this before torch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import threading
import time

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


def device_ordinal(device: str) -> int | None:
    """The CUDA device number a ``--device`` value names (``auto`` and ``cuda``: 0), None for the CPU."""
    if device == "cpu":
        return None
    if device in ("auto", "cuda"):
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        return int(device[5:])
    return None  # not a device the predictor accepts; load_model says so


def start_before_torch(device: str, *, took: dict[str, float]) -> threading.Thread | None:
    """Start the CUDA driver and retain the device's primary context through the driver library, in a
    daemon thread, before the device process imports torch (3-5 s on the H100 host, the floor's first
    step too): torch's first CUDA call then finds the context created (``CUDA context`` in the start-up
    log: 0.27-0.34 s on the H100 host before, 0.03 s after). None for the CPU.

    The driver calls release the GIL. It fails silently: without a driver or a GPU (a CPU machine) it
    stops there, torch decides, and torch's own calls report errors. ``took["driver"]`` gets its
    seconds when the context is there.
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
            if lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) != 0:
                return
        except (OSError, AttributeError) as e:  # no driver library here
            log.debug("early CUDA driver start skipped: %s", e)
            return
        took["driver"] = time.perf_counter() - t0

    thread = threading.Thread(target=run, name="cuda-driver", daemon=True)
    thread.start()
    return thread


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
