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
