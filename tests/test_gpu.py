"""GPU serving path (skipped without CUDA): nvJPEG batch decode agrees with PIL, the server serves on CUDA."""

from __future__ import annotations

import base64
import io
import os
import struct
from pathlib import Path

import pytest
import requests
import torch
from PIL import Image
from server_support import build_artifacts, start_server, stop_server

pytestmark = pytest.mark.gpu


def _jpegs() -> list[bytes]:
    from optimize.samples import sample_paths

    out = []
    for p in sample_paths()[:4]:
        buf = io.BytesIO()
        Image.open(p).convert("RGB").save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def test_nvjpeg_pipeline_matches_pil_crops(tmp_path: Path) -> None:
    from model_server.artifact import read_manifest
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.preprocess import decode_and_crop
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp32")
    d = tmp_path / "densenet121-eager-fp32"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    pipeline = DevicePipeline(runner)
    jpegs = _jpegs()
    gpu = pipeline([JpegBatch(jpegs[:2]), JpegBatch(jpegs[2:]), JpegBatch([b"\xff\xd8\xff" + b"\0" * 100])])
    assert isinstance(gpu[2], Exception), "a corrupt JPEG fails its own request"
    cpu = runner(torch.stack([decode_and_crop(j) for j in jpegs]))
    got = torch.cat([gpu[0], gpu[1]])  # type: ignore[list-item]
    assert (got.argmax(1) == cpu.argmax(1)).all()
    assert (got - cpu).abs().max() < 0.1


@pytest.mark.parametrize("crop_kernel", ["torch", "triton"])
def test_graphs_captured_beside_the_decoder_warm_up_match_eager(tmp_path: Path, crop_kernel: str) -> None:
    """The CUDA graphs are captured while another thread warms nvJPEG and the crop kernels (thread-local
    capture mode; with ``--crop_kernel triton`` its binary is loaded, or compiled, meanwhile): every
    bucket must be captured and replay what the model computes without a graph."""
    import threading

    from model_server.artifact import read_manifest
    from model_server.cli import warm_decoder_timed
    from model_server.preprocess import warm_gpu_decoder
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp16-cl-graphs", device="cuda")  # a CUDA-only variant
    d = tmp_path / "densenet121-eager-fp16-cl-graphs"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    took: dict[str, float] = {}
    decoder = threading.Thread(
        target=lambda: [warm_decoder_timed(torch.device("cuda"), took, "nvjpeg", crop_kernel) for _ in range(5)]
    )
    decoder.start()
    runner.warm_up(beside=decoder)
    decoder.join()
    assert sorted(runner._graphs) == runner.buckets
    # the warm-up swallows its errors (the server's own warm-up reports them): run it here, where they raise
    crops = warm_gpu_decoder(torch.device("cuda"), "nvjpeg", crop_kernel)
    assert crops.shape == (8, 3, 224, 224) and crops.dtype == torch.uint8
    x = runner.prepare(torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8))
    replayed = runner.run_device(x).clone()
    torch.testing.assert_close(replayed, runner.forward(x), atol=2e-2, rtol=0)


def test_pixel_input_graphs_match_the_eager_path(tmp_path: Path) -> None:
    """uint8 batches go through the input graph (normalise, cast, layout) and the model graph; a
    batch smaller than its bucket leaves an earlier batch's pixels in the rows it does not fill,
    which must not change its own logits."""
    from model_server.artifact import read_manifest
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp16-cl-graphs", device="cuda")
    d = tmp_path / "densenet121-eager-fp16-cl-graphs"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    runner.warm_up()
    assert sorted(runner._input_graphs) == runner.buckets
    gen = torch.Generator().manual_seed(0)
    runner(torch.randint(0, 255, (4, 3, 224, 224), dtype=torch.uint8, generator=gen))  # fills rows 0-3
    for n, on_device in ((3, True), (1, False), (4, True)):
        x = torch.randint(0, 255, (n, 3, 224, 224), dtype=torch.uint8, generator=gen)
        x = x.cuda() if on_device else x
        got = runner(x)
        with torch.inference_mode():
            want = runner.forward(runner.prepare(x)).float().cpu()
        assert got.shape == (n, 1000) and got.device.type == "cpu"
        torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
        assert (got.argmax(1) == want.argmax(1)).all()


