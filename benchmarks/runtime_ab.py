"""A/B of a setting switched at run time inside one running server, in alternating windows.

Comparing two fresh servers measures the setting plus everything that differs between two
starts and two moments of the machine: on the H100 machines the same server's throughput
spread 5.7-8.3 % run to run, more than the 3 % the metrics overhead is allowed (issue 5). Here
one server under one continuous load switches the setting at window boundaries in blocks of
four windows, on, off, off, on: a drift that is linear over a block falls equally on both arms
and cancels, so every block gives one effect (on the H100 host the per-block effects spread
2-3x less than those of adjacent pairs), and the blocks' mean comes with a 95 % confidence
interval. Throughput and the median latency of a window are computed from the client's own
record of every request (end time and response time, Locust's ``--raw-latency-dir``); requests
that end in the first ``guard_s`` of a window are left out, as they ran partly before the switch.

Run as a script, it pools the blocks of several serve_bench records (their ``metrics_toggle``)
into one interval, e.g. runs on three machines::

    python benchmarks/runtime_ab.py --users 128 benchmarks/results/*-s9-{blocks,toggle24,final}.json \\
        --plot toggle-128.png      # each record's windows over time, metrics on and off apart

The pooled interval treats every block as independent; each record's own mean is listed beside it,
as machines differ more from each other than blocks within one run do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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


def abba(blocks: int) -> list[bool]:
    """The arm of each window, ``True`` for on: ``blocks`` times (on, off, off, on)."""
    return [True, False, False, True] * blocks


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


def block_effects(figures: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each block of four windows (0-3, 4-7, ...; two on, two off) as one effect of switching on, in %:
    ``throughput_cost_pct`` = (off - on) / off of the mean images/s (positive: on is slower), and
    ``latency_cost_pct`` = (on - off) / off of the mean p50 (positive: on is slower)."""
    effects: list[dict[str, Any]] = []
    for j in range(0, len(figures) - 3, 4):
        block = figures[j : j + 4]
        row: dict[str, Any] = {"block": j // 4 + 1}
        for key, name, sign in (("img_s", "throughput_cost_pct", -1), ("p50_ms", "latency_cost_pct", 1)):
            on = [w[key] for w in block if w["on"] and key in w]
            off = [w[key] for w in block if not w["on"] and key in w]
            if len(on) == len(off) == 2 and sum(off):
                row[name] = round(sign * (sum(on) - sum(off)) / sum(off) * 100, 3)
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
        return "not resolved (one block: no interval)"
    if summary["ci95_high"] <= bound_pct:
        return f"within {bound_pct:g} %"
    if summary["ci95_low"] > bound_pct:
        return f"above {bound_pct:g} %"
    return f"not resolved (the interval straddles {bound_pct:g} %)"


def _costs(effects: Sequence[Mapping[str, Any]], bound_pct: float) -> dict[str, Any]:
    """Per cost (throughput, latency) of ``effects``: its summary and its verdict against ``bound_pct``."""
    out: dict[str, Any] = {}
    for key in ("throughput_cost_pct", "latency_cost_pct"):
        values = [e[key] for e in effects if key in e]
        if values:
            out[key] = mean_ci95(values)
            out[key.replace("_pct", "_verdict")] = verdict(out[key], bound_pct)
    return out


def summarize(
    figures: Sequence[Mapping[str, Any]], *, bound_pct: float, windows: Sequence[Window] | None = None
) -> dict[str, Any]:
    """Effects per block, their summaries and verdicts against ``bound_pct``, and the windows' own figures."""
    effects = block_effects(figures)
    out: dict[str, Any] = {"windows": list(figures), "block_effects": effects, **_costs(effects, bound_pct)}
    if windows:
        out["switch_late_ms_max"] = round(max(w.late_s for w in windows) * 1000, 3)
    return out


def pooled(records: Sequence[Mapping[str, Any]], users: int, *, bound_pct: float) -> dict[str, Any]:
    """The block effects at ``users`` of several serve_bench records' ``metrics_toggle``, pooled.

    Raises:
        KeyError: a record has no metrics-toggle run at ``users``.
    """
    per_record = [(rec["name"], rec["metrics"]["metrics_toggle"][f"c{users}"]["block_effects"]) for rec in records]
    summaries = []
    for name, effects in per_record:
        mine = [e["throughput_cost_pct"] for e in effects if "throughput_cost_pct" in e]
        mean = round(statistics.fmean(mine), 3) if mine else None
        summaries.append({"name": name, "blocks": len(mine), "mean": mean})
    pooled_effects = [e for _, effects in per_record for e in effects]
    return {"users": users, "records": summaries, **_costs(pooled_effects, bound_pct)}


def plot(records: Sequence[Mapping[str, Any]], users: int, path: Path) -> Path:
    """Each record's windows at ``users`` over time: images/s and p50 per window, on and off apart,
    with the record's mean block effect in its title. One column per record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(records), figsize=(5.5 * len(records), 6), squeeze=False, sharex="col")
    for col, rec in enumerate(records):
        run = rec["metrics"]["metrics_toggle"][f"c{users}"]
        windows = run["windows"]
        for row, (key, label) in enumerate((("img_s", "images/s"), ("p50_ms", "p50 ms"))):
            ax = axes[row][col]
            for on, colour, name in ((True, "tab:red", "on"), (False, "tab:blue", "off")):
                xs = [k for k, w in enumerate(windows) if w["on"] is on and key in w]
                ax.plot(xs, [windows[k][key] for k in xs], "o", color=colour, label=f"metrics {name}")
            ax.plot(range(len(windows)), [w.get(key, float("nan")) for w in windows], "-", color="0.8", zorder=0)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        cost = run.get("throughput_cost_pct", {})
        title = f"{rec['name']}\n{users} users: throughput cost {cost.get('mean', float('nan')):+.2f} %"
        if "ci95_low" in cost:
            title += f" ({cost['ci95_low']:+.2f} .. {cost['ci95_high']:+.2f})"
        axes[0][col].set_title(title, fontsize=9)
        axes[1][col].set_xlabel(f"window ({run['window_s']:g} s each; blocks of on, off, off, on)")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("records", nargs="+", type=Path, help="serve_bench records with a metrics-toggle phase")
    p.add_argument("--users", type=int, required=True, help="the Locust users of the runs to pool")
    p.add_argument("--bound-pct", type=float, default=3.0, help="the bound the verdicts test (default 3)")
    p.add_argument("--plot", type=Path, default=None, help="also draw every record's windows into this PNG")
    args = p.parse_args(argv)
    records = [json.loads(path.read_text()) for path in args.records]
    try:
        result = pooled(records, args.users, bound_pct=args.bound_pct)
    except KeyError:
        p.error(f"every record needs a metrics-toggle run at {args.users} users (metrics.metrics_toggle.c{args.users})")
    print(json.dumps(result, indent=1))
    if args.plot is not None:
        print(f"wrote {plot(records, args.users, args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
