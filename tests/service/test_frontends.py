"""`--frontends N`: front-end processes around one owner of the models, as users run it (real processes on loopback)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from kos_core.layout import model_path
from tests.conftest import BUNDLED_REPOSITORY, ROOT, LiveServer, load_benchmark, onnx_predict
from tests.service.conftest import children, make_repository, metric_value, png_bytes, wait_for_processes

EXAMPLES = sorted((ROOT / "examples" / "digits").glob("*.png"))


def slow_model(folder: Path, size: int = 128) -> Path:
    """A real ONNX file without a training stack, tens of ms per image (benchmarks/overload_bench.py makes it)."""
    return load_benchmark("overload_bench").slow_model(folder, size)


def slow_bodies(count: int, size: int = 128) -> list[list[tuple]]:
    rng = np.random.default_rng(1)
    return [
        [("files", ("slow.png", png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "image/png"))]
        for _ in range(count)
    ]


def run_folder(server: LiveServer) -> Path:
    """The folder the supervisor made for its processes, as its children were told."""
    argv = Path(f"/proc/{children(server)['owner'][0]}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--run-folder") + 1].decode())


def wait_ready(server: LiveServer, timeout: float = 60) -> None:
    """Ready, every front end included (a replaced one too)."""
    wait_for_processes(server, 2, timeout)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def upload(paths: list[Path]) -> list[tuple]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The same repository served by one process and by two front ends around an owner, HTTP and gRPC."""
    repository = make_repository(tmp_path_factory.mktemp("repository"), {"digits": model_path(BUNDLED_REPOSITORY, "digits", 1)})
    single = LiveServer(repository, ["--frontends", "1", "--watch-interval-s", "0.3"])
    multi = LiveServer(repository, ["--frontends", "2", "--watch-interval-s", "0.3"])
    try:
        single.wait_until_listening()
        multi.wait_until_listening()
        wait_ready(multi)
        yield single, multi, repository
    finally:
        single.stop()
        multi.stop()


