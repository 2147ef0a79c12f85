"""The serving benchmark's interleaved comparison: its arithmetic, its flags, and one real short run on the CPU."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_serve_bench() -> ModuleType:
    # A script, not a package module: loaded from its path (it never imports kserve).
    spec = importlib.util.spec_from_file_location("serve_bench", ROOT / "benchmarks" / "serve_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sb = _load_serve_bench()


def _runs(*img_s: float) -> list[dict[str, Any]]:
    return [
        {"img_s": v, "p50_ms": 10.0 + i, "p99_ms": 20.0 + i, "failures": 0, "server": {}, "ready_s": 1.0}
        for i, v in enumerate(img_s)
    ]


def test_arms_alternate_pair_by_pair_every_other_pair_reversed() -> None:
    assert sb.interleaved_order(["a", "b"], 2) == [(1, "base"), (1, "a"), (1, "b"), (2, "b"), (2, "a"), (2, "base")]
    assert sb.interleaved_order(["metrics_off"], 1) == [(1, "base"), (1, "metrics_off")]


def test_spread_is_range_over_median_and_needs_two_runs() -> None:
    assert sb.spread_pct([90.0, 100.0, 110.0]) == 20.0
    assert sb.spread_pct([100.0]) is None
    assert sb.spread_pct([0.0, 0.0]) is None


def test_compared_arm_gets_ratio_of_medians_and_pair_ratios() -> None:
    arms = sb.compare_arms({"base": _runs(100.0, 110.0, 90.0), "x": _runs(95.0, 99.0, 90.0)})
    base, x = arms["base"], arms["x"]
    assert base["img_s"] == [100.0, 110.0, 90.0] and base["p50_ms"] == [10.0, 11.0, 12.0]
    assert (base["img_s_median"], base["img_s_min"], base["img_s_max"]) == (100.0, 90.0, 110.0)
    assert base["img_s_spread_pct"] == 20.0 and base["p99_ms_median"] == 21.0
    assert base["ready_s"] == [1.0, 1.0, 1.0] and len(base["server"]) == 3
    assert "ratio_vs_base" not in base
    assert x["ratio_vs_base"] == 0.95
    assert x["pair_ratios"] == [0.95, 0.9, 1.0]
    assert (x["pair_ratio_min"], x["pair_ratio_max"]) == (0.9, 1.0)


def test_no_ratio_against_a_base_that_answered_nothing() -> None:
    arms = sb.compare_arms({"base": _runs(0.0), "x": _runs(5.0)})
    assert "ratio_vs_base" not in arms["x"] and "pair_ratios" not in arms["x"]
    assert "img_s_spread_pct" not in arms["x"]  # one run: no noise estimate, rather than a zero


def test_metrics_overhead_from_medians_with_per_pair_figures_and_noise() -> None:
    arms = sb.compare_arms({"base": _runs(97.0, 95.0, 99.0), "metrics_off": _runs(100.0, 100.0, 98.0)})
    figures = sb.metrics_overhead(arms)
    assert figures["metrics_on_img_s"] == 97.0 and figures["metrics_off_img_s"] == 100.0
    assert figures["metrics_overhead_pct"] == 3.0  # positive: the metrics cost throughput
    assert [r["overhead_pct"] for r in figures["metrics_overhead_runs"]] == [3.0, 5.0, -1.02]
    assert figures["metrics_overhead_noise_pct"] == round(4 / 97 * 100, 2)
    line = sb.overhead_line(figures)
    assert line.startswith("metrics overhead: +3.00 % of throughput")
    assert "not resolved" in line  # 4 % noise cannot tell 3 % from 0


def test_overhead_line_says_within_when_the_noise_allows_it() -> None:
    arms = sb.compare_arms({"base": _runs(99.0, 99.5), "metrics_off": _runs(100.0, 100.0)})
    line = sb.overhead_line(sb.metrics_overhead(arms))
    assert "within the 3 % target" in line
    one_pair = sb.metrics_overhead(sb.compare_arms({"base": _runs(99.0), "metrics_off": _runs(100.0)}))
    assert "metrics_overhead_noise_pct" not in one_pair
    assert "noise unknown with one pair" in sb.overhead_line(one_pair)


def test_ratios_only_from_figures_that_were_measured() -> None:
    assert sb.compute_ratios({}) == {}
    assert sb.compute_ratios({"ready_s": 2.0, "floor_ready_s": 1.0, "first_request_ms": 30.0}) == {
        "ready_vs_floor": 2.0
    }
    assert sb.compute_ratios({"ready_s": 2.0, "floor_ready_s": 0.0, "ondevice_img_s": None}) == {}
    full = {
        "e2e_batched_img_s": 500.0,
        "ondevice_img_s": 1000.0,
        "ready_s": 13.0,
        "floor_ready_s": 10.0,
        "e2e_c1_p50_ms": 5.0,
        "ondevice_b1_ms": 2.0,
        "first_request_ms": 10.0,
    }
    assert sb.compute_ratios(full) == {
        "batched_vs_ondevice": 0.5,
        "ready_vs_floor": 1.3,
        "c1_p50_minus_ondevice_b1_ms": 3.0,
        "first_request_vs_c1_p50": 2.0,
    }
    exact = sb.compute_ratios({**full, "e2e_c1_p50_exact_ms": 4.0})
    assert exact["c1_p50_exact_minus_ondevice_b1_ms"] == 2.0 and exact["first_request_vs_c1_p50_exact"] == 2.5


def test_phases_and_compare_flags_parse() -> None:
    assert sb.parse_phases(None) == list(sb.PHASES)
    assert sb.parse_phases("compare, single") == ["single", "compare"]
    with pytest.raises(ValueError, match="unknown bogus"):
        sb.parse_phases("single,bogus")
    assert sb.parse_compare(["gil1ms=--gil_switch_interval_ms 1", 'q=--x "a b"'], metrics_overhead=True) == {
        "gil1ms": ["--gil_switch_interval_ms", "1"],
        "q": ["--x", "a b"],
        "metrics_off": ["--metrics", "false"],
    }
    assert sb.parse_compare(["metrics_off=--metrics false --frontends 2"], metrics_overhead=True) == {
        "metrics_off": ["--metrics", "false", "--frontends", "2"]
    }
    for bad in (["x"], ["=--a"], ["base=--a"], ["a=", "a=--b"], ["a/b=--c"]):
        with pytest.raises(ValueError):
            sb.parse_compare(bad, metrics_overhead=False)


def test_best_concurrency_falls_back_to_the_top_level() -> None:
    assert sb.load_users({"e2e_single_best_users": 64}, [1, 64, 128]) == 64
    assert sb.load_users({}, [1, 64, 128]) == 128
    assert sb.load_users({"e2e_single_best_users": 64}, [1, 64, 128], 32) == 32


def test_batched_figures_are_medians_of_the_rounds_at_the_best_concurrency() -> None:
    one = sb.batched_summary([{"img_s": 900.04, "p99_ms": 70}], 16)
    assert one == {"e2e_batched_img_s": 900.0, "e2e_batched_p99_ms": 70, "e2e_batched_users": 16}
    three = sb.batched_summary([{"img_s": 1000.0, "p99_ms": 60}, {"img_s": 800.0, "p99_ms": 90},
                                {"img_s": 1200.0, "p99_ms": 70}], 8)  # fmt: skip
    assert three["e2e_batched_img_s"] == 1000.0 and three["e2e_batched_p99_ms"] == 70
    assert three["e2e_batched_rounds_img_s"] == [1000.0, 800.0, 1200.0]
    assert three["e2e_batched_spread_pct"] == pytest.approx(40.0) and three["e2e_batched_users"] == 8


def test_batched_rounds_on_the_cpu(artifacts_dir: Path, tmp_path: Path) -> None:
    """A real batched run in two rounds: the sweep's run at the best concurrency and one more, the
    headline their median, every round kept."""
    cmd = [
        sys.executable, "benchmarks/serve_bench.py", "--model-dir", str(artifacts_dir / "densenet121-eager-fp32"),
        "--device", "cpu", "--phases", "batched", "--batched-concurrency", "1", "--batch-images", "2",
        "--batched-rounds", "2", "--duration", "2", "--processes", "1", "--sizes", "vga",
        "--server-args", "--max_batch_size 2 --max_delay_ms 1 --log_level WARNING",
        "--results-dir", str(tmp_path), "--name", "cpu-rounds",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    record = json.loads(next(tmp_path.glob("*-cpu-rounds.json")).read_text())
    metrics = record["metrics"]
    # the host's speed, probed before any load, so records from machines naming one CPU model differ
    assert set(record["environ"]["host_speed"]) == {"python_loop_ms", "memcpy_gb_s", "pil_decode_vga_ms"}
    assert min(record["environ"]["host_speed"].values()) > 0
    # and after the loads, with the drift between the two (how much slower the host got within the run)
    assert set(record["environ"]["host_speed_after"]) == set(record["environ"]["host_speed"])
    assert set(record["environ"]["host_speed_drift_pct"]) == set(record["environ"]["host_speed"])
    rounds = metrics["e2e_batched_rounds_img_s"]
    assert len(rounds) == 2 and min(rounds) > 0 and metrics["e2e_batched_users"] == 1
    assert rounds[0] == round(metrics["batched_runs"]["c1"]["img_s"], 1) and len(metrics["batched_rounds"]) == 1
    assert metrics["e2e_batched_img_s"] == pytest.approx(sum(rounds) / 2, abs=0.1)
    assert metrics["e2e_batched_spread_pct"] >= 0 and metrics["failures_total"] == 0
    assert "batched c=1 round 2:" in out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--phases", "single", "--metrics-overhead"],  # a comparison asked for, its phase left out
        ["--phases", "single,compare"],  # the compare phase with nothing to compare
        ["--metrics-overhead", "--pairs", "0"],
        ["--metrics-overhead", "--compare-images", "0"],
        ["--roles-images", "0"],
        ["--phases", "warp"],
        ["--compare", "no-equals-sign"],
        ["--phases", "single", "--trace-batches", "5"],  # a trace is taken in the cpu-roles run only
        ["--server-root", "/"],  # no model_server package there
        ["--batched-rounds", "0"],
        ["--server-cpus", "0-a"],
        ["--locust-cpus", "100000"],  # not a CPU this process may run on
        ["--toggle-blocks", "12,24"],  # one per level, but no levels named
        ["--toggle-users", "1,128", "--toggle-window-s", "1.5,0.5,1"],  # three windows for two levels
        ["--toggle-guard-s", "2"],  # not below the window
        ["--toggle-blocks", "0"],
    ],
)
def test_unusable_flags_exit_2_before_any_work(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        sb.main(["--model-dir", str(tmp_path / "absent"), *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_toggle_plans_give_every_level_one_value_or_its_own() -> None:
    """``--toggle-blocks``/``-window-s``/``-guard-s``: one value for every level, or one per
    ``--toggle-users`` level (1.5 s windows at concurrency 1, 0.5 s at 128 users); errors name the flag."""
    same = sb.toggle_plans("12", "1.5", "0.25", [])
    assert same(1) == same(128) == sb.TogglePlan(12, 1.5, 0.25)
    own = sb.toggle_plans("24,60", "1.5,0.5", "0.1", [1, 128])
    assert own(1) == sb.TogglePlan(24, 1.5, 0.1) and own(128) == sb.TogglePlan(60, 0.5, 0.1)
    with pytest.raises(ValueError, match=r"--toggle-window-s lists 3 values for 2 --toggle-users levels \(1, 128\)"):
        sb.toggle_plans("12", "1.5,0.5,1", "0.1", [1, 128])
    with pytest.raises(ValueError, match=r"--toggle-guard-s must be >= 0 and below --toggle-window-s \(0.5\), got 0.6"):
        sb.toggle_plans("12", "1.5,0.5", "0.6", [1, 128])
    with pytest.raises(ValueError, match="--toggle-blocks must be a number or a comma list of them, got 'x'"):
        sb.toggle_plans("x", "1.5", "0.25", [1])


def test_cpu_lists_parse_as_taskset_takes_them_and_pin_children() -> None:
    """``--server-cpus``/``--locust-cpus``: a Linux CPU list, only CPUs this process may use; a child
    started with the role's ``preexec_fn`` runs on exactly those CPUs."""
    allowed = sorted(os.sched_getaffinity(0))
    assert sb.parse_cpus(f"{allowed[0]}") == {allowed[0]}
    assert sb.parse_cpus(f"{allowed[0]}-{allowed[0]}," + ",".join(map(str, allowed))) == set(allowed)
    for bad in ("", "a", "3-1", "-1", "0,,1"):
        with pytest.raises(ValueError, match="is not a CPU list"):
            sb.parse_cpus(bad)
    with pytest.raises(ValueError, match="may not run on"):
        sb.parse_cpus(str(max(allowed) + 1000))
    assert sb._pinned("locust") is None  # no placement asked: any CPU
    sb.PLACEMENT["locust"] = {allowed[-1]}
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            capture_output=True, text=True, check=True, preexec_fn=sb._pinned("locust"),
        )  # fmt: skip
    finally:
        sb.PLACEMENT["locust"] = None
    assert out.stdout.strip() == str([allowed[-1]])


