"""Why does an AOTInductor shared object segfault at load on the H100 machine? A diagnostic probe.

Session 1 saw ``aoti_load_package`` (and ``AOTIModelContainerRunnerCuda`` on a plain ``.so``) die
with SIGSEGV on the H100 machine (torch 2.11 + CUDA 13), in the compiling process and in fresh ones.
This probe narrows it down, every step in its own subprocess so a crash is only a data point:

1. ``facts``: compiler, glibc, torch/CUDA versions, the C++ ABI, which ``libstdc++``/``libgomp`` a
   torch process maps.
2. For a tiny CNN on CPU and on CUDA, and for DenseNet-121 FP16 channels-last on CUDA: compile a
   ``.pt2`` in one child, load and run it in a fresh child; exit status, error tail, output error.
3. For each crashing load: the native backtrace, under ``cuda-gdb`` (the image has no gdb) and with
   an ``LD_PRELOAD``-ed SIGSEGV handler that prints ``backtrace_symbols_fd``.
4. Inductor options that change how the ``.so`` is built or loaded (constants outside the ``.so``,
   no ``.incbin`` constants, kernels embedded, no stack allocation, ``-O0 -g``), each compiled and
   loaded fresh, to find one that loads.

Usage (GPU machine, repository root)::

    python benchmarks/aoti_probe.py --out "$OUT/aoti_probe.json"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FACTS = r"""
import json, subprocess, sys, torch, torch._inductor.config as c
def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=30).stdout.strip()[:400]
    except Exception as e:
        return repr(e)
torch.empty(1, device="cuda")
maps = open("/proc/self/maps").read().split("\n")
keys = ("libstdc++", "libgomp", "libgcc_s", "libcuda.so", "libcudart")
libs = sorted({l.split()[-1] for l in maps if any(k in l for k in keys)})
print(json.dumps({
    "python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
    "cxx11_abi": torch._C._GLIBCXX_USE_CXX11_ABI, "cxx": c.cpp.cxx,
    "gxx": sh("g++ --version | head -1"), "inductor_cxx_version": sh(f"{c.cpp.cxx[-1]} --version | head -1"),
    "env_CXX": __import__("os").environ.get("CXX"), "gcc_path": sh("which g++ gcc c++"),
    "glibc": sh("ldd --version | head -1"), "nvcc": sh("nvcc --version | tail -2"),
    "libs_mapped": libs, "system_libstdcxx": sh("ls -l /usr/lib/x86_64-linux-gnu/libstdc++.so.6*"),
    "cuda_gdb": sh("which cuda-gdb"), "gpu": torch.cuda.get_device_name(0),
    "capability": torch.cuda.get_device_capability(0),
}))
"""

COMPILE = r"""
import json, sys, time, torch
from torch._inductor import aoti_compile_and_package
model_name, device, pkg, configs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
torch.manual_seed(0)
if model_name == "densenet121":
    import torchvision
    model, batch, dtype = torchvision.models.densenet121(weights=None), 8, torch.float16
else:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10))
    batch, dtype = 2, torch.float16 if device == "cuda" else torch.float32
model = model.eval().to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
t0 = time.perf_counter()
with torch.no_grad():
    ep = torch.export.export(model, (x,))
    aoti_compile_and_package(ep, package_path=pkg, inductor_configs=configs)
    ref = model(x).float().cpu()
torch.save({"x": x.cpu(), "ref": ref}, pkg + ".io.pt")
print(json.dumps({"compile_s": round(time.perf_counter() - t0, 1)}))
"""

LOAD = r"""
import json, sys, time, torch
from torch._inductor import aoti_load_package
pkg, device = sys.argv[1], sys.argv[2]
io = torch.load(pkg + ".io.pt")
if device == "cuda":
    torch.empty(1, device="cuda")
t0 = time.perf_counter()
print("loading", flush=True)
fn = aoti_load_package(pkg)
load_s = time.perf_counter() - t0
print("loaded", flush=True)
out = fn(io["x"].to(device))
if device == "cuda":
    torch.cuda.synchronize()
