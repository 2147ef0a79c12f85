"""Where does loading an AOTInductor artifact spend its time?

Serving ``densenet121-aoti-fp16-cl-dynamic`` on the H100 took 52-55 s from process start to ready,
48 s of it loading the ``.pt2`` package, against about 11 s for a bare torch process. ``py-spy``
put the load in ``torch._inductor.aoti_load_package`` -> ``get_device_information`` ->
``pick_vec_isa``: after loading, torch compares the CPU's vector ISA with the package's (for a
warning) and finds it by compiling a probe per ISA with the C++ compiler. The server now calls the
C++ loader itself (``model_server.runtimes.load_aoti_package``).

This script times, in a fresh process: ``import torch``, CUDA initialisation, the server's
``AotiRunner`` load and its warm-up (CUDA graphs per bucket), whether that imported
``torch._inductor``; then (``--torch-loader``) the same packages through
``torch._inductor.aoti_load_package``, the path it replaced, for comparison in the same run. It
also lists what each package holds. Run it under ``py-spy record --native`` for the C++ frames.

Usage (repository root)::

    python benchmarks/aoti_load_time.py ARTIFACT_DIR [--device cuda] [--torch-loader] [--json-out load.json]
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
    p.add_argument(
        "--torch-loader", action="store_true", help="then load the packages through torch._inductor.aoti_load_package"
    )
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
    sys.path.insert(0, str(ROOT))
    from model_server.runtimes import load_runner

    t = phase("import_model_server", t)
    runner = load_runner(manifest, args.artifact, device)
    t = phase("runner_load", t)
    inductor_imported = "torch._inductor" in sys.modules
    runner.warm_up()
    t = phase("runner_warm_up", t)
    pixels = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        logits = runner(pixels.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = phase("runner_first_call_b1", t)
    del runner

    if args.torch_loader:
        from torch._inductor import aoti_load_package

        t = phase("torch_loader_import_inductor", t)
        index = (device.index or 0) if device.type == "cuda" else -1
        for name in names:
            package = aoti_load_package(str(args.artifact / name), run_single_threaded=True, device_index=index)
            t = phase(f"torch_loader_load_{name}", t)
            del package

    from optimize.build import environment

    cli = sys.argv[1:] if argv is None else argv
    result = {
        "name": "aoti-load-time",
        "command": "python " + " ".join([str(Path(__file__).relative_to(ROOT)), *cli]),
        "date": time.strftime("%Y-%m-%d"),
        "environ": environment(device, packages=()),
        "artifact": manifest["slug"],
        "metrics": {f"{k}_s": v for k, v in seconds.items()},
        "runner_imported_torch_inductor": inductor_imported,
        "logits_shape": list(logits.shape),
        "packages": {name: package_contents(args.artifact / name) for name in names},
    }
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
