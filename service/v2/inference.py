"""One v2 inference, whatever carried it: check the request against the model, call the data plane, shape outputs.

Inputs a client may send, under the model's input name (`image`):
- UINT8 `[batch, H, W, C]`, the model's own tensor (a client that resizes itself);
- BYTES `[batch]` or `[batch, 1]`, each element an encoded image file, decoded and resized as /predict does.
Outputs: `probabilities`, FP32 `[batch, classes]`, or with the classification extension BYTES
`[batch, k]` of "score:index:label", highest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kos_core.artifact import INPUT_NAME, OUTPUT_NAME, ModelMetadata

from ..dataplane import DataPlane, Deadline, EncodedImage
from .codec import InferRequest, OutputTensor, RequestedOutput, Tensor, classification_strings
from .errors import InvalidInput


@dataclass
class InferAnswer:
    model: str
    version: int
    outputs: list[tuple[OutputTensor, RequestedOutput]]


def tensor_shape(meta: ModelMetadata) -> list[int]:
    return [-1, meta.height, meta.width, meta.channels]


def _batch(tensor: Tensor, meta: ModelMetadata) -> int:
    """The batch size of a well-formed `image` tensor, or InvalidInput saying what the model takes."""
    expected = f"the model's [-1, {meta.height}, {meta.width}, {meta.channels}] (UINT8) nor [-1] / [-1, 1] (BYTES, encoded files)"
    shape = list(tensor.shape)
    if tensor.datatype == "UINT8":
        if len(shape) != 4 or tuple(shape[1:]) != meta.input_shape:
            raise InvalidInput(f"input {tensor.name!r}: shape {shape} of UINT8 does not match {expected}")
    elif tensor.datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InvalidInput(f"input {tensor.name!r}: shape {shape} of BYTES does not match {expected}")
    else:
        raise InvalidInput(
            f"input {tensor.name!r}: datatype {tensor.datatype} is not accepted: send UINT8 "
            f"[-1, {meta.height}, {meta.width}, {meta.channels}] or BYTES [-1] of encoded image files"
        )
    if shape[0] < 1:
        raise InvalidInput(f"input {tensor.name!r}: the batch dimension is {shape[0]}; send at least one image")
    return shape[0]


def _outputs(request: InferRequest, classes: int) -> list[RequestedOutput]:
    requested = request.outputs if request.outputs is not None else [RequestedOutput(OUTPUT_NAME)]
    if not requested:
        raise InvalidInput(f"outputs is empty: ask for {OUTPUT_NAME!r} or leave outputs out")
    for output in requested:
        if output.name != OUTPUT_NAME:
            raise InvalidInput(f"unknown output {output.name!r}: the model has {OUTPUT_NAME!r}")
        if output.classification > classes:
            raise InvalidInput(
                f"output {output.name!r}: classification {output.classification} is more than the model's {classes} classes"
            )
    return requested


def check(request: InferRequest, meta: ModelMetadata) -> tuple[Tensor, int, list[RequestedOutput]]:
    """The image tensor, its batch size and the outputs to answer; InvalidInput for anything off."""
    names = [t.name for t in request.inputs]
    if names != [INPUT_NAME]:
        unknown = [n for n in names if n != INPUT_NAME]
        what = f"unknown input {unknown[0]!r}" if unknown else f"input {INPUT_NAME!r} given {len(names)} times"
        raise InvalidInput(f"{what}: the model takes one input, {INPUT_NAME!r}")
    tensor = request.inputs[0]
    return tensor, _batch(tensor, meta), _outputs(request, len(meta.labels))


def client_deadline(arrival: float, parameters: dict[str, Any]) -> float | None:
    """Triton's `timeout` request parameter, in microseconds, as a deadline: it can only shorten the model's own."""
    timeout_us = parameters.get("timeout")
    if isinstance(timeout_us, int) and not isinstance(timeout_us, bool) and timeout_us > 0:
        return arrival + timeout_us / 1e6
    return None


async def infer(
    dataplane: DataPlane, name: str, version: int | None, request: InferRequest, deadline: Deadline, protocol: str
) -> InferAnswer:
    """Run `request` on the model, batched with every other protocol's images; raises ServiceError subclasses."""
    served = dataplane.served(name, version)
    assert served.metadata is not None
    tensor, batch, requested = check(request, served.metadata)
    dataplane.admit(name, version, batch)
    if tensor.datatype == "UINT8":
        assert isinstance(tensor.data, np.ndarray)
        result = await dataplane.classify_tensor(name, version, tensor.data, deadline, protocol)
    else:
        files = [EncodedImage(filename=f"{tensor.name}[{i}]", data=data) for i, data in enumerate(tensor.data)]
        result = await dataplane.classify_files(name, version, files, deadline, protocol)
    outputs = []
    for output in requested:
        if output.classification:
            k = output.classification
            strings = classification_strings(result.probabilities, result.labels, k)
            outputs.append((OutputTensor(output.name, "BYTES", (batch, k), strings), output))
        else:
            outputs.append((OutputTensor(output.name, "FP32", result.probabilities.shape, result.probabilities), output))
    return InferAnswer(result.model, result.version, outputs)
