"""The service as users run it: `python -m service` on a free port, real ONNX files, real image uploads."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from kos_core.layout import model_path
from tests.conftest import BUNDLED_REPOSITORY, ROOT, LiveServer, free_port, load_benchmark, onnx_predict
from tests.service.conftest import SHAPES, make_repository, metric_value, png_bytes, post_many, shape


def _pngs(arrays: np.ndarray, prefix: str = "img") -> list[tuple]:
    return [
        ("files", (f"{prefix}{i}.png", png_bytes(a[:, :, 0] if a.shape[-1] == 1 else a), "image/png"))
        for i, a in enumerate(arrays)
    ]


@pytest.fixture(scope="module")
def mixed_server(tmp_path_factory, exported):
    """digits, a tiny RGB model and a model that fails on all-white images, with small limits."""
    repository = make_repository(tmp_path_factory.mktemp("mixed"), {k: exported[k] for k in ("digits", "rgb", "fragile")})
    server = LiveServer(
        repository,
        [
            "--max-upload-bytes",
            "300000",
            "--max-image-pixels",
            "1000000",
            "--max-files-per-request",
            "64",
            "--watch-interval-s",
            "0",
        ],
    )
    try:
        server.wait_until_listening()
        yield server
    finally:
        server.stop()


async def test_200_concurrent_requests_each_get_their_own_answer_in_shared_batches(mixed_server, digits_test_split, exported):
    images = digits_test_split.x[:200]
    expected = onnx_predict(exported["digits"], images)
    bodies = [_pngs(images[i : i + 1], prefix=f"digit{i}-") for i in range(200)]
    responses = await post_many(f"{mixed_server.url}/predict/digits?top_k=1", bodies)
    for i, r in enumerate(responses):
        assert r.status_code == 200, r.text
        (prediction,) = r.json()["predictions"]
        assert prediction["filename"] == f"digit{i}-0.png"
        assert int(prediction["label"]) == expected[i].argmax()
        assert prediction["probability"] == pytest.approx(float(expected[i].max()), abs=1e-5)
    metrics = httpx.get(f"{mixed_server.url}/metrics").text
    batches = metric_value(metrics, "kos_batch_size_count", model="digits")
    batched_images = metric_value(metrics, "kos_batch_size_sum", model="digits")
    assert batched_images >= 200 and batched_images / batches > 1, f"{batched_images} images in {batches} batches: no batching"
    assert metric_value(metrics, "kos_requests_total", model="digits", status="200") >= 200


def _rgb_reference(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_every_format_and_colour_mode_is_served_like_the_model_predicts_in_process(mixed_server, exported):
    rng = np.random.default_rng(5)
    picture = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8), mode="RGB")
    opaque = {
        "rgb.png": _encoded(picture, "PNG"),
        "rgb.jpg": _encoded(picture, "JPEG", quality=92),
        "rgb.webp": _encoded(picture, "WEBP", lossless=True),
        "rgb.bmp": _encoded(picture, "BMP"),
        "rgb.tif": _encoded(picture, "TIFF"),
        "palette.gif": _encoded(picture.quantize(200), "GIF"),
        "grey.png": _encoded(picture.convert("L"), "PNG"),
        "bilevel.png": _encoded(picture.convert("1"), "PNG"),
        "cmyk.jpg": _encoded(picture.convert("CMYK"), "JPEG", quality=92),
        "cmyk.tif": _encoded(picture.convert("CMYK"), "TIFF"),
        "deep.png": _encoded(Image.fromarray(np.asarray(picture.convert("L")).astype(np.uint16) * 257), "PNG"),
    }
    references = {name: _rgb_reference(Image.open(io.BytesIO(data))) for name, data in opaque.items()}
    references["deep.png"] = _rgb_reference(picture.convert("L"))  # 16-bit keeps its top byte: the 8-bit picture
    rgba = np.dstack([np.asarray(picture), np.full((48, 40), 255, np.uint8)])
    rgba[:, 20:, 3] = 0  # right half transparent
    transparent = {"rgba.png": Image.fromarray(rgba, mode="RGBA"), "la.png": Image.fromarray(rgba, mode="RGBA").convert("LA")}
    for name, image in transparent.items():
        opaque[name] = _encoded(image, "PNG")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        references[name] = _rgb_reference(Image.alpha_composite(white, image.convert("RGBA")))
    names = list(opaque)
    r = httpx.post(
        f"{mixed_server.url}/predict/rgb?top_k=4",
        files=[("files", (n, opaque[n], "application/octet-stream")) for n in names],
        timeout=60,
    )
    assert r.status_code == 200, r.text
    expected = onnx_predict(exported["rgb"], np.stack([references[n] for n in names]))
    for name, prediction, probabilities in zip(names, r.json()["predictions"], expected):
        assert prediction["filename"] == name
        got = sorted((t["index"], t["probability"]) for t in prediction["top_k"])
        np.testing.assert_allclose([p for _, p in got], probabilities, atol=1e-5, err_msg=name)


def test_a_failing_batch_answers_json_500_without_internals_and_the_next_request_succeeds(mixed_server):
    white = np.full((1, 8, 8, 1), 255, np.uint8)
    r = httpx.post(f"{mixed_server.url}/predict/fragile", files=_pngs(white), timeout=30)
    assert r.status_code == 500
    detail = r.json()["detail"]
    assert "fragile" in detail and "Reshape" not in detail and "onnxruntime" not in detail.lower()
    grey = np.full((2, 8, 8, 1), 100, np.uint8)
    r = httpx.post(f"{mixed_server.url}/predict/fragile", files=_pngs(grey), timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{mixed_server.url}/health").status_code == 200


def test_non_finite_probabilities_are_a_json_500_naming_the_file_and_the_service_goes_on(mixed_server):
    black, grey = np.zeros((1, 8, 8, 1), np.uint8), np.full((1, 8, 8, 1), 100, np.uint8)
    files = [
        ("files", ("grey.png", png_bytes(grey[0, :, :, 0]), "image/png")),
        ("files", ("black.png", png_bytes(black[0, :, :, 0]), "image/png")),
    ]
    r = httpx.post(f"{mixed_server.url}/predict/fragile", files=files, timeout=30)
    assert r.status_code == 500
    assert r.json()["detail"] == "model 'fragile' version 1 returned non-finite probabilities (NaN or infinity) for black.png"
    r = httpx.post(f"{mixed_server.url}/predict/fragile", files=files[:1], timeout=30)
    assert r.status_code == 200 and np.isfinite(r.json()["predictions"][0]["probability"])


async def test_a_failing_batch_fails_only_the_requests_batched_with_it(mixed_server):
    rng = np.random.default_rng(3)
    bodies = [_pngs(rng.integers(0, 200, (1, 8, 8, 1), dtype=np.uint8)) for _ in range(40)]
    bodies[20] = _pngs(np.full((1, 8, 8, 1), 255, np.uint8))
    failed_batches = _failed_batches(mixed_server.url)
    responses = await post_many(f"{mixed_server.url}/predict/fragile", bodies)
    statuses = [r.status_code for r in responses]
    assert statuses[20] == 500
    assert set(statuses) <= {200, 500}
    # Exactly one batch failed (the white image's), it held at most the default 32 images, and
    # every request outside it was answered.
    assert _failed_batches(mixed_server.url) - failed_batches == 1
    assert statuses.count(500) <= 32 and statuses.count(200) >= 8, statuses


def _failed_batches(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('kos_batch_failures_total{model="fragile"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _truncated_jpeg() -> bytes:
    whole = _encoded(Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)), "JPEG")
    return whole[: len(whole) - 60]


def test_every_client_error_is_json_with_a_detail(mixed_server):
    url = mixed_server.url
    png = png_bytes(np.zeros((8, 8), np.uint8), mode="L")
    one = [("files", ("zero.png", png, "image/png"))]
    cases = [
        (httpx.post(f"{url}/predict/cats", files=one), 404, "cats"),
        (httpx.post(f"{url}/predict/digits?version=9", files=one), 404, "version 9"),
        # A superscript two: a digit to str.isdigit(), no number to int().
        (httpx.post(f"{url}/predict/digits?version=\u00b2", files=one), 422, "version"),
        (httpx.post(f"{url}/predict/digits", files=[("files", ("notes.txt", b"hello", "text/plain"))]), 415, "notes.txt"),
        # A plain JPEG cut short in its scan: the direct decoder declines it, and Pillow calls it unreadable.
        (httpx.post(f"{url}/predict/digits", files=[("files", ("cut.jpg", _truncated_jpeg(), "image/jpeg"))]), 415, "cut.jpg"),
        (httpx.post(f"{url}/predict/digits", data={"x": "1"}), 422, "files"),
        (httpx.post(f"{url}/predict/digits?top_k=0", files=one), 422, "top_k"),
        (httpx.post(f"{url}/predict/digits", files=one * 65), 422, "65 files"),
        (
            httpx.post(
                f"{url}/predict/digits", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}
            ),
            422,
            "files",
        ),
        (httpx.post(f"{url}/predict/digits", content=b"abc", headers={"content-type": "multipart/form-data"}), 422, "multipart"),
        (
            httpx.post(
                f"{url}/predict/digits", files=[("files", ("big.png", png_bytes(np.zeros((1000, 1001), np.uint8)), "image/png"))]
            ),
            413,
            "big.png",
        ),
        (httpx.post(f"{url}/predict/digits", files=[("files", ("huge.bin", b"\0" * 400_000, "image/png"))]), 413, "300000 bytes"),
        (httpx.get(f"{url}/models/cats"), 404, "cats"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        assert response.headers["content-type"].startswith("application/json")
        assert words in response.json()["detail"], response.json()
    assert httpx.get(f"{url}/health").status_code == 200


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a 413 closes it)."""
    received = b""
    while chunk := s.recv(65536):
        received += chunk
    return received


