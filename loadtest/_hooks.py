"""Locust wiring shared by the locustfiles: custom options, shape choice, pod watcher, metrics, SLO gate.

Imported by ``users.py`` and ``shapes.py``; Python imports it once, so its listeners are
registered once. Each option is a command-line flag with a ``LOCUST_`` environment
variable (Locust's own parser), read only after parsing. The master (or the single
local process) owns the run-wide work: choosing the shape, watching pods, scraping
``/metrics``, the SLO gate and the run's JSON side file; workers only send requests
and report when their first request went out and their first answer came back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from locust import events
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest import _metrics
from loadtest._names import images_in
from loadtest._watcher import PodWatcher, WatcherError, load_api_client

logger = logging.getLogger(__name__)

SIDE_FILE_SUFFIX = "_loadtest.json"
SHAPES = ("none", "step", "spike", "soak")


@events.init_command_line_parser.add_listener
def add_options(parser: Any) -> None:
    """Register this package's options (each also settable through its ``LOCUST_`` variable)."""
    group = parser.add_argument_group("densenet-knative", "Options of the DenseNet-121 predictor load test")
    group.add_argument(
        "--variant",
        env_var="LOCUST_VARIANT",
        default="",
        help="Variant slug the run is reported under (default: first DNS label of --host-header or --host)",
    )
    group.add_argument(
        "--host-header",
        env_var="LOCUST_HOST_HEADER",
        default="",
        help="Host header for every request, e.g. densenet121-eager-fp32.default.example.com to reach "
        "a Knative service through the Kourier ingress without DNS",
    )
    group.add_argument(
        "--model-name", env_var="LOCUST_MODEL_NAME", default="densenet121", help="Model name in the predictor's URLs"
    )
    group.add_argument(
        "--image-sizes",
        env_var="LOCUST_IMAGE_SIZES",
        default="vga",
        help="Comma-separated payload photo sizes: vga, hd, fhd, 5mp, 4k, 12mp or WxH; requests pick "
        "one at random and are grouped by it",
    )
    group.add_argument(
        "--images-per-request",
        env_var="LOCUST_IMAGES_PER_REQUEST",
        default="1",
        help="Images per request; a comma-separated list picks one at random per request",
    )
    group.add_argument("--top-k", env_var="LOCUST_TOP_K", type=int, default=5, help="top_k asked for and checked")
    group.add_argument(
        "--tensor-dtype",
        env_var="LOCUST_TENSOR_DTYPE",
        choices=("uint8", "fp32", "fp16"),
        default="uint8",
        help="Datatype of the tensor users' preprocessed input (fp16: binary only)",
    )
    group.add_argument(
        "--think-time",
        env_var="LOCUST_THINK_TIME",
        type=float,
        default=0.0,
        help="Seconds each user waits between requests (0: closed loop, as fast as answers come)",
    )
    group.add_argument(
        "--shape",
        env_var="LOCUST_SHAPE",
        choices=SHAPES,
        default="none",
        help="Load shape: none (plain -u/-r/-t), step, spike (from zero) or soak",
    )
    group.add_argument(
        "--steps",
        env_var="LOCUST_STEPS",
        type=int,
        default=5,
        help="step shape: number of steps up to -u users, each held -t/steps seconds",
    )
    group.add_argument(
        "--step-time",
        env_var="LOCUST_STEP_TIME",
        type=float,
        default=60.0,
        help="step shape: seconds per step when -t is not given",
    )
    group.add_argument(
        "--spike-wait",
        env_var="LOCUST_SPIKE_WAIT",
        type=float,
        default=0.0,
        help="spike shape: seconds at 0 users before the spike",
    )
    group.add_argument(
        "--spike-zero-timeout",
        env_var="LOCUST_SPIKE_ZERO_TIMEOUT",
        type=float,
        default=0.0,
        help="spike shape: with the pod watcher, also wait up to this many seconds for the revision to "
        "scale to zero before the spike",
    )
    group.add_argument(
        "--kube-namespace",
        env_var="LOCUST_KUBE_NAMESPACE",
        default="",
        help="Namespace of the Knative services; enables the pod watcher and per-pod /metrics scraping",
    )
    group.add_argument(
        "--kube-services",
        env_var="LOCUST_KUBE_SERVICES",
        default="",
        help="Comma-separated Knative services to watch (default: the variant)",
    )
    group.add_argument("--kube-context", env_var="LOCUST_KUBE_CONTEXT", default="", help="kubeconfig context")
    group.add_argument(
        "--metrics-url",
        env_var="LOCUST_METRICS_URL",
        default="",
        help="Predictor /metrics URL scraped before and after the run (default: HOST/metrics, or every "
        "ready pod through the API server with --kube-namespace; 'off' disables)",
    )
    group.add_argument(
        "--metrics-port",
        env_var="LOCUST_METRICS_PORT",
        type=int,
        default=8080,
        help="Container port of /metrics for the per-pod scrape",
    )
    group.add_argument(
        "--slo-p95-ms",
        env_var="LOCUST_SLO_P95_MS",
        type=float,
        default=None,
        help="SLO: the run fails (exit 1) when the overall p95 exceeds this many ms",
    )
    group.add_argument(
        "--raw-latency-dir",
        env_var="LOCUST_RAW_LATENCY_DIR",
        default="",
        help="Folder where every process that sends requests writes each successful request's end (Unix "
        "seconds) and response time (ms, to the microsecond), one request per line (latency-<pid>.txt): "
        "Locust rounds times below 100 ms to whole ms in its percentiles",
    )
    group.add_argument(
        "--slo-max-failure-ratio",
        env_var="LOCUST_SLO_MAX_FAILURE_RATIO",
        type=float,
        default=None,
        help="SLO: the run fails (exit 1) when failed/all requests exceeds this ratio, e.g. 0.01",
    )


