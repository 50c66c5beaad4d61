"""The bundled digits model: accurate on data it never saw, and self-describing."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from kos_core.artifact import ModelMetadata
from kos_core.layout import list_models, model_path
from tests.conftest import onnx_predict


def test_bundled_repository_holds_digits_version_1(bundled_repository):
    assert list_models(bundled_repository) == {"digits": [1]}


def test_bundled_model_reaches_97_percent_on_the_held_out_split(bundled_repository, digits_test_split):
    probabilities = onnx_predict(model_path(bundled_repository, "digits", 1), digits_test_split.x)
    accuracy = float((probabilities.argmax(1) == digits_test_split.y).mean())
    assert len(digits_test_split.y) == 270
    assert accuracy >= 0.97


def test_bundled_model_metadata_describes_how_to_serve_it(bundled_repository, digits_test_split):
    session = ort.InferenceSession(str(model_path(bundled_repository, "digits", 1)), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    assert meta.name == "digits"
    assert meta.labels == [str(i) for i in range(10)]
    assert (meta.height, meta.width, meta.channels, meta.color_mode) == (8, 8, 1, "grayscale")
    assert meta.architecture == "digits_cnn" and meta.dataset == "digits"
    assert meta.parity["passed"] is True and meta.parity["max_abs_difference"] <= 1e-4
    # The accuracy recorded at training time is the one the file really has on the same split.
    probabilities = onnx_predict(model_path(bundled_repository, "digits", 1), digits_test_split.x)
    measured = float((probabilities.argmax(1) == digits_test_split.y).mean())
    assert abs(meta.metrics["test_accuracy"] - measured) < 1e-6
    assert {"tensorflow", "tf2onnx", "onnx"} <= set(meta.versions)
    # The parity check proved something: the held-out images move the answers.
    assert meta.parity["verdict"] == "passed" and meta.parity["conclusive"] is True


def test_bundled_model_names_its_batch_dimension(bundled_repository):
    session = ort.InferenceSession(str(model_path(bundled_repository, "digits", 1)), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch" and session.get_outputs()[0].shape[0] == "batch"


def test_bundled_model_takes_uint8_images_with_a_dynamic_batch(bundled_repository):
    session = ort.InferenceSession(str(model_path(bundled_repository, "digits", 1)), providers=["CPUExecutionProvider"])
    (image,) = session.get_inputs()
    (probabilities,) = session.get_outputs()
    assert image.name == "image" and image.type == "tensor(uint8)"
    assert not isinstance(image.shape[0], int) and image.shape[1:] == [8, 8, 1]
    assert probabilities.name == "probabilities" and probabilities.type == "tensor(float)"
    for batch in (1, 3, 17):
        out = session.run(None, {"image": np.zeros((batch, 8, 8, 1), np.uint8)})[0]
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-5)
