"""The device pipeline's two stages (prepare: decode + crop every JPEG of a batch at once; execute: run
the model and split the logits) and the batcher that runs them on two threads. On the CPU here
(torchvision decodes JPEGs on the CPU too); tests/test_gpu.py covers nvJPEG on CUDA."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image
from server_support import build_artifacts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from model_server.artifact import read_manifest
    from model_server.runtimes import load_runner

    out = tmp_path_factory.mktemp("artifacts")
    build_artifacts(out, "densenet121-eager-fp32")
    d = out / "densenet121-eager-fp32"
    return load_runner(read_manifest(d), d, torch.device("cpu"))


def _jpeg(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), colour)
    img.paste((255 - colour[0], 40, 200), (w // 4, h // 4, w // 2, h // 2))  # some structure to classify
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_prepare_decodes_all_requests_together_and_execute_splits_them_back(runner) -> None:  # type: ignore[no-untyped-def]
    from model_server import BadInput
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.preprocess import decode_and_crop

    pipeline = DevicePipeline(runner)
    a, b, c = _jpeg(320, 240, (200, 30, 30)), _jpeg(320, 240, (30, 200, 30)), _jpeg(200, 300, (30, 30, 200))
    pixels = decode_and_crop(b)[None]
    corrupt = JpegBatch([b"\xff\xd8\xff" + b"\0" * 100])
    staged = pipeline.prepare([JpegBatch([a, b]), pixels, JpegBatch([c]), corrupt])
    assert staged.whole is None  # a tensor payload in the batch: parts are gathered in execute
    assert isinstance(staged.failed.get(3), BadInput), "a corrupt JPEG fails only its own request"
    results = pipeline.execute(staged)
    assert [r.shape[0] for r in results[:3]] == [2, 1, 1]  # type: ignore[union-attr]
    assert isinstance(results[3], BadInput)
    # Each request's rows equal what that request gets alone (same decode, same model).
    alone = [pipeline([JpegBatch([a, b])])[0], pipeline([pixels])[0], pipeline([JpegBatch([c])])[0]]
    for got, want in zip(results[:3], alone, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_a_batch_of_jpeg_requests_is_one_tensor_in_request_order(runner) -> None:  # type: ignore[no-untyped-def]
    from model_server.pipeline import DevicePipeline, JpegBatch

    pipeline = DevicePipeline(runner)
    jpegs = [_jpeg(320, 240, (20 * i, 90, 160)) for i in range(3)] + [_jpeg(240, 320, (10, 10, 10))]
    staged = pipeline.prepare([JpegBatch([j]) for j in jpegs])
    assert staged.whole is not None and staged.whole.shape == (4, 3, 224, 224)
    for i in range(4):  # mixed sizes (two resize groups) still come back in request order
        assert torch.equal(staged.parts[i][0], staged.whole[i])
    alone = pipeline.prepare([JpegBatch([jpegs[3]])])
    assert torch.equal(alone.parts[0][0], staged.whole[3])


def test_batcher_prepares_the_next_batch_on_its_own_thread_and_fuses_a_lone_one() -> None:
    """While a batch holds the device, the next one is prepared on the prepare thread; a batch with
    none other in flight has nothing to overlap, so both its stages run in one call on the device thread."""
    from model_server.batcher import DynamicBatcher

    calls: list[tuple[str, str, list[int]]] = []
    hold = threading.Event()
    prepared_while_held: list[list[int]] = []

    def prepare(payloads: list[int]) -> list[int]:
        calls.append(("prepare", threading.current_thread().name, list(payloads)))
        if not hold.is_set():
            prepared_while_held.append(list(payloads))
        return [p * 10 for p in payloads]

    def run(staged: list[int]) -> list[torch.Tensor | Exception]:
        calls.append(("run", threading.current_thread().name, list(staged)))
        if staged == [10]:
            assert hold.wait(10)  # the first batch keeps the device while the next ones queue up
        return [torch.tensor([float(s)]) if s >= 0 else ValueError("negative") for s in staged]

    async def main() -> list[object]:
        batcher = DynamicBatcher(run, prepare=prepare, max_batch_size=4, max_delay_s=0.0, max_queue_images=64)
        try:
            first = batcher.submit(1, 1)
            task = asyncio.ensure_future(first)
            await asyncio.sleep(0.1)  # the lone first batch is on the device
            rest = [asyncio.ensure_future(batcher.submit(i, 1)) for i in (2, 3, -1, 5, 6, 7, 8, 9)]
            await asyncio.sleep(0.1)  # the second batch is prepared beside it
            hold.set()
            return await asyncio.gather(task, *rest, return_exceptions=True)
        finally:
            batcher.close()

    out = asyncio.run(main())
    assert [float(o) for o in out if isinstance(o, torch.Tensor)] == [10.0, 20.0, 30.0, 50.0, 60.0, 70.0, 80.0, 90.0]
    assert isinstance(out[3], ValueError)  # a failure stays with its own request
    stage, thread, payloads = calls[0]
    assert (stage, payloads) == ("prepare", [1]) and thread.startswith("device")  # alone: fused
    second = next(c for c in calls if c[0] == "prepare" and c[2] == [2, 3, -1, 5])
    assert second[1].startswith("prepare") and [2, 3, -1, 5] in prepared_while_held  # beside the first batch
    assert all(thread.startswith("device") for stage, thread, _ in calls if stage == "run")


def test_pipeline_on_a_file_it_cannot_decode_keeps_the_rest(runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from model_server.pipeline import DevicePipeline, JpegBatch

    pipeline = DevicePipeline(runner)
    good = _jpeg(320, 240, (1, 2, 3))
    truncated = good[: len(good) // 3]
    out = pipeline([JpegBatch([good]), JpegBatch([truncated]), JpegBatch([good])])
    assert isinstance(out[0], torch.Tensor) and isinstance(out[2], torch.Tensor)
    torch.testing.assert_close(out[0], out[2])


def test_resize_in_chunks_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A size group bigger than the pixel budget is resized in chunks, with the same result."""
    import model_server.preprocess as pre

    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8) for _ in range(5)]
    one_pass = pre.gpu_resize_crop_many(images)
    monkeypatch.setattr(pre, "RESIZE_CHUNK_PIXELS", 2 * 300 * 400)  # two images per chunk: 3 chunks
    chunked = pre.gpu_resize_crop_many(images)
    assert chunked.shape == (5, 3, 224, 224)
    assert torch.equal(one_pass, chunked)


