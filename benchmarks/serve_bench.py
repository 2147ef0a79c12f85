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

Server configurations are compared interleaved (``--compare LABEL=SERVER_ARGS``, ``--pairs``):
the base (``--server-args``) and every compared arm take turns, each run on a fresh server,
so that the machine's drift falls on all of them; ``--metrics-overhead`` is the comparison
with ``--metrics false``. ``--phases`` runs a subset, e.g. only ``single,compare``::

    python benchmarks/serve_bench.py --model-dir artifacts/densenet121-eager-fp16-cl-graphs \\
        --phases single,compare --concurrency 128 --metrics-overhead --pairs 5 --duration 15

Fresh servers differ by more than the metrics may cost; the ``metrics-toggle`` phase measures
that cost inside one server instead: under one continuous load it pauses and resumes the
server's request-path metrics (``kill -USR1``/``-USR2``) in blocks of windows (on, off, off, on)
and reports the mean effect per block with a 95 % interval (:mod:`runtime_ab`)::

    python benchmarks/serve_bench.py --model-dir ARTIFACT --phases single,metrics-toggle \\
        --concurrency 1,128 --toggle-blocks 12 --toggle-window-s 1.5

Never import kserve here: Locust runs in subprocesses, the server in another.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # trace_summary, also when this file is loaded by path

import records  # noqa: E402
import requests  # noqa: E402
import runtime_ab  # noqa: E402
import torch  # noqa: E402
import trace_summary  # noqa: E402
from gpu_counters import GpuCounters  # noqa: E402

FLOOR_SNIPPET = """
import sys, torch
weights, dev, package = sys.argv[1], torch.device(sys.argv[2]), sys.argv[3]
if dev.type == "cuda":
    torch.cuda.init(); torch.zeros(1, device=dev)
how = ""
if package:  # the weights are inside the package: torch's own C++ loader puts them on the device
    try:
        index = (dev.index or 0) if dev.type == "cuda" else -1
        torch._C._aoti.AOTIModelPackageLoader(package, "model", False, 1, index)
        how = "loaded the AOTInductor package with torch's C++ loader"
    except Exception as e:
        how = "constructed: the AOTInductor package did not load (" + type(e).__name__ + ")"
if not how.startswith("loaded"):
    import torchvision
    m = torchvision.models.densenet121(weights=None)
    how = how or "constructed: the artifact has no model.pt"
    if weights:
        try:
            m.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            how = "loaded model.pt"
        except Exception as e:  # not a plain DenseNet-121 state dict (pruned, quantised payloads)
            how = "constructed: model.pt is not a DenseNet-121 state dict (" + type(e).__name__ + ")"
    m = m.to(dev).eval()
if dev.type == "cuda":
    torch.cuda.synchronize()
print("READY", how, flush=True)
"""


#: CPUs the predictor's processes and Locust's run on (``--server-cpus``, ``--locust-cpus``); None: any.
PLACEMENT: dict[str, set[int] | None] = {"server": None, "locust": None}


def parse_cpus(text: str) -> set[int]:
    """A Linux CPU list (``0-7,16-23``, as ``taskset -c`` takes) as a set of CPU numbers.

    Raises:
        ValueError: not such a list, or a CPU this process may not run on.
    """
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if first < 0 or last < first:
                raise ValueError
            cpus.update(range(first, last + 1))
    except ValueError:
        raise ValueError(f"{text!r} is not a CPU list (e.g. 0-7,16-23)") from None
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(f"{text!r} names CPUs this process may not run on (it may: {sorted(allowed)})")
    return cpus


def _pinned(role: str) -> Any:
    """A ``preexec_fn`` putting the child (and what it starts) on ``PLACEMENT[role]``, or None."""
    cpus = PLACEMENT[role]
    return None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))


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


def floor_ready(model_dir: Path, device: torch.device) -> tuple[float, str]:
    """A bare Python process: import torch, initialise the device, load the weights onto it.

    Returns the seconds and how the weights got there: an AOTInductor artifact's ``.pt2`` (its weights
    are inside) through torch's C++ package loader, with no torchvision import, as the server loads
    it; the artifact's ``model.pt`` when it is a plain DenseNet-121 state dict; else the model built
    with torchvision's random initialisation.
    """
    from model_server.artifact import payload_path
    from optimize.registry import MANIFEST_NAME

    weights = model_dir / "model.pt"
    package = ""
    if (model_dir / MANIFEST_NAME).is_file():
        manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
        if manifest.get("runtime") == "aoti":  # its "model" role: the dynamic package, or the largest bucket's
            package = str(payload_path(model_dir, manifest, "model"))
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", FLOOR_SNIPPET, str(weights) if weights.is_file() else "", str(device), package],
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - t0
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("READY")), "")
    if not line:
        raise RuntimeError(f"the floor process did not report READY: {out.stdout[-500:]} {out.stderr[-500:]}")
    return seconds, line.removeprefix("READY").strip()


def gpu_mem_of(pid: int) -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == pid and p.usedGpuMemory:
                return round(float(p.usedGpuMemory) / 2**20, 1)
        return round(float(pynvml.nvmlDeviceGetMemoryInfo(h).used) / 2**20, 1)  # pid not visible (containers)
    except Exception:
        return None


def rss_of(pid: int) -> float:
    import psutil

    return round(float(psutil.Process(pid).memory_info().rss) / 2**20, 1)


class Server:
    def __init__(
        self,
        model_dir: Path,
        device: str,
        port: int,
        extra: list[str],
        log: Path,
        *,
        admin_token: str = "",
        root: Path = ROOT,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable, "-m", "model_server", "--model_dir", str(model_dir), "--model_name", "densenet121",
            "--http_port", str(port), "--grpc_port", str(port + 1), "--device", device, *extra,
        ]  # fmt: skip
        self.cmd = cmd
        self.admin_token = admin_token
        env = {**os.environ, "DENSENET_ADMIN_TOKEN": admin_token} if admin_token else None  # not in the process list
        self.t0 = time.perf_counter()
        # ``python -m`` puts the working directory first on sys.path: the predictor's code is ``root``'s.
        self.proc = subprocess.Popen(cmd, cwd=root, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_pinned("server"))  # fmt: skip
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


def capture_trace(server: Server, batches: int, out: Path, *, timeout_s: float = 60.0) -> dict[str, Any]:
    """Ask the in-pod profiler for a trace of the next ``batches`` batches; download it to ``out``
    (gzipped when ``out`` ends in ``.gz``: Perfetto and TensorBoard open it so, and it is ~10x
    smaller) and summarise its GPU streams (``benchmarks/trace_summary.py``)."""
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    r = requests.post(server.url + "/admin/v1/profile", json={"batches": batches}, headers=headers, timeout=10)
    if r.status_code != 202:
        return {"error": f"profile start answered {r.status_code}: {r.text[:200]}"}
    cap = r.json()
    deadline = time.monotonic() + timeout_s
    while cap.get("state") in ("pending", "running") and time.monotonic() < deadline:
        time.sleep(0.2)
        cap = requests.get(server.url + r.json()["status_url"], headers=headers, timeout=10).json()
    if cap.get("state") != "done":
        return {"error": f"capture ended {cap.get('state')}", **cap}
    trace = requests.get(server.url + r.json()["trace_url"], headers=headers, timeout=60)
    out.write_bytes(gzip.compress(trace.content, 6) if out.suffix == ".gz" else trace.content)
    result: dict[str, Any] = {"file": out.name, "bytes": out.stat().st_size, "batches": batches}
    try:
        result["summary"] = trace_summary.summarize(json.loads(trace.content))
    except ValueError as e:  # a trace that is not JSON is still kept for a person to look at
        result["summary"] = {"error": f"not a Chrome-trace JSON: {e}"}
    return result


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


