"""benchmarks/runtime_ab.py: blocks of on/off windows inside one server, per-window figures, effects, interval."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("runtime_ab", ROOT / "benchmarks" / "runtime_ab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["runtime_ab"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ab = _module()


def test_blocks_of_on_off_off_on_cancel_a_linear_drift() -> None:
    states = ab.abba(2)
    assert states == [True, False, False, True] * 2
    # Throughput falling by 3 per window and no effect at all: every block reads exactly zero.
    figures = [{"on": on, "img_s": 100.0 - 3 * k, "p50_ms": 10.0 + k} for k, on in enumerate(states)]
    assert ab.block_effects(figures) == [
        {"block": 1, "throughput_cost_pct": 0.0, "latency_cost_pct": 0.0},
        {"block": 2, "throughput_cost_pct": 0.0, "latency_cost_pct": 0.0},
    ]


def test_run_windows_switches_on_schedule_and_records_lateness() -> None:
    clock = [100.0]
    switched: list[tuple[float, bool]] = []

    def sleep(s: float) -> None:
        clock[0] += s

    def switch(on: bool) -> None:
        switched.append((clock[0], on))
        clock[0] += 0.002  # a signal takes a little while

    windows = ab.run_windows(101.0, 2.0, [True, False, False], switch, now=lambda: clock[0], sleep=sleep)
    assert switched == [(101.0, True), (103.0, False), (105.0, False)]
    assert [(w.start, w.end, w.on) for w in windows] == [(101.0, 103.0, True), (103.0, 105.0, False),
                                                          (105.0, 107.0, False)]  # fmt: skip
    assert all(w.late_s == 0 for w in windows)
    late = ab.run_windows(90.0, 1.0, [True], switch, now=lambda: clock[0], sleep=sleep)  # already past its start
    assert late[0].late_s == pytest.approx(clock[0] - 0.002 - 90.0)


def test_window_figures_count_requests_after_the_guard_and_take_locust_rank_p50() -> None:
    windows = [ab.Window(0.0, 2.0, True), ab.Window(2.0, 4.0, False)]
    samples = [(0.1, 50.0)]  # inside the first guard: ran partly before the switch, left out
    samples += [(0.5 + 0.1 * i, 10.0 + i) for i in range(10)]  # 10 in the first window after its guard
    samples += [(2.3 + 0.1 * i, 20.0) for i in range(15)]  # 15 in the second
    samples += [(4.5, 1.0)]  # after the last window
    first, second = ab.window_figures(samples, windows, images_per_request=2, guard_s=0.25)
    assert first == {"on": True, "requests": 10, "seconds": 1.75, "img_s": round(20 / 1.75, 2), "p50_ms": 15.0}
    assert second["requests"] == 15 and second["img_s"] == round(30 / 1.75, 2) and second["p50_ms"] == 20.0
    empty = ab.window_figures([], windows[:1], images_per_request=1, guard_s=0.0)[0]
    assert empty["requests"] == 0 and empty["img_s"] == 0.0 and "p50_ms" not in empty


def test_block_effects_compare_the_two_on_windows_with_the_two_off_ones() -> None:
    figures = [
        {"on": True, "img_s": 97.0, "p50_ms": 10.3},
        {"on": False, "img_s": 100.0, "p50_ms": 10.0},
        {"on": False, "img_s": 100.0, "p50_ms": 10.0},
        {"on": True, "img_s": 97.0, "p50_ms": 10.3},
        {"on": True, "img_s": 90.0},  # a block with a window without requests: no latency effect
        {"on": False, "img_s": 90.0, "p50_ms": 11.0},
        {"on": False, "img_s": 90.0, "p50_ms": 11.0},
        {"on": True, "img_s": 90.0, "p50_ms": 11.0},
        {"on": True, "img_s": 90.0, "p50_ms": 11.0},  # an incomplete block is left out
    ]
    assert ab.block_effects(figures) == [
        {"block": 1, "throughput_cost_pct": 3.0, "latency_cost_pct": 3.0},
        {"block": 2, "throughput_cost_pct": 0.0},
    ]


def test_mean_ci95_uses_students_t() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    s = ab.mean_ci95(values)
    half = 3.182 * statistics.stdev(values) / 2  # t(0.975, 3 degrees of freedom), sqrt(4)
    assert s["mean"] == 2.5 and s["median"] == 2.5 and s["n"] == 4
    assert s["ci95_low"] == pytest.approx(2.5 - half, abs=1e-3)
    assert s["ci95_high"] == pytest.approx(2.5 + half, abs=1e-3)
    assert "ci95_low" not in ab.mean_ci95([1.0])
    many = ab.mean_ci95([float(i % 3) for i in range(40)])  # beyond the table: the normal quantile
    assert many["ci95_high"] - many["mean"] == pytest.approx(1.96 * many["sd"] / 40**0.5, abs=2e-3)


def test_verdicts_say_whether_the_interval_resolves_the_bound() -> None:
    assert ab.verdict({"mean": 0.5, "ci95_low": -1.0, "ci95_high": 2.0}, 3.0) == "within 3 %"
    assert ab.verdict({"mean": 5.0, "ci95_low": 4.0, "ci95_high": 6.0}, 3.0) == "above 3 %"
    assert ab.verdict({"mean": 2.0, "ci95_low": 0.5, "ci95_high": 3.5}, 3.0).startswith("not resolved")
    assert ab.verdict({"mean": 2.0}, 3.0).startswith("not resolved (one block")


def test_summarize_holds_windows_effects_and_verdicts() -> None:
    windows = [ab.Window(float(k), float(k + 1), on, 0.001 * (k + 1)) for k, on in enumerate(ab.abba(1))]
    figures = [{"on": w.on, "img_s": 99.0 if w.on else 100.0, "p50_ms": 5.0} for w in windows]
    out = ab.summarize(figures, bound_pct=3.0, windows=windows)
    assert out["windows"] == figures and out["block_effects"][0]["throughput_cost_pct"] == 1.0
    assert out["throughput_cost_pct"]["mean"] == 1.0 and out["throughput_cost_verdict"].startswith("not resolved")
    assert out["latency_cost_pct"]["mean"] == 0.0 and out["switch_late_ms_max"] == 4.0


def test_pooled_blocks_of_several_records_and_the_script(tmp_path: Path) -> None:
    def record(name: str, effects: list[float]) -> dict[str, object]:
        blocks = [{"block": i + 1, "throughput_cost_pct": e, "latency_cost_pct": e / 2} for i, e in enumerate(effects)]
        return {"name": name, "metrics": {"metrics_toggle": {"c128": {"block_effects": blocks}}}}

    a, b = record("a", [1.0, 2.0]), record("b", [0.0, -1.0, 3.0])
    out = ab.pooled([a, b], 128, bound_pct=3.0)
    assert out["records"] == [{"name": "a", "blocks": 2, "mean": 1.5}, {"name": "b", "blocks": 3, "mean": 0.667}]
    assert out["throughput_cost_pct"] == ab.mean_ci95([1.0, 2.0, 0.0, -1.0, 3.0])
    assert out["latency_cost_pct"]["mean"] == 0.5
    with pytest.raises(KeyError):
        ab.pooled([a], 1, bound_pct=3.0)
    paths = []
    for rec in (a, b):
        path = tmp_path / f"{rec['name']}.json"
        path.write_text(json.dumps(rec))
        paths.append(str(path))
    script = [sys.executable, str(ROOT / "benchmarks" / "runtime_ab.py")]
    done = subprocess.run([*script, "--users", "128", *paths], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["throughput_cost_pct"]["n"] == 5
    refused = subprocess.run([*script, "--users", "1", *paths], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "metrics-toggle run at 1 users" in refused.stderr


def test_the_windows_are_plotted_per_record(tmp_path: Path) -> None:
    windows = [{"on": on, "img_s": 100.0 + k, "p50_ms": 10.0 - k / 10} for k, on in enumerate(ab.abba(2))]
    del windows[2]["p50_ms"]  # a window without requests has no p50
    run = {"windows": windows, "window_s": 1.5, "throughput_cost_pct": ab.mean_ci95([1.0, -1.0])}
    records = [{"name": n, "metrics": {"metrics_toggle": {"c128": run}}} for n in ("a", "b")]
    png = ab.plot(records, 128, tmp_path / "sub" / "toggle.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
