"""The model artifact contract: repository layout and the metadata carried inside each ONNX file.

One definition, shared by the writer (export) and the reader (service).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

METADATA_KEY = "keras_onnx_serve"
SCHEMA_VERSION = 1
MODEL_FILENAME = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"

ColorMode = Literal["grayscale", "rgb"]
Precision = Literal["float32", "float16", "int8"]
# File name of each precision inside a version folder; float32 is the one the service serves.
PRECISION_FILENAMES: dict[str, str] = {"float32": MODEL_FILENAME, "float16": "model.float16.onnx", "int8": "model.int8.onnx"}
ResizeMethod = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]


class ModelMetadata(BaseModel):
    """Everything the service needs to serve a model correctly, plus where it came from."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    name: str = Field(description="Served model name, the folder name in the repository.")
    labels: list[str] = Field(min_length=2, description="Class labels, index i is output column i.")
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    color_mode: ColorMode
    resize_method: ResizeMethod = "bilinear"
    architecture: str = Field(description="Model family in the training zoo, e.g. digits_cnn.")
    dataset: str
    source_run: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict, description="Held-out test metrics.")
    parity: dict[str, float | int | bool | str] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict, description="Tool and framework versions.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    extra: dict[str, str | float | int | bool] = Field(default_factory=dict)
    precision: Precision = Field("float32", description="Weight precision of this file; variants sit beside model.onnx.")
    opset: int | None = Field(None, description="ONNX opset the graph was converted to.")
    graph_checks: dict[str, list[str]] = Field(
        default_factory=dict, description="Keras layers checked in the exported graph: augmentation removed, preprocessing kept."
    )
    variants: dict[str, dict[str, float | int | bool | str]] = Field(
        default_factory=dict, description="Reduced-precision files of this version and their accuracy against float32."
    )

    @model_validator(mode="after")
    def _colour_matches_channels(self) -> "ModelMetadata":
        expected = 1 if self.color_mode == "grayscale" else 3
        if self.channels != expected:
            raise ValueError(f"color_mode {self.color_mode!r} needs {expected} channel(s), not {self.channels}")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def to_metadata_props(self) -> dict[str, str]:
        """The ONNX `metadata_props` entries that carry this metadata."""
        return {METADATA_KEY: self.model_dump_json()}

    @classmethod
    def from_metadata_props(cls, props: dict[str, str]) -> "ModelMetadata":
        """Read the metadata back from an ONNX file's `metadata_props` (or onnxruntime's custom map)."""
        if METADATA_KEY not in props:
            raise ValueError(f"the model carries no {METADATA_KEY!r} metadata: was it written by `python -m export`?")
        data = json.loads(props[METADATA_KEY])
        if data.get("schema_version", 0) > SCHEMA_VERSION:
            raise ValueError(
                f"metadata schema version {data.get('schema_version')} is newer than this service understands "
                f"({SCHEMA_VERSION}): upgrade keras-onnx-serve"
            )
        return cls.model_validate(data)


def model_path(repository: Path, name: str, version: int, precision: str = "float32") -> Path:
    return repository / name / str(version) / PRECISION_FILENAMES[precision]


def served_file(repository: Path, name: str, version: int, precision: str = "float32") -> Path:
    """The file to serve for `precision`: its variant when the version folder holds one, else model.onnx."""
    preferred = model_path(repository, name, version, precision)
    return preferred if preferred.is_file() else model_path(repository, name, version)


def list_versions(repository: Path, name: str) -> list[int]:
    """Versions of `name` that hold a model file, ascending; temporary folders are ignored.

    A folder that cannot be read holds no versions (`repository_problems` names it).
    """
    folder = repository / name
    try:
        if not folder.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in folder.iterdir()
            if p.name.isdigit() and int(p.name) > 0 and (p / MODEL_FILENAME).is_file()
        )
    except OSError:
        return []


def list_models(repository: Path) -> dict[str, list[int]]:
    """Every model name in the repository with its versions."""
    if not repository.is_dir():
        return {}
    found = {}
    for p in sorted(repository.iterdir()):
        if p.is_dir() and not p.name.startswith("."):
            versions = list_versions(repository, p.name)
            if versions:
                found[p.name] = versions
    return found


def repository_problems(repository: Path) -> list[str]:
    """Entries of the repository that look meant to be served but are not laid out as NAME/VERSION/model.onnx.

    Hidden entries (export's staging folders among them) are not problems.
    """
    if not repository.is_dir():
        return []
    problems = []
    for entry in sorted(repository.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            if entry.suffix == ".onnx":
                problems.append(f"{entry.name} lies at the top of the repository: put it in NAME/1/{MODEL_FILENAME}")
            continue
        try:
            subs = sorted(entry.iterdir())
        except OSError as exc:
            problems.append(f"{entry.name} cannot be read: {exc.strerror}")
            continue
        for sub in subs:
            where = f"{entry.name}/{sub.name}"
            if sub.name.startswith("."):
                continue
            if sub.is_file():
                if sub.suffix == ".onnx":
                    problems.append(f"{where} has no version folder: put it in {entry.name}/1/{MODEL_FILENAME}")
            elif not (sub.name.isdigit() and int(sub.name) > 0):
                problems.append(f"{where} is not a version folder (a whole number from 1 up): ignored")
            else:
                try:
                    if not (sub / MODEL_FILENAME).is_file():
                        problems.append(f"{where} holds no {MODEL_FILENAME}: ignored")
                except OSError as exc:
                    problems.append(f"{where} cannot be read: {exc.strerror}")
    return problems
