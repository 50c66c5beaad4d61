"""The model zoo: every family builds with its stated shapes and sizes, takes uint8 images, and converts to ONNX."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from training.errors import TrainingError
from training.models import BACKBONES, build_model, find_backbone, preprocessing_layers, unfreeze_top, zoo


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def _assert_inference_model(model, input_shape, num_classes):
    (image,) = model.inputs
    assert image.dtype == "uint8" and tuple(image.shape[1:]) == input_shape
    assert model.layers[0].name == "image"
    assert tuple(model.outputs[0].shape[1:]) == (num_classes,)
    random_layers = [layer.name for layer in _all_layers(model) if type(layer).__name__.startswith("Random")]
    assert random_layers == [], "augmentation belongs in the training pipeline, not the model"


@pytest.mark.parametrize(
    ("name", "input_shape", "classes", "parameters"),
    [
        ("cifar10_cnn", (32, 32, 3), 10, 1_343_018),
        ("cifar100_cnn", (32, 32, 3), 100, 2_965_124),
        ("mnist_cnn", (28, 28, 1), 10, 1_199_882),
        ("digits_cnn", (8, 8, 1), 10, 151_690),
    ],
)
def test_scratch_models_have_their_published_parameter_counts(name, input_shape, classes, parameters):
    model = build_model(name, input_shape, classes)
    assert model.count_params() == parameters
    _assert_inference_model(model, input_shape, classes)


def test_cifar10_cnn_is_three_double_conv_blocks_with_batch_norm_and_l2():
    model = build_model("cifar10_cnn", (32, 32, 3), 10)
    convs = [layer for layer in model.layers if type(layer).__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == "same" and c.kernel_regularizer is not None for c in convs)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("BatchNormalization") == 6 and kinds.count("MaxPooling2D") == 3
    assert model.get_layer("dense512").units == 512


def test_scratch_models_take_other_image_sizes_and_class_counts():
    model = build_model("cifar10_cnn", (48, 40, 1), 4)
    _assert_inference_model(model, (48, 40, 1), 4)
    probabilities = np.asarray(model(np.zeros((2, 48, 40, 1), np.uint8)))
    np.testing.assert_allclose(probabilities.sum(1), 1.0, rtol=1e-5)


SMALL_BACKBONES = [n for n in BACKBONES if n not in ("efficientnet_b7", "densenet201")]


@pytest.mark.parametrize("backbone", SMALL_BACKBONES)
def test_transfer_models_build_at_their_smallest_input_with_a_new_head(backbone):
    size = BACKBONES[backbone].min_size
    model = build_model(backbone, (size, size, 3), 5, weights="none")
    _assert_inference_model(model, (size, size, 3), 5)
    base = find_backbone(model)
    assert [layer.name for layer in model.layers[-3:]] == ["pool", "head_dropout", "probabilities"]
    # Random weights hold nothing to transfer: the whole network trains, not only the head.
    assert base is not None and base.trainable
    head = model.get_layer("probabilities")
    trained = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    assert trained > head.count_params() and trained >= sum(int(np.prod(w.shape)) for w in base.trainable_weights)
    out = np.asarray(model(np.full((1, size, size, 3), 128, np.uint8)))
    assert out.shape == (1, 5) and abs(out.sum() - 1) < 1e-5


@pytest.mark.parametrize("backbone", ["efficientnet_b7", "densenet201"])
def test_the_largest_backbones_build_without_training(backbone):
    model = build_model(backbone, (32, 32, 3), 11, weights="none")
    _assert_inference_model(model, (32, 32, 3), 11)
    assert find_backbone(model).count_params() > 18_000_000


def test_greyscale_images_feed_a_backbone_as_three_equal_channels():
    model = build_model("mobilenet_v2", (32, 32, 1), 3, weights="none")
    _assert_inference_model(model, (32, 32, 1), 3)
    assert model.get_layer("grey_to_rgb") is not None


def test_images_below_a_backbones_minimum_are_refused():
    with pytest.raises(TrainingError, match="inception_v3 needs images of at least 75x75"):
        build_model("inception_v3", (64, 64, 3), 3, weights="none")


def test_unknown_models_name_the_zoo():
    with pytest.raises(TrainingError, match="cifar10_cnn.*mobilenet_v2"):
        build_model("alexnet", (32, 32, 3), 10)


def test_the_zoo_offers_every_promised_family():
    promised = {
        "mnist_cnn",
        "cifar10_cnn",
        "cifar100_cnn",
        "digits_cnn",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "efficientnet_b7",
        "densenet121",
        "densenet201",
        "resnet50",
        "vgg16",
        "xception",
        "inception_v3",
    }
    assert promised <= set(zoo())
    assert all(zoo()[name].transfer for name in BACKBONES)


@pytest.mark.parametrize(("mode", "module"), [("tf", "mobilenet_v2"), ("torch", "densenet"), ("caffe", "resnet50")])
def test_preprocessing_layers_equal_the_backbones_own_preprocess_input(mode, module):
    import keras

    images = np.random.default_rng(0).integers(0, 256, (4, 9, 7, 3), dtype=np.uint8)
    inputs = keras.Input((9, 7, 3), dtype="uint8")
    layer_model = keras.Model(inputs, preprocessing_layers(mode, inputs))
    expected = getattr(keras.applications, module).preprocess_input(images.astype("float32"))
    np.testing.assert_allclose(np.asarray(layer_model(images)), expected, atol=2e-5)


@pytest.mark.parametrize("mode", ["tf", "torch", "caffe", "included"])
def test_preprocessing_layers_convert_to_onnx_with_parity(mode):
    import keras
    import onnxruntime as ort
    from keras import layers

    from export.convert import to_onnx

    inputs = keras.Input((16, 16, 1), dtype="uint8", name="image")
    x = layers.Concatenate()([inputs, inputs, inputs])
    x = preprocessing_layers(mode, x)
    x = layers.Conv2D(4, 3)(x)
    x = layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, layers.Dense(3, activation="softmax")(x))
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    session = ort.InferenceSession(to_onnx(model).SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], {"image": images})
    np.testing.assert_allclose(got, np.asarray(model(images)), atol=1e-5)


def test_fine_tuning_unfreezes_the_top_of_the_base_but_not_its_batch_norm():
    model = build_model("mobilenet_v3_small", (32, 32, 3), 3, weights="none")
    base = find_backbone(model)
    unfrozen = unfreeze_top(model, 20)
    trainable = [layer for layer in base.layers if layer.trainable]
    assert 0 < unfrozen <= 20
    assert all(type(layer).__name__ != "BatchNormalization" for layer in trainable)
    assert all(base.layers.index(layer) >= len(base.layers) - 20 for layer in trainable)


def test_imagenet_weights_offline_fail_naming_weights_none(image_folder, tmp_path):
    # A proxy on a closed port makes the download fail at once, as on a machine without internet;
    # an empty KERAS_HOME makes sure no cached weights are found.
    env = {
        **os.environ,
        "KERAS_HOME": str(tmp_path / "keras"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "no_proxy": "",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "train",
            "--model",
            "mobilenet_v2",
            "--dataset",
            str(image_folder),
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "ImageNet weights of mobilenet_v2" in result.stderr and "--weights none" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "model.keras").exists()
