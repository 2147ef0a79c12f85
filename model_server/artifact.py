"""Reading and verifying an artifact folder (``variant.json`` plus the payload files it names)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from model_server import ArtifactError
from optimize.registry import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION

REQUIRED_FIELDS = ("slug", "technique", "precision", "runtime", "files", "input", "weights", "built_with", "meta")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What ``variant.json`` records of one payload file."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_manifest(artifact_dir: Path, *, verify: bool = True) -> dict[str, Any]:
    """Read ``variant.json`` and (by default) check every payload file's size and sha256.

    Raises:
        ArtifactError: naming the folder or file at fault and what is wrong with it.
    """
    path = artifact_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{artifact_dir} holds no {MANIFEST_NAME}; build one with "
            f"`python -m optimize build --variant SLUG --output-dir {artifact_dir.parent}`"
        )
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from e
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks required fields: {', '.join(missing)}")
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ArtifactError(
            f"{path} has schema_version {manifest.get('schema_version')!r}; this server reads {MANIFEST_SCHEMA_VERSION}"
        )
    if verify:
        verify_files(artifact_dir, manifest)
    return manifest


def verify_files(artifact_dir: Path, manifest: dict[str, Any]) -> None:
    """Refuse an artifact whose payload files are missing, resized or altered."""
    for name, record in manifest["files"].items():
        file = artifact_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ArtifactError(f"{MANIFEST_NAME} names a payload outside the artifact: {name!r}")
        if not file.is_file():
            raise ArtifactError(f"payload file {file} named in {MANIFEST_NAME} is missing")
        if file.stat().st_size != record["bytes"]:
            raise ArtifactError(
                f"payload file {file} is {file.stat().st_size} bytes, {MANIFEST_NAME} says {record['bytes']}"
            )
        digest = sha256_file(file)
        if digest != record["sha256"]:
            raise ArtifactError(
                f"payload file {file} fails its checksum (sha256 {digest}, expected {record['sha256']}): "
                "refusing to load it"
            )


def payload_path(artifact_dir: Path, manifest: dict[str, Any], role: str) -> Path:
    """The payload file playing ``role`` (``model``, ``labels``, ...)."""
    try:
        name: str = manifest["payload"][role]
        return artifact_dir / name
    except KeyError as e:
        raise ArtifactError(f"{artifact_dir}/{MANIFEST_NAME} names no {role!r} payload") from e


def read_labels(artifact_dir: Path, manifest: dict[str, Any]) -> list[str]:
    labels = json.loads(payload_path(artifact_dir, manifest, "labels").read_text())
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ArtifactError(f"{artifact_dir} labels payload is not a list of strings")
    return labels
