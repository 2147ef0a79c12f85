"""The SLO gate on Locust's real aggregated stats."""

from __future__ import annotations

from locust.stats import RequestStats

from loadtest._hooks import evaluate_slo


def _stats(times_ms: list[int], failures: int = 0) -> RequestStats:
    stats = RequestStats()
    for ms in times_ms:
        stats.log_request("POST", "v1-b64 vga x1", ms, 100)
    for _ in range(failures):
        stats.log_error("POST", "v1-b64 vga x1", "HTTP 503")
        stats.log_request("POST", "v1-b64 vga x1", 5, 0)
    return stats


def test_no_thresholds_no_verdict() -> None:
    assert evaluate_slo(_stats([5000]).total, p95_ms=None, max_failure_ratio=None) == []


def test_p95_threshold() -> None:
    fast = _stats([100] * 96 + [900] * 4).total
    slow = _stats([100] * 90 + [900] * 10).total
    assert evaluate_slo(fast, p95_ms=200, max_failure_ratio=None) == []
    (violation,) = evaluate_slo(slow, p95_ms=200, max_failure_ratio=None)
    assert violation.startswith("p95 900 ms > 200 ms")


def test_failure_ratio_threshold() -> None:
    stats = _stats([100] * 98, failures=2).total
    assert evaluate_slo(stats, p95_ms=None, max_failure_ratio=0.05) == []
    (violation,) = evaluate_slo(stats, p95_ms=None, max_failure_ratio=0.01)
    assert "failure ratio 0.0200 > 0.01" in violation and "(2 of 100)" in violation


def test_a_run_without_requests_misses_any_slo() -> None:
    assert evaluate_slo(RequestStats().total, p95_ms=1000, max_failure_ratio=None) == ["no request was made"]
