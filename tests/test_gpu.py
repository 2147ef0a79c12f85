"""GPU serving path (skipped without CUDA): nvJPEG batch decode agrees with PIL, the server serves on CUDA."""

from __future__ import annotations

import base64
import io
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


def test_graphs_captured_beside_the_decoder_warm_up_match_eager(tmp_path: Path) -> None:
    """The CUDA graphs are captured while another thread warms nvJPEG (thread-local capture mode):
    every bucket must be captured and replay what the model computes without a graph."""
    import threading

    from model_server.artifact import read_manifest
    from model_server.cli import warm_decoder_timed
    from model_server.runtimes import load_runner

    build_artifacts(tmp_path, "densenet121-eager-fp16-cl-graphs", device="cuda")  # a CUDA-only variant
    d = tmp_path / "densenet121-eager-fp16-cl-graphs"
    runner = load_runner(read_manifest(d), d, torch.device("cuda"))
    decoder = threading.Thread(target=lambda: [warm_decoder_timed(torch.device("cuda"), {}) for _ in range(5)])
    decoder.start()
    runner.warm_up(beside=decoder)
    decoder.join()
    assert sorted(runner._graphs) == runner.buckets
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
        assert "densenet_gpu_decode_seconds_count" in metrics
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
