"""Every protocol into one batcher: 200 distinct images at once over multipart, REST v2 and gRPC."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http.aio as http_aio

from tests.conftest import onnx_predict
from tests.service.conftest import metric_value
from tests.service.v2_helpers import ATOL, decoded

IMAGES = 200


async def _multipart(client: httpx.AsyncClient, url: str, name: str, png: bytes) -> np.ndarray:
    response = await client.post(f"{url}/predict/digits?top_k=10", files=[("files", (name, png))])
    response.raise_for_status()
    row = np.zeros(10, dtype=np.float32)
    for score in response.json()["predictions"][0]["top_k"]:
        row[score["index"]] = score["probability"]
    return row


async def _rest(client: http_aio.InferenceServerClient, png: bytes, as_file: bool, tag: str) -> np.ndarray:
    if as_file:
        tensor = http_aio.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([png], dtype=np.object_))
    else:
        tensor = http_aio.InferInput("image", [1, 8, 8, 1], "UINT8")
        tensor.set_data_from_numpy(decoded(png)[None])
    result = await client.infer("digits", [tensor], request_id=tag)
    assert result.get_response()["id"] == tag
    return result.as_numpy("probabilities")[0]


async def _grpc(client: grpc_aio.InferenceServerClient, png: bytes, tag: str) -> np.ndarray:
    tensor = grpc_aio.InferInput("image", [1, 8, 8, 1], "UINT8")
    tensor.set_data_from_numpy(decoded(png)[None])
    result = await client.infer("digits", [tensor], request_id=tag)
    assert result.get_response().id == tag
    return result.as_numpy("probabilities")[0]


async def test_200_concurrent_images_over_three_protocols_each_get_their_own_answer(start_server, bundled_repository, digit_pngs):
    # A longer batch delay than the default, so that on a busy shared machine batches still gather.
    server = start_server(bundled_repository, "--max-batch-delay-ms", "20")
    files = digit_pngs[:IMAGES]
    assert len(files) == IMAGES
    pngs = [path.read_bytes() for path, _ in files]
    expected = onnx_predict(bundled_repository / "digits" / "1" / "model.onnx", np.stack([decoded(p) for p in pngs]))
    limits = httpx.Limits(max_connections=IMAGES, max_keepalive_connections=0)
    rest = http_aio.InferenceServerClient(url=server.url.removeprefix("http://"), conn_limit=IMAGES, conn_timeout=120)
    grpc_client = grpc_aio.InferenceServerClient(url=server.grpc_target)
    try:
        async with httpx.AsyncClient(timeout=120, limits=limits) as multipart:
            calls = []
            for i, png in enumerate(pngs):
                if i % 3 == 0:
                    calls.append(_multipart(multipart, server.url, files[i][0].name, png))
                elif i % 3 == 1:
                    calls.append(_rest(rest, png, as_file=i % 2 == 0, tag=f"r{i}"))
                else:
                    calls.append(_grpc(grpc_client, png, tag=f"g{i}"))
            answers = await asyncio.gather(*calls)
    finally:
        await rest.close()
        await grpc_client.close()
    np.testing.assert_allclose(np.stack(answers), expected, atol=ATOL)
    metrics = httpx.get(server.url + "/metrics").text
    counts = {
        p: metric_value(metrics, "kos_requests_total", model="digits", status="200", protocol=p)
        for p in ("multipart", "v2-rest", "v2-grpc")
    }
    assert counts == {"multipart": 67, "v2-rest": 67, "v2-grpc": 66}
    images = metric_value(metrics, "kos_batch_size_sum", model="digits")
    batches = metric_value(metrics, "kos_batch_size_count", model="digits")
    assert images == IMAGES
    assert images / batches > 1, f"{batches:.0f} batches for {IMAGES} images: the protocols' images were not batched together"