async def test_each_image_gets_its_own_answer_in_upload_order_as_one_process_answers(shapes, digit_pngs):
    single, multi, _ = shapes
    files = EXAMPLES + [path for path, _ in digit_pngs[:90]]
    # What one process answers for each file alone: the reference.
    reference = {}
    for path in files:
        body = httpx.post(f"{single.url}/predict/digits?top_k=10", files=upload([path])).json()
        reference[path.name] = {s["label"]: s["probability"] for s in body["predictions"][0]["top_k"]}
    rng = random.Random(0)
    requests = [rng.sample(files, rng.randint(1, 6)) for _ in range(64)]
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        responses = await asyncio.gather(
            *(client.post(f"{multi.url}/predict/digits?top_k=10", files=upload(paths)) for paths in requests)
        )
    for paths, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert [p["filename"] for p in predictions] == [p.name for p in paths]
        for path, prediction in zip(paths, predictions):
            got = {s["label"]: s["probability"] for s in prediction["top_k"]}
            assert got.keys() == reference[path.name].keys()
            assert max(abs(got[k] - reference[path.name][k]) for k in got) < 1e-5, path.name
    # The examples are named for their digit: the model gets every one right.
    for path in EXAMPLES:
        best = max(reference[path.name], key=reference[path.name].__getitem__)
        assert best == str(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"].index(path.stem))


def test_bad_input_is_a_clear_4xx_from_a_front_end_and_the_service_stays_healthy(shapes):
    _, multi, _ = shapes
    r = httpx.post(f"{multi.url}/predict/digits", files=[("files", ("notes.txt", b"not an image", "text/plain"))])
    assert r.status_code == 415 and "notes.txt" in r.json()["detail"]
    r = httpx.post(f"{multi.url}/predict/digits", data={"x": "1"})
    assert r.status_code == 422 and r.json()["detail"]
    assert httpx.post(f"{multi.url}/predict/cats", files=upload(EXAMPLES[:1])).status_code == 404
    assert httpx.post(f"{multi.url}/predict/digits", files=upload(EXAMPLES[:1])).status_code == 200


def test_health_and_models_are_the_owners_registry_also_after_a_model_is_added(shapes):
    single, multi, repository = shapes
    health = httpx.get(f"{multi.url}/health")
    assert health.status_code == 200 and health.json() == httpx.get(f"{single.url}/health").json()
    assert httpx.get(f"{multi.url}/models").json() == httpx.get(f"{single.url}/models").json()
    target = model_path(repository, "digits_copy", 1)
    target.parent.mkdir(parents=True)
    shutil.copyfile(model_path(repository, "digits", 1), target)
    try:
        deadline = time.monotonic() + 20
        seen = 0
        while seen < 6 and time.monotonic() < deadline:
            # New connections each time, so that both front ends answer some.
            names = [m["name"] for m in httpx.get(f"{multi.url}/models").json()["models"]]
            seen = seen + 1 if "digits_copy" in names else 0
            time.sleep(0.1)
        assert seen == 6, "the added model did not show on every front end"
        assert httpx.post(f"{multi.url}/predict/digits_copy", files=upload(EXAMPLES[:2])).status_code == 200
    finally:
        shutil.rmtree(target.parent.parent)


def test_metrics_show_one_total_over_every_process(shapes):
    _, multi, _ = shapes
    before = httpx.get(f"{multi.url}/metrics").text
    sent = 40
    for i in range(sent):
        assert httpx.post(f"{multi.url}/predict/digits", files=upload([EXAMPLES[i % 10]])).status_code == 200
    scrapes = [httpx.get(f"{multi.url}/metrics").text for _ in range(6)]
    for text in scrapes:
        for name in ("kos_requests_total", "kos_images_total"):
            grown = metric_value(text, name, model="digits") - metric_value(before, name, model="digits")
            assert grown == sent, (name, grown)
        assert metric_value(text, "kos_requests_in_progress") == 0
    # The totals add up series written by separate processes: both front ends and the owner.
    pids = children(multi)
    written = {int(f.stem.split("_")[-1]) for f in (run_folder(multi) / "metrics").glob("counter_*.db")}
    assert set(pids["owner"]) <= written and len(written & set(pids["frontend"])) >= 1


def _uint8(images: np.ndarray):
    import tritonclient.grpc as grpcclient

    tensor = grpcclient.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


def test_grpc_is_served_by_every_front_end_and_answers_as_one_process_answers(shapes):
    import tritonclient.grpc as grpcclient

    from tests.service.v2_helpers import decoded, example_digits

    single, multi, _ = shapes
    images = np.stack([decoded(png) for _, _, png in example_digits()])
    reference = grpcclient.InferenceServerClient(url=single.grpc_target)
    expected = reference.infer("digits", [_uint8(images)]).as_numpy("probabilities")
    reference.close()
    rng = np.random.default_rng(0)
    # A channel per client: the kernel spreads new connections over the front ends' gRPC sockets.
    for _ in range(12):
        client = grpcclient.InferenceServerClient(url=multi.grpc_target)
        try:
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
            rows = rng.choice(len(images), size=int(rng.integers(1, 6)))
            got = client.infer("digits", [_uint8(images[rows])]).as_numpy("probabilities")
            np.testing.assert_allclose(got, expected[rows], atol=1e-5)
        finally:
            client.close()
    assert list(expected.argmax(axis=1)) == list(range(10))
    listening = [line for line in _ss(multi.grpc_port) if "LISTEN" in line]
    assert len(listening) == 2, f"one gRPC socket per front end: {listening}"


def _ss(port: int) -> list[str]:
    import subprocess

    return subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout.splitlines()


@pytest.mark.parametrize("frontends", [1, 2], ids=["one-process", "front-ends"])
async def test_grpc_and_http_requests_share_batches(tmp_path, start_server, frontends):
    import tritonclient.grpc.aio as grpcaio

    repository = make_repository(tmp_path / "repository", {"slow": slow_model(tmp_path, 128)})
    server = start_server(repository, "--frontends", str(frontends), "--max-batch-size", "4", "--watch-interval-s", "0")
    if frontends > 1:
        wait_ready(server)
    rng = np.random.default_rng(2)
    pictures = rng.integers(0, 256, (32, 128, 128, 3), dtype=np.uint8)
    client = grpcaio.InferenceServerClient(url=server.grpc_target)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=0)
    try:
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:

            async def by_grpc(i: int) -> np.ndarray:
                tensor = grpcaio.InferInput("image", [1, 128, 128, 3], "UINT8")
                tensor.set_data_from_numpy(pictures[i : i + 1])
                return (await client.infer("slow", [tensor])).as_numpy("probabilities")[0]

            async def by_http(i: int) -> np.ndarray:
                files = [("files", (f"{i}.png", png_bytes(pictures[i]), "image/png"))]
                r = await http.post(f"{server.url}/predict/slow?top_k=2", files=files)
                assert r.status_code == 200, r.text
                out = np.zeros(2, np.float32)
                for score in r.json()["predictions"][0]["top_k"]:
                    out[score["index"]] = score["probability"]
                return out

            for _ in range(3):  # rounds, until a batch held both (the first is usually enough)
                calls = [by_grpc(i) if i % 2 else by_http(i) for i in range(32)]
                answers = await asyncio.gather(*calls)
                text = httpx.get(f"{server.url}/metrics").text
                if metric_value(text, "kos_batches_total", model="slow", protocols="multipart+v2-grpc") > 0:
                    break
    finally:
        await client.close()
    expected = onnx_predict(repository / "slow" / "1" / "model.onnx", pictures)
    np.testing.assert_allclose(np.stack(answers), expected, atol=1e-5)
    batches = {p: metric_value(text, "kos_batches_total", model="slow", protocols=p) for p in ("multipart", "v2-grpc")}
    mixed = metric_value(text, "kos_batches_total", model="slow", protocols="multipart+v2-grpc")
    print(f"batches by the protocols they held: {batches}, both: {mixed}")
    assert mixed >= 1, text
    assert metric_value(text, "kos_requests_total", model="slow", protocol="v2-grpc", status="200") >= 16