def default_variant(host: str | None, host_header: str = "") -> str:
    """The variant slug a run is reported under when ``--variant`` is not given."""
    if host_header:
        return host_header.split(":")[0].split(".")[0]
    parts = urlsplit(host or "")
    hostname = parts.hostname or ""
    if hostname and not hostname.replace(".", "").isdigit() and hostname != "localhost":
        return hostname.split(".")[0]
    return (parts.netloc or "local").replace(":", "-")


# --- SLO gate -------------------------------------------------------------------------------------


def evaluate_slo(total: Any, *, p95_ms: float | None, max_failure_ratio: float | None) -> list[str]:
    """Return the SLO violations of a run's aggregated stats (an empty list when it passes).

    Args:
        total: Locust's ``environment.stats.total`` (a ``StatsEntry``).
        p95_ms: Highest acceptable 95th percentile in ms, or ``None``.
        max_failure_ratio: Highest acceptable failed/all ratio, or ``None``.
    """
    if p95_ms is None and max_failure_ratio is None:
        return []
    if total.num_requests == 0:
        return ["no request was made"]
    violations = []
    if p95_ms is not None:
        p95 = total.get_response_time_percentile(0.95)
        if p95 > p95_ms:
            violations.append(f"p95 {p95:.0f} ms > {p95_ms:g} ms")
    if max_failure_ratio is not None and total.fail_ratio > max_failure_ratio:
        violations.append(
            f"failure ratio {total.fail_ratio:.4f} > {max_failure_ratio:g} "
            f"({total.num_failures} of {total.num_requests})"
        )
    return violations


