"""The load-test report: per-variant summary (CSV, Markdown, HTML) and PNG plots from Locust runs.

``python -m loadtest.report RESULTS_DIR [RESULTS_DIR ...] [-o OUT]`` reads every run
found under the folders: Locust's ``PREFIX_stats.csv`` and ``PREFIX_stats_history.csv``
(``--csv PREFIX --csv-full-history``) and the ``PREFIX_loadtest.json`` side file this
package writes when a run ends (variant, final totals, pod timeline, cold start,
in-pod latency breakdown). Locust never loads this package (it skips ``_*.py`` files).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest._names import images_in

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    "variant",
    "run",
    "user_classes",
    "requests",
    "failures",
    "failure_ratio",
    "requests_s",
    "images_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "avg_ms",
    "max_users",
    "max_pods",
    "cold_start_s",
    "first_response_s",
    "device_ms",
    "queue_ms",
    "decode_ms",
    "server_other_ms",
    "network_ms",
    "mean_batch_size",
    "slo_passed",
]
BREAKDOWN_PARTS = [
    ("device_ms", "on device"),
    ("queue_ms", "queue / batching wait"),
    ("decode_ms", "decode"),
    ("server_other_ms", "rest of server"),
    ("network_ms", "network, ingress, queue-proxy"),
]
PERCENTILES = [("50%", "p50"), ("95%", "p95"), ("99%", "p99")]


class ReportError(RuntimeError):
    """Raised when no run can be read from the folders given."""


def _number(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def find_runs(folders: Sequence[Path]) -> list[Path]:
    """Every run prefix (``.../PREFIX`` of ``PREFIX_stats.csv``) under the folders, sorted."""
    prefixes = set()
    for folder in folders:
        for stats in folder.rglob("*_stats.csv"):
            prefixes.add(stats.with_name(stats.name[: -len("_stats.csv")]))
    return sorted(prefixes)


def load_run(prefix: Path) -> dict[str, Any]:
    """Read one run: ``{"prefix", "stats", "history", "side"}`` (DataFrames and the side JSON or ``{}``)."""
    import pandas as pd

    stats = pd.read_csv(f"{prefix}_stats.csv")
    history_path = Path(f"{prefix}_stats_history.csv")
    history = pd.read_csv(history_path, na_values=["N/A"]) if history_path.is_file() else pd.DataFrame()
    side_path = Path(f"{prefix}_loadtest.json")
    side = json.loads(side_path.read_text()) if side_path.is_file() else {}
    return {"prefix": prefix, "stats": stats, "history": history, "side": side}


def _run_label(prefix: Path, roots: Sequence[Path]) -> str:
    for root in roots:
        try:
            return str(prefix.relative_to(root.parent))
        except ValueError:
            continue
    return str(prefix)


def summarize(run: dict[str, Any], *, label: str = "") -> dict[str, Any]:
    """One summary row for a run; final totals from the side file when present, else from the CSV."""
    stats, side, history = run["stats"], run["side"], run["history"]
    per_name = stats[stats["Name"] != "Aggregated"]
    aggregated = stats[stats["Name"] == "Aggregated"]
    totals = side.get("totals") or {}
    names = side.get("names") or {}
    if totals:
        requests, failures = totals["requests"], totals["failures"]
        requests_s = _number(totals["requests_s"])
        p50, p95, p99, avg = (_number(totals[k]) for k in ("p50_ms", "p95_ms", "p99_ms", "avg_ms"))
        image_weights = {name: (v["requests"], v["images_per_request"]) for name, v in names.items()}
    else:
        row = aggregated.iloc[0] if len(aggregated) else {}
        requests, failures = int(row.get("Request Count", 0)), int(row.get("Failure Count", 0))
        requests_s = _number(row.get("Requests/s"))
        p50, p95, p99 = (_number(row.get(k)) for k in ("50%", "95%", "99%"))
        avg = _number(row.get("Average Response Time"))
        image_weights = {n: (c, images_in(n)) for n, c in zip(per_name["Name"], per_name["Request Count"], strict=True)}
    counted = sum(count for count, _ in image_weights.values())
    images_per_request = (sum(c * i for c, i in image_weights.values()) / counted) if counted else 1.0
    breakdown = side.get("breakdown_ms") or {}
    slo = side.get("slo") or {}
    slo_set = slo.get("p95_ms") is not None or slo.get("max_failure_ratio") is not None
    max_users = int(history["User Count"].max()) if len(history) else None
    return {
        "variant": side.get("variant") or Path(run["prefix"]).parent.name,
        "run": label or str(run["prefix"]),
        "user_classes": " ".join(side.get("user_classes") or []),
        "requests": int(requests),
        "failures": int(failures),
        "failure_ratio": failures / requests if requests else math.nan,
        "requests_s": requests_s,
        "images_s": requests_s * images_per_request,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "avg_ms": avg,
        "max_users": max_users,
        "max_pods": side.get("max_pods"),
        "cold_start_s": side.get("cold_start_s"),
        "first_response_s": side.get("first_response_s"),
        **{key: breakdown.get(key) for key, _ in BREAKDOWN_PARTS},
        "mean_batch_size": breakdown.get("mean_batch_size"),
        "slo_passed": (not slo.get("violations")) if slo_set else None,
    }


def build_summary(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> Any:
    import pandas as pd

    rows = [summarize(run, label=label) for run, label in zip(runs, labels, strict=True)]
    frame = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    return frame.sort_values(["variant", "run"], kind="stable").reset_index(drop=True)


# --- tables -----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1 and value != 0 else f"{value:,.1f}"
    return str(value)


def to_markdown(frame: Any, columns: Sequence[str]) -> str:
    """A GitHub Markdown table (without pandas' optional ``tabulate``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


MAIN_COLUMNS = [
    "variant",
    "run",
    "requests_s",
    "images_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "failures",
    "max_pods",
    "cold_start_s",
]
BREAKDOWN_COLUMNS = [
    "variant",
    "run",
    "avg_ms",
    "device_ms",
    "queue_ms",
    "decode_ms",
    "server_other_ms",
    "network_ms",
    "mean_batch_size",
]


def write_tables(frame: Any, out: Path, plots: Sequence[str]) -> list[Path]:
    frame.to_csv(out / "summary.csv", index=False)
    markdown = ["# Load test summary", "", to_markdown(frame, MAIN_COLUMNS)]
    if frame[[c for c, _ in BREAKDOWN_PARTS]].notna().any().any():
        markdown += ["## Where the time goes (mean per request, ms)", "", to_markdown(frame, BREAKDOWN_COLUMNS)]
    markdown += [f"![{name}]({name})" for name in plots]
    (out / "summary.md").write_text("\n".join(markdown) + "\n")
    table = frame.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:,.2f}", border=0)
    images = "".join(f'<p><img src="{html.escape(name)}" alt="{html.escape(name)}"></p>' for name in plots)
    (out / "summary.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>Load test summary</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:right}img{max-width:100%}</style>"
        f"<h1>Load test summary</h1>{table}{images}\n"
    )
    return [out / "summary.csv", out / "summary.md", out / "summary.html"]


