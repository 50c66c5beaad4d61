"""Server metadata, model metadata and model configuration bodies, shared by REST (JSON) and gRPC (protobuf).

The configuration follows Triton's model configuration (the model_configuration extension), with
the batching really in force: a request may carry up to `max_files_per_request` images
(`max_batch_size`, Triton's meaning for a client), which the batcher gathers with other requests'
into runs of up to the service's `max_batch_size` (`dynamic_batching.preferred_batch_size`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal, Protocol

from kos_core.artifact import INPUT_NAME, OUTPUT_NAME

from ..registry import ServedModel
from .inference import tensor_shape

SERVER_NAME = "keras-onnx-serve"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "parameters"]
PLATFORM = "onnxruntime_onnx"
IMAGE_BYTES_NOTE = (
    f"{INPUT_NAME!r} also takes BYTES [-1] or [-1, 1]: each element an encoded image file (JPEG, PNG, WebP, BMP, "
    "GIF, TIFF), decoded and resized by the server as POST /predict does"
)


def server_version() -> str:
    try:
        return version(SERVER_NAME)
    except PackageNotFoundError:
        return "0.1.0"


class BatchingSettings(Protocol):
    max_batch_size: int
    max_batch_delay_ms: float
    queue_size: int
    request_timeout_s: float
    max_files_per_request: int
    # A number once a model is loaded; "auto" only in service-wide settings no model has resolved.
    inference_workers: int | Literal["auto"]


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}


def model_metadata(served: ServedModel, versions: list[int]) -> dict[str, Any]:
    """The protocol's model metadata; `parameters` (an addition clients ignore) says what else `image` takes."""
    assert served.metadata is not None
    return {
        "name": served.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": tensor_shape(served.metadata)}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(served.metadata.labels)]}],
        "parameters": {"image_bytes": IMAGE_BYTES_NOTE, "labels": served.metadata.labels},
    }


def model_config(served: ServedModel, settings: BatchingSettings, on_gpu: bool) -> dict[str, Any]:
    """Triton's ModelConfig for `served`, as JSON with numbers as numbers (Triton's REST form)."""
    meta = served.metadata
    assert meta is not None
    return {
        "name": served.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": settings.max_files_per_request,
        "input": [
            {
                "name": INPUT_NAME,
                "data_type": "TYPE_UINT8",
                "format": "FORMAT_NHWC",
                "dims": [meta.height, meta.width, meta.channels],
            }
        ],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [len(meta.labels)]}],
        "dynamic_batching": {
            "preferred_batch_size": [settings.max_batch_size],
            "max_queue_delay_microseconds": round(settings.max_batch_delay_ms * 1000),
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": round(settings.request_timeout_s * 1_000_000),
                "max_queue_size": settings.queue_size,
            },
        },
        "instance_group": [
            {"name": served.name, "kind": "KIND_GPU" if on_gpu else "KIND_CPU", "count": settings.inference_workers}
        ],
        "default_model_filename": served.path.name,
        "parameters": {
            "image_bytes": {"string_value": IMAGE_BYTES_NOTE},
            "color_mode": {"string_value": meta.color_mode},
            "resize_method": {"string_value": meta.resize_method},
            "precision": {"string_value": served.precision or "float32"},
        },
    }
