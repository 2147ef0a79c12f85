"""Writing a benchmark's JSON record: ``benchmarks/results/<date>-<gpu>-<name>.json`` and a copy under ``$OUT``.

Every record holds ``name``, ``command`` (the exact command line), ``date``, ``environ`` (GPU,
driver, versions: ``optimize.build.environment``) and ``metrics`` (unit-suffixed keys).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def host_speed(repeats: int = 5) -> dict[str, float]:
    """A fingerprint of the host's CPU speed, for records taken on machines that all name the same CPU model.

    Serving figures follow the host (the Python front ends, the batcher, nvJPEG's host-side work), and
    lent machines of one GPU kind all read "Intel(R) Xeon(R) Processor". Three short single-thread
    probes, each the best of ``repeats`` (about 0.3 s in all), let records be compared by host:

    - ``python_loop_ms``: one million iterations of a Python ``for`` loop adding integers (the interpreter);
    - ``memcpy_gb_s``: copying 64 MiB between two preallocated host buffers (memory bandwidth);
    - ``pil_decode_vga_ms``: PIL decoding one 640x480 JPEG of seeded noise at quality 90 (the CPU decoder).
    """
    import io
    import time

    import numpy as np
    from PIL import Image

    def best(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def loop() -> None:
        total = 0
        for i in range(1_000_000):
            total += i

    src = np.ones(64 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()

    def decode() -> None:
        Image.open(io.BytesIO(jpeg)).convert("RGB").load()

    return {
        "python_loop_ms": round(best(loop) * 1e3, 2),
        "memcpy_gb_s": round(src.nbytes / best(lambda: np.copyto(dst, src)) / 1e9, 2),
        "pil_decode_vga_ms": round(best(decode) * 1e3, 2),
    }


def speed_drift_pct(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """How much slower each :func:`host_speed` probe read at the end of a run than at its start, in %
    (positive: slower after; ``memcpy_gb_s`` is a rate, so its ratio is turned to match the times)."""
    out = {}
    for key, b in before.items():
        a = after.get(key)
        if not a or not b:
            continue
        slower = b / a if key.endswith("_gb_s") else a / b
        out[key] = round((slower - 1.0) * 100.0, 1)
    return out


def write_record(
    name: str,
    script: str,
    argv: Sequence[str],
    device: torch.device,
    metrics: dict[str, Any],
    results_dir: Path,
    *,
    packages: tuple[str, ...] = ("torchvision", "pillow"),
) -> Path:
    """Write the record of one run of ``script`` (``benchmarks/<file>.py``) called with ``argv``; print its
    metrics (the command's output) and, on stderr, where it went."""
    from optimize.build import environment

    env = environment(device, packages=packages)
    env["host_speed"] = host_speed()
    gpu = (env.get("gpu") or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    date = dt.date.today().isoformat()
    record = {
        "name": name,
        "command": "python " + " ".join(shlex.quote(a) for a in [script, *argv]),
        "date": date,
        "environ": env,
        "metrics": metrics,
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{date}-{gpu}-{name}.json"
    text = json.dumps(record, indent=1) + "\n"
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(text)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return path
