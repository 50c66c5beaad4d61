"""Pure ASGI middleware: the upload size limit while the body is read, and per-request metrics."""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kos_core.layout import is_version

from .batcher import HELD
from .errors import ServiceError

if TYPE_CHECKING:
    from .dataplane import DataPlane

ARRIVAL_KEY = "kos.arrival"


class BodySizeLimit:
    """Answer 413 as soon as a request body passes `max_bytes`, counted while it arrives.

    A declared Content-Length over the limit is refused before any of the body is read; a chunked
    body is counted as it streams in, and the application sees a disconnect at the limit, so the
    rest is never buffered. Also stamps each request's arrival time for its deadline.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVAL_KEY] = time.monotonic()
        declared = first_headers(scope).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, scope)
            return
        received = 0
        refused = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not response_started:
                        await self._refuse(send, scope)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return  # the 413 already went out; whatever the app answers to the disconnect is dropped
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _refuse(self, send: Send, scope: Scope) -> None:
        # The Open Inference Protocol's errors are {"error": ...}; the service's own, {"detail": ...}.
        key = "error" if scope.get("path", "").startswith("/v2/") else "detail"
        body = json.dumps({key: f"request body is larger than the limit of {self.max_bytes} bytes"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def prediction_route(scope: Scope) -> tuple[str, int | None, str] | None:
    """(model, version, protocol) when the request is a prediction: POST /predict/{model} or a v2 infer."""
    path = scope.get("path", "")
    if path.startswith("/predict/"):
        version = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("version", [None])[0]
        return (
            path[len("/predict/") :],
            positive_int(version),
            "multipart",
        )
    match = _V2_INFER.fullmatch(path)
    if match:
        return match["model"], positive_int(match["version"]), "v2-rest"
    return None


_V2_INFER = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>\d+))?/infer")


async def _send_json(send: Send, status: int, body: bytes, headers: dict[str, str] | None) -> None:
    """A whole JSON answer in two ASGI messages."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _discard_body(receive: Receive) -> None:
    """Read what is left of a refused request's body, unparsed, so its keep-alive connection stays usable."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class PredictionGate:
    """In front of every prediction route: refuse early what can be refused, and count and time each request.

    Refusing before the body is read is what keeps shedding load cheap: under a flood against a full
    queue, a 503 costs a path lookup, not a multipart parse. Only a request that passes the API-key
    check is refused here (404, 503), so an unauthenticated client learns nothing about the models;
    the others go on to the routes, which answer 401. Client-chosen names stay out of the metrics'
    label set: unknown ones share one label.
    """

    def __init__(self, app: ASGIApp, dataplane: DataPlane, api_key: str | None):
        self.app = app
        self.dataplane = dataplane
        self.metrics = dataplane.metrics
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = prediction_route(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        name, version, protocol = route
        label = name if name in self.dataplane.registry.models else "_unknown"
        status = 0
        gone = False  # the client hung up before the answer: whatever the app made of the cut body, it is a 499
        started = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        current = asyncio.current_task()
        watcher: asyncio.Task[None] | None = None
        hung_up = False  # the watcher cancelled the request because its client went away

        async def watch() -> None:
            # Once the body is read the app never asks for another message: this asks, and the server
            # answers only when the response is complete or the client has gone.
            nonlocal gone, hung_up
            message = await receive()
            if message["type"] == "http.disconnect" and not status and current is not None:
                gone = hung_up = True
                current.cancel(msg="the client went away")

        async def watching_receive() -> Message:
            nonlocal gone, watcher
            message = await receive()
            if message["type"] == "http.disconnect" and not status:
                gone = True
            elif message["type"] == "http.request" and not message.get("more_body", False) and watcher is None:
                # A client that hangs up while its request waits for the model: its images leave the queue unrun.
                watcher = asyncio.get_running_loop().create_task(watch())
            return message

        self.metrics.in_progress.inc()
        release: Callable[[], None] | None = None
        try:
            refusal, release = self._refusal(scope, name, version, protocol)
            if refusal is not None:
                await _send_json(recording_send, *refusal)
                await _discard_body(receive)
            else:
                HELD.set(release)
                await self.app(scope, watching_receive, recording_send)
        except asyncio.CancelledError:
            gone = gone or not status
            if not (hung_up and current is not None and current.uncancel() == 0):
                raise  # cancelled by someone else (the server stopping): not ours to swallow
        except ClientDisconnect:
            gone = gone or not status
            raise
        finally:
            if release is not None:
                release()
            if watcher is not None:
                watcher.cancel()
            self.metrics.in_progress.dec()
            self.metrics.observe_request(label, 499 if gone else status or 500, protocol, time.perf_counter() - started)

    def _refusal(
        self, scope: Scope, name: str, version: int | None, protocol: str
    ) -> tuple[tuple[int, bytes, dict[str, str] | None] | None, Callable[[], None] | None]:
        """The refusal to answer now (status, JSON body, headers), or what gives back the queue place its admission holds."""
        if scope.get("method") != "POST" or not authorised(first_headers(scope), self.api_key):
            return None, None
        try:
            return None, self.dataplane.hold(name, version, 1)
        except ServiceError as exc:
            # Built here rather than by a Response object: under a flood, refusing is most of the loop's work.
            key = b'{"error":' if protocol == "v2-rest" else b'{"detail":'
            return (exc.status_code, key + json.dumps(exc.detail).encode() + b"}", exc.headers), None


_HEADERS_KEY = "kos.headers"


def first_headers(scope: Scope) -> dict[bytes, bytes]:
    """The request's headers by name, the first of a repeated one winning, as Starlette reads them for the routes.

    Built once per request and kept in its scope: the gate, the size limit and the fast path all read them.
    """
    headers: dict[bytes, bytes] | None = scope.get(_HEADERS_KEY)
    if headers is None:
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)
        scope[_HEADERS_KEY] = headers
    return headers


def positive_int(value: str | None) -> int | None:
    """`value` as a number when it is a positive integer as the core reads version names (`is_version`), else None:
    anything else (0, "²", 5,000 digits) is the route's to refuse."""
    return int(value) if value and is_version(value) else None


def authorised(headers: dict[bytes, bytes], api_key: str | None) -> bool:
    """Whether a request with these headers may use the protected routes: no key configured, or the right one given.

    The header is read as the routes read it (latin-1, as HTTP headers are), so both judge a key alike.
    """
    if not api_key:
        return True
    given = headers.get(b"x-api-key")
    if given is None:
        bearer = headers.get(b"authorization", b"")
        given = bearer[7:] if bearer[:7].lower() == b"bearer " else None
    # Constant-time comparison: the answer's timing must not reveal how much of the key matched.
    return given is not None and hmac.compare_digest(given.decode("latin-1").encode(), api_key.encode())
