"""Start-up micro-benchmark: process start to ready, and what each process of the server holds.

Starts ``python -m model_server`` on an artifact with ``--frontends N`` (``--repo`` picks the
source tree, so two commits can be compared on one machine, interleaved), polls
``/v2/health/ready`` every 50 ms, then reads the resident memory of the device process and of
each front end (``psutil``; the front ends are the ``multiprocessing`` children). Repeats
``--runs`` times and prints one JSON line per run: ``ready_s``, ``device_rss_mb``,
``frontend_rss_mb`` (a list) and the tree it ran. Any device works; ``serve_bench.py`` measures
ready against a bare-torch floor on a GPU.

``--import-contention N`` times ``import torch`` in a fresh process alone and while N processes
import what a front end imports, started at the same moment (as the server starts its front ends
beside the device process, whose first step is that import): whether the front ends' start-up
slows the device process's.

    python benchmarks/startup_bench.py --model-dir artifacts/densenet121-eager-fp32 --device cpu --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def run_once(
    repo: Path, model_dir: Path, *, device: str, frontends: int, timeout_s: float, extra: list[str]
) -> dict[str, Any]:
    import psutil
    from serve_bench import free_port_pair  # this folder is on the path when run as a script

    port = free_port_pair()
    cmd = [
        sys.executable, "-m", "model_server", "--model_dir", str(model_dir), "--device", device,
        "--frontends", str(frontends), "--http_port", str(port), "--grpc_port", str(port + 1),
        "--log_level", "WARNING", *extra,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(repo))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not _ready(port):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError(f"not ready after {timeout_s} s")
            time.sleep(0.05)
        ready_s = time.perf_counter() - t0
        time.sleep(1.0)  # the front ends' last start-up allocations
        me = psutil.Process(proc.pid)
        fronts = [c for c in me.children() if "--multiprocessing-fork" in " ".join(c.cmdline())]
        return {
            "repo": str(repo),
            "ready_s": round(ready_s, 3),
            "device_rss_mb": round(me.memory_info().rss / 2**20, 1),
            "frontend_rss_mb": [round(c.memory_info().rss / 2**20, 1) for c in fronts],
        }
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


_IMPORT_TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
#: What a front end of --frontends N imports before it serves (KServe, FastAPI, grpc, our modules).
_FRONT_END_IMPORTS = "import kserve.model_server, kserve.protocol.grpc.server, model_server.frontend, model_server.rest"


def import_contention(repo: Path, *, beside: int, runs: int) -> dict[str, Any]:
    """Seconds of ``import torch`` in a fresh process, alone and while ``beside`` processes import
    what a front end imports (started the same moment, as the server starts its front ends)."""
    env = dict(os.environ, PYTHONPATH=str(repo))

    def torch_import() -> float:
        out = subprocess.run([sys.executable, "-c", _IMPORT_TORCH], cwd=repo, env=env, capture_output=True,
                             text=True, check=True, timeout=300)  # fmt: skip
        return float(out.stdout.strip().splitlines()[-1])

    alone, contended = [], []
    for _ in range(runs):
        alone.append(round(torch_import(), 3))
        others = [
            subprocess.Popen([sys.executable, "-c", _FRONT_END_IMPORTS], cwd=repo, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(beside)
        ]  # fmt: skip
        try:
            contended.append(round(torch_import(), 3))
        finally:
            for o in others:
                o.wait(300)
    sys.path.insert(0, str(ROOT))
    import torch  # after the timings: the parent's own import must not overlap them

    from optimize.build import environment

    metrics = {
        "beside_front_ends_count": beside,
        "import_torch_alone_s": alone,
        "import_torch_beside_front_ends_s": contended,
        "import_torch_alone_median_s": statistics.median(alone),
        "import_torch_beside_front_ends_median_s": statistics.median(contended),
    }
    return {"name": "startup_bench-import-contention", "beside": beside, "import_torch_alone_s": alone,
            "import_torch_beside_front_ends_s": contended, "cpus": os.cpu_count(),
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "environ": environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"), packages=()),
            "metrics": metrics}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--model-dir", type=Path, default=Path("."), help="a built artifact")
    p.add_argument("--device", default="cpu", help="the server's --device, default cpu")
    p.add_argument("--frontends", type=int, default=2, help="the server's --frontends, default 2")
    p.add_argument("--runs", type=int, default=2, help="runs per tree, default 2")
    p.add_argument(
        "--repo", type=Path, action="append", default=[],
        help="source tree to run (repeatable: runs alternate between trees); default this one",
    )  # fmt: skip
    p.add_argument("--server-args", default="", help="more server flags, e.g. '--max_batch_size 8'")
    p.add_argument("--timeout-s", type=float, default=180.0, help="longest wait for ready, default 180")
    p.add_argument(
        "--import-contention", type=int, default=0, metavar="N",
        help="instead: time `import torch` alone and beside N processes importing what a front end imports "
        "(--runs times each, interleaved); --model-dir is not used",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.import_contention:
        print(json.dumps(import_contention((args.repo or [ROOT])[0], beside=args.import_contention, runs=args.runs)))
        return 0
    if not (args.model_dir / "variant.json").is_file():
        p.error(f"--model-dir {args.model_dir} holds no variant.json (build one with python -m optimize build)")
    if args.frontends < 2 or args.runs < 1:
        p.error(f"--frontends must be >= 2 and --runs >= 1, got {args.frontends} and {args.runs}")
    repos = args.repo or [ROOT]
    for _ in range(args.runs):
        for repo in repos:
            result = run_once(repo, args.model_dir.resolve(), device=args.device, frontends=args.frontends,
                              timeout_s=args.timeout_s, extra=shlex.split(args.server_args))  # fmt: skip
            print(json.dumps({"name": "startup_bench", **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
