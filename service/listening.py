"""Listening sockets at shutdown: stop new handshakes without losing the connections the kernel already accepted.

Closing a listening socket resets every connection still waiting in its accept queue: the
clients see a reset for a request they had sent. So at shutdown the service first makes the
socket drop new handshakes (a client whose SYN is dropped sends it again about a second later,
finds the port closed and gets a clean "connection refused"), lets its accept queue be taken,
and only then closes it. Linux only; elsewhere the functions do nothing and say so.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct
import time

log = logging.getLogger(__name__)

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_TCP_INFO_BYTES = 104


def refuse_new_handshakes(sock: socket.socket) -> bool:
    """Make a listening socket drop every new handshake from now on; its accept queue is kept. False if it cannot."""
    # One classic BPF instruction, `ret #0`: keep zero bytes of every packet, that is, drop it.
    program = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))
    fprog = struct.pack("HP", 1, ctypes.addressof(program))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    except OSError as exc:
        log.debug("cannot filter new connections on %s: %s", sock, exc)
        return False
    return True


def accept_queue_length(sock: socket.socket) -> int:
    """Connections the kernel has accepted on a listening socket that no process has taken yet (Linux; else 0)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError):
        return 0
    return int(struct.unpack_from("I", info, 24)[0])  # tcpi_unacked: the accept queue, on a listening socket


def listeners_on(port: int) -> list[socket.socket]:
    """This process's listening TCP sockets bound to `port`, as duplicates (close them): for servers that keep theirs.

    grpcio opens and accepts on its own sockets and gives no handle on them; the drain finds them here.
    """
    found: list[socket.socket] = []
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return found
    for fd in fds:
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            keep = sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
            keep = keep and bool(listening) and sock.getsockname()[1] == port
        except OSError:
            keep = False
        if keep:
            found.append(sock)
        else:
            sock.close()
    return found


def quiesce(sockets: list[socket.socket], wait_s: float) -> int:
    """Refuse new handshakes on `sockets` and wait (at most `wait_s`) until their accept queues are taken; those left."""
    if not [sock for sock in sockets if refuse_new_handshakes(sock)]:
        return 0
    deadline = time.monotonic() + wait_s
    while (left := sum(accept_queue_length(sock) for sock in sockets)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left
