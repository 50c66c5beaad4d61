"""The v2 codec on its own: bodies that tritonclient builds parse, answers we build are what tritonclient reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from service.v2.codec import (
    OutputTensor,
    classification_strings,
    deserialize_bytes,
    encode_rest_response,
    parse_rest_request,
    serialize_bytes,
    split_body,
)
from service.v2.errors import InvalidInput


def parse(body: bytes, header_length: int | None):
    header, binary = split_body(body, None if header_length is None else str(header_length))
    return parse_rest_request(header, binary)


def tritonclient_body(inputs, outputs=None, request_id="", parameters=None):
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id=request_id, parameters=parameters
    )
    return body, json_size


def test_bytes_elements_round_trip_with_tritonclients_own_serialiser():
    elements = [b"", b"\x00\xffjpeg", "é".encode() * 300]
    ours = serialize_bytes(elements)
    theirs = serialize_byte_tensor(np.array(elements, dtype=np.object_)).item()
    assert ours == theirs
    assert deserialize_bytes("image", theirs, 3) == elements
    assert list(deserialize_bytes_tensor(ours)) == elements


@pytest.mark.parametrize(
    "raw, count, words",
    [
        (b"\x05\x00\x00\x00abc", 1, "says 5 bytes but only 3 remain"),
        (b"\x01\x00", 1, "ends after 0 of 1 elements"),
        (b"\x01\x00\x00\x00ab", 1, "1 bytes left over"),
        (b"\x01\x00\x00\x00a", 2, "ends after 1 of 2 elements"),
    ],
)
def test_malformed_bytes_elements_say_where_they_break(raw, count, words):
    with pytest.raises(InvalidInput, match=words):
        deserialize_bytes("image", raw, count)


def test_a_binary_uint8_request_from_tritonclient_parses_without_copying():
    images = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    tensor = httpclient.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=True)
    wanted = httpclient.InferRequestedOutput("probabilities", binary_data=True, class_count=3)
    body, json_size = tritonclient_body([tensor], [wanted], request_id="r1")
    request = parse(body, json_size)
    assert request.id == "r1"
    (image,) = request.inputs
    assert image.datatype == "UINT8" and image.shape == (2, 8, 8, 1)
    np.testing.assert_array_equal(image.data, images)
    assert request.outputs[0].name == "probabilities" and request.outputs[0].classification == 3
    assert request.outputs[0].binary is True


def test_a_json_request_from_tritonclient_parses_and_binary_output_is_the_default_without_outputs():
    images = np.full((1, 8, 8, 1), 200, dtype=np.uint8)
    tensor = httpclient.InferInput("image", [1, 8, 8, 1], "UINT8")
    tensor.set_data_from_numpy(images, binary_data=False)
    body, json_size = tritonclient_body([tensor])
    assert json_size is None
    request = parse(body, None)
    np.testing.assert_array_equal(request.inputs[0].data, images)
    assert request.outputs is None and request.binary_output is True


def test_a_bytes_request_of_encoded_files_parses_into_its_elements():
    files = np.array([b"\x89PNG first", b"\xff\xd8 second"], dtype=np.object_)
    tensor = httpclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(files, binary_data=True)
    body, json_size = tritonclient_body([tensor])
    request = parse(body, json_size)
    assert request.inputs[0].data == [b"\x89PNG first", b"\xff\xd8 second"]


def test_nested_json_data_is_taken_row_major():
    header = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}
    request = parse(json.dumps(header).encode(), None)
    np.testing.assert_array_equal(request.inputs[0].data, [[1, 2], [3, 4]])


def _json(header) -> bytes:
    return json.dumps(header).encode()


@pytest.mark.parametrize(
    "body, header_length, words",
    [
        (b"{not json", None, "not a JSON inference request"),
        (b"[1, 2]", None, "must be a JSON object"),
        (_json({"inputs": []}), None, "non-empty list"),
        (_json({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 2]}]}), None, "needs data"),
        (_json({"inputs": [{"name": "image", "datatype": "UINT9", "shape": [1], "data": [1]}]}), None, "unknown datatype"),
        (_json({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, -2], "data": [1]}]}), None, "negative"),
        (_json({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [3], "data": [1, 2]}]}), None, "2 data elements"),
        (_json({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [256]}]}), None, r"lie in \[0, 255\]"),
        (_json({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": ["a"]}]}), None, "must be numbers"),
        (_json({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [1.5]}]}), None, "must be integers"),
        (b"{}", 99, "is 99 but the body has only 2 bytes"),
        (b"{}", "-1", "non-negative integer"),
        (
            _json({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 4}}]})
            + b"ab",
            "len",
            "goes past the end of the body",
        ),
        (
            _json({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [4], "parameters": {"binary_data_size": 2}}]})
            + b"ab",
            "len",
            r"2 bytes of data, but shape \[4\] of UINT8 needs 4 \(truncated\)",
        ),
        (
            _json({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2], "parameters": {"binary_data_size": 2}}]})
            + b"abcd",
            "len",
            "belong to no input",
        ),
        (
            _json(
                {
                    "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [1]}],
                    "outputs": [{"name": "probabilities", "parameters": {"classification": -1}}],
                }
            ),
            None,
            "positive integer",
        ),
    ],
)
def test_malformed_requests_are_invalid_input_with_a_reason(body, header_length, words):
    if header_length == "len":
        header_length = body.index(b"}]}") + 3
    with pytest.raises(InvalidInput, match=words) as caught:
        header, binary = split_body(body, None if header_length is None else str(header_length))
        parse_rest_request(header, binary)
    assert caught.value.status_code == 400


def test_answers_read_back_by_tritonclient_binary_and_json():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    labels = ["cat", "dog", "fox"]
    top = classification_strings(probabilities, labels, 2)
    outputs = [
        (OutputTensor("probabilities", "FP32", (2, 3), probabilities), True),
        (OutputTensor("top", "BYTES", (2, 2), top), False),
    ]
    body, header_length = encode_rest_response("rgb", 1, "req-9", outputs)
    assert header_length is not None
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities)
    assert result.get_response()["id"] == "req-9" and result.get_response()["model_version"] == "1"
    rows = [[s.decode() if isinstance(s, bytes) else s for s in row] for row in result.as_numpy("top")]
    assert [[s.split(":", 2)[2] for s in row] for row in rows] == [["dog", "fox"], ["cat", "dog"]]
    assert float(rows[0][0].split(":")[0]) == pytest.approx(0.7)
    assert rows[0][0].split(":")[1] == "1"


def test_classification_keeps_the_float32_score_exactly_and_ties_in_index_order():
    probabilities = np.array([[0.25, 0.25, 0.5]], dtype=np.float32)
    strings = classification_strings(probabilities, ["a", "b", "c"], 3)
    assert [s.decode().split(":", 1)[1] for s in strings] == ["2:c", "0:a", "1:b"]
    assert np.float32(float(strings[0].decode().split(":")[0])) == probabilities[0, 2]
