"""The model artifact contract: the graph's names, the input spec and the metadata inside each ONNX file.

One definition, shared by the writer (export) and the reader (service).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
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
RESIZE_METHODS: tuple[str, ...] = ResizeMethod.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class InputSpec:
    """What an image becomes before the model sees it: H x W x C uint8, in a colour mode, resized one way."""

    height: int
    width: int
    color_mode: ColorMode
    resize_method: ResizeMethod = "bilinear"

    def __post_init__(self) -> None:
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"an input is at least 1x1 pixels, not {self.height}x{self.width}")
        if self.color_mode not in ("grayscale", "rgb"):
            raise ValueError(f"colour mode must be 'grayscale' or 'rgb', not {self.color_mode!r}")
        if self.resize_method not in RESIZE_METHODS:
            raise ValueError(f"resize method must be one of {', '.join(RESIZE_METHODS)}, not {self.resize_method!r}")

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "grayscale" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


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
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    extra: dict[str, str | float | int | bool] = Field(default_factory=dict)
    precision: Precision = Field("float32", description="Weight precision of this file; variants sit beside model.onnx.")
    opset: int | None = Field(None, description="ONNX opset the graph was converted to.")
    graph_checks: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "Keras layers checked in the exported graph: augmentation removed, preprocessing kept; and the batch "
            "normalisations after an activation written as one BatchNormalization (scale_shift_folded)."
        ),
    )
    variants: dict[str, dict[str, float | int | bool | str]] = Field(
        default_factory=dict, description="Reduced-precision files of this version and their accuracy against float32."
    )

    @model_validator(mode="after")
    def _colour_matches_channels(self) -> ModelMetadata:
        expected = 1 if self.color_mode == "grayscale" else 3
        if self.channels != expected:
            raise ValueError(f"color_mode {self.color_mode!r} needs {expected} channel(s), not {self.channels}")
        return self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(self.height, self.width, self.color_mode, self.resize_method)

    def to_metadata_props(self) -> dict[str, str]:
        """The ONNX `metadata_props` entries that carry this metadata."""
        return {METADATA_KEY: self.model_dump_json()}

    @classmethod
    def from_metadata_props(cls, props: dict[str, str]) -> ModelMetadata:
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
