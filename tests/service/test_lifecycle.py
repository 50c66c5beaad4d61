"""The service's life on real servers: probes while models load, readiness policies, the drain on SIGTERM, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from kos_core.layout import model_path
from service.app import create_app
from service.runtime import resolve_device
from service.settings import Settings
from tests.conftest import ROOT, LiveServer
from tests.service.conftest import SHAPES, acceptors, make_repository, metric_value, png_bytes, shape, wait_for_processes

DIGIT = [("files", ("zero.png", png_bytes(np.zeros((8, 8), np.uint8)), "image/png"))]


def _broken(repository: Path, name: str = "broken") -> None:
    path = model_path(repository, name, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not an onnx file")


def _wait(check, what: str, timeout: float = 30, server: LiveServer | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen within {timeout} s" + (f":\n{server.log()[-3000:]}" if server else ""))


def test_liveness_stays_200_while_models_load_and_after_one_failed_while_readiness_is_503(tmp_path, exported):
    repository = make_repository(tmp_path, {"slow": exported["slow"]})
    _broken(repository)
    # Warming the slow model for batches of 8 takes a second or two: time to probe while it loads.
    server = LiveServer(repository, ["--max-batch-size", "8", "--watch-interval-s", "0"])
    try:
        samples: list[tuple[int, int, str]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert server.process.poll() is None, server.log()
            try:
                live = httpx.get(f"{server.url}/livez", timeout=5)
                health = httpx.get(f"{server.url}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.02)
                continue
            samples.append((live.status_code, health.status_code, health.json()["status"]))
            if health.json()["status"] != "loading":
                break
            time.sleep(0.05)
        statuses = [s for _, _, s in samples]
        assert "loading" in statuses, "the port opens before the models load, and readiness says so"
        assert all(live == 200 for live, _, _ in samples), samples
        assert all(ready == 503 for _, ready, _ in samples), samples
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "unavailable" and "broken" in health["reason"]
        assert {m["name"]: m["state"] for m in health["models"]} == {"broken": "failed", "slow": "ready"}
        live = httpx.get(f"{server.url}/livez")
        assert live.status_code == 200 and live.json() == {"status": "live", "reason": "live"}
        assert httpx.head(f"{server.url}/livez").status_code == 200
    finally:
        server.stop()


def test_a_request_while_models_load_gets_503_not_404(tmp_path, exported):
    repository = make_repository(tmp_path, {"slow": exported["slow"]})
    server = LiveServer(repository, ["--max-batch-size", "8", "--watch-interval-s", "0"])
    try:
        files = [("files", ("x.png", png_bytes(np.zeros((128, 128, 3), np.uint8)), "image/png"))]
        for _ in range(600):
            try:
                r = httpx.post(f"{server.url}/predict/slow", files=files, timeout=30)
                break
            except httpx.TransportError:
                time.sleep(0.02)
        else:
            pytest.fail("the port never opened")
        if r.status_code == 200:
            pytest.skip("the model loaded before the first request arrived; nothing to see on this machine")
        assert r.status_code == 503 and "loading" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1
    finally:
        server.stop()


def _hot_add_a_broken_model(start_server, tmp_path, exported, *policy: str) -> tuple[LiveServer, httpx.Response]:
    repository = make_repository(tmp_path / "models", {"digits": exported["digits"]})
    server = start_server(repository, "--watch-interval-s", "0.1", *policy)
    assert httpx.get(f"{server.url}/health").status_code == 200
    _broken(repository)
    _wait(lambda: "broken v1: added (failed)" in server.log(), "loading the added broken model", server=server)
    return server, httpx.get(f"{server.url}/health")


def test_by_default_a_model_added_while_running_that_fails_is_reported_without_taking_the_node_out(
    tmp_path, start_server, exported
):
    server, health = _hot_add_a_broken_model(start_server, tmp_path, exported)
    assert health.status_code == 200, health.json()
    body = health.json()
    assert body["status"] == "ready" and "broken" in body["reason"] and "--readiness-policy startup" in body["reason"]
    assert {m["name"]: m["state"] for m in body["models"]}["broken"] == "failed"
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "kos_model_versions", model="broken", state="failed") == 1
    assert metric_value(text, "kos_model_loads_total", model="broken", outcome="failed") == 1
    assert metric_value(text, "kos_ready") == 1
    assert "could not load broken v1" in server.log()
    assert httpx.post(f"{server.url}/predict/digits", files=DIGIT).status_code == 200


def test_the_strict_readiness_policy_takes_the_node_out_for_any_model_without_a_ready_version(tmp_path, start_server, exported):
    server, health = _hot_add_a_broken_model(start_server, tmp_path, exported, "--readiness-policy", "strict")
    assert health.status_code == 503 and health.json()["status"] == "unavailable"
    assert "no ready version of broken" in health.json()["reason"]
    assert metric_value(httpx.get(f"{server.url}/metrics").text, "kos_ready") == 0


def test_a_model_that_fails_at_start_up_keeps_the_node_not_ready_under_either_policy(tmp_path, start_server, exported):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    _broken(repository)
    for policy in ("startup", "strict"):
        server = start_server(repository, "--watch-interval-s", "0", "--readiness-policy", policy)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and "no ready version of broken" in health.json()["reason"], policy


def test_model_name_serves_a_folder_of_versions_as_kserve_lays_it_out(tmp_path, start_server, exported):
    folder = tmp_path / "mnt" / "models"
    for version in (1, 2):
        target = folder / str(version) / "model.onnx"
        target.parent.mkdir(parents=True)
        target.write_bytes(exported["digits"].read_bytes())
    server = start_server(folder, "--watch-interval-s", "0", env={"KOS_MODEL_NAME": "mnist"})
    assert httpx.get(f"{server.url}/health").status_code == 200
    listed = httpx.get(f"{server.url}/models").json()["models"]
    assert [(m["name"], m["version"]) for m in listed] == [("mnist", 1), ("mnist", 2)]
    r = httpx.post(f"{server.url}/predict/mnist", files=DIGIT)
    assert r.status_code == 200 and r.json()["model"] == "mnist" and r.json()["version"] == 2
    assert httpx.post(f"{server.url}/predict/mnist?version=1", files=DIGIT).status_code == 200
    # A flag wins over the environment, as for every setting.
    other = start_server(folder, "--watch-interval-s", "0", "--model-name", "digits", env={"KOS_MODEL_NAME": "mnist"})
    assert [m["name"] for m in httpx.get(f"{other.url}/models").json()["models"]] == ["digits", "digits"]


def test_model_name_names_a_misplaced_file_in_the_model_folder(tmp_path, start_server, exported):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(exported["digits"].read_bytes())
    server = start_server(folder, "--watch-interval-s", "0", "--model-name", "mnist")
    assert httpx.get(f"{server.url}/health").json()["reason"] == "no model is served"
    assert "models/model.onnx has no version folder: put it in models/1/model.onnx" in server.log()


def test_the_access_log_is_off_by_default_and_on_by_its_setting(tmp_path, start_server, exported):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    quiet = start_server(repository, "--watch-interval-s", "0")
    loud = start_server(repository, "--watch-interval-s", "0", env={"KOS_ACCESS_LOG": "true"})
    for server in (quiet, loud):
        assert httpx.post(f"{server.url}/predict/digits", files=DIGIT).status_code == 200
    time.sleep(0.2)
    assert '"POST /predict/digits HTTP/1.1" 200' in loud.log()
    assert "/predict/digits" not in quiet.log()


async def test_liveness_fails_when_a_batcher_stops_or_the_event_loop_stalls(tmp_path, exported):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    app = create_app(Settings(repository=repository, watch_interval_s=0), resolve_device("cpu"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/livez")).status_code == 200
            lifecycle = app.state.lifecycle
            lifecycle.heartbeat -= 60  # as if the loop had not run its heartbeat for a minute
            live, reason = app.state.lifecycle.liveness()
            assert not live and "event loop did not run" in reason
            await asyncio.sleep(0.6)  # the heartbeat runs again
            assert app.state.lifecycle.liveness() == (True, "live")
            batcher = app.state.registry.get("digits").batcher
            batcher._task.cancel()
            await asyncio.sleep(0)
            r = await client.get("/livez")
            assert r.status_code == 503 and r.json()["status"] == "stuck" and "digits v1" in r.json()["reason"]
            assert (await client.get("/health")).status_code == 200, "readiness is a separate question"


# --- the drain --------------------------------------------------------------------------------


def _start(repository: Path, frontends: int, *args: str) -> LiveServer:
    server = LiveServer(repository, ["--watch-interval-s", "0", *shape(frontends), *args])
    server.wait_until_listening()
    wait_for_processes(server, frontends)
    return server


class Outcomes:
    """What connection-per-request clients saw: answers by status, clean refusals, and anything else (resets)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: dict[int, int] = {}
        self.refused = 0
        self.failures: list[str] = []

    def record(self, url: str) -> None:
        try:
            # A new client per request: a new connection each time, as the failing clients of the issue did.
            with httpx.Client(timeout=30) as client:
                status = client.post(url, files=DIGIT).status_code
        except httpx.ConnectError:
            with self.lock:
                self.refused += 1
            return
        except httpx.HTTPError as exc:
            with self.lock:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            return
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1