def test_server_on_cuda_serves_jpegs(tmp_path: Path) -> None:
    build_artifacts(tmp_path, "densenet121-eager-fp16-cl")
    srv = start_server(tmp_path / "densenet121-eager-fp16-cl", tmp_path / "log", "--device", "cuda")
    try:
        body = {"instances": [{"image": {"b64": base64.b64encode(j).decode()}} for j in _jpegs()]}
        r = requests.post(srv.url + "/v1/models/densenet121:predict", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 4
        metrics = requests.get(srv.url + "/metrics", timeout=10).text
        assert "densenet_gpu_decode_seconds_count" in metrics and "densenet_nvjpeg_decode_seconds_count" in metrics
    finally:
        stop_server(srv)


def test_a_lone_jpeg_through_crop_graphs_matches_the_two_stage_path(tmp_path: Path) -> None:
    """The device-idle path for one JPEG (decode, crop into the runner's pixel rows, a crop graph per
    size from its second sighting) gives the logits of the two-stage path; a new image of a size
    already captured is cropped from its own pixels; a corrupt JPEG fails alone."""
    from model_server import BadInput
    from model_server.artifact import read_manifest
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp16-cl-graphs", device="cuda")
    d = tmp_path / "densenet121-eager-fp16-cl-graphs"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    runner.warm_up()
    pipeline = DevicePipeline(runner)
    jpegs = _jpegs()
    small = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).resize((500, 375)).save(small, format="JPEG")
    order = [jpegs[0], jpegs[0], jpegs[0], jpegs[1], small.getvalue(), small.getvalue(), jpegs[2]]
    for k, jpeg in enumerate(order):
        (got,) = pipeline([JpegBatch([jpeg])])
        (want,) = pipeline.execute(pipeline.prepare([JpegBatch([jpeg])]))
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor), k
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    sizes = {tuple(Image.open(io.BytesIO(j)).size[::-1]) for j in (jpegs[0], small.getvalue())}
    assert set(pipeline._crop_graphs) >= sizes  # both sizes came twice: captured
    (bad,) = pipeline([JpegBatch([b"\xff\xd8\xff" + b"\0" * 100])])
    assert isinstance(bad, BadInput)


def test_a_request_run_inline_on_the_loop_thread_matches_the_device_thread(tmp_path: Path) -> None:
    """--inline_idle_ms: a lone JPEG that finds the GPU idle runs on the event loop's thread (inside
    submit_nowait); its logits are those the device thread computes for the same request."""
    import asyncio

    from model_server.artifact import read_manifest
    from model_server.batcher import DynamicBatcher
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp16-cl")
    d = tmp_path / "densenet121-eager-fp16-cl"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    pipeline = DevicePipeline(runner)
    jpeg = _jpegs()[0]

    async def serve(inline_after_idle_s: float | None) -> tuple[torch.Tensor, int]:
        batcher = DynamicBatcher(
            pipeline.execute, prepare=pipeline.prepare, alone=pipeline, max_batch_size=8, max_delay_s=0.0,
            max_queue_images=64, inline_after_idle_s=inline_after_idle_s,
        )  # fmt: skip
        try:
            outs = []
            for _ in range(3):
                await asyncio.sleep(0.01)
                outs.append(await batcher.submit(JpegBatch([jpeg]), 1))
            assert all(torch.equal(o, outs[0]) for o in outs)
            return outs[0], batcher.inline_batches
        finally:
            batcher.close()

    inline, n_inline = asyncio.run(serve(0.005))
    threaded, n_threaded = asyncio.run(serve(None))
    assert n_inline == 3 and n_threaded == 0
    assert torch.equal(inline, threaded)


