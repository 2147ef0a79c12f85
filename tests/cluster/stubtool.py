"""Stand-in for docker, kind, kubectl, helm and nvidia-smi in the script tests.

Installed on PATH under each tool's name (by conftest.py). Every call is appended to
``$STUB_LOG`` as one JSON line ``{"tool": ..., "argv": [...]}``; what exists (clusters, registry,
node files, helm releases, applied objects) lives in the JSON file ``$STUB_STATE``, so a second
run of a script sees what the first one created. Failures are switched on by environment:

- ``STUB_DOCKER_DOWN=1``: ``docker info`` fails.
- ``STUB_DOCKER_RUNTIME``: docker's default runtime (default ``nvidia``).
- ``STUB_NODE_NO_GPU=1``: ``nvidia-smi`` inside a kind node fails.
- ``STUB_NO_GPU=1``: no node reports allocatable ``nvidia.com/gpu``.
- ``STUB_FAIL_ROLLOUT=1``: ``kubectl wait`` on a ksvc / InferenceService times out.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

GPU_LINE = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-1111-2222-3333-444444444444)"


def load_state() -> dict[str, Any]:
    path = Path(os.environ["STUB_STATE"])
    state: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for key, empty in (
        ("clusters", []),
        ("files", {}),
        ("toolkit", []),
        ("containerd_nvidia", []),
        ("helm", {}),
        ("applied", []),
        ("cluster_info", {}),
        ("images", {}),
        ("pushed", {}),
    ):
        state.setdefault(key, empty)
    state.setdefault("registry", False)
    state.setdefault("registry_on_kind", False)
    state.setdefault("kserve_crd", False)
    return state


def save_state(state: dict[str, Any]) -> None:
    Path(os.environ["STUB_STATE"]).write_text(json.dumps(state, indent=1))


def flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def option(argv: list[str], name: str) -> str | None:
    """Value of ``--name VALUE`` or ``--name=VALUE``."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def digest_of(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ---- docker ------------------------------------------------------------------------------------


def docker(argv: list[str], state: dict[str, Any]) -> int:
    if not argv:
        return 1
    cmd = argv[0]
    if cmd == "info":
        if flag("STUB_DOCKER_DOWN"):
            print("Cannot connect to the Docker daemon at unix:///var/run/docker.sock.", file=sys.stderr)
            return 1
        if option(argv, "--format") == "{{.DefaultRuntime}}":
            print(os.environ.get("STUB_DOCKER_RUNTIME", "nvidia"))
        return 0
    if cmd == "ps":
        if state["registry"]:
            print("running")
        return 0
    if cmd == "run":
        state["registry"] = True
        print("0123456789ab")
        return 0
    if cmd == "start":
        return 0
    if cmd == "inspect":
        print("{}" if state["registry_on_kind"] else "null")
        return 0
    if cmd == "network":
        state["registry_on_kind"] = True
        return 0
    if cmd == "exec":
        return docker_exec(argv[1:], state)
    if cmd == "build":
        ref = option(argv, "--tag")
        assert ref, argv
        state["images"][ref] = digest_of("image " + ref)
        return 0
    if cmd == "push":
        state["pushed"][argv[1]] = digest_of("manifest " + argv[1])
        return 0
    if cmd == "image" and argv[1] == "inspect":
        ref = argv[-1]
        fmt = option(argv, "--format") or ""
        if "RepoDigests" in fmt:
            if ref in state["pushed"]:
                print(ref.rsplit(":", 1)[0] + "@" + state["pushed"][ref])
            return 0
        print(state["images"].get(ref, digest_of("missing")))
        return 0
    if cmd == "tag":
        return 0
    print(f"stub docker: unhandled {argv}", file=sys.stderr)
    return 0


