"""`--frontends N`: N front-end processes on one port around one process that owns the models.

The supervisor (the process `python -m service` started) makes a run folder in /dev/shm (the
owner's control socket, the shared-memory arenas and board, and PROMETHEUS_MULTIPROC_DIR), starts
the owner (service/owner.py) and waits until its models are loaded, then binds the listening
socket and starts the front ends, which inherit it. One listening socket shared by every front
end, rather than one SO_REUSEPORT socket each: the kernel keeps one accept queue, so a front end
that dies loses only the connections it had taken (with SO_REUSEPORT the connections hashed to
its own queue would be reset too), a replacement starts accepting at once on the same port, and
at shutdown one socket can be closed to new handshakes while the front ends take what is
already queued. Each front end runs the same app as the single process, over a mirror of the
owner's registry (service/mirror.py).

The supervisor replaces a front end or an owner that exits while the service runs. On SIGTERM
(or Ctrl-C) it drops new handshakes, lets the front ends take every connection already queued,
stops the front ends (each answers what it holds; their requests still run on the owner), then
the owner (which finishes anything still queued), and exits 0 when every process stopped cleanly.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import logging
import logging.config
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from .channel import RunFolder
from .listening import accept_queue_length, quiesce
from .settings import Settings
from .shm import ARENA_BYTES, Board, create_file

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.05
OWNER_START_TIMEOUT_S = 600.0  # loading and warming every model of a large repository
BACKLOG = 2048
# After the accept queue is empty: time for connections just taken to have their request read.
FRESH_CONNECTION_GRACE_S = 0.2
BACKLOG_WAIT_S = 2.0
# A process that exits sooner than this after its start is restarted only after this long, so a
# process that cannot start does not spin.
RESTART_BACKOFF_S = 1.0
# A front end told this answers not-ready from then on (the drain delay), while it goes on serving.
DRAIN_SIGNAL = signal.SIGUSR1
EXIT_STARTUP_FAILED = 3
_PR_SET_PDEATHSIG = 1
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def refuse(settings: Settings) -> str | None:
    """Why this machine cannot run `settings.frontends` processes, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"--frontends {settings.frontends} needs Linux (shared listening socket, /dev/shm); use --frontends 1"
    return None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reserve_grpc_port(host: str, port: int) -> socket.socket:
    """Hold the gRPC port for the front ends, which each bind it with SO_REUSEPORT; OSError when another holds it.

    A plain bind first: it fails while any other socket has the port, SO_REUSEPORT or not, so a second
    service cannot join the front ends' group. The socket kept is bound with SO_REUSEPORT and never
    listens (it takes no connection): while the service runs, only sockets of this user with
    SO_REUSEPORT can bind the port, and grpc's own front-end sockets are those.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.bind((host, port))
    held = socket.socket(_family(host), socket.SOCK_STREAM)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        held.bind((host, port))
    except OSError:
        held.close()
        raise
    return held


class Supervisor:
    """Starts, watches, replaces and finally drains the owner and the front ends; see the module's docstring."""

    def __init__(self, settings: Settings, folder: RunFolder):
        self.settings = settings
        self.folder = folder
        self.env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(folder.metrics),
            # The children import this very copy of the service.
            "PYTHONPATH": os.pathsep.join(p for p in (str(_PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        self.stopping: int | None = None
        self.listener: socket.socket | None = None
        self.grpc_hold: socket.socket | None = None
        self.owner: subprocess.Popen[bytes] | None = None
        self.owner_ready = False
        self.frontends: dict[int, subprocess.Popen[bytes]] = {}
        self._started: dict[int, float] = {}  # pid -> when
        self._roles: dict[int, str] = {}  # pid -> what it is, for the log

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        if self.stopping is None:
            self.stopping = sig

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self.folder.metrics.mkdir()
        Board.create(self.folder.board)
        for index in range(self.settings.frontends):
            create_file(self.folder.arena(index), ARENA_BYTES)
        settings = self.settings
        host, family = settings.host, _family(settings.host)
        try:
            self.listener = socket.create_server((host, settings.port), family=family, backlog=BACKLOG)
            if settings.grpc_port:
                self.grpc_hold = reserve_grpc_port(host, settings.grpc_port)
        except OSError as exc:
            log.error("cannot listen on %s: %s", host, exc)
            return 1
        self.listener.set_inheritable(True)
        # The ports open at once, as with one process: the front ends answer probes ("loading") and
        # refuse predictions with 503 until the owner has loaded its models.
        self.owner = self._spawn("owner")
        for index in range(settings.frontends):
            self.frontends[index] = self._spawn("frontend", index)
        log.info(
            "listening on http://%s:%d%s: %d front-end processes around one inference process",
            f"[{host}]" if family == socket.AF_INET6 else host,
            self.listener.getsockname()[1],
            f" and gRPC on port {settings.grpc_port}" if settings.grpc_port else "",
            settings.frontends,
        )
        deadline = time.monotonic() + OWNER_START_TIMEOUT_S
        while self.stopping is None:
            time.sleep(POLL_INTERVAL_S)
            if not self.owner_ready:
                code = self._owner_starting(deadline)
                if code is not None:
                    self._stop_all()
                    return code
                continue
            self._replace_the_fallen()
        if self.stopping == signal.SIGTERM and settings.drain_delay_s > 0:
            self._drain_delay(settings.drain_delay_s)
        return self._drain()

    def _owner_starting(self, deadline: float) -> int | None:
        """While the owner loads: None, or the exit status when it stopped (or took too long) before it was ready."""
        assert self.owner is not None
        if self.folder.socket.exists():
            self.owner_ready = True
            return None
        code = self.owner.poll()
        if code is not None:
            log.error("the inference process exited with %d before it was ready", code)
            return code or 1
        if time.monotonic() > deadline:
            log.error("the inference process was not ready within %.0f s", OWNER_START_TIMEOUT_S)
            return 1
        return None

    def _stop_all(self) -> None:
        for process in [*self.frontends.values(), self.owner]:
            if process is not None:
                self._stop(process, self.settings.shutdown_timeout_s + 10)

    def _spawn(self, role: str, index: int = 0) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "service.frontends", role, "--run-folder", str(self.folder.root), "--index", str(index)]
        fds: tuple[int, ...] = ()
        if role == "frontend":
            assert self.listener is not None
            fds = (self.listener.fileno(),)
            args += ["--fd", str(self.listener.fileno())]
        process = subprocess.Popen(args, stdin=subprocess.PIPE, pass_fds=fds, env=self.env)
        # Settings travel on stdin, not the command line, which anyone on the machine can read (an API key).
        assert process.stdin is not None
        process.stdin.write(self.settings.model_dump_json().encode())
        process.stdin.close()
        self._started[process.pid] = time.monotonic()
        self._roles[process.pid] = "the inference process" if role == "owner" else f"front end {index}"
        return process

    def _gone(self, process: subprocess.Popen[bytes], what: str) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(process.pid, str(self.folder.metrics))  # type: ignore[no-untyped-call]
        lived = time.monotonic() - self._started.pop(process.pid, 0.0)
        log.error("%s (pid %d) exited with %s; starting another", what, process.pid, process.returncode)
        if lived < RESTART_BACKOFF_S:
            time.sleep(RESTART_BACKOFF_S)

    def _replace_the_fallen(self) -> None:
        assert self.owner is not None
        if self.owner.poll() is not None:
            # Front ends answer 503 from the moment its connection drops, and reconnect by themselves.
            self._gone(self.owner, "the inference process")
            self.folder.socket.unlink(missing_ok=True)
            self.owner = self._spawn("owner")
        for index, frontend in list(self.frontends.items()):
            if frontend.poll() is not None and self.stopping is None:
                self._gone(frontend, f"front end {index}")
                self.frontends[index] = self._spawn("frontend", index)

    def _stop(self, process: subprocess.Popen[bytes], timeout_s: float | None = None, signalled: bool = False) -> bool:
        """SIGTERM (unless `signalled` already), then wait; SIGKILL after `timeout_s`. True when it exited 0."""
        if not signalled:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("pid %d did not stop within %.0f s; killing it", process.pid, timeout_s or 0)
            process.kill()
            process.wait()
            return False
        if code != 0:
            log.error("pid %d (%s) exited with %d while stopping", process.pid, self._roles.get(process.pid), code)
        return code == 0

    def _drain_delay(self, delay_s: float) -> None:
        """Every front end answers not-ready for `delay_s` while it goes on serving, so that balancers stop sending."""
        log.info("SIGTERM: answering not-ready for %.1f s while serving, then draining", delay_s)
        for frontend in self.frontends.values():
            with contextlib.suppress(ProcessLookupError):
                frontend.send_signal(DRAIN_SIGNAL)
        until = time.monotonic() + delay_s
        while time.monotonic() < until:
            time.sleep(POLL_INTERVAL_S)
            if self.stopping == signal.SIGINT:
                return  # Ctrl-C after SIGTERM: the delay is for load balancers, not for a person
            if self.owner_ready:
                self._replace_the_fallen()  # the owner, still needed; front ends are not replaced while stopping

    def _drain(self) -> int:
        assert self.listener is not None and self.owner is not None
        log.info("%s: draining", signal.Signals(self.stopping or signal.SIGTERM).name)
        # No connection the kernel accepted is lost: new handshakes are dropped (the clients retry and find
        # the port closed), the running front ends take every queued one, and only then are they stopped.
        waiting = accept_queue_length(self.listener)
        left = quiesce([self.listener], BACKLOG_WAIT_S)
        time.sleep(FRESH_CONNECTION_GRACE_S)
        log.info("stopped accepting connections (%d were waiting in the backlog, %d left); draining", waiting, left)
        limit = self.settings.shutdown_timeout_s + 10
        for frontend in self.frontends.values():
            with contextlib.suppress(ProcessLookupError):
                frontend.send_signal(signal.SIGTERM)
        clean = all([self._stop(frontend, limit, signalled=True) for frontend in self.frontends.values()])
        self.listener.close()
        if self.grpc_hold is not None:
            self.grpc_hold.close()
        clean = self._stop(self.owner, limit) and clean
        log.info("drained %s", "cleanly" if clean else "with errors (see above)")
        return 0 if clean else 1


def supervise(settings: Settings) -> int:
    """Run the service as front ends around one owner; the exit status."""
    problem = refuse(settings)
    if problem is not None:
        log.error("cannot start: %s", problem)
        return 2
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="kos-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    try:
        return Supervisor(settings, RunFolder(root)).run()
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- the children ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Be sent SIGTERM when the supervisor dies, so no process outlives the service (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_frontend(settings: Settings, folder: RunFolder, index: int, fd: int, log_config: dict[str, Any]) -> int:
    """A front end's body: the service's app over a mirror of the owner's registry, on the inherited socket."""
    import uvicorn

    from kos_core.imaging import allow_images_up_to

    from .app import create_app
    from .metrics import Metrics
    from .mirror import WAITING, MirrorRegistry
    from .server import DrainingServer

    allow_images_up_to(settings.max_image_pixels)
    listener = socket.socket(fileno=fd)
    factory = functools.partial(MirrorRegistry, folder=folder, index=index)
    metrics = Metrics(multiprocess_dir=folder.metrics)
    app = create_app(settings, WAITING, metrics=metrics, registry_factory=factory, grpc_shared_port=True)
    lifecycle, registry = app.state.lifecycle, app.state.registry

    class FrontendServer(DrainingServer):
        """The single process's server and drain (server.py); the supervisor keeps the drain delay and the backlog."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            registry.stop_waiting()  # stopped while the owner still loads: the lifespan's start-up returns
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_config=log_config,
        log_level=settings.log_level,
        access_log=settings.access_log,
        timeout_graceful_shutdown=None,
    )
    # The drain delay: readiness answers not-ready (HTTP and gRPC) while every request is still served.
    signal.signal(DRAIN_SIGNAL, lambda sig, frame: lifecycle.begin_drain())
    server = FrontendServer(config, lifecycle, 0.0, settings.shutdown_timeout_s)
    server.run(sockets=[listener])
    return server.exit_code
    return 0


def child_main(argv: list[str] | None = None) -> None:
    """`python -m service.frontends owner|frontend ...`, started by the supervisor only; settings on stdin."""
    from .logs import log_config
    from .owner import run_owner

    parser = argparse.ArgumentParser(prog="python -m service.frontends")
    parser.add_argument("role", choices=["owner", "frontend"])
    parser.add_argument("--run-folder", type=Path, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--fd", type=int)
    args = parser.parse_args(argv)
    _die_with_parent()
    settings = Settings.model_validate_json(sys.stdin.read())
    config = log_config(settings.log_level, settings.log_format)
    logging.config.dictConfig(config)
    folder = RunFolder(args.run_folder)
    if args.role == "owner":
        code = run_owner(settings, folder)
    else:
        code = run_frontend(settings, folder, args.index, args.fd, config)
    # Done: a late signal must not turn a clean exit into death by signal while the interpreter winds down.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    child_main()
