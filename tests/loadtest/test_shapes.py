"""Load shapes: what ``tick()`` asks for over time, and that only the chosen shape ever runs."""

from __future__ import annotations

import types

import pytest
from locust.argument_parser import parse_options
from locust.env import Environment
from locust.util.load_locustfile import load_locustfile

from loadtest import _hooks
from loadtest.shapes import DensenetShape, SoakShape, SpikeShape, StepShape
from loadtest.users import V1Base64User


def _shape(cls: type[DensenetShape], *args: str) -> DensenetShape:
    """A shape wired to real parsed options (Locust's parser plus ours), with a controllable clock."""
    shape = cls()
    shape.runner = types.SimpleNamespace(environment=types.SimpleNamespace(parsed_options=parse_options(list(args))))
    shape.now = 0.0
    shape.get_run_time = lambda: shape.now
    return shape


def _ticks(shape: DensenetShape, times: list[float]) -> list[tuple[int, float] | None]:
    out = []
    for t in times:
        shape.now = t
        out.append(shape.tick())
    return out


def test_step_ramps_in_equal_steps_over_the_run_time_then_stops() -> None:
    shape = _shape(StepShape, "-u", "10", "-r", "5", "-t", "40s", "--steps", "4")
    assert _ticks(shape, [0, 9.9, 10, 25, 39.9, 40]) == [(3, 5.0), (3, 5.0), (5, 5.0), (8, 5.0), (10, 5.0), None]


def test_step_without_run_time_holds_each_step_for_step_time() -> None:
    shape = _shape(StepShape, "-u", "6", "--steps", "3", "--step-time", "30")
    assert _ticks(shape, [0, 30, 60, 89, 90]) == [(2, 10.0), (4, 10.0), (6, 10.0), (6, 10.0), None]


def test_spike_starts_from_zero_then_jumps_to_all_users() -> None:
    shape = _shape(SpikeShape, "-u", "50", "-r", "50", "-t", "60s", "--spike-wait", "5")
    assert _ticks(shape, [0, 4.9, 5, 59, 60]) == [(0, 50.0), (0, 50.0), (50, 50.0), (50, 50.0), None]


def test_spike_waits_for_the_revision_to_scale_to_zero() -> None:
    shape = _shape(SpikeShape, "-u", "8", "-r", "8", "--spike-zero-timeout", "100")
    pods = {"ready": 2}
    shape.ready_pods = lambda: pods["ready"]
    assert _ticks(shape, [0, 30]) == [(0, 8.0), (0, 8.0)]
    pods["ready"] = 0
    assert _ticks(shape, [31, 32]) == [(8, 8.0), (8, 8.0)]
    pods["ready"] = 3  # scaled up by the spike itself: no going back to zero
    assert _ticks(shape, [40]) == [(8, 8.0)]


def test_spike_gives_up_waiting_for_zero_after_the_timeout() -> None:
    shape = _shape(SpikeShape, "-u", "4", "--spike-zero-timeout", "10")
    shape.ready_pods = lambda: 1
    assert _ticks(shape, [9, 10]) == [(0, 10.0), (4, 10.0)]


def test_soak_holds_for_its_duration() -> None:
    assert _ticks(_shape(SoakShape, "-u", "20", "-r", "2", "-t", "1h"), [0, 3599, 3600]) == [(20, 2.0), (20, 2.0), None]
    assert _shape(SoakShape, "-u", "1").tick() == (1, 10.0)
    assert _ticks(_shape(SoakShape, "-u", "1"), [1800]) == [None]  # 30 min by default


def test_locust_finds_only_the_concrete_shapes() -> None:
    users, shapes = load_locustfile("loadtest/shapes.py")
    assert sorted(type(s).__name__ for s in shapes) == ["SoakShape", "SpikeShape", "StepShape"]
    assert not users


@pytest.mark.parametrize("name", ["none", "step", "spike", "soak"])
def test_the_shape_option_decides_not_the_file_order(name: str) -> None:
    available = {type(s).__name__: s for s in (StepShape(), SpikeShape(), SoakShape())}
    environment = Environment(
        user_classes=[V1Base64User],
        shape_class=available["StepShape"],
        available_shape_classes=available,
        parsed_options=parse_options(["--shape", name]),
    )
    runner = object()
    _hooks._select_shape(environment, runner)
    if name == "none":
        assert environment.shape_class is None
    else:
        assert environment.shape_class.shape_name == name
        assert environment.shape_class.runner is runner
