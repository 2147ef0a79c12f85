"""What the GPU's clocks, power and engines did during a benchmark window (NVML, sampled in a thread).

Session 20's headline runs read 0.592x, 0.474x and 0.494x on one machine within 20 minutes, and
what separated them was nvJPEG's batched call (5.9–6.5 against 6.7–9.7 ms per ~126 VGA JPEGs).
The JPEG engines run on the video clock; a power cap or a thermal slowdown lowers clocks. So every
Locust run of ``serve_bench.py`` carries a ``gpu`` summary of its window: the SM and video clocks,
power, temperature, GPU and JPEG-engine utilisation, and the clock-event reasons NVML reported
(power cap, thermal or hardware slowdown...), to tell a slow window from a fast one.

    with GpuCounters() as gpu:
        run_the_load()
    print(gpu.summary())   # {} where there is no NVML (a CPU machine)
"""

from __future__ import annotations

import statistics
import threading
from typing import Any

#: NVML's clock-event (throttle) reason bits, as ``nvmlClocksEventReason*`` names them.
REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
_CLOCK_SM, _CLOCK_VIDEO, _TEMPERATURE_GPU = 1, 3, 0


def reason_names(mask: int) -> list[str]:
    """The names of the reason bits set in ``mask`` (unknown bits as hex)."""
    names = [name for bit, name in REASONS.items() if mask & bit]
    rest = mask & ~sum(REASONS)
    return names + ([hex(rest)] if rest else [])


class GpuCounters:
    """Samples GPU 0 every ``interval_s`` while the ``with`` block runs; :meth:`summary` afterwards.

    ``nvml``: the pynvml module (tests pass a stand-in); None imports it, and without it (or
    without a GPU) nothing is sampled and the summary is empty.
    """

    def __init__(self, interval_s: float = 0.25, nvml: Any = None, index: int = 0) -> None:
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []
        self.reasons = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = nvml
        self._handle: Any = None
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # no pynvml, no driver, no GPU: an empty summary
            self._handle = None

    def __enter__(self) -> GpuCounters:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-counters")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        """One sample of every counter NVML answers (those it does not are left out)."""
        nv, h = self._nvml, self._handle
        reads: dict[str, Any] = {
            "sm_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, _CLOCK_SM),
            "video_clock_mhz": lambda: nv.nvmlDeviceGetClockInfo(h, _CLOCK_VIDEO),
            "power_w": lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "temperature_c": lambda: nv.nvmlDeviceGetTemperature(h, _TEMPERATURE_GPU),
            "gpu_util_pct": lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu,
            "jpeg_util_pct": lambda: nv.nvmlDeviceGetJpgUtilization(h)[0],
        }
        row: dict[str, float] = {}
        for key, read in reads.items():
            try:
                row[key] = float(read())
            except Exception:
                continue
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            if hasattr(nv, name):
                try:
                    self.reasons |= int(getattr(nv, name)(h))
                except Exception:
                    continue
                break
        if row:
            self.samples.append(row)

    def summary(self) -> dict[str, Any]:
        """Mean, min and max of each counter over the window, the sample count and the reasons seen."""
        if not self.samples:
            return {}
        out: dict[str, Any] = {"samples": len(self.samples)}
        for key in sorted({k for row in self.samples for k in row}):
            values = [row[key] for row in self.samples if key in row]
            out[f"{key}_mean"] = round(statistics.fmean(values), 1)
            out[f"{key}_min"] = round(min(values), 1)
            out[f"{key}_max"] = round(max(values), 1)
        out["clock_event_reasons"] = reason_names(self.reasons)
        return out
