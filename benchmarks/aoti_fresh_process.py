"""Does an AOTInductor package load and run in a *fresh* process, without compiling?

On the H100 machine (torch 2.11) loading a ``.pt2`` in a fresh process segfaulted inside the
package loader, while loading it in the process that compiled it worked. This script compiles a
package in one subprocess (and loads it there, as the working case), then loads and runs it in
new subprocesses, each with a different start-up, and reports for each: exit status (-11 is
SIGSEGV; faulthandler prints the Python stack), load and first-call seconds, whether the output
matches the compiling process's, and whether anything was compiled (the child runs with an empty
``TORCHINDUCTOR_CACHE_DIR`` and a counter of inductor compilations; both must stay empty).

Start-ups tried in the fresh process:

* ``plain``: ``import torch; aoti_load_package(path)`` straight away (the failing case).
* ``cuda-init``: ``torch.cuda.init()`` + ``set_device`` + a tiny allocation first, so a CUDA
  context is current before the loader loads cubins (what ``AotiRunner`` does).
* ``device-index``: ``aoti_load_package(path, device_index=0)`` after CUDA init.
* ``runner``: the server's own ``model_server.runtimes.AotiRunner`` on a minimal manifest, with
  CUDA graph capture at start-up.

Usage (GPU machine, repository root)::

    python benchmarks/aoti_fresh_process.py                      # small CNN, ~1 min
    python benchmarks/aoti_fresh_process.py --model densenet121  # the real model, ~2-3 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = ("plain", "cuda-init", "device-index", "runner")


def make_model(name: str) -> Any:
    import torch

    if name == "densenet121":
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.densenet121(weights=None).eval()
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, stride=2, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(64, 1000),
    ).eval()  # fmt: skip


def compile_main(args: argparse.Namespace) -> int:
    """Child 0: compile the package, then load and run it in this same process (the working case)."""
    import torch
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = make_model(args.model).to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(model, (x,))
        aoti_compile_and_package(ep, package_path=args.package, inductor_configs={"freezing": True})
    compile_s = time.perf_counter() - t0
    torch.save(x.cpu(), args.package + ".input.pt")
    with torch.inference_mode():
        out = aoti_load_package(args.package)(x)
    torch.save(out.float().cpu(), args.package + ".output.pt")
    print(json.dumps({"compile_s": round(compile_s, 1), "same_process_load": "ok"}))
    return 0


def load_main(args: argparse.Namespace) -> int:
    """A fresh child: load the package the way ``--mode`` says, run it, compare, report."""
    import faulthandler

    faulthandler.enable()
    import torch

    compiles = {"n": 0}
    try:  # count anything inductor compiles in this process (must stay 0)
        from torch._dynamo.utils import counters

        def compiled() -> int:
            return int(sum(counters["inductor"].values()))

    except ImportError:  # pragma: no cover

        def compiled() -> int:
            return 0

    device = torch.device(args.device)
    t0 = time.perf_counter()
    if args.mode != "plain" and device.type == "cuda":
        torch.cuda.init()
        torch.cuda.set_device(device.index or 0)
        torch.empty(1, device=device)
    x = torch.load(args.package + ".input.pt", weights_only=True).to(device)
    if args.mode == "runner":
        from model_server.runtimes import AotiRunner

        manifest = {
            "slug": "aoti-fresh-process",
            "precision": "fp16" if device.type == "cuda" else "fp32",
            "channels_last": True,
            "input": {"max_batch": args.batch},
            "payload": {f"bucket_{args.batch}": Path(args.package).name},
            "options": {"cuda_graphs": device.type == "cuda"},
        }
        runner = AotiRunner(manifest, Path(args.package).parent, device)
        load_s = time.perf_counter() - t0
        runner.warm_up()

        def fn(t: Any) -> Any:
            return runner.run_device(t)

    else:
        from torch._inductor import aoti_load_package

        kwargs = {"device_index": 0} if args.mode == "device-index" and device.type == "cuda" else {}
        model = aoti_load_package(args.package, **kwargs)
        load_s = time.perf_counter() - t0
        fn = model
    t1 = time.perf_counter()
    with torch.inference_mode():
        out = fn(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_call_s = time.perf_counter() - t1
    ref = torch.load(args.package + ".output.pt", weights_only=True)
    err = float((out.float().cpu() - ref).abs().max())
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    created = [str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()]
    # On a CPU, inductor compiles a tiny vector-ISA probe (``__avx_chk_kernel``) the first time it
    # asks which SIMD the machine has; that is not the model. Anything else would be.
    probes = {p.with_suffix("").name for p in cache.rglob("*.cpp") if "_chk_kernel" in p.read_text(errors="ignore")}
    model_files = [c for c in created if not any(probe in c for probe in probes)]
    compiles["n"] = compiled()
    print(json.dumps({
        "load_s": round(load_s, 3), "first_call_s": round(first_call_s, 3), "max_abs_err": err,
        "inductor_compilations": compiles["n"], "model_files_compiled": model_files[:10],
        "isa_probe_files": len(created) - len(model_files),
    }))  # fmt: skip
    return 0


def orchestrate(args: argparse.Namespace) -> int:
    me = [sys.executable, str(Path(__file__).resolve())]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with tempfile.TemporaryDirectory(prefix="aoti-fresh-") as tmp:
        package = str(Path(tmp) / f"{args.model}-b{args.batch}.pt2")
        common = ["--device", args.device, "--model", args.model, "--batch", str(args.batch), "--package", package]
        print(f"compiling {args.model} batch {args.batch} on {args.device} in a child process ...", flush=True)
        p = subprocess.run([*me, "_compile", *common], env=env, capture_output=True, text=True, timeout=1200)
        if p.returncode != 0:
            print(f"compile child failed ({p.returncode}):\n{p.stderr[-4000:]}")
            return 1
        print("compile child:", p.stdout.strip().splitlines()[-1])
        results: dict[str, Any] = {}
        for mode in args.modes.split(","):
            cache = Path(tmp) / f"inductor-cache-{mode}"
            cache.mkdir()
            child_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
            t0 = time.perf_counter()
            q = subprocess.run(
                [*me, "_load", *common, "--mode", mode], env=child_env, capture_output=True, text=True, timeout=600,
                cwd=tmp,
            )  # fmt: skip
            res: dict[str, Any] = {"returncode": q.returncode, "wall_s": round(time.perf_counter() - t0, 2)}
            if q.returncode == 0:
                res.update(json.loads(q.stdout.strip().splitlines()[-1]))
            else:
                res["signal"] = "SIGSEGV" if q.returncode == -11 else None
                res["stderr_tail"] = q.stderr[-2500:]
            results[mode] = res
            verdict = (
                "OK"
                if q.returncode == 0
                else f"FAILED (exit {q.returncode}{', SIGSEGV' if q.returncode == -11 else ''})"
            )
            print(f"fresh process, mode {mode:13} {verdict}")
        print(json.dumps(results, indent=2))
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
        ok = [m for m, r in results.items() if r["returncode"] == 0]
        clean = [
            m for m in ok if not results[m].get("inductor_compilations") and not results[m].get("model_files_compiled")
        ]
        print(f"summary: loads in a fresh process with: {', '.join(ok) or 'none'}")
        print(f"summary: and without compiling anything: {', '.join(clean) or 'none'}")
        return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    role = argv.pop(0) if argv and argv[0] in ("_compile", "_load") else "main"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="small-cnn", choices=("small-cnn", "densenet121"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json-out", help="also write the results here")
    p.add_argument("--package", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if role == "_compile":
        return compile_main(args)
    if role == "_load":
        return load_main(args)
    if args.json_out is None and os.environ.get("OUT"):
        args.json_out = str(Path(os.environ["OUT"]) / "aoti_fresh_process.json")
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
