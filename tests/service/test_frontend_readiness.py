"""`--frontends 2`: no front end answers ready while a front end of the same service would refuse predictions.

Front ends share one listening socket, so a load balancer that saw one front end answer /health 200
sends requests that the kernel may hand to any of them. These tests hold one front end back with
SIGSTOP at the moment it is not connected to the owner (at start-up, and while the owner is
replaced), watch what /health answers meanwhile, and then let that very front end take a
prediction: if /health said ready, the prediction must be answered. Real processes, real sockets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import BUNDLED_REPOSITORY, LiveServer
from tests.service.conftest import children, wait_for_processes

DIGIT = (BUNDLED_REPOSITORY.parent / "examples" / "digits" / "zero.png").read_bytes()
WATCH_S = 1.0  # how long /health is watched while one front end is held back


def _index(pid: int) -> int:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(argv[argv.index(b"--index") + 1])


def _frontends(server: LiveServer) -> dict[int, int]:
    """Front-end index to pid."""
    return {_index(pid): pid for pid in children(server)["frontend"]}


def _run_folder(server: LiveServer) -> Path:
    argv = Path(f"/proc/{children(server)['owner'][0]}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--run-folder") + 1].decode())


def _wait(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.01)


@contextmanager
def _stopped(*pids: int) -> Iterator[None]:
    """SIGSTOP the processes; SIGCONT them whatever happens."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _health_statuses(url: str, seconds: float) -> list[tuple[int, str]]:
    """What GET /health answers, every 50 ms for `seconds`."""
    seen = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        r = httpx.get(f"{url}/health", timeout=10)
        seen.append((r.status_code, r.json()["reason"]))
        time.sleep(0.05)
    return seen


def _queued_prediction(port: int) -> socket.socket:
    """A prediction request sent in full on a new connection; while no front end runs, it waits in the kernel's queue."""
    request = httpx.Request("POST", f"http://127.0.0.1:{port}/predict/digits", files={"files": ("digit.png", DIGIT, "image/png")})
    body = request.read()
    head = f"POST /predict/digits HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += f"Content-Type: {request.headers['content-type']}\r\nContent-Length: {len(body)}\r\n\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + body)
    return sock


def _status(sock: socket.socket) -> tuple[int, str]:
    """The status of the answer on `sock`, and the answer itself."""
    data = b""
    with sock:
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 "), data
    return int(data.split(b" ", 2)[1]), data.decode(errors="replace")


def _prediction_by(server: LiveServer, answering: int, held: list[int]) -> tuple[int, str]:
    """A prediction answered by the front end `answering` alone: every pid in `held` is stopped meanwhile."""
    with _stopped(*held):
        sock = _queued_prediction(server.port)
        time.sleep(0.2)  # the connection sits in the shared socket's accept queue: nobody running takes it
        os.kill(answering, signal.SIGCONT)
        return _status(sock)


@pytest.fixture
def server() -> Iterator[LiveServer]:
    server = LiveServer(BUNDLED_REPOSITORY, ["--frontends", "2", "--watch-interval-s", "0"])
    try:
        yield server
    finally:
        with contextlib.suppress(OSError):
            for pid in [*children(server)["frontend"], *children(server)["owner"]]:
                os.kill(pid, signal.SIGCONT)
        server.stop()


def test_at_start_up_no_front_end_says_ready_before_every_front_end_can_predict(server):
    # Front end 1 is held back from its very start (the owner has not loaded its models yet, so it
    # cannot have connected): it starts late, as a busy machine may start it.
    _wait(lambda: len(children(server)["frontend"]) == 2 and children(server)["owner"], "the processes starting")
    late = _frontends(server)[1]
    os.kill(late, signal.SIGSTOP)
    folder = _run_folder(server)
    try:
        assert not folder.joinpath("owner.sock").exists(), "front end 1 was stopped too late to be held back"
        # Front end 0 connects to the owner as soon as it has loaded the models.
        _wait(lambda: "Application startup complete." in server.log(), "front end 0 connecting to the owner")
        health = _health_statuses(server.url, WATCH_S)
        (owner,) = children(server)["owner"]
        # Front end 1 now runs, alone: it takes the prediction from the shared socket while its own
        # connection to the owner (held too) has not been answered yet.
        status, answer = _prediction_by(server, late, held=[_frontends(server)[0], owner])
    finally:
        os.kill(late, signal.SIGCONT)
    said_ready = [h for h in health if h[0] == 200]
    assert not (said_ready and status == 503), (
        f"/health answered 200 ({len(said_ready)} of {len(health)} checks) while front end 1 answered a prediction "
        f"with 503:\n{answer}"
    )
    assert health[-1][0] == 503 and "front end" in health[-1][1], health[-1]
    # Once every front end is connected, the service says ready and serves from either.
    wait_for_processes(server, 2)
    _wait(lambda: httpx.get(f"{server.url}/health").status_code == 200, "the service ready")
    for _ in range(10):
        assert httpx.post(f"{server.url}/predict/digits", files={"files": ("d.png", DIGIT, "image/png")}).status_code == 200


def test_while_the_owner_is_replaced_no_front_end_says_ready_before_every_front_end_can_predict(server):
    server.wait_until_listening()
    wait_for_processes(server, 2)
    _wait(lambda: httpx.get(f"{server.url}/health").status_code == 200, "the service ready")
    frontends = _frontends(server)
    folder = _run_folder(server)
    (old_owner,) = children(server)["owner"]
    # Front end 1 sleeps through the owner's death and its replacement; front end 0 reconnects.
    os.kill(frontends[1], signal.SIGSTOP)
    try:
        os.kill(old_owner, signal.SIGKILL)
        _wait(lambda: children(server)["owner"] not in ([], [old_owner]), "a new owner starting")
        _wait(lambda: folder.joinpath("owner.sock").exists(), "the new owner serving")
        _wait(lambda: "the inference process answers again" in server.log(), "front end 0 reconnecting")
        health = _health_statuses(server.url, WATCH_S)
        (owner,) = children(server)["owner"]
        # Front end 1 wakes to find its connection gone; the new owner is held, so it cannot reconnect first.
        status, answer = _prediction_by(server, frontends[1], held=[frontends[0], owner])
    finally:
        os.kill(frontends[1], signal.SIGCONT)
    said_ready = [h for h in health if h[0] == 200]
    assert not (said_ready and status == 503), (
        f"/health answered 200 ({len(said_ready)} of {len(health)} checks) while front end 1 answered a prediction "
        f"with 503:\n{answer}"
    )
    assert health[-1][0] == 503 and "front end" in health[-1][1], health[-1]
    _wait(lambda: httpx.get(f"{server.url}/health").status_code == 200, "the service ready again")
    for _ in range(10):
        assert httpx.post(f"{server.url}/predict/digits", files={"files": ("d.png", DIGIT, "image/png")}).status_code == 200
