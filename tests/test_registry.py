"""The registry in the style of torchvision's weights-metadata tests."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from optimize import registry
from optimize.registry import Variants

ROOT = Path(__file__).resolve().parents[1]


def test_importable_without_torch() -> None:
    code = "import sys, optimize.registry; assert 'torch' not in sys.modules, 'registry pulled in torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_enum_aliases() -> None:
    # Two members with equal records would silently collapse into one.
    assert len(Variants.__members__) == len(list(Variants))
    values = [m.value for m in Variants]
    assert all(a != b for i, a in enumerate(values) for b in values[i + 1 :])
    assert len({hash(v) for v in values}) == len(values)


def test_required_fields_and_types() -> None:
    for v in registry.all_variants():
        assert isinstance(v.technique, registry.Technique)
        assert isinstance(v.precision, registry.Precision)
        assert isinstance(v.runtime, registry.Runtime)
        assert v.description.strip()
        assert set(v.devices) <= {"cpu", "cuda"} and v.devices
        with pytest.raises(dataclasses.FrozenInstanceError):
            v.slug = "x"  # type: ignore[misc]
        with pytest.raises(TypeError):
            v.options["x"] = 1  # type: ignore[index]


def test_slugs_are_unique_dns1123() -> None:
    slugs = registry.slugs()
    assert len(set(slugs)) == len(slugs)
    for s in slugs:
        assert registry.is_valid_slug(s), s
        assert s.startswith(registry.ARCH + "-")
    assert not registry.is_valid_slug("DenseNet_121")
    assert not registry.is_valid_slug("1densenet")


def test_bases_exist_and_lead_to_the_baseline() -> None:
    for v in registry.all_variants():
        chain = list(registry.lineage(v.slug))
        assert chain[-1].slug == registry.REFERENCE_SLUG
        assert chain[-1].base is None
    assert registry.DEFAULT.value.slug == registry.REFERENCE_SLUG


def test_unknown_slug_names_the_valid_ones() -> None:
    with pytest.raises(registry.RegistryError, match="densenet121-eager-fp32"):
        registry.get("densenet121-nope")


def test_meta_recomputed_from_real_artifacts(artifacts_dir: Path) -> None:
    """What variant.json claims (params, GFLOPs, size, checksums) is recomputed from the files."""
    import torch
    import torchvision

    from model_server.artifact import read_manifest, sha256_file
    from optimize.build import count_gflops

    expected_params = sum(p.numel() for p in torchvision.models.densenet121(weights=None).parameters())
    for slug in ("densenet121-eager-fp32", "densenet121-eager-fp16-cl"):
        d = artifacts_dir / slug
        manifest = read_manifest(d)
        v = registry.get(slug)
        assert manifest["slug"] == slug
        assert manifest["technique"] == v.technique.value
        assert manifest["precision"] == v.precision.value
        assert manifest["runtime"] == v.runtime.value
        meta = manifest["meta"]
        state = torch.load(d / "model.pt", weights_only=True)
        assert (
            meta["num_params"]
            == expected_params
            == sum(t.numel() for k, t in state.items() if "running" not in k and "num_batches" not in k)
        )
        model = torchvision.models.densenet121(weights=None)
        assert meta["gflops"] == pytest.approx(count_gflops(model), rel=1e-3)
        assert meta["file_size_mb"] == pytest.approx((d / "model.pt").stat().st_size / 1e6, abs=1e-3)
        for name, rec in manifest["files"].items():
            assert sha256_file(d / name) == rec["sha256"]
        assert manifest["weights"] == {"kind": "random", "name": "random", "seed": 0, "sha256": None}
        assert json.loads((d / "labels.json").read_text())[281] == "tabby"
    fp32 = read_manifest(artifacts_dir / "densenet121-eager-fp32")["meta"]["file_size_mb"]
    fp16 = read_manifest(artifacts_dir / "densenet121-eager-fp16-cl")["meta"]["file_size_mb"]
    assert fp16 == pytest.approx(fp32 / 2, rel=0.01)
