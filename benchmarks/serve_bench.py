"""Serving benchmark: one artifact, end to end through the predictor versus on the device, in one run.

Starts ``python -m model_server`` for the artifact, drives it with Locust (``loadtest/``,
distributed over local worker processes) at several concurrency levels with real JPEGs,
and measures in the same run the variant's on-device throughput, cold start against a
bare-PyTorch floor, the first request, and memory idle and under load. Writes
``benchmarks/results/<date>-<gpu>-serve-<slug>.json`` (keys ``name``, ``command``,
``environ``, ``metrics``) and, where ``$OUT`` is set, a copy there.

Example (H100)::

    python benchmarks/serve_bench.py --model-dir artifacts/densenet121-eager-fp16-cl \\
        --concurrency 1,16,64,128 --processes 6 --duration 20

Never import kserve here: Locust runs in subprocesses, the server in another.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
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

import requests  # noqa: E402
import torch  # noqa: E402

FLOOR_SNIPPET = """
import sys, time, torch, torchvision
t = time.perf_counter()
dev = torch.device(sys.argv[2])
if dev.type == "cuda":
    torch.cuda.init(); torch.zeros(1, device=dev)
m = torchvision.models.densenet121(weights=None)
m.load_state_dict(torch.load(sys.argv[1], map_location="cpu", weights_only=True))
m = m.to(dev).eval()
if dev.type == "cuda":
    torch.cuda.synchronize()
print("READY", flush=True)
"""


def ondevice(model_dir: Path, device: torch.device, max_batch: int, iters: int) -> dict[str, float]:
    """The variant's own throughput at ``max_batch`` and latency at batch 1, through the server's runner."""
    from model_server.artifact import read_manifest
    from model_server.runtimes import load_runner
    from optimize.bench import timed_call_ms

    runner = load_runner(read_manifest(model_dir), model_dir, device)
    runner.max_batch = max_batch
    runner.buckets = [1, max_batch]
    runner.warm_up()
    res: dict[str, float] = {}
    for batch in (1, max_batch):
        x = torch.randint(0, 255, (batch, 3, 224, 224), dtype=torch.uint8)
        x = x.to(device) if device.type == "cuda" else x  # input already on the device: compute only
        for _ in range(5):
            runner(x)
        times = [timed_call_ms(runner, x, cuda=device.type == "cuda") for _ in range(iters)]
        med = statistics.median(times)
        if batch == 1:
            res["ondevice_b1_ms"] = round(med, 3)
        res["ondevice_img_s" if batch == max_batch else "ondevice_b1_img_s"] = round(batch / med * 1000, 1)
    res["ondevice_batch"] = max_batch
    del runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def floor_ready(model_dir: Path, device: torch.device) -> float:
    """A bare Python process: import torch, initialise the device, load the weights onto it."""
    weights = model_dir / "model.pt"
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", FLOOR_SNIPPET, str(weights), str(device)], capture_output=True, text=True, check=True
    )
    assert "READY" in out.stdout
    return time.perf_counter() - t0


def gpu_mem_of(pid: int) -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid and p.usedGpuMemory:
                return round(p.usedGpuMemory / 2**20, 1)
        return round(pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20, 1)  # pid not visible (containers)
    except Exception:
        return None


def rss_of(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


class Server:
    def __init__(self, model_dir: Path, device: str, port: int, extra: list[str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-m", "model_server", "--model_dir", str(model_dir), "--model_name", "densenet121",
            "--http_port", str(port), "--grpc_port", str(port + 1), "--device", device, *extra,
        ]  # fmt: skip
        self.cmd = cmd
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.log = log

    def wait_ready(self, timeout_s: float = 600) -> float:
        while time.perf_counter() - self.t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/v2/health/ready", timeout=0.5).status_code == 200:
                    return time.perf_counter() - self.t0
            except requests.RequestException:
                pass
            time.sleep(0.01)
        raise TimeoutError("server not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port_pair() -> int:
    import socket

    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port: int = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def one_request_ms(url: str, jpeg: bytes) -> float:
    import base64

    body = {"instances": [{"image": {"b64": base64.b64encode(jpeg).decode()}}]}
    t0 = time.perf_counter()
    r = requests.post(url + "/v1/models/densenet121:predict", json=body, timeout=120)
    ms = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    return ms


_HISTOGRAMS = ("request", "queue_wait", "preprocess", "gpu_decode", "h2d", "device")


def scrape_sums(url: str) -> dict[str, list[float]]:
    """``{histogram: [sum, count]}`` of the predictor's latency histograms and batch size (labels summed)."""
    out: dict[str, list[float]] = {}
    try:
        text = requests.get(url + "/metrics", timeout=10).text
    except requests.RequestException:
        return out
    for line in text.splitlines():
        if not line.startswith("densenet_") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        base = name.split("{", 1)[0]
        for suffix, i in (("_sum", 0), ("_count", 1)):
            if base.endswith(suffix):
                key = base[len("densenet_") : -len(suffix)]
                out.setdefault(key, [0.0, 0.0])[i] += float(value)
    return out


