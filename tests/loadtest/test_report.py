"""The report from runs on disk: Locust's CSV columns (taken from the installed Locust) plus the side JSON."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV, StatsCSVFileWriter, get_readable_percentiles

from loadtest import report

PCTS = get_readable_percentiles(PERCENTILES_TO_REPORT)


def _columns() -> tuple[list[str], list[str]]:
    class _Env:
        stats = runner = None

    stats_columns = StatsCSV(_Env(), PERCENTILES_TO_REPORT).requests_csv_columns
    history_columns = [
        "Timestamp", "User Count", "Type", "Name", "Requests/s", "Failures/s", *PCTS, "Total Request Count",
        "Total Failure Count", "Total Median Response Time", "Total Average Response Time", "Total Min Response Time",
        "Total Max Response Time", "Total Average Content Size",
    ]  # fmt: skip
    # the history header is built inside StatsCSVFileWriter.__init__; check ours is the installed one's
    source = Path(StatsCSVFileWriter.__init__.__code__.co_filename).read_text()
    assert all(f'"{c}"' in source for c in history_columns if c not in PCTS)
    return stats_columns, history_columns


def _write_run(
    prefix: Path,
    *,
    variant: str,
    images: int,
    rps: float,
    p95: int,
    pods: list[int] | None,
    cold_start_s: float | None,
    side: bool = True,
) -> None:
    stats_columns, history_columns = _columns()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    name = f"v2-bytes-bin vga x{images}"
    pct_values = [p95 // 2, p95 // 2, p95 // 2, p95 // 2, p95, p95, p95, p95 + 10, p95 + 10, p95 + 10, p95 + 10]
    with open(f"{prefix}_stats.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(stats_columns)
        for row_name, kind in ((name, "POST"), ("Aggregated", "")):
            writer.writerow([kind, row_name, 200, 2, p95 // 2, p95 / 2, 10, p95 + 10, 500, rps, 0.1, *pct_values])
    start = 1_800_000_000
    with open(f"{prefix}_stats_history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(history_columns)
        writer.writerow([start, 0, "", "Aggregated", "0.000000", "0.000000", *["N/A"] * len(PCTS), 0, 0, 0, 0, 0, 0, 0])
        for second in range(1, 21):
            users = 2 * (1 + second // 5)
            latencies = [users * 10] * 4 + [users * 20] * 3 + [users * 30] * 4
            for row_name, kind in ((name, "POST"), ("Aggregated", "")):
                writer.writerow(
                    [
                        start + second,
                        users,
                        kind,
                        row_name,
                        f"{rps:2f}",
                        "0.000000",
                        *latencies,
                        second * 10,
                        0,
                        100,
                        100.0,
                        10,
                        300,
                        500,
                    ]
                )
    if side:
        timeline = [
            {"t": start + i * 5, "service": variant, "revision": f"{variant}-00001", "ready_pods": n}
            for i, n in enumerate(pods or [])
        ]
        document = {
            "schema": 1,
            "variant": variant,
            "user_classes": ["V2BinaryBytesUser"],
            "totals": {
                "requests": 200,
                "failures": 2,
                "requests_s": rps,
                "avg_ms": p95 / 2,
                "p50_ms": p95 // 2,
                "p95_ms": p95,
                "p99_ms": p95 + 10,
                "max_ms": p95 + 10,
            },
            "names": {name: {"requests": 200, "failures": 2, "images_per_request": images}},
            "max_pods": max(pods) if pods else None,
            "pod_timeline": timeline,
            "cold_start_s": cold_start_s,
            "first_response_s": cold_start_s or 0.2,
            "breakdown_ms": {
                "client_ms": p95 / 2,
                "server_ms": 30.0,
                "queue_ms": 5.0,
                "decode_ms": 3.0,
                "device_ms": 20.0,
                "server_other_ms": 2.0,
                "network_ms": p95 / 2 - 30,
                "mean_batch_size": 3.5,
            },
            "slo": {"p95_ms": 100, "max_failure_ratio": None, "violations": ["p95"] if p95 > 100 else []},
        }
        Path(f"{prefix}_loadtest.json").write_text(json.dumps(document))


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    fp32, fp16 = tmp_path / "densenet121-eager-fp32", tmp_path / "densenet121-eager-fp16-cl"
    _write_run(
        fp32 / "step",
        variant="densenet121-eager-fp32",
        images=1,
        rps=20.0,
        p95=180,
        pods=[0, 1, 2, 3, 2],
        cold_start_s=7.5,
    )
    _write_run(
        fp16 / "step",
        variant="densenet121-eager-fp16-cl",
        images=4,
        rps=15.0,
        p95=90,
        pods=[1, 1, 2],
        cold_start_s=None,
    )
    return [fp32, fp16]


def test_summary_per_variant(results: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert report.main([*map(str, results), "-o", str(out)]) == 0
    with open(out / "summary.csv", newline="") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    fp32, fp16 = rows["densenet121-eager-fp32"], rows["densenet121-eager-fp16-cl"]
    assert float(fp32["requests_s"]) == 20.0 and float(fp32["images_s"]) == 20.0
    assert float(fp16["images_s"]) == 60.0  # 4 images a request
    assert (float(fp32["p50_ms"]), float(fp32["p95_ms"]), float(fp32["p99_ms"])) == (90.0, 180.0, 190.0)
    assert fp32["failures"] == "2" and float(fp32["failure_ratio"]) == 0.01
    assert float(fp32["max_pods"]) == 3 and float(fp32["cold_start_s"]) == 7.5 and fp16["cold_start_s"] == ""
    assert fp32["slo_passed"] == "False" and fp16["slo_passed"] == "True"
    assert float(fp16["device_ms"]) == 20.0
    markdown = (out / "summary.md").read_text()
    assert "| densenet121-eager-fp32 |" in markdown and "p95_ms" in markdown and "cold_start_s" in markdown
    assert "<table" in (out / "summary.html").read_text()


def test_plots_are_real_pngs(results: list[Path], tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "report"
    report.main([*map(str, results), "-o", str(out)])
    for name in ("latency_vs_users.png", "throughput_pods.png", "variants.png", "breakdown.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 250
    assert "![variants.png](variants.png)" in (out / "summary.md").read_text()


def test_a_run_without_side_file_is_read_from_locust_csv_alone(tmp_path: Path) -> None:
    _write_run(
        tmp_path / "plain" / "run", variant="x", images=2, rps=10.0, p95=50, pods=None, cold_start_s=None, side=False
    )
    frame, written = report.make_report([tmp_path / "plain"], tmp_path / "out")
    (row,) = frame.to_dict("records")
    assert row["variant"] == "plain" and row["requests"] == 200 and row["images_s"] == 20.0
    assert row["p95_ms"] == 50 and row["max_users"] == 10
    assert (tmp_path / "out" / "breakdown.png") not in written


def test_exit_codes(tmp_path: Path) -> None:
    assert report.main([str(tmp_path), "-o", str(tmp_path / "out")]) == 1  # no run found
    with pytest.raises(SystemExit) as excinfo:
        report.main([str(tmp_path / "missing")])
    assert excinfo.value.code == 2
