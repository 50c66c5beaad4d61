"""Errors that carry their own HTTP status, answered as JSON `{"detail": ...}` by one handler."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error the client can act on; the class holds its status, an example and a description."""

    status_code = 500
    description = "Internal error: a bug, reported as JSON; the cause is in the service log."
    example = "internal server error"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        if headers is not None:
            self.headers = headers


class Unauthorized(ServiceError):
    status_code = 401
    description = "An API key is configured and the request's X-API-Key (or Bearer token) is missing or wrong."
    example = "missing or wrong API key: send it in the X-API-Key header"
    headers = {"WWW-Authenticate": "Bearer"}


class ModelNotFound(ServiceError):
    status_code = 404
    description = "Unknown model or version."
    example = "model 'cats' is not served (served models: digits)"


class PayloadTooLarge(ServiceError):
    status_code = 413
    description = "The request body or an image is too large."
    example = "request body is larger than the limit of 52428800 bytes"


class ImageTooLarge(PayloadTooLarge):
    example = "huge.png: 20000x20000 pixels is more than the limit of 40000000"


class UnsupportedImage(ServiceError):
    status_code = 415
    description = "A file is not a supported image; the detail names it."
    example = "notes.txt: not a readable image (UnidentifiedImageError)"


class BadRequest(ServiceError):
    status_code = 422
    description = "Malformed request: no files, too many files, a bad query parameter."
    example = "files: field required"


class ServiceUnavailable(ServiceError):
    status_code = 503
    description = "The model's queue is full or the model is not ready; retry after the Retry-After header (seconds)."
    example = "model 'digits' version 1 is busy: its queue is full; retry after 1 s"

    def __init__(self, detail: str, retry_after: int = 1):
        super().__init__(detail, headers={"Retry-After": str(max(1, int(retry_after)))})


class ModelNotReady(ServiceUnavailable):
    example = "model 'digits' version 2 is loading: not ready yet"


class QueueFull(ServiceUnavailable):
    pass


class OutOfMemory(ServiceUnavailable):
    description = "The service ran out of memory decoding an image: its problem, not the file's; retry later."
    example = "photo.png: the service ran out of memory decoding it; retry later"


class ModelFailed(ServiceError):
    status_code = 503
    description = (
        "The model version failed to load: only an operator can fix it, by fixing or replacing its file "
        "(GET /health says why). No Retry-After: retrying will not help until then."
    )
    example = "model 'digits' version 2 failed to load: an operator must fix or replace its file (GET /health says why)"


class DeadlineExceeded(ServiceError):
    status_code = 504
    description = "The request's deadline passed before its images ran; they were not run."
    example = "deadline of 30 s passed before the images ran; nothing was run"


class InferenceFailed(ServiceError):
    status_code = 500
    description = (
        "The model failed on the batch this request was in, or returned non-finite probabilities for one of "
        "this request's images; other requests are unaffected."
    )
    example = "inference failed for model 'digits' version 1; the cause is in the service log"


def error_responses(*errors: type[ServiceError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for these errors, each with its description and an example body."""
    from .schemas import ErrorResponse

    out: dict[int | str, dict[str, Any]] = {}
    for error in errors:
        entry = out.setdefault(
            error.status_code,
            {"model": ErrorResponse, "description": error.description, "content": {"application/json": {"examples": {}}}},
        )
        if error.description not in entry["description"]:
            entry["description"] += " " + error.description
        examples = entry["content"]["application/json"]["examples"]
        examples[error.__name__] = {"summary": error.description, "value": {"detail": error.example}}
        headers = {"Retry-After": "Seconds to wait before retrying."} if issubclass(error, ServiceUnavailable) else {}
        headers.update({name: f"{name} header." for name in error.headers or {}})
        for name, text in headers.items():
            entry.setdefault("headers", {})[name] = {"schema": {"type": "string"}, "description": text}
    return out


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return service_error_response(exc, request.method, request.url.path)


def service_error_response(exc: ServiceError, method: str, path: str) -> JSONResponse:
    """The answer to a ServiceError: `{"detail": ...}` with its status and headers; server faults are logged."""
    if exc.status_code >= 500 and not isinstance(exc, (ServiceUnavailable, DeadlineExceeded)):
        log.error("%s on %s %s: %s", type(exc).__name__, method, path, exc.detail)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path"))
    if "Expected UploadFile" in str(error.get("msg", "")):
        # A multipart part without a filename arrives as a text field, not as a file.
        return f"{location} is a text field, not a file: send each image as a file part (curl -F files=@photo.jpg)"
    return f"{location}: {error.get('msg', 'invalid')}" if location else str(error.get("msg", "invalid"))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # A readable sentence in `detail`, the structured list beside it for programs.
    errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
    detail = "; ".join(_describe(e) for e in errors) or "malformed request"
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    detail = exc.detail
    if status == 400 and request.url.path.startswith("/predict/"):
        # FastAPI answers 400 for a body it cannot parse as multipart; the API calls that malformed: 422.
        status, detail = 422, "malformed request: the body is not valid multipart/form-data"
    return JSONResponse({"detail": detail}, status_code=status, headers=getattr(exc, "headers", None))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_error_response(request.method, request.url.path)


def unexpected_error_response(method: str, path: str) -> JSONResponse:
    """The answer to a bug, called while its exception is handled: the cause goes to the log, never to the client."""
    log.exception("unhandled error on %s %s", method, path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types every handler as taking any Exception; each of these takes the class it is registered for.
    app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
