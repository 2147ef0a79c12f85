"""benchmarks/gpu_suite.sh with stub executables on PATH: which benchmark commands each step runs.

No GPU here: ``nvidia-smi`` and the Python interpreter are stubs that record their arguments, so
these tests check the suite's plumbing (steps, flags, skips), never a benchmark's result.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"

STUB_PYTHON = """#!/usr/bin/env bash
# Records every call; answers the ONNX Runtime probe with $ORT_CUDA (0: has the CUDA EP).
printf '%s\\n' "$*" >> "$CALLS"
if [ "${1:-}" = "-c" ]; then exit "${ORT_CUDA:-1}"; fi
if [ "${1:-}" = "-" ]; then cat >/dev/null; fi
exit 0
"""


def _run(tmp_path: Path, *args: str, ort_cuda: int = 1) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python-stub").write_text(STUB_PYTHON)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'NVIDIA H100 80GB HBM3, 580.00, 81559 MiB'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    env = {
        **os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python-stub"),
        "CALLS": str(calls), "ORT_CUDA": str(ort_cuda), "TMPDIR": str(tmp_path),
    }  # fmt: skip
    proc = subprocess.run(["bash", str(SUITE), *args], env=env, capture_output=True, text=True, timeout=60)
    return proc, calls.read_text().splitlines()


def test_serve_and_ab_steps_build_the_artifact_then_run_serve_bench(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, "--steps", "serve,ab", "--duration", "7", "--pairs", "3")
    assert proc.returncode == 0, proc.stderr
    build = [c for c in calls if c.startswith("-m optimize build")]
    assert build and "--variant densenet121-eager-fp16-cl-graphs" in build[0] and "--max-batch 128" in build[0]
    serve, ab = [c for c in calls if "benchmarks/serve_bench.py" in c]
    for flag in ("--duration 7", "--trace-batches 20", "--frontends 6", "--phases ondevice,floor,single"):
        assert flag in serve, flag
    for flag in ("--phases compare", "--pairs 3", "--metrics-overhead",
                 "nobalance=--balance_connections false", "--concurrency 128", "--frontends 6"):  # fmt: skip
        assert flag in ab, flag


def test_onnx_step_is_skipped_without_the_cuda_provider_and_runs_with_it(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, "--steps", "onnx", ort_cuda=1)
    assert proc.returncode == 0 and "no CUDAExecutionProvider" in proc.stderr
    assert not [c for c in calls if "gpu_bench.py" in c]
    proc, calls = _run(tmp_path, "--steps", "onnx", ort_cuda=0)
    bench = [c for c in calls if "gpu_bench.py" in c]
    assert proc.returncode == 0 and len(bench) == 1 and "densenet121-onnx-fp16" in bench[0]


@pytest.mark.parametrize("args", [["--steps", "nope"], ["--bogus"]])
def test_bad_arguments_exit_1_with_usage(tmp_path: Path, args: list[str]) -> None:
    proc, calls = _run(tmp_path, *args)
    assert proc.returncode == 1 and ("unknown step 'nope'" in proc.stderr or "unknown argument" in proc.stderr)
    assert calls == []


def test_help_exits_0() -> None:
    proc = subprocess.run(["bash", str(SUITE), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "serve-aoti" in proc.stdout


def test_decode_step_runs_the_decode_breakdown(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, "--steps", "decode")
    bench = [c for c in calls if "benchmarks/decode_bench.py" in c]
    assert proc.returncode == 0 and len(bench) == 3 and "--batch-sizes 1,8,32,64,128" in bench[0]
    assert "--vary-batch 16-80" in bench[1] and "--call-size 32" in bench[1]
    assert "--processes 1,2,4" in bench[2] and "--contention-batch 128" in bench[2]


def test_pruning_step_pairs_each_pruned_variant_with_its_base(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, "--steps", "pruning")
    assert proc.returncode == 0, proc.stderr
    (bench,) = [c for c in calls if "gpu_bench.py" in c]
    assert "--pair-rounds 10" in bench and "--batch-sizes 1,32,128" in bench
    from optimize import registry

    slugs = bench.split("--variants ")[1].split()[0].split(",")
    pruned = [s for s in slugs if registry.get(s).technique is registry.Technique.STRUCTURED_PRUNE]
    assert len(pruned) == 2 and all(registry.get(s).base in slugs for s in pruned)


def test_decode_ab_compares_fixed_size_nvjpeg_calls_on_batched_requests(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, "--steps", "decode-ab", "--pairs", "2")
    (ab,) = [c for c in calls if "benchmarks/serve_bench.py" in c]
    assert proc.returncode == 0, proc.stderr
    for flag in ("--phases compare", "--pairs 2", "--compare-images 32", "--compare-users 16",
                 "decode32=--decode_batch 32", "-decode-ab"):  # fmt: skip
        assert flag in ab, flag


def test_serve_and_ab_take_another_variant_and_reuse_a_built_artifact(tmp_path: Path) -> None:
    """--variant picks what the serve and ab steps serve; an artifact already in --artifacts is not rebuilt."""
    arts = tmp_path / "arts"
    (arts / "densenet121-aoti-fp16-cl-dynamic").mkdir(parents=True)
    (arts / "densenet121-aoti-fp16-cl-dynamic" / "variant.json").write_text("{}")
    proc, calls = _run(tmp_path, "--steps", "serve,ab", "--variant", "densenet121-aoti-fp16-cl-dynamic",
                       "--artifacts", str(arts))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls if c.startswith("-m optimize build")] and "already built" in proc.stderr
    serve, ab = [c for c in calls if "benchmarks/serve_bench.py" in c]
    assert f"--model-dir {arts}/densenet121-aoti-fp16-cl-dynamic" in serve and "-aoti-fp16-cl-dynamic" in ab


def test_aoti_blockbuf_step_times_the_rewrite_against_stock(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, "--steps", "aoti-blockbuf")
    assert proc.returncode == 0, proc.stderr
    bench = [c for c in calls if "gpu_bench.py" in c]
    assert len(bench) == 1
    assert "--variants densenet121-aoti-fp16-cl-dynamic-fused,densenet121-aoti-fp16-cl-dynamic-fused-mids" in bench[0]
    assert "--skip-stock" not in bench[0]  # the ratio is to stock torch.compile in the same run
    assert [c for c in calls if "blockbuf_bench.py" in c and "--batch-sizes 1,128" in c and "--profile-dir" in c
            and "--arms stock,fused,fusedconv,fusedconv0,fusedmids" in c]  # fmt: skip
