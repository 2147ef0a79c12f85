"""setup-cluster.sh under stub docker/kind/kubectl/helm: order, idempotency, failures."""

from __future__ import annotations

from cluster_testlib import StubEnv

# Calls that create or change something (kubectl apply/patch are declarative no-ops when unchanged).
CREATING = {
    ("kind", "create"),
    ("kind", "delete"),
    ("docker", "run"),
    ("docker", "network"),
    ("docker", "start"),
    ("helm", "upgrade"),
    ("kubectl", "create"),
    ("kubectl", "delete"),
}


def creating_calls(env: StubEnv) -> list[tuple[str, list[str]]]:
    out = []
    for tool, argv in env.calls():
        args = argv[2:] if argv[:1] in (["--context"], ["--kube-context"]) else argv
        if (tool, args[0]) in CREATING:
            out.append((tool, argv))
        elif (
            tool == "docker"
            and args[0] == "exec"
            and any(a in args for a in ("bash", "cp", "mkdir", "systemctl", "configure"))
        ):
            out.append((tool, argv))
    return out


def index_of(calls: list[tuple[str, list[str]]], tool: str, *words: str) -> int:
    for i, (t, argv) in enumerate(calls):
        if t == tool and all(w in argv or any(w in a for a in argv) for w in words):
            return i
    raise AssertionError(f"no {tool} call with {words}")


def test_help_and_unknown_flag(stub_env: StubEnv) -> None:
    ok = stub_env.run("setup-cluster.sh", "--help")
    assert ok.returncode == 0 and "Usage: ./setup-cluster.sh" in ok.stdout and "--with-kserve" in ok.stdout
    bad = stub_env.run("setup-cluster.sh", "--gpus")
    assert bad.returncode == 1 and "unknown argument: --gpus" in bad.stderr and "Usage:" in bad.stderr
    assert stub_env.calls() == []


def test_gpu_setup_order_then_second_run_changes_nothing(stub_env: StubEnv) -> None:
    first = stub_env.run("setup-cluster.sh")
    assert first.returncode == 0, first.stderr
    calls = stub_env.calls()
    order = [
        index_of(calls, "docker", "info"),
        index_of(calls, "docker", "run", "kind-registry"),
        index_of(calls, "kind", "create", "cluster"),
        index_of(calls, "docker", "cp", "/etc/containerd/certs.d/localhost:5001/hosts.toml"),
        index_of(calls, "docker", "network", "connect"),
        index_of(calls, "docker", "densenet-worker", "bash"),
        index_of(calls, "docker", "nvidia-ctk", "configure"),
        index_of(calls, "kubectl", "nvidia-runtimeclass.yaml"),
        index_of(calls, "helm", "upgrade", "nvidia-device-plugin"),
        index_of(calls, "kubectl", "wait", "pod/gpu-smoke"),
        index_of(calls, "kubectl", "serving-crds.yaml"),
        index_of(calls, "kubectl", "serving-core.yaml"),
        index_of(calls, "kubectl", "kourier.yaml"),
        index_of(calls, "kubectl", "patch", "config-network"),
        index_of(calls, "kubectl", "wait", "knative-serving"),
    ]
    assert order == sorted(order), f"steps out of order: {order}"
    create = next(argv for tool, argv in calls if tool == "kind" and argv[0] == "create")
    assert "--image" in create and create[create.index("--image") + 1].startswith("kindest/node:v1.")
    assert create[create.index("--config") + 1].endswith("cluster/kind-config.yaml")
    helm = next(argv for tool, argv in calls if tool == "helm" and "upgrade" in argv)
    assert helm[helm.index("--version") + 1] and "nvidia-device-plugin-values.yaml" in helm[helm.index("--values") + 1]
    assert stub_env.state()["cluster_info"]["gpu-proof"] == "passed"
    assert "GPU 0: NVIDIA" in first.stderr  # the proof pod's nvidia-smi output is shown

    stub_env.clear_calls()
    second = stub_env.run("setup-cluster.sh")
    assert second.returncode == 0, second.stderr
    assert creating_calls(stub_env) == [], "a second run must create nothing"
    assert "already exists, reusing it" in second.stderr


