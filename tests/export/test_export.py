"""The exporter: a verified, self-describing model in a versioned repository, or nothing at all."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.convert import to_onnx
from export.errors import ExportError
from export.exporter import export
from export.source import Images, Source, load_run, load_source
from kos_core.artifact import ModelMetadata
from kos_core.layout import list_models, list_versions, model_path


def _quiet(_: str) -> None:
    pass


def _export(source, repository, name="m", **options):
    return export(source, name, repository, progress=_quiet, **options)


def _repository_files(repository):
    return sorted(str(p.relative_to(repository)) for p in repository.rglob("*")) if repository.exists() else []


def test_run_export_writes_a_model_that_takes_uint8_images_and_answers_probabilities(digits_run, tmp_path):
    result = _export(load_run(digits_run), tmp_path / "models", name="digits")

    assert result.path == model_path(tmp_path / "models", "digits", 1)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (image,), (probabilities,) = session.get_inputs(), session.get_outputs()
    assert image.name == "image" and image.type == "tensor(uint8)" and image.shape[1:] == [8, 8, 1]
    assert not isinstance(image.shape[0], int), "the batch dimension must be dynamic"
    assert probabilities.name == "probabilities" and probabilities.type == "tensor(float)"
    assert onnx.load(str(result.path)).opset_import[0].version >= 17
    with np.load(digits_run / "test_split.npz") as split:
        x = split["x"][:5]
    out = session.run(None, {"image": x})[0]
    assert out.shape == (5, 10)
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-5)


def test_metadata_round_trips_into_the_service_reader(digits_run, tmp_path):
    result = _export(load_run(digits_run), tmp_path / "models", name="digits")
    record = json.loads((digits_run / "run.json").read_text())

    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_metadata_props(session.get_modelmeta().custom_metadata_map)
    assert meta == result.metadata.model_copy(update={"precision": "float32"})
    assert meta.labels == record["labels"] and meta.input_shape == (8, 8, 1) and meta.color_mode == "grayscale"
    assert meta.resize_method == "bilinear" and meta.architecture == "digits_cnn" and meta.dataset == "digits"
    assert meta.source_run == str(digits_run) and meta.metrics == record["metrics"]
    assert meta.parity["passed"] is True and meta.parity["images"] == 270
    assert meta.parity["max_abs_difference"] <= 1e-4 and meta.parity["top1_agreement"] == 1.0
    assert {"keras-onnx-serve", "tensorflow", "keras", "tf2onnx", "onnx"} <= set(meta.versions)
    assert meta.opset == 17 and meta.precision == "float32" and meta.created_at.tzinfo is not None
    assert meta.graph_checks["preprocessing_kept"] == ["rescale"]
    # Both batch normalisations follow a ReLU: each is one BatchNormalization again, not Mul and Add.
    assert meta.graph_checks["scale_shift_folded"] == ["batch_normalization", "batch_normalization_1"]
    nodes = onnx.load(str(result.path)).graph.node
    assert [n.op_type for n in nodes].count("BatchNormalization") == 2
    assert not [n.name for n in nodes if "/batch_normalization" in n.name and n.op_type in ("Mul", "Add")]


def test_versions_increment_and_a_taken_version_is_refused_unless_overwritten(digits_run, tmp_path):
    source, repository = load_run(digits_run), tmp_path / "models"
    assert _export(source, repository).version == 1
    assert _export(source, repository).version == 2
    assert _export(source, repository, version=7).version == 7
    assert _export(source, repository).version == 8
    assert list_versions(repository, "m") == [1, 2, 7, 8]

    before = (repository / "m" / "2" / "model.onnx").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        _export(source, repository, version=2)
    assert (repository / "m" / "2" / "model.onnx").read_bytes() == before
    _export(source, repository, version=2, overwrite=True)
    assert list_versions(repository, "m") == [1, 2, 7, 8]
    assert not [p for p in (repository / "m").iterdir() if p.name.startswith(".")]


def _perturbed_conversion(model, opset):
    """A conversion that goes wrong after tf2onnx: one weight tensor of the graph is nudged."""
    proto = to_onnx(model, opset)
    weights = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(weights).copy()
    values.flat[: values.size // 4] += 0.05
    weights.CopyFrom(onnx.numpy_helper.from_array(values, weights.name))
    return proto


def test_a_broken_conversion_is_refused_and_nothing_is_written(digits_run, tmp_path):
    source, repository = load_run(digits_run), tmp_path / "models"
    with pytest.raises(ExportError, match="parity check failed on 270 held-out images"):
        _export(source, repository, converter=_perturbed_conversion)
    assert not repository.exists() or _repository_files(repository) == []

    _export(source, repository)
    before = _repository_files(repository)
    with pytest.raises(ExportError, match="parity check failed"):
        _export(source, repository, converter=_perturbed_conversion)
    assert _repository_files(repository) == before and list_versions(repository, "m") == [1]


def test_parity_is_checked_on_a_single_image_too(digits_run, tmp_path):
    # One image whose probabilities move by more than 1e-4 is enough to refuse. The least confident
    # one is taken: on a saturated prediction a nudged weight may move nothing past float noise.
    source = load_run(digits_run)
    confidence = source.model.predict(source.held_out.x, verbose=0).max(axis=1)
    pick = slice(int(confidence.argmin()), int(confidence.argmin()) + 1)
    one = Images(source.held_out.x[pick], source.held_out.y[pick], "one image")
    with pytest.raises(ExportError, match="parity check failed on 1 held-out images"):
        _export(source, tmp_path / "models", images=one, converter=_perturbed_conversion)
    assert not (tmp_path / "models").exists()


def _augmented_model():
    """A model with augmentation and preprocessing layers inside, as a user might save one."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 3), dtype="uint8", name="image")
    x = layers.RandomFlip("horizontal", name="flip")(inputs)
    x = layers.RandomRotation(0.1, name="rotate")(x)
    x = layers.RandomTranslation(0.1, 0.1, name="shift")(x)
    x = layers.RandomZoom(0.1, name="zoom")(x)
    x = layers.RandomContrast(0.2, name="contrast")(x)
    x = layers.Rescaling(1 / 255.0, name="rescale")(x)
    x = layers.Normalization(mean=[0.5, 0.4, 0.3], variance=[0.04, 0.05, 0.06], name="normalize")(x)
    x = layers.Conv2D(8, 3, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="augmented")