def _wait_for_answers(outcomes: Outcomes, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(outcomes.statuses.values()) < count:
        assert time.monotonic() < deadline, f"fewer than {count} answers within {timeout} s: {outcomes.statuses}"
        time.sleep(0.01)


def _fire_until(url: str, outcomes: Outcomes, stop: threading.Event, clients: int = 8) -> list[threading.Thread]:
    def loop() -> None:
        for _ in range(100_000):  # bounded; `stop` ends it long before
            if stop.is_set():
                return
            outcomes.record(url)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


@SHAPES
def test_connections_waiting_in_the_accept_backlog_at_sigterm_are_all_answered_and_the_exit_is_0(tmp_path, exported, frontends):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    server = _start(repository, frontends)
    try:
        url = f"{server.url}/predict/digits"
        assert httpx.post(url, files=DIGIT).status_code == 200
        # Stopped, the processes that accept take nothing; the kernel still completes handshakes into
        # the listening socket's backlog and buffers the requests, as under load.
        stopped = acceptors(server, frontends)
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        outcomes = Outcomes()
        waiting = [threading.Thread(target=outcomes.record, args=(url,), daemon=True) for _ in range(24)]
        for t in waiting:
            t.start()
        time.sleep(1.0)
        backlog = subprocess.run(["ss", "-Hltn", f"sport = :{server.port}"], capture_output=True, text=True).stdout
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)  # the signal is taken before the backlog can move (a supervisor drains it)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        for t in waiting:
            t.join(timeout=60)
        code = server.process.wait(timeout=60)
        print(f"listening socket before SIGTERM (ss -ltn: Recv-Q is the backlog): {backlog.strip()}")
        print(f"outcomes: {outcomes.statuses}, refused {outcomes.refused}, failed {outcomes.failures}")
        assert outcomes.statuses == {200: 24} and outcomes.refused == 0 and outcomes.failures == []
        assert code == 0, server.log()
        assert "taken from the backlog" in server.log() and "drained cleanly" in server.log()
    finally:
        server.stop()


