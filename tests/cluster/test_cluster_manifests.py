"""Every rendered manifest validates against the real, strict CRD schemas, plus rules a schema can't say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cluster_testlib import REPO_ROOT, CrdSchema, cpu_capable, deployable_slugs, kustomize

PLACEHOLDERS = ("densenet121-variant", "densenet121-predictor")
DIGEST_RE = re.compile(r"^[a-z0-9.:/_-]+@sha256:[0-9a-f]{64}$")
FAKE_DIGEST = "sha256:" + "ab" * 32
# Knative feature flags that are on by default (config-features); any other flag-gated field fails.
KNATIVE_DEFAULT_FLAGS = {"kubernetes.podspec-volumes-emptydir"}


def render(tmp_path: Path, overlay: Path, *, cpu: bool, image: str | None = None) -> list[dict[str, Any]]:
    """Render an overlay the way deploy-knative.sh does: optional CPU component and image by digest."""
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources:"]
    lines.append(f"  - {os.path.relpath(overlay, tmp_path)}")
    if cpu:
        cpu_dir = REPO_ROOT / "manifests" / "components" / "cpu"
        lines += ["components:", f"  - {os.path.relpath(cpu_dir, tmp_path)}"]
    if image:
        name, digest = image.split("@")
        lines += ["images:", "  - name: densenet121-predictor", f"    newName: {name}", f"    digest: {digest}"]
    (tmp_path / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return kustomize(tmp_path)


def overlays(kind: str) -> list[Path]:
    root = REPO_ROOT / "manifests" / ("overlays" if kind == "knative" else "kserve/overlays")
    return [root / slug for slug in deployable_slugs()]


def cases() -> list[Any]:
    return [
        pytest.param(kind, slug, cpu, id=f"{kind}-{slug}-{'cpu' if cpu else 'gpu'}")
        for kind in ("knative", "kserve")
        for slug in deployable_slugs()
        for cpu in (False, True)
        if not cpu or cpu_capable(slug)
    ]


def container_of(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Service":
        return doc["spec"]["template"]["spec"]["containers"][0]
    return doc["spec"]["predictor"]["containers"][0]


def scale_bounds(doc: dict[str, Any]) -> tuple[int, int]:
    if doc["kind"] == "Service":
        notes = doc["spec"]["template"]["metadata"]["annotations"]
        return int(notes["autoscaling.knative.dev/min-scale"]), int(notes["autoscaling.knative.dev/max-scale"])
    return doc["spec"]["predictor"]["minReplicas"], doc["spec"]["predictor"]["maxReplicas"]


def check_rules(doc: dict[str, Any], *, slug: str, cpu: bool, deployed: bool) -> None:
    """The rules a schema cannot express."""
    low, high = scale_bounds(doc)
    assert 0 <= low <= high, f"min-scale {low} > max-scale {high}"
    container = container_of(doc)
    limits = container["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    if cpu:
        assert "nvidia.com/gpu" not in limits
        assert env["DENSENET_DEVICE"] == "cpu"
    else:
        assert str(limits.get("nvidia.com/gpu")) == "1", "a GPU variant must limit nvidia.com/gpu to 1"
        assert env["DENSENET_DEVICE"] == "cuda"
    assert "DENSENET_ADMIN_TOKEN" not in env, "the profiler stays off unless a Secret enables it"
    assert doc["metadata"]["name"] == slug
    text = yaml.safe_dump(doc)
    if deployed:
        for placeholder in PLACEHOLDERS:
            assert placeholder not in text, f"placeholder {placeholder} left in the rendered manifest"
        assert DIGEST_RE.match(container["image"]), f"image not by digest: {container['image']}"
    sec = container["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] != 0
    assert sec["allowPrivilegeEscalation"] is False and sec["privileged"] is False
    assert sec["capabilities"] == {"drop": ["ALL"]}
    assert sec["readOnlyRootFilesystem"] is True
    assert sec["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = (
        doc["spec"]["template"]["spec"]["volumes"] if doc["kind"] == "Service" else doc["spec"]["predictor"]["volumes"]
    )
    assert "emptyDir" in {v["name"]: v for v in volumes}[mounts["/tmp"]], "/tmp must be a writable emptyDir"
    for var in ("HOME", "XDG_CACHE_HOME", "TORCH_HOME", "MPLCONFIGDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        assert env[var].startswith("/tmp/"), f"{var} must point into the writable /tmp volume"
    # Knative serves one port; readiness is the model's own readiness on it.
    ports = container["ports"]
    assert [p["containerPort"] for p in ports] == [8080] and ports[0]["name"] == "http1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"].get("port", 8080) == 8080, f"{probe} must use the serving port"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "a GPU cold start needs >= 5 minutes"


def flagged_fields(schema: dict[str, Any], obj: Any, path: str = "") -> list[tuple[str, str]]:
    """Fields of ``obj`` whose schema says they sit behind a Knative feature flag."""
    found: list[tuple[str, str]] = []
    match = re.search(r"behind a feature flag - (\S+)", schema.get("description", ""))
    if match:
        found.append((path, match.group(1)))
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key in schema["properties"]:
                found += flagged_fields(schema["properties"][key], value, f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += flagged_fields(schema["items"], item, f"{path}[{i}]")
    return found


@pytest.mark.parametrize(("kind", "slug", "cpu"), cases())
def test_rendered_overlay_validates_strictly(
    kind: str, slug: str, cpu: bool, tmp_path: Path, knative_crd: CrdSchema, kserve_crd: CrdSchema
) -> None:
    overlay = (REPO_ROOT / "manifests" / ("overlays" if kind == "knative" else "kserve/overlays")) / slug
    image = f"localhost:5001/{slug}@{FAKE_DIGEST}"
    docs = render(tmp_path, overlay, cpu=cpu, image=image)
    assert len(docs) == 1
    crd = knative_crd if kind == "knative" else kserve_crd
    crd.validate(docs[0])
    check_rules(docs[0], slug=slug, cpu=cpu, deployed=True)
    if kind == "knative":
        flags = {flag for _, flag in flagged_fields(crd.raw, docs[0])}
        assert flags <= KNATIVE_DEFAULT_FLAGS, f"fields behind disabled Knative feature flags: {flags}"
    else:
        notes = docs[0]["metadata"]["annotations"]
        assert notes["serving.kserve.io/deploymentMode"] == "Knative"


@pytest.mark.parametrize("kind", ["knative", "kserve"])
def test_undeployed_overlay_keeps_the_image_placeholder(kind: str) -> None:
    """Overlays render on their own (kubectl kustomize manifests/overlays/<slug>) with the placeholder."""
    for overlay in overlays(kind):
        docs = kustomize(overlay)
        assert container_of(docs[0])["image"] == "densenet121-predictor"


def test_strict_schema_rejects_unknown_fields(tmp_path: Path, knative_crd: CrdSchema) -> None:
    doc = render(tmp_path, overlays("knative")[0], cpu=False, image=f"localhost:5001/x@{FAKE_DIGEST}")[0]
    container_of(doc)["imagePullPolicyy"] = "IfNotPresent"
    with pytest.raises(jsonschema.ValidationError, match="imagePullPolicyy"):
        knative_crd.validate(doc)


def test_rules_catch_bad_manifests(tmp_path: Path) -> None:
    good = render(tmp_path, overlays("knative")[0], cpu=False, image=f"localhost:5001/x@{FAKE_DIGEST}")[0]
    slug = good["metadata"]["name"]
    check_rules(good, slug=slug, cpu=False, deployed=True)

    swapped = yaml.safe_load(yaml.safe_dump(good))
    notes = swapped["spec"]["template"]["metadata"]["annotations"]
    notes["autoscaling.knative.dev/min-scale"] = "3"
    with pytest.raises(AssertionError, match="min-scale"):
        check_rules(swapped, slug=slug, cpu=False, deployed=True)

    no_gpu = yaml.safe_load(yaml.safe_dump(good))
    del container_of(no_gpu)["resources"]["limits"]["nvidia.com/gpu"]
    with pytest.raises(AssertionError, match=r"nvidia\.com/gpu"):
        check_rules(no_gpu, slug=slug, cpu=False, deployed=True)

    tagged = yaml.safe_load(yaml.safe_dump(good))
    container_of(tagged)["image"] = f"localhost:5001/{slug}:dev"
    with pytest.raises(AssertionError, match="digest"):
        check_rules(tagged, slug=slug, cpu=False, deployed=True)


def test_overlays_match_the_registry() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "cluster" / "gen_overlays.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for kind in ("knative", "kserve"):
        for overlay in overlays(kind):
            assert (overlay / "kustomization.yaml").is_file()


def test_profiler_token_is_documented_not_set() -> None:
    base = (REPO_ROOT / "manifests" / "base" / "knative-service.yaml").read_text()
    assert "DENSENET_ADMIN_TOKEN" in base  # the comment saying how to enable it
    docs = kustomize(REPO_ROOT / "manifests" / "base")
    names = [e["name"] for e in container_of(docs[0])["env"]]
    assert "DENSENET_ADMIN_TOKEN" not in names
