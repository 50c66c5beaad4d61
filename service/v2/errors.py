"""The protocol's own refusals, and how every ServiceError reads on each of its transports."""

from __future__ import annotations

import grpc

from ..errors import ServiceError


class InvalidInput(ServiceError):
    status_code = 400
    description = (
        "Malformed inference request: a header or JSON that does not parse, a tensor whose shape, datatype or "
        "data does not match, an unknown input or output, a bad classification count."
    )
    example = "input 'image': shape [1, 8, 8] does not match the model's [-1, 8, 8, 1] (UINT8) nor [-1] / [-1, 1] (BYTES)"


def rest_status(error: ServiceError) -> int:
    """The HTTP status of `error` on /v2: the protocol calls every malformed request 400, where /predict says 422."""
    return 400 if error.status_code == 422 else error.status_code


_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    # Too large is a limit, as gRPC's own refusal of an oversized message says (RESOURCE_EXHAUSTED).
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(error: ServiceError) -> grpc.StatusCode:
    """The gRPC status code matching `error`'s HTTP status."""
    return _GRPC_CODES.get(error.status_code, grpc.StatusCode.INTERNAL)
