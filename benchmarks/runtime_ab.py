"""A/B of a setting switched at run time inside one running server, in alternating windows.

Comparing two fresh servers measures the setting plus everything that differs between two
starts and two moments of the machine: on the H100 machines the same server's throughput
spread 5.7-8.3 % run to run, more than the 3 % the metrics overhead is allowed (issue 5). Here
one server under one continuous load switches the setting at window boundaries, in ABBA order
(on, off, off, on, on, off, ...) so that a linear drift falls equally on both arms; every pair
of adjacent windows gives one effect, and the effects' mean comes with a 95 % confidence
interval. Throughput and the median latency of a window are computed from the client's own
record of every request (end time and response time, Locust's ``--raw-latency-dir``); requests
that end in the first ``guard_s`` of a window are left out, as they ran partly before the switch.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

#: Two-sided 95 % quantiles of Student's t by degrees of freedom (1..30); above 30, 1.96 (normal).
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Window:
    start: float  # Unix seconds, when the switch was sent
    end: float
    on: bool
    late_s: float = 0.0  # how long after its scheduled start the switch went out


def abba(pairs: int) -> list[bool]:
    """The arm of each window, ``True`` for on: (on, off), (off, on), (on, off), ... ``pairs`` times."""
    states: list[bool] = []
    for j in range(pairs):
        states += [True, False] if j % 2 == 0 else [False, True]
    return states


def run_windows(
    first_start: float,
    window_s: float,
    states: Sequence[bool],
    switch: Callable[[bool], None],
    *,
    now: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Window]:
    """Switch to ``states[k]`` at ``first_start + k * window_s`` (Unix s); the windows as they ran."""
    windows: list[Window] = []
    for k, on in enumerate(states):
        delay = first_start + k * window_s - now()
        if delay > 0:
            sleep(delay)
        sent = now()
        switch(on)
        windows.append(Window(sent, first_start + (k + 1) * window_s, on, sent - (first_start + k * window_s)))
    return windows


def window_figures(
    samples: Sequence[tuple[float, float]], windows: Sequence[Window], *, images_per_request: int, guard_s: float
) -> list[dict[str, Any]]:
    """Per window: requests, images/s and exact p50 (ms) of the requests that ended inside it after the guard."""
    ordered = sorted(samples)
    out: list[dict[str, Any]] = []
    for w in windows:
        lo = w.start + guard_s
        span = w.end - lo
        inside = sorted(ms for end, ms in ordered if lo <= end < w.end)
        row: dict[str, Any] = {"on": w.on, "requests": len(inside), "seconds": round(span, 3)}
        if span > 0:
            row["img_s"] = round(len(inside) * images_per_request / span, 2)
        if inside:
            row["p50_ms"] = round(inside[int(0.5 * len(inside))], 3)  # the rank Locust's percentile picks
        out.append(row)
    return out


def pair_effects(figures: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each pair of adjacent windows (0-1, 2-3, ...) as one effect of switching on, in %:
    ``throughput_cost_pct`` = (off - on) / off of images/s (positive: on is slower), and
    ``latency_cost_pct`` = (on - off) / off of the p50 (positive: on is slower)."""
    effects: list[dict[str, Any]] = []
    for j in range(0, len(figures) - 1, 2):
        a, b = figures[j], figures[j + 1]
        on, off = (a, b) if a["on"] else (b, a)
        row: dict[str, Any] = {"pair": j // 2 + 1}
        if off.get("img_s") and "img_s" in on:
            row["throughput_cost_pct"] = round((off["img_s"] - on["img_s"]) / off["img_s"] * 100, 3)
        if off.get("p50_ms") and "p50_ms" in on:
            row["latency_cost_pct"] = round((on["p50_ms"] - off["p50_ms"]) / off["p50_ms"] * 100, 3)
        effects.append(row)
    return effects


def mean_ci95(values: Sequence[float]) -> dict[str, float]:
    """Mean, median, standard deviation and the 95 % confidence interval of the mean (Student's t)."""
    n = len(values)
    out = {"n": float(n), "mean": round(statistics.fmean(values), 3), "median": round(statistics.median(values), 3)}
    if n >= 2:
        sd = statistics.stdev(values)
        half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
        out |= {"sd": round(sd, 3), "ci95_low": round(out["mean"] - half, 3), "ci95_high": round(out["mean"] + half, 3)}
    return out


def verdict(summary: Mapping[str, float], bound_pct: float) -> str:
    """Whether the effect is resolved against ``bound_pct``: within (the interval's top is at most the
    bound), above (its bottom is above), or not resolved (the interval straddles the bound)."""
    if "ci95_high" not in summary:
        return "not resolved (one pair: no interval)"
    if summary["ci95_high"] <= bound_pct:
        return f"within {bound_pct:g} %"
    if summary["ci95_low"] > bound_pct:
        return f"above {bound_pct:g} %"
    return f"not resolved (the interval straddles {bound_pct:g} %)"


def summarize(
    figures: Sequence[Mapping[str, Any]], *, bound_pct: float, windows: Sequence[Window] | None = None
) -> dict[str, Any]:
    """Effects per pair, their summaries and verdicts against ``bound_pct``, and the windows' own figures."""
    effects = pair_effects(figures)
    out: dict[str, Any] = {"windows": list(figures), "pair_effects": effects}
    for key in ("throughput_cost_pct", "latency_cost_pct"):
        values = [e[key] for e in effects if key in e]
        if values:
            summary = mean_ci95(values)
            out[key] = summary
            out[key.replace("_pct", "_verdict")] = verdict(summary, bound_pct)
    if windows:
        out["switch_late_ms_max"] = round(max(w.late_s for w in windows) * 1000, 3)
    return out
