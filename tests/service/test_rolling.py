"""Three service replicas behind a real HAProxy that health-checks the readiness route, restarted
one after another under steady load as a rolling update does, then one killed outright; in both
shapes, one process per replica and two front ends around an owner (--frontends 2).

Debian's haproxy (scripts/install-haproxy.sh) on loopback ports; the test skips, and says why,
where it is not installed.
"""

from __future__ import annotations

import csv
import io
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BUNDLED_REPOSITORY, LiveServer, free_port
from tests.service.conftest import SHAPES, shape

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
# Long enough for HAProxy, checking every 200 ms and taking a server out at its first failed check,
# to stop sending before the process stops accepting; Kubernetes needs seconds here, not this.
DRAIN_DELAY_S = 1.5
CLIENTS = 4
MAX_REQUESTS = 20_000  # a bound, never reached: the load stops when the test says so

pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed: run scripts/install-haproxy.sh (Debian's haproxy package)"
)


def _config(port: int, stats_port: int, backends: list[int]) -> str:
    servers = "\n".join(f"    server s{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
    return f"""global
    maxconn 256

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # Connection failures only (HAProxy's default retry-on): a request a server accepted is never sent twice.
    retries 3
    option redispatch

listen api
    bind 127.0.0.1:{port}
    balance roundrobin
    option httpchk
    http-check send meth GET uri /health
    http-check expect status 200
    default-server inter 200ms fall 1 rise 2
{servers}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


class Balancer:
    """haproxy in the foreground, with its stats page to read which servers it sends to."""

    def __init__(self, folder: Path, backends: list[int]):
        self.port, self.stats_port = free_port(), free_port()
        config = folder / "haproxy.cfg"
        config.write_text(_config(self.port, self.stats_port, backends))
        self.log_path = folder / "haproxy.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=self._log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def states(self) -> dict[str, str]:
        """Server name to HAProxy's state of it (UP, DOWN, ...); empty while HAProxy starts."""
        assert self.process.poll() is None, self.log_path.read_text(errors="replace")
        try:
            text = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5).text.lstrip("# ")
        except httpx.TransportError:
            return {}
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "api"}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


class Load:
    """Steady requests through the balancer from a few keep-alive clients; every outcome counted in order."""

    def __init__(self, url: str, body: bytes):
        self.url, self.body = url, body
        self.lock = threading.Lock()
        self.outcomes: list[str] = []  # "200", another status, or the exception's type
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(CLIENTS)]

    def _loop(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set() and len(self.outcomes) < MAX_REQUESTS:
                try:
                    r = client.post(self.url, files={"files": ("digit.png", self.body, "image/png")})
                    outcome = str(r.status_code)
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with self.lock:
                    self.outcomes.append(outcome)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def failures(self, since: int = 0) -> Counter[str]:
        with self.lock:
            return Counter(o for o in self.outcomes[since:] if o != "200")


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)


def _start(frontends: int, port: int | None = None) -> LiveServer:
    args = ["--watch-interval-s", "0", "--drain-delay-s", str(DRAIN_DELAY_S), *shape(frontends)]
    return LiveServer(BUNDLED_REPOSITORY, args, port=port)


@pytest.fixture
def replicas(frontends: int) -> Iterator[list[LiveServer]]:
    servers = [_start(frontends) for _ in range(3)]
    try:
        for server in servers:
            server.wait_until_listening()
        yield servers
    finally:
        for server in servers:
            server.stop()


@SHAPES
def test_a_rolling_restart_behind_haproxy_loses_no_request_and_a_killed_replica_only_its_own(
    tmp_path, frontends, replicas, digit_pngs
):
    balancer = Balancer(tmp_path, [s.port for s in replicas])
    names = [f"s{i}" for i in range(len(replicas))]
    try:
        _wait(lambda: all(balancer.states().get(n) == "UP" for n in names), "HAProxy seeing every replica UP")
        body = digit_pngs[0][0].read_bytes()
        with Load(f"{balancer.url}/predict/digits", body) as load:
            _wait(lambda: load.count() >= 200, "the load reaching 200 requests")
            for i, old in enumerate(list(replicas)):
                at_signal = load.count()
                old.process.send_signal(signal.SIGTERM)
                # HAProxy takes it out while it still serves (readiness 503 during the drain delay).
                _wait(lambda name=names[i]: balancer.states().get(name, "").startswith("DOWN"), f"HAProxy taking {names[i]} out")
                assert old.process.poll() is None, "the replica was taken out only after it exited"
                assert old.process.wait(timeout=60) == 0, old.log()
                assert load.count() > at_signal, "requests went on while the replica drained"
                new = _start(frontends, port=old.port)
                replicas[i] = new
                old.stop()
                new.wait_until_listening()
                _wait(lambda name=names[i]: balancer.states().get(name) == "UP", f"HAProxy taking the new {names[i]} in")
            rolled = load.count()
            rolling_failures = load.failures()
            # The unplanned case: a process killed without a drain under the same load.
            victim = replicas[0]
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait(timeout=10)
            _wait(lambda: balancer.states().get("s0", "").startswith("DOWN"), "HAProxy taking the killed replica out")
            taken_out = load.count()
            _wait(lambda: load.count() >= taken_out + 300, "300 more requests after the kill")
            after_kill = load.count()
        killed_failures = load.failures(since=rolled)
        print(
            f"\n--frontends {frontends}: rolling restart of 3 replicas: {rolled} requests, failed {sum(rolling_failures.values())} "
            f"{dict(rolling_failures)}\nSIGKILL of one replica: {after_kill - rolled} requests after the kill, "
            f"failed {sum(killed_failures.values())} {dict(killed_failures)} (in flight on it, or sent before "
            "HAProxy's next check took it out)"
        )
        assert rolling_failures == Counter(), f"a rolling restart lost requests: {dict(rolling_failures)}"
        assert rolled >= 1000, f"too little load to prove anything: {rolled} requests"
        # The survivors kept serving: once HAProxy took the killed one out, nothing more failed.
        assert load.failures(since=taken_out) == Counter(), dict(load.failures(since=taken_out))
    finally:
        balancer.stop()
