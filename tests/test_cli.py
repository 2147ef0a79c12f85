"""The server's command line: bad values are refused with exit code 2 and a message naming them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--gil_switch_interval_ms", "-1", "--gil_switch_interval_ms must be >= 0, got -1.0"),
        ("--max_batch_size", "0", "--max_batch_size must be >= 1, got 0"),
        ("--max_inflight_batches", "0", "--max_inflight_batches must be >= 1, got 0"),
        ("--max_queue_images", "-1", "--max_queue_images must be >= 0 (0: 8 x --max_batch_size, at least 256), got -1"),
        ("--cpu_decode_share", "1.5", "--cpu_decode_share must be from 0 to 1, got 1.5"),
        ("--frontends", "0", "--frontends must be >= 1, got 0"),
        ("--decode_batch", "-1", "--decode_batch must be >= 0 (0: one nvJPEG call per batch), got -1"),
        ("--event_loop", "trio", "argument --event_loop: invalid choice: 'trio'"),
        ("--inline_idle_ms", "-2", "--inline_idle_ms must be >= 0 (0: never), got -2"),
        ("--ipc_body_pool_mb", "-1", "--ipc_body_pool_mb must be >= 0 (0: off), got -1"),
        ("--ipc_pinned_bodies", "yes", "argument --ipc_pinned_bodies: invalid choice: 'yes'"),
        ("--jpeg_decoder", "pil", "argument --jpeg_decoder: invalid choice: 'pil'"),
        ("--nvjpeg_early_headers", "yes", "argument --nvjpeg_early_headers: invalid choice: 'yes'"),
        ("--decode_stream_priority", "max", "argument --decode_stream_priority: invalid choice: 'max'"),
        ("--crop_kernel", "cuda", "argument --crop_kernel: invalid choice: 'cuda'"),
        (
            "--warmup_image_sizes",
            "640x480,vga",
            "--warmup_image_sizes: image size 'vga' is not WIDTHxHEIGHT with sides 1..8192",
        ),
        ("--warmup_image_sizes", "0x480", "image size '0x480' is not WIDTHxHEIGHT"),
    ],
)
def test_a_bad_value_exits_2_naming_it(tmp_path: Path, flag: str, value: str, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "model_server", "--model_dir", str(tmp_path), flag, value],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_the_switch_interval_flag_sets_the_process_gil_interval(tmp_path: Path) -> None:
    code = (
        "import sys; from model_server import cli; "
        f"rc = cli.main(['--model_dir', {str(tmp_path / 'missing')!r}, '--device', 'cpu', "
        "'--gil_switch_interval_ms', '0.5']); "
        "print(rc, sys.getswitchinterval())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == ["1", "0.0005"], out.stderr  # applied; then the missing artifact fails load


def test_process_start_is_the_process_start_not_the_call() -> None:
    """The start-up log's clock: a process that slept 0.5 s before asking is at least 0.5 s old."""
    code = (
        "import time; time.sleep(0.5)\n"
        "from model_server.cli import process_start\n"
        "print(time.perf_counter() - process_start())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert 0.5 <= float(proc.stdout) < 30


def test_the_early_decoder_warm_up_times_itself_and_never_raises() -> None:
    import torch

    from model_server.cli import warm_decoder_timed

    took: dict[str, float] = {}
    warm_decoder_timed(torch.device("cpu"), took)  # the CPU decodes too: the same calls, no nvJPEG
    assert took["decoder"] > 0
    warm_decoder_timed("not a device", took)  # a failure is logged, not raised: load() reports device problems
    assert took["decoder"] >= 0


@pytest.mark.parametrize(("choice", "module"), [("auto", "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_the_event_loop_choice_is_the_loop_asyncio_run_gets(choice: str, module: str) -> None:
    """KServe's ModelServer.start calls asyncio.get_event_loop() and then asyncio.run: both must work
    and the loop that runs must be the chosen one (KServe's own --event_loop never reaches it)."""
    code = (
        "import asyncio\n"
        "from model_server.config import install_event_loop\n"
        f"used = install_event_loop({choice!r})\n"
        "asyncio.get_event_loop()\n"
        "async def which(): return type(asyncio.get_running_loop()).__module__.split('.')[0]\n"
        "print(used, asyncio.run(which()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [module, module]


def test_an_unknown_event_loop_is_refused_naming_the_choices() -> None:
    from model_server.config import install_event_loop

    with pytest.raises(ValueError, match="event loop must be one of auto, uvloop, asyncio, got 'trio'"):
        install_event_loop("trio")


@pytest.mark.parametrize(
    ("device", "ordinal"), [("cpu", None), ("auto", 0), ("cuda", 0), ("cuda:3", 3), ("gpu", None), ("cuda:x", None)]
)
def test_the_device_flag_names_a_cuda_ordinal(device: str, ordinal: int | None) -> None:
    from model_server.tuning import device_ordinal

    assert device_ordinal(device) == ordinal


class _FakeDriver:
    """Stands in for libcuda: records each call, answers ``codes[name]`` (CUDA_SUCCESS = 0 otherwise)."""

    def __init__(self, codes: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[str, tuple[object, ...]]] = []
        self.codes = codes or {}

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        def call(*args: object) -> int:
            self.calls.append((name, args))
            return self.codes.get(name, 0)

        return call


def test_before_torch_the_driver_retains_the_context_then_nvjpeg_starts_in_torchvisions_library(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from model_server import tuning

    driver, nvjpeg = _FakeDriver(), _FakeDriver()
    opened: list[str] = []

    def cdll(name: str, mode: int = 0) -> _FakeDriver:
        opened.append(name)
        return driver if name == "libcuda.so.1" else nvjpeg

    monkeypatch.setattr(tuning.ctypes, "CDLL", cdll)
    monkeypatch.setattr(tuning, "_EARLY_NVJPEG", [])  # what it makes from the fakes stays in this test
    took: dict[str, float] = {}
    thread = tuning.start_before_torch("cuda:1", gpu_decode=True, took=took)
    assert thread is not None
    thread.join(30)
    assert [name for name, _ in driver.calls] == [
        "cuInit",
        "cuDeviceGet",
        "cuDevicePrimaryCtxRetain",
        "cuCtxSetCurrent",
    ]
    assert driver.calls[1][1][1] == 1, "the device's ordinal, from --device cuda:1"
    # nvJPEG from the library torchvision's image ops load (its wheel's own copy here), hardware backend first
    assert opened == ["libcuda.so.1", tuning.nvjpeg_candidates()[0]]
    assert [name for name, _ in nvjpeg.calls] == ["nvjpegCreateEx", "nvjpegJpegStateCreate"]
    assert nvjpeg.calls[0][1][0] == tuning.NVJPEG_BACKEND_HARDWARE
    assert set(took) == {"driver", "nvjpeg"}


def test_before_torch_falls_back_to_nvjpegs_default_backend_and_skips_it_without_gpu_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from model_server import tuning

    nvjpeg = _FakeDriver({"nvjpegCreateEx": 0})
    codes = iter([5, 0])  # NVJPEG_STATUS_ARCH_MISMATCH for the hardware backend, then success
    nvjpeg.__dict__["nvjpegCreateEx"] = lambda *args: nvjpeg.calls.append(("nvjpegCreateEx", args)) or next(codes)
    monkeypatch.setattr(tuning.ctypes, "CDLL", lambda name, mode=0: _FakeDriver() if name == "libcuda.so.1" else nvjpeg)
    monkeypatch.setattr(tuning, "_EARLY_NVJPEG", [])  # what it makes from the fakes stays in this test
    took: dict[str, float] = {}
    thread = tuning.start_before_torch("auto", gpu_decode=True, took=took)
    assert thread is not None
    thread.join(30)
    backends = [args[0] for name, args in nvjpeg.calls if name == "nvjpegCreateEx"]
    assert backends == [tuning.NVJPEG_BACKEND_HARDWARE, tuning.NVJPEG_BACKEND_DEFAULT] and "nvjpeg" in took
    nvjpeg.calls.clear()
    took.clear()
    thread = tuning.start_before_torch("auto", gpu_decode=False, took=took)
    assert thread is not None
    thread.join(30)
    assert not nvjpeg.calls and set(took) == {"driver"}


@pytest.mark.parametrize(
    "failing", ["cuInit", "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxSetCurrent", "no library"]
)
def test_before_torch_stops_quietly_without_a_driver_or_a_gpu(monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    from model_server import tuning

    def cdll(name: str, mode: int = 0) -> _FakeDriver:
        if failing == "no library":
            raise OSError(f"{name}: cannot open shared object file")
        return _FakeDriver({failing: 100})  # CUDA_ERROR_NO_DEVICE

    monkeypatch.setattr(tuning.ctypes, "CDLL", cdll)
    monkeypatch.setattr(tuning, "_EARLY_NVJPEG", [])  # what it makes from the fakes stays in this test
    took: dict[str, float] = {}
    thread = tuning.start_before_torch("auto", gpu_decode=True, took=took)
    assert thread is not None
    thread.join(30)
    assert took == {}, "nothing done: torch decides later, and its own calls report errors"
    assert tuning.start_before_torch("cpu", gpu_decode=True, took=took) is None


@pytest.mark.parametrize(("flag", "max_batch", "queue"), [(0, 32, 256), (0, 8, 256), (0, 128, 1024), (100, 128, 100)])
def test_the_queue_holds_eight_batches_by_default(flag: int, max_batch: int, queue: int) -> None:
    """``--max_queue_images 0`` (the default): 8 batches of --max_batch_size, at least 256 images; a value is kept."""
    from model_server.config import queue_images

    assert queue_images(flag, max_batch) == queue


def test_warmup_image_sizes_parse_as_width_by_height() -> None:
    from model_server.config import DEFAULT_WARMUP_IMAGE_SIZES, ServingConfig, parse_image_sizes

    assert parse_image_sizes("640x480, 1920X1080,640x480") == ((640, 480), (1920, 1080))  # repeats once
    assert parse_image_sizes("none") == parse_image_sizes("") == ()
    assert ServingConfig().warmup_image_sizes == DEFAULT_WARMUP_IMAGE_SIZES
    for bad in ("640", "640x", "x480", "640x480x3", "-640x480", "9000x10", "640*480"):
        with pytest.raises(ValueError, match="is not WIDTHxHEIGHT"):
            parse_image_sizes(bad)
