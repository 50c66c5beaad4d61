"""The owner of the models: with `--frontends N`, the one process that holds the sessions and batchers.

Front ends (service/mirror.py) connect over a Unix socket. Each says where its shared-memory arena
is; then, per request, it writes the decoded images into its arena and sends the region, the model,
the version and the deadline. The owner hands a view of those images to the version's own Batcher,
so one batch gathers images from every front end, and writes the probabilities back over the
images. Errors travel back as the ServiceError the Batcher or Registry raised. The owner also
answers snapshots of its registry (for /health and /models in every front end) and publishes each
version's queue on the board (service/shm.py) every few milliseconds.

Each snapshot also lists the front ends that forward predictions to this owner now: a front end
says so over its control connection once it can, and drops off the list when that connection
closes. Front ends share one listening socket, so any of them may take a request a load balancer
sent because another answered /health: a front end answers ready only when every front end is on
the list (service/mirror.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import warnings
from typing import Any

import numpy as np

from . import channel
from .batcher import BatcherClosed
from .channel import Message, RunFolder
from .errors import InferenceFailed, ServiceError
from .metrics import Metrics
from .registry import Registry, ServedModel
from .runtime import Device, DeviceUnavailable
from .settings import Settings
from .shm import BOARD_SLOTS, Board, Mapping
from .startup import prepare_process

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 0.005
_SWAP_RETRIES = 3
EXIT_STARTUP_FAILED = 3


def snapshot_of(registry: Registry, slots: dict[ServedModel, tuple[int, int]], frontends: list[int] | None = None) -> Message:
    """What front ends mirror: the device, every version's state, metadata and board slot, and the front ends serving."""
    models = []
    for served in registry.all():
        slot, generation = slots.get(served, (0, 0))
        models.append(
            {
                "name": served.name,
                "version": served.version,
                "path": str(served.path),
                "state": served.state,
                "error": served.error,
                "providers": served.providers,
                "metadata": served.metadata.model_dump(mode="json") if served.metadata else None,
                "overrides": served.overrides,
                # The settings in force, "auto" resolved at load: what /models and ModelConfig show.
                "settings": served.settings.model_dump(mode="json") if served.settings else None,
                "ms_per_image": served.ms_per_image,
                "at_start": served.at_start,
                "slot": slot,
                "generation": generation,
            }
        )
    device = registry.device
    return {
        "device": {"providers": list(device.providers), "reason": device.reason},
        "models": models,
        "frontends": sorted(frontends or []),
    }


