"""Overload benchmark of one predictor: capacity, then 3x that offered load, then recovery.

Starts ``python -m model_server`` as a subprocess (so this process never imports kserve), or
targets a running one with ``--url``. Three phases, each ``--phase-s`` long:

1. capacity: a closed loop of ``--clients`` back-to-back clients; capacity is the rate of
   200 responses;
2. overload: an open loop offering ``--factor`` x capacity (requests at fixed intervals,
   whatever the answers); the excess should be refused at once with 503 + Retry-After
   while accepted requests keep a bounded p99;
3. recovery: an open loop at ``--recovery-factor`` x capacity; everything should be served.

Writes ``benchmarks/results/<date>-<host>-overload-<slug>.json`` with ``name``, ``command``,
``environ`` and ``metrics``, and prints the metrics.

    python benchmarks/overload_bench.py --model-dir artifacts/densenet121-eager-fp32 --device cpu \\
        --max-batch-size 4 --max-queue-images 8 --label "CPU, 2 shared cores"
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
V1 = "/v1/models/{name}:predict"


@dataclass
class Result:
    phase: str
    sent_at: float
    status: int  # 0: connection error or client timeout
    latency_s: float
    retry_after: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _payload(image: Path | None, size: int) -> bytes:
    from PIL import Image

    if image is None:
        sys.path.insert(0, str(ROOT))  # run as a script: the repository root is not on the path
        from optimize.samples import sample_paths

        image = next(p for p in sample_paths() if p.name == "chelsea.png")
    img = Image.open(image).convert("RGB").resize((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    body = {"instances": [{"image": {"b64": base64.b64encode(buf.getvalue()).decode()}}]}
    return json.dumps(body).encode()


def _start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen[bytes], str, list[str]]:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "model_server", "--model_dir", str(args.model_dir), "--model_name", args.model_name,
        "--http_port", str(port), "--grpc_port", str(_free_port()), "--device", args.device,
        "--max_batch_size", str(args.max_batch_size), "--max_queue_images", str(args.max_queue_images),
        "--max_delay_ms", str(args.max_delay_ms), "--request_timeout_s", str(args.request_timeout_s),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return proc, url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready in 300 s; see {log}")


async def _one(client: httpx.AsyncClient, url: str, body: bytes, phase: str, t_base: float) -> Result:
    t0 = time.monotonic()
    try:
        r = await client.post(url, content=body, headers={"content-type": "application/json"})
        status, retry = r.status_code, "retry-after" in r.headers
    except httpx.HTTPError:
        status, retry = 0, False
    return Result(phase, t0 - t_base, status, time.monotonic() - t0, retry)


async def _closed_loop(url: str, body: bytes, clients: int, seconds: float, t_base: float) -> list[Result]:
    results: list[Result] = []
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def loop() -> None:
            while time.monotonic() < stop:
                results.append(await _one(client, url, body, "capacity", t_base))

        await asyncio.gather(*(loop() for _ in range(clients)))
    return results


async def _open_loop(url: str, body: bytes, rate: float, seconds: float, phase: str, t_base: float) -> list[Result]:
    """Send at ``rate`` requests/s for ``seconds`` regardless of the answers (an open loop)."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks = []
        start = time.monotonic()
        n = max(1, round(rate * seconds))
        for i in range(n):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, url, body, phase, t_base)))
        return list(await asyncio.gather(*tasks))


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def _summary(results: list[Result], seconds: float) -> dict[str, Any]:
    ok = [r.latency_s for r in results if r.status == 200]
    refused = [r for r in results if r.status in (429, 503)]
    other = [r for r in results if r.status not in (200, 429, 503)]
    return {
        "requests": len(results),
        "offered_rps": round(len(results) / seconds, 2),
        "ok": len(ok),
        "ok_rps": round(len(ok) / seconds, 2),
        "ok_p50_ms": _pct(ok, 50),
        "ok_p99_ms": _pct(ok, 99),
        "ok_max_ms": round(max(ok) * 1000, 1) if ok else None,
        "refused": len(refused),
        "refused_ratio": round(len(refused) / len(results), 3) if results else None,
        "refused_with_retry_after": sum(r.retry_after for r in refused),
        "refused_p50_ms": _pct([r.latency_s for r in refused], 50),
        "refused_p99_ms": _pct([r.latency_s for r in refused], 99),
        "other_errors": len(other),
        "other_statuses": sorted({r.status for r in other}),
    }