# --- run state ------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """What this process learnt during the run (one per process)."""

    first_request_t: float | None = None
    first_success_t: float | None = None
    test_start_t: float | None = None
    test_stop_t: float | None = None
    watcher: PodWatcher | None = None
    metrics_before: dict[str, float] | None = None
    metrics_delta: dict[str, float] | None = None
    metrics_source: str = ""
    server_variant: str | None = None
    workers: int = 0
    environment: Environment | None = None
    raw_latencies_ms: list[tuple[float, float]] | None = None  # (end s, ms), a list only with --raw-latency-dir
    slo_violations: list[str] = dataclasses.field(default_factory=list)

    def saw(self, start: float, end: float, ok: bool) -> None:
        if self.first_request_t is None or start < self.first_request_t:
            self.first_request_t = start
        if ok and (self.first_success_t is None or end < self.first_success_t):
            self.first_success_t = end


STATE = RunState()


def _is_worker(environment: Environment) -> bool:
    return isinstance(environment.runner, WorkerRunner)


def _options(environment: Environment) -> Any:
    return environment.parsed_options


def variant_of(environment: Environment) -> str:
    options = _options(environment)
    if getattr(options, "variant", ""):
        return options.variant
    return STATE.server_variant or default_variant(environment.host, getattr(options, "host_header", ""))


def _ask_server_variant(environment: Environment) -> str | None:
    """The slug the predictor reports in its v2 model metadata (``versions[0]``), if it does."""
    import requests

    options = _options(environment)
    headers = {"Host": options.host_header} if options.host_header else {}
    try:
        response = requests.get(
            f"{(environment.host or '').rstrip('/')}/v2/models/{options.model_name}", headers=headers, timeout=5
        )
        versions = response.json().get("versions") if response.ok else None
    except (requests.RequestException, ValueError) as e:
        logger.debug("no model metadata: %s", e)
        return None
    return str(versions[0]) if isinstance(versions, list) and versions else None


@events.request.add_listener
def _on_request(
    request_type: str, name: str, response_time: float, exception: Any = None, start_time: float | None = None, **_: Any
) -> None:
    end = time.time()
    start = start_time if start_time is not None else end - response_time / 1000.0
    STATE.saw(start, start + response_time / 1000.0, exception is None)
    if exception is None and STATE.raw_latencies_ms is not None:
        STATE.raw_latencies_ms.append((end, response_time))


def write_raw_latencies(folder: str, latencies_ms: list[tuple[float, float]] | None) -> Path | None:
    """This process's successful requests, one per line: end (Unix s) and response time (ms, microsecond precision)."""
    if not folder or not latencies_ms:
        return None
    path = Path(folder, f"latency-{os.getpid()}.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{end:.6f} {ms:.3f}\n" for end, ms in latencies_ms))
    return path


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict[str, Any]) -> None:
    data["densenet_first"] = [STATE.first_request_t, STATE.first_success_t]


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any]) -> None:
    first = data.get("densenet_first")
    if first and first[0] is not None:
        STATE.saw(first[0], first[1] if first[1] is not None else math.inf, first[1] is not None)


def _select_shape(environment: Environment, runner: Any) -> None:
    """Make ``--shape`` decide, not the order Locust found the shape classes in."""
    name = getattr(_options(environment), "shape", "none") or "none"
    if name == "none":
        environment.shape_class = None
        return
    available = environment.available_shape_classes or {}
    chosen = next((s for s in available.values() if getattr(s, "shape_name", None) == name), None)
    if chosen is None:
        raise SystemExit(f"--shape {name}: no such shape class loaded (use -f loadtest/)")
    chosen.runner = runner
    environment.shape_class = chosen
    logger.info("load shape: %s (%s)", name, type(chosen).__name__)


def _prune_user_classes(environment: Environment) -> None:
    """With ``--tags``/``--exclude-tags`` and no user class named, drop the users none of whose tasks remain."""
    options = _options(environment)
    tags = set(getattr(options, "tags", None) or [])
    excluded = set(getattr(options, "exclude_tags", None) or [])
    if not (tags or excluded) or getattr(options, "user_classes", None):
        return

    def runs(user_class: Any) -> bool:
        for task in user_class.tasks:
            task_tags = getattr(task, "locust_tag_set", set())
            if (not tags or task_tags & tags) and not task_tags & excluded:
                return True
        return False

    kept = [u for u in environment.user_classes if runs(u)]
    if kept and len(kept) != len(environment.user_classes):
        logger.info("tags select user classes: %s", ", ".join(u.__name__ for u in kept))
        environment.user_classes[:] = kept