class Owner:
    """The registry, served to front ends over the control channel; see the module's docstring."""

    def __init__(self, settings: Settings, device: Device, folder: RunFolder):
        self.settings = settings
        self.folder = folder
        self.registry = Registry(settings, device, Metrics(multiprocess_dir=folder.metrics))
        self.board = Board(folder.board)
        self._arenas: dict[str, Mapping] = {}
        self._slots: dict[ServedModel, tuple[int, int]] = {}
        self._generations = 0
        self._links = 0
        self._writers: set[asyncio.StreamWriter] = set()  # front ends that said hello, for snapshots pushed on change
        # Front ends that said they forward predictions, by their control connection: index of each.
        self._serving: dict[asyncio.StreamWriter, int] = {}
        self._shown: tuple[object, ...] = ()
        self._no_links = asyncio.Event()
        self._no_links.set()
        self._stop = asyncio.Event()

    async def run(self) -> int:
        """Load the models, serve front ends until SIGTERM, then finish what is queued; the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await asyncio.to_thread(self.registry.load_all)
        self.registry.start()
        tasks = [loop.create_task(self._publish())]
        if self.settings.watch_interval_s > 0:
            tasks.append(loop.create_task(self.registry.watch(self.settings.watch_interval_s)))
        # Bound under another name and renamed, so the socket appears only once it accepts.
        pending = self.folder.socket.with_suffix(".new")
        pending.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._serve, path=str(pending))
        os.replace(pending, self.folder.socket)
        ready = sum(m.state == "ready" for m in self.registry.all())
        log.info(
            "inference process serving %d of %d model versions from %s", ready, len(self.registry.all()), self.settings.repository
        )
        await self._stop.wait()
        # The supervisor stops the front ends first; their control connections close as they finish.
        server.close()
        try:
            await asyncio.wait_for(self._no_links.wait(), self.settings.shutdown_timeout_s)
            clean = True
        except TimeoutError:
            clean = False
            log.error("front ends still connected after --shutdown-timeout-s; stopping anyway")
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.registry.close()
        for arena in self._arenas.values():
            arena.close()
        self.board.close()
        return 0 if clean else 1

    # -- the board -------------------------------------------------------------------------------

    def _slot(self, served: ServedModel) -> tuple[int, int]:
        if served not in self._slots:
            taken = {slot for slot, _ in self._slots.values()}
            slot = next((s for s in range(BOARD_SLOTS) if s not in taken), None)
            if slot is None:
                return (0, 0)  # more versions than slots: front ends then leave the queue check to the owner
            self._generations += 1
            self._slots[served] = (slot, self._generations)
        return self._slots[served]

    async def _publish(self) -> None:
        while True:
            live = set()
            for served in self.registry.all():
                batcher = served.batcher
                if batcher is None:
                    continue
                live.add(served)
                slot, generation = self._slot(served)
                if generation:
                    self.board.publish(slot, generation, batcher.depth, batcher.retry_after(), batcher.queue_size)
            for gone in set(self._slots) - live:
                del self._slots[gone]
            self._push_changes()
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    def _push_changes(self) -> None:
        """Send every front end a snapshot as soon as a version is added, loaded, failed, replaced or removed,
        or a front end starts or stops forwarding predictions."""
        shown = (*((id(m), m.state, m.error) for m in self.registry.all()), tuple(sorted(self._serving.values())))
        if shown == self._shown:
            return
        self._shown = shown
        message = channel.encode({"id": 0, "snapshot": self._snapshot()})
        for writer in list(self._writers):
            if not writer.is_closing():
                writer.write(message)

    # -- the control channel ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._links += 1
        self._no_links.clear()
        running: dict[int, asyncio.Task[None]] = {}
        arena: Mapping | None = None
        try:
            while (message := await channel.read(reader)) is not None:
                op = message.get("op")
                if op == "infer" and arena is not None:
                    key: int = message["id"]
                    running[key] = asyncio.get_running_loop().create_task(self._answer(writer, arena, message))
                    running[key].add_done_callback(functools.partial(_forget, running, key))
                elif op == "cancel":
                    if (cancelled := running.get(message["id"])) is not None:
                        cancelled.cancel()
                elif op in ("hello", "status"):
                    if op == "hello":
                        arena = self._arena(str(message["arena"]))
                        self._writers.add(writer)
                    writer.write(channel.encode({"id": message["id"], "snapshot": self._snapshot()}))
                elif op == "serving" and arena is not None:
                    # The front end has this owner's snapshot and a connection to send predictions on.
                    self._serving[writer] = int(message["index"])
                    self._push_changes()
                else:
                    log.warning("front end sent an unknown control message %r; ignored", op)
        except (ConnectionError, ValueError) as exc:
            log.warning("a front end's control connection failed: %s", exc)
        finally:
            for task in list(running.values()):
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)
            self._writers.discard(writer)
            if self._serving.pop(writer, None) is not None:
                self._push_changes()  # the others answer not-ready until it is back (or replaced)
            writer.close()
            self._links -= 1
            if not self._links:
                self._no_links.set()

    def _snapshot(self) -> Message:
        self._slots_for_all()
        return snapshot_of(self.registry, self._slots, list(self._serving.values()))

    def _slots_for_all(self) -> None:
        for served in self.registry.all():
            if served.batcher is not None:
                self._slot(served)

    def _arena(self, path: str) -> Mapping:
        if path not in self._arenas:
            self._arenas[path] = Mapping(self.folder.root / os.path.basename(path))
        return self._arenas[path]

    async def _answer(self, writer: asyncio.StreamWriter, arena: Mapping, message: Message) -> None:
        reply: dict[str, Any]
        try:
            reply = await self._infer(arena, message)
        except ServiceError as exc:
            reply = {"error": channel.error_message(exc)}
        except asyncio.CancelledError:
            reply = {"cancelled": True}
        except Exception:
            log.exception("a front end's request to %s failed in the inference process", message.get("model"))
            reply = {"error": channel.error_message(InferenceFailed("inference failed; the cause is in the service log"))}
        reply["id"] = message["id"]
        if not writer.is_closing():
            writer.write(channel.encode(reply))

    async def _infer(self, arena: Mapping, message: Message) -> dict[str, Any]:
        name, version, count = str(message["model"]), int(message["version"]), int(message["count"])
        offset, capacity, deadline = int(message["offset"]), int(message["capacity"]), float(message["deadline"])
        for _ in range(_SWAP_RETRIES):
            served = self.registry.get(name, version)
            assert served.metadata is not None and served.batcher is not None, "get() answers ready versions only"
            shape = (count, *served.metadata.input_shape)
            if list(shape) != list(message["shape"]):
                raise InferenceFailed(f"model {name!r} version {version} was replaced by one of another input size; retry")
            try:
                rows = await served.batcher.infer(arena.view(offset, np.uint8, shape), deadline, str(message.get("protocol", "")))
            except BatcherClosed:
                continue  # replaced while the request waited: the new file's batcher takes it
            rows = np.ascontiguousarray(rows, dtype=np.float32)
            if rows.nbytes > capacity:
                raise InferenceFailed(
                    f"model {name!r} version {version} now has more classes than when the request was sent; retry"
                )
            arena.view(offset, np.float32, rows.shape)[...] = rows
            return {"rows": list(rows.shape)}
        raise InferenceFailed(f"model {name!r} was replaced {_SWAP_RETRIES} times while this request waited; retry it")


def _forget(running: dict[int, asyncio.Task[None]], key: int, task: asyncio.Task[None]) -> None:
    running.pop(key, None)


def run_owner(settings: Settings, folder: RunFolder) -> int:
    """The owner process's body: probe the device, load the models, serve front ends; the exit status."""
    try:
        device = prepare_process(settings)
    except DeviceUnavailable as exc:
        log.error("cannot start: %s", exc)
        return EXIT_STARTUP_FAILED
    # Series of unloaded versions stay in the multiprocess files (prometheus-client cannot remove them there).
    warnings.filterwarnings("ignore", message="Removal of labels has not been implemented", category=UserWarning)
    runner_options: dict[str, Any] = {}
    try:
        import uvloop

        runner_options["loop_factory"] = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(**runner_options) as runner:
        return runner.run(Owner(settings, device, folder).run())