def test_warmup_image_sizes_capture_their_crop_graphs_before_the_first_request(tmp_path: Path) -> None:
    """pipeline.warm_up(sizes): each size's lone-JPEG crop graph is captured before any request, so the
    first request of that size replays it; its answer is what an unwarmed pipeline gives."""
    from model_server.artifact import read_manifest
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp16-cl-graphs", device="cuda")  # the lone path needs graphs
    d = tmp_path / "densenet121-eager-fp16-cl-graphs"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    runner.warm_up()
    warmed = DevicePipeline(runner)
    warmed.warm_up([(640, 480), (1280, 720)])
    assert {(480, 640), (720, 1280)} <= set(warmed._crop_graphs)
    plain = DevicePipeline(runner)
    plain.warm_up()
    assert (480, 640) not in plain._crop_graphs
    buf = io.BytesIO()
    Image.open(io.BytesIO(_jpegs()[0])).convert("RGB").resize((640, 480)).save(buf, format="JPEG")
    photo = buf.getvalue()
    graphs = len(warmed._crop_graphs)
    (first,) = warmed([JpegBatch([photo])])
    (eager,) = plain([JpegBatch([photo])])  # a size seen once: cropped eagerly
    assert len(warmed._crop_graphs) == graphs, "replayed, not captured"
    assert isinstance(first, torch.Tensor) and isinstance(eager, torch.Tensor)
    torch.testing.assert_close(first, eager, atol=1e-3, rtol=0)


@pytest.mark.parametrize("jpeg_decoder", ["nvjpeg", "torchvision"])
def test_two_prepare_threads_crop_what_one_does(tmp_path: Path, jpeg_decoder: str) -> None:
    """DevicePipeline.prepare called from two threads at once (decode_bench --threads; each on a side
    stream of its own; with nvJPEG's hardware decoder, both reading headers on their own and sharing
    its one batched decode) stages the same crops as one call after another."""
    import concurrent.futures

    from model_server.artifact import read_manifest
    from model_server.nvjpeg import hardware_decoder
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp32")
    d = tmp_path / "densenet121-eager-fp32"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    pipeline = DevicePipeline(runner, jpeg_decoder=jpeg_decoder)
    pipeline.warm_up()
    jpegs = _jpegs()
    batches = [[JpegBatch(jpegs[i:] + jpegs[:i])] * 8 for i in range(len(jpegs))]  # 8 requests each, rotated

    def crops(batch: list[JpegBatch]) -> torch.Tensor:
        staged = pipeline.prepare(batch)
        assert staged.ready is not None and staged.whole is not None
        staged.ready.synchronize()
        return staged.whole.clone()

    alone = [crops(b) for b in batches]
    hardware = hardware_decoder(torch.device("cuda"))
    assert hardware is not None and hardware.calls > 0, "warmed"
    before = hardware.calls
    with concurrent.futures.ThreadPoolExecutor(2) as threads:
        together = list(threads.map(crops, batches * 4))
    for i, got in enumerate(together):
        assert torch.equal(got, alone[i % len(batches)]), f"batch {i} differs when prepared beside another"
    used = hardware.calls - before
    assert used == (len(batches) * 4 if jpeg_decoder == "nvjpeg" else 0), f"batched decodes: {used}"