def docker_exec(argv: list[str], state: dict[str, Any]) -> int:
    args = list(argv)
    stdin_mode = False
    while args and args[0].startswith("-"):
        if args[0] == "-i":
            stdin_mode = True
            args.pop(0)
        elif args[0] == "--env":
            args = args[2:]
        else:
            args.pop(0)
    node, rest = args[0], args[1:]
    files = state["files"].setdefault(node, {})
    if rest[:2] == ["nvidia-smi", "-L"]:
        if flag("STUB_NODE_NO_GPU"):
            print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", file=sys.stderr)
            return 9
        print(GPU_LINE)
        return 0
    if rest[:1] == ["test"]:
        return 0 if rest[-1] in files else 1
    if rest[:1] == ["cat"]:
        print(files[rest[1]], end="")
        return 0
    if rest[:1] == ["mkdir"]:
        return 0
    if rest[:1] == ["cp"] and stdin_mode:
        files[rest[2]] = sys.stdin.read()
        return 0
    if rest[:2] == ["which", "nvidia-ctk"]:
        return 0 if node in state["toolkit"] else 1
    if rest[:2] == ["nvidia-ctk", "--version"]:
        version = os.environ.get("NVIDIA_CONTAINER_TOOLKIT_VERSION", "1.19.0-1").rsplit("-", 1)[0]
        print(f"NVIDIA Container Toolkit CLI version {version}\ncommit: 0000000")
        return 0
    if rest[:1] == ["bash"]:
        state["toolkit"].append(node)
        return 0
    if rest[:3] == ["containerd", "config", "dump"]:
        runtime = "nvidia" if node in state["containerd_nvidia"] else "runc"
        print(f'    default_runtime_name = "{runtime}"')
        return 0
    if rest[:3] == ["nvidia-ctk", "runtime", "configure"]:
        state["containerd_nvidia"].append(node)
        return 0
    if rest[:1] == ["systemctl"]:
        return 0
    print(f"stub docker exec: unhandled {rest}", file=sys.stderr)
    return 0


# ---- kind --------------------------------------------------------------------------------------


def kind(argv: list[str], state: dict[str, Any]) -> int:
    if argv[:2] == ["get", "clusters"]:
        if not state["clusters"]:
            print("No kind clusters found.", file=sys.stderr)
        for name in state["clusters"]:
            print(name)
        return 0
    if argv[:2] == ["create", "cluster"]:
        state["clusters"].append(option(argv, "--name"))
        return 0
    if argv[:2] == ["delete", "cluster"]:
        state["clusters"].remove(option(argv, "--name"))
        return 0
    if argv[:2] == ["get", "nodes"]:
        name = option(argv, "--name")
        print(f"{name}-control-plane\n{name}-worker")
        return 0
    if argv[:2] == ["load", "docker-image"]:
        return 0
    print(f"stub kind: unhandled {argv}", file=sys.stderr)
    return 1


# ---- kubectl -----------------------------------------------------------------------------------


def kubectl(argv: list[str], state: dict[str, Any]) -> int:
    args = list(argv)
    if args[:1] == ["--context"]:
        args = args[2:]
    if args[:1] == ["kustomize"]:
        os.execv(os.environ["STUB_REAL_KUBECTL"], ["kubectl", *args])
    verb = args[0]
    if verb == "apply":
        source = option(args, "-f") or ""
        if source == "-":
            text = sys.stdin.read()
        elif source.startswith("http"):
            text = f"# remote {source}\n"
        else:
            text = Path(source).read_text()
        record_applied(text, source, state)
        return 0
    if verb == "wait":
        target = args[1]
        if flag("STUB_FAIL_ROLLOUT") and target.startswith(("ksvc/", "inferenceservice/")):
            print(f"error: timed out waiting for the condition on {target}", file=sys.stderr)
            return 1
        return 0
    if verb == "get":
        return kubectl_get(args[1:], state)
    if verb == "logs":
        if "pod/gpu-smoke" in args:
            print(GPU_LINE)
        else:
            print("INFO model_server: loading artifact")
        return 0
    if verb in ("describe", "patch", "delete", "cluster-info"):
        return 0
    print(f"stub kubectl: unhandled {args}", file=sys.stderr)
    return 0