def test_a_body_over_the_limit_is_refused_while_it_streams_in(mixed_server):
    with socket.create_connection(("127.0.0.1", mixed_server.port), timeout=15) as s:
        s.sendall(
            b"POST /predict/digits HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + b"\0" * 310_000
        s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
        # The body is left unfinished: only an answer given while reading can arrive.
        answer = _read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"300000 bytes" in answer


def test_a_declared_content_length_over_the_limit_is_refused_before_reading(mixed_server):
    with socket.create_connection(("127.0.0.1", mixed_server.port), timeout=15) as s:
        s.sendall(
            b"POST /predict/digits HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000000\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n"
        )
        answer = _read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_openapi_documents_every_error_of_predict_with_an_example(mixed_server):
    spec = httpx.get(f"{mixed_server.url}/openapi.json").json()
    responses = spec["paths"]["/predict/{model}"]["post"]["responses"]
    assert {"200", "401", "404", "413", "415", "422", "500", "503", "504"} <= set(responses)
    for status in ("401", "404", "413", "415", "422", "500", "503", "504"):
        examples = responses[status]["content"]["application/json"]["examples"]
        assert examples and all(e["value"]["detail"] for e in examples.values()), status
    assert "Retry-After" in responses["503"]["headers"]
    assert "/metrics" in spec["paths"] and spec["paths"]["/models/{model}"]["get"]["responses"]["404"]


def test_metrics_expose_requests_latency_images_batches_queue_and_inference(mixed_server):
    httpx.post(f"{mixed_server.url}/predict/digits", files=_pngs(np.zeros((3, 8, 8, 1), np.uint8)))
    text = httpx.get(f"{mixed_server.url}/metrics").text
    for name in (
        "kos_requests_total",
        "kos_request_latency_seconds_bucket",
        "kos_images_total",
        "kos_batch_size_bucket",
        "kos_queue_wait_seconds_bucket",
        "kos_inference_seconds_bucket",
        "kos_queue_depth",
        "kos_requests_in_progress",
    ):
        assert name in text, name
    assert metric_value(text, "kos_images_total", model="digits") >= 3


def test_health_and_models_show_the_device_really_used(mixed_server, no_working_cuda):
    health = httpx.get(f"{mixed_server.url}/health").json()
    assert health["status"] == "ready"
    assert health["device"]["providers"] == ["CPUExecutionProvider"]
    assert "CPU" in health["device"]["reason"]
    models = httpx.get(f"{mixed_server.url}/models").json()["models"]
    assert {(m["name"], m["version"]) for m in models} == {("digits", 1), ("fragile", 1), ("rgb", 1)}
    assert all(m["providers"] == ["CPUExecutionProvider"] for m in models)


def test_a_model_that_fails_to_load_is_reported_and_the_others_are_served(tmp_path, start_server, exported, digit_pngs):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    broken = model_path(repository, "broken", 1)
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"this is not an onnx file")
    server = start_server(repository, "--watch-interval-s", "0")
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503
    states = {m["name"]: m for m in health.json()["models"]}
    assert states["broken"]["state"] == "failed" and states["broken"]["error"]
    # The cause names the file inside the repository, never its path on the server.
    assert "broken/1/model.onnx" in states["broken"]["error"] and str(tmp_path) not in states["broken"]["error"]
    assert states["digits"]["state"] == "ready"
    r = httpx.post(f"{server.url}/predict/broken", files=_pngs(np.zeros((1, 8, 8, 1), np.uint8)))
    # Only an operator can fix a file that failed to load: no Retry-After that would invite retries.
    assert r.status_code == 503 and "Retry-After" not in r.headers and "operator" in r.json()["detail"]
    assert str(tmp_path) not in r.text and "Protobuf" not in r.text
    listed = {m["name"]: m for m in httpx.get(f"{server.url}/models").json()["models"]}
    assert listed["broken"]["state"] == "failed"
    path, _ = digit_pngs[0]
    r = httpx.post(f"{server.url}/predict/digits", files=[("files", (path.name, path.read_bytes(), "image/png"))])
    assert r.status_code == 200