def test_hardware_decoder_decodes_what_torchvision_does() -> None:
    """nvJPEG's hardware decoder called directly: the same pixels as torchvision's batched decode, one
    tensor per image size (sizes mixed in one call), a progressive JPEG left to torchvision, a corrupt
    one refused with a RuntimeError (the decode stage then retries each request alone)."""
    from model_server.nvjpeg import hardware_decoder
    from model_server.preprocess import decode_jpeg_groups, decode_jpegs

    device = torch.device("cuda")
    decoder = hardware_decoder(device)
    assert decoder is not None, "the H100 has JPEG engines"
    jpegs = _jpegs()
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).save(buf, format="JPEG", progressive=True)
    encoded = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in [*jpegs, buf.getvalue(), *jpegs]]
    reference = decode_jpegs(encoded, device)
    groups, rest = decoder.decode(encoded)
    assert rest == [len(jpegs)], "only the progressive JPEG is left over"
    seen = sorted(i for idx, _ in groups for i in idx)
    assert seen == [i for i in range(len(encoded)) if i != len(jpegs)]
    for idx, pixels in groups:
        assert pixels.shape[0] == len(idx) and len({tuple(reference[i].shape) for i in idx}) == 1
        for j, i in enumerate(idx):
            assert torch.equal(pixels[j], reference[i]), f"image {i} differs from torchvision's"
    both = decode_jpeg_groups(encoded, device)
    assert sorted(i for idx, _ in both for i in idx) == list(range(len(encoded)))
    for idx, pixels in both:
        for j, i in enumerate(idx):
            assert torch.equal(pixels[j], reference[i])
    # With the front end's start-of-frame markers: the hardware is asked once per kind of baseline image.
    frames = bytes([0xC0] * len(jpegs) + [0xC2] + [0xC0] * len(jpegs))
    told, rest = decoder.decode(encoded, frames)
    assert rest == [len(jpegs)] and decoder._supported and all(decoder._supported.values())
    for idx, pixels in told:
        assert all(torch.equal(pixels[j], reference[i]) for j, i in enumerate(idx))
    # A marker that lies (the progressive JPEG said to be baseline): still torchvision's pixels for every image.
    lied, rest = decoder.decode(encoded, bytes([0xC0] * len(encoded)))
    assert sorted([*rest, *(i for idx, _ in lied for i in idx)]) == list(range(len(encoded)))
    for idx, pixels in lied:
        assert all(torch.equal(pixels[j], reference[i]) for j, i in enumerate(idx)), "a lie must not corrupt"
    corrupt = torch.frombuffer(bytearray(b"\xff\xd8\xff" + b"\0" * 100), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="nvjpegStatus"):
        decoder.decode([encoded[0], corrupt])
    again, _ = decoder.decode(encoded[:1])  # still decodes after a refusal
    assert torch.equal(again[0][1][0], reference[0])


def test_jpegs_in_a_pinned_request_body_decode_to_the_same_pixels() -> None:
    """``--ipc_pinned_bodies``: a 32-JPEG request body read into a page-locked BodyPool buffer
    (nvjpeg.pinned_bytes) is what the decode stage's tensors view (pinned), and the hardware decoder
    reads the same pixels from it as from pageable memory, the buffer reused for the next body."""
    from model_server.ipc import KIND_JPEG, BodyPool, decode_request
    from model_server.nvjpeg import hardware_decoder, pinned_bytes

    device = torch.device("cuda")
    decoder = hardware_decoder(device)
    assert decoder is not None
    jpegs = (_jpegs() * 8)[:32]
    bodies = BodyPool(64 * 2**20, pinned_bytes)
    reference = decoder.decode([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs])[0]
    for _ in range(2):
        body = bodies.take(sum(map(len, jpegs)))
        body[:] = b"".join(jpegs)
        batch = decode_request(KIND_JPEG, len(jpegs), struct.pack(f"<{len(jpegs)}I", *map(len, jpegs)), body)
        encoded = batch.encoded()
        assert all(t.is_pinned() for t in encoded)
        groups, rest = decoder.decode(encoded)
        assert not rest and [idx for idx, _ in groups] == [idx for idx, _ in reference]
        for (_, got), (_, want) in zip(groups, reference, strict=True):
            assert torch.equal(got, want)
        del body, batch, encoded
    assert bodies.reused == 1