def test_a_grpc_port_held_by_another_service_fails_start_up(tmp_path):
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "service", "--frontends", "2", "--grpc-port", str(port), "--port", "0"]
            + ["--repository", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0 and "address already in use" in done.stderr.lower(), done.stderr


@pytest.fixture(scope="module")
def crashing(tmp_path_factory):
    """Two front ends serving digits and the slow model, for the tests that kill processes (in file order)."""
    folder = tmp_path_factory.mktemp("crashing")
    repository = make_repository(
        folder / "repository", {"digits": model_path(BUNDLED_REPOSITORY, "digits", 1), "slow": slow_model(folder, 256)}
    )
    server = LiveServer(repository, ["--frontends", "2", "--watch-interval-s", "0"])
    try:
        server.wait_until_listening()
        wait_ready(server)
        yield server
    finally:
        server.stop()


def test_a_front_end_killed_is_replaced_while_the_others_keep_answering(crashing):
    victim, survivor = children(crashing)["frontend"]
    os.kill(victim, signal.SIGKILL)
    # The same port, at once: the survivor takes every new connection while the victim is replaced.
    for i in range(30):
        r = httpx.post(f"{crashing.url}/predict/digits", files=upload([EXAMPLES[i % 10]]))
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        frontends = children(crashing)["frontend"]
        if len(frontends) == 2 and victim not in frontends and survivor in frontends:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the killed front end was not replaced: {children(crashing)}")
    assert "front end 0 (pid" in crashing.log() or "front end 1 (pid" in crashing.log()
    wait_ready(crashing)
    assert httpx.post(f"{crashing.url}/predict/digits", files=upload(EXAMPLES[:3])).status_code == 200


def test_the_owner_killed_makes_every_front_end_answer_503_until_it_is_back(crashing):
    (owner,) = children(crashing)["owner"]
    os.kill(owner, signal.SIGKILL)
    statuses = []
    health = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = httpx.post(f"{crashing.url}/predict/digits", files=upload(EXAMPLES[:1]))
        statuses.append(r.status_code)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) >= 1 and "inference process" in r.json()["detail"]
        if health is None:
            health = httpx.get(f"{crashing.url}/health")
        time.sleep(0.02)
    assert statuses[-1] == 200 and 503 in statuses, statuses
    assert health is not None and health.status_code == 503 and health.json()["status"] == "unavailable"
    assert children(crashing)["owner"] != [owner]


