"""Where the serving decode stage's time goes: PIL vs nvJPEG, per batch size, idle and beside the model.

In the H100 serving runs the decode stage (``DevicePipeline.prepare``: one nvJPEG call for the
batch, then resize/crop on a side stream) took 0.3 ms per VGA JPEG at ~30 per batch, against
0.11 ms per image for nvJPEG alone at batch 128 on an idle GPU. This script separates the parts,
for batches of 1 to 128 photos of each size:

* ``pil_ms``: one photo through the CPU path (``decode_and_crop``: PIL, draft mode, resize, crop);
* ``nvjpeg_ms``: ``torchvision.io.decode_jpeg`` on the batch, device synchronised;
* ``crop_ms``: ``gpu_resize_crop_many`` on the decoded batch;
* ``prepare_ms``: the server's whole prepare stage on one-photo requests (``JpegBatch`` each, as
  the IPC delivers them), and ``prepare_host_cpu_ms``, the CPU time the calling thread spent in it
  (``time.thread_time``: the host-side work that competes for the device process's GIL);
* ``busy_prepare_ms``: the prepare stage again while another thread replays DenseNet-121 FP16
  channels-last at batch 32 in a CUDA graph on the default stream (as the device thread does
  while batch k+1 is decoded), with the model's replays per second in that window.

Writes ``benchmarks/results/<date>-<gpu>-<name>.json`` (keys ``name``, ``command``, ``date``,
``environ``, ``metrics``) and a copy under ``$OUT``. On a machine without CUDA it runs the CPU
parts only (torchvision decodes on the CPU), which is what the tests use.

    python benchmarks/decode_bench.py --batch-sizes 1,8,32,64,128 --sizes vga,12mp
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # records, also when this file is loaded by path

import torch  # noqa: E402
from records import write_record  # noqa: E402

from loadtest._payloads import photo_set  # noqa: E402
from model_server.config import JPEG_DECODERS  # noqa: E402
from model_server.preprocess import decode_and_crop, decode_jpegs, gpu_resize_crop_many  # noqa: E402
from model_server.runtimes import Runner  # noqa: E402


def median_ms(
    fn: Callable[[], object], reps: int, device: torch.device, *, sync_all: bool = True, gap_s: float = 0.0
) -> tuple[float, float]:
    """Median wall ms of ``fn`` and median calling-thread CPU ms.

    After each call the device is synchronised (``sync_all``) or only this thread's current stream
    (beside a load: a device-wide synchronisation would wait for the load's work as well). ``gap_s``:
    idle time before each timed call (a lone request's situation: every thread asleep before it).
    """
    if device.type != "cuda":
        sync: Callable[[], object] = lambda: None  # noqa: E731
    elif sync_all:
        sync = torch.cuda.synchronize
    else:
        sync = torch.cuda.current_stream(device).synchronize
    fn()
    sync()
    walls, cpus = [], []
    for _ in range(reps):
        if gap_s:
            time.sleep(gap_s)
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        sync()
        walls.append((time.perf_counter() - t0) * 1000)
        cpus.append((time.thread_time() - c0) * 1000)
    return round(statistics.median(walls), 3), round(statistics.median(cpus), 3)


LOAD_ARMS = ("legacy-graph", "side-graph", "side-eager", "process-graph")


class ModelLoad:
    """DenseNet-121 FP16 channels-last at batch 32, run over and over in a thread of its own.

    ``arm`` says how: ``legacy-graph`` replays a CUDA graph on the thread's current stream, the
    legacy default stream, which implicitly waits for (and is waited for by) every blocking stream
    and every synchronous copy; ``side-graph`` replays it on a non-blocking side stream;
    ``side-eager`` runs the model eagerly on that side stream; ``process-graph`` replays the graph
    in a child process (a CUDA context of its own, time-sliced with this one).
    """

    def __init__(self, device: torch.device, arm: str = "legacy-graph") -> None:
        if arm not in LOAD_ARMS:
            raise ValueError(f"unknown load arm {arm!r}; valid: {', '.join(LOAD_ARMS)}")
        self.arm = arm
        self.device = device
        self.replays = 0
        self.replays_per_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread()
        self._proc: Any = None
        if arm == "process-graph":
            return
        import torchvision

        model = torchvision.models.densenet121(weights=None).to(device).half().eval()
        self.model = model.to(memory_format=torch.channels_last)
        self.x = torch.randn(32, 3, 224, 224, device=device, dtype=torch.half).contiguous(
            memory_format=torch.channels_last
        )
        self.stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        with torch.no_grad(), torch.cuda.stream(self.stream):
            self.model(self.x)  # warm-up before capture
        self.stream.synchronize()  # type: ignore[no-untyped-call]
        self.graph = torch.cuda.CUDAGraph()  # type: ignore[no-untyped-call]
        with torch.no_grad(), torch.cuda.graph(self.graph, stream=self.stream):
            self.model(self.x)

    def _step(self) -> None:
        if self.arm == "legacy-graph":
            self.graph.replay()
            torch.cuda.current_stream(self.device).synchronize()  # type: ignore[no-untyped-call]
            return
        with torch.cuda.stream(self.stream):
            if self.arm == "side-graph":
                self.graph.replay()
            else:
                with torch.no_grad():
                    self.model(self.x)
        self.stream.synchronize()  # type: ignore[no-untyped-call]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._step()
            self.replays += 1

    def __enter__(self) -> ModelLoad:
        self.replays = 0
        self._t0 = time.perf_counter()
        if self.arm == "process-graph":
            import subprocess

            code = (
                "import sys; sys.path.insert(0, {root!r})\n"
                "import time, torch\n"
                "from decode_bench import ModelLoad\n"
                "load = ModelLoad(torch.device({device!r}), 'side-graph')\n"
                "print('ready', flush=True)\n"
                "with load:\n"
                "    sys.stdin.readline()\n"
                "print(load.replays_per_s, flush=True)\n"
            ).format(root=str(ROOT / "benchmarks"), device=str(self.device))
            self._proc = subprocess.Popen(
                [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            assert self._proc.stdout is not None
            self._proc.stdout.readline()  # "ready": captured and replaying
            time.sleep(0.5)
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-load", daemon=True)
        self._thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            out, _ = self._proc.communicate("stop\n", timeout=60)
            self.replays_per_s = float(out.strip().splitlines()[-1])
            self._proc = None
            return
        self._stop.set()
        self._thread.join()
        self.replays_per_s = round(self.replays / (time.perf_counter() - self._t0), 1)


class _NoModel(Runner):
    """prepare() only: the pipeline needs a runner for its device."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _pipeline(device: torch.device, max_batch: int, decode_batch: int = 0, jpeg_decoder: str = "torchvision") -> Any:
    """The server's decode pipeline without a model; torchvision's decoder unless told (the records
    before session 17 measured it)."""
    from model_server.pipeline import DevicePipeline

    runner = _NoModel({"slug": "none", "precision": "fp32", "input": {"max_batch": max_batch}}, device)
    return DevicePipeline(runner, decode_batch=decode_batch, jpeg_decoder=jpeg_decoder)


def _stage_parts(pipeline: Any, jpegs: list[bytes], n: int) -> dict[str, Callable[[], object]]:
    """The decode stage's parts on ``n`` photos (``jpegs`` repeated): ``nvjpeg`` alone, ``crop`` of
    the decoded batch, and the server's whole ``prepare`` on one-photo requests (``JpegBatch``
    each, as the IPC delivers them), each a callable to time."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from model_server.pipeline import JpegBatch

    device = pipeline.device
    batch = (jpegs * (n // len(jpegs) + 1))[:n]
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in batch]
    decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    requests = [JpegBatch([d], buffer=bytearray(d)) for d in batch]

    def prepare() -> object:
        staged = pipeline.prepare(requests)
        if staged.ready is not None:
            staged.ready.synchronize()
        return staged

    return {
        "nvjpeg": lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device),
        "crop": lambda: gpu_resize_crop_many(decoded),
        "prepare": prepare,
    }


def contention(device: torch.device, arms: list[str], size: str, n: int, reps: int) -> dict[str, Any]:
    """nvJPEG, crop and the whole prepare stage for ``n`` photos, idle and beside each load arm."""
    parts = _stage_parts(_pipeline(device, n), [p.jpeg for p in photo_set(size)], n)
    metrics: dict[str, Any] = {"contention_size": size, "contention_batch": n}
    for part, fn in parts.items():
        metrics[f"idle_{part}_ms"], _ = median_ms(fn, reps, device, sync_all=False)
    for arm in arms:
        print(f"  contention: {arm}", file=sys.stderr, flush=True)
        load = ModelLoad(device, arm)
        with load:
            for part, fn in parts.items():
                metrics[f"{arm}_{part}_ms"], _ = median_ms(fn, reps, device, sync_all=False)
        metrics[f"{arm}_model_replays_per_s"] = load.replays_per_s
        del load
        torch.cuda.empty_cache()
    return metrics


def vary_batch(
    device: torch.device, size: str, lo: int, hi: int, reps: int, arm: str | None, call_size: int = 0
) -> dict[str, Any]:
    """Decode cost per photo when consecutive batches differ in size, as under load, against a fixed size.

    The sweep and ``--contention`` decode the same batch size call after call; a server's batches
    differ every time (25, 31, 18, ...). If nvJPEG's batched decode re-initialises its buffers
    when the batch size changes (its ``cudaFree`` would wait for the whole device, the model's
    stream included), a varying sequence costs more per photo than a fixed one, and more beside a
    running model. ``reps`` batches with sizes drawn (seeded) from ``lo``..``hi`` are timed against
    the same number of batches of their mean size, idle and, with ``arm``, beside a model load.
    With ``call_size``, the varying sequence is also prepared by a pipeline that decodes in nvJPEG
    calls of exactly that many photos (the server's ``--decode_batch``): ``prepare_calls``.
    """
    import random

    rng = random.Random(0)
    seq = [rng.randint(lo, hi) for _ in range(reps)]
    fixed = round(statistics.mean(seq))
    pipeline = _pipeline(device, hi)
    jpegs = [p.jpeg for p in photo_set(size)]
    parts = {n: _stage_parts(pipeline, jpegs, n) for n in sorted({*seq, fixed})}
    if call_size:
        chunked = _pipeline(device, hi, decode_batch=call_size)
        for n in sorted({*seq, fixed}):
            parts[n]["prepare_calls"] = _stage_parts(chunked, jpegs, n)["prepare"]
    sync: Callable[[], object] = (
        torch.cuda.current_stream(device).synchronize if device.type == "cuda" else (lambda: None)
    )

    def per_photo_ms(sizes: list[int], part: str) -> float:
        for n in sizes:  # one untimed pass: first-call set-up of every size
            parts[n][part]()
        sync()
        t0 = time.perf_counter()
        for n in sizes:
            parts[n][part]()
            sync()
        return round((time.perf_counter() - t0) * 1000 / sum(sizes), 4)

    metrics: dict[str, Any] = {"vary_size": size, "vary_batch_min": lo, "vary_batch_max": hi, "vary_batches": reps,
                               "vary_fixed_batch": fixed, "vary_call_size": call_size}  # fmt: skip
    states: list[str | None] = [None] + ([arm] if arm else [])
    for state in states:
        label = state or "idle"
        load = ModelLoad(device, state) if state else None
        with load if load is not None else contextlib.nullcontext():
            for part in ("nvjpeg", "prepare"):
                print(f"  vary-batch: {label} {part}", file=sys.stderr, flush=True)
                metrics[f"{label}_{part}_varying_ms_per_img"] = per_photo_ms(seq, part)
                metrics[f"{label}_{part}_fixed_ms_per_img"] = per_photo_ms([fixed] * reps, part)
                metrics[f"{label}_{part}_varying_vs_fixed"] = round(
                    metrics[f"{label}_{part}_varying_ms_per_img"] / metrics[f"{label}_{part}_fixed_ms_per_img"], 3
                )
            if call_size:
                print(f"  vary-batch: {label} prepare in calls of {call_size}", file=sys.stderr, flush=True)
                metrics[f"{label}_prepare_calls_varying_ms_per_img"] = per_photo_ms(seq, "prepare_calls")
        if load is not None:
            metrics[f"{label}_model_replays_per_s"] = load.replays_per_s
    return metrics


def _decode_worker(device_name: str, size: str, n: int, window_s: float, barrier: Any, results: Any) -> None:
    """One process of ``--processes``: the server's batched decode (``decode_jpegs``) of ``n`` photos,
    over and over for ``window_s`` once every process is ready; puts (photos, seconds, CPU seconds)."""
    device = torch.device(device_name)
    jpegs = [p.jpeg for p in photo_set(size)]
    encoded = [torch.frombuffer(bytearray(jpegs[i % len(jpegs)]), dtype=torch.uint8) for i in range(n)]
    decode_jpegs(encoded, device)  # nvJPEG's handles and buffers, before the window
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    barrier.wait()
    t0, c0, calls = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - t0 < window_s:
        decode_jpegs(encoded, device)
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    results.put((calls * n, time.perf_counter() - t0, time.process_time() - c0))


def _jpeg_engine_sampler(device: torch.device) -> Callable[[], float | None] | None:
    """NVML's JPEG-engine utilisation (percent over its last sample period), or None without NVML."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        pynvml.nvmlDeviceGetJpgUtilization(handle)
    except Exception as e:  # no nvidia-ml-py, or a driver without the query
        print(f"  processes: no NVML JPEG-engine utilisation ({e})", file=sys.stderr, flush=True)
        return None

    def sample() -> float | None:
        try:
            return float(pynvml.nvmlDeviceGetJpgUtilization(handle)[0])
        except Exception:
            return None

    return sample


def processes(device: torch.device, counts: list[int], size: str, n: int, window_s: float) -> dict[str, Any]:
    """The decoder's ceiling: ``k`` processes decoding batches of ``n`` photos at once, for each ``k``
    in ``counts``. torchvision serialises its nvJPEG calls in a process (one decoder, one lock), so
    one process is what the server gets; if ``k`` processes together decode about as many photos
    per second as one, the JPEG engines (or nvJPEG) are the limit, not the calling thread."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # CUDA in the children
    sample = _jpeg_engine_sampler(device)
    metrics: dict[str, Any] = {"processes_size": size, "processes_batch": n, "processes_window_s": window_s}
    for k in counts:
        print(f"  processes: {k} x batch {n} {size}", file=sys.stderr, flush=True)
        barrier, results = ctx.Barrier(k + 1), ctx.Queue()
        procs = [ctx.Process(target=_decode_worker, args=(str(device), size, n, window_s, barrier, results))
                 for _ in range(k)]  # fmt: skip
        for proc in procs:
            proc.start()
        barrier.wait(timeout=300)
        util: list[float] = []
        t_end = time.perf_counter() + window_s
        while sample is not None and time.perf_counter() < t_end:
            time.sleep(0.1)
            u = sample()
            if u is not None:
                util.append(u)
        got = [results.get(timeout=window_s + 300) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        if any(proc.exitcode != 0 for proc in procs):
            raise RuntimeError(f"a decode process failed: exit codes {[proc.exitcode for proc in procs]}")
        img_s = sum(photos / secs for photos, secs, _ in got)
        metrics[f"processes{k}_img_s"] = round(img_s, 1)
        metrics[f"processes{k}_per_process_img_s"] = [round(photos / secs, 1) for photos, secs, _ in got]
        metrics[f"processes{k}_cpu_per_img_ms"] = round(
            1000 * sum(cpu for _, _, cpu in got) / sum(photos for photos, _, _ in got), 4
        )
        metrics[f"processes{k}_vs_1"] = round(img_s / metrics[f"processes{counts[0]}_img_s"] * counts[0], 3)
        if util:
            metrics[f"processes{k}_jpeg_engine_util_pct"] = round(statistics.median(util), 1)
    return metrics


def threads(
    device: torch.device,
    counts: list[int],
    size: str,
    n: int,
    per_request: int,
    window_s: float,
    arm: str | None,
    decoders: list[str],
    rounds: int = 1,
) -> dict[str, Any]:
    """The server's prepare stage (``DevicePipeline.prepare``) with each JPEG decoder in ``decoders``
    (``--jpeg_decoder``) from ``k`` threads at once (the server prepares on one) for each ``k`` in
    ``counts``: batches of ``n`` photos in requests of ``per_request`` (one JPEG buffer each, as the
    IPC delivers them), each for ``window_s``, beside the model load ``arm`` (None: idle); ``rounds``
    times, every other round in reverse order, medians reported. Each thread keeps two prepared
    batches in flight, as the batcher does, and waits for the older. Keys: ``<decoder>_t<k>_...``,
    and ``..._vs_first``: against the first decoder's first thread count."""
    from model_server.images import JpegBatch, jpeg_frame

    pipelines = {d: _pipeline(device, n, jpeg_decoder=d) for d in decoders}
    jpegs = [p.jpeg for p in photo_set(size)]
    photos = (jpegs * (n // len(jpegs) + 1))[:n]
    # Each with its start-of-frame markers, as a front end sends them (JpegBatch.frames).
    parts = [photos[i : i + per_request] for i in range(0, n, per_request)]
    markers = [bytes((jpeg_frame(j) or (0,))[0] for j in part) for part in parts]
    requests = [JpegBatch(p, buffer=bytearray(b"".join(p)), frames=m) for p, m in zip(parts, markers, strict=True)]
    sample = _jpeg_engine_sampler(device)
    load = ModelLoad(device, arm) if arm else None

    def wait(staged: Any) -> None:
        if staged.ready is not None:
            staged.ready.synchronize()

    def work(pipeline: Any, stop: threading.Event, done: list[int]) -> None:
        pending: collections.deque[Any] = collections.deque()
        while not stop.is_set():
            pending.append(pipeline.prepare(requests))
            if len(pending) > 2:
                wait(pending.popleft())
            done.append(n)
        for staged in pending:
            wait(staged)

    def window(pipeline: Any, k: int) -> dict[str, float]:
        with load if load is not None else contextlib.nullcontext():
            stop = threading.Event()
            done: list[list[int]] = [[] for _ in range(k)]
            workers = [threading.Thread(target=work, args=(pipeline, stop, done[i]), daemon=True) for i in range(k)]
            t0, c0 = time.perf_counter(), time.process_time()
            for w in workers:
                w.start()
            util: list[float] = []
            while time.perf_counter() - t0 < window_s:
                time.sleep(0.1)
                u = sample() if sample is not None else None
                if u is not None:
                    util.append(u)
            stop.set()
            for w in workers:
                w.join()
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        photos_done = sum(sum(d) for d in done)
        got = {"img_s": photos_done / secs, "process_cpu_per_img_ms": 1000 * cpu / max(photos_done, 1)}
        if util:
            got["jpeg_engine_util_pct"] = statistics.median(util)
        if load is not None:
            got["model_replays_per_s"] = load.replays_per_s
        return got

    from model_server.preprocess import warm_gpu_decoder

    for d, pipeline in pipelines.items():
        if device.type == "cuda":
            warm_gpu_decoder(device, d)
        wait(pipeline.prepare(requests))  # nvJPEG's buffers and the crop's kernels, before any window
    arms = [(d, k) for d in decoders for k in counts]
    seen: dict[str, list[dict[str, float]]] = {f"{d}_t{k}": [] for d, k in arms}
    for r in range(rounds):
        for d, k in arms if r % 2 == 0 else arms[::-1]:
            print(
                f"  threads: round {r + 1}/{rounds}, {d} decoder, {k} x batch {n} {size}", file=sys.stderr, flush=True
            )
            seen[f"{d}_t{k}"].append(window(pipelines[d], k))
            print(f"    {d}_t{k}: {seen[f'{d}_t{k}'][-1]}", file=sys.stderr, flush=True)
    metrics: dict[str, Any] = {"threads_size": size, "threads_batch": n, "threads_request_images": per_request,
                               "threads_window_s": window_s, "threads_load": arm or "none", "threads_rounds": rounds,
                               "threads_decoders": decoders}  # fmt: skip
    first = next(iter(seen))
    for label, runs in seen.items():
        for key in runs[0]:
            metrics[f"{label}_{key}"] = round(statistics.median(r[key] for r in runs), 4 if "ms" in key else 1)
        metrics[f"{label}_img_s_rounds"] = [round(r["img_s"], 1) for r in runs]
        # Ratios within each round, then their median (the rounds share a machine, not always its state).
        ratios = [a["img_s"] / b["img_s"] for a, b in zip(runs, seen[first], strict=True)]
        metrics[f"{label}_vs_first"] = round(statistics.median(ratios), 3)
    return metrics


def bench(device: torch.device, sizes: list[str], batch_sizes: list[int], reps: int) -> dict[str, Any]:
    pipeline = _pipeline(device, max(batch_sizes))
    load = ModelLoad(device) if device.type == "cuda" else None
    metrics: dict[str, Any] = {}
    for size in sizes:
        jpegs = [p.jpeg for p in photo_set(size)]
        metrics[f"{size}_jpeg_kb"] = round(sum(len(j) for j in jpegs) / len(jpegs) / 1024, 1)
        metrics[f"{size}_pil_ms"], _ = median_ms(lambda j=jpegs[0]: decode_and_crop(j), reps, device)
        for n in batch_sizes:
            print(f"  {size} batch {n}", file=sys.stderr, flush=True)
            parts = _stage_parts(pipeline, jpegs, n)
            key = f"{size}_b{n}"
            metrics[f"{key}_nvjpeg_ms"], metrics[f"{key}_nvjpeg_host_cpu_ms"] = median_ms(parts["nvjpeg"], reps, device)
            metrics[f"{key}_crop_ms"], _ = median_ms(parts["crop"], reps, device)
            metrics[f"{key}_prepare_ms"], metrics[f"{key}_prepare_host_cpu_ms"] = median_ms(
                parts["prepare"], reps, device
            )
            metrics[f"{key}_prepare_ms_per_img"] = round(metrics[f"{key}_prepare_ms"] / n, 4)
            if load is not None:
                with load:
                    metrics[f"{key}_busy_prepare_ms"], _ = median_ms(parts["prepare"], reps, device, sync_all=False)
                metrics[f"{key}_busy_model_replays_per_s"] = load.replays_per_s
    if load is not None:
        with load:
            time.sleep(1.0)
        metrics["model_alone_replays_per_s"] = load.replays_per_s
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--sizes", default="vga,12mp", help="photo sizes (loadtest/_payloads.py), default vga,12mp")
    p.add_argument("--batch-sizes", default="1,8,32,64,128", help="photos per batch, default 1,8,32,64,128")
    p.add_argument("--reps", type=int, default=10, help="timed calls per measurement (median), default 10")
    p.add_argument("--name", default=None, help="record name (file name part), default decode or decode-contention")
    p.add_argument(
        "--contention",
        default=None,
        metavar="ARMS",
        help=f"instead of the sweep: nvJPEG, crop and prepare idle and beside each load arm ({', '.join(LOAD_ARMS)})",
    )
    p.add_argument("--contention-size", default="vga", help="photo size for --contention, default vga")
    p.add_argument("--contention-batch", type=int, default=32, help="photos per batch for --contention, default 32")
    p.add_argument(
        "--vary-batch",
        default=None,
        metavar="LO-HI",
        help="instead of the sweep: per-photo decode cost of batches whose size varies in LO..HI (as under load) "
        "against a fixed size, idle and beside --vary-load",
    )
    p.add_argument(
        "--vary-load", default="side-graph", help="model-load arm for --vary-batch and --threads (CUDA), or 'none'"
    )
    p.add_argument(
        "--call-size", type=int, default=0,
        help="with --vary-batch: also prepare the varying batches in nvJPEG calls of exactly this many photos "
        "(the server's --decode_batch); default 0: not measured",
    )  # fmt: skip
    p.add_argument(
        "--processes", default=None, metavar="K1,K2",
        help="instead of the sweep: the decoder's ceiling, K processes each decoding --contention-batch photos of "
        "--contention-size at once for --window-s (aggregate photos/s, JPEG-engine utilisation from NVML)",
    )  # fmt: skip
    p.add_argument(
        "--threads", default=None, metavar="K1,K2",
        help="instead of the sweep: the server's prepare stage from K threads at once (the server uses one), "
        "batches of --contention-batch photos of --contention-size in requests of --request-images, for --window-s, "
        "beside --vary-load",
    )  # fmt: skip
    p.add_argument("--request-images", type=int, default=32, help="with --threads: JPEGs per request, default 32")
    p.add_argument(
        "--jpeg-decoders", default="nvjpeg",
        help=f"with --threads: the server's JPEG decoders to time, comma-separated among {','.join(JPEG_DECODERS)} "
        "(default nvjpeg)",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, default=1, help="with --threads: rounds over every arm, default 1")
    p.add_argument(
        "--window-s", type=float, default=5.0, help="with --processes or --threads: seconds each count runs, default 5"
    )
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    given = sys.argv[1:] if argv is None else argv
    args = p.parse_args(given)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        p.error(f"--batch-sizes must be positive, got {args.batch_sizes!r}")
    device = torch.device(args.device)
    arms = args.contention.split(",") if args.contention else []
    for arm in arms:
        if arm not in LOAD_ARMS:
            p.error(f"--contention: unknown arm {arm!r}; valid: {', '.join(LOAD_ARMS)}")
    if arms and device.type != "cuda":
        p.error("--contention needs a CUDA device")
    vary: tuple[int, int] | None = None
    if args.vary_batch:
        lo_hi = args.vary_batch.split("-")
        if len(lo_hi) != 2 or not all(x.isdigit() for x in lo_hi) or not 1 <= int(lo_hi[0]) <= int(lo_hi[1]):
            p.error(f"--vary-batch must be LO-HI with 1 <= LO <= HI, got {args.vary_batch!r}")
        vary = (int(lo_hi[0]), int(lo_hi[1]))
        if args.call_size < 0:
            p.error(f"--call-size must be >= 0, got {args.call_size}")
        if args.vary_load not in (*LOAD_ARMS, "none"):
            p.error(f"--vary-load: unknown arm {args.vary_load!r}; valid: {', '.join(LOAD_ARMS)}, none")
    counts: list[int] = []
    if args.processes:
        try:
            counts = [int(k) for k in args.processes.split(",")]
        except ValueError:
            p.error(f"--processes must be comma-separated integers, got {args.processes!r}")
        if not counts or min(counts) < 1 or args.window_s <= 0:
            p.error(f"--processes must be positive and --window-s > 0, got {args.processes!r}, {args.window_s}")
    thread_counts: list[int] = []
    if args.threads:
        try:
            thread_counts = [int(k) for k in args.threads.split(",")]
        except ValueError:
            p.error(f"--threads must be comma-separated integers, got {args.threads!r}")
        if not thread_counts or min(thread_counts) < 1 or args.window_s <= 0 or args.request_images < 1:
            p.error(f"--threads and --request-images must be positive and --window-s > 0, got {args.threads!r}, "
                    f"{args.request_images}, {args.window_s}")  # fmt: skip
        if args.vary_load not in (*LOAD_ARMS, "none"):
            p.error(f"--vary-load: unknown arm {args.vary_load!r}; valid: {', '.join(LOAD_ARMS)}, none")
        if args.vary_load != "none" and device.type != "cuda":
            p.error("--threads beside a model load needs a CUDA device (--vary-load none runs idle)")
        decoders = args.jpeg_decoders.split(",")
        bad_decoder = next((d for d in decoders if d not in JPEG_DECODERS), None)
        if bad_decoder is not None or args.rounds < 1:
            p.error(f"--jpeg-decoders must name some of {', '.join(JPEG_DECODERS)} and --rounds be >= 1, got "
                    f"{args.jpeg_decoders!r}, {args.rounds}")  # fmt: skip
    args.name = args.name or (
        "decode-contention" if arms else "decode-vary" if vary else "decode-processes" if counts
        else "decode-threads" if thread_counts else "decode"
    )  # fmt: skip
    if thread_counts:
        print(f"decode_bench on {device}: prepare from {thread_counts} threads", file=sys.stderr, flush=True)
        load = args.vary_load if args.vary_load != "none" else None
        metrics = threads(device, thread_counts, args.contention_size, args.contention_batch, args.request_images,
                          args.window_s, load, decoders, args.rounds)  # fmt: skip
    elif counts:
        print(f"decode_bench on {device}: {counts} decoding processes", file=sys.stderr, flush=True)
        metrics = processes(device, counts, args.contention_size, args.contention_batch, args.window_s)
    elif vary:
        load_arm = args.vary_load if args.vary_load != "none" and device.type == "cuda" else None
        print(f"decode_bench on {device}: batch sizes {vary[0]}..{vary[1]} vs fixed", file=sys.stderr, flush=True)
        metrics = vary_batch(
            device, args.contention_size, vary[0], vary[1], args.reps, load_arm, call_size=args.call_size
        )
    elif arms:
        print(f"decode_bench on {device}: contention {arms}", file=sys.stderr, flush=True)
        metrics = contention(device, arms, args.contention_size, args.contention_batch, args.reps)
    else:
        print(f"decode_bench on {device}: sizes {args.sizes}, batches {batch_sizes}", file=sys.stderr, flush=True)
        metrics = bench(device, args.sizes.split(","), batch_sizes, args.reps)
    write_record(args.name, "benchmarks/decode_bench.py", given, device, metrics, args.results_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
