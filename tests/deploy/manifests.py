"""Render the deploy/ manifests as a user applies them, and validate them without a cluster.

Built-in kinds are validated with kubernetes-validate's strict schemas (unknown fields fail);
KServe kinds against KServe's own CRD schemas, pinned in tests/data/kserve-crds/, made strict
here in the same sense (see that folder's README).
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
CRD_FOLDER = ROOT / "tests" / "data" / "kserve-crds"
KSERVE_GROUP = "serving.kserve.io"
# The oldest Kubernetes the manifests claim to work on, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", kv_utils.latest_version())

Manifest = dict[str, Any]


# --- rendering -----------------------------------------------------------------------------------


def _candidates() -> list[Path]:
    """Where scripts/install-kustomize.sh may have put a renderer, besides PATH."""
    folders = [Path.home() / ".cache" / "keras-onnx-serve" / "tools"]
    if os.environ.get("KOS_TOOLS_DIR"):
        folders.insert(0, Path(os.environ["KOS_TOOLS_DIR"]))
    return [folder / "kubectl" for folder in folders]


@functools.cache
def renderer() -> list[str] | None:
    """The command that renders a kustomization folder as `kubectl apply -k` does, or None."""
    standalone = shutil.which("kustomize")
    if standalone and "v5" in _output([standalone, "version"]):
        return [standalone, "build"]
    for kubectl in [shutil.which("kubectl"), *map(str, _candidates())]:
        if kubectl and os.access(kubectl, os.X_OK) and "Kustomize Version: v5" in _output([kubectl, "version", "--client"]):
            return [kubectl, "kustomize"]
    return None


def _output(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def render(folder: Path) -> list[Manifest]:
    command = renderer()
    assert command is not None, "no kustomize v5 renderer (run scripts/install-kustomize.sh)"
    done = subprocess.run([*command, str(folder)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} {folder} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def load_file(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- built-in kinds ------------------------------------------------------------------------------


def validate_builtin(manifest: Manifest, version: str) -> None:
    """Raise kubernetes_validate.ValidationError on any schema violation or unknown field."""
    # A kind without a schema must not pass unseen: SchemaNotFoundError propagates.
    kubernetes_validate.validate(manifest, version, strict=True)


@functools.cache
def _object_meta_validator() -> jsonschema.protocols.Validator:
    folder = f"kubernetes-json-schema/v{kv_utils.latest_version()}-local-strict"
    schema = kv_utils.schema_contents(f"{folder}/objectmeta-meta-v1.json", kv_utils.latest_version())
    definitions = kv_utils.schema_contents(f"{folder}/_definitions.json", kv_utils.latest_version())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


# --- KServe kinds --------------------------------------------------------------------------------


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema in which an object that lists its properties allows no others."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the openAPIV3Schema of every pinned KServe CRD, as KServe ships it."""
    schemas = {}
    for path in sorted(CRD_FOLDER.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate_kserve(manifest: Manifest, *, strict_fields: bool = True) -> None:
    """Raise jsonschema.ValidationError where the manifest breaks its KServe CRD's schema."""
    key = (manifest["apiVersion"], manifest["kind"])
    assert key in crd_schemas(), f"no pinned KServe CRD for {key}"
    schema = crd_schemas()[key]
    schema = _strict_crd_schema(key) if strict_fields else copy.deepcopy(schema)
    jsonschema.Draft7Validator(schema).validate(manifest)
    # The CRD schema says only `metadata: {type: object}`: the API server checks ObjectMeta itself.
    _object_meta_validator().validate(manifest["metadata"])


@functools.cache
def _strict_crd_schema(key: tuple[str, str]) -> dict:
    return strict(crd_schemas()[key])


def validate(manifest: Manifest) -> None:
    if manifest["apiVersion"].split("/")[0] == KSERVE_GROUP:
        validate_kserve(manifest)
    else:
        for version in KUBERNETES_VERSIONS:
            validate_builtin(manifest, version)


# --- reading rendered objects --------------------------------------------------------------------


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def image_tag(image: str) -> str:
    return image.rsplit(":", 1)[1] if re.search(r":[^/]+$", image) else "latest"
