"""The model zoo: each model takes uint8 NHWC images and holds its own preprocessing.

No model here contains a random augmentation layer: augmentation runs in the training input
pipeline (training/augmentation.py), so the saved model is the inference model that tf2onnx
converts as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import TrainingError

if TYPE_CHECKING:
    import keras

# ImageNet channel statistics used by keras.applications' "caffe" and "torch" preprocessing.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)


def image_input(input_shape: tuple[int, int, int]) -> keras.KerasTensor:
    import keras

    return keras.Input(shape=input_shape, dtype="uint8", name="image")


def digits_cnn(input_shape: tuple[int, int, int], num_classes: int, **_: object) -> keras.Model:
    """A small CNN for 8x8 greyscale digits: two conv layers, batch norm, dropout."""
    import keras
    from keras import layers

    inputs = image_input(input_shape)
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="digits_cnn")


def mnist_cnn(input_shape: tuple[int, int, int], num_classes: int, **_: object) -> keras.Model:
    """The classic MNIST network: Conv2D 32 → Conv2D 64 → MaxPooling → Dropout → Dense 128 → Dropout → softmax."""
    import keras
    from keras import layers

    inputs = image_input(input_shape)
    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def _cifar_features(inputs: keras.KerasTensor, l2: float) -> keras.KerasTensor:
    """Three blocks of two 3x3 convolutions (32, 64, 128 filters), each with batch norm, then pooling and dropout."""
    from keras import layers, regularizers

    x = layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for block, (filters, dropout) in enumerate(((32, 0.2), (64, 0.3), (128, 0.4)), start=1):
        for conv in (1, 2):
            x = layers.Conv2D(
                filters,
                3,
                padding="same",
                activation="relu",
                kernel_regularizer=regularizers.l2(l2),
                name=f"block{block}_conv{conv}",
            )(x)
            x = layers.BatchNormalization(name=f"block{block}_bn{conv}")(x)
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
        x = layers.Dropout(dropout, name=f"block{block}_dropout")(x)
    return layers.Flatten(name="flatten")(x)


def cifar10_cnn(input_shape: tuple[int, int, int], num_classes: int, l2: float = 1e-4, **_: object) -> keras.Model:
    """Three conv blocks, Dense 512 with dropout, softmax; L2 on every kernel (1,343,018 weights for 32x32x3, 10 classes)."""
    import keras
    from keras import layers, regularizers

    inputs = image_input(input_shape)
    x = _cifar_features(inputs, l2)
    x = layers.Dense(512, activation="relu", kernel_regularizer=regularizers.l2(l2), name="dense512")(x)
    x = layers.Dropout(0.5, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cifar10_cnn")


def cifar100_cnn(input_shape: tuple[int, int, int], num_classes: int, l2: float = 1e-4, **_: object) -> keras.Model:
    """cifar10_cnn's features, then Dense 1024 → Dense 512 + batch norm → softmax (2,965,124 weights for 100 classes)."""
    import keras
    from keras import layers, regularizers

    inputs = image_input(input_shape)
    x = _cifar_features(inputs, l2)
    x = layers.Dense(1024, activation="relu", kernel_regularizer=regularizers.l2(l2), name="dense1024")(x)
    x = layers.Dropout(0.5, name="dense1024_dropout")(x)
    x = layers.Dense(512, activation="relu", kernel_regularizer=regularizers.l2(l2), name="dense512")(x)
    x = layers.BatchNormalization(name="dense512_bn")(x)
    x = layers.Dropout(0.5, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="cifar100_cnn")


@dataclass(frozen=True)
class Backbone:
    """A keras.applications network and how its inputs must be prepared."""

    application: str  # class name in keras.applications
    preprocessing: str  # keras.applications' mode: "tf", "torch", "caffe", or "included" (inside the network)
    default_size: int
    min_size: int


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone("MobileNetV2", "tf", 224, 32),
    "mobilenet_v3_small": Backbone("MobileNetV3Small", "included", 224, 32),
    "mobilenet_v3_large": Backbone("MobileNetV3Large", "included", 224, 32),
    "efficientnet_b0": Backbone("EfficientNetB0", "included", 224, 32),
    "efficientnet_b7": Backbone("EfficientNetB7", "included", 600, 32),
    "densenet121": Backbone("DenseNet121", "torch", 224, 32),
    "densenet201": Backbone("DenseNet201", "torch", 224, 32),
    "resnet50": Backbone("ResNet50", "caffe", 224, 32),
    "vgg16": Backbone("VGG16", "caffe", 224, 32),
    "xception": Backbone("Xception", "tf", 299, 71),
    "inception_v3": Backbone("InceptionV3", "tf", 299, 75),
}

