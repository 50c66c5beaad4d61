"""POST /predict/{model} for the common upload, without the framework's form machinery.

FastAPI's dependency solving, Starlette's form parser (a spooled temporary file per part, written
through a thread pool) and the request validation were about half of the event loop's time per
request for small images. The common request (multipart/form-data parts named `files`, a declared
length under `FAST_MAX_BYTES`, `top_k` and `version` absent or plain positive integers) is read
and split here with python-multipart's own parser, and answered by the same `predict` the route
calls. Anything else goes on to the route unchanged, with the body replayed when it was already
read, so every malformed request gets the route's own 422 and the route stays the one documented
in OpenAPI.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .dataplane import EncodedImage
from .errors import ServiceError, service_error_response, unexpected_error_response
from .middleware import authorised, first_headers, positive_int
from .routes import predict

if TYPE_CHECKING:
    from .dataplane import DataPlane

log = logging.getLogger(__name__)

# Larger bodies stream through the route, which spools big parts to disk rather than hold them twice.
FAST_MAX_BYTES = 1 << 20
# Starlette refuses more parts than this per form; such a request goes to the route for that answer.
_MAX_PARTS = 1000
_DEFAULT_TOP_K = 5


class _TooManyParts(Exception):
    """More parts than Starlette's form parser accepts: the route refuses it without splitting them all."""


def _query(scope: Scope) -> tuple[int, int | None] | None:
    """(top_k, version) when the query holds nothing the route would refuse or read differently."""
    top_k: int | None = _DEFAULT_TOP_K
    version: int | None = None
    seen: set[str] = set()
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
        if key in seen and key in ("top_k", "version"):
            return None
        seen.add(key)
        if key == "top_k":
            top_k = positive_int(value)
            if top_k is None:
                return None
        elif key == "version":
            version = positive_int(value)
            if version is None:
                return None
    assert top_k is not None
    return top_k, version


def _decode_text(value: bytes, charset: str) -> str:
    # As Starlette reads a part's name and filename: the form's charset, else latin-1.
    try:
        return value.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return value.decode("latin-1")


class _Parts:
    """python-multipart callbacks that keep each part's name, filename (None for a text field) and bytes."""

    def __init__(self, charset: str):
        self.charset = charset
        self.parts: list[tuple[str, str | None, bytes]] = []
        self.valid = True
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._data: list[bytes] = []

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._begin,
            "on_part_data": self._part_data,
            "on_part_end": self._end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
        }

    def _begin(self) -> None:
        if len(self.parts) >= _MAX_PARTS:
            raise _TooManyParts()
        self._disposition = b""
        self._data = []

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(data[start:end])

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _end(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            self.valid = False  # the route answers this one
            return
        filename = options.get(b"filename")
        self.parts.append(
            (
                _decode_text(name, self.charset),
                None if filename is None else _decode_text(filename, self.charset),
                b"".join(self._data),
            )
        )


class FastPredict:
    """ASGI middleware in front of the routes: answers the common POST /predict/{model} itself.

    It sits inside the prediction gate (admission, the API key, metrics, disconnects) and the body
    size limit, so it sees only authorised requests already admitted, and a body already limited.
    """

    def __init__(self, app: ASGIApp, dataplane: DataPlane, api_key: str | None):
        self.app = app
        self.dataplane = dataplane
        self.limit = min(FAST_MAX_BYTES, dataplane.settings.max_upload_bytes)
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = self._eligible(scope)
        if request is None:
            await self.app(scope, receive, send)
            return
        name, boundary, charset, top_k, version = request
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client hung up mid-upload: nobody to answer (the gate counts it 499)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        parts = _Parts(charset)
        try:
            parser = MultipartParser(boundary, parts.callbacks())  # type: ignore[arg-type]
            parser.write(body)
            parser.finalize()
        except Exception:
            parts.valid = False
        files = [
            EncodedImage(filename or f"file{i}", data)
            for i, (field, filename, data) in enumerate(p for p in parts.parts if p[0] == "files")
            if filename is not None
        ]
        texts = any(field == "files" and filename is None for field, filename, _ in parts.parts)
        if not parts.valid or not files or texts:
            await self.app(scope, _replay(body, receive), send)  # the route's own answer to the unusual request
            return
        try:
            response = await predict(self.dataplane, name, version, files, top_k, scope)
        except ServiceError as exc:
            response = service_error_response(exc, scope.get("method", "POST"), scope.get("path", ""))
        except Exception:
            response = unexpected_error_response(scope.get("method", "POST"), scope.get("path", ""))
        await response(scope, receive, send)

    def _eligible(self, scope: Scope) -> tuple[str, bytes, str, int, int | None] | None:
        """What the fast path needs, when this request is one it answers; None sends it to the routes."""
        if scope["type"] != "http" or scope.get("method") != "POST":
            return None
        path: str = scope.get("path", "")
        if not path.startswith("/predict/"):
            return None
        name = path[len("/predict/") :]
        if not name or "/" in name:
            return None
        headers = first_headers(scope)
        declared = headers.get(b"content-length")
        if declared is None or not declared.isdigit() or int(declared) > self.limit:
            return None
        if not authorised(headers, self.api_key):
            return None  # the route answers 401 as it documents it
        kind, params = parse_options_header(headers.get(b"content-type", b""))
        boundary = params.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            return None
        query = _query(scope)
        if query is None:
            return None
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        try:
            charset = codecs.lookup(charset).name
        except (LookupError, ValueError):
            charset = "latin-1"
        return name, boundary, charset, query[0], query[1]


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` once, then whatever the server says next (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
