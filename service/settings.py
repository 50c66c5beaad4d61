"""Service settings: one class, read once at start-up, passed down to everything that needs it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KOS_"

AUTO: Literal["auto"] = "auto"
# Runtime settings the service chooses per model at load when left at "auto" (service/auto_settings.py).
Threads = Annotated[int, Field(ge=0)] | Literal["auto"]
Workers = Annotated[int, Field(ge=1, le=64)] | Literal["auto"]


class Settings(BaseSettings):
    """Every field is a `python -m service --flag` and a `KOS_FLAG` environment variable."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in a container).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="TCP port of the Open Inference Protocol's gRPC service, on the same host (0: no gRPC)."
    )
    grpc_max_message_bytes: int | None = Field(
        None,
        ge=1,
        description="Largest gRPC message received or sent; beyond it a call gets RESOURCE_EXHAUSTED (unset: --max-upload-bytes).",
    )
    repository: Path = Field(Path("models"), description="Model repository folder, holding NAME/VERSION/model.onnx.")
    model_name: str | None = Field(
        None,
        description="Serve --repository as one model of this name, its version folders directly inside "
        "(VERSION/model.onnx, as KServe's storage initializer writes /mnt/models); must not be empty. Unset: a repository of many models.",
    )
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
    queue_size: int = Field(
        512,
        ge=1,
        description="Most images waiting per model version; beyond it requests get 503. At least --max-files-per-request.",
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline from a request's arrival to its batch starting; past it the request gets 504."
    )
    max_upload_bytes: int = Field(
        50 * 1024 * 1024, ge=1, description="Largest request body, counted while it is read; beyond it the request gets 413."
    )
    max_files_per_request: int = Field(64, ge=1, description="Most image parts one request may carry; at most --queue-size.")
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest image (width x height) decoded; checked before decoding."
    )
    max_request_pixels: int = Field(
        200_000_000,
        ge=1,
        description="Most pixels (width x height, summed over its images, read from their headers) one request may carry; "
        "beyond it the request gets 413. Bounds what a request of many small but highly compressible files costs to decode.",
    )
    intra_op_threads: Threads = Field(
        AUTO,
        description="onnxruntime intra-op threads per session (auto: chosen per model at load, see the README's CPU "
        "threads; 0: onnxruntime decides, or the container's CPU quota when one is set).",
    )
    inter_op_threads: int = Field(0, ge=0, description="onnxruntime inter-op threads per session (0: onnxruntime decides).")
    intra_op_spinning: bool = Field(
        False,
        description="Let onnxruntime's threads spin between runs: quicker back-to-back runs, but CPU taken from decoding and HTTP.",
    )
    inference_workers: Workers = Field(
        AUTO, description="Batches one model version runs at the same time (auto: chosen per model at load)."
    )
    lone_request_threads: Threads = Field(
        AUTO,
        description="CPU only: intra-op threads of a second session that runs a request arriving at an idle model "
        "(0: no second session; auto: chosen per model at load). Set it to the core count when --intra-op-threads is "
        "lower, so that batches run side by side under load and a lone request still gets every core; each model is "
        "then held in memory twice. Its threads spin, since it runs only while its model is otherwise idle.",
    )
    inference_nice: int = Field(
        5,
        ge=0,
        le=19,
        description="Linux only: how many nice steps below the event loops the inference threads (and onnxruntime's) "
        "run, so that when the cores are short, parsing requests, refusing with 503 and feeding the batches go first "
        "(0: the same priority).",
    )
    decode_workers: int = Field(0, ge=0, le=256, description="Threads that decode and resize uploads (0: one per CPU core).")
    frontends: int = Field(
        0,
        ge=0,
        le=64,
        description="Processes that take HTTP and gRPC connections, parse requests and decode images, on the same ports, "
        "around one process that owns the models and batches the images of all of them (1: one process does everything). "
        "0: automatic, from the CPUs the container may use and the device: one process up to 2 CPUs on a CPU device; "
        "else half the CPUs on a CPU device, every CPU but one on a CUDA device (at least 2, at most 8). Linux only "
        "(elsewhere 0 means 1).",
    )
    api_key: str | None = Field(
        None,
        description="When set, /predict, /models and /v2/models need it in the X-API-Key header (or Authorization: Bearer), "
        "and the gRPC model calls in x-api-key (or authorization) metadata. Set but empty, the service refuses to start.",
    )
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS, '*' for any; empty: CORS off.")
    watch_interval_s: float = Field(
        2.0, ge=0, description="How often the repository is scanned for added or replaced models (0: never)."
    )
    readiness_policy: Literal["startup", "strict"] = Field(
        "startup",
        description="startup: /health is ready once every model found at start-up has a ready version; a model added "
        "later that fails to load is reported (health body, kos_model_versions, log) without taking the node out. "
        "strict: every model name must have a ready version, at any time.",
    )
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM, how long /health answers 503 while requests are still served, so that load balancers "
        "and endpoints stop sending; then the drain starts.",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Longest the drain may take after --drain-delay-s: requests in flight and queued images; past it the "
        "rest are cut off and the exit status is 1 (0 after a clean drain).",
    )
    access_log: bool = Field(False, description="Log one line per HTTP request (uvicorn's access log).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="text, or json: one JSON object per line.")

    @model_validator(mode="after")
    def _a_full_request_fits_the_queue(self) -> Settings:
        # A request is queued whole or not at all, so one that can never fit would get 503 forever.
        if self.max_files_per_request > self.queue_size:
            raise ValueError(
                f"--max-files-per-request ({self.max_files_per_request}) must not exceed --queue-size ({self.queue_size}), "
                "since a request is queued whole: raise --queue-size (KOS_QUEUE_SIZE) to at least "
                f"{self.max_files_per_request}, or lower --max-files-per-request (KOS_MAX_FILES_PER_REQUEST) to at most {self.queue_size}"
            )
        return self

    @model_validator(mode="after")
    def _no_empty_secrets_or_names(self) -> Settings:
        # An empty KOS_API_KEY is most often a template that forgot to fill it in: serving without
        # authentication then would be silent, so refuse instead.
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError(
                "--api-key (KOS_API_KEY) is set but empty, which would serve without authentication: "
                "give it a key, or unset it to serve without one"
            )
        if self.model_name is not None and (not self.model_name.strip() or "/" in self.model_name):
            raise ValueError(
                f"--model-name (KOS_MODEL_NAME) {self.model_name!r} is not a model name: give a name without '/', "
                "or unset it to serve a repository of NAME/VERSION folders"
            )
        return self

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