def record_applied(text: str, source: str, state: dict[str, Any]) -> None:
    out_dir = Path(os.environ["STUB_STATE"]).parent / "applied"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{len(state['applied']):03d}.yaml"
    path.write_text(text)
    state["applied"].append({"source": source, "file": str(path)})
    # The scripts' marker ConfigMap: flat `key: "value"` lines under data (no YAML parser needed,
    # so the stub starts without site-packages).
    if re.search(r"^  name: densenet-cluster$", text, re.M):
        data = text.split("\ndata:\n", 1)[1]
        state["cluster_info"] = dict(re.findall(r'^  ([\w.-]+): "?([^"\n]*)"?$', data, re.M))


def kubectl_get(args: list[str], state: dict[str, Any]) -> int:
    what = args[0]
    output = option(args, "-o") or ""
    if what == "nodes" and "allocatable" in output:
        plugin = any(k.endswith("/nvidia-device-plugin") for k in state["helm"]) or state.get("gpu_ready")
        print("4" if plugin and not flag("STUB_NO_GPU") else "")
        return 0
    if what == "configmap" and args[1] == "densenet-cluster":
        key = output.split(".data.", 1)[1].rstrip("}") if ".data." in output else ""
        print(state["cluster_info"].get(key, ""), end="")
        return 0
    if what == "crd":
        if state["kserve_crd"] or any(k.endswith("/kserve-crd") for k in state["helm"]):
            print("customresourcedefinition.apiextensions.k8s.io/" + args[1])
        return 0
    if what.startswith("ksvc/") or what.startswith("inferenceservice/"):
        name = what.split("/", 1)[1]
        if "status.url" in output:
            print(f"http://{name}.default.127.0.0.1.sslip.io", end="")
        elif "predictor.url" in output:
            print(f"http://{name}-predictor.default.127.0.0.1.sslip.io", end="")
        elif "latestCreatedRevisionName" in output:
            print(f"{name}-00001", end="")
        else:
            print(
                f"kind: Service\nmetadata:\n  name: {name}\nstatus:\n  conditions:\n  - type: Ready\n    status: 'False'"
            )
        return 0
    if what == "pods" and output == "name":
        print("pod/predictor-00001-deployment-abc")
        return 0
    return 0


# ---- helm, nvidia-smi --------------------------------------------------------------------------


def helm(argv: list[str], state: dict[str, Any]) -> int:
    args = list(argv)
    if args[:1] == ["--kube-context"]:
        args = args[2:]
    ns = option(args, "--namespace") or "default"
    if args[:1] == ["list"]:
        rel = (option(args, "--filter") or "").strip("^$")
        chart = state["helm"].get(f"{ns}/{rel}")
        print(f"- chart: {chart}\n  name: {rel}\n  namespace: {ns}" if chart else "[]")
        return 0
    if args[:2] == ["upgrade", "--install"]:
        rel, chart = args[2], args[3]
        state["helm"][f"{ns}/{rel}"] = f"{chart.rstrip('/').rsplit('/', 1)[-1]}-{option(args, '--version')}"
        return 0
    print(f"stub helm: unhandled {args}", file=sys.stderr)
    return 1


def nvidia_smi(argv: list[str], state: dict[str, Any]) -> int:
    print(GPU_LINE)
    return 0


TOOLS = {"docker": docker, "kind": kind, "kubectl": kubectl, "helm": helm, "nvidia-smi": nvidia_smi}


def main() -> int:
    tool, argv = sys.argv[1], sys.argv[2:]
    with open(os.environ["STUB_LOG"], "a") as log:
        log.write(json.dumps({"tool": tool, "argv": argv}) + "\n")
    state = load_state()
    try:
        return TOOLS[tool](argv, state)
    finally:
        save_state(state)


if __name__ == "__main__":
    sys.exit(main())
