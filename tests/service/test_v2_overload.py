"""Overload over the Open Inference Protocol: a full queue and a passed deadline, on REST and on gRPC.

The same batcher serves every protocol, so the refusals are the same; each transport says them in
its own words: `{"error": ...}` with 503 and Retry-After, or 504, on REST; UNAVAILABLE or
DEADLINE_EXCEEDED on gRPC. Nothing refused runs, and the service answers normally afterwards.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from tests.service.conftest import make_repository, metric_value

SLOW_SHAPE = [1, 128, 128, 3]


def _rest_body(seed: int) -> dict:
    image = np.random.default_rng(seed).integers(0, 256, SLOW_SHAPE, dtype=np.uint8)
    return {"inputs": [{"name": "image", "datatype": "UINT8", "shape": SLOW_SHAPE, "data": image.ravel().tolist()}]}


async def _rest_flood(url: str, count: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post(f"{url}/v2/models/slow/infer", json=_rest_body(i)) for i in range(count)))


async def _grpc_flood(target: str, count: int) -> list[object]:
    """Each call's answer, or the InferenceServerException it raised."""
    async with grpcaio.InferenceServerClient(url=target) as client:

        async def one(seed: int) -> object:
            tensor = InferInput("image", SLOW_SHAPE, "UINT8")
            tensor.set_data_from_numpy(np.random.default_rng(seed).integers(0, 256, SLOW_SHAPE, dtype=np.uint8))
            try:
                return await client.infer("slow", [tensor])
            except InferenceServerException as error:
                return error

        return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.fixture
def slow_repository(tmp_path, exported):
    return make_repository(tmp_path, {"slow": exported["slow"]})


async def test_a_full_queue_answers_503_with_retry_after_in_the_protocols_words_on_rest_and_grpc(start_server, slow_repository):
    server = start_server(
        slow_repository, "--max-batch-size", "1", "--queue-size", "2", "--max-files-per-request", "2", "--watch-interval-s", "0"
    )
    responses = await _rest_flood(server.url, 16)
    refused = [r for r in responses if r.status_code == 503]
    assert len(refused) >= 8 and all(r.status_code in (200, 503) for r in responses), [r.status_code for r in responses]
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1 and "queue" in r.json()["error"] and "detail" not in r.json()
    answers = await _grpc_flood(server.grpc_target, 16)
    unavailable = [a for a in answers if isinstance(a, InferenceServerException)]
    assert len(unavailable) >= 8, answers
    assert all(a.status() == "StatusCode.UNAVAILABLE" and "queue" in a.message() for a in unavailable)
    served = len(responses) - len(refused) + len(answers) - len(unavailable)
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "kos_images_total", model="slow") == served, "a refused request ran"
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


async def test_a_passed_deadline_answers_504_in_the_protocols_words_on_rest_and_grpc(start_server, slow_repository):
    server = start_server(slow_repository, "--max-batch-size", "1", "--request-timeout-s", "0.4", "--watch-interval-s", "0")
    responses = await _rest_flood(server.url, 12)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 504} and statuses.count(504) >= 4, statuses
    assert all("deadline" in r.json()["error"] for r in responses if r.status_code == 504)
    answers = await _grpc_flood(server.grpc_target, 12)
    expired = [a for a in answers if isinstance(a, InferenceServerException)]
    assert len(expired) >= 4 and all(a.status() == "StatusCode.DEADLINE_EXCEEDED" for a in expired), answers
    served = statuses.count(200) + len(answers) - len(expired)
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "kos_images_total", model="slow") == served, "an expired image was run"
    assert metric_value(text, "kos_deadline_expired_images_total", model="slow") == statuses.count(504) + len(expired)
