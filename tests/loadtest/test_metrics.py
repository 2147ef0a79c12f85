"""The in-pod view: Prometheus text parsed, two scrapes differenced, latency split into its parts."""

from __future__ import annotations

import pytest

from loadtest import _metrics

BEFORE = """# HELP densenet_device_seconds time on the device per batch
# TYPE densenet_device_seconds histogram
densenet_device_seconds_bucket{le="0.1"} 1
densenet_device_seconds_sum 0.5
densenet_device_seconds_count 2
densenet_request_seconds_sum{protocol="v1"} 1.0
densenet_request_seconds_count{protocol="v1"} 4
densenet_request_seconds_sum{protocol="v2"} 1.0
densenet_request_seconds_count{protocol="v2"} 6
densenet_requests_rejected_total{reason="queue_full"} 1
densenet_gpu_memory_used_bytes 1e9
"""
AFTER = """densenet_device_seconds_sum 2.5
densenet_device_seconds_count 12
densenet_request_seconds_sum{protocol="v1"} 3.0
densenet_request_seconds_count{protocol="v1"} 14
densenet_request_seconds_sum{protocol="v2"} 3.0
densenet_request_seconds_count{protocol="v2"} 16
densenet_queue_wait_seconds_sum 0.6
densenet_queue_wait_seconds_count 20
densenet_preprocess_seconds_sum 0.2
densenet_preprocess_seconds_count 20
densenet_batch_size_sum 20
densenet_batch_size_count 10
densenet_requests_rejected_total{reason="queue_full"} 3
"""


def test_parse_sums_labels_and_skips_gauges_and_buckets() -> None:
    scrape = _metrics.parse(BEFORE)
    assert scrape["densenet_request_seconds_count"] == 10
    assert scrape["densenet_requests_rejected_total"] == 1
    assert "densenet_gpu_memory_used_bytes" not in scrape
    assert not any(name.endswith("_bucket") for name in scrape)


def test_breakdown_of_the_run_only() -> None:
    delta = _metrics.delta(_metrics.parse(BEFORE), _metrics.parse(AFTER))
    parts = _metrics.breakdown(delta, client_mean_ms=250.0)
    assert parts["server_ms"] == pytest.approx(200.0)  # 4 s over 20 requests
    assert parts["device_ms"] == pytest.approx(200.0)  # 2 s over 10 batches
    assert parts["queue_ms"] == pytest.approx(30.0)
    assert parts["decode_ms"] == pytest.approx(10.0)
    assert parts["server_other_ms"] == 0.0  # never negative
    assert parts["network_ms"] == pytest.approx(50.0)
    assert parts["mean_batch_size"] == pytest.approx(2.0)
    assert parts["rejected"] == 2


def test_pods_merge_and_a_new_pod_counts_from_zero() -> None:
    merged = _metrics.merge([_metrics.parse(AFTER), _metrics.parse(AFTER)])
    assert merged["densenet_batch_size_count"] == 20
    assert _metrics.delta({}, merged)["densenet_batch_size_sum"] == 40
    assert _metrics.breakdown({}, client_mean_ms=None)["server_ms"] is None
