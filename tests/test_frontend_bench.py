"""benchmarks/frontend_bench.py: real front ends in front of a stand-in device process, on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _bench(artifacts_dir: Path, *args: str) -> dict[str, Any]:
    """One short real run of the bench; its JSON result."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/frontend_bench.py", "--model-dir", str(artifacts_dir / "densenet121-eager-fp32"),
         "--concurrency", "2", "--seconds", "2", "--warmup-s", "0.5", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_frontend_bench_serves_real_requests_and_reports_cpu_per_request(artifacts_dir: Path) -> None:
    result = _bench(artifacts_dir, "--frontends", "2")
    assert result["errors"] == 0 and result["requests"] > 0
    assert result["p50_ms"] > 0 and result["frontend_cpu_us_per_request"] > 0
    # Both front ends listened before the load began; the split of the 2 keep-alive connections is
    # the kernel's hash (either front end may hold both).
    assert len(result["frontend_connections"]) == 2 and sum(result["frontend_connections"]) == 2


def test_frontend_bench_sends_batched_requests(artifacts_dir: Path) -> None:
    result = _bench(artifacts_dir, "--images", "4")
    assert result["errors"] == 0 and result["requests"] > 0 and result["settings"]["images"] == "4"


def test_frontend_bench_refuses_a_folder_without_an_artifact(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "benchmarks/frontend_bench.py", "--model-dir", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "holds no variant.json" in proc.stderr


def test_frontend_bench_runs_either_event_loop(artifacts_dir: Path) -> None:
    """--event-loop reaches the front ends and the device stand-in (uvloop and asyncio both serve)."""
    for loop in ("asyncio", "uvloop"):
        result = _bench(artifacts_dir, "--event-loop", loop)
        assert result["errors"] == 0 and result["requests"] > 0 and result["settings"]["event_loop"] == loop


def test_wakeup_bench_measures_each_mode() -> None:
    """benchmarks/wakeup_bench.py: real processes on a real socket pair; one JSON line with each mode."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/wakeup_bench.py", "--gap-ms", "0.2", "--rounds", "50"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    for mode in ("hot", "idle", "spin"):
        assert 0 < result[mode]["p50_us"] <= result[mode]["p99_us"]
    assert result["idle_minus_hot_p50_us"] == round(result["idle"]["p50_us"] - result["hot"]["p50_us"], 1)
    bad = subprocess.run(
        [sys.executable, "benchmarks/wakeup_bench.py", "--rounds", "3"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--rounds >= 10" in bad.stderr


def test_startup_bench_reports_ready_and_every_process_memory(artifacts_dir: Path) -> None:
    """benchmarks/startup_bench.py: a real server with two front ends, ready polled, RSS per process."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/startup_bench.py", "--model-dir", str(artifacts_dir / "densenet121-eager-fp32"),
         "--runs", "1", "--server-args", "--max_batch_size 2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ready_s"] > 0 and result["device_rss_mb"] > 0
    assert len(result["frontend_rss_mb"]) == 2
    # A front end without torch: well under the device process, which holds torch and the model.
    assert all(0 < rss < result["device_rss_mb"] for rss in result["frontend_rss_mb"])


def test_startup_bench_times_import_torch_alone_and_beside_front_ends() -> None:
    proc = subprocess.run(
        [sys.executable, "benchmarks/startup_bench.py", "--import-contention", "1", "--runs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["beside"] == 1
    assert len(result["import_torch_alone_s"]) == len(result["import_torch_beside_front_ends_s"]) == 1
    assert all(t > 0 for t in result["import_torch_alone_s"] + result["import_torch_beside_front_ends_s"])