BACKBONE_LAYER = "backbone"


def preprocessing_layers(mode: str, x: keras.KerasTensor) -> keras.KerasTensor:
    """keras.applications' `preprocess_input` for `mode`, as built-in layers that save, load and convert to ONNX."""
    import numpy as np
    from keras import layers

    if mode == "tf":
        return layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_tf")(x)
    if mode == "torch":
        x = layers.Rescaling(1.0 / 255, name="preprocess_torch_scale")(x)
        return layers.Normalization(
            mean=list(TORCH_MEAN), variance=[s * s for s in TORCH_STD], name="preprocess_torch_normalize"
        )(x)
    if mode == "caffe":
        # RGB→BGR and mean subtraction in one fixed 1x1 convolution (a permutation kernel plus a bias),
        # because no built-in layer reorders channels and a Lambda layer would not load safely.
        kernel = np.zeros((1, 1, 3, 3), dtype="float32")
        for out_channel, in_channel in enumerate((2, 1, 0)):
            kernel[0, 0, in_channel, out_channel] = 1.0
        bias = -np.asarray(CAFFE_MEAN_BGR, dtype="float32")
        caffe = layers.Conv2D(3, 1, trainable=False, name="preprocess_caffe_bgr_mean")
        x = layers.Rescaling(1.0, name="to_float")(x)
        out = caffe(x)
        caffe.set_weights([kernel, bias])
        return out
    if mode == "included":
        # The network rescales and normalises 0..255 inputs itself; it only needs floats.
        return layers.Rescaling(1.0, name="to_float")(x)
    raise TrainingError(f"unknown preprocessing mode {mode!r}")