@SHAPES
def test_clients_firing_around_sigterm_without_a_drain_delay_are_answered_or_refused_never_reset(tmp_path, exported, frontends):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    for trial in range(3):
        server = _start(repository, frontends)
        try:
            outcomes, stop = Outcomes(), threading.Event()
            threads = _fire_until(f"{server.url}/predict/digits", outcomes, stop)
            # Under full flow (clients start slowly on a busy machine), at a different moment each trial.
            _wait_for_answers(outcomes, 10 + 7 * trial)
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(timeout=60)
            time.sleep(0.3)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            print(f"trial {trial}: {outcomes.statuses}, refused {outcomes.refused}, failed {outcomes.failures[:3]}")
            assert outcomes.failures == [], outcomes.failures
            assert set(outcomes.statuses) == {200}
            assert code == 0, server.log()
        finally:
            server.stop()


@SHAPES
def test_during_the_drain_delay_readiness_says_draining_while_every_request_is_served(tmp_path, exported, frontends):
    import tritonclient.grpc as grpcclient

    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    # Long enough that the probes below still find the port open on a busy machine.
    server = _start(repository, frontends, "--drain-delay-s", "6")
    grpc = grpcclient.InferenceServerClient(url=server.grpc_target)
    try:
        outcomes, stop = Outcomes(), threading.Event()
        threads = _fire_until(f"{server.url}/predict/digits", outcomes, stop, clients=4)
        _wait_for_answers(outcomes, 5)
        before = outcomes.statuses.get(200, 0)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        _wait(lambda: httpx.get(f"{server.url}/health").status_code == 503, "readiness turning 503", server=server)
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "draining" and "draining" in health["reason"]
        assert httpx.get(f"{server.url}/livez").status_code == 200
        assert httpx.head(f"{server.url}/health").status_code == 503
        # Every front end, every protocol: new connections land on any of them.
        for _ in range(4):
            assert httpx.get(f"{server.url}/health").status_code == 503
            assert httpx.get(f"{server.url}/v2/health/ready").status_code != 200
        assert not grpc.is_server_ready() and grpc.is_server_live()
        time.sleep(max(0.0, 5.0 - (time.monotonic() - signalled)))
        during = dict(outcomes.statuses)
        assert server.process.poll() is None, "the process waits out the delay"
        code = server.process.wait(timeout=60)
        assert time.monotonic() - signalled >= 6
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert during.get(200, 0) - before >= 5, f"served during the delay: {during.get(200, 0) - before}"
        assert set(outcomes.statuses) == {200}
        assert outcomes.failures == [], outcomes.failures
        assert code == 0, server.log()
    finally:
        grpc.close()
        server.stop()


