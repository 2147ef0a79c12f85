"""IPC micro-benchmark: the device process's CPU per request on the front-end socket, no GPU.

A harness to measure the IPC and batching overhead of ``--frontends N`` alone: a real
:class:`~model_server.ipc.DeviceServer` on a real Unix socket in its own process, feeding a
real :class:`~model_server.batcher.DynamicBatcher` whose device function is trivial: it
sleeps ``--device-ms`` per batch to stand in for the GPU (which holds no GIL), then returns
rows of one zero logits tensor ``[n, 1000]`` per request, the way the pipeline splits a
batch. No image is decoded and no model runs, so what the device process spends is what
the socket, the framing, the batcher and the metrics cost per request: the part that made
the device process GIL-bound at ~2,400 req/s on an H100 host.

``--clients`` processes each keep ``--inflight`` requests in flight through one real
:class:`~model_server.ipc.DeviceClient` (like a front end), each request one JPEG-kind
payload of ``--payload-bytes`` random bytes (91 KB: the VGA JPEG of the H100 runs) or a
uint8 tensor (``--kind tensor``). After ``--warmup-s`` the bench asks the device process
for its CPU time (``getrusage``: every thread; ``thread_time``: the event loop's) and
request count through a control frame, again ``--seconds`` later, and prints one JSON
line: ``requests_per_s``, ``device_cpu_us_per_request`` (the number to compare), the event
loop's and the kernel's share of it, client CPU per request, mean requests per batch and
client-side latency percentiles. On a shared machine the rate moves with the neighbours;
the CPU per request is the steadier figure (compare runs interleaved, not hours apart).

    python benchmarks/ipc_bench.py --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the repository root is not on the path

from model_server import config  # noqa: E402  (light: no torch)


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # the whole process: every thread
    return ru.ru_utime + ru.ru_stime


def _serve(path: str, opts: dict[str, Any]) -> None:
    """The device process: a DeviceServer and a batcher with a trivial device function."""
    if not opts["metrics"]:
        from model_server import metrics

        metrics.disable()
    import torch

    from model_server import ipc
    from model_server.batcher import DynamicBatcher
    from model_server.ipc import DeviceServer

    tune = getattr(ipc, "retain_freed_memory", None)  # absent before it existed (A/B against older trees)
    if opts["malloc_tuning"] and tune is not None:
        tune()
    from model_server.images import payload_size
    from optimize.registry import NUM_CLASSES

    if opts["switch_interval_ms"]:
        sys.setswitchinterval(opts["switch_interval_ms"] / 1000.0)
    counts = {"batches": 0, "requests": 0, "images": 0}
    stage_wall = {"prepare_s": 0.0, "run_s": 0.0}
    device_s = opts["device_ms"] / 1000.0
    prepare_s = opts["prepare_ms"] / 1000.0
    gil_ops = opts["gil_ops"]
    # Made once: filling a fresh tensor per batch wakes torch's OpenMP pool, whose spinning
    # threads would be counted as the device process's CPU (the pipeline copies logits back
    # from the GPU instead).
    torch.set_num_threads(1)
    logits = torch.zeros(opts["max_batch"], NUM_CLASSES)
    small = torch.zeros(8)

    def torch_calls(n: int) -> None:
        # Like the pipeline's tensor calls (decode, resize, events, graph replay, copies): each
        # releases the GIL inside and must win it back from the event loop to go on.
        for _ in range(n):
            torch.add(small, 1.0)

    def prepare(payloads: list[Any]) -> list[Any]:
        t0 = time.perf_counter()
        torch_calls(gil_ops)
        if prepare_s:
            time.sleep(prepare_s)  # nvJPEG's time: no GIL held
        stage_wall["prepare_s"] += time.perf_counter() - t0
        return payloads

    def run(payloads: list[Any]) -> list[Any]:
        t0 = time.perf_counter()
        torch_calls(gil_ops)
        if device_s:
            time.sleep(device_s)  # the GPU's time: no GIL held, like a CUDA sync
        stage_wall["run_s"] += time.perf_counter() - t0
        sizes = [payload_size(p) for p in payloads]
        out, start = [], 0
        for n in sizes:
            out.append(logits[start : start + n])
            start += n
        counts["batches"] += 1
        counts["requests"] += len(payloads)
        counts["images"] += start
        return out

    def control(op: dict[str, Any]) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        # Runs on the event loop's thread: thread_time is the loop's share, the rest is the device thread's.
        return {
            "cpu_s": _cpu_s(), "sys_s": ru.ru_stime, "loop_s": time.thread_time(), "t": time.monotonic(),
            **counts, **stage_wall,
        }  # fmt: skip

    async def main() -> None:
        batcher = DynamicBatcher(
            run,
            prepare=prepare if opts["two_stage"] else None,
            max_batch_size=opts["max_batch"],
            max_delay_s=0.0,
            max_queue_images=opts["max_queue"],
        )
        server = DeviceServer(batcher, path, control=control, body_pool_bytes=opts["body_pool_mb"] * 2**20)
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.close()
        batcher.close()

    _install_loop(opts)
    if opts["profile"]:  # cProfile slows every Python call: for finding hot spots, not for the numbers
        import cProfile

        with cProfile.Profile(time.thread_time) as prof:  # CPU time of the loop thread: neighbours do not count
            asyncio.run(main())
        prof.dump_stats(opts["profile"])
    else:
        asyncio.run(main())


def _install_loop(opts: dict[str, Any]) -> None:
    install = getattr(config, "install_event_loop", None)  # absent before --event_loop (A/B against older trees)
    if install is not None:
        install(opts.get("event_loop", "asyncio"))


def _client(path: str, opts: dict[str, Any], barrier: Any, queue: Any) -> None:
    """One front end's worth of load: ``inflight`` requests in flight on one DeviceClient."""
    import torch

    from model_server import ServerError, ipc
    from model_server.ipc import DeviceClient

    tune = getattr(ipc, "retain_freed_memory", None)
    if opts["malloc_tuning"] and tune is not None:  # as a front end does
        tune()
    from model_server.images import JpegBatch
    from optimize.registry import CROP_SIZE

    payload: Any
    if opts["kind"] == "jpeg":
        payload = JpegBatch([os.urandom(opts["payload_bytes"]) for _ in range(opts["images"])])
    else:
        payload = torch.zeros(opts["images"], 3, CROP_SIZE, CROP_SIZE, dtype=torch.uint8)

    async def main() -> dict[str, Any]:
        client = DeviceClient(path)
        await client.infer(payload, 30.0)  # connected before the clock starts
        barrier.wait()
        base = time.monotonic()
        t0, t1 = base + opts["warmup_s"], base + opts["warmup_s"] + opts["seconds"]
        end = t1 + 0.5  # keep the load on past the parent's last sample
        lat: list[float] = []
        errors = 0
        marks: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + (t0 - time.monotonic()), lambda: marks.setdefault("cpu0", _cpu_s()))
        loop.call_at(loop.time() + (t1 - time.monotonic()), lambda: marks.setdefault("cpu1", _cpu_s()))

        async def worker() -> None:
            nonlocal errors
            while (now := time.monotonic()) < end:
                try:
                    await client.infer(payload, 30.0)
                except ServerError:
                    errors += 1
                done = time.monotonic()
                if t0 <= done < t1:
                    lat.append(done - now)

        await asyncio.gather(*(worker() for _ in range(opts["inflight"])))
        return {"cpu_s": marks["cpu1"] - marks["cpu0"], "latencies": lat, "errors": errors}

    _install_loop(opts)
    queue.put(asyncio.run(main()))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench(opts: dict[str, Any]) -> dict[str, Any]:
    from model_server.ipc import DeviceClient

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ipc-bench-") as tmp:
        path = os.path.join(tmp, "device.sock")
        if opts["metrics"]:  # multiprocess mode, as in a --frontends device process; set before the import
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp
        server = ctx.Process(target=_serve, args=(path, opts), name="device")
        server.start()
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            if not server.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the device process did not start (exit code {server.exitcode})")
            time.sleep(0.05)
        barrier = ctx.Barrier(opts["clients"] + 1)
        queue = ctx.Queue()
        clients = [ctx.Process(target=_client, args=(path, opts, barrier, queue)) for _ in range(opts["clients"])]
        for c in clients:
            c.start()
        try:

            async def sample() -> tuple[dict[str, Any], dict[str, Any]]:
                control = DeviceClient(path)
                await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 120.0)
                base = time.monotonic()
                await asyncio.sleep(opts["warmup_s"])
                first = await control.control({"op": "stats"})
                await asyncio.sleep(base + opts["warmup_s"] + opts["seconds"] - time.monotonic())
                last = await control.control({"op": "stats"})
                close = getattr(control, "close", None)  # absent before DeviceClient.close existed
                if close is not None:
                    close()
                return first, last

            first, last = asyncio.run(sample())
            results = [queue.get(timeout=60) for _ in clients]
        finally:
            for c in clients:
                c.join(30)
                if c.is_alive():
                    c.kill()
            if server.pid is not None:
                os.kill(server.pid, signal.SIGTERM)
            server.join(10)
            if server.is_alive():
                server.kill()
    wall = last["t"] - first["t"]
    requests = last["requests"] - first["requests"]

    def per_request_us(key: str) -> float:
        return round((last[key] - first[key]) / requests * 1e6, 1)

    latencies = [x for r in results for x in r["latencies"]]
    batches = max(1, last["batches"] - first["batches"])
    ideal_ms = {"prepare_s": opts["prepare_ms"] if opts["two_stage"] else 0.0, "run_s": opts["device_ms"]}

    def stage_ms(key: str) -> float:
        return round((last[key] - first[key]) / batches * 1000, 3)

    return {
        "name": "ipc_bench",
        "requests_per_s": round(requests / wall, 1),
        "device_cpu_us_per_request": per_request_us("cpu_s"),
        "device_loop_cpu_us_per_request": per_request_us("loop_s"),
        "device_sys_cpu_us_per_request": per_request_us("sys_s"),
        "device_cpu_cores": round((last["cpu_s"] - first["cpu_s"]) / wall, 3),
        "client_cpu_us_per_request": round(sum(r["cpu_s"] for r in results) / requests * 1e6, 1),
        "requests_per_batch": round(requests / batches, 2),
        # Wall time of each stage per batch, and what it would be if the GIL were always free
        # (its sleeps alone; the torch calls themselves take microseconds).
        "prepare_ms_per_batch": stage_ms("prepare_s"),
        "run_ms_per_batch": stage_ms("run_s"),
        "stage_ideal_ms": ideal_ms,
        "p50_ms": round(_percentile(latencies, 0.5) * 1000, 3),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3),
        "errors": sum(r["errors"] for r in results),
        "requests": requests,
        "settings": opts,
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=2, help="client processes (front ends), default 2")
    p.add_argument("--inflight", type=int, default=64, help="requests in flight per client, default 64")
    p.add_argument("--kind", choices=("jpeg", "tensor"), default="jpeg", help="payload kind, default jpeg")
    p.add_argument("--images", type=int, default=1, help="images per request, default 1")
    p.add_argument("--payload-bytes", type=int, default=91_000, help="bytes per JPEG, default 91000 (VGA)")
    p.add_argument("--device-ms", type=float, default=1.0, help="simulated device time per batch, default 1.0")
    p.add_argument(
        "--two-stage", choices=("true", "false"), default="false",
        help="a prepare stage on its own thread before the device function, as the GPU pipeline has (default false)",
    )  # fmt: skip
    p.add_argument("--prepare-ms", type=float, default=0.0, help="simulated decode time per batch (two-stage)")
    p.add_argument(
        "--gil-ops", type=int, default=0,
        help="GIL-releasing torch calls per stage per batch, as decode/resize/replay/copy make (default 0)",
    )  # fmt: skip
    p.add_argument(
        "--switch-interval-ms", type=float, default=0.0,
        help="sys.setswitchinterval in the device process (default 0: Python's own, 5 ms)",
    )  # fmt: skip
    p.add_argument("--max-batch", type=int, default=64, help="batcher max_batch_size, default 64")
    p.add_argument("--max-queue", type=int, default=1024, help="batcher max_queue_images, default 1024")
    p.add_argument("--metrics", choices=("true", "false"), default="true", help="Prometheus metrics, default true")
    p.add_argument(
        "--malloc-tuning", choices=("true", "false"), default="true",
        help="ipc.retain_freed_memory() in the device process, as the server does (default true)",
    )  # fmt: skip
    p.add_argument(
        "--body-pool-mb", type=int, default=config.DEFAULT_BODY_POOL_MB,
        help=f"the device process's --ipc_body_pool_mb (default {config.DEFAULT_BODY_POOL_MB}, the server's; 0: off)",
    )  # fmt: skip
    p.add_argument("--warmup-s", type=float, default=2.0, help="seconds before measuring, default 2")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds measured, default 10")
    p.add_argument(
        "--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
        help="event loop of the device process and the clients, as the server's --event_loop (default auto)",
    )  # fmt: skip
    p.add_argument("--label", default="", help="free text stored with the result")
    p.add_argument("--profile", default="", help="write a cProfile of the device process here (skews the numbers)")
    args = p.parse_args(argv)
    opts = {k: v for k, v in vars(args).items()}
    opts["metrics"] = args.metrics == "true"
    opts["malloc_tuning"] = args.malloc_tuning == "true"
    if args.body_pool_mb < 0:
        p.error(f"--body-pool-mb must be >= 0 (0: off), got {args.body_pool_mb}")
    opts["two_stage"] = args.two_stage == "true"
    print(json.dumps(bench(opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
