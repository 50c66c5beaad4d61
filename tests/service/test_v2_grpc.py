"""The Open Inference Protocol over gRPC: unmodified tritonclient.grpc against a real service on free ports."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
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
    c = grpcclient.InferenceServerClient(url=bundled_server.grpc_target)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(bundled_server):
    with grpc.insecure_channel(bundled_server.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _input(images: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", list(images.shape), "UINT8" if images.dtype == np.uint8 else "BYTES")
    tensor.set_data_from_numpy(images)
    return tensor


def test_live_ready_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata.name == "keras-onnx-serve"
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(metadata.extensions)


@pytest.mark.parametrize("version", ["", "1"])
def test_model_metadata_ready_and_config(client, version):
    assert client.is_model_ready("digits", version)
    metadata = client.get_model_metadata("digits", version)
    assert metadata.platform == "onnxruntime_onnx" and list(metadata.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "UINT8", [-1, 8, 8, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("probabilities", "FP32", [-1, 10])]
    config = client.get_model_config("digits", version).config
    assert config.max_batch_size == 64
    assert config.input[0].format == mc.ModelInput.FORMAT_NHWC and list(config.input[0].dims) == [8, 8, 1]
    assert config.input[0].data_type == mc.TYPE_UINT8 and config.output[0].data_type == mc.TYPE_FP32
    assert list(config.dynamic_batching.preferred_batch_size) == [32]
    assert "BYTES" in config.parameters["image_bytes"].string_value


def test_unknown_model_is_not_found(client):
    for call in (lambda: client.get_model_metadata("cats"), lambda: client.get_model_config("digits", "7")):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("version", ["", "1"])
def test_a_batch_of_8_uint8_images_answers_what_predict_answers(bundled_server, client, version):
    digits = example_digits()[2:]
    images = np.stack([decoded(png) for _, _, png in digits])
    result = client.infer("digits", [_input(images)], model_version=version, request_id="g8")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (8, 10)
    expected = predict_probabilities(bundled_server.url, [(name, png) for name, _, png in digits])
    np.testing.assert_allclose(probabilities, expected, atol=ATOL)
    assert result.get_response().id == "g8" and result.get_response().model_version == "1"


def test_typed_contents_answer_like_raw_contents(bundled_server, stub):
    image = decoded(example_digits()[6][2])
    request = pb.ModelInferRequest(model_name="digits", id="typed")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=[1, 8, 8, 1])
    tensor.contents.uint_contents.extend(int(v) for v in image.ravel())
    response = stub.ModelInfer(request)
    assert response.id == "typed" and response.outputs[0].name == "probabilities"
    probabilities = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(1, 10)
    expected = predict_probabilities(bundled_server.url, [("six.png", example_digits()[6][2])])
    np.testing.assert_allclose(probabilities, expected, atol=ATOL)


def test_typed_bytes_contents_take_encoded_files(stub):
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([example_digits()[1][2], example_digits()[4][2]])
    response = stub.ModelInfer(request)
    probabilities = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(2, 10)
    assert list(probabilities.argmax(axis=1)) == [1, 4]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_encoded_files_as_bytes_are_decoded_as_predict_decodes_them(bundled_server, client, fmt):
    files = [
        encoded(np.kron(decoded(png)[:, :, 0], np.ones((3, 3), np.uint8))[:, :, None], fmt) for _, _, png in example_digits()
    ]
    result = client.infer("digits", [_input(np.array(files, dtype=np.object_).reshape(-1, 1))])
    expected = predict_probabilities(bundled_server.url, [(f"d{i}.{fmt.lower()}", f) for i, f in enumerate(files)])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=ATOL)


def test_triton_image_client_pattern_gets_the_right_labels(client):
    metadata = client.get_model_metadata("digits")
    config = client.get_model_config("digits").config
    input_meta, output_meta, input_config = metadata.inputs[0], metadata.outputs[0], config.input[0]
    assert input_config.format == mc.ModelInput.FORMAT_NHWC and config.max_batch_size > 0
    height, width, channels = list(input_meta.shape)[1:]
    digits = example_digits()
    batch = np.stack([image_client_preprocess(upscaled(png), height, width, channels) for _, _, png in digits])
    tensor = grpcclient.InferInput(input_meta.name, list(batch.shape), input_meta.datatype)
    tensor.set_data_from_numpy(batch)
    wanted = grpcclient.InferRequestedOutput(output_meta.name, class_count=2)
    answers = client.infer(metadata.name, [tensor], outputs=[wanted]).as_numpy(output_meta.name)
    assert answers.shape == (10, 2)
    labels = [(row[0].decode() if isinstance(row[0], bytes) else row[0]).split(":")[2] for row in answers]
    assert labels == [str(label) for _, label, _ in digits]


def _code(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status(), caught.value.message()


def test_each_bad_input_is_its_grpc_status_and_the_service_stays_healthy(client, stub):
    image = decoded(example_digits()[0][2])[None]
    cases = {
        "wrong shape": (lambda: client.infer("digits", [_input(image[:, :, :, 0])]), "INVALID_ARGUMENT", "does not match"),
        "wrong datatype": (
            lambda: client.infer(
                "digits", [grpcclient.InferInput("image", [1, 8, 8, 1], "FP32").set_data_from_numpy(image.astype(np.float32))]
            ),
            "INVALID_ARGUMENT",
            "FP32 is not accepted",
        ),
        "not an image": (
            lambda: client.infer("digits", [_input(np.array([b"not an image"], dtype=np.object_))]),
            "INVALID_ARGUMENT",
            "image[0]",
        ),
        "unknown output": (
            lambda: client.infer("digits", [_input(image)], outputs=[grpcclient.InferRequestedOutput("logits")]),
            "INVALID_ARGUMENT",
            "unknown output",
        ),
        "classification over the class count": (
            lambda: client.infer(
                "digits", [_input(image)], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=11)]
            ),
            "INVALID_ARGUMENT",
            "10 classes",
        ),
        "unknown model": (lambda: client.infer("cats", [_input(image)]), "NOT_FOUND", "cats"),
        # A superscript two: a digit to str.isdigit(), no number to int().
        "version not a number": (
            lambda: client.infer("digits", [_input(image)], model_version="\u00b2"),
            "INVALID_ARGUMENT",
            "model_version must be a positive integer",
        ),
    }
    for name, (call, code, words) in cases.items():
        status, message = _code(call)
        assert status == f"StatusCode.{code}", (name, status, message)
        assert words in message, (name, message)
    # A raw blob shorter than its shape, and a classification count of 0 (tritonclient never sends one).
    short = pb.ModelInferRequest(model_name="digits", raw_input_contents=[bytes(10)])
    short.inputs.add(name="image", datatype="UINT8", shape=[1, 8, 8, 1])
    zero = pb.ModelInferRequest(model_name="digits", raw_input_contents=[image.tobytes()])
    zero.inputs.add(name="image", datatype="UINT8", shape=[1, 8, 8, 1])
    zero.outputs.add(name="probabilities").parameters["classification"].int64_param = 0
    for request, words in ((short, "truncated"), (zero, "classification must be a positive integer")):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()
    assert client.is_server_ready()
    assert int(client.infer("digits", [_input(image)]).as_numpy("probabilities").argmax()) == 0


def test_a_message_over_the_limit_is_resource_exhausted_and_the_service_stays_healthy(start_server, bundled_repository):
    server = start_server(bundled_repository, "--grpc-max-message-bytes", "4096")
    client = grpcclient.InferenceServerClient(url=server.grpc_target)
    try:
        big = np.zeros((100, 8, 8, 1), dtype=np.uint8)  # 6400 bytes of tensor data
        status, _ = _code(lambda: client.infer("digits", [_input(big)]))
        assert status == "StatusCode.RESOURCE_EXHAUSTED"
        image = decoded(example_digits()[8][2])[None]
        assert client.is_server_ready()
        assert int(client.infer("digits", [_input(image)]).as_numpy("probabilities").argmax()) == 8
    finally:
        client.close()


def test_the_api_key_guards_model_calls_not_health(start_server, bundled_repository):
    server = start_server(bundled_repository, "--api-key", "sesame")
    client = grpcclient.InferenceServerClient(url=server.grpc_target)
    try:
        assert client.is_server_live() and client.is_server_ready()
        status, _ = _code(lambda: client.get_model_metadata("digits"))
        assert status == "StatusCode.UNAUTHENTICATED"
        image = decoded(example_digits()[3][2])[None]
        result = client.infer("digits", [_input(image)], headers={"x-api-key": "sesame"})
        assert int(result.as_numpy("probabilities").argmax()) == 3
    finally:
        client.close()


def test_no_grpc_when_its_port_is_zero(start_server, bundled_repository):
    server = start_server(bundled_repository, "--grpc-port", "0")
    client = grpcclient.InferenceServerClient(url=server.grpc_target)
    try:
        with pytest.raises(InferenceServerException):
            client.is_server_live(client_timeout=2)
    finally:
        client.close()


def test_an_rpc_of_the_service_not_served_here_is_unimplemented(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