def _slow_bodies(count: int) -> list[list[tuple]]:
    rng = np.random.default_rng(0)
    return [_pngs(rng.integers(0, 256, (1, 128, 128, 3), dtype=np.uint8)) for _ in range(count)]


@SHAPES
async def test_full_queue_answers_503_with_retry_after_at_once(tmp_path, start_server, exported, frontends):
    repository = make_repository(tmp_path, {"slow": exported["slow"]})
    server = start_server(
        repository,
        "--max-batch-size",
        "1",
        "--queue-size",
        "2",
        "--max-files-per-request",
        "2",
        "--watch-interval-s",
        "0",
        *shape(frontends),
    )
    limits = httpx.Limits(max_connections=20, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def timed(files):
            started = time.monotonic()
            response = await client.post(f"{server.url}/predict/slow", files=files)
            return response, time.monotonic() - started

        results = await asyncio.gather(*(timed(files) for files in _slow_bodies(16)))
    refused = [(r, t) for r, t in results if r.status_code == 503]
    served = [(r, t) for r, t in results if r.status_code == 200]
    # The queue holds two images; at most one more is running: 2 or 3 are served, the rest refused.
    assert len(refused) >= 8 and len(served) >= 2 and len(refused) + len(served) == 16
    for r, _ in refused:
        assert int(r.headers["Retry-After"]) >= 1 and "queue" in r.json()["detail"]
    # Refused at once: faster than the slowest request that was served after queueing.
    assert min(t for _, t in refused) < max(t for _, t in served)
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "kos_requests_total", model="slow", status="503") == len(refused)
    assert metric_value(text, "kos_images_total", model="slow") == len(served), "a refused request ran"


