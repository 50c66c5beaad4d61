"""Bodies of the v2 REST routes, for the OpenAPI document (answers are serialised by the codec)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class V2Error(BaseModel):
    error: str = Field(
        description="What went wrong, in words.", examples=["unknown output 'logits': the model has 'probabilities'"]
    )


class V2Ready(BaseModel):
    ready: bool | None = Field(None, examples=[True])
    live: bool | None = None
    name: str | None = None
    version: str | None = None


class V2ServerMetadata(BaseModel):
    name: str = Field(examples=["keras-onnx-serve"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str] = Field(examples=[["binary_tensor_data", "classification", "model_configuration", "parameters"]])


class V2TensorMetadata(BaseModel):
    name: str = Field(examples=["image"])
    datatype: str = Field(examples=["UINT8"])
    shape: list[int] = Field(description="-1 for the batch dimension.", examples=[[-1, 8, 8, 1]])


class V2ModelMetadata(BaseModel):
    name: str = Field(examples=["digits"])
    versions: list[str] = Field(examples=[["1"]])
    platform: str = Field(examples=["onnxruntime_onnx"])
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, Any] = Field(
        description="What else the input takes (encoded image files as BYTES), and the labels.",
        examples=[{"image_bytes": "'image' also takes BYTES [-1] or [-1, 1] ...", "labels": ["0", "1"]}],
    )


class V2ModelConfig(BaseModel):
    config: dict[str, Any] = Field(
        description="Triton's model configuration: max_batch_size (images one request may carry), input with "
        "format FORMAT_NHWC and dims, output, dynamic_batching with the batcher's settings in force.",
        examples=[
            {
                "name": "digits",
                "platform": "onnxruntime_onnx",
                "max_batch_size": 64,
                "input": [{"name": "image", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [8, 8, 1]}],
                "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}],
                "dynamic_batching": {"preferred_batch_size": [32], "max_queue_delay_microseconds": 5000},
            }
        ],
    )


class V2Tensor(BaseModel):
    name: str = Field(examples=["image"])
    datatype: str = Field(description="UINT8 for the image tensor, BYTES for encoded files.", examples=["UINT8"])
    shape: list[int] = Field(examples=[[1, 8, 8, 1]])
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size: the tensor's bytes after the header.")
    data: list[Any] | None = Field(None, description="Row-major values (flat or nested), when not sent as binary.")


class V2RequestedOutput(BaseModel):
    name: str = Field(examples=["probabilities"])
    parameters: dict[str, Any] | None = Field(
        None,
        description="binary_data: answer as raw bytes; classification: k, the k best classes.",
        examples=[{"classification": 3}],
    )


class V2InferRequest(BaseModel):
    id: str | None = Field(None, description="Echoed in the answer.")
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output, timeout (microseconds); others are accepted."
    )
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str = Field(examples=["digits"])
    model_version: str = Field(examples=["1"])
    id: str | None = None
    outputs: list[V2Tensor] = Field(
        examples=[
            [{"name": "probabilities", "datatype": "BYTES", "shape": [1, 3], "data": ["0.99:3:3", "0.004:8:8", "0.001:5:5"]}]
        ]
    )
