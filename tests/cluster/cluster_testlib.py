"""Helpers and fixtures for the offline checks of the cluster layer: CRD schemas, rendering, stub tools.

conftest.py re-exports the fixtures; tests import the helpers from here (this folder is put on
sys.path by conftest.py, so the layout needs no __init__.py).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

REPO_ROOT = Path(__file__).resolve().parents[2]
STUB_TOOL = Path(__file__).resolve().parent / "stubtool.py"
STUBBED = ("docker", "kind", "kubectl", "helm", "nvidia-smi")
# What the scripts need to run under the stubs, copied into an isolated checkout per test.
CHECKOUT_PARTS = ("setup-cluster.sh", "deploy-knative.sh", "Dockerfile", "cluster", "manifests", "optimize")

KNATIVE_CRD = "knative-v1.23.0-service-crd.yaml"
KSERVE_CRD = "kserve-v0.20.0-isvc-crd.yaml"


# ---- CRD schemas ---------------------------------------------------------------------------------


def crd_dir() -> Path:
    return Path(os.environ.get("CRD_SCHEMA_DIR", REPO_ROOT.parent / "shared" / "crds"))


def strict(schema: Any) -> Any:
    """Copy of an OpenAPI v3 schema where unknown fields are errors.

    ``additionalProperties: false`` is injected wherever ``properties`` is given, unless the node
    says ``x-kubernetes-preserve-unknown-fields: true`` or already constrains extra properties.
    """
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in out
    ):
        out["additionalProperties"] = False
    return out


@dataclass
class CrdSchema:
    """The strict openAPIV3Schema of one served version of a CRD, plus its raw form."""

    group: str
    kind: str
    version: str
    raw: dict[str, Any]
    strict: dict[str, Any] = field(init=False)
    validator: jsonschema.protocols.Validator = field(init=False)

    def __post_init__(self) -> None:
        schema = copy.deepcopy(self.raw)
        # The API server fills these; a manifest's metadata is validated by Kubernetes itself.
        schema.setdefault("properties", {})
        schema["properties"]["apiVersion"] = {"const": f"{self.group}/{self.version}"}
        schema["properties"]["kind"] = {"const": self.kind}
        schema["properties"]["metadata"] = {"type": "object"}
        self.strict = strict(schema)
        # Built once: jsonschema.validate() re-checks this large schema on every call.
        self.validator = jsonschema.Draft7Validator(self.strict)

    def validate(self, doc: dict[str, Any]) -> None:
        """Raise jsonschema.ValidationError (the most relevant one) if ``doc`` does not conform."""
        error = jsonschema.exceptions.best_match(self.validator.iter_errors(doc))
        if error is not None:
            raise error


def load_crd(filename: str) -> CrdSchema:
    path = crd_dir() / filename
    if not path.is_file():
        pytest.skip(f"CRD schema {path} not found: set CRD_SCHEMA_DIR to a folder holding {filename}")
    crd = yaml.load(path.read_text(), Loader=YAML_LOADER)
    served = [v for v in crd["spec"]["versions"] if v.get("served")]
    version = next(v for v in served if v.get("storage")) if len(served) > 1 else served[0]
    return CrdSchema(
        group=crd["spec"]["group"],
        kind=crd["spec"]["names"]["kind"],
        version=version["name"],
        raw=version["schema"]["openAPIV3Schema"],
    )


@pytest.fixture(scope="session")
def knative_crd() -> CrdSchema:
    return load_crd(KNATIVE_CRD)


@pytest.fixture(scope="session")
def kserve_crd() -> CrdSchema:
    return load_crd(KSERVE_CRD)


# ---- rendering -----------------------------------------------------------------------------------


def real_kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed: cannot render the overlays")
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """Render a kustomization with the real ``kubectl kustomize``."""
    result = subprocess.run([real_kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def deployable_slugs() -> list[str]:
    sys.path.insert(0, str(REPO_ROOT))
    from optimize import registry

    return [v.slug for v in registry.deployable_variants()]


def cpu_capable(slug: str) -> bool:
    sys.path.insert(0, str(REPO_ROOT))
    from optimize import registry

    return "cpu" in registry.get(slug).devices


# ---- stub tools ------------------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class StubEnv:
    """An isolated checkout with stub docker/kind/kubectl/helm/nvidia-smi on PATH."""

    root: Path
    bin_dir: Path
    sys_bin: Path
    state_dir: Path
    env: dict[str, str]

    @property
    def log_path(self) -> Path:
        return self.state_dir / "calls.jsonl"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.json"

    def run(self, script: str, *args: str, extra_env: dict[str, str] | None = None, stdin: str = "") -> Run:
        env = {**self.env, **(extra_env or {})}
        result = subprocess.run(
            ["bash", str(self.root / script), *args],
            cwd=self.root,
            env=env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return Run(result.returncode, result.stdout, result.stderr)

    def calls(self) -> list[tuple[str, list[str]]]:
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text().splitlines()
        return [(entry["tool"], entry["argv"]) for entry in map(json.loads, lines)]

    def clear_calls(self) -> None:
        self.log_path.unlink(missing_ok=True)

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def seed(self, **values: Any) -> None:
        state = self.state()
        state.update(values)
        self.state_path.write_text(json.dumps(state))

    def remove_tool(self, name: str) -> None:
        (self.bin_dir / name).unlink()

    def applied_docs(self) -> list[dict[str, Any]]:
        docs: list[dict[str, Any]] = []
        for entry in self.state().get("applied", []):
            docs += [d for d in yaml.safe_load_all(Path(entry["file"]).read_text()) if d]
        return docs


@pytest.fixture(scope="session")
def sys_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Symlinks to every executable on the system PATH except the tools the tests stub out.

    Putting only this folder (and the stubs) on PATH makes "tool not installed" testable even on a
    machine where kubectl or docker is installed for real.
    """
    out = tmp_path_factory.mktemp("sysbin")
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not Path(folder).is_dir():
            continue
        for entry in Path(folder).iterdir():
            if entry.name in STUBBED or (out / entry.name).exists():
                continue
            if entry.is_file() and os.access(entry, os.X_OK):
                (out / entry.name).symlink_to(entry)
    python3 = out / "python3"
    if python3.exists() or python3.is_symlink():
        python3.unlink()
    python3.symlink_to(sys.executable)
    return out