@SHAPES
async def test_deadline_passing_in_the_queue_answers_504_and_its_images_never_run(tmp_path, start_server, exported, frontends):
    repository = make_repository(tmp_path, {"slow": exported["slow"]})
    server = start_server(
        repository, "--max-batch-size", "1", "--request-timeout-s", "0.4", "--watch-interval-s", "0", *shape(frontends)
    )
    responses = await post_many(f"{server.url}/predict/slow", _slow_bodies(12))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 504} and statuses.count(504) >= 4, statuses
    assert all("deadline" in r.json()["detail"] for r in responses if r.status_code == 504)
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "kos_images_total", model="slow") == statuses.count(200), "an expired image was run"
    assert metric_value(text, "kos_deadline_expired_images_total", model="slow") == statuses.count(504)
    # Answered requests hold no queue places: the queue is empty and a lone request is not refused.
    assert metric_value(text, "kos_queue_depth", model="slow") == 0
    assert httpx.post(f"{server.url}/predict/slow", files=_slow_bodies(1)[0], timeout=60).status_code == 200


@SHAPES
async def test_shutdown_stops_taking_requests_and_finishes_those_in_flight(tmp_path, start_server, exported, frontends):
    repository = make_repository(tmp_path, {"slow": exported["slow"]})
    server = start_server(repository, "--max-batch-size", "2", "--watch-interval-s", "0", *shape(frontends))
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        pending = [asyncio.ensure_future(client.post(f"{server.url}/predict/slow", files=f)) for f in _slow_bodies(8)]
        for _ in range(200):
            text = (await client.get(f"{server.url}/metrics")).text
            if metric_value(text, "kos_requests_in_progress") == 8:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the 8 requests never were all in flight")
        server.process.send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*pending)
        assert [r.status_code for r in responses] == [200] * 8
        with pytest.raises(httpx.TransportError):
            await client.post(f"{server.url}/predict/slow", files=_slow_bodies(1)[0])
    # A clean drain exits 0: supervisors must not record a failure.
    assert server.process.wait(timeout=30) == 0
    assert "Application shutdown complete" in server.log()