# --- plots ------------------------------------------------------------------------------------


def _aggregated_history(run: dict[str, Any]) -> Any:
    history = run["history"]
    if not len(history):
        return history
    rows = history[history["Name"] == "Aggregated"].copy()
    rows["t_s"] = rows["Timestamp"] - rows["Timestamp"].min()
    return rows


def plot_latency_vs_users(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> bool:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    drawn = False
    for run, label in zip(runs, labels, strict=True):
        rows = _aggregated_history(run)
        if not len(rows):
            continue
        rows = rows[(rows["User Count"] > 0) & rows["50%"].notna()]
        if not len(rows):
            continue
        grouped = rows.groupby("User Count")[[column for column, _ in PERCENTILES]].median()
        for axis, (column, name) in zip(axes, PERCENTILES, strict=True):
            axis.plot(grouped.index, grouped[column], marker="o", label=label)
            axis.set_title(f"{name} latency")
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    for axis in axes:
        axis.set_xlabel("concurrent users")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("response time (ms)")
    axes[-1].legend(fontsize="small")
    fig.suptitle("Latency percentiles against users (median of the history samples at each user count)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_throughput_pods(runs: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> bool:
    import matplotlib.pyplot as plt

    usable = [(run, label) for run, label in zip(runs, labels, strict=True) if len(_aggregated_history(run))]
    if not usable:
        return False
    fig, axes = plt.subplots(len(usable), 1, figsize=(11, 3.2 * len(usable)), squeeze=False)
    for axis, (run, label) in zip(axes[:, 0], usable, strict=True):
        rows = _aggregated_history(run)
        start = rows["Timestamp"].min()
        summary = summarize(run)
        ratio = summary["images_s"] / summary["requests_s"] if summary["requests_s"] else 1.0
        axis.plot(rows["t_s"], rows["Requests/s"], label="requests/s", color="tab:blue")
        axis.plot(
            rows["t_s"], rows["Requests/s"] * ratio, label="images/s", color="tab:blue", linestyle="--", alpha=0.6
        )
        axis.set_ylabel("throughput (1/s)")
        axis.set_ylim(bottom=0)
        axis.set_xlabel("time since start (s)")
        axis.grid(alpha=0.3)
        right = axis.twinx()
        right.plot(rows["t_s"], rows["User Count"], color="tab:gray", linestyle=":", label="users")
        timeline = run["side"].get("pod_timeline") or []
        services = sorted({sample["service"] for sample in timeline})
        for service in services:
            samples = [s for s in timeline if s["service"] == service]
            right.step(
                [s["t"] - start for s in samples],
                [s["ready_pods"] for s in samples],
                where="post",
                color="tab:orange",
                linewidth=2,
                label=f"ready pods ({service})",
            )
        right.set_ylabel("users / ready pods")
        right.set_ylim(bottom=0)
        note = "" if timeline else " (no pod watcher)"
        axis.set_title(f"{label}{note}")
        handles = axis.get_legend_handles_labels()
        more = right.get_legend_handles_labels()
        axis.legend(handles[0] + more[0], handles[1] + more[1], loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_variants(frame: Any, path: Path) -> bool:
    import matplotlib.pyplot as plt

    if not len(frame):
        return False
    labels = [
        v if (frame["variant"] == v).sum() == 1 else f"{v}\n{r}"
        for v, r in zip(frame["variant"], frame["run"], strict=True)
    ]
    panels = [
        ("images_s", "images/s (higher is better)"),
        ("p95_ms", "p95 latency, ms"),
        ("failure_ratio", "failure ratio"),
        ("cold_start_s", "scale-from-zero cold start, s"),
        ("max_pods", "max ready pods"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.5 * len(frame) + 3))
    for axis, (column, title) in zip(axes, panels, strict=True):
        values = [_number(v) for v in frame[column]]
        if column == "failure_ratio":
            values, title = [100 * v for v in values], "failures, % of requests"
        shown = [0.0 if math.isnan(v) else v for v in values]
        if all(math.isnan(v) for v in values):
            axis.text(0.5, 0.5, "not measured", ha="center", va="center", transform=axis.transAxes, color="gray")
            axis.set_xticks([])
        bars = axis.barh(range(len(frame)), shown, color="tab:green" if column == "images_s" else "tab:blue")
        for bar, value in zip(bars, values, strict=True):
            text = "–" if math.isnan(value) else f"{value:,.3g}"
            axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}", va="center", fontsize="small")
        axis.set_yticks(range(len(frame)), labels if axis is axes[0] else [""] * len(frame), fontsize="small")
        axis.invert_yaxis()
        axis.set_title(title, fontsize="medium")
        axis.margins(x=0.25)
        axis.set_xlim(left=0, right=max(max(shown) * 1.3, 1e-9) if max(shown) > 0 else 1)
        axis.grid(axis="x", alpha=0.3)
    fig.suptitle("Variants side by side")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_breakdown(frame: Any, path: Path) -> bool:
    import matplotlib.pyplot as plt

    columns = [c for c, _ in BREAKDOWN_PARTS]
    rows = frame[frame[columns].notna().any(axis=1)]
    if not len(rows):
        return False
    fig, axis = plt.subplots(figsize=(12, 0.6 * len(rows) + 2.5))
    left = [0.0] * len(rows)
    for column, name in BREAKDOWN_PARTS:
        values = [0.0 if math.isnan(_number(v)) else _number(v) for v in rows[column]]
        axis.barh(range(len(rows)), values, left=left, label=name)
        left = [a + b for a, b in zip(left, values, strict=True)]
    axis.set_yticks(
        range(len(rows)), [f"{v} ({r})" for v, r in zip(rows["variant"], rows["run"], strict=True)], fontsize="small"
    )
    axis.invert_yaxis()
    axis.set_xlabel("mean time per request (ms)")
    axis.set_title("Where a request's time goes (server histograms, before/after the run)")
    axis.legend(
        fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(BREAKDOWN_PARTS), frameon=False
    )
    axis.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --- command ----------------------------------------------------------------------------------


def make_report(folders: Sequence[Path], out: Path) -> tuple[Any, list[Path]]:
    """Read the runs under ``folders`` and write the summary and plots to ``out``.

    Returns:
        The summary DataFrame and the files written.

    Raises:
        ReportError: When no run is found.
    """
    import matplotlib

    matplotlib.use("Agg")
    prefixes = find_runs(folders)
    if not prefixes:
        raise ReportError(f"no Locust run (*_stats.csv) under {', '.join(map(str, folders))}")
    runs = [load_run(prefix) for prefix in prefixes]
    labels = [_run_label(prefix, folders) for prefix in prefixes]
    frame = build_summary(runs, labels)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if plot_latency_vs_users(runs, labels, out / "latency_vs_users.png"):
        plots.append("latency_vs_users.png")
    if plot_throughput_pods(runs, labels, out / "throughput_pods.png"):
        plots.append("throughput_pods.png")
    if plot_variants(frame, out / "variants.png"):
        plots.append("variants.png")
    if plot_breakdown(frame, out / "breakdown.png"):
        plots.append("breakdown.png")
    written = write_tables(frame, out, plots) + [out / name for name in plots]
    return frame, written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.report", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="folders holding Locust --csv outputs")
    parser.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        default=Path("loadtest-report"),
        help="where to write summary.{csv,md,html} and the PNG plots (default: loadtest-report)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    missing = [str(p) for p in args.results if not p.is_dir()]
    if missing:
        parser.error(f"not a folder: {', '.join(missing)}")
    try:
        frame, written = make_report(args.results, args.output_dir)
    except ReportError as e:
        logger.error("%s", e)
        return 1
    print(to_markdown(frame, MAIN_COLUMNS), end="")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
