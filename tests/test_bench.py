"""``python -m optimize bench`` on the CPU: the CSV contract, plots, TensorBoard scalars, profiler traces,
checkpoints, the summary table and the analysis, from one real (short) run."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optimize.bench import CSV_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("densenet121-eager-fp32", "densenet121-onnx-fp32")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory, artifacts_dir: Path) -> tuple[Path, Path, str, str]:
    out = tmp_path_factory.mktemp("bench")
    results, tb = out / "results", out / "logs" / "tensorboard"
    # An artifact built with the same weights and a large enough max batch is reused, not rebuilt.
    shutil.copytree(artifacts_dir / VARIANTS[0], results / "models" / VARIANTS[0])
    cmd = [
        sys.executable, "-m", "optimize", "bench", *(a for v in VARIANTS for a in ("--variant", v)),
        "--batch-sizes", "1,2", "--device", "auto", "--output-dir", str(results), "--tensorboard-dir", str(tb),
        "--weights", "random", "--warmup", "1", "--min-iters", "2", "--max-iters", "3", "--min-time-s", "0",
        "--readme", str(out / "README.md"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results, tb, proc.stdout, proc.stderr


def test_csv_has_the_contract_columns_and_a_row_per_variant_and_batch(bench_run: tuple[Path, Path, str, str]) -> None:
    results, *_ = bench_run
    with (results / "benchmark_results.csv").open() as f:
        header = next(csv.reader(f))
        f.seek(0)
        rows = list(csv.DictReader(f))
    assert tuple(header[: len(CSV_COLUMNS)]) == CSV_COLUMNS
    assert header[: len(CSV_COLUMNS)] == (
        "model_variant,batch_size,device,ram_usage_mb,vram_usage_mb,cpu_utilization_pct,gpu_utilization_pct,"
        "latency_ms,throughput_samples_sec,accuracy_top1,accuracy_top5,model_size_mb,optimization_technique"
    ).split(",")
    assert {(r["model_variant"], r["batch_size"]) for r in rows} == {(v, b) for v in VARIANTS for b in ("1", "2")}
    for r in rows:
        assert r["device"] == "cpu"
        assert float(r["latency_ms"]) > 0 and float(r["throughput_samples_sec"]) > 0
        assert float(r["p50_ms"]) <= float(r["p99_ms"])
        assert float(r["ram_usage_mb"]) > 100  # sampled RSS of a process holding torch and a model
        assert r["cpu_utilization_pct"] != ""  # sampled during the timed window
        assert r["vram_usage_mb"] == r["gpu_utilization_pct"] == ""  # no GPU: empty, not made up
        assert r["accuracy_top1"] == "" and "no labelled --val-dir" in r["accuracy_note"]
        assert "fell back to the CPU" in r["note"]
        assert float(r["model_size_mb"]) > 30 and r["weights"] == "random"
    techniques = {r["model_variant"]: r["optimization_technique"] for r in rows}
    assert techniques == {"densenet121-eager-fp32": "baseline", "densenet121-onnx-fp32": "onnx"}


def test_plots_tensorboard_traces_and_checkpoints(bench_run: tuple[Path, Path, str, str]) -> None:
    results, tb, _, stderr = bench_run
    for png in ("latency_throughput_by_batch.png", "size_speed_vs_fidelity.png"):
        data = (results / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    for v in VARIANTS:
        assert list((tb / v).glob("events.out.tfevents.*")), f"no TensorBoard events for {v}"
        traces = list((results / "profiles" / v).glob("*.pt.trace.json"))
        assert traces, f"no profiler trace for {v}"
        trace = json.loads(traces[0].read_text())
        assert trace["traceEvents"]
        assert (results / "models" / v / "variant.json").is_file()
    assert "fell back to the CPU" in stderr


def test_tensorboard_scalars_are_readable(bench_run: tuple[Path, Path, str, str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, tb, *_ = bench_run
    acc = EventAccumulator(str(tb / VARIANTS[1]))
    acc.Reload()
    assert {"latency_ms", "throughput_samples_sec"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("latency_ms")] == [1, 2]


def test_summary_table_and_analysis(bench_run: tuple[Path, Path, str, str]) -> None:
    results, _, stdout, _ = bench_run
    assert "eager-fp32" in stdout and "onnx-fp32" in stdout and "latency_ms" in stdout
    analysis = (results / "analysis.md").read_text()
    assert "weights `random`" in analysis and "fastest" in analysis
    readme = (results.parent / "README.md").read_text()
    assert "<!-- bench-results:start -->" in readme and analysis in readme


def test_bad_batch_sizes_are_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "optimize", "bench", "--batch-sizes", "0", "--output-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--batch-sizes" in proc.stderr


def test_decode_bench_writes_a_record_of_every_stage(tmp_path: Path) -> None:
    """benchmarks/decode_bench.py on the CPU (torchvision decodes there too): one record, every stage's key."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/decode_bench.py", "--device", "cpu", "--sizes", "vga", "--batch-sizes", "1,2",
         "--reps", "1", "--results-dir", str(tmp_path), "--name", "decode-test"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (path,) = tmp_path.glob("*-decode-test.json")
    record = json.loads(path.read_text())
    assert {"name", "command", "date", "environ", "metrics"} <= set(record)
    m = record["metrics"]
    for key in ("vga_pil_ms", "vga_b2_nvjpeg_ms", "vga_b2_crop_ms", "vga_b2_prepare_ms", "vga_b2_prepare_host_cpu_ms"):
        assert m[key] > 0, key
    assert "vga_b2_busy_prepare_ms" not in m  # the model-load arm needs CUDA
    bad = subprocess.run([sys.executable, "benchmarks/decode_bench.py", "--batch-sizes", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--batch-sizes must be positive" in bad.stderr


def test_decode_bench_compares_varying_with_fixed_batch_sizes(tmp_path: Path) -> None:
    """--vary-batch: per-photo decode cost of batches of varying size against their mean size (CPU: idle only)."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/decode_bench.py", "--device", "cpu", "--vary-batch", "1-3", "--reps", "3",
         "--call-size", "2", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    m = json.loads(next(tmp_path.glob("*-decode-vary.json")).read_text())["metrics"]
    assert m["vary_batch_min"] == 1 and m["vary_batch_max"] == 3 and 1 <= m["vary_fixed_batch"] <= 3
    for part in ("nvjpeg", "prepare"):
        assert m[f"idle_{part}_varying_ms_per_img"] > 0 and m[f"idle_{part}_fixed_ms_per_img"] > 0
        assert m[f"idle_{part}_varying_vs_fixed"] > 0
    assert m["vary_call_size"] == 2 and m["idle_prepare_calls_varying_ms_per_img"] > 0
    assert not any(k.startswith("side-graph") for k in m)  # the model-load arm needs CUDA
    bad = subprocess.run([sys.executable, "benchmarks/decode_bench.py", "--vary-batch", "9-3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--vary-batch must be LO-HI" in bad.stderr
    bad = subprocess.run([sys.executable, "benchmarks/decode_bench.py", "--vary-batch", "1-3", "--call-size", "-2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--call-size must be >= 0, got -2" in bad.stderr


def test_decode_bench_measures_decoding_processes_at_once(tmp_path: Path) -> None:
    """--processes: K processes decoding at once, their photos per second added up (on a CPU
    torchvision decodes; NVML's JPEG-engine load needs a GPU)."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/decode_bench.py", "--device", "cpu", "--processes", "1,2",
         "--contention-batch", "2", "--window-s", "0.5", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(next(tmp_path.glob("*-decode-processes.json")).read_text())["metrics"]
    assert m["processes_batch"] == 2 and m["processes1_vs_1"] == 1.0
    for key in ("processes1", "processes2"):
        assert m[f"{key}_img_s"] > 0 and m[f"{key}_cpu_per_img_ms"] > 0
    assert len(m["processes2_per_process_img_s"]) == 2
    assert m["processes2_img_s"] == pytest.approx(sum(m["processes2_per_process_img_s"]), abs=0.2)
    bad = subprocess.run([sys.executable, "benchmarks/decode_bench.py", "--processes", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--processes must be positive" in bad.stderr, bad.stderr


def test_decode_bench_times_the_prepare_stage_from_several_threads(tmp_path: Path) -> None:
    """--threads: the server's prepare stage from K threads at once (as K prepare threads would) with each
    --jpeg-decoders decoder, in alternating rounds, idle on a CPU (torchvision decodes there whatever
    the decoder; the model load and NVML's JPEG-engine load need a GPU)."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/decode_bench.py", "--device", "cpu", "--threads", "1,2", "--vary-load", "none",
         "--jpeg-decoders", "nvjpeg,torchvision", "--rounds", "2", "--contention-batch", "4", "--request-images", "2",
         "--window-s", "0.3", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(next(tmp_path.glob("*-decode-threads.json")).read_text())["metrics"]
    assert (m["threads_batch"], m["threads_request_images"], m["threads_load"]) == (4, 2, "none")
    assert m["threads_decoders"] == ["nvjpeg", "torchvision"] and m["threads_rounds"] == 2
    assert m["nvjpeg_t1_vs_first"] == 1.0
    for label in ("nvjpeg_t1", "nvjpeg_t2", "torchvision_t1", "torchvision_t2"):
        assert len(m[f"{label}_img_s_rounds"]) == 2 and min(m[f"{label}_img_s_rounds"]) > 0
        assert m[f"{label}_process_cpu_per_img_ms"] > 0 and m[f"{label}_vs_first"] > 0
        lo, hi = sorted(m[f"{label}_img_s_rounds"])
        assert lo - 0.1 <= m[f"{label}_img_s"] <= hi + 0.1  # the median of the rounds
    for argv, message in (
        (["--threads", "0"], "--threads and --request-images must be positive"),
        (["--threads", "1", "--vary-load", "spin"], "--vary-load: unknown arm 'spin'"),
        (["--device", "cpu", "--threads", "1"], "--threads beside a model load needs a CUDA device"),
        (
            ["--device", "cpu", "--threads", "1", "--vary-load", "none", "--jpeg-decoders", "pil"],
            "--jpeg-decoders must name some of nvjpeg, torchvision",
        ),
    ):
        bad = subprocess.run([sys.executable, "benchmarks/decode_bench.py", *argv], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr


def test_request_anatomy_takes_one_request_apart(artifacts_dir: Path, tmp_path: Path) -> None:
    """benchmarks/request_anatomy.py on the CPU: the whole call, the runner alone, each step, and the
    profiler's heaviest ops (the GPU-busy figures need CUDA)."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/request_anatomy.py", "--model-dir", str(artifacts_dir / "densenet121-eager-fp32"),
         "--device", "cpu", "--reps", "2", "--gap-ms", "0", "--profile-calls", "1", "--results-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    record = json.loads(next(tmp_path.glob("*-request-anatomy.json")).read_text())
    assert {"name", "command", "date", "environ", "metrics"} <= set(record)
    m = record["metrics"]
    assert m["variant"] == "densenet121-eager-fp32" and m["jpeg_kb"] > 0
    for key in (
        "whole_ms",
        "whole_thread_cpu_ms",
        "ondevice_b1_ms",
        "step_nvjpeg_ms",
        "step_crop_ms",
        "step_runner_ms",
    ):
        assert m[key] > 0, key
    assert m["steps_sum_ms"] >= m["step_runner_ms"]
    profile = m["profile"]
    assert profile["calls"] == 1 and profile["top_self_cpu_us_per_call"]
    assert "gpu_busy_pct" not in profile
    bad = subprocess.run([sys.executable, "benchmarks/request_anatomy.py", "--model-dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "holds no variant.json" in bad.stderr


def test_the_run_is_also_a_benchmark_record(bench_run: tuple[Path, Path, str, str]) -> None:
    """bench_record.json: the keys of benchmarks/results records, one unit-suffixed metric per row and column."""
    results, *_ = bench_run
    record = json.loads((results / "bench_record.json").read_text())
    assert {"name", "command", "date", "environ", "metrics"} <= set(record)
    assert record["command"].startswith("python -m optimize bench") and "--batch-sizes 1,2" in record["command"]
    assert record["environ"]["device"] == "cpu" and record["environ"]["torch"]
    m = record["metrics"]
    with (results / "benchmark_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        key = f"{r['model_variant']}_b{r['batch_size']}"
        assert m[f"{key}_ms"] == pytest.approx(float(r["latency_ms"]))
        assert m[f"{key}_img_s"] == pytest.approx(float(r["throughput_samples_sec"]))
        assert f"{key}_device_ms" not in m  # forward-only timing needs CUDA: absent, not made up


def test_graph_runners_are_captured_before_they_are_timed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runner that serves from CUDA graphs is warmed up (graphs captured) before its first timed call,
    as the server does before it reports ready; a runner without graphs is timed as loaded."""
    import torch

    from model_server import runtimes
    from optimize.bench import BenchConfig, bench_variant

    calls: list[str] = []

    class FakeRunner:
        def __init__(self, graphs: bool) -> None:
            self.cuda_graphs = graphs

        def warm_up(self) -> None:
            calls.append("warm_up")

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            calls.append("call")
            return torch.zeros((x.shape[0], 1000))

    manifest = {"slug": "fake", "technique": "baseline", "precision": "fp32", "runtime": "torch-eager", "meta": {}}
    cfg = BenchConfig(batch_sizes=[1], device=torch.device("cpu"), output_dir=tmp_path, tensorboard_dir=tmp_path,
                      warmup=1, min_iters=1, max_iters=1, min_time_s=0, profile=False)  # fmt: skip
    for graphs, first in ((True, "warm_up"), (False, "call")):
        calls.clear()
        monkeypatch.setattr(runtimes, "load_runner", lambda *_a, g=graphs: FakeRunner(g))
        rows = bench_variant(manifest, tmp_path, cfg)
        assert calls[0] == first and calls.count("warm_up") == (1 if graphs else 0)
        assert rows[0]["latency_ms"] > 0


def test_readme_block_is_found_by_its_marker_lines_not_by_prose_quoting_them(tmp_path: Path) -> None:
    """A README that mentions `<!-- bench-results:start -->` in its text keeps that text; only the block
    between the marker lines is rewritten, and a file without the block gets it appended."""
    from optimize.bench import update_readme_section

    readme = tmp_path / "README.md"
    prose = "`--readme` rewrites the block between the `<!-- bench-results:start -->` markers.\n"
    readme.write_text(
        f"# T\n\n{prose}\nmiddle\n\n<!-- bench-results:start -->\nold\n<!-- bench-results:end -->\ntail\n"
    )
    update_readme_section(readme, "new table\n")
    assert readme.read_text() == (
        f"# T\n\n{prose}\nmiddle\n\n<!-- bench-results:start -->\nnew table\n<!-- bench-results:end -->\ntail\n"
    )
    bare = tmp_path / "BARE.md"
    bare.write_text(prose)
    update_readme_section(bare, "t\n")
    assert bare.read_text() == f"{prose}\n<!-- bench-results:start -->\nt\n<!-- bench-results:end -->\n"


def test_blockbuf_bench_checks_the_rewrite_and_writes_a_record(tmp_path: Path) -> None:
    """benchmarks/blockbuf_bench.py on the CPU, eager: both forwards give the same logits, one record."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/blockbuf_bench.py", "--device", "cpu", "--batch-sizes", "1", "--no-compile",
         "--iters", "1", "--results-dir", str(tmp_path), "--name", "bb-test", "--arms", "fused,stock,blockbuf",
         "--profile-dir", str(tmp_path / "prof")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("*-bb-test.json")
    record = json.loads(path.read_text())
    assert record["command"].startswith("python benchmarks/blockbuf_bench.py --device cpu")
    m = record["metrics"]
    assert m["eager_max_abs_logit_diff_logits"] == 0.0 and m["b1_max_abs_logit_diff_logits"] == 0.0
    assert m["stock_b1_ms"] > 0 and m["blockbuf_b1_ms"] > 0 and m["blockbuf_vs_stock_b1_ratio"] > 0
    # The fused arm (PyTorch's arithmetic for the fused kernel on a CPU, transitions pooling first).
    assert m["fused_b1_max_abs_logit_diff_logits"] < 1e-4 and m["fused_vs_stock_b1_ratio"] > 0
    assert sorted(p.name for p in (tmp_path / "prof").iterdir()) == [
        "blockbuf_b1.pt.trace.json", "fused_b1.pt.trace.json", "stock_b1.pt.trace.json"]  # fmt: skip
    bad = subprocess.run([sys.executable, "benchmarks/blockbuf_bench.py", "--batch-sizes", "0"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--batch-sizes must be positive" in bad.stderr
    for arms in ("stock,fast", "blockbuf,fused"):
        bad = subprocess.run([sys.executable, "benchmarks/blockbuf_bench.py", "--arms", arms], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert bad.returncode == 2 and "--arms" in bad.stderr and "fused32" in bad.stderr, bad.stderr


def test_gpu_bench_times_a_pruned_variant_and_its_base_in_alternating_rounds(tmp_path: Path) -> None:
    """benchmarks/gpu_bench.py on the CPU: with ``--pair-rounds`` the pruned variant and its base
    (both built and checked as always) stay loaded and are timed alternately, one speed-up a round;
    the target check takes the rounds' median over the two sequential timings."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_bench.py", "--device", "cpu", "--variants",
         "densenet121-eager-fp32,densenet121-pruned-channels-30", "--batch-sizes", "1", "--skip-stock", "--iters", "1",
         "--pair-rounds", "3", "--out-dir", str(tmp_path), "--name", "pairs"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = tmp_path.glob("*-pairs.json")
    m = json.loads(path.read_text())["metrics"]
    rounds = m["pruned_channels_b1_paired_speedups"]
    assert len(rounds) == 3 and all(r > 0 for r in rounds)
    assert m["pruned_channels_b1_paired_speedup_median"] == sorted(rounds)[1]
    assert m["densenet121-pruned-channels-30_b1_ms"] > 0 and m["densenet121-eager-fp32_b1_ms"] > 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_bench

    metrics = {"densenet121-pruned-channels-30_b32_img_s": 130.0, "densenet121-eager-fp32_b32_img_s": 100.0,
               "pruned_channels_b32_paired_speedups": [1.1, 1.25, 1.22, 1.19, 1.21],
               "pruned_channels_b32_paired_speedup_median": 1.21}  # fmt: skip
    check = gpu_bench.target_checks(metrics, [], [1, 32])["pruned_channels_b32_speedup"]
    assert check == {"variant": "densenet121-pruned-channels-30", "base": "densenet121-eager-fp32", "x_base": 1.21,
                     "x_base_sequential": 1.3, "rounds": 5, "min": 1.1, "max": 1.25, "meets_1_2x": True}  # fmt: skip
    bad = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--pair-rounds", "-1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "--pair-rounds must be >= 0, got -1" in bad.stderr


def test_kernel_bench_reads_tile_configurations_and_needs_a_gpu() -> None:
    """benchmarks/kernel_bench.py: ``MxKwWsS`` configurations, bad ones named; on a CPU it says why it cannot run."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import kernel_bench

    assert kernel_bench.parse_config("64x32w4s4") == (64, 32, 4, 4, 0)
    assert kernel_bench.parse_config("32x64w4s3t128") == (32, 64, 4, 3, 128)
    for bad in ("64x32", "48x64w4s3", "8x64w4s3"):
        with pytest.raises(ValueError, match=bad):
            kernel_bench.parse_config(bad)
    proc = subprocess.run([sys.executable, "benchmarks/kernel_bench.py", "--configs", "64x32w4s4,1x1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "'1x1' is not MxKwWsS" in proc.stderr
    if not __import__("torch").cuda.is_available():
        proc = subprocess.run([sys.executable, "benchmarks/kernel_bench.py"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_a_rerun_replaces_the_variants_profiler_trace(tmp_path: Path) -> None:
    """profile_runner into a folder that already holds a trace leaves exactly one, the new one."""
    import torch

    from optimize.bench import profile_runner

    stale = tmp_path / "old-host_1.123.pt.trace.json"
    stale.write_text("{}")
    trace = profile_runner(lambda x: x.float().mean(), 1, tmp_path, torch.device("cpu"))
    assert trace is not None and list(tmp_path.glob("*.pt.trace.json")) == [trace]
    assert json.loads(trace.read_text())["traceEvents"]


def test_util_sampler_reports_cpu_for_a_window_shorter_than_one_interval() -> None:
    """A timed window the sampler thread never woke in still gets CPU % (from the process's CPU
    times over the window) and RSS, not an empty CSV cell."""
    import torch

    from optimize.bench import UtilSampler

    with UtilSampler(torch.device("cpu"), interval_s=60) as s:
        end = time.perf_counter() + 0.2
        while time.perf_counter() < end:  # busy: one core's worth of CPU
            pass
    assert len(s.cpu) == 1 and len(s.rss) == 1
    assert 0 < s.cpu[0] <= 100 and s.rss[0] > 50


def test_nvjpeg_probe_arms_become_unit_suffixed_record_metrics() -> None:
    """benchmarks/nvjpeg_context_probe.py (GPU only) writes its arms through records.write_record:
    ``<arm>_<figure>`` with the unit in the name, the engine's utilisation as a percentage, an arm's
    errors only when there were some."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import nvjpeg_context_probe

    out = {"batch": 128, "window_s": 3.0, "arms": {
        "model_alone": {"model_replays_per_s": 190.8},
        "shared_x1_pinned_beside_model": {"jpegs_per_s": 22058.9, "per_decoder_batches": [552], "errors": [],
                                          "jpeg_engine_util_median": 90.5, "model_replays_per_s": 184.4},
        "own_ctx_x2_alone": {"jpegs_per_s": 0.0, "per_decoder_batches": [0, 0], "errors": ["RuntimeError: x"]},
    }}  # fmt: skip
    assert nvjpeg_context_probe.flat_metrics(out) == {
        "batch_images": 128, "window_s": 3.0, "model_alone_model_replays_per_s": 190.8,
        "shared_x1_pinned_beside_model_jpegs_per_s": 22058.9, "shared_x1_pinned_beside_model_decoder_batches": [552],
        "shared_x1_pinned_beside_model_jpeg_engine_util_pct": 90.5,
        "shared_x1_pinned_beside_model_model_replays_per_s": 184.4,
        "own_ctx_x2_alone_jpegs_per_s": 0.0, "own_ctx_x2_alone_decoder_batches": [0, 0],
        "own_ctx_x2_alone_errors": ["RuntimeError: x"],
    }  # fmt: skip


class _StandInNvml:
    """pynvml's calls GpuCounters makes, answering fixed values (the video clock falling between
    samples, the JPEG engines' utilisation unsupported), for the aggregation; the GPU runs use NVML."""

    def __init__(self) -> None:
        self.video = [1755, 1200]

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetClockInfo(self, h: str, clock: int) -> int:
        return 1980 if clock == 1 else self.video.pop(0)

    def nvmlDeviceGetPowerUsage(self, h: str) -> int:
        return 650_000

    def nvmlDeviceGetTemperature(self, h: str, sensor: int) -> int:
        return 61

    def nvmlDeviceGetUtilizationRates(self, h: str) -> object:
        return type("Util", (), {"gpu": 97})()

    def nvmlDeviceGetJpgUtilization(self, h: str) -> tuple[int, int]:
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: str) -> int:
        return 0x4 | 0x1000


def test_gpu_counters_summarise_a_window_and_name_the_clock_reasons() -> None:
    """benchmarks/gpu_counters.py: each counter's mean/min/max over the samples, a counter NVML does not
    answer left out, the clock-event reason bits named (an unknown bit as hex); no NVML: an empty summary."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_counters import GpuCounters, reason_names

    gpu = GpuCounters(nvml=_StandInNvml())
    gpu.sample()
    gpu.sample()
    s = gpu.summary()
    assert s["samples"] == 2
    assert (s["video_clock_mhz_mean"], s["video_clock_mhz_min"], s["video_clock_mhz_max"]) == (1477.5, 1200, 1755)
    assert s["sm_clock_mhz_mean"] == 1980 and s["power_w_max"] == 650.0 and s["temperature_c_max"] == 61
    assert s["gpu_util_pct_mean"] == 97 and not any(k.startswith("jpeg_util") for k in s)
    assert s["clock_event_reasons"] == ["sw_power_cap", "0x1000"]
    assert reason_names(0x41) == ["gpu_idle", "hw_thermal_slowdown"] and reason_names(0) == []
    none = GpuCounters(nvml=object())  # no nvmlInit: as on a machine without NVML
    with none:
        time.sleep(0.01)
    assert none.summary() == {} and not none.samples


def test_host_speed_probes_the_interpreter_memory_and_cpu_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """records.host_speed: each probe the best of its repeats, in its unit; slower probes read larger."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import records

    speed = records.host_speed(repeats=2)
    assert set(speed) == {"python_loop_ms", "memcpy_gb_s", "pil_decode_vga_ms"}
    assert 0 < speed["python_loop_ms"] < 5_000 and 0 < speed["pil_decode_vga_ms"] < 5_000
    assert speed["memcpy_gb_s"] > 0.01
    # a clock that advances 1 s per reading pair: every probe reads exactly 1 s (best of equal times)
    ticks = iter(range(10_000))
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))
    slow = records.host_speed(repeats=3)
    assert slow["python_loop_ms"] == 1000.0 and slow["pil_decode_vga_ms"] == 1000.0
    assert slow["memcpy_gb_s"] == round((64 << 20) / 1e9, 2)


def test_speed_drift_reads_positive_when_the_host_got_slower_for_times_and_rates_alike() -> None:
    """records.speed_drift_pct: a probe slower at the end reads positive, whether it is a time (larger)
    or a rate (smaller); a probe missing or zero on either side is left out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import records

    before = {"python_loop_ms": 34.5, "memcpy_gb_s": 9.0, "pil_decode_vga_ms": 5.0}
    after = {"python_loop_ms": 62.1, "memcpy_gb_s": 6.0, "pil_decode_vga_ms": 5.0}
    assert records.speed_drift_pct(before, after) == {
        "python_loop_ms": 80.0,
        "memcpy_gb_s": 50.0,
        "pil_decode_vga_ms": 0.0,
    }
    assert records.speed_drift_pct(after, before)["python_loop_ms"] == -44.4  # faster after
    assert records.speed_drift_pct(before, {"python_loop_ms": 0.0}) == {}


def test_a_serving_record_names_the_serving_stacks_versions_and_the_host_cpu() -> None:
    """A serving record's ``environ``: every package of the predictor's and Locust's stack with its
    installed version (None where absent), and the host CPU's model (hosts of one GPU kind differ)."""
    from importlib import metadata

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import serve_bench

    from optimize.build import environment

    env = environment(torch.device("cpu"), packages=serve_bench.SERVING_PACKAGES)
    for name in ("kserve", "uvicorn", "fastapi", "orjson", "locust", "gevent"):
        assert env[name] == metadata.version(name)
    assert set(serve_bench.SERVING_PACKAGES) <= set(env)
    assert isinstance(env["host_cpu_model"], str) and env["host_cpu_model"]