def test_pipeline_crops_the_same_with_either_jpeg_decoder(tmp_path: Path) -> None:
    """``--jpeg_decoder nvjpeg`` and ``torchvision`` stage the same crops (mixed sizes, several requests),
    and a lone JPEG (the crop-graph path) gets the same logits."""
    from model_server.artifact import read_manifest
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp32")
    d = tmp_path / "densenet121-eager-fp32"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    jpegs = _jpegs()
    requests = [JpegBatch(jpegs[:3]), JpegBatch(jpegs[1:]), JpegBatch(jpegs[::-1])]
    staged = {}
    for decoder in ("nvjpeg", "torchvision"):
        pipeline = DevicePipeline(runner, jpeg_decoder=decoder)
        got = pipeline.prepare(requests)
        assert got.ready is not None and got.whole is not None
        got.ready.synchronize()
        lone = [pipeline([JpegBatch(jpegs[:1])])[0] for _ in range(3)]  # the third replays a crop graph
        staged[decoder] = (got.whole.clone(), lone)
    assert torch.equal(staged["nvjpeg"][0], staged["torchvision"][0])
    for a, b in zip(staged["nvjpeg"][1], staged["torchvision"][1], strict=True):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="jpeg_decoder must be one of nvjpeg, torchvision, got 'pil'"):
        DevicePipeline(runner, jpeg_decoder="pil")


def _request_body(jpegs: list[bytes]) -> object:
    """A request of these JPEGs as the device process gets it over IPC: back to back in one buffer."""
    from model_server.ipc import KIND_JPEG, decode_request

    meta = struct.pack(f"<{len(jpegs)}I", *map(len, jpegs))
    return decode_request(KIND_JPEG, len(jpegs), meta, bytearray(b"".join(jpegs)))


