"""Service settings: one class, read once at start-up, passed down to everything that needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KOS_"


class Settings(BaseSettings):
    """Every field is a `python -m service --flag` and a `KOS_FLAG` environment variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    repository: Path = Field(Path("models"), description="Model repository folder, holding NAME/VERSION/model.onnx.")
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when it really works, else CPU; cuda: refuse to start without CUDA; cpu."
    )
    precision: Literal["float32", "float16", "int8"] = Field(
        "float32",
        description="File of each version to serve: float32 is model.onnx; float16 or int8 serve the variant "
        "`python -m export --variants` wrote beside it, and model.onnx where a version has none (logged, and shown in /models).",
    )
    max_batch_size: int = Field(32, ge=1, le=4096, description="Most images the batcher runs in one onnxruntime call.")
    max_batch_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="Longest wait after a batch's first image for more images, while more are on their way."
    )
    queue_size: int = Field(512, ge=1, description="Most images waiting per model version; beyond it requests get 503.")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline from a request's arrival to its batch starting; past it the request gets 504."
    )
    max_upload_bytes: int = Field(
        50 * 1024 * 1024, ge=1, description="Largest request body, counted while it is read; beyond it the request gets 413."
    )
    max_files_per_request: int = Field(64, ge=1, description="Most image parts one request may carry.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest image (width x height) decoded; checked before decoding."
    )
    max_request_pixels: int = Field(
        200_000_000,
        ge=1,
        description="Most pixels (width x height, summed over its images, read from their headers) one request may carry; "
        "beyond it the request gets 413. Bounds what a request of many small but highly compressible files costs to decode.",
    )
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime intra-op threads per session (0: onnxruntime decides).")
    inter_op_threads: int = Field(0, ge=0, description="onnxruntime inter-op threads per session (0: onnxruntime decides).")
    intra_op_spinning: bool = Field(
        False,
        description="Let onnxruntime's threads spin between runs: quicker back-to-back runs, but CPU taken from decoding and HTTP.",
    )
    inference_workers: int = Field(1, ge=1, le=64, description="Batches one model version runs at the same time.")
    lone_request_threads: int = Field(
        0,
        ge=0,
        description="CPU only: intra-op threads of a second session that runs a request arriving at an idle model "
        "(0: no second session). Set it to the core count when --intra-op-threads is lower, so that batches run side "
        "by side under load and a lone request still gets every core; each model is then held in memory twice. "
        "Its threads spin, since it runs only while its model is otherwise idle.",
    )
    decode_workers: int = Field(0, ge=0, le=256, description="Threads that decode and resize uploads (0: one per CPU core).")
    frontends: int = Field(
        1,
        ge=1,
        le=64,
        description="Processes that take HTTP connections, parse requests and decode images, on the same port, around one "
        "process that owns the models and batches the images of all of them (1: one process does everything). Linux only.",
    )
    api_key: str | None = Field(
        None, description="When set, /predict and /models need it in the X-API-Key header (or Authorization: Bearer)."
    )
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS, '*' for any; empty: CORS off.")
    watch_interval_s: float = Field(
        2.0, ge=0, description="How often the repository is scanned for added or replaced models (0: never)."
    )
    shutdown_timeout_s: float = Field(30.0, gt=0, description="Longest wait for in-flight requests on shutdown.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per line.")

    @model_validator(mode="after")
    def _a_full_request_fits_the_queue(self) -> Settings:
        # A request is queued whole or not at all, so one that can never fit would get 503 forever.
        if self.max_files_per_request > self.queue_size:
            raise ValueError(
                f"max_files_per_request ({self.max_files_per_request}) must not exceed queue_size ({self.queue_size})"
            )
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