def _scrape(environment: Environment) -> dict[str, float] | None:
    options = _options(environment)
    url = getattr(options, "metrics_url", "")
    if url == "off":
        return None
    try:
        if STATE.watcher is not None and not url:
            texts = STATE.watcher.scrape_pods(port=options.metrics_port)
            STATE.metrics_source = f"{len(texts)} pod(s) via the API server"
            return _metrics.merge(_metrics.parse(text) for text in texts.values())
        import requests

        target = url or f"{(environment.host or '').rstrip('/')}/metrics"
        headers = {"Host": options.host_header} if options.host_header else {}
        response = requests.get(target, headers=headers, timeout=10)
        response.raise_for_status()
        STATE.metrics_source = target
        return _metrics.parse(response.text)
    except Exception as e:
        logger.warning("cannot scrape predictor metrics: %s", e)
        return None


@events.init.add_listener
def _on_init(environment: Environment, runner: Any = None, **_: Any) -> None:
    global STATE
    STATE = RunState(environment=environment)
    options = _options(environment)
    if getattr(options, "raw_latency_dir", ""):  # kept only when asked for: a soak run sends millions
        STATE.raw_latencies_ms = []
    if options is None or not hasattr(options, "shape"):
        return  # created by a test or a library user without our options
    _prune_user_classes(environment)
    if _is_worker(environment):
        return
    _select_shape(environment, runner)
    if options.kube_namespace:
        services = [s for s in options.kube_services.split(",") if s] or [variant_of(environment)]
        try:
            api = load_api_client(options.kube_context or None)
            STATE.watcher = PodWatcher(api, options.kube_namespace, services).start()
        except WatcherError as e:
            logger.error("pod watcher disabled: %s", e)
    if environment.shape_class is not None and STATE.watcher is not None:
        watcher = STATE.watcher
        environment.shape_class.ready_pods = watcher.ready_pods  # type: ignore[attr-defined]


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    if _is_worker(environment) or not hasattr(_options(environment), "shape"):
        return
    STATE.test_start_t = time.time()
    _count_workers(environment)
    if STATE.watcher is None and getattr(_options(environment), "shape", "") == "spike":
        # Through the route, a scrape would wake a revision scaled to zero before the spike.
        logger.info("spike: no /metrics scrape before the run (the revision's counters start at zero)")
        STATE.metrics_before = {}
        return
    STATE.metrics_before = _scrape(environment)


def _count_workers(environment: Environment) -> None:
    if isinstance(environment.runner, MasterRunner):
        STATE.workers = max(STATE.workers, len(environment.runner.clients))


@events.spawning_complete.add_listener
def _on_spawning_complete(user_count: int, **_: Any) -> None:
    if STATE.environment is not None:
        _count_workers(STATE.environment)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    if _is_worker(environment) or not hasattr(_options(environment), "shape"):
        return
    _count_workers(environment)
    STATE.test_stop_t = time.time()
    after = _scrape(environment)
    if after is not None:
        STATE.metrics_delta = _metrics.delta(STATE.metrics_before or {}, after)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _totals(entry: Any) -> dict[str, Any]:
    """Final numbers of one stats entry (Locust's CSV lags up to a second behind them)."""
    done = entry.num_requests > 0
    return {
        "requests": entry.num_requests,
        "failures": entry.num_failures,
        "requests_s": entry.total_rps if done else 0.0,
        "avg_ms": entry.avg_response_time if done else None,
        "p50_ms": entry.get_response_time_percentile(0.5) if done else None,
        "p95_ms": entry.get_response_time_percentile(0.95) if done else None,
        "p99_ms": entry.get_response_time_percentile(0.99) if done else None,
        "max_ms": entry.max_response_time if done else None,
    }


