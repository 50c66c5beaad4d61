"""The v2 REST routes (`/v2/...`): thin, over the codec and the data plane; every error is `{"error": "..."}`."""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect

from kos_core.artifact import INPUT_NAME, OUTPUT_NAME
from kos_core.layout import is_version

from ..dataplane import Deadline
from ..errors import (
    DeadlineExceeded,
    ImageTooLarge,
    InferenceFailed,
    ModelNotFound,
    ModelNotReady,
    PayloadTooLarge,
    QueueFull,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedImage,
)
from ..middleware import ARRIVAL_KEY
from .codec import HEADER_LENGTH, encode_rest_response, parse_rest_request, split_body
from .errors import InvalidInput, rest_status
from .health import liveness, readiness
from .inference import client_deadline, infer
from .metadata import model_config, model_metadata, server_metadata
from .schemas import (
    V2Error,
    V2InferRequest,
    V2InferResponse,
    V2ModelConfig,
    V2ModelMetadata,
    V2Ready,
    V2ServerMetadata,
)

log = logging.getLogger(__name__)

PROTOCOL = "v2-rest"


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse({"error": error.detail}, status_code=rest_status(error), headers=error.headers)


class V2Route(APIRoute):
    """A route that answers every failure in the protocol's shape, `{"error": ...}`, not /predict's `{"detail": ...}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                if exc.status_code >= 500 and not isinstance(exc, (ServiceUnavailable, DeadlineExceeded)):
                    log.error("%s on %s %s: %s", type(exc).__name__, request.method, request.url.path, exc.detail)
                return error_response(exc)
            except RequestValidationError as exc:
                detail = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
                return error_response(InvalidInput(detail or "malformed request"))
            except ClientDisconnect:
                # The body size limit (or the client) cut the body off; whatever goes out now is dropped.
                return Response(status_code=400)
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return JSONResponse({"error": "internal server error"}, status_code=500)

        return answer


def _responses(*errors: type[ServiceError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the v2 errors, each with its description and an `{"error": ...}` example."""
    out: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        status = 400 if error.status_code == 422 else error.status_code
        entry = out.setdefault(status, {"model": V2Error, "description": "", "content": {"application/json": {"examples": {}}}})
        entry["description"] = (entry["description"] + " " + error.description).strip()
        entry["content"]["application/json"]["examples"][error.__name__] = {
            "summary": error.description,
            "value": {"error": error.example},
        }
        if issubclass(error, ServiceUnavailable):
            entry["headers"] = {"Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait before retrying."}}
    return out


# Health and server metadata stay open; model routes need the API key when one is configured (the app adds it).
public = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"], route_class=V2Route)
models = APIRouter(prefix="/v2/models", tags=["Open Inference Protocol (v2)"], route_class=V2Route)

ModelName = Annotated[str, Path(description="Served model name.", examples=["digits"])]
Version = Annotated[str, Path(description="Model version, a positive integer.", examples=["1"])]


def _version(version: str | None) -> int | None:
    if version is None or version == "":
        return None
    if not is_version(version):
        raise InvalidInput(f"version must be a positive integer, not {version!r}")
    return int(version)


@public.get("", response_model=V2ServerMetadata, summary="Server metadata: name, version and protocol extensions")
async def server_metadata_route() -> JSONResponse:
    return JSONResponse(server_metadata())


@public.get(
    "/health/live",
    response_model=V2Ready,
    summary="Live: 200 while the process works, also while a model loads or failed to load",
    responses={503: {"model": V2Error, "description": "The process does not work (its liveness check failed)."}},
)
async def server_live(request: Request) -> JSONResponse:
    live, problem = await liveness(request.app.state)
    if not live:
        return JSONResponse({"live": False, "error": problem}, status_code=503)
    return JSONResponse({"live": True})


@public.get(
    "/health/ready",
    response_model=V2Ready,
    summary="Ready: the same answer as GET /health (every model has a ready version)",
    responses={503: {"model": V2Ready, "description": "A model has no ready version, or none is served."}},
)
async def server_ready(request: Request) -> JSONResponse:
    ready, problem = await readiness(request.app.state)
    if not ready:
        return JSONResponse({"ready": False, "error": problem}, status_code=503)
    return JSONResponse({"ready": True})


def _metadata(request: Request, model: str, version: str | None) -> JSONResponse:
    dataplane = request.app.state.dataplane
    served = dataplane.served(model, _version(version))
    versions = [m.version for m in dataplane.registry.versions(model) if m.state == "ready"]
    return JSONResponse(model_metadata(served, versions))


def _config(request: Request, model: str, version: str | None) -> JSONResponse:
    dataplane = request.app.state.dataplane
    served = dataplane.served(model, _version(version))
    settings = getattr(served, "settings", None) or dataplane.settings
    return JSONResponse({"config": model_config(served, settings, dataplane.registry.device.is_cuda)})


def _ready(request: Request, model: str, version: str | None) -> JSONResponse:
    served = request.app.state.dataplane.served(model, _version(version))
    return JSONResponse({"name": served.name, "version": str(served.version), "ready": True})


