"""The in-pod view: scrape the predictor's Prometheus ``/metrics`` before and after a run.

The difference of two scrapes of a histogram's ``_sum`` and ``_count`` is what the
run itself added, whatever ran before. Summed over every pod scraped, it splits the
client's latency into time on the device, queue/batching wait, decode and the rest
inside the server; what the client saw beyond the server's own end-to-end time is the
network, the ingress, the activator and Knative's queue-proxy.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping

logger = logging.getLogger(__name__)

#: Server histograms (seconds) the breakdown uses, by short name.
HISTOGRAMS = {
    "request": "densenet_request_seconds",
    "queue": "densenet_queue_wait_seconds",
    "decode": "densenet_preprocess_seconds",
    "device": "densenet_device_seconds",
    "batch": "densenet_batch_size",
}
_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")

Scrape = dict[str, float]
"""Summed ``_sum`` and ``_count`` samples by series name (labels summed away), e.g. ``densenet_device_seconds_sum``."""


def parse(text: str) -> Scrape:
    """Sum every ``*_sum``/``*_count``/``*_total`` sample of a Prometheus text exposition over its labels."""
    totals: Scrape = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if not match:
            continue
        name, value = match.group(1), match.group(3)
        if not name.endswith(("_sum", "_count", "_total")):
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if math.isfinite(number):
            totals[name] = totals.get(name, 0.0) + number
    return totals


def merge(scrapes: Iterable[Scrape]) -> Scrape:
    """Sum scrapes of several pods into one."""
    total: Scrape = {}
    for scrape in scrapes:
        for name, value in scrape.items():
            total[name] = total.get(name, 0.0) + value
    return total


def delta(before: Mapping[str, float], after: Mapping[str, float]) -> Scrape:
    """``after - before`` per series; a series missing before (a pod started during the run) counts from 0."""
    return {name: value - before.get(name, 0.0) for name, value in after.items()}


def _mean_ms(d: Mapping[str, float], metric: str) -> float | None:
    count = d.get(f"{metric}_count", 0.0)
    if count <= 0:
        return None
    return 1000.0 * d.get(f"{metric}_sum", 0.0) / count


def breakdown(d: Mapping[str, float], *, client_mean_ms: float | None) -> dict[str, float | None]:
    """Split the mean request latency into its parts, in milliseconds.

    ``device_ms`` is the mean time of one batch on the device, which every request of
    that batch waits for; ``server_other_ms`` is the server's end-to-end time less queue,
    decode and device (serialisation, post-processing, the event loop);
    ``network_ms`` is the client's mean less the server's (ingress, activator,
    queue-proxy, the wire). A part is ``None`` when its histogram saw nothing.

    Args:
        d: A :func:`delta` of two scrapes.
        client_mean_ms: Locust's average response time over the same run.
    """
    server = _mean_ms(d, HISTOGRAMS["request"])
    queue = _mean_ms(d, HISTOGRAMS["queue"])
    decode = _mean_ms(d, HISTOGRAMS["decode"])
    device = _mean_ms(d, HISTOGRAMS["device"])
    batch_count = d.get(f"{HISTOGRAMS['batch']}_count", 0.0)
    mean_batch = d.get(f"{HISTOGRAMS['batch']}_sum", 0.0) / batch_count if batch_count > 0 else None
    other = None
    if server is not None:
        other = max(0.0, server - sum(part or 0.0 for part in (queue, decode, device)))
    network = None
    if server is not None and client_mean_ms is not None:
        network = max(0.0, client_mean_ms - server)
    return {
        "client_ms": client_mean_ms,
        "server_ms": server,
        "queue_ms": queue,
        "decode_ms": decode,
        "device_ms": device,
        "server_other_ms": other,
        "network_ms": network,
        "mean_batch_size": mean_batch,
        "server_requests": d.get(f"{HISTOGRAMS['request']}_count"),
        "rejected": d.get("densenet_requests_rejected_total"),
    }
