"""The control channel between a front end and the owner: small JSON messages over a Unix socket.

Images and probabilities never travel here (they are in shared memory, service/shm.py); a message
carries a request's id, model, version, deadline and where its images are. Each message is a
4-byte big-endian length and that many bytes of JSON.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import errors
from .errors import InferenceFailed, ServiceError, ServiceUnavailable

Message = dict[str, Any]
_HEADER = struct.Struct("!I")
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a snapshot of a large repository; anything bigger is a broken peer


@dataclass(frozen=True)
class RunFolder:
    """The folder the service makes at start for its processes to meet in, removed when it stops."""

    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "owner.sock"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def board(self) -> Path:
        return self.root / "board"

    def arena(self, index: int) -> Path:
        return self.root / f"arena-{index}"


class OwnerUnavailable(ServiceUnavailable):
    description = "The process that runs the models is restarting; retry after the Retry-After header (seconds)."
    example = "the inference process is not running (restarting); retry after 1 s"


def encode(message: Message) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


async def read(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None when the peer closed the connection."""
    try:
        header = await reader.readexactly(_HEADER.size)
        (length,) = _HEADER.unpack(header)
        if length > MAX_MESSAGE_BYTES:
            raise ConnectionError(f"a control message of {length} bytes is over the limit")
        message: Message = json.loads(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None
    return message


def read_blocking(sock: socket.socket) -> Message:
    """One message from a blocking socket; ConnectionError when it closes first."""

    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("the owner closed the control connection")
            data += chunk
        return data

    (length,) = _HEADER.unpack(exactly(_HEADER.size))
    message: Message = json.loads(exactly(length))
    return message


def error_message(exc: ServiceError) -> Message:
    """A ServiceError as the owner sends it back, to be raised again in the front end."""
    return {"type": type(exc).__name__, "detail": exc.detail, "headers": exc.headers or {}}


def service_error(message: Message) -> ServiceError:
    """The ServiceError the owner raised, rebuilt with its class, detail and Retry-After."""
    kind = getattr(errors, str(message.get("type")), None)
    detail = str(message.get("detail", "the inference process failed"))
    if not (isinstance(kind, type) and issubclass(kind, ServiceError)):
        return InferenceFailed(detail)
    if issubclass(kind, ServiceUnavailable):
        return kind(detail, retry_after=int(message.get("headers", {}).get("Retry-After", 1)))
    return kind(detail)