def _recovery_s(results: list[Result], overload_end: float) -> float | None:
    """Seconds from the end of the overload to the first request sent after it that was served."""
    after = sorted((r for r in results if r.sent_at >= overload_end), key=lambda r: r.sent_at)
    first_ok = next((r for r in after if r.status == 200), None)
    return round(first_ok.sent_at + first_ok.latency_s - overload_end, 2) if first_ok else None


def _slug(args: argparse.Namespace) -> str:
    if args.slug:
        return str(args.slug)
    manifest = Path(args.model_dir) / "variant.json" if args.model_dir else None
    if manifest and manifest.is_file():
        return str(json.loads(manifest.read_text())["slug"])
    return "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model-dir", type=Path, help="artifact to serve (starts a server); or use --url")
    p.add_argument("--url", help="a running predictor, e.g. http://127.0.0.1:8080 (its settings are yours to record)")
    p.add_argument("--model-name", default="densenet121")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--max-queue-images", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--request-timeout-s", type=float, default=30.0)
    p.add_argument("--clients", type=int, default=0, help="closed-loop clients (default: 2 x max batch size)")
    p.add_argument("--phase-s", type=float, default=20.0, help="length of each phase")
    p.add_argument("--factor", type=float, default=3.0, help="overload as a multiple of the measured capacity")
    p.add_argument("--recovery-factor", type=float, default=0.5)
    p.add_argument("--image", type=Path, help="image to send (default: scikit-image's chelsea, as a JPEG)")
    p.add_argument("--image-size", type=int, default=320)
    p.add_argument("--label", default="", help="what ran it, e.g. 'CPU, 2 shared cores' or 'H100'")
    p.add_argument("--slug", default="", help="variant slug for the file name (default: from variant.json)")
    p.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if bool(args.model_dir) == bool(args.url):
        print("error: give exactly one of --model-dir and --url", file=sys.stderr)
        return 2
    clients = args.clients or 2 * args.max_batch_size
    body = _payload(args.image, args.image_size)
    proc = None
    server_cmd: list[str] = []
    if args.model_dir:
        log = args.output_dir / "overload-server.log"
        args.output_dir.mkdir(parents=True, exist_ok=True)
        proc, base, server_cmd = _start_server(args, log)
    else:
        base = args.url.rstrip("/")
    url = base + V1.format(name=args.model_name)
    try:
        # Warm the client path, then measure.
        asyncio.run(_closed_loop(url, body, 1, 2.0, time.monotonic()))
        t_base = time.monotonic()
        print(f"capacity: {clients} closed-loop clients for {args.phase_s:.0f}s ...", file=sys.stderr)
        cap = asyncio.run(_closed_loop(url, body, clients, args.phase_s, t_base))
        capacity = sum(r.status == 200 for r in cap) / args.phase_s
        if capacity <= 0:
            print("error: nothing was served in the capacity phase", file=sys.stderr)
            return 1
        rate = args.factor * capacity
        print(f"capacity {capacity:.2f} req/s; overload at {rate:.2f} req/s ...", file=sys.stderr)
        over = asyncio.run(_open_loop(url, body, rate, args.phase_s, "overload", t_base))
        overload_end = time.monotonic() - t_base
        rec_rate = max(args.recovery_factor * capacity, 0.2)
        print(f"recovery at {rec_rate:.2f} req/s ...", file=sys.stderr)
        rec = asyncio.run(_open_loop(url, body, rec_rate, args.phase_s, "recovery", t_base))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    metrics = {
        "label": args.label,
        "capacity_rps": round(capacity, 2),
        "capacity": _summary(cap, args.phase_s),
        "overload_factor": args.factor,
        "overload": _summary(over, args.phase_s),
        "recovery": _summary(rec, args.phase_s),
        "recovery_first_ok_s": _recovery_s(rec, overload_end),
        "settings": {
            "max_batch_size": args.max_batch_size,
            "max_queue_images": args.max_queue_images,
            "max_delay_ms": args.max_delay_ms,
            "request_timeout_s": args.request_timeout_s,
            "clients": clients,
            "phase_s": args.phase_s,
            "image_size": args.image_size,
            "payload_bytes": len(body),
        },
    }
    host = socket.gethostname()
    record = {
        "name": f"overload-{_slug(args)}",
        "command": shlex.join([sys.executable, *sys.argv]),
        "server_command": shlex.join(server_cmd) if server_cmd else None,
        "environ": {
            "host": host,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "device": args.device,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "metrics": metrics,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    out = args.output_dir / f"{date}-{host}-overload-{_slug(args)}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