def test_startup_summary_takes_medians_and_ratios_within_pairs() -> None:
    pairs = [
        {"floor_s": 4.0, "ready_s": 5.0, "ratio": 1.25},
        {"floor_s": 5.0, "ready_s": 7.0, "ratio": 1.4},
        {"floor_s": 3.0, "ready_s": 3.6, "ratio": 1.2},
    ]
    out = sb.startup_summary(pairs)
    assert out["floor_s_median"] == 4.0 and out["ready_s_median"] == 5.0
    assert out["ready_vs_floor_median"] == 1.25  # the median of the ratios, not a ratio of medians
    assert out["ready_vs_floor_range"] == [1.2, 1.4] and out["pairs"] == pairs
    assert sb.compute_ratios({"startup": out})["ready_vs_floor_startup_median"] == 1.25
    assert "ready_vs_floor_median" not in sb.startup_summary([])


def test_startup_phase_alternates_floor_and_server_on_the_cpu(artifacts_dir: Path, tmp_path: Path) -> None:
    cmd = [
        sys.executable, "benchmarks/serve_bench.py", "--model-dir", str(artifacts_dir / "densenet121-eager-fp32"),
        "--device", "cpu", "--phases", "startup", "--startup-pairs", "1", "--concurrency", "1", "--sizes", "vga",
        "--server-args", "--max_batch_size 1 --log_level WARNING", "--results-dir", str(tmp_path), "--name", "cpu-startup",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    (path,) = tmp_path.glob("*-cpu-startup.json")
    metrics = json.loads(path.read_text())["metrics"]
    (pair,) = metrics["startup"]["pairs"]
    assert pair["floor_s"] > 0 and pair["ready_s"] > 0
    assert metrics["ratios"]["ready_vs_floor_startup_median"] == pytest.approx(
        pair["ready_s"] / pair["floor_s"], abs=2e-3
    )


def test_single_and_compare_phases_on_the_cpu(artifacts_dir: Path, tmp_path: Path) -> None:
    """A real run, as short as a CPU allows: one server for the single-image load, two fresh ones to compare."""
    cmd = [
        sys.executable,
        "benchmarks/serve_bench.py",
        "--model-dir",
        str(artifacts_dir / "densenet121-eager-fp32"),
        "--device",
        "cpu",
        "--phases",
        "single,metrics-toggle,compare",
        "--toggle-users",
        "1",
        "--toggle-blocks",
        "2",
        "--toggle-window-s",
        "1",
        "--toggle-guard-s",
        "0.3",
        "--pairs",
        "1",
        "--compare",
        "x=--metrics false",
        "--concurrency",
        "1",
        "--duration",
        "2",
        "--processes",
        "1",
        "--sizes",
        "vga",
        "--server-args",
        "--max_batch_size 1 --max_delay_ms 1 --log_level WARNING",
        "--results-dir",
        str(tmp_path),
        "--name",
        "cpu-compare",
    ]
    kept = tmp_path / "out"  # $OUT: where a lent machine's files come back from
    kept.mkdir()
    env = {**os.environ, "OUT": str(kept)}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    # Every server's log is kept: the single-image one and each compared arm's run.
    logs = {p.name for p in kept.glob("*-server.log")}
    assert {"cpu-compare-server.log", "cpu-compare-cmp-base-1-server.log", "cpu-compare-cmp-x-1-server.log"} <= logs
    (path,) = tmp_path.glob("*-cpu-compare.json")
    record = json.loads(path.read_text())
    assert record["phases"] == ["single", "metrics-toggle", "compare"]
    metrics = record["metrics"]
    assert metrics["e2e_single_img_s"] > 0 and metrics["e2e_single_best_users"] == 1
    # Every answered request's own time came back from Locust (which rounds below 100 ms to whole ms),
    # as many as Locust's final totals count (its CSV, rewritten every few seconds, can miss the last).
    c1 = metrics["runs"]["c1"]
    assert c1["exact_samples"] == c1["requests"] - c1["failures"] > 0
    assert metrics["e2e_c1_p50_exact_ms"] == c1["p50_exact_ms"]
    # Locust rounds to whole ms below 100 ms and to 10 ms from 100 ms (a busy CPU gets there).
    rounding = 1.0 if c1["p50_ms"] < 100 else 10.0
    assert abs(c1["p50_exact_ms"] - c1["p50_ms"]) <= rounding and c1["p50_exact_ms"] <= c1["p99_exact_ms"]

    # The metrics paused and resumed inside the one server, in blocks of windows of its continuous load.
    toggle = metrics["metrics_toggle"]["c1"]
    assert [w["on"] for w in toggle["windows"]] == [True, False, False, True] * 2
    assert all(w["requests"] > 0 and w["img_s"] > 0 and w["p50_ms"] > 0 for w in toggle["windows"])
    assert [e["block"] for e in toggle["block_effects"]] == [1, 2] and toggle["failures"] == 0
    cost = toggle["throughput_cost_pct"]
    assert cost["n"] == 2 and cost["ci95_low"] <= cost["mean"] <= cost["ci95_high"]
    assert metrics["metrics_toggle_throughput_cost_pct"] == cost["mean"] and metrics["metrics_toggle_users"] == 1
    assert toggle["throughput_cost_verdict"].startswith(("within", "above", "not resolved"))
    assert "metrics toggled in one server at 1 users, 2 blocks of 4 windows of 1 s" in out.stdout

    compare = metrics["compare"]
    assert compare["users"] == 1 and compare["pairs"] == 1 and compare["order"] == ["base", "x"]
    assert compare["server_args"]["x"].endswith("--metrics false")
    for arm in compare["arms"].values():
        assert len(arm["img_s"]) == len(arm["p50_ms"]) == len(arm["p99_ms"]) == len(arm["server"]) == 1
        assert arm["img_s_median"] == arm["img_s"][0] > 0 and arm["failures"] == [0]
        assert arm["p50_exact_ms_median"] == arm["p50_exact_ms"][0] > 0
        assert len(arm["startup_log"]) == 1 and isinstance(arm["startup_log"][0], list)
    assert compare["arms"]["base"]["server"][0]["device_mean_ms"] > 0  # the breakdown of the run, from /metrics
    # Mid-run connection split per server process (empty where the host does not list sockets).
    for split in (s for arm in compare["arms"].values() for s in arm["frontend_connections"]):
        assert isinstance(split, list) and all(isinstance(n, int) and n > 0 for n in split)
    x = compare["arms"]["x"]
    assert x["ratio_vs_base"] == pytest.approx(x["img_s_median"] / compare["arms"]["base"]["img_s_median"], abs=1e-3)

    for absent in (
        "ondevice_img_s",
        "ondevice_b1_ms",
        "floor_ready_s",
        "e2e_batched_img_s",
        "batched_runs",
        "cpu_at_best_concurrency",
        "e2e_single_12mp_img_s",
        "metrics_overhead_pct",
    ):
        assert absent not in metrics, absent
    assert set(metrics["ratios"]) <= {"first_request_vs_c1_p50", "first_request_vs_c1_p50_exact"}
    assert "first_request_vs_c1_p50" in metrics["ratios"]
    assert metrics["first_request_ms"] > 0 and metrics["first_request_repeat_p50_ms"] > 0  # sent as the load sends
    # the first request's server-side stages (from /metrics) beside the repeats' means, in the same keys
    first, repeat = metrics["first_request_stages"], metrics["first_request_repeat_stages"]
    assert first["request_mean_ms"] > 0 and first["device_mean_ms"] > 0 and first["batch_size_mean"] == 1
    assert set(first) == set(repeat) and repeat["request_mean_ms"] > 0
    assert "compare x vs base at 1 users, 1 pairs:" in out.stdout
    assert "pair 1/1 x" in out.stderr


def test_the_floor_loads_a_state_dict_and_builds_the_model_for_other_payloads(tmp_path: Path) -> None:
    """The bare-torch floor loads ``model.pt`` when it is a DenseNet-121 state dict; AOTInductor
    artifacts (no ``model.pt``) and other payloads get the model built instead, and the record says which."""
    import torchvision

    plain, aoti, other = (tmp_path / n for n in ("plain", "aoti", "other"))
    for d in (plain, aoti, other):
        d.mkdir()
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), plain / "model.pt")
    torch.save({"not": torch.zeros(1)}, other / "model.pt")
    seconds, how = sb.floor_ready(plain, torch.device("cpu"))
    assert seconds > 0 and how == "loaded model.pt"
    assert sb.floor_ready(aoti, torch.device("cpu"))[1] == "constructed: the artifact has no model.pt"
    assert sb.floor_ready(other, torch.device("cpu"))[1].startswith("constructed: model.pt is not a DenseNet-121")
    # An AOTInductor artifact: the floor loads its package with torch's C++ loader (no torchvision), as the
    # server does; a package that does not load falls back to building the model, and says why.
    (aoti / "model-b1-4.pt2").write_bytes(b"not a zip")
    payload = {"bucket_1": "model-b1-4.pt2", "bucket_4": "model-b1-4.pt2", "model": "model-b1-4.pt2"}
    (aoti / "variant.json").write_text(json.dumps({"runtime": "aoti", "payload": payload}))
    assert sb.floor_ready(aoti, torch.device("cpu"))[1].startswith("constructed: the AOTInductor package did not load")


