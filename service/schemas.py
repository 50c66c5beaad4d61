"""Request and answer bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ClassScore(BaseModel):
    label: str = Field(examples=["3"])
    index: int = Field(examples=[3])
    probability: float = Field(examples=[0.997])


class Prediction(BaseModel):
    filename: str = Field(examples=["three.png"])
    label: str = Field(examples=["3"])
    probability: float = Field(examples=[0.997])
    top_k: list[ClassScore]


class PredictResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str = Field(examples=["digits"])
    version: int = Field(examples=[1])
    predictions: list[Prediction] = Field(description="One per uploaded file, in upload order.")


class ModelHealth(BaseModel):
    name: str
    version: int
    state: Literal["loading", "ready", "failed", "closed"]
    providers: list[str] = Field(
        description="Execution providers the session really runs on.", examples=[["CPUExecutionProvider"]]
    )
    error: str | None = None


class DeviceInfo(BaseModel):
    providers: list[str] = Field(description="Providers every session is created with.", examples=[["CPUExecutionProvider"]])
    reason: str = Field(description="Why this device was chosen.", examples=["device=auto: serving on CPU because ..."])


class HealthResponse(BaseModel):
    status: Literal["ready", "loading", "draining", "unavailable"] = Field(
        description="ready (200); loading: the models found at start-up are loading; draining: shutting down; "
        "unavailable: a model that counts for readiness has no ready version."
    )
    reason: str = Field(description="Why, in words.", examples=["ready"])
    device: DeviceInfo
    models: list[ModelHealth]


class LivenessResponse(BaseModel):
    status: Literal["live", "stuck"]
    reason: str = Field(examples=["live"])


class ModelInfo(BaseModel):
    name: str
    version: int
    state: Literal["loading", "ready", "failed", "closed"]
    error: str | None = None
    providers: list[str] = []
    file: str = Field(description="The file served, inside its version folder.", examples=["model.int8.onnx"])
    precision: str | None = Field(None, description="Weight precision of that file.", examples=["int8"])
    input_shape: list[int] | None = Field(None, description="[height, width, channels]", examples=[[8, 8, 1]])
    color_mode: str | None = None
    resize_method: str | None = None
    labels: list[str] | None = None
    architecture: str | None = None
    dataset: str | None = None
    metrics: dict[str, float] | None = None
    parity: dict[str, float | int | bool | str] | None = Field(
        None,
        description="Export's check that onnxruntime agrees with Keras on held-out images.",
        examples=[{"images": 270, "max_abs_difference": 1.2e-06, "top1_agreement": 1.0, "passed": True}],
    )
    settings: dict[str, int | float | bool | str] | None = Field(
        None,
        description="The batching, runtime and deadline settings this version runs with: the service's, "
        "with the model's own settings.toml applied.",
        examples=[{"max_batch_size": 16, "max_batch_delay_ms": 2.0, "queue_size": 512, "inference_workers": 2}],
    )
    settings_from_file: list[str] = Field(
        [], description="The settings that the model's settings.toml set.", examples=[["max_batch_size"]]
    )


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong, in words.", examples=["model 'cats' is not served (served models: digits)"])
