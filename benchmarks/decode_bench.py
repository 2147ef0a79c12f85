"""Decode paths compared on one machine: PIL (CPU, draft mode) vs nvJPEG single and batched, per image."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from loadtest._payloads import photo_set
from model_server.preprocess import decode_and_crop, decode_batch_gpu


def timed(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def main() -> int:
    dev = torch.device("cuda")
    res: dict[str, float] = {}
    for size in ("vga", "12mp"):
        jpegs = [p.jpeg for p in photo_set(size)]
        one = jpegs[0]
        res[f"{size}_jpeg_kb"] = round(sum(len(j) for j in jpegs) / len(jpegs) / 1024, 1)
        res[f"{size}_pil_cpu_ms"] = round(timed(lambda one=one: decode_and_crop(one), 20), 3)
        res[f"{size}_nvjpeg_single_ms"] = round(timed(lambda one=one: decode_batch_gpu([one], dev), 20), 3)
        for n in (32, 128):
            batch = (jpegs * (n // len(jpegs) + 1))[:n]
            res[f"{size}_nvjpeg_batch{n}_ms_per_img"] = round(timed(lambda b=batch: decode_batch_gpu(b, dev), 5) / n, 3)
    print(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "decode_bench.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