def _source(model, shape, classes, n=16, seed=0):
    x = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    return Source(
        model=model,
        labels=[f"c{i}" for i in range(classes)],
        input_shape=shape,
        color_mode="grayscale" if shape[2] == 1 else "rgb",
        resize_method="bilinear",
        architecture=model.name,
        dataset="generated",
        source_run="test",
        held_out=Images(x, None, "generated images"),
    )


def test_augmentation_leaves_the_graph_and_preprocessing_stays(tmp_path):
    result = _export(_source(_augmented_model(), (16, 16, 3), 3), tmp_path / "models")

    graph = onnx.load(str(result.path)).graph
    assert not {n.op_type for n in graph.node} & {
        "RandomUniform",
        "RandomUniformLike",
        "RandomNormal",
        "RandomNormalLike",
        "Multinomial",
    }
    assert not [n.name for n in graph.node if any(k in n.name for k in ("flip", "rotate", "shift", "zoom", "contrast"))]
    assert [n.op_type for n in graph.node if "/rescale" in n.name] == ["Mul"]
    assert any("/normalize" in n.name for n in graph.node)
    assert result.metadata.graph_checks == {
        "augmentation_removed": ["flip", "rotate", "shift", "zoom", "contrast"],
        "preprocessing_kept": ["rescale", "normalize"],
        "scale_shift_folded": [],
    }


def _with_random_op(model, opset):
    """A conversion whose graph still draws random numbers, as a layer left in training mode would."""
    proto = to_onnx(model, opset)
    first = proto.graph.node[0]
    noise = onnx.helper.make_node("RandomUniformLike", [first.output[0]], ["noise"], name="leftover/RandomUniformLike")
    proto.graph.node.insert(1, noise)
    return proto


def _without_rescale(model, opset):
    """A conversion that lost the rescaling: the image goes straight into the network."""
    proto = to_onnx(model, opset)
    rescale = [n for n in proto.graph.node if "/rescale" in n.name]
    assert {n.op_type for n in rescale} == {"Mul", "Add"}
    for dropped in rescale:
        for node in proto.graph.node:
            for i, name in enumerate(node.input):
                if name == dropped.output[0]:
                    node.input[i] = dropped.input[0]
        proto.graph.node.remove(dropped)
    return proto


@pytest.mark.parametrize(
    ("converter", "message"),
    [(_with_random_op, "random ops"), (_without_rescale, "preprocessing layer 'rescale'")],
    ids=["random-op-survives", "preprocessing-lost"],
)
def test_a_graph_with_training_behaviour_or_without_preprocessing_is_refused(digits_run, tmp_path, converter, message):
    with pytest.raises(ExportError, match=message):
        _export(load_run(digits_run), tmp_path / "models", converter=converter)
    assert not (tmp_path / "models").exists()


