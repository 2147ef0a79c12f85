"""Wake-up micro-benchmark: what a process blocked on a socket pays to wake after being idle.

At concurrency 1 a request crosses several processes and threads (client, front end, device
process, device thread), and each of them sleeps in ``epoll``/``recv`` while the GPU works. A
sleeping CPU that receives the wake-up must leave its idle state first; on a host with deep
C-states (or a VM whose idle vCPU the hypervisor descheduled) that costs far more than the
message itself. This bench separates the two on any machine:

- two processes connected by a Unix socket pair ping-pong one byte;
- before each ping the sender waits ``--gap-ms`` (the time the GPU would take), sleeping or
  spinning;
- the responder either blocks in ``recv`` (as our event loops do) or polls a non-blocking
  socket in a loop (spins), and the sender waits for the answer the same way.

It prints one JSON line with the round-trip p50/p90/p99 (microseconds) of each mode:
``hot`` (blocking, no gap: the message cost), ``idle`` (blocking, both sides idle for the gap:
two wake-ups from idle per round trip, as one hop there and back) and ``spin`` (both spin through
the gap: no idle state to leave). ``idle - hot`` is about twice the cost of one wake-up from idle.

    python benchmarks/wakeup_bench.py --gap-ms 2 --rounds 2000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _responder(sock: socket.socket, spin: bool) -> None:
    sock.setblocking(not spin)
    while True:
        if spin:
            try:
                data = sock.recv(1)
            except BlockingIOError:
                continue
        else:
            data = sock.recv(1)
        if not data or data == b"q":
            return
        sock.send(data)


def _round_trips(sock: socket.socket, *, rounds: int, gap_s: float, spin: bool) -> list[float]:
    sock.setblocking(not spin)
    out: list[float] = []
    for _ in range(rounds):
        if gap_s:
            if spin:
                end = time.perf_counter() + gap_s
                while time.perf_counter() < end:
                    pass
            else:
                time.sleep(gap_s)
        t0 = time.perf_counter()
        sock.send(b"x")
        while True:
            try:
                if sock.recv(1):
                    break
            except BlockingIOError:
                continue
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def run_mode(*, rounds: int, gap_s: float, spin: bool) -> dict[str, float]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = multiprocessing.get_context("fork").Process(target=_responder, args=(child, spin), daemon=True)
    proc.start()
    try:
        _round_trips(parent, rounds=min(50, rounds), gap_s=0.0, spin=spin)  # both sides running
        rtts = _round_trips(parent, rounds=rounds, gap_s=gap_s, spin=spin)
    finally:
        parent.setblocking(True)
        parent.send(b"q")
        proc.join(5)
        parent.close()
        child.close()
    q = statistics.quantiles(rtts, n=100)
    return {"p50_us": round(q[49], 1), "p90_us": round(q[89], 1), "p99_us": round(q[98], 1)}


def cpuidle_states() -> list[str]:
    """The kernel's idle states for CPU 0 (name and exit latency), empty where it exposes none."""
    base = "/sys/devices/system/cpu/cpu0/cpuidle"
    states: list[str] = []
    try:
        for name in sorted(os.listdir(base)):
            with open(f"{base}/{name}/name") as f, open(f"{base}/{name}/latency") as g:
                states.append(f"{f.read().strip()}:{g.read().strip()}us")
    except OSError:
        pass
    return states


def _environ() -> dict[str, Any]:
    """Versions, host and GPU as every record has them (``optimize.build.environment``); called after
    the timings, so torch is not imported before the processes fork."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from optimize.build import environment

    return environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"), packages=())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--gap-ms", type=float, default=2.0, help="idle time before each ping, default 2 (a c=1 GPU batch)")
    p.add_argument("--rounds", type=int, default=2000, help="round trips per mode, default 2000")
    args = p.parse_args(argv)
    if args.gap_ms < 0 or args.rounds < 10:
        p.error(f"--gap-ms must be >= 0 and --rounds >= 10, got {args.gap_ms} and {args.rounds}")
    gap_s = args.gap_ms / 1000.0
    result: dict[str, Any] = {
        "name": "wakeup_bench",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cpus": os.cpu_count(),
        "cpuidle": cpuidle_states(),
        "gap_ms": args.gap_ms,
        "hot": run_mode(rounds=args.rounds, gap_s=0.0, spin=False),
        "idle": run_mode(rounds=args.rounds, gap_s=gap_s, spin=False),
        "spin": run_mode(rounds=args.rounds, gap_s=gap_s, spin=True),
    }
    result["idle_minus_hot_p50_us"] = round(result["idle"]["p50_us"] - result["hot"]["p50_us"], 1)
    # The record's keys (benchmarks/results): every figure above with its unit, and the host's versions.
    result["metrics"] = {
        "gap_ms": args.gap_ms,
        **{f"{mode}_{key}": result[mode][key] for mode in ("hot", "idle", "spin") for key in result[mode]},
        "idle_minus_hot_p50_us": result["idle_minus_hot_p50_us"],
    }
    result["environ"] = {**_environ(), "cpuidle": result["cpuidle"]}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