def _decompressed(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A gzip or deflate body (tritonclient's request compression), inflated no further than the upload limit."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(wbits=47)  # 32 + 15: a gzip or a zlib header, whichever is there
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"the body is not valid {encoding} data: {exc}") from None
    if len(data) > limit:
        raise PayloadTooLarge(f"the decompressed body is larger than the limit of {limit} bytes")
    return data


def _deadline(request: Request, parameters: dict[str, Any]) -> Deadline:
    arrival: float = request.scope.get(ARRIVAL_KEY, time.monotonic())
    return Deadline(arrival, client_deadline(arrival, parameters))


async def _infer(request: Request, model: str, version: str | None) -> Response:
    dataplane = request.app.state.dataplane
    number = _version(version)
    dataplane.admit(model, number, 1)  # an unknown, unready or full model is refused before the body is read
    body = _decompressed(await request.body(), request.headers.get("content-encoding"), dataplane.settings.max_upload_bytes)
    header, binary = split_body(body, request.headers.get(HEADER_LENGTH))
    infer_request = parse_rest_request(header, binary)
    answer = await infer(dataplane, model, number, infer_request, _deadline(request, infer_request.parameters), PROTOCOL)
    outputs = [
        (tensor, requested.binary if requested.binary is not None else infer_request.binary_output)
        for tensor, requested in answer.outputs
    ]
    content, header_length = encode_rest_response(answer.model, answer.version, infer_request.id, outputs)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header_length)})


_READ_ERRORS = _responses(InvalidInput, Unauthorized, ModelNotFound, ModelNotReady)
_INFER_ERRORS = _responses(
    InvalidInput,
    Unauthorized,
    ModelNotFound,
    PayloadTooLarge,
    ImageTooLarge,
    UnsupportedImage,
    QueueFull,
    ModelNotReady,
    DeadlineExceeded,
    InferenceFailed,
)

_INFER_DESCRIPTION = f"""Classify a batch of images, batched with every other request (multipart, REST v2, gRPC).

The one input, `{INPUT_NAME}`, is either the model's tensor, UINT8 `[batch, H, W, C]` (see the model
metadata), or encoded image files as BYTES `[batch]` or `[batch, 1]`, decoded and resized as
`POST /predict` does. Send tensor data as JSON `data` (row-major, flat or nested) or, with the binary
tensor data extension, as raw bytes after the JSON header: set the `{HEADER_LENGTH}` header to the
header's length and each binary input's `parameters.binary_data_size` (BYTES elements each carry a
4-byte little-endian length). The output `{OUTPUT_NAME}` is FP32 `[batch, classes]`; ask for it with
`"parameters": {{"classification": k}}` for the k best classes as BYTES `"score:index:label"`, and with
`"binary_data": true` (or the request's `binary_data_output`) to get it as raw bytes after the JSON
answer. `id` is echoed; `parameters` are accepted (`timeout`, in microseconds, shortens the deadline).
Errors are `{{"error": "..."}}`."""

_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": V2InferRequest.model_json_schema(),
                "examples": {
                    "tensor": {
                        "summary": "One 8x8 greyscale image as a UINT8 tensor in JSON, the 3 best classes",
                        "value": {
                            "id": "req-1",
                            "inputs": [{"name": INPUT_NAME, "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": [0] * 64}],
                            "outputs": [{"name": OUTPUT_NAME, "parameters": {"classification": 3}}],
                        },
                    }
                },
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "example": "A JSON header of {HEADER_LENGTH} bytes, then the binary tensor data",
            },
        },
    }
}


def _add_model_routes(prefix: str) -> None:
    versioned = "{version}" in prefix
    suffix = " (a given version)" if versioned else " (the highest ready version)"

    if versioned:

        async def metadata_route(request: Request, model: ModelName, version: Version) -> JSONResponse:
            return _metadata(request, model, version)

        async def ready_route(request: Request, model: ModelName, version: Version) -> JSONResponse:
            return _ready(request, model, version)

        async def config_route(request: Request, model: ModelName, version: Version) -> JSONResponse:
            return _config(request, model, version)

        async def infer_route(request: Request, model: ModelName, version: Version) -> Response:
            return await _infer(request, model, version)
    else:

        async def metadata_route(request: Request, model: ModelName) -> JSONResponse:  # type: ignore[misc]
            return _metadata(request, model, None)

        async def ready_route(request: Request, model: ModelName) -> JSONResponse:  # type: ignore[misc]
            return _ready(request, model, None)

        async def config_route(request: Request, model: ModelName) -> JSONResponse:  # type: ignore[misc]
            return _config(request, model, None)

        async def infer_route(request: Request, model: ModelName) -> Response:  # type: ignore[misc]
            return await _infer(request, model, None)

    tag = "versioned" if versioned else "latest"
    models.add_api_route(
        prefix,
        metadata_route,
        methods=["GET"],
        response_model=V2ModelMetadata,
        summary="Model metadata: versions, platform, inputs and outputs" + suffix,
        responses=_READ_ERRORS,
        operation_id=f"v2_model_metadata_{tag}",
    )
    models.add_api_route(
        prefix + "/ready",
        ready_route,
        methods=["GET"],
        response_model=V2Ready,
        summary="Model ready: 200 when it can infer, 503 with Retry-After while loading or failed" + suffix,
        responses=_READ_ERRORS,
        operation_id=f"v2_model_ready_{tag}",
    )
    models.add_api_route(
        prefix + "/config",
        config_route,
        methods=["GET"],
        response_model=V2ModelConfig,
        summary="Model configuration (Triton's), with the batching settings in force" + suffix,
        responses=_READ_ERRORS,
        operation_id=f"v2_model_config_{tag}",
    )
    models.add_api_route(
        prefix + "/infer",
        infer_route,
        methods=["POST"],
        response_model=V2InferResponse,
        summary="Infer: classify a batch of images" + suffix,
        description=_INFER_DESCRIPTION,
        responses=_INFER_ERRORS,
        openapi_extra=_INFER_BODY,
        operation_id=f"v2_model_infer_{tag}",
    )


_add_model_routes("/{model}")
_add_model_routes("/{model}/versions/{version}")
