"""``python -m optimize``: list, build with each weights source, fidelity gate, artifact safety."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_server import ArtifactError
from model_server.artifact import read_manifest
from optimize import FidelityError, registry
from optimize.registry import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optimize", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_list_prints_every_slug() -> None:
    out = run_cli("list")
    assert out.returncode == 0
    for slug in registry.slugs():
        assert slug in out.stdout
    js = json.loads(run_cli("list", "--json").stdout)
    assert [v["slug"] for v in js] == registry.slugs()


def test_unknown_variant_is_a_usage_error(tmp_path: Path) -> None:
    out = run_cli("build", "--variant", "densenet121-bogus", "--weights", "random", "--output-dir", str(tmp_path))
    assert out.returncode == 2
    assert "densenet121-bogus" in out.stderr and "densenet121-eager-fp32" in out.stderr


def test_bad_weights_path_is_a_clear_error(tmp_path: Path) -> None:
    out = run_cli("build", "--variant", "densenet121-eager-fp32", "--weights", str(tmp_path / "nope.pt"),
                  "--output-dir", str(tmp_path))  # fmt: skip
    assert out.returncode == 1
    assert "neither 'imagenet', 'random' nor an existing file" in out.stderr


def test_imagenet_offline_fails_with_a_clear_message(tmp_path: Path) -> None:
    # An empty torch hub cache and an unreachable proxy: torchvision's real download path fails fast.
    env = {
        "TORCH_HOME": str(tmp_path / "hub"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    out = run_cli("build", "--variant", "densenet121-eager-fp32", "--weights", "imagenet", "--output-dir",
                  str(tmp_path / "a"), env=env)  # fmt: skip
    assert out.returncode == 1
    assert "could not download ImageNet weights" in out.stderr
    assert "--weights random" in out.stderr
    assert not (tmp_path / "a" / "densenet121-eager-fp32" / MANIFEST_NAME).exists()


def test_weights_file_is_loaded_and_recorded(tmp_path: Path, artifacts_dir: Path) -> None:
    import torchvision

    torch.manual_seed(7)
    state_path = tmp_path / "weights.pt"
    torch.save(torchvision.models.densenet121(weights=None).state_dict(), state_path)
    out = run_cli("build", "--variant", "densenet121-eager-fp32", "--weights", str(state_path), "--output-dir",
                  str(tmp_path / "a"), "--device", "cpu", "--max-batch", "2")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "densenet121-eager-fp32" in out.stdout and "ok" in out.stdout
    manifest = read_manifest(tmp_path / "a" / "densenet121-eager-fp32")
    assert manifest["weights"]["kind"] == "file" and manifest["weights"]["name"] == str(state_path)
    # Different weights than the seed-0 artifact: the payload differs.
    assert (
        manifest["files"]["model.pt"]["sha256"]
        != read_manifest(artifacts_dir / "densenet121-eager-fp32")["files"]["model.pt"]["sha256"]
    )


def test_fidelity_failure_writes_no_manifest(tmp_path: Path) -> None:
    import dataclasses

    from optimize.build import build_variant, reference_logits
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    reference, weights = load_reference("random")
    images = sample_batch(2)
    strict = dataclasses.replace(
        registry.get("densenet121-eager-fp16-cl"),
        tolerance=registry.Tolerance(min_top1_agreement=1.0, min_top5_overlap=1.0, max_abs_logit_err=0.0),
    )
    with pytest.raises(FidelityError, match="max \\|logit error\\|"):
        build_variant(strict, reference=reference, weights=weights, images=images,
                      ref_logits=reference_logits(reference, images, torch.device("cpu")),
                      output_dir=tmp_path, device=torch.device("cpu"), max_batch=2)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_validation_feeds_no_batch_larger_than_the_artifact_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An artifact built for batch 1 (an AOTInductor bucket) is validated in chunks of 1, not refused."""
    from optimize import build
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    real = build.load_runner
    seen: list[int] = []

    def strict_runner(manifest: dict, path: Path, device: torch.device):  # type: ignore[no-untyped-def]
        runner = real(manifest, path, device)

        def call(x: torch.Tensor) -> torch.Tensor:
            seen.append(x.shape[0])
            if x.shape[0] > int(manifest["input"]["max_batch"]):
                raise ArtifactError(f"batch {x.shape[0]} exceeds the largest package")
            return runner(x)

        return call

    monkeypatch.setattr(build, "load_runner", strict_runner)
    reference, weights = load_reference("random")
    images = sample_batch(3)
    manifest = build.build_variant(
        registry.get("densenet121-eager-fp32"), reference=reference, weights=weights, images=images,
        ref_logits=build.reference_logits(reference, images, torch.device("cpu")), output_dir=tmp_path,
        device=torch.device("cpu"), max_batch=1,
    )  # fmt: skip
    assert seen[:3] == [1, 1, 1] and max(seen) == 1
    assert manifest["meta"]["fidelity"]["top1_agreement"] == 1.0


def test_tampered_payload_is_refused(tmp_path: Path, artifacts_dir: Path) -> None:
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(artifacts_dir / "densenet121-eager-fp32", d)
    data = bytearray((d / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (d / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="fails its checksum"):
        read_manifest(d)


def test_server_runner_matches_reference_on_sample_photos(artifacts_dir: Path) -> None:
    """The artifact, loaded by the server's runner, reproduces the reference (same seed) exactly."""
    from model_server.runtimes import load_runner
    from optimize.build import reference_logits
    from optimize.samples import sample_batch
    from optimize.weights import load_reference

    d = artifacts_dir / "densenet121-eager-fp32"
    runner = load_runner(read_manifest(d), d, torch.device("cpu"))
    images = sample_batch(3)
    reference, _ = load_reference("random", seed=0)
    torch.testing.assert_close(
        runner(images), reference_logits(reference, images, torch.device("cpu")), atol=1e-4, rtol=0
    )