def test_a_profiler_trace_is_captured_under_load_on_the_cpu(artifacts_dir: Path, tmp_path: Path) -> None:
    """--trace-batches: the in-pod profiler (admin token given to the server through its environment)
    traces batches while the cpu-roles load runs; the trace lands next to the record."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = [
        sys.executable, "benchmarks/serve_bench.py", "--model-dir", str(artifacts_dir / "densenet121-eager-fp32"),
        "--device", "cpu", "--phases", "cpu-roles", "--trace-batches", "2", "--concurrency", "2",
        "--duration", "2", "--processes", "1", "--sizes", "vga",
        "--server-args", "--max_batch_size 2 --log_level WARNING", "--results-dir", str(tmp_path), "--name", "trace",
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OUT": str(out_dir)})  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    record = json.loads(next(tmp_path.glob("*-trace.json")).read_text())
    trace = record["metrics"]["profiler_trace"]
    assert trace.get("file") == "trace-trace.json.gz" and trace["bytes"] > 0, trace
    events = json.loads(gzip.decompress((out_dir / "trace-trace.json.gz").read_bytes()))["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)  # the model's ops are in it
    assert trace["summary"]["gpu_events"] == 0 and "CPU run" in trace["summary"]["note"]  # no GPU here
    assert "DENSENET_ADMIN_TOKEN" not in record["server_command"] and "--admin_token" not in record["server_command"]


def test_throughput_within_the_latency_objective_is_the_best_run_that_met_it() -> None:
    runs = {
        "c1": {"img_s": 170.0, "p99_ms": 7.0, "failures": 0},
        "c96": {"img_s": 3075.9, "p99_ms": 35.0, "failures": 0},
        "c128": {"img_s": 3466.3, "p99_ms": 51.0, "failures": 0},
        "c192": {"img_s": 3551.9, "p99_ms": 40.0, "failures": 3},  # failures: never counts
    }
    assert sb.within_slo(runs, 50.0) == {
        "e2e_single_slo_p99_target_ms": 50.0,
        "e2e_single_slo_img_s": 3075.9,
        "e2e_single_slo_p99_ms": 35.0,
        "e2e_single_slo_users": 96,
    }
    assert sb.within_slo(runs, 5.0) == {"e2e_single_slo_p99_target_ms": 5.0, "e2e_single_slo_img_s": 0.0}


def test_failures_are_counted_by_locusts_error_text(tmp_path: Path) -> None:
    (tmp_path / "c16_failures.csv").write_text(
        "Method,Name,Error,Occurrences\n"
        "POST,/v2/models/m/infer,\"HTTPError('503 Server Error: Service Unavailable')\",2\n"
        "POST,/v2/models/m/infer,RemoteDisconnected('Remote end closed connection'),1\n"
        "POST,/v1/models/m:predict,\"HTTPError('503 Server Error: Service Unavailable')\",3\n"
    )
    kinds = sb.failure_kinds(tmp_path, "c16")
    assert kinds == {"HTTPError('503 Server Error: Service Unavailable')": 5,
                     "RemoteDisconnected('Remote end closed connection')": 1}  # fmt: skip
    assert list(kinds.values()) == [5, 1] and sb.failure_kinds(tmp_path, "none") == {}


def test_exact_percentiles_take_the_rank_locust_takes() -> None:
    """Locust's percentile is the sorted sample at index int(n * q) (locust.stats.
    calculate_response_time_percentile); the exact figures pick the same sample, unrounded."""
    times = [float(t) + 0.25 for t in range(1, 21)]  # 20 samples: 1.25 .. 20.25 ms
    assert sb.exact_percentiles(times) == {"p50_exact_ms": 11.25, "p99_exact_ms": 20.25, "exact_samples": 20}
    assert sb.exact_percentiles([3.0]) == {"p50_exact_ms": 3.0, "p99_exact_ms": 3.0, "exact_samples": 1}
    assert sb.exact_percentiles([]) == {}


def test_a_compared_arms_start_up_lines_and_log_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "server-cmp-x-1.log"
    log.write_text(
        "2026-11-24 21:33:41,028 INFO model_server.cli: early nvJPEG + crop warm-up 0.41s, done 4.88s after process start\n"
        "2026-11-24 21:33:41,300 INFO model_server.frontend: request 1 served\n"
        "2026-11-24 21:33:41,408 INFO model_server.device: start-up: weights loaded 0.08s, buckets warmed 0.69s\n"
        "2026-11-24 21:33:41,408 INFO model_server.cli: device process: loaded and warm 5.26s after process start\n"
    )
    lines = sb.startup_lines(log)
    assert len(lines) == 3 and "loaded and warm 5.26s" in lines[-1] and all("request 1" not in x for x in lines)
    assert sb.startup_lines(tmp_path / "missing.log") == []
    monkeypatch.delenv("OUT", raising=False)
    assert sb.keep_server_log(log, "serve-x-cmp-x-1") is None  # nowhere to keep it
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("OUT", str(out))
    kept = sb.keep_server_log(log, "serve-x-cmp-x-1")
    assert kept == out / "serve-x-cmp-x-1-server.log" and kept.read_text() == log.read_text()
