"""A front end's view of the owner's models: a mirrored registry whose batchers are stand-ins.

With `--frontends N` every front end builds the same app as the single process (routes, data
plane, middleware), with a `MirrorRegistry` in place of the Registry: it holds a copy of the
owner's registry (refreshed from snapshots), and each ready version's batcher is a
`RemoteBatcher` with the Batcher's interface. `infer()` decodes the request's images in this
process, writes them into this front end's shared-memory arena, and asks the owner to run them;
`check_room()` reads the owner's queue from the board, so a full queue is refused before the
request's body is read. While the owner is away, every prediction, /health and /models/{model}
answer 503 with Retry-After, and the requests it held fail with the same 503 at once.

Front ends share one listening socket: a request a load balancer sends because one front end
answered /health 200 may be taken by any of them. So a front end answers ready only when every
front end of the service forwards predictions to the owner, as the owner's snapshots list them
(each front end tells the owner once it can, over its control connection); until then a front end
that has just started, or has not reconnected to a new owner yet, would answer predictions 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from kos_core.artifact import ModelMetadata

from . import channel
from .batcher import HELD, Batcher, Work, decode_all
from .channel import Message, OwnerUnavailable, RunFolder
from .errors import DeadlineExceeded, PayloadTooLarge, QueueFull
from .metrics import Metrics
from .model_settings import ModelSettingsError, model_settings
from .registry import Registry, ServedModel
from .runtime import CPU, Device
from .settings import Settings
from .shm import Allocator, Board, Mapping

log = logging.getLogger(__name__)

STATUS_INTERVAL_S = 0.5
RECONNECT_INTERVAL_S = 0.1
OWNER_WAIT_INTERVAL_S = 0.05
WAITING = Device((CPU,), "waiting for the inference process to answer")
_AWAY = "the inference process is not running (it is being restarted); retry after 1 s"


@dataclass(eq=False)
class MirroredModel(ServedModel):
    """A version as the owner reported it; it has no sessions here."""

    mirrored_providers: list[str] = field(default_factory=list)
    generation: int = 0

    @property
    def providers(self) -> list[str]:
        return self.mirrored_providers


class OwnerLink:
    """This front end's control connection to the owner, with its arena; reconnects when the owner comes back."""

    def __init__(self, folder: RunFolder, index: int, on_snapshot: Callable[[Message], None]):
        self.folder = folder
        self.index = index
        self.arena_path = folder.arena(index)
        self.arena = Mapping(self.arena_path)
        self.allocator = Allocator(self.arena.size)
        self.up = False
        self._on_snapshot = on_snapshot
        self._sock: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._ids = itertools.count(1)
        self._was_up = False
        self._announced = False  # told the owner on this connection that predictions go through it

    def _hello(self) -> bytes:
        return channel.encode({"op": "hello", "id": 0, "arena": self.arena_path.name})

    def connect_blocking(self, timeout_s: float) -> bool:
        """Connect and take the first snapshot before serving (called off the event loop); False if the owner is away."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(str(self.folder.socket))
            sock.sendall(self._hello())
            reply = channel.read_blocking(sock)
        except OSError:
            sock.close()
            return False
        sock.settimeout(None)
        self._on_snapshot(reply["snapshot"])
        self._sock, self.up, self._was_up = sock, True, True
        return True

    async def run(self) -> None:
        """Keep the connection: read answers, ask for snapshots, and reconnect whenever it is lost."""
        while True:
            poller: asyncio.Task[None] | None = None
            try:
                if self._sock is not None:
                    sock, self._sock = self._sock, None
                    reader, writer = await asyncio.open_unix_connection(sock=sock)
                else:
                    reader, writer = await asyncio.open_unix_connection(str(self.folder.socket))
                    writer.write(self._hello())
                self._writer, self._announced = writer, False
                if self.up:
                    self._announce()  # the connection of connect_blocking: its snapshot is in already
                poller = asyncio.get_running_loop().create_task(self._poll(writer))
                while (message := await channel.read(reader)) is not None:
                    self._received(message)
            except (OSError, ValueError):
                pass
            finally:
                if poller is not None:
                    poller.cancel()
                self._lost()
            await asyncio.sleep(RECONNECT_INTERVAL_S)

    def _received(self, message: Message) -> None:
        if "snapshot" in message:
            self._on_snapshot(message["snapshot"])
            if not self.up and self._was_up:
                log.info("the inference process answers again")
            self.up = self._was_up = True
            self._announce()
            return
        future = self._pending.pop(message["id"], None)
        if future is not None and not future.done():
            future.set_result(message)

    def _announce(self) -> None:
        """Tell the owner, once per connection, that this front end has its snapshot and sends predictions to it."""
        if self._writer is not None and not self._announced:
            self._announced = True
            self._writer.write(channel.encode({"op": "serving", "id": 0, "index": self.index}))

    async def _poll(self, writer: asyncio.StreamWriter) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            writer.write(channel.encode({"op": "status", "id": 0}))

    def _lost(self) -> None:
        if self.up and self._was_up:
            log.error("lost the inference process: answering 503 until it is back")
        self.up = False
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(OwnerUnavailable(_AWAY))

    def request(self, message: Message) -> tuple[int, asyncio.Future[Message]]:
        """Send `message` with a new id; the future gets the owner's answer, or OwnerUnavailable."""
        if not self.up or self._writer is None:
            raise OwnerUnavailable(_AWAY)
        key = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        self._writer.write(channel.encode({**message, "id": key}))
        return key, future

    def cancel(self, key: int) -> None:
        """Ask the owner to drop a request; its answer still comes (and frees its region)."""
        if self._writer is not None:
            self._writer.write(channel.encode({"op": "cancel", "id": key}))

    def leave(self) -> None:
        """Stop as the front end stops: nothing is lost, so nothing is logged as lost."""
        self.up = self._was_up = False

    def close(self) -> None:
        self.leave()
        self._lost()
        if self._sock is not None:
            self._sock.close()
        self.arena.close()


