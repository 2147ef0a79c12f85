"""Real Locust runs (subprocesses, headless, a few seconds) against a real predictor on 127.0.0.1."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from loadtest_support import SERVICE, USER_CLASSES, VARIANT, FakeKubeApi, LocustRun, Predictor

from loadtest import report

SLO_OK = ("--slo-p95-ms", "60000", "--slo-max-failure-ratio", "0")


def _assert_clean(run: LocustRun) -> dict[str, str]:
    assert run.returncode == 0, run.output[-3000:]
    total = run.aggregated()
    assert int(total["Request Count"]) > 0, run.output[-3000:]
    assert int(total["Failure Count"]) == 0, Path(f"{run.prefix}_failures.csv").read_text()
    return total


@pytest.mark.parametrize("user_class", USER_CLASSES)
def test_each_user_class_gets_only_good_answers(predictor: Predictor, run_locust, user_class: str) -> None:
    run = run_locust(predictor.url, user_class, *SLO_OK, name=user_class)
    _assert_clean(run)
    names = [row["Name"] for row in run.stats() if row["Name"] != "Aggregated"]
    assert names and all(name.endswith("vga x1") for name in names)
    side = run.side()
    assert side["user_classes"] == [user_class]
    assert side["slo"]["violations"] == []
    assert side["totals"]["requests"] >= int(run.aggregated()["Request Count"])
    assert 0 < side["first_response_s"] < 30
    assert side["cold_start_s"] is None  # no pod watcher: no claim about a cold start
    breakdown = side["breakdown_ms"]
    assert breakdown is not None, "the predictor's /metrics was not scraped"
    assert breakdown["device_ms"] > 0 and breakdown["server_ms"] > 0


def test_distributed_over_local_worker_processes(predictor: Predictor, run_locust, tmp_path: Path) -> None:
    run = run_locust(
        predictor.url,
        "V2BinaryBytesUser",
        "V1Base64User",
        "--processes",
        "2",
        "--images-per-request",
        "1,2",
        "--image-sizes",
        "vga,320x240",
        "--host-header",
        f"{VARIANT}.default.example.com",
        users=2,
        run_time="6s",
        name="distributed",
    )
    _assert_clean(run)
    side = run.side()
    assert side["workers"] == 2
    assert side["variant"] == VARIANT  # from the Host header
    assert side["first_request_t"] is not None and side["first_response_s"] > 0  # reported by the workers
    names = {row["Name"] for row in run.stats()} - {"Aggregated"}
    assert names <= {f"{p} {s} x{n}" for p in ("v1-b64", "v2-bytes-bin") for s in ("vga", "320x240") for n in (1, 2)}

    out = tmp_path / "report"
    assert report.main([str(run.prefix.parent), "-o", str(out)]) == 0
    with open(out / "summary.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["variant"] == VARIANT and float(row["requests_s"]) > 0
    assert float(row["images_s"]) >= float(row["requests_s"])
    assert (out / "latency_vs_users.png").stat().st_size > 10_000
    assert (out / "throughput_pods.png").stat().st_size > 10_000


def test_missed_slo_exits_1(predictor: Predictor, run_locust) -> None:
    run = run_locust(predictor.url, "V2BinaryTensorUser", "--slo-p95-ms", "1", name="slo", run_time="3s")
    assert run.returncode == 1, run.output[-2000:]
    assert "SLO missed: p95" in run.output
    assert run.side()["slo"]["violations"]


def test_spike_shape_starts_from_zero_users(predictor: Predictor, run_locust) -> None:
    run = run_locust(
        predictor.url,
        "V2BinaryBytesUser",
        "--shape",
        "spike",
        "--spike-wait",
        "2",
        users=2,
        run_time="6s",
        name="spike",
    )
    _assert_clean(run)
    assert "load shape: spike (SpikeShape)" in run.output
    with open(f"{run.prefix}_stats_history.csv", newline="") as handle:
        users = [int(row["User Count"]) for row in csv.DictReader(handle) if row["Name"] == "Aggregated"]
    assert users[0] == 0 and max(users) == 2
    side = run.side()
    assert side["shape"] == "spike"
    assert "no /metrics scrape before the run" in run.output  # the route is left alone until the spike
    assert side["breakdown_ms"] is not None


def test_tags_select_protocols(predictor: Predictor, run_locust) -> None:
    run = run_locust(predictor.url, "--tags", "tensor", users=2, name="tags", run_time="3s")
    _assert_clean(run)
    assert run.side()["user_classes"] == ["V2BinaryTensorUser", "V2JsonTensorUser"]
    assert all(row["Name"].startswith("v2-tensor") for row in run.stats() if row["Name"] != "Aggregated")


def test_scale_from_zero_with_the_pod_watcher(predictor: Predictor, run_locust, tmp_path: Path) -> None:
    """Spike against a revision with no ready pod: the recorded API server reports 0 pods, then 1, 2, 1."""
    with FakeKubeApi(events_delay_s=2.0, metrics_upstream=predictor.url) as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        run = run_locust(
            predictor.url,
            "V2BinaryBytesUser",
            "--shape",
            "spike",
            "--kube-namespace",
            "default",
            "--variant",
            SERVICE,
            users=1,
            run_time="5s",
            name="cold",
            env={"KUBECONFIG": str(kubeconfig)},
        )
    _assert_clean(run)
    side = run.side()
    assert side["ready_pods_at_first_request"] == 0
    assert side["cold_start_s"] == side["first_response_s"] > 0
    assert side["max_pods"] == 2
    assert [s["ready_pods"] for s in side["pod_timeline"]][:4] == [0, 1, 2, 1]
    assert side["metrics_source"] == "1 pod(s) via the API server"
    assert side["breakdown_ms"]["device_ms"] > 0