@pytest.fixture
def stub_env(tmp_path: Path, sys_bin: Path) -> Iterator[StubEnv]:
    kubectl_path = real_kubectl()
    root = tmp_path / "checkout"
    root.mkdir()
    for part in CHECKOUT_PARTS:
        src = REPO_ROOT / part
        if src.is_dir():
            shutil.copytree(src, root / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / part)
    bin_dir = tmp_path / "stubs"
    bin_dir.mkdir()
    for tool in STUBBED:
        wrapper = bin_dir / tool
        # -I -S: standard library only, and fast to start (the stubs run hundreds of times).
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -I -S "{STUB_TOOL}" {tool} "$@"\n')
        wrapper.chmod(0o755)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    toolkit_config = tmp_path / "nvidia-container-runtime.toml"
    toolkit_config.write_text("accept-nvidia-visible-devices-as-volume-mounts = true\n")
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{sys_bin}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "NO_COLOR": "1",
        "STUB_LOG": str(state_dir / "calls.jsonl"),
        "STUB_STATE": str(state_dir / "state.json"),
        "STUB_REAL_KUBECTL": kubectl_path,
        "NVIDIA_CTK_CONFIG": str(toolkit_config),
        "PYTHON": sys.executable,
    }
    yield StubEnv(root=root, bin_dir=bin_dir, sys_bin=sys_bin, state_dir=state_dir, env=env)