class RemoteBatcher:
    """The Batcher's interface for the data plane (`infer`, `check_room`), run by the owner's batcher."""

    def __init__(
        self,
        link: OwnerLink,
        board: Board,
        served: MirroredModel,
        slot: int,
        metrics: Metrics,
        decode_pool: Executor,
        clock: Callable[[], float] = time.monotonic,
    ):
        assert served.metadata is not None, "only ready versions have a batcher"
        self.name, self.version = served.name, served.version
        self.input_shape = served.metadata.input_shape
        self.classes = len(served.metadata.labels)
        self._link, self._board = link, board
        self._slot, self._generation = slot, served.generation
        self._metrics = metrics
        self._decode_pool = decode_pool
        self._clock = clock
        # Images of requests this front end admitted before reading their bodies and has not sent to the
        # owner yet: the board cannot show them, and without them every request that arrives while a
        # place is free would be admitted, parsed and decoded, only to be refused by the owner.
        self._admitted = 0

    def start(self) -> None:
        """Nothing to start here: the owner's batcher gathers."""

    @property
    def healthy(self) -> bool:
        """Liveness of the owner's batcher is the owner's concern; while it is away, predictions answer 503."""
        return True

    @property
    def depth(self) -> int:
        state = self._board.read(self._slot, self._generation) if self._generation else None
        return state[0] if state else 0

    def check_room(self, count: int) -> None:
        """Raise QueueFull when the owner's queue for this version has no room for `count` more images now."""
        state = self._board.read(self._slot, self._generation) if self._generation else None
        if state is None:
            return  # not on the board: the owner's own check answers
        depth, retry_after, queue_size = state
        own = HELD.get()
        taken = depth + self._admitted - (own.count if isinstance(own, _Hold) and own.batcher is self and own.held else 0)
        if taken + count > queue_size:
            raise QueueFull(
                f"model {self.name!r} version {self.version} is busy: {taken} of its {queue_size} queue "
                f"places are taken; retry after {retry_after} s",
                retry_after=retry_after,
            )

    def hold(self, count: int) -> Callable[[], None]:
        """check_room(count), and count the places as taken until the request's images reach the owner."""
        self.check_room(count)
        self._admitted += count
        return _Hold(self, count)

    async def infer(self, work: Work, deadline: float, protocol: str = "") -> np.ndarray:
        """Rows for every image of one request, in order, run by the owner; raises what the owner's batcher raises."""
        count = len(work)
        if self._clock() > deadline:
            self._metrics.expired.labels(self.name).inc(count)
            raise DeadlineExceeded(
                f"the request's deadline passed before its images ran on model {self.name!r} version {self.version}; "
                "nothing was run"
            )
        images = work if isinstance(work, np.ndarray) else await decode_all(self._decode_pool, work)
        shape = (count, *self.input_shape)
        need = max(math.prod(shape), count * self.classes * 4)
        allocator, arena = self._link.allocator, self._link.arena
        if need > allocator.size:
            raise PayloadTooLarge(
                f"{count} images of {shape[1]}x{shape[2]}x{shape[3]} need {need} bytes of shared memory, more than a "
                f"front end's {allocator.size}: send them in several requests"
            )
        offset = allocator.alloc(need)
        if offset is None:
            raise QueueFull("this front end's shared memory for images in flight is full; retry after 1 s", retry_after=1)
        try:
            target = arena.view(offset, np.uint8, shape)
            for i, image in enumerate(images):
                target[i] = image
            del target
            key, future = self._link.request(
                {
                    "op": "infer",
                    "model": self.name,
                    "version": self.version,
                    "count": count,
                    "shape": list(shape),
                    "offset": offset,
                    "capacity": need,
                    "deadline": deadline,
                    "protocol": protocol,
                }
            )
        except BaseException:
            allocator.free(offset)
            raise
        release = HELD.get()
        if release is not None:
            release()  # the owner counts the images from now on (the board shows them within milliseconds)
        try:
            reply = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The client went away: the owner drops what has not started; the region is free once it says so.
            self._link.cancel(key)
            future.add_done_callback(lambda f: _free_when_answered(f, allocator, offset))
            raise
        except BaseException:
            allocator.free(offset)
            raise
        try:
            if "error" in reply:
                raise channel.service_error(reply["error"])
            return arena.view(offset, np.float32, tuple(reply["rows"])).copy()
        finally:
            allocator.free(offset)