async def test_sigterm_answers_every_request_in_flight_and_exits_0(crashing):
    folder = run_folder(crashing)
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        pending = [asyncio.ensure_future(client.post(f"{crashing.url}/predict/slow", files=f)) for f in slow_bodies(8, 256)]
        for _ in range(200):
            text = (await client.get(f"{crashing.url}/metrics")).text
            if metric_value(text, "kos_requests_in_progress") == 8:
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the 8 requests never were all in flight")
        processes = [crashing.process.pid, *children(crashing)["owner"], *children(crashing)["frontend"]]
        crashing.process.send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*pending)
    assert [r.status_code for r in responses] == [200] * 8
    assert crashing.process.wait(timeout=60) == 0, crashing.log()
    assert "drained cleanly" in crashing.log()
    assert not [pid for pid in processes if running(pid)], "a process outlived the service"
    assert not folder.exists(), "the run folder (sockets, shared memory, metrics) was left behind"


def running(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    ("cpus", "cuda", "linux", "expected"),
    [
        (1, False, True, 1),
        (1, True, True, 1),
        (2, False, True, 1),
        (3, False, True, 2),
        (4, False, True, 2),
        (8, False, True, 4),
        (64, False, True, 8),
        (2, True, True, 2),
        (4, True, True, 3),
        (16, True, True, 8),
        (8, False, False, 1),
    ],
)
def test_the_automatic_count_of_front_ends(cpus, cuda, linux, expected):
    from service.machine import automatic_frontends

    count, why = automatic_frontends(cpus, cuda, linux)
    assert count == expected and why


def test_frontends_n_forces_n_and_0_is_automatic_from_the_cpus_the_process_may_use(monkeypatch):
    import service.machine

    assert service.machine.choose_frontends(3, "cpu")[0] == 3
    monkeypatch.setattr(service.machine, "available_cpus", lambda: 1)
    assert service.machine.choose_frontends(0, "cuda")[0] == 1
    monkeypatch.setattr(service.machine, "available_cpus", lambda: 16)
    monkeypatch.setattr(service.machine, "gpu_present", lambda: True)
    assert service.machine.choose_frontends(0, "auto")[0] == 8
    assert service.machine.choose_frontends(0, "cpu")[0] == 8
    monkeypatch.setattr(service.machine, "gpu_present", lambda: False)
    assert service.machine.choose_frontends(0, "auto")[0] == 8 and service.machine.choose_frontends(0, "auto")[1]


def test_on_one_cpu_the_default_is_one_process():
    import subprocess
    import sys

    from tests.conftest import free_port

    # One CPU in the process's affinity, as in a container with a quota of 1 CPU.
    port = free_port()
    process = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "service", "--port", str(port), "--grpc-port", "0", "--frontends", "0"]
        + ["--repository", str(BUNDLED_REPOSITORY), "--watch-interval-s", "0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        assert not Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split(), "front ends on one CPU"
    finally:
        process.terminate()
        _, err = process.communicate(timeout=60)
    assert "one process: --frontends 0 (automatic): 1 CPU available" in err, err
    assert process.returncode == 0
