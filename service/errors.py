"""Errors that carry their own HTTP status, answered as JSON `{"detail": ...}` by one handler."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

log = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500
    headers: dict[str, str] | None = None

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class ModelNotFound(ServiceError):
    status_code = 404


class PayloadTooLarge(ServiceError):
    status_code = 413


class ImageTooLarge(PayloadTooLarge):
    pass


class UnsupportedImage(ServiceError):
    status_code = 415


class BadRequest(ServiceError):
    status_code = 422


class ModelNotReady(ServiceError):
    status_code = 503

    def __init__(self, detail: str, retry_after: int = 5):
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The cause goes to the log, never to the client.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(Exception, _unexpected_error)