async def test_models_added_and_replaced_while_running_are_served_without_a_failed_request(tmp_path, start_server, exported):
    import onnx

    from export.repository import write_atomically

    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    server = start_server(repository, "--watch-interval-s", "0.2")
    digit = _pngs(np.zeros((1, 8, 8, 1), np.uint8))
    statuses: list[int] = []
    versions: list[int] = []
    stop = asyncio.Event()

    async def keep_asking(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            r = await client.post(f"{server.url}/predict/digits", files=digit)
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.append(r.json()["version"])

    async def wait_for(check, what: str, client: httpx.AsyncClient) -> None:
        for _ in range(300):
            if await check(client):
                return
            await asyncio.sleep(0.1)
        pytest.fail(f"{what} did not happen within 30 s:\n{server.log()[-3000:]}")

    async with httpx.AsyncClient(timeout=60) as client:
        askers = [asyncio.ensure_future(keep_asking(client)) for _ in range(4)]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(write_atomically, {"model.onnx": onnx.load(exported["rgb"])}, repository, "rgb", 1)

        async def rgb_served(c):
            files = [("files", ("x.png", png_bytes(np.zeros((32, 32, 3), np.uint8)), "image/png"))]
            return (await c.post(f"{server.url}/predict/rgb", files=files)).status_code == 200

        await wait_for(rgb_served, "serving the added model", client)
        await asyncio.to_thread(write_atomically, {"model.onnx": onnx.load(exported["digits"])}, repository, "digits", 1, True)
        await wait_for(lambda c: _logged(server, "digits v1: replaced"), "replacing digits v1", client)
        await asyncio.to_thread(write_atomically, {"model.onnx": onnx.load(exported["digits"])}, repository, "digits", 2)

        async def v2_served(c):
            return bool(versions) and versions[-1] == 2

        await wait_for(v2_served, "serving digits v2", client)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*askers)
    assert len(statuses) > 20 and set(statuses) == {200}, statuses
    assert versions[0] == 1 and versions[-1] == 2
    assert httpx.get(f"{server.url}/health").status_code == 200


async def _logged(server: LiveServer, text: str) -> bool:
    return text in server.log()