def run_summary(environment: Environment) -> dict[str, Any]:
    """The run's JSON side file: variant, timing, cold start, pod timeline, in-pod breakdown, SLO."""
    options = _options(environment)
    total = environment.stats.total
    watcher = STATE.watcher
    first_response_s = None
    if STATE.first_request_t is not None and _finite(STATE.first_success_t) is not None:
        first_response_s = STATE.first_success_t - STATE.first_request_t  # type: ignore[operator]
    pods_at_first = watcher.ready_at(STATE.first_request_t) if watcher and STATE.first_request_t else None
    cold = pods_at_first == 0
    client_mean = total.avg_response_time if total.num_requests else None
    delta = (
        {k: v for k, v in STATE.metrics_delta.items() if k.startswith("densenet_")}
        if STATE.metrics_delta is not None
        else None
    )
    return {
        "schema": 1,
        "variant": variant_of(environment),
        "host": environment.host,
        "host_header": options.host_header,
        "user_classes": sorted(u.__name__ for u in environment.user_classes),
        "shape": options.shape if environment.shape_class is not None else "none",
        "image_sizes": options.image_sizes,
        "images_per_request": options.images_per_request,
        "processes": getattr(options, "processes", None),
        "workers": STATE.workers,
        "test_start_t": STATE.test_start_t,
        "test_stop_t": STATE.test_stop_t,
        "first_request_t": STATE.first_request_t,
        "first_success_t": _finite(STATE.first_success_t),
        "first_response_s": first_response_s,
        "ready_pods_at_first_request": pods_at_first,
        "cold_start_s": first_response_s if cold else None,
        "max_pods": watcher.max_pods() if watcher else None,
        "pod_timeline": [dataclasses.asdict(s) for s in watcher.timeline] if watcher else [],
        "pod_watcher_errors": watcher.errors[-5:] if watcher else [],
        "metrics_source": STATE.metrics_source,
        "metrics_delta": delta,
        "breakdown_ms": _metrics.breakdown(delta, client_mean_ms=client_mean) if delta is not None else None,
        "totals": _totals(total),
        "names": {
            entry.name: {**_totals(entry), "images_per_request": images_in(entry.name)}
            for entry in environment.stats.entries.values()
        },
        "slo": {
            "p95_ms": options.slo_p95_ms,
            "max_failure_ratio": options.slo_max_failure_ratio,
            "violations": STATE.slo_violations,
        },
    }


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    options = _options(environment)
    write_raw_latencies(getattr(options, "raw_latency_dir", ""), STATE.raw_latencies_ms)  # workers too
    if _is_worker(environment) or not hasattr(options, "shape"):
        return
    if STATE.watcher is not None:
        STATE.watcher.stop()
    STATE.slo_violations = evaluate_slo(
        environment.stats.total, p95_ms=options.slo_p95_ms, max_failure_ratio=options.slo_max_failure_ratio
    )
    if options.slo_p95_ms is not None or options.slo_max_failure_ratio is not None:
        if STATE.slo_violations:
            logger.error("SLO missed: %s", "; ".join(STATE.slo_violations))
            environment.process_exit_code = 1
        else:
            logger.info(
                "SLO met (p95 <= %s ms, failure ratio <= %s)", options.slo_p95_ms, options.slo_max_failure_ratio
            )
            environment.process_exit_code = 0
    if not options.variant and environment.host:
        # Asked only now: at the start, a request would wake a revision scaled to zero.
        STATE.server_variant = _ask_server_variant(environment)
    summary = run_summary(environment)
    if summary["cold_start_s"] is not None:
        logger.info("scale from zero: first answer %.2f s after the first request", summary["cold_start_s"])
    prefix = getattr(options, "csv_prefix", None)
    if prefix:
        path = Path(f"{prefix}{SIDE_FILE_SUFFIX}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=str))
        os.replace(tmp, path)
        logger.info("run summary written to %s", path)
