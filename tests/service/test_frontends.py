"""`--frontends N`: front-end processes around one owner of the models, as users run it (real processes on loopback)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from kos_core.artifact import ModelMetadata
from kos_core.layout import model_path
from tests.conftest import BUNDLED_REPOSITORY, ROOT, LiveServer
from tests.service.conftest import make_repository, metric_value, png_bytes, post_many

EXAMPLES = sorted((ROOT / "examples" / "digits").glob("*.png"))


def slow_model(folder: Path, size: int = 128) -> Path:
    """A real ONNX file without a training stack: size x size RGB, six 32-channel convolutions, tens of ms per image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["x"], ["c0"], perm=[0, 3, 1, 2]),
    ]
    weights, channels = [], 3
    for i in range(6):
        weights.append(numpy_helper.from_array(rng.normal(0, 0.05, (32, channels, 3, 3)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("Conv", [f"c{i}", f"w{i}"], [f"v{i}"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"v{i}"], [f"c{i + 1}"]))
        channels = 32
    weights.append(numpy_helper.from_array(rng.normal(0, 0.1, (32, 2)).astype(np.float32), "dense"))
    nodes += [
        helper.make_node("GlobalAveragePool", ["c6"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    metadata = ModelMetadata(
        name="slow",
        labels=["yes", "no"],
        height=size,
        width=size,
        channels=3,
        color_mode="rgb",
        architecture="slow",
        dataset="none",
    )
    for key, value in metadata.to_metadata_props().items():
        model.metadata_props.add(key=key, value=value)
    path = folder / f"slow{size}.onnx"
    onnx.save(model, path)
    return path


def slow_bodies(count: int, size: int = 128) -> list[list[tuple]]:
    rng = np.random.default_rng(1)
    return [
        [("files", ("slow.png", png_bytes(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), "image/png"))]
        for _ in range(count)
    ]


def children(server: LiveServer) -> dict[str, list[int]]:
    """The supervisor's children by role, from /proc."""
    pid = server.process.pid
    found: dict[str, list[int]] = {"owner": [], "frontend": []}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"service.frontends" in argv:
            found[argv[argv.index(b"service.frontends") + 1].decode()].append(int(child))
    return found


def run_folder(server: LiveServer) -> Path:
    """The folder the supervisor made for its processes, as its children were told."""
    argv = Path(f"/proc/{children(server)['owner'][0]}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--run-folder") + 1].decode())


def wait_ready(server: LiveServer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200 and len(children(server)["frontend"]) >= 2:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"not ready within {timeout}s:\n{server.log()}")


def upload(paths: list[Path]) -> list[tuple]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The same repository served by one process and by two front ends around an owner."""
    repository = make_repository(tmp_path_factory.mktemp("repository"), {"digits": model_path(BUNDLED_REPOSITORY, "digits", 1)})
    single = LiveServer(repository, ["--watch-interval-s", "0.3"])
    multi = LiveServer(repository, ["--frontends", "2", "--grpc-port", "0", "--watch-interval-s", "0.3"])
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


async def test_a_full_queue_answers_503_with_retry_after_from_every_front_end(tmp_path, start_server):
    repository = make_repository(tmp_path / "repository", {"slow": slow_model(tmp_path)})
    server = start_server(
        repository,
        "--frontends",
        "2",
        "--grpc-port",
        "0",
        "--max-batch-size",
        "1",
        "--queue-size",
        "2",
        "--max-files-per-request",
        "2",
    )
    wait_ready(server)
    responses = await post_many(f"{server.url}/predict/slow", slow_bodies(24))
    refused = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert len(refused) >= 8 and len(served) >= 2 and len(refused) + len(served) == 24, [r.status_code for r in responses]
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1 and "queue" in r.json()["detail"]
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "kos_requests_total", model="slow", status="503") == len(refused)
    assert metric_value(text, "kos_images_total", model="slow") == len(served), "a refused request ran"


async def test_a_deadline_passing_answers_504_and_its_images_never_run(tmp_path, start_server):
    repository = make_repository(tmp_path / "repository", {"slow": slow_model(tmp_path)})
    server = start_server(
        repository, "--frontends", "2", "--grpc-port", "0", "--max-batch-size", "1", "--request-timeout-s", "0.15"
    )
    wait_ready(server)
    responses = await post_many(f"{server.url}/predict/slow", slow_bodies(24))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 504} and statuses.count(504) >= 4, statuses
    assert all("deadline" in r.json()["detail"] for r in responses if r.status_code == 504)
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "kos_images_total", model="slow") == statuses.count(200), "an expired image was run"
    assert metric_value(text, "kos_deadline_expired_images_total", model="slow") == statuses.count(504)
    # Answered requests hold no queue places: the queue is empty and a lone request is not refused.
    assert metric_value(text, "kos_queue_depth", model="slow") == 0
    assert httpx.post(f"{server.url}/predict/slow", files=slow_bodies(1)[0]).status_code != 503


@pytest.fixture(scope="module")
def crashing(tmp_path_factory):
    """Two front ends serving digits and the slow model, for the tests that kill processes (in file order)."""
    folder = tmp_path_factory.mktemp("crashing")
    repository = make_repository(
        folder / "repository", {"digits": model_path(BUNDLED_REPOSITORY, "digits", 1), "slow": slow_model(folder, 256)}
    )
    server = LiveServer(repository, ["--frontends", "2", "--grpc-port", "0", "--watch-interval-s", "0"])
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
    ("flags", "says"),
    [(["--grpc-port", "8001"], "--grpc-port 0"), (["--grpc-port", "0", "--drain-delay-s", "5"], "--drain-delay-s")],
)
def test_what_front_ends_cannot_keep_yet_is_refused_at_start_with_the_fix(tmp_path, flags, says):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "service", "--frontends", "2", "--repository", str(tmp_path), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and says in done.stderr + done.stdout, done.stderr