#: Locust user class (``--user``) -> the body builder it sends, so the cold-start request matches the load's.
USER_BODIES = {
    "V1Base64User": "v1_request",
    "V2BytesUser": "v2_bytes_request",
    "V2BinaryBytesUser": "v2_binary_bytes_request",
    "V2JsonTensorUser": "v2_tensor_request",
    "V2BinaryTensorUser": "v2_binary_tensor_request",
}


def one_request_ms(url: str, photo: Any, user: str = "V2BinaryBytesUser") -> float:
    """One request as ``user`` sends it, on a new connection (``http.client``: little client overhead)."""
    import http.client
    from urllib.parse import urlsplit

    from loadtest import _protocol

    prepared = getattr(_protocol, USER_BODIES[user])("densenet121", [photo])
    parts = urlsplit(url)
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=120)
    try:
        conn.request("POST", prepared.path, body=prepared.body, headers=dict(prepared.headers))
        resp = conn.getresponse()
        body = resp.read()
        ms = (time.perf_counter() - t0) * 1000
    finally:
        conn.close()
    if resp.status != 200:
        raise RuntimeError(f"request as {user} failed: HTTP {resp.status}: {body[:300]!r}")
    return ms


_HISTOGRAMS = (
    "request",
    "queue_wait",
    "preprocess",
    "gpu_decode",
    "nvjpeg_headers",
    "nvjpeg_early_headers",
    "nvjpeg_decode",
    "h2d",
    "device",
)


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


def scrape_after(
    url: str, before: dict[str, list[float]], count: int, timeout_s: float = 2.0
) -> dict[str, list[float]]:
    """:func:`scrape_sums` once the predictor's request histogram counts ``count`` more than ``before``
    (its metric writes follow the answers by a loop turn), or after ``timeout_s`` as it stands."""
    deadline = time.monotonic() + timeout_s
    target = before.get("request_seconds", [0.0, 0.0])[1] + count
    now = scrape_sums(url)
    while now.get("request_seconds", [0.0, 0.0])[1] < target and time.monotonic() < deadline:
        time.sleep(0.02)
        now = scrape_sums(url)
    return now


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
        "--raw-latency-dir", str(out / f"{tag}-latency"),
    ]  # fmt: skip
    if processes > 1:
        cmd += ["--processes", str(processes)]
    cmd.append(user)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = (out / f"{tag}.log").open("wb")
    before = scrape_sums(url)
    split: list[int] = []
    port = int(url.rsplit(":", 1)[1])
    sampler = threading.Thread(
        target=lambda: (time.sleep(duration / 2), split.extend(connection_split(port))), daemon=True
    )
    sampler.start()
    with GpuCounters() as gpu:  # the window's clocks, power and engines (empty without NVML)
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=duration + 180,
                       preexec_fn=_pinned("locust"))  # fmt: skip
    sampler.join(timeout=10)
    server_side = breakdown(before, scrape_sums(url))
    totals = locust_totals(out, tag)
    reqs = int(totals["requests"])
    exact = exact_percentiles(read_raw_latencies(out / f"{tag}-latency"))
    return {
        "req_s": float(totals["requests_s"]),
        # Locust's Requests/s counts refused requests too: images/s counts answered ones only.
        "img_s": float(totals["requests_s"]) * images * (reqs - int(totals["failures"])) / max(reqs, 1),
        "p50_ms": float(totals["p50_ms"]),
        "p99_ms": float(totals["p99_ms"]),
        "failures": int(totals["failures"]),
        # What failed, as Locust words it (status and message), when something did: session 13's
        # batched run lost 3 of 2,258 requests and its record could not say why.
        **({"failure_kinds": failure_kinds(out, tag)} if int(totals["failures"]) else {}),
        "requests": reqs,
        "mean_ms": float(totals["avg_ms"]),
        **exact,
        "server": server_side,
        # Mid-run, the established connections each server process holds, most first: the kernel
        # hashes connections over the front ends' SO_REUSEPORT sockets, so the split varies by run.
        "frontend_connections": split,
        **({"gpu": gpu.summary()} if gpu.samples else {}),
    }


def failure_kinds(out: Path, tag: str) -> dict[str, int]:
    """Failed requests by Locust's error text (``<tag>_failures.csv``: method, name, error, occurrences),
    most first; empty where Locust wrote no such file."""
    import csv

    path = out / f"{tag}_failures.csv"
    if not path.is_file():
        return {}
    kinds: dict[str, int] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            error = str(row.get("Error", ""))[:200]
            kinds[error] = kinds.get(error, 0) + int(row.get("Occurrences") or 0)
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def locust_totals(out: Path, tag: str) -> dict[str, Any]:
    """The whole run's totals (requests, failures, requests/s, mean, p50/p99), from the side file our
    hooks write when Locust quits: Locust's ``_stats.csv`` is rewritten every few seconds and missed
    the last requests of a run (a 2-second run: 12 requests in the CSV, 22 in Locust's own summary)."""
    totals: dict[str, Any] = json.loads((out / f"{tag}_loadtest.json").read_text())["totals"]
    return totals


def read_raw_samples(folder: Path) -> list[tuple[float, float]]:
    """Every successful request the Locust processes wrote under ``folder`` (``--raw-latency-dir``, one
    ``latency-<pid>.txt`` each, a line ``<end Unix s> <ms>`` per request), as (end, ms); read here
    without importing Locust, which patches the process."""
    samples: list[tuple[float, float]] = []
    for f in sorted(folder.glob("latency-*.txt")):
        for line in f.read_text().splitlines():
            end, ms = line.split()
            samples.append((float(end), float(ms)))
    return samples


def read_raw_latencies(folder: Path) -> list[float]:
    """Every successful request's response time (ms) under ``folder`` (:func:`read_raw_samples`)."""
    return [ms for _, ms in read_raw_samples(folder)]


