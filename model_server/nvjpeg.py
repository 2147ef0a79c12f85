"""nvJPEG's hardware JPEG decoder called directly (ctypes), for the decode stage's batches.

torchvision's batched GPU decode (``torch.ops.image.decode_jpegs_cuda``) does, per call, for every
image: a header read, a CUDA tensor allocated on its own, three plane views, a second header parse
and a support check; then one ``nvjpegDecodeBatched`` and a wait for its stream. On the H100 host
that call took 10.3 ms for 128 VGA JPEGs beside a running model, where the hardware decode with a
header read per image took 7.6 ms (a probe on the H100 host; ``decode_bench.py --jpeg-decoders``
compares the two decode stages, README session 17). :class:`HardwareDecoder`
makes the same nvJPEG calls (same library, same hardware backend, the same pixels: compared
exactly on the GPU) with one output tensor per image size instead of one per image, on the
caller's stream, without waiting for it: ``nvjpegDecodeBatched`` with the hardware backend returns
once the engines are done (measured: the stream had 0.2 ms left), and whatever reads the images is
queued behind it on that stream.

The library is torchvision's own copy (``torchvision.libs``), else a system one; the handle and
decode state are the ones :func:`model_server.tuning.start_before_torch` made before torch was
imported, when there are (nvJPEG's one-time start-up is paid there). Streams the hardware does not
take (progressive JPEGs, some subsamplings: ``nvjpegDecodeBatchedSupported``) are left to the
caller, which decodes them with torchvision. :func:`hardware_decoder` returns None where there is
no library or no hardware decoder (before the A100: ``NVJPEG_STATUS_ARCH_MISMATCH``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from model_server import metrics as m
from model_server import tuning

log = logging.getLogger(__name__)

#: ``nvjpegOutputFormat_t``: planar R, G, B (what torchvision asks for in RGB mode).
OUTPUT_RGB = 3
#: The baseline JPEG's start-of-frame marker (what :func:`model_server.images.gpu_frame` reports).
SOF_BASELINE = 0xC0
#: ``nvjpegStatus_t`` of a GPU without the hardware decoder.
STATUS_ARCH_MISMATCH = 7
#: ``nvjpegBackend_t`` of the handle that reads headers on arrival (no decoding: the lightest there is).
_READER_BACKEND = 0
_MAX_COMPONENT = 4


class _Image(ctypes.Structure):
    """``nvjpegImage_t``: one pointer and one pitch per output plane."""

    _fields_ = [("channel", ctypes.c_void_p * _MAX_COMPONENT), ("pitch", ctypes.c_size_t * _MAX_COMPONENT)]


class NvJpegError(RuntimeError):
    """An nvJPEG call failed (``status``: its ``nvjpegStatus_t``). A RuntimeError, as torchvision's
    decoder raises: the decode stage then retries each request alone, so a bad JPEG fails only its own."""

    def __init__(self, call: str, status: int) -> None:
        super().__init__(f"{call} failed with nvjpegStatus {status}")
        self.call = call
        self.status = status


def _bind(lib: Any) -> None:
    """Argument and return types of the calls used here (on the library object, once)."""
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


def _check(call: str, status: int) -> None:
    if status != 0:
        raise NvJpegError(call, status)


@dataclasses.dataclass
class Headers:
    """A request's JPEGs as nvJPEG read them when it arrived (:meth:`HardwareDecoder.read_headers`):
    where each one lies in host memory, its length, and its header, so the decode stage reads nothing."""

    #: Each JPEG's address (uint64), in a buffer its request holds for as long as it lives.
    ptrs: np.ndarray
    #: Each JPEG's length in bytes (uint64).
    lengths: np.ndarray
    #: ``[n, 4]`` int32: height, width, components and ``nvjpegChromaSubsampling_t`` of each JPEG.
    info: np.ndarray

    @staticmethod
    def join(parts: list[Headers]) -> Headers:
        """Several requests' headers as one batch's, in order."""
        if len(parts) == 1:
            return parts[0]
        return Headers(np.concatenate([h.ptrs for h in parts]), np.concatenate([h.lengths for h in parts]),
                       np.concatenate([h.info for h in parts]))  # fmt: skip


#: A decoded size group: the indices (into the call's list) of the images of one size, and their
#: pixels, ``[k, 3, H, W]`` uint8 on the device in that order.
Group = tuple[list[int], torch.Tensor]


class HardwareDecoder:
    """One nvJPEG handle with the hardware backend and its decode state on ``device``.

    Several threads may call :meth:`decode` at once (``decode_bench.py --threads``): each reads its
    images' headers and builds its output table on its own (a parsed-stream object per thread, the
    GIL held), and only the batched decode itself, which uses the one decode state, runs under
    :attr:`lock`. The server decodes on one thread: with two prepare threads sharing this decoder,
    requests hung on the H100 host (session 19), as two decoders of their own had (session 18).
    """

    def __init__(self, device: torch.device, early: tuning.EarlyNvJpeg | None = None) -> None:
        self.device = device
        self.lock = threading.Lock()
        self.calls = 0  # batched decodes so far (the pipeline's warm-up decodes again only while 0)
        path = early.path if early is not None else _library_path()
        # Two views of one library: through ``lib`` (CDLL) a call releases the GIL, for the batched decode
        # (milliseconds); through ``quick`` (PyDLL) it keeps it, for the per-image header calls (about a
        # microsecond each), which would otherwise give the GIL up and wait for it back twice per call:
        # in the server, beside its other threads, that cost more than the decode saved (README, session 17).
        self.lib, self.quick = ctypes.CDLL(path), ctypes.PyDLL(path)
        _bind(self.lib)
        _bind(self.quick)
        if early is not None:
            self.handle, self.state = early.handle, early.state
        else:
            self.handle, self.state = ctypes.c_void_p(), ctypes.c_void_p()
            _check("nvjpegCreateEx(hardware)", self.lib.nvjpegCreateEx(tuning.NVJPEG_BACKEND_HARDWARE, None, None, 0,
                                                                       ctypes.byref(self.handle)))  # fmt: skip
            _check("nvjpegJpegStateCreate", self.lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.state)))
        #: Whether the hardware takes a baseline JPEG, by (channels, nvjpegChromaSubsampling_t).
        self._supported: dict[tuple[int, int], bool] = {}
        self._local = threading.local()  # each calling thread's parsed-stream object
        self._reader: ctypes.c_void_p | None = None  # read_headers' handle (made on its first use)
        self._reader_lock = threading.Lock()

    def _parsed(self) -> ctypes.c_void_p:
        """The calling thread's ``nvjpegJpegStream_t`` (made on its first use)."""
        parsed: ctypes.c_void_p | None = getattr(self._local, "parsed", None)
        if parsed is None:
            parsed = ctypes.c_void_p()
            _check("nvjpegJpegStreamCreate", self.lib.nvjpegJpegStreamCreate(self.handle, ctypes.byref(parsed)))
            self._local.parsed = parsed
        return parsed

    def read_headers(self, ptrs: np.ndarray, lengths: np.ndarray) -> np.ndarray | None:
        """Each JPEG's header (``[n, 4]`` int32: height, width, components, subsampling), read by
        ``nvjpegGetImageInfo`` with a handle of its own (the decoding handle and its lock are never
        touched), the GIL held; None when any header cannot be read (the decode stage then reads them
        itself and fails the request with nvJPEG's error). ``ptrs``/``lengths``: the JPEGs in host
        memory (uint64). The device process calls this as each request arrives
        (``--nvjpeg_early_headers``), on its event loop, while the decode stage is in a batched call."""
        try:
            return self._image_info(self._reader_handle(), ptrs, lengths)
        except NvJpegError:
            return None

    def _image_info(self, handle: ctypes.c_void_p, ptrs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """``nvjpegGetImageInfo`` of each JPEG with ``handle``, the GIL held: ``[n, 4]`` int32 rows of
        height, width, components and subsampling.

        Raises:
            NvJpegError: a header could not be read (naming the image).
        """
        get = self.quick.nvjpegGetImageInfo
        channels, sub = ctypes.c_int(), ctypes.c_int()
        widths, heights = (ctypes.c_int * _MAX_COMPONENT)(), (ctypes.c_int * _MAX_COMPONENT)()
        c_ref, s_ref = ctypes.byref(channels), ctypes.byref(sub)
        rows: list[tuple[int, int, int, int]] = []
        for i, (ptr, n) in enumerate(zip(ptrs.tolist(), lengths.tolist(), strict=True)):
            status = get(handle, ptr, n, c_ref, s_ref, widths, heights)
            if status != 0:  # the message is made only then: this loop runs per image, on the decode stage's path
                raise NvJpegError(f"nvjpegGetImageInfo (image {i})", status)
            rows.append((heights[0], widths[0], channels.value, sub.value))
        return np.array(rows, dtype=np.int32).reshape(-1, 4)

    def _reader_handle(self) -> ctypes.c_void_p:
        reader = self._reader
        if reader is None:
            with self._reader_lock:
                if self._reader is None:
                    handle = ctypes.c_void_p()
                    _check("nvjpegCreateEx(reader)",
                           self.lib.nvjpegCreateEx(_READER_BACKEND, None, None, 0, ctypes.byref(handle)))  # fmt: skip
                    self._reader = handle
                reader = self._reader
        return reader

    def decode(self, encoded: list[torch.Tensor], frames: bytes | None = None) -> tuple[list[Group], list[int]]:
        """Decode JPEG byte tensors (1-D uint8, on the CPU) to RGB on the device, on the current
        stream: the size groups the hardware decoded, and the indices of the images it does not
        take (for another decoder). Whatever the caller queues on its stream after this reads
        finished pixels; the caller may free ``encoded`` once this returns.

        ``frames``: each image's start-of-frame marker as the front end read it (0: not known). For
        a baseline image (0xC0), whether the hardware takes it is asked once per kind of image
        (channels and chroma subsampling, from nvJPEG's own header read) and remembered; for any
        other, per image. Should the batched decode still refuse, it is retried asking per image.

        Raises:
            NvJpegError: an image's header could not be read, or the batched decode failed.
        """
        return self._retrying(lambda known: self._decode(encoded, known), frames)

    def decode_headers(self, headers: Headers, frames: bytes | None = None) -> tuple[list[Group], list[int]]:
        """As :meth:`decode`, for JPEGs whose headers were read when their requests arrived: no
        header is read here, and the JPEGs are read where ``headers`` says they are."""
        return self._retrying(lambda known: self._decode_read(headers, known), frames)

    def _retrying(self, run: Callable[[bytes | None], tuple[list[Group], list[int]]],
                  frames: bytes | None) -> tuple[list[Group], list[int]]:  # fmt: skip
        """``run(frames)``; should the batched decode refuse what the remembered answers let through, ``run(None)``."""
        try:
            return run(frames)
        except NvJpegError as e:
            if frames is None or not e.call.startswith("nvjpegDecodeBatched"):
                raise
            log.warning("nvJPEG refused a batch decoded on remembered answers (%s): asking per image", e)
            return run(None)

    def _takes(self, ptr: int, n: int, i: int) -> bool:
        """Whether the hardware decodes this image (its header parsed on the calling thread's stream object)."""
        quick, handle, parsed, supported = self.quick, self.handle, self._parsed(), ctypes.c_int()
        _check(f"nvjpegJpegStreamParseHeader (image {i})", quick.nvjpegJpegStreamParseHeader(handle, ptr, n, parsed))
        _check("nvjpegDecodeBatchedSupported",
               quick.nvjpegDecodeBatchedSupported(handle, parsed, ctypes.byref(supported)))  # fmt: skip
        return supported.value == 0  # 0: the hardware takes it

    def _decode(self, encoded: list[torch.Tensor], frames: bytes | None) -> tuple[list[Group], list[int]]:
        t0 = time.perf_counter()
        ptrs = np.array([t.data_ptr() for t in encoded], dtype=np.uint64)
        lengths = np.array([t.numel() for t in encoded], dtype=np.uint64)
        return self._decode_read(Headers(ptrs, lengths, self._image_info(self.handle, ptrs, lengths)), frames, t0)

    def _decode_read(self, headers: Headers, frames: bytes | None,
                     t0: float | None = None) -> tuple[list[Group], list[int]]:  # fmt: skip
        """Which images the hardware takes (asked once per kind of baseline image), then their batched
        decode by size; ``t0``: when the host work began (the header reads included), default now."""
        t0 = time.perf_counter() if t0 is None else t0
        sizes: dict[tuple[int, int], list[int]] = {}
        rest: list[int] = []
        known = self._supported
        ptrs, lengths = headers.ptrs, headers.lengths
        for i, (h, w, c, s) in enumerate(headers.info.tolist()):
            kind = (c, s) if frames is not None and frames[i] == SOF_BASELINE else None
            takes = known.get(kind) if kind is not None else None
            if takes is None:
                takes = self._takes(int(ptrs[i]), int(lengths[i]), i)
                if kind is not None:
                    known[kind] = takes
            if takes:
                sizes.setdefault((h, w), []).append(i)
            else:
                rest.append(i)
        return self._decode_sizes(sizes, ptrs, lengths, t0), rest

    def _decode_sizes(self, sizes: dict[tuple[int, int], list[int]], ptrs: np.ndarray, lengths: np.ndarray,
                      t0: float) -> list[Group]:  # fmt: skip
        """The batched decode of the images in ``sizes`` (indices by height and width), one output
        tensor per size; ``ptrs``/``lengths``: every image's bytes (uint64, by index)."""
        if not sizes:
            m.later_observe(m.NVJPEG_HEADERS_SECONDS, time.perf_counter() - t0)
            return []
        groups: list[Group] = []
        # The nvjpegImage_t array as rows of 8 words (4 plane pointers, 4 pitches), filled by numpy.
        rows: list[np.ndarray] = []
        order: list[int] = []
        for (h, w), idx in sizes.items():
            pixels = torch.empty((len(idx), 3, h, w), dtype=torch.uint8, device=self.device)
            planes = pixels.data_ptr() + h * w * np.arange(3 * len(idx), dtype=np.uint64).reshape(-1, 3)
            part = np.zeros((len(idx), 2 * _MAX_COMPONENT), dtype=np.uint64)
            part[:, :3], part[:, _MAX_COMPONENT : _MAX_COMPONENT + 3] = planes, w
            rows.append(part)
            order += idx
            groups.append((idx, pixels))
        k = len(order)
        table = np.ascontiguousarray(np.concatenate(rows) if len(rows) > 1 else rows[0])
        images = (_Image * k).from_buffer(table.data)
        picked = np.array(order, dtype=np.intp)
        ptr_words = np.ascontiguousarray(ptrs[picked], dtype=np.uint64)
        length_words = np.ascontiguousarray(lengths[picked], dtype=np.uint64)
        data_ptrs = (ctypes.c_void_p * k).from_buffer(ptr_words.data)
        lens = (ctypes.c_size_t * k).from_buffer(length_words.data)
        stream = ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        handle = self.handle
        t1 = time.perf_counter()
        with self.lock:  # the one decode state: one batched call at a time
            self.calls += 1
            _check("nvjpegDecodeBatchedInitialize",
                   self.lib.nvjpegDecodeBatchedInitialize(handle, self.state, k, 1, OUTPUT_RGB))  # fmt: skip
            _check("nvjpegDecodeBatched",
                   self.lib.nvjpegDecodeBatched(handle, self.state, data_ptrs, lens, images, stream))  # fmt: skip
        # Where the decode stage's time goes: the host's header reads and table (t0..t1), and the batched
        # call, which returns once the engines are done (t1..now: the wait for the lock and for the GIL back included).
        m.later_observe(m.NVJPEG_HEADERS_SECONDS, t1 - t0)
        m.later_observe(m.NVJPEG_DECODE_SECONDS, time.perf_counter() - t1)
        return groups


def pinned_bytes(size: int) -> np.ndarray:
    """``size`` bytes of page-locked host memory (torch's pinned allocator, which caches freed blocks),
    as a writable uint8 array: a buffer request bodies are read into, so the hardware decoder's copies
    of their JPEGs to the device go straight from it. On the H100 host one decoder read 128 VGA JPEGs
    from page-locked memory at 22,100/s beside a model against 17,200/s from pageable memory
    (``nvjpeg_context_probe.py --set pinned``, README session 19)."""
    return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy()


def _library_path() -> str:
    """The nvJPEG library torchvision's decoder uses (its wheel's copy), else the system's."""
    for name in tuning.nvjpeg_candidates():
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return name
    raise OSError(f"no nvJPEG library among {', '.join(tuning.nvjpeg_candidates())}")


_DECODERS: dict[int, HardwareDecoder | None] = {}
_DECODERS_LOCK = threading.Lock()


def hardware_decoder(device: torch.device) -> HardwareDecoder | None:
    """The process's hardware decoder on ``device`` (made on the handle made before torch when that
    is the hardware backend on this device), or None where there can be none: a CPU device, no
    nvJPEG library, or a GPU without the hardware JPEG decoder (torchvision decodes then)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _DECODERS_LOCK:
        if index not in _DECODERS:
            _DECODERS[index] = _first_decoder(index)
        return _DECODERS[index]


def _first_decoder(index: int) -> HardwareDecoder | None:
    early = tuning.early_nvjpeg()
    if early is not None and (early.backend != tuning.NVJPEG_BACKEND_HARDWARE or early.ordinal != index):
        early = None
    device = torch.device("cuda", index)
    try:
        with torch.cuda.device(index):
            return HardwareDecoder(device, early)
    except NvJpegError as e:
        why = "no hardware JPEG decoder on this GPU" if e.status == STATUS_ARCH_MISMATCH else str(e)
        log.warning("nvJPEG hardware decoder unavailable (%s): torchvision's decoder decodes", why)
    except (OSError, AttributeError) as e:  # no library, or an old one without these calls
        log.warning("nvJPEG hardware decoder unavailable (%s): torchvision's decoder decodes", e)
    return None


__all__ = ["Group", "HardwareDecoder", "Headers", "NvJpegError", "hardware_decoder", "pinned_bytes"]
