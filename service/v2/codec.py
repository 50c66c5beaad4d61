"""Tensors on the wire: the v2 REST body (JSON header, binary tensor data extension) and BYTES elements.

Pure functions over bytes and numpy arrays, no framework: REST and gRPC both parse into the same
`Tensor` and `RequestedOutput` and answer from the same `OutputTensor`. Every malformed input is an
`InvalidInput` (400) that names the tensor and what was expected, raised before anything runs.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidInput

HEADER_LENGTH = "Inference-Header-Content-Length"

# Fixed-size datatypes of the protocol, little-endian on the wire. BYTES is length-prefixed;
# BF16 has no numpy type here, so it is parsed (for its size) but never converted.
NUMPY_TYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
ITEM_SIZES = {name: dtype.itemsize for name, dtype in NUMPY_TYPES.items()} | {"BF16": 2}
DATATYPES = frozenset(ITEM_SIZES) | {"BYTES"}

_LENGTH = struct.Struct("<I")


@dataclass
class Tensor:
    """An input as a client sent it: numeric data as an array of its shape, BYTES as a flat list of elements."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None = None  # None: the request's default
    classification: int = 0  # 0: the tensor itself; k: the k best classes as "score:index:label"


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]


@dataclass
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output, each in the default form
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    binary_output: bool = False  # the default for outputs that do not say (binary_data_output)


# --- shapes and elements ------------------------------------------------------------------------


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"input {name!r}: shape must be a list of integers, not {shape!r}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return tuple(shape)


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_datatype(name: str, datatype: Any) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype!r} (one of {', '.join(sorted(DATATYPES))})")
    return str(datatype)


def serialize_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements as the protocol sends them: each one a 4-byte little-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def deserialize_bytes(name: str, raw: bytes | memoryview, count: int) -> list[bytes]:
    """Exactly `count` length-prefixed elements filling `raw`, or InvalidInput saying where it went wrong."""
    view = memoryview(raw)
    elements, offset = [], 0
    for i in range(count):
        if offset + 4 > len(view):
            raise InvalidInput(
                f"input {name!r}: BYTES data ends after {i} of {count} elements (each needs a 4-byte length prefix)"
            )
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidInput(
                f"input {name!r}: BYTES element {i} says {length} bytes but only {len(view) - offset} remain; the data is truncated"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise InvalidInput(f"input {name!r}: {len(view) - offset} bytes left over after its {count} BYTES elements")
    return elements


def tensor_from_raw(
    name: str, datatype: str, shape: tuple[int, ...], raw: bytes | memoryview, parameters: dict[str, Any] | None = None
) -> Tensor:
    """A tensor from its raw bytes (binary extension, gRPC raw_input_contents); no copy for numeric data."""
    count = element_count(shape)
    if datatype == "BYTES":
        return Tensor(name, datatype, shape, deserialize_bytes(name, raw, count), parameters or {})
    expected = count * ITEM_SIZES[datatype]
    if len(raw) != expected:
        raise InvalidInput(
            f"input {name!r}: {len(raw)} bytes of data, but shape {list(shape)} of {datatype} needs {expected}"
            + (" (truncated)" if len(raw) < expected else "")
        )
    if datatype not in NUMPY_TYPES:
        raise InvalidInput(f"input {name!r}: datatype {datatype} is not supported here")
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=NUMPY_TYPES[datatype]).reshape(shape), parameters or {})