def test_cpu_setup_skips_every_nvidia_step(stub_env: StubEnv) -> None:
    result = stub_env.run("setup-cluster.sh", "--cpu", "--name", "cpu-box")
    assert result.returncode == 0, result.stderr
    flat = [" ".join([tool, *argv]) for tool, argv in stub_env.calls()]
    assert not [c for c in flat if "nvidia" in c], "no NVIDIA step on a CPU cluster"
    create = next(c for c in flat if c.startswith("kind create"))
    assert "--name cpu-box" in create and "kind-config-cpu.yaml" in create
    assert all("--context kind-cpu-box" in c for c in flat if c.startswith("kubectl"))
    assert stub_env.state()["cluster_info"]["accelerator"] == "cpu"


def test_every_missing_tool_is_reported_at_once(stub_env: StubEnv) -> None:
    for tool in ("kind", "helm", "nvidia-smi"):
        stub_env.remove_tool(tool)
    (stub_env.root / "off.toml").write_text("accept-nvidia-visible-devices-as-volume-mounts = false\n")
    result = stub_env.run(
        "setup-cluster.sh",
        extra_env={"STUB_DOCKER_RUNTIME": "runc", "NVIDIA_CTK_CONFIG": str(stub_env.root / "off.toml")},
    )
    assert result.returncode == 1
    err = result.stderr
    assert "preflight found 5 problem(s)" in err
    for expected in (
        "'kind' is not installed",
        "'helm' is not installed",
        "nvidia-smi not found",
        "sudo nvidia-ctk config --set accept-nvidia-visible-devices-as-volume-mounts=true --in-place",
        "sudo nvidia-ctk runtime configure --runtime=docker --set-as-default",
    ):
        assert expected in err
    assert err.count("fix:") == 5
    assert creating_calls(stub_env) == []


def test_docker_not_running(stub_env: StubEnv) -> None:
    result = stub_env.run("setup-cluster.sh", "--cpu", extra_env={"STUB_DOCKER_DOWN": "1"})
    assert result.returncode == 1
    assert "Docker daemon is not reachable" in result.stderr and "systemctl start docker" in result.stderr
    assert creating_calls(stub_env) == []


def test_no_gpu_inside_the_node(stub_env: StubEnv) -> None:
    result = stub_env.run("setup-cluster.sh", extra_env={"STUB_NODE_NO_GPU": "1"})
    assert result.returncode == 1
    assert "no GPU inside the kind node densenet-worker" in result.stderr
    assert "accept-nvidia-visible-devices-as-volume-mounts" in result.stderr
    assert not [c for c in stub_env.calls() if c[0] == "helm"]


def test_gpu_never_allocatable(stub_env: StubEnv) -> None:
    result = stub_env.run("setup-cluster.sh", extra_env={"STUB_NO_GPU": "1", "GPU_ALLOCATABLE_TIMEOUT_S": "0"})
    assert result.returncode == 1
    assert "no GPU is allocatable (nvidia.com/gpu)" in result.stderr
    assert "logs ds/nvidia-device-plugin" in result.stderr
    assert not [argv for tool, argv in stub_env.calls() if tool == "kubectl" and "serving-core" in " ".join(argv)]


def test_with_kserve_installs_cert_manager_then_kserve_once(stub_env: StubEnv) -> None:
    assert stub_env.run("setup-cluster.sh", "--cpu", "--with-kserve").returncode == 0
    helm = [argv for tool, argv in stub_env.calls() if tool == "helm" and "upgrade" in argv]
    releases = [argv[argv.index("--install") + 1] for argv in helm]
    assert releases == ["cert-manager", "kserve-crd", "kserve"]
    assert "kserve.controller.deploymentMode=Knative" in helm[2]
    stub_env.clear_calls()
    assert stub_env.run("setup-cluster.sh", "--cpu", "--with-kserve").returncode == 0
    assert creating_calls(stub_env) == []


def test_delete(stub_env: StubEnv) -> None:
    stub_env.seed(clusters=["densenet"])
    result = stub_env.run("setup-cluster.sh", "--delete")
    assert result.returncode == 0 and "cluster densenet deleted" in result.stderr
    assert stub_env.state()["clusters"] == []
    again = stub_env.run("setup-cluster.sh", "--delete")
    assert again.returncode == 0 and "nothing to delete" in again.stderr