def test_a_failed_write_leaves_no_partial_files(digits_run, tmp_path, monkeypatch):
    source, repository = load_run(digits_run), tmp_path / "models"
    _export(source, repository, name="digits")
    before = _repository_files(repository)
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        # The disk fills up after the first file of the version is written.
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr("export.repository.os.fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        _export(source, repository, name="digits", variants=["float16"])
    assert len(calls) == 2
    assert _repository_files(repository) == before
    with pytest.raises(OSError):
        _export(source, repository, name="fresh", variants=["float16"])
    assert not (repository / "fresh").exists()
    assert list_models(repository) == {"digits": [1]}


def test_held_out_labels_drive_a_missing_accuracy_metric(digits_run, tmp_path):
    import keras

    model = keras.models.load_model(digits_run / "model.keras")
    source = _source(model, (8, 8, 1), 10)
    run = load_run(digits_run)
    source.held_out = run.held_out
    result = _export(source, tmp_path / "models")
    expected = np.asarray(model.predict(run.held_out.x, verbose=0)).argmax(1)
    assert result.metadata.metrics == {"test_accuracy": pytest.approx(float((expected == run.held_out.y).mean()))}


def test_a_model_ending_in_logits_is_refused(tmp_path):
    import keras
    from keras import layers

    inputs = keras.Input((8, 8, 1), dtype="uint8")
    x = layers.Flatten()(layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, layers.Dense(4)(x))
    with pytest.raises(ExportError, match="not probabilities"):
        _export(_source(model, (8, 8, 1), 4), tmp_path / "models")
    with pytest.raises(ExportError, match="there are 4 labels"):
        _export(_source(_augmented_model(), (16, 16, 3), 4), tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_a_model_whose_input_is_not_an_image_is_refused_clearly(tmp_path):
    import keras
    from keras import layers

    inputs = keras.Input((20,))
    keras.Model(inputs, layers.Dense(3, activation="softmax")(inputs)).save(tmp_path / "tabular.keras")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    with pytest.raises(ExportError, match=r"input \(None, 20\) is not an image"):
        load_source(tmp_path / "tabular.keras", tmp_path / "labels.txt")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "not a training run folder: model.keras is missing"),
        (
            lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt",
            "neither a training run folder nor a saved Keras model",
        ),
    ],
    ids=["missing", "empty-folder", "other-file"],
)
def test_a_source_that_is_not_a_run_or_a_model_is_refused_clearly(tmp_path, make, message):
    with pytest.raises(ExportError, match=message):
        load_source(make(tmp_path))


def test_a_keras_file_needs_its_labels(digits_run, tmp_path):
    with pytest.raises(ExportError, match="--labels"):
        load_source(digits_run / "model.keras")
    (tmp_path / "one.txt").write_text("only\n")
    with pytest.raises(ExportError, match="at least 2"):
        load_source(digits_run / "model.keras", tmp_path / "one.txt")


def test_a_bad_model_name_is_refused(digits_run, tmp_path):
    with pytest.raises(ExportError, match="model name"):
        _export(load_run(digits_run), tmp_path / "models", name="../escape")
    assert not (tmp_path / "models").exists()


def test_a_version_taken_by_a_concurrent_export_is_refused_without_touching_it(tmp_path, monkeypatch):
    from export import repository as repo

    proto = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
    )
    other = tmp_path / "models" / "m" / "1"

    def another_export_wins(repository, name, version, overwrite):
        # The other export finishes between this one's check and its rename.
        other.mkdir(parents=True)
        (other / "model.onnx").write_bytes(b"the other export's model")

    monkeypatch.setattr(repo, "check_version_free", another_export_wins)
    with pytest.raises(ExportError, match="written by another export meanwhile"):
        repo.write_atomically({"model.onnx": proto}, tmp_path / "models", "m", 1)
    assert (other / "model.onnx").read_bytes() == b"the other export's model"
    assert _repository_files(tmp_path / "models") == ["m", "m/1", "m/1/model.onnx"]


def test_a_run_record_that_contradicts_its_model_is_refused_before_conversion(digits_run, tmp_path):
    source = load_run(digits_run)
    source.color_mode = "rgb"  # the model takes one channel
    with pytest.raises(ExportError, match="cannot be described for the service: .*color_mode 'rgb' needs 3 channel"):
        _export(source, tmp_path / "models", converter=_must_not_run)
    assert not (tmp_path / "models").exists()


def _must_not_run(model, opset):
    raise AssertionError("the conversion ran although the export was already refused")


def test_a_written_version_is_readable_by_other_users_like_the_service_in_its_container(digits_run, tmp_path):
    result = _export(load_run(digits_run), tmp_path / "models", name="digits")

    assert result.path.parent.stat().st_mode & 0o777 == 0o755
    assert result.path.stat().st_mode & 0o004, "the model file must be readable by others"
