"""Reduced-precision variants: written beside model.onnx, same inputs and outputs, refused when they lose accuracy."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.card import show
from export.errors import ExportError
from export.exporter import export
from export.source import Images, load_run
from kos_core.artifact import ModelMetadata
from kos_core.layout import model_path


def _quiet(_: str) -> None:
    pass


def _meta(path) -> ModelMetadata:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return ModelMetadata.from_metadata_props(session.get_modelmeta().custom_metadata_map)


def test_float16_and_int8_variants_keep_the_interface_and_their_accuracy(digits_run, tmp_path):
    repository = tmp_path / "models"
    source = load_run(digits_run)
    result = export(source, "digits", repository, variants=["float16", "int8"], progress=_quiet)

    float32 = model_path(repository, "digits", 1)
    sizes = {p: model_path(repository, "digits", 1, p).stat().st_size for p in ("float32", "float16", "int8")}
    assert sizes["float16"] < 0.6 * sizes["float32"] and sizes["int8"] < 0.4 * sizes["float32"]
    x, y = source.held_out.x, source.held_out.y
    for precision in ("float32", "float16", "int8"):
        path = model_path(repository, "digits", 1, precision)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (image,), (probabilities,) = session.get_inputs(), session.get_outputs()
        assert (image.name, image.type, probabilities.name, probabilities.type) == (
            "image",
            "tensor(uint8)",
            "probabilities",
            "tensor(float)",
        )
        meta = _meta(path)
        assert meta.precision == precision and meta.labels == source.labels and meta.parity["passed"] is True
        assert set(meta.variants) == {"float16", "int8"}
        accuracy = float((session.run(None, {"image": x})[0].argmax(1) == y).mean())
        if precision != "float32":
            recorded = meta.variants[precision]
            # The figure in the file is what the file really scores on the held-out split.
            assert recorded["accuracy"] == pytest.approx(accuracy)
            assert recorded["accuracy_drop_points"] <= 1.0 and recorded["passed"] is True and recorded["against"] == "labels"
            assert recorded["float32_accuracy"] == pytest.approx(float((_run(float32, x).argmax(1) == y).mean()))
    graph16 = onnx.load(str(model_path(repository, "digits", 1, "float16"))).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph16.initializer)
    graph8 = onnx.load(str(model_path(repository, "digits", 1, "int8"))).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph8.node}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph8.initializer)
    assert result.variants["int8"].images == 270
    card = show(repository / "digits" / "1")
    assert "variant    float16" in card and "variant    int8" in card


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]


def test_a_variant_that_loses_accuracy_is_refused_unless_forced(digits_run, tmp_path):
    repository = tmp_path / "models"
    source = load_run(digits_run)
    # Calibrated on black images only, int8 cannot represent the activations real digits produce.
    black = np.zeros((32, 8, 8, 1), np.uint8)
    with pytest.raises(ExportError, match=r"int8 variant loses .* points of accuracy.*--force-variants"):
        export(source, "digits", repository, variants=["int8"], calibration=black, progress=_quiet)
    assert not repository.exists()

    result = export(source, "digits", repository, variants=["int8"], calibration=black, force_variants=True, progress=_quiet)
    recorded = _meta(result.files["int8"]).variants["int8"]
    assert recorded["forced"] is True and recorded["passed"] is False and recorded["accuracy_drop_points"] > 1.0
    assert "(forced)" in show(result.path)


def test_without_class_labels_a_variant_is_judged_against_float32_answers(cifar10_run, tmp_path):
    source = load_run(cifar10_run)
    unlabelled = Images(source.held_out.x, None, "unlabelled")
    result = export(source, "cifar10", tmp_path / "models", images=unlabelled, variants=["float16"], progress=_quiet)
    recorded = result.metadata.variants["float16"]
    assert recorded["against"] == "float32 answers" and recorded["float32_accuracy"] == 1.0
    assert recorded["accuracy"] == recorded["top1_agreement"] >= 0.99


def test_int8_without_training_images_is_refused_clearly(cifar10_run, tmp_path):
    # A run whose image folder is gone cannot be reloaded by the training package: the user must give images.
    source = load_run(cifar10_run)
    source.training_config = {**source.training_config, "dataset": str(tmp_path / "photos-no-longer-here")}
    with pytest.raises(ExportError, match="--calibration-images"):
        export(source, "cifar10", tmp_path / "models", variants=["int8"], progress=_quiet)
    assert not (tmp_path / "models").exists()


def test_cifar10_cnn_run_passes_parity_on_its_test_split(cifar10_run, tmp_path):
    result = export(load_run(cifar10_run), "cifar10", tmp_path / "models", progress=_quiet)
    assert result.parity.images == 100 and result.parity.passed
    assert result.metadata.architecture == "cifar10_cnn" and result.metadata.input_shape == (32, 32, 3)
    assert result.metadata.color_mode == "rgb" and result.graph.preprocessing_kept == ["rescale"]
