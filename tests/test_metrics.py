"""observe_many: the batch loop's one-write-per-bucket observation equals one observe per value; the
request-path metrics switched off and on at run time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from model_server import metrics as m

ROOT = Path(__file__).resolve().parents[1]
# Edge cases: exactly on a bound, between bounds, below the first, above the last, zero.
VALUES = [0.0, 0.0001, 0.00011, 0.003, 0.003, 0.0049, 0.05, 7.5, 10.0, 11.0, 1e-9, 0.25]


def _pair() -> tuple[Histogram, Histogram, CollectorRegistry, CollectorRegistry]:
    a, b = CollectorRegistry(), CollectorRegistry()
    buckets = m.QUEUE_WAIT_SECONDS._upper_bounds[:-1]
    return Histogram("h", "h", buckets=buckets, registry=a), Histogram("h", "h", buckets=buckets, registry=b), a, b


def test_observe_many_exposes_what_observe_per_value_does() -> None:
    one, many, reg_one, reg_many = _pair()
    for v in VALUES:
        one.observe(v)
    m.observe_many(many, VALUES)
    m.observe_many(many, [])
    strip = [ln for ln in generate_latest(reg_one).decode().splitlines() if "_created" not in ln]
    assert strip == [ln for ln in generate_latest(reg_many).decode().splitlines() if "_created" not in ln]
    assert f"h_count {float(len(VALUES))}" in strip


def test_observe_many_on_metrics_turned_off_is_a_no_op() -> None:
    m.observe_many(m._Off(), VALUES)  # type: ignore[arg-type]


def test_observe_many_in_multiprocess_mode_matches_observe(tmp_path: Path) -> None:
    """The --frontends N case: values live in mmap files, merged by the MultiProcessCollector."""
    script = textwrap.dedent(
        f"""
        import sys
        from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
        from model_server.metrics import observe_many
        values = {VALUES!r}
        kind = sys.argv[1]
        h = Histogram("h_" + kind, "h", buckets=(0.0001, 0.003, 0.05, 10.0))
        if kind == "one":
            for v in values:
                h.observe(v)
        else:
            observe_many(h, values)
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        print(generate_latest(reg).decode())
        """
    )
    out = {}
    for kind in ("one", "many"):
        d = tmp_path / kind
        d.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(d), "PYTHONPATH": str(ROOT)}
        text = subprocess.run([sys.executable, "-c", script, kind], env=env, capture_output=True, text=True, check=True)
        out[kind] = sorted(ln.replace("h_" + kind, "h") for ln in text.stdout.splitlines() if ln.startswith("h_"))
    assert out["one"] == out["many"]
    assert any(ln.startswith('h_bucket{le="0.003"} 6.0') for ln in out["many"])


def test_request_path_metrics_switch_off_and_on_again() -> None:
    live = m.IMAGES
    assert m.enabled()
    try:
        m.set_enabled(False)
        assert not m.enabled()
        assert all(isinstance(getattr(m, name), m._Off) for name in m.REQUEST_PATH)
        m.IMAGES.inc(5)  # a no-op, as every write of the request path is while paused
        m.set_enabled(False)  # twice off keeps the real ones to come back to
    finally:
        m.set_enabled(True)
    assert m.enabled() and m.IMAGES is live
    assert not any(isinstance(getattr(m, name), m._Off) for name in m.REQUEST_PATH)


def test_front_ends_ignore_the_toggle_signals_the_metrics_use() -> None:
    """The device process ignores these before it spawns its front ends (a signal without a handler
    would kill them): they must be the ones the metrics module handles."""
    from model_server.frontend import TOGGLE_SIGNALS

    assert TOGGLE_SIGNALS == (m.PAUSE_SIGNAL, m.RESUME_SIGNAL)


def test_queued_writes_wait_for_flush_and_keep_their_order() -> None:
    seen: list[int] = []
    m.later(seen.append, 1)
    m.later(seen.append, 2)
    assert seen == []
    m.flush()
    assert seen == [1, 2]
    m.flush()  # nothing queued: nothing written
    assert seen == [1, 2]


def test_a_write_queued_while_paused_stays_a_no_op() -> None:
    before = m.IMAGES._value.get()
    try:
        m.set_enabled(False)
        m.later(m.IMAGES.inc, 3)
    finally:
        m.set_enabled(True)
    m.flush()
    assert m.IMAGES._value.get() == before


def test_a_batch_is_answered_before_its_metric_writes() -> None:
    """The batcher queues a batch's writes and flushes them on the loop after the answers' callbacks:
    the waiting request resumes first, the counters move two loop turns later."""
    import asyncio

    import torch

    from model_server.batcher import DynamicBatcher

    def run(payloads: list[int]) -> list[torch.Tensor | Exception]:
        return [torch.tensor([float(p)]) for p in payloads]

    async def main() -> tuple[float, float, float]:
        batcher = DynamicBatcher(run, max_batch_size=4, max_delay_s=0.0, max_queue_images=64)
        try:
            before = m.IMAGES._value.get()
            out = await batcher.submit(7, 2)
            assert float(out[0]) == 7.0
            answered = m.IMAGES._value.get()
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return before, answered, m.IMAGES._value.get()
        finally:
            batcher.close()

    before, answered, after = asyncio.run(main())
    assert answered == before and after == before + 2


def test_observations_queued_until_flush_are_written_once_per_histogram(monkeypatch: pytest.MonkeyPatch) -> None:
    """later_observe: nothing written before flush; then one observe_many per histogram and label values,
    exposing what one observe per value would, labelled children included."""
    one, many, reg_one, reg_many = _pair()
    lab_one = Histogram("r", "r", ["protocol"], buckets=(0.001, 0.01), registry=reg_one)
    lab_many = Histogram("r", "r", ["protocol"], buckets=(0.001, 0.01), registry=reg_many)
    for v in VALUES:
        one.observe(v)
        lab_one.labels("v1").observe(v)
    lab_one.labels("v2").observe(0.5)
    calls: list[tuple[object, int]] = []
    real = m.observe_many
    monkeypatch.setattr(m, "observe_many", lambda h, vs: (calls.append((h, len(vs))), real(h, vs))[1])
    for v in VALUES:
        m.later_observe(many, v)
        m.later_observe(lab_many, v, "v1")
    m.later_observe(lab_many, 0.5, "v2")
    assert "h_count 0.0" in generate_latest(reg_many).decode()  # queued, not written
    m.flush()
    assert sorted(n for _, n in calls) == [1, len(VALUES), len(VALUES)]  # one write per histogram child
    strip = [ln for ln in generate_latest(reg_one).decode().splitlines() if "_created" not in ln]
    assert strip == [ln for ln in generate_latest(reg_many).decode().splitlines() if "_created" not in ln]
    calls.clear()
    m.flush()  # nothing queued: nothing written
    assert calls == []


def test_observations_while_paused_are_dropped_and_a_full_queue_writes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, many, _, reg = _pair()
    try:
        m.set_enabled(False)
        m.later_observe(m.DEVICE_SECONDS, 1.0)  # the paused metric is a no-op: nothing queued
        m.later_observe_many(m.QUEUE_WAIT_SECONDS, [1.0, 2.0])
    finally:
        m.set_enabled(True)
    assert not m._OBSERVED
    monkeypatch.setattr(m, "_OBSERVED_MAX", 3)  # a caller that never flushes: bounded all the same
    for v in (0.001, 0.002, 0.003, 0.004):
        m.later_observe(many, v)
    assert "h_count 3.0" in generate_latest(reg).decode()
    m.flush()
    assert "h_count 4.0" in generate_latest(reg).decode()


def test_flush_soon_flushes_once_after_the_writes_that_queued_callbacks_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device process's answer: ``set_result`` queues the IPC callback, which queues the one write of
    its burst for the turn after. The metrics flush comes after that write, once however often asked."""
    import asyncio

    order: list[str] = []
    flushes: list[int] = []
    real = m.flush
    monkeypatch.setattr(m, "flush", lambda: (flushes.append(1), real())[1])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        answered: asyncio.Future[int] = loop.create_future()
        answered.add_done_callback(lambda f: loop.call_soon(order.append, "write"))
        answered.set_result(1)  # the batch's answer: its callback runs next turn and queues the write
        m.later(order.append, "metrics")
        m.flush_soon(loop)
        m.flush_soon(loop)  # already scheduled: not again
        for _ in range(3):
            await asyncio.sleep(0)
        m.later(order.append, "next")
        m.flush_soon(loop)  # the first flush ran: a new one is scheduled
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert order == ["write", "metrics", "next"]
    assert len(flushes) == 2
