"""Load shapes: step (ramp in steps and hold), spike from zero (scale-from-zero cold start) and soak.

Locust would silently run the first concrete shape class it finds, so the base class
is abstract and ``--shape step|spike|soak|none`` (``LOCUST_SHAPE``) picks the one that
runs (``none``, the default, leaves plain ``-u/-r/-t``). The shapes read Locust's own
options: ``-u`` is the peak user count, ``-r`` the spawn rate and ``-t`` the duration;
the class attributes are the defaults when an option is absent.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locust import LoadTestShape

if __package__ in (None, ""):  # loaded by ``locust -f loadtest/`` as a top-level module
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import _hooks  # noqa: F401 - registers the options, including --shape

Tick = tuple[int, float] | None


class DensenetShape(LoadTestShape):
    """Base of this package's shapes: reads ``-u``, ``-r``, ``-t`` and the shape's own options."""

    abstract = True
    use_common_options = True
    #: The value of ``--shape`` that selects this class.
    shape_name = ""
    users = 10
    spawn_rate = 10.0
    #: Seconds; ``None`` runs until stopped.
    run_time: float | None = None
    #: Set by the hooks when the pod watcher runs: ready pods of the variant now.
    ready_pods: Callable[[], int] | None = None

    def configure(self) -> None:
        """Take ``-u``, ``-r``, ``-t`` and the shape options from the parsed command line, once."""
        if getattr(self, "_configured", False) or self.runner is None:
            return
        self._configured = True
        options = self.runner.environment.parsed_options
        if options is None:
            return
        if options.num_users:
            self.users = int(options.num_users)
        if options.spawn_rate:
            self.spawn_rate = float(options.spawn_rate)
        if options.run_time:
            self.run_time = float(options.run_time)
        self.configure_options(options)

    def configure_options(self, options: Any) -> None:
        """Read the shape's own options (overridden by each shape)."""

    def tick(self) -> Tick:
        self.configure()
        return self.at(self.get_run_time())

    def at(self, t: float) -> Tick:
        """``(users, spawn_rate)`` at ``t`` seconds into the run, or ``None`` to stop."""
        raise NotImplementedError


class StepShape(DensenetShape):
    """Ramp up in ``steps`` equal steps to ``users`` and hold each for ``step_time`` seconds.

    With ``-t``, each step lasts ``-t / steps``. Latency against users comes from the
    held plateaus, each long enough for Knative's autoscaler (60 s stable window by default).
    """

    shape_name = "step"
    steps = 5
    step_time = 60.0

    def configure_options(self, options: Any) -> None:
        self.steps = max(1, int(getattr(options, "steps", self.steps)))
        self.step_time = float(getattr(options, "step_time", self.step_time))
        if self.run_time:
            self.step_time = self.run_time / self.steps

    def at(self, t: float) -> Tick:
        step = int(t // self.step_time)
        if step >= self.steps:
            return None
        return math.ceil(self.users * (step + 1) / self.steps), self.spawn_rate


class SpikeShape(DensenetShape):
    """Zero users, then all ``users`` at once: the first requests meet a revision scaled to zero.

    Waits ``spike_wait`` seconds at 0 users and, when the pod watcher runs and
    ``spike_zero_timeout`` is set, until the revision has no ready pod (or that many
    seconds passed); then spawns ``users`` at ``spawn_rate`` (make it equal to ``-u``
    for a true spike) and holds them until ``run_time``.
    """

    shape_name = "spike"
    spike_wait = 0.0
    spike_zero_timeout = 0.0

    def configure_options(self, options: Any) -> None:
        self.spike_wait = float(getattr(options, "spike_wait", self.spike_wait))
        self.spike_zero_timeout = float(getattr(options, "spike_zero_timeout", self.spike_zero_timeout))

    def _spike_start(self, t: float) -> float | None:
        """When the spike starts (seconds into the run), or ``None`` while still waiting."""
        if getattr(self, "_spiked_at", None) is not None:
            return self._spiked_at
        if t < self.spike_wait:
            return None
        waiting_for_zero = self.spike_zero_timeout > 0 and t < self.spike_wait + self.spike_zero_timeout
        if self.ready_pods is not None and waiting_for_zero and self.ready_pods() > 0:
            return None
        self._spiked_at: float | None = t
        return t

    def at(self, t: float) -> Tick:
        if self.run_time is not None and t >= self.run_time:
            return None
        if self._spike_start(t) is None:
            return 0, self.spawn_rate
        return self.users, self.spawn_rate

    def reset_time(self) -> None:
        super().reset_time()
        self._spiked_at = None


class SoakShape(DensenetShape):
    """Ramp to ``users`` at ``spawn_rate`` and hold them for a long ``run_time`` (default 30 min)."""

    shape_name = "soak"
    run_time: float | None = 1800.0

    def at(self, t: float) -> Tick:
        if self.run_time is not None and t >= self.run_time:
            return None
        return self.users, self.spawn_rate
