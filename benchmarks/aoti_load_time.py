"""Where does loading an AOTInductor artifact spend its time?

Serving ``densenet121-aoti-fp16-cl-dynamic`` on the H100 took 52 s from process start to ready,
47.8 s of it in "weights loaded" (the ``.pt2`` package load), against about 10 s for a bare torch
process. This script loads an artifact's packages in a fresh process and times each phase on its
own: ``import torch``, CUDA initialisation, ``import torch._inductor``, each package load
(``--twice``: a second load of the same file separates one-time costs from per-package ones), the
first call at the smallest and largest batch, and (``--runner``) the server's whole ``AotiRunner``
with its CUDA-graph warm-up.
It also lists what the package holds (files by kind, bytes), since the loader extracts all of it.

Run it under ``py-spy record --native`` to see the C++ frames of a slow phase.

Usage (repository root)::

    python benchmarks/aoti_load_time.py ARTIFACT_DIR [--device cuda] [--twice] [--runner] [--json-out load.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def package_contents(path: Path) -> dict[str, Any]:
    """Files of a ``.pt2`` by extension: count and uncompressed bytes."""
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            ext = Path(info.filename).suffix or Path(info.filename).name
            counts[ext] += 1
            sizes[ext] += info.file_size
    return {ext: {"files": counts[ext], "mb": round(sizes[ext] / 2**20, 2)} for ext in sorted(counts)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path, help="an artifact directory whose variant.json has runtime 'aoti'")
    p.add_argument("--device", default="cuda")
    p.add_argument("--twice", action="store_true", help="load each package a second time in the same process")
    p.add_argument("--runner", action="store_true", help="then load and warm the server's AotiRunner too")
    p.add_argument("--json-out", type=Path, help="also write the result here")
    args = p.parse_args(argv)

    manifest = json.loads((args.artifact / "variant.json").read_text())
    if manifest.get("runtime") != "aoti":
        p.error(f"{args.artifact} holds runtime {manifest.get('runtime')!r}; this script times 'aoti' artifacts")
    names = sorted({v for k, v in manifest["payload"].items() if k.startswith("bucket_")})
    seconds: dict[str, float] = {}

    def phase(name: str, t0: float) -> float:
        now = time.perf_counter()
        seconds[name] = round(now - t0, 3)
        print(f"{name}: {seconds[name]:.3f} s", flush=True)
        return now

    t = time.perf_counter()
    import torch

    t = phase("import_torch", t)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.init()  # type: ignore[no-untyped-call]
        torch.cuda.set_device(device.index or 0)
        torch.empty(1, device=device)
        torch.cuda.synchronize()
    t = phase("cuda_init", t)
    from torch._inductor import aoti_load_package

    t = phase("import_inductor", t)
    index = (device.index or 0) if device.type == "cuda" else -1
    loaded = {}
    for name in names:
        for attempt in ("first", "second") if args.twice else ("first",):
            pkg = aoti_load_package(str(args.artifact / name), run_single_threaded=True, device_index=index)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = phase(f"load_{name}_{attempt}", t)
            loaded[name] = pkg
    sys.path.insert(0, str(ROOT))
    from model_server.runtimes import load_runner

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(manifest.get("precision", ""), torch.float32)
    for name, pkg in loaded.items():
        buckets = sorted(int(k.split("_", 1)[1]) for k, v in manifest["payload"].items() if v == name)
        for b in buckets[:1] + buckets[-1:]:
            x = torch.randn(b, 3, 224, 224, device=device, dtype=dtype)
            if manifest.get("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)
            pkg(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = phase(f"first_call_{name}_b{b}", t)
    del loaded
    if args.runner:
        runner = load_runner(manifest, args.artifact, device)
        t = phase("runner_load", t)
        runner.warm_up()
        phase("runner_warm_up", t)

    result = {
        "artifact": manifest["slug"],
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "seconds": seconds,
        "packages": {name: package_contents(args.artifact / name) for name in names},
        "build_details": {k: v for k, v in manifest.get("details", {}).items() if "fresh" in k or k == "cxx"},
    }
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