def exact_percentiles(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50 and p99 of every successful request's own time (Locust's rounds to whole ms below 100 ms)."""
    if not latencies_ms:
        return {}
    ordered = sorted(latencies_ms)

    def pick(q: float) -> float:  # the rank Locust picks (its calculate_response_time_percentile)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)

    return {"p50_exact_ms": pick(0.50), "p99_exact_ms": pick(0.99), "exact_samples": len(ordered)}


def connection_split(port: int) -> list[int]:
    """Established TCP connections on local ``port`` per process that holds any, most first."""
    import psutil

    counts: dict[int, int] = {}
    try:
        for c in psutil.net_connections("tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED and c.pid:
                counts[c.pid] = counts.get(c.pid, 0) + 1
    except psutil.Error:  # not allowed to list other processes' sockets here
        return []
    return sorted(counts.values(), reverse=True)


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


def batched_summary(rounds: Sequence[Mapping[str, Any]], users: int) -> dict[str, Any]:
    """The batched figures from the runs at the best concurrency: throughput and p99 as medians of the
    rounds (one run: its own figures), each round's throughput and, from two rounds, their spread.

    Back-to-back single runs on one H100 host differed 1.23x where an interleaved compare of the same
    two servers read 1.007x (README, session 17); the cause is not known (each run opens connections of
    its own, which the kernel spreads over the front ends differently, is one candidate). Rounds put a
    median and a spread on the headline figure."""
    out: dict[str, Any] = {
        "e2e_batched_img_s": round(statistics.median(r["img_s"] for r in rounds), 1),
        "e2e_batched_p99_ms": statistics.median(r["p99_ms"] for r in rounds),
        "e2e_batched_users": users,
    }
    if len(rounds) > 1:
        out["e2e_batched_rounds_img_s"] = [round(r["img_s"], 1) for r in rounds]
        out["e2e_batched_spread_pct"] = spread_pct([r["img_s"] for r in rounds])
    return out


def within_slo(runs: Mapping[str, Mapping[str, Any]], p99_ms: float) -> dict[str, Any]:
    """The best single-image throughput among the runs without failures whose p99 is at most
    ``p99_ms`` (a latency objective, as MLPerf's server scenario asks), with its p99 and users;
    ``e2e_single_slo_img_s`` is 0 when no run met it."""
    met = {k: v for k, v in runs.items() if v["failures"] == 0 and v["p99_ms"] <= p99_ms}
    out: dict[str, Any] = {"e2e_single_slo_p99_target_ms": p99_ms, "e2e_single_slo_img_s": 0.0}
    if met:
        key = max(met, key=lambda k: met[k]["img_s"])
        out.update(
            e2e_single_slo_img_s=round(met[key]["img_s"], 1),
            e2e_single_slo_p99_ms=met[key]["p99_ms"],
            e2e_single_slo_users=int(key[1:]),
        )
    return out


def py_spy_path() -> str | None:
    """The py-spy executable: on PATH or next to this Python (a virtual environment's bin)."""
    found = shutil.which("py-spy")
    beside = Path(sys.executable).with_name("py-spy")
    return found or (str(beside) if beside.exists() else None)


def record_py_spy(pid: int, seconds: float, folder: Path, name: str) -> list[Path]:
    """Two py-spy recordings of ``pid`` at once, non-blocking (the process is never paused), as
    collapsed stacks: ``<name>-gil.txt`` samples only the thread holding the GIL (what serialises
    the device process), ``<name>-threads.txt`` every thread, idle ones too (a thread waiting for the
    GIL or a lock shows where it waits), one stack root per thread."""
    spy = py_spy_path()
    if spy is None:
        return []
    outs = {"gil": ["--gil"], "threads": ["--threads", "--idle"]}
    procs = []
    for kind, extra in outs.items():
        out = folder / f"{name}-py-spy-{kind}.txt"
        cmd = [spy, "record", "--pid", str(pid), "--rate", "100", "--duration", str(max(1, round(seconds))),
               "--nonblocking", "--format", "raw", "--output", str(out), *extra]  # fmt: skip
        procs.append((out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    written = []
    for out, proc in procs:
        _, err = proc.communicate(timeout=seconds + 60)
        if proc.returncode == 0 and out.exists():
            written.append(out)
        else:
            print(f"    py-spy failed ({proc.returncode}): {err.strip()[-300:]}", file=sys.stderr, flush=True)
    return written


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


#: Distributions whose versions a serving record carries: the predictor's stack and Locust's (on the
#: lent GPU machine they are carried as wheels, and their versions can differ from session to session).
SERVING_PACKAGES = (
    "torchvision", "kserve", "locust", "onnxruntime", "uvicorn", "fastapi", "starlette", "uvloop", "orjson",
    "grpcio", "protobuf", "numpy", "pillow", "psutil", "gevent", "geventhttpclient",
)  # fmt: skip
#: What a run measures, in the order it runs; ``--phases`` picks a subset. The cold start
#: (``ready_s``, ``first_request_ms``, idle memory) is always measured: the loads need the server anyway.
PHASES = ("ondevice", "floor", "startup", "single", "cpu-roles", "sizes", "batched", "metrics-toggle", "compare")
#: The arm every ``--compare`` arm is measured against: the server with ``--server-args`` alone.
BASE = "base"
#: The arm ``--metrics-overhead`` adds, and the one ``metrics_overhead_pct`` is computed from.
METRICS_OFF = "metrics_off"
#: Issue 5's bound on what the request-path metrics may cost in throughput.
METRICS_OVERHEAD_TARGET_PCT = 3.0
_LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def parse_phases(spec: str | None) -> list[str]:
    """``--phases``: a comma list of :data:`PHASES` (all of them for ``None``), returned in run order.

    Raises:
        ValueError: an unknown or empty list.
    """
    if spec is None:
        return list(PHASES)
    asked = {s.strip() for s in spec.split(",") if s.strip()}
    unknown = sorted(asked - set(PHASES))
    if unknown or not asked:
        raise ValueError(f"--phases: unknown {', '.join(unknown) or '(empty)'}; choose among {','.join(PHASES)}")
    return [ph for ph in PHASES if ph in asked]


def parse_compare(specs: Sequence[str], *, metrics_overhead: bool) -> dict[str, list[str]]:
    """``--compare LABEL=SERVER_ARGS`` flags as ``{label: server argv}``, in the order given.

    ``--metrics-overhead`` is shorthand for ``--compare metrics_off="--metrics false"`` (an arm
    of that label given explicitly is kept as it is).

    Raises:
        ValueError: a spec without ``=``, a label that is empty, ``base``, repeated, or not
            made of letters, digits, ``_``, ``.`` and ``-`` (labels name files).
    """
    arms: dict[str, list[str]] = {}
    for spec in specs:
        label, sep, server_args = spec.partition("=")
        label = label.strip()
        if not sep or not label:
            raise ValueError(f"--compare {spec!r}: expected LABEL=SERVER_ARGS")
        if not set(label) <= _LABEL_CHARS:
            raise ValueError(f"--compare label {label!r}: use letters, digits, '_', '.' and '-'")
        if label == BASE or label in arms:
            raise ValueError(f"--compare label {label!r} is {'reserved' if label == BASE else 'given twice'}")
        arms[label] = shlex.split(server_args)
    if metrics_overhead and METRICS_OFF not in arms:
        arms[METRICS_OFF] = ["--metrics", "false"]
    return arms


def interleaved_order(labels: Sequence[str], pairs: int) -> list[tuple[int, str]]:
    """``(pair, arm)`` in run order: the base and each compared arm, ``pairs`` times, every other
    pair reversed (base, A, B, B, A, base, ...).

    Alternating, rather than all repetitions of one arm in a row, lets slow drift of the
    machine (clocks, heat, neighbours) fall on every arm alike; reversing every other pair
    cancels a steady drift, which a fixed order would put on the later arms.
    """
    arms = (BASE, *labels)
    return [(pair, arm) for pair in range(1, pairs + 1) for arm in (arms if pair % 2 else arms[::-1])]


def spread_pct(values: Sequence[float]) -> float | None:
    """Run-to-run noise of repeated runs: (max − min) / median, in %; ``None`` below two runs."""
    if len(values) < 2:
        return None
    med = statistics.median(values)
    return round((max(values) - min(values)) / med * 100, 2) if med else None


def summarize_arm(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One arm's repetitions (:func:`run_locust` results, in run order): lists, medians, extremes, spread."""
    img = [round(float(r["img_s"]), 1) for r in runs]
    p50 = [float(r["p50_ms"]) for r in runs]
    p99 = [float(r["p99_ms"]) for r in runs]
    out: dict[str, Any] = {
        "img_s": img,
        "p50_ms": p50,
        "p99_ms": p99,
        "failures": [int(r["failures"]) for r in runs],
        "img_s_median": round(statistics.median(img), 1),
        "img_s_min": min(img),
        "img_s_max": max(img),
        "p50_ms_median": statistics.median(p50),
        "p99_ms_median": statistics.median(p99),
    }
    spread = spread_pct(img)
    if spread is not None:
        out["img_s_spread_pct"] = spread
    if all("ready_s" in r for r in runs):
        out["ready_s"] = [r["ready_s"] for r in runs]
    if runs and all("p50_exact_ms" in r for r in runs):
        out["p50_exact_ms"] = [r["p50_exact_ms"] for r in runs]
        out["p50_exact_ms_median"] = round(statistics.median(out["p50_exact_ms"]), 3)
    out["server"] = [r.get("server", {}) for r in runs]
    out["frontend_connections"] = [r.get("frontend_connections", []) for r in runs]
    out["startup_log"] = [r.get("startup_log", []) for r in runs]  # each run's start-up timing lines
    return out


def compare_arms(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Every arm summarised; each compared arm also against the base, by medians and pair by pair.

    ``ratio_vs_base`` is the ratio of the medians of answered img/s (above 1: faster than the
    base); ``pair_ratios`` the same within each pair, whose range shows how far to trust it.
    """
    base = summarize_arm(runs[BASE])
    out = {BASE: base}
    for label, arm_runs in runs.items():
        if label == BASE:
            continue
        arm = summarize_arm(arm_runs)
        if base["img_s_median"]:
            arm["ratio_vs_base"] = round(arm["img_s_median"] / base["img_s_median"], 4)
        pair = [round(a / b, 4) for a, b in zip(arm["img_s"], base["img_s"], strict=False) if b]
        if pair:
            arm["pair_ratios"] = pair
            arm["pair_ratio_min"], arm["pair_ratio_max"] = min(pair), max(pair)
        out[label] = arm
    return out


def metrics_overhead(arms: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The metrics-overhead figures from the base arm (metrics on) and the ``metrics_off`` arm.

    ``metrics_overhead_pct`` is (off − on) / off of the medians, in % (positive: the metrics
    cost throughput); ``metrics_overhead_noise_pct`` the base arm's spread across its runs,
    against which a difference of a few % has to be read.
    """
    on, off = arms[BASE], arms[METRICS_OFF]
    out: dict[str, Any] = {"metrics_on_img_s": on["img_s_median"], "metrics_off_img_s": off["img_s_median"]}
    if off["img_s_median"]:
        out["metrics_overhead_pct"] = round((off["img_s_median"] - on["img_s_median"]) / off["img_s_median"] * 100, 2)
    per_pair: list[dict[str, Any]] = []
    for pair, (a, b) in enumerate(zip(on["img_s"], off["img_s"], strict=False), 1):
        row: dict[str, Any] = {"pair": pair, "on_img_s": a, "off_img_s": b}
        if b:
            row["overhead_pct"] = round((b - a) / b * 100, 2)
        per_pair.append(row)
    out["metrics_overhead_runs"] = per_pair
    if "img_s_spread_pct" in on:
        out["metrics_overhead_noise_pct"] = on["img_s_spread_pct"]
    return out


def overhead_line(figures: Mapping[str, Any], *, target_pct: float = METRICS_OVERHEAD_TARGET_PCT) -> str:
    """One line on the metrics overhead for the terminal, saying whether the run resolves the target."""
    runs = figures["metrics_overhead_runs"]
    pct = figures.get("metrics_overhead_pct")
    head = "metrics overhead: " + (f"{pct:+.2f} %" if pct is not None else "n/a (no images answered with metrics off)")
    line = (
        f"{head} of throughput (on {figures['metrics_on_img_s']:.1f} vs off {figures['metrics_off_img_s']:.1f} img/s, "
        f"medians of {len(runs)} pair{'s' if len(runs) != 1 else ''}); per pair "
        + ", ".join(f"{r['overhead_pct']:+.2f}" if "overhead_pct" in r else "n/a" for r in runs)
        + " %"
    )
    noise = figures.get("metrics_overhead_noise_pct")
    if noise is None:
        return line + f"; noise unknown with one pair: the {target_pct:g} % target is not resolved"
    line += f"; noise (base arm max-min) {noise:.2f} %"
    if noise >= target_pct:
        return line + f": the {target_pct:g} % target is not resolved by this run"
    if pct is None:
        return line
    return line + f": {'within' if pct <= target_pct else 'above'} the {target_pct:g} % target"


def compute_ratios(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The ratios issue 5's targets are stated in, each only where the figures it needs were measured."""

    def have(*keys: str) -> bool:
        return all(isinstance(metrics.get(k), int | float) and not isinstance(metrics.get(k), bool) for k in keys)

    ratios: dict[str, float] = {}
    if have("e2e_batched_img_s", "ondevice_img_s") and metrics["ondevice_img_s"]:
        ratios["batched_vs_ondevice"] = round(metrics["e2e_batched_img_s"] / metrics["ondevice_img_s"], 3)
    if have("ready_s", "floor_ready_s") and metrics["floor_ready_s"]:
        ratios["ready_vs_floor"] = round(metrics["ready_s"] / metrics["floor_ready_s"], 3)
    startup = metrics.get("startup")
    if isinstance(startup, Mapping) and "ready_vs_floor_median" in startup:
        ratios["ready_vs_floor_startup_median"] = startup["ready_vs_floor_median"]
    if have("e2e_c1_p50_ms", "ondevice_b1_ms"):
        ratios["c1_p50_minus_ondevice_b1_ms"] = round(metrics["e2e_c1_p50_ms"] - metrics["ondevice_b1_ms"], 2)
    if have("e2e_c1_p50_exact_ms", "ondevice_b1_ms"):
        ratios["c1_p50_exact_minus_ondevice_b1_ms"] = round(
            metrics["e2e_c1_p50_exact_ms"] - metrics["ondevice_b1_ms"], 3
        )
    if have("first_request_ms", "e2e_c1_p50_ms") and metrics["e2e_c1_p50_ms"]:
        ratios["first_request_vs_c1_p50"] = round(metrics["first_request_ms"] / metrics["e2e_c1_p50_ms"], 2)
    if have("first_request_ms", "e2e_c1_p50_exact_ms") and metrics["e2e_c1_p50_exact_ms"]:
        # Against the exact median too: Locust's own percentiles are whole milliseconds.
        ratios["first_request_vs_c1_p50_exact"] = round(metrics["first_request_ms"] / metrics["e2e_c1_p50_exact_ms"], 2)
    return ratios


def startup_summary(pairs: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Medians of the floor, of ready and of their per-pair ratio, over alternating start-ups.

    One floor and one ready per run depend on how fast that moment's ``import torch`` was (3.6 to
    5.8 s in one minute on one H100 host, ``startup_bench.py --import-contention``); the median of
    several pairs, each ratio taken within its pair, is what a reader can compare with 1.3x.
    """
    ratios = [p["ready_s"] / p["floor_s"] for p in pairs if p["floor_s"] > 0]
    out: dict[str, Any] = {"pairs": [dict(p) for p in pairs]}
    if ratios:
        out["floor_s_median"] = round(statistics.median(p["floor_s"] for p in pairs), 3)
        out["ready_s_median"] = round(statistics.median(p["ready_s"] for p in pairs), 3)
        out["ready_vs_floor_median"] = round(statistics.median(ratios), 3)
        out["ready_vs_floor_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    return out


def startup_phase(args: argparse.Namespace, extra: list[str], device: torch.device, work: Path) -> dict[str, Any]:
    """``--startup-pairs`` pairs of a floor process and a server start (to ready, then stopped),
    the order reversed every other pair so a steady drift falls on both."""
    pairs: list[dict[str, float]] = []
    for i in range(1, args.startup_pairs + 1):
        got: dict[str, float] = {}
        for what in ("floor", "server") if i % 2 else ("server", "floor"):
            if what == "floor":
                got["floor_s"] = round(floor_ready(args.model_dir, device)[0], 3)
                continue
            server = Server(args.model_dir, args.device, args.port or free_port_pair(), extra,
                            work / f"server-startup-{i}.log", root=args.server_root)  # fmt: skip
            try:
                got["ready_s"] = round(server.wait_ready(), 3)
            finally:
                server.stop()
        got["ratio"] = round(got["ready_s"] / got["floor_s"], 3)
        pairs.append(got)
        print(f"    start-up pair {i}/{args.startup_pairs}: ready {got['ready_s']:.2f} s, "
              f"floor {got['floor_s']:.2f} s, {got['ratio']:.2f}x", file=sys.stderr, flush=True)  # fmt: skip
    return startup_summary(pairs)


def load_users(metrics: Mapping[str, Any], levels: Sequence[int], explicit: int | None = None) -> int:
    """Users for the loads at 'the best concurrency': ``explicit``, else the single-image best, else the top level."""
    if explicit:
        return explicit
    best = metrics.get("e2e_single_best_users")
    return int(best) if best else max(levels)


class TogglePlan(NamedTuple):
    """One metrics-toggle run's blocks of four windows, each window's length and the guard after a switch."""

    blocks: int
    window_s: float
    guard_s: float


def toggle_plans(blocks: str, window_s: str, guard_s: str, users: Sequence[int]) -> Callable[[int], TogglePlan]:
    """The plan of each ``--toggle-users`` level from ``--toggle-blocks``/``-window-s``/``-guard-s``: each
    one value for every level, or a comma list of one per level (``users`` given), e.g. 1.5 s windows at
    concurrency 1 and 0.5 s at 128 users (README, the serving benchmark).

    Raises:
        ValueError: naming the flag and the value it got.
    """
    lists: dict[str, list[Any]] = {}
    for flag, text, kind in (("blocks", blocks, int), ("window-s", window_s, float), ("guard-s", guard_s, float)):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"--toggle-{flag} must be a number or a comma list of them, got {text!r}") from None
        if len(values) > 1 and len(values) != len(users):
            levels = ", ".join(map(str, users)) or "none given"
            raise ValueError(f"--toggle-{flag} lists {len(values)} values for {len(users)} --toggle-users "
                             f"levels ({levels}): give one value, or one per level")  # fmt: skip
        lists[flag] = values
    n = max(len(v) for v in lists.values())
    plans = [TogglePlan(*p) for p in zip(*(v * n if len(v) == 1 else v for v in lists.values()), strict=True)]
    for plan in plans:
        if plan.blocks < 1:
            raise ValueError(f"--toggle-blocks must be at least 1 each, got {blocks!r}")
        if not 0 <= plan.guard_s < plan.window_s:
            raise ValueError(f"--toggle-guard-s must be >= 0 and below --toggle-window-s ({plan.window_s:g}), "
                             f"got {plan.guard_s:g}")  # fmt: skip
    if len(plans) == 1:
        return lambda u: plans[0]
    by_users = dict(zip(users, plans, strict=True))
    return lambda u: by_users[u]


def metrics_toggle_run(
    server: Server, args: argparse.Namespace, users: int, plan: TogglePlan, work: Path
) -> dict[str, Any]:
    """One Locust run at ``users`` on the running ``server``, its request-path metrics paused and resumed
    (``kill -USR1``/``-USR2``) in blocks of windows on, off, off, on (:mod:`runtime_ab`); on again at the end."""
    from model_server.metrics import PAUSE_SIGNAL, RESUME_SIGNAL

    def switch(on: bool) -> None:
        os.kill(server.proc.pid, RESUME_SIGNAL if on else PAUSE_SIGNAL)

    settle_s = 6.0  # Locust's start and the spawn of its users, before the first window
    states = runtime_ab.abba(plan.blocks)
    duration = int(settle_s + len(states) * plan.window_s) + 2
    windows: list[runtime_ab.Window] = []
    first = time.time() + settle_s

    def schedule() -> None:
        try:
            windows.extend(runtime_ab.run_windows(first, plan.window_s, states, switch))
        finally:
            switch(True)

    scheduler = threading.Thread(target=schedule, daemon=True)
    scheduler.start()
    size = args.sizes.split(",")[0]
    tag = f"toggle-c{users}"
    procs = 1 if users == 1 else min(args.processes, users)
    run = run_locust(server.url, args.user, users, procs, duration, size, 1, work, tag)
    scheduler.join(plan.window_s * len(states) + 30)
    figures = runtime_ab.window_figures(
        read_raw_samples(work / f"{tag}-latency"), windows, images_per_request=1, guard_s=plan.guard_s
    )
    summary = runtime_ab.summarize(figures, bound_pct=METRICS_OVERHEAD_TARGET_PCT, windows=windows)
    return {
        "users": users, "blocks": plan.blocks, "window_s": plan.window_s, "guard_s": plan.guard_s,
        "img_s": round(run["img_s"], 1), "failures": run["failures"], **summary,
    }  # fmt: skip


def toggle_line(users: int, result: Mapping[str, Any]) -> str:
    """One terminal line per metrics-toggle run: each cost's mean, 95 % interval and verdict."""
    parts = []
    for key, what in (("throughput_cost_pct", "throughput"), ("latency_cost_pct", "p50 latency")):
        if key in result:
            c = result[key]
            interval = f" (95 % CI {c['ci95_low']:+.2f} .. {c['ci95_high']:+.2f})" if "ci95_low" in c else ""
            parts.append(f"{what} cost {c['mean']:+.2f} %{interval}: {result[key.replace('_pct', '_verdict')]}")
    return (
        f"metrics toggled in one server at {users} users, {result['blocks']} blocks of 4 windows of "
        f"{result['window_s']:g} s: " + ("; ".join(parts) or "no windows with requests")
    )


#: Server log lines that time the start-up (the CLI's and the device process's own reports).
STARTUP_MARKERS = ("early device start", "early nvJPEG", "start-up:", "loaded and warm", "listening: all")


def startup_lines(log: Path, limit: int = 12) -> list[str]:
    """The start-up timing lines of a server log (what a compared arm's ready time is made of)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if any(m in line for m in STARTUP_MARKERS)][:limit]


def keep_server_log(log: Path, name: str) -> Path | None:
    """A copy of a server log under ``$OUT`` (its last 200 kB) as ``<name>-server.log``; None without ``$OUT``."""
    out = os.environ.get("OUT")
    if not out or not log.exists():
        return None
    dest = Path(out, f"{name}-server.log")
    dest.write_text(log.read_text(errors="replace")[-200_000:])
    return dest


def run_arm(
    args: argparse.Namespace, server_args: list[str], users: int, photo: Any, work: Path, tag: str
) -> dict[str, Any]:
    """One repetition of one arm on a fresh server: start, wait for ready, one warm request, Locust, stop.
    The arm's start-up timing lines go into its run, and its whole log to ``$OUT`` where that is set."""
    server = Server(
        args.model_dir,
        args.device,
        args.port or free_port_pair(),
        server_args,
        work / f"server-{tag}.log",
        root=args.server_root,
    )
    try:
        ready_s = server.wait_ready()
        one_request_ms(server.url, photo, args.user)  # the first request pays for lazy set-up: not part of the load
        procs = 1 if users == 1 else min(args.processes, users)
        size, images = args.sizes.split(",")[0], args.compare_images
        run = run_locust(server.url, args.user, users, procs, args.duration, size, images, work, tag)
    finally:
        server.stop()
        keep_server_log(server.log, f"{args.name or 'serve-' + Path(args.model_dir).name}-{tag}")
    run["ready_s"] = round(ready_s, 3)
    run["startup_log"] = startup_lines(server.log)
    return run


def compare_phase(
    args: argparse.Namespace, base_args: list[str], arms: Mapping[str, list[str]], users: int, photo: Any, work: Path
) -> dict[str, Any]:
    """The interleaved comparison: every arm ``args.pairs`` times, alternating, each on a fresh server."""
    server_args = {BASE: base_args, **{label: [*base_args, *extra] for label, extra in arms.items()}}
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in server_args}
    for pair, label in interleaved_order(list(arms), args.pairs):
        r = run_arm(args, server_args[label], users, photo, work, f"cmp-{label}-{pair}")
        runs[label].append(r)
        print(f"    pair {pair}/{args.pairs} {label:<12} {r['img_s']:8.1f} img/s  p50 {r['p50_ms']:7.1f} ms  "
              f"p99 {r['p99_ms']:7.1f} ms  failures {r['failures']}  (ready {r['ready_s']:.1f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
    return {
        "users": users,
        "images_per_request": args.compare_images,
        "pairs": args.pairs,
        "duration_s": args.duration,
        "order": list(server_args),
        "server_args": {label: shlex.join(a) for label, a in server_args.items()},
        "arms": compare_arms(runs),
    }


def compare_lines(compare: Mapping[str, Any]) -> list[str]:
    """One terminal line per compared arm: its median against the base's, and both spreads."""
    base = compare["arms"][BASE]
    lines = []
    for label, arm in compare["arms"].items():
        if label == BASE:
            continue
        ratio = f"{arm['ratio_vs_base']:.3f}x" if "ratio_vs_base" in arm else "n/a"
        spreads = [f"{a['img_s_spread_pct']:.1f} %" if "img_s_spread_pct" in a else "n/a" for a in (arm, base)]
        lines.append(
            f"compare {label} vs {BASE} at {compare['users']} users, {compare['pairs']} pairs: {ratio} "
            f"(median {arm['img_s_median']:.1f} vs {base['img_s_median']:.1f} img/s; "
            f"spread max-min {spreads[0]} vs {spreads[1]})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--concurrency", default="1,16,64,128", help="Locust users for single-image runs")
    p.add_argument(
        "--batched-concurrency", default="8", help="users for 32-images-per-request runs, comma-separated (best kept)"
    )
    p.add_argument("--batch-images", type=int, default=32)
    p.add_argument(
        "--batched-rounds", type=int, default=1,
        help="Locust runs at the best batched concurrency (the sweep's one included); e2e_batched_img_s is their "
        "median, each run with connections of its own (default 1)",
    )  # fmt: skip
    p.add_argument("--processes", type=int, default=4, help="Locust worker processes")
    p.add_argument(
        "--server-cpus", default="",
        help="CPU list (e.g. 0-9) the predictor's processes run on (its front ends and device process); default: any",
    )  # fmt: skip
    p.add_argument(
        "--locust-cpus", default="",
        help="CPU list Locust's processes run on, so the load generator does not share cores (or a core's "
        "hyperthreads) with the predictor, as it would not in a cluster; default: any",
    )  # fmt: skip
    p.add_argument("--duration", type=int, default=20, help="seconds per Locust run")
    p.add_argument(
        "--user",
        default="V2BinaryBytesUser",
        choices=sorted(USER_BODIES),
        help="Locust user class for single-image runs",
    )
    p.add_argument("--sizes", default="vga,12mp", help="image sizes: the first is the main one")
    p.add_argument("--server-args", default="", help="extra predictor flags, e.g. '--max_batch_size 64'")
    p.add_argument("--ondevice-iters", type=int, default=50)
    p.add_argument(
        "--phases", default=None,
        help=f"what to run, a comma list among {','.join(PHASES)} (default: all; compare only with --compare)",
    )  # fmt: skip
    p.add_argument(
        "--compare", action="append", default=[], metavar="LABEL=SERVER_ARGS",
        help="a server configuration to compare with the base one (--server-args alone): SERVER_ARGS are added "
        "after --server-args; repeatable. Arms alternate, each run on a fresh server",
    )  # fmt: skip
    p.add_argument("--pairs", type=int, default=3, help="repetitions of every compared arm and of the base")
    p.add_argument(
        "--startup-pairs", type=int, default=3,
        help="the startup phase: this many pairs of a floor process and a server start to ready, alternating "
        "(default 3); metrics.startup holds each pair and the median ratio",
    )  # fmt: skip
    p.add_argument(
        "--compare-images", type=int, default=1,
        help="JPEGs per request in the compare runs (default 1; --batch-images for the batched path)",
    )  # fmt: skip
    p.add_argument(
        "--compare-users", type=int, default=None,
        help="Locust users for the compare runs (default: the best single-image concurrency, else the top level)",
    )  # fmt: skip
    p.add_argument(
        "--metrics-overhead", action="store_true",
        help='shorthand for --compare metrics_off="--metrics false"; records metrics_overhead_pct',
    )  # fmt: skip
    p.add_argument(
        "--toggle-users", default="",
        help="the metrics-toggle phase: Locust users of each run, comma-separated (default: 1 and the best "
        "single-image concurrency); one server, its metrics paused and resumed in alternating windows",
    )  # fmt: skip
    p.add_argument(
        "--toggle-blocks", default="12",
        help="metrics-toggle: blocks of four windows (on, off, off, on) per run, one effect each (default 12); "
        "this and the next two take one value, or a comma list of one per --toggle-users level",
    )  # fmt: skip
    p.add_argument("--toggle-window-s", default="1.5", help="metrics-toggle: seconds per window (default 1.5)")
    p.add_argument(
        "--toggle-guard-s", default="0.25",
        help="metrics-toggle: requests ending this soon after a switch are left out (they ran partly before it)",
    )  # fmt: skip
    p.add_argument(
        "--trace-batches", type=int, default=0,
        help="in the cpu-roles run, capture an in-pod torch.profiler trace of this many batches (Perfetto/"
        "TensorBoard JSON, next to the record and under $OUT; the server gets a random admin token); default 0: off",
    )  # fmt: skip
    p.add_argument(
        "--roles-images", type=int, default=1,
        help="JPEGs per request in the cpu-roles run (default 1; --batch-images to trace the batched path)",
    )  # fmt: skip
    p.add_argument(
        "--slo-p99-ms", type=float, default=50.0,
        help="latency objective: e2e_single_slo_img_s is the best single-image throughput with p99 at most "
        "this (default 50, the serving target)",
    )  # fmt: skip
    p.add_argument(
        "--py-spy", type=float, default=0.0, metavar="SECONDS",
        help="in the cpu-roles run, sample the device process with py-spy (non-blocking, 100 Hz) for SECONDS: "
        "collapsed stacks of what holds the GIL and of every thread's activity, next to the record and under "
        "$OUT (py-spy must be installed); default 0: off",
    )  # fmt: skip
    p.add_argument(
        "--server-root", type=Path, default=ROOT,
        help="run the predictor from this checkout (default: this one), e.g. an earlier commit's worktree, to "
        "compare code versions on one machine by alternating runs; Locust and the figures stay this checkout's",
    )  # fmt: skip
    p.add_argument("--port", type=int, default=0, help="HTTP port (gRPC gets port+1); default: a free one")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--name", default="")
    args = p.parse_args(argv)
    if not (args.server_root / "model_server" / "__main__.py").is_file():
        p.error(f"--server-root {args.server_root} holds no model_server package (a checkout of this repository)")
    try:
        phases = parse_phases(args.phases)
        arms = parse_compare(args.compare, metrics_overhead=args.metrics_overhead)
    except ValueError as e:
        p.error(str(e))
    if arms and "compare" not in phases:
        p.error("--compare and --metrics-overhead need the compare phase in --phases")
    if args.phases is not None and "compare" in phases and not arms:
        p.error("the compare phase needs --compare or --metrics-overhead")
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    if args.startup_pairs < 1:
        p.error(f"--startup-pairs must be at least 1, got {args.startup_pairs}")
    if args.batched_rounds < 1:
        p.error(f"--batched-rounds must be at least 1, got {args.batched_rounds}")
    if args.roles_images < 1:
        p.error(f"--roles-images must be at least 1, got {args.roles_images}")
    if args.compare_images < 1:
        p.error(f"--compare-images must be at least 1, got {args.compare_images}")
    try:
        toggle_users = [int(u) for u in args.toggle_users.split(",") if u.strip()]
    except ValueError:
        p.error(f"--toggle-users must be comma-separated integers, got {args.toggle_users!r}")
    if any(u < 1 for u in toggle_users):
        p.error(f"--toggle-users must be at least 1 each, got {args.toggle_users!r}")
    try:
        toggle_plan = toggle_plans(args.toggle_blocks, args.toggle_window_s, args.toggle_guard_s, toggle_users)
    except ValueError as e:
        p.error(str(e))
    if args.trace_batches < 0 or (args.trace_batches and "cpu-roles" not in phases):
        p.error("--trace-batches must be >= 0 and needs the cpu-roles phase in --phases")
    if args.py_spy < 0 or (args.py_spy and "cpu-roles" not in phases):
        p.error("--py-spy must be >= 0 and needs the cpu-roles phase in --phases")
    if args.py_spy and not py_spy_path():
        p.error("--py-spy needs the py-spy executable (pip install py-spy)")
    if not arms and "compare" in phases:
        phases.remove("compare")
    for role in PLACEMENT:
        text = getattr(args, f"{role}_cpus")
        try:
            PLACEMENT[role] = parse_cpus(text) if text else None
        except ValueError as e:
            p.error(f"--{role}-cpus: {e}")

    device = torch.device(args.device)
    manifest = json.loads((args.model_dir / "variant.json").read_text())
    slug = manifest["slug"]
    extra = shlex.split(args.server_args)
    max_batch = 32
    if "--max_batch_size" in extra:
        max_batch = int(extra[extra.index("--max_batch_size") + 1])
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    metrics: dict[str, Any] = {}
    record_notes: dict[str, str] = {}
    if args.server_cpus or args.locust_cpus:
        record_notes["placement"] = (
            f"predictor on CPUs {args.server_cpus or 'any'}, Locust on {args.locust_cpus or 'any'}"
        )
    main_loads = [ph for ph in ("single", "cpu-roles", "sizes", "batched") if ph in phases]
    steps = [ph for ph in ("ondevice", "floor", "startup") if ph in phases] + ["cold"]
    steps += ["single"] * any(ph in phases for ph in ("single", "cpu-roles", "sizes"))
    steps += [ph for ph in ("batched", "metrics-toggle", "compare") if ph in phases]

    def step(name: str, text: str) -> None:
        print(f"[{steps.index(name) + 1}/{len(steps)}] {text}", file=sys.stderr, flush=True)

    # before any load: the host's own speed, so that records from lent machines can be told apart
    host = records.host_speed()
    if "ondevice" in phases:
        step("ondevice", f"on-device {slug} at batch 1 and {max_batch}")
        metrics.update(ondevice(args.model_dir, device, max_batch, args.ondevice_iters))
    if "floor" in phases:
        step("floor", f"floor: bare torch process to weights on {device}")
        floor_s, floor_how = floor_ready(args.model_dir, device)
        metrics["floor_ready_s"] = round(floor_s, 3)
        record_notes["floor_weights"] = floor_how
    if "startup" in phases:
        step("startup", f"start-up: {args.startup_pairs} pairs of a floor process and a server start, alternating")
        metrics["startup"] = startup_phase(args, extra, device, work)

    step("cold", "predictor cold start")
    port = args.port or free_port_pair()
    token = secrets.token_hex(16) if args.trace_batches else ""
    server = Server(
        args.model_dir, args.device, port, extra, work / "server.log", admin_token=token, root=args.server_root
    )
    levels = [int(c) for c in args.concurrency.split(",")]
    sizes = args.sizes.split(",")
    runs: dict[str, dict[str, Any]] = {}
    batched: dict[str, dict[str, Any]] = {}
    try:
        metrics["ready_s"] = round(server.wait_ready(), 3)
        from loadtest._payloads import photo_set

        photo = photo_set(sizes[0])[0]
        sums = scrape_sums(server.url)
        metrics["first_request_ms"] = round(one_request_ms(server.url, photo, args.user), 2)
        after_first = scrape_after(server.url, sums, 1)
        # The same request again, the same way: what the client and a new connection cost on their own.
        repeats = [one_request_ms(server.url, photo, args.user) for _ in range(20)]
        metrics["first_request_repeat_p50_ms"] = round(statistics.median(repeats), 2)
        # Where the first request's time went on the server, against the repeats' means: the stages that
        # differ are what a first request still pays for (the rest is the connection and HTTP around them).
        metrics["first_request_stages"] = breakdown(sums, after_first)
        metrics["first_request_repeat_stages"] = breakdown(after_first, scrape_after(server.url, after_first, 20))
        time.sleep(2.5)
        metrics["rss_idle_mb"] = rss_of(server.proc.pid)
        metrics["vram_idle_mb"] = gpu_mem_of(server.proc.pid)

        sampler = Sampler(server.proc.pid)
        if main_loads:
            sampler.start()
        if "single" in steps:
            step("single", "Locust: single image per request")
        if "single" in phases:
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
            metrics.update(within_slo(runs, args.slo_p99_ms))
            if "c1" in runs:
                metrics["e2e_c1_p50_ms"] = runs["c1"]["p50_ms"]
                metrics["e2e_c1_p99_ms"] = runs["c1"]["p99_ms"]
                if "p50_exact_ms" in runs["c1"]:
                    metrics["e2e_c1_p50_exact_ms"] = runs["c1"]["p50_exact_ms"]
        if "cpu-roles" in phases:
            # Where the CPU goes at the best concurrency (a second, shorter run with a CPU sampler).
            c = load_users(metrics, levels)
            roles = CpuByRole(server.proc.pid)
            locust_done = threading.Event()

            def start_roles_later() -> None:  # Locust takes a few seconds to spawn its users
                if not locust_done.wait(6.0):
                    roles.start()

            threading.Thread(target=start_roles_later, daemon=True).start()
            trace: dict[str, Any] = {}
            if args.trace_batches:
                name = args.name or f"serve-{slug}"

                def trace_later() -> None:  # under the same load, once Locust's users are all running
                    if not locust_done.wait(7.0):
                        trace.update(capture_trace(server, args.trace_batches, work / f"{name}-trace.json.gz"))

                tracer = threading.Thread(target=trace_later, daemon=True)
                tracer.start()
            spies: list[Path] = []
            if args.py_spy:
                spy_name = args.name or f"serve-{slug}"

                def spy_later() -> None:  # under the same load, once Locust's users are all running
                    if args.trace_batches:
                        tracer.join(60)  # not while the profiler traces and exports: it would be sampled too
                    elif locust_done.wait(6.0):
                        return
                    if not locust_done.is_set():
                        spies.extend(record_py_spy(server.proc.pid, args.py_spy, work, spy_name))

                spy_thread = threading.Thread(target=spy_later, daemon=True)
                spy_thread.start()
            # Long enough for the trace (from 7 s, a few seconds with its export) and then py-spy.
            seconds = max(12, args.duration) + (round(args.py_spy) + (6 if args.trace_batches else 0))
            run_locust(
                server.url, args.user, c, min(args.processes, c), seconds, sizes[0], args.roles_images, work, "cpu"
            )
            locust_done.set()
            roles.stop_evt.set()
            metrics["cpu_at_best_concurrency"] = {
                **roles.summary(),
                "users": c,
                "images_per_request": args.roles_images,
            }
            if args.trace_batches:
                tracer.join(70)
                metrics["profiler_trace"] = trace or {"error": "the capture did not start before the load ended"}
                if trace.get("file") and os.environ.get("OUT"):
                    shutil.copyfile(work / trace["file"], Path(os.environ["OUT"], trace["file"]))
                print(f"    profiler trace at c={c}: {metrics['profiler_trace']}", file=sys.stderr, flush=True)
            if args.py_spy:
                spy_thread.join(args.py_spy + 30)
                metrics["py_spy_profiles"] = [f.name for f in spies]
                for f in spies:
                    if os.environ.get("OUT"):
                        shutil.copyfile(f, Path(os.environ["OUT"], f.name))
                print(f"    py-spy of the device process: {[f.name for f in spies]}", file=sys.stderr, flush=True)
            print(f"    CPU at c={c}: {metrics['cpu_at_best_concurrency']}", file=sys.stderr, flush=True)
        if "sizes" in phases:
            c = load_users(metrics, levels)
            for size in sizes[1:]:
                r = run_locust(server.url, args.user, c, min(args.processes, c), args.duration, size, 1, work, size)
                metrics[f"e2e_single_{size}_img_s"] = round(r["img_s"], 1)
                metrics[f"e2e_single_{size}_p99_ms"] = r["p99_ms"]
                print(f"    {size} c={c}: {r['img_s']:.1f} img/s p99 {r['p99_ms']} ms", file=sys.stderr, flush=True)

        if "batched" in phases:
            step("batched", f"Locust: {args.batch_images} images per request")
            for bc in (int(c) for c in str(args.batched_concurrency).split(",")):
                batched[f"c{bc}"] = run_locust(server.url, args.user, bc, min(args.processes, bc), args.duration,
                                               sizes[0], args.batch_images, work, f"batched-c{bc}")  # fmt: skip
                print(f"    batched c={bc}: {batched[f'c{bc}']['img_s']:.1f} img/s", file=sys.stderr, flush=True)
            best_b = max(batched, key=lambda k: batched[k]["img_s"])  # the best concurrency, as for single images
            bc = int(best_b[1:])
            rounds = [batched[best_b]]
            for k in range(2, args.batched_rounds + 1):
                rounds.append(run_locust(server.url, args.user, bc, min(args.processes, bc), args.duration,
                                         sizes[0], args.batch_images, work, f"batched-c{bc}-r{k}"))  # fmt: skip
                print(f"    batched c={bc} round {k}: {rounds[-1]['img_s']:.1f} img/s", file=sys.stderr, flush=True)
            metrics.update(batched_summary(rounds, bc))
            metrics["batched_runs"] = batched
            if len(rounds) > 1:
                metrics["batched_rounds"] = rounds[1:]
        if "metrics-toggle" in phases:
            users_list = toggle_users or sorted({1, load_users(metrics, levels)})
            plans = [(u, toggle_plan(u)) for u in users_list]
            step("metrics-toggle", "metrics paused and resumed in one server, at " + "; ".join(
                f"{u} users {pl.blocks} blocks of 4 windows of {pl.window_s:g} s" for u, pl in plans))  # fmt: skip
            toggles = {f"c{u}": metrics_toggle_run(server, args, u, pl, work) for u, pl in plans}
            metrics["metrics_toggle"] = toggles
            for u in users_list:
                print("    " + toggle_line(u, toggles[f"c{u}"]), file=sys.stderr, flush=True)
                if os.environ.get("OUT"):  # a picture of the windows, next to the run's files (not a record)
                    png = Path(os.environ["OUT"], f"{args.name or 'serve-' + slug}-metrics-toggle-c{u}.png")
                    try:
                        runtime_ab.plot([{"name": args.name or f"serve-{slug}", "metrics": metrics}], u, png)
                    except ImportError as e:
                        print(f"    no plot of the windows: {e}", file=sys.stderr, flush=True)
            top = toggles[f"c{max(users_list)}"]
            if "throughput_cost_pct" in top:
                metrics["metrics_toggle_throughput_cost_pct"] = top["throughput_cost_pct"]["mean"]
                metrics["metrics_toggle_throughput_cost_ci95_high_pct"] = top["throughput_cost_pct"].get("ci95_high")
                metrics["metrics_toggle_users"] = max(users_list)
        if main_loads:
            sampler.stop_evt.set()
            metrics["rss_load_mb"] = sampler.rss
            metrics["vram_load_mb"] = sampler.vram
        if runs:
            metrics["runs"] = runs
        metrics["server_metrics_excerpt"] = [
            line for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines()
            if line.startswith(("densenet_batch_size_sum", "densenet_batch_size_count", "densenet_requests_rejected"))
        ]  # fmt: skip
        server.stop()  # the compare arms each get a fresh server, and the device to themselves

        if "compare" in phases:
            users = load_users(metrics, levels, args.compare_users)
            step("compare", f"interleaved compare at {users} users: {BASE}, {', '.join(arms)}; {args.pairs} pairs, "
                 "each run on a fresh server")  # fmt: skip
            metrics["compare"] = compare_phase(args, extra, arms, users, photo, work)
            if METRICS_OFF in arms:
                metrics.update(metrics_overhead(metrics["compare"]["arms"]))
    finally:
        server.stop()
    # and after every load: a lent host's speed drifts within one run (session 25: the Python loop
    # went from 34.5 to 62 ms on one machine within eight minutes), which the probe before cannot show
    host_after = records.host_speed()

    compare_failures = [n for arm in metrics.get("compare", {}).get("arms", {}).values() for n in arm["failures"]]
    toggle_failures = [t["failures"] for t in metrics.get("metrics_toggle", {}).values()]
    metrics["failures_total"] = (
        sum(v["failures"] for v in [*runs.values(), *batched.values(), *metrics.get("batched_rounds", [])])
        + sum(compare_failures)
        + sum(toggle_failures)
    )
    metrics["ratios"] = compute_ratios(metrics)
    from optimize.build import environment

    env = environment(device, packages=SERVING_PACKAGES)
    env["host_speed"] = host
    env["host_speed_after"] = host_after
    env["host_speed_drift_pct"] = records.speed_drift_pct(host, host_after)
    gpu = (env.get("gpu") or "cpu").lower().replace("nvidia ", "").replace(" ", "-")
    date = dt.date.today().isoformat()
    name = args.name or f"serve-{slug}"
    cli = sys.argv[1:] if argv is None else argv
    record = {
        "name": name,
        "command": "python " + shlex.join([str(Path(__file__).relative_to(ROOT)), *cli]),
        "date": date,
        "phases": phases,
        "environ": env,
        "metrics": metrics,
        "notes": record_notes,
        "server_command": " ".join(shlex.quote(a) for a in server.cmd),
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{date}-{gpu}-{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
        keep_server_log(server.log, name)
    bulky = ("runs", "server_metrics_excerpt", "compare", "metrics_toggle", "batched_rounds")
    print(json.dumps({k: v for k, v in metrics.items() if k not in bulky}, indent=1))
    if "compare" in metrics:
        print("\n".join(compare_lines(metrics["compare"])))
    if "metrics_overhead_runs" in metrics:
        print(overhead_line(metrics))
    for key, result in metrics.get("metrics_toggle", {}).items():
        print(toggle_line(int(key[1:]), result))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
