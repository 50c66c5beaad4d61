"""The Open Inference Protocol over REST: unmodified tritonclient.http against a real service on a free port."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.service.v2_helpers import (
    ATOL,
    decoded,
    encoded,
    example_digits,
    image_client_preprocess,
    predict_probabilities,
    upscaled,
)


@pytest.fixture(scope="module")
def client(bundled_server):
    with httpclient.InferenceServerClient(url=bundled_server.url.removeprefix("http://"), network_timeout=60) as c:
        yield c


def _input(images: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", list(images.shape), "UINT8" if images.dtype == np.uint8 else "BYTES")
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def _files(pngs: list[bytes]) -> np.ndarray:
    return np.array(pngs, dtype=np.object_)


def test_live_ready_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "keras-onnx-serve"
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(metadata["extensions"])


@pytest.mark.parametrize("version", ["", "1"])
def test_model_metadata_ready_and_config_versioned_and_not(client, version):
    assert client.is_model_ready("digits", version)
    metadata = client.get_model_metadata("digits", version)
    assert metadata["platform"] == "onnxruntime_onnx" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 8, 8, 1]}]
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert "BYTES" in metadata["parameters"]["image_bytes"]
    config = client.get_model_config("digits", version)["config"]
    assert config["max_batch_size"] == 64  # the service's max_files_per_request
    assert config["input"] == [{"name": "image", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [8, 8, 1]}]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]
    assert config["dynamic_batching"]["preferred_batch_size"] == [32]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 5000
    assert config["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 512


def test_unknown_model_or_version_is_404_in_the_protocols_shape(bundled_server, client):
    assert not client.is_model_ready("cats")
    for path in ("/v2/models/cats", "/v2/models/digits/versions/7", "/v2/models/digits/versions/7/config"):
        response = httpx.get(bundled_server.url + path)
        assert response.status_code == 404, path
        assert "error" in response.json() and "detail" not in response.json()
    with pytest.raises(InferenceServerException, match="no version 7"):
        client.get_model_metadata("digits", "7")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("version", ["", "1"], ids=["latest", "versioned"])
def test_a_batch_of_8_uint8_images_answers_what_predict_answers(bundled_server, client, binary, version):
    digits = example_digits()[:8]
    images = np.stack([decoded(png) for _, _, png in digits])
    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    result = client.infer("digits", [_input(images, binary)], model_version=version, outputs=wanted, request_id="batch-8")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (8, 10) and probabilities.dtype == np.float32
    expected = predict_probabilities(bundled_server.url, [(name, png) for name, _, png in digits])
    np.testing.assert_allclose(probabilities, expected, atol=ATOL)
    assert result.get_response()["id"] == "batch-8"
    assert result.get_response()["model_version"] == "1"
    assert [int(i) for i in probabilities.argmax(axis=1)] == [label for _, label, _ in digits]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("shape", ["batch", "batch,1"])
def test_encoded_files_as_bytes_are_decoded_as_predict_decodes_them(bundled_server, client, fmt, shape):
    digits = example_digits()
    files = [encoded(np.kron(decoded(png)[:, :, 0], np.ones((4, 4), np.uint8))[:, :, None], fmt) for _, _, png in digits]
    array = _files(files) if shape == "batch" else _files(files).reshape(-1, 1)
    result = client.infer("digits", [_input(array)])
    expected = predict_probabilities(bundled_server.url, [(f"d{i}.{fmt.lower()}", f) for i, f in enumerate(files)])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=ATOL)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_classification_answers_score_index_label_highest_first(bundled_server, client, binary):
    digits = example_digits()
    images = np.stack([decoded(png) for _, _, png in digits])
    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)]
    top = client.infer("digits", [_input(images)], outputs=wanted).as_numpy("probabilities")
    assert top.shape == (10, 3)
    expected = predict_probabilities(bundled_server.url, [(name, png) for name, _, png in digits])
    for row, (_, label, _) in enumerate(digits):
        entries = [(e.decode() if isinstance(e, bytes) else e).split(":") for e in top[row]]
        scores = [float(score) for score, _, _ in entries]
        assert scores == sorted(scores, reverse=True)
        assert entries[0][1] == str(label) and entries[0][2] == str(label)  # the digits' labels are their digits
        assert scores[0] == pytest.approx(expected[row, label], abs=ATOL)


def test_triton_image_client_pattern_gets_the_right_labels(client):
    """Read metadata and config, resize on the client, send UINT8 NHWC, ask for class_count: as image_client.py does."""
    metadata = client.get_model_metadata("digits")
    config = client.get_model_config("digits")["config"]
    assert len(metadata["inputs"]) == 1 and len(metadata["outputs"]) == 1
    input_meta, output_meta, input_config = metadata["inputs"][0], metadata["outputs"][0], config["input"][0]
    assert output_meta["datatype"] == "FP32" and input_config["format"] == "FORMAT_NHWC"
    assert config["max_batch_size"] > 0 and len(input_meta["shape"]) == 4
    height, width, channels = input_meta["shape"][1:]
    digits = example_digits()
    batch = np.stack([image_client_preprocess(upscaled(png), height, width, channels) for _, _, png in digits])
    tensor = httpclient.InferInput(input_meta["name"], list(batch.shape), input_meta["datatype"])
    tensor.set_data_from_numpy(batch)
    wanted = httpclient.InferRequestedOutput(output_meta["name"], class_count=1)
    answers = client.infer(metadata["name"], [tensor], outputs=[wanted]).as_numpy(output_meta["name"])
    labels = [(row[0].decode() if isinstance(row[0], bytes) else row[0]).split(":")[2] for row in answers]
    assert labels == [str(label) for _, label, _ in digits]


def test_no_outputs_asked_answers_every_output_in_binary(bundled_server):
    image = decoded(example_digits()[3][2])[None]
    header = json.dumps(
        {
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 1], "parameters": {"binary_data_size": 64}}],
            "parameters": {"binary_data_output": True, "anything": "accepted"},
        }
    ).encode()
    response = httpx.post(
        bundled_server.url + "/v2/models/digits/infer",
        content=header + image.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:length])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == 40
    probabilities = np.frombuffer(response.content[length:], dtype="<f4")
    assert int(probabilities.argmax()) == 3


def test_plain_json_without_the_client_library(bundled_server):
    image = decoded(example_digits()[7][2])
    body = {
        "id": "plain",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": image.ravel().tolist()}],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}],
    }
    response = httpx.post(bundled_server.url + "/v2/models/digits/versions/1/infer", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "plain" and answer["model_name"] == "digits"
    assert answer["outputs"][0]["datatype"] == "BYTES" and answer["outputs"][0]["shape"] == [1, 2]
    assert answer["outputs"][0]["data"][0].endswith(":7:7")


def _binary_request(header: dict, blob: bytes, length: int | None = None) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(header).encode()
    return raw + blob, {"Inference-Header-Content-Length": str(len(raw) if length is None else length)}


def _image_header(shape, datatype="UINT8", size=64, outputs=None) -> dict:
    header: dict = {"inputs": [{"name": "image", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}]}
    if outputs is not None:
        header["outputs"] = outputs
    return header


BAD_REQUESTS = {
    "wrong shape": (*_binary_request(_image_header([1, 8, 8]), bytes(64)), 400, "does not match"),
    "wrong datatype": (
        *_binary_request(_image_header([1, 8, 8, 1], "FP32", 256), bytes(256)),
        400,
        "datatype FP32 is not accepted",
    ),
    "header length past the body": (*_binary_request(_image_header([1, 8, 8, 1]), bytes(64), 10_000), 400, "body has only"),
    "truncated blob": (*_binary_request(_image_header([1, 8, 8, 1]), bytes(30)), 400, "truncated"),
    "bytes element not an image": (
        *_binary_request(_image_header([1], "BYTES", 13), b"\x09\x00\x00\x00not image"),
        415,
        "image[0]",
    ),
    "unknown output": (
        *_binary_request(_image_header([1, 8, 8, 1], outputs=[{"name": "logits"}]), bytes(64)),
        400,
        "unknown output 'logits'",
    ),
    "classification 0": (
        *_binary_request(
            _image_header([1, 8, 8, 1], outputs=[{"name": "probabilities", "parameters": {"classification": 0}}]), bytes(64)
        ),
        400,
        "classification must be a positive integer",
    ),
    "classification over the class count": (
        *_binary_request(
            _image_header([1, 8, 8, 1], outputs=[{"name": "probabilities", "parameters": {"classification": 11}}]), bytes(64)
        ),
        400,
        "more than the model's 10 classes",
    ),
    "not json": (b"{nope", {}, 400, "not a JSON inference request"),
    "unknown input": (
        *_binary_request({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [1]}]}, b""),
        400,
        "unknown input 'pixels'",
    ),
    "empty batch": (*_binary_request(_image_header([0, 8, 8, 1], size=0), b""), 400, "batch dimension is 0"),
    "too many images": (*_binary_request(_image_header([65, 8, 8, 1], size=65 * 64), bytes(65 * 64)), 400, "limit of 64"),
    "datatype not a string": (
        *_binary_request({"inputs": [{"name": "image", "datatype": ["UINT8"], "shape": [1], "data": [1]}]}, b""),
        400,
        "unknown datatype",
    ),
    # A superscript two is a digit to str.isdigit() and no number to int().
    "header length not a number": (
        _binary_request(_image_header([1, 8, 8, 1]), bytes(64))[0],
        {"Inference-Header-Content-Length": "\u00b2".encode("latin-1")},
        400,
        "must be a non-negative integer",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_each_bad_input_is_a_clear_error_and_the_service_stays_healthy(bundled_server, client, case):
    body, headers, status, words = BAD_REQUESTS[case]
    response = httpx.post(bundled_server.url + "/v2/models/digits/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    # The same service answers the next request, and is still ready.
    assert client.is_server_ready()
    image = decoded(example_digits()[2][2])[None]
    assert int(client.infer("digits", [_input(image)]).as_numpy("probabilities").argmax()) == 2


@pytest.mark.parametrize("route", ["", "/ready", "/config", "/infer"])
def test_a_version_that_is_no_number_is_a_400_on_every_versioned_route(bundled_server, route):
    url = f"{bundled_server.url}/v2/models/digits/versions/\u00b2{route}"
    response = httpx.post(url, json={}) if route == "/infer" else httpx.get(url)
    assert response.status_code == 400, response.text
    assert "version must be a positive integer" in response.json()["error"]


def test_an_oversized_body_is_413_in_the_protocols_shape(start_server, bundled_repository):
    server = start_server(bundled_repository, "--max-upload-bytes", "10000")
    body, headers = _binary_request(_image_header([200, 8, 8, 1], size=200 * 64), bytes(200 * 64))
    response = httpx.post(server.url + "/v2/models/digits/infer", content=body, headers=headers)
    assert response.status_code == 413
    assert "larger than the limit of 10000 bytes" in response.json()["error"]
    with httpclient.InferenceServerClient(url=server.url.removeprefix("http://")) as c:
        assert c.is_server_ready()
        image = decoded(example_digits()[5][2])[None]
        assert int(c.infer("digits", [_input(image)]).as_numpy("probabilities").argmax()) == 5


def test_compressed_requests_from_tritonclient_are_inflated(client):
    image = decoded(example_digits()[9][2])[None]
    for algorithm in ("gzip", "deflate"):
        result = client.infer("digits", [_input(image)], request_compression_algorithm=algorithm)
        assert int(result.as_numpy("probabilities").argmax()) == 9


def test_openapi_documents_the_v2_routes_with_examples(bundled_server):
    spec = httpx.get(bundled_server.url + "/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model}",
        "/v2/models/{model}/ready",
        "/v2/models/{model}/config",
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
    ):
        assert path in paths, path
    infer = paths["/v2/models/{model}/infer"]["post"]
    assert "tensor" in infer["requestBody"]["content"]["application/json"]["examples"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    for status in ("400", "404", "413", "503", "504"):
        assert status in infer["responses"], status
        assert "error" in next(iter(infer["responses"][status]["content"]["application/json"]["examples"].values()))["value"]


def test_readiness_and_liveness_agree_with_health_on_both_transports(bundled_server, start_server, tmp_path):
    broken = tmp_path / "broken"
    (broken / "digits" / "1").mkdir(parents=True)
    (broken / "digits" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    for server, ready in ((bundled_server, True), (start_server(broken), False)):
        health = httpx.get(server.url + "/health")
        v2_ready = httpx.get(server.url + "/v2/health/ready")
        assert health.status_code == v2_ready.status_code == (200 if ready else 503)
        assert v2_ready.json()["ready"] is ready
        assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
        grpc_client = grpcclient.InferenceServerClient(url=server.grpc_target)
        try:
            assert grpc_client.is_server_ready() is ready and grpc_client.is_server_live()
        finally:
            grpc_client.close()
    # The failed model answers 503 in the protocol's shape, and runs nothing.
    response = httpx.post(server.url + "/v2/models/digits/infer", json={"inputs": []})
    assert response.status_code == 503 and "error" in response.json()
