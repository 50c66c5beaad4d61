"""uvicorn, run with a drain that loses no connection the kernel accepted.

On SIGTERM: readiness answers 503 for --drain-delay-s while requests are still served (load
balancers and endpoints stop sending); then new connections are refused, every connection already
waiting in the kernel's accept backlog is taken and answered, requests in flight and queued images
finish, and the process exits 0, or 1 when the drain ran past --shutdown-timeout-s. uvicorn's own
shutdown closes the listening socket at once, which resets the connections still in the backlog,
and re-raises the signal after a clean drain, which supervisors record as a failure (exit 143).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Generator
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from .lifecycle import Lifecycle
from .listening import refuse_new_handshakes
from .settings import Settings

log = logging.getLogger(__name__)

EXIT_CLEAN = 0
EXIT_DRAIN_CUT_SHORT = 1
EXIT_STARTUP_FAILED = 3  # uvicorn's own code for a failed lifespan start-up
# How long a connection just taken from the backlog may take to send its request before it is closed.
FRESH_CONNECTION_GRACE_S = 1.0


def _is_fresh(connection: Any) -> bool:
    """A connection that has not sent its first request yet (uvicorn's HTTP protocols keep `cycle` None until then)."""
    return getattr(connection, "cycle", False) is None


class DrainingServer(uvicorn.Server):
    """uvicorn's Server with the drain described above, and no re-raised signal."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_delay_s: float, shutdown_timeout_s: float):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_delay_s = drain_delay_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.exit_code = EXIT_CLEAN
        self._signal: tuple[int, float] | None = None
        self._announced = False

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signal is None:
            self._signal = (sig, time.monotonic())
            self.lifecycle.begin_drain()
        elif sig == signal.SIGINT:
            # A second Ctrl-C: stop waiting for anything.
            self.should_exit = self.force_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Open the port first, then run the app's start-up (model loading), so that probes answer while models load."""
        loop = asyncio.get_running_loop()
        config = self.config
        self.servers = [
            await loop.create_server(self._protocol, sock=sock, ssl=config.ssl, backlog=config.backlog) for sock in sockets or []
        ]
        self.started = True
        await uvicorn.Server.on_tick(self, 0)  # the Date and Server headers, before the main loop sets them
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            for server in self.servers:
                server.close()
            sys.exit(EXIT_STARTUP_FAILED)

    async def on_tick(self, counter: int) -> bool:
        if self._signal is not None:
            sig, at = self._signal
            # Ctrl-C in a terminal wants the process gone, not kept for load balancers.
            delay = self.drain_delay_s if sig == signal.SIGTERM else 0.0
            if not self._announced:
                self._announced = True
                if delay > 0:
                    log.info(
                        "%s: answering not-ready for %.1f s while serving, then draining (at most %.1f s)",
                        signal.Signals(sig).name,
                        delay,
                        self.shutdown_timeout_s,
                    )
                else:
                    log.info("%s: draining (at most %.1f s)", signal.Signals(sig).name, self.shutdown_timeout_s)
            if time.monotonic() - at >= delay:
                self.should_exit = True
        return await super().on_tick(counter)

    def _protocol(self) -> asyncio.Protocol:
        """An HTTP protocol instance exactly as uvicorn's start-up makes them, for connections taken from the backlog."""
        config = self.config
        return config.http_protocol_class(  # type: ignore[call-arg]
            config=config, server_state=self.server_state, app_state=self.lifespan.state, _loop=asyncio.get_running_loop()
        )

    async def _take_backlog(self, sock: socket.socket) -> int:
        """Accept every connection waiting in the kernel's backlog and hand it to uvicorn; how many there were."""
        loop = asyncio.get_running_loop()
        taken = 0
        while True:
            try:
                connection, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError as exc:
                log.warning("accepting the backlog stopped: %s", exc)
                return taken
            connection.setblocking(False)
            await loop.connect_accepted_socket(self._protocol, connection)
            taken += 1

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        listening = sockets or []
        deadline = time.monotonic() + self.shutdown_timeout_s
        self.lifecycle.begin_drain()
        # Stop accepting without losing what the kernel already accepted: drop new handshakes, take
        # the backlog, and only then close the listening socket.
        for sock in listening:
            refuse_new_handshakes(sock)
        taken = sum([await self._take_backlog(sock) for sock in listening])
        for server in self.servers:
            server.close()
        for sock in listening:
            sock.close()
        log.info("stopped accepting connections (%d taken from the backlog); draining", taken)
        # A connection just taken may not have had its request read yet: let it arrive before
        # closing idle connections, or the client would see its connection closed unanswered.
        for _ in range(round(FRESH_CONNECTION_GRACE_S / 0.01)):
            await asyncio.sleep(0.01)
            if not any(_is_fresh(c) for c in self.server_state.connections):
                break
        for connection in list(self.server_state.connections):
            connection.shutdown()
        clean = await self._wait_for_connections(deadline)
        if not clean:
            left = len(self.server_state.connections)
            log.error(
                "the drain reached --shutdown-timeout-s (%.1f s) with %d connections still open: cutting them off",
                self.shutdown_timeout_s,
                left,
            )
            for task in self.server_state.tasks:
                task.cancel(msg="the drain reached --shutdown-timeout-s")
            self.exit_code = EXIT_DRAIN_CUT_SHORT
        if self.force_exit:
            self.exit_code = EXIT_DRAIN_CUT_SHORT
            return
        try:
            # The lifespan's shutdown finishes queued images and stops the batchers.
            await asyncio.wait_for(self.lifespan.shutdown(), timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            log.error("the drain reached --shutdown-timeout-s (%.1f s) while finishing queued images", self.shutdown_timeout_s)
            self.exit_code = EXIT_DRAIN_CUT_SHORT
        if self.exit_code == EXIT_CLEAN:
            log.info("drained cleanly")

    async def _wait_for_connections(self, deadline: float) -> bool:
        """Wait until every connection has answered and closed, and every request task ended; False at the deadline."""
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return not self.force_exit


def serve(app: FastAPI, settings: Settings, log_config: dict[str, Any]) -> int:
    """Run `app` until a signal has drained it; the process's exit status."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # The drain above replaces uvicorn's graceful shutdown and its timeout.
        timeout_graceful_shutdown=None,
    )
    server = DrainingServer(config, app.state.lifecycle, settings.drain_delay_s, settings.shutdown_timeout_s)
    config.load()
    # The listening socket is ours, not uvicorn's, so that the drain can take its backlog.
    sock = config.bind_socket()  # logs "Uvicorn running on ..."
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return server.exit_code