def transfer_model(
    backbone: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    weights: str | None = "imagenet",
    dropout: float = 0.2,
    **_: object,
) -> keras.Model:
    """A keras.applications backbone with its preprocessing as layers and a new pooling/dropout/softmax head.

    With pretrained weights (ImageNet, or a weights file of the backbone) the backbone starts
    frozen and the head trains first; with `weights="none"` there is nothing to transfer, so the
    whole network is trainable from the start and its batch norm learns its own statistics.
    """
    import keras
    from keras import layers

    spec = BACKBONES[backbone]
    height, width, channels = input_shape
    if min(height, width) < spec.min_size:
        raise TrainingError(
            f"{backbone} needs images of at least {spec.min_size}x{spec.min_size}, not {height}x{width}; "
            f"resize them with --image-size (its natural size is {spec.default_size})"
        )
    if channels not in (1, 3):
        raise TrainingError(f"{backbone} takes greyscale or RGB images, not {channels} channels")
    weights = None if weights in (None, "none") else weights
    application = getattr(keras.applications, spec.application)
    kwargs: dict[str, object] = {}
    if spec.application.startswith("MobileNetV3"):
        # EfficientNets always rescale inside; MobileNetV3 does when asked.
        kwargs["include_preprocessing"] = True
    try:
        base = application(include_top=False, weights=weights, input_shape=(height, width, 3), **kwargs)
    except Exception as exc:
        if weights not in ("imagenet", None):
            raise TrainingError(
                f"could not load the backbone weights file {weights} into {backbone} ({type(exc).__name__}: {exc}); "
                f"it must hold {spec.application}'s weights without its top (include_top=False) for a {height}x{width} input"
            ) from exc
        if weights == "imagenet":
            raise TrainingError(
                f"could not fetch the ImageNet weights of {backbone} ({type(exc).__name__}: {exc}); they download once into "
                "~/.keras/models. Without internet, train from random weights with `--weights none`"
            ) from exc
        raise
    pretrained = weights is not None
    base.trainable = not pretrained

    inputs = image_input(input_shape)
    x = inputs
    if channels == 1:
        # Backbones take three channels: a greyscale image is the same picture in each of them.
        x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
    x = preprocessing_layers(spec.preprocessing, x)
    # training=False keeps batch norm in inference mode even after the top of the base is unfrozen,
    # so fine-tuning does not wreck the statistics the pretrained weights rely on. Random weights
    # have no such statistics: their batch norm must learn them like any network trained from scratch.
    x = _named(base, BACKBONE_LAYER)(x, training=False) if pretrained else _named(base, BACKBONE_LAYER)(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_transfer")


def _named(model: keras.Model, name: str) -> keras.Model:
    """Rename a functional model so the fine-tuning phase finds the backbone by a fixed name."""
    model.name = name
    return model


def find_backbone(model: keras.Model) -> keras.Model | None:
    """The pretrained base of a transfer model, or None for a model trained from scratch."""
    try:
        return model.get_layer(BACKBONE_LAYER)
    except ValueError:
        return None


def trained_layers(model: keras.Model) -> list[str]:
    """Names of the layers whose weights the next fit changes; a backbone's are `backbone/<layer>`."""
    names = []
    for layer in model.layers:
        if layer.name == BACKBONE_LAYER and hasattr(layer, "layers"):
            if layer.trainable:
                names += [f"{BACKBONE_LAYER}/{inner.name}" for inner in layer.layers if inner.trainable_weights]
        elif layer.trainable_weights:
            names.append(layer.name)
    return names


def unfreeze_top(model: keras.Model, layers_to_unfreeze: int) -> int:
    """Make the top `layers_to_unfreeze` layers of the backbone trainable, batch norm excepted; returns how many."""
    from keras import layers

    base = find_backbone(model)
    if base is None:
        return 0
    base.trainable = True
    cut = max(0, len(base.layers) - layers_to_unfreeze)
    unfrozen = 0
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= cut and not isinstance(layer, layers.BatchNormalization)
        unfrozen += int(layer.trainable and bool(layer.weights))
    return unfrozen


@dataclass(frozen=True)
class ModelSpec:
    """A zoo entry: how to build it and the input it is made for."""

    build: Callable[..., keras.Model]
    description: str
    default_size: tuple[int, int]
    default_color_mode: str  # "grayscale" or "rgb"
    transfer: bool = False


def _transfer(name: str) -> Callable[..., keras.Model]:
    def build(input_shape: tuple[int, int, int], num_classes: int, **options: object) -> keras.Model:
        return transfer_model(name, input_shape, num_classes, **options)

    return build


def zoo() -> dict[str, ModelSpec]:
    """Every model `python -m training train --model` accepts."""
    models = {
        "digits_cnn": ModelSpec(digits_cnn, "small CNN for 8x8 greyscale digits (the bundled model)", (8, 8), "grayscale"),
        "mnist_cnn": ModelSpec(
            mnist_cnn, "classic Conv-Conv-MaxPool-Dense CNN for 28x28 greyscale digits", (28, 28), "grayscale"
        ),
        "cifar10_cnn": ModelSpec(cifar10_cnn, "3 VGG-style conv blocks + Dense 512, for 32x32 RGB, 10 classes", (32, 32), "rgb"),
        "cifar100_cnn": ModelSpec(cifar100_cnn, "cifar10_cnn features + Dense 1024/512 head, for 100 classes", (32, 32), "rgb"),
    }
    for name, spec in BACKBONES.items():
        models[name] = ModelSpec(
            _transfer(name),
            f"keras.applications.{spec.application} transfer learning ({spec.preprocessing} preprocessing, "
            f"min {spec.min_size}px)",
            (spec.default_size, spec.default_size),
            "rgb",
            transfer=True,
        )
    return models


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int, **options: object) -> keras.Model:
    """Build a zoo model by name for images of `input_shape` (H, W, C) and `num_classes` classes."""
    models = zoo()
    if name not in models:
        raise TrainingError(f"unknown model {name!r}; choose one of {', '.join(models)}")
    if num_classes < 2:
        raise TrainingError(f"a classifier needs at least two classes, not {num_classes}")
    return models[name].build(input_shape, num_classes, **options)
