"""Probe: do nvJPEG hardware decoders in CUDA contexts of their own, in one process, overlap?

Session 14 found that hardware decoders sharing the process's (primary) context do not overlap
(2 decoders 0.78x one), while decoders in separate *processes* did (4 processes 2.1x, the JPEG
engines 100 % busy), but a second process's context time-slices the GPU with the model's (session
15). This probe asks whether the engines' parallelism can be had inside the device process: each
decoder thread makes a context of its own current (``cuCtxCreate``), creates its nvJPEG handle
(hardware backend) there and decodes batches of VGA JPEGs into memory of that context, with no
kernel of its own; optionally it copies each batch to a buffer of the primary context
(``cuMemcpyPeerAsync``, copy engine). Measured: JPEGs/s of all decoders together, alone and beside
a model replaying a CUDA graph in the primary context, and that model's replays/s (time-slicing
would show there); NVML's JPEG-engine utilisation.

    python benchmarks/nvjpeg_context_probe.py --window-s 3 --name nvjpeg-context-probe

``--set pinned`` asks instead whether nvJPEG decodes faster from page-locked bitstreams: the
process's context only, one and two direct decoders and torchvision's op (what the server calls),
each with the JPEGs in pageable and in pinned memory, alone and beside the model.

``--set priority`` asks whether the decoders keep more of their speed beside the model when their
CUDA stream has the GPU's highest priority (the model's stream has the lowest, the default): the
direct decoder reading pinned bitstreams and torchvision's op, each on a normal and on a
high-priority stream, alone and beside the model (``--decode_stream_priority`` of the server).

``--set output`` asks how much of the batched call is nvJPEG's own colour conversion: the direct
decoder (pinned bitstreams, high-priority stream) asked for planar RGB (what the server asks for),
interleaved RGB and planar YUV (what the engines write, no conversion kernel of nvJPEG's on the
stream), alone and beside the model.

``--set feed`` asks whether the server's way of calling the same decoder costs it: a fixed batch of
128 (what every other arm does) against batch sizes that change every call (101–128, each call
initialising the decoder for its size, as the server's does) and against outputs allocated by torch's
caching allocator with the table built anew every call, and both.

``--set crops`` asks what the server's resize and crop cost: their GPU time for a batch alone and
beside the model, and the decoder fed as the server feeds it (sizes varying, torch outputs) without
the crop, with the crop queued on its stream after each call (as the server's decode stage does), and
with the crop on a stream of its own that waits for the call's event (the thread then waits for the
decode only), and the same for ``--crop_kernel triton``'s kernel (its GPU time launched by Triton
and as the server launches its compiled binary, the pixels it rounds otherwise, and queued after
each call). Session 22's run also timed a two-pass crop (``--crop_passes
2``, commit adc2381, reverted): ``nvjpeg-crops-probe-s22.txt``. (An arm
that never waited for the stream between calls stalled beside the model and hung the probe; it was
removed, and its output is kept in ``nvjpeg-crops-probe-s21-hang.txt``.)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from loadtest._payloads import photo_set  # noqa: E402
from model_server import tuning  # noqa: E402

OUTPUT_YUV, OUTPUT_RGB, OUTPUT_RGBI = 1, 3, 5
#: Batch sizes a ``vary`` decoder cycles through (the server's 32-JPEG batches of 128 ranged 101–128).
VARIED_SIZES = (128, 113, 124, 101, 127, 118, 126, 109, 122, 116)


class _Image(ctypes.Structure):
    _fields_ = [("channel", ctypes.c_void_p * 4), ("pitch", ctypes.c_size_t * 4)]


def _cuda() -> Any:
    cu = ctypes.CDLL(tuning.CUDA_DRIVER_LIB)
    for name in ("cuCtxSetCurrent", "cuCtxGetCurrent", "cuMemAlloc_v2", "cuStreamCreate",
                 "cuStreamSynchronize", "cuMemcpyPeerAsync", "cuCtxPopCurrent_v2", "cuDeviceGet",
                 "cuStreamCreateWithPriority", "cuCtxGetStreamPriorityRange"):  # fmt: skip
        getattr(cu, name).restype = ctypes.c_int
    return cu


def _nvjpeg() -> Any:
    for name in tuning.nvjpeg_candidates():
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        p, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
        lib.nvjpegCreateEx.argtypes = [i, p, p, ctypes.c_uint, ctypes.POINTER(p)]
        lib.nvjpegJpegStateCreate.argtypes = [p, ctypes.POINTER(p)]
        lib.nvjpegDecodeBatchedInitialize.argtypes = [p, p, i, i, i]
        lib.nvjpegDecodeBatched.argtypes = [p, p, ctypes.POINTER(p), ctypes.POINTER(sz), ctypes.POINTER(_Image), p]
        return lib
    raise OSError("no nvJPEG library")


def _ok(what: str, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: {status}")


class Decoder:
    """One hardware nvJPEG decoder on a thread of its own; ``own_context``: in a context made for it."""

    def __init__(self, cu: Any, nj: Any, jpegs: list[bytes], sizes: list[tuple[int, int]], *, own_context: bool,
                 fmt: int, copy_to: torch.Tensor | None, primary: ctypes.c_void_p,
                 pinned: bool = False, high_priority: bool = False, vary: bool = False,
                 torch_out: bool = False, crop: str = "") -> None:  # fmt: skip
        self.cu, self.nj, self.fmt, self.pinned, self.high_priority = cu, nj, fmt, pinned, high_priority
        # vary: each call decodes the first k JPEGs, k cycling over VARIED_SIZES (the server's batches vary);
        # torch_out: each call's output comes from torch's caching allocator, its table built anew (as the server's)
        self.vary, self.torch_out, self._k = vary, torch_out, 0
        # crop: the server's resize and crop of each call's images (torch outputs): "decoder", queued on the
        # decoder's stream right after the call, before the wait for that stream (as the server's decode stage
        # queues it); "own", on a stream of its own (the GPU's highest priority) that waits for an event of
        # the call, so the thread waits for the decode only, with one crop in flight; "": none
        self.crop = crop
        # "triton": as "decoder", with --crop_kernel triton's kernel, launched as the server launches it
        if crop not in ("", "decoder", "own", "triton"):
            raise ValueError(f"crop must be '', 'decoder', 'own' or 'triton', got {crop!r}")
        if crop and (not torch_out or len(set(sizes)) != 1):
            raise ValueError("crop needs torch_out and JPEGs of one size")
        self._crop_stream: torch.cuda.Stream | None = None
        self._cropped: torch.cuda.Event | None = None
        self.decoded = 0  # JPEGs decoded since run_arm reset it
        self.own_context, self.copy_to, self.primary = own_context, copy_to, primary
        self.jpegs, self.sizes = jpegs, sizes
        self.batches = 0
        self.error: str | None = None
        self.ready = threading.Event()
        self.go = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait()
        if self.error:
            raise RuntimeError(self.error)

    def _setup(self) -> None:
        cu, nj = self.cu, self.nj
        self.ctx = ctypes.c_void_p()
        if self.own_context:
            dev = ctypes.c_int()
            _ok("cuDeviceGet", cu.cuDeviceGet(ctypes.byref(dev), 0))
            # made current on this thread; CUDA 13's cuCtxCreate is _v4 (a params pointer first)
            if hasattr(cu, "cuCtxCreate_v2"):
                _ok("cuCtxCreate_v2", cu.cuCtxCreate_v2(ctypes.byref(self.ctx), 0, dev))
            else:
                _ok("cuCtxCreate_v4", cu.cuCtxCreate_v4(ctypes.byref(self.ctx), None, 0, dev))
        else:
            self.ctx = self.primary
            _ok("cuCtxSetCurrent", cu.cuCtxSetCurrent(self.primary))
        self.handle, self.state = ctypes.c_void_p(), ctypes.c_void_p()
        _ok("nvjpegCreateEx", nj.nvjpegCreateEx(3, None, None, 0, ctypes.byref(self.handle)))  # 3: hardware
        _ok("nvjpegJpegStateCreate", nj.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.state)))
        self.stream = ctypes.c_void_p()
        if self.high_priority:  # non-blocking, at the context's greatest (numerically lowest) priority
            least, greatest = ctypes.c_int(), ctypes.c_int()
            _ok("cuCtxGetStreamPriorityRange", cu.cuCtxGetStreamPriorityRange(ctypes.byref(least),
                                                                              ctypes.byref(greatest)))  # fmt: skip
            _ok("cuStreamCreateWithPriority", cu.cuStreamCreateWithPriority(ctypes.byref(self.stream), 1,
                                                                            greatest.value))  # fmt: skip
        else:
            _ok("cuStreamCreate", cu.cuStreamCreate(ctypes.byref(self.stream), 1))  # non-blocking
        n = len(self.jpegs)
        total = sum(3 * h * w for h, w in self.sizes)
        self.out = ctypes.c_uint64()
        _ok("cuMemAlloc", cu.cuMemAlloc_v2(ctypes.byref(self.out), ctypes.c_size_t(total)))
        self.table = self._table(self.out.value, n)
        self.total = total
        if self.pinned:  # the bitstreams in page-locked memory: nvJPEG's copies of them need no staging
            self.host = pinned_bitstreams(self.jpegs)
            self.ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in self.host])
        else:
            self.bufs = [ctypes.create_string_buffer(b, len(b)) for b in self.jpegs]
            self.ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(b) for b in self.bufs])
        self.lens = (ctypes.c_size_t * n)(*[len(b) for b in self.jpegs])

    def _table(self, at: int, n: int) -> Any:
        """The ``nvjpegImage_t`` array of the first ``n`` images, laid out one after another from device
        address ``at``: three planes each, or one interleaved plane for RGBI."""
        table = (_Image * n)()
        for j, (h, w) in enumerate(self.sizes[:n]):
            if self.fmt == OUTPUT_RGBI:  # one interleaved plane
                table[j].channel[0], table[j].pitch[0] = at, 3 * w
            else:  # three planes (YUV's chroma ones need less, and get as much)
                for c in range(3):
                    table[j].channel[c], table[j].pitch[c] = at + c * h * w, w
            at += 3 * h * w
        return table

    def _crop(self, out: torch.Tensor, n: int) -> None:
        from model_server.preprocess import resize_crop_pixels

        h, w = self.sizes[0]
        pixels = out[: n * 3 * h * w].view(n, 3, h, w)
        if self.crop == "decoder":
            resize_crop_pixels(pixels).to(torch.uint8)
            return
        if self.crop == "triton":
            from model_server.crop_kernel import cubin_crop

            cubin_crop(pixels.device)(pixels)  # as the server launches it
            return
        if self._crop_stream is None:
            self._crop_stream = torch.cuda.Stream(priority=-1000)  # type: ignore[no-untyped-call]
        decoded = torch.cuda.Event()  # type: ignore[no-untyped-call]
        decoded.record()  # on the decoder's stream (current)
        if self._cropped is not None:
            self._cropped.synchronize()  # one crop in flight: the last call's, mostly done meanwhile
        with torch.cuda.stream(self._crop_stream):
            self._crop_stream.wait_event(decoded)
            out.record_stream(self._crop_stream)  # freed on the decoder's stream, used on this one
            resize_crop_pixels(pixels).to(torch.uint8)
            self._cropped = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self._cropped.record()

    def _once(self) -> None:
        if self.torch_out:  # torch's allocations and kernels on the decoder's stream, as the server's side stream
            with torch.cuda.stream(torch.cuda.ExternalStream(self.stream.value)):
                self._call()
        else:
            self._call()

    def _call(self) -> None:
        nj, n, table = self.nj, len(self.jpegs), self.table
        if self.vary:
            n = min(n, VARIED_SIZES[self._k % len(VARIED_SIZES)])
            self._k += 1
        out = None
        if self.torch_out:
            out = torch.empty(self.total, dtype=torch.uint8, device="cuda")
            table = self._table(out.data_ptr(), n)
        _ok("init", nj.nvjpegDecodeBatchedInitialize(self.handle, self.state, n, 1, self.fmt))
        _ok("decode", nj.nvjpegDecodeBatched(self.handle, self.state, self.ptrs, self.lens, table, self.stream))
        self.decoded += n
        if self.crop and out is not None:
            self._crop(out, n)
        if self.copy_to is not None:
            _ok("copy", self.cu.cuMemcpyPeerAsync(ctypes.c_uint64(self.copy_to.data_ptr()), self.primary,
                                                  self.out, self.ctx, ctypes.c_size_t(self.total),
                                                  self.stream))  # fmt: skip
        # Never skipped: without this wait, calls fed as the server feeds them stalled beside the model (1,109
        # JPEGs/s) and the probe then hung (README session 21, nvjpeg-crops-probe-s21-hang.txt)
        _ok("sync", self.cu.cuStreamSynchronize(self.stream))

    def _run(self) -> None:
        try:
            self._setup()
            self._once()
        except Exception as e:  # reported to the main thread
            self.error = f"{type(e).__name__}: {e}"
            self.ready.set()
            return
        self.ready.set()
        decode_until_stopped(self)


def decode_until_stopped(d: Any) -> None:
    """A decoder thread's loop: batch after batch (``d._once()``, counted) while ``d.go`` is set, until
    ``d.stop``; an error is kept in ``d.error`` and pauses it."""
    while True:
        d.go.wait()
        if d.stop.is_set():
            return
        try:
            while d.go.is_set():
                d._once()
                d.batches += 1
        except Exception as e:
            d.error = f"{type(e).__name__}: {e}"
            d.go.clear()


def pinned_bitstreams(jpegs: list[bytes]) -> list[torch.Tensor]:
    """The JPEGs back to back in one page-locked buffer, one uint8 view each."""
    buf = torch.empty(sum(len(b) for b in jpegs), dtype=torch.uint8, pin_memory=True)
    views, at = [], 0
    for b in jpegs:
        view = buf[at : at + len(b)]
        view.copy_(torch.frombuffer(bytearray(b), dtype=torch.uint8))
        views.append(view)
        at += len(b)
    return views


class TorchvisionDecoder:
    """torchvision's batched nvJPEG op on a thread and a side stream of its own, with the bitstreams
    in pageable (``torch.frombuffer``) or page-locked memory; the same go/stop API as :class:`Decoder`."""

    def __init__(self, device: torch.device, jpegs: list[bytes], *, pinned: bool, high_priority: bool = False) -> None:
        from model_server.preprocess import READ_MODE_RGB, image_ops

        self.ops, self.mode, self.device = image_ops(), READ_MODE_RGB, device
        if self.ops is None:
            raise RuntimeError("torchvision's image ops did not load")
        self.encoded = pinned_bitstreams(jpegs) if pinned else [torch.frombuffer(bytearray(b), dtype=torch.uint8)
                                                                for b in jpegs]  # fmt: skip
        self.jpegs = jpegs
        # torch maps -1000 to the GPU's highest priority (as the server's --decode_stream_priority high)
        self.stream = torch.cuda.Stream(device, priority=-1000 if high_priority else 0)  # type: ignore[no-untyped-call]
        self.batches = 0
        self.error: str | None = None
        self.go, self.stop = threading.Event(), threading.Event()
        self._once()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _once(self) -> None:
        with torch.cuda.stream(self.stream):
            self.ops.decode_jpegs_cuda(self.encoded, self.mode, self.device)
        self.stream.synchronize()  # type: ignore[no-untyped-call]

    def _run(self) -> None:
        decode_until_stopped(self)


def _engine_sampler() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        pynvml.nvmlDeviceGetJpgUtilization(h)
        return lambda: float(pynvml.nvmlDeviceGetJpgUtilization(h)[0])
    except Exception:
        return None


def run_arm(decoders: list[Any], window_s: float, model: Any | None, sample: Any) -> dict[str, Any]:
    for d in decoders:
        d.batches = 0
        d.decoded = 0
    util: list[float] = []
    t0 = time.perf_counter()
    if model is not None:
        model.__enter__()
    for d in decoders:
        d.go.set()
    while time.perf_counter() - t0 < window_s:
        time.sleep(0.25)
        if sample is not None:
            util.append(sample())
    for d in decoders:
        d.go.clear()
    elapsed = time.perf_counter() - t0
    if model is not None:
        model.__exit__(None, None, None)
    time.sleep(0.1)
    n = len(decoders[0].jpegs) if decoders else 0
    res: dict[str, Any] = {
        # a direct decoder counts its JPEGs (its batches may vary); torchvision's op decodes all n each time
        "jpegs_per_s": round(sum(getattr(d, "decoded", 0) or d.batches * n for d in decoders) / elapsed, 1),
        "per_decoder_batches": [d.batches for d in decoders],
        "errors": [d.error for d in decoders if d.error],
    }
    if util:
        res["jpeg_engine_util_median"] = statistics.median(util)
    if model is not None:
        res["model_replays_per_s"] = model.replays_per_s
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--window-s", type=float, default=3.0)
    ap.add_argument("--counts", default="1,2,3,4")
    ap.add_argument("--name", default="", help="the record's name (default: nvjpeg-<set>-probe)")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    sets = ("contexts", "pinned", "priority", "output", "feed", "crops")
    ap.add_argument("--set", dest="arm_set", choices=sets, default="contexts",
                    help="contexts: decoders in contexts of their own (session 18); pinned: the process's "
                         "context only, the bitstreams in pageable vs page-locked memory, direct and "
                         "through torchvision's op (session 19); priority: the decoders' stream at normal "
                         "vs the highest priority, beside the model (session 20); output: planar RGB, interleaved "
                         "RGB and planar YUV output (session 21); feed: a fixed batch of 128 against batch "
                         "sizes that vary per call and outputs from torch's allocator (session 21); crops: the "
                         "server's crop's GPU time, and the decoder fed as the server feeds it without the crop, "
                         "with the crop queued on its stream after each call (session 21) and with the crop on "
                         "a stream of its own (session 22), and --crop_kernel triton's crop")  # fmt: skip
    args = ap.parse_args(argv)
    import io

    from decode_bench import ModelLoad
    from PIL import Image

    dev = torch.device("cuda", 0)
    torch.zeros(1, device=dev)
    cu = _cuda()
    nj = _nvjpeg()
    primary = ctypes.c_void_p()
    _ok("cuCtxGetCurrent", cu.cuCtxGetCurrent(ctypes.byref(primary)))
    photos = [p.jpeg for p in photo_set("vga")]
    jpegs = (photos * (args.batch // len(photos) + 1))[: args.batch]
    sizes = []
    for b in jpegs:
        with Image.open(io.BytesIO(b)) as im:
            sizes.append((im.height, im.width))
    total = sum(3 * h * w for h, w in sizes)
    counts = [int(c) for c in args.counts.split(",")]
    sample = _engine_sampler()
    model = ModelLoad(dev, "side-graph")
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "batch": args.batch,
                           "window_s": args.window_s, "arms": {}}  # fmt: skip
    arms = out["arms"]

    def log(name: str, res: dict[str, Any]) -> None:
        arms[name] = res
        print(name, json.dumps(res), flush=True)

    model.__enter__()
    time.sleep(args.window_s)
    model.__exit__(None, None, None)
    log("model_alone", {"model_replays_per_s": model.replays_per_s})
    made: dict[tuple[bool, int, bool], list[Decoder]] = {}

    def decoders(own: bool, k: int, fmt: int = OUTPUT_RGB, copy: bool = False) -> list[Decoder]:
        key = (own, fmt, copy)
        pool = made.setdefault(key, [])
        while len(pool) < k:
            dst = torch.empty(total, dtype=torch.uint8, device=dev) if copy else None
            pool.append(Decoder(cu, nj, jpegs, sizes, own_context=own, fmt=fmt, copy_to=dst, primary=primary))
        return pool[:k]

    if args.arm_set == "pinned":
        for k in counts[:2]:
            for pinned in (False, True):
                tag = f"shared_x{k}_{'pinned' if pinned else 'pageable'}"
                ds = [Decoder(cu, nj, jpegs, sizes, own_context=False, fmt=OUTPUT_RGB, copy_to=None, primary=primary,
                              pinned=pinned) for _ in range(k)]  # fmt: skip
                log(f"{tag}_alone", run_arm(ds, args.window_s, None, sample))
                log(f"{tag}_beside_model", run_arm(ds, args.window_s, model, sample))
                for d in ds:
                    d.stop.set()
                    d.go.set()
        for pinned in (False, True):
            tv = TorchvisionDecoder(dev, jpegs, pinned=pinned)
            tag = f"torchvision_{'pinned' if pinned else 'pageable'}"
            log(f"{tag}_alone", run_arm([tv], args.window_s, None, sample))
            log(f"{tag}_beside_model", run_arm([tv], args.window_s, model, sample))
            tv.stop.set()
            tv.go.set()

    def direct_arms(tag: str, fmt: int, high: bool, **feed: Any) -> None:
        """One direct decoder reading pinned bitstreams in the process's context: alone, then beside the model."""
        d = Decoder(cu, nj, jpegs, sizes, own_context=False, fmt=fmt, copy_to=None, primary=primary,
                    pinned=True, high_priority=high, **feed)  # fmt: skip
        log(f"{tag}_alone", run_arm([d], args.window_s, None, sample))
        log(f"{tag}_beside_model", run_arm([d], args.window_s, model, sample))
        d.stop.set()
        d.go.set()

    if args.arm_set == "priority":
        for high in (False, True):
            tag = "high" if high else "normal"
            direct_arms(f"direct_pinned_{tag}", OUTPUT_RGB, high)
            tv = TorchvisionDecoder(dev, jpegs, pinned=False, high_priority=high)
            log(f"torchvision_{tag}_beside_model", run_arm([tv], args.window_s, model, sample))
            tv.stop.set()
            tv.go.set()
    if args.arm_set == "output":
        for label, fmt in (("rgb", OUTPUT_RGB), ("rgbi", OUTPUT_RGBI), ("yuv", OUTPUT_YUV)):
            direct_arms(f"direct_{label}", fmt, True)
    if args.arm_set == "crops":
        from model_server.preprocess import resize_crop_pixels

        h, w = sizes[0]
        x = torch.randint(0, 255, (args.batch, 3, h, w), dtype=torch.uint8, device=dev)

        def crop_ms(crop: Any) -> float:
            times = []
            for _ in range(25):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                crop(x).to(torch.uint8)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times[5:])

        from model_server.crop_kernel import cubin_crop, triton_resize_crop

        cubin = cubin_crop(dev)  # the server's launch of the compiled binary; triton_resize_crop: Triton's
        for tag, crop in (("crop", resize_crop_pixels), ("crop_triton", triton_resize_crop), ("crop_cubin", cubin)):
            crop(x)  # Triton compiles its kernel on the first call
            log(f"{tag}_alone", {"crop_ms": round(crop_ms(crop), 3)})
            model.__enter__()
            beside = crop_ms(crop)
            model.__exit__(None, None, None)
            log(f"{tag}_beside_model", {"crop_ms": round(beside, 3), "model_replays_per_s": model.replays_per_s})
        # the pixels the Triton kernel rounds otherwise, on the probe's photos decoded by torchvision
        from torchvision.io import decode_jpeg

        photos = torch.stack([decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)) for b in jpegs]).to(dev)
        diff = (triton_resize_crop(photos).int() - resize_crop_pixels(photos).to(torch.uint8).int()).abs()
        log("crop_triton_pixels", {"differing_px": int((diff > 0).sum()), "max_abs_diff": int(diff.max()),
                                   "px": diff.numel()})  # fmt: skip
        diff = (cubin(photos).int() - triton_resize_crop(photos).int()).abs()
        log("crop_cubin_vs_triton_pixels", {"differing_px": int((diff > 0).sum()), "max_abs_diff": int(diff.max()),
                                            "px": diff.numel()})  # fmt: skip
        feed = {"vary": True, "torch_out": True}
        direct_arms("direct_server_feed", OUTPUT_RGB, True, **feed)
        direct_arms("direct_server_feed_crops", OUTPUT_RGB, True, **feed, crop="decoder")
        direct_arms("direct_server_feed_crops_own_stream", OUTPUT_RGB, True, **feed, crop="own")
        direct_arms("direct_server_feed_crops_triton", OUTPUT_RGB, True, **feed, crop="triton")
    if args.arm_set == "feed":
        direct_arms("direct_fixed", OUTPUT_RGB, True)
        direct_arms("direct_varied_sizes", OUTPUT_RGB, True, vary=True)
        direct_arms("direct_torch_outputs", OUTPUT_RGB, True, torch_out=True)
        direct_arms("direct_varied_torch_outputs", OUTPUT_RGB, True, vary=True, torch_out=True)
    for own in (False, True) if args.arm_set == "contexts" else ():
        for k in counts:
            if not own and k > 2:
                continue
            tag = "own" if own else "shared"
            log(f"{tag}_ctx_x{k}_alone", run_arm(decoders(own, k), args.window_s, None, sample))
            log(f"{tag}_ctx_x{k}_beside_model", run_arm(decoders(own, k), args.window_s, model, sample))
    for k in counts if args.arm_set == "contexts" else []:
        log(f"own_ctx_x{k}_yuv_beside_model", run_arm(decoders(True, k, OUTPUT_YUV), args.window_s, model, sample))
        log(f"own_ctx_x{k}_copy_beside_model",
            run_arm(decoders(True, k, OUTPUT_RGB, True), args.window_s, model, sample))  # fmt: skip
    # the mix the server would run: its own decoder in the primary context plus K own-context ones
    for k in counts[:3] if args.arm_set == "contexts" else []:
        mix = decoders(False, 1) + decoders(True, k, OUTPUT_RGB, True)
        log(f"shared_x1_plus_own_x{k}_copy_beside_model", run_arm(mix, args.window_s, model, sample))
    model.__enter__()
    time.sleep(args.window_s)
    model.__exit__(None, None, None)
    log("model_alone_again", {"model_replays_per_s": model.replays_per_s})
    for pool in made.values():
        for d in pool:
            d.stop.set()
            d.go.set()
    from records import write_record

    name = args.name or f"nvjpeg-{args.arm_set}-probe"
    write_record(name, "benchmarks/nvjpeg_context_probe.py", sys.argv[1:] if argv is None else argv, dev,
                 flat_metrics(out), args.results_dir)  # fmt: skip
    return 0


#: An arm's figure, and the unit-suffixed name it gets in the record's metrics.
_METRIC_NAMES = {
    "jpegs_per_s": "jpegs_per_s",
    "model_replays_per_s": "model_replays_per_s",
    "jpeg_engine_util_median": "jpeg_engine_util_pct",
    "per_decoder_batches": "decoder_batches",
    "errors": "errors",
    "crop_ms": "crop_ms",
    "differing_px": "differing_px",
    "max_abs_diff": "max_abs_diff",
    "px": "px",
}


def flat_metrics(out: dict[str, Any]) -> dict[str, Any]:
    """The probe's arms as a record's metrics: ``<arm>_<figure with its unit>``, plus the batch and window."""
    metrics: dict[str, Any] = {"batch_images": out["batch"], "window_s": out["window_s"]}
    for arm, res in out["arms"].items():
        for key, value in res.items():
            if key != "errors" or value:
                metrics[f"{arm}_{_METRIC_NAMES[key]}"] = value
    return metrics


if __name__ == "__main__":
    sys.exit(main())