print(json.dumps({"load_s": round(load_s, 2), "max_abs_err": float((out.float().cpu() - io["ref"]).abs().max())}))
"""

SEGV_HANDLER = r"""
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
static void on_fault(int sig) {
    void *frames[64];
    const char msg[] = "\n[segv-backtrace]\n";
    write(2, msg, sizeof msg - 1);
    int n = backtrace(frames, 64);
    backtrace_symbols_fd(frames, n, 2);
    signal(sig, SIG_DFL);
    raise(sig);
}
__attribute__((constructor)) static void install(void) {
    signal(SIGSEGV, on_fault);
    signal(SIGBUS, on_fault);
    signal(SIGABRT, on_fault);
}
"""

#: inductor options tried when the default package crashes at load
OPTION_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "constants_outside_so": {"aot_inductor.package_constants_in_so": False},
    "no_asm_constants": {"aot_inductor.use_consts_asm_build": False},
    "embed_kernels": {"aot_inductor.embed_kernel_binary": True},
    "no_stack_alloc": {"aot_inductor.allow_stack_allocation": False},
    "debug_O0_g": {"aot_inductor.debug_compile": True},
}


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    result: dict[str, Any] = {"rc": rc, "s": round(time.perf_counter() - t0, 1)}
    last = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if last:
        result.update(json.loads(last[-1]))
    if rc != 0:
        result["stdout_tail"] = out[-600:]
        result["stderr_tail"] = err[-2500:]
    return result


def build_handler(work: Path) -> str | None:
    src = work / "segv.c"
    src.write_text(SEGV_HANDLER)
    so = work / "libsegv.so"
    p = subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(so), str(src)], capture_output=True, text=True)
    return str(so) if p.returncode == 0 else None


def backtraces(pkg: str, device: str, work: Path, handler: str | None) -> dict[str, Any]:
    py = [sys.executable, "-c", LOAD, pkg, device]
    found: dict[str, Any] = {}
    if handler:
        env = {**os.environ, "LD_PRELOAD": handler, "PYTHONFAULTHANDLER": "0"}
        r = run(py, 300, env)
        found["segv_handler"] = r.get("stderr_tail", "")[-3000:]
    gdb = shutil.which("cuda-gdb")
    if gdb:
        script = work / "load.py"
        script.write_text(LOAD)
        cmd = [gdb, "-batch", "-ex", "set pagination off", "-ex", "set cuda break_on_launch none", "-ex", "run"]
        cmd += ["-ex", "bt 40", "-ex", "info sharedlibrary", "--args", sys.executable, str(script), pkg, device]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
            full = p.stdout + p.stderr
        except subprocess.TimeoutExpired:
            full = "cuda-gdb timed out"
        i = full.find("received signal")
        found["cuda_gdb"] = (full[max(i - 200, 0) :] if i >= 0 else full[-4000:])[:6000]
    return found


def probe(model: str, device: str, options: str, work: Path, timeout: float, cxx: str | None) -> dict[str, Any]:
    tag = Path(cxx).parent.parent.name if cxx else "default-cxx"
    pkg = str(work / f"{model}-{device}-{options}-{tag}.pt2")
    env = {**os.environ, "CXX": cxx} if cxx else None
    cmd = [sys.executable, "-c", COMPILE, model, device, pkg, json.dumps(OPTION_SETS[options])]
    result: dict[str, Any] = {"compile": run(cmd, timeout, env), "pkg": pkg, "cxx": cxx or os.environ.get("CXX")}
    if result["compile"]["rc"] == 0:
        result["load_fresh"] = run([sys.executable, "-X", "faulthandler", "-c", LOAD, pkg, device], 300)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="aoti_probe.json")
    ap.add_argument("--work", default=None, help="folder for packages (default: a temporary one)")
    ap.add_argument("--steps", default="tiny-cpu,tiny-cuda,densenet121-cuda", help="MODEL-DEVICE pairs to probe")
    ap.add_argument("--options", default="default", help=f"comma-separated option sets: {', '.join(OPTION_SETS)}")
    ap.add_argument("--cxx", default=None, help="C++ compiler for inductor (CXX of the compiling child)")
    ap.add_argument("--backtrace", action="store_true", help="native backtrace (cuda-gdb, SIGSEGV handler) of crashes")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="aoti-probe-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"facts": run([sys.executable, "-c", FACTS], 120), "steps": {}}
    print("facts:", json.dumps(report["facts"])[:1500], flush=True)
    handler = build_handler(work) if args.backtrace else None
    for step in args.steps.split(","):
        model, device = step.rsplit("-", 1)
        for options in args.options.split(","):
            key = f"{step}-{options}"
            r = probe(model, device, options, work, 420, args.cxx)
            if args.backtrace and r.get("load_fresh", {}).get("rc") not in (0, None):
                r["backtrace"] = backtraces(r["pkg"], device, work, handler)
            report["steps"][key] = r
            Path(args.out).write_text(json.dumps(report, indent=1))  # keep what we have if the call is cut short
            brief = {k: v for k, v in r.get("load_fresh", r["compile"]).items() if k != "stdout_tail"}
            print(key, "compile_s", r["compile"].get("compile_s"), json.dumps(brief)[:700], flush=True)
    summary = {k: (v["compile"].get("rc"), v.get("load_fresh", {}).get("rc")) for k, v in report["steps"].items()}
    print("summary (compile rc, fresh load rc):", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
