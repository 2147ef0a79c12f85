"""The pod watcher: ready pods of each variant's current Knative revision over time, and per-pod metrics.

A background thread lists then watches the pods labelled
``serving.knative.dev/service in (...)`` in one namespace and keeps, per service, the
number of *ready* pods of its current revision (the Knative Service's
``status.latestReadyRevisionName``; every revision when that cannot be read). Each
change is appended to a timeline of ``(t, service, revision, ready_pods)`` with ``t``
in epoch seconds, the clock Locust's stats history uses. Under Locust the thread is a
greenlet (gevent patches ``threading``); elsewhere it is a plain thread.

Everything goes through the official ``kubernetes`` client, so tests can point it at
a recorded API server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

SERVICE_LABEL = "serving.knative.dev/service"
REVISION_LABEL = "serving.knative.dev/revision"


class WatcherError(RuntimeError):
    """Raised when the cluster cannot be reached or configured."""


@dataclasses.dataclass(frozen=True)
class PodSample:
    """One point of the pod timeline."""

    t: float
    service: str
    revision: str
    ready_pods: int


def load_api_client(context: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient`` from the in-cluster config or the kubeconfig.

    Raises:
        WatcherError: When neither configuration can be loaded.
    """
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config(context=context)
        except (config.ConfigException, OSError) as e:
            raise WatcherError(f"no Kubernetes configuration found (kubeconfig or in-cluster): {e}") from e
    return client.ApiClient()


def _is_ready(pod: Mapping[str, Any]) -> bool:
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


