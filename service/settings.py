"""Service settings: one class, read once at start-up, passed down to everything that needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KOS_"


class Settings(BaseSettings):
    """Every field is a `python -m service --flag` and a `KOS_FLAG` environment variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    repository: Path = Field(Path("models"), description="Model repository: <repository>/<name>/<version>/model.onnx.")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when it really works, else CPU; cuda: refuse to start without CUDA; cpu."
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per session (0: onnxruntime decides).")
    inter_op_threads: int = Field(0, ge=0, description="onnxruntime inter-op threads per session (0: onnxruntime decides).")
    max_files_per_request: int = Field(64, ge=1, description="Most image parts one request may carry.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Largest decoded image (width x height) accepted.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