@SHAPES
def test_a_drain_cut_short_by_the_shutdown_timeout_says_so_and_exits_1(tmp_path, exported, frontends):
    repository = make_repository(tmp_path, {"slow": exported["slow"]})
    server = _start(repository, frontends, "--max-batch-size", "1", "--shutdown-timeout-s", "0.3")
    try:
        rng = np.random.default_rng(0)
        bodies = [
            [("files", ("x.png", png_bytes(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)), "image/png"))] for _ in range(12)
        ]
        outcomes: list[object] = []

        def post(files) -> None:
            try:
                outcomes.append(httpx.post(f"{server.url}/predict/slow", files=files, timeout=60).status_code)
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=post, args=(b,), daemon=True) for b in bodies]
        for t in threads:
            t.start()
        _wait(
            lambda: metric_value(httpx.get(f"{server.url}/metrics").text, "kos_requests_in_progress") >= 8,
            "requests piling up",
            server=server,
        )
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(timeout=60)
        for t in threads:
            t.join(timeout=60)
        assert code == 1, server.log()
        assert "the drain reached --shutdown-timeout-s (0.3 s)" in server.log()
        # The service's last word (with front ends, one that held no request may have drained cleanly itself).
        last = ([line for line in server.log().splitlines() if "drained" in line] or [""])[-1]
        assert "drained cleanly" not in last and ("drained with errors" in last or frontends == 1), last
    finally:
        server.stop()


@SHAPES
def test_ctrl_c_skips_the_drain_delay(tmp_path, exported, frontends):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    server = _start(repository, frontends, "--drain-delay-s", "30")
    try:
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        assert server.process.wait(timeout=20) == 0
        assert time.monotonic() - started < 10
    finally:
        server.stop()


def test_the_decode_pool_is_sized_by_the_cpus_available_not_the_hosts_cores(tmp_path, exported):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    # The pool is sized when the app starts: one decode thread per available CPU.
    code = (
        "import asyncio, sys\n"
        "from service.app import create_app\n"
        "from service.runtime import resolve_device\n"
        "from service.settings import Settings\n"
        "from kos_core.cpus import available_cpus\n"
        f"app = create_app(Settings(repository={str(repository)!r}, watch_interval_s=0), resolve_device('cpu'))\n"
        "async def main():\n"
        "    async with app.router.lifespan_context(app):\n"
        "        print(app.state.dataplane.decode_pool._max_workers, available_cpus())\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=os.environ)
    workers, cpus = out.stdout.split()
    assert workers == cpus, out.stderr


def test_a_port_in_use_fails_start_up_with_a_non_zero_exit(tmp_path, exported):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service", "--port", str(port), "--repository", str(repository)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode != 0 and "address already in use" in result.stderr.lower()
