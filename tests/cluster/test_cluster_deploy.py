"""deploy-knative.sh under stub tools: order, digests, dry run, failures, and a real smoke request."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from cluster_testlib import StubEnv, deployable_slugs
from test_cluster_manifests import DIGEST_RE, check_rules, container_of


def ready_cluster(env: StubEnv, *, accelerator: str = "gpu", kserve: bool = False) -> None:
    env.seed(
        clusters=["densenet"],
        cluster_info={"accelerator": accelerator, "gpu-proof": "passed"},
        gpu_ready=True,
        kserve_crd=kserve,
    )


def fake_artifacts(env: StubEnv, slugs: list[str]) -> None:
    for slug in slugs:
        (env.root / "artifacts" / slug).mkdir(parents=True)
        (env.root / "artifacts" / slug / "variant.json").write_text(json.dumps({"slug": slug}))


def fake_python(env: StubEnv) -> dict[str, str]:
    """A PYTHON that records `-m optimize build` (writing the artifact) and runs everything else."""
    real = env.env["PYTHON"]
    script = env.root / "fake-python"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2 $3" = "-m optimize build" ]; then\n'
        '  echo "$@" >> "$STUB_LOG.python"\n'
        '  mkdir -p "artifacts/$5" && echo "{}" > "artifacts/$5/variant.json"\n'
        "  exit 0\n"
        "fi\n"
        f'exec "{real}" "$@"\n'
    )
    script.chmod(0o755)
    return {"PYTHON": str(script)}


def test_help_unknown_flag_and_bad_values(stub_env: StubEnv) -> None:
    ok = stub_env.run("deploy-knative.sh", "--help")
    assert ok.returncode == 0 and "--dry-run" in ok.stdout and "--mode MODE" in ok.stdout
    for args, message in (
        (["--frobnicate"], "unknown argument: --frobnicate"),
        (["--mode", "raw"], "--mode must be knative or kserve"),
        (["--min-scale", "3", "--max-scale", "2"], "--min-scale (3) must not exceed --max-scale (2)"),
        (["--max-scale", "0"], "--max-scale must be at least 1"),
        (["--target", "many"], "--target must be a non-negative integer"),
        (["--variants"], "--variants needs a value"),
    ):
        result = stub_env.run("deploy-knative.sh", *args)
        assert result.returncode == 1, args
        assert message in result.stderr and "Usage:" in result.stderr
    assert stub_env.calls() == []


def test_unknown_variant_lists_the_valid_ones(stub_env: StubEnv) -> None:
    result = stub_env.run("deploy-knative.sh", "--dry-run", "--variants", "resnet50")
    assert result.returncode == 1
    assert "unknown variant 'resnet50'" in result.stderr
    assert all(slug in result.stderr for slug in deployable_slugs())


def test_dry_run_touches_nothing(stub_env: StubEnv) -> None:
    result = stub_env.run("deploy-knative.sh", "--dry-run", "--max-scale", "3")
    assert result.returncode == 0, result.stderr
    tools = {(tool, argv[0]) for tool, argv in stub_env.calls()}
    assert tools <= {("kubectl", "kustomize")}, f"dry run called {tools}"
    assert not (stub_env.root / "artifacts").exists()
    for slug in deployable_slugs():
        assert f"docker build --build-arg VARIANT={slug}" in result.stdout
        assert f"-m optimize build --variant {slug}" in result.stdout
        assert f"name: {slug}" in result.stdout
    assert 'autoscaling.knative.dev/max-scale: "3"' in result.stdout
    assert "nvidia.com/gpu" in result.stdout


def test_deploy_builds_pushes_and_applies_by_digest(stub_env: StubEnv, knative_crd) -> None:
    ready_cluster(stub_env)
    slugs = deployable_slugs()
    fake_artifacts(stub_env, slugs[1:])  # the first one must be built
    env = fake_python(stub_env)
    result = stub_env.run("deploy-knative.sh", "--no-smoke", "--min-scale", "1", "--target", "8", extra_env=env)
    assert result.returncode == 0, result.stderr

    built = Path(stub_env.env["STUB_LOG"] + ".python").read_text().splitlines()
    assert built == [f"-m optimize build --variant {slugs[0]} --weights imagenet --output-dir artifacts"]
    calls = [(tool, argv) for tool, argv in stub_env.calls() if tool in ("docker", "kubectl", "kind")]
    for slug in slugs:
        steps = [
            next(i for i, (t, a) in enumerate(calls) if t == "docker" and a[0] == "build" and f"VARIANT={slug}" in a),
            next(i for i, (t, a) in enumerate(calls) if t == "docker" and a[0] == "push" and slug in a[1]),
            next(
                i
                for i, (t, a) in enumerate(calls)
                if t == "kubectl" and "apply" in a and a[-1].endswith(f"{slug}.yaml")
            ),
            next(i for i, (t, a) in enumerate(calls) if t == "kubectl" and "wait" in a and f"ksvc/{slug}" in a),
        ]
        assert steps == sorted(steps), f"{slug}: build, push, apply, wait out of order"
    docs = [d for d in stub_env.applied_docs() if d.get("kind") == "Service"]
    assert [d["metadata"]["name"] for d in docs] == slugs
    for doc in docs:
        knative_crd.validate(doc)
        check_rules(doc, slug=doc["metadata"]["name"], cpu=False, deployed=True)
        assert DIGEST_RE.match(container_of(doc)["image"])
        assert container_of(doc)["image"].startswith(f"localhost:5001/{doc['metadata']['name']}@sha256:")
        notes = doc["spec"]["template"]["metadata"]["annotations"]
        assert notes["autoscaling.knative.dev/min-scale"] == "1" and notes["autoscaling.knative.dev/target"] == "8"
    for slug in slugs:
        assert f"curl -H 'Host: {slug}.default.127.0.0.1.sslip.io'" in result.stdout


def test_cpu_cluster_gets_the_cpu_form_and_load_mode(stub_env: StubEnv) -> None:
    ready_cluster(stub_env, accelerator="cpu")
    fake_artifacts(stub_env, deployable_slugs())
    slug = deployable_slugs()[0]
    result = stub_env.run("deploy-knative.sh", "--no-smoke", "--load", "--variants", slug)
    assert result.returncode == 0, result.stderr
    assert any(t == "kind" and a[:2] == ["load", "docker-image"] for t, a in stub_env.calls())
    assert not any(t == "docker" and a[0] == "push" for t, a in stub_env.calls())
    (doc,) = [d for d in stub_env.applied_docs() if d.get("kind") == "Service"]
    check_rules(doc, slug=slug, cpu=True, deployed=False)
    assert container_of(doc)["image"].startswith(f"dev.local/{slug}:")


def test_failed_rollout_dumps_diagnostics_and_fails(stub_env: StubEnv) -> None:
    ready_cluster(stub_env)
    fake_artifacts(stub_env, deployable_slugs())
    slug = deployable_slugs()[0]
    result = stub_env.run(
        "deploy-knative.sh", "--variants", slug, "--timeout", "5", extra_env={"STUB_FAIL_ROLLOUT": "1"}
    )
    assert result.returncode == 1
    err = result.stderr
    assert f"{slug} did not become Ready within 5s" in err
    assert "ProgressDeadlineExceeded" in err and "Insufficient nvidia.com/gpu" in err
    verbs = [" ".join(a) for t, a in stub_env.calls() if t == "kubectl"]
    assert any(f"describe revision {slug}-00001" in v for v in verbs)
    assert any(f"involvedObject.name={slug}-00001" in v for v in verbs)
    assert any("logs" in v and "-c predictor" in v for v in verbs)
    assert f"1 variant(s) failed: {slug}" in err and f"--variants {slug}" in err


def test_no_allocatable_gpu(stub_env: StubEnv) -> None:
    ready_cluster(stub_env)
    result = stub_env.run("deploy-knative.sh", extra_env={"STUB_NO_GPU": "1"})
    assert result.returncode == 1
    assert "no GPU is allocatable in cluster 'densenet'" in result.stderr
    assert "./deploy-knative.sh --cpu" in result.stderr
    assert not any(t == "docker" and a[0] == "build" for t, a in stub_env.calls())


def test_missing_cluster_and_missing_tools(stub_env: StubEnv) -> None:
    result = stub_env.run("deploy-knative.sh")
    assert result.returncode == 1 and "no kind cluster named 'densenet'" in result.stderr
    assert "./setup-cluster.sh" in result.stderr
    stub_env.remove_tool("kind")
    stub_env.remove_tool("docker")
    result = stub_env.run("deploy-knative.sh")
    assert result.returncode == 1
    assert "preflight found 2 problem(s)" in result.stderr
    assert "'docker' is not installed" in result.stderr and "'kind' is not installed" in result.stderr


def test_kserve_mode_needs_kserve_then_renders_an_inference_service(stub_env: StubEnv, kserve_crd) -> None:
    ready_cluster(stub_env)
    fake_artifacts(stub_env, deployable_slugs())
    slug = deployable_slugs()[0]
    result = stub_env.run("deploy-knative.sh", "--mode", "kserve", "--variants", slug, "--no-smoke")
    assert result.returncode == 1 and "KServe is not installed" in result.stderr
    assert "./setup-cluster.sh --with-kserve" in result.stderr

    ready_cluster(stub_env, kserve=True)
    result = stub_env.run("deploy-knative.sh", "--mode", "kserve", "--variants", slug, "--no-smoke", "--max-scale", "2")
    assert result.returncode == 0, result.stderr
    (doc,) = [d for d in stub_env.applied_docs() if d.get("kind") == "InferenceService"]
    kserve_crd.validate(doc)
    check_rules(doc, slug=slug, cpu=False, deployed=True)
    assert doc["spec"]["predictor"]["maxReplicas"] == 2
    assert f"{slug}-predictor.default.127.0.0.1.sslip.io" in result.stdout


class _Predictor(BaseHTTPRequestHandler):
    hosts: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        type(self).hosts.append(self.headers["Host"])
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["instances"][0]["image"]["b64"]
        reply = {
            "predictions": [
                {"classes": [1, 2, 3, 4, 5], "labels": list("abcde"), "probabilities": [0.5, 0.2, 0.1, 0.1, 0.05]}
            ]
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def ingress() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Predictor)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_smoke_inference_goes_through_the_ingress_with_the_host_header(stub_env: StubEnv, ingress: str) -> None:
    ready_cluster(stub_env)
    fake_artifacts(stub_env, deployable_slugs())
    slug = deployable_slugs()[0]
    _Predictor.hosts.clear()
    result = stub_env.run("deploy-knative.sh", "--variants", slug, extra_env={"INGRESS_ADDR": ingress})
    assert result.returncode == 0, result.stderr
    assert _Predictor.hosts == [f"{slug}.default.127.0.0.1.sslip.io"]
    assert "top-1 'a'" in result.stdout and "smoke inference passed" in result.stderr