def _flatten(name: str, data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def tensor_from_values(
    name: str, datatype: str, shape: tuple[int, ...], values: Sequence[Any], parameters: dict[str, Any] | None = None
) -> Tensor:
    """A tensor from a flat list of element values (JSON `data`, gRPC typed contents), range-checked."""
    count = element_count(shape)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: {len(values)} data elements, but shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        elements = []
        for v in values:
            if isinstance(v, str):
                elements.append(v.encode())
            elif isinstance(v, (bytes, bytearray)):
                elements.append(bytes(v))
            else:
                raise InvalidInput(f"input {name!r}: BYTES data must be strings, not {type(v).__name__}")
        return Tensor(name, datatype, shape, elements, parameters or {})
    if datatype not in NUMPY_TYPES:
        raise InvalidInput(f"input {name!r}: datatype {datatype} needs the binary data extension")
    dtype = NUMPY_TYPES[datatype]
    if any(isinstance(v, (str, bytes, dict, list)) or v is None for v in values):
        raise InvalidInput(f"input {name!r}: {datatype} data must be numbers")
    if dtype.kind in "ui":
        if any(isinstance(v, float) and not v.is_integer() for v in values):
            raise InvalidInput(f"input {name!r}: {datatype} data must be integers")
        info = np.iinfo(dtype)
        if values and not all(info.min <= v <= info.max for v in values):
            raise InvalidInput(f"input {name!r}: {datatype} data must lie in [{info.min}, {info.max}]")
    try:
        array = np.asarray(values, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(f"input {name!r}: data does not convert to {datatype} ({exc})") from None
    return Tensor(name, datatype, shape, array, parameters or {})


def tensor_from_array(
    name: str, datatype: str, shape: tuple[int, ...], values: np.ndarray, parameters: dict[str, Any] | None = None
) -> Tensor:
    """A numeric tensor from a flat array of values in a wider type (gRPC typed contents), range-checked."""
    count = element_count(shape)
    if values.size != count:
        raise InvalidInput(f"input {name!r}: {values.size} data elements, but shape {list(shape)} needs {count}")
    dtype = NUMPY_TYPES[datatype]
    if dtype.kind in "ui" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InvalidInput(f"input {name!r}: {datatype} data must lie in [{info.min}, {info.max}]")
    return Tensor(name, datatype, shape, values.astype(dtype).reshape(shape), parameters or {})


# --- REST requests ------------------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary data after it, per Inference-Header-Content-Length."""
    if header_length is None:
        length = len(body)
    else:
        if not (header_length.strip().isascii() and header_length.strip().isdigit()):
            raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer, not {header_length!r}")
        length = int(header_length)
        if length > len(body):
            raise InvalidInput(f"{HEADER_LENGTH} is {length} but the body has only {len(body)} bytes")
    try:
        header = json.loads(bytes(memoryview(body)[:length]))
    except (UnicodeDecodeError, ValueError) as exc:
        where = f"the first {length} bytes (Inference-Header-Content-Length)" if header_length is not None else "the body"
        raise InvalidInput(f"{where} are not a JSON inference request: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidInput("the inference request must be a JSON object")
    return header, memoryview(body)[length:]


def _parameters(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: parameters must be an object")
    return value


def _binary_size(name: str, parameters: dict[str, Any]) -> int | None:
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer, not {size!r}")
    return size


def _flag(where: str, value: Any, key: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidInput(f"{where}: {key} must be true or false, not {value!r}")
    return value


def parse_outputs(raw: Any) -> list[RequestedOutput] | None:
    """Requested outputs from a JSON `outputs` list (REST) or the same shape built from gRPC."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidInput("outputs must be a list")
    outputs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{i}] must be an object with a name")
        name = item["name"]
        parameters = _parameters(f"output {name!r}", item.get("parameters"))
        outputs.append(
            RequestedOutput(
                name,
                _flag(f"output {name!r}", parameters.get("binary_data"), "binary_data"),
                classification_count(name, parameters["classification"]) if "classification" in parameters else 0,
            )
        )
    return outputs


def classification_count(name: str, value: Any) -> int:
    """The k of a requested classification; a request that asks for one asks for at least one class."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInput(f"output {name!r}: classification must be a positive integer, not {value!r}")
    return value


def parse_rest_request(header: dict[str, Any], binary: memoryview) -> InferRequest:
    """An InferRequest from a parsed JSON header and the binary data that followed it."""
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("inputs must be a non-empty list of tensors")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("id must be a string")
    parameters = _parameters("request", header.get("parameters"))
    inputs, offset = [], 0
    for i, item in enumerate(raw_inputs):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"inputs[{i}] must be an object with a name")
        name = item["name"]
        datatype = check_datatype(name, item.get("datatype"))
        shape = check_shape(name, item.get("shape"))
        tensor_parameters = _parameters(f"input {name!r}", item.get("parameters"))
        size = _binary_size(name, tensor_parameters)
        if size is not None:
            if "data" in item:
                raise InvalidInput(f"input {name!r}: has both data and binary_data_size")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size} goes past the end of the body "
                    f"({len(binary) - offset} bytes of binary data remain); the body is truncated"
                )
            inputs.append(tensor_from_raw(name, datatype, shape, binary[offset : offset + size], tensor_parameters))
            offset += size
        elif "data" in item:
            inputs.append(tensor_from_values(name, datatype, shape, _flatten(name, item["data"]), tensor_parameters))
        else:
            raise InvalidInput(f"input {name!r}: needs data, or parameters.binary_data_size with binary data after the header")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes after the header belong to no input's binary_data_size")
    return InferRequest(
        inputs=inputs,
        outputs=parse_outputs(header.get("outputs")),
        id=request_id,
        parameters=parameters,
        binary_output=bool(_flag("request", parameters.get("binary_data_output"), "binary_data_output")),
    )


# --- REST answers -------------------------------------------------------------------------------


def raw_bytes(tensor: OutputTensor) -> bytes:
    """The tensor's data as the binary extension and gRPC raw_output_contents carry it."""
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.data)  # type: ignore[arg-type]
    return np.ascontiguousarray(tensor.data, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()


def json_values(tensor: OutputTensor) -> list[Any]:
    if tensor.datatype == "BYTES":
        return [e.decode("utf-8", errors="replace") for e in tensor.data]
    return np.asarray(tensor.data).ravel().tolist()


def encode_rest_response(
    model: str, version: int, request_id: str | None, outputs: Sequence[tuple[OutputTensor, bool]]
) -> tuple[bytes, int | None]:
    """The answer body and, when any output went binary, the JSON header's length (for Inference-Header-Content-Length)."""
    described, blobs = [], []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if binary:
            blob = raw_bytes(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = json_values(tensor)
        described.append(entry)
    answer: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": described}
    if request_id is not None:
        answer["id"] = request_id
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def classification_strings(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[bytes]:
    """The k best classes of each row as "score:index:label", highest first, row after row."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    # repr of a float32's value keeps every digit it has, so a client's float() gets the same score back.
    return [f"{float(row[i])!r}:{int(i)}:{labels[i]}".encode() for row, indices in zip(probabilities, order) for i in indices]