class _Hold:
    """Queue places a request was admitted to before its body was read, until its images reach the owner."""

    def __init__(self, batcher: RemoteBatcher, count: int):
        self.batcher, self.count, self.held = batcher, count, True

    def __call__(self) -> None:
        if self.held:
            self.held = False
            self.batcher._admitted -= self.count


def _free_when_answered(future: asyncio.Future[Message], allocator: Allocator, offset: int) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so that a lost owner's 503 is not logged as never retrieved
    allocator.free(offset)


class MirrorRegistry(Registry):
    """The owner's registry as this front end sees it; see the module's docstring."""

    def __init__(
        self, settings: Settings, device: Device, metrics: Metrics, decode_pool: Executor, *, folder: RunFolder, index: int
    ):
        super().__init__(settings, device, metrics, decode_pool)
        self._decode_pool = decode_pool
        self.board = Board(folder.board)
        self.link = OwnerLink(folder, index, self._apply)
        self._task: asyncio.Task[None] | None = None
        self._stop_waiting = threading.Event()
        self.serving: set[int] = set()  # the front ends that forward predictions to the owner, by its last snapshot

    def load_all(self) -> None:
        """Wait (off the event loop) until the owner has loaded its models and answers; probes say "loading" meanwhile."""
        while not self._stop_waiting.is_set():
            if self.link.connect_blocking(timeout_s=5.0):
                return
            self._stop_waiting.wait(OWNER_WAIT_INTERVAL_S)

    def stop_waiting(self) -> None:
        """The front end is stopping: stop waiting for the owner (safe from a signal handler)."""
        self._stop_waiting.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.link.run(), name="owner-link")

    async def refresh(self) -> list[str]:
        return []  # the owner scans the repository; its snapshots bring the changes here

    async def close(self) -> None:
        self.link.leave()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.link.close()
        self.board.close()

    def ready(self, strict: bool = False) -> bool:
        return self.unavailable() is None and super().ready(strict)

    def unavailable(self) -> str | None:
        """Why a request to this service may be refused now although the owner's models are ready, or None.

        Any front end may take a request from the shared socket: ready only when every one of them
        (this one included) has told the owner it forwards predictions over its current connection.
        """
        if not self.link.up:
            return "the inference process is not answering (it is being restarted)"
        missing = [i for i in range(self.settings.frontends) if i not in self.serving]
        if missing:
            which = ", ".join(str(i) for i in missing)
            return (
                f"front end{'s' if len(missing) > 1 else ''} {which} of {self.settings.frontends} not connected to the "
                "inference process yet: a request it takes would be refused"
            )
        return None

    def all(self) -> list[ServedModel]:
        return super().all() if self.link.up else []

    def versions(self, name: str) -> list[ServedModel]:
        self._require_owner()
        return super().versions(name)

    def get(self, name: str, version: int | None = None) -> ServedModel:
        self._require_owner()
        return super().get(name, version)

    def _require_owner(self) -> None:
        # Before the owner first answered, the service is loading its models: the Registry says so (503).
        if not self.link.up and not self.loading:
            raise OwnerUnavailable(_AWAY)

    def _apply(self, snapshot: Message) -> None:
        """Take a snapshot of the owner's registry; versions that did not change keep their objects."""
        device = snapshot["device"]
        self.device = Device(tuple(device["providers"]), device["reason"])
        models: dict[str, dict[int, ServedModel]] = {}
        for entry in snapshot["models"]:
            current = self.models.get(entry["name"], {}).get(entry["version"])
            if isinstance(current, MirroredModel) and current.generation == entry["generation"] and self._same(current, entry):
                mirrored = current
            else:
                mirrored = self._mirror(entry)
            models.setdefault(mirrored.name, {})[mirrored.version] = mirrored
        self.models = models
        self.serving = set(snapshot.get("frontends", []))
        self.loading = False  # the owner has loaded its models before it answers

    @staticmethod
    def _same(current: MirroredModel, entry: dict[str, Any]) -> bool:
        return bool(current.state == entry["state"] and current.error == entry["error"] and current.path == Path(entry["path"]))

    def _mirror(self, entry: dict[str, Any]) -> MirroredModel:
        name, version = entry["name"], entry["version"]
        overrides: dict[str, object] = entry["overrides"]
        settings: Settings | None = None
        if entry.get("settings") is not None:
            settings = Settings.model_validate(entry["settings"])
        else:
            with contextlib.suppress(ModelSettingsError):
                settings = model_settings(self.settings, overrides, f"{name}/settings.toml")
        mirrored = MirroredModel(
            name=name,
            version=version,
            path=Path(entry["path"]),
            state=entry["state"],
            error=entry["error"],
            metadata=ModelMetadata.model_validate(entry["metadata"]) if entry["metadata"] else None,
            at_start=entry["at_start"],
            settings=settings,
            overrides=overrides,
            mirrored_providers=list(entry["providers"]),
            generation=entry["generation"],
            ms_per_image=entry.get("ms_per_image"),
        )
        if mirrored.state == "ready" and mirrored.metadata is not None:
            remote = RemoteBatcher(self.link, self.board, mirrored, entry["slot"], self.metrics, self._decode_pool)
            # A stand-in with the Batcher's interface where the data plane uses it (infer, check_room).
            mirrored.batcher = cast(Batcher, remote)
        return mirrored
