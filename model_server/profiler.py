"""On-demand torch.profiler capture inside the serving process: the next N batches or T seconds.

The capture runs on the device thread itself (started before a batch, stopped after one),
so it records exactly what serving does: nvJPEG decode, host-to-device copies, kernels.
The trace is written with ``torch.profiler.tensorboard_trace_handler``: a
``*.pt.trace.json`` file that TensorBoard's profiler plugin and Perfetto
(ui.perfetto.dev) both open. Off unless an admin token is configured (see ``rest.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_BATCHES = 1000
MAX_SECONDS = 120.0


@dataclasses.dataclass
class Capture:
    id: str
    batches: int | None
    seconds: float | None
    state: str = "pending"  # pending -> running -> done | failed
    batches_seen: int = 0
    started: float | None = None
    trace: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ProfileCapture:
    """Owns at most one capture at a time; ``before_batch``/``after_batch`` run on the device thread."""

    def __init__(self, out_dir: Path, device: torch.device) -> None:
        self.out_dir = out_dir
        self.device = device
        self._lock = threading.Lock()
        self._current: Capture | None = None
        self._done: dict[str, Capture] = {}
        self._prof: torch.profiler.profile | None = None

    def request(self, *, batches: int | None = None, seconds: float | None = None) -> Capture:
        """Ask for a capture of the next ``batches`` batches, or of ``seconds`` of serving.

        Raises:
            ValueError: bad bounds, or a capture is already pending or running.
        """
        if (batches is None) == (seconds is None):
            raise ValueError("give exactly one of batches (1..1000) or seconds (0..120)")
        if batches is not None and not 1 <= batches <= MAX_BATCHES:
            raise ValueError(f"batches must be from 1 to {MAX_BATCHES}, got {batches}")
        if seconds is not None and not 0 < seconds <= MAX_SECONDS:
            raise ValueError(f"seconds must be in (0, {MAX_SECONDS:g}], got {seconds}")
        with self._lock:
            if self._current is not None:
                raise ValueError(f"capture {self._current.id} is {self._current.state}; wait for it to finish")
            cap = Capture(id=uuid.uuid4().hex[:12], batches=batches, seconds=seconds)
            self._current = cap
            return cap

    @property
    def active(self) -> bool:
        """A capture is pending or running."""
        return self._current is not None

    def get(self, capture_id: str) -> Capture | None:
        with self._lock:
            if self._current is not None and self._current.id == capture_id:
                return self._current
            return self._done.get(capture_id)

    def before_batch(self) -> None:
        cap = self._current
        if cap is None or cap.state != "pending":
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._prof = torch.profiler.profile(
                activities=activities,
                record_shapes=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.out_dir), worker_name=cap.id),
            )
            self._prof.start()
            cap.state, cap.started = "running", time.monotonic()
        except Exception as e:  # a profiler failure must not take serving down
            self._finish(cap, error=str(e))

    def after_batch(self) -> None:
        cap = self._current
        if cap is None or cap.state != "running" or self._prof is None:
            return
        cap.batches_seen += 1
        elapsed = time.monotonic() - (cap.started or 0.0)
        if (cap.batches is not None and cap.batches_seen >= cap.batches) or (
            cap.seconds is not None and elapsed >= cap.seconds
        ):
            try:
                self._prof.stop()  # runs the trace handler: writes <id>.*.pt.trace.json
                traces = sorted(self.out_dir.glob(f"{cap.id}*.pt.trace.json*"))
                self._finish(cap, trace=str(traces[-1]) if traces else None)
            except Exception as e:
                self._finish(cap, error=str(e))

    def _finish(self, cap: Capture, *, trace: str | None = None, error: str | None = None) -> None:
        self._prof = None
        with self._lock:
            cap.state = "failed" if error else "done"
            cap.trace, cap.error = trace, error
            self._done[cap.id] = cap
            self._current = None
        if error:
            log.error("profiler capture %s failed: %s", cap.id, error)
        else:
            log.info("profiler capture %s: %d batches -> %s", cap.id, cap.batches_seen, trace)
