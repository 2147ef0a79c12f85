"""Shared fixtures: a built random-weights artifact and a real predictor on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_support import Server, build_artifacts, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # get_closest_marker, not ``in item.keywords``: keywords also hold folder names (tests/cluster/...).
    has_cuda = False
    if any(item.get_closest_marker("gpu") for item in items):
        import torch

        has_cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("gpu") and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; torch sees none on this machine"))
        if item.get_closest_marker("slow") and not config.getoption("--runslow"):
            item.add_marker(pytest.mark.skip(reason="slow on 2 CPU cores; run with --runslow"))
        if item.get_closest_marker("cluster") and os.environ.get("DENSENET_CLUSTER_TESTS") != "1":
            item.add_marker(pytest.mark.skip(reason="needs a live Kind cluster; set DENSENET_CLUSTER_TESTS=1"))


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP32 and FP16 channels-last artifacts built once per session with seeded random weights."""
    out = tmp_path_factory.mktemp("artifacts")
    build_artifacts(out, "densenet121-eager-fp32", "densenet121-eager-fp16-cl")
    return out


@pytest.fixture(scope="module")
def server(artifacts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real predictor on 127.0.0.1 serving the FP32 artifact, batches up to 4."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(
        artifacts_dir / "densenet121-eager-fp32", log, "--max_batch_size", "4", "--max_delay_ms", "20",
        "--max_request_images", "4", "--max_body_bytes", str(8 * 1024 * 1024),
    )  # fmt: skip
    yield srv
    stop_server(srv)
