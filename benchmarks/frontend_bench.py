"""Front-end micro-benchmark: what one HTTP request costs a front end, with no GPU and no model.

Real front-end processes (``model_server.frontend.frontend_main``: KServe's FastAPI app with our
routes, uvicorn, the IPC client) in front of a stand-in device process: a real
:class:`~model_server.ipc.DeviceServer` whose batcher's device function answers zero logits after
``--device-ms`` (``benchmarks/ipc_bench.py``'s, which holds no GIL while "the GPU" works). The
stand-in tells the front ends that JPEGs go to the GPU, so they only check and forward them, as on
the H100. ``--concurrency`` keep-alive connections send KServe v2 binary-extension requests of one
VGA JPEG (what ``serve_bench``'s Locust users send) for ``--seconds``; the bench reports requests/s,
client-side p50/p99, the front ends' CPU per request (``psutil``: every thread of every front end)
and how the connections split over the front ends (``frontend_connections``: the kernel hashes them
over the ``SO_REUSEPORT`` sockets; the load starts once every front end listens, as in the server).

Where a request's time goes between the client and the device, measured on any machine: the part
of ``e2e_c1_p50_ms - ondevice_b1_ms`` that is not decode or compute. ``--profile DIR`` writes a
py-spy profile of each front end in collapsed-stack form (``frontend-<i>.txt``, input of
flamegraph.pl and speedscope; py-spy must be installed, and sampling skews the rate).

    python benchmarks/frontend_bench.py --model-dir artifacts/densenet121-eager-fp32 --concurrency 1 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request_bytes(port: int, model: str, images: int = 1) -> bytes:
    from loadtest._payloads import photo_set
    from loadtest._protocol import v2_binary_bytes_request

    photos = photo_set("vga")
    prep = v2_binary_bytes_request(model, [photos[i % len(photos)] for i in range(images)])
    head = [f"POST {prep.path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(prep.body)}"]
    head += [f"{k}: {v}" for k, v in prep.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + prep.body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """The status of one response, read whole, and whether the server closes the connection after it."""
    status_line = await reader.readline()
    length = 0
    close = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and "close" in value.lower():
            close = True
    await reader.readexactly(length)
    return int(status_line.split()[1]), close


async def _drive(port: int, request: bytes, concurrency: int, seconds: float, warmup_s: float) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    reconnects = 0
    t0 = time.perf_counter()
    start, end = t0 + warmup_s, t0 + warmup_s + seconds

    async def conn() -> None:
        nonlocal errors, reconnects
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while (now := time.perf_counter()) < end:
            writer.write(request)
            status, close = await _read_response(reader)
            done = time.perf_counter()
            if status != 200:
                errors += 1
            elif now >= start:
                lat.append(done - now)
            if close:  # as an HTTP/1.1 client does: a new connection for the next request
                writer.close()
                reconnects += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()

    await asyncio.gather(*(conn() for _ in range(concurrency)))
    lat.sort()
    return {
        "requests": len(lat),
        "requests_per_s": round(len(lat) / seconds, 1),
        "p50_ms": round(lat[len(lat) // 2] * 1000, 3) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000, 3) if lat else None,
        "mean_ms": round(statistics.fmean(lat) * 1000, 3) if lat else None,
        "errors": errors,
        "reconnects": reconnects,
    }


def _sockets(pid: int, port: int, status: str) -> int:
    """TCP sockets of process ``pid`` on local ``port`` in ``status`` (psutil's names)."""
    import psutil

    proc = psutil.Process(pid)
    listing = getattr(proc, "net_connections", None) or proc.connections  # psutil < 6 names it connections
    return sum(1 for c in listing("tcp") if c.laddr and c.laddr.port == port and c.status == status)


def _connections(pids: list[int], port: int) -> list[int]:
    """Established connections to ``port`` held by each front end, in ``pids`` order."""
    return [_sockets(pid, port, "ESTABLISHED") for pid in pids]


def _listening(pids: list[int], port: int) -> int:
    """How many of the front ends listen on ``port``."""
    return sum(1 for pid in pids if _sockets(pid, port, "LISTEN"))


def _cpu_s(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def bench(opts: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.ipc_bench import _serve
    from model_server.config import ServingConfig
    from model_server.frontend import enable_multiprocess_metrics, frontend_main

    work = Path(tempfile.mkdtemp(prefix="frontend-bench-"))
    ipc_path = str(work / "device.sock")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(work)
    if opts["metrics"]:
        enable_multiprocess_metrics()
    from model_server.config import DEFAULT_BODY_POOL_MB

    ctx = multiprocessing.get_context("spawn")
    device_opts = {
        "metrics": opts["metrics"], "malloc_tuning": True, "switch_interval_ms": 0.0, "device_ms": opts["device_ms"],
        "prepare_ms": 0.0, "gil_ops": 0, "two_stage": False, "max_batch": 64, "max_queue": 1024, "profile": "",
        "event_loop": opts["event_loop"], "body_pool_mb": DEFAULT_BODY_POOL_MB,
    }  # fmt: skip
    (work / "device.json").write_text(json.dumps({"gpu_decode": True, "max_batch": 64}))
    device = ctx.Process(target=_serve, args=(ipc_path, device_opts), name="device")
    device.start()
    port = opts["port"] or _free_port()
    config = ServingConfig(device="cpu", max_batch_size=64, max_queue_images=1024)
    spec = {
        "model_name": "densenet121", "model_dir": str(opts["model_dir"]), "config": config, "http_port": port,
        "grpc_port": _free_port(), "max_body_bytes": 64 * 2**20, "log_level": "WARNING", "admin_token": None,
        "enable_docs": False, "grace_period_s": 5.0, "metrics": opts["metrics"], "max_inflight": 1024,
        "ipc_path": ipc_path, "parent_pid": os.getpid(), "event_loop": opts["event_loop"],
        "conn_counts": ctx.Array("i", opts["frontends"], lock=False) if opts["balance"] else None,
    }  # fmt: skip
    fronts = [
        ctx.Process(target=frontend_main, args=({**spec, "index": i},), name=f"frontend-{i}")
        for i in range(opts["frontends"])
    ]
    for p in fronts:
        p.start()
    spies: list[subprocess.Popen[bytes]] = []
    try:
        request = _request_bytes(port, "densenet121", opts["images"])
        deadline = time.monotonic() + 120
        pids = [p.pid for p in fronts if p.pid is not None]
        # Ready: every front end listens (started here without the server's wait for siblings, the
        # first one up would otherwise take every connection) and the route answers.
        while True:
            try:
                if _listening(pids, port) == len(pids):
                    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                        s.sendall(request)
                        if b" 200 " in s.recv(64):
                            break
            except OSError:
                pass
            if time.monotonic() > deadline or not all(p.is_alive() for p in fronts):
                raise RuntimeError("the front ends did not start")
            time.sleep(0.2)
        if opts["profile"]:
            Path(opts["profile"]).mkdir(parents=True, exist_ok=True)
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            spies = [
                subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--rate", "200", "--duration", str(int(opts["seconds"] + 2)),
                     "--format", "raw", "--output", str(Path(opts["profile"]) / f"frontend-{i}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                for i, pid in enumerate(pids)
            ]  # fmt: skip
        conns: list[int] = []
        sampler = threading.Thread(
            target=lambda: (time.sleep(opts["warmup_s"] + 1.0), conns.extend(_connections(pids, port))), daemon=True
        )
        sampler.start()
        cpu0 = _cpu_s(pids)
        t0 = time.perf_counter()
        result = asyncio.run(_drive(port, request, opts["concurrency"], opts["seconds"], opts["warmup_s"]))
        sampler.join(timeout=5)
        # The kernel spreads connections over the front ends' SO_REUSEPORT sockets by a hash of the
        # client's address and port: with few keep-alive connections the split can be far from even.
        result["frontend_connections"] = conns
        cpu = _cpu_s(pids) - cpu0
        wall = time.perf_counter() - t0
        # The CPU window includes the warm-up: count the requests of the whole window for the ratio.
        all_requests = result["requests"] * (wall / opts["seconds"])
        result["frontend_cpu_us_per_request"] = round(cpu / max(all_requests, 1) * 1e6, 1)
        result["frontend_cpu_cores"] = round(cpu / wall, 3)
    finally:
        for s in spies:
            s.wait(timeout=60)
        for p in fronts:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        for p in fronts:
            p.join(10)
            if p.is_alive():
                p.kill()
        if device.pid is not None:
            os.kill(device.pid, signal.SIGTERM)
        device.join(10)
        shutil.rmtree(work, ignore_errors=True)
    return {"name": "frontend_bench", **result, "settings": {k: str(v) for k, v in opts.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model-dir", type=Path, required=True, help="any built artifact (labels and manifest only)")
    p.add_argument("--frontends", type=int, default=1, help="front-end processes, default 1")
    p.add_argument("--concurrency", type=int, default=1, help="keep-alive connections, default 1")
    p.add_argument("--images", type=int, default=1, help="VGA JPEGs per request, default 1")
    p.add_argument("--device-ms", type=float, default=0.0, help="stand-in device time per batch, default 0")
    p.add_argument("--metrics", choices=("true", "false"), default="true", help="Prometheus metrics, default true")
    p.add_argument(
        "--balance",
        choices=("true", "false"),
        default="true",
        help="the server's connection balancing over the front ends (--balance_connections), default true",
    )
    p.add_argument(
        "--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
        help="event loop of the front ends and the device stand-in, as the server's --event_loop (default auto)",
    )  # fmt: skip
    p.add_argument("--warmup-s", type=float, default=2.0, help="seconds before measuring, default 2")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds measured, default 10")
    p.add_argument("--port", type=int, default=0, help="HTTP port, default a free one")
    p.add_argument("--profile", default="", help="folder for py-spy profiles (collapsed stacks) of the front ends")
    args = p.parse_args(argv)
    if not (args.model_dir / "variant.json").is_file():
        p.error(f"--model-dir {args.model_dir} holds no variant.json (build one with python -m optimize build)")
    if args.frontends < 1 or args.concurrency < 1:
        p.error("--frontends and --concurrency must be >= 1")
    opts = {**vars(args), "metrics": args.metrics == "true", "balance": args.balance == "true"}
    print(json.dumps(bench(opts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