class PodWatcher:
    """Record ready pods of Knative services' current revisions while a load test runs.

    Args:
        api_client: A ``kubernetes.client.ApiClient``.
        namespace: Namespace of the Knative services.
        services: Knative Service names (variant slugs).
        watch_timeout_s: Server-side timeout of one watch call; bounds how long
            :meth:`stop` waits.
        clock: Time source, epoch seconds.
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        services: Sequence[str],
        *,
        watch_timeout_s: int = 5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from kubernetes import client

        if not services:
            raise WatcherError("no Knative service to watch")
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self.namespace = namespace
        self.services = tuple(services)
        self.watch_timeout_s = watch_timeout_s
        self._clock = clock
        self._pods: dict[str, tuple[str, str, bool]] = {}  # pod name -> (service, revision, ready)
        self._revisions: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced = threading.Event()
        self.timeline: list[PodSample] = []
        self.errors: list[str] = []

    @property
    def label_selector(self) -> str:
        return f"{SERVICE_LABEL} in ({','.join(self.services)})"

    # --- state -------------------------------------------------------------------------------

    def current_revision(self, service: str) -> str | None:
        """The Knative Service's latest ready revision, or ``None`` when unknown (then all pods count)."""
        if service not in self._revisions:
            from kubernetes.client.rest import ApiException

            try:
                ksvc = self._custom.get_namespaced_custom_object(
                    "serving.knative.dev", "v1", self.namespace, "services", service
                )
                self._revisions[service] = (ksvc.get("status") or {}).get("latestReadyRevisionName")
            except ApiException as e:
                logger.warning(
                    "cannot read Knative service %s/%s (%s); counting pods of every revision",
                    self.namespace,
                    service,
                    e.status,
                )
                self._revisions[service] = None
        return self._revisions[service]

    def ready_pods(self, service: str | None = None) -> int:
        """Ready pods of ``service``'s current revision now (of the first service by default)."""
        service = service or self.services[0]
        revision = self.current_revision(service)
        with self._lock:
            return sum(
                1
                for svc, rev, ready in self._pods.values()
                if ready and svc == service and (revision is None or rev == revision)
            )

    def ready_pod_names(self, service: str | None = None) -> list[str]:
        service = service or self.services[0]
        revision = self.current_revision(service)
        with self._lock:
            return sorted(
                name
                for name, (svc, rev, ready) in self._pods.items()
                if ready and svc == service and (revision is None or rev == revision)
            )

    def ready_at(self, t: float, service: str | None = None) -> int | None:
        """Ready pods at time ``t`` from the timeline; ``None`` before the first sample."""
        service = service or self.services[0]
        count = None
        for sample in self.timeline:
            if sample.service != service:
                continue
            if sample.t > t:
                break
            count = sample.ready_pods
        return count

    def max_pods(self, service: str | None = None) -> int:
        service = service or self.services[0]
        return max((s.ready_pods for s in self.timeline if s.service == service), default=0)

    def _record(self) -> None:
        now = self._clock()
        for service in self.services:
            count = self.ready_pods(service)
            last = next((s for s in reversed(self.timeline) if s.service == service), None)
            if last is None or last.ready_pods != count:
                self.timeline.append(PodSample(now, service, self.current_revision(service) or "", count))

    def apply(self, kind: str, pod: Mapping[str, Any]) -> None:
        """Apply one watch event (``ADDED``/``MODIFIED``/``DELETED``) and record a change."""
        self._apply(self._pods, kind, pod)
        self._record()

    def _apply(self, pods: dict[str, tuple[str, str, bool]], kind: str, pod: Mapping[str, Any]) -> None:
        metadata = pod.get("metadata") or {}
        labels = metadata.get("labels") or {}
        name = metadata.get("name")
        service = labels.get(SERVICE_LABEL)
        if not name or service not in self.services:
            return
        revision = labels.get(REVISION_LABEL, "")
        current = self._revisions.get(service)
        if current is not None and revision and revision != current and _is_ready(pod):
            self._revisions.pop(service)  # a newer revision became ready: ask the service again
        with self._lock:
            if kind == "DELETED":
                pods.pop(name, None)
            else:
                pods[name] = (service, revision, _is_ready(pod))

    def _reset(self, pods: Iterable[Mapping[str, Any]]) -> None:
        # Build the new state aside and swap it in, so a re-list never records a dip.
        fresh: dict[str, tuple[str, str, bool]] = {}
        for pod in pods:
            self._apply(fresh, "ADDED", pod)
        with self._lock:
            self._pods = fresh
        self._record()

    # --- the loop ----------------------------------------------------------------------------

    def sync(self) -> str | None:
        """List the pods once; returns the list's resourceVersion to watch from."""
        response = self._core.list_namespaced_pod(
            self.namespace, label_selector=self.label_selector, _preload_content=False
        )
        listing = json.loads(response.data)
        self._reset(listing.get("items") or [])
        self._synced.set()
        return (listing.get("metadata") or {}).get("resourceVersion")

    def _watch_once(self, resource_version: str | None) -> None:
        from kubernetes import watch

        stream = watch.Watch()
        kwargs: dict[str, Any] = {
            "label_selector": self.label_selector,
            "timeout_seconds": self.watch_timeout_s,
            "_request_timeout": self.watch_timeout_s + 5,
        }
        if resource_version:
            kwargs["resource_version"] = resource_version
        for event in stream.stream(self._core.list_namespaced_pod, self.namespace, **kwargs):
            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                self.apply(event["type"], event["raw_object"])
            if self._stop.is_set():
                stream.stop()
                break

    def run(self) -> None:
        """List, then watch until :meth:`stop`; re-lists after each watch timeout or error."""
        backoff = 1.0
        while not self._stop.is_set():
            try:
                resource_version = self.sync()
                while not self._stop.is_set():
                    self._watch_once(resource_version)
                    resource_version = self.sync()  # a watch can miss nothing if we re-list
                backoff = 1.0
            except Exception as e:
                message = f"pod watcher: {type(e).__name__}: {e}"
                if not self.errors or self.errors[-1] != message:
                    logger.warning("%s (retrying)", message)
                self.errors.append(message)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def start(self, *, wait_s: float = 10.0) -> PodWatcher:
        """Start the background thread and wait (up to ``wait_s``) for the first listing."""
        self._thread = threading.Thread(target=self.run, name="pod-watcher", daemon=True)
        self._thread.start()
        if not self._synced.wait(wait_s):
            logger.warning("pod watcher: no pod listing after %.0f s", wait_s)
        return self

    def stop(self, *, wait_s: float | None = None) -> None:
        """Stop the thread; the last sample is repeated at the stop time so plots reach the end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.watch_timeout_s + 6 if wait_s is None else wait_s)
        now = self._clock()
        for service in self.services:
            last = next((s for s in reversed(self.timeline) if s.service == service), None)
            if last is not None:
                self.timeline.append(dataclasses.replace(last, t=now))

    # --- per-pod metrics ---------------------------------------------------------------------

    def scrape_pods(self, *, port: int = 8080, path: str = "metrics", service: str | None = None) -> dict[str, str]:
        """``/metrics`` text of every ready pod of the current revision, through the API server's pod proxy."""
        texts = {}
        for name in self.ready_pod_names(service):
            try:
                texts[name] = self._core.connect_get_namespaced_pod_proxy_with_path(
                    f"{name}:{port}", self.namespace, path
                )
            except Exception as e:
                logger.warning("cannot scrape %s: %s", name, e)
        return texts