def breakdown(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, float]:
    """Mean per observation during one run: where a request's time went on the server side (ms), batch size."""
    means: dict[str, float] = {}
    for key, (s1, c1) in after.items():
        s0, c0 = before.get(key, [0.0, 0.0])
        if c1 > c0:
            mean = (s1 - s0) / (c1 - c0)
            if key == "batch_size":
                means["batch_size_mean"] = round(mean, 1)
            elif key.removesuffix("_seconds") in _HISTOGRAMS:
                means[f"{key.removesuffix('_seconds')}_mean_ms"] = round(mean * 1000, 3)
    return means


def run_locust(
    url: str, user: str, users: int, processes: int, duration: int, size: str, images: int, out: Path, tag: str
) -> dict[str, Any]:
    prefix = out / tag
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest"), "--headless", "--only-summary",
        "-u", str(users), "-r", str(max(users, 1)), "-t", f"{duration}s", "--host", url,
        "--csv", str(prefix), "--image-sizes", size, "--images-per-request", str(images), "--stop-timeout", "10",
    ]  # fmt: skip
    if processes > 1:
        cmd += ["--processes", str(processes)]
    cmd.append(user)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = (out / f"{tag}.log").open("wb")
    before = scrape_sums(url)
    subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=duration + 180)
    server_side = breakdown(before, scrape_sums(url))
    rows = list(csv.DictReader((out / f"{tag}_stats.csv").open()))
    agg = next(r for r in rows if r["Name"] == "Aggregated")
    reqs = int(agg["Request Count"])
    return {
        "req_s": float(agg["Requests/s"]),
        # Locust's Requests/s counts refused requests too: images/s counts answered ones only.
        "img_s": float(agg["Requests/s"]) * images * (reqs - int(agg["Failure Count"])) / max(reqs, 1),
        "p50_ms": float(agg["50%"]),
        "p99_ms": float(agg["99%"]),
        "failures": int(agg["Failure Count"]),
        "requests": reqs,
        "mean_ms": float(agg["Average Response Time"]),
        "server": server_side,
    }


class CpuByRole(threading.Thread):
    """Where the host's CPU goes during one load: device process, front ends, Locust, the rest.

    Cores used (100 = one core) averaged over the window, from psutil per-process CPU times.
    """

    def __init__(self, server_pid: int) -> None:
        super().__init__(daemon=True)
        self.server_pid = server_pid
        self.stop_evt = threading.Event()
        self.samples: list[dict[str, float]] = []

    def _roles(self) -> dict[int, str]:
        import psutil

        roles = {self.server_pid: "device_process"}
        for c in psutil.Process(self.server_pid).children(recursive=True):
            roles[c.pid] = "front_ends"
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if proc.info["pid"] not in roles and "locust" in " ".join(proc.info["cmdline"] or []):
                roles[proc.info["pid"]] = "locust"
        return roles

    def run(self) -> None:
        import psutil

        procs = {pid: psutil.Process(pid) for pid in self._roles()}
        roles = self._roles()
        for p in procs.values():
            p.cpu_percent(None)
        total0 = psutil.cpu_times()
        while not self.stop_evt.wait(2.0):
            sample: dict[str, float] = {}
            for pid, p in list(procs.items()):
                try:
                    sample[roles[pid]] = sample.get(roles[pid], 0.0) + p.cpu_percent(None)
                except psutil.Error:
                    procs.pop(pid)
            total1 = psutil.cpu_times()
            busy = (total1.user + total1.system - total0.user - total0.system) / 2.0 * 100
            total0 = total1
            sample["host_busy"] = busy
            self.samples.append(sample)

    def summary(self) -> dict[str, float]:
        keys = {k for s in self.samples for k in s}
        n = max(1, len(self.samples))
        return {f"{k}_cores": round(sum(s.get(k, 0.0) for s in self.samples) / n / 100, 2) for k in sorted(keys)}


