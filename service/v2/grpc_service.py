"""`inference.GRPCInferenceService` on grpcio's asyncio server, in the HTTP server's process and event loop.

The messages and the service's method names come from Triton's grpc_service.proto and
model_config.proto (proto/README.md says from where), the definitions tritonclient.grpc calls with,
ModelConfig included. The RPCs served here are registered under the service's own name; any other
of its RPCs (shared memory, repository control, statistics, streaming) answers UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format

from kos_core.layout import is_version

from ..dataplane import DataPlane, Deadline
from ..errors import ServiceError, ServiceUnavailable, Unauthorized
from ..listening import listeners_on, quiesce
from ..settings import Settings
from .codec import (
    InferRequest,
    OutputTensor,
    RequestedOutput,
    Tensor,
    check_datatype,
    check_shape,
    classification_count,
    raw_bytes,
    tensor_from_array,
    tensor_from_raw,
    tensor_from_values,
)
from .errors import InvalidInput, grpc_code, rest_status
from .health import liveness, readiness
from .inference import client_deadline, infer
from .messages import SERVICE, messages
from .metadata import model_config, model_metadata, server_metadata

log = logging.getLogger(__name__)

PROTOCOL = "v2-grpc"
# At shutdown, how long gRPC connections already accepted by the kernel may wait to be taken by grpc.
BACKLOG_WAIT_S = 2.0
# Typed contents: which field of InferTensorContents carries each datatype.
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

Reply = TypeVar("Reply")


def _parameter(value: Any) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return getattr(value, choice) if choice else None


def _input_tensor(index: int, tensor: Any, raw: list[bytes]) -> Tensor:
    name = tensor.name
    datatype = check_datatype(name, tensor.datatype)
    shape = check_shape(name, list(tensor.shape))
    parameters = {k: _parameter(v) for k, v in tensor.parameters.items()}
    if raw:
        return tensor_from_raw(name, datatype, shape, raw[index], parameters)
    field = _CONTENTS.get(datatype)
    if field is None:
        raise InvalidInput(f"input {name!r}: datatype {datatype} must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if datatype == "BYTES":
        return tensor_from_values(name, datatype, shape, list(values), parameters)
    return tensor_from_array(name, datatype, shape, np.asarray(values), parameters)


def parse_grpc_request(request: Any) -> InferRequest:
    """An InferRequest from a ModelInferRequest: raw_input_contents (one per input) or typed contents."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: one per input")
    if not request.inputs:
        raise InvalidInput("inputs is empty: send the model's input tensor")
    inputs = [_input_tensor(i, t, raw) for i, t in enumerate(request.inputs)]
    outputs = None
    if request.outputs:
        outputs = []
        for o in request.outputs:
            k = (
                classification_count(o.name, _parameter(o.parameters["classification"]))
                if "classification" in o.parameters
                else 0
            )
            outputs.append(RequestedOutput(o.name, True, k))
    return InferRequest(
        inputs=inputs,
        outputs=outputs,
        id=request.id or None,
        parameters={k: _parameter(v) for k, v in request.parameters.items()},
    )


def infer_response(
    answer_model: str, version: int, request_id: str | None, outputs: list[tuple[OutputTensor, RequestedOutput]]
) -> Any:
    response = messages().ModelInferResponse(model_name=answer_model, model_version=str(version), id=request_id or "")
    for tensor, _ in outputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        response.raw_output_contents.append(raw_bytes(tensor))
    return response


def _version(text: str) -> int | None:
    if text == "":
        return None
    if not is_version(text):
        raise InvalidInput(f"model_version must be a positive integer, not {text!r}")
    return int(text)