def test_headers_read_on_arrival_decode_the_same_pixels(tmp_path: Path) -> None:
    """``--nvjpeg_early_headers``: headers read as a request arrives (read_headers) give the same pixels
    as the decode stage reading them itself, a progressive JPEG still goes to torchvision, a corrupt
    header leaves the request to the decode stage (which fails only that request), and a pipeline
    with early headers stages exactly the crops of one without."""
    from model_server.artifact import read_manifest
    from model_server.nvjpeg import hardware_decoder
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.runtimes import load_runner

    device = torch.device("cuda")
    decoder = hardware_decoder(device)
    assert decoder is not None
    jpegs = _jpegs()
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpegs[0])).save(buf, format="JPEG", progressive=True)
    mixed = [*jpegs, buf.getvalue(), *jpegs]
    build_artifacts(tmp_path, "densenet121-eager-fp32")
    d = tmp_path / "densenet121-eager-fp32"
    runner = load_runner(read_manifest(d), d, device)
    early = DevicePipeline(runner, early_headers=True)
    late = DevicePipeline(runner, early_headers=False)
    batch = _request_body(mixed)
    assert isinstance(batch, JpegBatch)
    early.read_headers(batch)
    assert batch.headers is not None and batch.headers.info.shape == (len(mixed), 4)
    for (h, w, _, _), jpeg in zip(batch.headers.info.tolist(), mixed, strict=True):
        assert (w, h) == Image.open(io.BytesIO(jpeg)).size
    encoded = batch.encoded()
    want, want_rest = decoder.decode(encoded)
    got, got_rest = decoder.decode_headers(batch.headers)
    assert got_rest == want_rest == [len(jpegs)]
    assert [idx for idx, _ in got] == [idx for idx, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert torch.equal(a, b)
    # Two requests, one read on arrival and one not, and a third with a corrupt JPEG: the same crops
    # as without early reads, and only the corrupt request fails.
    corrupt = b"\xff\xd8\xff" + b"\0" * 100
    staged = []
    for pipeline in (early, late):
        requests = [_request_body(mixed), _request_body(jpegs[::-1]), _request_body([jpegs[0], corrupt])]
        pipeline.read_headers(requests[0])
        pipeline.read_headers(requests[2])
        assert requests[2].headers is None  # nvJPEG could not read it: left to the decode stage
        s = pipeline.prepare(requests)
        assert s.ready is not None
        s.ready.synchronize()
        assert set(s.failed) == {2} and isinstance(s.failed[2], Exception)
        staged.append((s.parts[0].clone(), s.parts[1].clone()))
    for a, b in zip(*staged, strict=True):
        assert torch.equal(a, b)
    assert late.early_headers is False
    late.read_headers(batch := _request_body(jpegs))
    assert batch.headers is None


def test_decode_stream_priority_high_is_the_gpus_highest(tmp_path: Path) -> None:
    """``--decode_stream_priority high``: the decode stage's side stream has the GPU's greatest priority
    (torch maps -1000 there), ``normal`` the default's; the crops are the same."""
    from model_server.artifact import read_manifest
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp32")
    d = tmp_path / "densenet121-eager-fp32"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    _, greatest = torch.cuda.Stream.priority_range()
    crops = {}
    for priority in ("high", "normal"):
        pipeline = DevicePipeline(runner, decode_priority=priority)
        s = pipeline.prepare([JpegBatch(_jpegs())])
        assert s.ready is not None and s.whole is not None
        s.ready.synchronize()
        assert pipeline._side_stream().priority == (greatest if priority == "high" else 0)
        crops[priority] = s.whole.clone()
    assert torch.equal(crops["high"], crops["normal"])


def test_the_triton_crop_kernel_crops_as_torch_does_on_the_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--crop_kernel triton`` on the GPU: the compiled binary launched through the driver (as the server
    does; found in ``DENSENET_CROP_KERNEL_DIR`` or compiled into the user cache) crops VGA and 12 MP
    batches as Triton's own launch of the kernel does, and both differ from torch's by at most one step of
    255 in a few pixels; the pipeline's crops of real photos give the model's top-1 torch's give. A binary
    compiled elsewhere (``CROP_KERNEL_BINARIES``: a directory compiled by another Triton, such as the
    container image's) crops the same."""
    from model_server import crop_kernel
    from model_server.artifact import read_manifest
    from model_server.crop_kernel import CropBinary, CubinCrop, binary_for, cubin_crop, triton_resize_crop
    from model_server.pipeline import DevicePipeline, JpegBatch
    from model_server.preprocess import resize_crop_pixels
    from model_server.runtimes import load_runner

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DENSENET_CROP_KERNEL_DIR", raising=False)
    crop_kernel._loaded.clear()
    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    launchers = {"compiled here": cubin_crop(torch.device("cuda"))}
    assert list((tmp_path / "cache" / "densenet-knative" / "crop-kernels").glob(f"crop-sm{arch}-*.cubin"))
    elsewhere = os.environ.get("CROP_KERNEL_BINARIES")
    if elsewhere:
        found = CropBinary.load(Path(elsewhere), arch)
        assert found is not None, f"no binary for sm_{arch} in {elsewhere}"
        launchers["compiled elsewhere"] = CubinCrop(found, torch.device("cuda"))
    assert binary_for(arch) == launchers["compiled here"].binary  # the second start reads it back
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((8, 3, 480, 640), (2, 3, 3024, 4032), (3, 3, 300, 200)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda", generator=g)
        jit = triton_resize_crop(x)
        d = (jit.int() - resize_crop_pixels(x).to(torch.uint8).int()).abs()
        assert int(d.max()) <= 1 and int((d > 0).sum()) <= d.numel() // 1000, shape
        for how, launch in launchers.items():
            got = launch(x)
            assert got.shape == jit.shape and int((got.int() - jit.int()).abs().max()) <= 1, (how, shape)
            assert int((got != jit).sum()) <= d.numel() // 1000, (how, shape)
    crop_kernel._loaded.clear()
    build_artifacts(tmp_path, "densenet121-eager-fp32")
    d = tmp_path / "densenet121-eager-fp32"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    jpegs = _jpegs()
    got = {}
    for kernel in ("torch", "triton"):
        pipeline = DevicePipeline(runner, crop_kernel=kernel)
        s = pipeline.prepare([JpegBatch(jpegs), JpegBatch(jpegs[::-1])])
        assert s.ready is not None and s.whole is not None
        s.ready.synchronize()
        got[kernel] = (s.whole.clone(), pipeline.execute(s))
    assert (got["torch"][0].int() - got["triton"][0].int()).abs().max() <= 1
    for a, b in zip(got["torch"][1], got["triton"][1], strict=True):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        assert torch.equal(a.argmax(1), b.argmax(1))