class Sampler(threading.Thread):
    """Peak RSS and GPU memory of the server while a load runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.rss, self.vram = pid, 0.0, 0.0
        self.stop_evt = threading.Event()

    def run(self) -> None:
        while not self.stop_evt.wait(0.5):
            self.rss = max(self.rss, rss_of(self.pid))
            self.vram = max(self.vram, gpu_mem_of(self.pid) or 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--concurrency", default="1,16,64,128", help="Locust users for single-image runs")
    p.add_argument(
        "--batched-concurrency", default="8", help="users for 32-images-per-request runs, comma-separated (best kept)"
    )
    p.add_argument("--batch-images", type=int, default=32)
    p.add_argument("--processes", type=int, default=4, help="Locust worker processes")
    p.add_argument("--duration", type=int, default=20, help="seconds per Locust run")
    p.add_argument("--user", default="V2BinaryBytesUser", help="Locust user class for single-image runs")
    p.add_argument("--sizes", default="vga,12mp", help="image sizes: the first is the main one")
    p.add_argument("--server-args", default="", help="extra predictor flags, e.g. '--max_batch_size 64'")
    p.add_argument("--ondevice-iters", type=int, default=50)
    p.add_argument(
        "--metrics-overhead", action="store_true",
        help="also run the best single-image load with metrics on, then on a fresh server with --metrics false",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=0, help="HTTP port (gRPC gets port+1); default: a free one")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    manifest = json.loads((args.model_dir / "variant.json").read_text())
    slug = manifest["slug"]
    extra = shlex.split(args.server_args)
    max_batch = 32
    if "--max_batch_size" in extra:
        max_batch = int(extra[extra.index("--max_batch_size") + 1])
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    metrics: dict[str, Any] = {}

    print(f"[1/5] on-device {slug} at batch 1 and {max_batch}", file=sys.stderr, flush=True)
    metrics.update(ondevice(args.model_dir, device, max_batch, args.ondevice_iters))
    print(f"[2/5] floor: bare torch process to weights on {device}", file=sys.stderr, flush=True)
    metrics["floor_ready_s"] = round(floor_ready(args.model_dir, device), 3)

    print("[3/5] predictor cold start", file=sys.stderr, flush=True)
    port = args.port or free_port_pair()
    server = Server(args.model_dir, args.device, port, extra, work / "server.log")
    try:
        metrics["ready_s"] = round(server.wait_ready(), 3)
        from loadtest._payloads import photo_set

        sizes = args.sizes.split(",")
        jpeg = photo_set(sizes[0])[0].jpeg
        metrics["first_request_ms"] = round(one_request_ms(server.url, jpeg), 2)
        time.sleep(2.5)
        metrics["rss_idle_mb"] = rss_of(server.proc.pid)
        metrics["vram_idle_mb"] = gpu_mem_of(server.proc.pid)

        print("[4/5] Locust: single image per request", file=sys.stderr, flush=True)
        levels = [int(c) for c in args.concurrency.split(",")]
        runs: dict[str, dict[str, Any]] = {}
        sampler = Sampler(server.proc.pid)
        sampler.start()
        for c in levels:
            procs = 1 if c == 1 else min(args.processes, c)
            r = run_locust(server.url, args.user, c, procs, args.duration, sizes[0], 1, work, f"c{c}")
            runs[f"c{c}"] = r
            print(f"    c={c:<4} {r['req_s']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                  f"failures {r['failures']}", file=sys.stderr, flush=True)  # fmt: skip
        ok = {k: v for k, v in runs.items() if v["failures"] == 0} or runs
        best_key = max(ok, key=lambda k: ok[k]["img_s"])
        metrics["e2e_single_img_s"] = round(ok[best_key]["img_s"], 1)
        metrics["e2e_single_p99_ms"] = ok[best_key]["p99_ms"]
        metrics["e2e_single_p50_ms"] = ok[best_key]["p50_ms"]
        metrics["e2e_single_best_users"] = int(best_key[1:])
        if "c1" in runs:
            metrics["e2e_c1_p50_ms"] = runs["c1"]["p50_ms"]
            metrics["e2e_c1_p99_ms"] = runs["c1"]["p99_ms"]
        # Where the CPU goes at the best concurrency (a second, shorter run with a CPU sampler).
        c = int(best_key[1:])
        roles = CpuByRole(server.proc.pid)
        locust_done = threading.Event()

        def start_roles_later() -> None:  # Locust takes a few seconds to spawn its users
            if not locust_done.wait(6.0):
                roles.start()

        threading.Thread(target=start_roles_later, daemon=True).start()
        run_locust(server.url, args.user, c, min(args.processes, c), max(12, args.duration), sizes[0], 1, work, "cpu")
        locust_done.set()
        roles.stop_evt.set()
        metrics["cpu_at_best_concurrency"] = roles.summary()
        print(f"    CPU at c={c}: {metrics['cpu_at_best_concurrency']}", file=sys.stderr, flush=True)
        for size in sizes[1:]:
            c = int(best_key[1:])
            r = run_locust(server.url, args.user, c, min(args.processes, c), args.duration, size, 1, work, f"{size}")
            metrics[f"e2e_single_{size}_img_s"] = round(r["img_s"], 1)
            metrics[f"e2e_single_{size}_p99_ms"] = r["p99_ms"]
            print(f"    {size} c={c}: {r['img_s']:.1f} img/s p99 {r['p99_ms']} ms", file=sys.stderr, flush=True)

        print(f"[5/5] Locust: {args.batch_images} images per request", file=sys.stderr, flush=True)
        batched: dict[str, dict[str, Any]] = {}
        for bc in (int(c) for c in str(args.batched_concurrency).split(",")):
            batched[f"c{bc}"] = run_locust(server.url, args.user, bc, min(args.processes, bc), args.duration, sizes[0],
                                           args.batch_images, work, f"batched-c{bc}")  # fmt: skip
            print(f"    batched c={bc}: {batched[f'c{bc}']['img_s']:.1f} img/s", file=sys.stderr, flush=True)
        best_b = max(batched, key=lambda k: batched[k]["img_s"])  # the best concurrency, as for single images
        r = batched[best_b]
        metrics["e2e_batched_img_s"] = round(r["img_s"], 1)
        metrics["e2e_batched_p99_ms"] = r["p99_ms"]
        metrics["e2e_batched_users"] = int(best_b[1:])
        metrics["batched_runs"] = batched
        sampler.stop_evt.set()
        metrics["rss_load_mb"] = sampler.rss
        metrics["vram_load_mb"] = sampler.vram
        metrics["failures_total"] = sum(v["failures"] for v in [*runs.values(), *batched.values()])
        metrics["runs"] = runs
        metrics["server_metrics_excerpt"] = [
            line for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines()
            if line.startswith(("densenet_batch_size_sum", "densenet_batch_size_count", "densenet_requests_rejected"))
        ]  # fmt: skip
        if args.metrics_overhead:
            print("[+] metrics on vs off at the best concurrency", file=sys.stderr, flush=True)
            c = int(best_key[1:])
            on = run_locust(server.url, args.user, c, min(args.processes, c), args.duration, sizes[0], 1, work, "m_on")
            server.stop()
            server = Server(args.model_dir, args.device, port, [*extra, "--metrics", "false"], work / "server-off.log")
            server.wait_ready()
            off = run_locust(
                server.url, args.user, c, min(args.processes, c), args.duration, sizes[0], 1, work, "m_off"
            )
            metrics["metrics_on_img_s"] = round(on["img_s"], 1)
            metrics["metrics_off_img_s"] = round(off["img_s"], 1)
            metrics["metrics_overhead_pct"] = round((off["img_s"] - on["img_s"]) / off["img_s"] * 100, 2)
    finally:
        server.stop()

    ratios = {
        "batched_vs_ondevice": round(metrics["e2e_batched_img_s"] / metrics["ondevice_img_s"], 3),
        "ready_vs_floor": round(metrics["ready_s"] / metrics["floor_ready_s"], 3),
    }
    if "e2e_c1_p50_ms" in metrics:
        ratios["c1_p50_minus_ondevice_b1_ms"] = round(metrics["e2e_c1_p50_ms"] - metrics["ondevice_b1_ms"], 2)
        ratios["first_request_vs_c1_p50"] = round(metrics["first_request_ms"] / metrics["e2e_c1_p50_ms"], 2)
    metrics["ratios"] = ratios
    from optimize.build import environment

    env = environment(device, packages=("torchvision", "kserve", "locust", "onnxruntime"))
    gpu = (env.get("gpu") or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    date = dt.date.today().isoformat()
    name = args.name or f"serve-{slug}"
    record = {
        "name": name,
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]]),
        "date": date,
        "environ": env,
        "metrics": metrics,
        "server_command": " ".join(shlex.quote(a) for a in server.cmd),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{date}-{gpu}-{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
        Path(os.environ["OUT"], f"{name}-server.log").write_text(server.log.read_text()[-200_000:])
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("runs", "server_metrics_excerpt")}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