def _guarded(
    method: Callable[[InferenceServicer, Any, grpc.aio.ServicerContext], Awaitable[Reply]],
) -> Callable[[InferenceServicer, Any, grpc.aio.ServicerContext], Awaitable[Reply]]:
    """Every ServiceError as the matching gRPC status (503s with a retry-after in the trailing metadata)."""

    @functools.wraps(method)
    async def guarded(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Reply:
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            if exc.status_code >= 500 and not isinstance(exc, ServiceUnavailable) and exc.status_code != 504:
                log.error("%s on gRPC %s: %s", type(exc).__name__, method.__name__, exc.detail)
            trailing = tuple((k.lower(), v) for k, v in (exc.headers or {}).items())
            await context.abort(grpc_code(exc), exc.detail, trailing_metadata=trailing)
            raise AssertionError("unreachable: abort raises") from None

    return guarded


class InferenceServicer:
    """The v2 RPCs over the same data plane as REST and /predict."""

    def __init__(self, dataplane: DataPlane, api_key: str | None, state: Any):
        self.dataplane = dataplane
        self.api_key = api_key
        self.state = state  # the app's state: its data plane, and its liveness and readiness checks when it has them

    def _authorise(self, context: grpc.aio.ServicerContext) -> None:
        if not self.api_key:
            return
        metadata = dict(context.invocation_metadata() or ())
        given = metadata.get("x-api-key")
        bearer = metadata.get("authorization", "")
        if given is None and bearer.lower().startswith("bearer "):
            given = bearer[7:]
        if given is None or not hmac.compare_digest(str(given).encode(), self.api_key.encode()):
            raise Unauthorized("missing or wrong API key: send it in the x-api-key metadata or as a Bearer authorization")

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages().ServerLiveResponse(live=(await liveness(self.state))[0])

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return messages().ServerReadyResponse(ready=(await readiness(self.state))[0])

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return json_format.ParseDict(server_metadata(), messages().ServerMetadataResponse())

    @_guarded
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._authorise(context)
        try:
            self.dataplane.served(request.name, _version(request.version))
        except ServiceError as exc:
            if exc.status_code != 503:
                raise  # an unknown model or version is NOT_FOUND, as on REST
            return messages().ModelReadyResponse(ready=False)
        return messages().ModelReadyResponse(ready=True)

    @_guarded
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._authorise(context)
        served = self.dataplane.served(request.name, _version(request.version))
        versions = [m.version for m in self.dataplane.registry.versions(request.name) if m.state == "ready"]
        body = model_metadata(served, versions)
        body.pop("parameters")  # the message has no such field; ModelConfig's parameters carry the same
        return json_format.ParseDict(body, messages().ModelMetadataResponse())

    @_guarded
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._authorise(context)
        served = self.dataplane.served(request.name, _version(request.version))
        settings = getattr(served, "settings", None) or self.dataplane.settings
        config = model_config(served, settings, self.dataplane.registry.device.is_cuda)
        return messages().ModelConfigResponse(config=json_format.ParseDict(config, messages().ModelConfig()))

    @_guarded
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, arrival = time.perf_counter(), time.monotonic()
        metrics = self.dataplane.metrics
        # Client-chosen names stay out of the label set, as on HTTP: unknown ones share one label.
        label = request.model_name if request.model_name in self.dataplane.registry.models else "_unknown"
        status = 500
        metrics.in_progress.inc()
        try:
            response = await self._infer(request, context, arrival)
            status = 200
            return response
        except ServiceError as exc:
            status = rest_status(exc)
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (or its deadline passed) before an answer
            raise
        finally:
            metrics.in_progress.dec()
            metrics.observe_request(label, status, PROTOCOL, time.perf_counter() - started)

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext, arrival: float) -> Any:
        self._authorise(context)
        version = _version(request.model_version)
        self.dataplane.admit(request.model_name, version, 1)
        infer_request = parse_grpc_request(request)
        client = client_deadline(arrival, infer_request.parameters)
        remaining = context.time_remaining()
        if remaining is not None:  # the client's own gRPC deadline
            client = min(client or math.inf, arrival + remaining)
        deadline = Deadline(arrival, client)
        answer = await infer(self.dataplane, request.model_name, version, infer_request, deadline, PROTOCOL)
        return infer_response(answer.model, answer.version, infer_request.id, answer.outputs)


# The RPCs answered here; the service's others are left to grpc, which answers UNIMPLEMENTED.
RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelInfer")


def _handlers(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """The servicer's RPCs under the service's name, each (de)serialising the message types the .proto gives it."""
    protocol = messages()
    handlers = {}
    for method in protocol.service.methods:
        if method.name not in RPCS:
            continue
        request = getattr(protocol, method.input_type.name)
        response = getattr(protocol, method.output_type.name)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def grpc_max_message_bytes(settings: Settings) -> int:
    return settings.grpc_max_message_bytes or settings.max_upload_bytes


def create_grpc_server(
    dataplane: DataPlane, settings: Settings, state: Any, *, shared_port: bool = False
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server bound to settings.host:grpc_port (call from the running loop); the port it got.

    `shared_port`: this process is one of several front ends that serve gRPC on the same port. grpcio
    listens and accepts on sockets of its own (it cannot take an inherited listening socket as
    uvicorn does), so each front end binds the port with SO_REUSEPORT and the kernel spreads new
    connections over them; the supervisor has made sure no other service holds the port.
    """
    limit = grpc_max_message_bytes(settings)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # One process alone: a second service on the same port must fail to start, not share it.
            ("grpc.so_reuseport", 1 if shared_port else 0),
        ]
    )
    server.add_generic_rpc_handlers((_handlers(InferenceServicer(dataplane, settings.api_key, state)),))
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    port = server.add_insecure_port(f"{host}:{settings.grpc_port}")
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {host}:{settings.grpc_port}")
    return server, port


async def stop_grpc_server(server: grpc.aio.Server, port: int, grace_s: float) -> None:
    """Stop without resetting a connection the kernel accepted: refuse new handshakes, let grpc take its accept queue,
    then stop, giving the calls in flight up to `grace_s`."""
    sockets = listeners_on(port)
    try:
        left = await asyncio.to_thread(quiesce, sockets, BACKLOG_WAIT_S)
        if left:
            log.warning("%d gRPC connections were still waiting to be accepted when gRPC stopped", left)
    finally:
        for sock in sockets:
            sock.close()
    await server.stop(grace_s)
