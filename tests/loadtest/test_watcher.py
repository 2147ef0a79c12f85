"""The pod watcher against a recorded Kubernetes API: the real ``kubernetes`` client talks HTTP to a stub on 127.0.0.1.

The stub (``loadtest_support.FakeKubeApi``) serves the Knative Service, a pod list and
then the recorded watch events of ``data/knative_pod_events.json`` (revision 00002
scaling 0 -> 2 -> 1 while a ready pod of the old revision 00001 goes away), and the
pods' ``/metrics`` through the API server's pod proxy path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from loadtest_support import RECORDING, SERVICE, FakeKubeApi

from loadtest._watcher import PodWatcher

METRICS = "densenet_device_seconds_sum 1.5\ndensenet_device_seconds_count 3\n"


@pytest.fixture
def fake_api() -> Iterator[FakeKubeApi]:
    with FakeKubeApi(metrics_text=METRICS) as api:
        yield api


def _client(api: FakeKubeApi) -> object:
    from kubernetes import client

    return client.ApiClient(client.Configuration(host=api.url))


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_counts_ready_pods_of_the_current_revision_over_time(fake_api: FakeKubeApi) -> None:
    clock = iter(range(1000, 2000))
    watcher = PodWatcher(_client(fake_api), "default", [SERVICE], watch_timeout_s=1, clock=lambda: float(next(clock)))
    watcher.start(wait_s=5)
    _wait(lambda: fake_api.watches >= 2)
    watcher.stop(wait_s=5)

    counts = [sample.ready_pods for sample in watcher.timeline]
    # the old revision's ready pod never counts; the repeated last sample marks the stop time
    assert counts[:-1] == RECORDING["expected_ready"]
    assert counts[-1] == counts[-2]
    assert {s.revision for s in watcher.timeline} == {f"{SERVICE}-00002"}
    assert watcher.max_pods() == 2
    times = [s.t for s in watcher.timeline]
    assert times == sorted(times)
    assert watcher.ready_at(times[0] - 1) is None
    assert watcher.ready_at(times[0]) == 0
    assert watcher.ready_at(times[2]) == 2
    assert watcher.errors == []


def test_scrapes_every_ready_pod_through_the_api_server_proxy(fake_api: FakeKubeApi) -> None:
    watcher = PodWatcher(_client(fake_api), "default", [SERVICE], watch_timeout_s=1)
    watcher.start(wait_s=5)
    _wait(lambda: watcher.ready_pods() == 1 and fake_api.watches >= 1)
    texts = watcher.scrape_pods(port=8080)
    watcher.stop(wait_s=5)
    assert list(texts.values()) == [METRICS]
    assert any(p.endswith("fghij:8080/proxy/metrics") for p in fake_api.paths)


def test_unreachable_api_is_retried_not_fatal() -> None:
    from kubernetes import client

    watcher = PodWatcher(
        client.ApiClient(client.Configuration(host="http://127.0.0.1:9")), "default", [SERVICE], watch_timeout_s=1
    )
    watcher.start(wait_s=0.5)
    watcher.stop(wait_s=3)
    assert watcher.errors and watcher.timeline == []


def test_apply_ignores_pods_of_other_services() -> None:
    from kubernetes import client

    watcher = PodWatcher(client.ApiClient(client.Configuration(host="http://127.0.0.1:9")), "default", [SERVICE])
    watcher._revisions[SERVICE] = None  # no Knative service readable: every revision counts
    other = json.loads(json.dumps(RECORDING["events"][1]["object"]))
    other["metadata"]["labels"]["serving.knative.dev/service"] = "someone-else"
    watcher.apply("ADDED", other)
    watcher.apply("ADDED", RECORDING["events"][1]["object"])
    assert [s.ready_pods for s in watcher.timeline] == [0, 1]