def test_api_key_guards_predict_and_models_but_not_health(tmp_path, start_server, exported, digit_pngs):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    server = start_server(repository, "--watch-interval-s", "0", env={"KOS_API_KEY": "s3cret"})
    path, _ = digit_pngs[0]
    files = [("files", (path.name, path.read_bytes(), "image/png"))]
    r = httpx.post(f"{server.url}/predict/digits", files=files)
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert httpx.post(f"{server.url}/predict/digits", files=files, headers={"X-API-Key": "wrong"}).status_code == 401
    assert httpx.get(f"{server.url}/models").status_code == 401
    assert httpx.post(f"{server.url}/predict/digits", files=files, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert httpx.get(f"{server.url}/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200


def test_cors_origins_and_json_logs(tmp_path, start_server, exported):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    server = start_server(repository, "--cors-origins", "https://app.example", "--log-format", "json", "--watch-interval-s", "0")
    preflight = httpx.options(
        f"{server.url}/predict/digits",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.get(f"{server.url}/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    lines = [line for line in server.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert any("loaded digits v1" in r["message"] for r in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


def test_device_cuda_refuses_to_start_where_cuda_does_not_work(bundled_repository, no_working_cuda):
    # onnxruntime-gpu lists CUDAExecutionProvider here, but the CUDA libraries are missing: the real fall-back case.
    assert "CUDAExecutionProvider" in ort.get_available_providers()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "--device",
            "cuda",
            "--port",
            str(free_port()),
            "--repository",
            str(bundled_repository),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "cannot start: device=cuda but onnxruntime could not start CUDA" in result.stderr


def test_the_service_process_never_imports_tensorflow(tmp_path, exported, digit_pngs):
    repository = make_repository(tmp_path, {"digits": exported["digits"], "rgb": exported["rgb"]})
    port = free_port()
    # The real entry point, with a hook that reports at exit whether TensorFlow was ever imported.
    code = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('tensorflow imported' if 'tensorflow' in sys.modules else 'no tensorflow', flush=True))\n"
        f"sys.argv = ['service', '--port', '{port}', '--repository', {str(repository)!r}]\n"
        "runpy.run_module('service', run_name='__main__', alter_sys=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        path, _ = digit_pngs[0]
        r = httpx.post(f"{url}/predict/digits", files=[("files", (path.name, path.read_bytes(), "image/png"))])
        assert r.status_code == 200
    finally:
        # SIGINT: uvicorn shuts down, then re-raises it as KeyboardInterrupt, and the atexit hook runs.
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    assert out.strip().splitlines()[-1] == "no tensorflow"


def test_settings_come_from_environment_variables_and_flags_win(tmp_path, start_server, exported):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    server = start_server(
        Path(repository), "--max-files-per-request", "2", env={"KOS_MAX_FILES_PER_REQUEST": "1", "KOS_WATCH_INTERVAL_S": "0"}
    )
    files = _pngs(np.zeros((2, 8, 8, 1), np.uint8))
    assert httpx.post(f"{server.url}/predict/digits", files=files).status_code == 200
    assert httpx.post(f"{server.url}/predict/digits", files=files * 2).status_code == 422


def test_a_failed_new_version_leaves_the_node_ready_while_the_older_one_serves(tmp_path, start_server, exported, digit_pngs):
    repository = make_repository(tmp_path, {"digits": exported["digits"]})
    half_copied = model_path(repository, "digits", 2)
    half_copied.parent.mkdir(parents=True)
    half_copied.write_bytes(exported["digits"].read_bytes()[:1000])
    server = start_server(repository, "--watch-interval-s", "0")
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200
    states = {m["version"]: m["state"] for m in health.json()["models"]}
    assert states == {1: "ready", 2: "failed"}
    path, _ = digit_pngs[0]
    upload = [("files", (path.name, path.read_bytes(), "image/png"))]
    r = httpx.post(f"{server.url}/predict/digits", files=upload)
    assert r.status_code == 200 and r.json()["version"] == 1
    assert httpx.post(f"{server.url}/predict/digits?version=2", files=upload).status_code == 503


@SHAPES
async def test_a_client_that_goes_away_mid_upload_is_counted_499_not_as_a_server_error(
    start_server, bundled_repository, frontends
):
    server = start_server(bundled_repository, *shape(frontends))
    head = (
        "POST /predict/digits HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n--xyz\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(head.encode())
        await asyncio.sleep(0.3)  # the body never comes: the client hangs up
    for _ in range(50):
        text = httpx.get(f"{server.url}/metrics").text
        if 'status="499"' in text:
            break
        await asyncio.sleep(0.1)
    assert metric_value(text, "kos_requests_total", model="digits", status="499", protocol="multipart") == 1, text
    assert 'status="500"' not in text
    assert httpx.get(f"{server.url}/health").status_code == 200


# --- overload, deadlines and clients that go away (issue 16), in both shapes ---------------------


async def _closed_loop(port: int, path: str, files: list[tuple], clients: int, seconds: float) -> dict[int, int]:
    """`clients` connections, each sending its next request as soon as the last is answered, for `seconds`: statuses.

    The client of benchmarks/overload_bench.py: plain sockets and the request's bytes built once, so that
    the flood costs this machine far less than the service it floods (0: a connection that failed).
    """
    bench = load_benchmark("overload_bench")
    request = httpx.Request("POST", f"http://127.0.0.1:{port}{path}", files=files)
    raw = f"POST {path} HTTP/1.1\r\n".encode()
    raw += "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()).encode() + b"\r\n" + request.read()
    statuses: dict[int, int] = {}
    for status, _ in await bench.flood("127.0.0.1", port, raw, clients, seconds):
        statuses[status] = statuses.get(status, 0) + 1
    return statuses


@SHAPES
async def test_under_a_deadline_flood_only_live_images_hold_queue_places_and_every_expired_image_is_counted(
    tmp_path, start_server, exported, frontends
):
    # 200 single-image clients against a 50 ms deadline on a model slower than that: at most 200
    # images can be live, far below the queue's 512, so nobody may be refused; images of requests
    # already answered 504 must hold no place in the queue.
    repository = make_repository(tmp_path, {"slow": exported["slow"]})
    server = start_server(
        repository, "--request-timeout-s", "0.05", "--max-batch-size", "2", "--watch-interval-s", "0", *shape(frontends)
    )
    samples: list[tuple[float, float]] = []
    done = asyncio.Event()

    async def sample() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            while not done.is_set():
                text = (await client.get(f"{server.url}/metrics")).text
                samples.append(
                    (metric_value(text, "kos_queue_depth", model="slow"), metric_value(text, "kos_requests_in_progress"))
                )
                await asyncio.sleep(0.1)

    sampler = asyncio.ensure_future(sample())
    try:
        statuses = await _closed_loop(server.port, "/predict/slow", _slow_bodies(1)[0], 200, 4.0)
    finally:
        done.set()
        await sampler
    depths = [depth for depth, _ in samples]
    print(
        f"statuses {statuses}; queue depth sampled: max {max(depths)} over {len(depths)} scrapes; (depth, in progress) {samples[:12]}"
    )
    assert set(statuses) <= {200, 504} and statuses.get(504, 0) > 0, statuses
    assert max(depths) <= 200, f"more images counted as queued than can be live: {max(depths)}"
    text = httpx.get(f"{server.url}/metrics").text
    # Every image that did not run because its deadline passed is counted, whichever process noticed.
    assert metric_value(text, "kos_requests_total", model="slow", status="504") == statuses[504]
    assert metric_value(text, "kos_deadline_expired_images_total", model="slow") == statuses[504]
    assert metric_value(text, "kos_images_total", model="slow") == statuses.get(200, 0)
    assert metric_value(text, "kos_queue_depth", model="slow") == 0
    r = httpx.post(f"{server.url}/predict/slow", files=_slow_bodies(1)[0], timeout=60)
    assert r.status_code in (200, 504) and "queue" not in r.text


def _read_answer(sock: socket.socket) -> bytes:
    """An HTTP answer's head and body as far as it has come (the server keeps the connection open)."""
    received = b""
    while b"\r\n\r\n" not in received or len(received) < received.index(b"\r\n\r\n") + 4 + _content_length(received):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return received


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


@SHAPES
async def test_a_full_queue_is_refused_before_the_body_is_read(tmp_path, start_server, exported, frontends):
    repository = make_repository(tmp_path, {"slow": exported["slow"]})
    server = start_server(
        repository,
        "--max-batch-size",
        "1",
        "--queue-size",
        "2",
        "--max-files-per-request",
        "2",
        "--watch-interval-s",
        "0",
        *shape(frontends),
    )
    # Clients that keep the queue full: each sends its next two images as soon as it is answered.
    two = _slow_bodies(2)
    flood = asyncio.ensure_future(_closed_loop(server.port, "/predict/slow", two[0] + two[1], 8, 8.0))
    await asyncio.sleep(1.0)
    head = (
        f"POST /predict/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {40_000_000}\r\n\r\n"
    ).encode()
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'
    answers = []
    for _ in range(40):
        # Headers, and a sliver of a body that says it is 40 MB (under the 50 MiB upload limit, so no 413): only an
        # answer given before reading it can come.
        with socket.create_connection(("127.0.0.1", server.port), timeout=1.5) as s:
            started = time.monotonic()
            s.sendall(head + part + b"\0" * 1000)
            try:
                answer = await asyncio.to_thread(_read_answer, s)
            except TimeoutError:
                continue  # a place was free at that moment: the service waits for the body; try again
            answers.append((answer, time.monotonic() - started))
        if answer.startswith(b"HTTP/1.1 503"):
            break
    await flood
    assert answers, "never refused: the queue was never full"
    answer, seconds = answers[-1]
    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"retry-after: " in answer.lower() and b"queue" in answer
    print(f"503 for a 40 MB body with 1 kB sent, after {seconds * 1000:.1f} ms")


@SHAPES
async def test_a_client_that_hangs_up_while_its_request_waits_has_its_images_never_run(
    tmp_path, start_server, exported, frontends
):
    repository = make_repository(tmp_path, {"slow": exported["slow"]})
    server = start_server(repository, "--max-batch-size", "1", "--watch-interval-s", "0", *shape(frontends))
    bodies = _slow_bodies(8)
    requests = [httpx.Request("POST", f"{server.url}/predict/slow", files=files) for files in bodies]
    sockets = []
    for request in requests:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        target = request.url.raw_path.decode()
        headers = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        s.sendall(f"POST {target} HTTP/1.1\r\n{headers}\r\n".encode() + request.read())
        sockets.append(s)
    deadline = time.monotonic() + 30
    while metric_value(text := httpx.get(f"{server.url}/metrics").text, "kos_requests_in_progress") < 8:
        assert time.monotonic() < deadline, "the 8 requests were never all in flight"
        await asyncio.sleep(0.01)
    ran_before = metric_value(text, "kos_images_total", model="slow")
    for s in sockets:
        s.close()  # every client goes away while most of their images wait in the queue
    while metric_value(text := httpx.get(f"{server.url}/metrics").text, "kos_requests_in_progress") > 0:
        assert time.monotonic() < deadline, "the requests of the clients that left were not dropped"
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # time for any image still queued to run, were it run
    text = httpx.get(f"{server.url}/metrics").text
    ran = metric_value(text, "kos_images_total", model="slow") - ran_before
    gone = metric_value(text, "kos_requests_total", model="slow", status="499")
    print(f"{ran_before:.0f} images ran before the clients left, {ran:.0f} after; {gone:.0f} requests counted 499")
    # At most the image that was running when they left (and one taken for the next batch) ran after.
    assert ran <= 2 and gone >= 8 - ran_before - ran, (ran_before, ran, gone)
    assert metric_value(text, "kos_queue_depth", model="slow") == 0
    assert metric_value(text, "kos_images_total", model="slow") < 8
    assert httpx.post(f"{server.url}/predict/slow", files=bodies[0], timeout=60).status_code == 200


def _nice_by_thread(pid: int) -> dict[int, int]:
    """Each thread of `pid` and its nice value, from /proc."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        found[int(task.name)] = int(fields[16])
    return found


def _names_by_thread(pid: int) -> dict[int, str]:
    """Each thread of `pid` and the name the OS shows for it."""
    return {int(task.name): (task / "comm").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are set on Linux only")
@pytest.mark.parametrize("nice", [0, 7])
def test_inference_threads_run_below_the_event_loop_by_inference_nice(start_server, digit_pngs, nice):
    # Two intra-op threads: onnxruntime starts a pool thread of its own, which must inherit the priority too.
    server = start_server(
        BUNDLED_REPOSITORY,
        "--inference-nice",
        str(nice),
        "--intra-op-threads",
        "2",
        "--inference-workers",
        "2",
        "--lone-request-threads",
        "0",
    )
    before = _nice_by_thread(server.process.pid)
    path, _ = digit_pngs[0]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(4):  # the inference threads are started on demand
            assert client.post("/predict/digits", files={"files": (path.name, path.read_bytes(), "image/png")}).status_code == 200
        # Two images in one request decode in the decode pool (a lone image decodes on its inference thread).
        two = [("files", (path.name, path.read_bytes(), "image/png"))] * 2
        assert client.post("/predict/digits", files=two).status_code == 200
    threads = _nice_by_thread(server.process.pid)
    assert threads[server.process.pid] == 0, "the event loop's thread keeps the process's priority"
    lowered = [tid for tid, value in threads.items() if value == nice and tid != server.process.pid]
    if nice == 0:
        assert set(threads.values()) == {0}
    else:
        assert set(threads.values()) <= {0, nice}
        # onnxruntime's pool thread (started with the session) and at least one inference worker (started by the requests).
        assert len([t for t in lowered if t in before]) >= 1, threads
        assert len([t for t in lowered if t not in before]) >= 1, threads
    # Named where `top -H` shows them: the inference workers, the decode pool and, where the session was
    # made on a thread of its own (a lower priority), onnxruntime's pool threads.
    names = _names_by_thread(server.process.pid)
    assert names[server.process.pid] not in {"kos-infer", "kos-decode", "kos-onnxruntime"}
    assert {t for t, name in names.items() if name == "kos-infer"} == {t for t in lowered if t not in before} or nice == 0
    assert len([name for name in names.values() if name == "kos-infer"]) >= 1, names
    assert "kos-decode" in names.values(), names
    if nice:
        assert {t for t, name in names.items() if name == "kos-onnxruntime"} == {t for t in lowered if t in before}, names