def test_the_triton_crop_kernel_crops_as_torch_does_in_tritons_interpreter(tmp_path: Path) -> None:
    """``--crop_kernel triton``'s kernel, run by Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
    before the kernel is defined: a process of its own): the reference crop's pixels, to one step of
    255 in a few pixels (the float sums in another order), shrunk portrait and landscape, and enlarged;
    a batch that is not uint8 ``[N,3,H,W]`` is refused."""
    code = """
import json, torch
from model_server.crop_kernel import triton_resize_crop
from model_server.preprocess import resize_crop_pixels
g = torch.Generator().manual_seed(0)
out = []
for shape in [(1, 3, 300, 260), (1, 3, 60, 80), (2, 3, 480, 640)]:
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    got, want = triton_resize_crop(x, 8192), resize_crop_pixels(x).to(torch.uint8)
    d = (got.int() - want.int()).abs()
    out.append([list(got.shape), got.dtype == torch.uint8, int(d.max()), int((d > 0).sum()), want.numel()])
try:
    triton_resize_crop(torch.zeros(1, 3, 8, 8))
except ValueError as e:
    out.append(str(e))
print(json.dumps(out))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    *crops, refused = json.loads(proc.stdout.splitlines()[-1])
    for shape, is_uint8, worst, differing, total in crops:
        assert shape[1:] == [3, 224, 224] and is_uint8
        assert worst <= 1 and differing <= total // 10_000, (shape, worst, differing)
    assert refused == "expected a uint8 [N,3,H,W] batch, got torch.float32 [1, 3, 8, 8]"


def test_the_crop_kernel_binaries_compile_without_a_gpu_and_are_found_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """``python -m model_server.crop_kernel --arch 90`` compiles the kernel for an H100 here, where no GPU
    is (Triton's compiler and ``ptxas``), into ``DENSENET_CROP_KERNEL_DIR``, where a server finds it
    without compiling; an arch with no binary there is compiled once and kept in the user cache; a
    binary of an edited kernel (another source hash) is not used; a bad arch is refused by name."""
    from model_server import crop_kernel
    from model_server.crop_kernel import PARAMS, CropBinary, binary_for, entry_params, kernel_dirs, main

    image, cache = tmp_path / "image", tmp_path / "cache"
    monkeypatch.setenv("DENSENET_CROP_KERNEL_DIR", str(image))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    assert kernel_dirs() == [image, cache / "densenet-knative" / "crop-kernels"]
    assert main(["--arch", "90"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"sm_90: {image}/crop-sm90-b256-") and "4 warps" in printed
    h100 = CropBinary.load(image, 90)
    assert h100 is not None and h100.name == "crop_kernel" and len(h100.cubin) > 1000
    assert h100.params[: len(PARAMS)] == PARAMS and set(h100.params[len(PARAMS) :]) <= {"u64"}

    def no_compiling(arch: int, block: int = 256) -> CropBinary:
        raise AssertionError(f"compiled sm_{arch} again")

    real_build = crop_kernel.build_binary
    monkeypatch.setattr(crop_kernel, "build_binary", no_compiling)
    caplog.set_level("INFO", logger="model_server.crop_kernel")
    assert binary_for(90) == h100  # the image's binary, read, not compiled
    monkeypatch.setattr(crop_kernel, "build_binary", real_build)
    ada = binary_for(89)  # none anywhere: compiled, then kept in the user cache (the image's is read-only)
    assert [p.parent for p in cache.rglob("crop-sm89-*.cubin")] == [kernel_dirs()[1]]
    assert [r.getMessage() for r in caplog.records] == [
        f"crop kernel: the fused kernel's binary for sm_90 from {image}",
        f"crop kernel: the fused kernel compiled for sm_89, kept in {next(cache.rglob('crop-sm89-*.cubin'))}",
    ]
    monkeypatch.setattr(crop_kernel, "build_binary", no_compiling)
    assert binary_for(89) == ada
    monkeypatch.setattr(crop_kernel, "source_key", lambda: "0" * 16)  # the kernel edited since
    assert CropBinary.load(image, 90) is None
    ptx = ".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n\t.param .f32 k_param_1\n)\n{"
    assert entry_params(ptx, "k") == ("u64", "f32")
    with pytest.raises(SystemExit):
        main(["--arch", "7"])
    assert "argument --arch: 7 is not a compute capability such as 80, 86, 89, 90 or 100" in capsys.readouterr().err


def test_the_crop_kernel_compiles_with_no_c_compiler_on_path(tmp_path: Path) -> None:
    """What the slim image lacks, a C compiler, the binaries do not need: ``python -m
    model_server.crop_kernel`` compiles one with nothing on PATH and a Triton cache of its own (so Triton
    really compiles), as the image's build and a server without a binary do."""
    env = {"HOME": str(tmp_path), "PATH": str(tmp_path / "bin"), "TRITON_CACHE_DIR": str(tmp_path / "triton"),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "model_server.crop_kernel", "--arch", "90", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"sm_90: {tmp_path}/crop-sm90-b256-") and list(tmp_path.glob("crop-sm90-*.cubin"))


def test_the_triton_crop_kernel_names_what_this_machine_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server asked for ``--crop_kernel triton`` on a GPU needs a compiled binary for the GPU or
    Triton to compile one (no C compiler: the binary is launched through the driver); without either it
    refuses to start, naming where it looked."""
    import importlib.util

    from model_server import crop_kernel

    monkeypatch.setenv("DENSENET_CROP_KERNEL_DIR", str(tmp_path / "image"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler anywhere
    crop_kernel.triton_needs(90)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=rf"needs a compiled binary for sm_90 \(none in {tmp_path}/image, "):
        crop_kernel.triton_needs(90)
    with pytest.raises(ValueError, match=r"or Triton \(pip install triton\) to compile one, and Triton is not"):
        crop_kernel.triton_needs(90)
    (tmp_path / "image").mkdir()
    name = f"crop-sm90-b256-{crop_kernel.source_key()}"
    (tmp_path / "image" / f"{name}.cubin").write_bytes(b"")
    (tmp_path / "image" / f"{name}.json").write_text("{}")
    crop_kernel.triton_needs(90)  # a binary for the GPU: Triton is not needed


def test_the_default_crop_kernel_is_the_fused_one_where_the_gpu_can_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``--crop_kernel auto`` (the default) resolves to "triton" on a CUDA device where the kernel's binary
    is found or compiled, and loaded; else to "torch", with one warning saying why. "triton" where it
    cannot run refuses, saying why. On the CPU every name crops with torch's ops. (No GPU here: the
    capability is an H100's and the driver's load is recorded, not run.)"""
    import importlib.util

    from model_server import crop_kernel
    from model_server.config import ServingConfig
    from model_server.crop_kernel import CropBinary, CudaDriverError, resolve

    assert ServingConfig().crop_kernel == "auto"
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [resolve(k, cpu) for k in ("auto", "torch", "triton")] == ["torch", "torch", "triton"]
    loaded: list[CropBinary] = []

    class Driver:  # stands in for CubinCrop's cuModuleLoadData: records what it was given
        def __init__(self, binary: CropBinary, device: torch.device) -> None:
            loaded.append(binary)

    monkeypatch.setattr(crop_kernel, "CubinCrop", Driver)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("DENSENET_CROP_KERNEL_DIR", str(tmp_path / "image"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(crop_kernel, "_loaded", {})
    monkeypatch.setattr(crop_kernel, "_fell_back", [])
    assert resolve("auto", gpu) == "triton" and resolve("torch", gpu) == "torch"  # compiled (Triton is here)
    assert resolve("triton", gpu) == "triton" and len(loaded) == 1 and loaded[0].arch == 90  # loaded once

    monkeypatch.setattr(crop_kernel, "_loaded", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no binary, no Triton
    with caplog.at_level("WARNING", logger="model_server.crop_kernel"):
        assert resolve("auto", gpu) == "torch" and resolve("auto", gpu) == "torch"
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and warned[0].startswith("crop kernel: torch's (crop_kernel 'triton' needs a compiled")
    with pytest.raises(ValueError, match="needs a compiled binary for sm_90"):
        resolve("triton", gpu)

    def refused(binary: CropBinary, device: torch.device) -> None:
        raise CudaDriverError("cuModuleLoadData failed: CUDA_ERROR_NO_BINARY_FOR_GPU (209)")

    monkeypatch.setattr(crop_kernel, "CubinCrop", refused)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the binary compiled above
    with pytest.raises(ValueError, match=r"crop_kernel 'triton' cannot run on cuda:0: cuModuleLoadData failed"):
        resolve("triton", gpu)
    assert resolve("auto", gpu) == "torch"


def test_size_groups_stacked_or_apart_crop_the_same_in_batch_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """resize_crop_groups takes a size group as one ``[k,3,H,W]`` tensor (what nvJPEG's hardware decoder
    writes) or as its images apart (torchvision's): same crops, put back in batch order, chunked or not."""
    import model_server.preprocess as pre

    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 300, 400) if i % 3 else (3, 480, 320), dtype=torch.uint8) for i in range(7)]
    apart = pre.group_by_size(images)
    assert [idx for idx, _ in apart] == [[0, 3, 6], [1, 2, 4, 5]]
    stacked = [(idx, torch.stack(list(pixels))) for idx, pixels in apart]
    expected = torch.cat([pre.resize_crop_pixels(img[None]).to(torch.uint8) for img in images])
    assert torch.equal(pre.resize_crop_groups(apart, 7), expected)
    assert torch.equal(pre.resize_crop_groups(stacked, 7), expected)
    assert torch.equal(pre.gpu_resize_crop_many(images), expected)
    monkeypatch.setattr(pre, "RESIZE_CHUNK_PIXELS", 2 * 480 * 320)  # chunks of two
    assert torch.equal(pre.resize_crop_groups(stacked, 7), expected)


def test_decode_jpeg_groups_without_a_gpu_decodes_with_torchvision(runner) -> None:  # type: ignore[no-untyped-def]
    """No CUDA device here: no hardware decoder, and decode_jpeg_groups groups torchvision's images by size
    whichever decoder is asked for; a pipeline refuses an unknown decoder."""
    from model_server.nvjpeg import hardware_decoder
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.preprocess import decode_jpeg_groups, decode_jpegs
    from model_server.tuning import early_nvjpeg
    from optimize.registry import CROP_SIZE

    cpu = torch.device("cpu")
    assert hardware_decoder(cpu) is None and early_nvjpeg() is None
    jpegs = [_jpeg(320, 240, (1, 2, 3)), _jpeg(200, 100, (9, 9, 9)), _jpeg(320, 240, (200, 100, 0))]
    encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    reference = decode_jpegs(encoded, cpu)
    for decoder in ("nvjpeg", "torchvision"):
        groups = decode_jpeg_groups(encoded, cpu, decoder=decoder)
        assert [idx for idx, _ in groups] == [[0, 2], [1]]
        for idx, pixels in groups:
            assert all(torch.equal(pixels[j], reference[i]) for j, i in enumerate(idx))
        lazy = decode_jpeg_groups(lambda: encoded, cpu, decoder=decoder)  # tensors made only when needed
        assert [idx for idx, _ in lazy] == [[0, 2], [1]]
    with pytest.raises(ValueError, match="jpeg_decoder must be one of nvjpeg, torchvision, got 'pil'"):
        DevicePipeline(runner, jpeg_decoder="pil")
    with pytest.raises(ValueError, match="decode_priority must be one of high, normal, got 'urgent'"):
        DevicePipeline(runner, decode_priority="urgent")
    with pytest.raises(ValueError, match="crop_kernel must be one of auto, torch, triton, got 'cuda'"):
        DevicePipeline(runner, crop_kernel="cuda")
    # On the CPU the crops are torch's whichever kernel is asked for (the Triton kernel runs on a GPU).
    triton_crops = DevicePipeline(runner, crop_kernel="triton").prepare([JpegBatch(jpegs)]).whole
    torch_crops = DevicePipeline(runner).prepare([JpegBatch(jpegs)]).whole
    assert triton_crops is not None and torch_crops is not None and torch.equal(triton_crops, torch_crops)
    # No hardware decoder: early header reads leave a request to the decode stage, which decodes it.
    from model_server.ipc import KIND_JPEG, decode_request

    body = bytearray(b"".join(jpegs))
    batch = decode_request(KIND_JPEG, len(jpegs), struct.pack(f"<{len(jpegs)}I", *map(len, jpegs)), body)
    pipeline = DevicePipeline(runner, early_headers=True)
    pipeline.read_headers(batch)
    assert isinstance(batch, JpegBatch) and batch.headers is None
    staged = pipeline.prepare([batch])
    assert not staged.failed and staged.parts[0].shape == (3, 3, CROP_SIZE, CROP_SIZE)


@pytest.mark.parametrize(("share", "to_cpu"), [(0.0, 0), (0.25, 2), (0.5, 4), (1.0, 8)])
def test_cpu_decode_share_sends_that_share_of_requests_to_the_cpu(share: float, to_cpu: int) -> None:
    """--cpu_decode_share: of 8 one-image requests, ``share`` go to PIL, spread evenly; a pool with a
    decode for each of its threads already gets none, whatever the share."""
    from model_server.images import CpuDecodeShare

    router = CpuDecodeShare(share, threads=2)
    picks = [router.take(1) for _ in range(8)]
    assert sum(picks) == to_cpu
    if 0 < to_cpu < 8:  # evenly: at a share of 1/2 or less, never two CPU requests in a row
        assert not any(a and b for a, b in itertools.pairwise(picks))
    router.decoding = 2
    assert not any(router.take(1) for _ in range(4))
    router.decoding = 0
    assert not CpuDecodeShare(1.0, threads=8).take(9)  # more images than threads: the GPU takes them
    with pytest.raises(ValueError, match="from 0 to 1"):
        CpuDecodeShare(1.5, threads=2)


def test_the_front_end_decodes_its_cpu_share_with_pil_and_forwards_the_rest_as_jpeg() -> None:
    """The predictor's request path with the share on (in a fresh process: KServe's protobuf modules
    may be imported only once per process): real PIL crops for the CPU share, JPEG bytes otherwise."""
    import subprocess
    import sys

    code = """
import asyncio, torch
import numpy as np
from pathlib import Path
from model_server.config import ServingConfig
from model_server.images import JpegBatch
from model_server.predictor import DenseNetPredictor
from model_server.preprocess import decode_and_crop
from loadtest._payloads import photo_set
jpeg = photo_set("vga")[0].jpeg
p = DenseNetPredictor("densenet121", Path("unused"), ServingConfig(cpu_decode_share=0.5, preprocess_threads=2))
p._gpu_decode = True  # what load() sets on a GPU with nvJPEG; routing happens before any device
async def main():
    return [await p._decode([jpeg]) for _ in range(6)]
out = asyncio.run(main())
cpu = [o for o in out if isinstance(o, np.ndarray)]  # the front end's crops are numpy: it has no torch
assert len(cpu) == 3 and sum(isinstance(o, JpegBatch) for o in out) == 3, out
assert all(torch.equal(torch.from_numpy(t), decode_and_crop(jpeg)[None]) for t in cpu)
assert p._cpu_share.decoding == 0
print("OK")
"""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


def test_load_model_joins_the_early_device_start_before_it_warms_up(
    artifacts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The early start's libraries are joined before the first warm-up; its nvJPEG warm-up, which the
    CUDA-graph captures may run beside (thread-local capture mode), before load_model returns."""
    import time

    from model_server.config import ServingConfig
    from model_server.device import load_model
    from model_server.runtimes import Runner
    from model_server.tuning import EarlyStart

    order: list[str] = []

    def early_work() -> None:
        time.sleep(0.5)
        order.append("early start done")

    real_warm_up = Runner.warm_up

    def warm_up(self: Runner, *, beside: threading.Thread | None = None) -> None:
        order.append("warm-up")
        real_warm_up(self, beside=beside)

    monkeypatch.setattr(Runner, "warm_up", warm_up)

    def decoder_work() -> None:
        time.sleep(1.0)
        order.append("decoder warm")

    early = EarlyStart(libraries=threading.Thread(target=early_work), decoder=threading.Thread(target=decoder_work))
    early.decoder.start()  # type: ignore[union-attr]
    early.libraries.start()
    model = load_model(
        artifacts_dir / "densenet121-eager-fp32", ServingConfig(device="cpu", max_batch_size=2), early=early
    )
    model.stop()
    # The libraries before the warm-up (graph captures); the decoder's warm-up may run beside the
    # captures, but is over before load_model returns (and before the pipeline's own decode warm-up).
    assert order == ["early start done", "warm-up", "decoder warm"]


def test_warm_gpu_decoder_decodes_and_crops_on_the_given_device() -> None:
    """On the CPU the same calls run through torchvision's CPU decoder (on a GPU: nvJPEG)."""
    from model_server.preprocess import warm_gpu_decoder

    crops = warm_gpu_decoder(torch.device("cpu"))
    assert crops.shape == (8, 3, 224, 224) and crops.dtype == torch.uint8
    assert torch.equal(crops[0], crops[7])  # eight copies of one JPEG
    assert 100 < crops[0, 0].float().mean() < 140  # the warm-up image is RGB (120, 60, 30)


def test_image_ops_load_without_importing_torchvision() -> None:
    """The decode path loads torchvision's image-ops library on its own (no ``import torchvision``,
    which pulls in torch._dynamo), checks the batched decode's signature, and its CPU op decodes a
    JPEG exactly as torchvision.io does."""
    code = """
import sys, torch
from model_server.preprocess import image_ops, warm_up_jpeg, READ_MODE_RGB
ops = image_ops()
assert ops is not None, "image ops did not load"
assert "torchvision" not in sys.modules, "torchvision was imported"
data = torch.frombuffer(bytearray(warm_up_jpeg()), dtype=torch.uint8)
direct = ops.decode_jpeg(data, READ_MODE_RGB, False)
from torchvision.io import ImageReadMode, decode_jpeg
assert torch.equal(direct, decode_jpeg(data, mode=ImageReadMode.RGB)), "different pixels"
print("OK", tuple(direct.shape))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK (3, 240, 320)" in proc.stdout, proc.stderr[-2000:]


def test_decode_jpegs_on_the_cpu_matches_torchvision() -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    from model_server.preprocess import decode_jpegs, warm_up_jpeg

    data = torch.frombuffer(bytearray(warm_up_jpeg()), dtype=torch.uint8)
    (ours,) = decode_jpegs([data], torch.device("cpu"))
    assert torch.equal(ours, decode_jpeg(data, mode=ImageReadMode.RGB))


def test_decode_jpegs_in_fixed_size_calls_pads_the_last_and_keeps_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """--decode_batch: nvJPEG gets calls of exactly call_size JPEGs; the padding's images are dropped.

    The CUDA op is stood in for by one that records its calls and decodes on the CPU (this machine has
    no nvJPEG), so what is checked is the chunking around it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from model_server import preprocess

    sizes: list[int] = []

    class FakeOps:
        @staticmethod
        def decode_jpegs_cuda(encoded: list[torch.Tensor], mode: int, device: torch.device) -> list[torch.Tensor]:
            assert mode == preprocess.READ_MODE_RGB and device.type == "cuda"
            sizes.append(len(encoded))
            return [decode_jpeg(e, mode=ImageReadMode.RGB) for e in encoded]

    monkeypatch.setattr(preprocess, "image_ops", lambda: FakeOps)
    jpegs = [_jpeg(40 + 8 * i, 32, (20 * i, 90, 30)) for i in range(7)]
    encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    cuda = torch.device("cuda")
    out = preprocess.decode_jpegs(encoded, cuda, call_size=3)
    assert sizes == [3, 3, 3]  # 7 JPEGs: two full calls and one padded with two fillers
    assert [tuple(t.shape) for t in out] == [(3, 32, 40 + 8 * i) for i in range(7)]
    assert all(torch.equal(o, decode_jpeg(e, mode=ImageReadMode.RGB)) for o, e in zip(out, encoded, strict=True))
    assert tuple(decode_jpeg(preprocess.padding_jpeg()).shape) == (3, 16, 16)
    sizes.clear()
    assert len(preprocess.decode_jpegs(encoded, cuda)) == 7 and sizes == [7]  # 0: one call per batch


def test_the_batched_decode_is_recognised_by_its_types_whatever_its_argument_names() -> None:
    """torchvision up to 0.28 registers the op with a schema inferred from C++ (``_0, _1, _2``); 0.29 names
    them. Both are the same call; another signature is refused (the torchvision.io path is taken then)."""
    from model_server.preprocess import batched_decode_schema_ok

    lib = torch.library.Library("densenet_schema_test", "DEF")
    lib.define("inferred(Tensor[] _0, int _1, Device _2) -> Tensor[]")
    lib.define("named(Tensor[] encoded_images, int mode, Device device) -> Tensor[]")
    lib.define("other(Tensor[] encoded_images, int mode) -> Tensor[]")
    ops = torch.ops.densenet_schema_test
    assert batched_decode_schema_ok(ops.inferred.default._schema)
    assert batched_decode_schema_ok(ops.named.default._schema)
    assert not batched_decode_schema_ok(ops.other.default._schema)


def test_a_lone_batch_takes_the_batchers_alone_path() -> None:
    """With ``alone`` (the pipeline's one-stream call), a batch with no other in flight is run by it on
    the device thread; batches that overlap another still go through prepare and run."""
    from model_server.batcher import DynamicBatcher

    calls: list[tuple[str, str, list[int]]] = []
    hold = threading.Event()

    def prepare(payloads: list[int]) -> list[int]:
        calls.append(("prepare", threading.current_thread().name, list(payloads)))
        return payloads

    def run(staged: list[int]) -> list[torch.Tensor | Exception]:
        calls.append(("run", threading.current_thread().name, list(staged)))
        return [torch.tensor([float(s)]) for s in staged]

    def alone(payloads: list[int]) -> list[torch.Tensor | Exception]:
        calls.append(("alone", threading.current_thread().name, list(payloads)))
        assert hold.wait(10)
        return [torch.tensor([float(s)]) for s in payloads]

    async def main() -> list[object]:
        batcher = DynamicBatcher(
            run, prepare=prepare, alone=alone, max_batch_size=4, max_delay_s=0.0, max_queue_images=64
        )
        try:
            first = asyncio.ensure_future(batcher.submit(1, 1))
            await asyncio.sleep(0.1)  # the lone first batch holds the device
            second = asyncio.ensure_future(batcher.submit(2, 1))
            await asyncio.sleep(0.1)
            hold.set()
            return list(await asyncio.gather(first, second))
        finally:
            batcher.close()

    out = asyncio.run(main())
    assert [float(o) for o in out] == [1.0, 2.0]  # type: ignore[arg-type]
    assert calls[0][0] == "alone" and calls[0][1].startswith("device") and calls[0][2] == [1]
    assert [c[0] for c in calls[1:]] == ["prepare", "run"] and calls[1][1].startswith("prepare")


@pytest.mark.parametrize("inflight", [2, 3])
def test_with_three_batches_in_flight_the_prepare_thread_takes_the_next_while_the_first_is_answered(
    inflight: int,
) -> None:
    """``max_inflight_batches``: with 2, batch 3 is formed only once batch 1 is answered, so a prepare
    thread done with batch 2 waits for the device; with 3 it is formed, and prepared, while batch 1
    is still on the device."""
    from model_server.batcher import DynamicBatcher

    hold = threading.Event()
    prepared: list[int] = []

    def prepare(payloads: list[int]) -> list[int]:
        prepared.append(payloads[0])
        return payloads

    def run(staged: list[int]) -> list[torch.Tensor | Exception]:
        if staged[0] == 1:
            assert hold.wait(10)  # batch 1 stays on the device
        return [torch.tensor([float(s)]) for s in staged]

    async def main() -> tuple[list[int], list[float]]:
        batcher = DynamicBatcher(
            run, prepare=prepare, max_batch_size=1, max_delay_s=0.0, max_queue_images=64,
            max_inflight_batches=inflight,
        )  # fmt: skip
        try:
            futures = [asyncio.ensure_future(batcher.submit(k, 1)) for k in (1, 2, 3, 4)]
            await asyncio.sleep(0.2)
            while_held = list(prepared)
            hold.set()
            return while_held, [float(t) for t in await asyncio.gather(*futures)]
        finally:
            batcher.close()

    while_held, out = asyncio.run(main())
    assert out == [1.0, 2.0, 3.0, 4.0]
    assert while_held == list(range(1, inflight + 1))  # batch 1 on the device; the others prepared behind it


def test_fewer_than_one_batch_in_flight_is_refused() -> None:
    from model_server.batcher import DynamicBatcher

    with pytest.raises(ValueError, match="max_inflight_batches must be >= 1, got 0"):
        DynamicBatcher(lambda p: p, max_batch_size=1, max_delay_s=0.0, max_queue_images=8, max_inflight_batches=0)


def test_a_request_that_finds_the_device_idle_runs_at_once_on_the_loop_thread() -> None:
    """``inline_after_idle_s``: a request that finds nothing queued or running, the device idle long
    enough, runs ``alone`` inside ``submit_nowait`` on the event loop's thread (its future is done on
    return); one arriving while a batch runs, one right after a batch, or one ``inline_ok`` refuses
    takes the queue, the worker and the device thread."""
    from model_server.batcher import DynamicBatcher

    threads: list[tuple[str, int]] = []
    allow = [True]
    hold = threading.Event()

    def alone(payloads: list[int]) -> list[torch.Tensor | Exception]:
        threads.append((threading.current_thread().name, payloads[0]))
        if payloads[0] == 3:
            assert hold.wait(10)
        return [torch.tensor([float(p)]) for p in payloads]

    def run(payloads: list[int]) -> list[torch.Tensor | Exception]:
        threads.append((threading.current_thread().name, payloads[0]))
        return [torch.tensor([float(p)]) for p in payloads]

    async def main() -> tuple[int, list[float], bool]:
        batcher = DynamicBatcher(
            run, prepare=lambda p: p, alone=alone, max_batch_size=4, max_delay_s=0.0, max_queue_images=64,
            inline_after_idle_s=0.05, inline_ok=lambda: allow[0],
        )  # fmt: skip
        try:
            await asyncio.sleep(0.06)
            first = batcher.submit_nowait(1, 1)
            done_on_return = first.done()  # idle long enough: run inside submit_nowait
            out = [float(await first)]
            out.append(float(await batcher.submit(2, 1)))  # the device finished a moment ago: device thread
            await asyncio.sleep(0.06)
            allow[0] = False
            third = asyncio.ensure_future(batcher.submit(3, 1))  # inline_ok says no: device thread (held)
            await asyncio.sleep(0.05)
            allow[0] = True
            fourth = asyncio.ensure_future(batcher.submit(4, 1))  # a batch is running: queued
            await asyncio.sleep(0.05)
            hold.set()
            out += [float(t) for t in await asyncio.gather(third, fourth)]
            return batcher.inline_batches, out, done_on_return
        finally:
            batcher.close()

    inline, out, done_on_return = asyncio.run(main())
    assert out == [1.0, 2.0, 3.0, 4.0] and inline == 1 and done_on_return
    assert threads[0] == ("MainThread", 1)
    assert all(name.startswith(("device", "prepare")) for name, _ in threads[1:]), threads


def test_rest_routes_skip_kserves_call_only_for_identity_hooks() -> None:
    """The inference routes call ``predict`` directly when the model keeps KServe's pass-through
    pre/postprocess (ours); a model that defines either still goes through ``Model.__call__``. In a
    fresh process: KServe's protobuf modules may be imported only once per process."""
    code = textwrap.dedent(
        """
        from model_server.predictor import DenseNetPredictor
        from model_server.rest import kserve_hooks_are_identity

        class WithHook(DenseNetPredictor):
            async def preprocess(self, payload, headers=None):
                return payload

        print(kserve_hooks_are_identity(DenseNetPredictor.__new__(DenseNetPredictor)),
              kserve_hooks_are_identity(WithHook.__new__(WithHook)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_crop_graphs_are_captured_on_a_sizes_second_sighting_and_kept_for_the_last_sizes(
    runner, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """The crop-graph policy (the capture itself needs CUDA; here it is counted): a size gets a graph
    the second time it comes, the CROP_GRAPHS sizes used last are kept, images over
    CROP_GRAPH_MAX_PIXELS never get one, and a size whose capture failed is not tried again."""
    from model_server import pipeline as pl

    pipe = pl.DevicePipeline(runner)
    captures: list[tuple[int, int]] = []
    failing = {(30, 40)}

    def capture(image: torch.Tensor, rows: torch.Tensor) -> pl.CropGraph | RuntimeError:
        key = (int(image.shape[1]), int(image.shape[2]))
        captures.append(key)
        if key in failing:
            return RuntimeError("capture refused")
        return pl.CropGraph(graph=object(), source=image)  # type: ignore[arg-type]

    monkeypatch.setattr(pipe, "_capture_crop", capture)
    rows = torch.zeros(1, 3, 224, 224)

    def image(h: int, w: int) -> torch.Tensor:
        return torch.zeros(3, h, w, dtype=torch.uint8)

    assert pipe._crop_graph(image(48, 64), rows) is None  # first sighting: cropped eagerly
    first = pipe._crop_graph(image(48, 64), rows)
    assert first is not None and captures == [(48, 64)]
    assert pipe._crop_graph(image(48, 64), rows) is first and captures == [(48, 64)]  # replayed, not recaptured
    for _ in range(3):  # over the pixel limit: never a graph
        assert pipe._crop_graph(image(1081, 1920), rows) is None
    for _ in range(3):  # a failed capture is remembered
        assert pipe._crop_graph(image(30, 40), rows) is None
    assert captures.count((30, 40)) == 1
    sizes = [(50 + k, 60) for k in range(pl.CROP_GRAPHS)]
    for size in sizes:
        pipe._crop_graph(image(*size), rows)
        pipe._crop_graph(image(*size), rows)
    assert list(pipe._crop_graphs) == sizes  # the oldest, (48, 64), was dropped
    assert len(pipe._crop_graphs) == pl.CROP_GRAPHS
